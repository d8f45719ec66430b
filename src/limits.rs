//! Size limits, quotas, TTL bounds and batch bounds, with defaults chosen from what production
//! systems of this kind use (see the README's "Limits" section for the reasoning).

use std::time::Duration;

use crate::error::Error;

/// What happens when a recipient's queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// The send fails with [`Error::QueueFull`]; nothing is stored or dropped. The sender knows
    /// (unlike brokers that drop the new message silently).
    #[default]
    Reject,
    /// The oldest messages are dropped to make room; the recipient's next delivery reports how
    /// many were lost (`Batch::gap`).
    DropOldest,
}

/// Per-message and per-recipient limits. Every field is checked by
/// [`OfflineQueueBuilder::build`](crate::OfflineQueueBuilder::build).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes (before compression). Default 64 KiB, as Matrix;
    /// Signal allows 96 KiB.
    pub max_message_bytes: usize,
    /// Most messages stored per recipient. Default 10,000.
    pub max_messages_per_recipient: u64,
    /// Most payload bytes stored per recipient. Default 64 MiB.
    pub max_bytes_per_recipient: u64,
    /// What a full recipient queue does. Default [`Overflow::Reject`].
    pub overflow: Overflow,
    /// Most payload bytes stored across all recipients, if bounded. Default `None`. Always
    /// rejects when exceeded (one recipient's burst never deletes another's messages).
    pub max_total_bytes: Option<u64>,
    /// TTL of a message sent without one; `None` keeps it until acked (bounded only by
    /// `idle_recipient_timeout`). Default 30 days, as Signal's cold storage.
    pub default_ttl: Option<Duration>,
    /// Longest TTL a sender may ask for. Default 90 days.
    pub max_ttl: Duration,
    /// How long a sender-chosen [`MessageId`](crate::MessageId) is remembered for dedup.
    /// Default 30 minutes (Matrix's transaction window; NATS uses 2 minutes).
    pub dedup_window: Duration,
    /// A recipient whose queue has not been appended to or acked for this long is removed whole
    /// by maintenance, so abandoned devices do not hold storage forever. Default 90 days;
    /// `None` keeps queues until their messages expire. At least `dedup_window`, so a queue
    /// removed for idleness holds no id still inside its window.
    pub idle_recipient_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_messages_per_recipient: 10_000,
            max_bytes_per_recipient: 64 * 1024 * 1024,
            overflow: Overflow::Reject,
            max_total_bytes: None,
            default_ttl: Some(Duration::from_secs(30 * 24 * 3600)),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            dedup_window: Duration::from_secs(30 * 60),
            idle_recipient_timeout: Some(Duration::from_secs(90 * 24 * 3600)),
        }
    }
}

/// The longest TTL any configuration may allow: 100 years, far from timestamp overflow.
pub const TTL_CEILING: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Limits {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if self.max_message_bytes == 0 {
            return invalid("max_message_bytes", "must be at least 1");
        }
        if self.max_messages_per_recipient == 0 {
            return invalid("max_messages_per_recipient", "must be at least 1");
        }
        if self.max_bytes_per_recipient < self.max_message_bytes as u64 {
            return invalid(
                "max_bytes_per_recipient",
                "must be at least max_message_bytes, or no message of the largest size fits",
            );
        }
        if let Some(total) = self.max_total_bytes
            && total < self.max_message_bytes as u64
        {
            return invalid("max_total_bytes", "must be at least max_message_bytes");
        }
        if self.max_ttl.is_zero() || self.max_ttl > TTL_CEILING {
            return invalid("max_ttl", "must be between 1 ms and 100 years");
        }
        if let Some(ttl) = self.default_ttl
            && (ttl.is_zero() || ttl > self.max_ttl)
        {
            return invalid(
                "default_ttl",
                "must be greater than zero and at most max_ttl",
            );
        }
        if self.dedup_window > TTL_CEILING {
            return invalid("dedup_window", "must be at most 100 years");
        }
        if let Some(idle) = self.idle_recipient_timeout
            && (idle.is_zero() || idle > TTL_CEILING)
        {
            return invalid(
                "idle_recipient_timeout",
                "must be between 1 ms and 100 years",
            );
        }
        if let Some(idle) = self.idle_recipient_timeout
            && idle < self.dedup_window
        {
            return invalid(
                "idle_recipient_timeout",
                "must be at least dedup_window, so a queue removed for idleness holds no id still inside its window",
            );
        }
        Ok(())
    }

    /// The TTL a message gets: its own, checked against `max_ttl`, or the default.
    pub(crate) fn effective_ttl(&self, asked: Option<Duration>) -> Result<Option<Duration>, Error> {
        match asked {
            None => Ok(self.default_ttl),
            Some(ttl) if ttl.is_zero() => Err(Error::TtlZero),
            Some(ttl) if ttl > self.max_ttl => Err(Error::TtlTooLong {
                ttl,
                max: self.max_ttl,
            }),
            Some(ttl) => Ok(Some(ttl)),
        }
    }

    /// The part of these limits a backend enforces atomically on append.
    pub(crate) fn quota(&self) -> Quota {
        Quota {
            max_messages: self.max_messages_per_recipient,
            max_bytes: self.max_bytes_per_recipient,
            overflow: self.overflow,
            max_total_bytes: self.max_total_bytes,
            dedup_window: self.dedup_window,
            idle_timeout: self.idle_recipient_timeout,
        }
    }
}

/// How an append may go in ([`Quota::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// It fits as the queue is.
    Fits,
    /// It fits once the oldest records are dropped (`Overflow::DropOldest`).
    DropOldestFirst,
}

/// The limits a [`Storage`](crate::Storage) enforces inside one atomic append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Most records per recipient.
    pub max_messages: u64,
    /// Most record bytes (`NewRecord::body` lengths) per recipient.
    pub max_bytes: u64,
    /// What to do when the append does not fit.
    pub overflow: Overflow,
    /// Most record bytes across all recipients, if bounded (never overflows by dropping).
    pub max_total_bytes: Option<u64>,
    /// How long a deduplicated id is remembered.
    pub dedup_window: Duration,
    /// `Limits::idle_recipient_timeout`: a backend whose medium expires data by itself (Redis
    /// key TTLs) lets a queue untouched this long vanish even if maintenance never runs.
    /// `None` keeps queues.
    pub idle_timeout: Option<Duration>,
}

impl Quota {
    /// Whether `adding` records of `adding_bytes` fit a queue holding `messages` records of
    /// `bytes`: [`Admission::Fits`], or [`Admission::DropOldestFirst`] when the policy is
    /// `Overflow::DropOldest` and the oldest must go first (drop until [`Quota::fits`]).
    ///
    /// # Errors
    /// [`Error::QueueFull`] when they do not fit and the policy is `Reject`, or when the append
    /// alone is larger than the quota.
    pub fn admit(
        &self,
        messages: u64,
        bytes: u64,
        adding: u64,
        adding_bytes: u64,
    ) -> Result<Admission, Error> {
        if adding == 0 || self.fits(messages, bytes, adding, adding_bytes) {
            return Ok(Admission::Fits);
        }
        if self.overflow == Overflow::Reject
            || adding > self.max_messages
            || adding_bytes > self.max_bytes
        {
            return Err(Error::QueueFull {
                messages,
                bytes,
                adding_messages: adding,
                adding_bytes,
                max_messages: self.max_messages,
                max_bytes: self.max_bytes,
            });
        }
        Ok(Admission::DropOldestFirst)
    }

    /// The dedup window in milliseconds (saturating), as stored timestamps count.
    pub fn dedup_window_ms(&self) -> u64 {
        u64::try_from(self.dedup_window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether `adding` records of `adding_bytes` fit beside `keep` records of `keep_bytes`.
    pub fn fits(&self, keep: u64, keep_bytes: u64, adding: u64, adding_bytes: u64) -> bool {
        keep.saturating_add(adding) <= self.max_messages
            && keep_bytes.saturating_add(adding_bytes) <= self.max_bytes
    }

    /// No limits that matter: for tests and tools that append directly.
    pub const UNLIMITED: Quota = Quota {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        overflow: Overflow::Reject,
        max_total_bytes: None,
        dedup_window: Duration::from_secs(30 * 60),
        idle_timeout: None,
    };
}

/// Bounds on one read from storage, and so on one delivered batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimit {
    /// Most messages in a batch. Default 100 (Signal's and Matrix's page size).
    pub max_messages: usize,
    /// Most stored bytes in a batch (encoded payloads: one framing byte more than the payload,
    /// or less when compressed); a single larger message still goes out alone, so delivery
    /// never stalls. Default 1 MiB.
    pub max_bytes: usize,
}

impl Default for BatchLimit {
    fn default() -> Self {
        Self {
            max_messages: 100,
            max_bytes: 1024 * 1024,
        }
    }
}

impl BatchLimit {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max_messages == 0 {
            return Err(Error::InvalidConfig {
                field: "batch.max_messages",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_bytes == 0 {
            return Err(Error::InvalidConfig {
                field: "batch.max_bytes",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}
