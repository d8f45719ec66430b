//! Reads through `read.lua`, which brings the records into Lua (any queue, any state), and
//! the choice between it and a read of a plain run (`run_read.rs`).

use redis::Value;

use super::errors::redis_error;
use super::library::LUA_MAX;
use super::record::{HEADER, decode_record};
use super::replies::*;
use super::RedisStorage;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::limits::BatchLimit;
use crate::message::{RecipientId, Seq};
use crate::storage::ReadBatch;

impl RedisStorage {
    /// A read: of a plain run in one `MULTI` where the front is known, else through
    /// `read.lua`; with `mark`, it also counts a delivery for each record returned.
    pub(super) async fn read_marking(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<ReadBatch> {
        let (_, keys) = self.keys(recipient);
        if let Some(batch) = self
            .read_run(recipient, &keys, None, after, limit, now, mark)
            .await?
            .batch
        {
            return Ok(batch);
        }
        self.read_ordinary(recipient, &keys, after, limit, now, mark)
            .await
    }

    /// A read through `read.lua`, which brings the records into Lua: any queue, any state.
    pub(super) async fn read_ordinary(
        &self,
        recipient: &RecipientId,
        keys: &[String; 7],
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<ReadBatch> {
        let reply: Value = self
            .shared
            .steps
            .read
            .key(&keys[..])
            .arg(after.map_or(-1, |s| s.0 as i64))
            .arg((limit.max_messages as u64).min(LUA_MAX))
            .arg((limit.max_bytes as u64).min(LUA_MAX))
            .arg(now.as_millis())
            .arg(u8::from(mark))
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let mut reply = array(reply)?;
        // Taken, not borrowed: each record's body is handed on without a copy.
        let raws = match reply.get_mut(6) {
            Some(Value::Array(items)) => std::mem::take(items),
            _ => return Err(bad_reply("an array")),
        };
        let lost_total = count(reply.first())?;
        let lost_confirmed = count(reply.get(1))?;
        let seqs_in = |at: usize| -> Result<Vec<Seq>> {
            list(reply.get(at))?
                .iter()
                .map(|v| int(Some(v)).map(seq_of))
                .collect()
        };
        let expired = seqs_in(2)?;
        let mut damaged = seqs_in(3)?;
        let watermark = count(reply.get(4))?;
        let first = count(reply.get(5))?;
        let listed = seqs_in(7)?;
        let counts = list(reply.get(8))?;
        let mut records = Vec::with_capacity(raws.len());
        for (i, raw) in raws.into_iter().enumerate() {
            let seq = listed.get(i).map_or(first + i as u64, |s| s.0);
            let Value::BulkString(raw) = raw else {
                return Err(bad_reply("a record"));
            };
            if raw.len() < HEADER {
                // Not a record this backend wrote: never delivered, reported as lost.
                damaged.push(Seq(seq));
                continue;
            }
            let delivered = match counts.get(i) {
                Some(Value::Nil | Value::Boolean(false)) | None => i64::from(seq <= watermark),
                explicit => int(explicit)?,
            };
            records.push(decode_record(seq, raw, delivered));
        }
        if !self.is_cluster() {
            let bodies: usize = records.iter().map(|r| r.body.len()).sum();
            self.shared.fronts.after_read(
                recipient,
                int(reply.get(9))?,
                int(reply.get(10))? == 1,
                (bodies / records.len().max(1)) as u64,
            );
        }
        Ok(ReadBatch {
            records,
            expired,
            damaged,
            lost_unconfirmed: lost_total.saturating_sub(lost_confirmed),
            lost_total,
        })
    }
}
