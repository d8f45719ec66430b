//! The writer thread: gathers concurrent writes into groups, one transaction and one fsync
//! each, and answers every caller once its group is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use futures::channel::oneshot;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::layout::RETIRED;
use super::write_steps::{
    SWEEP_STEP, Tables, ack_records, append, count_read, mark_delivered, meta_get, open_tables,
    purge, remove_recipient, sweep_retired,
};
use super::{damaged, db_error};
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{RecipientId, Seq};
use crate::storage::{Ack, AppendOutcome, NewRecord, PurgeOutcome, ReadBatch};

/// Longest the writer waits to gather a group as large as the last one.
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(200);
/// How long the writer must have had nothing to do before it deletes retired `log` rows.
const SWEEP_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(20);
/// Idle sweep steps committed without an fsync before one is synced: bounds the unsynced
/// work a write arriving after them pays for with its own commit.
const SYNC_EVERY_SWEEPS: u32 = 16;
/// What the writer thread is asked to do.
pub(super) enum Request {
    /// A write, applied in a group.
    Job(Job),
    /// Compaction, run on its own between groups.
    Compact(oneshot::Sender<Result<bool>>),
}

pub(super) enum Job {
    Append {
        recipient: RecipientId,
        records: Vec<NewRecord>,
        quota: Quota,
        now: u64,
        reply: oneshot::Sender<Result<AppendOutcome>>,
    },
    MarkDelivered {
        recipient: RecipientId,
        seqs: Vec<Seq>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The hand-overs of a read for delivery done outside the writer (no ack): `seqs`
    /// returned, `expired` passed over, read after `after`.
    CountRead {
        recipient: RecipientId,
        after: Option<Seq>,
        seqs: Vec<Seq>,
        expired: Vec<Seq>,
        reply: oneshot::Sender<Result<()>>,
    },
    Ack {
        recipient: RecipientId,
        ack: Ack,
        now: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// An ack, then a read for delivery (counted), in the same group.
    AckAndRead {
        recipient: RecipientId,
        ack: Ack,
        after: Option<Seq>,
        limit: BatchLimit,
        now: u64,
        reply: oneshot::Sender<Result<(u64, ReadBatch)>>,
    },
    Purge {
        now: u64,
        idle_before: Option<u64>,
        budget: usize,
        reply: oneshot::Sender<Result<PurgeOutcome>>,
    },
    Remove {
        recipient: RecipientId,
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// An answer computed inside the group's transaction, sent once the commit is durable.
enum Answer {
    Append(
        oneshot::Sender<Result<AppendOutcome>>,
        Result<AppendOutcome>,
    ),
    Unit(oneshot::Sender<Result<()>>, Result<()>),
    Count(oneshot::Sender<Result<u64>>, Result<u64>),
    Purge(oneshot::Sender<Result<PurgeOutcome>>, Result<PurgeOutcome>),
    /// With whether an error must end the group: not when only the read failed on damaged
    /// data (it wrote nothing; the ack before it stands, and other callers go on).
    AckRead(
        oneshot::Sender<Result<(u64, ReadBatch)>>,
        Result<(u64, ReadBatch)>,
        bool,
    ),
}

impl Answer {
    /// Sends the answer, or `error` instead of a success when the commit failed.
    fn send(self, failed: Option<&Error>) {
        fn pick<T>(result: Result<T>, failed: Option<&Error>) -> Result<T> {
            match (result, failed) {
                (Ok(_), Some(error)) => Err(error.clone()),
                (result, _) => result,
            }
        }
        // A caller that stopped waiting is not an error.
        let _ = match self {
            Answer::Append(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Answer::Unit(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Answer::Count(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Answer::Purge(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Answer::AckRead(tx, r, _) => tx.send(pick(r, failed)).map_err(drop),
        };
    }
}

/// The writer thread: applies groups of jobs in one transaction each.
pub(super) struct Writer {
    db: SharedDb,
    path: PathBuf,
    cache_bytes: usize,
    max_group: usize,
    /// Set after a write failed on I/O: the next group reopens the file first.
    needs_reopen: bool,
    /// False on a custom backend, which has no path to reopen.
    reopenable: bool,
    /// Sweep steps committed without an fsync since the last synced commit.
    unsynced_sweeps: u32,
}

/// The database, shared by readers and the writer, which replaces it when it reopens.
pub(super) type SharedDb = Arc<parking_lot::RwLock<Option<Arc<Database>>>>;

impl Writer {
    pub(super) fn new(db: SharedDb, path: PathBuf, cache_bytes: usize, max_group: usize) -> Self {
        Self {
            db,
            path,
            cache_bytes,
            max_group,
            needs_reopen: false,
            reopenable: true,
            unsynced_sweeps: 0,
        }
    }

    pub(super) fn reopenable(mut self, reopenable: bool) -> Self {
        self.reopenable = reopenable;
        self
    }

    /// Takes the database out of the shared slot, then waits (5 s at most) for reads in
    /// flight to let go of it; new reads get a retryable error until it is put back.
    fn take_database(&self) -> Option<Arc<Database>> {
        let old = self.db.write().take()?;
        // Readers hold the handle for one read at most.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Some(old)
    }

    /// Closes and reopens the file after an I/O failure (redb refuses writes until then; the
    /// reopen recovers to the last durable commit).
    fn reopen(&mut self) -> Result<()> {
        if !self.reopenable {
            return Err(Error::storage_msg(
                Retry::No,
                format!(
                    "{}: a write failed on I/O, and a custom backend cannot be reopened",
                    self.path.display()
                ),
            ));
        }
        if let Some(old) = self.take_database() {
            // The file lock goes with the last handle.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(old)));
        }
        let reopened = std::panic::catch_unwind(|| {
            Database::builder()
                .set_cache_size(self.cache_bytes)
                .create(&self.path)
                .map_err(db_error)
        })
        .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)))?;
        *self.db.write() = Some(Arc::new(reopened));
        self.needs_reopen = false;
        tracing::info!(path = %self.path.display(), "redb file reopened after a write failure");
        Ok(())
    }

    pub(super) fn run(mut self, inbox: mpsc::Receiver<Request>) {
        let mut last_group = 1;
        // A compaction that arrived while a group gathered runs right after its commit.
        let mut held_back = None;
        // Whether retired `log` rows may be waiting (the file may hold some when opened), and
        // whether the writer has had nothing to do since its last sweep.
        let mut retired_waiting = true;
        let mut idle = false;
        loop {
            let request = match held_back.take() {
                Some(reply) => Request::Compact(reply),
                // Sweeps wait until nothing has come for a moment: between the groups of a
                // busy drain they would take the writer's time from the groups. Then they go
                // on, a step at a time, while nothing comes; a write waits for one step at most.
                None if retired_waiting => {
                    let wait = if idle {
                        std::time::Duration::ZERO
                    } else {
                        SWEEP_AFTER_IDLE
                    };
                    match inbox.recv_timeout(wait) {
                        Ok(request) => request,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            retired_waiting = self.idle_sweep_step();
                            idle = true;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match inbox.recv() {
                    Ok(request) => request,
                    Err(_) => return,
                },
            };
            idle = false;
            retired_waiting = true;
            match request {
                Request::Compact(reply) => {
                    // A caller that stopped waiting is not an error.
                    let _ = reply.send(self.compact());
                }
                Request::Job(first) => {
                    last_group = self.commit_group(first, &inbox, last_group, &mut held_back);
                    // A group's commit syncs whatever sweeps left unsynced.
                    self.unsynced_sweeps = 0;
                }
            }
        }
    }

    /// One step of the writer's idle sweep (see [`Writer::sweep_step`]); a failure is logged
    /// and left for the next group, which reopens the file if it must: the rows stay retired
    /// and are swept later. Returns whether more may wait.
    fn idle_sweep_step(&mut self) -> bool {
        if self.needs_reopen {
            return false;
        }
        self.sweep_step(false).unwrap_or_else(|error| {
            tracing::error!(%error, "redb: deleting retired records failed");
            self.needs_reopen |= error.is_retryable();
            false
        })
    }

    /// Deletes up to [`SWEEP_STEP`] retired `log` rows (more past the high marks) in a
    /// transaction of its own; returns whether more may wait. Committed without an fsync
    /// unless `durable`, it is the last step of a run, or [`SYNC_EVERY_SWEEPS`] steps went
    /// unsynced: a step lost in a crash leaves its rows retired, swept again later, and the
    /// pages such a commit frees are reused only after a synced one.
    fn sweep_step(&mut self, durable: bool) -> Result<bool> {
        let Some(db) = self.db.read().clone() else {
            return Ok(false);
        };
        let unsynced = self.unsynced_sweeps;
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(u64, bool)> {
                // Mostly there is nothing retired: a read says so without a commit.
                let read = db.begin_read().map_err(db_error)?;
                let retired = read.open_table(RETIRED).map_err(db_error)?;
                if retired.first().map_err(db_error)?.is_none() {
                    return Ok((0, true));
                }
                drop((retired, read));
                let mut txn = db.begin_write().map_err(db_error)?;
                let swept = {
                    let mut tables = open_tables(&txn)?;
                    let swept = sweep_retired(&mut tables, SWEEP_STEP)?;
                    tables.finish()?;
                    swept
                };
                let last = swept < SWEEP_STEP as u64;
                let synced = durable || last || unsynced + 1 >= SYNC_EVERY_SWEEPS;
                if !synced && txn.set_durability(redb::Durability::None).is_err() {
                    tracing::debug!("redb: a sweep without an fsync was refused; syncing it");
                }
                txn.commit().map_err(db_error)?;
                Ok((swept, synced))
            }))
            .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)));
        let (swept, synced) = outcome?;
        self.unsynced_sweeps = if synced { 0 } else { unsynced + 1 };
        Ok(swept == SWEEP_STEP as u64)
    }

    /// Rewrites the file so that freed pages go back to the file system.
    fn compact(&mut self) -> Result<bool> {
        if self.needs_reopen {
            self.reopen()?;
        }
        // Retired records first: their rows hold the space compaction is asked to free (and
        // synced, or redb would not free their pages).
        while self.sweep_step(true)? {}
        let Some(mut db) = self.take_database() else {
            return Err(Error::storage_msg(
                Retry::Yes,
                format!("{}: not open", self.path.display()),
            ));
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Arc::get_mut(&mut db)
                .map(|db| db.compact().map_err(db_error))
                .transpose()
        }))
        .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)));
        *self.db.write() = Some(db);
        match outcome {
            Ok(Some(changed)) => Ok(changed),
            // Nothing happened to the file: it is served as it was.
            Ok(None) => Err(Error::storage_msg(
                Retry::Yes,
                format!(
                    "{}: reads held the file for 5 s; compact again later",
                    self.path.display()
                ),
            )),
            Err(error) => {
                // Failed partway (I/O, or a panic inside redb): reopen at the last commit
                // before the next write.
                tracing::error!(%error, "redb compaction failed");
                self.needs_reopen = true;
                Err(error)
            }
        }
    }

    /// Commits one group, starting with `first`; returns how many jobs it held.
    fn commit_group(
        &mut self,
        first: Job,
        inbox: &mpsc::Receiver<Request>,
        last_group: usize,
        held_back: &mut Option<oneshot::Sender<Result<bool>>>,
    ) -> usize {
        if self.needs_reopen
            && let Err(error) = self.reopen()
        {
            tracing::error!(%error, "redb reopen failed; failing this write");
            failed_answer(first, &error).send(None);
            return 1;
        }
        let mut answers = Vec::with_capacity(last_group);
        // A panic inside redb (a damaged file) fails this group; callers whose jobs had not
        // been answered yet see their reply dropped, which is an error too.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.apply(first, inbox, last_group, &mut answers, held_back)
        }))
        .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)));
        let failed = outcome.err();
        if let Some(error) = &failed {
            tracing::error!(%error, callers = answers.len(), "redb group commit failed");
            self.needs_reopen |= error.is_retryable();
        }
        let held = answers.len().max(1);
        for answer in answers {
            answer.send(failed.as_ref());
        }
        held
    }

    /// Applies `first` and every job that arrives while the group gathers, in one
    /// transaction, and commits it. Jobs are applied as they arrive, so the writer works while
    /// callers are still submitting. A job's own error (a full queue) leaves the transaction
    /// untouched by that job; a storage error ends the group and fails it whole.
    fn apply(
        &self,
        first: Job,
        inbox: &mpsc::Receiver<Request>,
        last_group: usize,
        answers: &mut Vec<Answer>,
        held_back: &mut Option<oneshot::Sender<Result<bool>>>,
    ) -> Result<()> {
        let db = self
            .db
            .read()
            .clone()
            .expect("open unless reopening, which this thread does");
        let txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                let error = db_error(e);
                answers.push(failed_answer(first, &error));
                return Err(error);
            }
        };
        let mut storage_error = None;
        {
            let mut tables = match open_tables(&txn) {
                Ok(tables) => tables,
                Err(error) => {
                    answers.push(failed_answer(first, &error));
                    return Err(error);
                }
            };
            // Callers answered by the last commit are still submitting their next writes, so
            // if fewer than last time have arrived, wait a moment (far shorter than an fsync)
            // for them: groups stay large instead of alternating small and large. A lone
            // caller (last group of one) never waits.
            let deadline = std::time::Instant::now() + GATHER_WAIT;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                let (answer, contained) = apply_job(&mut tables, job, &self.path);
                if !contained {
                    storage_error = answer_storage_error(&answer);
                }
                answers.push(answer);
                if storage_error.is_some() || answers.len() >= self.max_group {
                    break;
                }
                let request = match inbox.try_recv() {
                    Ok(request) => Some(request),
                    Err(mpsc::TryRecvError::Empty) if answers.len() < last_group => inbox
                        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                        .ok(),
                    Err(_) => None,
                };
                next = match request {
                    Some(Request::Job(job)) => Some(job),
                    Some(Request::Compact(reply)) => {
                        // Ends the group: compaction needs the file to itself.
                        *held_back = Some(reply);
                        None
                    }
                    None => None,
                };
            }
            if storage_error.is_none()
                && let Err(error) = tables.finish()
            {
                storage_error = Some(error);
            }
        }
        if let Some(error) = storage_error {
            // Abort: nothing of this group becomes visible.
            drop(txn);
            return Err(error);
        }
        txn.commit().map_err(db_error)
    }
}

fn failed_answer(job: Job, error: &Error) -> Answer {
    match job {
        Job::Append { reply, .. } => Answer::Append(reply, Err(error.clone())),
        Job::MarkDelivered { reply, .. } | Job::CountRead { reply, .. } => {
            Answer::Unit(reply, Err(error.clone()))
        }
        Job::Ack { reply, .. } => Answer::Count(reply, Err(error.clone())),
        Job::AckAndRead { reply, .. } => Answer::AckRead(reply, Err(error.clone()), true),
        Job::Purge { reply, .. } => Answer::Purge(reply, Err(error.clone())),
        Job::Remove { reply, .. } => Answer::Count(reply, Err(error.clone())),
    }
}

/// The storage error in an answer, if the job failed on storage (not on a quota).
fn answer_storage_error(answer: &Answer) -> Option<Error> {
    let error = match answer {
        Answer::Append(_, Err(e)) | Answer::Unit(_, Err(e)) | Answer::Count(_, Err(e)) => e,
        Answer::Purge(_, Err(e)) => e,
        Answer::AckRead(_, Err(e), true) => e,
        _ => return None,
    };
    matches!(error, Error::Storage { .. }).then(|| error.clone())
}

/// Applies one job; also says whether its failure is its own (it wrote nothing, so the rest
/// of the group goes on) rather than the group's.
fn apply_job(t: &mut Tables<'_>, job: Job, path: &Path) -> (Answer, bool) {
    // A recipient whose metadata is damaged fails its own steps before they write anything:
    // answered alone, so one damaged row costs only its recipient, not everyone in the group.
    let reads_meta_first = match &job {
        Job::Append { recipient, .. }
        | Job::MarkDelivered { recipient, .. }
        | Job::CountRead { recipient, .. }
        | Job::Ack { recipient, .. }
        | Job::AckAndRead { recipient, .. }
        | Job::Remove { recipient, .. } => Some(recipient.as_bytes().to_vec()),
        Job::Purge { .. } => None,
    };
    if let Some(who) = reads_meta_first
        && let Err(error) = meta_get(t, &who)
        && !error.is_retryable()
    {
        return (failed_answer(job, &error), true);
    }
    (apply_job_whole(t, job, path), false)
}

fn apply_job_whole(t: &mut Tables<'_>, job: Job, path: &Path) -> Answer {
    match job {
        Job::Append {
            recipient,
            records,
            quota,
            now,
            reply,
        } => Answer::Append(reply, append(t, &recipient, records, &quota, now)),
        Job::MarkDelivered {
            recipient,
            seqs,
            reply,
        } => Answer::Unit(reply, mark_delivered(t, &recipient, &seqs)),
        Job::CountRead {
            recipient,
            after,
            seqs,
            expired,
            reply,
        } => Answer::Unit(reply, count_read(t, &recipient, after, &seqs, &expired)),
        Job::Ack {
            recipient,
            ack,
            now,
            reply,
        } => Answer::Count(reply, ack_records(t, &recipient, &ack, now)),
        Job::AckAndRead {
            recipient,
            ack,
            after,
            limit,
            now,
            reply,
        } => {
            let (result, ends_group) = ack_and_read(t, &recipient, &ack, after, limit, now, path);
            Answer::AckRead(reply, result, ends_group)
        }
        Job::Purge {
            now,
            idle_before,
            budget,
            reply,
        } => Answer::Purge(reply, purge(t, now, idle_before, budget)),
        Job::Remove { recipient, reply } => Answer::Count(reply, remove_recipient(t, &recipient)),
    }
}

/// An ack, then a read that sees it, with the read's records counted delivered: one group.
/// Also says whether a failure must end the group: a write that failed may have left part of
/// itself, but a read that failed on damaged data (not retryable) wrote nothing, so the ack
/// before it and the rest of the group commit, and only this caller sees the error.
fn ack_and_read(
    t: &mut Tables<'_>,
    recipient: &RecipientId,
    ack: &Ack,
    after: Option<Seq>,
    limit: BatchLimit,
    now: u64,
    path: &Path,
) -> (Result<(u64, ReadBatch)>, bool) {
    let removed = match ack_records(t, recipient, ack, now) {
        Ok(removed) => removed,
        Err(error) => return (Err(error), true),
    };
    let who = recipient.as_bytes();
    // The group's metadata, as the ack left it (not yet written back).
    let read = meta_get(t, who).and_then(|meta| match meta {
        Some(meta) => {
            let view = super::TablesView {
                log: &t.log,
                deliveries: &t.deliveries,
                chunks: &t.chunks,
            };
            super::read_records(path, &meta, view, who, after, limit, now)
        }
        None => Ok(ReadBatch::default()),
    });
    let batch = match read {
        Ok(batch) => batch,
        Err(error) => {
            let ends_group = error.is_retryable();
            return (Err(error), ends_group);
        }
    };
    let seqs: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
    match count_read(t, recipient, after, &seqs, &batch.expired) {
        Ok(()) => (Ok((removed, batch)), false),
        Err(error) => (Err(error), true),
    }
}
