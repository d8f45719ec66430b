//! NATS JetStream faults, on servers these tests start themselves (Debian's `nats-server`, free
//! loopback ports, temporary store directories): one server killed with SIGKILL under load and
//! started again on its files, and a 3-node cluster with replicated streams (R3) losing a node
//! to SIGKILL under load and getting it back. Sends fail with retryable errors while nothing
//! can store them, the engine recovers by itself, and every send that returned `Ok` is
//! delivered, exactly as sent, in each sender's order. Each fault runs against both NATS
//! layouts: `NatsStorage` and the single-owner `OwnedNatsStorage`.

#![cfg(feature = "nats")]

mod nats_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nats_support::own_server::{
    NATS_SERVER, OwnNats, connect_owned_when_ready, connect_when_ready, free_port, start_cluster,
};
use nats_support::skip_support;
use offline_queue::{
    Envelope, Limits, MessageId, NatsStorage, OfflineQueue, RecipientId, Storage, StorageExt,
    Timestamp,
};
use parking_lot::Mutex;

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
const PATIENCE: Duration = Duration::from_secs(60);
/// One sender per recipient, so each recipient's order is its sender's.
const SENDERS: u64 = 4;

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(PATIENCE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never true: {what}"));
}

/// A storage of either layout on `url`.
async fn connect(url: &str, replicas: usize, owned: bool) -> Arc<dyn Storage> {
    let options = || {
        NatsStorage::options()
            .replicas(replicas)
            .stale_reservation(Duration::from_secs(1))
    };
    if owned {
        Arc::new(connect_owned_when_ready(options, url).await)
    } else {
        Arc::new(connect_when_ready(options, url).await)
    }
}

/// What the senders had acknowledged, per recipient in send order.
type Acked = Arc<Mutex<BTreeMap<u64, Vec<u64>>>>;

struct Load {
    acknowledged: Acked,
    failures: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(queue: &OfflineQueue) -> Self {
        let acknowledged = Acked::default();
        let failures = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let senders = (0..SENDERS)
            .map(|r| {
                let (queue, acknowledged, failures, stop) = (
                    queue.clone(),
                    acknowledged.clone(),
                    failures.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let to = RecipientId::new(format!("r{r}")).unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Each message has its own id, and a failed send is retried with it:
                        // what a failed attempt stored must not be stored again.
                        let id = MessageId::derive(to.as_bytes(), &n.to_be_bytes());
                        let envelope = Envelope::new(to.clone(), n.to_be_bytes()).with_id(id);
                        match queue.send(envelope).await {
                            Ok(_) => {
                                acknowledged.lock().entry(r).or_default().push(n);
                                n += 1;
                            }
                            Err(error) => {
                                assert!(error.is_retryable(), "an outage is retryable: {error}");
                                failures.fetch_add(1, Ordering::Relaxed);
                                // A client's backoff; the test waits on counts, not on this.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            acknowledged,
            failures,
            stop,
            senders,
        }
    }

    fn acked(&self) -> usize {
        self.acknowledged.lock().values().map(Vec::len).sum()
    }

    /// Stops the senders, then checks that every acknowledged send is stored, in its
    /// sender's order, exactly as sent.
    async fn finish(self, storage: &dyn Storage) {
        self.stop.store(true, Ordering::Relaxed);
        for sender in self.senders {
            sender.await.unwrap();
        }
        let acknowledged = self.acknowledged.lock().clone();
        for (r, sent) in &acknowledged {
            let who = RecipientId::new(format!("r{r}")).unwrap();
            // A send that failed mid-append leaves a reservation readers wait out (1 s here):
            // read until everything acknowledged is there.
            let deadline = Instant::now() + PATIENCE;
            let stored = loop {
                let stored: Vec<u64> = storage
                    .read_all(&who, Timestamp::now_system())
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|record| {
                        let payload = offline_queue::fuzz::decode_body(record.body, 64).unwrap();
                        u64::from_be_bytes(payload[..].try_into().unwrap())
                    })
                    .collect();
                if sent.iter().all(|n| stored.contains(n)) || Instant::now() > deadline {
                    break stored;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let lost: Vec<&u64> = sent.iter().filter(|n| !stored.contains(n)).collect();
            assert!(lost.is_empty(), "r{r}: acknowledged sends lost: {lost:?}");
            // A send that failed and was never retried to success may be stored too (a
            // retryable failure after the write); what was acknowledged is stored once each,
            // in order, though its first attempts failed.
            let order: Vec<u64> = stored
                .iter()
                .copied()
                .filter(|n| sent.contains(n))
                .collect();
            assert_eq!(&order, sent, "r{r}: stored out of send order, or twice");
        }
        eprintln!(
            "{} sends acknowledged, {} failed during the outage, none lost",
            acknowledged.values().map(Vec::len).sum::<usize>(),
            self.failures.load(Ordering::Relaxed)
        );
    }
}

fn queue_on(storage: &Arc<dyn Storage>) -> OfflineQueue {
    OfflineQueue::builder()
        .storage(storage.clone())
        .limits(Limits {
            max_messages_per_recipient: 1_000_000,
            default_ttl: None,
            ..Limits::default()
        })
        .build()
        .unwrap()
}

fn nats_server_missing() -> bool {
    skip_support::program_missing(
        NATS_SERVER,
        "nats-server",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_no_acknowledged_send() {
    a_server_killed_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_no_send_acknowledged_by_an_owner() {
    a_server_killed_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_under_load_loses_no_acknowledged_send() {
    a_cluster_node_killed_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_under_load_loses_no_send_acknowledged_by_an_owner() {
    a_cluster_node_killed_under_load(true).await;
}

async fn a_server_killed_under_load(owned: bool) {
    if nats_server_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = OwnNats::new(dir.path(), "solo", port, None);
    server.start();
    let storage = connect(&format!("nats://127.0.0.1:{port}"), 1, owned).await;
    let queue = queue_on(&storage);
    let load = Load::start(&queue);

    wait_until("sends flow", || load.acked() >= 200).await;
    server.kill();
    wait_until("sends fail while the server is down", || {
        load.failures.load(Ordering::Relaxed) >= SENDERS
    })
    .await;
    let before = load.acked();
    server.start();
    wait_until("the engine recovers by itself", || {
        load.acked() >= before + 200
    })
    .await;
    load.finish(storage.as_ref()).await;
}

async fn a_cluster_node_killed_under_load(owned: bool) {
    if nats_server_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, url) = start_cluster(dir.path());
    let storage = connect(&url, 3, owned).await;
    let queue = queue_on(&storage);
    let load = Load::start(&queue);

    wait_until("sends flow", || load.acked() >= 200).await;
    // The first node: the client's first server, and perhaps a stream's leader.
    nodes[0].kill();
    let before = load.acked();
    wait_until("two nodes of three keep storing", || {
        load.acked() >= before + 200
    })
    .await;
    nodes[0].start();
    let before = load.acked();
    wait_until("sends go on with the node back", || {
        load.acked() >= before + 200
    })
    .await;
    load.finish(storage.as_ref()).await;
}
