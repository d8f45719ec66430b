//! A recipient's live session: the driver future that drains the backlog in batches, keeps a
//! bounded window in flight, pushes new messages as they arrive, and applies acks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;

use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tracing::Instrument;

use super::Inner;
use crate::coordination::Presence;
use crate::error::{Error, Result};
use crate::limits::BatchLimit;
use crate::message::{Batch, Ephemeral, RecipientId, Seq};
use crate::metrics;
use crate::storage::{Ack, DeliveryRead};
use crate::transport::{Outbound, Transport};

/// Ephemeral messages buffered for a session that has not sent them yet; older ones are dropped
/// beyond this (a typing indicator that old is worthless).
const EPHEMERAL_BUFFER: usize = 64;

/// How a session ended (its driver's `Ok` value).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The host called [`SessionHandle::close`].
    Closed,
    /// A newer session of the same recipient took over.
    Displaced,
    /// The transport failed: the connection is gone.
    TransportClosed(String),
}

/// What the host and the engine ask of a running session.
#[derive(Default)]
struct Control {
    woken: bool,
    displaced: bool,
    closed: bool,
    ack_through: Option<Seq>,
    ack_seqs: Vec<Seq>,
    ephemerals: VecDeque<Ephemeral>,
}

impl Control {
    fn has_work(&self) -> bool {
        self.woken
            || self.displaced
            || self.closed
            || self.ack_through.is_some()
            || !self.ack_seqs.is_empty()
            || !self.ephemerals.is_empty()
    }
}

/// State shared between a session's driver, its handles and the engine.
pub(crate) struct SessionShared {
    id: u64,
    control: Mutex<Control>,
    waker: AtomicWaker,
}

impl SessionShared {
    pub(crate) fn new(id: u64) -> Self {
        Self {
            id,
            control: Mutex::new(Control::default()),
            waker: AtomicWaker::new(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Control)) {
        change(&mut self.control.lock());
        self.waker.wake();
    }

    pub(crate) fn wake(&self) {
        self.update(|c| c.woken = true);
    }

    pub(crate) fn displace(&self) {
        self.update(|c| c.displaced = true);
    }

    /// Queues an ephemeral message; returns true if an older one was dropped to make room.
    pub(crate) fn push_ephemeral(&self, ephemeral: Ephemeral) -> bool {
        let mut dropped = false;
        self.update(|c| {
            if c.ephemerals.len() >= EPHEMERAL_BUFFER {
                c.ephemerals.pop_front();
                dropped = true;
            }
            c.ephemerals.push_back(ephemeral);
        });
        dropped
    }

    /// Waits until there is something to do, then takes it.
    async fn next(&self) -> Control {
        futures::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut control = self.control.lock();
            if control.has_work() {
                Poll::Ready(std::mem::take(&mut *control))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Takes what is asked now, without waiting.
    fn take(&self) -> Control {
        std::mem::take(&mut *self.control.lock())
    }

    /// Takes the acks asked for now, leaving the rest for [`next`](Self::next); true if a
    /// close, a displacement or an ephemeral message waits there, which must not wait for the
    /// rest of a backlog.
    fn take_acks(&self) -> (Control, bool) {
        let mut control = self.control.lock();
        let waiting = control.closed || control.displaced || !control.ephemerals.is_empty();
        let acks = Control {
            ack_through: control.ack_through.take(),
            ack_seqs: std::mem::take(&mut control.ack_seqs),
            ..Control::default()
        };
        (acks, waiting)
    }
}

/// The host's side of a running session: acks and close. Cheap to clone; usable from the
/// connection's read loop while the driver runs elsewhere.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<SessionShared>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl SessionHandle {
    /// Acks every message delivered in this session up to and including `seq` (cumulative).
    /// A seq beyond what was delivered is clamped to the last delivered.
    pub fn ack_through(&self, seq: Seq) {
        self.shared
            .update(|c| c.ack_through = c.ack_through.max(Some(seq)));
    }

    /// Acks these delivered messages (selective). Seqs not delivered in this session are
    /// ignored, so a client cannot remove what it was never given.
    pub fn ack(&self, seqs: impl IntoIterator<Item = Seq>) {
        // Collected before the lock: the caller's iterator may call back into the queue.
        let seqs: Vec<Seq> = seqs.into_iter().collect();
        self.shared.update(|c| c.ack_seqs.extend(seqs));
    }

    /// Ends the session (the connection closed). Unacked messages stay stored.
    pub fn close(&self) {
        self.shared.update(|c| c.closed = true);
    }
}

/// A connected recipient's session. Run its driver with [`Session::run`]; ack through
/// [`Session::handle`].
#[must_use = "a session does nothing until its driver runs"]
pub struct Session {
    registration: Registration,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("recipient", &self.registration.recipient)
            .field("id", &self.registration.shared.id)
            .finish()
    }
}

/// Keeps the session in the engine's table while it lives; removes it however the driver
/// ends (returned, failed, or dropped) and asks `maintain` to check, after `unacked_delay`,
/// whether messages were left pending, so none waits without a nudge whatever ended the
/// session. A displaced session does neither: the newer one owns the recipient.
struct Registration {
    inner: Arc<Inner>,
    recipient: RecipientId,
    shared: Arc<SessionShared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sessions = self.inner.sessions.lock();
        let current = sessions
            .get(&self.recipient)
            .is_some_and(|s| s.id == self.shared.id);
        if current {
            sessions.remove(&self.recipient);
            // Under the map's lock (see `OfflineQueue::connect`): a connect that follows
            // this end is told after it.
            self.inner
                .coordination
                .presence(&self.recipient, Presence::Disconnected);
            // After a connect storm drains away, give the map's room back (it keeps its
            // capacity when emptied); halving at a quarter full keeps this amortized O(1).
            if sessions.capacity() > 1024 && sessions.len() < sessions.capacity() / 4 {
                let len = sessions.len();
                sessions.shrink_to(len * 2);
            }
        }
        drop(sessions);
        if current {
            self.inner.session_ended_pending(&self.recipient);
        }
    }
}

/// The driver's position.
struct Cursor {
    /// The highest seq handed over (or passed over) in this session.
    last: Option<Seq>,
    /// Seqs handed over and not yet acked, ascending (handed over in seq order).
    in_flight: VecDeque<Seq>,
    /// Set when a read found nothing more; cleared by a wake.
    exhausted: bool,
    /// Gaps handed over with messages and not yet confirmed: the storage learns the client
    /// was told once it acks a message at or after the batch's first seq, proof the batch
    /// arrived; until then a new session reports them again. `(first seq of the batch, loss
    /// total the report covers)`.
    unconfirmed_gaps: VecDeque<(Seq, u64)>,
    /// The highest loss total this session reported, so later reads do not report it twice.
    reported_total: u64,
}

impl Session {
    pub(crate) fn new(
        inner: Arc<Inner>,
        recipient: RecipientId,
        shared: Arc<SessionShared>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            registration: Registration {
                inner,
                recipient,
                shared,
            },
            transport,
        }
    }

    /// The handle to ack and close this session.
    pub fn handle(&self) -> SessionHandle {
        SessionHandle {
            shared: self.registration.shared.clone(),
        }
    }

    /// The recipient this session serves.
    pub fn recipient(&self) -> &RecipientId {
        &self.registration.recipient
    }

    /// Drives the session until it is closed, displaced, or its transport fails.
    ///
    /// # Errors
    /// A storage error ends the session with `Err`; unacked messages stay stored, and the
    /// client may reconnect. [`Error::UnsupportedRecord`] when a stored record is compressed and
    /// this build lacks the `compression` feature: what came before it was handed over, and
    /// it stays stored for a build that can read it.
    pub async fn run(mut self) -> Result<SessionEnd> {
        let span = tracing::debug_span!("session", recipient = %self.registration.recipient, id = self.registration.shared.id);
        self.drive().instrument(span).await
    }

    async fn drive(&mut self) -> Result<SessionEnd> {
        let inner = self.registration.inner.clone();
        let recipient = self.registration.recipient.clone();
        let shared = self.registration.shared.clone();
        // Where the backlog present at connect ends, for `caught_up`; a storage whose stats do
        // not name the newest seq exactly (RabbitMQ's name only what the node holds) has none,
        // and the session is caught up when a read finds nothing more.
        let newest = inner.storage.stats(&recipient).await?.newest_seq;
        let backlog_end = inner.capabilities.exact_stats.then_some(newest);
        let mut cursor = Cursor {
            last: None,
            in_flight: VecDeque::new(),
            exhausted: false,
            unconfirmed_gaps: VecDeque::new(),
            reported_total: 0,
        };
        let mut caught_up = false;
        let mut control = shared.take();
        loop {
            // Acks go to the storage with the next read, or on their own when nothing more is
            // read now; those that arrived with a close or displacement still count.
            let mut pending = take_ack(&mut cursor, &mut control);
            if control.displaced || control.closed {
                self.send_ack(&inner, &recipient, pending).await?;
                return Ok(if control.displaced {
                    SessionEnd::Displaced
                } else {
                    SessionEnd::Closed
                });
            }
            if !control.ephemerals.is_empty() {
                // Before the hand-over: a transport that fails there must not lose the acks.
                self.send_ack(&inner, &recipient, pending.take()).await?;
            }
            for ephemeral in control.ephemerals.drain(..) {
                if let Err(closed) = self.transport.send(Outbound::Ephemeral(ephemeral)).await {
                    return Ok(SessionEnd::TransportClosed(closed.0));
                }
                metrics::add(&inner.metrics.ephemeral_delivered, 1);
            }
            if control.woken {
                cursor.exhausted = false;
            }
            while !cursor.exhausted && cursor.in_flight.len() < inner.max_in_flight {
                let ack = pending.take();
                if let Some(end) = self
                    .deliver_batch(&inner, &recipient, &mut cursor, ack)
                    .await?
                {
                    return Ok(end);
                }
                // Acks that came back while the batch went out ride with the next read.
                let (mut acks, waiting) = shared.take_acks();
                pending = take_ack(&mut cursor, &mut acks);
                if waiting {
                    break;
                }
            }
            self.send_ack(&inner, &recipient, pending).await?;
            let past_backlog = backlog_end.is_some_and(|end| cursor.last >= end);
            if !caught_up && (cursor.exhausted || past_backlog) {
                if let Err(closed) = self.transport.send(Outbound::CaughtUp).await {
                    return Ok(SessionEnd::TransportClosed(closed.0));
                }
                caught_up = true;
            }
            control = shared.next().await;
        }
    }

    /// Applies `ack` on its own, if there is one.
    async fn send_ack(
        &self,
        inner: &Inner,
        recipient: &RecipientId,
        ack: Option<Ack>,
    ) -> Result<()> {
        if let Some(ack) = ack {
            let removed = inner
                .storage
                .ack(recipient, &ack, inner.clock.now())
                .await?;
            metrics::add(&inner.metrics.acked, removed);
        }
        Ok(())
    }

    /// Reads and hands over one batch. `Some` ends the session.
    async fn deliver_batch(
        &self,
        inner: &Inner,
        recipient: &RecipientId,
        cursor: &mut Cursor,
        ack: Option<Ack>,
    ) -> Result<Option<SessionEnd>> {
        let now = inner.clock.now();
        let room = inner.max_in_flight - cursor.in_flight.len();
        let limit = BatchLimit {
            max_messages: inner.batch.max_messages.min(room),
            max_bytes: inner.batch.max_bytes,
        };
        // Marked delivered as read, before the hand-over, so a crash counts a redelivery.
        // Records passed over below are counted too, and removed right after.
        let DeliveryRead { acked, batch: read } = inner
            .storage
            .read_for_delivery(recipient, ack.as_ref(), cursor.last, limit, now)
            .await?;
        metrics::add(&inner.metrics.acked, acked);
        // Losses are counted by a total that only grows: report what lies beyond both the
        // confirmed mark and what this session already reported (awaiting confirmation).
        let confirmed = read.lost_total.saturating_sub(read.lost_unconfirmed);
        let lost_before = read
            .lost_total
            .saturating_sub(confirmed.max(cursor.reported_total));
        if read.records.is_empty()
            && read.expired.is_empty()
            && read.damaged.is_empty()
            && lost_before == 0
        {
            cursor.exhausted = true;
            return Ok(None);
        }
        // Not delivered, removed now, counted as lost by the storage and reported in this
        // batch's gap: expired and damaged records, ones that fail to decode, and dead letters
        // (also handed to the hook). The client is short of each, so it is told.
        let mut passed_over = read.expired.clone();
        passed_over.extend(&read.damaged);

        let mut dead_letters = Vec::new();
        metrics::add(&inner.metrics.corrupt, read.damaged.len() as u64);
        let mut deliver = Vec::with_capacity(read.records.len());
        // A record this build cannot read (not damage): kept, never a dead letter. What came
        // before it is handed over (the read counted it delivered), then the session ends.
        let mut unreadable = None;
        for record in read.records {
            let seq = record.seq;
            let dead = record.delivery_count >= inner.max_deliveries;
            let result = inner.to_delivery(record, now, !dead);
            if let Err(error @ Error::UnsupportedRecord { .. }) = result {
                tracing::error!(%recipient, %seq, %error, "stored record unreadable by this build; kept");
                unreadable = Some(error);
                break;
            }
            cursor.last = cursor.last.max(Some(seq));
            match result {
                result if dead => {
                    passed_over.push(seq);
                    dead_letters.push((seq, result));
                }
                Ok(delivery) => deliver.push(delivery),
                Err(error) => {
                    tracing::error!(%recipient, %seq, %error, "stored record does not decode; reported as a gap");
                    metrics::add(&inner.metrics.corrupt, 1);
                    passed_over.push(seq);
                }
            }
        }
        cursor.last = cursor.last.max(passed_over.iter().max().copied());
        let passed_over_count = passed_over.len() as u64;
        metrics::add(&inner.metrics.expired, read.expired.len() as u64);
        // Handed to the hook before they are removed: a removal that fails after its write (or
        // a crash after it) must not lose a message the hook never saw. A removal that did not
        // happen hands the same message (same id) over again at the next read: at least once.
        for (seq, delivery) in dead_letters {
            metrics::add(&inner.metrics.dead_lettered, 1);
            match (delivery, &inner.dead_letter) {
                (Ok(delivery), Some(hook)) => hook(recipient, delivery),
                (Ok(delivery), None) => {
                    tracing::warn!(%recipient, id = %delivery.id, %seq, "dead letter removed after max_deliveries")
                }
                (Err(error), _) => {
                    tracing::warn!(%recipient, %seq, %error, "undecodable dead letter removed")
                }
            }
        }
        if !passed_over.is_empty() {
            let ack = Ack {
                passed_over,
                ..Ack::default()
            };
            inner.storage.ack(recipient, &ack, now).await?;
        }
        let gap = lost_before + passed_over_count;
        // The passed-over records were just added to the total (by us, or by a purge that got
        // there first): this report covers the total up to here.
        let covers = read.lost_total + passed_over_count;
        let seqs: Vec<Seq> = deliver.iter().map(|d| d.seq).collect();
        if seqs.is_empty() && gap == 0 {
            return unreadable.map_or(Ok(None), Err);
        }
        let redelivered = deliver.iter().filter(|d| d.redelivered).count() as u64;
        let position = cursor.last.unwrap_or(Seq(0));
        let batch = Batch {
            messages: deliver,
            gap,
            position,
        };
        if let Err(closed) = self.transport.send(Outbound::Batch(batch)).await {
            return Ok(Some(SessionEnd::TransportClosed(closed.0)));
        }
        metrics::add(&inner.metrics.delivered, seqs.len() as u64);
        metrics::add(&inner.metrics.redelivered, redelivered);
        if gap > 0 {
            // Confirmed when the client acks a message of this batch or a later one: proof it
            // arrived. A batch without messages shares its position with the batch before it,
            // so only an ack of a later message can prove it arrived; until then it is
            // reported again (over-counting, never under-counting).
            let first = seqs
                .first()
                .copied()
                .unwrap_or(Seq(position.0.saturating_add(1)));
            cursor.unconfirmed_gaps.push_back((first, covers));
            cursor.reported_total = covers;
        }
        cursor.in_flight.extend(seqs);
        unreadable.map_or(Ok(None), Err)
    }
}

/// Takes the acks in `control` against the cursor (clamped to what this session handed over,
/// confirming the gaps they prove arrived): what to tell the storage, if anything.
fn take_ack(cursor: &mut Cursor, control: &mut Control) -> Option<Ack> {
    let requested = control.ack_through.take();
    // Clamped: nothing beyond what was handed over can be acked.
    let through = requested.and_then(|seq| Some(seq.min(cursor.last?)));
    let mut ack = Ack::default();
    if let Some(through) = through {
        while cursor.in_flight.front().is_some_and(|&seq| seq <= through) {
            cursor.in_flight.pop_front();
        }
        ack.through = Some(through);
    }
    for seq in control.ack_seqs.drain(..) {
        if let Ok(index) = cursor.in_flight.binary_search(&seq) {
            cursor.in_flight.remove(index);
            ack.seqs.push(seq);
        }
    }
    // A gap-only batch before any record was read sits at position 0.
    let confirms = requested.map(|seq| seq.min(cursor.last.unwrap_or(Seq(0))));
    let highest = ack.seqs.iter().copied().chain(confirms).max()?;
    // An ack proves every batch up to it arrived (one connection delivers in order), and
    // with it the gaps those batches reported.
    while let Some(&(first, through)) = cursor.unconfirmed_gaps.front() {
        if first > highest {
            break;
        }
        cursor.unconfirmed_gaps.pop_front();
        ack.lost_confirmed_through = ack.lost_confirmed_through.max(Some(through));
    }
    Some(ack)
}
