#![no_main]
//! See `offline_queue::fuzz::redis_replies`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| offline_queue::fuzz::redis_replies(data));
