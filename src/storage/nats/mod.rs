//! [`NatsStorage`]: queues in NATS JetStream (feature `nats`), shared by every node that
//! connects to the same server or cluster. Pair it with
//! [`NatsCoordination`](crate::NatsCoordination) so nodes wake each other:
//!
//! ```no_run
//! # async fn run() -> offline_queue::Result<()> {
//! use std::sync::Arc;
//! use offline_queue::{NatsCoordination, NatsStorage, OfflineQueue};
//!
//! let url = "nats://127.0.0.1:4222";
//! let queue = OfflineQueue::builder()
//!     .storage(Arc::new(NatsStorage::connect(url).await?))
//!     .coordination(Arc::new(NatsCoordination::connect(url).await?))
//!     .build()?;
//! tokio::spawn(queue.wakeup_listener());
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! Three streams, named after [`NatsOptions::stream`] (`OFFLINE_QUEUE` by default), subjects
//! under [`NatsOptions::prefix`] (`oq`), the recipient id in hex (so no byte of it can name
//! another subject: hex holds no `.`, `*`, `>`, space or NUL):
//! - `OFFLINE_QUEUE`, subjects `oq.r.<hex>.<position>`: **one subject per record**, at most
//!   one message each. The position is the record's [`Seq`]. A subject per record is what
//!   reads fast without a consumer per recipient: each record is one direct get of an exact
//!   subject, an index lookup, where reading a subject per recipient from a sequence walks the
//!   interleaved stream (BENCHMARKS.md, "Reading a recipient's backlog from NATS JetStream").
//! - `OFFLINE_QUEUE_META`, subjects `oq.m.<hex>`: the recipient's queue state, one message
//!   (a few bytes per stored record: size, delivery count, removed), **changed only by
//!   compare-and-set**: a publish expecting the subject's last sequence, retried on a
//!   conflict. Positions, quotas, overflow, acks, delivery counts and losses are each decided
//!   on this value and written in one publish, so they are atomic per recipient across every
//!   node.
//!   Metas live apart from records because each change rewrites one, and the holes the old
//!   versions leave slow the server's purges of records fivefold (measured on 2.9.10: 35,000
//!   purges of exact subjects a second in a stream of records alone, 7,300 beside metas).
//! - `OFFLINE_QUEUE_DEDUP`, subjects `oq.d.<hex>.<message id>`: one entry per sender-chosen id,
//!   holding its position and when it was appended, kept [`NatsOptions::dedup_window`].
//!
//! Nothing is kept per recipient on the server but these messages: no consumer, no
//! subscription. An offline recipient costs its records and one meta.
//!
//! # A session's read
//! One step: read the meta; apply the client's ack to it; fetch the next records by direct
//! gets of their subjects (64 at a time); count their deliveries; write the meta back once.
//! On a server of 2.11 or later the 64 are one request (a batched direct get of the last
//! message of each listed subject), which drained 0–14 % faster on 2.15.1 (BENCHMARKS.md); a server that
//! refuses it is read one record a request ([`NatsOptions::batched_reads`]). Each answer is
//! bounded by the server's `max_payload` in bytes (unbounded, one could fill the server's
//! whole `max_pending` for the connection, which the server then closes as a slow
//! consumer), and what an answer leaves out is asked for again.
//! The records the ack took are queued for removal and purged in the background, one purge
//! of an exact subject each, 64 in flight (a purge by wildcard walks every subject of the
//! stream's blocks: 5 ms each on 10,000 records). On 2.9 a removal costs the server about as
//! much as a read, so the session never waits for one; a gone record not yet removed is
//! never read, and at most 65,536 wait per node (past that, acks wait for room). What a node
//! that stops leaves queued, the stream's `max_age` removes.
//!
//! # An append
//! 1. Reads the dedup entries of its sender-chosen ids. An id claimed within
//!    `Quota::dedup_window` answers with the original's position (even if it was acked),
//!    once the claim is checked against that position (below).
//! 2. Reads the meta (or starts from the node's last view of it), reserves positions under
//!    the quota (dropping the oldest, counted as lost, with `Overflow::DropOldest`) and
//!    writes the meta back by compare-and-set.
//! 3. Claims each sender-chosen id for its position (a publish expecting the entry it read):
//!    if another append claimed it meanwhile, ours gives way (a tombstone over our position)
//!    and the append reports the duplicate.
//! 4. Publishes each record on its position's subject, expecting it empty.
//!
//! **Claims go first, so a retried send is stored once.** A send can fail after its record
//! landed (the publish's answer lost with the connection); its sender retries with the same
//! id and finds the claim. A claim whose record never landed stays behind too, so a claim
//! stands only for a position that holds its record, held it (acked or dropped since: a
//! position closed without a record is marked gone in the meta, and its tombstone stays
//! until `max_age`, so a gone position with nothing there did hold a record), or is still
//! reserved (waited for as a reader waits at a hole). A tombstone there voids it, and the
//! retry stores the message. One narrow case answers a retry as a duplicate of nothing: an
//! appender that closed its position but could not mark it gone (three tries), whose
//! position an overflow then dropped (purging the tombstone) before the retry came. `tests/nats_faults.rs` retries every
//! failed send with its id through a server kill and checks each is stored exactly once.
//!
//! Two round trips for a send without an id when this node's last view of the queue's meta
//! is current (it keeps those of 1,024 queues; a conflict reads the meta and tries again),
//! three otherwise. A node changes each queue's meta one step at a time, and the appends to
//! one queue that wait meanwhile share the next step: one compare-and-set reserves for all
//! of them, each decided alone (a full queue refuses only the appends that do not fit).
//! A reservation whose records are not yet published is a position with
//! nothing in it: a reader waits there, asking the stream's leader, until the record shows
//! or the reservation is older than [`NatsOptions::stale_reservation`] (its appender died or
//! gave up). Then the reader publishes a tombstone there, expecting the position empty, so
//! exactly one of record and tombstone is ever stored, and counts the position as lost (an
//! append that failed is over-counted, as the contract allows). An appender that loses that
//! race fails its send (retryable). Waiting, not stopping, matters: no wake-up would come
//! for the records behind a dead appender's hole.
//!
//! # What this backend does not do
//! - **Expiry and idle removal by the engine's clock** ([`Capabilities::purge_expired`],
//!   [`Capabilities::idle_removal`] are false): a read never returns an expired record and
//!   reports it as passed over (the engine then removes it and counts it lost); the server
//!   frees the rest by its own clock. A record lives at most `max_age`
//!   ([`NatsOptions::max_age`]) from its send, whatever its TTL; a queue untouched for
//!   `max_age` goes whole (its meta with it).
//! - **A storage-wide byte budget** ([`Capabilities::total_byte_budget`] is false).
//! - **Atomic multi-record appends** across a failure: JetStream 2.9 publishes one message at
//!   a time, so a connection lost in the middle of an append of several records can leave
//!   some stored (`send` appends one).
//!
//! # Per-message TTL (server 2.11 and later)
//! The storage asks the server's version at connect. From 2.11 on, the records stream allows
//! per-message TTL (turned on in place for a stream made by an older server: nothing stored
//! changes), and each record with a deadline carries a `Nats-TTL` header, so the server
//! removes it by its own clock instead of at `max_age`: at its deadline plus a grace of
//! [`NatsOptions::dedup_window`] and [`NatsOptions::stale_reservation`] (1 hour 30 s by
//! default). [`NatsStorage::per_message_ttl`] says which way a storage runs; a stream that
//! does not report the setting (an older leader) gets no header.
//!
//! A record the server removed is a position with nothing in it, met by a reader as a dead
//! appender's hole. The grace makes its reservation stale by then, so the reader closes it at
//! once (a tombstone, one publish) and counts it lost in the read's one meta write, as many
//! in a read as a batch holds: the engine reports them in that batch's gap, as it would have
//! passed them over expired. The grace also keeps the record while a send retried with its id
//! may still look for it (the dedup window). Tombstones keep no TTL: they stay until
//! `max_age`, so no late record can land at a closed position and a claim on one stays void
//! ("Claims go first", above). A node whose clock runs ahead of the others by more than
//! `stale_reservation` (see there) can make a retried send, after its original expired and
//! left, store the message again: a duplicate, never a loss.
//!
//! # Durability
//! File storage. With one replica the server writes each message before its ack and syncs
//! to disk every `sync_interval` (2 minutes by default): a killed server keeps what it
//! acknowledged, a power cut may lose the last interval. With three replicas
//! ([`NatsOptions::replicas`]) a message is acked once a majority holds it.
//! [`Capabilities::durable`] is true.
//!
//! **With more than one replica, a window in the compare-and-set.** A cluster checks
//! `Nats-Expected-Last-Subject-Sequence` on the stream's leader before it replicates the
//! message, not when each replica applies it: two publishes in flight at once, expecting the
//! same sequence, can both pass (seen here on 2.9.10; nats-server issue 4320 for 2.9.15 to
//! 2.9.20), and the leader's record of checks in flight is lost when leadership moves (issue
//! 8469). A node therefore changes each queue one step at a time (`tests/nats_cluster.rs`:
//! 64 senders on one node, 8 queues, R3; without that, 62 % of appends failed). Two *nodes*
//! changing the same queue in the same instant may still both succeed, and one change is
//! lost: an ack (its records come again) or a reservation (its record, already stored at its
//! position, is read only once a later append to the queue reaches that position, and that
//! append fails retryably). One replica has no such window: use it where that matters more
//! than surviving a server's loss. A storage built with more replicas logs this at connect.

mod meta;
pub mod owned;
mod page;
mod wire;

pub use owned::OwnedNatsStorage;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_TTL;
use async_nats::jetstream::context::{Publish, PublishErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    Config, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType, Stream,
};
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use self::meta::{Meta, Reserved};
use super::{
    Ack, AppendOutcome, Appended, Capabilities, NewRecord, PurgeOutcome, ReadBatch, RecipientStats,
    Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::coordination::nats::{check_prefix, connect_error, servers};
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};

/// Record headers: the message id, when it was sent and when it expires (engine ms).
const ID: &str = "Oq-Id";
const SENT: &str = "Oq-Sent";
const EXPIRES: &str = "Oq-Expires";
/// A position closed without a record.
const GONE: &str = "Oq-Gone";

/// How many times an append, ack or mark retries its compare-and-set before giving up with a
/// retryable error: each conflict means another node changed the queue, so this only runs
/// out under a storm of writers on one recipient.
const CAS_ATTEMPTS: usize = 64;
/// Records asked for in one request by a read (one batched direct get, or as many direct
/// gets in flight).
const READ_AHEAD: usize = 64;
/// How long a batched direct get may take to end.
const BATCH_GET_TIMEOUT: Duration = Duration::from_secs(10);
/// The header of a batched direct get's end saying how many records it left out.
const NUM_PENDING: &str = "Nats-Num-Pending";
/// Gone records waiting for removal, per storage: past it, acks wait for room.
const REMOVALS_QUEUED: usize = 65_536;
/// Removal requests in flight at once, per storage.
const REMOVALS_IN_FLIGHT: usize = 64;
/// Queues whose meta a node keeps for its appends (emptied when full), and the longest meta
/// kept (in slots): at most about 12 MiB.
const META_CACHE: usize = 1_024;
const META_CACHE_SLOTS: usize = 1_024;
/// Locks that keep a node's changes of one queue's meta one at a time (queues share them by
/// hash; see [`NatsStorage::queue_turn`]).
const CAS_STRIPES: usize = 4_096;

/// Settings for [`NatsStorage`]; from [`NatsStorage::options`].
#[derive(Clone, Debug)]
pub struct NatsOptions {
    stream: String,
    prefix: String,
    replicas: usize,
    max_age: Duration,
    dedup_window: Duration,
    stale_reservation: Duration,
    batched_reads: bool,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            stream: "OFFLINE_QUEUE".to_owned(),
            prefix: "oq".to_owned(),
            replicas: 1,
            max_age: Duration::from_secs(91 * 24 * 3600),
            dedup_window: Duration::from_secs(3600),
            stale_reservation: Duration::from_secs(30),
            batched_reads: true,
        }
    }
}

impl NatsOptions {
    /// The records stream's name; the meta and dedup streams add `_META` and `_DEDUP`
    /// (default `OFFLINE_QUEUE`). ASCII letters, digits, `_` and `-`, at most 64 bytes.
    #[must_use]
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = name.into();
        self
    }

    /// The first tokens of every subject (default `oq`): tokens of ASCII letters, digits,
    /// `_` and `-` joined by `.`, at most 64 bytes. Two applications on one server need
    /// different streams and prefixes.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Copies of each stream in a cluster: 1 (default) or 3, or 5.
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long the server keeps a record, and a queue nobody touches (default 91 days,
    /// above the engine's longest TTL of 90 days). Keep it at least `Limits::max_ttl` and
    /// `Limits::idle_recipient_timeout`: past it the server removes records by its own clock.
    /// On a server of 2.11 or later an expired record goes sooner (see
    /// [`NatsStorage::per_message_ttl`]).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// How long a sender-chosen id is kept for dedup (default 1 hour). Keep it at least
    /// `Limits::dedup_window` (30 minutes by default): an append with a longer window is
    /// refused.
    #[must_use]
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }

    /// How old a reservation must be before a reader closes a position its appender never
    /// published (default 30 s): longer than any append takes, or slow appenders fail.
    ///
    /// Reservations are dated by the appending node's wall clock and judged by the reading
    /// node's, so keep the nodes' clocks in step (NTP) to well within this age. A node whose
    /// clock runs behind by more than it sees its appends fail (retryably: readers close
    /// their positions as stale); one whose clock runs ahead makes readers wait longer at a
    /// dead appender's hole, never longer than this age from when they reach it.
    #[must_use]
    pub fn stale_reservation(mut self, age: Duration) -> Self {
        self.stale_reservation = age;
        self
    }

    /// Whether a read asks a server of 2.11 or later for up to 64 records in one request
    /// (its batched direct get; default true), or one request a record as on older servers.
    /// A server that answers a batched get as an older one does (`408` or `400`: a replica
    /// older than 2.11 in a cluster being upgraded) turns it off for the rest of the
    /// storage's life by itself; other failures are retryable errors and leave it on. So
    /// this is for comparing the two.
    #[must_use]
    pub fn batched_reads(mut self, on: bool) -> Self {
        self.batched_reads = on;
        self
    }

    /// Connects to `url` (`nats://host:port`, several separated by commas), and creates the
    /// three streams, or checks that existing ones have this layout.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad settings or URL, or for a stream of the same name with
    /// another layout (named, left untouched); a retryable [`Error::Storage`] when no server
    /// answers.
    pub async fn connect(self, url: &str) -> Result<NatsStorage> {
        self.check()?;
        let client = async_nats::ConnectOptions::new()
            .name("offline-queue storage")
            .connect(servers(url))
            .await
            .map_err(|error| connect_error(url, error))?;
        if self.replicas > 1 {
            tracing::warn!(
                server = %client.server_info().version,
                replicas = self.replicas,
                "nats: with more than one replica, two nodes changing one queue at the same \
                 instant may both win its compare-and-set (see NatsStorage's docs)"
            );
        }
        let version = client.server_info().version;
        let batched_gets = self.batched_reads && version_at_least(&version, (2, 11));
        let context = jetstream::new(client.clone());
        // Metas apart from records: a meta is rewritten at every change, and the holes its
        // old versions leave in a stream slow the server's purges of records (measured:
        // 35,000 exact-subject purges a second beside no metas, 7,300 beside metas).
        // Per-message TTL (`Nats-TTL`) came with server 2.11; an older server keeps every
        // record until `max_age`. Asked of the stream too: a cluster's older leader ignores
        // the setting, and then no record carries the header it would refuse.
        let (records, message_ttl) = self
            .open_stream(
                &context,
                self.stream_config(&self.stream, "r"),
                version_at_least(&version, (2, 11)),
            )
            .await?;
        let ttl_grace = message_ttl.then(|| self.dedup_window + self.stale_reservation);
        tracing::info!(
            server = %version,
            per_message_ttl = message_ttl,
            "nats: expired records leave the stream {}",
            if message_ttl {
                "by their own TTL (Nats-TTL)"
            } else {
                "at the stream's max_age (the server predates 2.11)"
            }
        );
        let meta_config = self.stream_config(&format!("{}_META", self.stream), "m");
        let (meta, _) = self.open_stream(&context, meta_config, false).await?;
        let dedup_config = Config {
            max_age: self.dedup_window,
            ..self.stream_config(&format!("{}_DEDUP", self.stream), "d")
        };
        let (dedup, _) = self.open_stream(&context, dedup_config, false).await?;
        let (removals, queued) = tokio::sync::mpsc::channel(REMOVALS_QUEUED);
        tokio::spawn(remove_in_background(records.clone(), queued));
        Ok(NatsStorage {
            shared: Arc::new(Shared {
                context,
                metas: parking_lot::Mutex::new(HashMap::new()),
                cas_stripes: (0..CAS_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                gathering: parking_lot::Mutex::new(HashMap::new()),
                removals,
                records,
                meta,
                dedup,
                ttl_grace,
                batched_gets: AtomicBool::new(batched_gets),
                client,
                options: self,
            }),
        })
    }

    fn check(&self) -> Result<()> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !plain(&self.stream) || self.stream.len() > 64 {
            return Err(invalid(
                "nats stream",
                format!(
                    "{:?} must be ASCII letters, digits, '_' and '-', at most 64 bytes",
                    self.stream
                ),
            ));
        }
        check_prefix(&self.prefix)?;
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(invalid(
                "nats replicas",
                format!("is {}; it must be 1, 3 or 5", self.replicas),
            ));
        }
        for (field, value, min) in [
            ("nats max_age", self.max_age, Duration::from_secs(60)),
            (
                "nats dedup_window",
                self.dedup_window,
                Duration::from_secs(1),
            ),
            (
                "nats stale_reservation",
                self.stale_reservation,
                Duration::from_secs(1),
            ),
        ] {
            if value < min || value > Duration::from_secs(100 * 365 * 24 * 3600) {
                return Err(invalid(
                    field,
                    format!("is {value:?}; it must be at least {min:?} and at most 100 years"),
                ));
            }
        }
        Ok(())
    }

    /// A stream over `<prefix>.<kind>.>` with one message a subject and direct gets.
    fn stream_config(&self, name: &str, kind: &str) -> Config {
        Config {
            name: name.to_owned(),
            subjects: vec![format!("{}.{kind}.>", self.prefix)],
            max_messages_per_subject: 1,
            discard: DiscardPolicy::Old,
            max_age: self.max_age,
            storage: StorageType::File,
            num_replicas: self.replicas,
            allow_direct: true,
            ..Config::default()
        }
    }

    /// The stream `wanted`, made if missing; an existing one must have the same layout. With
    /// `message_ttl`, the stream is made (or changed in place: a stream made before the
    /// server was upgraded to 2.11) to allow per-message TTL; returns whether it does.
    async fn open_stream(
        &self,
        context: &Context,
        mut wanted: Config,
        message_ttl: bool,
    ) -> Result<(Stream, bool)> {
        let name = wanted.name.clone();
        wanted.allow_message_ttl = message_ttl;
        let mut stream = context
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        let mut have = stream
            .info()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?
            .config
            .clone();
        let differences: Vec<String> = [
            (
                "subjects",
                format!("{:?}", have.subjects),
                format!("{:?}", wanted.subjects),
            ),
            (
                "max_msgs_per_subject",
                have.max_messages_per_subject.to_string(),
                "1".to_owned(),
            ),
            (
                "discard",
                format!("{:?}", have.discard),
                format!("{:?}", wanted.discard),
            ),
            (
                "discard_new_per_subject",
                have.discard_new_per_subject.to_string(),
                wanted.discard_new_per_subject.to_string(),
            ),
            (
                "duplicate_window",
                format!("{:?}", have.duplicate_window),
                // Unset, the server picks its default: any is this layout's.
                format!(
                    "{:?}",
                    if wanted.duplicate_window.is_zero() {
                        have.duplicate_window
                    } else {
                        wanted.duplicate_window
                    }
                ),
            ),
            ("storage", format!("{:?}", have.storage), "File".to_owned()),
            (
                "allow_direct",
                have.allow_direct.to_string(),
                "true".to_owned(),
            ),
            (
                "max_age",
                format!("{:?}", have.max_age),
                format!("{:?}", wanted.max_age),
            ),
            (
                "num_replicas",
                have.num_replicas.to_string(),
                wanted.num_replicas.to_string(),
            ),
        ]
        .into_iter()
        .filter(|(_, have, want)| have != want)
        .map(|(field, have, want)| format!("{field} is {have}, not {want}"))
        .collect();
        if !differences.is_empty() {
            return Err(invalid(
                "nats stream",
                format!(
                    "stream {name} exists with another layout, left untouched: {}",
                    differences.join("; ")
                ),
            ));
        }
        if message_ttl && !have.allow_message_ttl {
            // After the layout check: turning it on cannot be undone (2.11 allows it on an
            // existing stream), and it changes nothing stored.
            have.allow_message_ttl = true;
            have = context
                .update_stream(have)
                .await
                .map_err(|error| Error::storage(Retry::Yes, error))?
                .config;
            tracing::info!(stream = name, "nats: per-message TTL turned on");
        }
        Ok((stream, have.allow_message_ttl))
    }
}

/// Queues in NATS JetStream. See the [module docs](self) for the layout and what it keeps.
///
/// Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsStorage {
    shared: Arc<Shared>,
}

struct Shared {
    context: Context,
    /// The metas this node last saw, by queue key, for appends ([`NatsStorage::cached`]).
    metas: parking_lot::Mutex<HashMap<String, CachedMeta>>,
    /// See [`NatsStorage::queue_turn`].
    cas_stripes: Box<[tokio::sync::Mutex<()>]>,
    /// Appends waiting to reserve, by queue key ([`NatsStorage::reserve`]).
    gathering: parking_lot::Mutex<HashMap<String, Vec<WaitingAppend>>>,
    /// Subjects of gone records, for [`remove_in_background`].
    removals: tokio::sync::mpsc::Sender<String>,
    records: Stream,
    meta: Stream,
    dedup: Stream,
    /// With per-message TTL (server 2.11 on): how long past its deadline a record stays. See
    /// [`NatsStorage::per_message_ttl`].
    ttl_grace: Option<Duration>,
    /// Whether reads ask for several records in one request (server 2.11's batched direct
    /// get); cleared if the server refuses one. See [`NatsStorage::get_records`].
    batched_gets: AtomicBool,
    client: async_nats::Client,
    options: NatsOptions,
}

impl std::fmt::Debug for NatsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStorage")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

/// A queue's meta as read, with the sequence a compare-and-set must expect (0: none yet).
struct Loaded {
    meta: Meta,
    revision: u64,
}

/// What a node keeps of one queue's meta for its appends.
struct CachedMeta {
    loaded: Option<Loaded>,
    /// Until then (wall clock, ms) appends read the meta: the queue saw a conflict.
    quiet_from_ms: u64,
}

/// A dedup entry: the original's position and when it was appended (engine ms), and the
/// entry's own sequence.
struct DedupEntry {
    position: u64,
    sent_at: u64,
    sequence: u64,
}

/// An append waiting for [`NatsStorage::reserve_gathered`].
struct WaitingAppend {
    sizes: Vec<u32>,
    quota: Quota,
    answer: tokio::sync::oneshot::Sender<Result<Granted>>,
}

/// What an append's reservation got.
struct Granted {
    plan: Reserved,
    /// Records pending once the reservation is written.
    pending: u64,
    /// Its own positions a later append of the same write dropped (DropOldest): nothing is
    /// published there.
    dropped_at_once: Vec<u64>,
}

/// What a sender-chosen id's dedup entry decides ([`NatsStorage::resolve_claim`]).
enum Claim {
    /// The id's record is stored (or was, and is acked) at this position.
    Taken(u64),
    /// Nothing stands: claim the id over the entry at this sequence (0: none).
    Free(u64),
}

/// What one batched direct get answered: a result per position asked, in order, and how many
/// records the server left out of it (the request's `max_bytes` reached).
struct BatchAnswer {
    found: Vec<Result<Found>>,
    left_out: u64,
}

/// What a direct get of a record's subject found.
enum Found {
    Record(StoredRecord),
    /// A tombstone: the position was closed without a record. `lost`: by a reader, for a
    /// record that may have existed (see [`Meta::abandon`]).
    Gone {
        lost: bool,
    },
    Missing,
}

/// The `Oq-Gone` value of a tombstone a reader wrote: the position counts as lost.
const GONE_LOST: &str = "lost";

impl NatsStorage {
    /// Settings, to change before [`NatsOptions::connect`].
    pub fn options() -> NatsOptions {
        NatsOptions::default()
    }

    /// Connects with the default settings; see [`NatsOptions::connect`].
    ///
    /// # Errors
    /// As [`NatsOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::options().connect(url).await
    }

    /// Whether the server removes expired records by their own TTL: true when the server is
    /// 2.11 or later (its per-message TTL, the `Nats-TTL` header).
    ///
    /// A record with a deadline is then kept until that deadline plus
    /// [`NatsOptions::dedup_window`] and [`NatsOptions::stale_reservation`] (1 hour 30 s by
    /// default): a send retried within the dedup window must still find it, and a reader
    /// must meet its position as stale. Before 2.11, or with no deadline, the stream's
    /// [`NatsOptions::max_age`] removes it. Reads never return a record past its deadline
    /// either way. See the [module docs](self).
    pub fn per_message_ttl(&self) -> bool {
        self.shared.ttl_grace.is_some()
    }

    fn key(recipient: &RecipientId) -> String {
        crate::hex::encode(recipient.as_bytes())
    }

    fn record_subject(&self, key: &str, position: u64) -> String {
        format!("{}.r.{key}.{position}", self.shared.options.prefix)
    }

    fn meta_subject(&self, key: &str) -> String {
        format!("{}.m.{key}", self.shared.options.prefix)
    }

    fn dedup_subject(&self, key: &str, id: MessageId) -> String {
        format!("{}.d.{key}.{id}", self.shared.options.prefix)
    }

    async fn load(&self, key: &str) -> Result<Option<Loaded>> {
        match self
            .shared
            .meta
            .get_last_raw_message_by_subject(&self.meta_subject(key))
            .await
        {
            Ok(message) => {
                let meta = Meta::decode(&message.payload)?;
                self.remember(key, &meta, message.sequence);
                Ok(Some(Loaded {
                    meta,
                    revision: message.sequence,
                }))
            }
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// The meta, or a new queue's: its base is the records stream's last sequence, above
    /// every position an earlier queue of this recipient used (each position it stored was
    /// published at or after its own sequence).
    async fn load_or_new(&self, key: &str) -> Result<Loaded> {
        if let Some(loaded) = self.load(key).await? {
            return Ok(loaded);
        }
        let mut records = self.shared.records.clone();
        let info = records
            .info()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        Ok(Loaded {
            meta: Meta::new(info.state.last_sequence),
            revision: 0,
        })
    }

    /// The node's turn to change `key`'s meta, so a node changes a queue one step at a time:
    /// an append or an update holds it from reading the meta (or taking it from the cache)
    /// to the compare-and-set; a session's read, which reads the meta before its records,
    /// holds it for its write, and on a conflict reads and applies its change again.
    ///
    /// Two reasons. A replicated stream checks the expected sequence on its leader before it
    /// replicates and applies the message, so two publishes in flight at once, expecting the
    /// same sequence, can both pass (see [Durability](self#durability)): measured on 2.9.10
    /// with three replicas, 64 senders on one node to 8 queues, 62 % of appends failed and
    /// reservations were lost. And in turn, a node's steps never conflict with each other: an
    /// append starting from the meta the node last wrote wins its compare-and-set unless
    /// another node wrote since (with writes one at a time but reads outside the turn, 8
    /// appenders per queue still ran out of attempts).
    async fn queue_turn(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let stripe =
            crate::fnv::fnv1a_64(crate::fnv::OFFSET_64, key.as_bytes()) as usize % CAS_STRIPES;
        self.shared.cas_stripes[stripe].lock().await
    }

    /// Reserves positions for records of `sizes` under `quota`; returns the plan and the
    /// records pending once it is written. Appends to one queue that wait at the same moment
    /// share one compare-and-set: the first starts a task that waits for the queue's turn
    /// and then reserves, in arrival order, for every append gathered by then (each decided
    /// alone: a full queue refuses only the append that does not fit).
    async fn reserve(&self, key: &str, sizes: Vec<u32>, quota: &Quota) -> Result<Granted> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let first = {
            let mut gathering = self.shared.gathering.lock();
            let waiting = gathering.entry(key.to_owned()).or_default();
            waiting.push(WaitingAppend {
                sizes,
                quota: *quota,
                answer,
            });
            waiting.len() == 1
        };
        if first {
            // A task of its own, so an append dropped while it waits strands no other.
            let (storage, key) = (self.clone(), key.to_owned());
            tokio::spawn(async move { storage.reserve_gathered(&key).await });
        }
        answered.await.unwrap_or_else(|_| {
            Err(Error::storage_msg(
                Retry::Yes,
                "nats: the reservation's task ended without an answer",
            ))
        })
    }

    /// The task [`NatsStorage::reserve`] starts: in the queue's turn, reserves for every
    /// append gathered (and still waiting), and answers each.
    async fn reserve_gathered(&self, key: &str) {
        // Should this task be dropped before it takes the gathering (a runtime shutting
        // down), the guard removes it: its appends then fail, and later ones start afresh.
        let mut guard = GatheringGuard {
            storage: self,
            key,
            taken: false,
        };
        let turn = self.queue_turn(key).await;
        let gathered = self.shared.gathering.lock().remove(key).unwrap_or_default();
        guard.taken = true;
        // An append dropped while it waited reserves nothing (it would leave a hole).
        let (asks, answers): (Vec<_>, Vec<_>) = gathered
            .into_iter()
            .filter(|waiting| !waiting.answer.is_closed())
            .map(|waiting| ((waiting.sizes, waiting.quota), waiting.answer))
            .unzip();
        if asks.is_empty() {
            return;
        }
        let outcomes = self.reserve_all(key, &asks).await;
        drop(turn);
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                for answer in answers {
                    let _ = answer.send(Err(share(&error)));
                }
                return;
            }
        };
        for ((answer, outcome), (sizes, _)) in answers.into_iter().zip(outcomes).zip(&asks) {
            // Dropped since it was planned: what it reserved is closed, what it dropped goes.
            if let Err(Ok(granted)) = answer.send(outcome) {
                let first = granted.plan.first;
                let unused = (first..first + sizes.len() as u64)
                    .filter(|position| !granted.dropped_at_once.contains(position));
                self.give_up(key, unused.collect::<Vec<_>>()).await;
                self.remove_later(key, granted.plan.dropped).await;
            }
        }
    }

    /// One compare-and-set reserving for each of `asks` in turn, retried on a conflict. In
    /// the queue's turn.
    async fn reserve_all(
        &self,
        key: &str,
        asks: &[(Vec<u32>, Quota)],
    ) -> Result<Vec<Result<Granted>>> {
        let mut cached = self.cached(key);
        for _ in 0..CAS_ATTEMPTS {
            let from_cache = cached.is_some();
            let Loaded { mut meta, revision } = match cached.take() {
                Some(loaded) => loaded,
                None => self.load_or_new(key).await?,
            };
            meta.forget_reservations(self.stale_before_ms());
            let (now, merge) = (wall_ms(), self.merge_ms());
            let plans: Vec<Result<Reserved>> = asks
                .iter()
                .map(|(sizes, quota)| meta.reserve(sizes, quota, now, merge))
                .collect();
            let refused = plans.iter().filter(|plan| plan.is_err()).count();
            // Acks elsewhere may have made room: only a meta just read says "full".
            if refused > 0 && from_cache {
                continue;
            }
            if refused == plans.len() || self.store(key, &meta, revision).await?.is_some() {
                return Ok(granted(plans, asks, meta.live().0));
            }
            self.contended(key);
        }
        Err(contended())
    }

    /// Writes `meta` if the subject is still at `revision`: its new revision, or `None` on a
    /// conflict. Called in the queue's turn ([`NatsStorage::queue_turn`]).
    async fn store(&self, key: &str, meta: &Meta, revision: u64) -> Result<Option<u64>> {
        let publish = Publish::build()
            .payload(Bytes::from(meta.encode()))
            .expected_last_subject_sequence(revision);
        let written = publish_ack(&self.shared.context, self.meta_subject(key), publish).await?;
        if let Some(revision) = written {
            self.remember(key, meta, revision);
        }
        Ok(written)
    }

    /// Keeps the meta this node last read or wrote for `key`, for appends to start from
    /// without reading it (see [`NatsStorage::cached`]).
    fn remember(&self, key: &str, meta: &Meta, revision: u64) {
        let mut cache = self.shared.metas.lock();
        if meta.span() > META_CACHE_SLOTS {
            // A deep queue's meta is large to copy and keep; its appends read it.
            cache.remove(key);
            return;
        }
        if cache.len() >= META_CACHE && !cache.contains_key(key) {
            // Cheaper than an order kept per use, and only ever costs one read per queue.
            cache.clear();
        }
        let entry = cache.entry(key.to_owned()).or_insert(CachedMeta {
            loaded: None,
            quiet_from_ms: 0,
        });
        entry.loaded = Some(Loaded {
            meta: meta.clone(),
            revision,
        });
    }

    /// The meta this node last saw for `key`. Only an append starts from it: its
    /// compare-and-set fails if another node changed the queue since, and it then reads the
    /// meta. A read never does, since a stale meta would hide records that no later wake-up
    /// announces. Not for a queue that saw a conflict in the last second
    /// ([`NatsStorage::contended`]).
    fn cached(&self, key: &str) -> Option<Loaded> {
        let cache = self.shared.metas.lock();
        let entry = cache.get(key)?;
        if wall_ms() < entry.quiet_from_ms {
            return None;
        }
        entry.loaded.as_ref().map(|loaded| Loaded {
            meta: loaded.meta.clone(),
            revision: loaded.revision,
        })
    }

    /// A compare-and-set on `key` lost: for a second, its appends read the meta first. Under
    /// contention the last winner's own view is always current, so starting from it would
    /// let one appender win every round and starve the rest.
    fn contended(&self, key: &str) {
        let mut cache = self.shared.metas.lock();
        let entry = cache.entry(key.to_owned()).or_insert(CachedMeta {
            loaded: None,
            quiet_from_ms: 0,
        });
        entry.loaded = None;
        entry.quiet_from_ms = wall_ms().saturating_add(1_000);
    }

    /// Loads, changes and stores the meta until the store wins; `change` returns `None` to
    /// leave it unwritten. Returns what `change` did, the meta as written, and its revision.
    async fn update<T>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut Meta) -> Result<Option<T>>,
    ) -> Result<Option<(T, Meta, u64)>> {
        let _turn = self.queue_turn(key).await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(Loaded { mut meta, revision }) = self.load(key).await? else {
                return Ok(None);
            };
            let Some(out) = change(&mut meta)? else {
                return Ok(None);
            };
            if let Some(revision) = self.store(key, &meta, revision).await? {
                return Ok(Some((out, meta, revision)));
            }
        }
        Err(contended())
    }

    /// How close in time reservations must be to merge: a merged position goes stale up to
    /// this early, so a small part of `stale_reservation`.
    fn merge_ms(&self) -> u64 {
        let stale =
            u64::try_from(self.shared.options.stale_reservation.as_millis()).unwrap_or(u64::MAX);
        (stale / 4).min(1_000)
    }

    fn stale_before_ms(&self) -> u64 {
        let stale =
            u64::try_from(self.shared.options.stale_reservation.as_millis()).unwrap_or(u64::MAX);
        wall_ms().saturating_sub(stale)
    }

    async fn dedup_entry(&self, key: &str, id: MessageId) -> Result<Option<DedupEntry>> {
        match self
            .shared
            .dedup
            .get_last_raw_message_by_subject(&self.dedup_subject(key, id))
            .await
        {
            Ok(message) => {
                let payload: &[u8] = &message.payload;
                let (Some(position), Some(sent_at)) = (
                    payload.get(..8).and_then(|b| b.try_into().ok()),
                    payload.get(8..16).and_then(|b| b.try_into().ok()),
                ) else {
                    return Err(Error::storage_msg(
                        Retry::No,
                        "nats: a dedup entry is damaged; left untouched",
                    ));
                };
                Ok(Some(DedupEntry {
                    position: u64::from_be_bytes(position),
                    sent_at: u64::from_be_bytes(sent_at),
                    sequence: message.sequence,
                }))
            }
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }

    /// The record at `position`: by direct get (any replica may answer), or asked of the
    /// stream's leader (a follower may lag).
    async fn get_record(&self, key: &str, position: u64, from_leader: bool) -> Result<Found> {
        let subject = self.record_subject(key, position);
        let records = &self.shared.records;
        let message = if from_leader {
            match records.get_last_raw_message_by_subject(&subject).await {
                Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                other => Some(other.map_err(|error| Error::storage(Retry::Yes, error))?),
            }
        } else {
            match records.direct_get_last_for_subject(&subject).await {
                Err(error) if error.kind() == DirectGetErrorKind::NotFound => None,
                other => Some(other.map_err(|error| Error::storage(Retry::Yes, error))?),
            }
        };
        message.map_or(Ok(Found::Missing), |message| {
            found(&subject, position, message)
        })
    }

    /// The records at `positions`, in that order: one batched direct get (server 2.11: the
    /// last message of each listed subject, answered by any replica, then an end-of-batch
    /// status) where the server answers them, else a direct get each. The outer error is the
    /// request's; an inner one is that record's (damaged, say).
    async fn get_records(&self, key: &str, positions: &[u64]) -> Result<Vec<Result<Found>>> {
        if self.shared.batched_gets.load(Ordering::Relaxed) {
            if let Some(found) = self.get_batch(key, positions).await? {
                return Ok(found);
            }
            // A replica older than 2.11 (a cluster being upgraded) does not know the request.
            self.shared.batched_gets.store(false, Ordering::Relaxed);
            tracing::warn!(
                "nats: a server answered a batched direct get as a server before 2.11 does; \
                 reading one record a request from now on"
            );
        }
        Ok(futures::future::join_all(
            positions
                .iter()
                .map(|&position| self.get_record(key, position, false)),
        )
        .await)
    }

    /// A batched direct get of `positions`; `None` if the server does not know the request
    /// (`408 Empty Request` from 2.9 and 2.10, or `400`). A server ends an answer early once
    /// it has sent the request's `max_bytes` and says how many it left out
    /// (`Nats-Num-Pending`): those are asked for again, so a record an answer left out is
    /// never taken for a hole (which a read would try to close, one publish and one get from
    /// the leader each).
    async fn get_batch(&self, key: &str, positions: &[u64]) -> Result<Option<Vec<Result<Found>>>> {
        // 2.11 counts one record fewer than an answer left out (2.12 counts exactly): there,
        // an answer that brought records may have left one out whatever it says.
        let exact_count = version_at_least(&self.shared.client.server_info().version, (2, 12));
        let mut found: Vec<Result<Found>> = positions.iter().map(|_| Ok(Found::Missing)).collect();
        let mut asking: Vec<usize> = (0..positions.len()).collect();
        loop {
            let asked: Vec<u64> = asking.iter().map(|&i| positions[i]).collect();
            let answer = match self.get_batch_once(key, &asked).await {
                Ok(Some(answer)) => answer,
                Ok(None) => return Ok(None),
                // A later request failed: what came stands, and the first position still
                // unanswered carries the error (a read returns what it has before it).
                Err(error) if asking.len() < positions.len() => {
                    found[asking[0]] = Err(error);
                    return Ok(Some(found));
                }
                Err(error) => return Err(error),
            };
            let mut left = Vec::new();
            for (&i, one) in asking.iter().zip(answer.found) {
                if matches!(one, Ok(Found::Missing)) {
                    left.push(i);
                } else {
                    found[i] = one;
                }
            }
            // An answer that brought nothing new would come again: what is left is Missing,
            // and the read's own checks take it from there.
            let progressed = left.len() < asking.len();
            let maybe_more = answer.left_out > 0 || (!exact_count && progressed);
            if left.is_empty() || !progressed || !maybe_more {
                return Ok(Some(found));
            }
            asking = left;
        }
    }

    /// One request of [`Self::get_batch`]: what it answered for each of `positions`, and how
    /// many records the server said it left out.
    async fn get_batch_once(&self, key: &str, positions: &[u64]) -> Result<Option<BatchAnswer>> {
        let client = &self.shared.client;
        let subjects: Vec<String> = positions
            .iter()
            .map(|&position| self.record_subject(key, position))
            .collect();
        // The server ends an answer once it holds `max_bytes` (by at most one record more).
        // Without a bound it would fill it to its `max_pending` (64 MiB by default), and two
        // such answers in flight made it close the connection as a slow consumer. Bounded by
        // its `max_payload`, a read has about four of them in flight at most (4 MiB by
        // default; reads of other queues share the connection); records of a few KiB still
        // come 64 an answer.
        let max_bytes = client.server_info().max_payload.max(1);
        // Subjects are the prefix's plain tokens, `r`, hex and digits: nothing to escape.
        let request = format!(
            r#"{{"multi_last":["{}"],"batch":{},"max_bytes":{max_bytes}}}"#,
            subjects.join(r#"",""#),
            positions.len()
        );
        let inbox = client.new_inbox();
        // Dropped on return, which unsubscribes.
        let mut answers = client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.shared.options.stream),
                inbox,
                request.into(),
            )
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        let mut found: Vec<Result<Found>> = positions.iter().map(|_| Ok(Found::Missing)).collect();
        let index: HashMap<&str, usize> = subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| (subject.as_str(), i))
            .collect();
        let deadline = tokio::time::Instant::now() + BATCH_GET_TIMEOUT;
        loop {
            let answer = match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(answer)) => answer,
                Ok(None) => {
                    return Err(Error::storage_msg(
                        Retry::Yes,
                        "nats: the connection closed during a batched direct get",
                    ));
                }
                Err(_) => {
                    return Err(Error::storage_msg(
                        Retry::Yes,
                        format!(
                            "nats: a batched direct get had no end within {BATCH_GET_TIMEOUT:?}"
                        ),
                    ));
                }
            };
            match answer.status.map(|status| status.as_u16()) {
                None => {}
                // The end of the batch, and how many it left out.
                Some(204) => {
                    let left_out = answer
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get(NUM_PENDING))
                        .and_then(|value| value.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    return Ok(Some(BatchAnswer { found, left_out }));
                }
                // After some records (2.11, or a record the server failed to load): the rest
                // may be there, so it is asked for again.
                Some(404) => {
                    let left_out =
                        u64::from(found.iter().any(|one| !matches!(one, Ok(Found::Missing))));
                    return Ok(Some(BatchAnswer { found, left_out }));
                }
                Some(400 | 408) => return Ok(None),
                // 503 (no responders: the stream is moving, or the server restarts) and the
                // rest: this request failed, the next may not.
                Some(status) => {
                    return Err(Error::storage_msg(
                        Retry::Yes,
                        format!(
                            "nats: a batched direct get answered {status} {}",
                            answer.description.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
            let message = StreamMessage::try_from(answer)
                .map_err(|error| Error::storage(Retry::Yes, error))?;
            let Some(&i) = index.get(message.subject.as_str()) else {
                return Err(Error::storage_msg(
                    Retry::Yes,
                    format!(
                        "nats: a batched direct get answered {}, which it was not asked for",
                        message.subject
                    ),
                ));
            };
            found[i] = self::found(&subjects[i], positions[i], message);
        }
    }

    /// Whether `position`'s reservation (if any) is older than `stale_reservation`: nothing
    /// will be published there any more, and a reader may close it at once.
    fn reservation_stale(&self, meta: &Meta, position: u64) -> bool {
        let stale_before = self.stale_before_ms();
        meta.reserved_at(position)
            .is_none_or(|at| at <= stale_before)
    }

    /// A position the meta holds whose record a read did not find: its appender may still
    /// publish it (a reservation younger than `stale_reservation`), or the replica that
    /// answered lags. Asks the leader again, more slowly each time, until the record shows
    /// or the reservation is stale; then closes the position with a tombstone (which loses
    /// to a record that lands first). Returns what is there, and whether this call closed
    /// it. Waiting here, not returning early, is what keeps the session from stopping at a
    /// hole that no wake-up will ever announce.
    async fn await_missing(&self, key: &str, meta: &Meta, position: u64) -> Result<Found> {
        let stale =
            u64::try_from(self.shared.options.stale_reservation.as_millis()).unwrap_or(u64::MAX);
        // Never longer than `stale` from now, whatever another node's clock wrote.
        let due = meta
            .reserved_at(position)
            .map_or(0, |at| at.saturating_add(stale))
            .min(wall_ms().saturating_add(stale));
        let mut pause = Duration::from_millis(2);
        let mut looked_again = std::time::Instant::now();
        loop {
            let found = self.get_record(key, position, true).await?;
            if !matches!(found, Found::Missing) {
                return Ok(found);
            }
            // Removed meanwhile (another node's ack or drop, then its purge): nothing to
            // wait for.
            if looked_again.elapsed() >= Duration::from_secs(1) {
                looked_again = std::time::Instant::now();
                let removed = self
                    .load(key)
                    .await?
                    .is_none_or(|fresh| !fresh.meta.holds(position));
                if removed {
                    return Ok(Found::Gone { lost: false });
                }
            }
            let now = wall_ms();
            if now >= due {
                if self.close(key, position, true).await? {
                    return Ok(Found::Gone { lost: true });
                }
                // A record landed first: the next look finds it.
            } else {
                pause = pause.min(Duration::from_millis(due - now));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).clamp(Duration::from_millis(2), Duration::from_millis(100));
        }
    }
}

/// Each ask's grant from plans made in turn on one meta. A DropOldest plan may drop
/// positions an earlier ask of the same write reserved: those are taken out of its removals
/// (nothing is there yet) and given to the earlier ask as dropped at once, so it publishes
/// nothing there (its records count as stored, then lost, as DropOldest says).
fn granted(
    plans: Vec<Result<Reserved>>,
    asks: &[(Vec<u32>, Quota)],
    pending: u64,
) -> Vec<Result<Granted>> {
    let reserved: Vec<Option<std::ops::Range<u64>>> = plans
        .iter()
        .zip(asks)
        .map(|(plan, (sizes, _))| {
            plan.as_ref()
                .ok()
                .map(|plan| plan.first..plan.first + sizes.len() as u64)
        })
        .collect();
    let mut at_once: Vec<Vec<u64>> = vec![Vec::new(); plans.len()];
    let mut plans: Vec<Result<Reserved>> = plans;
    for plan in plans.iter_mut().flatten() {
        plan.dropped.retain(|&position| {
            let earlier = reserved
                .iter()
                .position(|range| range.as_ref().is_some_and(|r| r.contains(&position)));
            match earlier {
                Some(ask) => {
                    at_once[ask].push(position);
                    false
                }
                None => true,
            }
        });
    }
    plans
        .into_iter()
        .zip(at_once)
        .map(|(plan, dropped_at_once)| {
            plan.map(|plan| Granted {
                plan,
                pending,
                dropped_at_once,
            })
        })
        .collect()
}

/// `error` again, for each of several appends that share it (an [`Error`] is not `Clone`;
/// a storage error keeps its message, kind and source).
fn share(error: &Error) -> Error {
    match error {
        Error::Storage {
            message,
            retryable,
            source,
        } => Error::Storage {
            message: message.clone(),
            retryable: *retryable,
            source: source.clone(),
        },
        other => Error::storage_msg(
            if other.is_retryable() {
                Retry::Yes
            } else {
                Retry::No
            },
            other.to_string(),
        ),
    }
}

/// Removes a gathering its task never took ([`NatsStorage::reserve_gathered`]).
struct GatheringGuard<'a> {
    storage: &'a NatsStorage,
    key: &'a str,
    taken: bool,
}

impl Drop for GatheringGuard<'_> {
    fn drop(&mut self) {
        if !self.taken {
            self.storage.shared.gathering.lock().remove(self.key);
        }
    }
}

/// A record, or a tombstone, from the message read at `subject`.
fn found(subject: &str, position: u64, message: StreamMessage) -> Result<Found> {
    let header = |name: &str| message.headers.get(name).map(|value| value.as_str());
    if let Some(gone) = header(GONE) {
        return Ok(Found::Gone {
            lost: gone == GONE_LOST,
        });
    }
    let number = |name: &str| header(name).and_then(|value| value.parse::<u64>().ok());
    let (Some(id), Some(sent_at)) = (
        header(ID).and_then(|id| MessageId::parse_hex(id).ok()),
        number(SENT),
    ) else {
        return Err(Error::storage_msg(
            Retry::No,
            format!("nats: the record at {subject} lacks its headers; left untouched"),
        ));
    };
    Ok(Found::Record(StoredRecord {
        seq: Seq(position),
        id,
        sent_at: Timestamp::from_millis(sent_at),
        expires_at: number(EXPIRES).map(Timestamp::from_millis),
        delivery_count: 0,
        body: message.payload,
    }))
}

impl NatsStorage {
    /// Closes `position` with a tombstone, expecting it empty. True if the tombstone went in
    /// (the position's record will never be stored); false if a record is there. `lost`
    /// marks the tombstone of a reader, so whoever finishes the close counts the loss.
    async fn close(&self, key: &str, position: u64, lost: bool) -> Result<bool> {
        self.close_over(key, position, 0, lost).await
    }

    /// As [`NatsStorage::close`], over the message at stream sequence `expected` (0: none).
    async fn close_over(
        &self,
        key: &str,
        position: u64,
        expected: u64,
        lost: bool,
    ) -> Result<bool> {
        let mut headers = HeaderMap::new();
        headers.insert(GONE, if lost { GONE_LOST } else { "1" });
        let publish = Publish::build()
            .headers(headers)
            .expected_last_subject_sequence(expected);
        let closed = publish_ack(
            &self.shared.context,
            self.record_subject(key, position),
            publish,
        )
        .await?;
        Ok(closed.is_some())
    }

    /// Marks `position` as holding nothing in the meta (`lost`: see [`Meta::abandon`]).
    async fn abandon(&self, key: &str, position: u64, lost: bool) -> Result<()> {
        self.update(key, |meta| Ok(meta.abandon(position, lost).then_some(())))
            .await?;
        Ok(())
    }

    async fn publish_record(
        &self,
        key: &str,
        position: u64,
        record: &NewRecord,
    ) -> Result<Option<u64>> {
        let mut headers = HeaderMap::new();
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
        let publish = Publish::build()
            .headers(headers)
            .payload(Bytes::copy_from_slice(&record.body))
            .expected_last_subject_sequence(0);
        publish_ack(
            &self.shared.context,
            self.record_subject(key, position),
            publish,
        )
        .await
    }

    /// Claims a sender-chosen id for `position`, expecting the entry last seen (`expected`,
    /// 0 for none). False if another append claimed it first.
    async fn claim(
        &self,
        key: &str,
        record: &NewRecord,
        position: u64,
        expected: u64,
        now: Timestamp,
    ) -> Result<bool> {
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(&position.to_be_bytes());
        payload.extend_from_slice(&now.as_millis().to_be_bytes());
        let publish = Publish::build()
            .payload(payload.into())
            .expected_last_subject_sequence(expected);
        let claimed = publish_ack(
            &self.shared.context,
            self.dedup_subject(key, record.id),
            publish,
        )
        .await?;
        Ok(claimed.is_some())
    }

    /// Reads `id`'s dedup entry and decides whether it stands. A claim is written before its
    /// record, so the claim of an append that failed stays behind: it stands only for a
    /// position that holds its record, held it (acked or dropped since: a position closed
    /// without a record keeps its tombstone until `max_age`, so one with nothing there did
    /// hold it), or may still get it (reserved: waited for as a reader waits at a hole,
    /// until the record lands or the reservation goes stale and is closed). A tombstone at
    /// the position voids the claim.
    async fn resolve_claim(
        &self,
        key: &str,
        id: MessageId,
        window: u64,
        now: Timestamp,
    ) -> Result<Claim> {
        let Some(entry) = self.dedup_entry(key, id).await? else {
            return Ok(Claim::Free(0));
        };
        if entry.sent_at.saturating_add(window) <= now.as_millis() {
            return Ok(Claim::Free(entry.sequence));
        }
        // A reservation is waited out at most once; the next look finds what it left.
        for _ in 0..3 {
            match self.get_record(key, entry.position, true).await? {
                Found::Record(record) if record.id == id => {
                    return Ok(Claim::Taken(entry.position));
                }
                Found::Record(_) | Found::Gone { .. } => return Ok(Claim::Free(entry.sequence)),
                Found::Missing => {}
            }
            match self.load(key).await? {
                Some(loaded) if loaded.meta.holds(entry.position) => {
                    // A reader that reaches the tombstone this may write counts the loss.
                    self.await_missing(key, &loaded.meta, entry.position)
                        .await?;
                }
                _ => return Ok(Claim::Taken(entry.position)),
            }
        }
        Err(contended())
    }

    /// Claims `record`'s id for `position` over the entry at sequence `over`; if another
    /// append's claim stands, yields to it and returns the position it holds.
    async fn claim_or_yield(
        &self,
        key: &str,
        record: &NewRecord,
        position: u64,
        mut over: u64,
        window: u64,
        now: Timestamp,
    ) -> Result<Option<u64>> {
        for _ in 0..CAS_ATTEMPTS {
            if self.claim(key, record, position, over, now).await? {
                return Ok(None);
            }
            match self.resolve_claim(key, record.id, window, now).await? {
                Claim::Taken(original) => return Ok(Some(original)),
                Claim::Free(sequence) => over = sequence,
            }
        }
        Err(contended())
    }

    /// Closes positions an append reserved and will not fill, so readers need not wait the
    /// reservations out. Best effort: what cannot be closed now, a reader closes once stale.
    async fn give_up(&self, key: &str, positions: impl IntoIterator<Item = u64>) {
        for position in positions {
            if self.close(key, position, false).await.unwrap_or(false) {
                // Retried: while the meta holds a closed position, an overflow may drop it
                // and purge its tombstone, and a claim on it would then stand (see
                // `resolve_claim`).
                for _ in 0..3 {
                    if self.abandon(key, position, false).await.is_ok() {
                        break;
                    }
                }
            }
        }
    }

    /// A session's step in one compare-and-set: applies `ack`, reads after `after`, counts a
    /// delivery for each record returned when `mark` is set, writes the meta once, then
    /// removes what the ack took. Returns the records the ack removed, and the batch.
    async fn ack_read_mark(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<(u64, ReadBatch)> {
        let key = Self::key(recipient);
        let Some(Loaded { mut meta, revision }) = self.load(&key).await? else {
            return Ok((0, ReadBatch::default()));
        };
        let original = meta.clone();
        let mut acked = ack.map(|ack| meta.ack(ack)).unwrap_or_default();
        let mut batch = ReadBatch {
            lost_unconfirmed: meta.lost_total - meta.lost_confirmed,
            lost_total: meta.lost_total,
            ..ReadBatch::default()
        };
        let start = after.map_or(0, |after| after.0.saturating_add(1));
        let candidates: Vec<(u64, u32)> = meta
            .live_from(start)
            .map(|(position, slot)| (position, slot.deliveries))
            .collect();
        let per_request = READ_AHEAD.min(limit.max_messages.max(1));
        let queue = key.as_str();
        let mut gets = if self.shared.batched_gets.load(Ordering::Relaxed) {
            // In requests of up to READ_AHEAD records, the next asked while one is read.
            let chunks: Vec<Vec<(u64, u32)>> =
                candidates.chunks(per_request).map(<[_]>::to_vec).collect();
            futures::stream::iter(chunks)
                .map(|chunk: Vec<(u64, u32)>| async move {
                    let positions: Vec<u64> = chunk.iter().map(|&(position, _)| position).collect();
                    let answers = match self.get_records(queue, &positions).await {
                        Ok(found) => found,
                        // The request failed: its first record carries the error.
                        Err(error) => vec![Err(error)],
                    };
                    futures::stream::iter(
                        chunk
                            .into_iter()
                            .zip(answers)
                            .map(|((position, deliveries), found)| (position, deliveries, found)),
                    )
                })
                .buffered(2)
                .flatten()
                .boxed()
        } else {
            futures::stream::iter(candidates)
                .map(|(position, deliveries)| async move {
                    let found = self.get_record(queue, position, false).await;
                    (position, deliveries, found)
                })
                .buffered(per_request)
                .boxed()
        };
        let mut bytes = 0usize;
        // Positions found closed (a tombstone there) or closed by this read, and whether each
        // counts as lost: marked in the meta by the read's one write.
        let mut abandoned: Vec<(u64, bool)> = Vec::new();
        while let Some((position, deliveries, found)) = gets.next().await {
            // Once full, only passed-over records still join the batch (as every backend
            // reports them); a fault further on is the next read's, not this one's.
            let full = batch.records.len() >= limit.max_messages;
            let mut found = match found {
                Ok(found) => found,
                Err(_) if full || !batch.records.is_empty() => break,
                Err(error) => return Err(error),
            };
            if matches!(found, Found::Missing) {
                if self.reservation_stale(&meta, position) {
                    // Its appender is long gone, or the server removed the record at the end
                    // of its TTL: closed now, one publish, no wait and no meta write of its
                    // own. A record that landed first (or that a lagging replica missed)
                    // refuses the tombstone, and the leader has it.
                    found = if self.close(queue, position, true).await? {
                        Found::Gone { lost: true }
                    } else {
                        self.get_record(queue, position, true).await?
                    };
                } else if !batch.records.is_empty() || !batch.expired.is_empty() {
                    // Return what was read; the next read waits at the hole.
                    break;
                } else {
                    found = self.await_missing(queue, &meta, position).await?;
                }
            }
            let mut record = match found {
                Found::Record(record) => record,
                Found::Gone { lost } => {
                    abandoned.push((position, lost));
                    // As many as a batch holds, like expired records passed over.
                    if abandoned.len() >= limit.max_messages {
                        break;
                    }
                    continue;
                }
                Found::Missing => break,
            };
            if record
                .expires_at
                .is_some_and(|expires_at| expires_at <= now)
            {
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
        drop(gets);
        let seqs: Vec<Seq> = if mark {
            batch.records.iter().map(|r| r.seq).collect()
        } else {
            Vec::new()
        };
        let abandon = |meta: &mut Meta| {
            for &(position, lost) in &abandoned {
                meta.abandon(position, lost);
            }
        };
        abandon(&mut meta);
        meta.mark_delivered(&seqs);
        if meta == original {
            return Ok((0, batch));
        }
        // Written against the meta read, unless another node changed it: then the ack, the
        // closes and the marks are applied again to the meta as it now is.
        let mut current = Some((meta, revision));
        let turn = self.queue_turn(&key).await;
        for _ in 0..CAS_ATTEMPTS {
            let (meta, revision) = match current.take() {
                Some(loaded) => loaded,
                None => {
                    let Some(Loaded { mut meta, revision }) = self.load(&key).await? else {
                        return Ok((0, batch));
                    };
                    acked = ack.map(|ack| meta.ack(ack)).unwrap_or_default();
                    abandon(&mut meta);
                    meta.mark_delivered(&seqs);
                    (meta, revision)
                }
            };
            if self.store(&key, &meta, revision).await?.is_some() {
                // The losses this read counted (its closes) go out with this batch, as
                // expired records passed over would.
                batch.lost_total = meta.lost_total;
                batch.lost_unconfirmed = meta.lost_total - meta.lost_confirmed;
                // Out of the turn: waiting for room among the removals holds up no one.
                drop(turn);
                self.remove_later(&key, acked.positions).await;
                return Ok((acked.acked, batch));
            }
        }
        Err(contended())
    }

    /// Queues the records at `positions` for removal from the stream; past
    /// `REMOVALS_QUEUED` waiting, the caller waits for room.
    async fn remove_later(&self, key: &str, positions: Vec<u64>) {
        for position in positions {
            let subject = self.record_subject(key, position);
            if self.shared.removals.send(subject).await.is_err() {
                return;
            }
        }
    }
}

#[async_trait]
impl Storage for NatsStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_max_read_batch(10_000)
            .with_durable(true)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        let key = Self::key(recipient);
        let window = quota.dedup_window_ms();
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
        // Each record's outcome: decided now (a duplicate), or stored at `to_store`'s place.
        let mut outcome: Vec<Option<Appended>> = vec![None; records.len()];
        // For sender-chosen ids: the entry to claim over (0: none), and the batch's first
        // record of each id.
        let mut expected: HashMap<usize, u64> = HashMap::new();
        let mut first_of: HashMap<MessageId, usize> = HashMap::new();
        let mut same_as: HashMap<usize, usize> = HashMap::new();
        for (i, record) in records.iter().enumerate().filter(|(_, r)| r.dedup) {
            if let Some(&first) = first_of.get(&record.id) {
                same_as.insert(i, first);
                continue;
            }
            first_of.insert(record.id, i);
            match self.resolve_claim(&key, record.id, window, now).await? {
                Claim::Taken(position) => outcome[i] = Some(Appended::Duplicate(Seq(position))),
                Claim::Free(over) => {
                    expected.insert(i, over);
                }
            }
        }
        let to_store: Vec<usize> = (0..records.len())
            .filter(|i| outcome[*i].is_none() && !same_as.contains_key(i))
            .collect();
        let sizes = to_store
            .iter()
            .map(|&i| {
                u32::try_from(records[i].body.len()).map_err(|_| Error::MessageTooLarge {
                    size: records[i].body.len(),
                    max: u32::MAX as usize,
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let Granted {
            plan,
            mut pending,
            dropped_at_once,
        } = self.reserve(&key, sizes, quota).await?;
        let positions: HashMap<usize, u64> = to_store
            .iter()
            .enumerate()
            .map(|(k, &i)| (i, plan.first + k as u64))
            .collect();
        // Ids are claimed before their records go out: a record is never stored without
        // its claim, so a send retried after any failure finds the claim, and the claim is
        // checked against its position (see `resolve_claim`).
        // In id order, so two appends claiming the same ids never wait on each other's.
        let mut claiming: Vec<(usize, u64)> = expected.into_iter().collect();
        claiming.sort_unstable_by_key(|&(i, _)| records[i].id);
        for (i, over) in claiming {
            match self
                .claim_or_yield(&key, &records[i], positions[&i], over, window, now)
                .await
            {
                Ok(None) => {}
                Ok(Some(original)) => {
                    outcome[i] = Some(Appended::Duplicate(Seq(original)));
                    self.give_up(&key, [positions[&i]]).await;
                    pending = pending.saturating_sub(1);
                }
                Err(error) => {
                    let unpublished: Vec<u64> = to_store
                        .iter()
                        .filter(|j| outcome[**j].is_none())
                        .map(|j| positions[j])
                        .collect();
                    self.give_up(&key, unpublished).await;
                    return Err(error);
                }
            }
        }
        let publishing: Vec<usize> = to_store
            .iter()
            .copied()
            .filter(|&i| outcome[i].is_none() && !dropped_at_once.contains(&positions[&i]))
            .collect();
        let publishes = futures::future::join_all(
            publishing
                .iter()
                .map(|&i| self.publish_record(&key, positions[&i], &records[i])),
        )
        .await;
        let mut failure = None;
        for (result, &i) in publishes.into_iter().zip(&publishing) {
            match result {
                Ok(Some(_)) => {}
                Ok(None) => {
                    failure.get_or_insert(Error::storage_msg(
                        Retry::Yes,
                        format!(
                            "nats: the append took longer than stale_reservation ({:?}) and a \
                             reader closed its position; record {i} was not stored",
                            self.shared.options.stale_reservation
                        ),
                    ));
                }
                Err(error) => {
                    // A publish whose ack was lost may have landed: then the close fails,
                    // and the record stays (with its claim), as a retryable error allows.
                    self.give_up(&key, [positions[&i]]).await;
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        for &i in &to_store {
            if outcome[i].is_none() {
                outcome[i] = Some(Appended::Stored(Seq(positions[&i])));
            }
        }
        for (i, first) in same_as {
            outcome[i] = outcome[first].map(|o| Appended::Duplicate(o.seq()));
        }
        let dropped = plan.dropped.len() as u64;
        self.remove_later(&key, plan.dropped).await;
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

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        let (_, batch) = self
            .ack_read_mark(recipient, None, after, limit, now, false)
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
    ) -> Result<super::DeliveryRead> {
        let (acked, batch) = self
            .ack_read_mark(recipient, ack, after, limit, now, true)
            .await?;
        Ok(super::DeliveryRead { acked, batch })
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let key = Self::key(recipient);
        self.update(&key, |meta| {
            let before = meta.clone();
            meta.mark_delivered(seqs);
            Ok((*meta != before).then_some(()))
        })
        .await?;
        Ok(())
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, _now: Timestamp) -> Result<u64> {
        let key = Self::key(recipient);
        let done = self
            .update(&key, |meta| {
                let before = meta.clone();
                let acked = meta.ack(ack);
                Ok((*meta != before).then_some(acked))
            })
            .await?;
        let Some((acked, _, _)) = done else {
            return Ok(0);
        };
        self.remove_later(&key, acked.positions).await;
        Ok(acked.acked)
    }

    async fn purge(
        &self,
        _now: Timestamp,
        _idle_before: Option<Timestamp>,
        _budget: usize,
    ) -> Result<PurgeOutcome> {
        // The streams' max_age removes by the server's clock (see the module docs).
        Ok(PurgeOutcome::default())
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let key = Self::key(recipient);
        let Some(Loaded { meta, .. }) = self.load(&key).await? else {
            return Ok(RecipientStats::default());
        };
        let (messages, bytes) = meta.live();
        let mut oldest_sent_at = None;
        for (position, _) in meta.live_from(0).take(8) {
            if let Found::Record(record) = self.get_record(&key, position, false).await? {
                oldest_sent_at = Some(record.sent_at);
                break;
            }
        }
        Ok(RecipientStats {
            messages,
            bytes,
            oldest_sent_at,
            newest_seq: meta.newest().map(Seq),
            lost: meta.lost_total - meta.lost_confirmed,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let key = Self::key(recipient);
        // Records published from here on belong to the next queue: the purge below stops
        // before them. (One still in flight for the old queue lands at a position below the
        // new floor: never read, and `max_age` removes it.)
        let mut records = self.shared.records.clone();
        let bound = records
            .info()
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?
            .state
            .last_sequence;
        // The meta stays, emptied, so the next queue's positions and loss total go on from
        // this one's.
        let removed = self
            .update(&key, |meta| {
                let (messages, _) = meta.live();
                *meta = meta.emptied();
                Ok(Some(messages))
            })
            .await?;
        for filter in [format!("{}.d.{key}.>", self.shared.options.prefix)] {
            self.shared
                .dedup
                .purge()
                .filter(filter)
                .await
                .map_err(|error| Error::storage(Retry::Yes, error))?;
        }
        let Some((messages, _, _)) = removed else {
            return Ok(0);
        };
        // One purge by wildcard: it walks the subjects of the stream's blocks, fine for a
        // call this rare. (Up to sequence 1 the server reads as "no bound": skip it.)
        if bound > 0 {
            self.shared
                .records
                .purge()
                .filter(format!("{}.r.{key}.*", self.shared.options.prefix))
                .sequence(bound + 1)
                .await
                .map_err(|error| Error::storage(Retry::Yes, error))?;
        }
        Ok(messages)
    }
}

/// Removes gone records, one purge of each exact subject (the server looks the subject up;
/// a purge by wildcard walks every subject of the stream's blocks), `REMOVALS_IN_FLIGHT` at
/// a time, off the path of the acks that queued them: on JetStream 2.9 a removal costs about
/// as much as a whole read, so a drain waits for none. Best effort: a gone record left
/// behind (a failed purge, a node that stopped with removals queued) is never read, the meta
/// saying it is gone, and the stream's `max_age` removes it. Ends when the storage is
/// dropped.
async fn remove_in_background(records: Stream, queued: tokio::sync::mpsc::Receiver<String>) {
    tokio_stream_of(queued)
        .map(|subject| {
            let records = records.clone();
            async move { records.purge().filter(subject).await }
        })
        .buffer_unordered(REMOVALS_IN_FLIGHT)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "nats: removing a gone record failed");
            }
        })
        .await;
}

/// A tokio channel as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// Publishes and waits for the ack: `Some(sequence)`, or `None` if an expectation (the
/// subject's last sequence) did not hold.
async fn publish_ack(context: &Context, subject: String, publish: Publish) -> Result<Option<u64>> {
    let pending = context.send_publish(subject, publish).await;
    let result = match pending {
        Ok(ack) => ack.await,
        Err(error) => Err(error),
    };
    match result {
        Ok(ack) => Ok(Some(ack.sequence)),
        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
        Err(error) => Err(Error::storage(Retry::Yes, error)),
    }
}

/// Whether a server of `version` (`2.11.0`, `v2.12.0-RC.1`) is at least `wanted` (major,
/// minor): 2.11 keeps a per-message TTL and answers batched direct gets; 2.12 counts what an
/// answer left out exactly.
fn version_at_least(version: &str, wanted: (u64, u64)) -> bool {
    let mut numbers = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= wanted,
        _ => false,
    }
}

/// A `Nats-TTL` value: `lifetime_ms` rounded up to whole seconds, plus `grace`.
fn ttl_seconds(lifetime_ms: u64, grace: Duration) -> String {
    lifetime_ms
        .div_ceil(1000)
        .saturating_add(grace.as_secs())
        .saturating_add(u64::from(grace.subsec_nanos() > 0))
        .to_string()
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn contended() -> Error {
    Error::storage_msg(
        Retry::Yes,
        format!("nats: the queue changed under {CAS_ATTEMPTS} attempts in a row; retry"),
    )
}

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidConfig { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageExt;

    #[test]
    fn per_message_ttl_is_used_from_server_2_11() {
        for (version, keeps) in [
            ("2.9.10", false),
            ("2.10.26", false),
            ("2.11.0", true),
            ("2.11.0-RC.1", true),
            ("v2.12.3", true),
            ("3.0.0", true),
            ("", false),
            ("dev", false),
        ] {
            assert_eq!(version_at_least(version, (2, 11)), keeps, "{version:?}");
        }
        assert!(!version_at_least("2.11.17", (2, 12)));
        assert!(version_at_least("2.12.0", (2, 12)));
    }

    #[test]
    fn a_ttl_is_whole_seconds_rounded_up_plus_the_grace() {
        let grace = Duration::from_secs(3630);
        assert_eq!(ttl_seconds(0, grace), "3630");
        assert_eq!(ttl_seconds(1, grace), "3631");
        assert_eq!(ttl_seconds(60_000, grace), "3690");
        assert_eq!(ttl_seconds(60_001, Duration::from_millis(1_500)), "63");
        assert_eq!(
            ttl_seconds(u64::MAX, grace),
            (u64::MAX / 1000 + 1 + 3630).to_string()
        );
    }

    /// The server's URL, or `None` (saying the test is skipped) when it is unset.
    pub(super) fn url() -> Option<String> {
        let url = std::env::var("OFFLINE_QUEUE_NATS_URL").ok();
        if url.is_none() {
            assert_ne!(
                std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref(),
                Ok("1"),
                "OFFLINE_QUEUE_NATS_URL is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires it"
            );
            eprintln!("skipped: OFFLINE_QUEUE_NATS_URL is not set");
        }
        url
    }

    /// A storage on streams of its own (`OQT_*`), and their name.
    async fn own_storage(url: &str, stale_reservation: Duration) -> (NatsStorage, String) {
        let name = format!("OQT_{}", MessageId::generate());
        let storage = NatsStorage::options()
            .stream(&name)
            .prefix(&name)
            .stale_reservation(stale_reservation)
            .connect(url)
            .await
            .unwrap();
        (storage, name)
    }

    /// Deletes the streams of [`own_storage`].
    async fn delete_streams(url: &str, name: &str) {
        let context = jetstream::new(async_nats::connect(url).await.unwrap());
        for suffix in ["", "_META", "_DEDUP"] {
            let _ = context.delete_stream(format!("{name}{suffix}")).await;
        }
    }

    fn record(body: &[u8]) -> NewRecord {
        NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: Timestamp::from_millis(1),
            expires_at: None,
            body: body.to_vec(),
        }
    }

    /// A server that does not answer a batched direct get as 2.11 does (here 2.9's "408
    /// Empty Request", or any server when the read is forced to ask) turns batching off for
    /// the storage, and the read it failed still returns every record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_refuses_batched_gets_is_read_one_record_a_request() {
        let Some(url) = url() else { return };
        let (storage, name) = own_storage(&url, Duration::from_secs(30)).await;
        let version = storage.shared.client.server_info().version;
        let who = RecipientId::new("erin").unwrap();
        let now = Timestamp::now_system();
        let bodies: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i]).collect();
        storage
            .append(
                &who,
                bodies.iter().map(|b| record(b)).collect(),
                &Quota::UNLIMITED,
                now,
            )
            .await
            .unwrap();
        storage.shared.batched_gets.store(true, Ordering::Relaxed);
        let limit = BatchLimit {
            max_messages: 100,
            max_bytes: usize::MAX,
        };
        let batch = storage.read(&who, None, limit, now).await.unwrap();
        let read: Vec<Vec<u8>> = batch.records.iter().map(|r| r.body.to_vec()).collect();
        assert_eq!(read, bodies);
        assert_eq!(
            storage.shared.batched_gets.load(Ordering::Relaxed),
            version_at_least(&version, (2, 11)),
            "server {version}"
        );
        delete_streams(&url, &name).await;
    }

    /// An appender that reserved a position and never published it (it died) leaves a hole.
    /// A read waits at it while the reservation is fresh, then closes it, counts it lost,
    /// and reads on: the record behind it is delivered, not held until some later wake-up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_waits_out_a_dead_appenders_hole_and_reads_on() {
        let Some(url) = url() else {
            return;
        };
        let (storage, name) = own_storage(&url, Duration::from_secs(1)).await;
        let bob = RecipientId::new("bob").unwrap();
        let key = NatsStorage::key(&bob);
        let now = Timestamp::from_millis(1);
        let first = storage
            .append_one(&bob, record(b"before"), &Quota::UNLIMITED, now)
            .await
            .unwrap();
        // The dead appender: a reservation, written, and no record.
        let Loaded { mut meta, revision } = storage.load_or_new(&key).await.unwrap();
        let hole = meta
            .reserve(&[5], &Quota::UNLIMITED, wall_ms(), 0)
            .unwrap()
            .first;
        assert_eq!(hole, first.record.seq().0 + 1);
        assert!(
            storage
                .store(&key, &meta, revision)
                .await
                .unwrap()
                .is_some()
        );
        let behind = storage
            .append_one(&bob, record(b"after"), &Quota::UNLIMITED, now)
            .await
            .unwrap();
        assert_eq!(behind.record, Appended::Stored(Seq(hole + 1)));

        // A read that is full before the hole neither waits at it nor closes it.
        let one = BatchLimit {
            max_messages: 1,
            max_bytes: usize::MAX,
        };
        let read = storage.read(&bob, None, one, now).await.unwrap();
        let seqs: Vec<Seq> = read.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [first.record.seq()]);
        assert_eq!(
            storage.stats(&bob).await.unwrap().lost,
            0,
            "the hole is untouched"
        );

        // A read that reaches it waits it out, closes it, and reads on.
        let read = storage.read_all(&bob, now).await.unwrap();
        let bodies: Vec<&[u8]> = read.iter().map(|r| &r.body[..]).collect();
        assert_eq!(
            bodies,
            [&b"before"[..], b"after"],
            "the record behind the hole is read"
        );
        let stats = storage.stats(&bob).await.unwrap();
        assert_eq!(
            (stats.messages, stats.lost),
            (2, 1),
            "the hole counts as lost"
        );

        delete_streams(&url, &name).await;
    }

    /// Appends to one queue that wait at the same moment share one compare-and-set, each
    /// decided alone: with the queue's turn held while 65 appends gather, the meta is
    /// written once for all of them, and a quota refuses only those past it (the first in
    /// line, too big, is refused without stopping the rest).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_waiting_together_share_one_meta_write() {
        let Some(url) = url() else {
            return;
        };
        let (storage, name) = own_storage(&url, NatsOptions::default().stale_reservation).await;
        let bob = RecipientId::new("bob").unwrap();
        let key = NatsStorage::key(&bob);
        let now = Timestamp::from_millis(1);
        let quota = Quota {
            max_messages: 50,
            max_bytes: 1_000,
            overflow: crate::limits::Overflow::Reject,
            ..Quota::UNLIMITED
        };
        let first = storage
            .append_one(&bob, record(b"first"), &quota, now)
            .await
            .unwrap();
        let mut metas = storage.shared.meta.clone();
        let writes_before = metas.info().await.unwrap().state.last_sequence;

        let turn = storage.queue_turn(&key).await;
        let gathered = |count: usize| {
            let storage = storage.clone();
            let key = key.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while storage
                        .shared
                        .gathering
                        .lock()
                        .get(&key)
                        .map_or(0, Vec::len)
                        < count
                    {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("the appends gather while the turn is held");
            }
        };
        // First in line, one append over the byte quota: refused alone, the rest go on.
        let too_big = {
            let (storage, bob) = (storage.clone(), bob.clone());
            tokio::spawn(async move {
                let body = vec![b'x'; 2_000];
                storage.append_one(&bob, record(&body), &quota, now).await
            })
        };
        gathered(1).await;
        let appends: Vec<_> = (0..64)
            .map(|n| {
                let (storage, bob) = (storage.clone(), bob.clone());
                tokio::spawn(async move {
                    let body = format!("{n}").into_bytes();
                    storage.append_one(&bob, record(&body), &quota, now).await
                })
            })
            .collect();
        gathered(65).await;
        drop(turn);
        assert!(
            matches!(too_big.await.unwrap(), Err(Error::QueueFull { .. })),
            "over the byte quota"
        );
        let mut stored = Vec::new();
        let mut refused = 0;
        for append in appends {
            match append.await.unwrap() {
                Ok(outcome) => stored.push(outcome.record.seq().0),
                Err(Error::QueueFull { .. }) => refused += 1,
                Err(error) => panic!("{error}"),
            }
        }
        let writes = metas.info().await.unwrap().state.last_sequence - writes_before;
        assert_eq!(writes, 1, "one meta write for the 65 appends");
        assert_eq!((stored.len(), refused), (49, 15), "the quota of 50 holds");
        stored.sort_unstable();
        let expected: Vec<u64> = (1..=49).map(|k| first.record.seq().0 + k).collect();
        assert_eq!(stored, expected, "positions follow on, none shared");
        assert_eq!(storage.read_all(&bob, now).await.unwrap().len(), 50);

        delete_streams(&url, &name).await;
    }

    /// An append dropped while it waits for the queue's turn reserves nothing: no hole for
    /// readers to wait out, and the next append takes the next position.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_dropped_while_waiting_reserves_nothing() {
        let Some(url) = url() else {
            return;
        };
        let (storage, name) = own_storage(&url, NatsOptions::default().stale_reservation).await;
        let bob = RecipientId::new("bob").unwrap();
        let key = NatsStorage::key(&bob);
        let now = Timestamp::from_millis(1);
        let quota = Quota::UNLIMITED;
        let first = storage
            .append_one(&bob, record(b"first"), &quota, now)
            .await
            .unwrap();
        let mut metas = storage.shared.meta.clone();
        let writes_before = metas.info().await.unwrap().state.last_sequence;

        let turn = storage.queue_turn(&key).await;
        let dropped = {
            let (storage, bob) = (storage.clone(), bob.clone());
            tokio::spawn(async move { storage.append_one(&bob, record(b"x"), &quota, now).await })
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while storage.shared.gathering.lock().get(&key).is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the append waits for the turn");
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        drop(turn);

        let next = storage
            .append_one(&bob, record(b"next"), &quota, now)
            .await
            .unwrap();
        assert_eq!(next.record, Appended::Stored(Seq(first.record.seq().0 + 1)));
        let writes = metas.info().await.unwrap().state.last_sequence - writes_before;
        assert_eq!(writes, 1, "only the next append wrote the meta");
        let bodies: Vec<Bytes> = storage
            .read_all(&bob, now)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.body)
            .collect();
        assert_eq!(bodies, [&b"first"[..], b"next"]);

        delete_streams(&url, &name).await;
    }

    /// Under DropOldest, a later append of one shared write may drop positions an earlier
    /// one reserved: they leave the later one's removals and the earlier one publishes
    /// nothing there.
    #[test]
    fn positions_dropped_within_one_write_are_not_published_or_removed() {
        let quota = Quota::UNLIMITED;
        let asks = vec![(vec![1, 1], quota), (vec![1], quota), (vec![1], quota)];
        let plans = vec![
            Ok(Reserved {
                first: 11,
                dropped: vec![7],
            }),
            Err(Error::TtlZero),
            // Drops an older record, and the first ask's first position.
            Ok(Reserved {
                first: 13,
                dropped: vec![8, 11],
            }),
        ];
        let grants = granted(plans, &asks, 3);
        let first = grants[0].as_ref().unwrap();
        assert_eq!(
            (&first.plan.dropped, &first.dropped_at_once),
            (&vec![7], &vec![11])
        );
        assert!(grants[1].is_err());
        let third = grants[2].as_ref().unwrap();
        assert_eq!(
            (&third.plan.dropped, &third.dropped_at_once, third.pending),
            (&vec![8], &vec![], 3)
        );
    }

    /// What an append with a sender-chosen id had done when its node failed.
    enum Done {
        /// Claimed the id, then closed its position (its publish failed).
        ClaimedAndClosed,
        /// Claimed the id and died: the position stays reserved, never filled.
        Claimed,
        /// Claimed and published; the answer was lost, so the sender retries.
        ClaimedAndPublished,
    }

    /// Does by hand what `append` does for `record` up to `done`; returns its position.
    async fn half_append(
        storage: &NatsStorage,
        recipient: &RecipientId,
        record: &NewRecord,
        done: Done,
    ) -> u64 {
        let key = NatsStorage::key(recipient);
        let now = Timestamp::from_millis(1);
        let Loaded { mut meta, revision } = storage.load_or_new(&key).await.unwrap();
        let size = u32::try_from(record.body.len()).unwrap();
        let position = meta
            .reserve(&[size], &Quota::UNLIMITED, wall_ms(), 0)
            .unwrap()
            .first;
        assert!(
            storage
                .store(&key, &meta, revision)
                .await
                .unwrap()
                .is_some()
        );
        assert!(storage.claim(&key, record, position, 0, now).await.unwrap());
        match done {
            Done::ClaimedAndClosed => storage.give_up(&key, [position]).await,
            Done::Claimed => {}
            Done::ClaimedAndPublished => {
                let published = storage.publish_record(&key, position, record).await;
                assert!(published.unwrap().is_some());
            }
        }
        position
    }

    /// A send with an id that failed part-way is retried with the same id. The retry stores
    /// the message exactly once: again when the first attempt left no record (its claim
    /// stays behind, pointing at a closed or never-filled position), and not again when
    /// the first attempt's record landed (acked since or not).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_send_is_stored_once_whatever_the_failed_attempt_left() {
        let Some(url) = url() else {
            return;
        };
        let (storage, name) = own_storage(&url, Duration::from_secs(1)).await;
        let now = Timestamp::from_millis(1);
        let quota = Quota::UNLIMITED;
        for (name, done, stored_again) in [
            ("closed", Done::ClaimedAndClosed, true),
            ("dead", Done::Claimed, true),
            ("landed", Done::ClaimedAndPublished, false),
        ] {
            let recipient = RecipientId::new(name).unwrap();
            let mut message = record(name.as_bytes());
            message.dedup = true;
            let first = half_append(&storage, &recipient, &message, done).await;
            let retry = storage
                .append_one(&recipient, message.clone(), &quota, now)
                .await
                .unwrap();
            if stored_again {
                assert_eq!(retry.record, Appended::Stored(Seq(first + 1)), "{name}");
            } else {
                assert_eq!(retry.record, Appended::Duplicate(Seq(first)), "{name}");
            }
            let read = storage.read_all(&recipient, now).await.unwrap();
            let bodies: Vec<&[u8]> = read.iter().map(|r| &r.body[..]).collect();
            assert_eq!(bodies, [name.as_bytes()], "{name}: stored once");
            assert_eq!(read[0].id, message.id, "{name}");

            // Acked, the record still answers for its id within the window.
            let stored_at = read[0].seq;
            storage
                .ack_through(&recipient, stored_at, now)
                .await
                .unwrap();
            let again = storage
                .append_one(&recipient, message.clone(), &quota, now)
                .await
                .unwrap();
            assert_eq!(
                again.record,
                Appended::Duplicate(stored_at),
                "{name}: acked"
            );
            assert!(storage.read_all(&recipient, now).await.unwrap().is_empty());
        }
        delete_streams(&url, &name).await;
    }
}
