//! The [`OfflineQueue`] engine: validation, encoding, storage, wake-ups, nudges and sessions.

mod nudges;
mod session;
#[cfg(feature = "tokio")]
mod upkeep;

pub use session::{Session, SessionEnd, SessionHandle};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::codec;
use crate::coordination::{Coordination, Presence, SingleNode};
use crate::error::{Error, Result};
use crate::limits::{BatchLimit, Limits, Quota};
use crate::message::{
    Delivery, Envelope, Ephemeral, MessageId, RecipientId, RecipientMap, SendReceipt, Urgency,
};
use crate::metrics::{self, Metrics, MetricsSnapshot};
use crate::notifier::{NoopNotifier, Notifier, NotifyPolicy, Nudge, NudgeReason};
use crate::storage::{
    AppendOutcome, Appended, Capabilities, MemoryStorage, NewRecord, Storage, StoredRecord,
};
use crate::transport::Transport;
use nudges::NudgeState;
use session::SessionShared;

/// The smallest cap on a decompressed payload, whatever `max_message_bytes` says: records
/// written under a larger limit still decode after it was lowered, and a hostile record cannot
/// make a reader allocate more than this.
const DECODE_CAP_FLOOR: usize = 64 * 1024 * 1024;

/// Called with each message that reached `max_deliveries` without an ack, just before it is
/// removed. At least once: if the removal fails (storage down, the process killed) the same
/// message, with the same `MessageId`, is handed over again at its next read, so a hook that
/// must not see one twice keeps the ids it saw. Keep it quick (log it, or queue it for
/// inspection).
pub type DeadLetterHook = Arc<dyn Fn(&RecipientId, Delivery) + Send + Sync>;

/// The engine. Build one with [`OfflineQueue::builder`], clone it freely (clones share
/// everything), and use it from every connection.
///
/// It starts no threads and needs no async runtime: sessions are futures the host runs, and
/// periodic work is [`maintain`](Self::maintain), which the host calls on its own timer.
#[derive(Clone)]
pub struct OfflineQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OfflineQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineQueue")
            .field("limits", &self.inner.limits)
            .field("batch", &self.inner.batch)
            .field("live_sessions", &self.inner.sessions.lock().len())
            .finish_non_exhaustive()
    }
}

/// Who tells other nodes that a recipient got messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Announce {
    /// Nobody: one node on its own ([`SingleNode`]).
    Nobody,
    /// The storage's append, in the same step: it is its own coordination.
    InAppend,
    /// The coordination, after the append.
    Separately,
}

pub(crate) struct Inner {
    pub(crate) storage: Arc<dyn Storage>,
    capabilities: Capabilities,
    pub(crate) coordination: Arc<dyn Coordination>,
    announce: Announce,
    notifier: Arc<dyn Notifier>,
    pub(crate) clock: Arc<dyn Clock>,
    limits: Limits,
    quota: Quota,
    pub(crate) batch: BatchLimit,
    pub(crate) max_in_flight: usize,
    pub(crate) max_deliveries: u32,
    pub(crate) dead_letter: Option<DeadLetterHook>,
    notify_policy: NotifyPolicy,
    compress_at: Option<usize>,
    pub(crate) sessions: Mutex<RecipientMap<Arc<SessionShared>>>,
    next_session_id: AtomicU64,
    nudges: Mutex<NudgeState>,
    pub(crate) metrics: Metrics,
}

/// Builds an [`OfflineQueue`]. Every setting has a default; `build` checks them all.
#[must_use]
pub struct OfflineQueueBuilder {
    storage: Option<Arc<dyn Storage>>,
    coordination: Option<Arc<dyn Coordination>>,
    /// True while the storage and the coordination are the one object `shared_storage` set.
    storage_is_coordination: bool,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    batch: BatchLimit,
    max_in_flight: usize,
    max_deliveries: u32,
    dead_letter: Option<DeadLetterHook>,
    notify_policy: NotifyPolicy,
    compress_at: Option<usize>,
}

impl Default for OfflineQueueBuilder {
    fn default() -> Self {
        Self {
            storage: None,
            coordination: None,
            storage_is_coordination: false,
            notifier: Arc::new(NoopNotifier),
            clock: Arc::new(SystemClock),
            limits: Limits::default(),
            batch: BatchLimit::default(),
            max_in_flight: 256,
            max_deliveries: 10,
            dead_letter: None,
            notify_policy: NotifyPolicy::default(),
            compress_at: None,
        }
    }
}

impl OfflineQueueBuilder {
    /// Where messages are kept. Default: a new [`MemoryStorage`] (not durable).
    ///
    /// Several engine instances (nodes) sharing one storage also need a
    /// [`coordination`](Self::coordination), or use
    /// [`shared_storage`](Self::shared_storage) for a storage that is its own.
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self.storage_is_coordination = false;
        self
    }

    /// How this engine finds and wakes the other engine instances (nodes) sharing its storage:
    /// presence, wake-ups, "live elsewhere". Default: [`SingleNode`], no other node. After
    /// each append that stored something, the engine calls [`Coordination::announce`] (one
    /// more round trip per send; a storage that is its own coordination saves it, see
    /// [`shared_storage`](Self::shared_storage)).
    pub fn coordination(mut self, coordination: Arc<dyn Coordination>) -> Self {
        self.coordination = Some(coordination);
        self.storage_is_coordination = false;
        self
    }

    /// A storage that is also its own [`Coordination`] (as
    /// `RedisStorage` is), set as both. Its appends find the
    /// recipient's sessions on other nodes and wake them in the same step
    /// ([`AppendOutcome::live_elsewhere`](crate::storage::AppendOutcome::live_elsewhere)), so
    /// the engine makes no separate [`Coordination::announce`] call.
    ///
    /// A storage shared by several nodes but set with [`storage`](Self::storage) alone works
    /// as one node: its sessions are not woken by the others' sends.
    pub fn shared_storage<S: Storage + Coordination>(mut self, storage: Arc<S>) -> Self {
        self.storage = Some(storage.clone());
        self.coordination = Some(storage);
        self.storage_is_coordination = true;
        self
    }

    /// How offline recipients are nudged. Default: nobody is.
    pub fn notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    /// The source of time. Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Size limits, quotas and TTLs. Default: [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Bounds on one delivered batch. Default: 100 messages, 1 MiB.
    pub fn batch(mut self, batch: BatchLimit) -> Self {
        self.batch = batch;
        self
    }

    /// Most messages delivered and not yet acked per session (MQTT's Receive Maximum).
    /// Default 256, as Signal.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max;
        self
    }

    /// After this many deliveries without an ack, a message goes to the dead-letter hook and is
    /// removed instead of looping forever; the recipient's next batch counts it in its `gap`.
    /// Default 10.
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.max_deliveries = max;
        self
    }

    /// Receives messages that reached `max_deliveries` (at least once each, see
    /// [`DeadLetterHook`]). Default: they are logged and removed.
    pub fn on_dead_letter(
        mut self,
        hook: impl Fn(&RecipientId, Delivery) + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Arc::new(hook));
        self
    }

    /// When nudges go out. Default: [`NotifyPolicy::default`].
    pub fn notify_policy(mut self, policy: NotifyPolicy) -> Self {
        self.notify_policy = policy;
        self
    }

    /// Compresses stored payloads of at least `threshold` bytes with lz4 (when that makes them
    /// smaller). Off by default.
    #[cfg(feature = "compression")]
    pub fn compress_above(mut self, threshold: usize) -> Self {
        self.compress_at = Some(threshold);
        self
    }

    /// Checks every setting and builds the engine.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first setting out of range, or a
    /// `max_total_bytes` the storage does not keep
    /// ([`Capabilities::total_byte_budget`](crate::storage::Capabilities::total_byte_budget)).
    pub fn build(self) -> Result<OfflineQueue> {
        self.limits.validate()?;
        self.batch.validate()?;
        if self.max_in_flight == 0 {
            return Err(Error::InvalidConfig {
                field: "max_in_flight",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_deliveries == 0 {
            return Err(Error::InvalidConfig {
                field: "max_deliveries",
                reason: "must be at least 1".into(),
            });
        }
        let storage = self
            .storage
            .unwrap_or_else(|| Arc::new(MemoryStorage::new()));
        let capabilities = storage.capabilities();
        if !capabilities.durable {
            tracing::info!(
                "the storage is not durable: messages it holds are lost when the process \
                 (or the storage's server) stops"
            );
        }
        if let Some(max) = self.limits.max_total_bytes
            && !capabilities.total_byte_budget
        {
            return Err(Error::InvalidConfig {
                field: "max_total_bytes",
                reason: format!(
                    "is {max}, but this storage does not keep a total byte budget (see its options)"
                ),
            });
        }
        let mut batch = self.batch;
        batch.max_messages = batch.max_messages.min(capabilities.max_read_batch.max(1));
        Ok(OfflineQueue {
            inner: Arc::new(Inner {
                storage,
                capabilities,
                announce: match (&self.coordination, self.storage_is_coordination) {
                    (None, _) => Announce::Nobody,
                    (Some(_), true) => Announce::InAppend,
                    (Some(_), false) => Announce::Separately,
                },
                coordination: self.coordination.unwrap_or_else(|| Arc::new(SingleNode)),
                notifier: self.notifier,
                clock: self.clock,
                quota: self.limits.quota(),
                limits: self.limits,
                batch,
                max_in_flight: self.max_in_flight,
                max_deliveries: self.max_deliveries,
                dead_letter: self.dead_letter,
                notify_policy: self.notify_policy,
                compress_at: self.compress_at,
                sessions: Mutex::new(RecipientMap::default()),
                next_session_id: AtomicU64::new(1),
                nudges: Mutex::new(NudgeState::default()),
                metrics: Metrics::default(),
            }),
        })
    }
}

/// What an append did, as the engine needs it after: counts and the nudge to consider.
struct AppendSummary {
    stored: u64,
    duplicates: u64,
    dropped: u64,
    pending: u64,
    live_elsewhere: bool,
    /// The most urgent of the newly stored messages' urgencies, if any was stored.
    strongest: Option<Urgency>,
    /// The longest time to live left among the newly stored messages; `None` if one never
    /// expires (or none was stored).
    ttl: Option<Duration>,
}

/// The longest time to live left at `now` among these deadlines; `None` if one is `None`
/// (never expires) or there are none.
fn longest_ttl(
    deadlines: impl Iterator<Item = Option<Timestamp>>,
    now: Timestamp,
) -> Option<Duration> {
    let mut longest = None;
    for deadline in deadlines {
        let left = deadline?.duration_since(now);
        longest = Some(longest.map_or(left, |l: Duration| l.max(left)));
    }
    longest
}

fn receipt(id: MessageId, appended: Appended, dropped: u64, online: bool) -> SendReceipt {
    SendReceipt {
        id,
        seq: appended.seq(),
        duplicate: matches!(appended, Appended::Duplicate(_)),
        recipient_online: online,
        dropped,
    }
}

/// A recipient's queue at a glance ([`OfflineQueue::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Messages stored (expired but not yet purged ones included).
    pub messages: u64,
    /// Stored bytes (encoded, after compression).
    pub bytes: u64,
    /// Age of the oldest stored message.
    pub oldest_age: Option<Duration>,
    /// Messages lost (dropped, expired before an ack, damaged, or removed after
    /// `max_deliveries`) whose report the recipient has not confirmed yet (by acking a message
    /// of the batch that carried it, or of a later one).
    pub lost: u64,
}

/// What one [`OfflineQueue::maintain`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Expired messages removed.
    pub expired: u64,
    /// Idle recipient queues removed whole.
    pub idle_recipients: u64,
    /// Nudges sent for sessions that ended with messages pending.
    pub nudges: u64,
    /// True if the budget ran out with work left: call again soon.
    pub more: bool,
}

impl OfflineQueue {
    /// A builder with every default.
    pub fn builder() -> OfflineQueueBuilder {
        OfflineQueueBuilder::default()
    }

    /// Stores one message and wakes its recipient: delivered at once to a live session, else
    /// nudged (as [`NotifyPolicy`] allows). Returns once the message is stored.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`], [`Error::TtlZero`], [`Error::TtlTooLong`] before any write;
    /// [`Error::QueueFull`], [`Error::StorageFull`] or a storage error with nothing stored.
    /// One exception: a backend across a network (Redis, PostgreSQL) may return a retryable
    /// error after it applied the append (the connection dropped before the reply). Send with a
    /// sender-chosen id ([`Envelope::with_id`]) and retry with the same id: the dedup window
    /// stores it once.
    ///
    /// Nothing awaits before the storage's append: with a storage that keeps poll order,
    /// sends are stored in the order of their first polls ([`OfflineQueue::sends_keep_poll_order`]).
    pub async fn send(&self, envelope: Envelope) -> Result<SendReceipt> {
        let (recipient, record, urgency) = self.prepare(envelope)?;
        let inner = &self.inner;
        let (id, now, deadline) = (record.id, record.sent_at, record.expires_at);
        let outcome = inner
            .storage
            .append_one(&recipient, record, &inner.quota, now)
            .await
            .map_err(|error| self.append_failed(&recipient, error))?;
        let stored = matches!(outcome.record, Appended::Stored(_));
        let live_elsewhere = outcome.live_elsewhere || self.announce(&recipient, stored).await;
        let online = self.after_append(
            &recipient,
            AppendSummary {
                stored: u64::from(stored),
                duplicates: u64::from(!stored),
                dropped: outcome.dropped,
                pending: outcome.pending,
                live_elsewhere,
                strongest: stored.then_some(urgency),
                ttl: longest_ttl(std::iter::once(deadline), now),
            },
            now,
        );
        Ok(receipt(id, outcome.record, outcome.dropped, online))
    }

    /// Stores many messages. Every envelope is validated first: if any is invalid, that error is
    /// returned and nothing is stored. Then each recipient's messages are stored atomically
    /// (all or none of that recipient's), so the result holds one outcome per envelope, in
    /// input order.
    ///
    /// # Errors
    /// The outer error is a validation error of the first invalid envelope.
    pub async fn send_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Result<SendReceipt>>> {
        #[derive(Default)]
        struct Group {
            indexes: Vec<usize>,
            records: Vec<NewRecord>,
            urgencies: Vec<Urgency>,
        }
        let total = envelopes.len();
        let mut groups: Vec<(RecipientId, Group)> = Vec::new();
        let mut group_of: RecipientMap<usize> = RecipientMap::default();
        for (index, envelope) in envelopes.into_iter().enumerate() {
            let (recipient, record, urgency) = self.prepare(envelope)?;
            let group = *group_of.entry(recipient.clone()).or_insert_with(|| {
                groups.push((recipient, Group::default()));
                groups.len() - 1
            });
            let group = &mut groups[group].1;
            group.indexes.push(index);
            group.records.push(record);
            group.urgencies.push(urgency);
        }
        let mut results: Vec<Option<Result<SendReceipt>>> = (0..total).map(|_| None).collect();
        for (recipient, group) in groups {
            let ids: Vec<MessageId> = group.records.iter().map(|r| r.id).collect();
            match self
                .store(&recipient, group.records, &group.urgencies)
                .await
            {
                Ok((outcome, online)) => {
                    for ((index, id), appended) in
                        group.indexes.into_iter().zip(ids).zip(&outcome.records)
                    {
                        results[index] = Some(Ok(receipt(id, *appended, outcome.dropped, online)));
                    }
                }
                Err(error) => {
                    for index in group.indexes {
                        results[index] = Some(Err(error.clone()));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every envelope has an outcome"))
            .collect())
    }

    /// Validates and encodes one envelope (its payload becomes the body without a copy);
    /// nothing is written.
    fn prepare(&self, envelope: Envelope) -> Result<(RecipientId, NewRecord, Urgency)> {
        let inner = &self.inner;
        let max = inner.limits.max_message_bytes;
        if envelope.payload.len() > max {
            metrics::add(&inner.metrics.rejected_too_large, 1);
            return Err(Error::MessageTooLarge {
                size: envelope.payload.len(),
                max,
            });
        }
        let ttl = inner.limits.effective_ttl(envelope.ttl).inspect_err(|_| {
            metrics::add(&inner.metrics.rejected_invalid_ttl, 1);
        })?;
        let now = inner.clock.now();
        let id = envelope
            .id
            .unwrap_or_else(|| MessageId::generate_at(now.as_millis()));
        let record = NewRecord {
            id,
            dedup: envelope.id.is_some(),
            sent_at: now,
            expires_at: ttl.map(|ttl| now.saturating_add(ttl)),
            body: codec::encode_body(envelope.payload, inner.compress_at),
        };
        Ok((envelope.recipient, record, envelope.urgency))
    }

    /// Appends one recipient's records, then wakes or nudges. Returns the outcome and whether
    /// the recipient is online.
    async fn store(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        urgencies: &[Urgency],
    ) -> Result<(AppendOutcome, bool)> {
        let inner = &self.inner;
        // The time `prepare` stamped them with: one clock read per send.
        let now = records
            .first()
            .map_or_else(|| inner.clock.now(), |r| r.sent_at);
        let deadlines: Vec<Option<Timestamp>> = records.iter().map(|r| r.expires_at).collect();
        let outcome = inner
            .storage
            .append(recipient, records, &inner.quota, now)
            .await
            .map_err(|error| self.append_failed(recipient, error))?;
        let stored = outcome
            .records
            .iter()
            .filter(|a| matches!(a, Appended::Stored(_)))
            .count() as u64;
        // The most urgent of the newly stored messages decides the nudge.
        let strongest = urgencies
            .iter()
            .zip(&outcome.records)
            .filter(|(_, a)| matches!(a, Appended::Stored(_)))
            .map(|(urgency, _)| *urgency)
            .min_by_key(|u| match u {
                Urgency::Urgent => 0,
                Urgency::Background => 1,
                Urgency::Silent => 2,
            });
        let live_elsewhere = outcome.live_elsewhere || self.announce(recipient, stored > 0).await;
        let online = self.after_append(
            recipient,
            AppendSummary {
                stored,
                duplicates: outcome.records.len() as u64 - stored,
                dropped: outcome.dropped,
                pending: outcome.pending,
                live_elsewhere,
                strongest,
                ttl: longest_ttl(
                    deadlines
                        .iter()
                        .zip(&outcome.records)
                        .filter(|(_, a)| matches!(a, Appended::Stored(_)))
                        .map(|(deadline, _)| *deadline),
                    now,
                ),
            },
            now,
        );
        Ok((outcome, online))
    }

    /// Counts a failed append and passes its error on.
    fn append_failed(&self, recipient: &RecipientId, error: Error) -> Error {
        let metrics = &self.inner.metrics;
        let counter = match &error {
            Error::QueueFull { .. } => &metrics.rejected_queue_full,
            Error::StorageFull { .. } => &metrics.rejected_storage_full,
            _ => &metrics.storage_errors,
        };
        metrics::add(counter, 1);
        tracing::debug!(%recipient, %error, "send failed");
        error
    }

    /// After an append that stored something, when the coordination is not the storage's own:
    /// tells the other nodes (a client may hold a session on two). Returns whether another
    /// node holds a session. A coordination failure is logged; the message is stored either
    /// way, and the recipient counts as offline elsewhere (a push may go out).
    async fn announce(&self, recipient: &RecipientId, stored: bool) -> bool {
        let inner = &self.inner;
        if !stored || inner.announce != Announce::Separately {
            return false;
        }
        inner
            .coordination
            .announce(recipient)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%recipient, %error, "announcing new messages to other nodes failed");
                false
            })
    }

    /// After an append: counts it, then wakes the recipient's live session or nudges. Returns
    /// whether the recipient is online.
    fn after_append(
        &self,
        recipient: &RecipientId,
        summary: AppendSummary,
        now: Timestamp,
    ) -> bool {
        let inner = &self.inner;
        metrics::add(&inner.metrics.stored, summary.stored);
        metrics::add(&inner.metrics.duplicates, summary.duplicates);
        metrics::add(&inner.metrics.dropped, summary.dropped);
        let online = self.wake_if_live(recipient, summary.stored > 0) || summary.live_elsewhere;
        if !online && let Some(urgency) = summary.strongest.filter(|u| *u != Urgency::Silent) {
            let reason =
                inner
                    .nudges
                    .lock()
                    .on_stored(&inner.notify_policy, recipient, urgency, now);
            match reason {
                Some(reason) => self.nudge(recipient, Some(summary.pending), reason, summary.ttl),
                None => metrics::add(&inner.metrics.notifications_coalesced, 1),
            }
        }
        tracing::trace!(%recipient, stored = summary.stored, online, "stored");
        online
    }

    fn nudge(
        &self,
        recipient: &RecipientId,
        pending: Option<u64>,
        reason: NudgeReason,
        ttl: Option<Duration>,
    ) {
        let inner = &self.inner;
        let nudge = Nudge {
            recipient: recipient.clone(),
            pending,
            reason,
            ttl,
        };
        match inner.notifier.notify(nudge) {
            Ok(()) => metrics::add(&inner.metrics.notifications_sent, 1),
            Err(error) => {
                metrics::add(&inner.metrics.notifications_failed, 1);
                tracing::warn!(%recipient, %error, "nudge failed; the message stays stored");
            }
        }
    }

    /// True if the recipient has a live session on this engine; wakes it when `wake` is set.
    fn wake_if_live(&self, recipient: &RecipientId, wake: bool) -> bool {
        // Woken outside the map's lock: an executor that polls on wake must not find it held.
        let session = self.inner.sessions.lock().get(recipient).cloned();
        let Some(session) = session else {
            return false;
        };
        if wake {
            session.wake();
        }
        true
    }

    /// Hands a live-only payload (typing, presence) to the recipient's live session on this
    /// engine. Never stored, never a reason to nudge. Returns false (and drops it) when the
    /// recipient has no live session here.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] for a payload over `max_message_bytes`.
    pub fn send_ephemeral(
        &self,
        recipient: &RecipientId,
        payload: impl Into<Vec<u8>>,
    ) -> Result<bool> {
        let payload = payload.into();
        let max = self.inner.limits.max_message_bytes;
        if payload.len() > max {
            metrics::add(&self.inner.metrics.rejected_too_large, 1);
            return Err(Error::MessageTooLarge {
                size: payload.len(),
                max,
            });
        }
        let session = self.inner.sessions.lock().get(recipient).cloned();
        let Some(session) = session else {
            metrics::add(&self.inner.metrics.ephemeral_dropped, 1);
            return Ok(false);
        };
        let ephemeral = Ephemeral {
            payload,
            sent_at: self.inner.clock.now(),
        };
        if session.push_ephemeral(ephemeral) {
            metrics::add(&self.inner.metrics.ephemeral_dropped, 1);
        }
        Ok(true)
    }

    /// Opens a session for `recipient` over `transport`. A live session of the same recipient
    /// on this engine is displaced (its driver ends with [`SessionEnd::Displaced`]).
    ///
    /// Nothing happens until the host runs [`Session::run`]: spawn it, or poll it inside the
    /// connection's own task. Acks go through [`Session::handle`].
    pub fn connect(&self, recipient: RecipientId, transport: impl Transport) -> Session {
        let id = self.inner.next_session_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SessionShared::new(id));
        let previous = {
            let mut sessions = self.inner.sessions.lock();
            let previous = sessions.insert(recipient.clone(), shared.clone());
            // Told under the map's lock, as a session's end is: the coordination hears
            // connects and ends in the order the map saw them, so an end racing this connect
            // cannot undo it.
            self.inner
                .coordination
                .presence(&recipient, Presence::Connected);
            previous
        };
        if let Some(previous) = previous {
            previous.displace();
        }
        self.inner.nudges.lock().on_connect(&recipient);
        tracing::debug!(%recipient, session = id, "connected");
        Session::new(self.inner.clone(), recipient, shared, Arc::new(transport))
    }

    /// True if `recipient` has a live session on this engine.
    pub fn is_online(&self, recipient: &RecipientId) -> bool {
        self.inner.sessions.lock().contains_key(recipient)
    }

    /// True if `recipient` has a live session on this engine or, as the
    /// [`Coordination`] knows, on another node sharing its storage.
    ///
    /// # Errors
    /// A coordination error (only asked when the recipient has no session here).
    pub async fn is_online_anywhere(&self, recipient: &RecipientId) -> Result<bool> {
        if self.is_online(recipient) {
            return Ok(true);
        }
        self.inner.coordination.live_elsewhere(recipient).await
    }

    /// True if the storage keeps what it accepted across a crash of this process and of its
    /// own server ([`Capabilities::durable`]).
    pub fn storage_is_durable(&self) -> bool {
        self.inner.capabilities.durable
    }

    /// True if sends to one recipient that are stored are stored in the order their futures
    /// were first polled, even while earlier ones are still in flight: [`OfflineQueue::send`] reaches
    /// the storage in its first poll, and the storage keeps that order
    /// ([`Capabilities::appends_in_poll_order`]). A caller that sends on behalf of one
    /// client may then poll each send once as it is made and keep many in flight, so they
    /// share commits, and still store them in the client's order. False: await each send
    /// before the next to the same recipient (or use [`OfflineQueue::send_many`]).
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// use offline_queue::{Envelope, OfflineQueue, RecipientId};
    /// use std::task::{Context, Poll, Waker};
    ///
    /// let queue = OfflineQueue::builder().build()?; // memory storage keeps poll order
    /// assert!(queue.sends_keep_poll_order());
    /// let bob = RecipientId::new("bob")?;
    /// let mut sends = Vec::new();
    /// for text in ["one", "two"] {
    ///     let mut send = Box::pin(queue.send(Envelope::new(bob.clone(), text)));
    ///     // The first poll puts it in the storage's order; finish it later.
    ///     let first = send.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    ///     sends.push((first, send));
    /// }
    /// let mut seqs = Vec::new();
    /// for (first, send) in sends {
    ///     let receipt = match first {
    ///         Poll::Ready(receipt) => receipt,
    ///         Poll::Pending => send.await,
    ///     }?;
    ///     seqs.push(receipt.seq);
    /// }
    /// assert!(seqs[0] < seqs[1]);
    /// # Ok::<(), offline_queue::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn sends_keep_poll_order(&self) -> bool {
        self.inner.capabilities.appends_in_poll_order
    }

    /// The recipient's queue at a glance.
    ///
    /// # Errors
    /// A storage error.
    pub async fn stats(&self, recipient: &RecipientId) -> Result<QueueStats> {
        let stats = self.inner.storage.stats(recipient).await?;
        let now = self.inner.clock.now();
        Ok(QueueStats {
            messages: stats.messages,
            bytes: stats.bytes,
            oldest_age: stats.oldest_sent_at.map(|sent| now.duration_since(sent)),
            lost: stats.lost,
        })
    }

    /// Up to `max` of the recipient's deliverable messages, without delivering them (nothing is
    /// marked or acked).
    ///
    /// # Errors
    /// A storage error; [`Error::Codec`] for a record that does not decode;
    /// [`Error::UnsupportedRecord`] for a compressed record in a build without the
    /// `compression` feature.
    pub async fn peek(&self, recipient: &RecipientId, max: usize) -> Result<Vec<Delivery>> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let limit = BatchLimit {
            max_messages: max.max(1),
            max_bytes: usize::MAX,
        };
        let batch = inner.storage.read(recipient, None, limit, now).await?;
        batch
            .records
            .into_iter()
            .take(max)
            .map(|record| self.inner.to_delivery(record, now, false))
            .collect()
    }

    /// Removes the recipient's whole queue (a device unlinked); returns how many messages were
    /// removed. A live session keeps running and sees only what is sent afterwards.
    ///
    /// # Errors
    /// A storage error.
    pub async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        self.inner.storage.remove_recipient(recipient).await
    }

    /// Periodic upkeep, on the host's timer (every few seconds is plenty): removes up to
    /// `budget` expired messages and idle queues, and sends nudges due for sessions that ended
    /// with messages pending. Cost follows the work done, not what is stored.
    ///
    /// # Errors
    /// A storage error from purging; due nudges are still sent.
    pub async fn maintain(&self, budget: usize) -> Result<MaintenanceReport> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let idle_before = inner
            .limits
            .idle_recipient_timeout
            .map(|idle| now.saturating_sub(idle));
        let purged = inner.storage.purge(now, idle_before, budget).await;
        let due = inner.nudges.lock().due(&inner.notify_policy, now);
        let mut report = MaintenanceReport::default();
        for recipient in due {
            // Back on this node, or on another sharing the storage: no push.
            if self.is_online(&recipient)
                || inner
                    .coordination
                    .live_elsewhere(&recipient)
                    .await
                    .unwrap_or(false)
            {
                continue;
            }
            let pending = inner
                .storage
                .stats(&recipient)
                .await
                .ok()
                .map(|s| s.messages);
            if pending == Some(0) {
                continue;
            }
            inner
                .nudges
                .lock()
                .record_sent(&inner.notify_policy, &recipient, now);
            self.nudge(&recipient, pending, NudgeReason::Unacked, None);
            report.nudges += 1;
        }
        let purged = purged?;
        metrics::add(&inner.metrics.expired, purged.expired);
        metrics::add(
            &inner.metrics.idle_recipients_removed,
            purged.idle_recipients,
        );
        report.expired = purged.expired;
        report.idle_recipients = purged.idle_recipients;
        report.more = purged.more;
        Ok(report)
    }

    /// Wakes this engine's sessions of recipients that got messages through another node, as
    /// the [`Coordination`]'s wake-up stream tells: spawn it on the host's runtime when
    /// several nodes share the storage. It ends when the stream ends (at once for
    /// [`SingleNode`]), or once every other handle of the engine (its clones, its sessions)
    /// is dropped, since it holds the engine weakly. Each call makes its own stream.
    pub fn wakeup_listener(&self) -> impl Future<Output = ()> + Send + 'static {
        let stream = self.inner.coordination.wakeups();
        // Weakly: the stream ends when the storage is dropped, and a strong handle here
        // would keep the storage, and this task, alive for ever.
        let engine = Arc::downgrade(&self.inner);
        async move {
            let mut stream = stream;
            while let Some(recipient) = stream.next().await {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                OfflineQueue { inner }.wake_if_live(&recipient, true);
            }
        }
    }

    /// The engine's counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        let live = self.inner.sessions.lock().len() as u64;
        self.inner.metrics.snapshot(live)
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Entries held by the nudge coalescing state (bounded by recipients nudged recently).
    #[doc(hidden)]
    pub fn nudge_state_len(&self) -> usize {
        self.inner.nudges.lock().len()
    }

    /// The engine's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }
}

impl Inner {
    /// Decodes a stored record for delivery.
    pub(crate) fn to_delivery(
        &self,
        record: StoredRecord,
        now: Timestamp,
        handed_now: bool,
    ) -> Result<Delivery> {
        // The cap guards against decompression bombs; it stays above the configured limit so
        // records written under a larger limit still decode after it was lowered.
        let cap = self.limits.max_message_bytes.max(DECODE_CAP_FLOOR);
        let payload = codec::decode_body(record.body, cap)?;
        Ok(Delivery {
            id: record.id,
            seq: record.seq,
            payload,
            sent_at: record.sent_at,
            expires_at: record.expires_at,
            remaining_ttl: record.expires_at.map(|at| at.duration_since(now)),
            redelivered: record.delivery_count > 0,
            delivery_count: record.delivery_count + u32::from(handed_now),
        })
    }

    pub(crate) fn session_ended_pending(&self, recipient: &RecipientId) {
        let forgot =
            self.nudges
                .lock()
                .on_ended_pending(&self.notify_policy, recipient, self.clock.now());
        if forgot {
            // Per event, so debug: a burst past the count would flood a warning.
            tracing::debug!(
                max = self.notify_policy.max_tracked_recipients,
                "a delayed nudge was forgotten: more sessions ended with messages pending than \
                 NotifyPolicy::max_tracked_recipients"
            );
            metrics::add(&self.metrics.notifications_failed, 1);
        }
    }
}
