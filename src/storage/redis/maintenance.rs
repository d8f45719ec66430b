//! Bookkeeping beside the steps: the storage-wide byte counter and its reservations, the
//! index buckets (queues by earliest deadline and by last activity), and the walks over
//! them that purge expired records and remove idle queues.

use redis::Value;

use super::errors::redis_error;
use super::library::LUA_MAX;
use super::replies::{Filing, IdleReply, NONE, PurgeReply, ReserveReply};
use super::{RedisStorage, keys};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::message::RecipientId;
use crate::storage::PurgeOutcome;

/// What a walk over an index bucket did with one queue.
#[derive(Default)]
struct Visit {
    /// Budget the queue cost.
    spent: usize,
    /// Body bytes freed, off the storage-wide counter.
    freed: i64,
    /// The queue's new score in the index (`None`: out of it).
    refile: Option<u64>,
    /// Expired records removed.
    expired: u64,
    /// Idle queues removed.
    idle_recipients: u64,
    /// Entries looked at inside the queue.
    examined: u64,
}

impl RedisStorage {
    /// Adds `delta` to the storage-wide byte counter, when it is kept.
    pub(super) async fn count_bytes(&self, delta: i64) -> Result<()> {
        if !self.shared.options.track_total_bytes || delta == 0 {
            return Ok(());
        }
        redis::cmd("INCRBY")
            .arg(keys::total_bytes(&self.shared.options.prefix))
            .arg(delta)
            .exec_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// Files the queue in the idle index and the deadline index (no later than the
    /// deadline), where the step asked for it.
    pub(super) async fn file(&self, hex: &str, filing: Filing) -> Result<()> {
        if filing.idle.is_none() && filing.deadline.is_none() {
            return Ok(());
        }
        let prefix = &self.shared.options.prefix;
        let bucket = keys::bucket(hex);
        let mut pipe = redis::pipe();
        if let Some(touched) = filing.idle {
            pipe.cmd("ZADD")
                .arg(keys::idle_index(prefix, bucket))
                .arg(touched)
                .arg(hex)
                .ignore();
        }
        if let Some(deadline) = filing.deadline {
            pipe.cmd("ZADD")
                .arg(keys::deadline_index(prefix, bucket))
                .arg("LT")
                .arg(deadline)
                .arg(hex)
                .ignore();
        }
        pipe.exec_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// Bookkeeping after a committed step: the byte counter and the index entries. A failure
    /// is logged, not returned: the step itself stands. An index entry that could not be
    /// written is written by the queue's next step that asks for it (the queue's metadata is
    /// told to forget what it filed).
    pub(super) async fn after_commit(
        &self,
        recipient: &RecipientId,
        hex: &str,
        delta: i64,
        filing: Filing,
    ) {
        if let Err(error) = self.count_bytes(delta).await {
            tracing::warn!(%recipient, %error, "byte counter update failed");
        }
        if let Err(error) = self.file(hex, filing).await {
            tracing::warn!(%recipient, %error, "index update failed");
            let keys = keys::recipient_keys(&self.shared.options.prefix, hex);
            let forget: redis::RedisResult<i64> = self
                .shared
                .steps
                .forget
                .key(&keys[..])
                .invoke_async(&mut self.connection())
                .await;
            if let Err(error) = forget {
                tracing::warn!(%recipient, %error, "index state reset failed");
            }
        }
    }

    /// Up to `limit` queues of an index filed at or below `upper` (a score, or `(score` for
    /// strictly below), with their scores when `T` asks for them.
    pub(super) async fn filed_before<T: redis::FromRedisValue>(
        &self,
        index: &str,
        upper: String,
        limit: usize,
        with_scores: bool,
    ) -> Result<T> {
        let mut command = redis::cmd("ZRANGEBYSCORE");
        command.arg(index).arg("-inf").arg(upper);
        if with_scores {
            command.arg("WITHSCORES");
        }
        command
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.connection())
            .await
            .map_err(redis_error)
    }

    /// Walks one index bucket: the queues filed at or below `upper` (a score, or `(score` for
    /// strictly below), each through `visit` (given the queue's keys, its name and its share
    /// of the budget), while budget is left. Each queue's entry then moves where the visit
    /// says, but only if it still holds the score found, so an append that filed the queue
    /// meanwhile keeps its entry. Returns the budget left.
    ///
    /// The queues of one index read (up to 64) are visited at once, their round trips
    /// overlapping (on a cluster too: each goes to its queue's node), each within its share of
    /// the budget left, so together they never spend more than it. A queue whose share ran
    /// out stays due in the index and is read again on the next turn.
    async fn walk_bucket<F, Fut>(
        &self,
        index: &str,
        upper: String,
        mut left: usize,
        outcome: &mut PurgeOutcome,
        mut visit: F,
    ) -> Result<usize>
    where
        F: FnMut([String; 7], String, usize) -> Fut,
        Fut: Future<Output = Result<Visit>>,
    {
        let prefix = &self.shared.options.prefix;
        while left > 0 {
            let filed: Vec<(String, f64)> = self
                .filed_before(index, upper.clone(), left.min(64), true)
                .await?;
            if filed.is_empty() {
                break;
            }
            // `filed` holds at most `left` queues: each share is at least 1.
            let (base, extra) = (left / filed.len(), left % filed.len());
            let visits =
                futures::future::join_all(filed.iter().enumerate().map(|(i, (hex, _))| {
                    let keys = keys::recipient_keys(prefix, hex);
                    visit(keys, hex.clone(), base + usize::from(i < extra))
                }))
                .await;
            // What the visits that succeeded did is counted and filed before any error is
            // returned: the byte counter must hear of every record removed.
            let mut freed = 0;
            let mut refiles = Vec::new();
            let mut failed = None;
            for ((hex, seen), visited) in filed.into_iter().zip(visits) {
                let visited = match visited {
                    Ok(visited) => visited,
                    Err(error) => {
                        failed.get_or_insert(error);
                        continue;
                    }
                };
                left = left.saturating_sub(visited.spent);
                // The index entry, and what the step looked at inside the queue.
                outcome.examined += 1 + visited.examined;
                outcome.expired += visited.expired;
                outcome.idle_recipients += visited.idle_recipients;
                freed += visited.freed;
                let score = visited.refile.map_or(NONE, |score| score as i64);
                refiles.push(async move {
                    let refiled: redis::RedisResult<i64> = self
                        .shared
                        .steps
                        .refile
                        .key(index)
                        .arg(&hex)
                        .arg(seen)
                        .arg(score)
                        .invoke_async(&mut self.connection())
                        .await;
                    refiled.map_err(redis_error)
                });
            }
            self.count_freed(index, freed).await;
            for refiled in futures::future::join_all(refiles).await {
                if let Err(error) = refiled {
                    failed.get_or_insert(error);
                }
            }
            if let Some(error) = failed {
                return Err(error);
            }
        }
        Ok(left)
    }

    /// Purges the queues of one deadline bucket with something due; returns the budget left.
    pub(super) async fn purge_expired(
        &self,
        bucket: u32,
        now: Timestamp,
        left: usize,
        outcome: &mut PurgeOutcome,
    ) -> Result<usize> {
        let index = keys::deadline_index(&self.shared.options.prefix, bucket);
        let now = now.as_millis();
        let purge = move |keys: [String; 7], hex: String, left: usize| async move {
            let purged: redis::RedisResult<Value> = self
                .shared
                .steps
                .purge
                .key(&keys[..])
                .arg(now)
                .arg(left)
                .invoke_async(&mut self.connection())
                .await;
            match purged {
                // The step removed every due deadline, so the entry moves past now (or goes):
                // each round progresses.
                Ok(reply) => {
                    let purged = PurgeReply::parse(reply)?;
                    Ok(Visit {
                        spent: purged.removed as usize,
                        freed: purged.freed,
                        refile: purged.earliest,
                        expired: purged.removed,
                        idle_recipients: 0,
                        examined: purged.examined,
                    })
                }
                Err(error) if redis_error(error.clone()).is_retryable() => Err(redis_error(error)),
                Err(error) => {
                    // Not ours to purge (someone else's data): out of the index, so it cannot
                    // stop the rest.
                    tracing::warn!(queue = %hex, %error, "purge skipped a queue");
                    Ok(Visit::default())
                }
            }
        };
        self.walk_bucket(&index, now.to_string(), left, outcome, purge)
            .await
    }

    /// Removes the queues of one idle bucket untouched since `before`; returns the budget left.
    pub(super) async fn remove_idle(
        &self,
        bucket: u32,
        before: Timestamp,
        left: usize,
        outcome: &mut PurgeOutcome,
    ) -> Result<usize> {
        let index = keys::idle_index(&self.shared.options.prefix, bucket);
        let before = before.as_millis();
        let remove = move |keys: [String; 7], _hex: String, _left: usize| async move {
            let reply: Value = self
                .shared
                .steps
                .idle
                .key(&keys[..])
                .arg(before)
                .invoke_async(&mut self.connection())
                .await
                .map_err(redis_error)?;
            Ok(match IdleReply::parse(reply)? {
                // Active since it was filed: filed again under its latest activity. Refiling
                // is a round trip too: a call's budget bounds it.
                IdleReply::Active { touched } => Visit {
                    spent: 1,
                    refile: Some(touched),
                    ..Visit::default()
                },
                // Gone: out of the index.
                IdleReply::Absent => Visit {
                    spent: 1,
                    ..Visit::default()
                },
                IdleReply::Removed { records, freed } => Visit {
                    spent: (records as usize).max(1),
                    freed,
                    idle_recipients: 1,
                    ..Visit::default()
                },
            })
        };
        self.walk_bucket(&index, format!("({before}"), left, outcome, remove)
            .await
    }

    /// Whether any bucket still holds a queue with something due, or an idle one.
    pub(super) async fn anything_due(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
    ) -> Result<bool> {
        let prefix = &self.shared.options.prefix;
        for bucket in 0..keys::BUCKETS {
            let index = keys::deadline_index(prefix, bucket);
            let due: Vec<String> = self
                .filed_before(&index, now.as_millis().to_string(), 1, false)
                .await?;
            if !due.is_empty() {
                return Ok(true);
            }
            if let Some(before) = idle_before {
                let index = keys::idle_index(prefix, bucket);
                let upper = format!("({}", before.as_millis());
                let idle: Vec<String> = self.filed_before(&index, upper, 1, false).await?;
                if !idle.is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Takes bytes a purge freed in the queues of `index` off the storage-wide counter; a
    /// failure is logged (the purge stands).
    async fn count_freed(&self, index: &str, freed: i64) {
        if let Err(error) = self.count_bytes(-freed).await {
            tracing::warn!(%index, %error, "byte counter update failed");
        }
    }

    /// Reserves `adding` bytes of the storage-wide budget before an append.
    pub(super) async fn reserve(&self, adding: u64, max: u64) -> Result<()> {
        let reply: Value = self
            .shared
            .steps
            .reserve
            .key(keys::total_bytes(&self.shared.options.prefix))
            .arg(adding)
            .arg(max.min(LUA_MAX))
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let reply = ReserveReply::parse(reply)?;
        if reply.reserved {
            Ok(())
        } else {
            Err(Error::StorageFull {
                used: reply.used,
                adding,
                max,
            })
        }
    }
}
