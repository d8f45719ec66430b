//! The stored form of a record: a fixed header (body bytes appended before it, sent-at, id,
//! deadline), then the body.

use bytes::Bytes;

use super::library::LUA_MAX;
use crate::clock::Timestamp;
use crate::message::{MessageId, Seq};
use crate::storage::{NewRecord, StoredRecord};

/// Bytes before the body in a stored record: body bytes appended before it (8, added by the
/// append step), sent-at (8), id (16) and deadline (8, a big-endian double in ms, 0 for
/// none, so the steps read it with `struct.unpack`). The append step is sent the record
/// without its first field.
pub(super) const HEADER: usize = 40;

/// The stored form of a record: sent-at, id, body.
pub(super) fn encode_record(record: &NewRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER - 8 + record.body.len());
    out.extend_from_slice(&record.sent_at.as_millis().to_be_bytes());
    out.extend_from_slice(&record.id.to_bytes());
    let deadline = record
        .expires_at
        .map_or(0, Timestamp::as_millis)
        .min(LUA_MAX);
    out.extend_from_slice(&(deadline as f64).to_be_bytes());
    out.extend_from_slice(&record.body);
    out
}

/// A stored record (at least `HEADER` bytes) as the engine takes it.
pub(super) fn decode_record(seq: u64, raw: Vec<u8>, delivery_count: i64) -> StoredRecord {
    let sent_at = u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
    let id: [u8; 16] = raw[16..32].try_into().expect("16 bytes");
    let deadline = f64::from_be_bytes(raw[32..40].try_into().expect("8 bytes"));
    StoredRecord {
        seq: Seq(seq),
        id: MessageId::from_bytes(id),
        sent_at: Timestamp::from_millis(sent_at),
        // A double written from an integer below 2^53: exact. (`as` saturates whatever
        // another writer put there.)
        expires_at: (deadline > 0.0).then(|| Timestamp::from_millis(deadline as u64)),
        delivery_count: u32::try_from(delivery_count).unwrap_or(u32::MAX),
        body: Bytes::from(raw).slice(HEADER..),
    }
}

/// The sent-at time in a stored record's header; `None` if it is too short to be a record.
pub(super) fn sent_at(raw: &[u8]) -> Option<Timestamp> {
    let field = raw.get(8..16).filter(|_| raw.len() >= HEADER)?;
    Some(Timestamp::from_millis(u64::from_be_bytes(
        field.try_into().expect("8 bytes"),
    )))
}

/// The body bytes appended before a stored record (its first header field, which the append
/// step writes as a double); `None` if it is too short to hold one.
pub(super) fn appended_before(raw: &[u8]) -> Option<f64> {
    let field = raw.get(..8)?;
    Some(f64::from_be_bytes(field.try_into().expect("8 bytes")))
}
