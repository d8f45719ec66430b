//! [`PostgresStorage`]: queues in PostgreSQL, shared by every engine instance that points at
//! the same database (feature `postgres`; needs a tokio runtime).
//!
//! ```no_run
//! # async fn node() -> Result<(), offline_queue::Error> {
//! use std::sync::Arc;
//! use offline_queue::{OfflineQueue, PostgresStorage};
//!
//! let storage = PostgresStorage::options()
//!     .schema("offline_queue")
//!     .connect("postgres://app@127.0.0.1:5432/app")
//!     .await?;
//! let queue = OfflineQueue::builder().storage(Arc::new(storage)).build()?;
//! # Ok(()) }
//! ```
//!
//! Several nodes on one schema: set it with
//! [`OfflineQueueBuilder::shared_storage`](crate::OfflineQueueBuilder::shared_storage), and it
//! is also their [`Coordination`](crate::Coordination) (see [Nodes](#nodes)). Over TLS when
//! the URL says `sslmode=require`, with the `postgres-tls` feature
//! ([`PostgresOptions::tls_root_certificates_pem`] for a private CA). Not reached (issue 16):
//! bounded bloat under a held xmin horizon, and sends at half the speed of raw multi-row
//! `INSERT`s; measured on a 2-core machine, no layout does both (an append that updates no
//! row, the only kind a held horizon cannot bloat, reached 41–43 % of raw `INSERT`s as one
//! statement, twice today's append). Throughput against raw SQL and bloat are measured in
//! BENCHMARKS.md ("PostgreSQL (issue 16)", `benches/postgres.rs` and
//! `benches/postgres_bloat.rs`).
//!
//! # Driver
//! `tokio-postgres` with a `deadpool-postgres` pool. `tokio-postgres` speaks the extended
//! protocol with binary parameters, so every id and body is a parameter, never SQL text, and
//! `bytea` values cross as raw bytes. `deadpool-postgres` wraps exactly that client (no second
//! query layer), caches each statement once per connection (`prepare_cached`), and checks a
//! connection's health cheaply on reuse. `sqlx` would bring its own driver, macros and
//! migration system for the five calls this backend makes; `bb8` would do as well as
//! deadpool but leaves the statement cache to us.
//!
//! The storage's connections run with `enable_seqscan` off. Every statement it runs is meant
//! to go through an index, and PL/pgSQL functions and prepared statements keep their plans: a
//! plan made just after a `VACUUM` emptied a drained table would scan the whole table once it
//! has grown back, on every call until the next `ANALYZE` (measured: appends 2.5x slower for
//! the rest of each round of `benches/postgres_bloat.rs`).
//!
//! # Layout
//! Everything lives in one schema (`PostgresOptions::schema`; the `sql/` files hold the DDL and
//! functions, `schema.rs` the version row and migrations):
//! - `oq_queues`: one row per recipient (`rid bytea`, the id's exact bytes) with its record and
//!   byte counts, loss total and confirmed mark, last activity (`touched`), the time it is
//!   filed under for idle removal (`idle_key`, indexed), and `head`, the highest seq removed
//!   from the front (by a cumulative ack or DropOldest), where reads start when their cursor
//!   is lower. It is the recipient's lock: every
//!   step that changes the queue takes `FOR UPDATE` on it first, except an append that needs
//!   no decision, which share-locks it (see [Appends that update no row](#appends-that-update-no-row)).
//!   Its counts take in records up to `folded`. It stays when the queue
//!   empties (so an active recipient does not churn it) until idle removal or
//!   `remove_recipient`. Its `delivered` is the delivery watermark (see [Bloat](#bloat)).
//! - `oq_records`: `(rid, seq)` primary key, id, times, delivery count (NULL when the
//!   watermark says it), body, and for a record above its queue's `folded` the running
//!   count and bytes since `folded`; a partial index on the deadline of records that have one.
//! - `oq_dedup`: sender-chosen ids with their seq, when stored and when their window ends.
//! - `oq_bytes`: body bytes stored, in 16 stripes.
//! - `oq_seq`: where each new queue's seqs start.
//!
//! # One call per step
//! Each step is one PL/pgSQL function called once (one round trip, one transaction, with
//! `synchronous_commit` on unless relaxed): `oq_append` decides dedup, quota, overflow and the
//! storage-wide budget without writing, then writes only a plan that fits; `oq_read` applies a
//! session's ack, reads from the cursor (stopping at the batch's bounds, so it costs the batch,
//! not the queue) and counts the deliveries; `oq_ack`, `oq_mark` (`mark_delivered`),
//! `oq_purge` and `oq_remove` do the rest. `stats` is a single statement.
//!
//! # Nodes
//! Each storage is a node with a random id. While it holds sessions it keeps a row in
//! `oq_nodes` with a lease (renewed every third of [`PostgresOptions::presence_ttl`], 30 s by
//! default, by the database's clock) and a row in `oq_presence` per recipient it holds; a
//! node that stops cleanly deletes its row, one that dies stops counting when its lease ends,
//! and the next renewal of any node removes it. An append that stores something checks, in
//! its own transaction, whether another live node holds the recipient, and if so calls
//! `pg_notify` on the schema's one channel with `<node hex>:<recipient hex>`: delivered at
//! commit, never before the message can be read, and only when someone else can use it (a
//! notifying commit takes a database-wide lock). Each node listens on its own connection,
//! outside the pool, once the engine reads wake-ups; when that connection drops it connects
//! again (with backoff) and wakes every local session to read again, since NOTIFY does not
//! replay what was sent meanwhile.
//!
//! # Group commit
//! Appends on one node that wait at the same moment share one statement: one round trip,
//! one transaction, one WAL flush, each append answered only once the group committed, with
//! its own outcome (a full queue refuses its append alone). A lone append waits for nothing.
//! At most `pool_size` groups run at once; the rest gather meanwhile, up to
//! [`PostgresOptions::max_group`] appends. A group takes all its queue rows first, in id
//! order, so groups on different nodes cannot deadlock on each other. See
//! [`PostgresStorage::group_commit_counts`].
//!
//! # Appends that update no row
//! (Schema version 6.) A group's appends that need no decision (no sender-chosen id, no
//! storage-wide budget, a queue that exists, holds something or has a loss to report, and has
//! room for all of them) go in one statement that updates no row: it share-locks each queue
//! row (`FOR KEY SHARE`, which appends do not wait on among themselves), finds the queue's
//! newest record by the primary key, and inserts after it, each record carrying the running
//! count and bytes since the queue row's `folded` seq. The rest, and any the statement
//! leaves, go through `oq_append_many` (a second statement, so such a group takes two
//! commits). Two groups racing for one queue's next seq meet at the primary key: the second
//! waits for the first to commit, then fails, and its appends go through `oq_append_many`.
//!
//! Every other step that changes a queue first folds (`oq_fold`): it locks the row for
//! update, which waits for the share-locking appends in flight and keeps new ones out until
//! it commits, adds the newest record's running totals to the row's counts and moves `folded`
//! to it. `stats` adds them without folding. Why: an append used to lock the row and update
//! its counters, which left a dead version of the row per append (kept while the xmin horizon
//! is held, see [Bloat](#bloat)) and made appends to one queue wait for each other's
//! commits. Measured (BENCHMARKS.md): sends 4–51 % faster than the build before it, though
//! the same share (about a fifth) of raw multi-row `INSERT`s grouped as its appends are.
//!
//! Not yet load-tested: PostgreSQL grants a share lock ahead of a waiting `FOR UPDATE` while
//! only share lockers hold the row, so a queue under a steady stream of such appends may keep
//! its acks and purges waiting for a while.
//!
//! # Seqs
//! A queue numbers its records on from `greatest(its newest record, folded, head)`: dense, in
//! commit order (a seq is taken only once the one before it is committed, or in the same
//! transaction), so a reader's cursor never passes a seq that commits later. `folded` is at
//! least every seq the queue ever held (every step that removes records folds first), so no
//! seq is reused even after the newest records were acked or expired. A new queue row starts
//! `folded` at `nextval` of `oq_seq`, and a queue's removal raises `oq_seq` to its `folded`
//! (`oq_seq_past`, under an advisory lock), so a queue removed and created again starts above
//! every seq it had. A new queue's loss total starts from the sequence too, above any total
//! an earlier queue of the recipient reached. Before schema version 6 every seq came from
//! `oq_seq` itself; a migrated queue goes on from the sequence's value at migration.
//!
//! # Expiry and idleness
//! Reads skip records past their deadline and report them. Purge takes due records in deadline
//! order through the deadline index, so removing k costs O(k log n) whatever is stored; then
//! queues idle since `idle_before` through the `idle_key` index. Appends and acks move
//! `touched` (not indexed, so their updates of the queue row stay HOT and add no index
//! entries); purge re-files a queue touched since it was filed, one unit of its budget each, as
//! the memory backend does. One exception (schema version 5): a queue emptied by acks keeps
//! its row but is no queue, so the append that fills it again sets `touched` to its own time,
//! even when the clock stepped back since the last step, and moves `idle_key` down to that
//! time when it was later. It then goes idle when a backend that deletes emptied queues says.
//! Dedup ids past their window go the same way. Purges are serialized by an advisory lock,
//! since a purge locks many queue rows; a queue or id another step holds is skipped (the call
//! says `more`), so a send never waits behind a purge.
//!
//! # Storage-wide budget
//! `oq_bytes` holds the body bytes stored in 16 stripes: a step adds to its connection's stripe
//! (backend pid mod 16), so steps on different connections do not queue on one row. An append
//! under `Quota::max_total_bytes` locks all 16 in order, sums them and decides: exact, but it
//! holds all 16 until it commits, so with a budget set every step that stores or frees bytes
//! (appends, acks, purges, removals) waits its turn behind each such append: a budget costs
//! concurrency (a share of the budget per stripe would lift that; not built). Locks are always
//! taken queue row first, stripes next (in stripe order), dedup rows last, so steps cannot
//! deadlock.
//!
//! # Bloat
//! Acks and purges delete rows, which leaves dead tuples for vacuum; a transaction holding the
//! xmin horizon (a long query, an idle replication slot) keeps them. Reads start past `head`,
//! so the dead entries of rows acked cumulatively are not walked; those of rows acked alone or
//! expired in the middle are. Queue-row and stripe updates are HOT, but a HOT chain is not
//! pruned past the horizon either.
//!
//! **Deliveries by watermark** (schema version 4). A session reads its queue in order, so a
//! record's first hand-over is not written on the record: the queue row's `delivered` says
//! every record at or below it was handed over, and a record's own count is kept only where
//! that is not enough (a redelivery, `mark_delivered`, a read from a cursor past the
//! watermark; NULL otherwise). A read for delivery holds the queue row's lock, so the
//! watermark and the counts move together. A record passed over (expired) under a moved
//! watermark gets an explicit 0: passing over is not handing over. Before, every delivered
//! record was rewritten once: a dead version per message, and one `UPDATE` of the batch per
//! read. Draining 10,000 in batches of 100 is now about twice as fast (BENCHMARKS.md). A
//! session whose cursor is past the watermark and past `head` (after a migration, whose
//! queues start at watermark 0, a session that neither acked nor reconnected since) counts
//! each record explicitly, as before, until it acks through its cursor or reads from the
//! start again.
//!
//! Measured (`benches/postgres_bloat.rs`, BENCHMARKS.md): 100,000 messages sent and drained
//! under a held snapshot leave one dead version per record (the delete; two before the
//! watermark), one queue-row version per append, per ack and per read that moved the
//! watermark, and one stripe version per commit, about 0.42 KiB per message (0.63 before, in
//! the same hour), until the snapshot ends (then one `VACUUM` makes the space reusable);
//! sends and drains ran up to 1.6x slower than with vacuum keeping up, mostly walking those
//! queue-row and stripe chains. Since schema version 6 an append that needs no decision
//! leaves no queue-row version: 0.38 KiB per message against 0.44 in the same hour, the
//! queue table a third the size, and the held run as fast as the clean one. Nothing bounds the growth while the horizon is held: every version an update or
//! delete leaves stays until then, and only `TRUNCATE` frees space regardless of snapshots
//! (rotating tables as PgQ does, not built).

mod errors;
mod group_commit;
mod nodes;
mod options;
mod schema;
mod tls;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Object, Pool};

use self::errors::{pg_error, pool_error};
pub use self::group_commit::GroupCommitCounts;
pub use self::options::PostgresOptions;
use self::schema::Statements;
use super::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};

/// Queues in PostgreSQL: durable, shared by every engine instance on the same database and
/// schema. Cheap to clone (the pool is shared). See the [module docs](self).
#[derive(Clone)]
pub struct PostgresStorage {
    pool: Pool,
    shared: Arc<Shared>,
    appends: futures::channel::mpsc::UnboundedSender<group_commit::Job>,
    events: futures::channel::mpsc::UnboundedSender<nodes::NodeEvent>,
}

#[derive(Debug)]
struct Shared {
    schema: String,
    statements: Statements,
    purge_lock: i64,
    durable: bool,
    counters: group_commit::Counters,
    /// This node's id among the engines sharing the schema (random per storage).
    node: [u8; 16],
    /// The schema's wake-up channel.
    channel: String,
    presence_ttl: std::time::Duration,
    /// Recipients this node holds a session for.
    live: parking_lot::Mutex<std::collections::HashSet<RecipientId>>,
    listeners: crate::coordination::Listeners,
    /// For the listener's own connection.
    config: tokio_postgres::Config,
    /// How connections are made (TLS or not).
    tls: tls::Tls,
}

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("schema", &self.shared.schema)
            .field("durable", &self.shared.durable)
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStorage {
    /// Options with their defaults.
    pub fn options() -> PostgresOptions {
        PostgresOptions::default()
    }

    /// Connects with default options (schema `offline_queue`).
    ///
    /// # Errors
    /// As [`PostgresOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::options().connect(url).await
    }

    /// The schema holding this storage's tables.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// How many commits this storage's appends took so far, and how many appends they
    /// carried (shared by its clones): the mean group size, to see group commit at work.
    pub fn group_commit_counts(&self) -> GroupCommitCounts {
        self.shared.counters.read()
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one statement (prepared once per connection) and returns its one row.
    async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query_one(&statement, params).await.map_err(pg_error)
    }

    /// `oq_read`: a read, with a session's ack before it and delivery marks after it when
    /// asked.
    async fn read_marking(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<DeliveryRead> {
        let parts = AckParams::new(ack);
        let row = self
            .query_one(
                &self.shared.statements.read,
                &[
                    &recipient.as_bytes(),
                    &after.map_or(0, |s| to_i64(s.0)),
                    &to_i64(limit.max_messages as u64),
                    &to_i64(limit.max_bytes as u64),
                    &to_i64(now.as_millis()),
                    &mark,
                    &ack.is_some(),
                    &parts.through,
                    &parts.seqs,
                    &parts.passed,
                    &parts.confirm,
                ],
            )
            .await?;
        let acked: i64 = row.try_get(0).map_err(pg_error)?;
        let seqs: Vec<i64> = row.try_get(1).map_err(pg_error)?;
        let ids: Vec<&[u8]> = row.try_get(2).map_err(pg_error)?;
        let sent: Vec<i64> = row.try_get(3).map_err(pg_error)?;
        let expires: Vec<Option<i64>> = row.try_get(4).map_err(pg_error)?;
        let counts: Vec<i32> = row.try_get(5).map_err(pg_error)?;
        let bodies: Vec<Vec<u8>> = row.try_get(6).map_err(pg_error)?;
        let expired: Vec<i64> = row.try_get(7).map_err(pg_error)?;
        let lost_total: i64 = row.try_get(8).map_err(pg_error)?;
        let lost_confirmed: i64 = row.try_get(9).map_err(pg_error)?;
        let n = seqs.len();
        if [
            ids.len(),
            sent.len(),
            expires.len(),
            counts.len(),
            bodies.len(),
        ] != [n; 5]
        {
            return Err(broken("oq_read returned arrays of different lengths"));
        }
        let mut records = Vec::with_capacity(n);
        for (i, body) in bodies.into_iter().enumerate() {
            let id: [u8; 16] = ids[i]
                .try_into()
                .map_err(|_| broken("a stored message id is not 16 bytes"))?;
            records.push(StoredRecord {
                seq: Seq(to_u64(seqs[i])),
                id: MessageId::from_bytes(id),
                sent_at: Timestamp::from_millis(to_u64(sent[i])),
                expires_at: expires[i].map(|t| Timestamp::from_millis(to_u64(t))),
                delivery_count: u32::try_from(counts[i]).unwrap_or(0),
                body: Bytes::from(body),
            });
        }
        let (total, confirmed) = (to_u64(lost_total), to_u64(lost_confirmed));
        Ok(DeliveryRead {
            acked: to_u64(acked),
            batch: ReadBatch {
                records,
                expired: expired.into_iter().map(|s| Seq(to_u64(s))).collect(),
                damaged: Vec::new(),
                lost_unconfirmed: total.saturating_sub(confirmed),
                lost_total: total,
            },
        })
    }
}

/// An [`Ack`] as `oq_ack`'s parameters. Seqs above `i64::MAX` were never handed out, so they
/// are left out (a cumulative one is clamped).
struct AckParams {
    through: Option<i64>,
    seqs: Vec<i64>,
    passed: Vec<i64>,
    confirm: Option<i64>,
}

impl AckParams {
    fn new(ack: Option<&Ack>) -> Self {
        let held = |seqs: &[Seq]| -> Vec<i64> {
            seqs.iter()
                .filter_map(|s| i64::try_from(s.0).ok())
                .collect()
        };
        match ack {
            None => Self {
                through: None,
                seqs: Vec::new(),
                passed: Vec::new(),
                confirm: None,
            },
            Some(ack) => Self {
                through: ack.through.map(|s| to_i64(s.0)),
                seqs: held(&ack.seqs),
                passed: held(&ack.passed_over),
                confirm: ack.lost_confirmed_through.map(to_i64),
            },
        }
    }
}

/// A `u64` as PostgreSQL's `bigint`, clamped (times, seqs and limits past `i64::MAX` mean
/// "never" or "unbounded").
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `bigint` the functions keep non-negative, as a `u64`.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn broken(what: &str) -> Error {
    Error::storage_msg(Retry::No, format!("postgres: {what}"))
}

/// One append's outcome from what `oq_append` (or its share of `oq_append_many`) returned:
/// its status, a seq and duplicate flag per record, and `[dropped, pending, have_messages,
/// have_bytes, adding, adding_bytes]`.
fn append_outcome(
    status: i16,
    seqs: &[Option<i64>],
    duplicate: &[bool],
    numbers: [Option<i64>; 6],
    quota: &Quota,
) -> Result<AppendOutcome> {
    let number = |i: usize| to_u64(numbers[i].unwrap_or(0));
    match status {
        0 => {}
        1 => {
            return Err(Error::QueueFull {
                messages: number(2),
                bytes: number(3),
                adding_messages: number(4),
                adding_bytes: number(5),
                max_messages: quota.max_messages,
                max_bytes: quota.max_bytes,
            });
        }
        2 => {
            return Err(Error::StorageFull {
                used: number(3),
                adding: number(5),
                max: quota.max_total_bytes.unwrap_or(u64::MAX),
            });
        }
        other => return Err(broken(&format!("oq_append returned status {other}"))),
    }
    let records = seqs
        .iter()
        .zip(duplicate)
        .map(|(&seq, &dup)| {
            let seq =
                Seq(to_u64(seq.ok_or_else(|| {
                    broken("oq_append returned no seq for a record")
                })?));
            Ok(if dup {
                Appended::Duplicate(seq)
            } else {
                Appended::Stored(seq)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AppendOutcome {
        records,
        dropped: number(0),
        pending: number(1),
        live_elsewhere: false,
    })
}

#[async_trait]
impl Storage for PostgresStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_max_read_batch(10_000)
            .with_durable(self.shared.durable)
            .with_total_byte_budget(true)
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
        let (reply, answer) = futures::channel::oneshot::channel();
        let job = group_commit::Job {
            recipient: recipient.clone(),
            records,
            quota: *quota,
            now,
            reply,
        };
        self.appends
            .unbounded_send(job)
            .map_err(|_| broken("the group-commit task is gone (its runtime shut down)"))?;
        answer.await.map_err(|_| {
            Error::storage_msg(
                Retry::Yes,
                "postgres: the group-commit task stopped before answering (its runtime shut \
                 down); the append may have been stored",
            )
        })?
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
        let seqs: Vec<i64> = seqs
            .iter()
            .filter_map(|s| i64::try_from(s.0).ok())
            .collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.statements.mark)
            .await
            .map_err(pg_error)?;
        client
            .execute(&statement, &[&recipient.as_bytes(), &seqs])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64> {
        let parts = AckParams::new(Some(ack));
        let row = self
            .query_one(
                &self.shared.statements.ack,
                &[
                    &recipient.as_bytes(),
                    &parts.through,
                    &parts.seqs,
                    &parts.passed,
                    &parts.confirm,
                    &to_i64(now.as_millis()),
                ],
            )
            .await?;
        Ok(to_u64(row.try_get(0).map_err(pg_error)?))
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome> {
        let row = self
            .query_one(
                &self.shared.statements.purge,
                &[
                    &to_i64(now.as_millis()),
                    &idle_before.map(|t| to_i64(t.as_millis())),
                    &to_i64(budget as u64),
                    &self.shared.purge_lock,
                ],
            )
            .await?;
        Ok(PurgeOutcome {
            expired: to_u64(row.try_get(0).map_err(pg_error)?),
            idle_recipients: to_u64(row.try_get(1).map_err(pg_error)?),
            more: row.try_get(2).map_err(pg_error)?,
            examined: to_u64(row.try_get(3).map_err(pg_error)?),
        })
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.statements.stats)
            .await
            .map_err(pg_error)?;
        let Some(row) = client
            .query_opt(&statement, &[&recipient.as_bytes()])
            .await
            .map_err(pg_error)?
        else {
            return Ok(RecipientStats::default());
        };
        let oldest: Option<i64> = row.try_get(3).map_err(pg_error)?;
        let newest: Option<i64> = row.try_get(4).map_err(pg_error)?;
        Ok(RecipientStats {
            messages: to_u64(row.try_get(0).map_err(pg_error)?),
            bytes: to_u64(row.try_get(1).map_err(pg_error)?),
            oldest_sent_at: oldest.map(|t| Timestamp::from_millis(to_u64(t))),
            newest_seq: newest.map(|s| Seq(to_u64(s))),
            lost: to_u64(row.try_get(2).map_err(pg_error)?),
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let row = self
            .query_one(&self.shared.statements.remove, &[&recipient.as_bytes()])
            .await?;
        Ok(to_u64(row.try_get(0).map_err(pg_error)?))
    }
}
