//! Acks and loss (contract rule 1): an ack removes exactly what it names, and a record removed
//! without one is counted as lost once, however often the loss is confirmed.

use std::time::Duration;

use super::{ALL, T0, append, bodies, expiring, recipient, record};
use crate::limits::{Overflow, Quota};
use crate::message::Seq;
use crate::storage::{Ack, RecipientStats, Storage, StorageExt};

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
    assert_eq!(stats.messages, 2, "stats after acks");
    if storage.capabilities().exact_stats {
        assert_eq!(
            (stats.bytes, stats.newest_seq),
            (2, Some(seqs[4])),
            "stats after the newest record was acked alone"
        );
    }
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

/// Confirming a loss report is idempotent and never hides a later loss: the total only grows,
/// even across the queue being emptied and created again.
///
/// Skipped without [`Capabilities::loss_counts`](crate::storage::Capabilities::loss_counts).
pub async fn loss_confirmation_is_idempotent(storage: &dyn Storage) {
    if !storage.capabilities().loss_counts {
        return;
    }
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

/// Records the engine passed over are removed by `Ack::passed_over` and counted as lost,
/// once, whether the ack or a purge removes them (the purge only with
/// [`Capabilities::purge_expired`](crate::storage::Capabilities::purge_expired); without it
/// the engine's ack removes the other one too).
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
    let counts = storage.capabilities().loss_counts;
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!(stats.messages, 2, "a passed-over record is removed");
    if counts {
        assert_eq!(stats.lost, 1, "a passed-over record is lost");
    }
    if storage.capabilities().purge_expired {
        let purged = storage.purge(at(15), None, 100).await.unwrap();
        assert_eq!(purged.expired, 1, "purge takes the other one");
    } else {
        let other = Ack {
            passed_over: vec![seqs[1]],
            ..Ack::default()
        };
        storage.ack(&bob, &other, at(15)).await.unwrap();
    }
    storage.ack(&bob, &pass, at(15)).await.unwrap();
    if !counts {
        assert_eq!(bodies(storage, &bob, at(15)).await, [b"kept"]);
        return;
    }
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
