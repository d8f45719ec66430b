//! [`RedbStorage`]: durable, embedded storage in one file, on [redb](https://docs.rs/redb)
//! (pure Rust, ACID, crash-safe copy-on-write B-trees). Feature `redb`, on by default.
//!
//! **Durability:** once `append` (and so `send`) returns `Ok`, the message is on disk (the
//! commit was fsynced); a crash at any point loses nothing that was acknowledged, and acks that
//! returned are not undone. Tested both ways a machine stops: a process killed mid-load
//! (`tests/redb_crash.rs`, `tests/redb_crash_engine.rs`) and a power cut that drops a random
//! part of what was written but not synced (`tests/redb_power_cut.rs`, on a simulated disk).
//!
//! # Layout
//! Records live in one log ordered by seq; each recipient keeps the list of its seqs. A group
//! of sends to many recipients then appends to the log's right edge, and touches only the
//! recipients' small metadata rows, instead of rewriting one B-tree leaf (and its branch
//! pages) per recipient: that cut the pages a 256-message commit writes to about a third.
//!
//! | table | key | value | why |
//! |---|---|---|---|
//! | `log` | seq | checksum, flags, recipient, id, sent_at, expires_at, body | records, appended in seq order |
//! | `meta` | recipient | count, bytes, lost, last touch, idle key, newest seqs and their lengths, delivery watermark | quotas, stats, the list's tail and what was handed over, in one row |
//! | `chunks` | (recipient, first seq) | up to 32 older seqs and their lengths | the rest of the recipient's list, in order |
//! | `deliveries` | seq | times delivered | a record's own count, where the watermark is not enough |
//! | `expiry` | (deadline, recipient, seq) | - | deadlines that arrived out of order |
//! | `idle` | (touch time, recipient) | - | idle queues are found in touch order |
//! | `dedup` | (recipient, message id) | seq, time | sender-chosen ids within the window |
//! | `dedup_order` | (time, recipient, message id) | - | to forget them in order |
//! | `retired` | seq | - | `log` rows off every list, not yet deleted (below) |
//! | `info` | name | u64 | format version, next seq, total bytes, purge cursor and its bounds, retired rows |
//!
//! Recipient keys start with the recipient's bytes as a length-delimited tuple element, so no
//! id can reach into another id's range, whatever bytes it holds; a log record names its
//! recipient inside its checksum, so a seq given for the wrong recipient is refused.
//!
//! **Expiry without an index entry per record:** with one TTL for everything, deadlines grow
//! with seqs, so purge walks the log from a cursor and stops at the first record not yet due.
//! A record due earlier than the latest deadline logged unfiled (a shorter TTL than a message
//! before it) is filed in `expiry` instead (a flag in its record says so), and the cursor
//! steps over it; once the cursor has passed every unfiled record with a deadline, the order
//! starts afresh. Mixed TTLs therefore cost one index entry for each shorter-lived message.
//! Purge touches what it removes, plus, once each, the records without a deadline and the
//! filed ones that lie before the newest unfiled record with a deadline (stepping over reads
//! only the header). A record the cursor finds damaged is removed and counted as lost: it
//! could never be delivered.
//!
//! **Deliveries by watermark** (format 4): a session reads its queue in order, so a
//! record's first hand-over is not written on its own: the recipient's `meta` row keeps a
//! watermark, and a record at or below it counts one delivery unless it has a `deliveries`
//! row of its own. A read for delivery that saw every record from the watermark on (its
//! cursor at or below it, or nothing listed between the two) moves the watermark to its last
//! record. A record gets a row only when that is not enough: a redelivery, `mark_delivered`,
//! a read from past the watermark with records listed between, or 0 for an expired record
//! passed over under the moved watermark. Draining in order therefore writes one `meta` row
//! per batch, which the ack riding on the read writes anyway, instead of a row per message
//! and its removal at the ack: the storage's drain bench is about a third faster
//! (BENCHMARKS.md, "Drain on reconnect"; through the chat server's load run, where the time
//! goes elsewhere, it does not show). A format 3 file opens as one whose watermarks are all 0
//! and is marked with the newest format, which older builds refuse.
//!
//! **Scattered removed records leave the log later** (format 5). An ack (or a drop, a
//! removal) takes its records off the recipient's list and out of the counts at once.
//! Records that lie together in the log (a backlog sent while nothing else was), and a
//! single record, are deleted at once too: their rows share a leaf or two. Two or more
//! scattered among other recipients' records are only filed in `retired`, and their `log`
//! rows are deleted afterwards, oldest first, many per transaction. Deleting each at the ack
//! rewrote a leaf per record and cost the chat server's drain about a fifth (BENCHMARKS.md,
//! "Acked records leave the log later").
//! - The writer deletes them in steps of 256 once it has had nothing to do for 20 ms. A write
//!   that arrives meanwhile waits for one step. Steps commit without an fsync, except every
//!   16th and the last of a run: the next commit makes them durable, and a step lost in a
//!   crash leaves its rows retired, to be deleted again.
//! - Past 131,072 retired rows or 64 MiB of them, every group also deletes as many as it
//!   retired, plus 256, so they never pile up under a load with no idle moment. That space is
//!   outside `Quota::max_total_bytes`: the file may hold up to that much more than the budget.
//! - [`RedbStorage::compact`] deletes them all first.
//! - No list holds a retired row, so no read returns one. A `deliveries` row that
//!   `mark_delivered` of an acked seq leaves is deleted with it. Purge's log cursor deletes a
//!   retired row it meets without counting it again.
//!
//! **Lengths in lists** (format 6). A list keeps each record's body length beside its seq, so
//! an ack that retires scattered records counts the bytes it frees without reading their
//! `log` rows (and a DropOldest append the bytes it would drop): a drain of backlogs scattered among each other's is 15 % faster, and the
//! writer's CPU in the chat server's drain fell by a seventh to a fifth (BENCHMARKS.md,
//! "Lengths in lists"). A record filed in `expiry` is listed with its length unknown, as is
//! every record in a list written before format 6: such a record's row is read when it leaves
//! (for its deadline, or its length), as before. A record retired by the length its list
//! holds is trusted to be the recipient's and to be there; every other removal still reads
//! the row and checks that it names the recipient. So list rows carry a CRC-32 of their own
//! (the `meta` row's counts and the `chunks` row alike): a flipped bit in a list is an error
//! for its recipient, as a damaged record is, not a seq of someone else's to retire. What a
//! damaged `log` header can still cost: purge reclaims such a record under whatever recipient
//! it names, and if its real recipient acks it later by its listed length, the file's byte
//! total loses that record's length a second time (the budget may be overshot by it).
//!
//! Seqs come from one counter for the whole file, so a recipient whose queue empties leaves no
//! row behind and still never sees a seq reused.
//!
//! The file reuses freed pages but never shrinks by itself; [`RedbStorage::compact`] gives
//! the space back after a backlog drains.
//!
//! # Group commit
//! One writer thread owns all writes. Concurrent `append`, `mark_delivered`, `ack`,
//! `read_for_delivery` (with an ack, the ack, read and counts; without one, the counts after
//! a read outside the writer), `purge` and `remove_recipient` calls queue up while a
//! commit is in flight; the writer applies each in one write transaction as it arrives, waits
//! a moment (200 µs at most) for as many callers as the last group held, then commits with one
//! fsync and answers each caller. A lone caller still gets its answer only after its data is
//! durable. If the commit fails, every caller in that
//! group gets the error and none of the group's writes are visible. Reads use their own read
//! transactions and never wait for the writer, except the read of a
//! `read_for_delivery` with an ack: it runs in the group, after the ack it follows, so the ack,
//! the read's delivery marks and the answer share one commit.
//!
//! Writes wait on the writer thread without blocking the caller's executor. Reads run on the
//! caller's thread: short on a warm page cache, but a read that misses it waits on the disk.
//! On a slow disk under an async runtime, size the cache (`RedbOptions::cache_bytes`) to hold
//! the recent part of the queues.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use futures::channel::oneshot;
use redb::{Database, ReadableDatabase, ReadableTable, TableHandle};

use super::{
    Ack, AppendOutcome, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Quota};
use crate::message::{RecipientId, Seq};

mod group_commit;
mod layout;
mod write_steps;

#[cfg(feature = "testing")]
pub(crate) use layout::fuzz_decoders;

use group_commit::{Job, Request, SharedDb, Writer};
use layout::{
    CHUNKS, DEDUP, DEDUP_ORDER, DELIVERIES, EXPIRY, FORMAT, IDLE, INFO, LOG, META, OLDEST_FORMAT,
    RETIRED, decode_record, each_seq, list_seqs, opt_time, read_meta,
};

/// Durable storage in one redb file. See the [module docs](crate::storage::redb) for the
/// layout, group commit and durability.
pub struct RedbStorage {
    db: SharedDb,
    path: PathBuf,
    jobs: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStorage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Options for opening a [`RedbStorage`].
#[derive(Clone, Debug)]
#[must_use]
pub struct RedbOptions {
    cache_bytes: usize,
    max_group: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 * 1024 * 1024,
            max_group: 4096,
        }
    }
}

impl RedbOptions {
    /// Memory redb may use to cache pages. Default 64 MiB (redb's own default is 1 GiB; a
    /// queue mostly writes and reads recent pages).
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Most operations committed together in one transaction. Default 4096.
    pub fn max_group(mut self, max: usize) -> Self {
        self.max_group = max.max(1);
        self
    }

    /// Opens (or creates) the storage file at `path`, creating its directory if needed.
    ///
    /// # Errors
    /// [`Error::Storage`] naming the path when the file cannot be created or opened, is not a
    /// redb file, is a redb file of someone else's, was written by a newer version of this
    /// crate, or is damaged.
    pub fn open(self, path: impl AsRef<Path>) -> Result<RedbStorage> {
        let path = path.as_ref().to_path_buf();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::storage_msg(Retry::No, format!("{}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail("cannot create its directory", &e))?;
        }
        let builder = self.builder();
        self.start(path.clone(), true, || builder.create(&path))
    }

    /// Opens (or creates) the storage on a redb [`StorageBackend`](redb::StorageBackend)
    /// instead of a file: for crash tests, with a simulated disk that can lose power. `name`
    /// names it in errors. Unlike a file, a backend cannot be reopened: after a write fails
    /// on I/O, every later write fails too, until the storage is dropped and opened again.
    ///
    /// Only with the `testing` feature: it ties this crate's API to redb's.
    ///
    /// # Errors
    /// As [`RedbOptions::open`].
    #[cfg(feature = "testing")]
    pub fn open_backend(
        self,
        name: impl AsRef<Path>,
        backend: impl redb::StorageBackend,
    ) -> Result<RedbStorage> {
        let builder = self.builder();
        self.start(name.as_ref().to_path_buf(), false, move || {
            builder.create_with_backend(backend)
        })
    }

    fn builder(&self) -> redb::Builder {
        let mut builder = Database::builder();
        builder.set_cache_size(self.cache_bytes);
        builder
    }

    /// Opens the database with `create`, checks or sets up its tables, and starts the writer.
    fn start(
        self,
        path: PathBuf,
        reopenable: bool,
        create: impl FnOnce() -> std::result::Result<Database, redb::DatabaseError>,
    ) -> Result<RedbStorage> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::storage_msg(Retry::No, format!("{}: {what}: {e}", path.display()))
        };
        // A panic inside redb while opening means a damaged file; the builder and backend
        // are not used again after one.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = create().map_err(|e| fail("cannot open as an offline-queue database", &e))?;
            init(&db).map_err(|e| match e {
                Error::Storage { message, .. } => fail("cannot use it", &message),
                other => other,
            })?;
            Ok(db)
        }));
        let db = opened.unwrap_or_else(|panic| Err(damaged(&path, &panic)))?;
        let db: SharedDb = Arc::new(parking_lot::RwLock::new(Some(Arc::new(db))));
        let (jobs, inbox) = mpsc::channel();
        let writer = Writer::new(db.clone(), path.clone(), self.cache_bytes, self.max_group)
            .reopenable(reopenable);
        let writer = std::thread::Builder::new()
            .name("offline-queue-redb-writer".into())
            .spawn(move || writer.run(inbox))
            .map_err(|e| fail("cannot start the writer thread", &e))?;
        Ok(RedbStorage {
            db,
            path,
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }
}

impl RedbStorage {
    /// Opens (or creates) the storage file at `path` with default options.
    ///
    /// # Errors
    /// See [`RedbOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        RedbOptions::default().open(path)
    }

    /// Options for opening, starting from the defaults.
    pub fn options() -> RedbOptions {
        RedbOptions::default()
    }

    /// The file this storage lives in (on a custom backend, the name it was opened with).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives space freed by acked, expired and removed messages back to the file system.
    /// redb reuses freed pages for new messages but never shrinks the file by itself, so after
    /// a backlog drains (an outage, a spike) the file stays at its largest until compacted.
    ///
    /// It runs on the writer thread between commits: writes wait until it is done, and reads
    /// fail with a retryable error meanwhile, so call it in a quiet period. Returns whether
    /// the file changed.
    ///
    /// # Errors
    /// A storage error naming the file. Retryable if reads held the file for 5 s (nothing
    /// changed) or on an I/O failure; after any failure partway, the file is reopened at its
    /// last commit before the next write.
    pub async fn compact(&self) -> Result<bool> {
        self.ask(Request::Compact).await
    }

    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        self.ask(|reply| Request::Job(make(reply))).await
    }

    /// Sends a request to the writer thread and waits for its answer. The request is sent
    /// before the first await, so jobs enter the writer in the order their futures were
    /// first polled (`Capabilities::appends_in_poll_order`).
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let jobs = self.jobs.as_ref().expect("writer runs until drop");
        jobs.send(make(reply))
            .map_err(|_| Error::storage_msg(Retry::No, "redb writer thread has stopped"))?;
        answer.await.map_err(|_| {
            Error::storage_msg(
                Retry::No,
                format!(
                    "{}: the write failed inside redb (the file may be damaged)",
                    self.path.display()
                ),
            )
        })?
    }
}

impl RedbStorage {
    /// The open database; none while the writer reopens it after an I/O failure.
    fn database(&self) -> Result<Arc<Database>> {
        self.db.read().clone().ok_or_else(|| {
            Error::storage_msg(
                Retry::Yes,
                format!(
                    "{}: closed for a moment (reopening after a write failure, or compacting)",
                    self.path.display()
                ),
            )
        })
    }

    /// Runs a read, turning a panic inside redb (which some damaged files provoke) into an
    /// error naming the file.
    fn guarded<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
            .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)))
    }

    fn read_now(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        let who = recipient.as_bytes();
        let db = self.database()?;
        let txn = db.begin_read().map_err(db_error)?;
        let Some(meta) = read_meta(&txn.open_table(META).map_err(db_error)?, who)? else {
            return Ok(ReadBatch::default());
        };
        let log = txn.open_table(LOG).map_err(db_error)?;
        let deliveries = txn.open_table(DELIVERIES).map_err(db_error)?;
        let chunks = txn.open_table(CHUNKS).map_err(db_error)?;
        let view = TablesView {
            log: &log,
            deliveries: &deliveries,
            chunks: &chunks,
        };
        read_records(&self.path, &meta, view, who, after, limit, now.as_millis())
    }

    fn stats_now(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let who = recipient.as_bytes();
        let db = self.database()?;
        let txn = db.begin_read().map_err(db_error)?;
        let Some(meta) = read_meta(&txn.open_table(META).map_err(db_error)?, who)? else {
            return Ok(RecipientStats::default());
        };
        let chunks = txn.open_table(CHUNKS).map_err(db_error)?;
        let mut oldest_seq = None;
        each_seq(&chunks, who, &meta, 0, |seq| {
            oldest_seq = Some(seq);
            Ok(false)
        })?;
        let oldest_sent_at = match oldest_seq {
            Some(seq) => txn
                .open_table(LOG)
                .map_err(db_error)?
                .get(seq)
                .map_err(db_error)?
                .and_then(|v| decode_record(seq, v.value()).ok().map(|r| r.sent_at))
                .map(Timestamp::from_millis),
            None => None,
        };
        let newest_seq = match meta.tail.last() {
            Some(&seq) => Some(seq),
            None => match chunks
                .range((who, 0)..=(who, u64::MAX))
                .map_err(db_error)?
                .next_back()
            {
                Some(entry) => list_seqs(entry.map_err(db_error)?.1.value())?
                    .last()
                    .copied(),
                None => None,
            },
        };
        Ok(RecipientStats {
            messages: meta.count,
            bytes: meta.bytes,
            oldest_sent_at,
            newest_seq: newest_seq.map(Seq),
            lost: meta.lost(),
        })
    }
}

/// The error for a panic caught inside redb.
fn damaged(path: &Path, panic: &(dyn std::any::Any + Send)) -> Error {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    Error::storage_msg(
        Retry::No,
        format!("{}: the database file is damaged ({what})", path.display()),
    )
}

impl Drop for RedbStorage {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it commits what it holds.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        // redb writes its allocator state on close, and may panic doing so on a damaged file:
        // that must not take the caller down with it.
        let db = self.db.write().take();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(db)));
    }
}

/// Maps any redb error to ours. I/O errors may pass; everything else (corruption, a table of
/// the wrong type) will not.
fn db_error(error: impl Into<redb::Error>) -> Error {
    let error: redb::Error = error.into();
    // After an I/O error redb refuses further writes (`PreviousIo`) until the file is
    // reopened, which the writer does: both pass.
    let retry = match error {
        redb::Error::Io(_) | redb::Error::PreviousIo => Retry::Yes,
        _ => Retry::No,
    };
    Error::storage(retry, error)
}

fn corrupt(what: &str) -> Error {
    Error::storage_msg(Retry::No, format!("corrupt record: {what}"))
}

/// Creates the tables of a new file, or checks an existing file is ours and not newer.
fn init(db: &Database) -> Result<()> {
    let txn = db.begin_write().map_err(db_error)?;
    {
        let mut info = txn.open_table(INFO).map_err(db_error)?;
        let format = info.get("format").map_err(db_error)?.map(|v| v.value());
        match format {
            Some(format) if format > FORMAT => {
                return Err(Error::storage_msg(
                    Retry::No,
                    format!(
                        "written by a newer version of offline-queue (format {format}, this one reads up to {FORMAT})"
                    ),
                ));
            }
            Some(format) if format < OLDEST_FORMAT => {
                return Err(Error::storage_msg(
                    Retry::No,
                    format!(
                        "written by an earlier development version of offline-queue (format {format}); this one reads formats {OLDEST_FORMAT} to {FORMAT}"
                    ),
                ));
            }
            // Formats 3 to 5 read as format 6 (without watermarks, for 3; with nothing
            // retired, for 3 and 4; with no lengths in their lists); marked 6 so that an
            // older build, which would read none of these, refuses the file from now on.
            Some(format) if format < FORMAT => {
                info.insert("format", FORMAT).map_err(db_error)?;
            }
            Some(_) => {}
            None => {
                let foreign = txn
                    .list_tables()
                    .map_err(db_error)?
                    .any(|t| t.name() != INFO.name());
                if foreign {
                    return Err(Error::storage_msg(
                        Retry::No,
                        "a redb database that is not offline-queue's",
                    ));
                }
                info.insert("format", FORMAT).map_err(db_error)?;
            }
        }
    }
    txn.open_table(LOG).map_err(db_error)?;
    txn.open_table(CHUNKS).map_err(db_error)?;
    txn.open_table(DELIVERIES).map_err(db_error)?;
    txn.open_table(META).map_err(db_error)?;
    txn.open_table(EXPIRY).map_err(db_error)?;
    txn.open_table(IDLE).map_err(db_error)?;
    txn.open_table(DEDUP).map_err(db_error)?;
    txn.open_table(DEDUP_ORDER).map_err(db_error)?;
    txn.open_table(RETIRED).map_err(db_error)?;
    txn.commit().map_err(db_error)
}

#[async_trait]
impl Storage for RedbStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_exact_contract()
            .with_durable(true)
            .with_total_byte_budget(true)
            .with_purge_expired(true)
            .with_idle_removal(true)
            // An append's job enters the writer's channel in its first poll (`ask` sends it
            // before it awaits), and the writer applies jobs in the channel's order.
            .with_appends_in_poll_order(true)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        if records.is_empty() {
            let stats = self.stats(recipient).await?;
            return Ok(AppendOutcome {
                pending: stats.messages,
                ..AppendOutcome::default()
            });
        }
        let (recipient, quota, now) = (recipient.clone(), *quota, now.as_millis());
        self.submit(|reply| Job::Append {
            recipient,
            records,
            quota,
            now,
            reply,
        })
        .await
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        self.guarded(|| self.read_now(recipient, after, limit, now))
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (recipient, seqs) = (recipient.clone(), seqs.to_vec());
        self.submit(|reply| Job::MarkDelivered {
            recipient,
            seqs,
            reply,
        })
        .await
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64> {
        let (recipient, ack, now) = (recipient.clone(), ack.clone(), now.as_millis());
        self.submit(|reply| Job::Ack {
            recipient,
            ack,
            now,
            reply,
        })
        .await
    }

    /// With an ack: one job in one group, so the ack, the read (inside the group, so it sees
    /// the ack) and its delivery marks share a commit and its fsync. Without one: a read
    /// outside the writer, then the marks' job, so the writer thread does no reading.
    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<DeliveryRead> {
        let Some(ack) = ack else {
            let batch = self.read(recipient, after, limit, now).await?;
            let seqs: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
            if !seqs.is_empty() {
                let (recipient, expired) = (recipient.clone(), batch.expired.clone());
                self.submit(|reply| Job::CountRead {
                    recipient,
                    after,
                    seqs,
                    expired,
                    reply,
                })
                .await?;
            }
            return Ok(DeliveryRead { acked: 0, batch });
        };
        let (recipient, ack, now) = (recipient.clone(), ack.clone(), now.as_millis());
        let (acked, batch) = self
            .submit(|reply| Job::AckAndRead {
                recipient,
                ack,
                after,
                limit,
                now,
                reply,
            })
            .await?;
        Ok(DeliveryRead { acked, batch })
    }

    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome> {
        let (now, idle_before) = (now.as_millis(), idle_before.map(Timestamp::as_millis));
        self.submit(|reply| Job::Purge {
            now,
            idle_before,
            budget,
            reply,
        })
        .await
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        self.guarded(|| self.stats_now(recipient))
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        let recipient = recipient.clone();
        self.submit(|reply| Job::Remove { recipient, reply }).await
    }
}

/// The tables a read looks at, from a read transaction or from the writer's open group.
struct TablesView<'v, L, D, C> {
    log: &'v L,
    deliveries: &'v D,
    chunks: &'v C,
}

/// A read of `who`'s records after `after`, over any view of the tables: a read transaction,
/// or the writer's group (whose metadata may not be written back yet), with `meta` as that
/// view sees it.
fn read_records<L, D, C>(
    path: &Path,
    meta: &layout::Meta,
    view: TablesView<'_, L, D, C>,
    who: &[u8],
    after: Option<Seq>,
    limit: BatchLimit,
    now: u64,
) -> Result<ReadBatch>
where
    L: ReadableTable<u64, &'static [u8]>,
    D: ReadableTable<u64, u32>,
    C: ReadableTable<layout::Key<'static>, &'static [u8]>,
{
    let TablesView {
        log,
        deliveries,
        chunks,
    } = view;
    let mut batch = ReadBatch {
        lost_unconfirmed: meta.lost(),
        lost_total: meta.lost_total,
        ..ReadBatch::default()
    };
    if after.is_some_and(|after| after.0 == u64::MAX) {
        return Ok(batch);
    }
    let start = after.map_or(0, |after| after.0 + 1);
    let mut bytes = 0usize;
    each_seq(chunks, who, meta, start, |seq| {
        let value = log.get(seq).map_err(db_error)?;
        let record = match value.as_ref().map(|v| decode_record(seq, v.value())) {
            Some(Ok(record)) if record.who == who => record,
            Some(Ok(_)) => {
                tracing::error!(path = %path.display(), seq, "listed record names another recipient; passed over");
                batch.damaged.push(Seq(seq));
                return Ok(true);
            }
            Some(Err(error)) => {
                tracing::error!(path = %path.display(), %error, "damaged record passed over");
                batch.damaged.push(Seq(seq));
                return Ok(true);
            }
            None => {
                tracing::error!(path = %path.display(), seq, "listed record missing; passed over");
                batch.damaged.push(Seq(seq));
                return Ok(true);
            }
        };
        if record.expires_at <= now {
            batch.expired.push(Seq(seq));
            return Ok(batch.expired.len() < limit.max_messages);
        }
        if batch.records.len() >= limit.max_messages
            || (!batch.records.is_empty() && bytes + record.body.len() > limit.max_bytes)
        {
            return Ok(false);
        }
        let own = deliveries.get(seq).map_err(db_error)?.map(|v| v.value());
        let delivery_count = meta.delivery_count(seq, own);
        bytes += record.body.len();
        batch.records.push(StoredRecord {
            seq: Seq(seq),
            id: record.id,
            sent_at: Timestamp::from_millis(record.sent_at),
            expires_at: opt_time(record.expires_at),
            delivery_count,
            body: Bytes::copy_from_slice(record.body),
        });
        Ok(true)
    })?;
    Ok(batch)
}
