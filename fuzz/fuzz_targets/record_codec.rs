#![no_main]
//! See `offline_queue::fuzz::record_codec`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| offline_queue::fuzz::record_codec(data));
