//! The steps' replies as types: one per step, each built by one constructor from the
//! `redis::Value` the step returns, which names every field in the order the step's `.lua`
//! file lists them (its `Returns` comment). A reply of another shape is a non-retryable
//! error naming the step and the field.

use redis::Value;

use crate::error::{Error, Result, Retry};
use crate::message::Seq;
use crate::storage::Appended;

/// How the steps' arguments and replies say "none": no seq, no queue, no index change, no
/// deadline.
pub(super) const NONE: i64 = -1;

/// The idle step's first field when it removed the queue (else the queue's last activity,
/// or [`NONE`]).
const IDLE_REMOVED: i64 = -2;

/// An append's per-record flag: stored (else a duplicate of the seq that follows).
const STORED: i64 = 1;

/// A step's reply array, read field by field in order.
struct Fields {
    step: &'static str,
    items: std::vec::IntoIter<Value>,
}

impl Fields {
    fn new(step: &'static str, reply: Value) -> Result<Self> {
        match reply {
            Value::Array(items) => Ok(Self {
                step,
                items: items.into_iter(),
            }),
            _ => Err(bad_reply(step, "the reply", "an array")),
        }
    }

    fn bad(&self, field: &str, expected: &str) -> Error {
        bad_reply(self.step, field, expected)
    }

    fn next(&mut self, field: &str) -> Result<Value> {
        self.items.next().ok_or_else(|| self.bad(field, "present"))
    }

    fn int(&mut self, field: &str) -> Result<i64> {
        let value = self.next(field)?;
        int(&value).ok_or_else(|| self.bad(field, "an integer"))
    }

    /// A count: never negative (a queue's counters cannot be, but a reply is not trusted to
    /// say so).
    fn count(&mut self, field: &str) -> Result<u64> {
        Ok(self.int(field)?.max(0) as u64)
    }

    /// A number that may be [`NONE`] (any negative number counts as none).
    fn optional(&mut self, field: &str) -> Result<Option<u64>> {
        let n = self.int(field)?;
        Ok((n >= 0).then_some(n as u64))
    }

    fn flag(&mut self, field: &str) -> Result<bool> {
        Ok(self.int(field)? == 1)
    }

    fn text(&mut self, field: &str) -> Result<String> {
        match self.next(field)? {
            Value::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Value::SimpleString(s) => Ok(s),
            _ => Err(self.bad(field, "a string")),
        }
    }

    /// A string, or none (Lua's `false`, which RESP2 sends as nil).
    fn bytes(&mut self, field: &str) -> Result<Option<Vec<u8>>> {
        match self.next(field)? {
            Value::BulkString(b) => Ok(Some(b)),
            Value::Nil | Value::Boolean(false) => Ok(None),
            _ => Err(self.bad(field, "a string")),
        }
    }

    fn array(&mut self, field: &str) -> Result<Vec<Value>> {
        match self.next(field)? {
            Value::Array(items) => Ok(items),
            _ => Err(self.bad(field, "an array")),
        }
    }

    /// An array of seqs.
    fn seqs(&mut self, field: &str) -> Result<Vec<Seq>> {
        self.array(field)?
            .iter()
            .map(|v| int(v).map(seq_of).ok_or_else(|| self.bad(field, "seqs")))
            .collect()
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn seq_of(value: i64) -> Seq {
    Seq(value.max(0) as u64)
}

/// A reply that is not what its step returns.
pub(super) fn bad_reply(step: &str, field: &str, expected: &str) -> Error {
    Error::storage_msg(
        Retry::No,
        format!("redis: unexpected reply from the {step} step: {field} is not {expected}"),
    )
}

/// Index entries a step asks the caller to write beside it (it cannot: they are on other
/// slots).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Filing {
    /// File the queue in the idle index under this time (ms).
    pub idle: Option<u64>,
    /// File the queue in the deadline index no later than this deadline (ms).
    pub deadline: Option<u64>,
}

/// `append.lua`'s reply.
pub(super) enum AppendReply {
    /// The quota refused the batch; nothing was written.
    Full {
        messages: u64,
        bytes: u64,
        adding_messages: u64,
        adding_bytes: u64,
    },
    Appended(AppendApplied),
    /// The append would add more body bytes than its cap; nothing was written.
    OverCap {
        net_bytes: u64,
    },
}

/// An append that was applied.
pub(super) struct AppendApplied {
    /// Records dropped from the front to make room.
    pub dropped: u64,
    /// Records pending after the append.
    pub pending: u64,
    /// Change of the queue's body bytes.
    pub byte_delta: i64,
    pub filing: Filing,
    /// Each record's fate, in the order sent.
    pub records: Vec<Appended>,
    /// The other nodes holding a session for the recipient.
    pub elsewhere: Vec<String>,
}

impl AppendReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("append", reply)?;
        let outcome = f.text("outcome")?;
        match outcome.as_str() {
            "full" => Ok(Self::Full {
                messages: f.count("messages")?,
                bytes: f.count("bytes")?,
                adding_messages: f.count("adding messages")?,
                adding_bytes: f.count("adding bytes")?,
            }),
            "over cap" => Ok(Self::OverCap {
                net_bytes: f.count("net bytes")?,
            }),
            "ok" => {
                let dropped = f.count("dropped")?;
                let pending = f.count("pending")?;
                let byte_delta = f.int("byte delta")?;
                let filing = Filing {
                    idle: f.optional("file idle")?,
                    deadline: f.optional("file deadline")?,
                };
                let n = f.count("record count")?;
                let mut records = Vec::with_capacity(n.min(f.items.len() as u64) as usize);
                for _ in 0..n {
                    let stored = f.int("stored")? == STORED;
                    let seq = seq_of(f.int("seq")?);
                    records.push(if stored {
                        Appended::Stored(seq)
                    } else {
                        Appended::Duplicate(seq)
                    });
                }
                let nodes = f.count("node count")?;
                let elsewhere = (0..nodes).map(|_| f.text("node")).collect::<Result<_>>()?;
                Ok(Self::Appended(AppendApplied {
                    dropped,
                    pending,
                    byte_delta,
                    filing,
                    records,
                    elsewhere,
                }))
            }
            _ => Err(f.bad("outcome", "'full' or 'ok'")),
        }
    }
}

/// `read.lua`'s reply.
pub(super) struct ReadReply {
    pub lost_total: u64,
    pub lost_confirmed: u64,
    /// Expired records the read passed over.
    pub expired: Vec<Seq>,
    /// Records that could not be read.
    pub damaged: Vec<Seq>,
    /// The delivered watermark before the read: every record at or below it was delivered
    /// at least once.
    pub watermark: u64,
    /// The seq of the first record, when they are a run.
    pub first: u64,
    /// The records as stored.
    pub records: Vec<Vec<u8>>,
    /// Each record's seq, when they are not a run (else empty).
    pub seqs: Vec<Seq>,
    /// Each record's explicit delivery count, where it has one.
    pub counts: Vec<Option<i64>>,
    /// The seq at the front of the log (`None`: no queue).
    pub head: Option<u64>,
    /// Whether the queue is a plain run (`plan.lua` can take it).
    pub plain: bool,
}

impl ReadReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("read", reply)?;
        let lost_total = f.count("lost total")?;
        let lost_confirmed = f.count("lost confirmed")?;
        let expired = f.seqs("expired")?;
        let damaged = f.seqs("damaged")?;
        let watermark = f.count("delivered watermark")?;
        let first = f.count("first seq")?;
        let records = f
            .array("records")?
            .into_iter()
            .map(|raw| match raw {
                // Taken, not copied: each record's body is handed on as it came.
                Value::BulkString(raw) => Ok(raw),
                _ => Err(bad_reply("read", "a record", "a string")),
            })
            .collect::<Result<_>>()?;
        let seqs = f.seqs("seqs")?;
        let counts = f
            .array("delivery counts")?
            .iter()
            .map(|count| match count {
                Value::Nil | Value::Boolean(false) => Ok(None),
                explicit => int(explicit)
                    .map(Some)
                    .ok_or_else(|| bad_reply("read", "a delivery count", "an integer")),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            lost_total,
            lost_confirmed,
            expired,
            damaged,
            watermark,
            first,
            records,
            seqs,
            counts,
            head: f.optional("head")?,
            plain: f.flag("plain")?,
        })
    }
}

/// `plan.lua`'s reply.
pub(super) enum PlanReply {
    /// The records after the cursor are not a plain run where it was guessed: read the
    /// ordinary way.
    Miss,
    Run(RunPlan),
}

/// A plain run, checked by the records at its ends.
pub(super) struct RunPlan {
    pub lost_total: u64,
    pub lost_confirmed: u64,
    /// The delivered watermark before the read.
    pub watermark: u64,
    /// The run's first seq.
    pub first: u64,
    /// How many records it holds.
    pub len: u64,
    /// The body bytes appended before its first record, and before its last.
    pub first_cum: u64,
    pub last_cum: u64,
    /// The seq at the front of the log.
    pub head: Option<u64>,
}

impl PlanReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("plan", reply)?;
        match f.text("outcome")?.as_str() {
            "miss" => Ok(Self::Miss),
            "run" => Ok(Self::Run(RunPlan {
                lost_total: f.count("lost total")?,
                lost_confirmed: f.count("lost confirmed")?,
                watermark: f.count("delivered watermark")?,
                first: f.count("first seq")?,
                len: f.count("length")?,
                first_cum: f.count("first cum")?,
                last_cum: f.count("last cum")?,
                head: f.optional("head")?,
            })),
            _ => Err(f.bad("outcome", "'run' or 'miss'")),
        }
    }
}

/// `ack.lua`'s reply.
pub(super) struct AckReply {
    /// Records removed.
    pub removed: u64,
    /// Body bytes freed.
    pub freed: i64,
    /// File the queue in the idle index under this time.
    pub file_idle: Option<u64>,
    /// The seq at the front of the log (`None`: the queue is gone).
    pub head: Option<u64>,
}

impl AckReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("ack", reply)?;
        Ok(Self {
            removed: f.count("removed")?,
            freed: f.int("bytes freed")?,
            file_idle: f.optional("file idle")?,
            head: f.optional("head")?,
        })
    }
}

/// `purge.lua`'s reply.
pub(super) struct PurgeReply {
    /// Expired records removed.
    pub removed: u64,
    pub freed: i64,
    /// The earliest deadline left (`None`: none).
    pub earliest: Option<u64>,
    /// Records and exception entries looked at.
    pub examined: u64,
}

impl PurgeReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("purge", reply)?;
        Ok(Self {
            removed: f.count("removed")?,
            freed: f.int("bytes freed")?,
            earliest: f.optional("earliest deadline")?,
            examined: f.count("examined")?,
        })
    }
}

/// `idle.lua`'s reply.
pub(super) enum IdleReply {
    /// No queue, or one that held nothing (its metadata is cleared): out of the index.
    Absent,
    /// Active since `before`: file it under its last activity.
    Active { touched: u64 },
    /// Removed whole.
    Removed { records: u64, freed: i64 },
}

impl IdleReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("idle", reply)?;
        let state = f.int("state")?;
        let records = f.count("records removed")?;
        let freed = f.int("bytes freed")?;
        Ok(match state {
            IDLE_REMOVED => Self::Removed { records, freed },
            touched if touched >= 0 => Self::Active {
                touched: touched as u64,
            },
            _ => Self::Absent,
        })
    }
}

/// `stats.lua`'s reply.
pub(super) struct StatsReply {
    pub messages: u64,
    pub bytes: u64,
    pub lost: u64,
    /// The oldest pending record as stored, if any.
    pub oldest: Option<Vec<u8>>,
    pub newest: Option<Seq>,
}

impl StatsReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("stats", reply)?;
        Ok(Self {
            messages: f.count("messages")?,
            bytes: f.count("bytes")?,
            lost: f.count("lost")?,
            oldest: f.bytes("oldest record")?,
            newest: f.optional("newest seq")?.map(Seq),
        })
    }
}

/// `remove.lua`'s reply.
pub(super) struct RemoveReply {
    /// Records removed.
    pub removed: u64,
    pub freed: i64,
}

impl RemoveReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("remove", reply)?;
        Ok(Self {
            removed: f.count("removed")?,
            freed: f.int("bytes freed")?,
        })
    }
}

/// `reserve.lua`'s reply.
pub(super) struct ReserveReply {
    /// Whether the bytes fit the budget (and are now counted).
    pub reserved: bool,
    /// Bytes counted before.
    pub used: u64,
}

impl ReserveReply {
    pub fn parse(reply: Value) -> Result<Self> {
        let mut f = Fields::new("reserve", reply)?;
        Ok(Self {
            reserved: f.flag("reserved")?,
            used: f.count("used")?,
        })
    }
}

/// Fuzz body (`offline_queue::fuzz::redis_replies`): any reply a server could send (`data`
/// parsed as RESP), given to every step's reply parser, and any bytes as a stored record, give
/// an answer or an error, never a panic.
#[cfg(feature = "testing")]
pub(crate) fn fuzz_replies(data: &[u8]) {
    use super::record::{HEADER, decode_record, encode_record};
    // Any stored bytes long enough to be a record (the readers check that first) decode.
    if data.len() >= HEADER {
        let _ = decode_record(data.len() as u64, data.to_vec(), 0);
    }
    // A record encoded from these bytes reads back as it was written.
    let record = crate::storage::NewRecord {
        id: crate::MessageId::from_bytes([9; 16]),
        dedup: false,
        sent_at: crate::Timestamp::from_millis(5),
        expires_at: Some(crate::Timestamp::from_millis(6)),
        body: data.to_vec(),
    };
    let mut stored = 0f64.to_be_bytes().to_vec();
    stored.extend(encode_record(&record));
    let back = decode_record(1, stored, 2);
    assert_eq!(
        (
            &back.body[..],
            back.id,
            back.sent_at,
            back.expires_at,
            back.delivery_count
        ),
        (data, record.id, record.sent_at, record.expires_at, 2),
        "record round trip"
    );
    let _ = super::record::sent_at(data);
    let _ = super::record::appended_before(data);
    let Ok(value) = redis::parse_redis_value(data) else {
        return;
    };
    let _ = AppendReply::parse(value.clone());
    let _ = ReadReply::parse(value.clone());
    let _ = PlanReply::parse(value.clone());
    let _ = AckReply::parse(value.clone());
    let _ = PurgeReply::parse(value.clone());
    let _ = IdleReply::parse(value.clone());
    let _ = StatsReply::parse(value.clone());
    let _ = RemoveReply::parse(value.clone());
    let _ = ReserveReply::parse(value);
}
