//! A recipient's ledger: what the next node to read a queue must know to number its records
//! as the last reader did. Seqs are stamped by the sending nodes, and a reader renumbers a
//! record that arrives at or below a seq it handed out (two nodes sending at once, or clocks
//! apart), so the numbering lives in the reader. The ledger carries it over:
//!
//! - the **floor**, the highest seq removed from the queue (acked, or passed over): a record
//!   stamped at or below it that arrives later is numbered above it, so a seq a client acked
//!   never comes back;
//! - the **pins**, message id → seq, of records still in the queue that were handed out at a
//!   seq other than their stamp (renumbered), or at or below the floor (a later record was
//!   acked first): the next reader gives them the same seqs.
//!
//! With both, a reader that takes over numbers the queue, from its head, as the last one did.
//! Every other record gets `max(stamp, floor + 1, last seq + 1)`, as it did then.
//!
//! The ledger is one message in a classic queue of its own per recipient (`x-max-length` 1,
//! `drop-head`: each write replaces the last), read with a `basic.get` handed straight back.
//! It is written on the holder's channel ahead of the acks and deliveries it covers, so the
//! broker has it before them; it is not confirmed (a broker crash can lose the last write,
//! see the backend docs).

use std::collections::HashMap;

use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};

use crate::error::Result;
use crate::message::MessageId;

use super::errors::broker_error;

/// The first byte of a ledger's body: its layout's version.
const VERSION: u8 = 1;
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The floor and the pins (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Ledger {
    pub(super) floor: u64,
    pub(super) pins: HashMap<MessageId, u64>,
}

impl Ledger {
    /// `[version][floor: u64 BE][count: u32 BE]` then `[id: 16 bytes][seq: u64 BE]` per pin.
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(13 + self.pins.len() * 24);
        body.push(VERSION);
        body.extend_from_slice(&self.floor.to_be_bytes());
        let count = u32::try_from(self.pins.len()).unwrap_or(u32::MAX);
        body.extend_from_slice(&count.to_be_bytes());
        for (id, seq) in self.pins.iter().take(count as usize) {
            body.extend_from_slice(&id.to_bytes());
            body.extend_from_slice(&seq.to_be_bytes());
        }
        body
    }

    /// `None` for a body this version cannot read.
    fn decode(body: &[u8]) -> Option<Self> {
        let (&version, rest) = body.split_first()?;
        if version != VERSION || rest.len() < 12 {
            return None;
        }
        let floor = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let count = u32::from_be_bytes(rest[8..12].try_into().ok()?) as usize;
        let pins = &rest[12..];
        if pins.len() != count.checked_mul(24)? {
            return None;
        }
        let pins = pins
            .chunks_exact(24)
            .map(|pin| {
                let id = MessageId::from_bytes(pin[..16].try_into().expect("16 bytes"));
                let seq = u64::from_be_bytes(pin[16..].try_into().expect("8 bytes"));
                (id, seq)
            })
            .collect();
        Some(Self { floor, pins })
    }
}

/// Where a recipient's ledger lives, and the arguments its queue is declared with.
#[derive(Clone, Debug)]
pub(super) struct LedgerQueue {
    pub(super) name: String,
    pub(super) expires_ms: u64,
}

impl LedgerQueue {
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        args.insert("x-queue-type".into(), text("classic"));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        args.insert("x-overflow".into(), text("drop-head"));
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(i64::try_from(self.expires_ms).unwrap_or(i64::MAX)),
        );
        args
    }

    /// Declares the ledger's queue (made if missing) and reads the ledger, handing the
    /// message straight back. Returns the ledger (empty if none was written, or if it was
    /// written by a layout this version cannot read) and the delivery tag the read used on
    /// `channel`, if any.
    pub(super) async fn load(&self, channel: &Channel) -> Result<(Ledger, Option<u64>)> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let name: lapin::types::ShortString = self.name.as_str().into();
        let declare = channel.queue_declare(name.clone(), options, self.arguments());
        let get = channel.basic_get(name, BasicGetOptions { no_ack: false });
        let (declared, got) = futures::join!(declare, get);
        declared.map_err(|e| {
            let mut error = broker_error(e, "queue.declare (ledger)");
            if let crate::Error::Storage { message, .. } = &mut error {
                message.push_str(&format!(
                    " (queue {}; this storage declares it with {:?})",
                    self.name,
                    self.arguments()
                ));
            }
            error
        })?;
        let Some(message) = got.map_err(|e| broker_error(e, "basic.get (ledger)"))? else {
            return Ok((Ledger::default(), None));
        };
        let tag = message.delivery.delivery_tag;
        let hand_back = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        channel
            .basic_nack(tag, hand_back)
            .await
            .map_err(|e| broker_error(e, "basic.nack (ledger)"))?;
        let ledger = Ledger::decode(&message.delivery.data).unwrap_or_else(|| {
            tracing::warn!(queue = %self.name, "a ledger this version cannot read; ignored");
            Ledger::default()
        });
        Ok((ledger, Some(tag)))
    }

    /// Publishes `ledger` to the queue on `channel`, replacing the last one. Not confirmed:
    /// the channel hands it to the broker ahead of whatever is sent after it.
    pub(super) async fn write(&self, channel: &Channel, ledger: &Ledger) -> Result<()> {
        let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
        channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions::default(),
                &ledger.encode(),
                properties,
            )
            .await
            .map_err(|e| broker_error(e, "basic.publish (ledger)"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledgers_round_trip_and_foreign_bodies_are_refused() {
        let mut ledger = Ledger {
            floor: 7 << 40,
            pins: HashMap::new(),
        };
        assert_eq!(Ledger::decode(&ledger.encode()), Some(ledger.clone()));
        ledger.pins.insert(MessageId::from_bytes([3; 16]), 9 << 40);
        ledger.pins.insert(MessageId::from_bytes([4; 16]), 1);
        let body = ledger.encode();
        assert_eq!(body.len(), 13 + 2 * 24);
        assert_eq!(Ledger::decode(&body), Some(ledger));
        assert_eq!(Ledger::decode(&body[..body.len() - 1]), None, "cut short");
        let mut other = body.clone();
        other[0] = 2;
        assert_eq!(Ledger::decode(&other), None, "another layout");
        assert_eq!(Ledger::decode(&[]), None);
    }
}
