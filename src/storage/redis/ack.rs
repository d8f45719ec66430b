//! The ack step: its arguments, its command for a pipeline, and the booking of its reply.

use redis::Value;

use super::RedisStorage;
use super::library::LUA_MAX;
use super::replies::{AckReply, Filing, NONE};
use crate::clock::Timestamp;
use crate::error::Result;
use crate::message::{RecipientId, Seq};
use crate::storage::Ack;

impl RedisStorage {
    /// The ack step's arguments after its keys (`i128` holds both [`NONE`] and any `u64`,
    /// and Redis gets each as its decimal text, without a string per argument).
    pub(super) fn ack_args(&self, ack: &Ack, now: Timestamp) -> Vec<i128> {
        let seq = |s: &Seq| i128::from(s.0);
        let mut args = Vec::with_capacity(6 + ack.seqs.len() + ack.passed_over.len());
        args.extend([
            ack.through.as_ref().map_or(NONE.into(), seq),
            i128::from(now.as_millis()),
            ack.lost_confirmed_through
                .map_or(NONE.into(), |t| i128::from(t.min(LUA_MAX))),
            ack.seqs.len() as i128,
        ]);
        args.extend(ack.seqs.iter().map(seq));
        args.push(ack.passed_over.len() as i128);
        args.extend(ack.passed_over.iter().map(seq));
        args
    }

    /// The ack step as a command, for a pipeline.
    pub(super) fn ack_command(&self, keys: &[String; 7], ack: &Ack, now: Timestamp) -> redis::Cmd {
        let mut command = self.shared.steps.ack.command(&keys[..]);
        for arg in self.ack_args(ack, now) {
            command.arg(arg);
        }
        command
    }

    /// Books the ack step's reply (the remembered front, freed bytes, the idle index);
    /// returns how many records it removed.
    pub(super) async fn after_ack_reply(
        &self,
        recipient: &RecipientId,
        hex: &str,
        reply: Value,
    ) -> Result<u64> {
        let reply = AckReply::parse(reply)?;
        self.shared.fronts.after_ack(recipient, reply.head);
        let filing = Filing {
            idle: reply.file_idle,
            deadline: None,
        };
        self.after_commit(recipient, hex, -reply.freed, filing)
            .await;
        Ok(reply.removed)
    }
}
