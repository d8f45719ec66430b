//! Deterministic fault simulation: one seed decides a whole run. The real engine, with many
//! recipients, is driven through random interleavings of sends (some with sender ids), connects
//! and displacements, acks (partial, reordered, duplicated, missing), disconnects mid-batch,
//! dropped session futures, clock jumps forward and back, and maintenance, while wrappers
//! inject faults: a storage that is slow, fails before or *after* its write took effect (the
//! ambiguous case), or goes down for a while; a transport that is slow, dies silently,
//! duplicates batches, or fails; a notifier that fails. ("Slow" here means the call yields, so
//! every other ready task runs in between: it reorders, which is what delay does to
//! correctness.) A notifier cannot hang a send: `Notifier::notify` is not `async`.
//!
//! Every 25th seed runs on `RedbStorage` with process restarts, and with the `testing`
//! feature on a simulated disk (`power_cut_disk`) whose power goes before each restart, and
//! sometimes mid-write: the restarted storage finds what was synced and a random part of what
//! was not (without the feature, the engine and storage are dropped and the file reopened).
//! When `OFFLINE_QUEUE_POSTGRES_URL` is set (feature `postgres`), every 50th runs on
//! `PostgresStorage` with restarts (the engine and the storage dropped and connected again to
//! the same schema), and likewise every 50th on `RedisStorage` when `OFFLINE_QUEUE_REDIS_URL`
//! is set (feature `redis`), and every 50th on `NatsStorage` or, in turn, `OwnedNatsStorage`
//! (streams of its own, connected again at each restart: a new owner taking the queues over)
//! when `OFFLINE_QUEUE_NATS_URL` is (feature `nats`), among the seeds
//! that do not remove idle queues (JetStream removes them by its own clock). Every 50th of
//! those also runs on `AmqpStorage` when `OFFLINE_QUEUE_AMQP_URL` is set (feature `amqp`):
//! classic queues under a prefix of the seed's own, in a virtual host of the run's own; at
//! each restart the old storage is closed, handing back what it held. Those seeds take turns
//! between classic and quorum queues (`SIM_AMQP=classic` or `SIM_AMQP=quorum` runs them all
//! on one type). A backend without
//! dedup gets no sender retries of an id, and one without loss counts gets `Reject` overflow
//! and no gap-count check (its capabilities say it reports no gaps). A quarter of the
//! seeds remove idle queues: at the end of the run, a queue touched within the timeout keeps
//! its message and one idle past it is removed, message and all.
//!
//! At the end of every run the contract is checked: no `Ok` send lost unless it expired or was
//! dropped by the overflow policy (and then reported as a gap); nothing delivered after expiry;
//! per-session order; redeliveries marked; nothing delivered that was never sent to that
//! recipient; the engine's memory back to its baseline once all sessions are gone.
//!
//! `SIM_SEEDS=N` runs N seeds (default 2,000); a failure prints its seed and a command that
//! replays just that run: `SIM_SEED=<seed> cargo test --test simulation -- --nocapture`.

#[cfg(feature = "amqp")]
mod amqp_support;
mod common;
#[cfg(feature = "nats")]
mod nats_support;
#[cfg(feature = "postgres")]
mod postgres_support;
#[cfg(feature = "testing")]
mod power_cut_disk;
#[cfg(feature = "redis")]
mod redis_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::channel::oneshot;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use offline_queue::storage::{
    Ack, AppendOneOutcome, AppendOutcome, Capabilities, DeliveryRead, NewRecord, PurgeOutcome,
    ReadBatch, RecipientStats,
};
use offline_queue::{
    Batch, BatchLimit, Clock, Envelope, Error, Limits, ManualClock, MemoryStorage, MessageId,
    Notifier, NotifyError, Nudge, OfflineQueue, Outbound, Overflow, Quota, RecipientId, Seq,
    SessionEnd, SessionHandle, Storage, Timestamp, Transport, TransportClosed, Urgency,
};
use parking_lot::Mutex;

const RECIPIENTS: usize = 4;
const STEPS: usize = 160;
const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// How faulty this run's world is.
#[derive(Clone, Copy, Debug)]
struct Faults {
    storage_fail: u64,
    storage_fail_after: u64,
    transport_lose: u64,
    transport_dup: u64,
    transport_fail: u64,
    notifier_fail: u64,
    delay: u64,
}

/// A storage that fails: before the call (nothing happened), after it (it happened, the caller
/// is told it did not), or for a stretch of calls (the server is down).
struct FaultyStorage {
    inner: Arc<dyn Storage>,
    rng: Arc<Mutex<Rng>>,
    faults: Arc<Mutex<Option<Faults>>>,
    down_for: Mutex<u32>,
    /// Reads with an ack that reached the backend's own `read_for_delivery`: the proof that
    /// its fused path runs under faults.
    acked_reads: Arc<AtomicU64>,
    /// What the backend confirmed removed by acks, per recipient.
    acked: AckedByStorage,
}

/// Per recipient: the highest cumulative ack and the selective and passed-over seqs the
/// backend applied (its call returned `Ok`, whatever the wrapper then reported).
type AckedByStorage = Arc<Mutex<HashMap<RecipientId, (Option<Seq>, HashSet<Seq>)>>>;

impl FaultyStorage {
    /// Notes an ack the backend applied.
    fn applied(&self, r: &RecipientId, ack: &Ack) {
        let mut acked = self.acked.lock();
        let (through, seqs) = acked.entry(r.clone()).or_default();
        *through = (*through).max(ack.through);
        seqs.extend(ack.seqs.iter().chain(&ack.passed_over).copied());
    }
}

enum Fate {
    Pass,
    FailBefore,
    FailAfter,
}

impl FaultyStorage {
    fn delayed(&self) -> bool {
        let Some(faults) = *self.faults.lock() else {
            return false;
        };
        self.rng.lock().chance(faults.delay)
    }

    fn fate(&self, may_fail_after: bool) -> Fate {
        let Some(faults) = *self.faults.lock() else {
            return Fate::Pass;
        };
        let mut down = self.down_for.lock();
        if *down > 0 {
            *down -= 1;
            return Fate::FailBefore;
        }
        let mut rng = self.rng.lock();
        if rng.chance(faults.storage_fail) {
            if rng.chance(10) {
                *down = 1 + rng.below(8) as u32;
            }
            return Fate::FailBefore;
        }
        if may_fail_after && rng.chance(faults.storage_fail_after) {
            return Fate::FailAfter;
        }
        Fate::Pass
    }
}

fn injected() -> Error {
    Error::storage_msg(offline_queue::Retry::Yes, "injected fault")
}

/// Suspends once, so every other ready task (other sessions, other clients) runs first: a
/// slow storage call or a slow network, as far as interleavings go.
async fn delay() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

macro_rules! faulty {
    ($self:ident, $may_fail_after:expr, $call:expr) => {{
        if $self.delayed() {
            delay().await;
        }
        match $self.fate($may_fail_after) {
            Fate::FailBefore => Err(injected()),
            Fate::Pass => $call,
            Fate::FailAfter => $call.and(Err(injected())),
        }
    }};
}

#[async_trait]
impl Storage for FaultyStorage {
    fn capabilities(&self) -> Capabilities {
        // Its appends may wait (a delay) before they reach the inner storage.
        self.inner.capabilities().with_appends_in_poll_order(false)
    }
    async fn append(
        &self,
        r: &RecipientId,
        records: Vec<NewRecord>,
        q: &Quota,
        now: Timestamp,
    ) -> offline_queue::Result<AppendOutcome> {
        faulty!(
            self,
            true,
            common::wait(self.inner.append(r, records.clone(), q, now))
        )
    }
    async fn append_one(
        &self,
        r: &RecipientId,
        record: NewRecord,
        q: &Quota,
        now: Timestamp,
    ) -> offline_queue::Result<AppendOneOutcome> {
        faulty!(
            self,
            true,
            common::wait(self.inner.append_one(r, record.clone(), q, now))
        )
    }
    async fn read(
        &self,
        r: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> offline_queue::Result<ReadBatch> {
        let out = faulty!(
            self,
            false,
            common::wait(self.inner.read(r, after, limit, now))
        );
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!(
                "  read after {after:?} -> {:?}",
                out.as_ref().map(|b| (
                    b.records.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
                    &b.expired,
                    b.lost_unconfirmed,
                    b.lost_total
                ))
            );
        }
        out
    }
    async fn mark_delivered(&self, r: &RecipientId, seqs: &[Seq]) -> offline_queue::Result<()> {
        faulty!(self, true, common::wait(self.inner.mark_delivered(r, seqs)))
    }
    async fn read_for_delivery(
        &self,
        r: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> offline_queue::Result<DeliveryRead> {
        faulty!(self, true, {
            if ack.is_some() {
                self.acked_reads.fetch_add(1, Ordering::Relaxed);
            }
            let out = common::wait(self.inner.read_for_delivery(r, ack, after, limit, now));
            if let (Ok(_), Some(ack)) = (&out, ack) {
                self.applied(r, ack);
            }
            out
        })
    }
    async fn ack(&self, r: &RecipientId, ack: &Ack, now: Timestamp) -> offline_queue::Result<u64> {
        let out = faulty!(self, true, {
            let out = common::wait(self.inner.ack(r, ack, now));
            if out.is_ok() {
                self.applied(r, ack);
            }
            out
        });
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("  {r} ack {ack:?} -> {out:?}");
        }
        out
    }
    async fn purge(
        &self,
        now: Timestamp,
        idle: Option<Timestamp>,
        budget: usize,
    ) -> offline_queue::Result<PurgeOutcome> {
        let out = faulty!(
            self,
            true,
            common::wait(self.inner.purge(now, idle, budget))
        );
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!(
                "  purge at {} -> {out:?}",
                now.as_millis() as i64 - T0.as_millis() as i64
            );
        }
        out
    }
    async fn stats(&self, r: &RecipientId) -> offline_queue::Result<RecipientStats> {
        faulty!(self, false, common::wait(self.inner.stats(r)))
    }
    async fn remove_recipient(&self, r: &RecipientId) -> offline_queue::Result<u64> {
        common::wait(self.inner.remove_recipient(r))
    }
}

/// What a client's connection carried: each hand-over, and whether it was a wire duplicate.
type Wire = Arc<Mutex<Vec<(Outbound, bool)>>>;

/// A transport whose connection dies silently (from some batch on the client sees nothing,
/// while the engine thinks it handed everything over: one connection loses a suffix, never a
/// batch in the middle, as TCP and WebSocket do), duplicates batches, or fails loudly.
struct LossyTransport {
    wire: Wire,
    rng: Arc<Mutex<Rng>>,
    faults: Arc<Mutex<Option<Faults>>>,
    silently_dead: Mutex<bool>,
}

#[async_trait]
impl Transport for LossyTransport {
    async fn send(&self, item: Outbound) -> Result<(), TransportClosed> {
        let faults = *self.faults.lock();
        if faults.is_some_and(|f| self.rng.lock().chance(f.delay)) {
            delay().await;
        }
        if let Some(faults) = faults {
            let mut rng = self.rng.lock();
            if rng.chance(faults.transport_fail) {
                return Err(TransportClosed("injected: connection reset".into()));
            }
            let mut dead = self.silently_dead.lock();
            *dead |= rng.chance(faults.transport_lose);
            if *dead {
                return Ok(());
            }
            if rng.chance(faults.transport_dup) {
                self.wire.lock().push((item.clone(), true));
            }
        }
        self.wire.lock().push((item, false));
        Ok(())
    }
}

struct FlakyNotifier {
    rng: Arc<Mutex<Rng>>,
    faults: Arc<Mutex<Option<Faults>>>,
}

impl Notifier for FlakyNotifier {
    fn notify(&self, _nudge: Nudge) -> Result<(), NotifyError> {
        match *self.faults.lock() {
            Some(faults) if self.rng.lock().chance(faults.notifier_fail) => {
                Err(NotifyError("injected".into()))
            }
            _ => Ok(()),
        }
    }
}

/// What the test knows of one message it sent.
#[derive(Debug)]
struct Sent {
    recipient: usize,
    sent_at: Timestamp,
    expires_at: Option<Timestamp>,
    /// `send` returned `Ok` and not as a duplicate: must not be lost.
    acknowledged: bool,
    /// Every attempt's payload and deadline: any of them may be the one stored.
    attempts: Vec<(Vec<u8>, Option<Timestamp>)>,
    /// The payload and deadline of the attempt that returned `Ok` and not as a duplicate:
    /// exactly what is stored.
    stored: Option<(Vec<u8>, Option<Timestamp>)>,
}

struct Client {
    wire: Wire,
    handle: SessionHandle,
    end: oneshot::Receiver<offline_queue::Result<SessionEnd>>,
    last_seq: Option<Seq>,
    /// (seq, id) received in this session and not acked yet.
    unacked: Vec<(Seq, MessageId)>,
    /// Distinct seqs received in this session (a wire duplicate is not a new hand-over).
    seen: HashSet<Seq>,
    /// The highest batch position received: acking through it also confirms gap-only batches.
    position: Option<Seq>,
    acked_position: Option<Seq>,
    /// What the storage had confirmed acked when this session began: never delivered in it.
    acked_before: (Option<Seq>, HashSet<Seq>),
}

impl Client {
    /// What a cumulative ack of everything received so far names, if anything is new.
    fn ack_all(&mut self) -> Option<Seq> {
        let highest = self
            .unacked
            .iter()
            .map(|(s, _)| *s)
            .max()
            .max(self.position)?;
        if self.unacked.is_empty() && self.acked_position >= Some(highest) {
            return None;
        }
        self.unacked.clear();
        self.acked_position = Some(highest);
        Some(highest)
    }
}

struct World {
    seed: u64,
    rng: Rng,
    clock: ManualClock,
    high_water: Timestamp,
    faults: Arc<Mutex<Option<Faults>>>,
    fault_rng: Arc<Mutex<Rng>>,
    pool: LocalPool,
    queue: OfflineQueue,
    redb: Option<RedbHome>,
    /// The PostgreSQL URL and this run's schema, on a PostgreSQL seed.
    postgres: Option<(String, String)>,
    /// The Redis URL and this run's key prefix, on a Redis seed.
    redis: Option<(String, String)>,
    /// The NATS URL and this run's stream name, on a NATS seed.
    nats: Option<(String, String)>,
    /// The RabbitMQ URL (a virtual host) and this run's queue prefix, on a RabbitMQ seed.
    amqp: Option<(String, String)>,
    /// The open `AmqpStorage`, closed at a restart so what it held is readable at once.
    #[cfg(feature = "amqp")]
    amqp_open: Option<Arc<offline_queue::AmqpStorage>>,
    /// What the storage claims (no dedup: no sender retries; no loss counts: no gap check).
    claims: Capabilities,
    acked_reads: Arc<AtomicU64>,
    acked: AckedByStorage,
    /// Deliveries after which a message goes to the dead-letter hook (most seeds: never).
    max_deliveries: u32,
    /// What the dead-letter hook received: (recipient, id).
    dead_letters: Arc<Mutex<Vec<(RecipientId, MessageId)>>>,
    overflow: Overflow,
    limits: Limits,
    clients: HashMap<usize, Client>,
    sent: BTreeMap<MessageId, Sent>,
    /// Per recipient: ids received at least once, in any session.
    received: Vec<HashSet<MessageId>>,
    gaps: Vec<u64>,
    next_payload: u64,
}

/// A redb seed's database: with the `testing` feature, on a simulated disk whose power a
/// restart cuts (and a step may cut mid-write); without it, in a file a restart reopens.
struct RedbHome {
    #[cfg(feature = "testing")]
    disk: power_cut_disk::Disk,
    #[cfg(not(feature = "testing"))]
    file: (tempfile::TempDir, std::path::PathBuf),
}

#[cfg(feature = "testing")]
impl RedbHome {
    fn new() -> Self {
        RedbHome {
            disk: power_cut_disk::Disk::default(),
        }
    }

    fn open(&self, seed: u64) -> Arc<dyn Storage> {
        let name = format!("simulated disk, seed {seed}");
        Arc::new(
            offline_queue::RedbStorage::options()
                .open_backend(name, self.disk.clone())
                .unwrap_or_else(|e| panic!("seed {seed}: the disk does not open: {e}")),
        )
    }

    fn can_arm(&self) -> bool {
        !self.cut_coming()
    }

    /// Armed, or already off: the process must restart before the final drain.
    fn cut_coming(&self) -> bool {
        self.disk.is_armed() || self.power_is_off()
    }

    fn arm(&self, writes: u64) {
        self.disk.arm(writes);
    }

    fn power_is_off(&self) -> bool {
        self.disk.is_off()
    }

    /// The power goes (if an armed write has not taken it already): the next open finds the
    /// synced bytes and each page written since kept or lost at random.
    fn power_cut(&mut self, rng: &mut Rng) {
        if self.power_is_off() {
            POWER_CUTS_MID_WRITE.fetch_add(1, Ordering::Relaxed);
        }
        let (image, _, lost) = self.disk.cut(|| rng.chance(50));
        PAGES_LOST.fetch_add(lost as u64, Ordering::Relaxed);
        self.disk = power_cut_disk::Disk::from_image(image);
    }
}

#[cfg(not(feature = "testing"))]
impl RedbHome {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.redb");
        RedbHome { file: (dir, path) }
    }

    fn open(&self, seed: u64) -> Arc<dyn Storage> {
        Arc::new(
            offline_queue::RedbStorage::open(&self.file.1)
                .unwrap_or_else(|e| panic!("seed {seed}: the file does not open: {e}")),
        )
    }

    fn can_arm(&self) -> bool {
        false
    }

    fn cut_coming(&self) -> bool {
        false
    }

    fn arm(&self, _writes: u64) {}

    fn power_is_off(&self) -> bool {
        false
    }

    fn power_cut(&mut self, _rng: &mut Rng) {}
}

/// Power cuts that came at an armed write (mid-commit, perhaps), and pages written but not
/// synced that a cut lost, over the whole run: the summary shows that both happened.
static POWER_CUTS_MID_WRITE: AtomicU64 = AtomicU64::new(0);
static PAGES_LOST: AtomicU64 = AtomicU64::new(0);

fn who(r: usize) -> RecipientId {
    // Look-alike ids, so isolation is tested too.
    RecipientId::new(["a", "a:", "{a}", "a\0"][r]).unwrap()
}

impl World {
    fn new(
        seed: u64,
        on_redb: bool,
        postgres: Option<(String, String)>,
        redis: Option<(String, String)>,
        nats: Option<(String, String)>,
        amqp: Option<(String, String)>,
    ) -> Self {
        let mut rng = Rng(seed);
        let faults = Faults {
            storage_fail: rng.below(8),
            storage_fail_after: rng.below(6),
            transport_lose: rng.below(6),
            transport_dup: rng.below(6),
            transport_fail: rng.below(6),
            notifier_fail: rng.below(50),
            delay: rng.below(40),
        };
        let overflow = if rng.chance(30) {
            Overflow::DropOldest
        } else {
            Overflow::Reject
        };
        let limits = Limits {
            max_messages_per_recipient: 4 + rng.below(30),
            overflow,
            default_ttl: Some(Duration::from_secs(60 + rng.below(3600))),
            dedup_window: Duration::from_secs(30 + rng.below(600)),
            // A quarter of the seeds remove idle queues, after 30 days: never within the run
            // (its clock moves hours at most), then on purpose at its end (`idle_phase`).
            idle_recipient_timeout: removes_idle(seed).then(|| Duration::from_secs(30 * 24 * 3600)),
            ..Limits::default()
        };
        // One seed in four gives up on a message after a few unacked deliveries.
        let max_deliveries = if rng.chance(25) {
            2 + rng.below(4) as u32
        } else {
            u32::MAX
        };
        let redb = on_redb.then(RedbHome::new);
        let clock = ManualClock::new(T0);
        let faults = Arc::new(Mutex::new(Some(faults)));
        let fault_rng = Arc::new(Mutex::new(Rng(seed ^ 0x5eed)));
        let mut world = Self {
            seed,
            queue: OfflineQueue::builder().build().unwrap(),
            rng,
            clock,
            high_water: T0,
            faults,
            fault_rng,
            pool: LocalPool::new(),
            redb,
            postgres,
            redis,
            nats,
            amqp,
            #[cfg(feature = "amqp")]
            amqp_open: None,
            claims: Capabilities::default(),
            acked_reads: Arc::default(),
            acked: Arc::default(),
            max_deliveries,
            dead_letters: Arc::default(),
            overflow,
            limits,
            clients: HashMap::new(),
            sent: BTreeMap::new(),
            received: vec![HashSet::new(); RECIPIENTS],
            gaps: vec![0; RECIPIENTS],
            next_payload: 0,
        };
        world.queue = world.build_queue(None);
        if !world.claims.loss_counts && world.overflow == Overflow::DropOldest {
            // What the medium drops would go unreported: fill up with Reject instead.
            world.overflow = Overflow::Reject;
            world.limits.overflow = Overflow::Reject;
            world.queue = world.build_queue(None);
        }
        world
    }

    fn build_queue(&mut self, memory: Option<Arc<dyn Storage>>) -> OfflineQueue {
        let inner: Arc<dyn Storage> = match (&self.redb, memory) {
            (Some(home), _) => home.open(self.seed),
            #[cfg(feature = "postgres")]
            (None, _) if let Some((url, schema)) = &self.postgres => {
                Arc::new(common::wait(postgres_support::fresh(url, schema)))
            }
            #[cfg(feature = "redis")]
            (None, _) if let Some((url, prefix)) = &self.redis => {
                let target = redis_support::Target::Single(url.clone());
                Arc::new(common::wait(redis_support::fresh(&target, prefix)))
            }
            // Every other NATS seed on the single-owner layout: each restart is a new node,
            // which takes the queues over from the one dropped.
            #[cfg(feature = "nats")]
            (None, _)
                if let Some((url, name)) = &self.nats
                    && owned_nats(self.seed) =>
            {
                Arc::new(common::wait(nats_support::connect_owned(url, name)))
            }
            #[cfg(feature = "nats")]
            (None, _) if let Some((url, name)) = &self.nats => {
                Arc::new(common::wait(nats_support::connect(url, name)))
            }
            #[cfg(feature = "amqp")]
            (None, _) if let Some((url, prefix)) = &self.amqp => {
                let storage = offline_queue::AmqpStorage::options()
                    .prefix(prefix.as_str())
                    .queue_type(amqp_queue_type(self.seed))
                    .connect(url);
                let storage = Arc::new(common::wait(storage).expect("connect to RabbitMQ"));
                self.amqp_open = Some(storage.clone());
                storage
            }
            (None, Some(memory)) => memory,
            (None, None) => Arc::new(MemoryStorage::with_shards(1 + self.rng.below(4) as usize)),
        };
        self.claims = inner.capabilities();
        let storage = FaultyStorage {
            inner,
            rng: self.fault_rng.clone(),
            faults: self.faults.clone(),
            down_for: Mutex::new(0),
            acked_reads: self.acked_reads.clone(),
            acked: self.acked.clone(),
        };
        OfflineQueue::builder()
            .storage(Arc::new(storage))
            .clock(Arc::new(self.clock.clone()))
            .notifier(Arc::new(FlakyNotifier {
                rng: self.fault_rng.clone(),
                faults: self.faults.clone(),
            }))
            .limits(self.limits.clone())
            .batch(BatchLimit {
                max_messages: 1 + self.rng.below(6) as usize,
                max_bytes: 1 << 20,
            })
            .max_in_flight(1 + self.rng.below(12) as usize)
            .max_deliveries(self.max_deliveries)
            .on_dead_letter({
                let dead_letters = self.dead_letters.clone();
                move |recipient, delivery| {
                    dead_letters.lock().push((recipient.clone(), delivery.id));
                }
            })
            .build()
            .unwrap()
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "seed {}: {what}\nreplay: SIM_SEED={} cargo test --test simulation -- --nocapture",
            self.seed, self.seed
        )
    }

    fn send(&mut self) {
        let r = self.rng.below(RECIPIENTS as u64) as usize;
        self.next_payload += 1;
        let mut payload = vec![r as u8];
        payload.extend_from_slice(&self.next_payload.to_be_bytes());
        let mut envelope =
            Envelope::new(who(r), payload.clone()).with_urgency(match self.rng.below(3) {
                0 => Urgency::Urgent,
                1 => Urgency::Background,
                _ => Urgency::Silent,
            });
        if self.rng.chance(40) {
            envelope = envelope.with_ttl(Duration::from_secs(1 + self.rng.below(300)));
        }
        // Sometimes a sender retry of an earlier id to the same recipient, well within the
        // dedup window (idempotent send); else a fresh id.
        let now = self.clock.now();
        let window = self.limits.dedup_window / 2;
        // Measured from the furthest the clock has been: an entry the storage pruned then is
        // gone, even if the clock stepped back since.
        let high_water = self.high_water;
        let retries: Vec<MessageId> = self
            .sent
            .iter()
            .filter(|(_, s)| {
                s.recipient == r
                    && now >= s.sent_at
                    && high_water.duration_since(s.sent_at) < window
            })
            .map(|(id, _)| *id)
            .collect();
        let id = if self.rng.chance(15) && !retries.is_empty() && self.claims.dedup {
            retries[self.rng.below(retries.len() as u64) as usize]
        } else {
            MessageId::from_bytes(self.rng.next().to_be_bytes().repeat(2).try_into().unwrap())
        };
        envelope = envelope.with_id(id);
        let ttl = envelope.ttl.or(self.limits.default_ttl);
        let queue = self.queue.clone();
        let result = self.pool.run_until(queue.send(envelope));
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!(
                "t={} r{r} send {id} ttl={ttl:?} -> {:?}",
                now.as_millis() as i64 - T0.as_millis() as i64,
                result.as_ref().map(|x| (x.seq, x.duplicate, x.dropped))
            );
        }
        let deadline = ttl.map(|t| now.saturating_add(t));
        let entry = self.sent.entry(id).or_insert(Sent {
            recipient: r,
            sent_at: now,
            expires_at: deadline,
            acknowledged: false,
            attempts: Vec::new(),
            stored: None,
        });
        entry.attempts.push((payload.clone(), deadline));
        // Until an attempt is known to have stored it, any failed attempt may be the one that
        // did (a failure reported after the write): keep the earliest deadline among them.
        if !entry.acknowledged {
            entry.expires_at = match (entry.expires_at, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        match result {
            Ok(receipt) if !receipt.duplicate => {
                entry.acknowledged = true;
                entry.stored = Some((payload, deadline));
                entry.expires_at = ttl.map(|t| now.saturating_add(t));
            }
            // Already stored by an earlier attempt (perhaps one that reported a failure after
            // its write): the sender was told Ok, so it must not be lost either.
            Ok(_) => entry.acknowledged = true,
            Err(Error::QueueFull { .. }) if self.overflow == Overflow::Reject => {}
            Err(error) if error.is_retryable() => {}
            // After a power cut the storage fails every write until the process restarts.
            Err(Error::Storage { .. })
                if self.redb.as_ref().is_some_and(RedbHome::power_is_off) => {}
            Err(error) => self.fail(format!("send failed with a non-retryable error: {error}")),
        }
    }

    fn connect(&mut self, r: usize) {
        let wire: Wire = Arc::default();
        let transport = LossyTransport {
            wire: wire.clone(),
            rng: self.fault_rng.clone(),
            faults: self.faults.clone(),
            silently_dead: Mutex::new(false),
        };
        let acked_before = self.acked.lock().get(&who(r)).cloned().unwrap_or_default();
        let session = self.queue.connect(who(r), transport);
        let handle = session.handle();
        let (tx, end) = oneshot::channel();
        self.pool
            .spawner()
            .spawn_local(async move {
                let _ = tx.send(session.run().await);
            })
            .unwrap();
        let client = Client {
            wire,
            handle,
            end,
            last_seq: None,
            unacked: Vec::new(),
            seen: HashSet::new(),
            position: None,
            acked_position: None,
            acked_before,
        };
        if let Some(old) = self.clients.insert(r, client) {
            self.pool.run_until_stalled();
            drop(old);
        }
        self.pool.run_until_stalled();
    }

    /// Processes everything every client received, checking each delivery.
    fn observe(&mut self) {
        self.pool.run_until_stalled();
        let now = self.clock.now();
        let mut ended = Vec::new();
        for (&r, client) in self.clients.iter_mut() {
            let items: Vec<(Outbound, bool)> = std::mem::take(&mut *client.wire.lock());
            for (item, wire_dup) in items {
                let Outbound::Batch(Batch {
                    messages,
                    gap,
                    position,
                }) = item
                else {
                    continue;
                };
                if !wire_dup {
                    self.gaps[r] += gap;
                    client.position = client.position.max(Some(position));
                }
                if std::env::var("SIM_TRACE").is_ok() {
                    let seqs: Vec<u64> = messages.iter().map(|m| m.seq.0).collect();
                    eprintln!(
                        "t={} r{r} batch gap={gap} dup={wire_dup} seqs={seqs:?}",
                        now.as_millis() as i64 - T0.as_millis() as i64
                    );
                }
                for m in messages {
                    let Some(sent) = self.sent.get(&m.id) else {
                        panic!("seed {}: delivered a message never sent: {m:?}", self.seed)
                    };
                    if sent.recipient != r || m.payload[0] as usize != r {
                        panic!(
                            "seed {}: recipient {r} got a message for {}",
                            self.seed, sent.recipient
                        );
                    }
                    // The bytes and deadline of the attempt that stored it: exactly, where the
                    // send said Ok; else one of the attempts'.
                    let deadline = match &sent.stored {
                        Some((payload, deadline)) => {
                            if m.payload[..] != payload[..] || m.expires_at != *deadline {
                                panic!(
                                    "seed {}: delivered {m:?}, stored {payload:?} until {deadline:?}",
                                    self.seed
                                );
                            }
                            *deadline
                        }
                        None => {
                            if !sent.attempts.iter().any(|(payload, deadline)| {
                                m.payload[..] == payload[..] && m.expires_at == *deadline
                            }) {
                                panic!(
                                    "seed {}: delivered {m:?}, none of the attempts {:?}",
                                    self.seed, sent.attempts
                                );
                            }
                            m.expires_at
                        }
                    };
                    if deadline.is_some_and(|at| at <= now) {
                        panic!("seed {}: delivered after expiry: {m:?} at {now}", self.seed);
                    }
                    let (acked_through, acked_seqs) = &client.acked_before;
                    if *acked_through >= Some(m.seq) || acked_seqs.contains(&m.seq) {
                        panic!(
                            "seed {}: recipient {r} got seq {} again, acked before this session",
                            self.seed, m.seq
                        );
                    }
                    if wire_dup {
                        continue;
                    }
                    if !client.seen.insert(m.seq) {
                        panic!(
                            "seed {}: recipient {r} got seq {} twice in one session",
                            self.seed, m.seq
                        );
                    }
                    if client.last_seq >= Some(m.seq) {
                        panic!(
                            "seed {}: out of order within a session: {:?} then {}",
                            self.seed, client.last_seq, m.seq
                        );
                    }
                    client.last_seq = Some(m.seq);
                    if self.received[r].contains(&m.id) && !m.redelivered {
                        panic!("seed {}: a redelivery was not marked: {m:?}", self.seed);
                    }
                    self.received[r].insert(m.id);
                    client.unacked.push((m.seq, m.id));
                }
            }
            if let Ok(Some(_)) = client.end.try_recv() {
                ended.push(r);
            }
        }
        for r in ended {
            self.clients.remove(&r);
        }
    }

    fn ack(&mut self, r: usize) {
        let Some(client) = self.clients.get_mut(&r) else {
            return;
        };
        match self.rng.below(4) {
            0 => {
                if let Some(highest) = client.ack_all() {
                    client.handle.ack_through(highest);
                }
            }
            1 => {
                // Some of them, reordered, with duplicates.
                let mut picked = Vec::new();
                client.unacked.retain(|&(seq, _)| {
                    let take = self.rng.chance(50);
                    if take {
                        picked.push(seq);
                    }
                    !take
                });
                picked.reverse();
                let again = picked.clone();
                picked.extend(again);
                client.handle.ack(picked);
            }
            2 => client.handle.ack([Seq(self.rng.next())]), // a seq it never got: ignored
            _ => {}                                         // no ack this time
        }
        self.pool.run_until_stalled();
    }

    fn step(&mut self) {
        let r = self.rng.below(RECIPIENTS as u64) as usize;
        match self.rng.below(100) {
            0..=34 => self.send(),
            35..=49 => self.connect(r),
            50..=69 => self.ack(r),
            70..=76 => {
                if let Some(client) = self.clients.remove(&r) {
                    client.handle.close();
                    self.pool.run_until_stalled();
                }
            }
            // The host cancels the session futures mid-flight (their tasks are dropped).
            77..=79 if self.clients.remove(&r).is_some() => {
                self.pool = LocalPool::new();
                self.clients.clear();
            }
            80..=89 => {
                let by = Duration::from_secs(self.rng.below(120));
                self.clock.advance(by);
            }
            90..=91 => {
                // The wall clock steps back.
                let back = Duration::from_secs(self.rng.below(60));
                self.clock.set(self.clock.now().saturating_sub(back));
            }
            92..=96 => {
                let queue = self.queue.clone();
                let _ = self
                    .pool
                    .run_until(queue.maintain(1 + self.rng.below(20) as usize));
            }
            // The power goes at one of the next few writes, mid-commit perhaps; the process
            // dies at a later restart step (or before the final drain).
            97 if self.redb.as_ref().is_some_and(RedbHome::can_arm) => {
                let writes = 1 + self.rng.below(40);
                if let Some(home) = &self.redb {
                    home.arm(writes);
                }
            }
            _ if self.redb.is_some()
                || self.postgres.is_some()
                || self.redis.is_some()
                || self.nats.is_some()
                || self.amqp.is_some() =>
            {
                self.restart()
            }
            _ => {}
        }
        self.high_water = self.high_water.max(self.clock.now());
        self.observe();
    }

    /// The process dies and comes back: every session and the engine are gone; the storage
    /// stays. On redb the power goes first (with the `testing` feature), so what the disk
    /// keeps is what was synced and a random part of what was not.
    fn restart(&mut self) {
        if let Some(home) = &mut self.redb {
            home.power_cut(&mut self.rng);
        }
        self.clients.clear();
        self.pool = LocalPool::new();
        self.queue = OfflineQueue::builder().build().unwrap();
        #[cfg(feature = "amqp")]
        if let Some(old) = self.amqp_open.take() {
            common::wait(old.close());
        }
        self.queue = self.build_queue(None);
    }

    fn finish(mut self) {
        // A disk that lost its power, or will at a coming write, needs the process to come
        // back first.
        if self.redb.as_ref().is_some_and(RedbHome::cut_coming) {
            self.restart();
        }
        // Faults end; every recipient connects and drains to the end, acking everything.
        *self.faults.lock() = None;
        for r in 0..RECIPIENTS {
            self.connect(r);
        }
        for _ in 0..200 {
            self.observe();
            let mut pending = false;
            for r in 0..RECIPIENTS {
                if let Some(client) = self.clients.get_mut(&r)
                    && let Some(highest) = client.ack_all()
                {
                    client.handle.ack_through(highest);
                    pending = true;
                }
            }
            self.pool.run_until_stalled();
            if !pending {
                break;
            }
        }
        for r in 0..RECIPIENTS {
            let stats = {
                let queue = self.queue.clone();
                self.pool.run_until(queue.stats(&who(r))).unwrap()
            };
            if stats.messages > 0 {
                // Only expired-but-unpurged messages may remain.
                let queue = self.queue.clone();
                let peek = self.pool.run_until(queue.peek(&who(r), 1000)).unwrap();
                if !peek.is_empty() {
                    self.fail(format!(
                        "recipient {r} still has {} deliverable messages after the final drain",
                        peek.len()
                    ));
                }
            }
        }
        // No loss: every acknowledged send was received, or expired, or was dropped (DropOldest),
        // and each one missing was reported in some gap.
        // Every dead letter is a message sent to that recipient (handed over at least once:
        // again, with its id, if its removal failed).
        let dead_letters = self.dead_letters.lock().clone();
        let mut given_up = HashSet::new();
        for (recipient, id) in &dead_letters {
            match self.sent.get(id) {
                Some(sent) if who(sent.recipient) == *recipient => {}
                _ => self.fail(format!(
                    "dead letter {id} for {recipient} was never sent there"
                )),
            }
            given_up.insert(*id);
        }
        if self.max_deliveries == u32::MAX && !dead_letters.is_empty() {
            self.fail("dead letters without a delivery limit");
        }
        let mut missing = [0u64; RECIPIENTS];
        for (id, sent) in &self.sent {
            if !sent.acknowledged || self.received[sent.recipient].contains(id) {
                continue;
            }
            let expired = sent.expires_at.is_some_and(|at| at <= self.high_water);
            if !expired && self.overflow != Overflow::DropOldest && !given_up.contains(id) {
                self.fail(format!(
                    "acknowledged send {id} to recipient {} was lost: {sent:?}",
                    sent.recipient
                ));
            }
            missing[sent.recipient] += 1;
        }
        for (r, missing) in missing.iter().enumerate() {
            if self.claims.loss_counts && self.gaps[r] < *missing {
                self.fail(format!(
                    "recipient {r}: {missing} messages missing but only {} reported in gaps",
                    self.gaps[r]
                ));
            }
        }
        // Memory back to baseline once every session is gone.
        for (_, client) in self.clients.drain() {
            client.handle.close();
        }
        self.pool.run_until_stalled();
        if self.queue.metrics().live_sessions != 0 {
            self.fail("sessions left registered after all ended");
        }
        // Twice: the first pass sends the nudges still due, the second forgets them.
        for _ in 0..2 {
            self.clock.advance(Duration::from_secs(24 * 3600));
            let queue = self.queue.clone();
            let _ = self.pool.run_until(queue.maintain(100_000));
        }
        if self.queue.nudge_state_len() != 0 {
            self.fail(format!(
                "nudge state holds {} entries after everything ended",
                self.queue.nudge_state_len()
            ));
        }
        self.idle_phase();
    }

    /// On seeds that remove idle queues: a queue touched within the timeout stays, with its
    /// message; once idle for the timeout it goes, message and all.
    fn idle_phase(&mut self) {
        let Some(timeout) = self.limits.idle_recipient_timeout else {
            return;
        };
        let removed = |world: &Self| world.queue.metrics().idle_recipients_removed;
        let maintain = |world: &mut Self| {
            let queue = world.queue.clone();
            world
                .pool
                .run_until(queue.maintain(100_000))
                .unwrap_or_else(|e| world.fail(format!("maintenance: {e}")));
        };
        let peek = |world: &mut Self| {
            let queue = world.queue.clone();
            world
                .pool
                .run_until(queue.peek(&who(0), 10))
                .unwrap_or_else(|e| world.fail(format!("peek: {e}")))
        };
        // Every queue was last touched by the final drain. Just short of the timeout,
        // recipient 0 gets one more message; just past it, every other queue is idle.
        self.clock.advance(timeout - Duration::from_secs(10));
        let envelope = Envelope::new(who(0), b"idle phase".to_vec()).with_ttl(timeout * 2);
        let queue = self.queue.clone();
        self.pool
            .run_until(queue.send(envelope))
            .unwrap_or_else(|e| self.fail(format!("send with faults off: {e}")));
        self.clock.advance(Duration::from_secs(20));
        maintain(self);
        let kept = peek(self);
        if kept.len() != 1 || kept[0].payload.as_ref() != b"idle phase" {
            self.fail(format!(
                "a queue touched 10 s ago was removed as idle: {kept:?}"
            ));
        }
        let before = removed(self);
        self.clock.advance(timeout);
        maintain(self);
        if !peek(self).is_empty() {
            self.fail("a queue idle past the timeout kept its message");
        }
        if removed(self) != before + 1 {
            self.fail(format!(
                "one queue was idle, {} were removed",
                removed(self) - before
            ));
        }
    }
}

/// Where a seed's messages wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redb,
    Postgres,
    Redis,
    Nats,
    Amqp,
}

/// Which NATS seeds run on `OwnedNatsStorage` (the others on `NatsStorage`).
#[cfg(feature = "nats")]
fn owned_nats(seed: u64) -> bool {
    seed / 50 % 2 == 1
}

/// A quarter of the seeds remove idle queues (after 30 days, at the end of the run).
fn removes_idle(seed: u64) -> bool {
    Rng(seed ^ 0x1d1e).chance(25)
}

/// A runtime for PostgreSQL's and Redis's connections and tasks (the harness polls on its own
/// thread).
#[cfg(any(
    feature = "postgres",
    feature = "redis",
    feature = "nats",
    feature = "amqp"
))]
fn server_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs one seed; returns where it ran, how many reads with an ack reached the backend's own
/// fused read, and how many messages went to the dead-letter hook. `amqp`: the URL of the
/// run's RabbitMQ virtual host, when there is one.
fn run(seed: u64, amqp: Option<&str>) -> (Backend, u64, usize) {
    // Every 25th seed runs on redb with restarts (each write is an fsync: slower), every 50th
    // (another residue) on PostgreSQL when its URL is set.
    let on_redb = seed % 25 == 7;
    #[cfg(feature = "postgres")]
    let (_context, postgres) = if seed % 50 == 19 {
        match postgres_support::url() {
            Some(url) => (
                Some(server_runtime().enter()),
                Some((url, postgres_support::unique_schema("sim"))),
            ),
            None => (None, None),
        }
    } else {
        (None, None)
    };
    #[cfg(not(feature = "postgres"))]
    let postgres: Option<(String, String)> = None;
    // Every 50th (a third residue) on Redis when its URL is set, each seed under its own
    // prefix; its keys expire with their queues' quotas.
    #[cfg(feature = "redis")]
    let (_redis_context, redis) = match (seed % 50 == 43)
        .then(redis_support::Target::single)
        .flatten()
    {
        Some(redis_support::Target::Single(url)) => (
            Some(server_runtime().enter()),
            Some((url, redis_support::unique_prefix("sim"))),
        ),
        _ => (None, None),
    };
    #[cfg(not(feature = "redis"))]
    let redis: Option<(String, String)> = None;
    // Every 50th (a fourth residue) on NATS, unless the seed removes idle queues.
    #[cfg(feature = "nats")]
    let (_nats_context, nats) = match (seed % 50 == 31 && !removes_idle(seed))
        .then(nats_support::url)
        .flatten()
    {
        Some(url) => (
            Some(server_runtime().enter()),
            Some((url, nats_support::unique_name())),
        ),
        None => (None, None),
    };
    #[cfg(not(feature = "nats"))]
    let nats: Option<(String, String)> = None;
    // Every 50th (a fifth residue) on RabbitMQ, unless the seed removes idle queues (the
    // broker removes them by its own clock).
    let amqp = amqp
        .filter(|_| seed % 50 == 37 && !removes_idle(seed))
        .map(|url| (url.to_owned(), format!("sim{}x{seed}", std::process::id())));
    #[cfg(feature = "amqp")]
    let _amqp_context = amqp.is_some().then(|| server_runtime().enter());
    let backend = match (on_redb, &postgres, &redis, &nats, &amqp) {
        (true, ..) => Backend::Redb,
        (false, Some(_), ..) => Backend::Postgres,
        (false, None, Some(_), ..) => Backend::Redis,
        (false, None, None, Some(_), _) => Backend::Nats,
        (false, None, None, None, Some(_)) => Backend::Amqp,
        (false, None, None, None, None) => Backend::Memory,
    };
    let mut world = World::new(
        seed,
        on_redb,
        postgres.clone(),
        redis,
        nats.clone(),
        amqp.clone(),
    );
    for _ in 0..STEPS {
        world.step();
    }
    let acked_reads = world.acked_reads.clone();
    let dead_letters = world.dead_letters.clone();
    world.finish();
    #[cfg(feature = "postgres")]
    if let Some((url, schema)) = postgres {
        common::wait(postgres_support::drop_schemas(&url, &[schema]));
    }
    #[cfg(feature = "nats")]
    if let Some((url, name)) = nats {
        common::wait(nats_support::delete(&url, &[name]));
    }
    #[cfg(feature = "amqp")]
    if let Some((url, prefix)) = amqp {
        let storage = offline_queue::AmqpStorage::options()
            .prefix(prefix)
            .queue_type(amqp_queue_type(seed))
            .connect(&url);
        let storage = common::wait(storage).expect("connect to RabbitMQ");
        for r in 0..RECIPIENTS {
            common::wait(storage.remove_recipient(&who(r))).expect("remove a seed's queue");
        }
    }
    let dead_letters = dead_letters.lock().len();
    (backend, acked_reads.load(Ordering::Relaxed), dead_letters)
}

/// The queue type of a RabbitMQ seed: classic and quorum in turn, or all of one type with
/// `SIM_AMQP=classic` or `SIM_AMQP=quorum`.
#[cfg(feature = "amqp")]
fn amqp_queue_type(seed: u64) -> offline_queue::storage::QueueType {
    use offline_queue::storage::QueueType;
    match std::env::var("SIM_AMQP").as_deref() {
        Ok("quorum") => QueueType::Quorum,
        Ok("classic") => QueueType::Classic,
        _ if (seed / 50) % 2 == 1 => QueueType::Quorum,
        _ => QueueType::Classic,
    }
}

#[test]
fn simulation() {
    // One virtual host for the run's RabbitMQ seeds, deleted at its end.
    #[cfg(feature = "amqp")]
    let amqp_vhost = amqp_support::url().map(|url| amqp_support::Vhost::new(&url, "sim"));
    #[cfg(feature = "amqp")]
    let amqp = amqp_vhost.as_ref().map(|vhost| vhost.url.as_str());
    #[cfg(not(feature = "amqp"))]
    let amqp = None;
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed = seed.parse().expect("SIM_SEED is a number");
        run(seed, amqp);
        println!("seed {seed}: ok");
        return;
    }
    let seeds: u64 =
        std::env::var("SIM_SEEDS").map_or(2_000, |n| n.parse().expect("SIM_SEEDS is a number"));
    let started = std::time::Instant::now();
    let (mut redb_seeds, mut redb_acked_reads) = (0, 0);
    let (mut postgres_seeds, mut postgres_acked_reads) = (0, 0);
    let (mut redis_seeds, mut redis_acked_reads) = (0, 0);
    let (mut nats_seeds, mut nats_acked_reads) = (0, 0);
    let (mut amqp_seeds, mut amqp_acked_reads) = (0, 0);
    let mut dead_letters = 0;
    for seed in 0..seeds {
        let (backend, acked_reads, dead) = run(seed, amqp);
        dead_letters += dead;
        match (backend, acked_reads) {
            (Backend::Redb, acked_reads) => {
                redb_seeds += 1;
                redb_acked_reads += acked_reads;
            }
            (Backend::Postgres, acked_reads) => {
                postgres_seeds += 1;
                postgres_acked_reads += acked_reads;
            }
            (Backend::Redis, acked_reads) => {
                redis_seeds += 1;
                redis_acked_reads += acked_reads;
            }
            (Backend::Nats, acked_reads) => {
                nats_seeds += 1;
                nats_acked_reads += acked_reads;
            }
            (Backend::Amqp, acked_reads) => {
                amqp_seeds += 1;
                amqp_acked_reads += acked_reads;
            }
            (Backend::Memory, _) => {}
        }
    }
    // A quarter of the seeds give up after a few deliveries: the hook runs in some of them.
    if seeds >= 200 {
        assert!(dead_letters > 0, "no message reached the dead-letter hook");
    }
    if redis_seeds > 0 {
        assert!(
            redis_acked_reads > 0,
            "no read with an ack reached Redis in {redis_seeds} seeds"
        );
    }
    if nats_seeds > 0 {
        assert!(
            nats_acked_reads > 0,
            "no read with an ack reached NATS in {nats_seeds} seeds"
        );
    }
    if amqp_seeds > 0 {
        assert!(
            amqp_acked_reads > 0,
            "no read with an ack reached RabbitMQ in {amqp_seeds} seeds"
        );
    }
    if postgres_seeds > 0 {
        assert!(
            postgres_acked_reads > 0,
            "no read with an ack reached PostgreSQL in {postgres_seeds} seeds"
        );
    }
    // The wrapper forwards the fast path, so redb's own ack-and-read job ran under faults.
    if redb_seeds > 0 {
        assert!(
            redb_acked_reads > 0,
            "no read with an ack reached redb in {redb_seeds} seeds"
        );
    }
    let (mid_write, pages_lost) = (
        POWER_CUTS_MID_WRITE.load(Ordering::Relaxed),
        PAGES_LOST.load(Ordering::Relaxed),
    );
    if cfg!(feature = "testing") && redb_seeds >= 20 {
        assert!(
            mid_write > 0,
            "no power cut came mid-load in {redb_seeds} seeds"
        );
    }
    println!(
        "simulation: {seeds} seeds passed in {:.1} s ({redb_seeds} on redb, {mid_write} power \
         cuts there at a write, {pages_lost} unsynced pages lost; {postgres_seeds} on \
         PostgreSQL, {redis_seeds} on Redis, {nats_seeds} on NATS, {amqp_seeds} on RabbitMQ; \
         {dead_letters} dead letters)",
        started.elapsed().as_secs_f64()
    );
}
