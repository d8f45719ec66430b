//! Several nodes on one RabbitMQ (`OFFLINE_QUEUE_AMQP_URL`; skipped, and says so, when unset):
//! presence as a binding seen across nodes, wake-ups through the exchange, a node that goes
//! away leaving at once (its queue dies with its connection), and two engines delivering
//! across each other, with records a session ended on one node handed to the other at once.

#![cfg(all(feature = "amqp", feature = "testing"))]

mod amqp_support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_support::{Vhost, url};
use futures::StreamExt;
use futures::stream::BoxStream;
use offline_queue::{
    AmqpStorage, Coordination, Envelope, OfflineQueue, Outbound, Presence, RecipientId,
    RecordingNotifier, channel_transport,
};

const PATIENCE: Duration = Duration::from_secs(20);

async fn node(url: &str) -> AmqpStorage {
    AmqpStorage::options()
        .prefix("nodes")
        .connect(url)
        .await
        .expect("the broker answers")
}

fn id(name: &str) -> RecipientId {
    RecipientId::new(name).unwrap()
}

/// Polls `check` until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_wakeup(stream: &mut BoxStream<'static, RecipientId>, what: &str) -> RecipientId {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("no wake-up: {what}"))
        .expect("the wake-up stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_an_announce_wakes_the_other() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "nodes");
    let a = node(&vhost.url).await;
    let b = node(&vhost.url).await;
    let (bob, carol) = (id("bob"), id("carol"));
    let mut wakeups = a.wakeups();
    assert!(
        !b.live_elsewhere(&bob).await.unwrap(),
        "nobody holds bob yet"
    );
    a.presence(&bob, Presence::Connected);
    eventually("b sees bob's session on a", || async {
        b.live_elsewhere(&bob).await.unwrap()
    })
    .await;
    assert!(
        !a.live_elsewhere(&bob).await.unwrap(),
        "a's own session is not elsewhere"
    );
    assert!(b.announce(&bob).await.unwrap(), "b's announce finds a");
    assert_eq!(next_wakeup(&mut wakeups, "b's announce").await, bob);
    assert!(!b.announce(&carol).await.unwrap(), "nobody holds carol");
    assert!(!a.announce(&bob).await.unwrap(), "a holds bob itself");

    a.presence(&bob, Presence::Disconnected);
    eventually("bob's session on a ends for b", || async {
        !b.live_elsewhere(&bob).await.unwrap()
    })
    .await;

    // A node that goes away takes its presence with it: its queue dies with its connection.
    a.presence(&carol, Presence::Connected);
    eventually("b sees carol on a", || async {
        b.live_elsewhere(&carol).await.unwrap()
    })
    .await;
    drop(a);
    eventually("carol's node is gone for b", || async {
        !b.live_elsewhere(&carol).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_broker_deliver_across_each_other() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "engines");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let pushes = Arc::new(RecordingNotifier::new());
        let queue = OfflineQueue::builder()
            .shared_storage(Arc::new(node(&vhost.url).await))
            .notifier(pushes.clone())
            .build()
            .unwrap();
        tokio::spawn(queue.wakeup_listener());
        nodes.push((queue, pushes));
    }
    let [(a, a_pushes), (b, b_pushes)] = <[_; 2]>::try_from(nodes).ok().unwrap();
    let (bob, carol) = (id("bob"), id("carol"));

    // Bob reads one message on A and leaves without acking it.
    a.send(Envelope::new(bob.clone(), "first")).await.unwrap();
    let (transport, mut inbox) = channel_transport(16);
    let session = a.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    let Some(Outbound::Batch(batch)) = inbox.next().await else {
        panic!("a batch first");
    };
    assert_eq!(batch.messages[0].payload, &b"first"[..]);
    handle.close();
    driver.await.unwrap().unwrap();

    // On B, he gets it at once (A hands it back as his session ends, and wakes B), marked
    // redelivered. B may read before A let go, find nothing and say so first.
    let (transport, mut inbox) = channel_transport(16);
    let session = b.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    let mut caught_up = false;
    let batch = loop {
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .expect("B delivers what A held, woken when A let go")
            .unwrap();
        match item {
            Outbound::Batch(batch) => break batch,
            Outbound::CaughtUp if !caught_up => caught_up = true,
            other => panic!("a batch, not {other:?}"),
        }
    };
    assert_eq!(batch.messages[0].payload, &b"first"[..]);
    assert!(batch.messages[0].redelivered, "A handed it over once");
    handle.ack_through(batch.position);
    if !caught_up {
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
    }
    eventually("a sees bob on b", || async {
        a.is_online_anywhere(&bob).await.unwrap()
    })
    .await;

    // Sent through A: B's session gets it at once, woken by A, and nobody is pushed.
    let receipt = a
        .send(Envelope::new(bob.clone(), "hi from A"))
        .await
        .unwrap();
    assert!(receipt.recipient_online, "A knows bob is on B");
    loop {
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .expect("B delivers at once")
            .unwrap();
        if let Outbound::Batch(batch) = item {
            assert_eq!(batch.messages[0].payload, &b"hi from A"[..]);
            handle.ack_through(batch.position);
            break;
        }
        assert_eq!(item, Outbound::CaughtUp);
    }

    // Carol is connected nowhere: one push, from the node that stored the message.
    let receipt = a.send(Envelope::new(carol.clone(), "x")).await.unwrap();
    assert!(!receipt.recipient_online);
    let pushed: Vec<_> = a_pushes.take().into_iter().map(|n| n.recipient).collect();
    assert!(pushed.contains(&carol), "{pushed:?}");
    assert!(b_pushes.take().iter().all(|n| n.recipient != carol));
    handle.close();
    driver.await.unwrap().unwrap();
}

/// A node that dies holding a record it handed over, unacked, hands it back with its
/// connection: the next node's session gets it marked redelivered, counted. Once it has been
/// handed over `max_deliveries` times, the next read gives it to the dead-letter hook,
/// exactly once, and removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_records_of_a_dead_node_come_back_then_reach_the_dead_letter_hook_once() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "dead");
    let dead = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let engine = |storage: AmqpStorage| {
        let dead = dead.clone();
        OfflineQueue::builder()
            .shared_storage(Arc::new(storage))
            .max_deliveries(3)
            .on_dead_letter(move |who, delivery| dead.lock().push((who.clone(), delivery)))
            .build()
            .unwrap()
    };
    let bob = id("bob");
    let sender = engine(node(&vhost.url).await);
    sender
        .send(Envelope::new(bob.clone(), "doomed"))
        .await
        .unwrap();
    for round in 1..=3u32 {
        let queue = engine(node(&vhost.url).await);
        eventually("what the last node held is back in the queue", || async {
            queue.stats(&bob).await.unwrap().messages == 1
        })
        .await;
        let (transport, mut inbox) = channel_transport(16);
        let driver = tokio::spawn(queue.connect(bob.clone(), transport).run());
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .expect("a batch")
            .unwrap();
        let Outbound::Batch(batch) = item else {
            panic!("round {round}: a batch, not {item:?}");
        };
        let got = &batch.messages[0];
        assert_eq!(got.payload, &b"doomed"[..]);
        assert_eq!(
            (got.delivery_count, got.redelivered),
            (round, round > 1),
            "round {round}"
        );
        // The node dies holding it: no ack, and its connection goes with it.
        driver.abort();
        let _ = driver.await;
        drop(queue);
    }
    let queue = engine(node(&vhost.url).await);
    eventually("the record is back a third time", || async {
        queue.stats(&bob).await.unwrap().messages == 1
    })
    .await;
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    loop {
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .expect("the session answers")
            .unwrap();
        match item {
            Outbound::Batch(batch) => {
                assert!(batch.messages.is_empty(), "never delivered a fourth time");
                assert_eq!(batch.gap, 1, "and reported as a gap");
                handle.ack_through(batch.position);
            }
            Outbound::CaughtUp => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    handle.close();
    driver.await.unwrap().unwrap();
    let letters = dead.lock().clone();
    assert_eq!(letters.len(), 1, "the hook saw it once");
    assert_eq!(
        (&letters[0].0, &letters[0].1.payload[..]),
        (&bob, &b"doomed"[..])
    );
    assert_eq!(
        queue.stats(&bob).await.unwrap().messages,
        0,
        "and it is gone"
    );
    let again = engine(node(&vhost.url).await);
    let (transport, mut inbox) = channel_transport(16);
    let driver = tokio::spawn(again.connect(bob.clone(), transport).run());
    assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
    driver.abort();
    assert_eq!(dead.lock().len(), 1, "never twice");
}
