//! [`RedbStorage`]: durable, embedded storage in one file, on [redb](https://docs.rs/redb)
//! (pure Rust, ACID, crash-safe copy-on-write B-trees). Feature `redb`, on by default.
//!
//! **Durability:** once `append` (and so `send`) returns `Ok`, the message is on disk (the
//! commit was fsynced); a crash at any point loses nothing that was acknowledged, and acks that
//! returned are not undone.
//!
//! # Layout
//! Records live in one log ordered by seq; each recipient keeps the list of its seqs. A group
//! of sends to many recipients then appends to the log's right edge, and touches only the
//! recipients' small metadata rows, instead of rewriting one B-tree leaf (and its branch
//! pages) per recipient: that cut the pages a 256-message commit writes to about a third.
//!
//! | table | key | value | why |
//! |---|---|---|---|
//! | `log` | seq | checksum, recipient, id, sent_at, expires_at, body | records, appended in seq order |
//! | `meta` | recipient | count, bytes, lost, last touch, idle key, newest seqs | quotas, stats and the list's tail in one row |
//! | `chunks` | (recipient, first seq) | up to 32 older seqs | the rest of the recipient's list, in order |
//! | `deliveries` | seq | times delivered | rewritten per delivery without copying bodies |
//! | `expiry` | (deadline, recipient, seq) | - | deadlines that arrived out of order |
//! | `idle` | (touch time, recipient) | - | idle queues are found in touch order |
//! | `dedup` | (recipient, message id) | seq, time | sender-chosen ids within the window |
//! | `dedup_order` | (time, recipient, message id) | - | to forget them in order |
//! | `info` | name | u64 | format version, next seq, total bytes, purge cursor |
//!
//! Recipient keys start with the recipient's bytes as a length-delimited tuple element, so no
//! id can reach into another id's range, whatever bytes it holds; a log record names its
//! recipient inside its checksum, so a seq given for the wrong recipient is refused.
//!
//! **Expiry without an index entry per record:** with one TTL for everything, deadlines grow
//! with seqs, so purge walks the log from a cursor and stops at the first record not yet due.
//! A record whose deadline is earlier than one already logged (a shorter TTL than a message
//! before it) is filed in `expiry` instead, and the cursor steps over it. Mixed TTLs therefore
//! cost one index entry for each shorter-lived message; purge still touches only what it
//! removes, plus each record without a deadline once.
//!
//! Seqs come from one counter for the whole file, so a recipient whose queue empties leaves no
//! row behind and still never sees a seq reused.
//!
//! # Group commit
//! One writer thread owns all writes. Concurrent `append`, `mark_delivered`, `ack`, `purge` and
//! `remove_recipient` calls queue up while a commit is in flight; the writer applies everything
//! waiting in one write transaction and one fsync, then answers each caller. A lone caller still
//! gets its answer only after its data is durable. If the commit fails, every caller in that
//! group gets the error and none of the group's writes are visible. Reads use their own read
//! transactions and never wait for the writer.
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
use futures::channel::oneshot;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::{
    Ack, AppendOutcome, Appended, Capabilities, NewRecord, PurgeOutcome, ReadBatch, RecipientStats,
    Storage, StoredRecord,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};

/// (recipient, seq)
type Key<'a> = (&'a [u8], u64);
/// (recipient, message id)
type DedupKey<'a> = (&'a [u8], [u8; 16]);
/// (seq, when)
type DedupValue = (u64, u64);

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const CHUNKS: TableDefinition<Key, &[u8]> = TableDefinition::new("chunks");
const DELIVERIES: TableDefinition<u64, u32> = TableDefinition::new("deliveries");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const EXPIRY: TableDefinition<(u64, &[u8], u64), ()> = TableDefinition::new("expiry");
const IDLE: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("idle");
const DEDUP: TableDefinition<DedupKey, DedupValue> = TableDefinition::new("dedup");
const DEDUP_ORDER: TableDefinition<(u64, &[u8], [u8; 16]), ()> =
    TableDefinition::new("dedup_order");
const INFO: TableDefinition<&str, u64> = TableDefinition::new("info");

/// The file format this code writes; a file with a higher number was written by a newer
/// version and is refused.
const FORMAT: u64 = 3;
/// The oldest format this code reads (format 2 keyed records by recipient).
const OLDEST_FORMAT: u64 = 3;
const NEVER: u64 = u64::MAX;
/// Bytes of a `log` value besides the recipient and the body: checksum, flags, recipient
/// length, id, sent_at, expires_at.
const HEADER: usize = 4 + 1 + 1 + 16 + 8 + 8;
/// `log` flag: the record is filed in `expiry` (its deadline arrived out of order).
const FILED: u8 = 1;
/// Seqs kept in a recipient's `meta` row before they move to a `chunks` row.
const TAIL_MAX: usize = 32;
/// Longest the writer waits to gather a group as large as the last one.
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(200);
/// Dedup entries a group forgets at most, beyond one per record it appended, so one commit
/// never does unbounded work.
const DEDUP_PRUNE_PER_GROUP: usize = 64;

/// Durable storage in one redb file. See the [module docs](crate::storage::redb) for the
/// layout, group commit and durability.
pub struct RedbStorage {
    db: SharedDb,
    path: PathBuf,
    jobs: Option<mpsc::Sender<Job>>,
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
            Error::storage_msg(false, format!("{}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail("cannot create its directory", &e))?;
        }
        let cache_bytes = self.cache_bytes;
        let opened = std::panic::catch_unwind(|| {
            let db = Database::builder()
                .set_cache_size(cache_bytes)
                .create(&path)
                .map_err(|e| fail("cannot open as an offline-queue database", &e))?;
            init(&db).map_err(|e| match e {
                Error::Storage { message, .. } => fail("cannot use it", &message),
                other => other,
            })?;
            Ok(db)
        });
        let db = opened.unwrap_or_else(|panic| Err(damaged(&path, &panic)))?;
        let db: SharedDb = Arc::new(parking_lot::RwLock::new(Some(Arc::new(db))));
        let (jobs, inbox) = mpsc::channel();
        let writer_db = db.clone();
        let max_group = self.max_group;
        let writer_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("offline-queue-redb-writer".into())
            .spawn(move || Writer::new(writer_db, writer_path, cache_bytes, max_group).run(inbox))
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

    /// The file this storage lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let jobs = self.jobs.as_ref().expect("writer runs until drop");
        jobs.send(make(reply))
            .map_err(|_| Error::storage_msg(false, "redb writer thread has stopped"))?;
        answer.await.map_err(|_| {
            Error::storage_msg(
                false,
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
                true,
                format!("{}: reopening after a write failure", self.path.display()),
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
        let now = now.as_millis();
        let db = self.database()?;
        let txn = db.begin_read().map_err(db_error)?;
        let Some(meta) = read_meta(&txn.open_table(META).map_err(db_error)?, who)? else {
            return Ok(ReadBatch::default());
        };
        let mut batch = ReadBatch {
            lost: meta.lost(),
            lost_total: meta.lost_total,
            ..ReadBatch::default()
        };
        if after.is_some_and(|after| after.0 == u64::MAX) {
            return Ok(batch);
        }
        let start = after.map_or(0, |after| after.0 + 1);
        let log = txn.open_table(LOG).map_err(db_error)?;
        let deliveries = txn.open_table(DELIVERIES).map_err(db_error)?;
        let chunks = txn.open_table(CHUNKS).map_err(db_error)?;
        let mut bytes = 0usize;
        each_seq(&chunks, who, &meta.tail, start, |seq| {
            let value = log.get(seq).map_err(db_error)?;
            let record = match value.as_ref().map(|v| decode_record(seq, v.value())) {
                Some(Ok(record)) if record.who == who => record,
                Some(Ok(_)) => Err(corrupt(&format!("seq {seq}: listed for another recipient")))?,
                Some(Err(error)) => {
                    tracing::error!(path = %self.path.display(), %error, "damaged record passed over");
                    batch.damaged.push(Seq(seq));
                    return Ok(true);
                }
                None => {
                    tracing::error!(path = %self.path.display(), seq, "listed record missing; passed over");
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
            let delivery_count = deliveries
                .get(seq)
                .map_err(db_error)?
                .map_or(0, |v| v.value());
            bytes += record.body.len();
            batch.records.push(StoredRecord {
                seq: Seq(seq),
                id: record.id,
                sent_at: Timestamp::from_millis(record.sent_at),
                expires_at: opt_time(record.expires_at),
                delivery_count,
                body: record.body.to_vec(),
            });
            Ok(true)
        })?;
        Ok(batch)
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
        each_seq(&chunks, who, &meta.tail, 0, |seq| {
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
                Some(entry) => unpack_seqs(entry.map_err(db_error)?.1.value())?
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
        false,
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
    let retryable = matches!(error, redb::Error::Io(_) | redb::Error::PreviousIo);
    Error::storage(retryable, error)
}

fn corrupt(what: &str) -> Error {
    Error::storage_msg(false, format!("corrupt record: {what}"))
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
                    false,
                    format!(
                        "written by a newer version of offline-queue (format {format}, this one reads up to {FORMAT})"
                    ),
                ));
            }
            Some(format) if format < OLDEST_FORMAT => {
                return Err(Error::storage_msg(
                    false,
                    format!(
                        "written by an earlier development version of offline-queue (format {format}); this one reads formats {OLDEST_FORMAT} to {FORMAT}"
                    ),
                ));
            }
            Some(_) => {}
            None => {
                let foreign = txn
                    .list_tables()
                    .map_err(db_error)?
                    .any(|t| t.name() != INFO.name());
                if foreign {
                    return Err(Error::storage_msg(
                        false,
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
    txn.commit().map_err(db_error)
}

/// A recipient's row in `meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Meta {
    count: u64,
    bytes: u64,
    /// Losses ever counted, from a base that only grows (see `Meta::new`).
    lost_total: u64,
    /// Losses the client confirmed it was told of.
    lost_confirmed: u64,
    last_touch: u64,
    /// The key under which the recipient is filed in `idle` (lazily refiled by purge).
    idle_key: u64,
    /// The newest seqs of the recipient's list (fewer than `TAIL_MAX`), above every seq in
    /// its `chunks` rows.
    tail: Vec<u64>,
}

impl Meta {
    const FIXED: usize = 48;

    /// A new recipient's row. Its loss total starts at the file's seq counter, above any total
    /// an earlier row of this recipient reached (each loss is a record, and each record took a
    /// seq), so a stale confirmation cannot hide a new loss.
    fn new(t: &Tables<'_>) -> Self {
        Self {
            lost_total: t.next_seq,
            lost_confirmed: t.next_seq,
            ..Self::default()
        }
    }

    fn lost(&self) -> u64 {
        self.lost_total.saturating_sub(self.lost_confirmed)
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::FIXED + 8 * self.tail.len());
        for v in [
            self.count,
            self.bytes,
            self.lost_total,
            self.lost_confirmed,
            self.last_touch,
            self.idle_key,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend(self.tail.iter().flat_map(|seq| seq.to_le_bytes()));
        out
    }

    fn decode(raw: &[u8]) -> Result<Self> {
        if raw.len() < Self::FIXED {
            return Err(Error::storage_msg(
                false,
                format!("corrupt recipient metadata: {} bytes", raw.len()),
            ));
        }
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8"));
        Ok(Self {
            count: word(0),
            bytes: word(1),
            lost_total: word(2),
            lost_confirmed: word(3),
            last_touch: word(4),
            idle_key: word(5),
            tail: unpack_seqs(&raw[Self::FIXED..])?,
        })
    }
}

fn read_meta(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    who: &[u8],
) -> Result<Option<Meta>> {
    match table.get(who).map_err(db_error)? {
        Some(raw) => Meta::decode(raw.value()).map(Some),
        None => Ok(None),
    }
}

/// Seqs packed as little-endian u64s (a `chunks` value, or a `meta` row's tail).
fn unpack_seqs(raw: &[u8]) -> Result<Vec<u64>> {
    if !raw.len().is_multiple_of(8) {
        return Err(Error::storage_msg(
            false,
            format!("corrupt seq list: {} bytes", raw.len()),
        ));
    }
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        .collect())
}

fn pack_seqs(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|seq| seq.to_le_bytes()).collect()
}

/// Visits the recipient's seqs from `start` on, in order (its `chunks` rows, then the tail),
/// until `visit` returns `false`.
fn each_seq(
    chunks: &impl ReadableTable<Key<'static>, &'static [u8]>,
    who: &[u8],
    tail: &[u64],
    start: u64,
    mut visit: impl FnMut(u64) -> Result<bool>,
) -> Result<()> {
    if tail.first().is_none_or(|&first| start < first) {
        // A chunk is keyed by its first seq when written, so the one holding `start` is the
        // last keyed at or below it.
        let from = match chunks
            .range((who, 0)..=(who, start))
            .map_err(db_error)?
            .next_back()
        {
            Some(entry) => entry.map_err(db_error)?.0.value().1,
            None => start,
        };
        for entry in chunks
            .range((who, from)..=(who, u64::MAX))
            .map_err(db_error)?
        {
            for seq in unpack_seqs(entry.map_err(db_error)?.1.value())? {
                if seq >= start && !visit(seq)? {
                    return Ok(());
                }
            }
        }
    }
    for &seq in tail {
        if seq >= start && !visit(seq)? {
            return Ok(());
        }
    }
    Ok(())
}

/// CRC-32 of a record's seq and value (after the checksum itself), so a damaged record, or a
/// record found under the wrong seq, is reported instead of delivered wrong.
fn checksum(seq: u64, rest: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(rest);
    hasher.finalize()
}

fn encode_record(who: &[u8], seq: u64, flags: u8, record: &NewRecord) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER + who.len() + record.body.len());
    value.extend_from_slice(&[0; 4]);
    value.push(flags);
    // RecipientId is at most 255 bytes.
    value.push(u8::try_from(who.len()).expect("recipient ids are at most 255 bytes"));
    value.extend_from_slice(who);
    value.extend_from_slice(&record.id.to_bytes());
    value.extend_from_slice(&record.sent_at.as_millis().to_le_bytes());
    value.extend_from_slice(
        &record
            .expires_at
            .map_or(NEVER, Timestamp::as_millis)
            .to_le_bytes(),
    );
    value.extend_from_slice(&record.body);
    let sum = checksum(seq, &value[4..]);
    value[..4].copy_from_slice(&sum.to_le_bytes());
    value
}

/// A `log` record, checked against its checksum.
struct Logged<'v> {
    who: &'v [u8],
    flags: u8,
    id: MessageId,
    sent_at: u64,
    expires_at: u64,
    body: &'v [u8],
}

fn decode_record(seq: u64, value: &[u8]) -> Result<Logged<'_>> {
    let who_len = value.get(5).map_or(0, |&n| usize::from(n));
    if value.len() < HEADER + who_len {
        return Err(corrupt(&format!("seq {seq}: shorter than its header")));
    }
    let stored = u32::from_le_bytes(value[..4].try_into().expect("4"));
    if stored != checksum(seq, &value[4..]) {
        return Err(corrupt(&format!("seq {seq}: checksum mismatch")));
    }
    let rest = &value[6 + who_len..];
    let word = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().expect("8"));
    Ok(Logged {
        who: &value[6..6 + who_len],
        flags: value[4],
        id: MessageId::from_bytes(rest[..16].try_into().expect("16")),
        sent_at: word(16),
        expires_at: word(24),
        body: &rest[32..],
    })
}

fn opt_time(millis: u64) -> Option<Timestamp> {
    (millis != NEVER).then(|| Timestamp::from_millis(millis))
}

enum Job {
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
    Ack {
        recipient: RecipientId,
        ack: Ack,
        now: u64,
        reply: oneshot::Sender<Result<u64>>,
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
        };
    }
}

/// The writer thread: applies groups of jobs in one transaction each.
struct Writer {
    db: SharedDb,
    path: PathBuf,
    cache_bytes: usize,
    max_group: usize,
    /// Set after a write failed on I/O: the next group reopens the file first.
    needs_reopen: bool,
}

/// The database, shared by readers and the writer, which replaces it when it reopens.
type SharedDb = Arc<parking_lot::RwLock<Option<Arc<Database>>>>;

/// The tables a group writes, opened once per transaction.
struct Tables<'t> {
    log: redb::Table<'t, u64, &'static [u8]>,
    chunks: redb::Table<'t, Key<'static>, &'static [u8]>,
    deliveries: redb::Table<'t, u64, u32>,
    meta: redb::Table<'t, &'static [u8], &'static [u8]>,
    expiry: redb::Table<'t, (u64, &'static [u8], u64), ()>,
    idle: redb::Table<'t, (u64, &'static [u8]), ()>,
    dedup: redb::Table<'t, DedupKey<'static>, DedupValue>,
    dedup_order: redb::Table<'t, (u64, &'static [u8], [u8; 16]), ()>,
    info: redb::Table<'t, &'static str, u64>,
    // Values read once per group and written back once, before the commit: the hot rows.
    next_seq: u64,
    total_bytes: u64,
    /// The latest deadline of a record not filed in `expiry`: a record due earlier is filed.
    deadline_high: u64,
    /// Purge's place in `log`: records below it are due later than they were then, filed in
    /// `expiry`, or have no deadline.
    purge_cursor: u64,
    /// Recipients' metadata as changed by this group (`None`: to remove).
    metas: std::collections::HashMap<Vec<u8>, Option<Meta>>,
    /// (latest append time, dedup window, budget) for forgetting dedup ids at the group's
    /// end: at least as many as the group could add, so the tables never outgrow the window.
    dedup_prune: Option<(u64, u64, usize)>,
}

impl Tables<'_> {
    /// Ends the group: forgets expired dedup ids, and writes the cached rows back.
    fn finish(&mut self) -> Result<()> {
        if let Some((now, window, budget)) = self.dedup_prune.take() {
            prune_dedup(self, now, window, budget)?;
        }
        self.info
            .insert("next_seq", self.next_seq)
            .map_err(db_error)?;
        self.info
            .insert("total_bytes", self.total_bytes)
            .map_err(db_error)?;
        self.info
            .insert("deadline_high", self.deadline_high)
            .map_err(db_error)?;
        self.info
            .insert("purge_cursor", self.purge_cursor)
            .map_err(db_error)?;
        for (who, meta) in self.metas.drain() {
            match meta {
                Some(meta) => self
                    .meta
                    .insert(&who[..], &meta.encode()[..])
                    .map_err(db_error)?,
                None => self.meta.remove(&who[..]).map_err(db_error)?,
            };
        }
        Ok(())
    }
}

impl Writer {
    fn new(db: SharedDb, path: PathBuf, cache_bytes: usize, max_group: usize) -> Self {
        Self {
            db,
            path,
            cache_bytes,
            max_group,
            needs_reopen: false,
        }
    }

    /// Closes and reopens the file after an I/O failure (redb refuses writes until then; the
    /// reopen recovers to the last durable commit).
    fn reopen(&mut self) -> Result<()> {
        let mut slot = self.db.write();
        if let Some(old) = slot.take() {
            // Readers hold the handle for one read at most; the file lock goes with the last.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(old)));
        }
        let reopened = std::panic::catch_unwind(|| {
            Database::builder()
                .set_cache_size(self.cache_bytes)
                .create(&self.path)
                .map_err(db_error)
        })
        .unwrap_or_else(|panic| Err(damaged(&self.path, &panic)))?;
        *slot = Some(Arc::new(reopened));
        self.needs_reopen = false;
        tracing::info!(path = %self.path.display(), "redb file reopened after a write failure");
        Ok(())
    }

    fn run(mut self, inbox: mpsc::Receiver<Job>) {
        let mut last_group = 1;
        while let Ok(first) = inbox.recv() {
            last_group = self.commit_group(first, &inbox, last_group);
        }
    }

    /// Commits one group, starting with `first`; returns how many jobs it held.
    fn commit_group(
        &mut self,
        first: Job,
        inbox: &mpsc::Receiver<Job>,
        last_group: usize,
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
            self.apply(first, inbox, last_group, &mut answers)
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
        inbox: &mpsc::Receiver<Job>,
        last_group: usize,
        answers: &mut Vec<Answer>,
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
                let answer = apply_job(&mut tables, job);
                storage_error = answer_storage_error(&answer);
                answers.push(answer);
                if storage_error.is_some() || answers.len() >= self.max_group {
                    break;
                }
                next = match inbox.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::TryRecvError::Empty) if answers.len() < last_group => inbox
                        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                        .ok(),
                    Err(_) => None,
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

fn open_tables(txn: &redb::WriteTransaction) -> Result<Tables<'_>> {
    let info = txn.open_table(INFO).map_err(db_error)?;
    let read =
        |name| -> Result<u64> { Ok(info.get(name).map_err(db_error)?.map_or(0, |v| v.value())) };
    Ok(Tables {
        next_seq: read("next_seq")?,
        total_bytes: read("total_bytes")?,
        deadline_high: read("deadline_high")?,
        purge_cursor: read("purge_cursor")?,
        metas: std::collections::HashMap::new(),
        dedup_prune: None,
        log: txn.open_table(LOG).map_err(db_error)?,
        chunks: txn.open_table(CHUNKS).map_err(db_error)?,
        deliveries: txn.open_table(DELIVERIES).map_err(db_error)?,
        meta: txn.open_table(META).map_err(db_error)?,
        expiry: txn.open_table(EXPIRY).map_err(db_error)?,
        idle: txn.open_table(IDLE).map_err(db_error)?,
        dedup: txn.open_table(DEDUP).map_err(db_error)?,
        dedup_order: txn.open_table(DEDUP_ORDER).map_err(db_error)?,
        info,
    })
}

fn failed_answer(job: Job, error: &Error) -> Answer {
    match job {
        Job::Append { reply, .. } => Answer::Append(reply, Err(error.clone())),
        Job::MarkDelivered { reply, .. } => Answer::Unit(reply, Err(error.clone())),
        Job::Ack { reply, .. } => Answer::Count(reply, Err(error.clone())),
        Job::Purge { reply, .. } => Answer::Purge(reply, Err(error.clone())),
        Job::Remove { reply, .. } => Answer::Count(reply, Err(error.clone())),
    }
}

/// The storage error in an answer, if the job failed on storage (not on a quota).
fn answer_storage_error(answer: &Answer) -> Option<Error> {
    let error = match answer {
        Answer::Append(_, Err(e)) | Answer::Unit(_, Err(e)) | Answer::Count(_, Err(e)) => e,
        Answer::Purge(_, Err(e)) => e,
        _ => return None,
    };
    matches!(error, Error::Storage { .. }).then(|| error.clone())
}

fn apply_job(t: &mut Tables<'_>, job: Job) -> Answer {
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
        Job::Ack {
            recipient,
            ack,
            now,
            reply,
        } => Answer::Count(reply, ack_records(t, &recipient, &ack, now)),
        Job::Purge {
            now,
            idle_before,
            budget,
            reply,
        } => Answer::Purge(reply, purge(t, now, idle_before, budget)),
        Job::Remove { recipient, reply } => Answer::Count(reply, remove_recipient(t, &recipient)),
    }
}

fn meta_get(t: &mut Tables<'_>, who: &[u8]) -> Result<Option<Meta>> {
    if let Some(cached) = t.metas.get(who) {
        return Ok(cached.clone());
    }
    let meta = read_meta(&t.meta, who)?;
    t.metas.insert(who.to_vec(), meta.clone());
    Ok(meta)
}

/// Keeps the recipient's metadata for the flush, or marks it for removal (with its idle
/// entry) when nothing is worth keeping.
fn meta_put(t: &mut Tables<'_>, who: &[u8], meta: Meta) -> Result<()> {
    let keep = if meta.count == 0 && meta.lost() == 0 {
        t.idle.remove((meta.idle_key, who)).map_err(db_error)?;
        None
    } else {
        Some(meta)
    };
    // Cached by `meta_get` already, normally: no new key.
    match t.metas.get_mut(who) {
        Some(slot) => *slot = keep,
        None => {
            t.metas.insert(who.to_vec(), keep);
        }
    }
    Ok(())
}

/// The recipient's seqs from the oldest on, while `keep_going` says so.
fn seqs_while(
    t: &Tables<'_>,
    who: &[u8],
    meta: &Meta,
    mut keep_going: impl FnMut(u64) -> Result<bool>,
) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    each_seq(&t.chunks, who, &meta.tail, 0, |seq| {
        let more = keep_going(seq)?;
        if more {
            seqs.push(seq);
        }
        Ok(more)
    })?;
    Ok(seqs)
}

/// Takes `seqs` (ascending) off the recipient's list; returns those it held, ascending.
fn unlist(t: &mut Tables<'_>, who: &[u8], meta: &mut Meta, seqs: &[u64]) -> Result<Vec<u64>> {
    let mut held = Vec::with_capacity(seqs.len());
    let tail_start = meta.tail.first().copied().unwrap_or(u64::MAX);
    let mut i = 0;
    while i < seqs.len() && seqs[i] < tail_start {
        let found = match t
            .chunks
            .range((who, 0)..=(who, seqs[i]))
            .map_err(db_error)?
            .next_back()
        {
            Some(entry) => {
                let (key, value) = entry.map_err(db_error)?;
                Some((key.value().1, unpack_seqs(value.value())?))
            }
            None => None,
        };
        let Some((key, mut members)) = found else {
            i += 1;
            continue;
        };
        let last = members.last().copied().unwrap_or(0);
        if seqs[i] > last {
            // Between this chunk and the next: not listed.
            i += 1;
            continue;
        }
        let before = members.len();
        while i < seqs.len() && seqs[i] <= last {
            if let Ok(at) = members.binary_search(&seqs[i]) {
                members.remove(at);
                held.push(seqs[i]);
            }
            i += 1;
        }
        if members.is_empty() {
            t.chunks.remove((who, key)).map_err(db_error)?;
        } else if members.len() != before {
            t.chunks
                .insert((who, key), &pack_seqs(&members)[..])
                .map_err(db_error)?;
        }
    }
    for &seq in &seqs[i..] {
        if let Ok(at) = meta.tail.binary_search(&seq) {
            meta.tail.remove(at);
            held.push(seq);
        }
    }
    Ok(held)
}

/// Appends new seqs to the recipient's list, moving full runs of the tail to `chunks`.
fn enlist(t: &mut Tables<'_>, who: &[u8], meta: &mut Meta, seqs: &[u64]) -> Result<()> {
    meta.tail.extend_from_slice(seqs);
    while meta.tail.len() >= TAIL_MAX {
        let run: Vec<u64> = meta.tail.drain(..TAIL_MAX).collect();
        t.chunks
            .insert((who, run[0]), &pack_seqs(&run)[..])
            .map_err(db_error)?;
    }
    Ok(())
}

/// Removes the `log` record `seq` (already taken off its recipient's list) with its delivery
/// count and expiry entry; returns its body length.
fn remove_logged(t: &mut Tables<'_>, who: &[u8], seq: u64) -> Result<Option<u64>> {
    let Some(value) = t.log.remove(seq).map_err(db_error)? else {
        return Ok(None);
    };
    // A damaged record is still removed; an expiry entry it had is dropped when purge
    // reaches it.
    let (len, filed_at) = match decode_record(seq, value.value()) {
        Ok(record) => (
            record.body.len() as u64,
            (record.flags & FILED != 0).then_some(record.expires_at),
        ),
        Err(_) => (
            value.value().len().saturating_sub(HEADER + who.len()) as u64,
            None,
        ),
    };
    drop(value);
    if let Some(deadline) = filed_at {
        t.expiry.remove((deadline, who, seq)).map_err(db_error)?;
    }
    t.deliveries.remove(seq).map_err(db_error)?;
    Ok(Some(len))
}

/// Takes `seqs` (ascending) off the recipient's list and out of the log; returns (records
/// removed, bytes freed). Seqs the recipient does not hold are left alone.
fn remove_records(
    t: &mut Tables<'_>,
    who: &[u8],
    meta: &mut Meta,
    seqs: &[u64],
) -> Result<(u64, u64)> {
    let (mut removed, mut freed) = (0, 0);
    for seq in unlist(t, who, meta, seqs)? {
        removed += 1;
        freed += remove_logged(t, who, seq)?.unwrap_or(0);
    }
    meta.count = meta.count.saturating_sub(removed);
    meta.bytes = meta.bytes.saturating_sub(freed);
    Ok((removed, freed))
}

fn append(
    t: &mut Tables<'_>,
    recipient: &RecipientId,
    records: Vec<NewRecord>,
    quota: &Quota,
    now: u64,
) -> Result<AppendOutcome> {
    let who = recipient.as_bytes();
    let prune = t.dedup_prune.get_or_insert((now, 0, DEDUP_PRUNE_PER_GROUP));
    *prune = (
        prune.0.max(now),
        quota.dedup_window_ms(),
        prune.2 + records.len(),
    );
    let mut meta = match meta_get(t, who)? {
        Some(meta) => meta,
        None => Meta::new(t),
    };

    // Plan without writing: which records are new, what they cost, what must be dropped.
    enum Plan {
        New,
        Dup(u64),
        DupOf(usize),
    }
    let window = quota.dedup_window_ms();
    let mut plan = Vec::with_capacity(records.len());
    let mut batch_ids: Vec<(MessageId, usize)> = Vec::new();
    let (mut adding, mut adding_bytes) = (0u64, 0u64);
    for (index, record) in records.iter().enumerate() {
        if record.dedup {
            let seen = t
                .dedup
                .get((who, record.id.to_bytes()))
                .map_err(db_error)?
                .map(|v| v.value());
            if let Some((seq, at)) = seen
                && now.saturating_sub(at) < window
            {
                plan.push(Plan::Dup(seq));
                continue;
            }
            if let Some(&(_, earlier)) = batch_ids.iter().find(|(id, _)| *id == record.id) {
                plan.push(Plan::DupOf(earlier));
                continue;
            }
            batch_ids.push((record.id, index));
        }
        plan.push(Plan::New);
        adding += 1;
        adding_bytes += record.body.len() as u64;
    }
    let mut drop_seqs = Vec::new();
    let mut drop_bytes = 0u64;
    if quota.admit(meta.count, meta.bytes, adding, adding_bytes)? {
        let (mut keep, mut keep_bytes) = (meta.count, meta.bytes);
        let log = &t.log;
        drop_seqs = seqs_while(t, who, &meta, |seq| {
            if quota.fits(keep, keep_bytes, adding, adding_bytes) {
                return Ok(false);
            }
            let len = log.get(seq).map_err(db_error)?.map_or(0, |value| {
                value.value().len().saturating_sub(HEADER + who.len()) as u64
            });
            keep -= 1;
            keep_bytes = keep_bytes.saturating_sub(len);
            drop_bytes += len;
            Ok(true)
        })?;
    }
    let total = t.total_bytes;
    if let Some(max) = quota.max_total_bytes
        && adding_bytes > drop_bytes
    {
        let net = adding_bytes - drop_bytes;
        if total.saturating_add(net) > max {
            return Err(Error::StorageFull {
                used: total,
                adding: net,
                max,
            });
        }
    }

    // Write.
    if adding > 0 {
        remove_records(t, who, &mut meta, &drop_seqs)?;
        meta.lost_total += drop_seqs.len() as u64;
    }
    let mut next_seq = t.next_seq;
    let mut assigned = vec![0u64; records.len()];
    for (index, record) in records.iter().enumerate() {
        if !matches!(plan[index], Plan::New) {
            continue;
        }
        next_seq += 1;
        assigned[index] = next_seq;
        let mut flags = 0;
        if let Some(deadline) = record.expires_at.map(Timestamp::as_millis) {
            if deadline < t.deadline_high {
                flags |= FILED;
                t.expiry
                    .insert((deadline, who, next_seq), ())
                    .map_err(db_error)?;
            } else {
                t.deadline_high = deadline;
            }
        }
        t.log
            .insert(next_seq, &encode_record(who, next_seq, flags, record)[..])
            .map_err(db_error)?;
        if record.dedup && window > 0 {
            t.dedup
                .insert((who, record.id.to_bytes()), (next_seq, now))
                .map_err(db_error)?;
            t.dedup_order
                .insert((now, who, record.id.to_bytes()), ())
                .map_err(db_error)?;
        }
        meta.count += 1;
        meta.bytes += record.body.len() as u64;
    }
    if adding > 0 {
        let new: Vec<u64> = assigned.iter().copied().filter(|&seq| seq != 0).collect();
        enlist(t, who, &mut meta, &new)?;
        t.next_seq = next_seq;
        t.total_bytes = total + adding_bytes - drop_bytes;
        touch(t, who, &mut meta, now)?;
    }
    let pending = meta.count;
    if adding > 0 {
        meta_put(t, who, meta)?;
    }
    let results = plan
        .iter()
        .enumerate()
        .map(|(index, p)| match p {
            Plan::New => Appended::Stored(Seq(assigned[index])),
            Plan::Dup(seq) => Appended::Duplicate(Seq(*seq)),
            Plan::DupOf(earlier) => Appended::Duplicate(Seq(assigned[*earlier])),
        })
        .collect();
    Ok(AppendOutcome {
        records: results,
        dropped: drop_seqs.len() as u64,
        pending,
        live_elsewhere: false,
    })
}

/// Records activity: files the recipient in `idle` the first time; later touches only move
/// `last_touch` (purge refiles lazily).
fn touch(t: &mut Tables<'_>, who: &[u8], meta: &mut Meta, now: u64) -> Result<()> {
    let filed = meta.last_touch != 0 || meta.idle_key != 0;
    meta.last_touch = meta.last_touch.max(now);
    if !filed {
        meta.idle_key = meta.last_touch;
        t.idle.insert((meta.idle_key, who), ()).map_err(db_error)?;
    }
    Ok(())
}

fn prune_dedup(t: &mut Tables<'_>, now: u64, window: u64, budget: usize) -> Result<()> {
    let cutoff = now.saturating_sub(window);
    let mut stale = Vec::new();
    let empty: &[u8] = &[];
    for entry in t
        .dedup_order
        .range(..(cutoff, empty, [0u8; 16]))
        .map_err(db_error)?
        .take(budget)
    {
        let (key, _) = entry.map_err(db_error)?;
        let (at, who, id) = key.value();
        stale.push((at, who.to_vec(), id));
    }
    for (at, who, id) in stale {
        t.dedup_order.remove((at, &who[..], id)).map_err(db_error)?;
        let current = t
            .dedup
            .get((&who[..], id))
            .map_err(db_error)?
            .map(|v| v.value().1);
        if current == Some(at) {
            t.dedup.remove((&who[..], id)).map_err(db_error)?;
        }
    }
    Ok(())
}

fn mark_delivered(t: &mut Tables<'_>, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
    let who = recipient.as_bytes();
    for seq in seqs {
        // Only a record of this recipient (its log value names it) is marked.
        let ours =
            t.log.get(seq.0).map_err(db_error)?.is_some_and(|value| {
                decode_record(seq.0, value.value()).is_ok_and(|r| r.who == who)
            });
        if !ours {
            continue;
        }
        let count = t
            .deliveries
            .get(seq.0)
            .map_err(db_error)?
            .map_or(0, |v| v.value());
        t.deliveries
            .insert(seq.0, count.saturating_add(1))
            .map_err(db_error)?;
    }
    Ok(())
}

fn ack_records(t: &mut Tables<'_>, recipient: &RecipientId, ack: &Ack, now: u64) -> Result<u64> {
    let who = recipient.as_bytes();
    let Some(mut meta) = meta_get(t, who)? else {
        return Ok(0);
    };
    let mut seqs = match ack.through {
        Some(through) => seqs_while(t, who, &meta, |seq| Ok(seq <= through.0))?,
        None => Vec::new(),
    };
    seqs.extend(ack.seqs.iter().map(|s| s.0));
    seqs.sort_unstable();
    seqs.dedup();
    let (removed, acked_bytes) = remove_records(t, who, &mut meta, &seqs)?;
    let mut passed_over: Vec<u64> = ack.passed_over.iter().map(|s| s.0).collect();
    passed_over.sort_unstable();
    passed_over.dedup();
    let (lost, lost_bytes) = remove_records(t, who, &mut meta, &passed_over)?;
    meta.lost_total += lost;
    if let Some(through) = ack.lost_confirmed_through {
        meta.lost_confirmed = meta.lost_confirmed.max(through.min(meta.lost_total));
    }
    t.total_bytes = t.total_bytes.saturating_sub(acked_bytes + lost_bytes);
    touch(t, who, &mut meta, now)?;
    meta_put(t, who, meta)?;
    Ok(removed)
}

/// Removes one record found due by purge: off its recipient's list, out of the log, counted
/// as lost. Returns the bytes freed, or `None` if it was already gone.
fn expire_record(t: &mut Tables<'_>, who: &[u8], seq: u64) -> Result<Option<u64>> {
    let mut meta = match meta_get(t, who)? {
        Some(meta) => meta,
        None => Meta::new(t),
    };
    let (removed, freed) = remove_records(t, who, &mut meta, &[seq])?;
    if removed == 0 {
        // Not on the list (a damaged row): reclaim the record all the same.
        return Ok(remove_logged(t, who, seq)?.map(|_| 0));
    }
    meta.lost_total += 1;
    meta_put(t, who, meta)?;
    Ok(Some(freed))
}

/// What purge's log cursor finds at its place.
enum AtCursor {
    /// Nothing left to look at: the cursor is past the log's end, or at a record due later.
    Stop,
    /// A record to step over (no deadline, filed in `expiry`, or damaged).
    Skip(u64),
    /// A record due now, of this recipient.
    Due(u64, Vec<u8>),
}

fn at_cursor(t: &Tables<'_>, now: u64) -> Result<AtCursor> {
    let Some(entry) = t.log.range(t.purge_cursor..).map_err(db_error)?.next() else {
        return Ok(AtCursor::Stop);
    };
    let (key, value) = entry.map_err(db_error)?;
    let seq = key.value();
    Ok(match decode_record(seq, value.value()) {
        Err(_) => AtCursor::Skip(seq),
        Ok(record) if record.expires_at <= now => AtCursor::Due(seq, record.who.to_vec()),
        Ok(record) if record.expires_at == NEVER || record.flags & FILED != 0 => {
            AtCursor::Skip(seq)
        }
        Ok(_) => AtCursor::Stop,
    })
}

fn purge(
    t: &mut Tables<'_>,
    now: u64,
    idle_before: Option<u64>,
    budget: usize,
) -> Result<PurgeOutcome> {
    let mut outcome = PurgeOutcome::default();
    let mut left = budget;
    let mut freed = 0;
    // Records due out of order, from the index.
    let mut due = Vec::new();
    // Every key with a deadline at or before `now` sorts before (now + 1, [], 0).
    let empty: &[u8] = &[];
    let end = (now.saturating_add(1), empty, 0u64);
    for entry in t.expiry.range(..end).map_err(db_error)?.take(budget) {
        let (key, _) = entry.map_err(db_error)?;
        let (deadline, who, seq) = key.value();
        due.push((deadline, who.to_vec(), seq));
    }
    for (deadline, who, seq) in due {
        // Normally removed with its record; this also clears one whose record was damaged.
        t.expiry
            .remove((deadline, &who[..], seq))
            .map_err(db_error)?;
        left -= 1;
        if let Some(bytes) = expire_record(t, &who, seq)? {
            freed += bytes;
            outcome.expired += 1;
        }
    }
    // Records due in order, from the log.
    while left > 0 {
        match at_cursor(t, now)? {
            AtCursor::Stop => break,
            AtCursor::Skip(seq) => t.purge_cursor = seq + 1,
            AtCursor::Due(seq, who) => {
                t.purge_cursor = seq + 1;
                if let Some(bytes) = expire_record(t, &who, seq)? {
                    freed += bytes;
                    outcome.expired += 1;
                }
            }
        }
        left -= 1;
    }
    if let Some(idle_before) = idle_before {
        while left > 0 {
            let first = t.idle.first().map_err(db_error)?.map(|(k, _)| {
                let (key, who) = k.value();
                (key, who.to_vec())
            });
            let Some((key, who)) = first else { break };
            if key >= idle_before {
                break;
            }
            t.idle.remove((key, &who[..])).map_err(db_error)?;
            let Some(mut meta) = meta_get(t, &who)? else {
                continue;
            };
            if meta.last_touch >= idle_before {
                // Touched since it was filed: file it under its latest touch.
                meta.idle_key = meta.last_touch;
                t.idle
                    .insert((meta.idle_key, &who[..]), ())
                    .map_err(db_error)?;
                t.metas.insert(who.clone(), Some(meta));
                continue;
            }
            let (removed, bytes) = remove_all(t, &who)?;
            freed += bytes;
            left = left.saturating_sub((removed as usize).max(1));
            outcome.idle_recipients += 1;
        }
    }
    t.total_bytes = t.total_bytes.saturating_sub(freed);
    if left == 0 {
        let expiry_due = t
            .expiry
            .first()
            .map_err(db_error)?
            .is_some_and(|(k, _)| k.value().0 <= now);
        let log_due = !matches!(at_cursor(t, now)?, AtCursor::Stop);
        let idle_due = match idle_before {
            Some(before) => t
                .idle
                .first()
                .map_err(db_error)?
                .is_some_and(|(k, _)| k.value().0 < before),
            None => false,
        };
        outcome.more = expiry_due || log_due || idle_due;
    }
    Ok(outcome)
}

/// Removes a recipient's records, delivery counts, metadata and idle entry; returns
/// (records removed, bytes freed). Dedup entries stay until their window ends.
fn remove_all(t: &mut Tables<'_>, who: &[u8]) -> Result<(u64, u64)> {
    let Some(mut meta) = meta_get(t, who)? else {
        return Ok((0, 0));
    };
    let seqs = seqs_while(t, who, &meta, |_| Ok(true))?;
    let (removed, freed) = remove_records(t, who, &mut meta, &seqs)?;
    t.idle.remove((meta.idle_key, who)).map_err(db_error)?;
    t.metas.insert(who.to_vec(), None);
    Ok((removed, freed))
}

fn remove_recipient(t: &mut Tables<'_>, recipient: &RecipientId) -> Result<u64> {
    let (removed, freed) = remove_all(t, recipient.as_bytes())?;
    t.total_bytes = t.total_bytes.saturating_sub(freed);
    Ok(removed)
}

#[async_trait]
impl Storage for RedbStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_read_batch: usize::MAX,
            durable: true,
            native_ttl: false,
            shared: false,
        }
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
