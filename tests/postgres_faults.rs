//! PostgreSQL stopped and crashed mid-load: a test-owned server (Debian's binaries under
//! `/usr/lib/postgresql/*/bin`, the highest version there; its own directory and port;
//! `fsync` and `synchronous_commit` on) is restarted with `pg_ctl stop -m fast`, or killed
//! with SIGKILL (the postmaster and every backend at once) and started again on the same
//! files, which runs crash recovery, or one of its backends is killed with SIGKILL (the
//! postmaster then ends every session and recovers by itself), while four senders keep
//! sending with ids of their own.
//! Sends during the outage fail, retryably and within a bound; the same engine and pool
//! recover by themselves; then each recipient's session delivers every send that returned
//! `Ok` exactly once, with its body and receipt's seq, in order, and nothing that was never
//! sent. A send that failed may have been stored (its commit landed, its reply was lost):
//! that one may be delivered, once, and its retry with the same id is a duplicate.
//!
//! As root (initdb and postgres refuse root) the server runs as `postgres` through
//! `runuser`. Skipped, and says so, when the binaries are missing; fails instead when
//! `OFFLINE_QUEUE_REQUIRE_SERVERS=1`.

#![cfg(all(feature = "postgres", feature = "testing"))]

mod skip_support;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use offline_queue::{
    Delivery, Envelope, Error, MessageId, OfflineQueue, Outbound, PostgresStorage, RecipientId,
    SendReceipt, SessionEnd, channel_transport,
};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
const PATIENCE: Duration = Duration::from_secs(30);
/// Bounds one send: a send that takes longer hangs (the pool waits 5 s at most for a
/// connection, a connect takes 2 s at most).
const SEND_BOUND: Duration = Duration::from_secs(15);
const SENDERS: u64 = 4;
const RECIPIENTS: u64 = 3;
/// Sends that return `Ok` before the fault, and again after the server is back.
const PER_PHASE: u64 = 200;

/// Where the PostgreSQL binaries are, and whether they must run as `postgres`.
#[derive(Clone, Debug)]
struct Binaries {
    dir: PathBuf,
    as_postgres: bool,
}

impl Binaries {
    /// The highest version under `/usr/lib/postgresql` with `initdb`, `pg_ctl` and
    /// `postgres`, or `None` after saying the test is skipped (a failure when
    /// `OFFLINE_QUEUE_REQUIRE_SERVERS=1`).
    fn find() -> Option<Self> {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                ["initdb", "pg_ctl", "postgres"]
                    .iter()
                    .all(|program| bin.join(program).is_file())
                    .then_some((version, bin))
            })
            .collect();
        found.sort();
        let Some((_, dir)) = found.pop() else {
            return skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin");
        };
        let as_postgres = running_as_root();
        if as_postgres && Command::new("runuser").arg("--version").output().is_err() {
            return skip("running as root, and runuser (to run PostgreSQL as postgres) is missing");
        }
        Some(Self { dir, as_postgres })
    }

    /// `program` from the binaries' directory, through `runuser -u postgres --` as root.
    fn command(&self, program: &str) -> Command {
        let path = self.dir.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }
}

fn skip<T>(why: &str) -> Option<T> {
    if std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
        panic!("{why}, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires a server");
    }
    skip_support::record(why);
    None
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether process `pid` has exited (gone, or a zombie no one reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

fn signal(name: &str, pids: &[u32]) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{name} {pids:?}: {status}"
        )))
    }
}

/// A PostgreSQL server of the test's own: its directory (data, socket and log) goes when it
/// drops, and its processes before that.
struct OwnPostgres {
    binaries: Binaries,
    root: tempfile::TempDir,
    port: u16,
    /// The process started: the postmaster, or `runuser` waiting on it.
    server: Option<Child>,
}

impl OwnPostgres {
    /// A new cluster (trust authentication, superuser `postgres`), started.
    async fn start(binaries: Binaries) -> Self {
        let root = tempfile::Builder::new()
            .prefix("oq-pg-faults-")
            .tempdir_in("/tmp")
            .unwrap();
        if binaries.as_postgres {
            // The directory is 0700; postgres must own it to create the cluster and socket.
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(root.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown to postgres: {status}");
        }
        let data = root.path().join("data");
        let initdb = binaries
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let mut this = Self {
            binaries,
            root,
            port: free_port(),
            server: None,
        };
        this.launch().await;
        this
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server on its data directory (after a crash, recovery runs first) and waits
    /// until it answers a query.
    async fn launch(&mut self) {
        assert!(self.server.is_none(), "already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = self
            .binaries
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.root.path())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.server = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                self.server = None;
                panic!("postgres exited ({status}):\n{}", self.log_text());
            }
            if answers(&self.url()).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not answer:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn postmaster(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `pg_ctl stop -m fast`: sessions are ended (SQLSTATE 57P01), the server checkpoints
    /// and exits.
    fn stop_fast(&mut self) {
        let stop = self
            .binaries
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30"])
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl runs");
        assert!(
            stop.status.success(),
            "pg_ctl stop failed: {}\n{}",
            String::from_utf8_lossy(&stop.stderr),
            self.log_text()
        );
        self.reap().unwrap();
    }

    /// SIGKILL to the postmaster and all its children at once, as a crash would: stopped
    /// first so it starts no child in between. The files stay as they were.
    fn crash(&mut self) -> std::io::Result<()> {
        let Some(postmaster) = self.postmaster() else {
            return self.reap();
        };
        signal("STOP", &[postmaster])?;
        let children =
            std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))?;
        let mut pids: Vec<u32> = children
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect();
        pids.push(postmaster);
        signal("KILL", &pids)?;
        let deadline = Instant::now() + PATIENCE;
        while !pids.iter().all(|&pid| exited(pid)) {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("{pids:?} outlived SIGKILL")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.reap()
    }

    /// SIGKILL to one client backend busy with a query, as the OOM killer would: the
    /// postmaster ends every other session (SQLSTATE 57P02), recovers and reopens by itself.
    fn kill_a_backend(&self) {
        let postmaster = self.postmaster().expect("the server runs");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
                    .unwrap();
            // A client backend's title: "postgres: USER DATABASE HOST(PORT) STATE".
            let busy = children
                .split_whitespace()
                .filter_map(|pid| pid.parse::<u32>().ok())
                .find(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|title| {
                        let title = String::from_utf8_lossy(&title);
                        title.contains("127.0.0.1(") && !title.contains(" idle")
                    })
                });
            if let Some(pid) = busy {
                signal("KILL", &[pid]).unwrap();
                return;
            }
            assert!(Instant::now() < deadline, "no backend ever busy");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the process started to exit (`runuser` exits with the postmaster).
    fn reap(&mut self) -> std::io::Result<()> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + PATIENCE;
        let mut polls = 0u32;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(std::io::Error::other("the server process did not exit"));
            }
            // `runuser` stops itself when its child stops (as `crash` stops the postmaster)
            // and waits for a SIGCONT before it reaps it.
            if self.binaries.as_postgres && polls.is_multiple_of(10) {
                let _ = signal("CONT", &[child.id()]);
            }
            polls += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if self.server.is_some()
            && let Err(error) = self.crash()
        {
            eprintln!("stopping the test's postgres: {error}");
        }
    }
}

/// Whether the server at `url` takes a connection and answers a query (while it starts or
/// recovers it refuses with 57P03).
async fn answers(url: &str) -> bool {
    let Ok(Ok((client, connection))) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    else {
        return false;
    };
    let connection = tokio::spawn(connection);
    let answered = tokio::time::timeout(Duration::from_secs(2), client.simple_query("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok());
    drop(client);
    let _ = connection.await;
    answered
}

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

/// The sender and number in an id made by [`message`].
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

/// What the senders did.
#[derive(Default)]
struct Ledger {
    /// Every message a sender tried: its recipient and body.
    attempted: HashMap<MessageId, (u64, Vec<u8>)>,
    /// Those a send returned `Ok` for, with the receipt.
    acknowledged: HashMap<MessageId, SendReceipt>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    duplicates: AtomicU64,
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
                    Ok(receipt) => {
                        if receipt.duplicate {
                            counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        ledger.lock().acknowledged.insert(id, receipt);
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(error) => {
                        assert!(
                            matches!(
                                error,
                                Error::Storage {
                                    retryable: true,
                                    ..
                                }
                            ),
                            "sender {s}: an outage is a retryable storage error: {error:?}"
                        );
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        if counters.stop.load(Ordering::Relaxed) {
                            break 'messages;
                        }
                        // A client's backoff; the test waits on counts, not on this.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            k += 1;
        }
    })
}

/// Waits until `condition` holds, failing after [`PATIENCE`] or as soon as a sender ended
/// early (its panic is the failure).
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

/// Connects `who` and takes everything stored for them, acking each batch as it comes, until
/// the session says it caught up; then closes it.
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
        .expect("the session runs on the recovered server");
    assert_eq!(end, SessionEnd::Closed);
    delivered
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `pg_ctl stop -m fast`, then start.
    Restart,
    /// SIGKILL to every server process, then start (crash recovery).
    Crash,
    /// SIGKILL to one backend: the postmaster restarts the rest itself (crash recovery).
    BackendKilled,
}

async fn under_load(fault: Fault) {
    let Some(binaries) = Binaries::find() else {
        return;
    };
    let started = Instant::now();
    let mut server = OwnPostgres::start(binaries).await;
    let storage = PostgresStorage::options()
        .pool_size(8)
        .connect_timeout(Duration::from_secs(2))
        .wait_timeout(Duration::from_secs(5))
        .connect(&server.url())
        .await
        .expect("the test's postgres answers");
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage))
        .build()
        .unwrap();
    assert!(
        queue.storage_is_durable(),
        "fsync and synchronous_commit are on"
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
    // The senders go on on the other worker while this one waits for the fault's commands.
    let down = tokio::task::block_in_place(|| match fault {
        Fault::Restart => {
            server.stop_fast();
            true
        }
        Fault::Crash => {
            server.crash().expect("the server is killed");
            true
        }
        Fault::BackendKilled => {
            server.kill_a_backend();
            false
        }
    });
    // Down, the server fails every send; recovering by itself, it ends every session and
    // refuses connections for a moment.
    let failures = if down { SENDERS } else { 1 };
    wait_until("sends fail during the outage", &mut senders, || {
        failed() >= failed_before + failures
    })
    .await;
    let ok_while_down = ok();
    if down {
        server.launch().await;
    }
    wait_until(
        "the same engine and pool recover by themselves",
        &mut senders,
        || ok() >= ok_while_down + PER_PHASE,
    )
    .await;
    counters.stop.store(true, Ordering::Relaxed);
    for sender in senders {
        tokio::time::timeout(PATIENCE, sender)
            .await
            .expect("senders stop")
            .expect("a sender failed");
    }

    if let Fault::BackendKilled = fault {
        let log = server.log_text();
        assert!(
            log.contains("terminated by signal 9") && log.contains("reinitializing"),
            "the postmaster recovered from its backend's crash:\n{log}"
        );
    }
    let ledger = std::mem::take(&mut *ledger.lock());
    let mut delivered_ids = HashSet::new();
    let mut unacknowledged_delivered = 0;
    for r in 0..RECIPIENTS {
        let who = recipient(r);
        let delivered = drain(&queue, &who).await;
        let mut last_seq = None;
        let mut last_of_sender: HashMap<u64, u64> = HashMap::new();
        for delivery in &delivered {
            assert!(
                delivered_ids.insert(delivery.id),
                "{who}: {:?} delivered twice",
                delivery.id
            );
            assert!(!delivery.redelivered, "{who}: delivered once, {delivery:?}");
            assert!(
                Some(delivery.seq) > last_seq,
                "{who}: seqs out of order at {delivery:?}"
            );
            last_seq = Some(delivery.seq);
            let Some((to, body)) = ledger.attempted.get(&delivery.id) else {
                panic!("{who}: {:?} was never sent", delivery.id);
            };
            assert_eq!(*to, r, "{who}: {:?} is someone else's", delivery.id);
            assert_eq!(
                &delivery.payload[..],
                &body[..],
                "{who}: the body sent with {:?}",
                delivery.id
            );
            // One sender sends one message at a time: its messages are stored, and so
            // delivered, in the order it sent them.
            let (s, k) = origin(delivery.id);
            if let Some(previous) = last_of_sender.insert(s, k) {
                assert!(
                    previous < k,
                    "{who}: sender {s}'s {k} came after its {previous}"
                );
            }
            match ledger.acknowledged.get(&delivery.id) {
                Some(receipt) => assert_eq!(
                    receipt.seq, delivery.seq,
                    "{who}: {:?} delivered at the seq its send returned",
                    delivery.id
                ),
                // Stored by a send whose reply was lost, and never retried (the senders
                // stopped first).
                None => unacknowledged_delivered += 1,
            }
        }
        let stats = queue.stats(&who).await.expect("stats after recovery");
        assert_eq!(stats.messages, 0, "{who}: all acked");
    }
    let lost: Vec<(u64, u64)> = ledger
        .acknowledged
        .keys()
        .filter(|id| !delivered_ids.contains(*id))
        .map(|&id| origin(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{fault:?}: {} sends that returned Ok were lost (sender, number): {lost:?}",
        lost.len()
    );
    eprintln!(
        "{fault:?}: {} sends returned Ok ({} of them duplicates of a send that failed after \
         storing), {} failed during the outage, {} stored by a failed send and never retried; \
         none lost, none twice; {:.1?}",
        ledger.acknowledged.len(),
        counters.duplicates.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        unacknowledged_delivered,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_restart_mid_load_loses_no_acknowledged_send() {
    under_load(Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_mid_load_loses_no_acknowledged_send() {
    under_load(Fault::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_load_loses_no_acknowledged_send() {
    under_load(Fault::BackendKilled).await;
}
