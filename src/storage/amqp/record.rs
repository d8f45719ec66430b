//! A record as a message: the engine's encoded payload is the body, byte for byte, so the
//! broker's byte limit (`x-max-length-bytes`) counts exactly what [`Quota::max_bytes`]
//! counts; seq, id and times travel in headers:
//!
//! | header | type | holds |
//! |---|---|---|
//! | `oq-seq` | long-long | the seq the sending node stamped |
//! | `oq-id` | long string, 16 bytes | the message id |
//! | `oq-sent` | long-long | `sent_at`, ms since the Unix epoch |
//! | `oq-expires` | long-long | `expires_at`, when the record has one |
//! | `oq-recipient` | long string | the recipient's id, only when the queue name is a hash of it |
//!
//! A read refuses (as damaged) a message without these, or carrying another recipient's id.
//!
//! [`Quota::max_bytes`]: crate::Quota::max_bytes

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::clock::Timestamp;
use crate::message::{MessageId, RecipientId};
use crate::storage::NewRecord;

const SEQ: &str = "oq-seq";
const ID: &str = "oq-id";
const SENT: &str = "oq-sent";
const EXPIRES: &str = "oq-expires";
const RECIPIENT: &str = "oq-recipient";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The headers for `record` at `seq`; `hashed` is the recipient when its queue name is a hash.
pub(super) fn properties(
    record: &NewRecord,
    seq: u64,
    hashed: Option<&RecipientId>,
    broker_ttl_ms: Option<u64>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(SEQ.into(), AMQPValue::LongLongInt(as_long(seq)));
    headers.insert(
        ID.into(),
        AMQPValue::LongString(LongString::from(record.id.to_bytes().to_vec())),
    );
    headers.insert(
        SENT.into(),
        AMQPValue::LongLongInt(as_long(record.sent_at.as_millis())),
    );
    if let Some(at) = record.expires_at {
        headers.insert(
            EXPIRES.into(),
            AMQPValue::LongLongInt(as_long(at.as_millis())),
        );
    }
    if let Some(recipient) = hashed {
        headers.insert(
            RECIPIENT.into(),
            AMQPValue::LongString(LongString::from(recipient.as_bytes().to_vec())),
        );
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    match broker_ttl_ms {
        Some(ms) => properties.with_expiration(ms.to_string().into()),
        None => properties,
    }
}

fn as_long(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The seq a message was published with, if it is a record of ours.
pub(super) fn seq_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(SEQ)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A record read back.
#[derive(Debug)]
pub(super) struct Decoded {
    pub(super) seq: u64,
    pub(super) id: MessageId,
    pub(super) sent_at: Timestamp,
    pub(super) expires_at: Option<Timestamp>,
    pub(super) body: Bytes,
}

/// Decodes a message read from `recipient`'s queue; `None` if it is not a record of ours, or
/// names another recipient.
pub(super) fn decode(
    properties: &BasicProperties,
    body: Vec<u8>,
    recipient: &RecipientId,
) -> Option<Decoded> {
    let headers = properties.headers().as_ref()?.inner();
    let long = |name: &str| match headers.get(name)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let bytes = |name: &str| match headers.get(name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    let id: [u8; 16] = bytes(ID)?.try_into().ok()?;
    let expires_at = match headers.get(EXPIRES) {
        None => None,
        Some(_) => Some(Timestamp::from_millis(long(EXPIRES)?)),
    };
    if headers.contains_key(RECIPIENT) && bytes(RECIPIENT)? != recipient.as_bytes() {
        return None;
    }
    Some(Decoded {
        seq: long(SEQ)?,
        id: MessageId::from_bytes(id),
        sent_at: Timestamp::from_millis(long(SENT)?),
        expires_at,
        body: Bytes::from(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires: Option<u64>) -> NewRecord {
        NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: Timestamp::from_millis(5),
            expires_at: expires.map(Timestamp::from_millis),
            body: b"payload".to_vec(),
        }
    }

    #[test]
    fn records_round_trip_with_and_without_their_options() {
        let bob = RecipientId::new("bob").unwrap();
        for (expires, hashed) in [(None, None), (Some(9), Some(&bob))] {
            let rec = record(expires);
            let props = properties(&rec, 42, hashed, Some(1_000));
            assert_eq!(
                props.expiration().as_ref().map(|s| s.as_str()),
                Some("1000")
            );
            let back = decode(&props, rec.body.clone(), &bob).expect("decodes");
            assert_eq!(
                (
                    back.seq,
                    back.id,
                    back.sent_at,
                    back.expires_at,
                    &back.body[..]
                ),
                (42, rec.id, rec.sent_at, rec.expires_at, &b"payload"[..])
            );
        }
    }

    #[test]
    fn foreign_messages_and_other_recipients_are_refused() {
        let bob = RecipientId::new("bob").unwrap();
        let carol = RecipientId::new("carol").unwrap();
        let props = properties(&record(Some(9)), 1, Some(&bob), None);
        assert!(decode(&props, vec![], &carol).is_none(), "another id");
        assert!(
            decode(&BasicProperties::default(), vec![1], &bob).is_none(),
            "no headers"
        );
        let mut partial = FieldTable::default();
        partial.insert(SEQ.into(), AMQPValue::LongLongInt(1));
        let partial = BasicProperties::default().with_headers(partial);
        assert!(decode(&partial, vec![], &bob).is_none(), "headers missing");
    }
}
