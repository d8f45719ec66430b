//! The file's tables, and how its rows and records are encoded.

use redb::{ReadableTable, TableDefinition};

use super::{corrupt, db_error};
use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::message::MessageId;
use crate::storage::NewRecord;

/// (recipient, seq)
pub(super) type Key<'a> = (&'a [u8], u64);
/// (recipient, message id)
pub(super) type DedupKey<'a> = (&'a [u8], [u8; 16]);
/// (seq, when)
pub(super) type DedupValue = (u64, u64);

pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(super) const CHUNKS: TableDefinition<Key, &[u8]> = TableDefinition::new("chunks");
pub(super) const DELIVERIES: TableDefinition<u64, u32> = TableDefinition::new("deliveries");
pub(super) const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
pub(super) const EXPIRY: TableDefinition<(u64, &[u8], u64), ()> = TableDefinition::new("expiry");
pub(super) const IDLE: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("idle");
pub(super) const DEDUP: TableDefinition<DedupKey, DedupValue> = TableDefinition::new("dedup");
pub(super) const DEDUP_ORDER: TableDefinition<(u64, &[u8], [u8; 16]), ()> =
    TableDefinition::new("dedup_order");
pub(super) const INFO: TableDefinition<&str, u64> = TableDefinition::new("info");
/// Seqs of `log` records taken off their recipient's list (acked, dropped, removed) while
/// scattered among other recipients' records, whose `log` row is not deleted yet: deleted
/// later, oldest first, many at a time.
pub(super) const RETIRED: TableDefinition<u64, ()> = TableDefinition::new("retired");

/// The file format this code writes; a file with a higher number was written by a newer
/// version and is refused. Format 4 added the delivery watermark to `meta` rows (see
/// [`Meta::delivered`]); a format 3 file reads as one whose watermarks are all 0. Format 5
/// added `retired`: a `log` row may outlive its place on a list until it is swept, which
/// an older build would count again if purge found it. A format 3 or 4 file has nothing
/// retired, and is marked format 5 when opened. Format 6 keeps each listed record's body
/// length beside its seq (in `chunks` rows and `meta` tails), so an ack need not read the
/// record; lists written before it read with every length unknown ([`UNKNOWN_LEN`]).
pub(super) const FORMAT: u64 = 6;
/// The oldest format this code reads (format 2 keyed records by recipient).
pub(super) const OLDEST_FORMAT: u64 = 3;
pub(super) const NEVER: u64 = u64::MAX;
/// Bytes of a `log` value besides the recipient and the body: checksum, flags, recipient
/// length, id, sent_at, expires_at.
pub(super) const HEADER: usize = 4 + 1 + 1 + 16 + 8 + 8;
/// `log` flag: the record is filed in `expiry` (its deadline arrived out of order).
pub(super) const FILED: u8 = 1;
/// Seqs kept in a recipient's `meta` row before they move to a `chunks` row.
pub(super) const TAIL_MAX: usize = 32;
/// A listed record's length when the list cannot tell it: the list was written before format
/// 6, or the record is filed in `expiry` (removing it needs its deadline, which only its `log`
/// row holds). Such a record's row is read when it leaves its list.
pub(super) const UNKNOWN_LEN: u32 = u32::MAX;

/// The length a list keeps for a record of `body_len` bytes, `filed` in `expiry` or not.
pub(super) fn listed_len(body_len: usize, filed: bool) -> u32 {
    match u32::try_from(body_len) {
        Ok(len) if !filed && len != UNKNOWN_LEN => len,
        _ => UNKNOWN_LEN,
    }
}
/// A recipient's row in `meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) count: u64,
    pub(super) bytes: u64,
    /// Losses ever counted, from a base that only grows (see `Meta::new`).
    pub(super) lost_total: u64,
    /// Losses the client confirmed it was told of.
    pub(super) lost_confirmed: u64,
    pub(super) last_touch: u64,
    /// The key under which the recipient is filed in `idle` (lazily refiled by purge).
    pub(super) idle_key: u64,
    /// The newest seqs of the recipient's list (fewer than `TAIL_MAX`), above every seq in
    /// its `chunks` rows.
    pub(super) tail: Vec<u64>,
    /// The body length of each record in `tail`, at the same index ([`UNKNOWN_LEN`] where the
    /// list cannot tell).
    pub(super) tail_lens: Vec<u32>,
    /// The delivery watermark: a record of the recipient at or below it counts one delivery
    /// unless it has a `deliveries` row of its own, one above it none (see
    /// `write_steps::count_read`).
    pub(super) delivered: u64,
}

impl Meta {
    const FIXED: usize = 48;
    /// A format 4 or 5 row with a watermark ends with it and this byte: 8k + 1 bytes long, a
    /// length no row without one has (8k), so format 3 rows read unchanged.
    const WATERMARK_MARK: u8 = 1;
    /// A format 6 row: the fixed words, the tail's seqs, their lengths (4 bytes each), the
    /// watermark, a CRC-32 of all that, then this byte. 48 + 12n + 13 bytes, odd, so never a
    /// format 3 row; its last byte tells it from a format 4 or 5 row.
    const LISTED_MARK: u8 = 2;

    /// The times `seq` (a record of this recipient) was handed over, from its own count if
    /// it has one.
    pub(super) fn delivery_count(&self, seq: u64, own: Option<u32>) -> u32 {
        own.unwrap_or(u32::from(seq <= self.delivered))
    }

    /// A new recipient's row. Its loss total starts at the file's seq counter (`next_seq`), above any total
    /// an earlier row of this recipient reached (each loss is a record, and each record took a
    /// seq), so a stale confirmation cannot hide a new loss.
    pub(super) fn new(next_seq: u64) -> Self {
        Self {
            lost_total: next_seq,
            lost_confirmed: next_seq,
            ..Self::default()
        }
    }

    pub(super) fn lost(&self) -> u64 {
        self.lost_total.saturating_sub(self.lost_confirmed)
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        debug_assert_eq!(self.tail.len(), self.tail_lens.len());
        let mut out = Vec::with_capacity(Self::FIXED + 12 * self.tail.len() + 13);
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
        out.extend(self.tail_lens.iter().flat_map(|len| len.to_le_bytes()));
        out.extend_from_slice(&self.delivered.to_le_bytes());
        seal(out, Self::LISTED_MARK)
    }

    pub(super) fn decode(raw: &[u8]) -> Result<Self> {
        if !raw.len().is_multiple_of(2)
            && raw.len() >= Self::FIXED + 13
            && raw[raw.len() - 1] == Self::LISTED_MARK
        {
            return Self::decode_listed(raw);
        }
        let (raw, delivered) = match raw.len() % 8 {
            1 if raw.len() >= Self::FIXED + 9 && raw[raw.len() - 1] == Self::WATERMARK_MARK => {
                let at = raw.len() - 9;
                let word = u64::from_le_bytes(raw[at..at + 8].try_into().expect("8"));
                (&raw[..at], word)
            }
            _ => (raw, 0),
        };
        if raw.len() < Self::FIXED {
            return Err(Error::storage_msg(
                Retry::No,
                format!("corrupt recipient metadata: {} bytes", raw.len()),
            ));
        }
        let tail = unpack_seqs(&raw[Self::FIXED..])?;
        let tail_lens = vec![UNKNOWN_LEN; tail.len()];
        Ok(Self::with_fixed(raw, tail, tail_lens, delivered))
    }

    /// A format 6 row (see [`Meta::LISTED_MARK`]).
    fn decode_listed(row: &[u8]) -> Result<Self> {
        let corrupt = |what: &str| {
            Error::storage_msg(
                Retry::No,
                format!("corrupt recipient metadata: {} bytes, {what}", row.len()),
            )
        };
        let raw = unseal(row).ok_or_else(|| corrupt("checksum mismatch"))?;
        let listed = raw.len() - Self::FIXED - 8;
        if !listed.is_multiple_of(12) {
            return Err(corrupt("not whole list entries"));
        }
        let n = listed / 12;
        let seqs_end = Self::FIXED + 8 * n;
        let (tail, tail_lens) = unpack_entries(
            &raw[Self::FIXED..seqs_end],
            &raw[seqs_end..seqs_end + 4 * n],
        );
        let at = raw.len() - 8;
        let delivered = u64::from_le_bytes(raw[at..].try_into().expect("8"));
        Ok(Self::with_fixed(raw, tail, tail_lens, delivered))
    }

    /// The row's fixed words (its first [`Meta::FIXED`] bytes, checked present) with a tail.
    fn with_fixed(raw: &[u8], tail: Vec<u64>, tail_lens: Vec<u32>, delivered: u64) -> Self {
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8"));
        Self {
            count: word(0),
            bytes: word(1),
            lost_total: word(2),
            lost_confirmed: word(3),
            last_touch: word(4),
            idle_key: word(5),
            tail,
            tail_lens,
            delivered,
        }
    }
}

pub(super) fn read_meta(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    who: &[u8],
) -> Result<Option<Meta>> {
    match table.get(who).map_err(db_error)? {
        Some(raw) => Meta::decode(raw.value()).map(Some),
        None => Ok(None),
    }
}

/// Seqs packed as little-endian u64s (a format 3 to 5 `chunks` value, or a `meta` row's
/// tail before format 6).
fn unpack_seqs(raw: &[u8]) -> Result<Vec<u64>> {
    if !raw.len().is_multiple_of(8) {
        return Err(corrupt_list(raw));
    }
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        .collect())
}

fn corrupt_list(raw: &[u8]) -> Error {
    Error::storage_msg(Retry::No, format!("corrupt seq list: {} bytes", raw.len()))
}

/// Seqs (8 bytes each) and their lengths (4 bytes each), as many of one as of the other.
fn unpack_entries(seqs: &[u8], lens: &[u8]) -> (Vec<u64>, Vec<u32>) {
    (
        seqs.chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
            .collect(),
        lens.chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
            .collect(),
    )
}

/// A format 6 `chunks` value ends with this byte after its seqs, their lengths and a CRC-32
/// of both: 12n + 5 bytes, odd, where an older value (8n) is even.
const CHUNK_MARK: u8 = 2;

/// Ends `out` with a CRC-32 of it and then `mark`, as format 6 list rows end: a flipped bit
/// in a list is found, not trusted (an ack takes the lengths a list holds without reading
/// the records).
fn seal(mut out: Vec<u8>, mark: u8) -> Vec<u8> {
    let sum = crc32fast::hash(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.push(mark);
    out
}

/// What [`seal`] sealed (the mark is checked by the caller); `None` if the checksum fails.
fn unseal(raw: &[u8]) -> Option<&[u8]> {
    let at = raw.len().checked_sub(5)?;
    let (payload, sum) = (&raw[..at], &raw[at..at + 4]);
    (crc32fast::hash(payload).to_le_bytes() == sum).then_some(payload)
}

/// A `chunks` value: seqs, ascending, and each one's body length ([`UNKNOWN_LEN`] if the
/// value was written before format 6).
pub(super) fn unpack_list(raw: &[u8]) -> Result<(Vec<u64>, Vec<u32>)> {
    if raw.len().is_multiple_of(2) {
        let seqs = unpack_seqs(raw)?;
        let lens = vec![UNKNOWN_LEN; seqs.len()];
        return Ok((seqs, lens));
    }
    let listed = match unseal(raw) {
        Some(listed) if raw[raw.len() - 1] == CHUNK_MARK && listed.len().is_multiple_of(12) => {
            listed
        }
        _ => return Err(corrupt_list(raw)),
    };
    let n = listed.len() / 12;
    Ok(unpack_entries(&listed[..8 * n], &listed[8 * n..]))
}

/// The seqs of a `chunks` value.
pub(super) fn list_seqs(raw: &[u8]) -> Result<Vec<u64>> {
    unpack_list(raw).map(|(seqs, _)| seqs)
}

/// A `chunks` value of `seqs` with their `lens`, as many of one as of the other.
pub(super) fn pack_list(seqs: &[u64], lens: &[u32]) -> Vec<u8> {
    debug_assert_eq!(seqs.len(), lens.len());
    let mut out = Vec::with_capacity(12 * seqs.len() + 5);
    out.extend(seqs.iter().flat_map(|seq| seq.to_le_bytes()));
    out.extend(lens.iter().flat_map(|len| len.to_le_bytes()));
    seal(out, CHUNK_MARK)
}

/// Visits the recipient's seqs from `start` on, in order (its `chunks` rows, then the tail
/// of its `meta`), until `visit` returns `false`.
pub(super) fn each_seq(
    chunks: &impl ReadableTable<Key<'static>, &'static [u8]>,
    who: &[u8],
    meta: &Meta,
    start: u64,
    mut visit: impl FnMut(u64) -> Result<bool>,
) -> Result<()> {
    each_entry(chunks, who, meta, start, |seq, _| visit(seq))
}

/// [`each_seq`], with each record's listed length ([`UNKNOWN_LEN`] where the list cannot
/// tell).
pub(super) fn each_entry(
    chunks: &impl ReadableTable<Key<'static>, &'static [u8]>,
    who: &[u8],
    meta: &Meta,
    start: u64,
    mut visit: impl FnMut(u64, u32) -> Result<bool>,
) -> Result<()> {
    if meta.tail.first().is_none_or(|&first| start < first) {
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
            let (seqs, lens) = unpack_list(entry.map_err(db_error)?.1.value())?;
            for (seq, len) in seqs.into_iter().zip(lens) {
                if seq >= start && !visit(seq, len)? {
                    return Ok(());
                }
            }
        }
    }
    for (&seq, &len) in meta.tail.iter().zip(&meta.tail_lens) {
        if seq >= start && !visit(seq, len)? {
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

pub(super) fn encode_record(who: &[u8], seq: u64, flags: u8, record: &NewRecord) -> Vec<u8> {
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

/// The parts of a `log` record's header purge decides on, read without checking the
/// checksum (a record is checked before anything is done with it but stepping over it).
pub(super) struct Peek<'v> {
    pub(super) who: &'v [u8],
    pub(super) flags: u8,
    pub(super) expires_at: u64,
}

/// The header of a `log` value, unchecked; `None` if it is too short to hold one.
pub(super) fn peek_record(value: &[u8]) -> Option<Peek<'_>> {
    let who_len = usize::from(*value.get(5)?);
    let at = 6 + who_len + 24;
    Some(Peek {
        who: value.get(6..6 + who_len)?,
        flags: value[4],
        expires_at: u64::from_le_bytes(value.get(at..at + 8)?.try_into().ok()?),
    })
}

/// A `log` record, checked against its checksum.
pub(super) struct Logged<'v> {
    pub(super) who: &'v [u8],
    pub(super) flags: u8,
    pub(super) id: MessageId,
    pub(super) sent_at: u64,
    pub(super) expires_at: u64,
    pub(super) body: &'v [u8],
}

pub(super) fn decode_record(seq: u64, value: &[u8]) -> Result<Logged<'_>> {
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

pub(super) fn opt_time(millis: u64) -> Option<Timestamp> {
    (millis != NEVER).then(|| Timestamp::from_millis(millis))
}

/// Fuzz body (`offline_queue::fuzz::redb_layout`): the decoders of what this backend reads
/// back from its file never panic on any bytes, and round-trip what they encoded.
#[cfg(feature = "testing")]
pub(crate) fn fuzz_decoders(data: &[u8]) {
    if let Ok(meta) = Meta::decode(data) {
        let again = Meta::decode(&meta.encode()).expect("own metadata decodes");
        assert_eq!(again.encode(), meta.encode(), "metadata round trip");
    }
    if let Ok((seqs, lens)) = unpack_list(data) {
        assert_eq!(
            unpack_list(&pack_list(&seqs, &lens)).expect("own seq list decodes"),
            (seqs, lens),
            "seq list round trip"
        );
    }
    let _ = peek_record(data);
    let seq = data.len() as u64;
    let _ = decode_record(seq, data);
    // Past the checksum too: the same bytes with a checksum that matches.
    if data.len() >= 4 {
        let mut sealed = data.to_vec();
        let sum = checksum(seq, &sealed[4..]);
        sealed[..4].copy_from_slice(&sum.to_le_bytes());
        let _ = decode_record(seq, &sealed);
    }
    // A record encoded from these bytes reads back as it was written.
    let (who, body) = data.split_at(data.len().min(crate::RecipientId::MAX_LEN));
    let record = NewRecord {
        id: MessageId::from_bytes([7; 16]),
        dedup: false,
        sent_at: Timestamp::from_millis(1),
        expires_at: Some(Timestamp::from_millis(2)),
        body: body.to_vec(),
    };
    let encoded = encode_record(who, seq, 3, &record);
    let logged = decode_record(seq, &encoded).expect("own record decodes");
    assert_eq!(
        (
            logged.who,
            logged.flags,
            logged.body,
            logged.sent_at,
            logged.expires_at
        ),
        (who, 3, body, 1, 2),
        "record round trip"
    );
    let peeked = peek_record(&encoded).expect("own record peeks");
    assert_eq!((peeked.who, peeked.expires_at), (who, 2));
}

#[cfg(test)]
mod tests {
    use super::{Meta, UNKNOWN_LEN, list_seqs, listed_len, pack_list, unpack_list};

    fn meta(delivered: u64, tail: Vec<u64>, tail_lens: Vec<u32>) -> Meta {
        Meta {
            count: 3,
            bytes: 30,
            lost_total: 7,
            lost_confirmed: 5,
            last_touch: 11,
            idle_key: 13,
            tail,
            tail_lens,
            delivered,
        }
    }

    /// A row as formats 3 to 5 wrote it: the fixed words and the tail's seqs, then, with a
    /// watermark (formats 4 and 5), the watermark and the byte 1.
    fn older_row(meta: &Meta) -> Vec<u8> {
        let mut row = Vec::new();
        for v in [
            meta.count,
            meta.bytes,
            meta.lost_total,
            meta.lost_confirmed,
            meta.last_touch,
            meta.idle_key,
        ] {
            row.extend_from_slice(&v.to_le_bytes());
        }
        row.extend(meta.tail.iter().flat_map(|seq| seq.to_le_bytes()));
        if meta.delivered > 0 {
            row.extend_from_slice(&meta.delivered.to_le_bytes());
            row.push(1);
        }
        row
    }

    /// A row reads back whole, lengths included; rows of formats 3 to 5 read with their
    /// watermark (0 for format 3) and every length unknown; a mark byte that is not ours is
    /// refused.
    #[test]
    fn meta_rows_carry_lengths_and_older_rows_read_as_before() {
        for (tail, lens) in [
            (vec![], vec![]),
            (vec![21], vec![256]),
            (vec![21, 22, 23], vec![0, UNKNOWN_LEN, 7]),
        ] {
            for delivered in [0, 22] {
                let now = meta(delivered, tail.clone(), lens.clone());
                let row = now.encode();
                assert_eq!(row.len(), 48 + 12 * tail.len() + 13);
                assert_eq!(Meta::decode(&row).unwrap(), now);
                let older = older_row(&now);
                let expected = meta(delivered, tail.clone(), vec![UNKNOWN_LEN; tail.len()]);
                assert_eq!(Meta::decode(&older).unwrap(), expected);
            }
        }
        for mut row in [
            meta(22, vec![21], vec![5]).encode(),
            older_row(&meta(22, vec![21], vec![5])),
        ] {
            *row.last_mut().unwrap() = 9;
            assert!(Meta::decode(&row).is_err());
        }
        // Any flipped bit of a format 6 row is found, in its counts, its list or its mark.
        let row = meta(22, vec![21, 40], vec![5, 6]).encode();
        for bit in 0..row.len() * 8 {
            let mut flipped = row.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Meta::decode(&flipped).is_err(),
                "bit {bit} flipped was read"
            );
        }
    }

    /// A `chunks` value reads back whole; one written before format 6 (seqs only) reads with
    /// every length unknown; odd bytes that are not whole entries and the mark are refused.
    #[test]
    fn chunk_values_carry_lengths_and_older_values_read_as_before() {
        let (seqs, lens) = (vec![3u64, 9, 40], vec![256u32, UNKNOWN_LEN, 0]);
        let value = pack_list(&seqs, &lens);
        assert_eq!(unpack_list(&value).unwrap(), (seqs.clone(), lens));
        let older: Vec<u8> = seqs.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(
            unpack_list(&older).unwrap(),
            (seqs.clone(), vec![UNKNOWN_LEN; 3])
        );
        assert_eq!(list_seqs(&older).unwrap(), seqs);
        for bit in 0..value.len() * 8 {
            let mut flipped = value.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(unpack_list(&flipped).is_err(), "bit {bit} flipped was read");
        }
        assert!(unpack_list(&[0; 14]).is_err(), "neither 8n nor 12n + 5");
        assert!(unpack_list(&[2]).is_err(), "too short to be sealed");
        assert_eq!(unpack_list(&pack_list(&[], &[])).unwrap(), (vec![], vec![]));
    }

    #[test]
    fn a_filed_or_huge_record_is_listed_with_its_length_unknown() {
        assert_eq!(listed_len(256, false), 256);
        assert_eq!(listed_len(256, true), UNKNOWN_LEN);
        assert_eq!(listed_len(u32::MAX as usize, false), UNKNOWN_LEN);
    }
}
