#![no_main]
//! See `offline_queue::testing::fuzz::typed_payload`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| offline_queue::testing::fuzz::typed_payload(data));
