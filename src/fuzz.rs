//! Fuzz target bodies, shared by `fuzz/` (cargo-fuzz) and the corpus regression test in
//! `tests/fuzz_corpus.rs`. Each takes arbitrary bytes and panics only on a real defect.
//!
//! Hidden, and not API: the codec these bodies exercise is private to the crate.

use crate::codec;
#[cfg(feature = "redb")]
use crate::message::RecipientId;

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

/// Splits `data` into two recipient ids (first byte = length of the first).
#[cfg(feature = "redb")]
fn two_ids(data: &[u8]) -> Option<(RecipientId, RecipientId, u64)> {
    let (&n, rest) = data.split_first()?;
    let n = (n as usize).min(rest.len());
    let (a, rest) = rest.split_at(n);
    let (b, seq) = rest.split_at(rest.len().min(RecipientId::MAX_LEN));
    let mut s = [0u8; 8];
    s[..seq.len().min(8)].copy_from_slice(&seq[..seq.len().min(8)]);
    Some((
        RecipientId::new(a).ok()?,
        RecipientId::new(b).ok()?,
        u64::from_le_bytes(s),
    ))
}

/// `RedbStorage` keys: a recipient's `(id, seq)` range never contains another id's key,
/// keys round-trip, and the expiry index's "due by now" bound splits deadlines exactly.
#[cfg(feature = "redb")]
pub fn redb_keys(data: &[u8]) {
    use std::cmp::Ordering;
    type K<'a> = (&'a [u8], u64);
    type E<'a> = (u64, &'a [u8], u64);
    let Some((a, b, seq)) = two_ids(data) else {
        return;
    };
    fn bytes(encoded: impl AsRef<[u8]>) -> Vec<u8> {
        encoded.as_ref().to_vec()
    }
    let enc = |id: &RecipientId, s: u64| bytes(<K as redb::Value>::as_bytes(&(id.as_bytes(), s)));
    let cmp = |x: &[u8], y: &[u8]| <K as redb::Key>::compare(x, y);
    let (lo, hi, key) = (enc(&a, 0), enc(&a, u64::MAX), enc(&b, seq));
    let inside = cmp(&lo, &key) != Ordering::Greater && cmp(&key, &hi) != Ordering::Greater;
    assert_eq!(
        inside,
        a == b,
        "{a} and {b}: one id's key falls in the other's range"
    );
    let (who, s) = <K as redb::Value>::from_bytes(&key);
    assert_eq!((who, s), (b.as_bytes(), seq), "key round trip");
    // Deadlines on both sides of "now".
    let now = seq.rotate_left(7) ^ u64::from(a.as_bytes()[0]);
    if now == u64::MAX {
        return;
    }
    let empty: &[u8] = &[];
    let bound = bytes(<E as redb::Value>::as_bytes(&(
        now.saturating_add(1),
        empty,
        0,
    )));
    let due = bytes(<E as redb::Value>::as_bytes(&(seq, a.as_bytes(), seq)));
    let before = <E as redb::Key>::compare(&due, &bound) == Ordering::Less;
    assert_eq!(
        before,
        seq <= now,
        "expiry bound misplaces deadline {seq} at {now}"
    );
}
