//! The fuzz targets (`fuzz/`, run by `cargo fuzz` where it is installed) as regression tests:
//! every file of each committed corpus, then a few thousand seeded random inputs, through the
//! same target functions.

// The chat server's frame parser, as the example builds it, and its fuzz body.
#[path = "../examples/chat_server/server/protocol.rs"]
#[allow(dead_code)]
mod protocol;

#[path = "../fuzz/chat_frames.rs"]
mod chat_frames;

use offline_queue::fuzz;
use proptest::prelude::*;

fn corpus(target: &str, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        count += 1;
    }
    assert!(count > 0, "empty corpus in {}", dir.display());
}

#[test]
fn record_codec_corpus() {
    corpus("record_codec", fuzz::record_codec);
}

#[test]
fn typed_payload_corpus() {
    corpus("typed_payload", fuzz::typed_payload);
}

#[cfg(feature = "redb")]
#[test]
fn redb_layout_corpus() {
    corpus("redb_layout", fuzz::redb_layout);
}

#[cfg(feature = "redis")]
#[test]
fn redis_replies_corpus() {
    corpus("redis_replies", fuzz::redis_replies);
}

#[test]
fn chat_frames_corpus() {
    corpus("chat_frames", chat_frames::check);
}

/// Frames that are valid JSON of the protocol's shape, with any field values: ids empty, long
/// or with control characters, recipients of any text, numbers at their limits.
fn chat_frame() -> impl Strategy<Value = String> {
    let text = || proptest::option::of(".{0,140}");
    let send = (text(), text(), text(), proptest::option::of(any::<u64>())).prop_map(
        |(to, body, id, ttl)| {
            serde_json::json!({"type": "send", "to": to, "body": body, "id": id, "ttl_secs": ttl})
                .to_string()
        },
    );
    let ack = (
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(any::<u64>(), 0..4),
    )
        .prop_map(|(up_to, seqs)| {
            serde_json::json!({"type": "ack", "up_to": up_to, "seqs": seqs}).to_string()
        });
    prop_oneof![send, ack]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
    #[test]
    fn record_codec_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzz::record_codec(&data);
    }

    #[test]
    fn typed_payload_random(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        fuzz::typed_payload(&data);
    }

    #[cfg(feature = "redb")]
    #[test]
    fn redb_layout_random(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzz::redb_layout(&data);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_replies_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzz::redis_replies(&data);
    }

    #[test]
    fn chat_frames_random(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        chat_frames::check(&data);
    }

    #[test]
    fn chat_frames_shaped(frame in chat_frame()) {
        chat_frames::check(frame.as_bytes());
    }
}
