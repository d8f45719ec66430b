//! Key names. Every key of one recipient carries the same hash tag, the recipient id in hex,
//! so a script touching them stays in one cluster slot, and no id, whatever bytes it holds,
//! can produce another id's key or break out of its tag (hex has no braces or separators).

use crate::fnv;
use crate::message::RecipientId;

/// Global index keys are spread over this many buckets, so no single key (and no single
/// cluster node) takes every queue's index traffic.
pub(super) const BUCKETS: u32 = 16;

/// The hex form of a recipient id: its hash tag, and its name in indexes and wake-ups.
pub(super) fn hex(recipient: &RecipientId) -> String {
    crate::hex::encode(recipient.as_bytes())
}

/// The recipient id a hex name stands for; `None` if the text is not one of ours.
pub(super) fn from_hex(text: &[u8]) -> Option<RecipientId> {
    RecipientId::new(crate::hex::decode(text)?).ok()
}

/// The seven keys of one recipient, in the order the steps expect (see `prelude.lua`).
/// The metadata is `m2`, a name no metadata of another layout holds, so a queue of another
/// layout is never misread as one of this.
pub(super) fn recipient_keys(prefix: &str, hex: &str) -> [String; 7] {
    // Built by hand: `format!` here was a measurable share of a send's CPU in the client.
    ["m2", "l", "x", "d", "u", "ut", "p"].map(|suffix| {
        let mut key = String::with_capacity(prefix.len() + hex.len() + suffix.len() + 4);
        key.push_str(prefix);
        key.push_str(":{");
        key.push_str(hex);
        key.push_str("}:");
        key.push_str(suffix);
        key
    })
}

/// Which index bucket a recipient is filed in (FNV-1a of its hex name: stable across nodes
/// and versions).
pub(super) fn bucket(hex: &str) -> u32 {
    fnv::fnv1a_32(fnv::OFFSET_32, hex.as_bytes()) % BUCKETS
}

/// The bucket of queues by earliest deadline (score: a deadline no later than the queue's
/// earliest).
pub(super) fn deadline_index(prefix: &str, bucket: u32) -> String {
    format!("{prefix}:deadlines:{{oq-{bucket}}}")
}

/// The bucket of queues by last append or ack.
pub(super) fn idle_index(prefix: &str, bucket: u32) -> String {
    format!("{prefix}:idle:{{oq-{bucket}}}")
}

/// The storage-wide byte counter (kept only with `RedisOptions::track_total_bytes`).
pub(super) fn total_bytes(prefix: &str) -> String {
    format!("{prefix}:total-bytes")
}

/// The sharded pub/sub channel a node listens on for wake-ups.
pub(super) fn wake_channel(prefix: &str, node: &str) -> String {
    format!("{prefix}:wake:{{{node}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_names_round_trip_and_never_contain_tag_braces() {
        for raw in [&b"a"[..], b"a}b", b"{x}", b"\0\xff", &[b'z'; 255]] {
            let id = RecipientId::new(raw).unwrap();
            let name = hex(&id);
            assert!(name.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(from_hex(name.as_bytes()), Some(id));
        }
        assert_eq!(from_hex(b"zz"), None);
        assert_eq!(from_hex(b"abc"), None);
        assert_eq!(from_hex(b""), None, "an empty id is not valid");
    }

    /// Queues already in Redis are filed under these buckets: they must never change.
    #[test]
    fn buckets_are_stable() {
        let buckets = ["", "61", "6162", "626f62", "ff00", "0123456789abcdef"].map(bucket);
        assert_eq!(buckets, [5, 8, 8, 13, 5, 13]);
    }

    #[test]
    fn keys_of_one_recipient_share_one_hash_tag() {
        let keys = recipient_keys("oq", "6162");
        assert!(keys.iter().all(|k| k.contains("{6162}")));
        assert_eq!(keys[0], "oq:{6162}:m2");
    }
}
