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
//! `drop-head`: each write replaces the last). A node reads it with a `basic.get` handed
//! straight back (a requeueing `basic.nack`): a classic queue puts it back at its head, so a
//! write that came meanwhile pushes the old one out. (A quorum queue keeps the one handed
//! back and drops the newer write, and a copy published back can land after a newer write
//! and push it out: so the ledger is classic whatever the records are.) A node reads it when
//! it takes the queue over, and writes it on the holder's channel ahead of the deliveries and
//! acks it covers, so the broker gets it before them (on a cluster, before them on that
//! channel: the two queues' leaders may be on different broker nodes). Writes are not
//! confirmed: a broker crash can lose the last one (see the backend docs).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};

use crate::error::{Error, Result, Retry};
use crate::message::MessageId;

use super::errors::broker_error;

/// The first byte of a ledger's body: its layout's version.
const VERSION: u8 = 1;
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// A pin's bytes: the message id, its stamp and its seq.
const PIN: usize = 32;
/// How often a holder that keeps a queue for long declares its ledger again: a publish does
/// not count as use for `x-expires`, a declare does.
const DECLARE_AGAIN: Duration = Duration::from_secs(24 * 3600);

/// A record the ledger pins: its message id and stamp. Both, because a resend with the same
/// id is stored again on this backend (no dedup), with another stamp.
pub(super) type PinKey = (MessageId, u64);

/// The floor and the pins (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Ledger {
    pub(super) floor: u64,
    pub(super) pins: HashMap<PinKey, u64>,
}

impl Ledger {
    /// `[version][floor: u64 BE][count: u32 BE]` then `[id: 16 bytes][stamp: u64 BE][seq: u64
    /// BE]` per pin.
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(13 + self.pins.len() * PIN);
        body.push(VERSION);
        body.extend_from_slice(&self.floor.to_be_bytes());
        let count = u32::try_from(self.pins.len()).unwrap_or(u32::MAX);
        body.extend_from_slice(&count.to_be_bytes());
        for ((id, stamp), seq) in self.pins.iter().take(count as usize) {
            body.extend_from_slice(&id.to_bytes());
            body.extend_from_slice(&stamp.to_be_bytes());
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
        if pins.len() != count.checked_mul(PIN)? {
            return None;
        }
        let word = |bytes: &[u8]| u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
        let pins = pins
            .chunks_exact(PIN)
            .map(|pin| {
                let id = MessageId::from_bytes(pin[..16].try_into().expect("16 bytes"));
                ((id, word(&pin[16..24])), word(&pin[24..]))
            })
            .collect();
        Some(Self { floor, pins })
    }
}

/// Where a recipient's ledger lives.
#[derive(Debug)]
pub(super) struct LedgerQueue {
    pub(super) name: String,
    /// When this holder last declared it.
    declared: Option<Instant>,
}

impl LedgerQueue {
    pub(super) fn new(name: String) -> Self {
        Self {
            name,
            declared: None,
        }
    }

    /// Fixed, so every node declares the same queue: `x-expires` at the broker's cap
    /// (2^32 - 1 ms, about 49.7 days), renewed by each node that takes the queue over.
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        args.insert("x-queue-type".into(), text("classic"));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        args.insert("x-overflow".into(), text("drop-head"));
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(i64::from(u32::MAX)),
        );
        args
    }

    fn declare_error(&self, error: lapin::Error) -> Error {
        let mut error = broker_error(error, "queue.declare (ledger)");
        if let Error::Storage { message, .. } = &mut error {
            message.push_str(&format!(
                " (queue {}; this storage declares it with {:?})",
                self.name,
                self.arguments()
            ));
        }
        error
    }

    /// Declares the ledger's queue (made if missing) and reads the ledger, handing the
    /// message straight back. Returns the ledger (empty if none was written) and the delivery tag the read used on
    /// `channel`, if any.
    ///
    /// # Errors
    /// A broker error; [`Error::Storage`], not retryable, for a ledger in a layout this
    /// version cannot read (a newer version wrote it): reading on would number records
    /// without what it says.
    pub(super) async fn load(&mut self, channel: &Channel) -> Result<(Ledger, Option<u64>)> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let name: lapin::types::ShortString = self.name.as_str().into();
        let declare = channel.queue_declare(name.clone(), options, self.arguments());
        let get = channel.basic_get(name, BasicGetOptions { no_ack: false });
        let (declared, got) = futures::join!(declare, get);
        declared.map_err(|e| self.declare_error(e))?;
        self.declared = Some(Instant::now());
        let Some(message) = got.map_err(|e| broker_error(e, "basic.get (ledger)"))? else {
            return Ok((Ledger::default(), None));
        };
        let tag = message.delivery.delivery_tag;
        let body = &message.delivery.data;
        let Some(ledger) = Ledger::decode(body) else {
            return Err(Error::storage_msg(
                Retry::No,
                format!(
                    "amqp: the ledger in queue {} is in a layout this version cannot read \
                     (version byte {:?}, this version writes {VERSION}); upgrade this node",
                    self.name,
                    body.first()
                ),
            ));
        };
        let hand_back = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        channel
            .basic_nack(tag, hand_back)
            .await
            .map_err(|e| broker_error(e, "basic.nack (ledger)"))?;
        Ok((ledger, Some(tag)))
    }

    /// Publishes `ledger` to the queue on `channel`, replacing the last one. Not confirmed:
    /// the channel hands it to the broker ahead of whatever is sent after it.
    pub(super) async fn write(&mut self, channel: &Channel, ledger: &Ledger) -> Result<()> {
        if self.declared.is_none_or(|at| at.elapsed() >= DECLARE_AGAIN) {
            let options = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(self.name.as_str().into(), options, self.arguments())
                .await
                .map_err(|e| self.declare_error(e))?;
            self.declared = Some(Instant::now());
        }
        self.publish(channel, &ledger.encode()).await
    }

    async fn publish(&self, channel: &Channel, body: &[u8]) -> Result<()> {
        let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
        channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions::default(),
                body,
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
        let id = MessageId::from_bytes([3; 16]);
        // One id twice (a resend stored again), told apart by stamp.
        ledger.pins.insert((id, 5 << 40), 9 << 40);
        ledger.pins.insert((id, 6 << 40), (9 << 40) + 1);
        ledger.pins.insert((MessageId::from_bytes([4; 16]), 1), 1);
        let body = ledger.encode();
        assert_eq!(body.len(), 13 + 3 * PIN);
        assert_eq!(Ledger::decode(&body), Some(ledger));
        assert_eq!(Ledger::decode(&body[..body.len() - 1]), None, "cut short");
        let mut other = body.clone();
        other[0] = 2;
        assert_eq!(Ledger::decode(&other), None, "another layout");
        assert_eq!(Ledger::decode(&[]), None);
    }
}
