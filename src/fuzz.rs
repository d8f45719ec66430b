//! Fuzz target bodies, shared by `fuzz/` (cargo-fuzz) and the corpus regression test in
//! `tests/fuzz_corpus.rs`. Each takes arbitrary bytes and panics only on a real defect.
//!
//! Hidden, and not API: the codec these bodies exercise is private to the crate.

use crate::codec;

/// The record body decoder, for the crate's tests that read stored records directly
/// (`tests/redb_files.rs`, `tests/redis_restart.rs`) and so see bodies as the codec framed them.
pub use crate::codec::decode_body;

/// The record decoder, with and without compression: never panics, never returns more than
/// its cap for a compressed body, and round-trips whatever it encoded.
pub fn record_codec(data: &[u8]) {
    let cap = 1 << 16;
    if let Ok(payload) = codec::decode_body(data.to_vec(), cap) {
        let raw = data.last() == Some(&0);
        assert!(
            raw || payload.len() <= cap,
            "compressed body decoded past its cap"
        );
    }
    for threshold in [None, Some(0), Some(64)] {
        let body = codec::encode_body(data.to_vec(), threshold);
        let back = codec::decode_body(body, data.len().max(1)).expect("own encoding decodes");
        assert_eq!(back, data, "round trip");
    }
}

/// Typed payload decoding through bincode: never panics or aborts, whatever the length
/// prefixes claim.
pub fn typed_payload(data: &[u8]) {
    let _ = codec::from_bytes::<(String, Vec<u8>, u64, Option<Vec<String>>)>(data);
    let _ = codec::from_bytes::<Vec<Vec<u8>>>(data);
}

/// What `RedbStorage` reads back from its file (recipient metadata, seq lists, log records):
/// never a panic, and its own encodings round-trip.
#[cfg(feature = "redb")]
pub fn redb_layout(data: &[u8]) {
    crate::storage::redb::fuzz_decoders(data);
}

/// What `RedisStorage` reads from the server (every step's reply, from `data` parsed as RESP)
/// and stored records: never a panic.
#[cfg(feature = "redis")]
pub fn redis_replies(data: &[u8]) {
    crate::storage::redis::fuzz_replies(data);
}
