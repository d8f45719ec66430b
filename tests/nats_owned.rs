//! `OwnedNatsStorage` beyond the conformance suite: a node that restarts loads each queue from
//! its state, its sealed pages and the log, and goes on where the last one stopped. Needs
//! `OFFLINE_QUEUE_NATS_URL` (skipped, and says so, when it is unset).

#![cfg(all(feature = "nats", feature = "testing"))]

mod nats_support;

use nats_support::url;
use offline_queue::storage::{Ack, Appended, NewRecord};
use offline_queue::{
    BatchLimit, MessageId, OwnedNatsStorage, Quota, RecipientId, Seq, Storage, StorageExt,
    Timestamp,
};

fn record(body: &[u8]) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: Timestamp::now_system(),
        expires_at: None,
        body: body.to_vec(),
    }
}

async fn owned(url: &str, name: &str) -> OwnedNatsStorage {
    nats_support::connect_owned(url, name).await
}

/// 40 records (two sealed pages and ten in the log alone), five read and marked delivered
/// (the state then knows 40 positions), then 7 more the state never hears of: a new node on
/// the same streams reads all 47 in order, with the first five's delivery counts, and its
/// next append takes the next position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_owner_reads_every_record_and_goes_on_from_the_last() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let who = RecipientId::new("restarted").unwrap();
    let now = Timestamp::now_system();
    let mut seqs = Vec::new();
    {
        let first = owned(&url, &name).await;
        for i in 0..40u8 {
            let outcome = first
                .append_one(&who, record(&[i]), &Quota::UNLIMITED, now)
                .await
                .unwrap();
            seqs.push(outcome.record.seq());
        }
        let limit = BatchLimit {
            max_messages: 5,
            max_bytes: usize::MAX,
        };
        let read = first
            .read_for_delivery(&who, None, None, limit, now)
            .await
            .unwrap();
        assert_eq!(read.batch.records.len(), 5);
        for i in 40..47u8 {
            let outcome = first
                .append_one(&who, record(&[i]), &Quota::UNLIMITED, now)
                .await
                .unwrap();
            seqs.push(outcome.record.seq());
        }
    }
    assert!(seqs.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{seqs:?}");
    let second = owned(&url, &name).await;
    let all = second.read_all(&who, now).await.unwrap();
    let bodies: Vec<u8> = all.iter().map(|r| r.body[0]).collect();
    assert_eq!(bodies, (0..47).collect::<Vec<u8>>());
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<Seq>>(), seqs);
    let counts: Vec<u32> = all.iter().map(|r| r.delivery_count).collect();
    assert_eq!(counts[..5], [1; 5]);
    assert!(counts[5..].iter().all(|&c| c == 0), "{counts:?}");
    let stats = second.stats(&who).await.unwrap();
    assert_eq!(stats.messages, 47);
    assert_eq!(stats.newest_seq, seqs.last().copied());
    let next = second
        .append_one(&who, record(b"next"), &Quota::UNLIMITED, now)
        .await
        .unwrap();
    assert_eq!(next.record, Appended::Stored(Seq(seqs[46].0 + 1)));
    // Acked through the first page and a half, then loaded a third time: the rest remain.
    second
        .ack(
            &who,
            &Ack {
                through: Some(seqs[22]),
                ..Ack::default()
            },
            now,
        )
        .await
        .unwrap();
    drop(second);
    let third = owned(&url, &name).await;
    let rest = third.read_all(&who, now).await.unwrap();
    assert_eq!(rest.len(), 47 - 23 + 1);
    assert_eq!(rest[0].seq, seqs[23]);
    nats_support::delete(&url, &[name]).await;
}

/// A sender-chosen id appended before a restart is still a duplicate after it, answered with
/// the original's position (the log's `Nats-Msg-Id` window, not the node's memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_id_is_a_duplicate_across_a_restart() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let who = RecipientId::new("retried").unwrap();
    let now = Timestamp::now_system();
    let retried = NewRecord {
        dedup: true,
        ..record(b"once")
    };
    let stored = owned(&url, &name)
        .await
        .append_one(&who, retried.clone(), &Quota::UNLIMITED, now)
        .await
        .unwrap();
    let Appended::Stored(original) = stored.record else {
        panic!("stored first: {stored:?}");
    };
    // The same streams, a new node: nothing in memory.
    let second = owned(&url, &name).await;
    let again = second
        .append_one(&who, retried, &Quota::UNLIMITED, now)
        .await
        .unwrap();
    assert_eq!(again.record, Appended::Duplicate(original));
    assert_eq!(second.read_all(&who, now).await.unwrap().len(), 1);
    nats_support::delete(&url, &[name]).await;
}

/// Acked pages leave the pages stream (one purge each, in the background), and the log keeps
/// its copies for its `max_age` (module docs, "What the log costs"): 3 recipients × 45
/// records, read and acked in batches of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_pages_leave_and_the_log_keeps_its_copies() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let storage = owned(&url, &name).await;
    let now = Timestamp::now_system();
    let who: Vec<RecipientId> = (0..3)
        .map(|i| RecipientId::new(format!("r{i}")).unwrap())
        .collect();
    for r in &who {
        let records = (0..45u8).map(|i| record(&[i])).collect();
        storage
            .append(r, records, &Quota::UNLIMITED, now)
            .await
            .unwrap();
    }
    let context = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let mut pages = context.get_stream(format!("{name}_PAGES")).await.unwrap();
    // Pages are sealed off the sends' path: wait for them, within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pages.info().await.unwrap().state.messages < 6 {
        assert!(std::time::Instant::now() < deadline, "pages never sealed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let limit = BatchLimit {
        max_messages: 20,
        max_bytes: usize::MAX,
    };
    for r in &who {
        let (mut after, mut ack, mut got) = (None, None, 0);
        loop {
            let read = storage
                .read_for_delivery(r, ack.as_ref(), after, limit, now)
                .await
                .unwrap();
            let Some(last) = read.batch.records.last().map(|r| r.seq) else {
                break;
            };
            got += read.batch.records.len();
            after = Some(last);
            ack = Some(Ack {
                through: Some(last),
                ..Ack::default()
            });
        }
        assert_eq!(got, 45);
        assert_eq!(storage.stats(r).await.unwrap().messages, 0);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let messages = pages.info().await.unwrap().state.messages;
        if messages == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{messages} pages left, none expected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut log = context.get_stream(format!("{name}_LOG")).await.unwrap();
    assert_eq!(log.info().await.unwrap().state.messages, 135);
    nats_support::delete(&url, &[name]).await;
}

/// Two nodes on the same streams: the first to touch a queue owns it, and the other's calls
/// on it are forwarded there (appends, reads, stats); once the owner is gone, the other
/// takes the queue over and finds everything the owner stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_node_forwards_to_the_owner_and_takes_over_when_it_is_gone() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let who = RecipientId::new("shared").unwrap();
    let now = Timestamp::now_system();
    let owner = owned(&url, &name).await;
    let other = owned(&url, &name).await;
    let mut seqs = Vec::new();
    for i in 0..20u8 {
        let node = if i % 2 == 0 { &owner } else { &other };
        let outcome = node
            .append_one(&who, record(&[i]), &Quota::UNLIMITED, now)
            .await
            .unwrap();
        seqs.push(outcome.record.seq());
    }
    assert!(seqs.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{seqs:?}");
    // A read on the other node, through the owner, counts deliveries there.
    let limit = BatchLimit {
        max_messages: 8,
        max_bytes: usize::MAX,
    };
    let read = other
        .read_for_delivery(&who, None, None, limit, now)
        .await
        .unwrap();
    let bodies: Vec<u8> = read.batch.records.iter().map(|r| r.body[0]).collect();
    assert_eq!(bodies, (0..8).collect::<Vec<u8>>());
    let all = owner.read_all(&who, now).await.unwrap();
    assert_eq!(all.len(), 20);
    assert!(all[..8].iter().all(|r| r.delivery_count == 1));
    assert_eq!(other.stats(&who).await.unwrap().messages, 20);
    // A bad append is refused as on the owner, with its typed error.
    let tight = Quota {
        max_messages: 20,
        ..Quota::UNLIMITED
    };
    let refused = other.append_one(&who, record(b"full"), &tight, now).await;
    assert!(
        matches!(
            refused,
            Err(offline_queue::Error::QueueFull { messages: 20, .. })
        ),
        "{refused:?}"
    );
    // The owner hands its queues over (a graceful shutdown) and is gone: the other node takes
    // the queue over on its next call. (Dropped without `close`, the owner's subscription
    // could still be live when that call arrived, which would then wait out its timeout.)
    owner.close().await.unwrap();
    assert!(
        owner
            .append_one(&who, record(b"closed"), &Quota::UNLIMITED, now)
            .await
            .is_err(),
        "a closed storage refuses calls"
    );
    drop(owner);
    let after = other
        .append_one(&who, record(&[20]), &Quota::UNLIMITED, now)
        .await
        .unwrap();
    assert_eq!(after.record, Appended::Stored(Seq(seqs[19].0 + 1)));
    let all = other.read_all(&who, now).await.unwrap();
    let bodies: Vec<u8> = all.iter().map(|r| r.body[0]).collect();
    assert_eq!(bodies, (0..21).collect::<Vec<u8>>());
    assert!(
        all[..8].iter().all(|r| r.delivery_count == 1),
        "counts kept"
    );
    nats_support::delete(&url, &[name]).await;
}

/// Drops made by `Overflow::DropOldest` are written with the append that made them: a new
/// node finds the queue as the old one left it, and the loss still to report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_outlive_the_node_that_made_them() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let who = RecipientId::new("dropping").unwrap();
    let now = Timestamp::now_system();
    let quota = Quota {
        max_messages: 2,
        overflow: offline_queue::Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    {
        let first = owned(&url, &name).await;
        let mut dropped = 0;
        for i in 0..5u8 {
            dropped += first
                .append_one(&who, record(&[i]), &quota, now)
                .await
                .unwrap()
                .dropped;
        }
        assert_eq!(dropped, 3);
    }
    let second = owned(&url, &name).await;
    let stats = second.stats(&who).await.unwrap();
    assert_eq!((stats.messages, stats.lost), (2, 3));
    let bodies: Vec<u8> = second
        .read_all(&who, now)
        .await
        .unwrap()
        .iter()
        .map(|r| r.body[0])
        .collect();
    assert_eq!(bodies, [3, 4]);
    nats_support::delete(&url, &[name]).await;
}

/// A read forwarded to the owner comes back in one message, whatever its byte limit: 20
/// records of 64 KiB (1.25 MiB, over the server's 1 MiB `max_payload`) read through the other
/// node arrive over two reads or more, in order, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_read_fits_in_one_message() {
    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let who = RecipientId::new("large").unwrap();
    let now = Timestamp::now_system();
    let owner = owned(&url, &name).await;
    let other = owned(&url, &name).await;
    for i in 0..20u8 {
        owner
            .append_one(&who, record(&vec![i; 64 * 1024]), &Quota::UNLIMITED, now)
            .await
            .unwrap();
    }
    let limit = BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    let (mut after, mut got, mut reads) = (None, Vec::new(), 0);
    loop {
        let batch = other.read(&who, after, limit, now).await.unwrap();
        let Some(last) = batch.records.last().map(|r| r.seq) else {
            break;
        };
        reads += 1;
        after = Some(last);
        got.extend(batch.records.iter().map(|r| r.body[0]));
    }
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
    assert!(reads >= 2, "{reads} reads");
    drop(owner);
    nats_support::delete(&url, &[name]).await;
}
