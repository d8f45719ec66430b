//! Reads through `read.lua`, which brings the records into Lua (any queue, any state), and
//! the choice between it and a read of a plain run (`run_read.rs`).

use redis::Value;

use super::RedisStorage;
use super::errors::redis_error;
use super::library::LUA_MAX;
use super::record::{HEADER, decode_record};
use super::replies::{NONE, ReadReply};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::limits::BatchLimit;
use crate::message::{RecipientId, Seq};
use crate::storage::{Ack, DeliveryRead, ReadBatch, Storage};

impl RedisStorage {
    /// A read, after `ack` if there is one: of a plain run in one `MULTI` where the front is
    /// known (a cumulative ack in the same `MULTI`), else the ack and `read.lua` as separate
    /// steps; with `mark`, it also counts a delivery for each record returned.
    pub(super) async fn read_marking(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<DeliveryRead> {
        let (hex, keys) = self.keys(recipient);
        if self.is_cluster()
            && let Some(ack) = ack
            && let Some(read) = self
                .ack_then_read(recipient, &hex, &keys, ack, after, limit, now, mark)
                .await?
        {
            return Ok(read);
        }
        let run = self
            .read_run(
                recipient,
                &keys,
                ack.map(|a| (a, hex.as_str())),
                after,
                limit,
                now,
                mark,
            )
            .await?;
        let acked = match (run.acked, ack) {
            (Some(removed), _) => removed,
            (None, Some(ack)) => self.ack(recipient, ack, now).await?,
            (None, None) => 0,
        };
        let batch = match run.batch {
            Some(batch) => batch,
            None => {
                self.read_ordinary(recipient, &keys, after, limit, now, mark)
                    .await?
            }
        };
        Ok(DeliveryRead { acked, batch })
    }

    /// On a cluster, a session's ack and the read after it as one pipeline to the queue's
    /// node (its keys share a slot): one round trip, as the single server's `MULTI`. `None`
    /// when the server refused a step (no library after a restart): the ordinary steps then
    /// run, which load it; running the ack again is harmless, since acks are idempotent.
    #[allow(clippy::too_many_arguments)]
    async fn ack_then_read(
        &self,
        recipient: &RecipientId,
        hex: &str,
        keys: &[String; 7],
        ack: &Ack,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> Result<Option<DeliveryRead>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .add_command(self.ack_command(keys, ack, now))
            .add_command(self.read_command(keys, after, limit, now, mark));
        let replies = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let mut replies = replies.into_iter();
        let (Some(Ok(acked)), Some(Ok(read))) = (replies.next(), replies.next()) else {
            return Ok(None);
        };
        let acked = self.after_ack_reply(recipient, hex, acked).await?;
        let batch = self.finish_read(recipient, read)?;
        Ok(Some(DeliveryRead { acked, batch }))
    }

    /// `read.lua`'s call, for a pipeline.
    fn read_command(
        &self,
        keys: &[String; 7],
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
        mark: bool,
    ) -> redis::Cmd {
        let mut command = self.shared.steps.read.command(&keys[..]);
        command.arg(&read_args(after, limit, now, mark)[..]);
        command
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
            .arg(&read_args(after, limit, now, mark)[..])
            .invoke_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        self.finish_read(recipient, reply)
    }

    /// Decodes `read.lua`'s reply and remembers the queue's front (on one server).
    fn finish_read(&self, recipient: &RecipientId, reply: Value) -> Result<ReadBatch> {
        let reply = ReadReply::parse(reply)?;
        let mut damaged = reply.damaged;
        let mut records = Vec::with_capacity(reply.records.len());
        for (i, raw) in reply.records.into_iter().enumerate() {
            let seq = reply.seqs.get(i).map_or(reply.first + i as u64, |s| s.0);
            if raw.len() < HEADER {
                // Not a record this backend wrote: never delivered, reported as lost.
                damaged.push(Seq(seq));
                continue;
            }
            let delivered = match reply.counts.get(i) {
                Some(Some(explicit)) => *explicit,
                Some(None) | None => i64::from(seq <= reply.watermark),
            };
            records.push(decode_record(seq, raw, delivered));
        }
        if !self.is_cluster() {
            let bodies: usize = records.iter().map(|r| r.body.len()).sum();
            self.shared.fronts.after_read(
                recipient,
                reply.head,
                reply.plain,
                (bodies / records.len().max(1)) as u64,
            );
        }
        Ok(ReadBatch {
            records,
            expired: reply.expired,
            damaged,
            lost_unconfirmed: reply.lost_total.saturating_sub(reply.lost_confirmed),
            lost_total: reply.lost_total,
        })
    }
}

/// `read.lua`'s arguments after its keys: cursor, batch bounds, time, whether to mark.
fn read_args(after: Option<Seq>, limit: BatchLimit, now: Timestamp, mark: bool) -> [i64; 5] {
    let clamp = |n: u64| n.min(LUA_MAX) as i64;
    [
        after.map_or(NONE, |s| s.0 as i64),
        clamp(limit.max_messages as u64),
        clamp(limit.max_bytes as u64),
        clamp(now.as_millis()),
        i64::from(mark),
    ]
}
