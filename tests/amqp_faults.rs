//! RabbitMQ stopped or killed mid-load: a broker the test starts itself (Debian's
//! `rabbitmq-server`, a free loopback port, its files in a temporary directory) is stopped
//! (`rabbitmqctl stop`) with quorum queues, or killed with SIGKILL with classic queues, while
//! four senders keep sending, and started again on the same files. Sends during the outage
//! fail, retryably and within a bound; the same engine reconnects by itself; then each
//! recipient's session delivers every send that returned `Ok`, with its body, each sender's
//! messages in the order sent, and nothing that was never sent.
//!
//! Quorum queues are not killed here: on this single-node RabbitMQ 3.10.8, a quorum queue
//! whose node was killed with SIGKILL found no leader again once the node restarted (its
//! log says "leader not known" for as long as we waited, 80 s; after a clean stop it has one
//! within a second). The storage then fails each step after `operation_timeout` instead of
//! hanging.
//!
//! The broker does not deduplicate: a send that failed after the broker stored it (its
//! confirm lost with the connection) and was then retried is stored twice. That is the only
//! duplicate allowed, and it is counted.
//!
//! Skipped, and says so, when `rabbitmq-server` is missing; fails instead when
//! `OFFLINE_QUEUE_REQUIRE_SERVERS=1`.

#![cfg(all(feature = "amqp", feature = "testing"))]

mod amqp_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amqp_support::own_broker::OwnBroker;
use amqp_support::skip_support;
use futures::StreamExt;
use offline_queue::storage::QueueType;
use offline_queue::{
    AmqpStorage, Delivery, Envelope, Error, MessageId, OfflineQueue, Outbound, RecipientId,
    SessionEnd, channel_transport,
};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
const PATIENCE: Duration = Duration::from_secs(60);
/// Bounds one send.
const SEND_BOUND: Duration = Duration::from_secs(15);
const SENDERS: u64 = 4;
const RECIPIENTS: u64 = 3;
/// Sends that return `Ok` before the fault, and again after the broker is back.
const PER_PHASE: u64 = 200;

/// Sender `sender`'s `k`th message: its own id (sender and number in its bytes), recipient
/// and body.
fn message(sender: u64, k: u64) -> (MessageId, u64, Vec<u8>) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&sender.to_be_bytes());
    id[8..].copy_from_slice(&k.to_be_bytes());
    let to = (sender + k) % RECIPIENTS;
    let body = format!("sender {sender} message {k} to r{to}").into_bytes();
    (MessageId::from_bytes(id), to, body)
}

fn origin(id: MessageId) -> (u64, u64) {
    let bytes = id.to_bytes();
    (
        u64::from_be_bytes(bytes[..8].try_into().unwrap()),
        u64::from_be_bytes(bytes[8..].try_into().unwrap()),
    )
}

fn recipient(r: u64) -> RecipientId {
    RecipientId::new(format!("r{r}")).unwrap()
}

#[derive(Default)]
struct Ledger {
    attempted: HashMap<MessageId, (u64, Vec<u8>)>,
    acknowledged: HashSet<MessageId>,
    /// Messages a send failed for at least once (then retried).
    failed_once: HashSet<MessageId>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// One sender: each message is sent until it returns `Ok` (the same id and body again after a
/// failure, as a client retries), then the next; a failure must be a retryable storage error
/// and come within [`SEND_BOUND`].
fn sender(
    queue: OfflineQueue,
    s: u64,
    ledger: Arc<Mutex<Ledger>>,
    counters: Arc<Counters>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut k = 0;
        'messages: while !counters.stop.load(Ordering::Relaxed) {
            let (id, to, body) = message(s, k);
            ledger.lock().attempted.insert(id, (to, body.clone()));
            loop {
                let envelope = Envelope::new(recipient(to), body.clone()).with_id(id);
                let sent = tokio::time::timeout(SEND_BOUND, queue.send(envelope))
                    .await
                    .unwrap_or_else(|_| panic!("sender {s}: a send hung past {SEND_BOUND:?}"));
                match sent {
                    Ok(_) => {
                        ledger.lock().acknowledged.insert(id);
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(error) => {
                        // A quorum queue shutting down nacks; with records ready under a byte
                        // limit the storage cannot tell that from a full queue, so it may say
                        // `QueueFull` (retryable too).
                        assert!(
                            matches!(
                                error,
                                Error::Storage {
                                    retryable: true,
                                    ..
                                } | Error::QueueFull { .. }
                            ),
                            "sender {s}: an outage is a retryable error: {error:?}"
                        );
                        ledger.lock().failed_once.insert(id);
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        if counters.stop.load(Ordering::Relaxed) {
                            break 'messages;
                        }
                        // A client's backoff; the test waits on counts, not on this.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            k += 1;
        }
    })
}

async fn wait_until(what: &str, senders: &mut Vec<JoinHandle<()>>, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        if let Some(i) = senders.iter().position(JoinHandle::is_finished) {
            senders.remove(i).await.expect("a sender failed");
            panic!("a sender stopped early, waiting for: {what}");
        }
        assert!(Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects `who` and takes everything stored for them, acking each batch, until the session
/// says it caught up; then closes it.
async fn drain(queue: &OfflineQueue, who: &RecipientId) -> Vec<Delivery> {
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(who.clone(), transport);
    let handle = session.handle();
    let driver = tokio::spawn(session.run());
    let mut delivered = Vec::new();
    loop {
        let item = tokio::time::timeout(PATIENCE, inbox.next())
            .await
            .unwrap_or_else(|_| panic!("{who}'s session stalled"));
        match item {
            Some(Outbound::Batch(batch)) => {
                assert_eq!(batch.gap, 0, "{who}: nothing was dropped or expired");
                let last = batch.messages.last().expect("a batch holds messages").seq;
                delivered.extend(batch.messages);
                handle.ack_through(last);
            }
            Some(Outbound::CaughtUp) => break,
            other => panic!("{who}: unexpected {other:?}"),
        }
    }
    handle.close();
    let end = tokio::time::timeout(PATIENCE, driver)
        .await
        .expect("the session ends when closed")
        .unwrap()
        .expect("the session runs on the recovered broker");
    assert_eq!(end, SessionEnd::Closed);
    delivered
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `rabbitmqctl stop`, then start.
    Stop,
    /// SIGKILL to the broker's VM, then start.
    Kill,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_mid_load_loses_no_acknowledged_send_on_quorum_queues() {
    under_load(Fault::Stop, QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_load_loses_no_acknowledged_send_on_classic_queues() {
    under_load(Fault::Kill, QueueType::Classic).await;
}

async fn under_load(fault: Fault, queue_type: QueueType) {
    if skip_support::program_missing(
        "/usr/sbin/rabbitmq-server",
        "rabbitmq-server",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    ) {
        return;
    }
    let started = Instant::now();
    let broker = tokio::task::block_in_place(OwnBroker::start);
    let storage = AmqpStorage::options()
        .queue_type(queue_type)
        .operation_timeout(Duration::from_secs(5))
        .connect(&broker.url())
        .await
        .expect("the test's broker answers");
    let queue = OfflineQueue::builder()
        .shared_storage(Arc::new(storage))
        .build()
        .unwrap();
    assert!(
        queue.storage_is_durable(),
        "confirmed publishes of persistent messages"
    );

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counters = Arc::new(Counters::default());
    let mut senders: Vec<JoinHandle<()>> = (0..SENDERS)
        .map(|s| sender(queue.clone(), s, ledger.clone(), counters.clone()))
        .collect();
    let count = |counter: fn(&Counters) -> &AtomicU64| {
        let counters = counters.clone();
        move || counter(&counters).load(Ordering::Relaxed)
    };
    let ok = count(|c| &c.ok);
    let failed = count(|c| &c.failed);
    wait_until("sends flow", &mut senders, || ok() >= PER_PHASE).await;
    let failed_before = failed();
    tokio::task::block_in_place(|| match fault {
        Fault::Stop => broker.stop(),
        Fault::Kill => broker.kill(),
    });
    wait_until("sends fail during the outage", &mut senders, || {
        failed() >= failed_before + SENDERS
    })
    .await;
    let ok_while_down = ok();
    tokio::task::block_in_place(|| broker.restart());
    wait_until("the same engine reconnects by itself", &mut senders, || {
        ok() >= ok_while_down + PER_PHASE
    })
    .await;
    counters.stop.store(true, Ordering::Relaxed);
    for sender in senders {
        tokio::time::timeout(PATIENCE, sender)
            .await
            .expect("senders stop")
            .expect("a sender failed");
    }

    let ledger = std::mem::take(&mut *ledger.lock());
    let mut delivered_ids = HashSet::new();
    let mut twice = 0;
    for r in 0..RECIPIENTS {
        let who = recipient(r);
        let delivered = drain(&queue, &who).await;
        let mut last_seq = None;
        let mut last_of_sender: HashMap<u64, u64> = HashMap::new();
        for delivery in &delivered {
            if !delivered_ids.insert(delivery.id) {
                assert!(
                    ledger.failed_once.contains(&delivery.id),
                    "{who}: {:?} delivered twice, but its send never failed",
                    delivery.id
                );
                twice += 1;
            }
            assert!(
                Some(delivery.seq) > last_seq,
                "{who}: seqs out of order at {delivery:?}"
            );
            last_seq = Some(delivery.seq);
            let Some((to, body)) = ledger.attempted.get(&delivery.id) else {
                panic!("{who}: {:?} was never sent", delivery.id);
            };
            assert_eq!(*to, r, "{who}: {:?} is someone else's", delivery.id);
            assert_eq!(&delivery.payload[..], &body[..], "{who}: the body sent");
            // One sender sends one message at a time: its messages are stored, and so
            // delivered, in the order it sent them (a stored copy of a failed try may come
            // just before its retry's).
            let (s, k) = origin(delivery.id);
            if let Some(previous) = last_of_sender.insert(s, k) {
                assert!(
                    previous <= k,
                    "{who}: sender {s}'s {k} came after its {previous}"
                );
            }
        }
    }
    let lost: Vec<(u64, u64)> = ledger
        .acknowledged
        .iter()
        .filter(|id| !delivered_ids.contains(*id))
        .map(|&id| origin(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} sends that returned Ok were lost (sender, number): {lost:?}",
        lost.len()
    );
    eprintln!(
        "{fault:?} on {queue_type:?} queues: {} sends returned Ok, {} failed during the outage, {} stored twice (a failed try \
         the broker had kept, then its retry); none lost; {:.1?}",
        ledger.acknowledged.len(),
        counters.failed.load(Ordering::Relaxed),
        twice,
        started.elapsed()
    );
}
