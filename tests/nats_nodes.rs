//! Nodes coordinated over core NATS (`NatsCoordination`, feature `nats`): presence seen across
//! nodes and gone when a session ends or a node drops, wake-ups that reach the holder and
//! questions that do not wake it, a holder that cannot answer, a restart of the server (every
//! session reads again), and two engines sharing one storage, delivering across each other.
//! The tests on the shared server need `OFFLINE_QUEUE_NATS_URL` (skipped, and say so, when it is
//! unset); the restart test starts its own `nats-server` (Debian's `nats-server` package).

#![cfg(feature = "nats")]

mod nats_support;

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use nats_support::{skip_support, unique_prefix, url};
use offline_queue::{
    Coordination, Envelope, MemoryStorage, NatsCoordination, OfflineQueue, Outbound, Presence,
    RecipientId, RecordingNotifier, channel_transport,
};

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
const PATIENCE: Duration = Duration::from_secs(20);

async fn node(url: &str, prefix: &str) -> NatsCoordination {
    NatsCoordination::options()
        .prefix(prefix)
        .connect(url)
        .await
        .expect("nats answers")
}

/// Polls `check` until it holds, within [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_wakeup(stream: &mut BoxStream<'static, RecipientId>, what: &str) -> RecipientId {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no wake-up: {what}"))
        .expect("the wake-up stream ended")
}

fn id(name: &str) -> RecipientId {
    RecipientId::new(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_only_a_wake_up_wakes() {
    let Some(url) = url() else {
        return;
    };
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let other_app = node(&url, &unique_prefix()).await;
    let (bob, carol, dave) = (id("bob"), id("carol"), id("dave"));
    assert!(!b.live_elsewhere(&bob).await.unwrap(), "nobody holds bob");
    assert!(!b.announce(&bob).await.unwrap(), "nobody to wake");

    let mut wakeups = a.wakeups();
    a.presence(&bob, Presence::Connected);
    // Once the server has a's subscription, bob's session reads again (a send between its
    // first read and that moment is found then).
    assert_eq!(next_wakeup(&mut wakeups, "bob's subscription").await, bob);
    eventually("b sees bob on a", || async {
        b.live_elsewhere(&bob).await.unwrap()
    })
    .await;
    assert!(
        !a.live_elsewhere(&bob).await.unwrap(),
        "a's own is not elsewhere"
    );
    assert!(!a.announce(&bob).await.unwrap(), "a's own is not elsewhere");
    assert!(
        !other_app.live_elsewhere(&bob).await.unwrap(),
        "another prefix"
    );
    assert!(!b.announce(&carol).await.unwrap(), "nobody holds carol");

    a.presence(&dave, Presence::Connected);
    assert_eq!(next_wakeup(&mut wakeups, "dave's subscription").await, dave);
    // A question does not wake; a wake-up does. In order: bob is answered before dave is
    // announced, and a holder wakes before it answers.
    assert!(b.live_elsewhere(&bob).await.unwrap());
    assert!(
        b.announce(&dave).await.unwrap(),
        "b's send for dave wakes a"
    );
    assert_eq!(
        next_wakeup(&mut wakeups, "b's announce for dave").await,
        dave
    );
    assert!(b.announce(&bob).await.unwrap());
    assert_eq!(next_wakeup(&mut wakeups, "b's announce for bob").await, bob);
    // a's own announce for a recipient it holds wakes the others, not itself.
    b.presence(&carol, Presence::Connected);
    let mut b_wakeups = b.wakeups();
    assert_eq!(next_wakeup(&mut b_wakeups, "b's carol").await, carol);
    eventually("a sees carol on b", || async {
        a.live_elsewhere(&carol).await.unwrap()
    })
    .await;
    a.presence(&carol, Presence::Connected);
    assert_eq!(next_wakeup(&mut wakeups, "a's carol").await, carol);
    assert!(!a.announce(&carol).await.unwrap());
    assert_eq!(next_wakeup(&mut b_wakeups, "a's announce").await, carol);

    // A new stream starts with every session this node holds.
    let mut held: Vec<RecipientId> = Vec::new();
    let mut fresh = a.wakeups();
    for _ in 0..3 {
        held.push(next_wakeup(&mut fresh, "a new stream").await);
    }
    held.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
    assert_eq!(held, [bob.clone(), carol.clone(), dave.clone()]);

    a.presence(&bob, Presence::Disconnected);
    eventually("bob's session on a ends for b", || async {
        matches!(b.live_elsewhere(&bob).await, Ok(false))
    })
    .await;
    assert!(b.live_elsewhere(&dave).await.unwrap(), "dave is still held");
    // A node that goes away leaves with its connection.
    drop((a, wakeups, fresh));
    eventually("a's sessions end with it", || async {
        matches!(b.live_elsewhere(&dave).await, Ok(false))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_answer_is_a_retryable_error() {
    let Some(url) = url() else {
        return;
    };
    let prefix = unique_prefix();
    let timeout = Duration::from_millis(200);
    let b = NatsCoordination::options()
        .prefix(&prefix)
        .request_timeout(timeout)
        .connect(&url)
        .await
        .unwrap();
    // Interest that never answers: a node whose host died and which the server has not yet
    // dropped.
    let raw = async_nats::connect(url.as_str()).await.unwrap();
    let _silent = raw
        .subscribe(format!("{prefix}.wake.626f62"))
        .await
        .unwrap();
    raw.flush().await.unwrap();
    let bob = id("bob");
    eventually("the silent holder is seen", || async {
        b.live_elsewhere(&bob).await.is_err()
    })
    .await;
    for error in [
        b.announce(&bob).await.unwrap_err(),
        b.live_elsewhere(&bob).await.unwrap_err(),
    ] {
        assert!(error.is_retryable(), "{error}");
        assert!(
            error.to_string().contains("did not answer within 200ms"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn bad_settings_are_refused_by_name() {
    for (options, field) in [
        (NatsCoordination::options().prefix("oq.*"), "nats prefix"),
        (
            NatsCoordination::options().request_timeout(Duration::ZERO),
            "nats request_timeout",
        ),
        (
            NatsCoordination::options().request_timeout(Duration::from_secs(61)),
            "nats request_timeout",
        ),
    ] {
        let error = options.connect("nats://127.0.0.1:1").await.unwrap_err();
        assert!(!error.is_retryable(), "{error}");
        assert!(error.to_string().contains(field), "{error}");
    }
    let error = NatsCoordination::connect("nats://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "nobody listens on port 1: {error}");
}

/// A `nats-server` of the test's own, on a free loopback port; killed when dropped.
struct OwnNats {
    port: u16,
    child: Child,
}

impl OwnNats {
    fn start(port: u16) -> Self {
        let child = Command::new("/usr/sbin/nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_every_session_reads_again() {
    if skip_support::program_missing(
        "/usr/sbin/nats-server",
        "nats-server",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    ) {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = OwnNats::start(port);
    let url = format!("nats://127.0.0.1:{}", server.port);
    let prefix = unique_prefix();
    let a = node(&url, &prefix).await;
    let b = node(&url, &prefix).await;
    let bob = id("bob");
    let mut wakeups = a.wakeups();
    a.presence(&bob, Presence::Connected);
    assert_eq!(next_wakeup(&mut wakeups, "bob's subscription").await, bob);

    // Wake-ups sent while the server is down reach nobody: coming back, a re-reads every
    // session it holds.
    server.kill();
    let _server = OwnNats::start(port);
    assert_eq!(next_wakeup(&mut wakeups, "a is back").await, bob);
    // Its subscriptions are back too: b finds and wakes bob's session on a.
    eventually("b sees bob on a again", || async {
        b.live_elsewhere(&bob).await.unwrap_or(false)
    })
    .await;
    assert!(b.announce(&bob).await.unwrap());
    assert_eq!(next_wakeup(&mut wakeups, "b's announce").await, bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_storage_deliver_across_each_other() {
    let Some(url) = url() else {
        return;
    };
    let prefix = unique_prefix();
    let storage = Arc::new(MemoryStorage::new());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let pushes = Arc::new(RecordingNotifier::new());
        let queue = OfflineQueue::builder()
            .storage(storage.clone())
            .coordination(Arc::new(node(&url, &prefix).await))
            .notifier(pushes.clone())
            .build()
            .unwrap();
        tokio::spawn(queue.wakeup_listener());
        nodes.push((queue, pushes));
    }
    let [(a, a_pushes), (b, b_pushes)] = <[_; 2]>::try_from(nodes).ok().unwrap();
    let (bob, carol) = (id("bob"), id("carol"));

    let (transport, mut inbox) = channel_transport(16);
    let session = b.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
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
        // A wake-up that confirmed B's subscription may have found nothing new.
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
    assert_eq!(pushed, [carol]);
    assert!(b_pushes.take().is_empty());

    // Bob leaves B: the next message for him is pushed.
    handle.close();
    driver.await.unwrap().unwrap();
    // A question that meets the subscription as it goes goes unanswered: an error, which the
    // engine takes as offline, as bob now is.
    eventually("bob's session on b ends for a", || async {
        matches!(a.is_online_anywhere(&bob).await, Ok(false))
    })
    .await;
    let receipt = a.send(Envelope::new(bob.clone(), "later")).await.unwrap();
    assert!(!receipt.recipient_online);
    let pushed: Vec<_> = a_pushes.take().into_iter().map(|n| n.recipient).collect();
    assert_eq!(pushed, [bob]);
}
