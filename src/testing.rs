//! The conformance suite: the [`Storage`] contract written once, for every backend, in-tree or
//! not (as arrow-rs `object_store` does with its integration tests).
//!
//! ```
//! # futures::executor::block_on(async {
//! use std::sync::Arc;
//! use offline_queue::{MemoryStorage, Storage};
//! offline_queue::testing::run_all(|| async { Arc::new(MemoryStorage::new()) as Arc<dyn Storage> }).await;
//! # });
//! ```
//!
//! Each check is also public on its own, taking a fresh, empty storage. Checks panic with a
//! message naming the broken rule. Time is passed explicitly, so no check sleeps.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{ManualClock, Timestamp};
use crate::limits::{BatchLimit, Overflow, Quota};
use crate::message::{Envelope, MessageId, RecipientId, Seq};
use crate::queue::OfflineQueue;
use crate::storage::{
    Ack, Appended, DeliveryRead, NewRecord, ReadBatch, RecipientStats, Storage, StorageExt,
};
use crate::transport::{Outbound, channel_transport};

/// The time every check starts at.
pub const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// A recipient id for tests.
pub fn recipient(name: &str) -> RecipientId {
    RecipientId::new(name).expect("valid test recipient")
}

/// A record with a fresh id, no dedup, sent at `T0`, never expiring.
pub fn record(body: &[u8]) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: T0,
        expires_at: None,
        body: body.to_vec(),
    }
}

fn expiring(body: &[u8], expires_at: Timestamp) -> NewRecord {
    NewRecord {
        expires_at: Some(expires_at),
        ..record(body)
    }
}

fn deduped(body: &[u8], id: MessageId) -> NewRecord {
    NewRecord {
        id,
        dedup: true,
        ..record(body)
    }
}

const ALL: BatchLimit = BatchLimit {
    max_messages: usize::MAX,
    max_bytes: usize::MAX,
};

async fn bodies(storage: &dyn Storage, who: &RecipientId, now: Timestamp) -> Vec<Vec<u8>> {
    storage
        .read_all(who, now)
        .await
        .expect("read_all")
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

async fn append(storage: &dyn Storage, who: &RecipientId, records: Vec<NewRecord>) -> Vec<Seq> {
    storage
        .append(who, records, &Quota::UNLIMITED, T0)
        .await
        .expect("append")
        .records
        .into_iter()
        .map(Appended::seq)
        .collect()
}

/// Runs every check, each against a fresh storage from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Storage>>,
{
    order_and_seqs(&*make().await).await;
    seqs_never_reused_after_empty(&*make().await).await;
    read_bounds(&*make().await).await;
    acks(&*make().await).await;
    delivery_counts(&*make().await).await;
    read_for_delivery(&*make().await).await;
    ack_and_read_for_delivery(&*make().await).await;
    dedup(&*make().await).await;
    quota_reject_is_atomic(&*make().await).await;
    quota_drop_oldest(&*make().await).await;
    append_one(&*make().await).await;
    loss_confirmation_is_idempotent(&*make().await).await;
    global_budget(&*make().await).await;
    expiry(&*make().await).await;
    passed_over_counts_once(&*make().await).await;
    purge_budget(&*make().await).await;
    idle_removal(&*make().await).await;
    idle_refiling_is_bounded(&*make().await).await;
    isolation(&*make().await).await;
    stats_and_remove(&*make().await).await;
    concurrent_appends(make().await).await;
    engine_round_trip(make().await).await;
}

/// Seqs strictly increase in append order, within and across appends; reads return seq order.
pub async fn order_and_seqs(storage: &dyn Storage) {
    let bob = recipient("bob");
    let first = append(storage, &bob, vec![record(b"1"), record(b"2")]).await;
    let second = append(storage, &bob, vec![record(b"3")]).await;
    let all: Vec<Seq> = first.into_iter().chain(second).collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "seqs must strictly increase: {all:?}"
    );
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [b"1", b"2", b"3"],
        "read order"
    );
    let read = storage.read(&bob, Some(all[0]), ALL, T0).await.unwrap();
    let after: Vec<Seq> = read.records.iter().map(|r| r.seq).collect();
    assert_eq!(
        after,
        all[1..],
        "read after a cursor returns only later seqs"
    );
    let empty = storage
        .append(&bob, vec![], &Quota::UNLIMITED, T0)
        .await
        .unwrap();
    assert!(empty.records.is_empty(), "an empty append stores nothing");
    let unknown = storage
        .read(&recipient("nobody"), None, ALL, T0)
        .await
        .unwrap();
    assert!(
        unknown.records.is_empty() && unknown.lost_unconfirmed == 0,
        "unknown recipient reads empty"
    );
}

/// A queue emptied by acks never hands out a seq its recipient has seen.
pub async fn seqs_never_reused_after_empty(storage: &dyn Storage) {
    let bob = recipient("bob");
    let old = append(storage, &bob, vec![record(b"a"), record(b"b")]).await;
    storage.ack_through(&bob, old[1], T0).await.unwrap();
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 0);
    let new = append(storage, &bob, vec![record(b"c")]).await;
    assert!(
        new[0] > old[1],
        "seq reused after the queue emptied: {new:?} after {old:?}"
    );
}

/// Reads are bounded by count and bytes; a single record larger than the byte bound still
/// comes out alone, so delivery never stalls.
pub async fn read_bounds(storage: &dyn Storage) {
    let bob = recipient("bob");
    let records = (0..10).map(|i| record(&[i; 10])).collect();
    append(storage, &bob, records).await;
    let by_count = BatchLimit {
        max_messages: 3,
        max_bytes: usize::MAX,
    };
    assert_eq!(
        storage
            .read(&bob, None, by_count, T0)
            .await
            .unwrap()
            .records
            .len(),
        3
    );
    let by_bytes = BatchLimit {
        max_messages: 100,
        max_bytes: 25,
    };
    assert_eq!(
        storage
            .read(&bob, None, by_bytes, T0)
            .await
            .unwrap()
            .records
            .len(),
        2
    );
    let tiny = BatchLimit {
        max_messages: 100,
        max_bytes: 1,
    };
    assert_eq!(
        storage
            .read(&bob, None, tiny, T0)
            .await
            .unwrap()
            .records
            .len(),
        1,
        "an oversize first record is returned alone"
    );
    let zero = BatchLimit {
        max_messages: 0,
        max_bytes: usize::MAX,
    };
    let none = storage
        .read_for_delivery(&bob, None, None, zero, T0)
        .await
        .unwrap()
        .batch;
    assert!(none.records.is_empty(), "a batch of zero reads nothing");
    let counted = storage.read(&bob, None, by_count, T0).await.unwrap();
    assert!(
        counted.records.iter().all(|r| r.delivery_count == 0),
        "and counts nothing"
    );
}

/// Cumulative and selective acks remove exactly what they name; unknown seqs are ignored.
pub async fn acks(storage: &dyn Storage) {
    let bob = recipient("bob");
    let seqs = append(storage, &bob, (0..6).map(|i| record(&[i])).collect()).await;
    assert_eq!(
        storage.ack_through(&bob, seqs[1], T0).await.unwrap(),
        2,
        "cumulative ack"
    );
    assert_eq!(
        storage
            .ack_seqs(&bob, &[seqs[3], seqs[5]], T0)
            .await
            .unwrap(),
        2,
        "selective ack"
    );
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [[2u8], [4]],
        "what remains"
    );
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!(
        (stats.messages, stats.bytes, stats.newest_seq),
        (2, 2, Some(seqs[4])),
        "stats after the newest record was acked alone"
    );
    let again = Ack {
        through: Some(seqs[1]),
        seqs: vec![seqs[3], Seq(u64::MAX)],
        ..Ack::default()
    };
    assert_eq!(
        storage.ack(&bob, &again, T0).await.unwrap(),
        0,
        "acks of removed or unknown seqs do nothing"
    );
    assert_eq!(storage.ack_through(&bob, seqs[5], T0).await.unwrap(), 2);
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 0);
}

/// `mark_delivered` increments the count a later read reports.
pub async fn delivery_counts(storage: &dyn Storage) {
    let bob = recipient("bob");
    let seqs = append(storage, &bob, vec![record(b"a"), record(b"b")]).await;
    storage.mark_delivered(&bob, &seqs[..1]).await.unwrap();
    storage.mark_delivered(&bob, &seqs[..1]).await.unwrap();
    let read = storage.read(&bob, None, ALL, T0).await.unwrap();
    let counts: Vec<u32> = read.records.iter().map(|r| r.delivery_count).collect();
    assert_eq!(counts, [2, 0], "delivery counts");
}

/// `read_for_delivery` returns what `read` returns, with the counts from before, and counts one
/// delivery for each record it returned: in order, after a cursor, past an expired record, and
/// again for a redelivery; records it did not return keep their counts.
pub async fn read_for_delivery(storage: &dyn Storage) {
    let bob = recipient("bob");
    let at = |s| T0.saturating_add(Duration::from_secs(s));
    let seqs = append(
        storage,
        &bob,
        vec![
            record(b"a"),
            expiring(b"gone", at(5)),
            record(b"b"),
            record(b"c"),
            record(b"d"),
        ],
    )
    .await;
    let two = BatchLimit {
        max_messages: 2,
        max_bytes: usize::MAX,
    };
    let plain = storage.read(&bob, None, two, at(10)).await.unwrap();
    let first = storage
        .read_for_delivery(&bob, None, None, two, at(10))
        .await
        .unwrap()
        .batch;
    assert_eq!(counts(&first), counts(&plain), "same records as read");
    assert_eq!(counts(&first), [(seqs[0], 0), (seqs[2], 0)]);
    assert_eq!(
        first.expired,
        [seqs[1]],
        "the expired record is passed over"
    );
    let next = storage
        .read_for_delivery(&bob, None, Some(seqs[2]), two, at(10))
        .await
        .unwrap()
        .batch;
    assert_eq!(counts(&next), [(seqs[3], 0), (seqs[4], 0)]);
    let again = storage
        .read_for_delivery(&bob, None, None, ALL, at(10))
        .await
        .unwrap()
        .batch;
    assert_eq!(
        counts(&again),
        [(seqs[0], 1), (seqs[2], 1), (seqs[3], 1), (seqs[4], 1)],
        "each counted once, and returned with the count from before"
    );
    let after = storage.read(&bob, None, ALL, at(10)).await.unwrap();
    assert_eq!(
        counts(&after),
        [(seqs[0], 2), (seqs[2], 2), (seqs[3], 2), (seqs[4], 2)],
        "the redelivery counted too"
    );
    // A record appended later starts at zero, and a plain read counts nothing.
    let later = append(storage, &bob, vec![record(b"e")]).await;
    storage
        .read(&bob, Some(seqs[4]), ALL, at(10))
        .await
        .unwrap();
    let fresh = storage
        .read(&bob, Some(seqs[4]), ALL, at(10))
        .await
        .unwrap();
    assert_eq!(counts(&fresh), [(later[0], 0)]);
    // Passing over an expired record is not handing it over: with the clock stepped back
    // before its deadline, it reads as never delivered.
    let back = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert!(
        counts(&back).contains(&(seqs[1], 0)),
        "a passed-over record is not counted as delivered: {:?}",
        counts(&back)
    );
}

/// `ack_and_read_for_delivery` acks, then reads and counts, as the two calls would: batch after
/// batch as a session whose client acks each one, then a selective ack, an empty ack, and an
/// ack of what is gone already; another recipient is untouched.
pub async fn ack_and_read_for_delivery(storage: &dyn Storage) {
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let bodies: Vec<NewRecord> = (0..8u8).map(|i| record(&[b'a' + i; 10])).collect();
    let seqs = append(storage, &bob, bodies).await;
    append(storage, &carol, vec![record(b"hers")]).await;
    let two = BatchLimit {
        max_messages: 2,
        max_bytes: usize::MAX,
    };
    let first = storage
        .read_for_delivery(&bob, None, None, two, T0)
        .await
        .unwrap()
        .batch;
    assert_eq!(counts(&first), [(seqs[0], 0), (seqs[1], 0)]);
    // As a session: ack what was handed over, read the next batch.
    for at in [2, 4] {
        let ack = Ack {
            through: Some(seqs[at - 1]),
            ..Ack::default()
        };
        let DeliveryRead {
            acked: removed,
            batch,
        } = storage
            .read_for_delivery(&bob, Some(&ack), Some(seqs[at - 1]), two, T0)
            .await
            .unwrap();
        assert_eq!(removed, 2, "the batch before {at} is acked");
        assert_eq!(counts(&batch), [(seqs[at], 0), (seqs[at + 1], 0)]);
    }
    let left = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert_eq!(
        counts(&left),
        [(seqs[4], 1), (seqs[5], 1), (seqs[6], 0), (seqs[7], 0)],
        "acked records are gone and read ones counted"
    );
    // A selective ack of the later record of the batch, with the read of the next.
    let ack = Ack {
        seqs: vec![seqs[5]],
        ..Ack::default()
    };
    let DeliveryRead {
        acked: removed,
        batch,
    } = storage
        .read_for_delivery(&bob, Some(&ack), Some(seqs[5]), two, T0)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(counts(&batch), [(seqs[6], 0), (seqs[7], 0)]);
    // Nothing to ack, and nothing left to read after the last.
    let DeliveryRead {
        acked: removed,
        batch,
    } = storage
        .read_for_delivery(&bob, Some(&Ack::default()), Some(seqs[7]), two, T0)
        .await
        .unwrap();
    assert_eq!((removed, batch.records.len()), (0, 0));
    // An ack of what is gone already removes nothing; the read still counts.
    let ack = Ack {
        through: Some(seqs[3]),
        ..Ack::default()
    };
    let DeliveryRead {
        acked: removed,
        batch,
    } = storage
        .read_for_delivery(&bob, Some(&ack), None, ALL, T0)
        .await
        .unwrap();
    assert_eq!(removed, 0);
    assert_eq!(
        counts(&batch),
        [(seqs[4], 1), (seqs[6], 1), (seqs[7], 1)],
        "the selective ack's record is gone; the others were handed over once"
    );
    assert_eq!(storage.stats(&carol).await.unwrap().messages, 1);
}

/// Each record of `batch` with the delivery count it was read with.
fn counts(batch: &ReadBatch) -> Vec<(Seq, u32)> {
    batch
        .records
        .iter()
        .map(|r| (r.seq, r.delivery_count))
        .collect()
}

/// A sender-chosen id is stored once per recipient within the window, even after it was acked
/// and within one append; other recipients and generated ids are unaffected.
pub async fn dedup(storage: &dyn Storage) {
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let id = MessageId::from_bytes([7; 16]);
    let quota = Quota {
        dedup_window: Duration::from_secs(60),
        ..Quota::UNLIMITED
    };
    let first = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, T0)
        .await
        .unwrap();
    let Appended::Stored(seq) = first.records[0] else {
        panic!("first send must store")
    };
    let later = T0.saturating_add(Duration::from_secs(30));
    let again = storage
        .append(
            &bob,
            vec![deduped(b"x", id), deduped(b"x", id)],
            &quota,
            later,
        )
        .await
        .unwrap();
    assert_eq!(
        again.records,
        [Appended::Duplicate(seq), Appended::Duplicate(seq)],
        "resend within window"
    );
    storage.ack_through(&bob, seq, later).await.unwrap();
    let after_ack = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, later)
        .await
        .unwrap();
    assert_eq!(
        after_ack.records,
        [Appended::Duplicate(seq)],
        "acked then resent within window"
    );
    let other = storage
        .append(&carol, vec![deduped(b"x", id)], &quota, later)
        .await
        .unwrap();
    assert!(
        matches!(other.records[0], Appended::Stored(_)),
        "dedup is per recipient"
    );
    let within = storage
        .append(
            &bob,
            vec![deduped(b"y", MessageId::from_bytes([8; 16])); 2],
            &quota,
            later,
        )
        .await
        .unwrap();
    assert!(
        matches!(within.records[..], [Appended::Stored(a), Appended::Duplicate(b)] if a == b),
        "dup within one append"
    );
    let expired_window = T0.saturating_add(Duration::from_secs(61));
    let fresh = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, expired_window)
        .await
        .unwrap();
    let Appended::Stored(stored_again) = fresh.records[0] else {
        panic!("the window ended")
    };
    // Forgetting the first store (its window ended at T0 + 60 s) must not forget the second
    // (stored at T0 + 61 s): another append here prunes, then the resend is checked.
    let past_first = T0.saturating_add(Duration::from_secs(90));
    storage
        .append(
            &bob,
            vec![deduped(b"z", MessageId::from_bytes([9; 16]))],
            &quota,
            past_first,
        )
        .await
        .unwrap();
    let resent = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, past_first)
        .await
        .unwrap();
    assert_eq!(
        resent.records,
        [Appended::Duplicate(stored_again)],
        "a resend within the window of the id's second store"
    );
    storage.remove_recipient(&bob).await.unwrap();
    let after_removal = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, past_first)
        .await
        .unwrap();
    assert!(
        matches!(after_removal.records[0], Appended::Stored(_)),
        "removing the queue forgets its ids"
    );
}

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
    let err = storage
        .append(&bob, vec![record(&[0; 99])], &quota, T0)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::Error::QueueFull {
                bytes: 2,
                max_bytes: 100,
                ..
            }
        ),
        "{err:?}"
    );
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
    assert_eq!(outcome.dropped, 2);
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [[2u8], [3], [4]],
        "oldest dropped"
    );
    let read = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert_eq!(
        read.lost_unconfirmed, 2,
        "drops are counted for the gap report"
    );
    let total = read.lost_total;
    let too_big = storage
        .append(&bob, (0..4).map(|i| record(&[i])).collect(), &quota, T0)
        .await;
    assert!(
        matches!(too_big, Err(crate::Error::QueueFull { .. })),
        "a batch over the quota alone"
    );
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

/// `append_one` is `append` with a batch of one: seqs, dedup, quotas and drops alike.
pub async fn append_one(storage: &dyn Storage) {
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
    assert_eq!((first.pending, first.dropped), (1, 0));
    let batch = append(storage, &bob, vec![record(b"b")]).await;
    assert!(
        batch[0] > first_seq,
        "append_one and append share one seq order"
    );

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

    let dropping = Quota {
        overflow: Overflow::DropOldest,
        ..quota
    };
    let dropped = storage
        .append_one(&bob, record(b"c"), &dropping, T0)
        .await
        .unwrap();
    assert_eq!((dropped.dropped, dropped.pending), (1, 2), "{dropped:?}");
    assert_eq!(
        bodies(storage, &bob, T0).await,
        [b"b", b"c"],
        "oldest dropped"
    );

    let alice = recipient("alice");
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

    // Dropping by bytes: "b" (1 byte) goes so that "c" and "dd" fit in 3 bytes.
    let by_bytes = Quota {
        max_messages: 10,
        max_bytes: 3,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    let dropped = storage
        .append_one(&bob, record(b"dd"), &by_bytes, T0)
        .await
        .unwrap();
    assert_eq!(dropped.dropped, 1, "{dropped:?}");
    assert_eq!(bodies(storage, &bob, T0).await, [&b"c"[..], b"dd"]);

    // 5 bytes are stored ("c", "dd", "x", "y"): a 2-byte record does not fit a budget of 6,
    // and a refused one leaves nothing reserved, so it fits a budget of 7.
    let carol = recipient("carol");
    let budget = |max| Quota {
        max_total_bytes: Some(max),
        ..Quota::UNLIMITED
    };
    let refused = storage
        .append_one(&carol, record(b"zz"), &budget(6), T0)
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
        .append_one(&carol, record(b"zz"), &budget(7), T0)
        .await
        .expect("a refused append reserves nothing");
}

/// Confirming a loss report is idempotent and never hides a later loss: the total only grows,
/// even across the queue being emptied and created again.
pub async fn loss_confirmation_is_idempotent(storage: &dyn Storage) {
    let bob = recipient("bob");
    let quota = Quota {
        max_messages: 1,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    let put = |body: &'static [u8]| storage.append(&bob, vec![record(body)], &quota, T0);
    put(b"1").await.unwrap();
    put(b"2").await.unwrap(); // drops 1
    let first = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert_eq!(first.lost_unconfirmed, 1);
    let confirm = |through: u64| Ack {
        lost_confirmed_through: Some(through),
        ..Ack::default()
    };
    storage
        .ack(&bob, &confirm(first.lost_total), T0)
        .await
        .unwrap();
    storage
        .ack(&bob, &confirm(first.lost_total), T0)
        .await
        .unwrap();
    put(b"3").await.unwrap(); // drops 2
    let second = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert_eq!(
        second.lost_unconfirmed, 1,
        "a repeated confirmation did not eat the new loss"
    );
    storage
        .ack(&bob, &confirm(first.lost_total), T0)
        .await
        .unwrap();
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        1,
        "a stale confirmation changes nothing"
    );
    storage
        .ack(&bob, &confirm(second.lost_total), T0)
        .await
        .unwrap();
    let last = second.records[0].seq;
    storage.ack_through(&bob, last, T0).await.unwrap();
    assert_eq!(
        storage.stats(&bob).await.unwrap(),
        RecipientStats::default(),
        "emptied"
    );
    put(b"4").await.unwrap();
    put(b"5").await.unwrap(); // a loss in the queue's new life
    storage
        .ack(&bob, &confirm(second.lost_total), T0)
        .await
        .unwrap();
    let third = storage.read(&bob, None, ALL, T0).await.unwrap();
    assert_eq!(
        third.lost_unconfirmed, 1,
        "a confirmation from the queue's earlier life hides nothing"
    );
    assert!(third.lost_total > second.lost_total, "totals never go back");
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

/// Expired records are never read, are reported as passed over, and purge removes them,
/// whatever order their deadlines arrived in; each one removed before an ack counts as lost.
pub async fn expiry(storage: &dyn Storage) {
    let bob = recipient("bob");
    let at = |s| T0.saturating_add(Duration::from_secs(s));
    let seqs = append(
        storage,
        &bob,
        vec![
            expiring(b"late", at(20)),
            expiring(b"early", at(10)),
            record(b"never"),
        ],
    )
    .await;
    assert_eq!(
        bodies(storage, &bob, at(9)).await,
        [&b"late"[..], b"early", b"never"]
    );
    let read = storage.read(&bob, None, ALL, at(10)).await.unwrap();
    let got: Vec<&[u8]> = read.records.iter().map(|r| &r.body[..]).collect();
    assert_eq!(
        got,
        [&b"late"[..], b"never"],
        "expired at its deadline exactly"
    );
    assert_eq!(read.expired, [seqs[1]], "passed-over seqs are reported");
    storage.mark_delivered(&bob, &seqs[..1]).await.unwrap();
    let purged = storage.purge(at(15), None, 100).await.unwrap();
    assert_eq!((purged.expired, purged.more), (1, false));
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        1,
        "purged before an ack: lost"
    );
    assert_eq!(
        storage.purge(at(15), None, 100).await.unwrap().expired,
        0,
        "nothing twice"
    );
    assert_eq!(storage.purge(at(25), None, 100).await.unwrap().expired, 1);
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        2,
        "delivered but never acked, then expired: lost too (the client may not have it)"
    );
    assert_eq!(bodies(storage, &bob, at(1_000_000)).await, [b"never"]);
}

/// Records the engine passed over are removed by `Ack::passed_over` and counted as lost,
/// once, whether the ack or a purge removes them.
pub async fn passed_over_counts_once(storage: &dyn Storage) {
    let bob = recipient("bob");
    let at = |s| T0.saturating_add(Duration::from_secs(s));
    let seqs = append(
        storage,
        &bob,
        vec![
            expiring(b"first", at(10)),
            expiring(b"second", at(10)),
            record(b"kept"),
        ],
    )
    .await;
    let read = storage.read(&bob, None, ALL, at(10)).await.unwrap();
    assert_eq!(read.expired.len(), 2);
    let pass = Ack {
        passed_over: vec![seqs[0]],
        ..Ack::default()
    };
    storage.ack(&bob, &pass, at(10)).await.unwrap();
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!(
        (stats.messages, stats.lost),
        (2, 1),
        "a passed-over record is lost"
    );
    let purged = storage.purge(at(15), None, 100).await.unwrap();
    assert_eq!(purged.expired, 1, "purge takes the other one");
    storage.ack(&bob, &pass, at(15)).await.unwrap();
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        2,
        "each counted once"
    );
    let total = storage
        .read(&bob, None, ALL, at(15))
        .await
        .unwrap()
        .lost_total;
    let confirm = Ack {
        lost_confirmed_through: Some(total + 5),
        ..Ack::default()
    };
    storage.ack(&bob, &confirm, at(15)).await.unwrap();
    assert_eq!(
        storage.stats(&bob).await.unwrap().lost,
        0,
        "confirmed, never past the total"
    );
    assert_eq!(bodies(storage, &bob, at(15)).await, [b"kept"]);
}

/// Purge stops at its budget and says there is more.
pub async fn purge_budget(storage: &dyn Storage) {
    let deadline = T0.saturating_add(Duration::from_secs(1));
    for i in 0..5 {
        let who = recipient(&format!("r{i}"));
        append(
            storage,
            &who,
            (0..4).map(|_| expiring(b"x", deadline)).collect(),
        )
        .await;
    }
    let later = T0.saturating_add(Duration::from_secs(2));
    let first = storage.purge(later, None, 7).await.unwrap();
    assert_eq!((first.expired, first.more), (7, true));
    let rest = storage.purge(later, None, 100).await.unwrap();
    assert_eq!((rest.expired, rest.more), (13, false));
}

/// Queues not appended to or acked since `idle_before` are removed whole.
pub async fn idle_removal(storage: &dyn Storage) {
    let (old, fresh) = (recipient("old"), recipient("fresh"));
    storage
        .append(
            &old,
            vec![record(b"a"), record(b"b")],
            &Quota::UNLIMITED,
            T0,
        )
        .await
        .unwrap();
    let later = T0.saturating_add(Duration::from_secs(100));
    storage
        .append(&fresh, vec![record(b"c")], &Quota::UNLIMITED, later)
        .await
        .unwrap();
    let purged = storage
        .purge(later, Some(T0.saturating_add(Duration::from_secs(50))), 100)
        .await
        .unwrap();
    assert_eq!(purged.idle_recipients, 1);
    assert_eq!(
        storage.stats(&old).await.unwrap().messages,
        0,
        "idle queue removed"
    );
    assert_eq!(
        storage.stats(&fresh).await.unwrap().messages,
        1,
        "active queue kept"
    );
}

/// Refiling queues touched since they were filed counts against purge's budget: one call does
/// bounded work however many queues were touched, and says `more` until all are refiled.
pub async fn idle_refiling_is_bounded(storage: &dyn Storage) {
    let touched = T0.saturating_add(Duration::from_secs(10));
    for i in 0..5 {
        let who = recipient(&format!("q{i}"));
        for (body, at) in [(b"a", T0), (b"b", touched)] {
            storage
                .append(&who, vec![record(body)], &Quota::UNLIMITED, at)
                .await
                .unwrap();
        }
    }
    let idle_before = Some(T0.saturating_add(Duration::from_secs(5)));
    let first = storage.purge(touched, idle_before, 2).await.unwrap();
    assert_eq!(
        (first.idle_recipients, first.more),
        (0, true),
        "two refiles spend a budget of two"
    );
    let mut calls = 1;
    loop {
        let next = storage.purge(touched, idle_before, 2).await.unwrap();
        assert_eq!(next.idle_recipients, 0, "touched queues are kept");
        calls += 1;
        if !next.more {
            break;
        }
        assert!(calls <= 5, "refiling five queues two at a time ends");
    }
    for i in 0..5 {
        let stats = storage.stats(&recipient(&format!("q{i}"))).await.unwrap();
        assert_eq!(stats.messages, 2);
    }
}

/// Look-alike ids (prefixes, separators, hash-tag braces, NUL, invalid UTF-8) never see each
/// other's records, acks or purges.
pub async fn isolation(storage: &dyn Storage) {
    let ids: Vec<RecipientId> = [
        &b"a"[..],
        b"a:",
        b"a:b",
        b"a\0",
        b"a\0b",
        b"{a}",
        b"{a}:b",
        b"a}",
        b"\xff\xfe",
        b"a*",
        b"a b",
        b"*",
        b"a/..",
        b"A",
    ]
    .iter()
    .map(|raw| RecipientId::new(raw).unwrap())
    .collect();
    let mut seqs = Vec::new();
    for (i, who) in ids.iter().enumerate() {
        seqs.push(append(storage, who, vec![record(&[i as u8])]).await[0]);
    }
    for (i, who) in ids.iter().enumerate() {
        assert_eq!(
            bodies(storage, who, T0).await,
            [[i as u8]],
            "{who} sees only its own"
        );
    }
    // Acking one id's seq through another id removes nothing of either. (Seqs are per
    // recipient, so two ids may hold the same number: such pairs are skipped.)
    for (i, who) in ids.iter().enumerate() {
        let j = (i + 1) % ids.len();
        if seqs[i] == seqs[j] {
            continue;
        }
        let other = &ids[j];
        storage.ack_seqs(other, &[seqs[i]], T0).await.unwrap();
        assert_eq!(
            storage.stats(who).await.unwrap().messages,
            1,
            "{other} acked {who}'s record"
        );
        assert_eq!(
            storage.stats(other).await.unwrap().messages,
            1,
            "{other} lost its own"
        );
    }
    storage.remove_recipient(&ids[0]).await.unwrap();
    for who in &ids[1..] {
        assert_eq!(
            storage.stats(who).await.unwrap().messages,
            1,
            "removing a removed {who}"
        );
    }
}

/// Stats report count, bytes, oldest and newest; removing a recipient removes everything.
pub async fn stats_and_remove(storage: &dyn Storage) {
    let bob = recipient("bob");
    let seqs = append(
        storage,
        &bob,
        vec![
            record(b"abc"),
            NewRecord {
                sent_at: T0.saturating_add(Duration::from_secs(5)),
                ..record(b"de")
            },
        ],
    )
    .await;
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!((stats.messages, stats.bytes), (2, 5));
    assert_eq!(stats.oldest_sent_at, Some(T0));
    assert_eq!(stats.newest_seq, Some(seqs[1]));
    assert_eq!(storage.remove_recipient(&bob).await.unwrap(), 2);
    assert_eq!(storage.stats(&bob).await.unwrap(), Default::default());
    assert_eq!(storage.remove_recipient(&bob).await.unwrap(), 0);
}

/// Concurrent appends to one recipient each keep their own order, and no seq is handed out
/// twice.
pub async fn concurrent_appends(storage: Arc<dyn Storage>) {
    let bob = recipient("bob");
    let writers = (0..8u8).map(|writer| {
        let storage = storage.clone();
        let bob = bob.clone();
        async move {
            let mut seqs = Vec::new();
            for i in 0..25u8 {
                seqs.extend(append(&*storage, &bob, vec![record(&[writer, i])]).await);
            }
            seqs
        }
    });
    let per_writer = futures::future::join_all(writers).await;
    let mut all: Vec<Seq> = per_writer.iter().flatten().copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "every append got its own seq");
    let stored = storage.read_all(&bob, T0).await.unwrap();
    for writer in 0..8u8 {
        let mine: Vec<u8> = stored
            .iter()
            .filter(|r| r.body[0] == writer)
            .map(|r| r.body[1])
            .collect();
        assert_eq!(mine, (0..25).collect::<Vec<_>>(), "writer {writer}'s order");
    }
}

/// The engine over this storage: offline store, batched delivery, ack, redelivery marked on the
/// next session, and a live session woken by a new send.
pub async fn engine_round_trip(storage: Arc<dyn Storage>) {
    use futures::StreamExt;
    let clock = ManualClock::new(T0);
    let queue = OfflineQueue::builder()
        .storage(storage)
        .clock(Arc::new(clock))
        .batch(BatchLimit {
            max_messages: 2,
            max_bytes: usize::MAX,
        })
        .build()
        .unwrap();
    let bob = recipient("bob");
    for i in 0..3u8 {
        queue
            .send(Envelope::new(bob.clone(), vec![i]))
            .await
            .unwrap();
    }
    // First session: receives two batches (2 + 1), acks only the first message.
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let client = async {
        let Some(Outbound::Batch(first)) = inbox.next().await else {
            panic!("first batch")
        };
        let Some(Outbound::Batch(second)) = inbox.next().await else {
            panic!("second batch")
        };
        assert_eq!(
            (first.messages.len(), second.messages.len()),
            (2, 1),
            "batch bound"
        );
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        handle.ack([first.messages[0].seq]);
        handle.close();
    };
    let (end, ()) = futures::join!(session.run(), client);
    end.unwrap();
    // Second session: the two unacked come back marked, then a live send arrives unmarked.
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let client = async {
        let Some(Outbound::Batch(again)) = inbox.next().await else {
            panic!("redelivery")
        };
        let payloads: Vec<&[u8]> = again.messages.iter().map(|d| &d.payload[..]).collect();
        assert_eq!(payloads, [[1u8], [2]], "unacked redelivered in order");
        assert!(
            again.messages.iter().all(|d| d.redelivered),
            "redeliveries are marked"
        );
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        let receipt = queue
            .send(Envelope::new(bob.clone(), vec![9]))
            .await
            .unwrap();
        assert!(receipt.recipient_online);
        let Some(Outbound::Batch(live)) = inbox.next().await else {
            panic!("live delivery")
        };
        assert_eq!(live.messages[0].payload, [9][..]);
        assert!(!live.messages[0].redelivered);
        handle.ack_through(live.messages[0].seq);
        handle.close();
    };
    let (end, ()) = futures::join!(session.run(), client);
    end.unwrap();
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 0, "all acked");
}

/// Fuzz target bodies, shared by `fuzz/` (cargo-fuzz) and the corpus regression test in
/// `tests/fuzz_corpus.rs`. Each takes arbitrary bytes and panics only on a real defect.
pub mod fuzz {
    use crate::codec;
    use crate::message::RecipientId;

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
        let enc =
            |id: &RecipientId, s: u64| bytes(<K as redb::Value>::as_bytes(&(id.as_bytes(), s)));
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
}
