#![no_main]
//! See `offline_queue::fuzz::redb_layout`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| offline_queue::fuzz::redb_layout(data));
