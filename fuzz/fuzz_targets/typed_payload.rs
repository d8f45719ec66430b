#![no_main]
//! See `offline_queue::fuzz::typed_payload`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| offline_queue::fuzz::typed_payload(data));
