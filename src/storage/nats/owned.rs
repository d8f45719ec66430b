//! [`OwnedNatsStorage`]: the single-owner layout for NATS JetStream, the plan in
//! docs/backends.md ("a single owner per recipient") built. Each queue has one owner, the
//! node that first touched it: it decides the queue's appends in memory and publishes each
//! record once, with no compare-and-set on the send's path. Other nodes forward their calls
//! on that queue to it over core NATS.
//!
//! ```no_run
//! # async fn run() -> offline_queue::Result<()> {
//! use std::sync::Arc;
//! use offline_queue::{NatsCoordination, NatsStorage, OfflineQueue};
//!
//! let url = "nats://127.0.0.1:4222";
//! let queue = OfflineQueue::builder()
//!     .storage(Arc::new(NatsStorage::options().connect_owned(url).await?))
//!     .coordination(Arc::new(NatsCoordination::connect(url).await?))
//!     .build()?;
//! tokio::spawn(queue.wakeup_listener());
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! Three streams named after [`NatsOptions::stream`] (`OFFLINE_QUEUE` by default), subjects
//! under [`NatsOptions::prefix`], the recipient id in hex:
//! - `OFFLINE_QUEUE_LOG`, `oq.l.<hex>.<position>`: **each record once**, on its position's
//!   subject, in a stream that refuses a second message on a subject
//!   (`max_messages_per_subject` 1 with `discard_new_per_subject`, as on 2.9). The log is the
//!   records' truth; nothing on the read's path removes from it: its `max_age` does (or,
//!   from server 2.11, each record's own TTL), so an ack costs no removal per record.
//! - `OFFLINE_QUEUE_PAGES`, `oq.p.<hex>.<page>`: a **sealed page** per 15 positions once
//!   every one of them is settled: copies of its records in one message, so a read gets 15
//!   records with one request. A cache of the log: a position a page lacks is read from the
//!   log. A page goes (one purge) once every position in it is acked.
//! - `OFFLINE_QUEUE_STATE`, `oq.s.<hex>`: the queue's state (the meta of
//!   [`NatsStorage`](super::NatsStorage): per position its size, delivery count and whether
//!   it is gone, plus the loss totals), written by compare-and-set **once per read batch or
//!   ack**, not per append, and once when the queue is made.
//!
//! # Loading a queue
//! The owner reads the state and, at once, asks the log for the recipient's last record to
//! arrive (one direct get by wildcard subject). It finds the pages sealed since the state was
//! written, keeping their copies of records past it. Then it reads the positions from the
//! state's end to 64 past the highest of that last arrival and the pages' last record, and
//! on while records turn up within 64 of the end (a node has at most 64 publishes in flight
//! per queue): each record found is taken in, from a page where the log's copy is gone (its
//! TTL); each position with nothing in it below the last found is closed with a tombstone,
//! which the log's one-message-a-subject rule makes final, and counted as lost (an append
//! that failed is over-counted, as the contract allows).
//!
//! # Owners
//! A queue's owner is named in `OFFLINE_QUEUE_STATE` at `oq.s.<hex>.owner`, written by
//! compare-and-set: the first node to touch the queue claims it, and keeps it for its life.
//! Each node answers on `oq.own.<node id>` (a random id per storage); a call on a queue
//! owned elsewhere goes there as a request, the call and its answer in the crate's codec,
//! typed errors (`QueueFull`, `MessageTooLarge`) kept. When nobody answers there (the NATS
//! server says so at once: the owner's connection, and its subscription, are gone), the
//! calling node claims the queue over the dead owner's entry and loads it (above). A node
//! that reconnects forgets every queue it had loaded, since another may have taken them
//! while it was away, and asks again on the next call.
//!
//! # Fences
//! A stale owner cannot overwrite: a record's subject takes one message, and the state
//! changes only by compare-and-set. An owner that lost its queue without noticing (cut off
//! from the server that answered for it, but not from its own) collides with the new owner
//! at the next position or state write; the loser's call fails, retryably, and its node
//! unloads the queue and asks who owns it on the next call. Until that collision it may
//! read a stale view of the queue: never fewer records than it had, and never a lost one.
//!
//! # What the log costs
//! Nothing removes a record from the log when it is acked: on a server before 2.11 it stays
//! until the log's `max_age` ([`NatsOptions::max_age`], 91 days by default), so size the
//! server's storage for that long a traffic, or set a shorter `max_age` (it also bounds how
//! long a queue may wait). From 2.11 a record with a deadline leaves at its deadline plus
//! the dedup window and `stale_reservation`, as [`NatsStorage`](super::NatsStorage)'s do.
//! Purging each record instead, even off the read's path, brought the drain down to the
//! rate of a consumer per recipient (BENCHMARKS.md, "A recipient's single owner").
//!
//! # Memory
//! An owner keeps each loaded queue's state in memory (per position its size and delivery
//! count), with the records not yet sealed in a page and the sender-chosen ids of its dedup
//! window. A queue no call has asked for in [`NatsOptions::dedup_window`] plus
//! [`NatsOptions::stale_reservation`] (1 hour 30 s by default) is unloaded, checked once a
//! minute: past it the ids it remembers are spent, and its state is written first if
//! appends changed it, so the next call loads it from its state, the pages sealed since and
//! the log past them. The node stays its owner. A node forgets the owner it saw of a queue
//! owned elsewhere after the same time. So memory follows the recipients active within the
//! window, not every recipient the node ever served.
//!
//! # What this layout does not do (yet)
//! As [`NatsStorage`](super::NatsStorage): no purge of expired records or idle queues by the
//! engine's clock (an idle queue leaves memory, above, not the streams), no storage-wide
//! byte budget, no atomic multi-record append across a failure. A drop
//! (`Overflow::DropOldest`) is written with the append that made it; if that write fails,
//! or the node stops first, the queue loads from the state before it: the records come
//! back, never fewer. Ownership never moves to where a queue is read: a recipient connected
//! to another node reads through its queue's owner, one request a batch.
//!
//! Narrow cases where it falls short of the contract, all found by review, none yet seen in
//! a test:
//! - **Sender-chosen ids after a restart or takeover.** The owner remembers the ids it
//!   appended; a new owner has only the log's `Nats-Msg-Id` window
//!   ([`NatsOptions::dedup_window`]). An id resent after the engine's window ended is stored
//!   again, as asked, without a `Nats-Msg-Id` (the log still names the first copy); resent
//!   once more within the window of that second copy, after a restart, it is stored a third
//!   time. And a new owner decides a resend's quota before the log calls it a duplicate: in a
//!   full queue, `DropOldest` drops the oldest record for it, `Reject` answers `QueueFull`.
//! - **A forwarded call that times out** (the owner alive but slow, 10 s) fails retryably
//!   though the owner may still finish it: an append retried then is stored twice unless
//!   its id is sender-chosen. An owner that hangs keeps its queues until it dies.
//! - **An expired record not yet sealed in a page**, removed from the log by its TTL (server
//!   2.11 on) while its queue was unloaded or its node stopped, is counted lost when the
//!   queue loads again, not reported expired: the state does not hold deadlines.
//! - **A read stops before the first append still in flight.** A later record already
//!   stored waits for the next read, and so for the next wake-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_TTL;
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    Config, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, Stream,
};
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::meta::Meta;
use super::page::{self, PAGE_RECORDS};
use super::wire::{self, Answer, Call, WireAck};
use super::{
    EXPIRES, Found, GONE, GONE_LOST, ID, NatsOptions, SENT, found, invalid, publish_ack,
    remove_in_background, ttl_seconds, version_at_least,
};
use crate::clock::Timestamp;
use crate::coordination::nats::{connect_error, servers};
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};
use crate::storage::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage, StoredRecord,
};

/// Publishes a node keeps in flight per queue; a load looks this far past the log's last
/// record for the ones that landed out of order.
const IN_FLIGHT_PER_QUEUE: usize = 64;
/// A record's header holding when its sender-chosen id was appended (engine ms), which its
/// dedup window counts from.
const APPENDED: &str = "Oq-Appended";
/// The state's header naming the first page not sealed yet.
const SEALED: &str = "Oq-Sealed";
/// Gets in flight at once for one read or load.
const GETS_IN_FLIGHT: usize = 64;
/// Largest read batch; a read may look at twice as many positions (expired ones passed over).
const MAX_READ_BATCH: usize = 1_000;
/// Pages removed per storage waiting for the background task (past it, acks wait).
const REMOVALS_QUEUED: usize = 65_536;

/// The header naming the queue a forwarded call is for.
const QUEUE: &str = "Oq-Queue";
/// Routes a call tries before giving up, retryably (the owner moving under it each time).
const ROUTE_ATTEMPTS: usize = 4;

/// Tells apart one loading of a queue from the next, so an append that finishes after its
/// queue was unloaded changes nothing of the new load.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

/// Queues in NATS JetStream, each owned by one node, the others forwarding to it. See the
/// [module docs](self).
///
/// Cheap to clone: clones share one connection and one view of the queues.
#[derive(Clone)]
pub struct OwnedNatsStorage {
    shared: Arc<Shared>,
}

struct Shared {
    context: Context,
    log: Stream,
    pages: Stream,
    states: Stream,
    queues: parking_lot::Mutex<HashMap<String, Arc<Queue>>>,
    /// Subjects of pages wholly acked, for [`remove_in_background`].
    removals: tokio::sync::mpsc::Sender<String>,
    /// With per-message TTL (server 2.11 on): how long past its deadline a record stays.
    ttl_grace: Option<Duration>,
    /// The most bytes a page takes: below the server's `max_payload`.
    page_budget: usize,
    options: NatsOptions,
    client: async_nats::Client,
    /// This node's id: its owner entries name it, and it answers on `<prefix>.own.<id>`.
    node: String,
    /// Queues owned elsewhere, as last seen: their owner's id.
    owners: parking_lot::Mutex<HashMap<String, String>>,
    /// Stops the task answering calls forwarded to this node (dropped with the storage, it
    /// stops it too); the task answers on the sender it is given once the server has it.
    stop_serving: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<Stopped>>>,
    /// [`OwnedNatsStorage::close`] ran: calls fail.
    closed: AtomicBool,
    /// When the storage was made: queues' last use counts from here.
    started: std::time::Instant,
}

/// Told once a node no longer answers for its queues.
type Stopped = tokio::sync::oneshot::Sender<()>;

/// Where a queue's calls run.
enum Route {
    Here(Arc<Queue>),
    /// On the node of this id.
    Owner(String),
}

/// A call routed: to be run here, on this queue, or answered by the owner.
enum Ran<T> {
    Here(Arc<Queue>),
    Owner(T),
}

impl std::fmt::Debug for OwnedNatsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedNatsStorage")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// One recipient's queue on its owner (or, `owned` empty, a queue this node forwards).
struct Queue {
    /// Held to load the queue and to write its state: one at a time.
    turn: tokio::sync::Mutex<()>,
    owned: parking_lot::Mutex<Option<Owned>>,
    in_flight: tokio::sync::Semaphore,
    /// When a call last asked for it (ms from [`Shared::started`]), for
    /// [`OwnedNatsStorage::unload_idle`].
    last_used: AtomicU64,
}

/// What the owner knows of a loaded queue.
struct Owned {
    epoch: u64,
    meta: Meta,
    /// The state's stream sequence, which its next write expects (0: none written yet).
    revision: u64,
    /// Records at or past the first unsealed page's first position, by position: appended
    /// here (from the moment their position is decided) or found at load.
    open: BTreeMap<u64, StoredRecord>,
    /// Positions whose publish has not answered yet: a read stops before the first.
    unsettled: std::collections::BTreeSet<u64>,
    /// Pages below this one are sealed.
    sealed_below: u64,
    /// An append is sealing a page.
    sealing: bool,
    /// Pages below this one are removed, or queued for removal.
    removed_below: u64,
    /// Sender-chosen ids appended here: their position and when they were appended (engine
    /// ms).
    ids: HashMap<MessageId, (u64, u64)>,
    /// The state as last written or loaded, in brief: appends (and a load) change it
    /// without a write, which unloading then makes.
    written: Written,
    /// When this node last remembered a sender-chosen id (ms from [`Shared::started`]): the
    /// queue stays loaded for the dedup window after it, since a new owner knows ids only
    /// through the log's window (module docs).
    id_remembered_at: Option<u64>,
}

/// What a queue's state says of its positions, in brief: if it differs from the one last
/// written, the state must be written before the queue is unloaded.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Written {
    next: u64,
    lost_total: u64,
    live: (u64, u64),
    sealed_below: u64,
}

impl Written {
    fn of(meta: &Meta, sealed_below: u64) -> Self {
        Written {
            next: meta.next(),
            lost_total: meta.lost_total,
            live: meta.live(),
            sealed_below,
        }
    }
}

impl Owned {
    /// Whether the next page to seal has every position settled, and no seal is running.
    fn page_ready(&self) -> bool {
        let range = page::positions_of(self.sealed_below);
        !self.sealing
            && self.meta.next() >= range.end
            && self.unsettled.range(range).next().is_none()
    }

    /// Positions a read may return: live, after `start`, before the first unsettled one.
    fn readable_from(&self, start: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        let stop = self.unsettled.first().copied().unwrap_or(u64::MAX);
        self.meta
            .live_from(start)
            .take_while(move |(position, _)| *position < stop)
            .map(|(position, slot)| (position, slot.deliveries))
    }

    /// Pages wholly below the floor that are not yet removed: marks them removed.
    fn pages_to_remove(&mut self) -> std::ops::Range<u64> {
        let below = page::page_of(self.meta.floor + 1).min(self.sealed_below);
        let pages = self.removed_below..below.max(self.removed_below);
        self.removed_below = pages.end;
        pages
    }
}

impl NatsOptions {
    /// Connects to `url` for an [`OwnedNatsStorage`], and creates its three streams
    /// (`<stream>_LOG`, `<stream>_PAGES`, `<stream>_STATE`), or checks that existing ones
    /// have this layout.
    ///
    /// # Errors
    /// As [`NatsOptions::connect`].
    pub async fn connect_owned(self, url: &str) -> Result<OwnedNatsStorage> {
        self.check()?;
        // Each reconnection: queues this node owned may have been taken over while it was
        // away (its calls went unanswered), so it forgets them all (see `forget_queues`).
        // (Not the first connection: its event may come after the first queue is loaded.)
        let (reconnected, mut reconnections) = tokio::sync::mpsc::unbounded_channel();
        let away = Arc::new(AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name("offline-queue owned storage")
            .event_callback(move |event| {
                let (reconnected, away) = (reconnected.clone(), away.clone());
                async move {
                    match event {
                        async_nats::Event::Disconnected => away.store(true, Ordering::Relaxed),
                        async_nats::Event::Connected if away.swap(false, Ordering::Relaxed) => {
                            let _ = reconnected.send(());
                        }
                        _ => {}
                    }
                }
            })
            .connect(servers(url))
            .await
            .map_err(|error| connect_error(url, error))?;
        let info = client.server_info();
        let newer = version_at_least(&info.version, (2, 11));
        let context = jetstream::new(client.clone());
        let mut log_config = self.stream_config(&format!("{}_LOG", self.stream), "l");
        log_config.discard = DiscardPolicy::New;
        log_config.discard_new_per_subject = true;
        log_config.duplicate_window = self.dedup_window;
        let (log, message_ttl) = self.open_stream(&context, log_config, newer).await?;
        let pages_config = self.stream_config(&format!("{}_PAGES", self.stream), "p");
        let (pages, _) = self.open_stream(&context, pages_config, false).await?;
        // Without max_age: a queue's state is written only when it is made, read or acked, and
        // must outlive any wait for a read (its records' own ages bound them).
        let states_config = Config {
            max_age: Duration::ZERO,
            ..self.stream_config(&format!("{}_STATE", self.stream), "s")
        };
        let (states, _) = self.open_stream(&context, states_config, false).await?;
        let (removals, queued) = tokio::sync::mpsc::channel(REMOVALS_QUEUED);
        tokio::spawn(remove_in_background(pages.clone(), queued));
        let node = MessageId::generate().to_string();
        let (stop_serving, stopping) = tokio::sync::oneshot::channel();
        let calls = client
            .subscribe(format!("{}.own.{node}", self.prefix))
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        let storage = OwnedNatsStorage {
            shared: Arc::new(Shared {
                context,
                log,
                pages,
                states,
                queues: parking_lot::Mutex::new(HashMap::new()),
                removals,
                ttl_grace: message_ttl.then(|| self.dedup_window + self.stale_reservation),
                // Headroom for the headers and the server's framing.
                page_budget: info.max_payload.saturating_sub(4096).max(4096),
                options: self,
                client,
                node,
                owners: parking_lot::Mutex::new(HashMap::new()),
                stop_serving: parking_lot::Mutex::new(Some(stop_serving)),
                closed: AtomicBool::new(false),
                started: std::time::Instant::now(),
            }),
        };
        tokio::spawn(serve(Arc::downgrade(&storage.shared), calls, stopping));
        let shared = Arc::downgrade(&storage.shared);
        tokio::spawn(async move {
            while reconnections.recv().await.is_some() {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                OwnedNatsStorage { shared }.forget_queues();
            }
        });
        tokio::spawn(unload_idle_in_background(Arc::downgrade(&storage.shared)));
        Ok(storage)
    }
}

/// The outcome of one record's publish to the log.
enum Published {
    Stored,
    /// The log already held a record with this sender-chosen id: at this stream sequence.
    Duplicate(u64),
}

impl OwnedNatsStorage {
    /// Connects with the default settings; see [`NatsOptions::connect_owned`].
    ///
    /// # Errors
    /// As [`NatsOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        NatsOptions::default().connect_owned(url).await
    }

    /// Hands this node's queues over, for a graceful shutdown: stops answering the calls
    /// other nodes forward here, waits until the server has that, and forgets the queues.
    /// Each other node's next call on one of them then takes it over at once (without this,
    /// a call that reaches a node being dropped may wait out its timeout first). Calls on
    /// this storage fail from here on.
    ///
    /// # Errors
    /// A retryable [`Error::Storage`] if the server could not be reached to confirm.
    pub async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Relaxed);
        let stop = self.shared.stop_serving.lock().take();
        if let Some(stop) = stop {
            let (stopped, confirmed) = tokio::sync::oneshot::channel();
            if stop.send(stopped).is_ok() {
                let _ = confirmed.await;
            }
        }
        self.forget_queues();
        self.shared
            .client
            .flush()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))
    }

    /// Whether the server removes expired records by their own TTL (server 2.11 on), as
    /// [`NatsStorage::per_message_ttl`](super::NatsStorage::per_message_ttl).
    pub fn per_message_ttl(&self) -> bool {
        self.shared.ttl_grace.is_some()
    }

    fn log_subject(&self, key: &str, position: u64) -> String {
        format!("{}.l.{key}.{position}", self.shared.options.prefix)
    }

    fn page_subject(&self, key: &str, page: u64) -> String {
        format!("{}.p.{key}.{page}", self.shared.options.prefix)
    }

    fn state_subject(&self, key: &str) -> String {
        format!("{}.s.{key}", self.shared.options.prefix)
    }

    /// Milliseconds since this storage was made, by this node's clock.
    fn since_started(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// For tests: unloads the queues idle for `idle`, as a background task does once a
    /// minute for the dedup window plus `stale_reservation`; returns how many. A queue that
    /// remembers a sender-chosen id from within the dedup window stays loaded.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub async fn unload_idle_queues(&self, idle: Duration) -> usize {
        self.unload_idle(idle).await
    }

    fn queue(&self, key: &str) -> Arc<Queue> {
        let now = self.since_started();
        let queue = self
            .shared
            .queues
            .lock()
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Queue {
                    turn: tokio::sync::Mutex::new(()),
                    owned: parking_lot::Mutex::new(None),
                    in_flight: tokio::sync::Semaphore::new(IN_FLIGHT_PER_QUEUE),
                    last_used: AtomicU64::new(now),
                })
            })
            .clone();
        queue.last_used.store(now, Ordering::Relaxed);
        queue
    }

    /// Unloads every queue no call has asked for in `idle`, and forgets the owner of each
    /// such queue owned elsewhere; returns how many it unloaded or forgot. A loaded queue's
    /// state is written first if appends (or a load) changed it since it was last written:
    /// the next load starts from there, needing nothing of the log a TTL may have removed.
    /// A queue a call holds, or whose write fails, or that remembers a sender-chosen id from
    /// within the dedup window (when `idle` is shorter), stays. This node stays the owner of
    /// what it unloads (module docs, "Memory").
    async fn unload_idle(&self, idle: Duration) -> usize {
        let used_before = |queue: &Queue| {
            self.since_started()
                .saturating_sub(queue.last_used.load(Ordering::Relaxed))
                >= idle.as_millis() as u64
        };
        let window = self.shared.options.dedup_window.as_millis() as u64;
        // Every call takes its queue from the map, under its lock: a queue held by the map
        // alone (and here by `idle_queues`) is in no call's hands.
        let idle_queues: Vec<(String, Arc<Queue>)> = self
            .shared
            .queues
            .lock()
            .iter()
            .filter(|(_, queue)| Arc::strong_count(queue) == 1 && used_before(queue))
            .map(|(key, queue)| (key.clone(), queue.clone()))
            .collect();
        let mut unloaded = 0;
        for (key, queue) in idle_queues {
            let (unwritten, pages) = match queue.owned.lock().as_mut() {
                // Ids still within the window (only when `idle` is shorter than it).
                Some(owned)
                    if owned
                        .id_remembered_at
                        .is_some_and(|at| self.since_started().saturating_sub(at) < window) =>
                {
                    continue;
                }
                Some(owned) => (
                    owned.revision != 0
                        && Written::of(&owned.meta, owned.sealed_below) != owned.written,
                    // Pages a seal finished after the last ack moved the floor past them.
                    owned.pages_to_remove(),
                ),
                None => (false, 0..0),
            };
            self.remove_pages(&key, pages).await;
            if unwritten {
                let _turn = queue.turn.lock().await;
                if let Err(error) = self.write_state(&key, &queue).await {
                    tracing::debug!(%error, queue = key, "nats: an idle queue stays loaded");
                    continue;
                }
            }
            let mut queues = self.shared.queues.lock();
            // No call took it meanwhile (nor came and went).
            if queues
                .get(&key)
                .is_some_and(|held| Arc::ptr_eq(held, &queue))
                && Arc::strong_count(&queue) == 2
                && used_before(&queue)
            {
                queues.remove(&key);
                drop(queues);
                self.shared.owners.lock().remove(&key);
                unloaded += 1;
            }
        }
        unloaded
    }

    /// Reads a queue's state, and takes in what the log holds past it (module docs,
    /// "Loading a queue").
    async fn load(&self, key: &str) -> Result<Owned> {
        // The log's last sequence, asked at once: a new queue's base.
        let subject = self.state_subject(key);
        let mut log = self.shared.log.clone();
        // The last record to arrive asked now, before this load closes any position.
        let (state, info, last) = futures::join!(
            self.shared.states.get_last_raw_message_by_subject(&subject),
            log.info(),
            self.last_logged(key)
        );
        let (mut meta, revision, mut sealed_below) = match state {
            Ok(message) => {
                let meta = Meta::decode(&message.payload)?;
                let sealed = message
                    .headers
                    .get(SEALED)
                    .and_then(|value| value.as_str().parse::<u64>().ok())
                    .unwrap_or_else(|| page::page_of(meta.floor + 1));
                (meta, message.sequence, sealed)
            }
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                // A new queue: above every position an earlier one of this recipient used
                // (each was published at or after its own log sequence).
                let info = info.map_err(|error| Error::storage(Retry::Yes, error))?;
                let meta = Meta::new(info.state.last_sequence);
                let sealed = page::page_of(meta.next());
                (meta, 0, sealed)
            }
            Err(error) => return Err(Error::storage(Retry::Yes, error)),
        };
        let (written, state_next) = (Written::of(&meta, sealed_below), meta.next());
        // Pages sealed after the state was written (none without a state: a queue's state
        // is written before its first record), and their records past it.
        let mut paged = BTreeMap::new();
        if revision != 0 {
            let from = sealed_below.max(page::page_of(meta.floor + 1));
            (sealed_below, paged) = self.sealed_pages(key, from, state_next).await?;
        }
        let mut open = BTreeMap::new();
        // Live positions of unsealed pages the state knows: their records, for reads and
        // for sealing.
        let first_open = sealed_below * PAGE_RECORDS;
        let known: Vec<u64> = meta.live_from(first_open).map(|(p, _)| p).collect();
        for (position, found) in self.get_logged_settled(key, &known).await? {
            match found {
                Found::Record(record) => {
                    open.insert(position, record);
                }
                // Closed, or the server removed it (its TTL, `max_age`): lost.
                Found::Gone { .. } | Found::Missing => {
                    meta.abandon(position, true);
                }
            }
        }
        // Records past the state: appends it did not record yet. (No state, no records: a
        // queue's state is written before its first record.)
        let highest = last?
            .into_iter()
            .chain(paged.keys().next_back().copied())
            .max();
        if revision != 0
            && let Some(highest) = highest
            && highest + IN_FLIGHT_PER_QUEUE as u64 >= state_next
        {
            let found = self.scan_past(key, state_next, highest, &mut paged).await?;
            let end = found
                .iter()
                .rposition(|(_, found)| !matches!(found, Found::Missing))
                .map_or(0, |i| i + 1);
            for (position, found) in found.into_iter().take(end) {
                let found = match found {
                    Found::Missing => self.settle_missing(key, position).await?,
                    found => found,
                };
                match found {
                    Found::Record(record) => {
                        meta.adopt(position, Some(record.body.len() as u32));
                        if position >= first_open {
                            open.insert(position, record);
                        }
                    }
                    // Closed by an earlier load whose count of it was never written.
                    Found::Gone { lost } => {
                        meta.adopt(position, None);
                        if lost {
                            meta.lost_total += 1;
                        }
                    }
                    Found::Missing => {
                        meta.adopt(position, None);
                        meta.lost_total += 1;
                    }
                }
            }
        }
        let removed_below = page::page_of(meta.floor + 1).min(sealed_below);
        Ok(Owned {
            epoch: EPOCHS.fetch_add(1, Ordering::Relaxed),
            meta,
            revision,
            open,
            unsettled: Default::default(),
            sealed_below,
            sealing: false,
            removed_below,
            ids: HashMap::new(),
            written,
            id_remembered_at: None,
        })
    }

    /// Finds the pages sealed from `page` on: returns the first page not sealed, and the
    /// records they hold from position `from` on (the log's copies of them may be gone by
    /// their TTL). One that cannot be decoded is there all the same; reads take its records
    /// from the log.
    async fn sealed_pages(
        &self,
        key: &str,
        mut page: u64,
        from: u64,
    ) -> Result<(u64, BTreeMap<u64, StoredRecord>)> {
        let mut records = BTreeMap::new();
        while let Some((subject, payload)) = self.page_message(key, page).await? {
            if page::positions_of(page).end > from {
                let decoded = page::decode(&subject, &payload).unwrap_or_default();
                records.extend(
                    decoded
                        .into_iter()
                        .filter(|record| record.seq.0 >= from)
                        .map(|record| (record.seq.0, record)),
                );
            }
            page += 1;
        }
        Ok((page, records))
    }

    /// What the log holds from `from` to `highest` and 64 past it, and on while records
    /// turn up within 64 of the end (a node has at most 64 publishes in flight per queue).
    /// A position the log lacks is taken from `paged` if a page holds it.
    async fn scan_past(
        &self,
        key: &str,
        from: u64,
        highest: u64,
        paged: &mut BTreeMap<u64, StoredRecord>,
    ) -> Result<Vec<(u64, Found)>> {
        let reach = IN_FLIGHT_PER_QUEUE as u64;
        let mut found = Vec::new();
        let (mut start, mut end) = (from, highest.max(from) + reach);
        while start <= end {
            let positions: Vec<u64> = (start..=end).collect();
            for (position, mut got) in self.get_logged(key, &positions).await? {
                if matches!(got, Found::Missing)
                    && let Some(record) = paged.remove(&position)
                {
                    got = Found::Record(record);
                }
                if !matches!(got, Found::Missing) {
                    end = end.max(position + reach);
                }
                found.push((position, got));
            }
            start = positions.last().map_or(end, |last| last + 1);
        }
        Ok(found)
    }

    /// Forgets every queue this node loaded and every owner it saw: after a reconnection,
    /// another node may own them now, and the next call on each asks.
    fn forget_queues(&self) {
        let queues: Vec<Arc<Queue>> = self.shared.queues.lock().values().cloned().collect();
        for queue in queues {
            *queue.owned.lock() = None;
        }
        self.shared.owners.lock().clear();
    }

    /// Forgets a queue's loaded state: the next call loads it afresh.
    fn unload(&self, queue: &Queue, epoch: u64) {
        let mut owned = queue.owned.lock();
        if owned.as_ref().is_some_and(|owned| owned.epoch == epoch) {
            *owned = None;
        }
    }

    fn owner_subject(&self, key: &str) -> String {
        format!("{}.s.{key}.owner", self.shared.options.prefix)
    }

    /// The node owning `key`'s queue by its entry, and the entry's sequence (0: none).
    async fn owner_of(&self, key: &str) -> Result<(Option<String>, u64)> {
        match self
            .shared
            .states
            .get_last_raw_message_by_subject(&self.owner_subject(key))
            .await
        {
            Ok(message) => Ok((
                Some(String::from_utf8_lossy(&message.payload).into_owned()),
                message.sequence,
            )),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// Makes this node `key`'s owner, over the entry at `expected` (0: none). False if
    /// another node wrote the entry first.
    async fn claim(&self, key: &str, expected: u64) -> Result<bool> {
        let publish = Publish::build()
            .payload(Bytes::from(self.shared.node.clone()))
            .expected_last_subject_sequence(expected);
        Ok(
            publish_ack(&self.shared.context, self.owner_subject(key), publish)
                .await?
                .is_some(),
        )
    }

    /// Where `key`'s calls run: here (the queue loaded, claimed first if no node owns it),
    /// or on its owner.
    async fn route(&self, key: &str) -> Result<Route> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Error::storage_msg(
                Retry::No,
                "nats: this storage was closed (OwnedNatsStorage::close)",
            ));
        }
        let queue = self.queue(key);
        if queue.owned.lock().is_some() {
            return Ok(Route::Here(queue));
        }
        if let Some(node) = self.shared.owners.lock().get(key).cloned() {
            return Ok(Route::Owner(node));
        }
        // Every publish of an earlier loading answered first: one landing after the load's
        // scan would hold a position the new loading does not know of. (Permits before the
        // turn, as an append takes them.)
        let _quiet = queue
            .in_flight
            .acquire_many(IN_FLIGHT_PER_QUEUE as u32)
            .await
            .map_err(|_| reloaded())?;
        let _turn = queue.turn.lock().await;
        for _ in 0..ROUTE_ATTEMPTS {
            if queue.owned.lock().is_some() {
                return Ok(Route::Here(queue.clone()));
            }
            match self.owner_of(key).await? {
                (Some(node), _) if node != self.shared.node => {
                    self.shared
                        .owners
                        .lock()
                        .insert(key.to_owned(), node.clone());
                    return Ok(Route::Owner(node));
                }
                (None, expected) if !self.claim(key, expected).await? => continue,
                _ => {
                    let owned = self.load(key).await?;
                    *queue.owned.lock() = Some(owned);
                    return Ok(Route::Here(queue.clone()));
                }
            }
        }
        Err(moving())
    }

    /// The queue of `key` if this node owns it (loaded, or loaded now); `None` if another
    /// node does. For a call forwarded here.
    async fn owned_here(&self, key: &str) -> Result<Option<Arc<Queue>>> {
        self.shared.owners.lock().remove(key);
        match self.route(key).await? {
            Route::Here(queue) => Ok(Some(queue)),
            Route::Owner(_) => Ok(None),
        }
    }

    /// Sends `call` to `node`, `key`'s owner as last seen. `None`: the owner moved (it
    /// answered that it does not own the queue, or it is gone and this node claimed the
    /// queue): route again.
    async fn forward(&self, key: &str, node: &str, call: &Call) -> Result<Option<Answer>> {
        let mut headers = HeaderMap::new();
        headers.insert(QUEUE, key);
        let payload = Bytes::from(crate::codec::to_bytes(call)?);
        let subject = format!("{}.own.{node}", self.shared.options.prefix);
        match self
            .shared
            .client
            .request_with_headers(subject, headers, payload)
            .await
        {
            Ok(reply) => match crate::codec::from_bytes::<Answer>(&reply.payload)? {
                Answer::NotOwner => {
                    self.shared.owners.lock().remove(key);
                    Ok(None)
                }
                Answer::Failed(error) => Err(error.into()),
                answer => Ok(Some(answer)),
            },
            // Nobody listens for that node: it is gone. Its queues go to whoever asks first.
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                self.shared.owners.lock().remove(key);
                if let (Some(owner), expected) = self.owner_of(key).await?
                    && owner == node
                {
                    tracing::info!(
                        queue = key,
                        from = node,
                        "nats: taking over a queue whose owner is gone"
                    );
                    self.claim(key, expected).await?;
                }
                Ok(None)
            }
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// The most record bytes a forwarded read's answer carries: below the server's
    /// `max_payload`, with room for the records' other fields.
    fn forwarded_bytes(&self) -> usize {
        self.shared.page_budget.saturating_sub(64 * 1024).max(4096)
    }

    /// Runs a call forwarded here.
    async fn answer(&self, key: &str, call: Call) -> Answer {
        let queue = match self.owned_here(key).await {
            Ok(Some(queue)) => queue,
            Ok(None) => return Answer::NotOwner,
            Err(error) => return Answer::failed(&error),
        };
        let result = match call {
            Call::Append {
                records,
                quota,
                now,
            } => self
                .local_append(
                    key,
                    &queue,
                    records.into_iter().map(NewRecord::from).collect(),
                    &quota.into(),
                    Timestamp::from_millis(now),
                )
                .await
                .map(Answer::appended),
            Call::Read {
                ack,
                after,
                max_messages,
                max_bytes,
                now,
                mark,
            } => {
                let ack = ack.map(Ack::from);
                self.local_read(
                    key,
                    &queue,
                    ack.as_ref(),
                    after.map(Seq),
                    wire::batch_limit(max_messages, max_bytes),
                    Timestamp::from_millis(now),
                    mark,
                )
                .await
                .map(|(acked, batch)| Answer::read(acked, batch))
            }
            Call::MarkDelivered { seqs } => {
                let seqs: Vec<Seq> = seqs.into_iter().map(Seq).collect();
                self.local_mark_delivered(key, &queue, &seqs)
                    .await
                    .map(|()| Answer::Done)
            }
            Call::Ack { ack } => self
                .local_ack(key, &queue, &ack.into())
                .await
                .map(Answer::Count),
            Call::Stats => self.local_stats(key, &queue).await.map(Answer::stats),
            Call::Remove => self.local_remove(key, &queue).await.map(Answer::Count),
        };
        result.unwrap_or_else(|error| Answer::failed(&error))
    }

    /// Routes a call on `key`: `Here` with the queue if this node owns it (the caller runs
    /// the call on it), else the owner's answer to `call()`, taken apart by `answered`
    /// (`None`: not an answer to this call).
    async fn routed<T>(
        &self,
        key: &str,
        call: impl Fn() -> Call,
        answered: impl Fn(Answer) -> Option<T>,
    ) -> Result<Ran<T>> {
        for _ in 0..ROUTE_ATTEMPTS {
            let node = match self.route(key).await? {
                Route::Here(queue) => return Ok(Ran::Here(queue)),
                Route::Owner(node) => node,
            };
            if let Some(answer) = self.forward(key, &node, &call()).await? {
                return answered(answer).map(Ran::Owner).ok_or_else(mismatched);
            }
        }
        Err(moving())
    }

    /// A read, here or on the owner.
    #[allow(clippy::too_many_arguments)]
    async fn routed_read(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<(u64, ReadBatch)> {
        let key = key(recipient);
        let call = || Call::Read {
            ack: ack.map(WireAck::from),
            after: after.map(|seq| seq.0),
            max_messages: limit.max_messages as u64,
            // The answer must fit in one message (its first record always goes).
            max_bytes: limit.max_bytes.min(self.forwarded_bytes()) as u64,
            now: now.as_millis(),
            mark,
        };
        match self.routed(&key, call, Answer::into_read).await? {
            Ran::Here(queue) => {
                self.local_read(&key, &queue, ack, after, limit, now, mark)
                    .await
            }
            Ran::Owner(read) => Ok(read),
        }
    }

    /// The position of the recipient's last record in the log (by arrival), if any.
    async fn last_logged(&self, key: &str) -> Result<Option<u64>> {
        // From the leader: a lagging replica could miss the last records.
        let filter = format!("{}.l.{key}.*", self.shared.options.prefix);
        match self
            .shared
            .log
            .get_last_raw_message_by_subject(&filter)
            .await
        {
            Ok(message) => Ok(message
                .subject
                .rsplit('.')
                .next()
                .and_then(|position| position.parse().ok())),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// What the log holds at `position`; `from_leader` asks the stream's leader (after a
    /// refused write, where a replica may lag).
    async fn get_log(&self, key: &str, position: u64, from_leader: bool) -> Result<Found> {
        let subject = self.log_subject(key, position);
        let log = &self.shared.log;
        let message: Option<StreamMessage> = if from_leader {
            match log.get_last_raw_message_by_subject(&subject).await {
                Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                other => Some(other.map_err(|error| Error::storage(Retry::Yes, error))?),
            }
        } else {
            match log.direct_get_last_for_subject(&subject).await {
                Err(error) if error.kind() == DirectGetErrorKind::NotFound => None,
                other => Some(other.map_err(|error| Error::storage(Retry::Yes, error))?),
            }
        };
        message.map_or(Ok(Found::Missing), |message| {
            found(&subject, position, message)
        })
    }

    /// What the log holds at each of `positions`, in order, `GETS_IN_FLIGHT` at a time.
    async fn get_logged(&self, key: &str, positions: &[u64]) -> Result<Vec<(u64, Found)>> {
        futures::stream::iter(positions.iter().copied())
            .map(
                |position| async move { Ok((position, self.get_log(key, position, false).await?)) },
            )
            .buffered(GETS_IN_FLIGHT)
            .collect::<Vec<Result<(u64, Found)>>>()
            .await
            .into_iter()
            .collect()
    }

    /// As [`OwnedNatsStorage::get_logged`], each position found empty settled
    /// ([`OwnedNatsStorage::settle_missing`]): a record, or a position closed for good.
    async fn get_logged_settled(&self, key: &str, positions: &[u64]) -> Result<Vec<(u64, Found)>> {
        let mut found = self.get_logged(key, positions).await?;
        for (position, found) in &mut found {
            if matches!(found, Found::Missing) {
                *found = self.settle_missing(key, *position).await?;
            }
        }
        Ok(found)
    }

    /// Page `page`'s records, if it is sealed.
    async fn get_page(&self, key: &str, page: u64) -> Result<Option<Vec<StoredRecord>>> {
        match self.page_message(key, page).await? {
            Some((subject, payload)) => Ok(Some(page::decode(&subject, &payload)?)),
            None => Ok(None),
        }
    }

    /// Page `page` as stored, its subject and payload, if it is sealed.
    async fn page_message(&self, key: &str, page: u64) -> Result<Option<(String, Bytes)>> {
        let subject = self.page_subject(key, page);
        match self
            .shared
            .pages
            .direct_get_last_for_subject(&subject)
            .await
        {
            Ok(message) => Ok(Some((subject, message.payload))),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// Closes `position` with a tombstone, which the log keeps as the position's one
    /// message. False if a record got there first.
    async fn close_position(&self, key: &str, position: u64) -> Result<bool> {
        let mut headers = HeaderMap::new();
        headers.insert(GONE, GONE_LOST);
        let publish = Publish::build().headers(headers);
        match self.publish(self.log_subject(key, position), publish).await {
            Ok(_) => Ok(true),
            Err(_) => match self.get_log(key, position, true).await? {
                Found::Record(_) => Ok(false),
                Found::Gone { .. } => Ok(true),
                Found::Missing => Err(Error::storage_msg(
                    Retry::Yes,
                    format!("nats: could not close position {position} of a queue; retry"),
                )),
            },
        }
    }

    /// A position a direct get found empty, settled: asked of the stream's leader (a replica
    /// may lag), then closed with a tombstone if it is empty there too. A record that lands
    /// first refuses the tombstone and is returned; otherwise the position holds nothing
    /// for good.
    async fn settle_missing(&self, key: &str, position: u64) -> Result<Found> {
        if let found @ (Found::Record(_) | Found::Gone { .. }) =
            self.get_log(key, position, true).await?
        {
            return Ok(found);
        }
        if self.close_position(key, position).await? {
            return Ok(Found::Gone { lost: true });
        }
        self.get_log(key, position, true).await
    }

    async fn publish(
        &self,
        subject: String,
        publish: Publish,
    ) -> Result<async_nats::jetstream::publish::PublishAck> {
        let pending = self
            .shared
            .context
            .send_publish(subject, publish)
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        pending
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))
    }

    /// Publishes a record to its position in the log.
    async fn publish_record(
        &self,
        key: &str,
        position: u64,
        record: &StoredRecord,
        dedup: Option<Timestamp>,
    ) -> Result<Published> {
        let mut headers = HeaderMap::new();
        if let Some(now) = dedup {
            headers.insert(APPENDED, now.as_millis().to_string().as_str());
        }
        headers.insert(ID, record.id.to_string().as_str());
        headers.insert(SENT, record.sent_at.as_millis().to_string().as_str());
        if let Some(expires_at) = record.expires_at {
            headers.insert(EXPIRES, expires_at.as_millis().to_string().as_str());
            if let Some(grace) = self.shared.ttl_grace {
                let lifetime = expires_at
                    .as_millis()
                    .saturating_sub(record.sent_at.as_millis());
                headers.insert(NATS_MESSAGE_TTL, ttl_seconds(lifetime, grace).as_str());
            }
        }
        let mut publish = Publish::build()
            .headers(headers)
            .payload(record.body.clone());
        if dedup.is_some() {
            publish = publish.message_id(format!("{key}.{}", record.id));
        }
        let ack = self
            .publish(self.log_subject(key, position), publish)
            .await?;
        Ok(if ack.duplicate {
            Published::Duplicate(ack.sequence)
        } else {
            Published::Stored
        })
    }

    /// The position of the record at log sequence `sequence` and when its id was appended,
    /// if it is still there.
    async fn logged_at(&self, sequence: u64) -> Result<Option<(u64, Timestamp)>> {
        let message = match self.shared.log.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(error)
                if matches!(
                    error.kind(),
                    async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(Error::storage(Retry::Yes, error)),
        };
        let Some(position) = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|p| p.parse::<u64>().ok())
        else {
            return Ok(None);
        };
        let appended = message
            .headers
            .get(APPENDED)
            .and_then(|value| value.as_str().parse::<u64>().ok());
        let subject = message.subject.to_string();
        Ok(match found(&subject, position, message)? {
            Found::Record(record) => Some((
                position,
                appended.map_or(record.sent_at, Timestamp::from_millis),
            )),
            _ => None,
        })
    }

    /// Writes the queue's state by compare-and-set; the caller holds its turn. A refused
    /// write (another writer) unloads the queue and fails, retryably.
    async fn write_state(&self, key: &str, queue: &Queue) -> Result<()> {
        let (epoch, payload, revision, sealed_below, written) = {
            let owned = queue.owned.lock();
            let owned = owned.as_ref().ok_or_else(reloaded)?;
            (
                owned.epoch,
                owned.meta.encode(),
                owned.revision,
                owned.sealed_below,
                Written::of(&owned.meta, owned.sealed_below),
            )
        };
        let mut headers = HeaderMap::new();
        headers.insert(SEALED, sealed_below.to_string().as_str());
        let publish = Publish::build()
            .headers(headers)
            .payload(Bytes::from(payload))
            .expected_last_subject_sequence(revision);
        match publish_ack(&self.shared.context, self.state_subject(key), publish).await {
            Ok(Some(sequence)) => {
                if let Some(owned) = queue.owned.lock().as_mut()
                    && owned.epoch == epoch
                {
                    owned.revision = sequence;
                    owned.written = written;
                }
                Ok(())
            }
            Ok(None) => {
                self.unload(queue, epoch);
                Err(Error::storage_msg(
                    Retry::Yes,
                    "nats: another writer changed this queue's state (is a second node using \
                     the same streams?); it is loaded afresh on the next call",
                ))
            }
            Err(error) => {
                self.unload(queue, epoch);
                Err(error)
            }
        }
    }

    /// Queues the pages wholly acked for removal.
    async fn remove_pages(&self, key: &str, pages: std::ops::Range<u64>) {
        for page in pages {
            if self
                .shared
                .removals
                .send(self.page_subject(key, page))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Seals the queue's next pages whose positions are all settled (module docs, "Layout").
    /// Best effort: a page not sealed now is sealed by a later append, and until then read
    /// from the log.
    async fn seal_ready(&self, key: &str, queue: &Queue) {
        loop {
            let (epoch, page, records) = {
                let mut owned = queue.owned.lock();
                let Some(owned) = owned.as_mut() else {
                    return;
                };
                let page = owned.sealed_below;
                let range = page::positions_of(page);
                if !owned.page_ready() {
                    return;
                }
                let live: Vec<u64> = owned
                    .meta
                    .live_from(range.start)
                    .map(|(p, _)| p)
                    .take_while(|p| *p < range.end)
                    .collect();
                // A live record not in memory (loaded from a state that was behind): read
                // from the log when this page is.
                if live.iter().any(|p| !owned.open.contains_key(p)) {
                    return;
                }
                let mut budget = self.shared.page_budget;
                let records: Vec<StoredRecord> = live
                    .iter()
                    .map(|p| owned.open[p].clone())
                    .filter(|record| {
                        let size = page::encoded_len([record]);
                        let fits = size <= budget;
                        budget = budget.saturating_sub(size);
                        fits
                    })
                    .collect();
                owned.sealing = true;
                (owned.epoch, page, records)
            };
            let sealed = records.is_empty()
                || self
                    .publish(
                        self.page_subject(key, page),
                        Publish::build().payload(Bytes::from(page::encode(&records))),
                    )
                    .await
                    .is_ok();
            let mut owned = queue.owned.lock();
            let Some(owned) = owned.as_mut().filter(|owned| owned.epoch == epoch) else {
                return;
            };
            owned.sealing = false;
            if !sealed {
                return;
            }
            owned.sealed_below = owned.sealed_below.max(page + 1);
            let range = page::positions_of(page);
            owned.open.retain(|p, _| !range.contains(p));
        }
    }

    /// A session's read, with its ack and marks (see [`Storage::read_for_delivery`]).
    #[allow(clippy::too_many_arguments)]
    async fn local_read(
        &self,
        key: &str,
        queue: &Queue,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<(u64, ReadBatch)> {
        let start = after.map_or(0, |after| after.0.saturating_add(1));
        // Under the queue's lock: the ack, and what to read where.
        let (epoch, acked, candidates, sealed_below, mut in_memory) = {
            let mut owned = queue.owned.lock();
            let owned = owned.as_mut().ok_or_else(reloaded)?;
            let acked = ack.map(|ack| owned.meta.ack(ack)).unwrap_or_default();
            for position in &acked.positions {
                owned.open.remove(position);
            }
            let candidates: Vec<(u64, u32)> = owned
                .readable_from(start)
                .take(limit.max_messages.clamp(1, MAX_READ_BATCH) * 2)
                .collect();
            let in_memory: HashMap<u64, StoredRecord> = candidates
                .iter()
                .filter_map(|(p, _)| owned.open.get(p).map(|r| (*p, r.clone())))
                .collect();
            (
                owned.epoch,
                acked,
                candidates,
                owned.sealed_below,
                in_memory,
            )
        };
        // The rest from their pages, one request a page, then the log.
        let wanted_pages: Vec<u64> = {
            let mut pages: Vec<u64> = candidates
                .iter()
                .filter(|(p, _)| !in_memory.contains_key(p) && page::page_of(*p) < sealed_below)
                .map(|(p, _)| page::page_of(*p))
                .collect();
            pages.dedup();
            pages
        };
        let fetched: Vec<Result<Option<Vec<StoredRecord>>>> = futures::stream::iter(wanted_pages)
            .map(|page| self.get_page(key, page))
            .buffered(GETS_IN_FLIGHT)
            .collect()
            .await;
        for page in fetched {
            // A page that cannot be read is read from the log.
            for record in page.ok().flatten().unwrap_or_default() {
                in_memory.insert(record.seq.0, record);
            }
        }
        let from_log: Vec<u64> = candidates
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !in_memory.contains_key(p))
            .collect();
        let mut missing = Vec::new();
        for (position, found) in self.get_logged_settled(key, &from_log).await? {
            match found {
                Found::Record(record) => {
                    in_memory.insert(position, record);
                }
                Found::Gone { .. } | Found::Missing => missing.push(position),
            }
        }
        let mut batch = ReadBatch::default();
        let mut bytes = 0usize;
        for (position, deliveries) in candidates {
            let Some(mut record) = in_memory.remove(&position) else {
                continue;
            };
            if record.expires_at.is_some_and(|at| at <= now) {
                batch.expired.push(Seq(position));
                if batch.expired.len() >= limit.max_messages {
                    break;
                }
                continue;
            }
            if batch.records.len() >= limit.max_messages
                || (!batch.records.is_empty() && bytes + record.body.len() > limit.max_bytes)
            {
                break;
            }
            bytes += record.body.len();
            record.delivery_count = deliveries;
            batch.records.push(record);
        }
        // What changed, written once.
        let (changed, pages) = {
            let mut owned = queue.owned.lock();
            let owned = owned
                .as_mut()
                .filter(|owned| owned.epoch == epoch)
                .ok_or_else(reloaded)?;
            // A live position with nothing in the log nor a page: the server removed it
            // (its TTL, or `max_age`). Counted as lost.
            for position in &missing {
                owned.meta.abandon(*position, true);
                owned.open.remove(position);
            }
            if mark {
                let seqs: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
                owned.meta.mark_delivered(&seqs);
            }
            batch.lost_total = owned.meta.lost_total;
            batch.lost_unconfirmed = owned.meta.lost_total - owned.meta.lost_confirmed;
            let changed = !acked.positions.is_empty()
                || !missing.is_empty()
                || (mark && !batch.records.is_empty())
                || ack.is_some_and(|ack| ack.lost_confirmed_through.is_some());
            (changed, owned.pages_to_remove())
        };
        // The turn only for the write (a read that changes nothing waits for no other's):
        // the state written is the queue's as it is then, this read's changes included,
        // unless the queue was loaded afresh meanwhile, without them.
        if changed {
            let _turn = queue.turn.lock().await;
            if queue.owned.lock().as_ref().map(|owned| owned.epoch) != Some(epoch) {
                return Err(reloaded());
            }
            self.write_state(key, queue).await?;
        }
        self.remove_pages(key, pages).await;
        Ok((acked.acked, batch))
    }
}

/// Unloads the queues idle for the dedup window and `stale_reservation` (a margin for the
/// nodes' clocks), once a minute (or a quarter of the window), while the storage lives. Past
/// it the sender-chosen ids a queue remembers are spent.
async fn unload_idle_in_background(shared: std::sync::Weak<Shared>) {
    let Some(idle) = shared
        .upgrade()
        .map(|shared| shared.options.dedup_window + shared.options.stale_reservation)
    else {
        return;
    };
    let mut ticks = tokio::time::interval((idle / 4).min(Duration::from_secs(60)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let unloaded = OwnedNatsStorage { shared }.unload_idle(idle).await;
        if unloaded > 0 {
            tracing::debug!(unloaded, "nats: unloaded idle queues");
        }
    }
}

fn key(recipient: &RecipientId) -> String {
    crate::hex::encode(recipient.as_bytes())
}

fn moving() -> Error {
    Error::storage_msg(
        Retry::Yes,
        format!("nats: the queue's owner changed {ROUTE_ATTEMPTS} times during the call; retry"),
    )
}

fn mismatched() -> Error {
    Error::storage_msg(
        Retry::No,
        "nats: the queue's owner answered another call than the one asked (a node of another \
         build?)",
    )
}

/// Answers the calls other nodes forward to this one, each in a task of its own, until the
/// storage is dropped.
async fn serve(
    shared: std::sync::Weak<Shared>,
    mut calls: async_nats::Subscriber,
    mut stop: tokio::sync::oneshot::Receiver<Stopped>,
) {
    loop {
        let message = tokio::select! {
            message = calls.next() => message,
            stopped = &mut stop => {
                // Closed, or the storage dropped: the server stops routing calls here.
                let _ = calls.unsubscribe().await;
                if let Ok(stopped) = stopped {
                    let _ = stopped.send(());
                }
                return;
            }
        };
        let Some(message) = message else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let storage = OwnedNatsStorage { shared };
        tokio::spawn(async move {
            let Some(reply) = message.reply.clone() else {
                return;
            };
            let key = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(QUEUE))
                .map(|value| value.as_str().to_owned());
            let answer = match (key, crate::codec::from_bytes::<Call>(&message.payload)) {
                (Some(key), Ok(call)) => storage.answer(&key, call).await,
                (_, Err(error)) => Answer::failed(&error),
                (None, _) => Answer::failed(&Error::storage_msg(
                    Retry::No,
                    "nats: a forwarded call without its queue",
                )),
            };
            let max_payload = storage.shared.client.server_info().max_payload;
            let encoded = crate::codec::to_bytes(&answer).and_then(|bytes| {
                if bytes.len() <= max_payload {
                    return Ok(bytes);
                }
                // Not sent: the caller would wait out its timeout. What the call changed
                // stands (an ack is idempotent; a delivery counted twice errs safe).
                crate::codec::to_bytes(&Answer::failed(&Error::storage_msg(
                    Retry::Yes,
                    format!(
                        "nats: the owner's answer is {} bytes, over the server's max_payload \
                         of {max_payload}; retry",
                        bytes.len()
                    ),
                )))
            });
            match encoded {
                Ok(bytes) => {
                    if let Err(error) = storage.shared.client.publish(reply, bytes.into()).await {
                        tracing::debug!(%error, "nats: answering a forwarded call failed");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "nats: a forwarded call's answer did not encode")
                }
            }
        });
    }
}

fn reloaded() -> Error {
    Error::storage_msg(
        Retry::Yes,
        "nats: the queue was unloaded or removed while the call ran; retry",
    )
}

/// The calls on a queue this node owns.
impl OwnedNatsStorage {
    async fn local_append(
        &self,
        key: &str,
        queue: &Arc<Queue>,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        if records.iter().any(|r| r.dedup) && quota.dedup_window > self.shared.options.dedup_window
        {
            return Err(invalid(
                "dedup_window",
                format!(
                    "is {:?}, above this NATS storage's dedup_window of {:?} \
                     (NatsOptions::dedup_window)",
                    quota.dedup_window, self.shared.options.dedup_window
                ),
            ));
        }
        let mut sizes = Vec::with_capacity(records.len());
        for record in &records {
            sizes.push(
                u32::try_from(record.body.len()).map_err(|_| Error::MessageTooLarge {
                    size: record.body.len(),
                    max: u32::MAX as usize,
                })?,
            );
        }
        let permits = records.len().clamp(1, IN_FLIGHT_PER_QUEUE) as u32;
        let _permits = queue
            .in_flight
            .acquire_many(permits)
            .await
            .map_err(|_| reloaded())?;
        // A new queue's state is written before its first record, so a load always finds
        // the state its records follow.
        let unwritten = queue.owned.lock().as_ref().ok_or_else(reloaded)?.revision == 0;
        if unwritten {
            let _turn = queue.turn.lock().await;
            let still = queue.owned.lock().as_ref().ok_or_else(reloaded)?.revision == 0;
            if still {
                self.write_state(key, queue).await?;
            }
        }
        let window = quota.dedup_window_ms();
        let mut outcome: Vec<Option<Appended>> = vec![None; records.len()];
        // A sender-chosen id repeated within the append: (its index, the first one's).
        let mut same_as: Vec<(usize, usize)> = Vec::new();
        // Decided in memory, under the queue's lock: duplicates, then positions.
        let (epoch, dropped, pending, stored) = {
            let mut owned = queue.owned.lock();
            let owned = owned.as_mut().ok_or_else(reloaded)?;
            let mut seen: HashMap<MessageId, usize> = HashMap::new();
            for (i, record) in records.iter().enumerate().filter(|(_, r)| r.dedup) {
                if let Some(&first) = seen.get(&record.id) {
                    same_as.push((i, first));
                    continue;
                }
                seen.insert(record.id, i);
                if let Some(&(position, sent)) = owned.ids.get(&record.id)
                    && now.as_millis().saturating_sub(sent) < window
                {
                    if owned.unsettled.contains(&position) {
                        // Its original's publish has not answered: it may yet fail.
                        return Err(Error::storage_msg(
                            Retry::Yes,
                            "nats: the first append of this id is still being stored; retry",
                        ));
                    }
                    outcome[i] = Some(Appended::Duplicate(Seq(position)));
                }
            }
            let storing: Vec<usize> = (0..records.len())
                .filter(|i| outcome[*i].is_none() && !same_as.iter().any(|(j, _)| j == i))
                .collect();
            let storing_sizes: Vec<u32> = storing.iter().map(|&i| sizes[i]).collect();
            let plan = owned.meta.reserve(&storing_sizes, quota, 0, 0)?;
            owned.meta.forget_reservations(u64::MAX);
            for position in &plan.dropped {
                owned.open.remove(position);
            }
            let mut stored = Vec::with_capacity(storing.len());
            for (k, &i) in storing.iter().enumerate() {
                let position = plan.first + k as u64;
                let record = &records[i];
                let stored_record = StoredRecord {
                    seq: Seq(position),
                    id: record.id,
                    sent_at: record.sent_at,
                    expires_at: record.expires_at,
                    delivery_count: 0,
                    body: Bytes::from(record.body.clone()),
                };
                owned.unsettled.insert(position);
                owned.open.insert(position, stored_record.clone());
                if record.dedup {
                    owned.ids.insert(record.id, (position, now.as_millis()));
                    owned.id_remembered_at = Some(self.since_started());
                }
                stored.push((i, stored_record));
            }
            if owned.ids.len() > 4 * IN_FLIGHT_PER_QUEUE {
                let oldest = now
                    .as_millis()
                    .saturating_sub(self.shared.options.dedup_window.as_millis() as u64);
                owned.ids.retain(|_, (_, sent)| *sent >= oldest);
            }
            (
                owned.epoch,
                plan.dropped.len() as u64,
                owned.meta.live().0,
                stored,
            )
        };
        // Published `IN_FLIGHT_PER_QUEUE` at a time, so a load finds every record that
        // landed out of order within that distance of the last.
        let mut failure = None;
        let mut duplicates: Vec<(usize, u64, u64)> = Vec::new();
        for chunk in stored.chunks(IN_FLIGHT_PER_QUEUE) {
            let answers = futures::future::join_all(chunk.iter().map(|(i, record)| {
                self.publish_record(key, record.seq.0, record, records[*i].dedup.then_some(now))
            }))
            .await;
            for ((i, record), answer) in chunk.iter().zip(answers) {
                match answer {
                    Ok(Published::Stored) => outcome[*i] = Some(Appended::Stored(record.seq)),
                    Ok(Published::Duplicate(sequence)) => {
                        duplicates.push((*i, record.seq.0, sequence));
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        // The log knew an id this node had not seen (appended before a restart): the
        // original's position, if it is within the window; else stored after all.
        for (i, position, sequence) in duplicates {
            match self.logged_at(sequence).await {
                Ok(Some((original, sent)))
                    if now.as_millis().saturating_sub(sent.as_millis()) < window =>
                {
                    outcome[i] = Some(Appended::Duplicate(Seq(original)));
                    if let Some(owned) = queue.owned.lock().as_mut()
                        && owned.epoch == epoch
                    {
                        owned.meta.abandon(position, false);
                        owned.open.remove(&position);
                        owned
                            .ids
                            .insert(records[i].id, (original, sent.as_millis()));
                        owned.id_remembered_at = Some(self.since_started());
                    }
                }
                Ok(_) => {
                    let record = stored.iter().find(|(j, _)| *j == i).map(|(_, r)| r);
                    match self
                        .publish_record(key, position, record.expect("stored"), None)
                        .await
                    {
                        Ok(_) => outcome[i] = Some(Appended::Stored(Seq(position))),
                        Err(error) => {
                            failure.get_or_insert(error);
                        }
                    }
                }
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            // Whatever landed, the next load finds (and closes what did not).
            self.unload(queue, epoch);
            return Err(error);
        }
        {
            let mut owned = queue.owned.lock();
            if let Some(owned) = owned.as_mut().filter(|owned| owned.epoch == epoch) {
                for (_, record) in &stored {
                    owned.unsettled.remove(&record.seq.0);
                }
            }
        }
        // A drop is a loss the next read reports: written now, so a node that stops before
        // then does not forget it. The records are stored whatever this write does.
        if dropped > 0 {
            let _turn = queue.turn.lock().await;
            if let Err(error) = self.write_state(key, queue).await {
                // The queue is unloaded: the next call loads the state before the drops, so
                // the dropped records come back (module docs).
                tracing::debug!(%error, "nats: writing a queue's drops failed");
            }
        }
        // Sealed off the send's path: its publish would add a round trip to one send in 15.
        let page_ready = queue.owned.lock().as_ref().is_some_and(Owned::page_ready);
        if page_ready {
            let (storage, key, queue) = (self.clone(), key.to_owned(), queue.clone());
            tokio::spawn(async move { storage.seal_ready(&key, &queue).await });
        }
        for (i, first) in same_as {
            outcome[i] = outcome[first].map(|o| Appended::Duplicate(o.seq()));
        }
        Ok(AppendOutcome {
            records: outcome
                .into_iter()
                .map(|o| o.expect("every record decided"))
                .collect(),
            dropped,
            pending,
            live_elsewhere: false,
        })
    }

    async fn local_mark_delivered(&self, key: &str, queue: &Queue, seqs: &[Seq]) -> Result<()> {
        let _turn = queue.turn.lock().await;
        let changed = {
            let mut owned = queue.owned.lock();
            let owned = owned.as_mut().ok_or_else(reloaded)?;
            let before = owned.meta.clone();
            owned.meta.mark_delivered(seqs);
            owned.meta != before
        };
        if changed {
            self.write_state(key, queue).await?;
        }
        Ok(())
    }

    async fn local_ack(&self, key: &str, queue: &Queue, ack: &Ack) -> Result<u64> {
        let _turn = queue.turn.lock().await;
        let (acked, changed, pages) = {
            let mut owned = queue.owned.lock();
            let owned = owned.as_mut().ok_or_else(reloaded)?;
            let before = owned.meta.clone();
            let acked = owned.meta.ack(ack);
            for position in &acked.positions {
                owned.open.remove(position);
            }
            (acked.acked, owned.meta != before, owned.pages_to_remove())
        };
        if changed {
            self.write_state(key, queue).await?;
        }
        self.remove_pages(key, pages).await;
        Ok(acked)
    }

    async fn local_stats(&self, key: &str, queue: &Queue) -> Result<RecipientStats> {
        let (stats, oldest, in_memory, sealed) = {
            let owned = queue.owned.lock();
            let owned = owned.as_ref().ok_or_else(reloaded)?;
            let (messages, bytes) = owned.meta.live();
            let oldest = owned.meta.live_from(0).next().map(|(p, _)| p);
            let in_memory = oldest.and_then(|p| owned.open.get(&p).map(|r| r.sent_at));
            (
                RecipientStats {
                    messages,
                    bytes,
                    oldest_sent_at: None,
                    newest_seq: owned.meta.newest().map(Seq),
                    lost: owned.meta.lost_total - owned.meta.lost_confirmed,
                },
                oldest,
                in_memory,
                owned.sealed_below,
            )
        };
        let mut oldest_sent_at = in_memory;
        if let (Some(position), None) = (oldest, oldest_sent_at) {
            if page::page_of(position) < sealed
                && let Ok(Some(records)) = self.get_page(key, page::page_of(position)).await
            {
                oldest_sent_at = records
                    .iter()
                    .find(|r| r.seq.0 == position)
                    .map(|r| r.sent_at);
            }
            if oldest_sent_at.is_none()
                && let Found::Record(record) = self.get_log(key, position, false).await?
            {
                oldest_sent_at = Some(record.sent_at);
            }
        }
        Ok(RecipientStats {
            oldest_sent_at,
            ..stats
        })
    }

    async fn local_remove(&self, key: &str, queue: &Queue) -> Result<u64> {
        let _turn = queue.turn.lock().await;
        let mut log = self.shared.log.clone();
        let log_bound = log
            .info()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?
            .state
            .last_sequence;
        let mut pages = self.shared.pages.clone();
        let pages_bound = pages
            .info()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?
            .state
            .last_sequence;
        // The state stays, emptied, so the next queue's positions and loss total go on from
        // this one's.
        let (messages, written) = {
            let mut owned = queue.owned.lock();
            let owned = owned.as_mut().ok_or_else(reloaded)?;
            let (messages, _) = owned.meta.live();
            let next = owned.meta.next();
            owned.meta = owned.meta.emptied();
            owned.open.clear();
            owned.ids.clear();
            // Appends still in flight settle into nothing: their positions are below the
            // new floor.
            owned.unsettled.clear();
            owned.epoch = EPOCHS.fetch_add(1, Ordering::Relaxed);
            owned.sealed_below = owned.sealed_below.max(page::page_of(next));
            owned.removed_below = owned.sealed_below;
            (messages, owned.revision != 0)
        };
        if !written {
            return Ok(0);
        }
        self.write_state(key, queue).await?;
        // One purge by wildcard each: it walks the stream's subjects, fine for a call this
        // rare. Bounded, so records appended from here on stay. (Up to sequence 1 the
        // server reads as "no bound": skip it.)
        for (stream, kind, bound) in [
            (&self.shared.log, "l", log_bound),
            (&self.shared.pages, "p", pages_bound),
        ] {
            if bound > 0 {
                stream
                    .purge()
                    .filter(format!("{}.{kind}.{key}.*", self.shared.options.prefix))
                    .sequence(bound + 1)
                    .await
                    .map_err(|error| Error::storage(Retry::Yes, error))?;
            }
        }
        Ok(messages)
    }
}

#[async_trait]
impl Storage for OwnedNatsStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_max_read_batch(MAX_READ_BATCH)
            .with_durable(true)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        let key = key(recipient);
        let call = || Call::Append {
            records: records.iter().cloned().map(wire::Record::from).collect(),
            quota: quota.into(),
            now: now.as_millis(),
        };
        match self.routed(&key, call, Answer::into_appended).await? {
            Ran::Here(queue) => self.local_append(&key, &queue, records, quota, now).await,
            Ran::Owner(outcome) => Ok(outcome),
        }
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        let (_, batch) = self
            .routed_read(recipient, None, after, limit, now, false)
            .await?;
        Ok(batch)
    }

    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<DeliveryRead> {
        let (acked, batch) = self
            .routed_read(recipient, ack, after, limit, now, true)
            .await?;
        Ok(DeliveryRead { acked, batch })
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let key = key(recipient);
        let call = || Call::MarkDelivered {
            seqs: seqs.iter().map(|seq| seq.0).collect(),
        };
        match self.routed(&key, call, Answer::into_done).await? {
            Ran::Here(queue) => self.local_mark_delivered(&key, &queue, seqs).await,
            Ran::Owner(()) => Ok(()),
        }
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, _now: Timestamp) -> Result<u64> {
        let key = key(recipient);
        let call = || Call::Ack { ack: ack.into() };
        match self.routed(&key, call, Answer::into_count).await? {
            Ran::Here(queue) => self.local_ack(&key, &queue, ack).await,
            Ran::Owner(acked) => Ok(acked),
        }
    }

    async fn purge(
        &self,
        _now: Timestamp,
        _idle_before: Option<Timestamp>,
        _budget: usize,
    ) -> Result<PurgeOutcome> {
        // The streams' max_age (and from 2.11 each record's TTL) remove by the server's clock.
        Ok(PurgeOutcome::default())
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let key = key(recipient);
        match self
            .routed(&key, || Call::Stats, Answer::into_stats)
            .await?
        {
            Ran::Here(queue) => self.local_stats(&key, &queue).await,
            Ran::Owner(stats) => Ok(stats),
        }
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let key = key(recipient);
        match self
            .routed(&key, || Call::Remove, Answer::into_count)
            .await?
        {
            Ran::Here(queue) => self.local_remove(&key, &queue).await,
            Ran::Owner(removed) => Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    fn record(i: u8) -> NewRecord {
        NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: Timestamp::now_system(),
            expires_at: None,
            body: vec![i],
        }
    }

    /// A storage on streams of its own (`OQT_*`), and their name.
    async fn own_storage(url: &str) -> (OwnedNatsStorage, String) {
        let name = format!("OQT_{}", MessageId::generate());
        let storage = NatsOptions::default()
            .stream(&name)
            .prefix(&name)
            .connect_owned(url)
            .await
            .unwrap();
        (storage, name)
    }

    /// Closes `storage` and deletes the streams of [`own_storage`].
    async fn delete_streams(url: &str, name: &str, storage: OwnedNatsStorage) {
        storage.close().await.unwrap();
        let context = jetstream::new(async_nats::connect(url).await.unwrap());
        for suffix in ["_LOG", "_PAGES", "_STATE"] {
            let _ = context.delete_stream(format!("{name}{suffix}")).await;
        }
    }

    /// Waits until only the storage's map holds `key`'s queue (a page being sealed in the
    /// background holds it too), for at most 10 s.
    async fn only_the_map_holds(storage: &OwnedNatsStorage, key: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let count = storage.shared.queues.lock().get(key).map(Arc::strong_count);
            if count == Some(1) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key}: held {count:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// 20 records, three read and marked, two of them acked (the state written), then five
    /// more the state does not hear of. Unloaded, the queue's state is written first: with
    /// the five gone from the log (as a TTL would remove them), the queue loads with its
    /// records and counts, the five counted lost, and its next append takes the next
    /// position, not one of theirs. A queue a call holds stays loaded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_queue_is_unloaded_and_loads_again_as_it_was() {
        let Some(url) = super::super::tests::url() else {
            return;
        };
        let (storage, name) = own_storage(&url).await;
        let (idle, held) = (
            RecipientId::new("idle").unwrap(),
            RecipientId::new("held").unwrap(),
        );
        let now = Timestamp::now_system();
        let mut seqs = Vec::new();
        let append = async |who: &RecipientId, i: u8| {
            let outcome = storage
                .append_one(who, record(i), &Quota::UNLIMITED, now)
                .await
                .unwrap();
            outcome.record.seq()
        };
        for i in 0..20 {
            seqs.push(append(&idle, i).await);
            append(&held, i).await;
        }
        let limit = BatchLimit {
            max_messages: 3,
            max_bytes: usize::MAX,
        };
        let read = storage
            .read_for_delivery(&idle, None, None, limit, now)
            .await
            .unwrap();
        assert_eq!(read.batch.records.len(), 3);
        let ack = Ack {
            through: Some(seqs[1]),
            ..Ack::default()
        };
        assert_eq!(storage.ack(&idle, &ack, now).await.unwrap(), 2);
        for i in 20..25 {
            seqs.push(append(&idle, i).await);
        }
        let lost_before = storage.stats(&idle).await.unwrap().lost;
        only_the_map_holds(&storage, &key(&idle)).await;
        let holding = storage.queue(&key(&held));

        assert_eq!(storage.unload_idle(Duration::ZERO).await, 1);
        assert!(!storage.shared.queues.lock().contains_key(&key(&idle)));
        assert!(
            holding.owned.lock().is_some(),
            "a queue a call holds stays loaded"
        );
        let state = storage
            .shared
            .states
            .get_last_raw_message_by_subject(&storage.state_subject(&key(&idle)))
            .await
            .unwrap();
        assert_eq!(
            Meta::decode(&state.payload).unwrap().next(),
            seqs[24].0 + 1,
            "the state written on unloading knows every position"
        );
        for seq in &seqs[20..] {
            let subject = storage.log_subject(&key(&idle), seq.0);
            storage.shared.log.purge().filter(subject).await.unwrap();
        }

        let all = storage.read_all(&idle, now).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            seqs[2..20].to_vec()
        );
        assert_eq!(
            all.iter().map(|r| r.body[0]).collect::<Vec<_>>(),
            (2..20).collect::<Vec<u8>>()
        );
        let counts: Vec<u32> = all.iter().map(|r| r.delivery_count).collect();
        assert_eq!(counts[0], 1, "{counts:?}");
        assert!(counts[1..].iter().all(|&c| c == 0), "{counts:?}");
        let next = storage
            .append_one(&idle, record(25), &Quota::UNLIMITED, now)
            .await
            .unwrap();
        assert_eq!(next.record.seq().0, seqs[24].0 + 1);
        let stats = storage.stats(&idle).await.unwrap();
        assert_eq!((stats.messages, stats.lost - lost_before), (19, 5));

        drop(holding);
        delete_streams(&url, &name, storage).await;
    }

    /// 35 records and no state written past the queue's making (nobody read): pages 0 and 1
    /// sealed, 1..=10 gone from the log (as a TTL removes them), and position 20 arriving
    /// last. A node that loads the queue anew takes 1..=10 from their page, finds 30..=35
    /// past the pages though the last arrival lies before them, and loses nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_takes_records_from_pages_and_the_log_past_a_stale_state() {
        let Some(url) = super::super::tests::url() else {
            return;
        };
        let (storage, name) = own_storage(&url).await;
        let who = RecipientId::new("stale").unwrap();
        let key = key(&who);
        let now = Timestamp::now_system();
        let mut seqs = Vec::new();
        for i in 0..35 {
            let outcome = storage
                .append_one(&who, record(i), &Quota::UNLIMITED, now)
                .await
                .unwrap();
            seqs.push(outcome.record.seq().0);
        }
        assert_eq!(
            seqs,
            (1..=35).collect::<Vec<u64>>(),
            "fresh streams start at 1"
        );
        only_the_map_holds(&storage, &key).await;
        assert_eq!(
            storage
                .queue(&key)
                .owned
                .lock()
                .as_ref()
                .unwrap()
                .sealed_below,
            2
        );
        for position in 1..=10 {
            let subject = storage.log_subject(&key, position);
            storage.shared.log.purge().filter(subject).await.unwrap();
        }
        let page = storage.get_page(&key, 1).await.unwrap().unwrap();
        let twenty = page.into_iter().find(|r| r.seq.0 == 20).unwrap();
        let subject = storage.log_subject(&key, 20);
        storage.shared.log.purge().filter(subject).await.unwrap();
        storage
            .publish_record(&key, 20, &twenty, None)
            .await
            .unwrap();
        assert_eq!(storage.last_logged(&key).await.unwrap(), Some(20));

        storage.forget_queues();
        let all = storage.read_all(&who, now).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
            (1..=35).collect::<Vec<u64>>()
        );
        assert_eq!(
            all.iter().map(|r| r.body[0]).collect::<Vec<_>>(),
            (0..35).collect::<Vec<u8>>()
        );
        let stats = storage.stats(&who).await.unwrap();
        assert_eq!((stats.messages, stats.lost), (35, 0));
        let next = storage
            .append_one(&who, record(35), &Quota::UNLIMITED, now)
            .await
            .unwrap();
        assert_eq!(next.record.seq().0, 36);

        delete_streams(&url, &name, storage).await;
    }
}
