//! [`RedisStorage`]: queues in Redis or Redis Cluster, shared by every engine instance that
//! points at it (feature `redis`; needs a tokio runtime).
//!
//! ```no_run
//! # async fn node() -> Result<(), offline_queue::Error> {
//! use std::sync::Arc;
//! use offline_queue::{OfflineQueue, RedisStorage};
//!
//! // Every server node runs this against the same Redis (or the same cluster's URLs with
//! // `RedisStorage::options().connect_cluster(&urls)`).
//! let storage = RedisStorage::connect("redis://127.0.0.1:6379/").await?;
//! let queue = OfflineQueue::builder().storage(Arc::new(storage)).build()?;
//! // Without this task, a session on this node is not woken by sends through other nodes.
//! tokio::spawn(queue.wakeup_listener().expect("Redis storage is shared"));
//! # Ok(()) }
//! ```
//!
//! # Layout
//! Each recipient has up to seven keys, all tagged `{<recipient id in hex>}` so one step
//! reaches them in one cluster slot (`prelude.lua` in the source lists them): metadata (the
//! seq counter, the seq at the front of the log, record and byte counts, loss counters, last
//! activity, packed in one string), the log (a list of the records in seq order), the
//! exceptions to deadline order (a sorted set), delivery counts, the dedup ids with their
//! times, and presence (which nodes hold a session). Every step that changes a queue is one
//! Lua function, so it is atomic: append with its quota, overflow policy and dedup; ack;
//! purge; removal.
//!
//! The log is a list because what the engine asks most is what a list does cheaply: append
//! at the back (`RPUSH`), read a range after a cursor (`LRANGE`: element `i` holds seq
//! `head + i`), and drop the front on a cumulative ack (`LTRIM`). A record acked alone, or
//! expired, in the middle becomes an empty string (a tombstone) until the front reaches it.
//! Sorted sets and hashes, which an earlier layout used, cost a skiplist node and a hash
//! entry per record: inserting them was most of an append's time (see BENCHMARKS.md).
//!
//! Delivery counts are mostly implied: the metadata holds a delivered watermark, below which
//! every record was handed over at least once, and a batch read and marked in order only
//! moves it. Only a redelivery, or a mark that skips a record, writes a count to the
//! deliveries hash.
//!
//! The steps are one function library (`FUNCTION LOAD`, then `FCALL`; Redis 7.0 or later),
//! named after a hash of its source, so engines of different versions sharing a Redis each
//! run their own. A server that lost it (restarted without persistence, a new master) gets
//! it again from the next call. Keys of this layout (2) are new names; queues written by
//! layout 1 (before 2026-11-26) are not read, and vanish by their TTLs.
//!
//! # Expiry
//! Each record carries its deadline in its header; reads skip expired records. A record due
//! no earlier than every record before it (the usual case: one TTL for all) needs nothing
//! more, since the records not listed as exceptions are in deadline order and a purge walks
//! the log from the front until one is not due. A record due earlier than one appended
//! before it is also listed in the exceptions set, which purge reads by deadline. Purging
//! finds queues through sixteen index buckets (sorted sets keyed by each queue's earliest
//! deadline, on their own slots), so a purge touches the queues with something due, not
//! every queue. The index is a hint kept beside the steps, not inside them (a cluster cannot
//! update two slots atomically): an append lowers its queue's entry, a purge raises it
//! again. Each recipient key also carries a Redis TTL of `idle_ttl` (default 90 days), set
//! when the key is created and refreshed by appends and acks once a 64th of it has passed
//! (so a busy queue rarely pays for it): an abandoned queue vanishes even if no engine ever
//! runs maintenance.
//!
//! # Cost
//! An append is one `FCALL` of four Redis commands (`GET` and `SET` of the metadata, `RPUSH`,
//! and a presence check); on Redis 7.0 it costs about 14 µs of the server's CPU, against
//! under 2 µs for a bare `LPUSH`, so one Redis core serves some 60,000 sends a second (see
//! BENCHMARKS.md), and a cluster adds that per master. A cumulative ack of a run without
//! tombstones reads only the records at its two ends (each header carries the body bytes
//! appended before it, so the run's bytes are a difference), and a read of a plain run
//! brings no record into Lua: `plan.lua` checks the run by its ends and an `LRANGE` in the
//! same `MULTI` returns it (`run_read.rs`). Draining runs at about half the rate of bare
//! `LRANGE` + `LTRIM`.
//!
//! # Several nodes
//! Each engine instance is a node with its own id. While it holds a session for a recipient
//! it marks the recipient's presence hash (`node -> deadline`, by the Redis server's clock,
//! refreshed every `presence_ttl / 3`), and an append through any other node reads it in the
//! same script: the send is answered `recipient_online`, no push goes out, and the other node
//! is woken over sharded pub/sub (`SPUBLISH` to the node's own channel) so its session
//! delivers at once. A session's start or end reaches Redis within one round trip; a node
//! that dies without ending its sessions still counts as present for up to `presence_ttl`
//! (default 30 s), during which pushes for its recipients are held back.
//!
//! # Failures
//! Connection loss, timeouts, and a server that is loading, out of memory or failing over
//! are retryable errors; the connection reconnects by itself, and the wake-up subscription
//! is made again (after which every local session reads again, in case a wake-up was
//! missed). A step that failed with a retryable error may still have been applied (the reply
//! was lost, or the cluster client retried it): an append with a sender-chosen id is
//! deduplicated, one without may be stored twice, as with any at-least-once queue.
//!
//! A key under our prefix that holds another type (someone else's data) is a non-retryable
//! error. A new queue checks its keys before writing anything; an existing queue assumes
//! nobody writes under its prefix.
//!
//! Run Redis with `maxmemory-policy noeviction`: every key here has a TTL, so a `volatile-*`
//! policy would evict a queue's keys one at a time. While such a Redis is full, appends fail
//! (retryably) and everything else runs, so sessions still drain it. With `track_total_bytes`, the byte
//! counter is exact while steps succeed; queues that vanish by TTL are not subtracted, so
//! run maintenance (idle removal is) and treat the budget as approximate.

mod keys;
mod library;
mod run_read;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc as fmpsc;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisFuture, Script,
    Value,
};

use super::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::coordination::{Coordination, Presence};
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Overflow, Quota};
use crate::message::{MessageId, RecipientId, Seq};
use library::{Function, Library};

/// Bytes before the body in a stored record: body bytes appended before it (8, added by the
/// append step), sent-at (8), id (16) and deadline (8, a big-endian double in ms, 0 for
/// none, so the steps read it with `struct.unpack`). The append step is sent the record
/// without its first field.
const HEADER: usize = 40;
/// Largest count passed to a script: Lua numbers are doubles.
const LUA_MAX: u64 = 1 << 53;

/// The per-recipient steps (functions of one library) and the two scripts that touch only
/// storage-wide keys.
struct Steps {
    append: Function,
    read: Function,
    plan: Function,
    mark: Function,
    ack: Function,
    purge: Function,
    idle: Function,
    stats: Function,
    remove: Function,
    presence: Function,
    forget: Function,
    reserve: Script,
    refile: Script,
}

impl Steps {
    fn new(library: &Arc<Library>) -> Self {
        Self {
            append: library.function("append"),
            read: library.function("read"),
            plan: library.function("plan"),
            mark: library.function("mark"),
            ack: library.function("ack"),
            purge: library.function("purge"),
            idle: library.function("idle"),
            stats: library.function("stats"),
            remove: library.function("remove"),
            presence: library.function("presence"),
            forget: library.function("forget"),
            reserve: Script::new(include_str!("reserve.lua")),
            refile: Script::new(include_str!("refile.lua")),
        }
    }
}

/// A connection to one server (reconnecting) or to a cluster (following its slots).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// How to build a [`RedisStorage`]: `RedisStorage::options()`, then `connect` or
/// `connect_cluster`.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    prefix: String,
    node_id: Option<String>,
    presence_ttl: Duration,
    durable: Option<bool>,
    track_total_bytes: bool,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "oq".into(),
            node_id: None,
            presence_ttl: Duration::from_secs(30),
            durable: None,
            track_total_bytes: false,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
        }
    }
}

impl RedisOptions {
    /// Prefix of every key (default `oq`); lets several queues share one Redis. No braces.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This node's id among the engines sharing the storage (default: random). Stable ids let
    /// a restarted node take its presence marks back at once.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// How long a node's presence mark outlives its last refresh: the longest a dead node
    /// can hold back pushes for its recipients. Default 30 s.
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl;
        self
    }

    /// Declares whether the server keeps every write it acknowledged across its own crash
    /// ([`Capabilities::durable`]), instead of asking it. By default the storage asks at
    /// connect (`CONFIG GET appendonly`, every master of a cluster): durable only with the
    /// append-only file on. Set it for a server that refuses `CONFIG` (many managed ones), or
    /// to declare a replicated setup you trust.
    pub fn assume_durable(mut self, durable: bool) -> Self {
        self.durable = Some(durable);
        self
    }

    /// Keeps a storage-wide byte counter, which `Limits::max_total_bytes` needs. Costs one
    /// more command per append and ack. Default off; a quota with a global budget is refused
    /// without it.
    pub fn track_total_bytes(mut self, track: bool) -> Self {
        self.track_total_bytes = track;
        self
    }

    /// Bounds connecting, and each command once connected. Default 5 s each.
    pub fn timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    /// Connects to one Redis server (`redis://host:port/db`), through a connection manager
    /// that reconnects by itself.
    ///
    /// # Errors
    /// A URL that does not parse, or a server that does not answer: an [`Error::Storage`]
    /// naming the URL.
    pub async fn connect(self, url: &str) -> Result<RedisStorage> {
        let node = self.validate()?;
        let (pushes, plumbing) = Plumbing::new(&self.prefix, &node);
        let info = url
            .into_connection_info()
            .map_err(|e| invalid_url(url, e))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|e| invalid_url(url, e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(2)
            .set_push_sender(pushes)
            .set_automatic_resubscription();
        let manager = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| unreachable_server(url, e))?;
        RedisStorage::start(self, node, Connection::Single(manager), plumbing).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each).
    ///
    /// # Errors
    /// As [`RedisOptions::connect`], naming the URLs.
    pub async fn connect_cluster(self, urls: &[&str]) -> Result<RedisStorage> {
        let named = urls.join(",");
        let node = self.validate()?;
        let (pushes, plumbing) = Plumbing::new(&self.prefix, &node);
        let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            .push_sender(pushes)
            .build()
            .map_err(|e| invalid_url(&named, e))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| unreachable_server(&named, e))?;
        RedisStorage::start(self, node, Connection::Cluster(connection), plumbing).await
    }

    /// Checks the prefix and node id (no braces: they would break the hash tags) and the
    /// durations, and returns the node id.
    fn validate(&self) -> Result<String> {
        if self.prefix.contains(['{', '}']) || self.prefix.is_empty() {
            return Err(Error::InvalidConfig {
                field: "redis prefix",
                reason: format!("{:?} must be non-empty and without braces", self.prefix),
            });
        }
        let node = self
            .node_id
            .clone()
            .unwrap_or_else(|| MessageId::generate().to_string());
        if node.contains(['{', '}']) || node.is_empty() {
            return Err(Error::InvalidConfig {
                field: "redis node id",
                reason: format!("{node:?} must be non-empty and without braces"),
            });
        }
        if self.presence_ttl < Duration::from_millis(30) || self.presence_ttl > MAX_TTL {
            return Err(Error::InvalidConfig {
                field: "redis presence_ttl",
                reason: format!(
                    "{:?} must be between 30 ms and {MAX_TTL:?}",
                    self.presence_ttl
                ),
            });
        }
        Ok(node)
    }
}

/// Longest TTL accepted: about 100 years, far inside what `PEXPIRE` takes.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn invalid_url(url: &str, error: redis::RedisError) -> Error {
    Error::InvalidConfig {
        field: "redis url",
        reason: format!("{url:?} does not parse: {error}"),
    }
}

fn unreachable_server(url: &str, error: redis::RedisError) -> Error {
    Error::Storage {
        message: format!("redis at {url} does not answer: {error}"),
        retryable: true,
        source: Some(Arc::new(error)),
    }
}

/// Maps a Redis error to ours: lost connections, timeouts, and a server that is loading or
/// failing over may pass; anything else (a wrong key type, a script error) will not.
fn redis_error(error: redis::RedisError) -> Error {
    let retryable = error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_connection_refusal()
        || error.code() == Some("OOM")
        || !matches!(error.retry_method(), redis::RetryMethod::NoRetry);
    let message = match error.code() {
        Some("OQWRONGTYPE") | Some("WRONGTYPE") => {
            format!("a key of this queue holds data of another type, left untouched: {error}")
        }
        Some("OQLAYOUT") => {
            format!("this queue's metadata is not in this build's layout, left untouched: {error}")
        }
        _ => format!("redis: {error}"),
    };
    Error::Storage {
        message,
        retryable,
        source: Some(Arc::new(error)),
    }
}

/// What the node's background task acts on.
enum NodeEvent {
    /// This node now holds (or no longer holds) a session for the recipient.
    Presence(RecipientId, Presence),
    /// The server dropped the wake-up subscription (a slot moved): subscribe again.
    Resubscribe,
    /// The wake-up subscription was (re)made: wake-ups may have been missed meanwhile, so
    /// every local session reads again.
    WakeAll,
}

/// Every wake-up stream handed out ([`Coordination::wakeups`]): each gets every wake-up from
/// its creation on. A stream dropped by its reader is forgotten at the next wake-up.
#[derive(Clone, Default)]
struct Listeners(Arc<Mutex<Vec<fmpsc::UnboundedSender<RecipientId>>>>);

impl Listeners {
    fn subscribe(&self) -> fmpsc::UnboundedReceiver<RecipientId> {
        let (sender, receiver) = fmpsc::unbounded();
        self.0.lock().push(sender);
        receiver
    }

    fn wake(&self, recipient: &RecipientId) {
        self.0
            .lock()
            .retain(|sender| sender.unbounded_send(recipient.clone()).is_ok());
    }
}

/// The channels between the connection's push sender, the node task and the engine.
struct Plumbing {
    events: fmpsc::UnboundedSender<NodeEvent>,
    event_rx: fmpsc::UnboundedReceiver<NodeEvent>,
    listeners: Listeners,
}

impl Plumbing {
    fn new(prefix: &str, node: &str) -> (WakeupSender, Self) {
        let (events, event_rx) = fmpsc::unbounded();
        let listeners = Listeners::default();
        let sender = WakeupSender {
            channel: keys::wake_channel(prefix, node).into_bytes(),
            listeners: listeners.clone(),
            events: events.clone(),
        };
        (
            sender,
            Self {
                events,
                event_rx,
                listeners,
            },
        )
    }
}

/// Turns the connection's pushes on this node's channel into recipients to wake, and tells
/// the node task when the subscription is lost or made again.
struct WakeupSender {
    channel: Vec<u8>,
    listeners: Listeners,
    events: fmpsc::UnboundedSender<NodeEvent>,
}

impl redis::aio::AsyncPushSender for WakeupSender {
    fn send(&self, info: PushInfo) -> std::result::Result<(), redis::aio::SendError> {
        let ours = matches!(info.data.first(), Some(Value::BulkString(c)) if *c == self.channel);
        // A closed channel means the storage is gone: nothing to wake or resubscribe.
        match info.kind {
            PushKind::SMessage | PushKind::Message if ours => {
                if let Some(Value::BulkString(payload)) = info.data.get(1)
                    && let Some(recipient) = keys::from_hex(payload)
                {
                    self.listeners.wake(&recipient);
                }
            }
            PushKind::SUnsubscribe if ours => {
                let _ = self.events.unbounded_send(NodeEvent::Resubscribe);
            }
            PushKind::SSubscribe if ours => {
                let _ = self.events.unbounded_send(NodeEvent::WakeAll);
            }
            _ => {}
        }
        Ok(())
    }
}

struct Shared {
    /// Whether the server keeps what it acknowledged across its crash (see `assume_durable`).
    durable: bool,
    connection: Connection,
    options: RedisOptions,
    node: String,
    steps: Steps,
    /// Fronts of queues read or acked lately, for reads of a run.
    fronts: run_read::Fronts,
    /// The wake-up streams handed out, fed by the connection's pushes.
    listeners: Listeners,
    /// The deadline bucket the next purge starts at.
    next_bucket: AtomicU32,
    /// The engine's idle timeout in ms, as the keys' TTL (see `learn_idle_ttl`).
    idle_ttl_ms: AtomicU64,
    events: fmpsc::UnboundedSender<NodeEvent>,
}

/// Queues in Redis or Redis Cluster, shared by every engine that connects to them. See the
/// [module docs](self) for the layout and what presence and wake-ups cost.
#[derive(Clone)]
pub struct RedisStorage {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStorage")
            .field("prefix", &self.shared.options.prefix)
            .field("node", &self.shared.node)
            .finish()
    }
}

impl RedisStorage {
    /// Options with their defaults.
    pub fn options() -> RedisOptions {
        RedisOptions::default()
    }

    /// Connects to one Redis server with default options.
    ///
    /// # Errors
    /// As [`RedisOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::options().connect(url).await
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node
    }

    /// The nodes holding a session for `recipient` now, by their presence marks (this node
    /// included): what an append consults before it pushes.
    ///
    /// # Errors
    /// A storage error.
    pub async fn sessions_on(&self, recipient: &RecipientId) -> Result<Vec<String>> {
        let (_, keys) = self.keys(recipient);
        let ((seconds, micros), marks): ((u64, u64), Vec<(String, u64)>) = redis::pipe()
            .cmd("TIME")
            .cmd("HGETALL")
            .arg(&keys[6])
            .query_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let now = seconds * 1000 + micros / 1000;
        Ok(marks
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(node, _)| node)
            .collect())
    }

    async fn start(
        options: RedisOptions,
        node: String,
        mut connection: Connection,
        plumbing: Plumbing,
    ) -> Result<Self> {
        redis::cmd("SSUBSCRIBE")
            .arg(keys::wake_channel(&options.prefix, &node))
            .exec_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let library = Library::new();
        library.load(&mut connection).await.map_err(|error| {
            if error.code() == Some("ERR")
                && error
                    .detail()
                    .is_some_and(|d| d.contains("unknown command"))
            {
                Error::Storage {
                    message: format!(
                        "RedisStorage needs Redis 7.0 or later (it runs as a function \
                         library): {error}"
                    ),
                    retryable: false,
                    source: Some(Arc::new(error)),
                }
            } else {
                redis_error(error)
            }
        })?;
        let durable = match options.durable {
            Some(durable) => durable,
            None => appendonly_everywhere(&mut connection).await,
        };
        let shared = Arc::new(Shared {
            durable,
            connection,
            options,
            node,
            steps: Steps::new(&library),
            fronts: run_read::Fronts::default(),
            listeners: plumbing.listeners,
            next_bucket: AtomicU32::new(0),
            idle_ttl_ms: AtomicU64::new(0),
            events: plumbing.events,
        });
        tokio::spawn(run_node(Arc::downgrade(&shared), plumbing.event_rx));
        Ok(Self { shared })
    }

    fn connection(&self) -> Connection {
        self.shared.connection.clone()
    }

    /// Publishes a wake-up for the recipient (named by its hex) to each of these nodes'
    /// channels. A failed publish is logged: the message is stored all the same, and that
    /// node's session finds it on its next read.
    async fn wake_nodes(&self, recipient: &RecipientId, hex: &str, nodes: &[String]) {
        // One command per channel: on a cluster each node's channel has its own slot.
        let wakes = nodes.iter().map(|node| {
            let mut connection = self.connection();
            let channel = keys::wake_channel(&self.shared.options.prefix, node);
            async move {
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(hex)
                    .exec_async(&mut connection)
                    .await
            }
        });
        for result in futures::future::join_all(wakes).await {
            if let Err(error) = result {
                tracing::warn!(%recipient, %error, "wake-up publish failed");
            }
        }
    }

    fn keys(&self, recipient: &RecipientId) -> (String, [String; 7]) {
        let hex = keys::hex(recipient);
        let keys = keys::recipient_keys(&self.shared.options.prefix, &hex);
        (hex, keys)
    }

    /// The keys' idle TTL in ms as last learned from the engine (0: keep queues, or not
    /// learned yet, so an ack leaves the TTLs the last append set).
    fn idle_ttl_ms(&self) -> u64 {
        self.shared.idle_ttl_ms.load(Ordering::Relaxed)
    }

    /// Learns the engine's idle timeout (`Limits::idle_recipient_timeout`), which appends
    /// (through their quota) and purges (through `idle_before`) carry; `None` keeps queues.
    fn learn_idle_ttl(&self, idle: Option<Duration>) {
        let ms = idle.map_or(0, |idle| {
            u64::try_from(idle.as_millis()).map_or(LUA_MAX, |ms| ms.clamp(1, LUA_MAX))
        });
        self.shared.idle_ttl_ms.store(ms, Ordering::Relaxed);
    }

    /// Adds `delta` to the storage-wide byte counter, when it is kept.
    async fn count_bytes(&self, delta: i64) -> Result<()> {
        if !self.shared.options.track_total_bytes || delta == 0 {
            return Ok(());
        }
        redis::cmd("INCRBY")
            .arg(keys::total_bytes(&self.shared.options.prefix))
            .arg(delta)
            .exec_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// Files the queue in the idle index under `touched`, and in the deadline index no later
    /// than `deadline`, where the script asked for it (-1: no change).
    async fn file(&self, hex: &str, touched: i64, deadline: i64) -> Result<()> {
        if touched < 0 && deadline < 0 {
            return Ok(());
        }
        let prefix = &self.shared.options.prefix;
        let bucket = keys::bucket(hex);
        let mut pipe = redis::pipe();
        if touched >= 0 {
            pipe.cmd("ZADD")
                .arg(keys::idle_index(prefix, bucket))
                .arg(touched)
                .arg(hex)
                .ignore();
        }
        if deadline >= 0 {
            pipe.cmd("ZADD")
                .arg(keys::deadline_index(prefix, bucket))
                .arg("LT")
                .arg(deadline)
                .arg(hex)
                .ignore();
        }
        pipe.exec_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// The ack step's arguments after its keys (`i128` holds both the -1 markers and any
    /// `u64`, and Redis gets each as its decimal text, without a string per argument).
    fn ack_args(&self, ack: &Ack, now: Timestamp) -> Vec<i128> {
        let seq = |s: &Seq| i128::from(s.0);
        let mut args = Vec::with_capacity(7 + ack.seqs.len() + ack.passed_over.len());
        args.extend([
            ack.through.as_ref().map_or(-1, seq),
            i128::from(now.as_millis()),
            ack.lost_confirmed_through
                .map_or(-1, |t| i128::from(t.min(LUA_MAX))),
            i128::from(self.idle_ttl_ms()),
            ack.seqs.len() as i128,
        ]);
        args.extend(ack.seqs.iter().map(seq));
        args.push(ack.passed_over.len() as i128);
        args.extend(ack.passed_over.iter().map(seq));
        args
    }

    /// The ack step as a command, for a pipeline.
    pub(super) fn ack_command(&self, keys: &[String; 7], ack: &Ack, now: Timestamp) -> redis::Cmd {
        let mut command = self.shared.steps.ack.command(&keys[..]);
        for arg in self.ack_args(ack, now) {
            command.arg(arg);
        }
        command
    }

    /// Books the ack step's reply (the remembered front, freed bytes, the idle index);
    /// returns how many records it removed.
    pub(super) async fn after_ack_reply(
        &self,
        recipient: &RecipientId,
        hex: &str,
        reply: Value,
    ) -> Result<u64> {
        let (removed, freed, file_idle, head): (u64, i64, i64, i64) =
            redis::from_redis_value(reply).map_err(|_| bad_reply("the ack's four numbers"))?;
        self.shared.fronts.after_ack(recipient, head);
        self.after_commit(recipient, hex, -freed, file_idle, -1)
            .await;
        Ok(removed)
    }

    /// Bookkeeping after a committed step: the byte counter and the index entries. A failure
    /// is logged, not returned: the step itself stands. An index entry that could not be
    /// written is written by the queue's next step that asks for it (the queue's metadata is
    /// told to forget what it filed).
    async fn after_commit(
        &self,
        recipient: &RecipientId,
        hex: &str,
        delta: i64,
        file_idle: i64,
        file_deadline: i64,
    ) {
        if let Err(error) = self.count_bytes(delta).await {
            tracing::warn!(%recipient, %error, "byte counter update failed");
        }
        if let Err(error) = self.file(hex, file_idle, file_deadline).await {
            tracing::warn!(%recipient, %error, "index update failed");
            let keys = keys::recipient_keys(&self.shared.options.prefix, hex);
            let forget: redis::RedisResult<i64> = self
                .shared
                .steps
                .forget
                .key(&keys[..])
                .invoke_async(&mut self.connection())
                .await;
            if let Err(error) = forget {
                tracing::warn!(%recipient, %error, "index state reset failed");
            }
        }
    }

    /// Up to `limit` queues of an index filed at or below `upper` (a score, or `(score` for
    /// strictly below), with their scores when `T` asks for them.
    async fn filed_before<T: redis::FromRedisValue>(
        &self,
        index: &str,
        upper: String,
        limit: usize,
        with_scores: bool,
    ) -> Result<T> {
        let mut command = redis::cmd("ZRANGEBYSCORE");
        command.arg(index).arg("-inf").arg(upper);
        if with_scores {
            command.arg("WITHSCORES");
        }
        command
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// Purges the queues of one deadline bucket with something due; returns the budget left.
    async fn purge_expired(
        &self,
        bucket: u32,
        now: Timestamp,
        mut left: usize,
        outcome: &mut PurgeOutcome,
    ) -> Result<usize> {
        let prefix = &self.shared.options.prefix;
        let index = keys::deadline_index(prefix, bucket);
        while left > 0 {
            let due: Vec<(String, f64)> = self
                .filed_before(&index, now.as_millis().to_string(), left.min(64), true)
                .await?;
            if due.is_empty() {
                break;
            }
            for (hex, seen) in due {
                let keys = keys::recipient_keys(prefix, &hex);
                let purged: redis::RedisResult<(u64, i64, i64)> = self
                    .shared
                    .steps
                    .purge
                    .key(&keys[..])
                    .arg(now.as_millis())
                    .arg(left)
                    .invoke_async(&mut self.connection())
                    .await;
                let earliest = match purged {
                    Ok((removed, freed, earliest)) => {
                        left = left.saturating_sub(removed as usize);
                        outcome.expired += removed;
                        self.count_freed(&hex, freed).await;
                        earliest
                    }
                    Err(error) if redis_error(error.clone()).is_retryable() => {
                        return Err(redis_error(error));
                    }
                    Err(error) => {
                        // Not ours to purge (someone else's data): out of the index, so it
                        // cannot stop the rest.
                        tracing::warn!(queue = %hex, %error, "purge skipped a queue");
                        -1
                    }
                };
                // The script removed every due deadline, so the entry moves past now (or
                // goes): each round progresses.
                let _: i64 = self
                    .shared
                    .steps
                    .refile
                    .key(&index)
                    .arg(&hex)
                    .arg(seen)
                    .arg(earliest)
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(redis_error)?;
                if left == 0 {
                    break;
                }
            }
        }
        Ok(left)
    }

    /// Removes the queues of one idle bucket untouched since `before`; returns the budget left.
    async fn remove_idle(
        &self,
        bucket: u32,
        before: Timestamp,
        mut left: usize,
        outcome: &mut PurgeOutcome,
    ) -> Result<usize> {
        let prefix = &self.shared.options.prefix;
        let index = keys::idle_index(prefix, bucket);
        let before = before.as_millis();
        while left > 0 {
            let idle: Vec<(String, f64)> = self
                .filed_before(&index, format!("({before}"), left.min(64), true)
                .await?;
            if idle.is_empty() {
                break;
            }
            for (hex, seen) in idle {
                let keys = keys::recipient_keys(prefix, &hex);
                let (state, records, freed): (i64, u64, i64) = self
                    .shared
                    .steps
                    .idle
                    .key(&keys[..])
                    .arg(before)
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(redis_error)?;
                // Active since it was filed: file it under its latest activity; gone: out of
                // the index. Only if the entry still holds the score found, so an append that
                // filed the queue meanwhile keeps its entry.
                let _: i64 = self
                    .shared
                    .steps
                    .refile
                    .key(&index)
                    .arg(&hex)
                    .arg(seen)
                    .arg(state.max(-1))
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(redis_error)?;
                if state == -2 {
                    outcome.idle_recipients += 1;
                    left = left.saturating_sub((records as usize).max(1));
                    self.count_freed(&hex, freed).await;
                } else {
                    // Refiling is a round trip too: a call's budget bounds it.
                    left -= 1;
                }
                if left == 0 {
                    break;
                }
            }
        }
        Ok(left)
    }

    /// Whether any bucket still holds a queue with something due, or an idle one.
    async fn anything_due(&self, now: Timestamp, idle_before: Option<Timestamp>) -> Result<bool> {
        let prefix = &self.shared.options.prefix;
        for bucket in 0..keys::BUCKETS {
            let index = keys::deadline_index(prefix, bucket);
            let due: Vec<String> = self
                .filed_before(&index, now.as_millis().to_string(), 1, false)
                .await?;
            if !due.is_empty() {
                return Ok(true);
            }
            if let Some(before) = idle_before {
                let index = keys::idle_index(prefix, bucket);
                let upper = format!("({}", before.as_millis());
                let idle: Vec<String> = self.filed_before(&index, upper, 1, false).await?;
                if !idle.is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Takes bytes a purge freed off the storage-wide counter; a failure is logged (the purge
    /// stands).
    async fn count_freed(&self, hex: &str, freed: i64) {
        if let Err(error) = self.count_bytes(-freed).await {
            tracing::warn!(queue = %hex, %error, "byte counter update failed");
        }
    }

    /// Reserves `adding` bytes of the storage-wide budget before an append.
    async fn reserve(&self, adding: u64, max: u64) -> Result<()> {
        let (ok, used): (u64, u64) = self
            .shared
            .steps
            .reserve
            .key(keys::total_bytes(&self.shared.options.prefix))
            .arg(adding)
            .arg(max.min(LUA_MAX))
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        if ok == 1 {
            Ok(())
        } else {
            Err(Error::StorageFull { used, adding, max })
        }
    }

    /// A read: of a plain run in one `MULTI` where the front is known, else through
    /// `read.lua`; with `mark`, it also counts a delivery for each record returned.
    async fn read_marking(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<ReadBatch> {
        let (_, keys) = self.keys(recipient);
        if let Some(batch) = self
            .read_run(recipient, &keys, None, after, limit, now, mark)
            .await?
            .batch
        {
            return Ok(batch);
        }
        self.read_ordinary(recipient, &keys, after, limit, now, mark)
            .await
    }

    /// A read through `read.lua`, which brings the records into Lua: any queue, any state.
    async fn read_ordinary(
        &self,
        recipient: &RecipientId,
        keys: &[String; 7],
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<ReadBatch> {
        let reply: Value = self
            .shared
            .steps
            .read
            .key(&keys[..])
            .arg(after.map_or(-1, |s| s.0 as i64))
            .arg((limit.max_messages as u64).min(LUA_MAX))
            .arg((limit.max_bytes as u64).min(LUA_MAX))
            .arg(now.as_millis())
            .arg(u8::from(mark))
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let mut reply = array(reply)?;
        // Taken, not borrowed: each record's body is handed on without a copy.
        let raws = match reply.get_mut(6) {
            Some(Value::Array(items)) => std::mem::take(items),
            _ => return Err(bad_reply("an array")),
        };
        let lost_total = count(reply.first())?;
        let lost_confirmed = count(reply.get(1))?;
        let seqs_in = |at: usize| -> Result<Vec<Seq>> {
            list(reply.get(at))?
                .iter()
                .map(|v| int(Some(v)).map(seq_of))
                .collect()
        };
        let expired = seqs_in(2)?;
        let mut damaged = seqs_in(3)?;
        let watermark = count(reply.get(4))?;
        let first = count(reply.get(5))?;
        let listed = seqs_in(7)?;
        let counts = list(reply.get(8))?;
        let mut records = Vec::with_capacity(raws.len());
        for (i, raw) in raws.into_iter().enumerate() {
            let seq = listed.get(i).map_or(first + i as u64, |s| s.0);
            let Value::BulkString(raw) = raw else {
                return Err(bad_reply("a record"));
            };
            if raw.len() < HEADER {
                // Not a record this backend wrote: never delivered, reported as lost.
                damaged.push(Seq(seq));
                continue;
            }
            let delivered = match counts.get(i) {
                Some(Value::Nil | Value::Boolean(false)) | None => i64::from(seq <= watermark),
                explicit => int(explicit)?,
            };
            records.push(decode_record(seq, raw, delivered));
        }
        if !matches!(self.shared.connection, Connection::Cluster(_)) {
            let bodies: usize = records.iter().map(|r| r.body.len()).sum();
            self.shared.fronts.after_read(
                recipient,
                int(reply.get(9))?,
                int(reply.get(10))? == 1,
                (bodies / records.len().max(1)) as u64,
            );
        }
        Ok(ReadBatch {
            records,
            expired,
            damaged,
            lost_unconfirmed: lost_total.saturating_sub(lost_confirmed),
            lost_total,
        })
    }
}

/// The node's background task: writes presence marks (each change at once, and all of them
/// again every `presence_ttl / 3`, so a dead node's marks outlive it by at most
/// `presence_ttl`), keeps the wake-up subscription, and wakes every local session after the
/// subscription was made again. Ends with the storage.
async fn run_node(
    shared: std::sync::Weak<Shared>,
    mut events: fmpsc::UnboundedReceiver<NodeEvent>,
) {
    let Some(ttl) = shared.upgrade().map(|s| s.options.presence_ttl) else {
        return;
    };
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut live: HashSet<RecipientId> = HashSet::new();
    let mut refresh = tokio::time::interval(ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let marks: Vec<(RecipientId, bool)> = tokio::select! {
            // Changes first: a connect or disconnect must not wait behind a refresh.
            biased;
            event = events.next() => match event {
                Some(NodeEvent::Presence(recipient, presence)) => {
                    let on = presence == Presence::Connected;
                    if on {
                        live.insert(recipient.clone());
                    } else {
                        live.remove(&recipient);
                    }
                    vec![(recipient, on)]
                }
                Some(NodeEvent::Resubscribe) => {
                    let Some(shared) = shared.upgrade() else { return };
                    let channel = keys::wake_channel(&shared.options.prefix, &shared.node);
                    let mut connection = shared.connection.clone();
                    let subscribed = redis::cmd("SSUBSCRIBE")
                        .arg(channel)
                        .exec_async(&mut connection)
                        .await;
                    if let Err(error) = subscribed {
                        tracing::warn!(%error, "wake-up subscription lost");
                    }
                    Vec::new()
                }
                Some(NodeEvent::WakeAll) => {
                    let Some(shared) = shared.upgrade() else { return };
                    for recipient in &live {
                        shared.listeners.wake(recipient);
                    }
                    Vec::new()
                }
                None => return,
            },
            _ = refresh.tick() => live.iter().map(|r| (r.clone(), true)).collect(),
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let storage = RedisStorage { shared };
        // Concurrently, 64 at a time: a refresh of many recipients stays well inside ttl / 3.
        for chunk in marks.chunks(64) {
            let writes = chunk.iter().map(|(recipient, on)| {
                let storage = storage.clone();
                async move {
                    let (_, keys) = storage.keys(recipient);
                    let result: redis::RedisResult<i64> = storage
                        .shared
                        .steps
                        .presence
                        .key(&keys[..])
                        .arg(&storage.shared.node)
                        .arg(ttl_ms)
                        .arg(u8::from(*on))
                        .invoke_async(&mut storage.connection())
                        .await;
                    if let Err(error) = result {
                        // The next refresh writes it again; a lost "off" expires by itself.
                        tracing::warn!(%recipient, %error, "presence update failed");
                    }
                }
            });
            futures::future::join_all(writes).await;
        }
    }
}

/// True if the server (every master of a cluster) answers `CONFIG GET appendonly` with `yes`:
/// then a write it acknowledged is in its append-only file before the reply, and survives a
/// kill of the server. False when any says `no`, or when `CONFIG` is refused.
async fn appendonly_everywhere(connection: &mut Connection) -> bool {
    /// Every text in a reply, in order, however the client shaped it (a map, pairs, a map
    /// per node of a cluster).
    fn texts(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => out.push(s.clone()),
            Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| texts(v, out)),
            Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                texts(k, out);
                texts(v, out);
            }),
            _ => {}
        }
    }
    let mut ask = redis::cmd("CONFIG");
    ask.arg("GET").arg("appendonly");
    let reply: redis::RedisResult<Value> = match connection {
        Connection::Single(single) => ask.query_async(single).await,
        // Each master, not the one node a cluster client would pick: a map of answers.
        Connection::Cluster(cluster) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let every_master = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            cluster.route_command(ask, every_master).await
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) => {
            tracing::info!(%error, "CONFIG GET appendonly refused: the storage counts as not durable (see RedisOptions::assume_durable)");
            return false;
        }
    };
    let mut all = Vec::new();
    texts(&reply, &mut all);
    let answers: Vec<&String> = all
        .windows(2)
        .filter(|pair| pair[0].eq_ignore_ascii_case("appendonly"))
        .map(|pair| &pair[1])
        .collect();
    !answers.is_empty() && answers.iter().all(|a| a.eq_ignore_ascii_case("yes"))
}

/// Reads an integer out of a script reply.
fn int(value: Option<&Value>) -> Result<i64> {
    match value {
        Some(Value::Int(n)) => Ok(*n),
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("an integer")),
        _ => Err(bad_reply("an integer")),
    }
}

/// A count out of a script reply: never negative (a queue's counters cannot be, but a reply
/// is not trusted to say so).
fn count(value: Option<&Value>) -> Result<u64> {
    Ok(int(value)?.max(0) as u64)
}

fn bytes(value: Option<&Value>) -> Result<Option<&[u8]>> {
    match value {
        Some(Value::BulkString(b)) => Ok(Some(b)),
        Some(Value::Nil | Value::Boolean(false)) => Ok(None),
        _ => Err(bad_reply("a string")),
    }
}

fn text(value: Option<&Value>) -> Result<String> {
    match value {
        Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        _ => Err(bad_reply("a string")),
    }
}

fn bad_reply(expected: &str) -> Error {
    Error::storage_msg(
        Retry::No,
        format!("redis: unexpected script reply, expected {expected}"),
    )
}

/// A nested array out of a script reply.
fn list(value: Option<&Value>) -> Result<&[Value]> {
    match value {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(bad_reply("an array")),
    }
}

fn array(value: Value) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        _ => Err(bad_reply("an array")),
    }
}

/// The stored form of a record: sent-at, id, body.
fn encode_record(record: &NewRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER - 8 + record.body.len());
    out.extend_from_slice(&record.sent_at.as_millis().to_be_bytes());
    out.extend_from_slice(&record.id.to_bytes());
    let deadline = record
        .expires_at
        .map_or(0, Timestamp::as_millis)
        .min(LUA_MAX);
    out.extend_from_slice(&(deadline as f64).to_be_bytes());
    out.extend_from_slice(&record.body);
    out
}

/// A stored record (at least `HEADER` bytes) as the engine takes it.
fn decode_record(seq: u64, raw: Vec<u8>, delivery_count: i64) -> StoredRecord {
    let sent_at = u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
    let id: [u8; 16] = raw[16..32].try_into().expect("16 bytes");
    let deadline = f64::from_be_bytes(raw[32..40].try_into().expect("8 bytes"));
    StoredRecord {
        seq: Seq(seq),
        id: MessageId::from_bytes(id),
        sent_at: Timestamp::from_millis(sent_at),
        // A double written from an integer below 2^53: exact. (`as` saturates whatever
        // another writer put there.)
        expires_at: (deadline > 0.0).then(|| Timestamp::from_millis(deadline as u64)),
        delivery_count: u32::try_from(delivery_count).unwrap_or(u32::MAX),
        body: Bytes::from(raw).slice(HEADER..),
    }
}

fn seq_of(value: i64) -> Seq {
    Seq(value.max(0) as u64)
}

#[async_trait]
impl Storage for RedisStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_max_read_batch(10_000)
            .with_durable(self.shared.durable)
            .with_total_byte_budget(self.shared.options.track_total_bytes)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        self.learn_idle_ttl(quota.idle_timeout);
        let (hex, keys) = self.keys(recipient);
        let adding: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let reserved = match quota.max_total_bytes {
            Some(_) if !self.shared.options.track_total_bytes => {
                return Err(Error::InvalidConfig {
                    field: "max_total_bytes",
                    reason: "needs RedisOptions::track_total_bytes(true) on RedisStorage".into(),
                });
            }
            Some(max) => {
                self.reserve(adding, max).await?;
                adding as i64
            }
            None => 0,
        };
        // The numbers go as one argument of packed doubles (exact below 2^53), the dedup
        // flags as one of bytes: see append.lua.
        let numbers = [
            now.as_millis(),
            quota.dedup_window_ms().min(LUA_MAX),
            quota.max_messages.min(LUA_MAX),
            quota.max_bytes.min(LUA_MAX),
            u64::from(quota.overflow == Overflow::DropOldest),
            self.idle_ttl_ms().min(LUA_MAX),
            records.len() as u64,
        ];
        let packed: Vec<u8> = numbers
            .iter()
            .flat_map(|&n| (n as f64).to_be_bytes())
            .collect();
        let flags: Vec<u8> = records
            .iter()
            .map(|r| if r.dedup { b'1' } else { b'0' })
            .collect();
        let mut invocation = self.shared.steps.append.key(&keys[..]);
        invocation.arg(packed).arg(&self.shared.node).arg(flags);
        for record in &records {
            invocation.arg(encode_record(record));
        }
        let reply = match invocation
            .invoke_async::<Value>(&mut self.connection())
            .await
        {
            Ok(reply) => array(reply)?,
            Err(error) => {
                let _ = self.count_bytes(-reserved).await;
                return Err(redis_error(error));
            }
        };
        if text(reply.first())? == "full" {
            let _ = self.count_bytes(-reserved).await;
            return Err(Error::QueueFull {
                messages: count(reply.get(1))?,
                bytes: count(reply.get(2))?,
                adding_messages: count(reply.get(3))?,
                adding_bytes: count(reply.get(4))?,
                max_messages: quota.max_messages,
                max_bytes: quota.max_bytes,
            });
        }
        let dropped = count(reply.get(1))?;
        let pending = count(reply.get(2))?;
        let delta = int(reply.get(3))?;
        let (file_idle, file_deadline) = (int(reply.get(4))?, int(reply.get(5))?);
        let n = (count(reply.get(6))? as usize).min(reply.len());
        let mut results = Vec::with_capacity(n);
        for i in 0..n {
            let stored = int(reply.get(7 + 2 * i))? == 1;
            let seq = seq_of(int(reply.get(8 + 2 * i))?);
            results.push(if stored {
                Appended::Stored(seq)
            } else {
                Appended::Duplicate(seq)
            });
        }
        let at = 7 + 2 * n;
        let node_count = (count(reply.get(at))? as usize).min(reply.len());
        let nodes: Vec<String> = (0..node_count)
            .map(|i| text(reply.get(at + 1 + i)))
            .collect::<Result<_>>()?;
        // The append is committed: what follows is bookkeeping, and its failure must not
        // make the caller think the message was not stored (and send it again).
        self.after_commit(recipient, &hex, delta - reserved, file_idle, file_deadline)
            .await;
        if results.iter().any(|r| matches!(r, Appended::Stored(_))) {
            self.wake_nodes(recipient, &hex, &nodes).await;
        }
        Ok(AppendOutcome {
            records: results,
            dropped,
            pending,
            live_elsewhere: !nodes.is_empty(),
        })
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        self.read_marking(recipient, after, limit, now, false).await
    }

    /// A cumulative ack and the read of a plain run go in one `MULTI` (`run_read.rs`);
    /// anything else as separate steps.
    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<DeliveryRead> {
        let (hex, keys) = self.keys(recipient);
        let run = self
            .read_run(
                recipient,
                &keys,
                ack.map(|a| (a, hex.as_str())),
                after,
                limit,
                now,
                true,
            )
            .await?;
        let acked = match (run.acked, ack) {
            (Some(removed), _) => removed,
            (None, Some(ack)) => self.ack(recipient, ack, now).await?,
            (None, None) => 0,
        };
        let batch = match run.batch {
            Some(batch) => batch,
            None => {
                self.read_ordinary(recipient, &keys, after, limit, now, true)
                    .await?
            }
        };
        Ok(DeliveryRead { acked, batch })
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (_, keys) = self.keys(recipient);
        let mut invocation = self.shared.steps.mark.key(&keys[..]);
        for seq in seqs {
            invocation.arg(seq.0);
        }
        invocation
            .invoke_async::<i64>(&mut self.connection())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64> {
        let (hex, keys) = self.keys(recipient);
        let mut invocation = self.shared.steps.ack.key(&keys[..]);
        for arg in self.ack_args(ack, now) {
            invocation.arg(arg);
        }
        let reply: Value = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        self.after_ack_reply(recipient, &hex, reply).await
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome> {
        self.learn_idle_ttl(idle_before.map(|before| now.duration_since(before)));
        let mut outcome = PurgeOutcome::default();
        let mut left = budget.min(LUA_MAX as usize);
        // Each call starts at another bucket, so a busy one cannot starve the rest.
        let start = self.shared.next_bucket.fetch_add(1, Ordering::Relaxed);
        for bucket in (0..keys::BUCKETS).map(|i| (start + i) % keys::BUCKETS) {
            left = self.purge_expired(bucket, now, left, &mut outcome).await?;
            if let Some(before) = idle_before {
                left = self.remove_idle(bucket, before, left, &mut outcome).await?;
            }
            if left == 0 {
                outcome.more = self.anything_due(now, idle_before).await?;
                break;
            }
        }
        Ok(outcome)
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let (_, keys) = self.keys(recipient);
        let reply: Value = self
            .shared
            .steps
            .stats
            .key(&keys[..])
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let reply = array(reply)?;
        let oldest = bytes(reply.get(3))?
            .filter(|raw| raw.len() >= HEADER)
            .map(|raw| {
                Timestamp::from_millis(u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes")))
            });
        let newest = int(reply.get(4))?;
        Ok(RecipientStats {
            messages: count(reply.first())?,
            bytes: count(reply.get(1))?,
            oldest_sent_at: oldest,
            newest_seq: (newest >= 0).then(|| seq_of(newest)),
            lost: count(reply.get(2))?,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let (_, keys) = self.keys(recipient);
        let (removed, freed): (u64, i64) = self
            .shared
            .steps
            .remove
            .key(&keys[..])
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        self.count_bytes(-freed).await?;
        Ok(removed)
    }
}

/// Presence marks in the recipient's presence hash, wake-ups over sharded pub/sub to each
/// node's own channel. Set it with
/// [`OfflineQueueBuilder::shared_storage`](crate::OfflineQueueBuilder::shared_storage): an
/// append then reads the marks and wakes the other nodes itself, in the same step.
#[async_trait]
impl Coordination for RedisStorage {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        self.shared.listeners.subscribe().boxed()
    }

    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        // The task is gone only when the storage is: nothing left to tell.
        let _ = self
            .shared
            .events
            .unbounded_send(NodeEvent::Presence(recipient.clone(), presence));
    }

    async fn announce(&self, recipient: &RecipientId) -> Result<bool> {
        let others: Vec<String> = self
            .sessions_on(recipient)
            .await?
            .into_iter()
            .filter(|node| *node != self.shared.node)
            .collect();
        self.wake_nodes(recipient, &keys::hex(recipient), &others)
            .await;
        Ok(!others.is_empty())
    }

    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool> {
        let nodes = self.sessions_on(recipient).await?;
        Ok(nodes.iter().any(|node| *node != self.shared.node))
    }
}
