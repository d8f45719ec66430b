//! Limits (contract rules 1 and 5): a quota or the storage-wide byte budget refuses an append
//! whole, or drops the oldest and counts them as lost, as the overflow policy says.

use super::{ALL, T0, bodies, deduped, recipient, record};
use crate::limits::{Overflow, Quota};
use crate::message::{MessageId, Seq};
use crate::storage::{Ack, Appended, NewRecord, Storage, StorageExt};

/// With `Overflow::Reject`, an append that does not fit fails with `QueueFull` and changes
/// nothing, by message count and by bytes.
pub async fn quota_reject_is_atomic(storage: &dyn Storage) {
    let bob = recipient("bob");
    let quota = Quota {
        max_messages: 3,
        max_bytes: 100,
        ..Quota::UNLIMITED
    };
    storage
        .append(&bob, vec![record(b"1"), record(b"2")], &quota, T0)
        .await
        .unwrap();
    let err = storage
        .append(&bob, vec![record(b"3"), record(b"4")], &quota, T0)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::Error::QueueFull {
                messages: 2,
                max_messages: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let caps = storage.capabilities();
    if caps.exact_quotas {
        let err = storage
            .append(&bob, vec![record(&[0; 99])], &quota, T0)
            .await
            .unwrap_err();
        let stored_bytes = if caps.exact_stats { 2 } else { 0 };
        assert!(
            matches!(
                err,
                crate::Error::QueueFull {
                    bytes,
                    max_bytes: 100,
                    ..
                } if bytes == stored_bytes
            ),
            "{err:?}"
        );
    }
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [b"1", b"2"],
        "nothing partial written"
    );
    storage
        .append(&bob, vec![record(b"3")], &quota, T0)
        .await
        .expect("exactly full fits");
}

/// With `Overflow::DropOldest`, the oldest records make room, are counted as lost, and the
/// count is confirmed through `lost_confirmed_through`; a batch larger than the quota itself
/// is rejected.
pub async fn quota_drop_oldest(storage: &dyn Storage) {
    let bob = recipient("bob");
    let quota = Quota {
        max_messages: 3,
        max_bytes: 1000,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    for i in 0..3u8 {
        storage
            .append(&bob, vec![record(&[i])], &quota, T0)
            .await
            .unwrap();
    }
    let outcome = storage
        .append(&bob, vec![record(&[3]), record(&[4])], &quota, T0)
        .await
        .unwrap();
    let counts = storage.capabilities().loss_counts;
    if counts {
        assert_eq!(outcome.dropped, 2);
    }
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [[2u8], [3], [4]],
        "oldest dropped"
    );
    let read = storage.read(&bob, None, ALL, T0).await.unwrap();
    if counts {
        assert_eq!(
            read.lost_unconfirmed, 2,
            "drops are counted for the gap report"
        );
    }
    let total = read.lost_total;
    let too_big = storage
        .append(&bob, (0..4).map(|i| record(&[i])).collect(), &quota, T0)
        .await;
    assert!(
        matches!(too_big, Err(crate::Error::QueueFull { .. })),
        "a batch over the quota alone"
    );
    if !counts {
        return;
    }
    let ack = Ack {
        lost_confirmed_through: Some(total),
        ..Ack::default()
    };
    storage.ack(&bob, &ack, T0).await.unwrap();
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        0,
        "reported loss is forgotten"
    );
}

/// `append_one` is `append` with a batch of one: seqs, dedup, quotas and drops alike. Each
/// recipient keeps one quota throughout, as under an engine (a broker may fix a queue's
/// limits when it makes the queue).
pub async fn append_one(storage: &dyn Storage) {
    let caps = storage.capabilities();
    let bob = recipient("bob");
    let quota = Quota {
        max_messages: 2,
        max_bytes: 1000,
        overflow: Overflow::Reject,
        ..Quota::UNLIMITED
    };
    let first = storage
        .append_one(&bob, record(b"a"), &quota, T0)
        .await
        .unwrap();
    let Appended::Stored(first_seq) = first.record else {
        panic!("a new record is stored: {first:?}");
    };
    assert_eq!(first.dropped, 0);
    if caps.exact_stats {
        assert_eq!(first.pending, 1);
    }
    let batch = storage
        .append(&bob, vec![record(b"b")], &quota, T0)
        .await
        .unwrap();
    assert!(
        batch.records[0].seq() > first_seq,
        "append_one and append share one seq order"
    );

    if caps.exact_quotas {
        let full = storage.append_one(&bob, record(b"c"), &quota, T0).await;
        assert!(
            matches!(full, Err(crate::Error::QueueFull { .. })),
            "append_one keeps the quota: {full:?}"
        );
        assert_eq!(
            bodies(storage, &bob, T0).await,
            [b"a", b"b"],
            "nothing written"
        );
    }

    let dave = recipient("dave");
    let dropping = Quota {
        overflow: Overflow::DropOldest,
        ..quota
    };
    for body in [b"a", b"b"] {
        storage
            .append_one(&dave, record(body), &dropping, T0)
            .await
            .unwrap();
    }
    let dropped = storage
        .append_one(&dave, record(b"c"), &dropping, T0)
        .await
        .unwrap();
    if caps.loss_counts {
        assert_eq!(dropped.dropped, 1, "{dropped:?}");
    }
    if caps.exact_stats {
        assert_eq!(dropped.pending, 2, "{dropped:?}");
    }
    assert_eq!(
        bodies(storage, &dave, T0).await,
        [b"b", b"c"],
        "oldest dropped"
    );

    let alice = recipient("alice");
    if caps.dedup {
        let id = MessageId::generate();
        let original = storage
            .append_one(&alice, deduped(b"x", id), &Quota::UNLIMITED, T0)
            .await
            .unwrap();
        let again = storage
            .append_one(&alice, deduped(b"x", id), &Quota::UNLIMITED, T0)
            .await
            .unwrap();
        assert_eq!(
            again.record,
            Appended::Duplicate(original.record.seq()),
            "a repeated id is a duplicate of the original"
        );
        assert_eq!(
            (again.dropped, again.pending),
            (0, 1),
            "a duplicate drops nothing"
        );
        let by_batch = MessageId::generate();
        let batch = storage
            .append(&alice, vec![deduped(b"y", by_batch)], &Quota::UNLIMITED, T0)
            .await
            .unwrap();
        let repeated = storage
            .append_one(&alice, deduped(b"y", by_batch), &Quota::UNLIMITED, T0)
            .await
            .unwrap();
        assert_eq!(
            repeated.record,
            Appended::Duplicate(batch.records[0].seq()),
            "append_one sees ids stored by append"
        );
        assert!(
            batch.records[0].seq() > again.record.seq(),
            "append after append_one continues the seq order"
        );
        assert_eq!(
            bodies(storage, &alice, T0).await,
            [b"x", b"y"],
            "each stored once"
        );
    }

    // Dropping by bytes: "b" (1 byte) goes so that "c" and "dd" fit in 3 bytes.
    let erin = recipient("erin");
    let by_bytes = Quota {
        max_messages: 10,
        max_bytes: 3,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    for body in [&b"b"[..], b"c"] {
        storage
            .append_one(&erin, record(body), &by_bytes, T0)
            .await
            .unwrap();
    }
    let dropped = storage
        .append_one(&erin, record(b"dd"), &by_bytes, T0)
        .await
        .unwrap();
    if caps.loss_counts {
        assert_eq!(dropped.dropped, 1, "{dropped:?}");
    }
    assert_eq!(bodies(storage, &erin, T0).await, [&b"c"[..], b"dd"]);

    // A 2-byte record does not fit a budget of one byte more than is stored, and a refused
    // one leaves nothing reserved, so it fits a budget of two more (for a backend that keeps
    // a budget: `Capabilities::total_byte_budget`).
    if !caps.total_byte_budget {
        return;
    }
    let mut stored = 0;
    for who in [&bob, &dave, &alice, &erin] {
        stored += storage.stats(who).await.unwrap().bytes;
    }
    let carol = recipient("carol");
    let budget = |max| Quota {
        max_total_bytes: Some(max),
        ..Quota::UNLIMITED
    };
    let refused = storage
        .append_one(&carol, record(b"zz"), &budget(stored + 1), T0)
        .await;
    assert!(
        matches!(refused, Err(crate::Error::StorageFull { .. })),
        "append_one keeps the global budget: {refused:?}"
    );
    assert_eq!(
        storage.stats(&carol).await.unwrap().messages,
        0,
        "nothing written"
    );
    storage
        .append_one(&carol, record(b"zz"), &budget(stored + 2), T0)
        .await
        .expect("a refused append reserves nothing");
}

/// The storage-wide byte budget rejects with `StorageFull` and frees with acks. Checked only
/// for a backend that says it keeps one ([`Capabilities::total_byte_budget`]); the engine
/// refuses a budget the others would not keep.
///
/// [`Capabilities::total_byte_budget`]: crate::storage::Capabilities::total_byte_budget
pub async fn global_budget(storage: &dyn Storage) {
    if !storage.capabilities().total_byte_budget {
        return;
    }
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let quota = Quota {
        max_total_bytes: Some(100),
        ..Quota::UNLIMITED
    };
    let seqs: Vec<Seq> = storage
        .append(&bob, vec![record(&[0; 60])], &quota, T0)
        .await
        .unwrap()
        .records
        .into_iter()
        .map(Appended::seq)
        .collect();
    let err = storage
        .append(&carol, vec![record(&[0; 60])], &quota, T0)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::Error::StorageFull {
                max: 100,
                adding: 60,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(storage.stats(&carol).await.unwrap().messages, 0);
    storage.ack_through(&bob, seqs[0], T0).await.unwrap();
    storage
        .append(&carol, vec![record(&[0; 60])], &quota, T0)
        .await
        .expect("space freed by ack");
}

/// At any fill of the storage-wide budget, a resend of stored ids is a duplicate (Ok, the
/// first seq, nothing added), as the failure semantics promise; and a DropOldest append that
/// frees as many bytes as it adds is stored, since the net change is what counts. Checked
/// only for a backend that keeps a budget ([`Capabilities::total_byte_budget`]).
///
/// [`Capabilities::total_byte_budget`]: crate::storage::Capabilities::total_byte_budget
pub async fn global_budget_full_then_retry(storage: &dyn Storage) {
    if !storage.capabilities().total_byte_budget {
        return;
    }
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let quota = Quota {
        max_total_bytes: Some(100),
        ..Quota::UNLIMITED
    };
    let sent = NewRecord {
        id: MessageId::from_bytes([7; 16]),
        dedup: true,
        ..record(&[1; 60])
    };
    let first = storage
        .append(&bob, vec![sent.clone()], &quota, T0)
        .await
        .unwrap();
    // Fill the budget to the byte.
    storage
        .append(&carol, vec![record(&[2; 40])], &quota, T0)
        .await
        .unwrap();
    let full = storage.append(&carol, vec![record(&[3])], &quota, T0).await;
    assert!(
        matches!(full, Err(crate::Error::StorageFull { max: 100, .. })),
        "the budget is full: {full:?}"
    );
    // The client did not hear the first answer and sends again: a duplicate, full or not.
    let retry = storage
        .append(&bob, vec![sent.clone()], &quota, T0)
        .await
        .unwrap_or_else(|e| panic!("a retry of a stored id at a full budget: {e:?}"));
    assert_eq!(
        retry.records,
        vec![Appended::Duplicate(first.records[0].seq())],
        "the retry is the first append's duplicate"
    );
    let retry_one = storage
        .append_one(&bob, sent, &quota, T0)
        .await
        .unwrap_or_else(|e| panic!("append_one's retry at a full budget: {e:?}"));
    assert_eq!(
        retry_one.record,
        Appended::Duplicate(first.records[0].seq())
    );
    assert_eq!(
        storage.stats(&bob).await.unwrap().messages,
        1,
        "stored once"
    );

    // DropOldest at a full budget: 40 bytes out of carol's queue, 40 in, net zero.
    let drop_oldest = Quota {
        max_messages: 1,
        overflow: Overflow::DropOldest,
        ..quota
    };
    let swapped = storage
        .append(&carol, vec![record(&[4; 40])], &drop_oldest, T0)
        .await
        .unwrap_or_else(|e| panic!("a net-zero DropOldest append at a full budget: {e:?}"));
    assert_eq!(swapped.dropped, 1);
    assert_eq!(bodies(storage, &carol, T0).await, [vec![4u8; 40]]);
    // And the budget still holds exactly: one more byte does not fit.
    let over = storage.append(&carol, vec![record(&[5])], &quota, T0).await;
    assert!(
        matches!(over, Err(crate::Error::StorageFull { .. })),
        "{over:?}"
    );
}
