//! Expiry and upkeep (contract rule 4): a record past its deadline is never read; purge removes
//! expired records and idle queues in bounded steps.

use std::time::Duration;

use super::{ALL, T0, append, bodies, expiring, recipient, record};
use crate::limits::Quota;
use crate::storage::{Storage, StorageExt};

/// Expired records are never read, are reported as passed over, and purge removes them,
/// whatever order their deadlines arrived in; each one removed before an ack counts as lost.
/// The purge half only for a backend that purges by the engine's clock
/// ([`Capabilities::purge_expired`](crate::storage::Capabilities::purge_expired)).
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
    assert_eq!(bodies(storage, &bob, at(20)).await, [b"never"]);
    if !storage.capabilities().purge_expired {
        return;
    }
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

/// Purge stops at its budget and says there is more (skipped without
/// [`Capabilities::purge_expired`](crate::storage::Capabilities::purge_expired)).
pub async fn purge_budget(storage: &dyn Storage) {
    if !storage.capabilities().purge_expired {
        return;
    }
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

/// Queues not appended to or acked since `idle_before` are removed whole (skipped without
/// [`Capabilities::idle_removal`](crate::storage::Capabilities::idle_removal)).
pub async fn idle_removal(storage: &dyn Storage) {
    if !storage.capabilities().idle_removal {
        return;
    }
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

/// A queue emptied by an ack is no queue: filled again, it is idle from that append's time
/// on, even when the clock stepped back between the ack and the append (a backend that keeps
/// an emptied queue's row must not keep its old activity time). Skipped without
/// [`Capabilities::idle_removal`](crate::storage::Capabilities::idle_removal).
pub async fn idle_from_the_append_that_refilled(storage: &dyn Storage) {
    if !storage.capabilities().idle_removal {
        return;
    }
    let who = recipient("refilled");
    let acked_at = T0.saturating_add(Duration::from_secs(10));
    let first = storage
        .append(&who, vec![record(b"a")], &Quota::UNLIMITED, acked_at)
        .await
        .unwrap()
        .records[0]
        .seq();
    assert_eq!(storage.ack_through(&who, first, acked_at).await.unwrap(), 1);
    // The clock stepped back ten seconds: the append is stamped T0.
    append(storage, &who, vec![record(b"b")]).await;
    let now = T0.saturating_add(Duration::from_secs(60));
    let kept = storage.purge(now, Some(T0), 100).await.unwrap();
    assert_eq!(
        kept.idle_recipients, 0,
        "untouched since T0 is not before T0"
    );
    let purged = storage
        .purge(now, Some(T0.saturating_add(Duration::from_secs(5))), 100)
        .await
        .unwrap();
    assert_eq!(
        purged.idle_recipients, 1,
        "idle since the append at T0, whatever the emptied queue did at T0 + 10 s"
    );
    assert_eq!(storage.stats(&who).await.unwrap().messages, 0);
}

/// Refiling queues touched since they were filed counts against purge's budget: one call does
/// bounded work however many queues were touched, and says `more` until all are refiled
/// (skipped without [`Capabilities::idle_removal`](crate::storage::Capabilities::idle_removal)).
pub async fn idle_refiling_is_bounded(storage: &dyn Storage) {
    if !storage.capabilities().idle_removal {
        return;
    }
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

/// Purging k expired records looks at O(k) index entries, however many records wait beside
/// them: the same due work among ten times the stored records costs no more. Counted by
/// [`PurgeOutcome::examined`](crate::storage::PurgeOutcome::examined), not timed. Each round
/// expires records in send order (fresh queues) and out of it (one behind each keeper's
/// later records). A backend whose index does the walking for it (PostgreSQL: `examined` is
/// the rows its deadline index returned) passes by construction; its own tests must show the
/// index is used. Skipped without
/// [`Capabilities::purge_expired`](crate::storage::Capabilities::purge_expired).
pub async fn purge_work_is_proportional(storage: &dyn Storage) {
    if !storage.capabilities().purge_expired {
        return;
    }
    const DUE_QUEUES: usize = 2;
    const DUE_PER_QUEUE: usize = 5;
    const KEEPERS: usize = 10;
    const DUE: u64 = (DUE_QUEUES * DUE_PER_QUEUE + KEEPERS) as u64;
    let at = |s| T0.saturating_add(Duration::from_secs(s));
    let far = at(1_000_000);
    let mut rounds = Vec::new();
    for (round, stored) in [(0u64, 200usize), (1, 2_000)] {
        let (due_at, purge_at) = (at(10 + 20 * round), at(20 + 20 * round));
        for q in 0..DUE_QUEUES {
            let who = recipient(&format!("due-{round}-{q}"));
            let records = (0..DUE_PER_QUEUE).map(|_| expiring(b"d", due_at)).collect();
            append(storage, &who, records).await;
        }
        for k in 0..KEEPERS {
            let who = recipient(&format!("keep-{k}"));
            let records = (0..stored / KEEPERS).map(|_| expiring(b"k", far)).collect();
            append(storage, &who, records).await;
            append(storage, &who, vec![expiring(b"d", due_at)]).await;
        }
        let purged = storage.purge(purge_at, None, 100_000).await.unwrap();
        assert_eq!(
            (purged.expired, purged.more),
            (DUE, false),
            "round {round}: every due record purged"
        );
        assert!(
            purged.examined >= purged.expired,
            "round {round}: examined {} entries but removed {}",
            purged.examined,
            purged.expired
        );
        rounds.push((stored, purged.examined));
    }
    let [(small, first), (large, second)] = rounds[..] else {
        unreachable!("two rounds")
    };
    assert!(
        second <= first + first / 2,
        "purging {DUE} among {large} stored examined {second} entries, among {small} only \
         {first}: the work grows with what is stored, not with what is due"
    );
    assert!(
        second < large as u64 / 4,
        "purging {DUE} among {large} stored examined {second} entries"
    );
}
