//! The one error type of the crate.

use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong, one variant per cause, each naming the value and the limit.
///
/// Validation errors (ids, sizes, TTLs, quotas) are returned before anything is written.
/// [`Error::is_retryable`] tells a caller whether the same call may succeed later.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A recipient id was empty.
    #[error("recipient id is empty")]
    RecipientIdEmpty,

    /// A recipient id was longer than allowed.
    #[error("recipient id is {len} bytes, over the limit of {max}")]
    RecipientIdTooLong {
        /// The id's length in bytes.
        len: usize,
        /// The limit, [`RecipientId::MAX_LEN`](crate::RecipientId::MAX_LEN).
        max: usize,
    },

    /// A message id in text form was not 32 hex digits.
    #[error("message id must be 32 hex digits, got {len} characters or a non-hex digit")]
    InvalidMessageId {
        /// Length of the text given.
        len: usize,
    },

    /// A payload was larger than `Limits::max_message_bytes`.
    #[error("message is {size} bytes, over the limit of {max}")]
    MessageTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// A TTL of zero was given: the message would expire before anyone could read it.
    #[error("ttl must be greater than zero")]
    TtlZero,

    /// A TTL was longer than `Limits::max_ttl`.
    #[error("ttl of {ttl:?} is over the limit of {max:?}")]
    TtlTooLong {
        /// The TTL given.
        ttl: Duration,
        /// The limit.
        max: Duration,
    },

    /// The recipient's queue is full and the overflow policy is `Reject`.
    #[error(
        "queue full for recipient: {messages} messages / {bytes} bytes stored, adding {adding_messages} / {adding_bytes} would exceed {max_messages} messages / {max_bytes} bytes"
    )]
    QueueFull {
        /// Messages stored for the recipient.
        messages: u64,
        /// Bytes stored for the recipient.
        bytes: u64,
        /// Messages in the rejected append.
        adding_messages: u64,
        /// Bytes in the rejected append.
        adding_bytes: u64,
        /// The per-recipient message limit.
        max_messages: u64,
        /// The per-recipient byte limit.
        max_bytes: u64,
    },

    /// The storage-wide byte budget (`Limits::max_total_bytes`) would be exceeded.
    #[error("storage full: {used} bytes stored, adding {adding} would exceed the budget of {max}")]
    StorageFull {
        /// Bytes stored in all queues.
        used: u64,
        /// Bytes in the rejected append.
        adding: u64,
        /// The budget.
        max: u64,
    },

    /// A setting is invalid: returned by the engine's builder and by a backend's options (a
    /// URL that does not parse, a value out of range).
    #[error("invalid configuration: {field} {reason}")]
    InvalidConfig {
        /// The setting's name, as in the builder.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A stored record needs something this build lacks: a compressed record read by a build
    /// without the `compression` feature. The record stays stored; a build with the feature
    /// reads it.
    #[error("unsupported record: {reason}")]
    UnsupportedRecord {
        /// What the record needs.
        reason: String,
    },

    /// A payload or stored record could not be encoded or decoded (including a compressed
    /// record that would decompress past its cap).
    #[error("codec: {0}")]
    Codec(String),

    /// The storage backend failed. `retryable` is true for faults that may pass (a connection
    /// lost, a timeout, a conflict), false for ones that will not (corruption, wrong data type).
    #[error("storage: {message}")]
    Storage {
        /// What failed, for humans.
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
        /// The backend's own error, when there is one.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// True when the same call may succeed later without changing its input: a storage fault
    /// marked retryable (a connection lost, a timeout), or a full queue or storage (space may be
    /// freed by acks and expiry). False for invalid input, configuration and undecodable data.
    /// (A session's end through its connection is not an error: see
    /// [`SessionEnd`](crate::SessionEnd).)
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Storage { retryable, .. } => *retryable,
            Error::QueueFull { .. } | Error::StorageFull { .. } => true,
            Error::RecipientIdEmpty
            | Error::RecipientIdTooLong { .. }
            | Error::InvalidMessageId { .. }
            | Error::MessageTooLarge { .. }
            | Error::TtlZero
            | Error::TtlTooLong { .. }
            | Error::InvalidConfig { .. }
            | Error::UnsupportedRecord { .. }
            | Error::Codec(_) => false,
        }
    }

    /// A storage error from a backend's own error type.
    pub fn storage(retry: Retry, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Storage {
            message: source.to_string(),
            retryable: retry == Retry::Yes,
            source: Some(Arc::new(source)),
        }
    }

    /// A storage error described by a message alone.
    pub fn storage_msg(retry: Retry, message: impl Into<String>) -> Self {
        Error::Storage {
            message: message.into(),
            retryable: retry == Retry::Yes,
            source: None,
        }
    }
}

/// Whether a failed storage call may succeed if made again unchanged: what
/// [`Error::is_retryable`] answers for the error built with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retry {
    /// The fault may pass: a connection lost, a timeout, a conflict, a server failing over.
    Yes,
    /// It will not: corrupt data, someone else's data under our keys, a server too old.
    No,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
