//! Every backend against a reference model at the `Storage` trait: `Model`, below, a
//! `BTreeMap` of records per recipient written for clarity, not speed, and sharing no code
//! with the backends (`MemoryStorage` is one of the subjects, not the oracle):
//! random appends (mixed TTLs and none, sender-chosen ids to deduplicate, queues long enough
//! to span many list chunks, drop-oldest overflow, a total byte budget), reads from anywhere
//! in a queue, delivery marks, cumulative, selective and passed-over acks, purges in small
//! budgets (with idle removal), a clock that steps back, and removals. After every step both
//! must hold the same messages with the same stats, whatever seqs each assigned.
//!
//! Runs on `MemoryStorage`, `RedbStorage`, on `RedisStorage` (one server and a cluster) when
//! `OFFLINE_QUEUE_REDIS_URL` / `OFFLINE_QUEUE_REDIS_CLUSTER_URLS` are set, and on
//! `PostgresStorage` (a schema per case) when `OFFLINE_QUEUE_POSTGRES_URL` is, and on
//! `NatsStorage` and `OwnedNatsStorage` (streams per case) when `OFFLINE_QUEUE_NATS_URL` is,
//! and on `AmqpStorage`
//! (quorum queues, a prefix per case) when `OFFLINE_QUEUE_AMQP_URL` is. A backend that leaves
//! the global budget or purging to its medium (its `Capabilities` say so) is checked against a
//! model that leaves them too; one without dedup, loss counts, exact quotas or exact stats,
//! against a model that stores every record, reports no losses, is given quotas no step
//! reaches, and is compared on message counts alone.

#[cfg(feature = "amqp")]
mod amqp_support;
#[cfg(feature = "nats")]
mod nats_support;
#[cfg(feature = "postgres")]
mod postgres_support;
#[cfg(feature = "redis")]
mod redis_support;

use std::time::Duration;

use futures::executor::block_on;
use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use offline_queue::storage::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, StoredRecord,
};
use offline_queue::{
    BatchLimit, Error, MemoryStorage, MessageId, Overflow, Quota, RecipientId, Seq, Storage,
    StorageExt, Timestamp,
};
use parking_lot::Mutex;
use proptest::prelude::*;

const RECIPIENTS: usize = 3;
const T0: u64 = 1_700_000_000_000;
/// Small enough that queues overflow, large enough that they span several chunks of 32.
const MAX_MESSAGES: u64 = 90;

#[derive(Clone, Debug)]
enum Op {
    /// Records with TTLs chosen by `ttls` (0: none; else that many seconds); a record whose
    /// `ids` entry is set carries that sender-chosen id, to deduplicate.
    Append {
        to: usize,
        ttls: Vec<u8>,
        ids: Vec<Option<u8>>,
    },
    /// Marks the `picked` pending records delivered.
    Mark {
        to: usize,
        picked: Vec<bool>,
    },
    /// One bounded read after the `from`-th pending record; `deliver`: through
    /// `read_for_delivery`, which also counts a delivery for each record returned.
    Read {
        to: usize,
        from: usize,
        max: usize,
        /// A byte bound (bodies are 9 to 11 bytes), or none.
        max_bytes: Option<usize>,
        deliver: bool,
    },
    AckThrough {
        to: usize,
        index: usize,
    },
    /// A cumulative ack through the `index`-th pending record, then a read for delivery after
    /// it (as a session does) or after the `from`-th, in one `read_for_delivery` with the ack.
    AckThenRead {
        to: usize,
        index: usize,
        from: Option<usize>,
        max: usize,
    },
    AckSome {
        to: usize,
        mask: Vec<bool>,
    },
    PassOver {
        to: usize,
        index: usize,
    },
    /// Advance the clock, then purge in rounds of `budget` until nothing more is due,
    /// removing queues idle for `idle_secs` if set (at least the dedup window, as the engine
    /// guarantees).
    Purge {
        advance_secs: u64,
        budget: usize,
        idle_secs: Option<u64>,
    },
    /// The clock steps back (as wall clocks do).
    ClockBack {
        secs: u64,
    },
    /// The clock moves on with no purge: reads meet expired records in place.
    Advance {
        secs: u64,
    },
    Remove {
        to: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let to = 0..RECIPIENTS;
    prop_oneof![
        5 => (to.clone(), proptest::collection::vec(prop_oneof![Just(0u8), Just(5), Just(30), Just(60), Just(90)], 1..40))
            .prop_map(|(to, ttls)| (to, ttls)).prop_flat_map(|(to, ttls)| {
                let n = ttls.len();
                (Just(to), Just(ttls), proptest::collection::vec(proptest::option::weighted(0.2, 0..6u8), n))
            })
            .prop_map(|(to, ttls, ids)| Op::Append { to, ttls, ids }),
        1 => (to.clone(), proptest::collection::vec(any::<bool>(), 0..60)).prop_map(|(to, picked)| Op::Mark { to, picked }),
        2 => (to.clone(), 0..100usize, 1..40usize, proptest::option::weighted(0.3, 1..200usize), any::<bool>())
            .prop_map(|(to, from, max, max_bytes, deliver)| Op::Read { to, from, max, max_bytes, deliver }),
        1 => (to.clone(), 0..100usize).prop_map(|(to, index)| Op::AckThrough { to, index }),
        2 => (to.clone(), 0..100usize, proptest::option::weighted(0.3, 0..100usize), 1..40usize)
            .prop_map(|(to, index, from, max)| Op::AckThenRead { to, index, from, max }),
        2 => (to.clone(), proptest::collection::vec(any::<bool>(), 0..100)).prop_map(|(to, mask)| Op::AckSome { to, mask }),
        1 => (to.clone(), 0..100usize).prop_map(|(to, index)| Op::PassOver { to, index }),
        2 => (0..50u64, 1..20usize, proptest::option::weighted(0.2, 60..120u64))
            .prop_map(|(advance_secs, budget, idle_secs)| Op::Purge { advance_secs, budget, idle_secs }),
        1 => (1..20u64).prop_map(|secs| Op::ClockBack { secs }),
        1 => (1..60u64).prop_map(|secs| Op::Advance { secs }),
        1 => to.prop_map(|to| Op::Remove { to }),
    ]
}

fn who(index: usize) -> RecipientId {
    RecipientId::new(format!("user-{index}")).unwrap()
}

/// The quota every append carries: one that overflows, unless the backend cannot keep quotas
/// exactly (then one no run reaches).
fn quota(claims: Capabilities) -> Quota {
    Quota {
        max_messages: if claims.exact_quotas {
            MAX_MESSAGES
        } else {
            u64::MAX
        },
        max_bytes: 1 << 20,
        overflow: Overflow::DropOldest,
        max_total_bytes: Some(20_000),
        dedup_window: Duration::from_secs(60),
        idle_timeout: None,
    }
}

/// What a backend holds for a recipient, without its own seqs.
#[derive(Debug, PartialEq, Eq)]
struct View {
    bodies: Vec<Vec<u8>>,
    messages: u64,
    bytes: u64,
    lost: u64,
    oldest_sent_at: Option<Timestamp>,
    has_newest: bool,
}

/// What both sides are compared on: with `exact_stats` false, the stats' message count only.
fn view(storage: &dyn Storage, to: usize, now: Timestamp) -> View {
    let records = block_on(storage.read_all(&who(to), now)).unwrap();
    let stats = block_on(storage.stats(&who(to))).unwrap();
    let exact = storage.capabilities().exact_stats;
    View {
        bodies: records.into_iter().map(|r| r.body.to_vec()).collect(),
        messages: stats.messages,
        bytes: if exact { stats.bytes } else { 0 },
        lost: stats.lost,
        oldest_sent_at: stats.oldest_sent_at.filter(|_| exact),
        has_newest: stats.newest_seq.is_some() && exact,
    }
}

/// The seqs of the recipient's unexpired records, in order.
fn seqs(storage: &dyn Storage, to: usize, now: Timestamp) -> Vec<Seq> {
    block_on(storage.read_all(&who(to), now))
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

fn ack(storage: &dyn Storage, to: usize, ack: Ack, now: Timestamp) -> u64 {
    block_on(storage.ack(&who(to), &ack, now)).unwrap()
}

/// One backend's side of a run: its clock, the records it was sent, and whether its clock
/// ever stepped back.
#[derive(Default)]
struct Run {
    now: u64,
    counter: u64,
    went_back: bool,
}

/// What a read answered, for comparing backends: bodies with their delivery counts, and how
/// many records it passed over as expired and reported lost.
fn describe(batch: &offline_queue::storage::ReadBatch) -> String {
    let bodies: Vec<String> = batch
        .records
        .iter()
        .map(|r| format!("{} x{}", String::from_utf8_lossy(&r.body), r.delivery_count))
        .collect();
    format!(
        "{bodies:?} expired {} lost {}",
        batch.expired.len(),
        batch.lost_unconfirmed
    )
}

/// Applies `op` to one backend; returns what the backend answered, seqs aside.
fn apply(storage: &dyn Storage, op: &Op, run: &mut Run) -> String {
    let Run {
        now,
        counter,
        went_back,
    } = run;
    let at = Timestamp::from_millis(*now);
    let quota = quota(storage.capabilities());
    match op {
        Op::Append { to, ttls, ids } => {
            let records: Vec<NewRecord> = ttls
                .iter()
                .zip(ids)
                .map(|(&ttl, id)| {
                    // Once the clock stepped back, whether an id is still remembered depends
                    // on when each backend last forgot old ids: both are right, so ids are
                    // checked only on runs whose clock never went back.
                    let id = id.filter(|_| !*went_back);
                    *counter += 1;
                    NewRecord {
                        id: id.map_or_else(MessageId::generate, |k| MessageId::from_bytes([k; 16])),
                        dedup: id.is_some(),
                        sent_at: at,
                        expires_at: (ttl > 0).then(|| {
                            Timestamp::from_millis(*now + u64::from(ttl) * 1000 + *counter % 7)
                        }),
                        body: format!("message {counter}").into_bytes(),
                    }
                })
                .collect();
            // One record goes through `append_one` (each backend's own, or the default).
            let appended = match <[NewRecord; 1]>::try_from(records) {
                Ok([one]) => block_on(storage.append_one(&who(*to), one, &quota, at)).map(|o| {
                    AppendOutcome {
                        records: vec![o.record],
                        dropped: o.dropped,
                        pending: o.pending,
                        live_elsewhere: o.live_elsewhere,
                    }
                }),
                Err(records) => block_on(storage.append(&who(*to), records, &quota, at)),
            };
            match appended {
                Ok(outcome) => {
                    let stored: Vec<bool> = outcome
                        .records
                        .iter()
                        .map(|r| matches!(r, Appended::Stored(_)))
                        .collect();
                    // Without exact stats, `pending` may count only this append's records.
                    let pending =
                        Some(outcome.pending).filter(|_| storage.capabilities().exact_stats);
                    format!(
                        "stored {stored:?} dropped {} pending {pending:?}",
                        outcome.dropped
                    )
                }
                Err(error) => format!("{error}"),
            }
        }
        Op::Mark { to, picked } => {
            let seqs: Vec<Seq> = seqs(storage, *to, at)
                .into_iter()
                .zip(picked)
                .filter(|(_, pick)| **pick)
                .map(|(seq, _)| seq)
                .collect();
            block_on(storage.mark_delivered(&who(*to), &seqs)).unwrap();
            format!("marked {}", seqs.len())
        }
        Op::ClockBack { secs } => {
            *went_back = true;
            *now = now.saturating_sub(secs * 1000).max(T0);
            "back".into()
        }
        Op::Advance { secs } => {
            *now += secs * 1000;
            "advanced".into()
        }
        Op::Read {
            to,
            from,
            max,
            max_bytes,
            deliver,
        } => {
            let seqs = seqs(storage, *to, at);
            let after = from.checked_sub(1).and_then(|i| seqs.get(i)).copied();
            let limit = BatchLimit {
                max_messages: *max,
                max_bytes: max_bytes.unwrap_or(usize::MAX),
            };
            let batch = if *deliver {
                block_on(storage.read_for_delivery(&who(*to), None, after, limit, at))
                    .map(|read| read.batch)
            } else {
                block_on(storage.read(&who(*to), after, limit, at))
            }
            .unwrap();
            describe(&batch)
        }
        Op::AckThrough { to, index } => {
            let seqs = seqs(storage, *to, at);
            let Some(&through) = seqs.get(index % seqs.len().max(1)) else {
                return "empty".into();
            };
            let removed = ack(
                storage,
                *to,
                Ack {
                    through: Some(through),
                    ..Ack::default()
                },
                at,
            );
            format!("removed {removed}")
        }
        Op::AckThenRead {
            to,
            index,
            from,
            max,
        } => {
            let seqs = seqs(storage, *to, at);
            let through = seqs.get(index % seqs.len().max(1)).copied();
            let after = match from {
                Some(from) => from.checked_sub(1).and_then(|i| seqs.get(i)).copied(),
                None => through,
            };
            let ack = Ack {
                through,
                ..Ack::default()
            };
            let limit = BatchLimit {
                max_messages: *max,
                max_bytes: usize::MAX,
            };
            let DeliveryRead {
                acked: removed,
                batch,
            } = block_on(storage.read_for_delivery(&who(*to), Some(&ack), after, limit, at))
                .unwrap();
            format!("removed {removed} {}", describe(&batch))
        }
        Op::AckSome { to, mask } => {
            let picked: Vec<Seq> = seqs(storage, *to, at)
                .into_iter()
                .zip(mask)
                .filter(|(_, pick)| **pick)
                .map(|(seq, _)| seq)
                .collect();
            let removed = ack(
                storage,
                *to,
                Ack {
                    seqs: picked,
                    ..Ack::default()
                },
                at,
            );
            format!("removed {removed}")
        }
        Op::PassOver { to, index } => {
            let seqs = seqs(storage, *to, at);
            let Some(&seq) = seqs.get(index % seqs.len().max(1)) else {
                return "empty".into();
            };
            ack(
                storage,
                *to,
                Ack {
                    passed_over: vec![seq],
                    ..Ack::default()
                },
                at,
            );
            "passed over".into()
        }
        Op::Purge {
            advance_secs,
            budget,
            idle_secs,
        } => {
            *now += advance_secs * 1000;
            let at = Timestamp::from_millis(*now);
            let idle_before = idle_secs.map(|secs| Timestamp::from_millis(*now - secs * 1000));
            let (mut expired, mut idle) = (0, 0);
            for _ in 0..10_000 {
                let outcome = block_on(storage.purge(at, idle_before, *budget)).unwrap();
                expired += outcome.expired;
                idle += outcome.idle_recipients;
                if !outcome.more {
                    return format!("expired {expired} idle {idle}");
                }
            }
            panic!("purge never finished");
        }
        Op::Remove { to } => {
            let removed = block_on(storage.remove_recipient(&who(*to))).unwrap();
            format!("removed {removed}")
        }
    }
}

/// The oracle: the storage contract as plainly as it can be written. Per recipient, its live
/// records by seq, the ids it remembers for dedup, its unreported losses and when it was last
/// appended to or acked (`None` while it has no queue: nothing live, no unreported loss).
#[derive(Default)]
struct Model {
    recipients: Mutex<BTreeMap<Vec<u8>, ModelRecipient>>,
    /// The last seq handed out, to anyone: seqs only grow.
    last_seq: Mutex<u64>,
    /// What the backend under test claims, when it claims less than everything: the model
    /// then skips what the backend leaves to its medium (a budget, purging).
    claims: Option<Capabilities>,
}

impl Model {
    fn like(subject: &dyn Storage) -> Self {
        Self {
            claims: Some(subject.capabilities()),
            ..Self::default()
        }
    }
}

#[derive(Default)]
struct ModelRecipient {
    records: BTreeMap<u64, ModelRecord>,
    /// Sender-chosen id -> (its seq, when stored).
    ids: HashMap<MessageId, (u64, u64)>,
    lost: u64,
    touched: Option<u64>,
}

#[derive(Clone)]
struct ModelRecord {
    id: MessageId,
    sent_at: u64,
    /// `None`: never expires.
    expires_at: Option<u64>,
    deliveries: u32,
    body: Vec<u8>,
}

impl ModelRecord {
    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

impl ModelRecipient {
    fn bytes(&self) -> u64 {
        self.records.values().map(|r| r.body.len() as u64).sum()
    }

    /// A queue with nothing live and no unreported loss is no queue.
    fn settle(&mut self) {
        if self.records.is_empty() && self.lost == 0 {
            self.touched = None;
        }
    }
}

#[async_trait]
impl Storage for Model {
    fn capabilities(&self) -> Capabilities {
        self.claims.unwrap_or_else(|| {
            Capabilities::default()
                .with_exact_contract()
                .with_total_byte_budget(true)
                .with_purge_expired(true)
                .with_idle_removal(true)
        })
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> offline_queue::Result<AppendOutcome> {
        let now = now.as_millis();
        let window = quota.dedup_window.as_millis() as u64;
        let claims = self.capabilities();
        let mut all = self.recipients.lock();
        let used: u64 = all.values().map(ModelRecipient::bytes).sum();
        let r = all.entry(recipient.as_bytes().to_vec()).or_default();
        // Which records are new: not an id stored within the window, nor one earlier in this
        // batch.
        let mut plan: Vec<Result<usize, Appended>> = Vec::new();
        let mut new: Vec<&NewRecord> = Vec::new();
        for record in &records {
            if record.dedup && claims.dedup {
                if let Some(&(seq, at)) = r.ids.get(&record.id)
                    && now.saturating_sub(at) < window
                {
                    plan.push(Err(Appended::Duplicate(Seq(seq))));
                    continue;
                }
                if let Some(earlier) = new.iter().position(|n| n.dedup && n.id == record.id) {
                    plan.push(Ok(usize::MAX - earlier));
                    continue;
                }
            }
            plan.push(Ok(new.len()));
            new.push(record);
        }
        let adding = new.len() as u64;
        let adding_bytes: u64 = new.iter().map(|n| n.body.len() as u64).sum();
        let (live, bytes) = (r.records.len() as u64, r.bytes());
        let fits = |live: u64, bytes: u64| {
            live + adding <= quota.max_messages && bytes + adding_bytes <= quota.max_bytes
        };
        let mut dropping = Vec::new();
        if !fits(live, bytes) {
            if quota.overflow == Overflow::Reject
                || adding > quota.max_messages
                || adding_bytes > quota.max_bytes
            {
                return Err(Error::QueueFull {
                    messages: live,
                    bytes,
                    adding_messages: adding,
                    adding_bytes,
                    max_messages: quota.max_messages,
                    max_bytes: quota.max_bytes,
                });
            }
            let (mut keep, mut keep_bytes) = (live, bytes);
            for (&seq, record) in &r.records {
                if fits(keep, keep_bytes) {
                    break;
                }
                keep -= 1;
                keep_bytes -= record.body.len() as u64;
                dropping.push(seq);
            }
        }
        let drop_bytes: u64 = dropping
            .iter()
            .map(|s| r.records[s].body.len() as u64)
            .sum();
        if let Some(max) = quota.max_total_bytes
            && claims.total_byte_budget
            && adding_bytes > drop_bytes
            && used + (adding_bytes - drop_bytes) > max
        {
            return Err(Error::StorageFull {
                used,
                adding: adding_bytes - drop_bytes,
                max,
            });
        }
        if adding == 0 {
            let records = plan
                .into_iter()
                .map(|p| p.expect_err("all duplicates"))
                .collect();
            return Ok(AppendOutcome {
                records,
                dropped: 0,
                pending: live,
                live_elsewhere: false,
            });
        }
        for seq in &dropping {
            r.records.remove(seq);
        }
        if claims.loss_counts {
            r.lost += dropping.len() as u64;
        }
        let mut last_seq = self.last_seq.lock();
        let mut seqs = Vec::new();
        for record in &new {
            *last_seq += 1;
            seqs.push(*last_seq);
            r.records.insert(
                *last_seq,
                ModelRecord {
                    id: record.id,
                    sent_at: record.sent_at.as_millis(),
                    expires_at: record.expires_at.map(Timestamp::as_millis),
                    deliveries: 0,
                    body: record.body.clone(),
                },
            );
            if record.dedup && window > 0 {
                r.ids.insert(record.id, (*last_seq, now));
            }
        }
        r.touched = Some(r.touched.map_or(now, |t| t.max(now)));
        let records = plan
            .into_iter()
            .map(|p| match p {
                Ok(i) if i < new.len() => Appended::Stored(Seq(seqs[i])),
                Ok(earlier) => Appended::Duplicate(Seq(seqs[usize::MAX - earlier])),
                Err(duplicate) => duplicate,
            })
            .collect();
        Ok(AppendOutcome {
            records,
            dropped: if claims.loss_counts {
                dropping.len() as u64
            } else {
                0
            },
            pending: r.records.len() as u64,
            live_elsewhere: false,
        })
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> offline_queue::Result<ReadBatch> {
        let now = now.as_millis();
        let all = self.recipients.lock();
        let Some(r) = all.get(recipient.as_bytes()) else {
            return Ok(ReadBatch::default());
        };
        let mut batch = ReadBatch {
            lost_unconfirmed: r.lost,
            lost_total: r.lost,
            ..ReadBatch::default()
        };
        let mut bytes = 0;
        let from = after.map_or(0, |s| s.0.saturating_add(1));
        for (&seq, record) in r.records.range(from..) {
            // Expired records are reported, not delivered, up to the batch's count.
            if record.expired(now) {
                batch.expired.push(Seq(seq));
                if batch.expired.len() >= limit.max_messages {
                    break;
                }
                continue;
            }
            // The first record goes whatever its size; then the byte bound holds.
            if batch.records.len() >= limit.max_messages
                || (!batch.records.is_empty() && bytes + record.body.len() > limit.max_bytes)
            {
                break;
            }
            bytes += record.body.len();
            batch.records.push(StoredRecord {
                seq: Seq(seq),
                id: record.id,
                sent_at: Timestamp::from_millis(record.sent_at),
                expires_at: record.expires_at.map(Timestamp::from_millis),
                delivery_count: record.deliveries,
                body: record.body.clone().into(),
            });
        }
        Ok(batch)
    }

    async fn mark_delivered(
        &self,
        recipient: &RecipientId,
        seqs: &[Seq],
    ) -> offline_queue::Result<()> {
        if let Some(r) = self.recipients.lock().get_mut(recipient.as_bytes()) {
            for seq in seqs {
                if let Some(record) = r.records.get_mut(&seq.0) {
                    record.deliveries = record.deliveries.saturating_add(1);
                }
            }
        }
        Ok(())
    }

    async fn ack(
        &self,
        recipient: &RecipientId,
        ack: &Ack,
        now: Timestamp,
    ) -> offline_queue::Result<u64> {
        let claims = self.capabilities();
        let mut all = self.recipients.lock();
        let Some(r) = all.get_mut(recipient.as_bytes()) else {
            return Ok(0);
        };
        let Some(touched) = r.touched else {
            return Ok(0);
        };
        let mut removed = 0;
        if let Some(through) = ack.through {
            let kept = r.records.split_off(&through.0.saturating_add(1));
            removed += std::mem::replace(&mut r.records, kept).len() as u64;
        }
        for seq in &ack.seqs {
            removed += u64::from(r.records.remove(&seq.0).is_some());
        }
        for seq in &ack.passed_over {
            let removed = r.records.remove(&seq.0).is_some();
            r.lost += u64::from(removed && claims.loss_counts);
        }
        assert!(
            ack.lost_confirmed_through.is_none(),
            "the model test confirms no losses"
        );
        r.touched = Some(touched.max(now.as_millis()));
        r.settle();
        Ok(removed)
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        _budget: usize,
    ) -> offline_queue::Result<PurgeOutcome> {
        // All of it in one call (the test sums what the calls report).
        let now = now.as_millis();
        let claims = self.capabilities();
        let mut all = self.recipients.lock();
        let mut outcome = PurgeOutcome::default();
        for r in all.values_mut().filter(|_| claims.purge_expired) {
            let before = r.records.len();
            r.records.retain(|_, record| !record.expired(now));
            let expired = (before - r.records.len()) as u64;
            r.lost += if claims.loss_counts { expired } else { 0 };
            outcome.expired += expired;
        }
        if let Some(idle_before) = idle_before.filter(|_| claims.idle_removal) {
            all.retain(|_, r| {
                let idle = r.touched.is_some_and(|t| t < idle_before.as_millis());
                outcome.idle_recipients += u64::from(idle);
                !idle
            });
        }
        Ok(outcome)
    }

    async fn stats(&self, recipient: &RecipientId) -> offline_queue::Result<RecipientStats> {
        let all = self.recipients.lock();
        let Some(r) = all.get(recipient.as_bytes()) else {
            return Ok(RecipientStats::default());
        };
        Ok(RecipientStats {
            messages: r.records.len() as u64,
            bytes: r.bytes(),
            oldest_sent_at: r
                .records
                .values()
                .next()
                .map(|r| Timestamp::from_millis(r.sent_at)),
            newest_seq: r.records.keys().next_back().map(|&s| Seq(s)),
            lost: r.lost,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> offline_queue::Result<u64> {
        let removed = self.recipients.lock().remove(recipient.as_bytes());
        Ok(removed.map_or(0, |r| r.records.len() as u64))
    }
}

/// Applies `ops` to `subject` and to the model, comparing after every step.
fn run(ops: Vec<Op>, subject: &dyn Storage) {
    let model = Model::like(subject);
    let start = || Run {
        now: T0,
        ..Run::default()
    };
    let (mut subject_run, mut model_run) = (start(), start());
    for (step, op) in ops.iter().enumerate() {
        let got = apply(subject, op, &mut subject_run);
        let want = apply(&model, op, &mut model_run);
        assert_eq!(got, want, "step {step}: {op:?}");
        let now = Timestamp::from_millis(subject_run.now);
        for to in 0..RECIPIENTS {
            assert_eq!(
                view(subject, to, now),
                view(&model, to, now),
                "step {step}: {op:?}, recipient {to}"
            );
        }
    }
    // Everything purged in the end leaves nothing behind.
    let end = Timestamp::from_millis(subject_run.now + 100 * 1000);
    for storage in [subject, &model] {
        while block_on(storage.purge(end, None, 7)).unwrap().more {}
    }
    for to in 0..RECIPIENTS {
        assert_eq!(view(subject, to, end), view(&model, to, end), "at the end");
    }
}

/// Cases per backend: 24 (every write is a commit or a round trip) unless PROPTEST_CASES
/// asks for more.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn memory_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, &MemoryStorage::with_shards(3));
    }
}

#[cfg(feature = "redb")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn redb_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let redb = offline_queue::RedbStorage::open(dir.path().join("model.redb")).unwrap();
        run(ops, &redb);
    }
}

#[cfg(feature = "redis")]
fn on_redis(ops: Vec<Op>, target: Option<redis_support::Target>) {
    let Some(target) = target else {
        return;
    };
    let (_context, storage) = redis_support::fresh_blocking(&target, "storage-model");
    run(ops, &storage);
}

#[cfg(feature = "redis")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn redis_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        on_redis(ops, redis_support::Target::single());
    }

    #[test]
    fn a_redis_cluster_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        on_redis(ops, redis_support::Target::cluster());
    }
}

/// A runtime for a server-backed storage's connections (the model test runs on its own
/// thread).
#[cfg(any(feature = "postgres", feature = "nats", feature = "amqp"))]
fn server_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

#[cfg(feature = "postgres")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn postgres_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        let Some(url) = postgres_support::url() else {
            return Ok(());
        };
        let runtime = server_runtime();
        let _context = runtime.enter();
        let schema = postgres_support::unique_schema("model");
        let storage = runtime.block_on(postgres_support::fresh(&url, &schema));
        run(ops, &storage);
        drop(storage);
        runtime.block_on(postgres_support::drop_schemas(&url, &[schema]));
    }
}

#[cfg(feature = "nats")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn nats_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        let Some(url) = nats_support::url() else {
            return Ok(());
        };
        let runtime = server_runtime();
        let _context = runtime.enter();
        let streams = nats_support::Streams::default();
        let storage = runtime.block_on(streams.storage(&url));
        run(ops, &storage);
        drop(storage);
        runtime.block_on(streams.delete(&url));
    }

    #[test]
    fn owned_nats_holds_what_the_model_holds(ops in proptest::collection::vec(op(), 1..80)) {
        on_owned_nats(ops, false);
    }

    /// The same, every queue unloaded before each call (as an idle one is), so each call
    /// loads its queue from the streams afresh.
    #[test]
    fn owned_nats_loading_each_call_holds_what_the_model_holds(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        on_owned_nats(ops, true);
    }
}

/// Runs `ops` on an `OwnedNatsStorage` on streams of its own, every queue unloaded before
/// each call if `loading_each_call`.
#[cfg(feature = "nats")]
fn on_owned_nats(ops: Vec<Op>, loading_each_call: bool) {
    let Some(url) = nats_support::url() else {
        return;
    };
    let runtime = server_runtime();
    let _context = runtime.enter();
    let streams = nats_support::Streams::default();
    let storage = runtime.block_on(streams.owned_storage(&url));
    if loading_each_call {
        run(ops, &Unloading(storage));
    } else {
        run(ops, &storage);
    }
    runtime.block_on(streams.delete(&url));
}

/// An `OwnedNatsStorage` that unloads every queue no call holds before each call.
#[cfg(feature = "nats")]
struct Unloading(offline_queue::OwnedNatsStorage);

#[cfg(feature = "nats")]
impl Unloading {
    async fn unload(&self) {
        self.0.unload_idle_queues(Duration::ZERO).await;
    }
}

#[cfg(feature = "nats")]
#[async_trait]
impl Storage for Unloading {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> offline_queue::Result<AppendOutcome> {
        self.unload().await;
        self.0.append(recipient, records, quota, now).await
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> offline_queue::Result<ReadBatch> {
        self.unload().await;
        self.0.read(recipient, after, limit, now).await
    }

    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> offline_queue::Result<DeliveryRead> {
        self.unload().await;
        self.0
            .read_for_delivery(recipient, ack, after, limit, now)
            .await
    }

    async fn mark_delivered(
        &self,
        recipient: &RecipientId,
        seqs: &[Seq],
    ) -> offline_queue::Result<()> {
        self.unload().await;
        self.0.mark_delivered(recipient, seqs).await
    }

    async fn ack(
        &self,
        recipient: &RecipientId,
        ack: &Ack,
        now: Timestamp,
    ) -> offline_queue::Result<u64> {
        self.unload().await;
        self.0.ack(recipient, ack, now).await
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> offline_queue::Result<PurgeOutcome> {
        self.0.purge(now, idle_before, budget).await
    }

    async fn stats(&self, recipient: &RecipientId) -> offline_queue::Result<RecipientStats> {
        self.unload().await;
        self.0.stats(recipient).await
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> offline_queue::Result<u64> {
        self.unload().await;
        self.0.remove_recipient(recipient).await
    }
}

/// RabbitMQ, quorum queues (the default), in a virtual host of the test's own with a queue
/// prefix per case. Run by hand with `TestRunner` rather than `proptest!`, so the virtual
/// host is made once and deleted at the end. The holders never go idle within a case, so the
/// broker counts no hand-back the model does not know of.
#[cfg(feature = "amqp")]
#[test]
fn rabbitmq_holds_what_the_model_holds() {
    use proptest::test_runner::{Config, TestRunner};
    let Some(url) = amqp_support::url() else {
        return;
    };
    let vhost = amqp_support::Vhost::new(&url, "model");
    let runtime = server_runtime();
    let _context = runtime.enter();
    let next = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op(), 1..80), |ops| {
        let prefix = format!(
            "model{}",
            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let storage = runtime
            .block_on(
                offline_queue::AmqpStorage::options()
                    .prefix(prefix)
                    .hold_idle(Duration::from_secs(3600))
                    .connect(&vhost.url),
            )
            .expect("connect");
        run(ops, &storage);
        for to in 0..RECIPIENTS {
            block_on(storage.remove_recipient(&who(to))).unwrap();
        }
        Ok(())
    });
    if let Err(error) = outcome {
        panic!("{error}");
    }
}
