//! Reads of a run that bring no record into Lua. Bringing a record into a function from
//! `LRANGE`, and replying with it, is most of a read's cost on the server. When the records after the cursor are a plain run (nothing removed in the middle,
//! deadlines in seq order, no explicit delivery counts; the common case), `plan.lua` checks
//! the run by the records at its two ends and counts its deliveries, and an `LRANGE` in the
//! same `MULTI` hands the records over as Redis stores them.
//!
//! The `LRANGE` needs the run's index in the list before the function runs, so each storage
//! remembers the front seq of the queues it read or acked lately (a bounded map; a wrong or
//! missing guess costs one ordinary read, and the miss tells the right front). A session's
//! cumulative ack can run first in the same `MULTI` (`read_for_delivery` with an ack): the guess
//! then counts from the front the ack leaves. On a cluster reads go the ordinary way.

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::Value;

use super::RedisStorage;
use super::errors::redis_error;
use super::library::LUA_MAX;
use super::record::{HEADER, appended_before, decode_record};
use super::replies::{NONE, PlanReply, bad_reply};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::limits::BatchLimit;
use crate::message::{RecipientId, Seq};
use crate::storage::{Ack, ReadBatch};

/// Queues whose front is remembered, at most: two generations of half as many each.
const REMEMBERED: usize = 1 << 16;
/// Longest batch read this way: the `LRANGE` is sized before the step runs.
const MOST: u64 = 1000;

/// What is remembered of a queue: its front seq, and the mean body length of its last
/// batch (0: none seen).
#[derive(Clone, Copy)]
struct Front {
    head: u64,
    mean_body: u64,
}

/// The fronts of plain queues read or acked lately, in two generations: when the newer is
/// full it becomes the older and the older is dropped, so going past the bound forgets the
/// queues least recently read, never all of them at once.
#[derive(Default)]
pub(super) struct Fronts(Mutex<Generations>);

#[derive(Default)]
struct Generations {
    newer: HashMap<RecipientId, Front>,
    older: HashMap<RecipientId, Front>,
}

impl Generations {
    fn get(&self, recipient: &RecipientId) -> Option<Front> {
        self.newer
            .get(recipient)
            .or_else(|| self.older.get(recipient))
            .copied()
    }

    fn forget(&mut self, recipient: &RecipientId) {
        self.newer.remove(recipient);
        self.older.remove(recipient);
    }

    /// Files `front` in the newer generation, turning it over first when it is full.
    fn put(&mut self, recipient: &RecipientId, front: Front) {
        if let Some(known) = self.newer.get_mut(recipient) {
            *known = front;
            return;
        }
        self.older.remove(recipient);
        if self.newer.len() >= REMEMBERED / 2 {
            // The dropped generation's table is reused for the new one.
            std::mem::swap(&mut self.older, &mut self.newer);
            self.newer.clear();
        }
        self.newer.insert(recipient.clone(), front);
    }
}

impl Fronts {
    /// After a read: remembers `recipient`'s front, `head`, and the mean body length of the
    /// batch, if the queue is `plain` (a run `plan.lua` can take); else forgets it.
    pub fn after_read(
        &self,
        recipient: &RecipientId,
        head: Option<u64>,
        plain: bool,
        mean_body: u64,
    ) {
        let mut fronts = self.0.lock();
        let Some(head) = head.filter(|_| plain) else {
            fronts.forget(recipient);
            return;
        };
        let known = fronts.get(recipient).map_or(0, |f| f.mean_body);
        let front = Front {
            head,
            mean_body: if mean_body > 0 { mean_body } else { known },
        };
        fronts.put(recipient, front);
    }

    /// After an ack: moves a remembered front (`head` none: the queue is gone).
    pub fn after_ack(&self, recipient: &RecipientId, head: Option<u64>) {
        let mut fronts = self.0.lock();
        match head {
            None => fronts.forget(recipient),
            Some(head) => {
                if let Some(front) = fronts.get(recipient) {
                    fronts.put(recipient, Front { head, ..front });
                }
            }
        }
    }

    /// The list index of the first record after `after`, when the front is remembered and
    /// the batch is likely bounded by its count, not its bytes (the `LRANGE` fetches a whole
    /// count of records; a byte bound that cuts far below it would waste the rest).
    ///
    /// `acked_through`: a cumulative ack that runs first, in the same `MULTI`, and moves the
    /// front of a plain queue past it.
    fn guess(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        acked_through: Option<Seq>,
    ) -> Option<u64> {
        let mut front = self.0.lock().get(recipient)?;
        if let Some(through) = acked_through {
            front.head = front.head.max(through.0.saturating_add(1));
        }
        let count = limit.max_messages as u64;
        let expected = count.checked_mul(front.mean_body)?.checked_mul(2)?;
        // A zero count reads nothing, as the ordinary read does: no run to plan.
        if front.mean_body == 0 || count == 0 || count > MOST || expected > limit.max_bytes as u64 {
            return None;
        }
        let first = after.map_or(front.head, |seq| seq.0.saturating_add(1).max(front.head));
        Some(first - front.head)
    }
}

/// What [`RedisStorage::read_run`] did: the ack's count if one ran, and the batch if the
/// queue held the run where it was guessed to (`None`: read the ordinary way).
#[derive(Default)]
pub(super) struct RunRead {
    pub acked: Option<u64>,
    pub batch: Option<ReadBatch>,
}

impl RedisStorage {
    /// Reads a plain run after `after` where it was guessed to be, in one `MULTI`; with `ack`
    /// (cumulative only: a selective one moves the front unpredictably), the ack runs first in
    /// the same `MULTI`, so a session's ack and next read cost one round trip.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn read_run(
        &self,
        recipient: &RecipientId,
        keys: &[String; 7],
        ack: Option<(&Ack, &str)>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<RunRead> {
        if self.is_cluster() {
            return Ok(RunRead::default());
        }
        if ack.is_some_and(|(ack, _)| !ack.seqs.is_empty() || !ack.passed_over.is_empty()) {
            return Ok(RunRead::default());
        }
        let acked_through = ack.and_then(|(ack, _)| ack.through);
        let Some(guess) = self
            .shared
            .fronts
            .guess(recipient, after, limit, acked_through)
        else {
            return Ok(RunRead::default());
        };
        let max_messages = (limit.max_messages as u64).clamp(1, MOST);
        let mut plan = self.shared.steps.plan.command(&keys[..]);
        plan.arg(after.map_or(NONE, |s| s.0 as i64))
            .arg(max_messages)
            .arg((limit.max_bytes as u64).min(LUA_MAX))
            .arg(now.as_millis())
            .arg(u8::from(mark))
            .arg(guess);
        let mut pipe = redis::pipe();
        // Each step's reply on its own: an ack that ran is booked even if the read did not.
        pipe.atomic().ignore_errors();
        if let Some((ack, _)) = ack {
            pipe.add_command(self.ack_command(keys, ack, now));
        }
        pipe.add_command(plan)
            .cmd("LRANGE")
            .arg(&keys[1])
            .arg(guess)
            .arg(guess.saturating_add(max_messages - 1));
        let mut replies = match pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(&mut self.connection())
            .await
        {
            Ok(replies) => replies.into_iter(),
            // The connection failed: the steps may have run, and a second read would count
            // its deliveries twice. The caller sees the error, as from any step.
            Err(error) if error.is_io_error() || error.is_timeout() => {
                return Err(redis_error(error));
            }
            // The server refused the transaction (out of memory): nothing ran, and the
            // ordinary steps report it or recover from it.
            Err(_) => return Ok(RunRead::default()),
        };
        let mut done = RunRead::default();
        if let Some((_, hex)) = ack {
            // An ack the server refused (no library after a restart, a key of another type)
            // did not run: the caller sends it on its own, which reports or recovers.
            if let Some(Ok(reply)) = replies.next() {
                done.acked = Some(self.after_ack_reply(recipient, hex, reply).await?);
            }
        }
        let (Some(Ok(plan @ Value::Array(_))), Some(Ok(raws))) = (replies.next(), replies.next())
        else {
            // Refused as above: the ordinary read reports it or recovers from it.
            return Ok(done);
        };
        let PlanReply::Run(plan) = PlanReply::parse(plan)? else {
            // The ordinary read that follows remembers the front, if the queue is plain.
            return Ok(done);
        };
        let raws: Vec<Vec<u8>> = redis::from_redis_value(raws)
            .map_err(|_| bad_reply("LRANGE", "the run's records", "strings"))?;
        let n = plan.len as usize;
        if n == 0
            || raws.len() < n
            || appended_before(&raws[0]) != Some(plan.first_cum as f64)
            || appended_before(&raws[n - 1]) != Some(plan.last_cum as f64)
        {
            return Err(bad_reply("plan", "the run", "where the LRANGE found it"));
        }
        let mut records = Vec::with_capacity(n);
        let mut damaged = Vec::new();
        let body_bytes: usize = raws[..n]
            .iter()
            .map(|r| r.len().saturating_sub(HEADER))
            .sum();
        self.shared
            .fronts
            .after_read(recipient, plan.head, true, (body_bytes / n) as u64);
        for (i, raw) in raws.into_iter().take(n).enumerate() {
            let seq = plan.first + i as u64;
            if raw.len() < HEADER {
                damaged.push(Seq(seq));
            } else {
                records.push(decode_record(seq, raw, i64::from(seq <= plan.watermark)));
            }
        }
        done.batch = Some(ReadBatch {
            records,
            expired: Vec::new(),
            damaged,
            lost_unconfirmed: plan.lost_total.saturating_sub(plan.lost_confirmed),
            lost_total: plan.lost_total,
        });
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Generations {
        fn len(&self) -> usize {
            self.newer.len() + self.older.len()
        }
    }

    fn id(i: usize) -> RecipientId {
        RecipientId::new(format!("r{i}")).unwrap()
    }

    const LIMIT: BatchLimit = BatchLimit {
        max_messages: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn going_past_the_bound_forgets_the_least_recently_read_not_all() {
        let fronts = Fronts::default();
        for i in 0..REMEMBERED + 10 {
            fronts.after_read(&id(i), Some(i as u64), true, 100);
        }
        let remembered = fronts.0.lock().len();
        assert!(remembered <= REMEMBERED, "{remembered} fronts held");
        assert!(
            remembered >= REMEMBERED / 2,
            "only {remembered} fronts held"
        );
        // The newest are all still there; the oldest went first.
        for i in REMEMBERED - 100..REMEMBERED + 10 {
            assert_eq!(
                fronts.guess(&id(i), None, LIMIT, None),
                Some(0),
                "front {i} forgotten"
            );
        }
        assert_eq!(fronts.guess(&id(0), None, LIMIT, None), None);
    }

    #[test]
    fn a_front_in_the_older_generation_moves_with_acks_and_reads() {
        let fronts = Fronts::default();
        fronts.after_read(&id(0), Some(10), true, 100);
        for i in 1..=REMEMBERED / 2 {
            fronts.after_read(&id(i), Some(0), true, 100);
        }
        assert!(fronts.0.lock().older.contains_key(&id(0)));
        fronts.after_ack(&id(0), Some(15));
        assert_eq!(fronts.guess(&id(0), Some(Seq(20)), LIMIT, None), Some(6));
        // An ack through 17 in front of the read moves the front to 18 first.
        assert_eq!(
            fronts.guess(&id(0), Some(Seq(20)), LIMIT, Some(Seq(17))),
            Some(3)
        );
        // One behind the front moves nothing.
        assert_eq!(
            fronts.guess(&id(0), Some(Seq(20)), LIMIT, Some(Seq(10))),
            Some(6)
        );
        // A read without a body length keeps the one learned before.
        fronts.after_read(&id(0), Some(16), true, 0);
        assert_eq!(fronts.guess(&id(0), None, LIMIT, None), Some(0));
        fronts.after_read(&id(0), Some(16), false, 100);
        assert_eq!(fronts.guess(&id(0), None, LIMIT, None), None);
        fronts.after_read(&id(1), Some(0), true, 100);
        fronts.after_ack(&id(1), None);
        assert_eq!(fronts.guess(&id(1), None, LIMIT, None), None);
        assert_eq!(fronts.0.lock().len(), REMEMBERED / 2 - 1);
    }

    /// On the server named by `OFFLINE_QUEUE_REDIS_URL` (skipped without it): a cumulative ack
    /// and the read of the plain run after it go in one `MULTI`, and a wrong guess is a miss
    /// that still books the ack.
    #[tokio::test]
    async fn a_cumulative_ack_rides_in_the_run_read() {
        use crate::storage::{NewRecord, Storage};
        let Ok(url) = std::env::var("OFFLINE_QUEUE_REDIS_URL") else {
            eprintln!("skipped: OFFLINE_QUEUE_REDIS_URL is not set");
            return;
        };
        let prefix = format!(
            "oq-unit-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let storage = RedisStorage::options()
            .prefix(prefix)
            .connect(&url)
            .await
            .unwrap();
        let bob = id(1);
        let now = Timestamp::from_millis(1_700_000_000_000);
        let records = (0..8u8)
            .map(|i| NewRecord {
                id: crate::MessageId::generate(),
                dedup: false,
                sent_at: now,
                expires_at: None,
                body: vec![i; 10],
            })
            .collect();
        let quota = crate::Quota::UNLIMITED;
        let appended = storage.append(&bob, records, &quota, now).await.unwrap();
        let seqs: Vec<Seq> = appended.records.iter().map(|a| a.seq()).collect();
        let two = BatchLimit {
            max_messages: 2,
            max_bytes: 1 << 20,
        };
        // The first read learns the front.
        storage
            .read_for_delivery(&bob, None, None, two, now)
            .await
            .unwrap();
        let (hex, keys) = storage.keys(&bob);
        // An ack through `through`, then the run read after `after`, in one MULTI.
        let ack_then_read = async |through: Seq, after: Seq| {
            let ack = Ack {
                through: Some(through),
                ..Ack::default()
            };
            storage
                .read_run(&bob, &keys, Some((&ack, &hex)), Some(after), two, now, true)
                .await
                .unwrap()
        };
        let run = ack_then_read(seqs[1], seqs[1]).await;
        assert_eq!(run.acked, Some(2), "the ack ran in the MULTI");
        let batch = run.batch.expect("the run was where the ack left it");
        let read: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
        assert_eq!(read, [seqs[2], seqs[3]]);
        // A front remembered wrong: the ack still runs and is booked; the read misses.
        storage
            .shared
            .fronts
            .after_read(&bob, Some(seqs[7].0), true, 10);
        let run = ack_then_read(seqs[3], seqs[5]).await;
        assert_eq!(run.acked, Some(2));
        assert!(
            run.batch.is_none(),
            "a wrong guess is a miss, not a wrong batch"
        );
        storage.remove_recipient(&bob).await.unwrap();
    }
}
