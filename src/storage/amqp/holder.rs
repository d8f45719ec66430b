//! What one node holds of one recipient's queue: the records it took with `basic.get` and has
//! not acked, on a channel of its own, in seq order. Reads are served from here and extended
//! from the broker, so a read does not take a record from the queue for good: the same node
//! reads it again until it is acked, and the broker hands it to another node (marked
//! redelivered) once this node lets go (`release`, the channel closed).
//!
//! On a quorum queue each `basic.get` is a command through the queue's Raft log, answered one
//! at a time, so a holder there takes a batch with a short-lived consumer instead (see
//! [`Holder::consume`]). Either way, "nothing more is ready" is only ever decided by an empty
//! `basic.get` on the holder's channel: the broker orders it after everything the channel did
//! before, including records a cancelled consumer handed back.
//!
//! Seqs: a record is held at its stamp unless that is at or below the last seq handed out
//! here or the ledger's floor (then just above them), or the ledger pins it (then at its
//! pin). A holder reads the ledger before each take until it has taken a record, and writes
//! it before it hands out a seq the ledger could not tell the next reader (a renumbered
//! record), and before an ack that moves the floor or removes a pinned record. See
//! `ledger.rs`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::clock::Timestamp;
use crate::error::Result;
use crate::limits::BatchLimit;
use crate::message::{MessageId, RecipientId, Seq};
use crate::storage::{Ack, ReadBatch, StoredRecord};

use super::errors::broker_error;
use super::ledger::{Ledger, LedgerQueue, PinKey};
use super::record::{self, Decoded};

/// The most `basic.get`s sent at once.
const MAX_BURST: usize = 100;
/// The most records a take-over gathers to put handed-back records in order.
const MAX_TAKE_OVER: usize = 5_000;
/// The burst for fetching up to a seq (an ack or a mark naming records not read yet).
const THROUGH_BURST: usize = 16;

/// One record held: its delivery tag on the holder's channel, and what it was read as.
struct Held {
    seq: u64,
    /// The seq its sending node stamped; `seq` differs when this node renumbered it.
    stamp: u64,
    /// The seq the ledger pinned it at, if it did.
    pin: Option<u64>,
    tag: u64,
    deliveries: u32,
    /// `None`: the body is not a record of ours (damaged); reported, never delivered.
    record: Option<HeldRecord>,
}

struct HeldRecord {
    id: MessageId,
    sent_at: Timestamp,
    expires_at: Option<Timestamp>,
    body: Bytes,
}

/// A recipient's held records on this node.
pub(super) struct Holder {
    channel: Channel,
    queue: String,
    recipient: RecipientId,
    /// Take batches with a consumer (quorum queues) rather than a burst of gets, waiting this
    /// long for the deliveries the broker said were ready ([`AmqpOptions::consumer_wait`]).
    ///
    /// [`AmqpOptions::consumer_wait`]: super::AmqpOptions::consumer_wait
    consumer_wait: Option<Duration>,
    held: VecDeque<Held>,
    /// The highest delivery tag seen on the channel: a tag beyond the next one means the
    /// broker delivered a record this holder never saw, which is handed back at once.
    last_tag: u64,
    /// The consumer prefetch last set on the channel (`basic.qos`), so it is sent on change only.
    prefetch: Option<u16>,
    /// Consumers opened on the channel so far, for the next one's tag.
    consumers: u64,
    /// The highest seq handed out here: a record that arrives with a lower stamp (sent by
    /// another node whose publish overtook it, or whose clock is behind) is renumbered
    /// above it, so seqs increase.
    last_seq: Option<u64>,
    ledger_queue: LedgerQueue,
    /// The highest seq removed from the queue, by this node or by those before it.
    floor: u64,
    /// The ledger's pins of records not held here yet.
    unheld_pins: HashMap<PinKey, u64>,
    /// A record is held at a seq the ledger does not say yet, or the floor moved.
    ledger_dirty: bool,
    /// The first take is done (see [`Holder::take_over`]).
    taken_over: bool,
    /// How many records the broker last said were ready behind the one it handed over
    /// (`message-count` of a get), less what was taken since: a burst asks for no more, a
    /// consumer prefetches that many.
    ready_hint: usize,
    /// The last read, mark or ack: `purge` releases holders idle past `hold_idle`.
    pub(super) last_used: Instant,
}

impl Holder {
    pub(super) fn new(
        channel: Channel,
        queue: String,
        ledger_queue: LedgerQueue,
        recipient: RecipientId,
        consumer_wait: Option<Duration>,
    ) -> Self {
        Self {
            channel,
            queue,
            recipient,
            consumer_wait,
            held: VecDeque::new(),
            last_tag: 0,
            prefetch: None,
            consumers: 0,
            last_seq: None,
            ledger_queue,
            floor: 0,
            unheld_pins: HashMap::new(),
            ledger_dirty: false,
            taken_over: false,
            // A consumer's prefetch trusts the hint, so it starts from a get's count.
            ready_hint: if consumer_wait.is_some() {
                0
            } else {
                MAX_BURST
            },
            last_used: Instant::now(),
        }
    }

    /// True while the channel is open; a holder whose channel closed holds nothing any more
    /// (the broker took the records back).
    pub(super) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Hands every held record back to the broker, marked redelivered; true if it held any.
    /// A classic queue puts them back where they were. A quorum queue puts back what each
    /// consumer took, consumer by consumer in the order of their keys (while the queue has
    /// up to 32 consumers; past that, in no set order): the batch consumers' shares in the
    /// order taken, but each record a `basic.get` took (a consumer of its own there, keyed by
    /// its delivery tag, which sorts first) ahead of them all. The next reader may then get
    /// them in another order; on a quorum queue it puts them back in order when it takes the
    /// queue over ([`Holder::take_over`]). Handing them back one `basic.nack` at a
    /// time, oldest first, was tried: RabbitMQ 3.10 reordered them too.
    pub(super) async fn release(self) -> bool {
        // Closing can only fail if the channel is gone already, which hands them back too.
        let _ = self.channel.close(200, "released".into()).await;
        !self.held.is_empty()
    }

    /// Records held, and their body bytes.
    pub(super) fn held(&self) -> (u64, u64, Option<Timestamp>, Option<Seq>) {
        let bytes = self
            .held
            .iter()
            .filter_map(|h| h.record.as_ref())
            .map(|r| r.body.len() as u64)
            .sum();
        let oldest = self
            .held
            .iter()
            .filter_map(|h| h.record.as_ref())
            .map(|r| r.sent_at)
            .min();
        let newest = self.held.back().map(|h| Seq(h.seq));
        (self.held.len() as u64, bytes, oldest, newest)
    }

    /// Takes up to `count` more records from the queue (at most a burst); false if none was
    /// ready. The ledger is read first, and written after if what was taken needs it.
    async fn fetch(&mut self, count: usize) -> Result<bool> {
        if self.last_seq.is_none() {
            // Until it takes a record, a holder reads the ledger before each take: another
            // node may still hold records, and ack or renumber some, before it lets go.
            self.load_ledger().await?;
        }
        let got = if self.taken_over {
            self.take(count).await?
        } else {
            self.take_over(count).await?
        };
        if self.ledger_dirty {
            self.write_ledger().await?;
        }
        Ok(got)
    }

    /// The first take. A quorum queue serves the records handed back before the rest, but in
    /// the order they came back, and a record handed back a second time comes back behind
    /// those handed back once (a session that read part of a returned backlog, then moved).
    /// So on a quorum queue this takes every handed-back record (up to the first never
    /// delivered, or the end), and puts them back in the order they were handed out: by the
    /// seq each had, which is its pin if the ledger has one, else its stamp (an unpinned
    /// record is handed out at its stamp). Then it numbers them all.
    ///
    /// It is the first take that finds a record: a read that finds the queue empty (another
    /// node still holds its records) leaves it for the next.
    async fn take_over(&mut self, count: usize) -> Result<bool> {
        let got = self.take(count).await?;
        self.taken_over = got;
        if self.consumer_wait.is_none() || !got {
            return Ok(got);
        }
        // Bounded, so a take-over fits in `operation_timeout`; past it, records handed back
        // out of order are renumbered.
        while self.held.back().is_some_and(|h| h.deliveries > 0) && self.held.len() < MAX_TAKE_OVER
        {
            if !self.take(MAX_BURST).await? {
                break;
            }
        }
        let mut held: Vec<Held> = std::mem::take(&mut self.held).into();
        let returned = held.iter().take_while(|h| h.deliveries > 0).count();
        // Damaged records (no stamp to sort by) go after the rest of the run.
        held[..returned].sort_by_key(|h| (h.record.is_none(), h.pin.unwrap_or(h.stamp)));
        self.last_seq = None;
        self.ledger_dirty = false;
        for h in &mut held {
            h.seq = self.number(h.stamp, h.pin, h.record.is_some());
        }
        self.held = held.into();
        Ok(true)
    }

    /// The seq for a record stamped `stamp` that the ledger pinned at `pin` (if it did),
    /// taken after every record held: its pin while seqs still increase (a pin at or below
    /// the floor is a record handed out before a later one was acked), else its stamp or,
    /// when that is not above the floor and the last seq, just above them. A record numbered
    /// other than the ledger says (`pinnable`: one with an id) makes the ledger due.
    fn number(&mut self, stamp: u64, pin: Option<u64>, pinnable: bool) -> u64 {
        let above = self
            .last_seq
            .map_or(self.floor, |last| last.max(self.floor))
            + 1;
        let seq = match pin {
            Some(pin) if self.last_seq.is_none_or(|last| pin > last) => pin,
            _ => stamp.max(above),
        };
        if pinnable && pin.map_or(seq != stamp, |pin| pin != seq) {
            self.ledger_dirty = true;
        }
        self.last_seq = Some(seq);
        seq
    }

    /// Reads the ledger.
    async fn load_ledger(&mut self) -> Result<()> {
        let (ledger, tag) = self.ledger_queue.load(&self.channel).await?;
        // The ledger's get used a delivery tag: the next record's is one more.
        if let Some(tag) = tag {
            self.last_tag = self.last_tag.max(tag);
        }
        self.floor = self.floor.max(ledger.floor);
        self.unheld_pins = ledger.pins;
        Ok(())
    }

    /// Writes the floor, and a pin for every record still in the queue whose seq the next
    /// reader could not work out from its stamp and the floor.
    async fn write_ledger(&mut self) -> Result<()> {
        // A pin at or below the last seq handed out here can never be kept (seqs go up):
        // its record is gone, or will be numbered anew.
        let last = self.last_seq;
        self.unheld_pins
            .retain(|_, pin| last.is_none_or(|last| *pin > last));
        let mut pins = self.unheld_pins.clone();
        for held in &self.held {
            if let Some(record) = &held.record
                && self.needs_pin(held)
            {
                pins.insert((record.id, held.stamp), held.seq);
            }
        }
        let ledger = Ledger {
            floor: self.floor,
            pins,
        };
        self.ledger_queue.write(&self.channel, &ledger).await?;
        self.ledger_dirty = false;
        Ok(())
    }

    /// Whether the next reader needs a pin to give `held` the seq it has here.
    fn needs_pin(&self, held: &Held) -> bool {
        held.seq != held.stamp || held.seq <= self.floor
    }

    /// Takes up to `count` more records from the queue (at most a burst); false if none was
    /// ready.
    async fn take(&mut self, count: usize) -> Result<bool> {
        let wanted = count.clamp(1, MAX_BURST);
        if let Some(wait) = self.consumer_wait {
            // A consumer for as many as the broker last said were ready, less those taken
            // since. When that is none: holding nothing, a get (a record, and how many are
            // behind it); holding records, the queue's count first, because a record a get
            // takes comes back ahead of them all at a hand-back (see `release`). A get also
            // decides that nothing is ready, and follows a consumer that came up short.
            let mut short = false;
            loop {
                let mut got = 0;
                if self.ready_hint == 0 {
                    let count = if self.held.is_empty() || short {
                        0
                    } else {
                        // A hint, not ordered with what the channel hands back.
                        super::ready_count(&self.channel, &self.queue)
                            .await
                            .map_err(|e| broker_error(e, "queue.declare passive"))?
                            as usize
                    };
                    if count > 0 {
                        self.ready_hint = count;
                    } else {
                        got = self.burst(1).await?;
                        if got == 0 {
                            return Ok(false);
                        }
                    }
                }
                let more = (wanted - got).min(self.ready_hint);
                if more > 0 {
                    let taken = self.consume(more, wait).await?;
                    // Fewer than promised: the count is stale, ask the broker again.
                    short = taken < more;
                    self.ready_hint = if short {
                        0
                    } else {
                        self.ready_hint - taken.min(self.ready_hint)
                    };
                    got += taken;
                }
                if got > 0 {
                    return Ok(true);
                }
            }
        }
        // As many gets as the broker last said were ready (a lone one when none were, to see
        // whether any came since); when that lone get finds more, a second burst for them.
        let first = wanted.min(self.ready_hint.max(1));
        let got = self.burst(first).await?;
        if got == first && first < wanted && self.ready_hint > 0 {
            let second = (wanted - first).min(self.ready_hint);
            self.burst(second).await?;
        }
        Ok(got > 0)
    }

    /// Sends `gets` gets at once (the broker answers them in order, so a burst costs about one
    /// round trip) and holds what they return; returns how many did.
    async fn burst(&mut self, gets: usize) -> Result<usize> {
        let queue: lapin::types::ShortString = self.queue.as_str().into();
        let gets = (0..gets).map(|_| {
            self.channel
                .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
        });
        let mut got = 0;
        let mut empty = false;
        // Every record a get returned is held (unacked on this channel), even past an empty
        // answer: a record can arrive between two gets.
        for answer in futures::future::join_all(gets).await {
            match answer.map_err(|e| broker_error(e, "basic.get"))? {
                Some(message) => {
                    got += 1;
                    self.ready_hint = message.message_count as usize;
                    self.hold(message.delivery).await?;
                }
                None => empty = true,
            }
        }
        if empty && got == 0 {
            self.ready_hint = 0;
        }
        Ok(got)
    }

    /// Takes up to `count` records with a consumer whose prefetch is `count`, then cancels
    /// it. Deliveries that reached this client before the cancel's answer are in the
    /// consumer's stream ahead of its end, and are held; a quorum queue hands back any that
    /// were still on their way to the channel, and the next `basic.get` sees them.
    async fn consume(&mut self, count: usize, wait: Duration) -> Result<usize> {
        let prefetch = u16::try_from(count).unwrap_or(u16::MAX);
        if self.prefetch != Some(prefetch) {
            self.channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| broker_error(e, "basic.qos"))?;
            self.prefetch = Some(prefetch);
        }
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                // Tags that sort in the order the consumers were opened: when the channel
                // closes, a quorum queue hands back each consumer's share in the order of
                // their tags (for a queue with up to 32 consumers), so they come back in
                // the order taken. A tag is never used again on a channel: RabbitMQ 3.10
                // fails the channel when a consumer that still holds records comes back.
                format!("oq.{:020}", self.consumers).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(e, "basic.consume"))?;
        self.consumers += 1;
        let deadline = tokio::time::Instant::now() + wait;
        let mut taken = 0;
        let mut ended = false;
        while taken < count {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => {
                    self.hold(delivery.map_err(|e| broker_error(e, "basic.deliver"))?)
                        .await?;
                    taken += 1;
                }
                // The broker cancelled it (the queue was deleted).
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if !ended {
            self.channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| broker_error(e, "basic.cancel"))?;
            while let Some(delivery) = consumer.next().await {
                self.hold(delivery.map_err(|e| broker_error(e, "basic.deliver"))?)
                    .await?;
                taken += 1;
            }
        }
        Ok(taken)
    }

    async fn hold(&mut self, delivery: lapin::message::Delivery) -> Result<()> {
        // Tags on a channel count up by one per delivery: one skipped was delivered to a
        // consumer this client had already let go of, and nobody would ever ack it.
        for skipped in self.last_tag + 1..delivery.delivery_tag {
            let hand_back = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            self.channel
                .basic_nack(skipped, hand_back)
                .await
                .map_err(|e| broker_error(e, "basic.nack"))?;
        }
        self.last_tag = self.last_tag.max(delivery.delivery_tag);
        let earlier = deliveries_before(&delivery.properties, delivery.redelivered);
        let decoded = record::decode(&delivery.properties, delivery.data, &self.recipient);
        let stamp = decoded.as_ref().map_or(0, |d| d.seq);
        let pin = decoded
            .as_ref()
            .and_then(|d| self.unheld_pins.remove(&(d.id, d.seq)));
        let seq = self.number(stamp, pin, decoded.is_some());
        self.held.push_back(Held {
            seq,
            stamp,
            pin,
            tag: delivery.delivery_tag,
            deliveries: earlier,
            record: decoded.map(
                |Decoded {
                     id,
                     sent_at,
                     expires_at,
                     body,
                     ..
                 }| HeldRecord {
                    id,
                    sent_at,
                    expires_at,
                    body,
                },
            ),
        });
        Ok(())
    }

    /// Fetches until a record above `seq` is held or the queue has nothing ready.
    async fn fetch_through(&mut self, seq: u64) -> Result<()> {
        while self.last_seq.is_none_or(|last| last < seq) {
            if !self.fetch(THROUGH_BURST).await? {
                break;
            }
        }
        Ok(())
    }

    fn position(&self, seq: u64) -> Option<usize> {
        self.held.binary_search_by_key(&seq, |h| h.seq).ok()
    }

    /// Reads as [`Storage::read`](crate::Storage::read) does, counting one delivery for each
    /// record returned when `count` is set.
    pub(super) async fn read(
        &mut self,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        count: bool,
    ) -> Result<ReadBatch> {
        self.last_used = Instant::now();
        let mut batch = ReadBatch::default();
        if limit.max_messages == 0 {
            return Ok(batch);
        }
        let mut index = match after {
            Some(after) => self.held.partition_point(|h| h.seq <= after.0),
            None => 0,
        };
        let mut bytes = 0usize;
        loop {
            if index == self.held.len() {
                // A full batch still reports the expired records held right after it (as
                // every backend does), but takes no more from the queue to look for them:
                // what this node takes, no other node can read until it lets go.
                let wanted = limit.max_messages - batch.records.len();
                if wanted == 0 || !self.fetch(wanted).await? {
                    break;
                }
            }
            let held = &mut self.held[index];
            let Some(record) = &held.record else {
                batch.damaged.push(Seq(held.seq));
                index += 1;
                continue;
            };
            if record.expires_at.is_some_and(|at| at <= now) {
                batch.expired.push(Seq(held.seq));
                index += 1;
                if batch.expired.len() >= limit.max_messages {
                    break;
                }
                continue;
            }
            let len = record.body.len();
            if batch.records.len() >= limit.max_messages
                || (!batch.records.is_empty() && bytes.saturating_add(len) > limit.max_bytes)
            {
                break;
            }
            bytes = bytes.saturating_add(len);
            batch.records.push(StoredRecord {
                seq: Seq(held.seq),
                id: record.id,
                sent_at: record.sent_at,
                expires_at: record.expires_at,
                delivery_count: held.deliveries,
                body: record.body.clone(),
            });
            if count {
                held.deliveries = held.deliveries.saturating_add(1);
            }
            index += 1;
        }
        Ok(batch)
    }

    /// Counts one more delivery for each listed record (fetching up to them).
    pub(super) async fn mark_delivered(&mut self, seqs: &[Seq]) -> Result<()> {
        self.last_used = Instant::now();
        if let Some(max) = seqs.iter().max() {
            self.fetch_through(max.0).await?;
        }
        for seq in seqs {
            if let Some(at) = self.position(seq.0) {
                self.held[at].deliveries = self.held[at].deliveries.saturating_add(1);
            }
        }
        Ok(())
    }

    /// Acks as [`Storage::ack`](crate::Storage::ack) does: the records named are acked to the
    /// broker (gone for good); passed-over ones are rejected without requeueing.
    pub(super) async fn ack(&mut self, ack: &Ack) -> Result<u64> {
        self.last_used = Instant::now();
        let highest = ack
            .through
            .iter()
            .chain(&ack.seqs)
            .chain(&ack.passed_over)
            .max();
        let Some(highest) = highest else {
            return Ok(0);
        };
        self.fetch_through(highest.0).await?;
        // What goes is settled here first, then the ledger with its new floor is written,
        // then the broker is told: it gets the floor before the acks on the same channel.
        let mut acks = Vec::new();
        let mut rejects = Vec::new();
        let mut top = None;
        let mut removed = 0;
        // A record going that the ledger pins: the pin goes too.
        let mut unpinned = false;
        if let Some(through) = ack.through {
            let count = self.held.partition_point(|h| h.seq <= through.0);
            if count > 0 {
                // Tags grow with seqs, so one multiple ack settles exactly these; unless a
                // take-over put handed-back records in order (then one ack each).
                let tags = || self.held.iter().take(count).map(|h| h.tag);
                let highest = tags().max().expect("count > 0");
                if self.held.iter().skip(count).all(|h| h.tag > highest) {
                    acks.push((highest, true));
                } else {
                    acks.extend(tags().map(|tag| (tag, false)));
                }
                top = top.max(Some(self.held[count - 1].seq));
                unpinned |= self.held.iter().take(count).any(|h| self.needs_pin(h));
                self.held.drain(..count);
                removed += count as u64;
            }
        }
        for seq in &ack.seqs {
            if let Some(at) = self.position(seq.0) {
                acks.push((self.held[at].tag, false));
                top = top.max(Some(seq.0));
                unpinned |= self.needs_pin(&self.held[at]);
                self.held.remove(at);
                removed += 1;
            }
        }
        for seq in &ack.passed_over {
            if let Some(at) = self.position(seq.0) {
                rejects.push(self.held[at].tag);
                top = top.max(Some(seq.0));
                unpinned |= self.needs_pin(&self.held[at]);
                self.held.remove(at);
            }
        }
        if let Some(top) = top
            && top > self.floor
        {
            self.floor = top;
            self.ledger_dirty = true;
        }
        self.ledger_dirty |= unpinned;
        if self.ledger_dirty {
            self.write_ledger().await?;
        }
        for (tag, multiple) in acks {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .await
                .map_err(|e| broker_error(e, "basic.ack"))?;
        }
        for tag in rejects {
            let reject = BasicNackOptions {
                multiple: false,
                requeue: false,
            };
            self.channel
                .basic_nack(tag, reject)
                .await
                .map_err(|e| broker_error(e, "basic.nack"))?;
        }
        Ok(removed)
    }
}

/// Deliveries a record had before this `basic.get`: a quorum queue counts the times it was
/// handed back in `x-delivery-count`; a classic queue only says whether it was.
fn deliveries_before(properties: &BasicProperties, redelivered: bool) -> u32 {
    let counted = properties.headers().as_ref().and_then(|headers| {
        match headers.inner().get("x-delivery-count")? {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            _ => None,
        }
    });
    counted.unwrap_or(u32::from(redelivered))
}
