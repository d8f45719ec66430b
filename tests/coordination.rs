//! The engine and its `Coordination`: what it tells the other nodes (presence, new messages),
//! what it asks them (is the recipient live elsewhere), and what it does when they do not
//! answer. One node's worth of engine over the memory backend, with a coordination the test
//! controls.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::executor::block_on;
use futures::stream::BoxStream;
use offline_queue::{
    Coordination, Envelope, MessageId, NotifyPolicy, OfflineQueue, Presence, RecipientId,
    RecordingNotifier, Retry, channel_transport,
};
use parking_lot::Mutex;

/// Records every call; answers as the test sets.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<String>>,
    live_elsewhere: Mutex<bool>,
    failing: Mutex<bool>,
}

impl Recording {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.calls.lock())
    }

    fn answer(&self) -> offline_queue::Result<bool> {
        if *self.failing.lock() {
            return Err(offline_queue::Error::storage_msg(
                Retry::Yes,
                "coordination down",
            ));
        }
        Ok(*self.live_elsewhere.lock())
    }
}

#[async_trait::async_trait]
impl Coordination for Recording {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        Box::pin(futures::stream::pending())
    }
    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        self.calls.lock().push(format!("{presence:?} {recipient}"));
    }
    async fn announce(&self, recipient: &RecipientId) -> offline_queue::Result<bool> {
        self.calls.lock().push(format!("announce {recipient}"));
        self.answer()
    }
    async fn live_elsewhere(&self, recipient: &RecipientId) -> offline_queue::Result<bool> {
        self.calls
            .lock()
            .push(format!("live_elsewhere {recipient}"));
        self.answer()
    }
}

fn engine(coordination: Arc<Recording>) -> (OfflineQueue, Arc<RecordingNotifier>) {
    let pushes = Arc::new(RecordingNotifier::new());
    let queue = OfflineQueue::builder()
        .coordination(coordination)
        .notifier(pushes.clone())
        .notify_policy(NotifyPolicy {
            urgent_cooldown: Duration::ZERO,
            ..NotifyPolicy::default()
        })
        .build()
        .unwrap();
    (queue, pushes)
}

fn bob() -> RecipientId {
    RecipientId::new("bob").unwrap()
}

#[test]
fn each_stored_message_is_announced_and_a_session_elsewhere_means_no_push() {
    let nodes = Arc::new(Recording::default());
    let (queue, pushes) = engine(nodes.clone());

    let receipt = block_on(queue.send(Envelope::new(bob(), "one"))).unwrap();
    assert_eq!(nodes.take(), ["announce bob"]);
    assert!(!receipt.recipient_online, "no node holds a session");
    assert_eq!(pushes.take().len(), 1, "so bob is pushed");

    *nodes.live_elsewhere.lock() = true;
    let receipt = block_on(queue.send(Envelope::new(bob(), "two"))).unwrap();
    assert_eq!(nodes.take(), ["announce bob"]);
    assert!(receipt.recipient_online, "another node holds a session");
    assert!(pushes.take().is_empty(), "so nobody is pushed");

    // send_many announces once per recipient stored for.
    let results = block_on(queue.send_many(vec![
        Envelope::new(bob(), "three"),
        Envelope::new(bob(), "four"),
    ]))
    .unwrap();
    assert!(results.iter().all(|r| r.as_ref().unwrap().recipient_online));
    assert_eq!(nodes.take(), ["announce bob"]);
}

#[test]
fn nothing_stored_is_not_announced_and_presence_is_told() {
    let nodes = Arc::new(Recording::default());
    let (queue, _pushes) = engine(nodes.clone());
    let id = MessageId::generate();
    block_on(queue.send(Envelope::new(bob(), "once").with_id(id))).unwrap();
    nodes.take();
    let again = block_on(queue.send(Envelope::new(bob(), "once").with_id(id))).unwrap();
    assert!(again.duplicate);
    assert_eq!(
        nodes.take(),
        Vec::<String>::new(),
        "a duplicate stores nothing"
    );

    let (transport, _inbox) = channel_transport(16);
    let session = queue.connect(bob(), transport);
    assert_eq!(nodes.take(), ["Connected bob"]);
    let receipt = block_on(queue.send(Envelope::new(bob(), "here"))).unwrap();
    assert!(receipt.recipient_online);
    assert_eq!(
        nodes.take(),
        ["announce bob"],
        "announced all the same: a client may hold a session on another node too"
    );
    drop(session);
    assert_eq!(nodes.take(), ["Disconnected bob"]);
}

#[test]
fn a_failing_coordination_never_fails_a_send() {
    let nodes = Arc::new(Recording::default());
    *nodes.failing.lock() = true;
    let (queue, pushes) = engine(nodes.clone());
    let receipt = block_on(queue.send(Envelope::new(bob(), "kept"))).unwrap();
    assert!(!receipt.recipient_online);
    assert_eq!(pushes.take().len(), 1, "offline as far as this node knows");
    assert_eq!(block_on(queue.stats(&bob())).unwrap().messages, 1);
}

#[test]
fn online_anywhere_asks_the_other_nodes_only_when_needed() {
    let nodes = Arc::new(Recording::default());
    let (queue, _pushes) = engine(nodes.clone());
    assert!(!block_on(queue.is_online_anywhere(&bob())).unwrap());
    *nodes.live_elsewhere.lock() = true;
    assert!(block_on(queue.is_online_anywhere(&bob())).unwrap());
    assert_eq!(nodes.take(), ["live_elsewhere bob", "live_elsewhere bob"]);

    let (transport, _inbox) = channel_transport(16);
    let _session = queue.connect(bob(), transport);
    nodes.take();
    assert!(block_on(queue.is_online_anywhere(&bob())).unwrap());
    assert!(nodes.take().is_empty(), "a session here answers it");

    *nodes.failing.lock() = true;
    let carol = RecipientId::new("carol").unwrap();
    assert!(block_on(queue.is_online_anywhere(&carol)).is_err());
}

#[test]
fn a_storage_that_is_its_own_coordination_announces_in_its_append() {
    let storage = Arc::new(common::Shaped::new());
    let queue = OfflineQueue::builder()
        .shared_storage(storage.clone())
        .build()
        .unwrap();
    block_on(queue.send(Envelope::new(bob(), "one"))).unwrap();
    assert_eq!(
        storage.announces.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no second call after the append"
    );
}

#[test]
fn the_last_storage_or_coordination_set_decides_who_announces() {
    let nodes = Arc::new(Recording::default());
    let shaped = Arc::new(common::Shaped::new());
    // A storage set after `shared_storage` replaces it: the coordination now announces.
    let queue = OfflineQueue::builder()
        .shared_storage(shaped.clone())
        .storage(Arc::new(offline_queue::MemoryStorage::new()))
        .build()
        .unwrap();
    block_on(queue.send(Envelope::new(bob(), "one"))).unwrap();
    assert_eq!(
        shaped.announces.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // A coordination set after it: the same.
    let queue = OfflineQueue::builder()
        .shared_storage(shaped.clone())
        .coordination(nodes.clone())
        .build()
        .unwrap();
    block_on(queue.send(Envelope::new(bob(), "two"))).unwrap();
    assert_eq!(nodes.take(), ["announce bob"]);
}

#[test]
fn one_node_alone_has_a_listener_that_ends_at_once() {
    let queue = OfflineQueue::builder().build().unwrap();
    assert_eq!(queue.wakeup_listener().now_or_never(), Some(()));
    assert!(!block_on(queue.is_online_anywhere(&bob())).unwrap());
}

/// A session that ends with messages unacked earns a delayed push, held back while the
/// coordination says the recipient is live on another node.
#[test]
fn the_delayed_push_waits_for_a_recipient_live_elsewhere() {
    for elsewhere in [true, false] {
        let nodes = Arc::new(Recording::default());
        let mut h = common::Harness::with(|b| b.coordination(nodes.clone()));
        h.send("bob", b"x");
        h.notifier.take();
        let mut session = h.connect("bob");
        session.batches(&mut h);
        session.close(&mut h);
        *nodes.live_elsewhere.lock() = elsewhere;
        h.advance(Duration::from_secs(3600));
        assert_eq!(
            h.maintain().nudges,
            u64::from(!elsewhere),
            "live elsewhere: {elsewhere}"
        );
        assert!(nodes.take().contains(&"live_elsewhere bob".to_string()));
    }
}

/// Another node's append reaches this node's session only through the coordination's
/// wake-up stream, which `wakeup_listener` runs.
#[test]
fn a_wake_up_from_the_coordination_makes_the_session_read_again() {
    use futures::task::LocalSpawnExt;
    use offline_queue::Outbound;
    let shaped = Arc::new(common::Shaped::new());
    let mut h = common::Harness::with(|b| b.shared_storage(shaped.clone()));
    h.pool
        .spawner()
        .spawn_local(h.queue.wakeup_listener())
        .unwrap();
    let mut session = h.connect("bob");
    assert_eq!(session.drain(&mut h), [Outbound::CaughtUp]);
    // Stored by another node on the same storage, which tells nobody.
    let other = OfflineQueue::builder()
        .storage(shaped.clone())
        .build()
        .unwrap();
    block_on(other.send(Envelope::new(bob(), "from afar"))).unwrap();
    assert!(session.drain(&mut h).is_empty(), "not woken yet");
    shaped.wake(&bob());
    let items = session.drain(&mut h);
    assert!(
        matches!(&items[..], [Outbound::Batch(batch)] if batch.messages[0].payload == b"from afar"[..]),
        "{items:?}"
    );
}
