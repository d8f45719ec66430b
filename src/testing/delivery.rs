//! Redelivery (contract rule 2): every handing-over counts one delivery, so a redelivery is
//! marked and `max_deliveries` can end a loop; the fused reads count as the separate calls do.

use std::time::Duration;

use super::{ALL, T0, append, expiring, recipient, record};
use crate::limits::BatchLimit;
use crate::message::Seq;
use crate::storage::{Ack, DeliveryRead, NewRecord, ReadBatch, Storage};

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

/// `read_for_delivery` with an ack acks, then reads and counts, as the calls apart would:
/// batch after batch as a session whose client acks each one, then a selective ack, an empty
/// ack, and an ack of what is gone already; another recipient is untouched.
pub async fn read_for_delivery_with_ack(storage: &dyn Storage) {
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
