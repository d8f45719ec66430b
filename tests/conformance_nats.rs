//! The shared conformance suite against `NatsStorage` (feature `nats`), each check on streams
//! of its own, deleted at the end. Needs `OFFLINE_QUEUE_NATS_URL` (skipped, and says so, when
//! it is unset).

#![cfg(all(feature = "nats", feature = "testing"))]

mod nats_support;

use std::sync::Arc;

use nats_support::{Streams, url};
use offline_queue::{Storage, StorageExt, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_storage_passes_the_conformance_suite() {
    let Some(url) = url() else {
        return;
    };
    let streams = Arc::new(Streams::default());
    testing::run_all(|| {
        let (streams, url) = (streams.clone(), url.clone());
        async move { Arc::new(streams.storage(&url).await) as Arc<dyn Storage> }
    })
    .await;
    streams.delete(&url).await;
}

/// The suite against the single-owner layout, `OwnedNatsStorage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_nats_storage_passes_the_conformance_suite() {
    let Some(url) = url() else {
        return;
    };
    let streams = Arc::new(Streams::default());
    testing::run_all(|| {
        let (streams, url) = (streams.clone(), url.clone());
        async move { Arc::new(streams.owned_storage(&url).await) as Arc<dyn Storage> }
    })
    .await;
    streams.delete(&url).await;
}

/// The same suite on a server of 2.11 or later (`OFFLINE_QUEUE_NEWER_NATS_SERVER`), where
/// records with a deadline carry a per-message TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_storage_passes_the_conformance_suite_on_a_newer_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = nats_support::start_newer_server(dir.path(), None) else {
        return;
    };
    let streams = Arc::new(Streams::default());
    let first = streams.storage(&url).await;
    assert!(first.per_message_ttl(), "a server of 2.11 or later");
    testing::run_all(|| {
        let (streams, url) = (streams.clone(), url.clone());
        async move { Arc::new(streams.storage(&url).await) as Arc<dyn Storage> }
    })
    .await;
}

/// The single-owner layout's suite on a server of 2.11 or later, where the log's records
/// with a deadline carry a per-message TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_nats_storage_passes_the_conformance_suite_on_a_newer_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = nats_support::start_newer_server(dir.path(), None) else {
        return;
    };
    let streams = Arc::new(Streams::default());
    let first = streams.owned_storage(&url).await;
    assert!(first.per_message_ttl(), "a server of 2.11 or later");
    testing::run_all(|| {
        let (streams, url) = (streams.clone(), url.clone());
        async move { Arc::new(streams.owned_storage(&url).await) as Arc<dyn Storage> }
    })
    .await;
}

/// What the queues acked leaves the stream: after 300 records over three recipients are read
/// and acked in batches (acks out of order too), the records stream is soon empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_records_leave_the_stream() {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{BatchLimit, MessageId, Quota, RecipientId, Timestamp};

    let Some(url) = url() else {
        return;
    };
    let name = nats_support::unique_name();
    let storage = nats_support::connect(&url, &name).await;
    let now = Timestamp::now_system();
    let who: Vec<RecipientId> = (0..3)
        .map(|i| RecipientId::new(format!("r{i}")).unwrap())
        .collect();
    for round in 0..10u8 {
        for r in &who {
            let records = (0..10)
                .map(|i| NewRecord {
                    id: MessageId::generate(),
                    dedup: false,
                    sent_at: now,
                    expires_at: None,
                    body: vec![round, i],
                })
                .collect();
            storage
                .append(r, records, &Quota::UNLIMITED, now)
                .await
                .unwrap();
        }
    }
    let limit = BatchLimit {
        max_messages: 30,
        max_bytes: usize::MAX,
    };
    for r in &who {
        let mut ack = None;
        loop {
            let read = storage
                .read_for_delivery(r, ack.as_ref(), None, limit, now)
                .await
                .unwrap();
            let seqs: Vec<_> = read.batch.records.iter().map(|r| r.seq).collect();
            let Some(&last) = seqs.last() else {
                break;
            };
            // The newest of the batch first, alone; then the rest, cumulatively.
            storage.ack_seqs(r, &[last], now).await.unwrap();
            ack = Some(Ack {
                through: Some(last),
                ..Ack::default()
            });
        }
        assert_eq!(storage.stats(r).await.unwrap().messages, 0);
    }
    // Removal runs in the background: wait for it, within a bound.
    let context = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let mut stream = context.get_stream(&name).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let messages = stream.info().await.unwrap().state.messages;
        if messages == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{messages} records left, none expected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    nats_support::delete(&url, &[name]).await;
}

/// Two nodes on one queue: each appends from the meta it last saw, so each must notice what
/// the other changed. Seqs keep rising across both, nothing is lost, and room made by acks
/// on one node is seen by the other's next append rather than refused as full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_queue_see_each_others_changes() {
    use offline_queue::storage::{Appended, NewRecord};
    use offline_queue::{Error, MessageId, Quota, RecipientId, Seq, Timestamp};

    let Some(url) = url() else {
        return;
    };
    let (name, a, b) = two_nodes(&url).await;
    let now = Timestamp::now_system();
    let bob = RecipientId::new("bob").unwrap();
    let quota = Quota {
        max_messages: 3,
        ..Quota::UNLIMITED
    };
    let record = |body: u8| NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: None,
        body: vec![body],
    };
    let stored = |outcome: Result<offline_queue::storage::AppendOneOutcome, Error>| match outcome
        .unwrap()
        .record
    {
        Appended::Stored(seq) => seq,
        other => panic!("expected a store, got {other:?}"),
    };
    let mut seqs: Vec<Seq> = Vec::new();
    for (i, node) in [&a, &b, &a].into_iter().enumerate() {
        seqs.push(stored(
            node.append_one(&bob, record(i as u8), &quota, now).await,
        ));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let full = a.append_one(&bob, record(9), &quota, now).await;
    assert!(matches!(full, Err(Error::QueueFull { .. })), "{full:?}");
    // B makes room; A, whose last meta says full, must store.
    assert_eq!(b.ack_through(&bob, seqs[1], now).await.unwrap(), 2);
    for body in [3, 4] {
        seqs.push(stored(a.append_one(&bob, record(body), &quota, now).await));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let bodies: Vec<u8> = b
        .read_all(&bob, now)
        .await
        .unwrap()
        .iter()
        .map(|r| r.body[0])
        .collect();
    assert_eq!(bodies, [2, 3, 4]);
    nats_support::delete(&url, &[name]).await;
}

/// The same sender-chosen id sent by two nodes at once, for many ids: each is stored once,
/// both sends answer with its position, and the queue holds each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_sent_by_two_nodes_at_once_is_stored_once() {
    use offline_queue::storage::{Appended, NewRecord};
    use offline_queue::{MessageId, Quota, RecipientId, Timestamp};

    let Some(url) = url() else {
        return;
    };
    let (name, a, b) = two_nodes(&url).await;
    let now = Timestamp::now_system();
    let bob = RecipientId::new("bob").unwrap();
    let ids: Vec<MessageId> = (0..40u8)
        .map(|n| MessageId::derive(b"two nodes", &[n]))
        .collect();
    let send = |node: &offline_queue::NatsStorage, n: usize| {
        let (node, bob, id) = (node.clone(), bob.clone(), ids[n]);
        tokio::spawn(async move {
            let record = NewRecord {
                id,
                dedup: true,
                sent_at: now,
                expires_at: None,
                body: vec![n as u8],
            };
            node.append_one(&bob, record, &Quota::UNLIMITED, now)
                .await
                .unwrap()
                .record
        })
    };
    let sends: Vec<_> = (0..ids.len()).map(|n| (send(&a, n), send(&b, n))).collect();
    for (n, (from_a, from_b)) in sends.into_iter().enumerate() {
        let (from_a, from_b) = (from_a.await.unwrap(), from_b.await.unwrap());
        assert_eq!(from_a.seq(), from_b.seq(), "id {n}: one position");
        let stored = [from_a, from_b]
            .iter()
            .filter(|outcome| matches!(outcome, Appended::Stored(_)))
            .count();
        assert_eq!(stored, 1, "id {n}: one store, one duplicate");
    }
    let mut bodies: Vec<u8> = a
        .read_all(&bob, now)
        .await
        .unwrap()
        .iter()
        .map(|r| r.body[0])
        .collect();
    bodies.sort_unstable();
    assert_eq!(bodies, (0..40u8).collect::<Vec<_>>(), "each message once");
    nats_support::delete(&url, &[name]).await;
}

/// Two storages on the same new streams, as two nodes: their name, and the two.
async fn two_nodes(
    url: &str,
) -> (
    String,
    offline_queue::NatsStorage,
    offline_queue::NatsStorage,
) {
    let name = nats_support::unique_name();
    let (a, b) = (
        nats_support::connect(url, &name).await,
        nats_support::connect(url, &name).await,
    );
    (name, a, b)
}
