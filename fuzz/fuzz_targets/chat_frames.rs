#![no_main]
//! See `fuzz/chat_frames.rs`: the chat server's frame parser on any text.

#[path = "../../examples/chat_server/server/protocol.rs"]
#[allow(dead_code)]
mod protocol;

#[path = "../chat_frames.rs"]
mod chat_frames;

libfuzzer_sys::fuzz_target!(|data: &[u8]| chat_frames::check(data));
