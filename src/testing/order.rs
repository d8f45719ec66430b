//! Order (contract rule 2): per recipient, seqs strictly increase and are never reused, even
//! under concurrent appends, and reads return records in seq order within their bounds.

use std::sync::Arc;

use super::{ALL, T0, append, bodies, recipient, record};
use crate::limits::{BatchLimit, Quota};
use crate::message::Seq;
use crate::storage::{Storage, StorageExt};

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

/// With [`Capabilities::appends_in_poll_order`](crate::storage::Capabilities): appends to one
/// recipient (by `append` and `append_one` in turn, with another recipient's in between), each
/// polled once as it is made and all left in flight, are stored in the order of those first
/// polls, however their futures are awaited afterwards.
pub async fn appends_in_poll_order(storage: Arc<dyn Storage>) {
    if !storage.capabilities().appends_in_poll_order {
        return;
    }
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let store: &dyn Storage = &*storage;
    let mut in_flight = Vec::new();
    for i in 0..40u8 {
        let who = if i % 3 == 2 { &carol } else { &bob };
        let mut append: futures::future::BoxFuture<'_, crate::Result<Seq>> = if i % 2 == 0 {
            Box::pin(async move {
                let outcome = store
                    .append(who, vec![record(&[i])], &Quota::UNLIMITED, T0)
                    .await?;
                Ok(outcome.records[0].seq())
            })
        } else {
            Box::pin(async move {
                let outcome = store
                    .append_one(who, record(&[i]), &Quota::UNLIMITED, T0)
                    .await?;
                Ok(outcome.record.seq())
            })
        };
        let done = super::poll_once(&mut append);
        in_flight.push((i, done, append));
    }
    let mut seqs = Vec::new();
    // Awaited last to first, so the order of completion is no help.
    for (i, done, append) in in_flight.into_iter().rev() {
        let seq = match done {
            Some(seq) => seq,
            None => append.await,
        };
        seqs.push((i, seq.expect("append")));
    }
    seqs.reverse();
    for (who, name) in [(&bob, "bob"), (&carol, "carol")] {
        let polled: Vec<u8> = (0..40u8)
            .filter(|i| (i % 3 == 2) == (name == "carol"))
            .collect();
        let mine: Vec<Seq> = seqs
            .iter()
            .filter(|(i, _)| polled.contains(i))
            .map(|(_, seq)| *seq)
            .collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "{name}'s seqs follow the first polls: {mine:?}"
        );
        let stored: Vec<u8> = storage
            .read_all(who, T0)
            .await
            .unwrap()
            .iter()
            .map(|r| r.body[0])
            .collect();
        assert_eq!(stored, polled, "{name}'s records stored in poll order");
    }
}
