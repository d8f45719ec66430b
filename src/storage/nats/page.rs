//! A sealed page: copies of up to [`PAGE_RECORDS`] consecutive positions' records in one
//! message, so a read gets them with one request instead of one each. A page is a cache of
//! the log, never the only copy: a position a page leaves out is read from the log.

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::message::{MessageId, Seq};
use crate::storage::StoredRecord;

/// Positions per page: page `k` covers positions `k * PAGE_RECORDS ..= k * PAGE_RECORDS + 14`.
/// Fifteen measured best in the load tool (BENCHMARKS.md, "A recipient's single owner").
pub(super) const PAGE_RECORDS: u64 = 15;

/// The layout's version, the first byte of every page.
const VERSION: u8 = 1;
/// Per record: position, id, sent, expires (0: none), body length.
const RECORD_HEAD: usize = 8 + 16 + 8 + 8 + 4;

/// The page holding `position`.
pub(super) fn page_of(position: u64) -> u64 {
    position / PAGE_RECORDS
}

/// The positions page `page` covers.
pub(super) fn positions_of(page: u64) -> std::ops::Range<u64> {
    page * PAGE_RECORDS..(page + 1) * PAGE_RECORDS
}

/// The bytes a page of `records` takes.
pub(super) fn encoded_len<'a>(records: impl IntoIterator<Item = &'a StoredRecord>) -> usize {
    1 + records
        .into_iter()
        .map(|r| RECORD_HEAD + r.body.len())
        .sum::<usize>()
}

/// Encodes `records` (their delivery counts are not kept: the queue's state holds them).
pub(super) fn encode<'a>(records: impl IntoIterator<Item = &'a StoredRecord> + Clone) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(records.clone()));
    out.push(VERSION);
    for record in records {
        out.extend_from_slice(&record.seq.0.to_le_bytes());
        out.extend_from_slice(&record.id.to_bytes());
        out.extend_from_slice(&record.sent_at.as_millis().to_le_bytes());
        let expires = record.expires_at.map_or(0, |at| at.as_millis().max(1));
        out.extend_from_slice(&expires.to_le_bytes());
        out.extend_from_slice(&(record.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&record.body);
    }
    out
}

/// Decodes a page; the bodies share `page`'s buffer.
///
/// # Errors
/// A storage error (not retryable) naming the fault, for bytes this build cannot read.
pub(super) fn decode(subject: &str, page: &Bytes) -> Result<Vec<StoredRecord>> {
    let damaged = |what: &str| {
        Error::storage_msg(
            Retry::No,
            format!("nats: the page at {subject} is damaged at {what}; read from the log instead"),
        )
    };
    match page.first() {
        Some(&VERSION) => {}
        Some(other) => {
            return Err(Error::storage_msg(
                Retry::No,
                format!(
                    "nats: the page at {subject} is in layout {other}, which this build \
                     (layout {VERSION}) does not read"
                ),
            ));
        }
        None => return Err(damaged("its start")),
    }
    let mut at = 1;
    let mut records = Vec::new();
    while at < page.len() {
        let head = page
            .get(at..at + RECORD_HEAD)
            .ok_or_else(|| damaged("a record's head"))?;
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        let id: [u8; 16] = head[8..24].try_into().expect("16 bytes");
        let len = u32::from_le_bytes(head[40..44].try_into().expect("4 bytes")) as usize;
        let start = at + RECORD_HEAD;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= page.len())
            .ok_or_else(|| damaged("a record's body"))?;
        let expires = u64_at(32);
        records.push(StoredRecord {
            seq: Seq(u64_at(0)),
            id: MessageId::from_bytes(id),
            sent_at: Timestamp::from_millis(u64_at(24)),
            expires_at: (expires != 0).then(|| Timestamp::from_millis(expires)),
            delivery_count: 0,
            body: page.slice(start..end),
        });
        at = end;
    }
    if records.windows(2).any(|w| w[0].seq >= w[1].seq) {
        return Err(damaged("its order"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, body: &'static [u8], expires: Option<u64>) -> StoredRecord {
        StoredRecord {
            seq: Seq(seq),
            id: MessageId::generate(),
            sent_at: Timestamp::from_millis(1_000 + seq),
            expires_at: expires.map(Timestamp::from_millis),
            delivery_count: 0,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn pages_round_trip_and_damage_is_refused() {
        let records = vec![
            record(30, b"a", None),
            record(31, b"", Some(9_000)),
            record(44, b"last", None),
        ];
        let bytes = Bytes::from(encode(&records));
        assert_eq!(bytes.len(), encoded_len(&records));
        assert_eq!(decode("s", &bytes).unwrap(), records);
        for cut in [0, 10, bytes.len() - 1] {
            assert!(decode("s", &bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        assert_eq!(
            decode("s", &bytes.slice(..1)).unwrap(),
            [],
            "a page of nothing"
        );
        let mut newer = bytes.to_vec();
        newer[0] = VERSION + 1;
        let error = decode("s", &Bytes::from(newer)).unwrap_err().to_string();
        assert!(error.contains("layout 2"), "{error}");
        let out_of_order = [record(5, b"x", None), record(5, b"y", None)];
        assert!(decode("s", &Bytes::from(encode(&out_of_order))).is_err());
    }

    #[test]
    fn positions_map_to_pages_of_fifteen() {
        assert_eq!(page_of(0), 0);
        assert_eq!(page_of(14), 0);
        assert_eq!(page_of(15), 1);
        assert_eq!(positions_of(2), 30..45);
    }
}
