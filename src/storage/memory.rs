//! [`MemoryStorage`]: the reference backend, in RAM (lost when the process ends).
//!
//! Layout, per shard (recipients are spread over shards by hash, so appends for different
//! recipients rarely contend for one lock):
//! - `queues`: one `RecipientQueue` per recipient with anything stored, in a slab addressed by
//!   a `u32` slot so the indexes below stay small. A queue holds its records in a `VecDeque` in
//!   seq order; a selective ack leaves a tombstone that is popped once it reaches the front.
//! - `expiry`: one entry per queue, `(earliest deadline, slot)`. Purging pops queues whose
//!   earliest deadline has passed and removes their expired records, so its cost follows what it
//!   removes, not what is stored. Deadlines within a queue are usually non-decreasing (most
//!   messages use the default TTL), so a queue keeps only the exceptions, records whose deadline
//!   arrived earlier than one it already held, in a small ordered set; the rest stay in deadline
//!   order in the queue itself, and the expired ones are a prefix of them.
//! - `idle`: `(last append or ack, slot)`, so idle queues are found the same way.
//! - `dedup`: sender-chosen ids seen within the window, with a time-ordered list to prune them.
//!
//! Seqs come from a per-shard counter, so a queue that empties and is removed (leaving no entry
//! behind) still never reuses a seq its recipient may have seen.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{
    Ack, AppendOneOutcome, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord,
    PurgeOutcome, ReadBatch, RecipientStats, Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::limits::{Admission, BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, RecipientMap, Seq};

/// Deadline value meaning "never expires".
const NEVER: u64 = u64::MAX;

/// In-memory storage, sharded by recipient. Cheap to create; share it with `Arc`.
pub struct MemoryStorage {
    shards: Box<[Mutex<Shard>]>,
    total_bytes: AtomicU64,
    next_purge_shard: AtomicUsize,
}

impl std::fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("shards", &self.shards.len())
            .field("total_bytes", &self.total_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStorage {
    /// A store with 16 shards.
    pub fn new() -> Self {
        Self::with_shards(16)
    }

    /// A store with `shards` shards (at least one).
    pub fn with_shards(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            total_bytes: AtomicU64::new(0),
            next_purge_shard: AtomicUsize::new(0),
        }
    }

    /// Record bytes stored across all recipients.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Recipients with an entry (a non-empty queue, or an unreported loss).
    pub fn recipient_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().by_id.len()).sum()
    }

    fn shard(&self, recipient: &RecipientId) -> &Mutex<Shard> {
        // Scaled into range by a multiply, not a division (which cost more than the lock).
        // Bits 16..48: clear of the map's bucket bits and of its 7-bit tag (the top bits).
        let hash = u64::from((recipient.precomputed_hash() >> 16) as u32);
        &self.shards[((hash * self.shards.len() as u64) >> 32) as usize]
    }

    /// [`Storage::read`], counting a delivery for each record returned when `mark` is set
    /// (the records carry their count from before).
    fn read_marking(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> ReadBatch {
        let now = now.as_millis();
        let mut shard = self.shard(recipient).lock();
        let Some(slot) = shard.slot_of(recipient) else {
            return ReadBatch::default();
        };
        let queue = &mut shard.queues[slot as usize];
        let start = after.map_or(0, |after| {
            queue.records.partition_point(|r| r.seq <= after.0)
        });
        let mut batch = ReadBatch {
            records: Vec::with_capacity(limit.max_messages.min(queue.live as usize)),
            lost_unconfirmed: queue.lost_total - queue.lost_confirmed,
            lost_total: queue.lost_total,
            ..ReadBatch::default()
        };
        let mut bytes = 0usize;
        for record in queue.records.range_mut(start..).filter(|r| !r.removed) {
            if record.expires_at <= now {
                batch.expired.push(Seq(record.seq));
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
            batch.records.push(StoredRecord {
                seq: Seq(record.seq),
                id: record.id,
                sent_at: Timestamp::from_millis(record.sent_at),
                expires_at: (record.expires_at != NEVER)
                    .then(|| Timestamp::from_millis(record.expires_at)),
                delivery_count: record.delivery_count,
                body: record.body.clone(),
            });
            if mark {
                record.delivery_count = record.delivery_count.saturating_add(1);
            }
        }
        batch
    }

    /// The append behind `append` and `append_one`: `records` is a vector or a one-record
    /// array, and each record's outcome goes to `outcome`, in input order. Returns the records
    /// dropped to make room and the queue's length after.
    fn append_records<R>(
        &self,
        recipient: &RecipientId,
        records: R,
        quota: &Quota,
        now: Timestamp,
        mut outcome: impl FnMut(Appended),
    ) -> Result<(u64, u64)>
    where
        R: AsRef<[NewRecord]> + IntoIterator<Item = NewRecord>,
    {
        let now = now.as_millis();
        let mut shard = self.shard(recipient).lock();
        let shard = &mut *shard;
        shard.prune_dedup(now, quota.dedup_window_ms());

        // Plan without writing: which records are new, and what they cost.
        enum Plan {
            New(usize),
            Dup(Seq),
            DupOfNew(usize),
        }
        // Without sender-chosen ids every record is new: no plan to allocate.
        let mut plan = records
            .as_ref()
            .iter()
            .any(|r| r.dedup)
            .then(|| Vec::with_capacity(records.as_ref().len()));
        let mut batch_ids: HashMap<MessageId, usize> = HashMap::new();
        let (mut adding, mut adding_bytes) = (0u64, 0u64);
        for record in records.as_ref() {
            if let Some(plan) = plan.as_mut()
                && record.dedup
            {
                // Pruning stops at the first entry inside the window, and entries are not
                // strictly in time order (a clock step back): check the age here too.
                if let Some(&(seq, at)) = shard
                    .dedup
                    .get(recipient)
                    .and_then(|ids| ids.get(&record.id))
                    && now.saturating_sub(at) < quota.dedup_window_ms()
                {
                    plan.push(Plan::Dup(seq));
                    continue;
                }
                if let Some(&index) = batch_ids.get(&record.id) {
                    plan.push(Plan::DupOfNew(index));
                    continue;
                }
                batch_ids.insert(record.id, adding as usize);
            }
            if let Some(plan) = plan.as_mut() {
                plan.push(Plan::New(adding as usize));
            }
            adding += 1;
            adding_bytes += record.body.len() as u64;
        }

        let slot = shard.slot_of(recipient);
        let (live, bytes) = slot.map_or((0, 0), |s| {
            let q = &shard.queues[s as usize];
            (q.live, q.bytes)
        });
        let mut drop_count = 0usize;
        let mut drop_bytes = 0u64;
        if quota.admit(live, bytes, adding, adding_bytes)? == Admission::DropOldestFirst {
            let queue = &shard.queues[slot.expect("a full queue exists") as usize];
            let (mut keep, mut keep_bytes) = (live, bytes);
            for record in queue.records.iter().filter(|r| !r.removed) {
                if quota.fits(keep, keep_bytes, adding, adding_bytes) {
                    break;
                }
                keep -= 1;
                keep_bytes -= record.body.len() as u64;
                drop_count += 1;
                drop_bytes += record.body.len() as u64;
            }
        }
        if adding_bytes > drop_bytes {
            self.reserve(adding_bytes - drop_bytes, quota.max_total_bytes)?;
        } else {
            self.release(drop_bytes - adding_bytes);
        }

        // Write.
        if adding == 0 {
            for p in plan.unwrap_or_default() {
                match p {
                    Plan::Dup(seq) => outcome(Appended::Duplicate(seq)),
                    Plan::New(_) | Plan::DupOfNew(_) => unreachable!("nothing new to store"),
                }
            }
            return Ok((0, live));
        }
        let slot = match slot {
            Some(slot) => slot,
            None => shard.insert_slot(recipient),
        };
        let window_ms = quota.dedup_window_ms();
        let queue = &mut shard.queues[slot as usize];
        for _ in 0..drop_count {
            let index = queue
                .records
                .iter()
                .position(|r| !r.removed)
                .expect("planned drops exist");
            queue.remove_at(index);
        }
        queue.lost_total += drop_count as u64;
        let mut dedup_new = Vec::new();
        // New records take consecutive seqs from here.
        let first_seq = shard.next_seq + 1;
        for (index, record) in records.into_iter().enumerate() {
            if plan
                .as_ref()
                .is_some_and(|plan| !matches!(plan[index], Plan::New(_)))
            {
                continue;
            }
            shard.next_seq += 1;
            let seq = shard.next_seq;
            if record.dedup && window_ms > 0 {
                dedup_new.push((record.id, Seq(seq)));
            }
            shard.queues[slot as usize].push(Record {
                seq,
                sent_at: record.sent_at.as_millis(),
                expires_at: record.expires_at.map_or(NEVER, Timestamp::as_millis),
                id: record.id,
                delivery_count: 0,
                removed: false,
                out_of_order: false,
                // Boxed first: a body with spare capacity (compressed, or a reused buffer) would
                // otherwise hold memory its byte count does not show.
                body: Bytes::from(record.body.into_boxed_slice()),
            });
        }
        for (id, seq) in dedup_new {
            shard
                .dedup
                .entry(recipient.clone())
                .or_default()
                .insert(id, (seq, now));
            shard.dedup_order.push_back((now, recipient.clone(), id));
        }
        let pending = shard.queues[slot as usize].live;
        shard.settle(slot, Some(now));
        match plan {
            None => (0..adding).for_each(|i| outcome(Appended::Stored(Seq(first_seq + i)))),
            Some(plan) => plan.into_iter().for_each(|p| {
                outcome(match p {
                    Plan::New(i) => Appended::Stored(Seq(first_seq + i as u64)),
                    Plan::DupOfNew(i) => Appended::Duplicate(Seq(first_seq + i as u64)),
                    Plan::Dup(seq) => Appended::Duplicate(seq),
                })
            }),
        }
        Ok((drop_count as u64, pending))
    }

    /// Reserves `adding` bytes of the global budget, atomically.
    fn reserve(&self, adding: u64, max: Option<u64>) -> Result<()> {
        let Some(max) = max else {
            self.total_bytes.fetch_add(adding, Ordering::Relaxed);
            return Ok(());
        };
        self.total_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(adding).filter(|&total| total <= max)
            })
            .map(|_| ())
            .map_err(|used| Error::StorageFull { used, adding, max })
    }

    fn release(&self, bytes: u64) {
        self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

struct Record {
    seq: u64,
    sent_at: u64,
    expires_at: u64,
    id: MessageId,
    delivery_count: u32,
    removed: bool,
    /// Its deadline was earlier than one already queued: tracked in `exceptions`.
    out_of_order: bool,
    /// Shared with deliveries in flight: a read hands out a reference, not a copy.
    body: Bytes,
}

#[derive(Default)]
struct RecipientQueue {
    id: Option<RecipientId>,
    records: VecDeque<Record>,
    live: u64,
    bytes: u64,
    /// Losses ever counted, from a base that only grows (see `insert_slot`).
    lost_total: u64,
    /// Losses the client confirmed it was told of; `lost_total - lost_confirmed` are pending.
    lost_confirmed: u64,
    last_touch: u64,
    /// Highest deadline appended; a lower one makes the record an exception.
    max_deadline: u64,
    /// `(deadline, absolute position)` of live out-of-order records. A record's absolute
    /// position is `popped` + its index in `records`, so purge finds it without searching.
    exceptions: BTreeSet<(u64, u64)>,
    /// Records popped from the front of `records` so far.
    popped: u64,
    /// Absolute position where the search for the first in-order record resumes.
    in_order_head: u64,
    /// The key under which this queue sits in the shard's expiry index.
    indexed_deadline: Option<u64>,
    /// The key under which this queue sits in the shard's idle index: a past `last_touch`.
    /// Appends only move `last_touch`; purge re-files an entry it finds stale, so the hot
    /// path never touches the idle index.
    idle_key: Option<u64>,
}

impl RecipientQueue {
    fn position(&self, seq: u64) -> Option<usize> {
        self.records.binary_search_by_key(&seq, |r| r.seq).ok()
    }

    /// The first live record kept in deadline order (not an exception). The search resumes
    /// where the last one stopped (records before it are removed or exceptions, and stay so),
    /// so a run of exceptions at the front is walked once, not on every call.
    fn first_in_order(&mut self) -> Option<usize> {
        // Clamped: tombstones popped from the back may leave the mark past the end.
        let mut index =
            (self.in_order_head.saturating_sub(self.popped) as usize).min(self.records.len());
        while self
            .records
            .get(index)
            .is_some_and(|r| r.removed || r.out_of_order)
        {
            index += 1;
        }
        self.in_order_head = self.popped + index as u64;
        (index < self.records.len()).then_some(index)
    }

    fn earliest_deadline(&mut self) -> Option<u64> {
        let in_order = self.first_in_order().map(|i| self.records[i].expires_at);
        let exception = self.exceptions.first().map(|&(deadline, _)| deadline);
        let earliest = match (in_order, exception) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        earliest.filter(|&d| d != NEVER)
    }

    /// Removes the record at `index`; returns its body length.
    fn remove_at(&mut self, index: usize) -> u64 {
        let record = &self.records[index];
        if record.out_of_order {
            self.exceptions
                .remove(&(record.expires_at, self.popped + index as u64));
        }
        self.remove_untracked(index)
    }

    /// Removes the record at `index` whose `exceptions` entry, if any, is already gone.
    fn remove_untracked(&mut self, index: usize) -> u64 {
        let record = &mut self.records[index];
        debug_assert!(!record.removed);
        record.removed = true;
        let len = record.body.len() as u64;
        record.body = Bytes::new();
        self.live -= 1;
        self.bytes -= len;
        while self.records.front().is_some_and(|r| r.removed) {
            self.records.pop_front();
            self.popped += 1;
        }
        while self.records.back().is_some_and(|r| r.removed) {
            self.records.pop_back();
        }
        len
    }

    fn push(&mut self, mut record: Record) {
        // Checked only for a record that would be an exception (the search reads the queue's
        // front, usually cold): with no in-order record left, order restarts here, so one
        // long-lived message does not make every later one an exception.
        if record.expires_at < self.max_deadline && self.first_in_order().is_none() {
            self.max_deadline = 0;
        }
        if record.expires_at < self.max_deadline {
            record.out_of_order = true;
            let position = self.popped + self.records.len() as u64;
            self.exceptions.insert((record.expires_at, position));
        }
        self.max_deadline = self.max_deadline.max(record.expires_at);
        self.live += 1;
        self.bytes += record.body.len() as u64;
        self.records.push_back(record);
    }
}

#[derive(Default)]
struct Shard {
    by_id: RecipientMap<u32>,
    queues: Vec<RecipientQueue>,
    free: Vec<u32>,
    expiry: BTreeSet<(u64, u32)>,
    idle: BTreeSet<(u64, u32)>,
    /// Per recipient, so removing a recipient forgets its ids at once.
    dedup: RecipientMap<HashMap<MessageId, (Seq, u64)>>,
    dedup_order: VecDeque<(u64, RecipientId, MessageId)>,
    next_seq: u64,
}

impl Shard {
    fn slot_of(&self, recipient: &RecipientId) -> Option<u32> {
        self.by_id.get(recipient).copied()
    }

    /// A new queue for `recipient`, which has none.
    fn insert_slot(&mut self, recipient: &RecipientId) -> u32 {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.queues.push(RecipientQueue::default());
                u32::try_from(self.queues.len() - 1)
                    .expect("more than 4 billion recipients in one shard")
            }
        };
        let queue = &mut self.queues[slot as usize];
        queue.id = Some(recipient.clone());
        // A new queue's loss total starts above any an earlier queue of this recipient
        // reached (seqs only grow), so a stale confirmation cannot hide a new loss.
        queue.lost_total = self.next_seq;
        queue.lost_confirmed = self.next_seq;
        self.by_id.insert(recipient.clone(), slot);
        slot
    }

    /// Puts the queue's index entries right after a change, and frees it when it holds nothing
    /// worth keeping (no records, no unreported loss).
    fn settle(&mut self, slot: u32, touched_at: Option<u64>) {
        let queue = &mut self.queues[slot as usize];
        let deadline = queue.earliest_deadline();
        if deadline != queue.indexed_deadline {
            if let Some(old) = queue.indexed_deadline {
                self.expiry.remove(&(old, slot));
            }
            if let Some(new) = deadline {
                self.expiry.insert((new, slot));
            }
            queue.indexed_deadline = deadline;
        }
        let queue = &mut self.queues[slot as usize];
        if let Some(now) = touched_at {
            queue.last_touch = queue.last_touch.max(now);
        }
        if queue.live == 0 && queue.lost_total == queue.lost_confirmed {
            self.free_slot(slot);
            return;
        }
        if queue.idle_key.is_none() {
            queue.idle_key = Some(queue.last_touch);
            self.idle.insert((queue.last_touch, slot));
        }
    }

    fn free_slot(&mut self, slot: u32) {
        let queue = std::mem::take(&mut self.queues[slot as usize]);
        if let Some(deadline) = queue.indexed_deadline {
            self.expiry.remove(&(deadline, slot));
        }
        if let Some(key) = queue.idle_key {
            self.idle.remove(&(key, slot));
        }
        if let Some(id) = queue.id {
            self.by_id.remove(&id);
        }
        self.free.push(slot);
    }

    fn prune_dedup(&mut self, now: u64, window_ms: u64) {
        while let Some((at, _, _)) = self.dedup_order.front() {
            if now.saturating_sub(*at) < window_ms {
                break;
            }
            let (at, recipient, id) = self.dedup_order.pop_front().expect("front exists");
            // The id may have been stored again since (after its window): that entry stays.
            if let Some(ids) = self.dedup.get_mut(&recipient)
                && ids.get(&id).is_some_and(|&(_, stored_at)| stored_at == at)
            {
                ids.remove(&id);
                if ids.is_empty() {
                    self.dedup.remove(&recipient);
                }
            }
        }
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_total_byte_budget(true)
            .with_purge_expired(true)
            .with_idle_removal(true)
            // An append runs whole under its shard's lock in its first poll.
            .with_appends_in_poll_order(true)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        let mut results = Vec::with_capacity(records.len());
        let (dropped, pending) =
            self.append_records(recipient, records, quota, now, |r| results.push(r))?;
        Ok(AppendOutcome {
            records: results,
            dropped,
            pending,
            live_elsewhere: false,
        })
    }

    async fn append_one(
        &self,
        recipient: &RecipientId,
        record: NewRecord,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOneOutcome> {
        let mut result = None;
        let (dropped, pending) =
            self.append_records(recipient, [record], quota, now, |r| result = Some(r))?;
        Ok(AppendOneOutcome {
            record: result.expect("one outcome per record"),
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
        Ok(self.read_marking(recipient, after, limit, now, false))
    }

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
        let batch = self.read_marking(recipient, after, limit, now, true);
        Ok(DeliveryRead { acked, batch })
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        let mut shard = self.shard(recipient).lock();
        let Some(slot) = shard.slot_of(recipient) else {
            return Ok(());
        };
        let queue = &mut shard.queues[slot as usize];
        let mut next = 0;
        for seq in seqs {
            // A batch's seqs are usually adjacent records: try the next one before searching.
            let index = match queue.records.get(next) {
                Some(record) if record.seq == seq.0 => Some(next),
                _ => queue.position(seq.0),
            };
            if let Some(index) = index {
                let record = &mut queue.records[index];
                record.delivery_count = record.delivery_count.saturating_add(1);
                next = index + 1;
            }
        }
        Ok(())
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64> {
        let mut shard = self.shard(recipient).lock();
        let Some(slot) = shard.slot_of(recipient) else {
            return Ok(0);
        };
        let queue = &mut shard.queues[slot as usize];
        let mut removed = 0u64;
        let mut freed = 0u64;
        if let Some(through) = ack.through {
            while let Some(front) = queue.records.front() {
                if front.seq > through.0 {
                    break;
                }
                freed += queue.remove_at(0);
                removed += 1;
            }
        }
        for seq in &ack.seqs {
            if let Some(index) = queue.position(seq.0)
                && !queue.records[index].removed
            {
                freed += queue.remove_at(index);
                removed += 1;
            }
        }
        for seq in &ack.passed_over {
            if let Some(index) = queue.position(seq.0)
                && !queue.records[index].removed
            {
                freed += queue.remove_at(index);
                queue.lost_total += 1;
            }
        }
        if let Some(through) = ack.lost_confirmed_through {
            queue.lost_confirmed = queue.lost_confirmed.max(through.min(queue.lost_total));
        }
        shard.settle(slot, Some(now.as_millis()));
        drop(shard);
        self.release(freed);
        Ok(removed)
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome> {
        let now = now.as_millis();
        let mut outcome = PurgeOutcome::default();
        let mut left = budget;
        let first = self.next_purge_shard.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.shards.len() {
            let mut shard = self.shards[(first + i) % self.shards.len()].lock();
            let mut freed = 0u64;
            while left > 0 {
                let Some(&(deadline, slot)) = shard.expiry.first() else {
                    break;
                };
                outcome.examined += 1;
                if deadline > now {
                    break;
                }
                let queue = &mut shard.queues[slot as usize];
                while left > 0 {
                    // The queue's next due record, or the first one not due.
                    outcome.examined += 1;
                    let exception = queue.exceptions.first().filter(|&&(d, _)| d <= now);
                    let removed = if exception.is_some() {
                        let (_, position) = queue.exceptions.pop_first().expect("first exists");
                        queue.remove_untracked((position - queue.popped) as usize)
                    } else {
                        match queue.first_in_order() {
                            Some(i) if queue.records[i].expires_at <= now => {
                                queue.remove_untracked(i)
                            }
                            _ => break,
                        }
                    };
                    freed += removed;
                    queue.lost_total += 1;
                    outcome.expired += 1;
                    left -= 1;
                }
                shard.settle(slot, None);
            }
            if let Some(idle_before) = idle_before.map(Timestamp::as_millis) {
                while left > 0 {
                    let Some(&(key, slot)) = shard.idle.first() else {
                        break;
                    };
                    outcome.examined += 1;
                    if key >= idle_before {
                        break;
                    }
                    let queue = &mut shard.queues[slot as usize];
                    if queue.last_touch >= idle_before {
                        // Touched since it was filed: file it under its latest touch.
                        let touched = queue.last_touch;
                        queue.idle_key = Some(touched);
                        shard.idle.remove(&(key, slot));
                        shard.idle.insert((touched, slot));
                        // Refiling is work too: a call's budget bounds it.
                        left -= 1;
                        continue;
                    }
                    freed += queue.bytes;
                    left = left.saturating_sub((queue.live as usize).max(1));
                    if let Some(id) = queue.id.clone() {
                        shard.dedup.remove(&id);
                    }
                    shard.free_slot(slot);
                    outcome.idle_recipients += 1;
                }
            }
            drop(shard);
            self.release(freed);
            if left == 0 {
                break;
            }
        }
        if left == 0 {
            outcome.more = self.shards.iter().any(|shard| {
                let shard = shard.lock();
                shard.expiry.first().is_some_and(|&(d, _)| d <= now)
                    || idle_before.is_some_and(|before| {
                        shard
                            .idle
                            .first()
                            .is_some_and(|&(t, _)| t < before.as_millis())
                    })
            });
        }
        Ok(outcome)
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let shard = self.shard(recipient).lock();
        let Some(slot) = shard.slot_of(recipient) else {
            return Ok(RecipientStats::default());
        };
        let queue = &shard.queues[slot as usize];
        let mut live = queue.records.iter().filter(|r| !r.removed);
        Ok(RecipientStats {
            messages: queue.live,
            bytes: queue.bytes,
            oldest_sent_at: live.next().map(|r| Timestamp::from_millis(r.sent_at)),
            newest_seq: queue
                .records
                .iter()
                .rev()
                .find(|r| !r.removed)
                .map(|r| Seq(r.seq)),
            lost: queue.lost_total - queue.lost_confirmed,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let mut shard = self.shard(recipient).lock();
        shard.dedup.remove(recipient);
        let Some(slot) = shard.slot_of(recipient) else {
            return Ok(0);
        };
        let queue = &shard.queues[slot as usize];
        let (removed, freed) = (queue.live, queue.bytes);
        shard.free_slot(slot);
        drop(shard);
        self.release(freed);
        Ok(removed)
    }
}
