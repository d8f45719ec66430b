//! The shared conformance suite against `AmqpStorage` (`OFFLINE_QUEUE_AMQP_URL`), in a virtual
//! host of the test's own with a queue prefix per check; then what only this backend has:
//! ids of any bytes, queue arguments that differ, and records held by one node handed to
//! another. Skipped, and says so, when the variable is unset.

#![cfg(all(feature = "amqp", feature = "testing"))]

mod amqp_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use amqp_support::{Vhost, url};
use offline_queue::storage::NewRecord;
use offline_queue::storage::QueueType;
use offline_queue::{AmqpStorage, MessageId, Quota, RecipientId, Storage, StorageExt, testing};

async fn storage(url: &str, prefix: &str) -> AmqpStorage {
    AmqpStorage::options()
        .prefix(prefix)
        .connect(url)
        .await
        .expect("connect")
}

fn record(body: &[u8]) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: testing::T0,
        expires_at: None,
        body: body.to_vec(),
    }
}

async fn conformance(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "conformance");
    let next = AtomicU32::new(0);
    testing::run_all(|| {
        let prefix = format!("c{}", next.fetch_add(1, Ordering::Relaxed));
        let url = vhost.url.clone();
        async move {
            let storage = AmqpStorage::options()
                .prefix(prefix)
                .queue_type(queue_type)
                .connect(&url)
                .await
                .expect("connect");
            Arc::new(storage) as Arc<dyn Storage>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_pass_the_conformance_suite() {
    conformance(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_pass_the_conformance_suite() {
    conformance(QueueType::Classic).await;
}

/// Ids with dots, stars, NUL and every byte value, up to the 255-byte limit (a hashed queue
/// name): each sees only its own records, stored exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_any_bytes_are_isolated_and_stored_exactly() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "ids");
    let storage = storage(&vhost.url, "ids").await;
    let all_bytes: Vec<u8> = (0..=254u8).rev().collect();
    let ids: Vec<Vec<u8>> = vec![
        b"a.b".to_vec(),
        b"a*b>".to_vec(),
        b"nul\0id".to_vec(),
        b"amq.x".to_vec(),
        vec![0xff; 255],
        all_bytes,
    ];
    for (i, id) in ids.iter().enumerate() {
        let who = RecipientId::new(id).unwrap();
        storage
            .append(
                &who,
                vec![record(&[i as u8])],
                &Quota::UNLIMITED,
                testing::T0,
            )
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let who = RecipientId::new(id).unwrap();
        let got = storage.read_all(&who, testing::T0).await.unwrap();
        let bodies: Vec<Vec<u8>> = got.iter().map(|r| r.body.to_vec()).collect();
        assert_eq!(bodies, [vec![i as u8]], "id {i}");
    }
}

/// A queue that exists with other limits is refused, naming the argument, never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_other_limits_is_refused() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "args");
    let bob = RecipientId::new("bob").unwrap();
    let first = storage(&vhost.url, "args").await;
    let small = Quota {
        max_messages: 5,
        ..Quota::UNLIMITED
    };
    first
        .append(&bob, vec![record(b"1")], &small, testing::T0)
        .await
        .unwrap();
    let second = storage(&vhost.url, "args").await;
    let err = second
        .append(&bob, vec![record(b"2")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_retryable() && text.contains("x-max-length"),
        "{text}"
    );
    assert_eq!(first.read_all(&bob, testing::T0).await.unwrap().len(), 1);
}

/// The first sends to a new quorum queue, from many tasks on two nodes at once, are all
/// stored. (A quorum queue declared again while its first declare is still starting it used
/// to nack the publishes that followed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sends_racing_to_a_new_queue_are_all_stored() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "first");
    let bob = RecipientId::new("bob").unwrap();
    for round in 0..30 {
        let prefix = format!("first{round}");
        let nodes = [
            Arc::new(storage(&vhost.url, &prefix).await),
            Arc::new(storage(&vhost.url, &prefix).await),
        ];
        let sends = (0..16u8).map(|i| {
            let node = nodes[usize::from(i % 2)].clone();
            let bob = bob.clone();
            async move {
                node.append(&bob, vec![record(&[i])], &Quota::UNLIMITED, testing::T0)
                    .await
            }
        });
        for (i, sent) in futures::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(error) = sent {
                panic!("round {round}, send {i}: {error}");
            }
        }
        let mut bodies: Vec<u8> = nodes[0]
            .read_all(&bob, testing::T0)
            .await
            .unwrap()
            .iter()
            .map(|r| r.body[0])
            .collect();
        bodies.sort();
        assert_eq!(bodies, (0..16).collect::<Vec<_>>(), "round {round}");
    }
}

/// Records one node read and still holds are invisible to another until the first lets go
/// (its purge after `hold_idle`, or its end); then the other reads them in order, with their
/// seqs, each counted once more: the broker counts every hand-back, whether the node that
/// held a record delivered it or only read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_by_one_node_pass_to_another_when_it_lets_go() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "hold");
    let bob = RecipientId::new("bob").unwrap();
    let one = AmqpStorage::options()
        .prefix("hold")
        .hold_idle(std::time::Duration::ZERO)
        .connect(&vhost.url)
        .await
        .unwrap();
    let two = AmqpStorage::options()
        .prefix("hold")
        .hold_idle(std::time::Duration::ZERO)
        .connect(&vhost.url)
        .await
        .unwrap();
    let seqs: Vec<_> = one
        .append(
            &bob,
            (0..3u8).map(|i| record(&[i])).collect(),
            &Quota::UNLIMITED,
            testing::T0,
        )
        .await
        .unwrap()
        .records
        .iter()
        .map(|a| a.seq())
        .collect();
    let limit = offline_queue::BatchLimit {
        max_messages: 2,
        max_bytes: usize::MAX,
    };
    let held = one
        .read_for_delivery(&bob, None, None, limit, testing::T0)
        .await
        .unwrap();
    assert_eq!(held.batch.records.len(), 2);
    let other = two.read_all(&bob, testing::T0).await.unwrap();
    let bodies: Vec<u8> = other.iter().map(|r| r.body[0]).collect();
    assert_eq!(bodies, [2], "the held two are not readable elsewhere");
    assert_eq!(
        two.stats(&bob).await.unwrap().messages,
        1,
        "only what is ready, and its own"
    );
    // Both let go. The broker puts handed-back records first, in the order they came back,
    // and two nodes' hand-backs can come back either way round: the reader keeps seqs
    // increasing (renumbering what comes after a higher one), not the send order.
    one.purge(testing::T0, None, 100).await.unwrap();
    two.purge(testing::T0, None, 100).await.unwrap();
    let after = two.read_all(&bob, testing::T0).await.unwrap();
    let mut got: Vec<(u8, u32)> = after
        .iter()
        .map(|r| (r.body[0], r.delivery_count))
        .collect();
    got.sort();
    assert_eq!(got, [(0, 1), (1, 1), (2, 1)], "handed back, counted once");
    let read: Vec<_> = after.iter().map(|r| r.seq).collect();
    assert!(
        read.windows(2).all(|w| w[0] < w[1]) && read[0] >= seqs[0],
        "seqs increase: {read:?} (sent as {seqs:?})"
    );
    // One node holding them all hands them back in order, with their seqs.
    two.purge(testing::T0, None, 100).await.unwrap();
    let again = one.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(
        again.iter().map(|r| r.seq).collect::<Vec<_>>(),
        read,
        "the next node reads them in the same order, at the same seqs"
    );
}
