//! Group commit: concurrent appends on one node share a transaction and a round trip.
//!
//! `append` hands its job to one gatherer task and waits for its answer. The gatherer runs up
//! to `pool_size` commits at once; while all are busy, jobs wait in the channel, and the next
//! commit takes every job waiting (up to [`PostgresOptions::max_group`] appends and
//! [`GROUP_BYTES`] of bodies). Its appends that need no decision go in one statement that
//! updates no row (`Statements::fast_append`, schema version 6); the rest, and those that
//! statement leaves, in one `oq_append_many` call (`oq_append` for one). A lone append waits
//! for nothing. Each caller is answered only after its group
//! committed, so an Ok is as durable as a single append's. A commit that fails (the connection
//! dropped, the server restarted) fails every append in it with the same error, and none of
//! them was written; when a group takes two commits (some appends through the statement that
//! updates no row, the rest locking), the first one's appends stand whatever the second does.
//! An append refused by its quota does not affect the others.
//!
//! A caller that stops waiting (its future dropped) does not withdraw its append: the group it
//! joined commits it, as a single append whose answer is lost would be.
//!
//! [`PostgresOptions::max_group`]: super::PostgresOptions::max_group

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Pool;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use tokio::sync::Semaphore;

use super::errors::{pg_error, pool_error};
use super::{Shared, append_outcome, to_i64, to_u64};
use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::limits::{Overflow, Quota};
use crate::message::{RecipientId, Seq};
use crate::storage::{AppendOutcome, Appended, NewRecord};

/// Most body bytes one group carries (a larger append still goes, alone).
pub(super) const GROUP_BYTES: usize = 4 << 20;

/// One append waiting for its group.
pub(super) struct Job {
    pub(super) recipient: RecipientId,
    pub(super) records: Vec<NewRecord>,
    pub(super) quota: Quota,
    pub(super) now: Timestamp,
    pub(super) reply: oneshot::Sender<Result<AppendOutcome>>,
}

impl Job {
    fn bytes(&self) -> usize {
        self.records.iter().map(|r| r.body.len()).sum()
    }
}

/// How many commits the appends took, and how many appends they carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupCommitCounts {
    /// Transactions that carried appends (each one round trip and one commit).
    pub commits: u64,
    /// Appends those transactions carried; `appends / commits` is the mean group size.
    pub appends: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    commits: AtomicU64,
    appends: AtomicU64,
}

impl Counters {
    pub(super) fn read(&self) -> GroupCommitCounts {
        GroupCommitCounts {
            commits: self.commits.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
        }
    }
}

/// Starts the gatherer; it ends when every sender (every clone of the storage) is gone.
pub(super) fn start(
    pool: Pool,
    shared: Arc<Shared>,
    in_flight: usize,
    max_group: usize,
) -> mpsc::UnboundedSender<Job> {
    let (sender, receiver) = mpsc::unbounded();
    tokio::spawn(gather(
        pool,
        shared,
        receiver,
        in_flight.max(1),
        max_group.max(1),
    ));
    sender
}

async fn gather(
    pool: Pool,
    shared: Arc<Shared>,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    in_flight: usize,
    max_group: usize,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match receiver.next().await {
                Some(job) => job,
                None => return,
            },
        };
        // Waiting for a free slot is what lets a group form: jobs gather meanwhile.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.bytes();
        let mut group = vec![first];
        while group.len() < max_group {
            let Ok(job) = receiver.try_recv() else {
                break;
            };
            if bytes + job.bytes() > GROUP_BYTES {
                carried = Some(job);
                break;
            }
            bytes += job.bytes();
            group.push(job);
        }
        let (pool, shared) = (pool.clone(), shared.clone());
        tokio::spawn(async move {
            commit(&pool, &shared, group).await;
            drop(permit);
        });
    }
}

/// Runs one group and answers each of its callers.
async fn commit(pool: &Pool, shared: &Shared, group: Vec<Job>) {
    shared
        .counters
        .appends
        .fetch_add(group.len() as u64, Ordering::Relaxed);
    let answers = match run(pool, shared, &group).await {
        Ok(answers) => answers,
        Err(error) => group.iter().map(|_| Err(error.clone())).collect(),
    };
    for (job, answer) in group.into_iter().zip(answers) {
        // A caller that stopped waiting is not told; its append stands.
        let _ = job.reply.send(answer);
    }
}

/// The group's appends that need no decision go in one statement that updates no row
/// ([`fast`]); the rest, and those it leaves, through `oq_append` or `oq_append_many`.
async fn run(pool: &Pool, shared: &Shared, group: &[Job]) -> Result<Vec<Result<AppendOutcome>>> {
    let client = pool.get().await.map_err(pool_error)?;
    let mut answers: Vec<Option<Result<AppendOutcome>>> = group.iter().map(|_| None).collect();
    let candidates = fast_candidates(group);
    if !candidates.is_empty() {
        let jobs: Vec<&Job> = candidates.iter().map(|&k| &group[k]).collect();
        match fast(&client, shared, &jobs).await {
            Ok(done) => {
                if done.iter().any(Option::is_some) {
                    shared.counters.commits.fetch_add(1, Ordering::Relaxed);
                }
                for (&k, outcome) in candidates.iter().zip(done) {
                    answers[k] = outcome.map(Ok);
                }
            }
            // Another group took a seq first, or met this one in a deadlock: the decisions
            // go to the locking path.
            Err(error) if lost_race(&error) => {}
            Err(error) => return Err(pg_error(error)),
        }
    }
    let rest: Vec<&Job> = group
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(job, _)| job)
        .collect();
    if !rest.is_empty() {
        shared.counters.commits.fetch_add(1, Ordering::Relaxed);
        match locking(&client, shared, &rest).await {
            Ok(decided) => {
                let mut decided = decided.into_iter();
                for answer in answers.iter_mut().filter(|answer| answer.is_none()) {
                    *answer = decided.next();
                }
            }
            // Only the appends of this second commit failed: those the first one stored stand
            // and are answered so (told otherwise, their callers would send them again).
            Err(error) => {
                for answer in answers.iter_mut().filter(|answer| answer.is_none()) {
                    *answer = Some(Err(error.clone()));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.ok_or_else(|| broken("an append of a group was not answered")))
        .collect()
}

/// The appends [`fast`] may take: no sender-chosen id to check, no storage-wide budget, and
/// every other append to the same recipient in the group alike (a recipient's appends go one
/// way, in order).
fn fast_candidates(group: &[Job]) -> Vec<usize> {
    let simple = |job: &Job| {
        !job.records.is_empty()
            && job.quota.max_total_bytes.is_none()
            && job.records.iter().all(|record| !record.dedup)
    };
    (0..group.len())
        .filter(|&k| {
            group
                .iter()
                .filter(|other| other.recipient == group[k].recipient)
                .all(simple)
        })
        .collect()
}

/// SQLSTATE 23505 (the unique key: another group took the seq) and 40P01 (a deadlock).
fn lost_race(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            || *code == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// Runs `jobs` through `Statements::fast_append`: per job, its outcome, or `None` where the
/// statement left its recipient to the locking path.
async fn fast(
    client: &deadpool_postgres::Object,
    shared: &Shared,
    jobs: &[&Job],
) -> std::result::Result<Vec<Option<AppendOutcome>>, tokio_postgres::Error> {
    let records = || {
        jobs.iter()
            .flat_map(|j| j.records.iter().map(move |r| (*j, r)))
    };
    // The records' own columns as the locking path sends them; quotas and times per record.
    let params = Params::of(jobs);
    let rids: Vec<&[u8]> = records().map(|(j, _)| j.recipient.as_bytes()).collect();
    let max_messages: Vec<i64> = records()
        .map(|(j, _)| to_i64(j.quota.max_messages))
        .collect();
    let max_bytes: Vec<i64> = records().map(|(j, _)| to_i64(j.quota.max_bytes)).collect();
    let now: Vec<i64> = records().map(|(j, _)| to_i64(j.now.as_millis())).collect();
    let statement = client
        .prepare_cached(&shared.statements.fast_append)
        .await?;
    let row = client
        .query_one(
            &statement,
            &[
                &rids,
                &params.ids,
                &params.sent,
                &params.expires,
                &params.bodies,
                &max_messages,
                &max_bytes,
                &now,
                &&shared.node[..],
                &shared.channel,
            ],
        )
        .await?;
    let seqs: Vec<Option<i64>> = row.try_get(0)?;
    let pending: Vec<Option<i64>> = row.try_get(1)?;
    let elsewhere: Vec<Option<bool>> = row.try_get(2)?;
    let mut first = 0;
    Ok(jobs
        .iter()
        .map(|job| {
            let range = first..first + job.records.len();
            first = range.end;
            let seqs: Option<Vec<i64>> = seqs.get(range.clone())?.iter().copied().collect();
            Some(AppendOutcome {
                records: seqs?
                    .into_iter()
                    .map(|seq| Appended::Stored(Seq(to_u64(seq))))
                    .collect(),
                dropped: 0,
                pending: to_u64(pending.get(range.end - 1).copied().flatten()?),
                live_elsewhere: elsewhere
                    .get(range.start)
                    .copied()
                    .flatten()
                    .unwrap_or(false),
            })
        })
        .collect())
}

/// Runs `group` through `oq_append` (one append) or `oq_append_many`, which lock each queue
/// row and decide dedup, quotas, overflow and the budget.
async fn locking(
    client: &deadpool_postgres::Object,
    shared: &Shared,
    group: &[&Job],
) -> Result<Vec<Result<AppendOutcome>>> {
    if let [job] = group {
        let params = Params::of(group);
        let statement = client
            .prepare_cached(&shared.statements.append)
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one(
                &statement,
                &[
                    &job.recipient.as_bytes(),
                    &params.ids,
                    &params.dedup,
                    &params.sent,
                    &params.expires,
                    &params.bodies,
                    &params.max_messages[0],
                    &params.max_bytes[0],
                    &params.drop_oldest[0],
                    &params.max_total[0],
                    &params.window[0],
                    &params.now[0],
                    &&shared.node[..],
                    &shared.channel,
                ],
            )
            .await
            .map_err(pg_error)?;
        let outcome = Outcomes::single(&row)?;
        return Ok(vec![outcome.answer(0, 0, job)]);
    }
    let params = Params::of(group);
    let rids: Vec<&[u8]> = group.iter().map(|j| j.recipient.as_bytes()).collect();
    let counts: Vec<i32> = group
        .iter()
        .map(|j| i32::try_from(j.records.len()).unwrap_or(i32::MAX))
        .collect();
    let statement = client
        .prepare_cached(&shared.statements.append_many)
        .await
        .map_err(pg_error)?;
    let row = client
        .query_one(
            &statement,
            &[
                &rids,
                &counts,
                &params.ids,
                &params.dedup,
                &params.sent,
                &params.expires,
                &params.bodies,
                &params.max_messages,
                &params.max_bytes,
                &params.drop_oldest,
                &params.max_total,
                &params.window,
                &params.now,
                &&shared.node[..],
                &shared.channel,
            ],
        )
        .await
        .map_err(pg_error)?;
    let outcomes = Outcomes::many(&row)?;
    let records: usize = group.iter().map(|j| j.records.len()).sum();
    if outcomes.status.len() != group.len() || outcomes.seqs.len() != records {
        return Err(broken(
            "oq_append_many returned one outcome per append and record",
        ));
    }
    let mut first = 0;
    Ok(group
        .iter()
        .enumerate()
        .map(|(k, job)| {
            let answer = outcomes.answer(k, first, job);
            first += job.records.len();
            answer
        })
        .collect())
}

/// A group's parameters: records flat, quotas and times per append.
struct Params<'a> {
    ids: Vec<Vec<u8>>,
    dedup: Vec<bool>,
    sent: Vec<i64>,
    expires: Vec<Option<i64>>,
    bodies: Vec<&'a [u8]>,
    max_messages: Vec<i64>,
    max_bytes: Vec<i64>,
    drop_oldest: Vec<bool>,
    max_total: Vec<Option<i64>>,
    window: Vec<i64>,
    now: Vec<i64>,
}

impl<'a> Params<'a> {
    fn of(group: &[&'a Job]) -> Self {
        let records = || group.iter().flat_map(|j| j.records.iter());
        Self {
            ids: records().map(|r| r.id.to_bytes().to_vec()).collect(),
            dedup: records().map(|r| r.dedup).collect(),
            sent: records().map(|r| to_i64(r.sent_at.as_millis())).collect(),
            expires: records()
                .map(|r| r.expires_at.map(|t| to_i64(t.as_millis())))
                .collect(),
            bodies: records().map(|r| &r.body[..]).collect(),
            max_messages: group.iter().map(|j| to_i64(j.quota.max_messages)).collect(),
            max_bytes: group.iter().map(|j| to_i64(j.quota.max_bytes)).collect(),
            drop_oldest: group
                .iter()
                .map(|j| j.quota.overflow == Overflow::DropOldest)
                .collect(),
            max_total: group
                .iter()
                .map(|j| j.quota.max_total_bytes.map(to_i64))
                .collect(),
            window: group
                .iter()
                .map(|j| to_i64(j.quota.dedup_window_ms()))
                .collect(),
            now: group.iter().map(|j| to_i64(j.now.as_millis())).collect(),
        }
    }
}

/// What `oq_append` or `oq_append_many` returned, per append (a single append as a group of
/// one).
struct Outcomes {
    status: Vec<i16>,
    seqs: Vec<Option<i64>>,
    duplicate: Vec<bool>,
    dropped: Vec<Option<i64>>,
    pending: Vec<Option<i64>>,
    have_messages: Vec<Option<i64>>,
    have_bytes: Vec<Option<i64>>,
    adding: Vec<Option<i64>>,
    adding_bytes: Vec<Option<i64>>,
    elsewhere: Vec<Option<bool>>,
}

impl Outcomes {
    fn single(row: &tokio_postgres::Row) -> Result<Self> {
        let one = |i: usize| -> Result<Vec<Option<i64>>> {
            Ok(vec![row.try_get::<_, Option<i64>>(i).map_err(pg_error)?])
        };
        Ok(Self {
            status: vec![row.try_get(0).map_err(pg_error)?],
            seqs: row
                .try_get::<_, Option<Vec<Option<i64>>>>(1)
                .map_err(pg_error)?
                .unwrap_or_default(),
            duplicate: row
                .try_get::<_, Option<Vec<bool>>>(2)
                .map_err(pg_error)?
                .unwrap_or_default(),
            dropped: one(3)?,
            pending: one(4)?,
            have_messages: one(5)?,
            have_bytes: one(6)?,
            adding: one(7)?,
            adding_bytes: one(8)?,
            elsewhere: vec![row.try_get(9).map_err(pg_error)?],
        })
    }

    fn many(row: &tokio_postgres::Row) -> Result<Self> {
        let all = |i: usize| -> Result<Vec<Option<i64>>> {
            row.try_get::<_, Vec<Option<i64>>>(i).map_err(pg_error)
        };
        Ok(Self {
            status: row.try_get(0).map_err(pg_error)?,
            seqs: all(1)?,
            duplicate: row.try_get(2).map_err(pg_error)?,
            dropped: all(3)?,
            pending: all(4)?,
            have_messages: all(5)?,
            have_bytes: all(6)?,
            adding: all(7)?,
            adding_bytes: all(8)?,
            elsewhere: row.try_get(9).map_err(pg_error)?,
        })
    }

    /// The answer for append `k`, whose records start at `first` in the flat arrays.
    fn answer(&self, k: usize, first: usize, job: &Job) -> Result<AppendOutcome> {
        let number = |v: &Vec<Option<i64>>| v.get(k).copied().flatten();
        let range = first..first + job.records.len();
        let (Some(seqs), Some(duplicate)) =
            (self.seqs.get(range.clone()), self.duplicate.get(range))
        else {
            return Err(broken("oq_append returned one outcome per record"));
        };
        let mut outcome = append_outcome(
            self.status.get(k).copied().unwrap_or(-1),
            seqs,
            duplicate,
            [
                number(&self.dropped),
                number(&self.pending),
                number(&self.have_messages),
                number(&self.have_bytes),
                number(&self.adding),
                number(&self.adding_bytes),
            ],
            &job.quota,
        )?;
        outcome.live_elsewhere = self.elsewhere.get(k).copied().flatten().unwrap_or(false);
        Ok(outcome)
    }
}

fn broken(what: &str) -> Error {
    Error::storage_msg(Retry::No, format!("postgres: {what}"))
}
