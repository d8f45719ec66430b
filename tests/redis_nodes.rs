//! Two engine instances sharing one Redis (and one Redis Cluster): a recipient connected to
//! node B receives at once what was sent through node A, and a push goes out exactly once for
//! a recipient connected nowhere, never for one connected somewhere. Skipped, and says so,
//! when `OFFLINE_QUEUE_REDIS_URL` / `OFFLINE_QUEUE_REDIS_CLUSTER_URLS` are unset.

#![cfg(feature = "redis")]

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use offline_queue::{
    Envelope, OfflineQueue, Outbound, RecipientId, RecordingNotifier, RedisStorage,
    channel_transport,
};
use redis_support::{PATIENCE, Target, wait_for_sessions};

struct Node {
    queue: OfflineQueue,
    /// The coordination: presence marks are read through it.
    storage: RedisStorage,
    pushes: Arc<RecordingNotifier>,
}

/// How a node's storage and coordination are paired.
#[derive(Clone, Copy)]
enum Pairing {
    /// One `RedisStorage` as both (`shared_storage`): appends wake other nodes themselves.
    Shared,
    /// Queues in one `RedisStorage`, coordination by another under its own prefix, which
    /// the queues' appends know nothing of: the engine announces each append.
    Separate,
}

async fn connect(target: &Target, prefix: &str, name: &str) -> RedisStorage {
    let options = RedisStorage::options().prefix(prefix).node_id(name);
    match target {
        Target::Single(url) => options.connect(url).await,
        Target::Cluster(urls) => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            options.connect_cluster(&urls).await
        }
    }
    .expect("redis answers")
}

async fn node(target: &Target, prefix: &str, name: &str) -> Node {
    node_with(target, prefix, name, Pairing::Shared, |builder| builder).await
}

async fn node_with(
    target: &Target,
    prefix: &str,
    name: &str,
    pairing: Pairing,
    configure: impl FnOnce(offline_queue::OfflineQueueBuilder) -> offline_queue::OfflineQueueBuilder,
) -> Node {
    let storage = connect(target, prefix, name).await;
    let pushes = Arc::new(RecordingNotifier::new());
    let builder = configure(OfflineQueue::builder()).notifier(pushes.clone());
    let (builder, coordination) = match pairing {
        Pairing::Shared => (builder.shared_storage(Arc::new(storage.clone())), storage),
        Pairing::Separate => {
            let coordination = connect(target, &format!("{prefix}-nodes"), name).await;
            let builder = builder
                .storage(Arc::new(storage))
                .coordination(Arc::new(coordination.clone()));
            (builder, coordination)
        }
    };
    let queue = builder.build().unwrap();
    tokio::spawn(queue.wakeup_listener());
    Node {
        queue,
        storage: coordination,
        pushes,
    }
}

async fn across_nodes(target: Target, pairing: Pairing) {
    let prefix = redis_support::unique_prefix("nodes");
    let noop = |builder| builder;
    let a = node_with(&target, &prefix, "node-a", pairing, noop).await;
    let b = node_with(&target, &prefix, "node-b", pairing, noop).await;
    let (bob, carol) = (
        RecipientId::new("bob").unwrap(),
        RecipientId::new("carol").unwrap(),
    );

    // Bob connects to B and catches up on nothing.
    let (transport, mut inbox) = channel_transport(16);
    let session = b.queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
    wait_for_sessions(&a.storage, &bob, &["node-b"]).await;

    // Sent through A: B's session gets it, woken by A (the session would not read again by
    // itself), and nobody is pushed.
    let receipt = a
        .queue
        .send(Envelope::new(bob.clone(), "hi from A"))
        .await
        .unwrap();
    assert!(receipt.recipient_online, "A knows bob is on B");
    let item = tokio::time::timeout(PATIENCE, inbox.next())
        .await
        .expect("B delivers at once")
        .unwrap();
    let Outbound::Batch(batch) = item else {
        panic!("expected a batch, got {item:?}");
    };
    assert_eq!(batch.messages[0].payload, &b"hi from A"[..]);
    handle.ack_through(batch.position);

    // Carol is connected nowhere: exactly one push, from the node that stored the message.
    for text in ["one", "two"] {
        let receipt = a
            .queue
            .send(Envelope::new(carol.clone(), text))
            .await
            .unwrap();
        assert!(!receipt.recipient_online);
    }
    let pushed: Vec<_> = a.pushes.take().into_iter().map(|n| n.recipient).collect();
    assert_eq!(pushed, [carol], "one push for carol, none for bob");
    assert!(b.pushes.take().is_empty());

    // Bob leaves B: his presence goes, and the next message for him is pushed.
    handle.close();
    driver.await.unwrap().unwrap();
    wait_for_sessions(&a.storage, &bob, &[]).await;
    let receipt = a
        .queue
        .send(Envelope::new(bob.clone(), "later"))
        .await
        .unwrap();
    assert!(!receipt.recipient_online);
    let pushed: Vec<_> = a.pushes.take().into_iter().map(|n| n.recipient).collect();
    assert_eq!(pushed, std::slice::from_ref(&bob));
    assert_eq!(
        a.queue.stats(&bob).await.unwrap().messages,
        1,
        "acked one is gone"
    );

    // Dave has a session on B and on C: one send through A wakes both (on a cluster, each
    // node's channel lives on its own slot).
    let c = node_with(&target, &prefix, "node-c", pairing, noop).await;
    let dave = RecipientId::new("dave").unwrap();
    let mut inboxes = Vec::new();
    let mut drivers = Vec::new();
    for node in [&b, &c] {
        let (transport, mut inbox) = channel_transport(16);
        let session = node.queue.connect(dave.clone(), transport);
        drivers.push((session.handle(), tokio::spawn(session.run())));
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        inboxes.push(inbox);
    }
    wait_for_sessions(&a.storage, &dave, &["node-b", "node-c"]).await;
    a.queue
        .send(Envelope::new(dave.clone(), "to both"))
        .await
        .unwrap();
    for inbox in &mut inboxes {
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .expect("each node delivers at once")
            .unwrap();
        assert!(
            matches!(item, Outbound::Batch(ref batch) if batch.messages[0].payload == b"to both"[..]),
            "{item:?}"
        );
    }
    for (handle, driver) in drivers {
        handle.close();
        driver.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_one_redis() {
    if let Some(target) = Target::single() {
        across_nodes(target, Pairing::Shared).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_one_redis_cluster() {
    if let Some(target) = Target::cluster() {
        across_nodes(target, Pairing::Shared).await;
    }
}

/// Any shared storage with any coordination: the queues' appends tell nobody, so delivery
/// across nodes rests on the engine's `Coordination::announce`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_and_coordination_apart() {
    if let Some(target) = Target::single() {
        across_nodes(target, Pairing::Separate).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_and_coordination_apart_on_a_cluster() {
    if let Some(target) = Target::cluster() {
        across_nodes(target, Pairing::Separate).await;
    }
}

/// A session that ends with messages unacked earns a push a little later, unless the
/// recipient is back by then: on this node, or on another one sharing the storage.
async fn delayed_push_across_nodes(target: Target) {
    let prefix = redis_support::unique_prefix("delayed");
    let clock = offline_queue::ManualClock::new(offline_queue::Timestamp::now_system());
    let policy = offline_queue::NotifyPolicy {
        unacked_delay: Duration::from_secs(60),
        ..offline_queue::NotifyPolicy::default()
    };
    let with_clock = |builder: offline_queue::OfflineQueueBuilder| {
        builder.clock(Arc::new(clock.clone())).notify_policy(policy)
    };
    let b = node_with(&target, &prefix, "node-b", Pairing::Shared, with_clock).await;
    let c = node(&target, &prefix, "node-c").await;
    let erin = RecipientId::new("erin").unwrap();
    b.queue
        .send(Envelope::new(erin.clone(), "unread"))
        .await
        .unwrap();
    b.pushes.take();

    // Erin reads on B without acking, and leaves: B owes her a push in a minute.
    let (transport, mut inbox) = channel_transport(16);
    let session = b.queue.connect(erin.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    assert!(matches!(inbox.next().await, Some(Outbound::Batch(_))));
    handle.close();
    driver.await.unwrap().unwrap();

    // She comes back on C before the minute is up.
    let (transport, mut inbox) = channel_transport(16);
    let session = c.queue.connect(erin.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    assert!(matches!(inbox.next().await, Some(Outbound::Batch(_))));
    wait_for_sessions(&b.storage, &erin, &["node-c"]).await;

    clock.advance(Duration::from_secs(61));
    assert_eq!(
        b.queue.maintain(100).await.unwrap().nudges,
        0,
        "she is on C"
    );
    assert!(b.pushes.take().is_empty());
    handle.close();
    driver.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delayed_push_for_a_recipient_back_on_another_node() {
    if let Some(target) = Target::single() {
        delayed_push_across_nodes(target).await;
    }
}

async fn tasks_end_with_the_engine(target: Target) {
    let prefix = redis_support::unique_prefix("tasks-end");
    let storage = match &target {
        Target::Single(url) => RedisStorage::options().prefix(&prefix).connect(url).await,
        Target::Cluster(urls) => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            RedisStorage::options()
                .prefix(&prefix)
                .connect_cluster(&urls)
                .await
        }
    }
    .expect("redis answers");
    let queue = OfflineQueue::builder()
        .shared_storage(Arc::new(storage))
        .build()
        .unwrap();
    let listener = tokio::spawn(queue.wakeup_listener());
    let upkeep = tokio::spawn(
        queue
            .background_maintenance(Duration::from_millis(50), 100)
            .unwrap(),
    );
    drop(queue);
    for (name, task) in [("wake-up listener", listener), ("maintenance", upkeep)] {
        tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap_or_else(|_| panic!("the {name} task outlived the engine"))
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_tasks_end_with_the_engine_on_redis() {
    if let Some(target) = Target::single() {
        tasks_end_with_the_engine(target).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_tasks_end_with_the_engine_on_a_redis_cluster() {
    if let Some(target) = Target::cluster() {
        tasks_end_with_the_engine(target).await;
    }
}
