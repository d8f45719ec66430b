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
//! // Redis holds the queues and is the nodes' coordination (presence, wake-ups).
//! let queue = OfflineQueue::builder().shared_storage(Arc::new(storage)).build()?;
//! // Without this task, a session on this node is not woken by sends through other nodes.
//! tokio::spawn(queue.wakeup_listener());
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
//! A sorted set or a hash would cost a skiplist node or a hash entry per record, and
//! inserting those would be most of an append's time.
//!
//! Delivery counts are mostly implied: the metadata holds a delivered watermark, below which
//! every record was handed over at least once, and a batch read and marked in order only
//! moves it. Only a redelivery, or a mark that skips a record, writes a count to the
//! deliveries hash.
//!
//! The steps are one function library (`FUNCTION LOAD`, then `FCALL`; Redis 7.0 or later),
//! named after a hash of its source, so engines of different versions sharing a Redis each
//! run their own. A server that lost it (restarted without persistence, a new master) gets
//! it again from the next call.
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
//! again. Each recipient key also carries a Redis TTL of the engine's idle timeout
//! (`Limits::idle_recipient_timeout`), which each append brings in its `Quota::idle_timeout`
//! and keeps in the queue's metadata, so an ack on any node refreshes by the same value. It
//! is set when the key is created and refreshed by appends and acks once a 64th of it has
//! passed (so a busy queue rarely pays for it): an abandoned queue vanishes even if no engine
//! ever runs maintenance. With no idle timeout (`None`), the next append or ack removes the
//! TTLs an earlier setting gave the keys. Keys a read creates take the metadata's remaining
//! TTL.
//!
//! # Cost
//! An append is one `FCALL` of four Redis commands (`GET` and `SET` of the metadata, `RPUSH`,
//! and a presence check; with a sender-chosen id, also `HSETNX` of the id and `ZADD` of its
//! time, and on every 16th seq the forgetting of ids past the window), so one Redis core
//! bounds the send rate, and a cluster adds a core per master (each recipient's steps run on
//! its own slot); BENCHMARKS.md has the figures. A cumulative ack of a run without
//! tombstones reads only the records at its two ends (each header carries the body bytes
//! appended before it, so the run's bytes are a difference), and a read of a plain run brings
//! no record into Lua: `plan.lua` checks the run by its ends and an `LRANGE` in the same
//! `MULTI` returns it (`run_read.rs`).
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

mod ack;
mod errors;
mod keys;
mod library;
mod maintenance;
mod nodes;
mod options;
mod read;
mod record;
mod replies;
mod run_read;

#[cfg(feature = "testing")]
pub(crate) use replies::fuzz_replies;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use futures::channel::mpsc as fmpsc;
use redis::Value;

use super::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage,
};
use crate::clock::Timestamp;
use crate::coordination::Listeners;
use crate::error::{Error, Result};
use crate::limits::{BatchLimit, Overflow, Quota};
use crate::message::{RecipientId, Seq};
use errors::redis_error;
use library::{LUA_MAX, Steps};
use nodes::NodeEvent;
use options::Connection;
pub use options::RedisOptions;
use record::{encode_record, sent_at};
use replies::{AppendReply, RemoveReply, StatsReply};

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

    fn connection(&self) -> Connection {
        self.shared.connection.clone()
    }

    fn keys(&self, recipient: &RecipientId) -> (String, [String; 7]) {
        let hex = keys::hex(recipient);
        let keys = keys::recipient_keys(&self.shared.options.prefix, &hex);
        (hex, keys)
    }
}

#[async_trait]
impl Storage for RedisStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_max_read_batch(10_000)
            .with_durable(self.shared.durable)
            .with_total_byte_budget(self.shared.options.track_total_bytes)
            .with_purge_expired(true)
            .with_idle_removal(true)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        let (hex, keys) = self.keys(recipient);
        let adding: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        // The budget's counter is a key of its own (another slot on a cluster), so the bytes
        // are reserved before the append. When the whole batch does not fit, the append still
        // runs, capped at no net bytes: a resend of stored ids (a duplicate) or a DropOldest
        // that frees as much as it adds is answered as on every other backend, at any fill.
        let (reserved, cap, full) = match quota.max_total_bytes {
            Some(_) if !self.shared.options.track_total_bytes => {
                return Err(Error::InvalidConfig {
                    field: "max_total_bytes",
                    reason: "needs RedisOptions::track_total_bytes(true) on RedisStorage".into(),
                });
            }
            Some(max) => match self.reserve(adding, max).await {
                Ok(()) => (adding as i64, -1.0, None),
                Err(full @ Error::StorageFull { .. }) => (0, 0.0, Some(full)),
                Err(other) => return Err(other),
            },
            None => (0, -1.0, None),
        };
        // The numbers go as one argument of packed doubles (exact below 2^53), the dedup
        // flags as one of bytes: see append.lua.
        let numbers = [
            now.as_millis(),
            quota.dedup_window_ms().min(LUA_MAX),
            quota.max_messages.min(LUA_MAX),
            quota.max_bytes.min(LUA_MAX),
            u64::from(quota.overflow == Overflow::DropOldest),
            // The keys' TTL, kept in the queue's metadata for acks to refresh by; 0 keeps it.
            quota.idle_timeout.map_or(0, |idle| {
                u64::try_from(idle.as_millis()).map_or(LUA_MAX, |ms| ms.clamp(1, LUA_MAX))
            }),
            records.len() as u64,
        ];
        let packed: Vec<u8> = numbers
            .iter()
            .map(|&n| n as f64)
            .chain([cap])
            .flat_map(f64::to_be_bytes)
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
            Ok(reply) => AppendReply::parse(reply)?,
            Err(error) => {
                let _ = self.count_bytes(-reserved).await;
                return Err(redis_error(error));
            }
        };
        let applied = match reply {
            AppendReply::Full {
                messages,
                bytes,
                adding_messages,
                adding_bytes,
            } => {
                let _ = self.count_bytes(-reserved).await;
                return Err(Error::QueueFull {
                    messages,
                    bytes,
                    adding_messages,
                    adding_bytes,
                    max_messages: quota.max_messages,
                    max_bytes: quota.max_bytes,
                });
            }
            AppendReply::Appended(applied) => applied,
            AppendReply::OverCap { net_bytes } => {
                return Err(match full {
                    Some(Error::StorageFull { used, max, .. }) => Error::StorageFull {
                        used,
                        adding: net_bytes,
                        max,
                    },
                    _ => Error::storage_msg(
                        crate::Retry::No,
                        "redis: append.lua refused an append with no cap",
                    ),
                });
            }
        };
        // The append is committed: what follows is bookkeeping, and its failure must not
        // make the caller think the message was not stored (and send it again).
        self.after_commit(
            recipient,
            &hex,
            applied.byte_delta - reserved,
            applied.filing,
        )
        .await;
        if applied
            .records
            .iter()
            .any(|r| matches!(r, Appended::Stored(_)))
        {
            self.wake_nodes(recipient, &hex, &applied.elsewhere).await;
        }
        Ok(AppendOutcome {
            records: applied.records,
            dropped: applied.dropped,
            pending: applied.pending,
            live_elsewhere: !applied.elsewhere.is_empty(),
        })
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        Ok(self
            .read_marking(recipient, None, after, limit, now, false)
            .await?
            .batch)
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
        self.read_marking(recipient, ack, after, limit, now, true)
            .await
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
        let stats = StatsReply::parse(reply)?;
        Ok(RecipientStats {
            messages: stats.messages,
            bytes: stats.bytes,
            oldest_sent_at: stats.oldest.as_deref().and_then(sent_at),
            newest_seq: stats.newest,
            lost: stats.lost,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let (_, keys) = self.keys(recipient);
        let reply: Value = self
            .shared
            .steps
            .remove
            .key(&keys[..])
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let removed = RemoveReply::parse(reply)?;
        self.count_bytes(-removed.freed).await?;
        Ok(removed.removed)
    }
}
