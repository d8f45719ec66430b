//! Redis errors as the crate's: which are retryable, and what a user is told.

use std::sync::Arc;

use crate::error::Error;

pub(super) fn invalid_url(url: &str, error: redis::RedisError) -> Error {
    Error::InvalidConfig {
        field: "redis url",
        reason: format!("{url:?} does not parse: {error}"),
    }
}

pub(super) fn unreachable_server(url: &str, error: redis::RedisError) -> Error {
    Error::Storage {
        message: format!("redis at {url} does not answer: {error}"),
        retryable: true,
        source: Some(Arc::new(error)),
    }
}

/// Maps a Redis error to ours: lost connections, timeouts, and a server that is loading or
/// failing over may pass; anything else (a wrong key type, a script error) will not.
pub(super) fn redis_error(error: redis::RedisError) -> Error {
    let retryable = error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_connection_refusal()
        || error.code() == Some("OOM")
        || !matches!(error.retry_method(), redis::RetryMethod::NoRetry);
    let message = match error.code() {
        Some("OQWRONGTYPE") | Some("WRONGTYPE") => {
            format!("a key of this queue holds data of another type, left untouched: {error}")
        }
        Some("OQLAYOUT") => {
            format!("this queue's metadata is not in this build's layout, left untouched: {error}")
        }
        _ => format!("redis: {error}"),
    };
    Error::Storage {
        message,
        retryable,
        source: Some(Arc::new(error)),
    }
}
