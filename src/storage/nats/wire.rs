//! A storage call forwarded to a queue's owner over core NATS, and its answer, as the crate's
//! codec encodes them. Private to the owned layout: both ends are this build.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{Error, Retry};
use crate::limits::{BatchLimit, Overflow, Quota};
use crate::message::{MessageId, Seq};
use crate::storage::{
    Ack, AppendOutcome, Appended, NewRecord, ReadBatch, RecipientStats, StoredRecord,
};

/// A call on one recipient's queue (the recipient travels beside it, as its key).
#[derive(Serialize, Deserialize)]
pub(super) enum Call {
    Append {
        records: Vec<Record>,
        quota: WireQuota,
        now: u64,
    },
    Read {
        ack: Option<WireAck>,
        after: Option<u64>,
        max_messages: u64,
        max_bytes: u64,
        now: u64,
        mark: bool,
    },
    MarkDelivered {
        seqs: Vec<u64>,
    },
    Ack {
        ack: WireAck,
    },
    Stats,
    Remove,
}

/// The owner's answer.
#[derive(Serialize, Deserialize)]
pub(super) enum Answer {
    Appended {
        /// Per record: stored (true) or a duplicate, and its seq.
        records: Vec<(bool, u64)>,
        dropped: u64,
        pending: u64,
    },
    Read {
        acked: u64,
        records: Vec<Record>,
        expired: Vec<u64>,
        damaged: Vec<u64>,
        lost_unconfirmed: u64,
        lost_total: u64,
    },
    Done,
    Count(u64),
    Stats {
        messages: u64,
        bytes: u64,
        oldest_sent_at: Option<u64>,
        newest_seq: Option<u64>,
        lost: u64,
    },
    /// The node does not own the queue (any more): ask who does.
    NotOwner,
    Failed(WireError),
}

#[derive(Serialize, Deserialize)]
pub(super) struct Record {
    seq: u64,
    id: [u8; 16],
    dedup: bool,
    sent_at: u64,
    expires_at: Option<u64>,
    delivery_count: u32,
    body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireQuota {
    max_messages: u64,
    max_bytes: u64,
    drop_oldest: bool,
    max_total_bytes: Option<u64>,
    dedup_window_ms: u64,
    idle_timeout_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireAck {
    through: Option<u64>,
    seqs: Vec<u64>,
    passed_over: Vec<u64>,
    lost_confirmed_through: Option<u64>,
}

/// The errors a caller tells apart, with their fields; the rest by message.
#[derive(Serialize, Deserialize)]
pub(super) enum WireError {
    QueueFull {
        messages: u64,
        bytes: u64,
        adding_messages: u64,
        adding_bytes: u64,
        max_messages: u64,
        max_bytes: u64,
    },
    MessageTooLarge {
        size: u64,
        max: u64,
    },
    Other {
        message: String,
        retryable: bool,
    },
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<&Quota> for WireQuota {
    fn from(quota: &Quota) -> Self {
        Self {
            max_messages: quota.max_messages,
            max_bytes: quota.max_bytes,
            drop_oldest: quota.overflow == Overflow::DropOldest,
            max_total_bytes: quota.max_total_bytes,
            dedup_window_ms: millis(quota.dedup_window),
            idle_timeout_ms: quota.idle_timeout.map(millis),
        }
    }
}

impl From<WireQuota> for Quota {
    fn from(quota: WireQuota) -> Self {
        Quota {
            max_messages: quota.max_messages,
            max_bytes: quota.max_bytes,
            overflow: if quota.drop_oldest {
                Overflow::DropOldest
            } else {
                Overflow::Reject
            },
            max_total_bytes: quota.max_total_bytes,
            dedup_window: Duration::from_millis(quota.dedup_window_ms),
            idle_timeout: quota.idle_timeout_ms.map(Duration::from_millis),
        }
    }
}

impl From<&Ack> for WireAck {
    fn from(ack: &Ack) -> Self {
        Self {
            through: ack.through.map(|seq| seq.0),
            seqs: ack.seqs.iter().map(|seq| seq.0).collect(),
            passed_over: ack.passed_over.iter().map(|seq| seq.0).collect(),
            lost_confirmed_through: ack.lost_confirmed_through,
        }
    }
}

impl From<WireAck> for Ack {
    fn from(ack: WireAck) -> Self {
        Self {
            through: ack.through.map(Seq),
            seqs: ack.seqs.into_iter().map(Seq).collect(),
            passed_over: ack.passed_over.into_iter().map(Seq).collect(),
            lost_confirmed_through: ack.lost_confirmed_through,
        }
    }
}

impl From<NewRecord> for Record {
    fn from(record: NewRecord) -> Self {
        Self {
            seq: 0,
            id: record.id.to_bytes(),
            dedup: record.dedup,
            sent_at: record.sent_at.as_millis(),
            expires_at: record.expires_at.map(Timestamp::as_millis),
            delivery_count: 0,
            body: record.body,
        }
    }
}

impl From<Record> for NewRecord {
    fn from(record: Record) -> Self {
        Self {
            id: MessageId::from_bytes(record.id),
            dedup: record.dedup,
            sent_at: Timestamp::from_millis(record.sent_at),
            expires_at: record.expires_at.map(Timestamp::from_millis),
            body: record.body,
        }
    }
}

impl From<StoredRecord> for Record {
    fn from(record: StoredRecord) -> Self {
        Self {
            seq: record.seq.0,
            id: record.id.to_bytes(),
            dedup: false,
            sent_at: record.sent_at.as_millis(),
            expires_at: record.expires_at.map(Timestamp::as_millis),
            delivery_count: record.delivery_count,
            body: record.body.to_vec(),
        }
    }
}

impl From<Record> for StoredRecord {
    fn from(record: Record) -> Self {
        Self {
            seq: Seq(record.seq),
            id: MessageId::from_bytes(record.id),
            sent_at: Timestamp::from_millis(record.sent_at),
            expires_at: record.expires_at.map(Timestamp::from_millis),
            delivery_count: record.delivery_count,
            body: Bytes::from(record.body),
        }
    }
}

impl Answer {
    pub fn appended(outcome: AppendOutcome) -> Self {
        Answer::Appended {
            records: outcome
                .records
                .iter()
                .map(|r| (matches!(r, Appended::Stored(_)), r.seq().0))
                .collect(),
            dropped: outcome.dropped,
            pending: outcome.pending,
        }
    }

    pub fn read(acked: u64, batch: ReadBatch) -> Self {
        Answer::Read {
            acked,
            records: batch.records.into_iter().map(Record::from).collect(),
            expired: batch.expired.iter().map(|s| s.0).collect(),
            damaged: batch.damaged.iter().map(|s| s.0).collect(),
            lost_unconfirmed: batch.lost_unconfirmed,
            lost_total: batch.lost_total,
        }
    }

    pub fn stats(stats: RecipientStats) -> Self {
        Answer::Stats {
            messages: stats.messages,
            bytes: stats.bytes,
            oldest_sent_at: stats.oldest_sent_at.map(Timestamp::as_millis),
            newest_seq: stats.newest_seq.map(|s| s.0),
            lost: stats.lost,
        }
    }

    /// An append's outcome, if this answers one.
    pub fn into_appended(self) -> Option<AppendOutcome> {
        let Answer::Appended {
            records,
            dropped,
            pending,
        } = self
        else {
            return None;
        };
        let records = records
            .into_iter()
            .map(|(stored, seq)| {
                if stored {
                    Appended::Stored(Seq(seq))
                } else {
                    Appended::Duplicate(Seq(seq))
                }
            })
            .collect();
        Some(AppendOutcome {
            records,
            dropped,
            pending,
            live_elsewhere: false,
        })
    }

    /// A read's acked count and batch, if this answers one.
    pub fn into_read(self) -> Option<(u64, ReadBatch)> {
        let Answer::Read {
            acked,
            records,
            expired,
            damaged,
            lost_unconfirmed,
            lost_total,
        } = self
        else {
            return None;
        };
        let batch = ReadBatch {
            records: records.into_iter().map(StoredRecord::from).collect(),
            expired: expired.into_iter().map(Seq).collect(),
            damaged: damaged.into_iter().map(Seq).collect(),
            lost_unconfirmed,
            lost_total,
        };
        Some((acked, batch))
    }

    /// A queue's stats, if this answers for them.
    pub fn into_stats(self) -> Option<RecipientStats> {
        let Answer::Stats {
            messages,
            bytes,
            oldest_sent_at,
            newest_seq,
            lost,
        } = self
        else {
            return None;
        };
        Some(RecipientStats {
            messages,
            bytes,
            oldest_sent_at: oldest_sent_at.map(Timestamp::from_millis),
            newest_seq: newest_seq.map(Seq),
            lost,
        })
    }

    /// The count an ack or a removal answers with.
    pub fn into_count(self) -> Option<u64> {
        match self {
            Answer::Count(count) => Some(count),
            _ => None,
        }
    }

    /// Whether this says a call that returns nothing was done.
    pub fn into_done(self) -> Option<()> {
        matches!(self, Answer::Done).then_some(())
    }

    pub fn failed(error: &Error) -> Self {
        Answer::Failed(match *error {
            Error::QueueFull {
                messages,
                bytes,
                adding_messages,
                adding_bytes,
                max_messages,
                max_bytes,
            } => WireError::QueueFull {
                messages,
                bytes,
                adding_messages,
                adding_bytes,
                max_messages,
                max_bytes,
            },
            Error::MessageTooLarge { size, max } => WireError::MessageTooLarge {
                size: size as u64,
                max: max as u64,
            },
            ref other => WireError::Other {
                message: format!("on the queue's owner: {other}"),
                retryable: other.is_retryable(),
            },
        })
    }
}

impl From<WireError> for Error {
    fn from(error: WireError) -> Self {
        match error {
            WireError::QueueFull {
                messages,
                bytes,
                adding_messages,
                adding_bytes,
                max_messages,
                max_bytes,
            } => Error::QueueFull {
                messages,
                bytes,
                adding_messages,
                adding_bytes,
                max_messages,
                max_bytes,
            },
            WireError::MessageTooLarge { size, max } => Error::MessageTooLarge {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                max: usize::try_from(max).unwrap_or(usize::MAX),
            },
            WireError::Other { message, retryable } => {
                Error::storage_msg(if retryable { Retry::Yes } else { Retry::No }, message)
            }
        }
    }
}

/// A read's limit, from the two numbers it travels as.
pub(super) fn batch_limit(max_messages: u64, max_bytes: u64) -> BatchLimit {
    BatchLimit {
        max_messages: usize::try_from(max_messages).unwrap_or(usize::MAX),
        max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
    }
}
