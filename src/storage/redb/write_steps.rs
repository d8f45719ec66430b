//! The write steps, applied inside a group's transaction.

use redb::ReadableTable;

use super::db_error;
use super::layout::{
    CHUNKS, DEDUP, DEDUP_ORDER, DELIVERIES, DedupKey, DedupValue, EXPIRY, FILED, HEADER, IDLE,
    INFO, Key, LOG, META, Meta, NEVER, RETIRED, TAIL_MAX, UNKNOWN_LEN, decode_record, each_entry,
    each_seq, encode_record, listed_len, pack_list, peek_record, read_meta, unpack_list,
};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::limits::{Admission, Quota};
use crate::message::{MessageId, RecipientId, Seq};
use crate::storage::{Ack, AppendOutcome, Appended, NewRecord, PurgeOutcome};

/// The tables a group writes, opened once per transaction.
pub(super) struct Tables<'t> {
    pub(super) log: redb::Table<'t, u64, &'static [u8]>,
    pub(super) chunks: redb::Table<'t, Key<'static>, &'static [u8]>,
    pub(super) deliveries: redb::Table<'t, u64, u32>,
    pub(super) meta: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(super) expiry: redb::Table<'t, (u64, &'static [u8], u64), ()>,
    pub(super) idle: redb::Table<'t, (u64, &'static [u8]), ()>,
    pub(super) dedup: redb::Table<'t, DedupKey<'static>, DedupValue>,
    pub(super) dedup_order: redb::Table<'t, (u64, &'static [u8], [u8; 16]), ()>,
    pub(super) info: redb::Table<'t, &'static str, u64>,
    pub(super) retired: redb::Table<'t, u64, ()>,
    // Values read once per group and written back once, before the commit: the hot rows.
    pub(super) next_seq: u64,
    pub(super) total_bytes: u64,
    /// The highest deadline of a record not filed in `expiry` since the last such record was
    /// purged: a record due earlier than this is filed.
    pub(super) deadline_high: u64,
    /// The seq of the newest record not filed in `expiry` that has a deadline.
    pub(super) last_dated: u64,
    /// Purge's place in `log`: below it, every record not filed in `expiry` that has a
    /// deadline is gone (purged when due); records without one, filed ones and damaged ones
    /// were stepped over.
    pub(super) purge_cursor: u64,
    /// Rows in `retired`: `log` rows off every list and not deleted yet.
    pub(super) retired_count: u64,
    /// The size of those `log` rows.
    pub(super) retired_bytes: u64,
    /// Rows this transaction added to `retired`.
    pub(super) retired_here: u64,
    /// Recipients' metadata as read, and changed, by this group (`None`: none, or to remove;
    /// `true`: changed, to write back).
    pub(super) metas: std::collections::HashMap<Vec<u8>, (Option<Meta>, bool)>,
    /// (latest append time, dedup window, budget) for forgetting dedup ids at the group's
    /// end: at least as many as the group could add, so the tables never outgrow the window.
    pub(super) dedup_prune: Option<(u64, u64, usize)>,
}

impl Tables<'_> {
    /// Ends the group: forgets expired dedup ids, deletes retired `log` rows if too many wait
    /// (see [`RETIRED_HIGH`]), and writes the cached rows back.
    pub(super) fn finish(&mut self) -> Result<()> {
        if let Some((now, window, budget)) = self.dedup_prune.take() {
            prune_dedup(self, now, window, budget)?;
        }
        if self.retired_count > RETIRED_HIGH || self.retired_bytes > RETIRED_HIGH_BYTES {
            // At least as many as this group retired, so the backlog never grows past the
            // mark by more than one group's worth.
            let budget = usize::try_from(self.retired_here).unwrap_or(usize::MAX);
            sweep_retired(self, budget.saturating_add(SWEEP_STEP))?;
        }
        self.info
            .insert("retired_count", self.retired_count)
            .map_err(db_error)?;
        self.info
            .insert("retired_bytes", self.retired_bytes)
            .map_err(db_error)?;
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
            .insert("last_dated", self.last_dated)
            .map_err(db_error)?;
        self.info
            .insert("purge_cursor", self.purge_cursor)
            .map_err(db_error)?;
        for (who, (meta, changed)) in self.metas.drain() {
            if !changed {
                continue;
            }
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

/// Dedup entries a group forgets at most, beyond one per record it appended, so one commit
/// never does unbounded work.
const DEDUP_PRUNE_PER_GROUP: usize = 64;

/// Retired `log` rows, and their bytes, a group leaves for the writer's idle time. Past
/// either, each group also deletes as many as it retired, plus [`SWEEP_STEP`]. The bytes are
/// outside `max_total_bytes`: the file may hold this much more than the budget.
pub(super) const RETIRED_HIGH: u64 = 131_072;
pub(super) const RETIRED_HIGH_BYTES: u64 = 64 << 20;
/// Retired `log` rows one sweep deletes at most (the writer sweeps when it has nothing else
/// to do, one transaction of this many at a time, so a write never waits long behind one).
pub(super) const SWEEP_STEP: usize = 256;

pub(super) fn open_tables(txn: &redb::WriteTransaction) -> Result<Tables<'_>> {
    let info = txn.open_table(INFO).map_err(db_error)?;
    let read =
        |name| -> Result<u64> { Ok(info.get(name).map_err(db_error)?.map_or(0, |v| v.value())) };
    Ok(Tables {
        next_seq: read("next_seq")?,
        total_bytes: read("total_bytes")?,
        deadline_high: read("deadline_high")?,
        last_dated: read("last_dated")?,
        purge_cursor: read("purge_cursor")?,
        retired_count: read("retired_count")?,
        retired_bytes: read("retired_bytes")?,
        retired_here: 0,
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
        retired: txn.open_table(RETIRED).map_err(db_error)?,
        info,
    })
}

pub(super) fn meta_get(t: &mut Tables<'_>, who: &[u8]) -> Result<Option<Meta>> {
    if let Some((cached, _)) = t.metas.get(who) {
        return Ok(cached.clone());
    }
    let meta = read_meta(&t.meta, who)?;
    t.metas.insert(who.to_vec(), (meta.clone(), false));
    Ok(meta)
}

/// Sets the recipient's metadata (`None`: remove it) for the group's end.
fn meta_set(t: &mut Tables<'_>, who: &[u8], meta: Option<Meta>) {
    // Cached by `meta_get` already, normally: no new key.
    match t.metas.get_mut(who) {
        Some(slot) => *slot = (meta, true),
        None => {
            t.metas.insert(who.to_vec(), (meta, true));
        }
    }
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
    meta_set(t, who, keep);
    Ok(())
}

/// The recipient's seqs from the oldest on, while `keep_going` (given each one's listed
/// length) says so.
fn seqs_while(
    t: &Tables<'_>,
    who: &[u8],
    meta: &Meta,
    mut keep_going: impl FnMut(u64, u32) -> Result<bool>,
) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    each_entry(&t.chunks, who, meta, 0, |seq, len| {
        let more = keep_going(seq, len)?;
        if more {
            seqs.push(seq);
        }
        Ok(more)
    })?;
    Ok(seqs)
}

/// Takes `seqs` (ascending) off the recipient's list; returns those it held, ascending, each
/// with the body length the list kept for it ([`UNKNOWN_LEN`] if none).
fn unlist(
    t: &mut Tables<'_>,
    who: &[u8],
    meta: &mut Meta,
    seqs: &[u64],
) -> Result<Vec<(u64, u32)>> {
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
                Some((key.value().1, unpack_list(value.value())?))
            }
            None => None,
        };
        let Some((key, (mut members, mut lens))) = found else {
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
                held.push((seqs[i], lens.remove(at)));
            }
            i += 1;
        }
        if members.is_empty() {
            t.chunks.remove((who, key)).map_err(db_error)?;
        } else if members.len() != before {
            t.chunks
                .insert((who, key), &pack_list(&members, &lens)[..])
                .map_err(db_error)?;
        }
    }
    for &seq in &seqs[i..] {
        if let Ok(at) = meta.tail.binary_search(&seq) {
            meta.tail.remove(at);
            held.push((seq, meta.tail_lens.remove(at)));
        }
    }
    Ok(held)
}

/// Appends new seqs, with their `lens`, to the recipient's list, moving full runs of the tail
/// to `chunks`.
fn enlist(
    t: &mut Tables<'_>,
    who: &[u8],
    meta: &mut Meta,
    seqs: &[u64],
    lens: &[u32],
) -> Result<()> {
    meta.tail.extend_from_slice(seqs);
    meta.tail_lens.extend_from_slice(lens);
    while meta.tail.len() >= TAIL_MAX {
        let run: Vec<u64> = meta.tail.drain(..TAIL_MAX).collect();
        let run_lens: Vec<u32> = meta.tail_lens.drain(..TAIL_MAX).collect();
        t.chunks
            .insert((who, run[0]), &pack_list(&run, &run_lens)[..])
            .map_err(db_error)?;
    }
    Ok(())
}

/// Retires the `log` record `seq` (already taken off `who`'s list): removes its delivery
/// count and expiry entry now, and files its `log` row in `retired`, deleted later by
/// [`sweep_retired`] with many others in seq order. (Deleting it here, one row per record
/// scattered over the log, cost the chat server's drain about a fifth: BENCHMARKS.md.)
/// Returns its body length. With the length its list kept (`listed`), the record is not read:
/// it has no expiry entry (a filed record is listed with its length unknown). Otherwise a
/// record that names another recipient is left alone (only a damaged list points at one).
fn retire(t: &mut Tables<'_>, who: &[u8], seq: u64, listed: u32) -> Result<Option<u64>> {
    let found = if listed == UNKNOWN_LEN {
        match filed_body(t, who, seq, false)? {
            Some(found) => found,
            None => return Ok(None),
        }
    } else {
        t.deliveries.remove(seq).map_err(db_error)?;
        u64::from(listed)
    };
    if t.retired.insert(seq, ()).map_err(db_error)?.is_none() {
        t.retired_count += 1;
        t.retired_here += 1;
        // The row's size: a damaged record's length was taken from it the same way.
        t.retired_bytes += found + (HEADER + who.len()) as u64;
    }
    Ok(Some(found))
}

/// Deletes up to `budget` retired `log` rows, oldest first; returns how many.
pub(super) fn sweep_retired(t: &mut Tables<'_>, budget: usize) -> Result<u64> {
    let mut seqs = Vec::new();
    for entry in t.retired.iter().map_err(db_error)?.take(budget) {
        seqs.push(entry.map_err(db_error)?.0.value());
    }
    for &seq in &seqs {
        delete_retired(t, seq)?;
    }
    Ok(seqs.len() as u64)
}

/// If `seq` is retired, deletes its `log` row and its `retired` one; says whether it was.
fn delete_retired(t: &mut Tables<'_>, seq: u64) -> Result<bool> {
    if t.retired.remove(seq).map_err(db_error)?.is_none() {
        return Ok(false);
    }
    t.retired_count = t.retired_count.saturating_sub(1);
    if let Some(row) = t.log.remove(seq).map_err(db_error)? {
        t.retired_bytes = t.retired_bytes.saturating_sub(row.value().len() as u64);
    }
    if t.retired_count == 0 {
        // A row retired by its listed length but already gone (a damaged record purge
        // reclaimed) counted bytes no row gives back: none are left once nothing is retired.
        t.retired_bytes = 0;
    }
    // A delivery count made after it retired (`mark_delivered` of an acked seq finds its row
    // still there).
    t.deliveries.remove(seq).map_err(db_error)?;
    Ok(true)
}

/// Removes the `log` record `seq`, listed by nobody, with its delivery count and expiry
/// entry, at once; returns its body length (`None`: not there, or another recipient's).
fn remove_logged(t: &mut Tables<'_>, who: &[u8], seq: u64) -> Result<Option<u64>> {
    filed_body(t, who, seq, true)
}

/// The body length of `who`'s `log` record `seq`, with its delivery count and expiry entry
/// removed, and the row itself with `delete`. `None`: no such row, or it names another
/// recipient (then nothing is touched).
fn filed_body(t: &mut Tables<'_>, who: &[u8], seq: u64, delete: bool) -> Result<Option<u64>> {
    // (body length and filed deadline of `who`'s record; or the other recipient's row, to
    // put back if it was deleted)
    let found = {
        let value = if delete {
            t.log.remove(seq).map_err(db_error)?
        } else {
            t.log.get(seq).map_err(db_error)?
        };
        let Some(value) = value else {
            return Ok(None);
        };
        // A damaged record is still removed; an expiry entry it had is dropped when purge
        // reaches it.
        match decode_record(seq, value.value()) {
            Ok(record) if record.who != who => Err(value.value().to_vec()),
            Ok(record) => Ok((
                record.body.len() as u64,
                (record.flags & FILED != 0).then_some(record.expires_at),
            )),
            Err(_) => Ok((
                value.value().len().saturating_sub(HEADER + who.len()) as u64,
                None,
            )),
        }
    };
    let (len, filed_at) = match found {
        Ok(found) => found,
        Err(other) => {
            if delete {
                // Rare enough to put back rather than look before every removal.
                t.log.insert(seq, &other[..]).map_err(db_error)?;
            }
            return Ok(None);
        }
    };
    if let Some(deadline) = filed_at {
        t.expiry.remove((deadline, who, seq)).map_err(db_error)?;
    }
    t.deliveries.remove(seq).map_err(db_error)?;
    Ok(Some(len))
}

/// Takes `seqs` (ascending) off the recipient's list, and deletes their `log` rows at once if
/// they lie together in the log, or retires them if they are scattered (two or more records
/// only); returns (records removed, bytes freed). Seqs the recipient does not hold are left alone.
fn remove_records(
    t: &mut Tables<'_>,
    who: &[u8],
    meta: &mut Meta,
    seqs: &[u64],
) -> Result<(u64, u64)> {
    let (mut removed, mut freed) = (0, 0);
    let held = unlist(t, who, meta, seqs)?;
    // Records that lie together in the log (a backlog sent while nothing else was) are
    // deleted at once: their rows share a leaf or two. Records scattered among other
    // recipients' would each rewrite a leaf of their own, so they are retired instead.
    let scattered = match (held.first(), held.last()) {
        // (A damaged list may hold seqs out of order: no subtraction that could overflow.)
        (Some(&(first, _)), Some(&(last, _))) if held.len() > 1 => {
            last.abs_diff(first) >= 2 * held.len() as u64
        }
        _ => false,
    };
    for (seq, listed) in held {
        removed += 1;
        let len = if scattered {
            retire(t, who, seq, listed)?
        } else {
            remove_logged(t, who, seq)?
        };
        freed += len.unwrap_or(0);
    }
    meta.count = meta.count.saturating_sub(removed);
    meta.bytes = meta.bytes.saturating_sub(freed);
    Ok((removed, freed))
}

pub(super) fn append(
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
        None => Meta::new(t.next_seq),
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
    if quota.admit(meta.count, meta.bytes, adding, adding_bytes)? == Admission::DropOldestFirst {
        let (mut keep, mut keep_bytes) = (meta.count, meta.bytes);
        let log = &t.log;
        drop_seqs = seqs_while(t, who, &meta, |seq, listed| {
            if quota.fits(keep, keep_bytes, adding, adding_bytes) {
                return Ok(false);
            }
            let len = match listed {
                UNKNOWN_LEN => log.get(seq).map_err(db_error)?.map_or(0, |value| {
                    value.value().len().saturating_sub(HEADER + who.len()) as u64
                }),
                known => u64::from(known),
            };
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
    let mut new_lens = Vec::with_capacity(adding as usize);
    for (index, record) in records.iter().enumerate() {
        if !matches!(plan[index], Plan::New) {
            continue;
        }
        next_seq += 1;
        assigned[index] = next_seq;
        let mut flags = 0;
        if let Some(deadline) = record.expires_at.map(Timestamp::as_millis) {
            if t.purge_cursor > t.last_dated {
                // Every unfiled record with a deadline is purged: the order starts afresh.
                t.deadline_high = 0;
            }
            if deadline < t.deadline_high {
                flags |= FILED;
                t.expiry
                    .insert((deadline, who, next_seq), ())
                    .map_err(db_error)?;
            } else {
                t.deadline_high = deadline;
                t.last_dated = next_seq;
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
        new_lens.push(listed_len(record.body.len(), flags & FILED != 0));
        meta.count += 1;
        meta.bytes += record.body.len() as u64;
    }
    if adding > 0 {
        let new: Vec<u64> = assigned.iter().copied().filter(|&seq| seq != 0).collect();
        enlist(t, who, &mut meta, &new, &new_lens)?;
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

/// One more hand-over for each of `seqs`, each in its own `deliveries` row
/// (`Storage::mark_delivered`).
pub(super) fn mark_delivered(
    t: &mut Tables<'_>,
    recipient: &RecipientId,
    seqs: &[Seq],
) -> Result<()> {
    let who = recipient.as_bytes();
    let Some(meta) = meta_get(t, who)? else {
        return Ok(());
    };
    for seq in seqs {
        set_count(t, who, seq.0, |own| {
            Some(meta.delivery_count(seq.0, own).saturating_add(1))
        })?;
    }
    Ok(())
}

/// Counts the hand-overs of a read for delivery: `seqs` the records it returned, `expired`
/// those it passed over, read after `after`. A read that saw every record from the
/// recipient's watermark on (its cursor at or below it, or nothing listed between the two)
/// moves the watermark to its last record: the records it handed over for the first time need no `deliveries` row, the
/// common case, so draining a queue in order writes one `meta` row per batch instead of a
/// row per message. The rest (a redelivery, a record with a count of its own, a read from
/// past the watermark) are counted as `mark_delivered` counts; a record passed over under
/// the new watermark gets a count of 0, since passing over is not handing over.
pub(super) fn count_read(
    t: &mut Tables<'_>,
    recipient: &RecipientId,
    after: Option<Seq>,
    seqs: &[Seq],
    expired: &[Seq],
) -> Result<()> {
    let who = recipient.as_bytes();
    let Some(mut meta) = meta_get(t, who)? else {
        return Ok(());
    };
    let Some(high) = seqs.iter().map(|seq| seq.0).max() else {
        return Ok(());
    };
    let watermark = meta.delivered;
    // The read saw every record from the watermark on if its cursor was at or below it, or
    // if the recipient lists nothing between the two (acked, or a queue emptied and started
    // again, whose new meta begins at watermark 0).
    let contiguous = match after {
        Some(after) if after.0 > watermark => {
            let mut first = None;
            each_seq(&t.chunks, who, &meta, watermark.saturating_add(1), |seq| {
                first = Some(seq);
                Ok(false)
            })?;
            first.is_none_or(|first| first > after.0)
        }
        _ => true,
    };
    let advance = contiguous && high > watermark;
    for seq in seqs.iter().map(|seq| seq.0) {
        if advance && seq > watermark {
            // The new watermark counts it, unless it has a count of its own.
            let own = t.deliveries.get(seq).map_err(db_error)?.map(|v| v.value());
            if let Some(own) = own {
                t.deliveries
                    .insert(seq, own.saturating_add(1))
                    .map_err(db_error)?;
            }
        } else {
            set_count(t, who, seq, |own| {
                Some(meta.delivery_count(seq, own).saturating_add(1))
            })?;
        }
    }
    if advance {
        for seq in expired.iter().map(|seq| seq.0) {
            if seq > watermark && seq <= high {
                set_count(t, who, seq, |own| own.is_none().then_some(0))?;
            }
        }
        meta.delivered = high;
        meta_set(t, who, Some(meta));
    }
    Ok(())
}

/// Sets the `deliveries` row of `seq` to what `count` makes of its current one (`None`: leave
/// it), if `seq` is a record of `who` (its log value names it; a damaged one is caught when it
/// is read, so the header suffices here).
fn set_count(
    t: &mut Tables<'_>,
    who: &[u8],
    seq: u64,
    count: impl FnOnce(Option<u32>) -> Option<u32>,
) -> Result<()> {
    let ours = t
        .log
        .get(seq)
        .map_err(db_error)?
        .is_some_and(|value| peek_record(value.value()).is_some_and(|r| r.who == who));
    if !ours {
        return Ok(());
    }
    let own = t.deliveries.get(seq).map_err(db_error)?.map(|v| v.value());
    if let Some(count) = count(own) {
        t.deliveries.insert(seq, count).map_err(db_error)?;
    }
    Ok(())
}

pub(super) fn ack_records(
    t: &mut Tables<'_>,
    recipient: &RecipientId,
    ack: &Ack,
    now: u64,
) -> Result<u64> {
    let who = recipient.as_bytes();
    let Some(mut meta) = meta_get(t, who)? else {
        return Ok(0);
    };
    let mut seqs = match ack.through {
        Some(through) => seqs_while(t, who, &meta, |seq, _| Ok(seq <= through.0))?,
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

/// Removes one record purge found due (or damaged): off its recipient's list and counted as
/// lost, and out of the log. Returns (bytes freed, whether the recipient listed it), or `None`
/// if it was already gone.
fn expire_record(t: &mut Tables<'_>, who: &[u8], seq: u64) -> Result<Option<(u64, bool)>> {
    // A retired record left its list, and the counts, already: only its row is left. Looked
    // at first, so a damaged `meta` row of its recipient cannot stop purge here.
    if delete_retired(t, seq)? {
        return Ok(Some((0, false)));
    }
    let mut meta = match meta_get(t, who)? {
        Some(meta) => meta,
        None => Meta::new(t.next_seq),
    };
    let (removed, freed) = remove_records(t, who, &mut meta, &[seq])?;
    if removed == 0 {
        // Listed by nobody we can tell (its recipient bytes were damaged, or a list was):
        // reclaim it all the same; a list that still holds it reports it missing on read.
        return Ok(remove_logged(t, who, seq)?.map(|freed| (freed, false)));
    }
    meta.lost_total += 1;
    meta_put(t, who, meta)?;
    Ok(Some((freed, true)))
}

/// What purge's log cursor finds at its place.
enum AtCursor {
    /// Nothing to do now: the record there is due later.
    Stop,
    /// No record with a deadline of its own is left at or past the cursor.
    Done,
    /// A record to step over (no deadline, or filed in `expiry`).
    Skip(u64),
    /// A record due now, or damaged (never deliverable), of the recipient it names.
    Remove(u64, Vec<u8>),
}

fn at_cursor(t: &Tables<'_>, now: u64) -> Result<AtCursor> {
    if t.purge_cursor > t.last_dated {
        return Ok(AtCursor::Done);
    }
    let Some(entry) = t
        .log
        .range(t.purge_cursor..=t.last_dated)
        .map_err(db_error)?
        .next()
    else {
        return Ok(AtCursor::Done);
    };
    let (key, value) = entry.map_err(db_error)?;
    let (seq, value) = (key.value(), value.value());
    let Some(peek) = peek_record(value) else {
        return Ok(AtCursor::Remove(seq, Vec::new()));
    };
    // Stepping over needs no checksum: a damaged record is reported when it is read.
    if peek.expires_at == NEVER || peek.flags & FILED != 0 {
        return Ok(AtCursor::Skip(seq));
    }
    Ok(match decode_record(seq, value) {
        Err(_) => AtCursor::Remove(seq, peek.who.to_vec()),
        Ok(record) if record.expires_at <= now => AtCursor::Remove(seq, record.who.to_vec()),
        Ok(_) => AtCursor::Stop,
    })
}

pub(super) fn purge(
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
    outcome.examined += due.len() as u64;
    for (deadline, who, seq) in due {
        // Normally removed with its record; this also clears one whose record was damaged.
        t.expiry
            .remove((deadline, &who[..], seq))
            .map_err(db_error)?;
        left -= 1;
        if let Some((bytes, listed)) = expire_record(t, &who, seq)? {
            freed += bytes;
            outcome.expired += u64::from(listed);
        }
    }
    // Records due in order, from the log.
    while left > 0 {
        outcome.examined += 1;
        match at_cursor(t, now)? {
            AtCursor::Stop => break,
            AtCursor::Done => {
                t.purge_cursor = t.last_dated.saturating_add(1);
                break;
            }
            AtCursor::Skip(seq) => t.purge_cursor = seq + 1,
            AtCursor::Remove(seq, who) => {
                t.purge_cursor = seq + 1;
                if let Some((bytes, listed)) = expire_record(t, &who, seq)? {
                    freed += bytes;
                    outcome.expired += u64::from(listed);
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
            outcome.examined += 1;
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
                meta_set(t, &who, Some(meta));
                // Refiling is work too: a call's budget bounds it.
                left -= 1;
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
        let log_due = matches!(at_cursor(t, now)?, AtCursor::Skip(_) | AtCursor::Remove(..));
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

/// Removes a recipient's records, delivery counts, metadata, idle entry and dedup ids; returns
/// (records removed, bytes freed). (Its `dedup_order` rows go when pruning reaches them.)
fn remove_all(t: &mut Tables<'_>, who: &[u8]) -> Result<(u64, u64)> {
    let ids: Vec<[u8; 16]> = t
        .dedup
        .range((who, [0u8; 16])..=(who, [u8::MAX; 16]))
        .map_err(db_error)?
        .map(|entry| entry.map(|(key, _)| key.value().1))
        .collect::<std::result::Result<_, _>>()
        .map_err(db_error)?;
    for id in ids {
        t.dedup.remove((who, id)).map_err(db_error)?;
    }
    let Some(mut meta) = meta_get(t, who)? else {
        return Ok((0, 0));
    };
    let seqs = seqs_while(t, who, &meta, |_, _| Ok(true))?;
    let (removed, freed) = remove_records(t, who, &mut meta, &seqs)?;
    t.idle.remove((meta.idle_key, who)).map_err(db_error)?;
    meta_set(t, who, None);
    Ok((removed, freed))
}

pub(super) fn remove_recipient(t: &mut Tables<'_>, recipient: &RecipientId) -> Result<u64> {
    let (removed, freed) = remove_all(t, recipient.as_bytes())?;
    t.total_bytes = t.total_bytes.saturating_sub(freed);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use redb::backends::InMemoryBackend;
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

    use super::*;

    const LONG_AGO: u64 = 1_000;

    fn database() -> redb::Database {
        let db = redb::Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .unwrap();
        super::super::init(&db).unwrap();
        db
    }

    /// Runs `step` in one write transaction, committed as a group is.
    fn in_group<T>(db: &redb::Database, step: impl FnOnce(&mut Tables<'_>) -> T) -> T {
        let txn = db.begin_write().unwrap();
        let out = {
            let mut tables = open_tables(&txn).unwrap();
            let out = step(&mut tables);
            tables.finish().unwrap();
            out
        };
        txn.commit().unwrap();
        out
    }

    fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
        db: &redb::Database,
        table: TableDefinition<K, V>,
    ) -> u64 {
        let read = db.begin_read().unwrap();
        read.open_table(table).unwrap().len().unwrap()
    }

    fn info(db: &redb::Database, name: &str) -> u64 {
        let read = db.begin_read().unwrap();
        let info = read.open_table(INFO).unwrap();
        info.get(name).unwrap().map_or(0, |v| v.value())
    }

    fn total_bytes(db: &redb::Database) -> u64 {
        info(db, "total_bytes")
    }

    fn records(count: usize, body: &[u8], expires_at: Option<u64>) -> Vec<NewRecord> {
        (0..count)
            .map(|_| NewRecord {
                id: MessageId::generate(),
                dedup: false,
                sent_at: Timestamp::from_millis(LONG_AGO),
                expires_at: expires_at.map(Timestamp::from_millis),
                body: body.to_vec(),
            })
            .collect()
    }

    fn ack_through(t: &mut Tables<'_>, who: &RecipientId, through: u64) -> u64 {
        let ack = Ack {
            through: Some(Seq(through)),
            ..Ack::default()
        };
        ack_records(t, who, &ack, LONG_AGO).unwrap()
    }

    #[test]
    fn an_acked_record_is_retired_then_removed_by_purge_and_counted_once() {
        let db = database();
        let (acked, kept) = (
            RecipientId::new("acked").unwrap(),
            RecipientId::new("kept").unwrap(),
        );
        // `acked`'s records scattered among `kept`'s, as a busy server's are.
        let last = in_group(&db, |t| {
            let mut last = 0;
            for _ in 0..3 {
                let due = records(1, b"due soon", Some(2_000));
                let outcome = append(t, &acked, due, &Quota::UNLIMITED, LONG_AGO).unwrap();
                last = outcome.records[0].seq().0;
                append(
                    t,
                    &kept,
                    records(2, b"12345", None),
                    &Quota::UNLIMITED,
                    LONG_AGO,
                )
                .unwrap();
            }
            last
        });
        assert_eq!(total_bytes(&db), 3 * 8 + 6 * 5);

        assert_eq!(in_group(&db, |t| ack_through(t, &acked, last)), 3);
        // Off the list and out of the byte count at once; the rows wait to be swept.
        assert_eq!(total_bytes(&db), 6 * 5);
        assert_eq!(rows(&db, RETIRED), 3);
        assert_eq!(rows(&db, LOG), 9);
        let row = (HEADER + "acked".len() + 8) as u64;
        assert_eq!(info(&db, "retired_bytes"), 3 * row);

        // Purge's log cursor meets them when they fall due: it deletes them, and neither
        // counts them expired nor takes their bytes off a second time.
        let outcome = in_group(&db, |t| purge(t, 3_000, None, 100).unwrap());
        assert_eq!(outcome.expired, 0);
        assert_eq!(rows(&db, RETIRED), 0);
        assert_eq!(rows(&db, LOG), 6);
        assert_eq!(total_bytes(&db), 6 * 5);
        assert_eq!(info(&db, "retired_bytes"), 0);
        assert_eq!(info(&db, "retired_count"), 0);
    }

    /// A list keeps each record's body length, except a record filed in `expiry`, listed with
    /// its length unknown: a scattered ack reads that one's row, and removes its expiry
    /// entry; the bytes freed are the bodies' either way.
    #[test]
    fn lists_keep_lengths_and_a_filed_record_is_read_when_it_retires() {
        let db = database();
        let (who, other) = (
            RecipientId::new("who").unwrap(),
            RecipientId::new("other").unwrap(),
        );
        // Due later, then sooner (filed), in turn, scattered among `other`'s records; 40 in
        // all, so the oldest 32 move to a `chunks` row.
        let last = in_group(&db, |t| {
            let mut last = 0;
            for i in 0..40u64 {
                let deadline = if i % 2 == 0 { 9_000 } else { 5_000 };
                let body = vec![b'x'; 1 + i as usize];
                let mine = records(1, &body, Some(deadline));
                last = append(t, &who, mine, &Quota::UNLIMITED, LONG_AGO)
                    .unwrap()
                    .records[0]
                    .seq()
                    .0;
                append(
                    t,
                    &other,
                    records(2, b"12345", None),
                    &Quota::UNLIMITED,
                    LONG_AGO,
                )
                .unwrap();
            }
            last
        });
        assert_eq!(rows(&db, EXPIRY), 20, "every sooner deadline is filed");
        let read = db.begin_read().unwrap();
        let meta = read_meta(&read.open_table(META).unwrap(), b"who")
            .unwrap()
            .unwrap();
        let chunk_lens = {
            let chunks = read.open_table(CHUNKS).unwrap();
            let mine: &[u8] = b"who";
            let mut range = chunks.range((mine, 0)..=(mine, u64::MAX)).unwrap();
            let (_, chunk) = range.next().unwrap().unwrap();
            assert!(range.next().is_none(), "one chunk row of 32");
            unpack_list(chunk.value()).unwrap().1
        };
        let lens: Vec<u32> = chunk_lens.into_iter().chain(meta.tail_lens).collect();
        let expected: Vec<u32> = (0..40u32)
            .map(|i| if i % 2 == 0 { 1 + i } else { UNKNOWN_LEN })
            .collect();
        assert_eq!(lens, expected);
        drop(read);

        assert_eq!(in_group(&db, |t| ack_through(t, &who, last)), 40);
        assert_eq!(rows(&db, RETIRED), 40);
        assert_eq!(
            rows(&db, EXPIRY),
            0,
            "the filed records' entries went with them"
        );
        assert_eq!(
            total_bytes(&db),
            40 * 2 * 5,
            "only `other`'s bodies are left"
        );
        let headers = 40 * (HEADER + "who".len()) as u64;
        assert_eq!(info(&db, "retired_bytes"), (1..=40).sum::<u64>() + headers);
    }

    /// DropOldest decides by the lengths the list holds (or, unknown, the records' own): 10
    /// and 20 bytes stored, 30 allowed, 11 more need both gone, where one byte counted too
    /// many on the first would have dropped it alone.
    #[test]
    fn drop_oldest_by_bytes_counts_the_listed_lengths_exactly() {
        for filed in [false, true] {
            let db = database();
            let who = RecipientId::new("who").unwrap();
            let quota = Quota {
                max_messages: 100,
                max_bytes: 30,
                overflow: crate::limits::Overflow::DropOldest,
                ..Quota::UNLIMITED
            };
            let outcome = in_group(&db, |t| {
                // With `filed`, the second falls due before the first: listed length unknown.
                let (first, second) = if filed {
                    (9_000, 5_000)
                } else {
                    (9_000, 9_000)
                };
                append(t, &who, records(1, &[1; 10], Some(first)), &quota, LONG_AGO).unwrap();
                append(
                    t,
                    &who,
                    records(1, &[2; 20], Some(second)),
                    &quota,
                    LONG_AGO,
                )
                .unwrap();
                append(t, &who, records(1, &[3; 11], None), &quota, LONG_AGO).unwrap()
            });
            assert_eq!(outcome.dropped, 2, "filed: {filed}");
            assert_eq!(total_bytes(&db), 11);
            assert_eq!(rows(&db, EXPIRY), 0);
        }
    }

    #[test]
    fn records_lying_together_are_deleted_at_once() {
        let db = database();
        let (who, other) = (
            RecipientId::new("backlog").unwrap(),
            RecipientId::new("other").unwrap(),
        );
        let last = in_group(&db, |t| {
            let outcome = append(t, &who, records(50, b"body", None), &Quota::UNLIMITED, 0);
            append(t, &other, records(1, b"body", None), &Quota::UNLIMITED, 0).unwrap();
            outcome.unwrap().records.last().unwrap().seq().0
        });
        assert_eq!(in_group(&db, |t| ack_through(t, &who, last)), 50);
        assert_eq!(rows(&db, RETIRED), 0);
        assert_eq!(rows(&db, LOG), 1);
    }

    #[test]
    fn a_sweep_deletes_the_oldest_retired_rows_first_and_leaves_the_rest_readable() {
        let db = database();
        let who = RecipientId::new("someone").unwrap();
        let seqs: Vec<u64> = in_group(&db, |t| {
            let outcome = append(t, &who, records(10, b"body", None), &Quota::UNLIMITED, 0);
            outcome.unwrap().records.iter().map(|r| r.seq().0).collect()
        });
        in_group(&db, |t| {
            let ack = Ack {
                seqs: [seqs[7], seqs[1], seqs[4]].map(Seq).to_vec(),
                ..Ack::default()
            };
            assert_eq!(ack_records(t, &who, &ack, 0).unwrap(), 3);
            assert_eq!(t.retired_here, 3);
        });
        assert_eq!(in_group(&db, |t| sweep_retired(t, 2).unwrap()), 2);
        let read = db.begin_read().unwrap();
        let log = read.open_table(LOG).unwrap();
        let left: Vec<u64> = log.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        let retired = read.open_table(RETIRED).unwrap();
        let waiting: Vec<u64> = retired
            .iter()
            .unwrap()
            .map(|e| e.unwrap().0.value())
            .collect();
        assert_eq!(waiting, [seqs[7]], "the oldest two went first");
        let mut expected: Vec<u64> = seqs.clone();
        expected.retain(|s| *s != seqs[1] && *s != seqs[4]);
        assert_eq!(left, expected);
        assert_eq!(
            read.open_table(INFO)
                .unwrap()
                .get("retired_count")
                .unwrap()
                .map(|v| v.value()),
            Some(1)
        );
    }
}
