//! Reads of a run that bring no record into Lua. Bringing a record into a function from
//! `LRANGE`, and replying with it, cost about 1 µs per record of the server's time: most of
//! a read. When the records after the cursor are a plain run (nothing removed in the middle,
//! deadlines in seq order, no explicit delivery counts; the common case), `plan.lua` checks
//! the run by the records at its two ends and counts its deliveries, and an `LRANGE` in the
//! same `MULTI` hands the records over as Redis stores them.
//!
//! The `LRANGE` needs the run's index in the list before the function runs, so each storage
//! remembers the front seq of the queues it read or acked lately (a bounded map; a wrong or
//! missing guess costs one ordinary read, and the miss tells the right front). On a cluster
//! reads go the ordinary way.

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::Value;

use super::{Connection, HEADER, LUA_MAX, RedisStorage, bad_reply, count, decode_record, text};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::limits::BatchLimit;
use crate::message::{RecipientId, Seq};
use crate::storage::ReadBatch;

/// Queues whose front is remembered; past this the map starts over.
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

/// The fronts of plain queues read or acked lately.
#[derive(Default)]
pub(super) struct Fronts(Mutex<HashMap<RecipientId, Front>>);

impl Fronts {
    /// After a read: remembers `recipient`'s front, `head`, and the mean body length of the
    /// batch, if the queue is `plain` (a run `plan.lua` can take); else forgets it.
    pub fn after_read(&self, recipient: &RecipientId, head: i64, plain: bool, mean_body: u64) {
        let mut fronts = self.0.lock();
        if head < 0 || !plain {
            fronts.remove(recipient);
            return;
        }
        if fronts.len() >= REMEMBERED && !fronts.contains_key(recipient) {
            fronts.clear();
        }
        let front = fronts.entry(recipient.clone()).or_insert(Front {
            head: 0,
            mean_body: 0,
        });
        front.head = head as u64;
        if mean_body > 0 {
            front.mean_body = mean_body;
        }
    }

    /// After an ack: moves a remembered front (`head` < 0: the queue is gone).
    pub fn after_ack(&self, recipient: &RecipientId, head: i64) {
        let mut fronts = self.0.lock();
        if head < 0 {
            fronts.remove(recipient);
        } else if let Some(front) = fronts.get_mut(recipient) {
            front.head = head as u64;
        }
    }

    /// The list index of the first record after `after`, when the front is remembered and
    /// the batch is likely bounded by its count, not its bytes (the `LRANGE` fetches a whole
    /// count of records; a byte bound that cuts far below it would waste the rest).
    fn guess(&self, recipient: &RecipientId, after: Option<Seq>, limit: BatchLimit) -> Option<u64> {
        let front = *self.0.lock().get(recipient)?;
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

impl RedisStorage {
    /// The batch, when the queue holds a plain run after `after` where it was guessed to;
    /// `None`: read the ordinary way.
    pub(super) async fn read_run(
        &self,
        recipient: &RecipientId,
        keys: &[String; 7],
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<Option<ReadBatch>> {
        if matches!(self.shared.connection, Connection::Cluster(_)) {
            return Ok(None);
        }
        let Some(guess) = self.shared.fronts.guess(recipient, after, limit) else {
            return Ok(None);
        };
        let max_messages = (limit.max_messages as u64).clamp(1, MOST);
        let mut plan = self.shared.steps.plan.command(&keys[..]);
        plan.arg(after.map_or(-1, |s| s.0 as i64))
            .arg(max_messages)
            .arg((limit.max_bytes as u64).min(LUA_MAX))
            .arg(now.as_millis())
            .arg(u8::from(mark))
            .arg(guess);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(plan)
            .cmd("LRANGE")
            .arg(&keys[1])
            .arg(guess)
            .arg(guess.saturating_add(max_messages - 1));
        let (plan, raws) = match pipe
            .query_async::<(Value, Vec<Vec<u8>>)>(&mut self.connection())
            .await
        {
            Ok(reply) => reply,
            // The connection failed: the step may have run, and a second read would count
            // its deliveries twice. The caller sees the error, as from any step.
            Err(error) if error.is_io_error() || error.is_timeout() => {
                return Err(super::redis_error(error));
            }
            // The server refused (no library after a restart, out of memory: MULTI ran
            // nothing): the ordinary read reports it or recovers from it.
            Err(_) => return Ok(None),
        };
        let Value::Array(plan) = plan else {
            return Err(bad_reply("an array"));
        };
        if text(plan.first())? != "run" {
            // The ordinary read that follows remembers the front, if the queue is plain.
            return Ok(None);
        }
        let lost_total = count(plan.get(1))?;
        let lost_confirmed = count(plan.get(2))?;
        let watermark = count(plan.get(3))?;
        let first = count(plan.get(4))?;
        let n = count(plan.get(5))? as usize;
        let (first_cum, last_cum) = (count(plan.get(6))?, count(plan.get(7))?);
        let cum = |raw: &[u8]| {
            raw.get(..8)
                .map(|b| f64::from_be_bytes(b.try_into().unwrap()))
        };
        if n == 0
            || raws.len() < n
            || cum(&raws[0]) != Some(first_cum as f64)
            || cum(&raws[n - 1]) != Some(last_cum as f64)
        {
            return Err(bad_reply("the run its plan described"));
        }
        let mut records = Vec::with_capacity(n);
        let mut damaged = Vec::new();
        let body_bytes: usize = raws[..n]
            .iter()
            .map(|r| r.len().saturating_sub(HEADER))
            .sum();
        let head = super::int(plan.get(8))?;
        self.shared
            .fronts
            .after_read(recipient, head, true, (body_bytes / n) as u64);
        for (i, raw) in raws.into_iter().take(n).enumerate() {
            let seq = first + i as u64;
            if raw.len() < HEADER {
                damaged.push(Seq(seq));
            } else {
                records.push(decode_record(seq, raw, i64::from(seq <= watermark)));
            }
        }
        Ok(Some(ReadBatch {
            records,
            expired: Vec::new(),
            damaged,
            lost: lost_total.saturating_sub(lost_confirmed),
            lost_total,
        }))
    }
}
