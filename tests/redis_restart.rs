//! Redis restarted mid-load: a test-owned `redis-server` (AOF, `appendfsync always`, its own
//! port and directory) is killed with SIGKILL while eight senders keep sending, then started
//! again on the same files. Sends during the outage fail with retryable errors, the engine
//! recovers by itself, and every send that returned `Ok` is still there. And a test-owned
//! Redis that is full: appends fail, retryably, while reads and acks drain it.

#![cfg(feature = "redis")]

mod skip_support;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use offline_queue::{Envelope, OfflineQueue, RecipientId, RedisStorage, StorageExt, Timestamp};
use parking_lot::Mutex;

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
const PATIENCE: Duration = Duration::from_secs(30);
const RECIPIENTS: u64 = 4;

struct OwnRedis {
    child: Child,
}

impl OwnRedis {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        Self::start_with(port, dir, &[])
    }

    fn start_with(port: u16, dir: &std::path::Path, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = std::time::Instant::now() + PATIENCE;
        while !Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether Debian's `redis-server` is here to start; says the test is skipped if not.
fn redis_server_installed() -> bool {
    let installed = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    if !installed {
        skip_support::record("redis-server is not installed");
    }
    installed
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(PATIENCE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never true: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_load_loses_no_acknowledged_send() {
    if !redis_server_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = OwnRedis::start(port, dir.path());
    let storage = RedisStorage::options()
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap();
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage.clone()))
        .build()
        .unwrap();

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (queue, acknowledged, failures, next, stop) = (
            queue.clone(),
            acknowledged.clone(),
            failures.clone(),
            next.clone(),
            stop.clone(),
        );
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let to = RecipientId::new(format!("r{}", n % RECIPIENTS)).unwrap();
                match queue.send(Envelope::new(to, n.to_be_bytes())).await {
                    Ok(_) => acknowledged.lock().push(n),
                    Err(error) => {
                        assert!(error.is_retryable(), "an outage is retryable: {error}");
                        failures.fetch_add(1, Ordering::Relaxed);
                        // A client's backoff; the test waits on counts, not on this.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }

    wait_until("sends flow", || acknowledged.lock().len() >= 300).await;
    server.kill();
    wait_until("sends fail while redis is down", || {
        failures.load(Ordering::Relaxed) >= 8
    })
    .await;
    let before_restart = acknowledged.lock().len();
    let _server = OwnRedis::start(port, dir.path());
    wait_until("the engine recovers by itself", || {
        acknowledged.lock().len() >= before_restart + 300
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }

    let mut stored = HashSet::new();
    for r in 0..RECIPIENTS {
        let who = RecipientId::new(format!("r{r}")).unwrap();
        for record in storage
            .read_all(&who, Timestamp::now_system())
            .await
            .unwrap()
        {
            let payload = offline_queue::fuzz::decode_body(record.body, 64).unwrap();
            stored.insert(u64::from_be_bytes(payload[..].try_into().unwrap()));
        }
    }
    let acknowledged = acknowledged.lock();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|n| !stored.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged sends lost: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{} sends acknowledged, {} failed during the outage, none lost",
        acknowledged.len(),
        failures.load(Ordering::Relaxed)
    );
}

/// A Redis at its `maxmemory` (policy `noeviction`) refuses appends with a retryable error,
/// and still serves reads and acks, so sessions drain it; once drained, appends work again.
#[tokio::test]
async fn a_full_redis_refuses_appends_and_still_drains() {
    use offline_queue::storage::NewRecord;
    use offline_queue::{BatchLimit, MessageId, Quota, Storage};

    if !redis_server_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = OwnRedis::start_with(
        port,
        dir.path(),
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    );
    let storage = RedisStorage::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let record = || NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: None,
        body: vec![7; 16 * 1024],
    };
    let mut stored = 0u64;
    let refused = loop {
        match storage
            .append(&bob, vec![record()], &Quota::UNLIMITED, now)
            .await
        {
            Ok(_) => stored += 1,
            Err(error) => break error,
        }
        assert!(stored < 10_000, "4 MB never filled");
    };
    assert!(
        refused.is_retryable(),
        "a full Redis is retryable: {refused}"
    );
    assert!(stored > 0);

    let mut drained = 0u64;
    let mut after = None;
    loop {
        let batch = storage
            .read_for_delivery(&bob, None, after, BatchLimit::default(), now)
            .await
            .expect("a full Redis still reads")
            .batch;
        let Some(last) = batch.records.last() else {
            break;
        };
        drained += batch.records.len() as u64;
        after = Some(last.seq);
        storage
            .ack_through(&bob, last.seq, now)
            .await
            .expect("a full Redis still acks");
    }
    assert_eq!(drained, stored, "everything stored was delivered");
    storage
        .append(&bob, vec![record()], &Quota::UNLIMITED, now)
        .await
        .expect("drained, it takes appends again");
}
