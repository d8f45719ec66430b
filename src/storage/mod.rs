//! The [`Storage`] trait: a durable, per-recipient FIFO of encoded records, and the contract
//! every backend keeps. [`MemoryStorage`] is the reference implementation.
//!
//! # Contract
//! A backend is correct when the conformance suite in `offline_queue::testing` (feature
//! `testing`) passes against it unchanged. In words:
//!
//! 1. **Order.** `append` assigns each stored record a [`Seq`] greater than every seq the
//!    recipient's queue has held, even after the queue was emptied by acks. `read` returns records
//!    in seq order.
//! 2. **Atomic quotas.** An append is all-or-nothing for its recipient: it fits the [`Quota`]
//!    (possibly after dropping the oldest records, with [`Overflow::DropOldest`](crate::Overflow))
//!    or it fails with [`Error::QueueFull`](crate::Error::QueueFull) /
//!    [`Error::StorageFull`](crate::Error::StorageFull) and changes nothing.
//! 3. **Dedup.** A record with `dedup: true` whose id was appended for the same recipient within
//!    `Quota::dedup_window` is not stored again; the append reports the original seq, even if
//!    the original was since acked. Removing the recipient's queue (`remove_recipient`, or
//!    purge's idle removal) forgets its ids with it.
//! 4. **Expiry.** `read` never returns a record with `expires_at <= now`; it reports the seqs of
//!    those it skipped so the engine can report and remove them. `purge` removes expired records
//!    with work in proportion to what it removes (an index by deadline; a backend may also
//!    spend each call's budget stepping once over records it need not remove, reporting
//!    `more`), and counts each in the
//!    recipient's `lost` counter: a record that expires before it was acked is lost, even if a
//!    transport took it once (the client may never have seen it; a gap may over-count, never
//!    under-count).
//! 5. **Delivery counts.** `mark_delivered` counts one more hand-over for each listed record
//!    the queue holds; `read_for_delivery` applies its ack as `ack` would, returns what `read`
//!    would, with the counts from before, and counts one for each record it returned.
//! 6. **Acks.** `ack` removes records cumulatively (every seq up to `through`) and selectively
//!    (listed seqs), ignores seqs it does not hold, and moves the recipient's confirmed-loss mark
//!    forward to `lost_confirmed_through` (never backward, never past the loss total). Loss
//!    totals never go back, even when a queue is emptied and created again (start a new queue's
//!    total from a counter that only grows, such as the seq counter).
//! 7. **Isolation.** Nothing addressed to one recipient id is visible through another, whatever
//!    bytes the ids contain.
//! 8. **Cost.** An offline recipient costs storage for its records and small metadata, and no
//!    memory beyond what the backend's medium needs.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redb")]
pub mod redb;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "amqp")]
pub use self::amqp::{AmqpOptions, AmqpStorage, QueueType};
#[cfg(feature = "nats")]
pub use self::nats::{NatsOptions, NatsStorage, OwnedNatsStorage};
#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresOptions, PostgresStorage};
#[cfg(feature = "redb")]
pub use self::redb::{RedbOptions, RedbStorage};
#[cfg(feature = "redis")]
pub use self::redis::{RedisOptions, RedisStorage};
pub use memory::MemoryStorage;

use async_trait::async_trait;
use bytes::Bytes;

use crate::clock::Timestamp;
use crate::error::{Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};

/// A record to append: the engine has encoded the payload into `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// The message id, returned with the record.
    pub id: MessageId,
    /// True if `id` was chosen by the sender and must be deduplicated; generated ids are unique
    /// by construction and need no dedup entry.
    pub dedup: bool,
    /// When the engine accepted it.
    pub sent_at: Timestamp,
    /// When it stops being deliverable.
    pub expires_at: Option<Timestamp>,
    /// The encoded payload (framed by the crate's codec); its length counts against quotas.
    pub body: Vec<u8>,
}

/// A record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in the recipient's queue.
    pub seq: Seq,
    /// The message id.
    pub id: MessageId,
    /// When the engine accepted it.
    pub sent_at: Timestamp,
    /// When it stops being deliverable.
    pub expires_at: Option<Timestamp>,
    /// How many times it has been marked delivered (`Storage::mark_delivered`).
    pub delivery_count: u32,
    /// The encoded payload, shared rather than copied: a backend that keeps records in
    /// memory hands out a reference, one that reads them hands over the buffer it read.
    pub body: Bytes,
}

/// The result of one record of an append, in input order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this seq.
    Stored(Seq),
    /// Not stored: the same id was appended within the dedup window, at this seq.
    Duplicate(Seq),
}

impl Appended {
    /// The seq, stored or original.
    pub fn seq(self) -> Seq {
        match self {
            Appended::Stored(seq) | Appended::Duplicate(seq) => seq,
        }
    }
}

/// What an append did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// One entry per record, in input order.
    pub records: Vec<Appended>,
    /// Records removed by `Overflow::DropOldest` to make room (added to the lost counter).
    pub dropped: u64,
    /// Records in the recipient's queue after the append (a hint for push notifications).
    pub pending: u64,
    /// True if the storage is its own [`Coordination`](crate::Coordination) and found, in the
    /// same step, a session for the recipient on another node (and woke it). False for every
    /// other storage: the engine then asks its coordination.
    pub live_elsewhere: bool,
}

/// What an append of one record did ([`Storage::append_one`]): an [`AppendOutcome`] without
/// the vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOneOutcome {
    /// Stored, or a duplicate of a record appended within the dedup window.
    pub record: Appended,
    /// Records removed by `Overflow::DropOldest` to make room (added to the lost counter).
    pub dropped: u64,
    /// Records in the recipient's queue after the append (a hint for push notifications).
    pub pending: u64,
    /// As [`AppendOutcome::live_elsewhere`].
    pub live_elsewhere: bool,
}

/// What a read returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadBatch {
    /// Unexpired records after the cursor, in seq order, within the batch limit.
    pub records: Vec<StoredRecord>,
    /// Seqs of expired records the read passed over (still stored until acked or purged).
    pub expired: Vec<Seq>,
    /// Seqs of records the read passed over because they are damaged (a checksum mismatch):
    /// never delivered; the engine reports them as lost and removes them.
    pub damaged: Vec<Seq>,
    /// Records lost (dropped, or expired before an ack) whose report the client has not yet
    /// confirmed: the part of `lost_total` above the confirmed mark.
    pub lost_unconfirmed: u64,
    /// The recipient's loss total: a counter that grows by one per lost record and never goes
    /// back, even across the queue being emptied and created again. The engine hands it back
    /// in `Ack::lost_confirmed_through` once the client confirmed a report up to it.
    pub lost_total: u64,
}

/// An acknowledgement: which records to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Remove every record with a seq at or below this one.
    pub through: Option<Seq>,
    /// Remove these records (unknown seqs are ignored).
    pub seqs: Vec<Seq>,
    /// Remove these records, which the engine passed over (expired, or damaged), counting each
    /// in the lost counter, exactly as `purge` does: a record is counted once, whichever of
    /// the two removes it.
    pub passed_over: Vec<Seq>,
    /// Then: the client confirmed a gap report covering the losses up to this total (see
    /// `ReadBatch::lost_total`). Idempotent: the confirmed mark only moves forward, and never
    /// past the current total, so two sessions confirming the same report count it once.
    pub lost_confirmed_through: Option<u64>,
}

/// What a purge call removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Expired records removed.
    pub expired: u64,
    /// Whole recipient queues removed for being idle.
    pub idle_recipients: u64,
    /// True if the budget ran out before the work due was done: call again.
    pub more: bool,
    /// Entries the call looked at in the backend's deadline, log and idle indexes, whether
    /// it removed them or not: the call's work. Purging k expired records costs O(k) entries
    /// however many records are stored (the conformance check `purge_work_is_proportional`
    /// counts it), so this is the figure to watch if upkeep ever slows.
    pub examined: u64,
}

/// One recipient's queue at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecipientStats {
    /// Records stored (expired but unpurged ones included).
    pub messages: u64,
    /// Bytes of record bodies stored.
    pub bytes: u64,
    /// When the oldest stored record was accepted.
    pub oldest_sent_at: Option<Timestamp>,
    /// The highest seq stored.
    pub newest_seq: Option<Seq>,
    /// Records lost (dropped, expired before an ack, or damaged) whose report the recipient
    /// has not confirmed yet.
    pub lost: u64,
}

/// What a backend does natively; the engine adapts to it, and the conformance suite skips a
/// check only by a capability, never by a backend's name.
///
/// Build it from [`Capabilities::default`] with the `with_*` setters, so a field added later
/// keeps its conservative default instead of breaking the backend's build:
///
/// ```
/// use offline_queue::storage::Capabilities;
/// let caps = Capabilities::default().with_durable(true).with_max_read_batch(1000);
/// assert!(caps.durable && !caps.total_byte_budget);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Largest batch one read may return; the engine clamps its batch limit to it.
    pub max_read_batch: usize,
    /// True only if a record whose append returned survives a crash (kill -9) of this process
    /// and of the storage's own server, if it has one. The engine logs it at build when it is
    /// false, and [`OfflineQueue::storage_is_durable`](crate::OfflineQueue::storage_is_durable)
    /// tells a host.
    pub durable: bool,
    /// True if appends keep [`Quota::max_total_bytes`], the storage-wide byte budget. The
    /// engine's builder refuses a budget the storage would not keep.
    pub total_byte_budget: bool,
    /// True if [`Storage::purge`] removes the records due by the `now` it is given (the
    /// engine's clock), with work in proportion to what it removes. False: expired records
    /// are still never read (reads filter on each record's deadline and report the ones they
    /// pass over, which the engine then removes and counts as lost), and the medium frees the
    /// space of the rest by its own clock. The conformance suite then skips purging in
    /// `expiry`, `passed_over_counts_once`, `purge_budget` and `purge_work_is_proportional`.
    pub purge_expired: bool,
    /// True if [`Storage::purge`] removes queues idle since `idle_before` (the engine's
    /// clock). False: the medium removes idle queues by its own clock (the backend's docs say
    /// how), and the suite skips `idle_removal`, `idle_refiling_is_bounded` and
    /// `idle_from_the_append_that_refilled`.
    pub idle_removal: bool,
    /// True if appends keep [`Quota::dedup_window`]: an id appended again within it is not
    /// stored twice. False: the suite skips `dedup` and the dedup cases of `append_one`.
    pub dedup: bool,
    /// True if the backend counts losses: [`AppendOutcome::dropped`], and
    /// [`ReadBatch::lost_unconfirmed`] / [`ReadBatch::lost_total`] with their confirmation
    /// (contract rules 4 and 6). False: gap reports are never made, and the suite skips
    /// the loss counts in `quota_drop_oldest`, `loss_confirmation_is_idempotent` and
    /// `passed_over_counts_once`.
    pub loss_counts: bool,
    /// True if appends keep [`Quota::max_messages`] and [`Quota::max_bytes`] exactly. False:
    /// the medium admits a record while the queue is under its limits, so a queue can pass
    /// them by one record; the suite skips the appends that would cross a limit.
    pub exact_quotas: bool,
    /// True if [`Storage::stats`] reports bytes, the oldest record and the newest seq exactly,
    /// [`Error::QueueFull`](crate::Error::QueueFull) the bytes stored, and
    /// [`AppendOutcome::pending`] the records in the queue. False: `pending` may count only
    /// the records of that append (a push's badge then says at least that many), a session
    /// is caught up only when a read finds nothing more (not at the newest seq its stats
    /// named at connect), and the suite and the storage model check only the message
    /// counts.
    pub exact_stats: bool,
    /// True if an append takes its place in the storage's order on the first poll of its
    /// future: of two appends to one recipient that are both stored, the one polled first
    /// gets the lower seq, even when the second is polled before the first completes (an
    /// earlier one may still fail, or be refused, while a later one is stored). A caller may
    /// then keep several appends to one recipient in flight and still have them stored in
    /// the order it made them (poll each once as it is made), which lets them share commits.
    /// False: a caller that needs that order awaits each append before it starts the next to
    /// the same recipient. The suite checks it in `appends_in_poll_order`.
    ///
    /// A wrapper that passes its inner storage's capabilities on must clear this flag unless
    /// its `append` and `append_one` call the inner ones, once, without waiting for anything
    /// first (no delay, retry, rate limit or lock held across an await).
    pub appends_in_poll_order: bool,
}

impl Default for Capabilities {
    /// Nothing native: reads unbounded by the backend, not durable, no storage-wide byte
    /// budget, no purge of expired records or idle queues by the engine's clock.
    fn default() -> Self {
        Self {
            max_read_batch: usize::MAX,
            durable: false,
            total_byte_budget: false,
            purge_expired: false,
            idle_removal: false,
            dedup: false,
            loss_counts: false,
            exact_quotas: false,
            exact_stats: false,
            appends_in_poll_order: false,
        }
    }
}

impl Capabilities {
    /// Sets [`Capabilities::max_read_batch`].
    #[must_use]
    pub fn with_max_read_batch(mut self, max: usize) -> Self {
        self.max_read_batch = max;
        self
    }

    /// Sets [`Capabilities::durable`].
    #[must_use]
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets [`Capabilities::total_byte_budget`].
    #[must_use]
    pub fn with_total_byte_budget(mut self, keeps: bool) -> Self {
        self.total_byte_budget = keeps;
        self
    }

    /// Sets [`Capabilities::purge_expired`].
    #[must_use]
    pub fn with_purge_expired(mut self, purges: bool) -> Self {
        self.purge_expired = purges;
        self
    }

    /// Sets [`Capabilities::idle_removal`].
    #[must_use]
    pub fn with_idle_removal(mut self, removes: bool) -> Self {
        self.idle_removal = removes;
        self
    }

    /// Sets [`Capabilities::dedup`].
    #[must_use]
    pub fn with_dedup(mut self, keeps: bool) -> Self {
        self.dedup = keeps;
        self
    }

    /// Sets [`Capabilities::loss_counts`].
    #[must_use]
    pub fn with_loss_counts(mut self, counts: bool) -> Self {
        self.loss_counts = counts;
        self
    }

    /// Sets [`Capabilities::exact_quotas`].
    #[must_use]
    pub fn with_exact_quotas(mut self, exact: bool) -> Self {
        self.exact_quotas = exact;
        self
    }

    /// Sets [`Capabilities::exact_stats`].
    #[must_use]
    pub fn with_exact_stats(mut self, exact: bool) -> Self {
        self.exact_stats = exact;
        self
    }

    /// Sets [`Capabilities::appends_in_poll_order`].
    #[must_use]
    pub fn with_appends_in_poll_order(mut self, ordered: bool) -> Self {
        self.appends_in_poll_order = ordered;
        self
    }

    /// Sets the four exactness flags at once ([`dedup`](Self::dedup),
    /// [`loss_counts`](Self::loss_counts), [`exact_quotas`](Self::exact_quotas),
    /// [`exact_stats`](Self::exact_stats)): what a backend that builds the whole contract on
    /// its medium claims.
    #[must_use]
    pub fn with_exact_contract(self) -> Self {
        self.with_dedup(true)
            .with_loss_counts(true)
            .with_exact_quotas(true)
            .with_exact_stats(true)
    }
}

/// What [`Storage::read_for_delivery`] did: the records its ack removed, and the batch read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryRead {
    /// Records removed by the ack (0 without one).
    pub acked: u64,
    /// What the read returned, counted as delivered.
    pub batch: ReadBatch,
}

/// Durable per-recipient FIFO storage. See the [module docs](self) for the contract.
///
/// Object-safe: the engine holds an `Arc<dyn Storage>`. Only what a backend must supply lives
/// here, ten methods:
/// - **required** (eight): [`capabilities`](Storage::capabilities),
///   [`append`](Storage::append), [`read`](Storage::read),
///   [`mark_delivered`](Storage::mark_delivered), [`ack`](Storage::ack),
///   [`purge`](Storage::purge), [`stats`](Storage::stats),
///   [`remove_recipient`](Storage::remove_recipient);
/// - **fast paths** (two), whose defaults are correct and merely slower:
///   [`append_one`](Storage::append_one) (the engine's `send`) and
///   [`read_for_delivery`](Storage::read_for_delivery) (a session's ack, read and marks in one
///   step). A wrapper around another storage must forward both, or the wrapped backend's own
///   versions never run.
///
/// Conveniences are in [`StorageExt`]. Nodes finding and waking each other is not storage:
/// see [`Coordination`](crate::Coordination).
///
/// Reads are cursor-shaped (`after`): the engine keeps one cursor per session, so a broker-style
/// backend (a queue per recipient, a JetStream consumer) can map a session's reads to its own
/// consumer position, and redeliver from the broker's unacked set when `after` is `None`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// What this backend does natively.
    fn capabilities(&self) -> Capabilities;

    /// Appends `records` for `recipient` atomically under `quota`, assigning seqs in input order.
    ///
    /// # Errors
    /// [`Error::QueueFull`](crate::Error::QueueFull) or
    /// [`Error::StorageFull`](crate::Error::StorageFull) with nothing written; a storage error.
    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome>;

    /// Appends one record, as [`Storage::append`] with a batch of one does. The engine's
    /// `send` calls this; a backend whose append is cheap next to a vector's allocation (one
    /// in memory) implements it without the two vectors. The default calls `append`.
    ///
    /// # Errors
    /// As [`Storage::append`].
    async fn append_one(
        &self,
        recipient: &RecipientId,
        record: NewRecord,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOneOutcome> {
        let outcome = self.append(recipient, vec![record], quota, now).await?;
        let record = *outcome.records.first().ok_or_else(|| {
            crate::Error::storage_msg(
                Retry::No,
                "the backend broke the contract: append returned no outcome for its one record \
                 (it may have been stored)",
            )
        })?;
        Ok(AppendOneOutcome {
            record,
            dropped: outcome.dropped,
            pending: outcome.pending,
            live_elsewhere: outcome.live_elsewhere,
        })
    }

    /// Reads up to `limit` unexpired records with seq greater than `after` (all when `None`).
    /// The byte bound counts body lengths; the first record is returned even if it alone is
    /// larger.
    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch>;

    /// Records that these records were handed to a transport (increments their
    /// `delivery_count`), before the hand-over, so a crash marks them redelivered.
    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()>;

    /// Removes acknowledged records; returns how many were removed. `now` counts as activity
    /// for idle removal.
    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64>;

    /// A session's read: applies the client's pending `ack` (if any) as [`Storage::ack`] does,
    /// then reads as [`Storage::read`] does and counts one delivery for every record returned,
    /// as [`Storage::mark_delivered`] would. The records carry their `delivery_count` from
    /// before this read. The engine hands over what it reads, and a client's acks ride with
    /// the next read, so a backend that does the three in one step (one transaction, one round
    /// trip) saves two per batch.
    ///
    /// Fast path: the default calls `ack`, `read` and `mark_delivered` in turn, which is
    /// correct and slower.
    ///
    /// # Errors
    /// A storage error. The ack may have been applied (acks are idempotent; the engine ends
    /// the session).
    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<DeliveryRead> {
        let acked = match ack {
            Some(ack) => self.ack(recipient, ack, now).await?,
            None => 0,
        };
        let batch = self.read(recipient, after, limit, now).await?;
        let seqs: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
        if !seqs.is_empty() {
            self.mark_delivered(recipient, &seqs).await?;
        }
        Ok(DeliveryRead { acked, batch })
    }

    /// Removes up to `budget` expired records (deadline at or before `now`) and, when
    /// `idle_before` is set, whole recipient queues last appended to or acked before it. The
    /// engine passes an `idle_before` at least the dedup window before `now`
    /// (`Limits::idle_recipient_timeout` is at least `dedup_window`), so a removed queue holds
    /// no dedup id still inside its window.
    /// `budget` bounds the work of one call: a call that ran out of it says `more`.
    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome>;

    /// The recipient's queue at a glance (all zero for an unknown recipient).
    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats>;

    /// Removes the recipient's whole queue and metadata (a device unlinked); returns how many
    /// records were removed.
    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64>;
}

/// Conveniences over [`Storage`], for every backend.
#[async_trait]
pub trait StorageExt: Storage {
    /// Every unexpired record of `recipient`, in order (reads in pages).
    async fn read_all(&self, recipient: &RecipientId, now: Timestamp) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let mut after = None;
        let page = BatchLimit {
            max_messages: self.capabilities().max_read_batch.clamp(1, 1000),
            max_bytes: usize::MAX,
        };
        loop {
            let batch = self.read(recipient, after, page, now).await?;
            let Some(last) = batch.records.last() else {
                return Ok(out);
            };
            after = Some(last.seq);
            out.extend(batch.records);
        }
    }

    /// Removes every record of `recipient` up to and including `through`.
    async fn ack_through(
        &self,
        recipient: &RecipientId,
        through: Seq,
        now: Timestamp,
    ) -> Result<u64> {
        let ack = Ack {
            through: Some(through),
            ..Ack::default()
        };
        self.ack(recipient, &ack, now).await
    }

    /// Removes the listed records of `recipient`.
    async fn ack_seqs(&self, recipient: &RecipientId, seqs: &[Seq], now: Timestamp) -> Result<u64> {
        let ack = Ack {
            seqs: seqs.to_vec(),
            ..Ack::default()
        };
        self.ack(recipient, &ack, now).await
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}
