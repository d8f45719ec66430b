//! Connections cut under a node: `CLIENT KILL TYPE pubsub` drops every subscribed connection
//! of the server, so these run in their own test binary, one after the other, where no other
//! test's connections are in the way. Skipped, and says so, without `OFFLINE_QUEUE_REDIS_URL`.

#![cfg(feature = "redis")]

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use offline_queue::{
    Envelope, OfflineQueue, Outbound, RecipientId, RedisStorage, channel_transport,
};
use redis_support::{PATIENCE, Target, wait_for_sessions};

async fn node(target: &Target, prefix: &str, name: &str) -> (OfflineQueue, RedisStorage) {
    let Target::Single(url) = target else {
        unreachable!()
    };
    let storage = RedisStorage::options()
        .prefix(prefix)
        .node_id(name)
        .connect(url)
        .await
        .expect("redis answers");
    let queue = OfflineQueue::builder()
        .shared_storage(Arc::new(storage.clone()))
        .build()
        .unwrap();
    tokio::spawn(queue.wakeup_listener());
    (queue, storage)
}

async fn kill_subscribed_connections(url: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw)
        .await
        .unwrap()
}

/// `CLIENT KILL TYPE pubsub` cuts every subscribed connection on the server, and a node's
/// subscribed connection may also carry its commands (RESP3 pushes): the tests here take
/// turns, so one test's cut is not another's failed send.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_no_wake_up() {
    let Some(target) = Target::single() else {
        return;
    };
    let _turn = TURN.lock().await;
    subscribing_again_wakes_every_local_session(&target).await;
    a_dropped_connection_loses_no_wake_up(&target).await;
}

/// After its connection drops and it subscribes again, a node wakes every recipient it holds
/// a session for, because wake-ups published in between are lost: nothing is published
/// here, and the wake-up comes all the same, to every wake-up stream taken.
async fn subscribing_again_wakes_every_local_session(target: &Target) {
    let Target::Single(url) = target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("resubscribe");
    let storage = redis_support::fresh(target, &prefix).await;
    use offline_queue::{Coordination, Presence};
    let mut first = storage.wakeups();
    let mut second = storage.wakeups();
    let bob = RecipientId::new("bob").unwrap();
    storage.presence(&bob, Presence::Connected);
    wait_for_sessions(&storage, &bob, &[storage.node_id()]).await;

    assert!(kill_subscribed_connections(url).await >= 1);
    for wakes in [&mut first, &mut second] {
        let woken = tokio::time::timeout(PATIENCE, wakes.next())
            .await
            .expect("woken after subscribing again");
        assert_eq!(woken, Some(bob.clone()));
    }
}

/// The connections carrying both nodes' subscriptions drop: whether A's wake-up reaches B
/// before or after B has subscribed again, bob's session on B gets the message.
async fn a_dropped_connection_loses_no_wake_up(target: &Target) {
    let Target::Single(url) = target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("dropped");
    let (a, a_storage) = node(target, &prefix, "node-a").await;
    let (b, _b_storage) = node(target, &prefix, "node-b").await;
    let bob = RecipientId::new("bob").unwrap();
    let (transport, mut inbox) = channel_transport(16);
    let session = b.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
    wait_for_sessions(&a_storage, &bob, &["node-b"]).await;

    assert!(
        kill_subscribed_connections(url).await >= 2,
        "both nodes' connections cut"
    );
    // A's connection may still be coming back: a client retries a retryable error.
    let sent = tokio::time::timeout(PATIENCE, async {
        loop {
            match a.send(Envelope::new(bob.clone(), "after the cut")).await {
                Ok(receipt) => break receipt,
                Err(error) => {
                    assert!(error.is_retryable(), "{error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await
    .expect("A recovers");
    assert!(sent.recipient_online);
    let item = tokio::time::timeout(PATIENCE, inbox.next())
        .await
        .expect("B delivers without bob reconnecting")
        .unwrap();
    assert!(
        matches!(item, Outbound::Batch(ref batch) if batch.messages[0].payload == b"after the cut"[..]),
        "{item:?}"
    );
    handle.close();
    driver.await.unwrap().unwrap();
}

/// A server that lost the function library (restarted without persistence, a new master, a
/// `FUNCTION FLUSH`) is given it again by the next call, which then runs.
#[tokio::test]
async fn a_server_without_the_library_is_given_it_again() {
    let Some(target @ Target::Single(_)) = Target::single() else {
        return;
    };
    let Target::Single(url) = &target else {
        unreachable!()
    };
    let _turn = TURN.lock().await;
    let prefix = redis_support::unique_prefix("library");
    let (queue, _storage) = node(&target, &prefix, "a").await;
    let bob = RecipientId::new("bob").unwrap();
    queue
        .send(Envelope::new(bob.clone(), b"before".to_vec()))
        .await
        .unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();

    queue
        .send(Envelope::new(bob.clone(), b"after".to_vec()))
        .await
        .expect("the send loads the library and runs");
    let peeked = queue.peek(&bob, 10).await.unwrap();
    let bodies: Vec<&[u8]> = peeked.iter().map(|d| &d.payload[..]).collect();
    assert_eq!(bodies, [&b"before"[..], &b"after"[..]]);
    queue.remove_recipient(&bob).await.unwrap();
}

/// On a cluster a session's ack and next read go as one pipeline to the queue's node; where
/// the node lost the library, the pipeline is refused and the ordinary steps run (loading it),
/// and the ack still counts once.
#[tokio::test]
async fn a_cluster_ack_and_read_survive_a_lost_library() {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{BatchLimit, MessageId, Quota, Storage, Timestamp};

    const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    let Some(target @ Target::Cluster(_)) = Target::cluster() else {
        return;
    };
    let Target::Cluster(urls) = &target else {
        unreachable!()
    };
    let storage = redis_support::fresh(&target, &redis_support::unique_prefix("pipeline")).await;
    let bob = RecipientId::new("bob").unwrap();
    let record = |body: &[u8]| NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: T0,
        expires_at: None,
        body: body.to_vec(),
    };
    storage
        .append(
            &bob,
            vec![record(b"1"), record(b"2"), record(b"3"), record(b"4")],
            &Quota::UNLIMITED,
            T0,
        )
        .await
        .unwrap();
    let two = BatchLimit {
        max_messages: 2,
        max_bytes: 1 << 20,
    };
    let first = storage
        .read_for_delivery(&bob, None, None, two, T0)
        .await
        .unwrap();
    let through = |read: &offline_queue::storage::DeliveryRead| Ack {
        through: Some(read.batch.records.last().unwrap().seq),
        ..Ack::default()
    };
    // The pipelined path.
    let second = storage
        .read_for_delivery(
            &bob,
            Some(&through(&first)),
            Some(through(&first).through.unwrap()),
            two,
            T0,
        )
        .await
        .unwrap();
    assert_eq!(second.acked, 2);
    let bodies: Vec<&[u8]> = second.batch.records.iter().map(|r| &r.body[..]).collect();
    assert_eq!(bodies, [b"3", b"4"]);

    // Every master loses the library: the pipeline is refused, the ordinary steps run.
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut raw).await.unwrap();
        if matches!(&role[0], redis::Value::BulkString(r) if r == b"master") {
            let _: () = redis::cmd("FUNCTION")
                .arg("FLUSH")
                .query_async(&mut raw)
                .await
                .unwrap();
        }
    }
    let third = storage
        .read_for_delivery(
            &bob,
            Some(&through(&second)),
            Some(through(&second).through.unwrap()),
            two,
            T0,
        )
        .await
        .unwrap();
    assert_eq!(
        third.acked, 2,
        "the ack ran once, through the ordinary step"
    );
    assert!(third.batch.records.is_empty());
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 0);
}
