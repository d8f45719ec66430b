//! Every public entry point with each invalid value it can receive, and the exact error it
//! returns; after each rejected send, nothing was written. (README's "Errors" table mirrors it.)

mod common;

use std::time::Duration;

use common::{Harness, id};
use offline_queue::{
    BatchLimit, Envelope, Error, Limits, MessageId, OfflineQueue, RecipientId, TTL_CEILING,
};

fn config_error(build: impl FnOnce() -> Result<OfflineQueue, Error>) -> &'static str {
    match build() {
        Err(Error::InvalidConfig { field, reason }) => {
            assert!(!reason.is_empty());
            field
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn recipient_ids() {
    assert!(matches!(RecipientId::new(""), Err(Error::RecipientIdEmpty)));
    assert!(matches!(
        RecipientId::new(vec![b'x'; 256]),
        Err(Error::RecipientIdTooLong { len: 256, max: 255 })
    ));
    assert!(matches!(
        RecipientId::try_from(String::new()),
        Err(Error::RecipientIdEmpty)
    ));
    assert!(
        RecipientId::new(vec![0u8; 255]).is_ok(),
        "255 bytes of anything is fine"
    );
    assert!(!Error::RecipientIdEmpty.is_retryable());
}

#[test]
fn message_ids_in_text() {
    for bad in [
        "",
        "00",
        &"0".repeat(31),
        &"0".repeat(33),
        &"g".repeat(32),
        &"é".repeat(16),
    ] {
        assert!(
            matches!(
                MessageId::parse_hex(bad),
                Err(Error::InvalidMessageId { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn payload_at_the_limit_and_one_byte_over() {
    let limits = Limits {
        max_message_bytes: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    h.send("bob", &[0; 100]);
    let err = h
        .try_send(Envelope::new(id("carol"), vec![0; 101]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MessageTooLarge {
                size: 101,
                max: 100
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(h.stats("carol").messages, 0, "nothing written");
    assert_eq!(h.queue.metrics().rejected_too_large, 1);
}

#[test]
fn ttls_zero_over_the_limit_and_overflowing() {
    let limits = Limits {
        max_ttl: Duration::from_secs(3600),
        default_ttl: Some(Duration::from_secs(60)),
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    let with_ttl = |ttl| Envelope::new(id("bob"), b"x".to_vec()).with_ttl(ttl);
    assert!(matches!(
        h.try_send(with_ttl(Duration::ZERO)),
        Err(Error::TtlZero)
    ));
    let over = Duration::from_secs(3601);
    assert!(
        matches!(h.try_send(with_ttl(over)), Err(Error::TtlTooLong { ttl, max }) if ttl == over && max == Duration::from_secs(3600))
    );
    assert!(
        matches!(
            h.try_send(with_ttl(Duration::MAX)),
            Err(Error::TtlTooLong { .. })
        ),
        "no overflow, no panic"
    );
    assert!(
        h.try_send(with_ttl(Duration::from_nanos(1))).is_ok(),
        "the smallest positive TTL is valid"
    );
    h.try_send(with_ttl(Duration::from_secs(3600)))
        .expect("exactly max_ttl is valid");
    assert_eq!(
        h.stats("bob").messages,
        2,
        "only the valid ones were written"
    );
    let mut bob = h.connect("bob");
    assert_eq!(
        common::payloads(&bob.batches(&mut h)).len(),
        2,
        "a 1 ns TTL rounds up to 1 ms: deliverable now"
    );
    assert_eq!(h.queue.metrics().rejected_invalid_ttl, 3);
}

#[test]
fn full_queue_and_full_storage() {
    let limits = Limits {
        max_messages_per_recipient: 1,
        max_total_bytes: Some(64 * 1024 + 1),
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    h.send("bob", b"x");
    let err = h
        .try_send(Envelope::new(id("bob"), b"y".to_vec()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueFull {
                messages: 1,
                max_messages: 1,
                adding_messages: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable(), "space may be freed by acks");
    let err = h
        .try_send(Envelope::new(id("carol"), vec![0; 64 * 1024]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StorageFull {
                used: 2,
                adding: 65_537,
                max: 65_537
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(h.stats("carol").messages, 0);
}

#[test]
fn per_recipient_byte_quota() {
    let limits = Limits {
        max_bytes_per_recipient: 64 * 1024 + 10,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    h.send("bob", &[0; 64 * 1024]);
    let err = h
        .try_send(Envelope::new(id("bob"), vec![0; 10]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueFull {
                max_bytes: 65_546,
                adding_bytes: 11,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn absurd_configuration_is_refused_by_name() {
    let with = |limits: Limits| move || OfflineQueue::builder().limits(limits).build();
    let base = Limits::default;
    assert_eq!(
        config_error(with(Limits {
            max_message_bytes: 0,
            ..base()
        })),
        "max_message_bytes"
    );
    assert_eq!(
        config_error(with(Limits {
            max_messages_per_recipient: 0,
            ..base()
        })),
        "max_messages_per_recipient"
    );
    assert_eq!(
        config_error(with(Limits {
            max_bytes_per_recipient: 10,
            ..base()
        })),
        "max_bytes_per_recipient"
    );
    assert_eq!(
        config_error(with(Limits {
            max_total_bytes: Some(0),
            ..base()
        })),
        "max_total_bytes"
    );
    assert_eq!(
        config_error(with(Limits {
            max_ttl: Duration::ZERO,
            ..base()
        })),
        "max_ttl"
    );
    assert_eq!(
        config_error(with(Limits {
            max_ttl: Duration::MAX,
            ..base()
        })),
        "max_ttl"
    );
    assert_eq!(
        config_error(with(Limits {
            max_ttl: TTL_CEILING + Duration::from_secs(1),
            ..base()
        })),
        "max_ttl"
    );
    assert_eq!(
        config_error(with(Limits {
            default_ttl: Some(Duration::ZERO),
            ..base()
        })),
        "default_ttl"
    );
    assert_eq!(
        config_error(with(Limits {
            default_ttl: Some(Duration::from_secs(365 * 86_400)),
            ..base()
        })),
        "default_ttl"
    );
    assert_eq!(
        config_error(with(Limits {
            idle_recipient_timeout: Some(Duration::ZERO),
            ..base()
        })),
        "idle_recipient_timeout"
    );
    assert_eq!(
        config_error(with(Limits {
            dedup_window: Duration::MAX,
            ..base()
        })),
        "dedup_window"
    );
    assert_eq!(
        config_error(with(Limits {
            dedup_window: Duration::from_secs(3600),
            idle_recipient_timeout: Some(Duration::from_secs(60)),
            ..base()
        })),
        "idle_recipient_timeout"
    );
    let batch = |b: BatchLimit| move || OfflineQueue::builder().batch(b).build();
    assert_eq!(
        config_error(batch(BatchLimit {
            max_messages: 0,
            max_bytes: 1
        })),
        "batch.max_messages"
    );
    assert_eq!(
        config_error(batch(BatchLimit {
            max_messages: 1,
            max_bytes: 0
        })),
        "batch.max_bytes"
    );
    assert_eq!(
        config_error(|| OfflineQueue::builder().max_in_flight(0).build()),
        "max_in_flight"
    );
    assert_eq!(
        config_error(|| OfflineQueue::builder().max_deliveries(0).build()),
        "max_deliveries"
    );
    assert!(
        !Error::InvalidConfig {
            field: "x",
            reason: String::new()
        }
        .is_retryable()
    );
}

#[test]
fn every_limit_at_its_boundary_is_accepted() {
    let limits = Limits {
        max_message_bytes: 1,
        max_messages_per_recipient: 1,
        max_bytes_per_recipient: 2,
        max_total_bytes: Some(2),
        default_ttl: None,
        max_ttl: TTL_CEILING,
        idle_recipient_timeout: None,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| {
        b.limits(limits)
            .batch(BatchLimit {
                max_messages: 1,
                max_bytes: 1,
            })
            .max_in_flight(1)
            .max_deliveries(1)
    });
    h.try_send(Envelope::new(id("bob"), vec![7]).with_ttl(TTL_CEILING))
        .unwrap();
    let mut bob = h.connect("bob");
    assert_eq!(common::payloads(&bob.batches(&mut h)), [[7u8]]);
}

#[test]
fn bad_typed_payloads() {
    let mut h = Harness::new();
    h.send("bob", b"\xff\xff\xff");
    let mut bob = h.connect("bob");
    let message = bob.batches(&mut h).remove(0).messages.remove(0);
    assert!(matches!(message.decode::<String>(), Err(Error::Codec(_))));
    assert!(!Error::Codec(String::new()).is_retryable());
}

#[test]
fn a_total_byte_budget_the_storage_does_not_keep() {
    let limits = Limits {
        max_total_bytes: Some(1 << 20),
        ..Limits::default()
    };
    let field = config_error(|| {
        OfflineQueue::builder()
            .storage(std::sync::Arc::new(
                common::Shaped::new().without_byte_budget(),
            ))
            .limits(limits.clone())
            .build()
    });
    assert_eq!(field, "max_total_bytes");
    // A storage that keeps one takes the same limits.
    OfflineQueue::builder()
        .storage(std::sync::Arc::new(common::Shaped::new()))
        .limits(limits)
        .build()
        .unwrap();
}
