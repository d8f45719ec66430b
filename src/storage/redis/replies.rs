//! The steps' replies, read out of `redis::Value`.

use redis::Value;

use crate::error::{Error, Result, Retry};
use crate::message::Seq;

/// Reads an integer out of a script reply.
pub(super) fn int(value: Option<&Value>) -> Result<i64> {
    match value {
        Some(Value::Int(n)) => Ok(*n),
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("an integer")),
        _ => Err(bad_reply("an integer")),
    }
}

/// A count out of a script reply: never negative (a queue's counters cannot be, but a reply
/// is not trusted to say so).
pub(super) fn count(value: Option<&Value>) -> Result<u64> {
    Ok(int(value)?.max(0) as u64)
}

pub(super) fn bytes(value: Option<&Value>) -> Result<Option<&[u8]>> {
    match value {
        Some(Value::BulkString(b)) => Ok(Some(b)),
        Some(Value::Nil | Value::Boolean(false)) => Ok(None),
        _ => Err(bad_reply("a string")),
    }
}

pub(super) fn text(value: Option<&Value>) -> Result<String> {
    match value {
        Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        _ => Err(bad_reply("a string")),
    }
}

pub(super) fn bad_reply(expected: &str) -> Error {
    Error::storage_msg(
        Retry::No,
        format!("redis: unexpected script reply, expected {expected}"),
    )
}

/// A nested array out of a script reply.
pub(super) fn list(value: Option<&Value>) -> Result<&[Value]> {
    match value {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(bad_reply("an array")),
    }
}

pub(super) fn array(value: Value) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        _ => Err(bad_reply("an array")),
    }
}

pub(super) fn seq_of(value: i64) -> Seq {
    Seq(value.max(0) as u64)
}
