//! [`AmqpStorage`]: a RabbitMQ queue per recipient (feature `amqp`; needs a tokio runtime).
//!
//! ```no_run
//! # async fn node() -> Result<(), offline_queue::Error> {
//! use std::sync::Arc;
//! use offline_queue::{AmqpStorage, OfflineQueue};
//!
//! let storage = AmqpStorage::options()
//!     .prefix("chat")
//!     .connect("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .await?;
//! let queue = OfflineQueue::builder().storage(Arc::new(storage)).build()?;
//! # Ok(()) }
//! ```
//!
//! Several nodes on one virtual host: set it with `OfflineQueueBuilder::shared_storage`, and
//! it is also their coordination (see Nodes, below). Not built yet (issue 18 goes on): loss
//! reports for what the broker drops or expires by itself. What the broker cannot do is
//! declared by [`Capabilities`], and the conformance suite skips exactly those checks.
//!
//! # Layout
//! - **A queue per recipient**, `<prefix>.<hex of the id>`, or `<prefix>.h.<SHA-256 of the
//!   id>` when that would pass AMQP's 255-byte limit (those records also carry the id, checked
//!   on read). Declared durable, quorum by default ([`QueueType`]), on the first append this
//!   process makes to it, with the [`Quota`] as the broker's own limits: `x-max-length`,
//!   `x-max-length-bytes` and `x-overflow` (`reject-publish` for
//!   [`Overflow::Reject`], `drop-head` for
//!   [`Overflow::DropOldest`]), and `x-expires` for
//!   [`Quota::idle_timeout`] when it is within the broker's cap (2^32 - 1 ms, 49.7 days;
//!   longer, and the queue is not removed by idleness). A queue that exists with other
//!   arguments is refused with an error naming the broker's complaint, never reused.
//! - **A record is a message** whose body is the engine's payload, byte for byte (so the
//!   broker's byte limit counts what [`Quota::max_bytes`] counts); seq, id and times are
//!   headers. Persistent, published with `mandatory` (a queue gone since this process
//!   declared it comes back as a return, and is declared again), and an append returns only
//!   after the broker's confirm: with a quorum queue, a majority of its replicas has it on
//!   disk. A `reject-publish` nack is [`Error::QueueFull`]. A nack while the queue is under
//!   its limits (a quorum queue still starting, or electing its leader) publishes the
//!   batch's unstored tail again, a few times, before it is a retryable error.
//! - **Seqs** are stamped by the sending node: `max(last + 1, wall clock ms × 1024)`, so they
//!   grow across restarts and stay below 2^53 (JavaScript's exact integers) for centuries.
//!   The broker keeps the order it received. A node's appends to one queue take turns (each
//!   stamped, published and confirmed before the next starts), so the queue holds one node's
//!   records in stamp order, and each is read at the seq its append returned. The cost: one
//!   recipient takes about 1.6 k appends a second from one node (BENCHMARKS.md). When two
//!   nodes send to one recipient at once, or their clocks differ, a record can arrive after
//!   a higher stamp; the reading node then renumbers it above the last seq it handed out,
//!   so seqs always increase, and that record's seq differs from the one its append
//!   returned (the [`MessageId`](crate::MessageId) is the identity that never changes).
//! - **A ledger per recipient** carries the numbering from one reading node to the next: a
//!   classic queue, `<prefix>.l.<hex of the id>`, holding one message
//!   with the highest seq removed from the queue (the floor) and the seq of each record still
//!   waiting that a reader renumbered, or left unacked below the floor (the pins). A node
//!   reads it when it takes a queue over (and again before each read until it takes a
//!   record), and writes it on the holder's channel before it hands out a renumbered seq and
//!   before an ack that moves the floor or removes a pinned record, so the broker has it
//!   first. So every reader numbers a queue as the last one did: a record keeps its seq from
//!   one node to the next, a seq names one record, and a record that arrives stamped at or
//!   below an acked seq is read above it. It is made on a recipient's first read, costs the
//!   broker a classic queue (about 35 KiB), and expires 2^32 - 1 ms (about
//!   49.7 days, the broker's cap) after the last node took the queue over.
//! - **Expiry**: each record with a deadline also gets a broker TTL (its remaining time plus
//!   a minute, when within the broker's cap), a backstop for queues nobody reads. Reads
//!   filter on the deadline themselves.
//!
//! # Reads take and hold
//! RabbitMQ cannot read a queue without taking from it. A read here takes records (manual
//! acks) on a channel of this node's for the recipient, and holds them unacked: on a classic
//! queue with bursts of `basic.get`, on a quorum queue with a consumer whose prefetch is what
//! the broker last said was ready, cancelled once that many came (or after
//! [`AmqpOptions::consumer_wait`]). Deliveries that reached this node before the cancel was
//! answered are held; the broker takes back any still on their way. "Nothing more is ready"
//! is only ever an empty `basic.get` on the same channel, which the broker answers after all
//! it did for that channel before, including those taken-back records: a session never
//! thinks it caught up while a record is on the wire to it. The node's later reads, marks and
//! acks for the recipient are served from what it holds, and extended from the queue, so a
//! repeated read sees the same records with the same seqs. Acks settle held records with the
//! broker (one `basic.ack` with `multiple` for a cumulative ack); passed-over records are
//! rejected without requeueing.
//!
//! A quorum queue serves the records handed back before the rest, in the order they came
//! back, so a record handed back a second time comes after those handed back once. The node
//! that takes such a queue over takes every handed-back record first and puts them back in
//! the order they were handed out (by the seq each had: its pin, else its stamp). While one node holds
//! records, another node cannot read them: `purge` hands back records held idle past
//! [`AmqpOptions::hold_idle`] (default 30 s) by closing the channel, and the broker then
//! redelivers them to whichever node reads next, marked redelivered (a quorum queue counts
//! the returns in `x-delivery-count`, which becomes the record's delivery count). A node that
//! dies hands back what it held the same way.
//!
//! # Nodes
//! Each node keeps an exclusive, auto-delete queue of its own (on a connection of its own)
//! bound to the direct exchange `<prefix>.wake` with the queue name of every recipient it
//! holds a session for: the binding is the presence, and it dies with the node's connection.
//! An append publishes a wake-up behind its records, `mandatory`, on the same channel; the
//! broker returns it when no node is bound, which is how the engine knows to push. A
//! session's end on a node (`Presence::Disconnected`) hands back what the node held for the
//! recipient at once. After its connection comes back, a node binds again and wakes every
//! session it holds.
//!
//! # What the broker does not do, and the capabilities that say so
//! - **No deduplication** ([`Capabilities::dedup`] false): a sender's retry stores twice.
//! - **No loss counters** ([`Capabilities::loss_counts`] false): a record the broker drops
//!   (`drop-head`) or expires is gone without a gap report, and an append cannot say how many
//!   it dropped. (Planned: dead-lettering into a per-recipient queue that counts them.)
//! - **Stats from the broker are counts of ready messages** ([`Capabilities::exact_stats`]
//!   false): `stats` adds what this node holds, and reports bytes and times of held records
//!   only; [`Error::QueueFull`] reports the broker's ready count and no bytes.
//! - **Batches are atomic on one node only**: under [`Overflow::Reject`](crate::Overflow)
//!   a batch is checked against the ready count before it is published, but two nodes
//!   filling one queue at once can have a batch stored in part. A single record is always
//!   all or nothing.
//! - **Length limits count ready messages**: records a node holds do not count, so a queue
//!   can pass its quota by what its readers hold.
//! - **Expiry and idleness by the broker's clock**: `purge` removes no records and no queues
//!   ([`Capabilities::purge_expired`] and [`Capabilities::idle_removal`] false); the broker
//!   does, by TTL and `x-expires`.
//! - **No storage-wide byte budget** ([`Capabilities::total_byte_budget`] false).

mod errors;
mod holder;
mod ledger;
mod names;
mod nodes;
mod options;
mod record;
mod turns;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Confirmation, Connection};

use crate::clock::Timestamp;
use crate::error::{Error, Result, Retry};
use crate::limits::{BatchLimit, Overflow, Quota};
use crate::message::{RecipientId, Seq};
use crate::storage::{
    Ack, AppendOutcome, Appended, Capabilities, DeliveryRead, NewRecord, PurgeOutcome, ReadBatch,
    RecipientStats, Storage,
};

use errors::{broker_error, is_not_found};
use holder::Holder;
use ledger::LedgerQueue;
use names::{QueueName, ledger_name, queue_name};
use nodes::{Holders, Node};
pub use options::{AmqpOptions, QueueType};
use turns::Turns;

/// The broker's cap on a TTL or `x-expires`, in ms.
const BROKER_MAX_MS: u64 = u32::MAX as u64;
/// Added to a record's remaining time for its broker TTL: the broker's expiry is a backstop,
/// and the engine should see an expired record first when someone reads.
const BROKER_TTL_GRACE_MS: u64 = 60_000;
/// How many records the queue `name` has ready (a passive declare); a missing queue is an
/// error that closes `channel`.
async fn ready_count(channel: &Channel, name: &str) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// Queue names this process has declared, remembered to skip the declare; cleared when full.
const DECLARED_CACHE: usize = 65_536;
/// Publishing channels per connection: appends in flight at once, each on its own channel.
const PUBLISH_CHANNELS: usize = 64;
/// How often the tail of a batch is published again after its queue vanished in between, or
/// the broker refused it while the queue was under its limits.
const PUBLISH_TRIES: usize = 3;
/// The pause before the first publish again after a refusal; it doubles each time.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(25);

/// Queues in RabbitMQ, a queue per recipient. See the [module docs](self).
pub struct AmqpStorage {
    url: String,
    options: AmqpOptions,
    link: parking_lot::Mutex<Option<Arc<Link>>>,
    connecting: tokio::sync::Mutex<()>,
    /// The last seq stamped, across reconnects.
    last_stamp: parking_lot::Mutex<u64>,
    declared: parking_lot::Mutex<HashSet<String>>,
    /// A turn per queue being declared: a quorum queue declared again while its first
    /// declare is still starting it answers at once, and publishes that follow are nacked.
    declaring: Turns,
    /// A turn per queue being appended to: two appends racing on two channels could reach
    /// the queue in the other order than their stamps, and a reader would renumber one.
    appending: Turns,
    holders: Holders,
    /// Where `purge`'s sweep of the holders resumes (after this recipient).
    purge_cursor: parking_lot::Mutex<Option<RecipientId>>,
    node: Node,
}

/// One connection: a pool of channels in confirm mode for publishes, and one of channels for
/// declares, counts and deletes. A step takes a channel for itself: a broker error (a queue
/// not found, arguments that differ) closes the channel it came on, and must not fail
/// another step sharing it.
struct Link {
    connection: Connection,
    publishers: parking_lot::Mutex<Vec<Channel>>,
    publish_slots: Arc<tokio::sync::Semaphore>,
    controls: parking_lot::Mutex<Vec<Channel>>,
}

/// A publishing channel taken from the pool.
struct Publisher {
    channel: Channel,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// What became of one published record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Published {
    Stored,
    /// No such queue (returned as unroutable): declare it and publish again.
    Returned,
    /// Nacked: `reject-publish` refused it, or the queue could not take it yet.
    Rejected,
}

impl std::fmt::Debug for AmqpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpStorage")
            .field("prefix", &self.options.prefix)
            .field("queue_type", &self.options.queue_type)
            .finish_non_exhaustive()
    }
}

impl AmqpStorage {
    /// Settings, then [`AmqpOptions::connect`].
    pub fn options() -> AmqpOptions {
        AmqpOptions::default()
    }

    /// Connects with the default options.
    ///
    /// # Errors
    /// As [`AmqpOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        AmqpOptions::default().connect(url).await
    }

    /// Hands back every record this node holds and closes its connection, so other nodes can
    /// read those records at once. Dropping the storage hands them back too, but only when the
    /// broker notices the connection is gone. A later call connects again.
    pub async fn close(&self) {
        let slots: Vec<_> = self.holders.lock().drain().map(|(_, slot)| slot).collect();
        for slot in slots {
            if let Some(holder) = slot.lock().await.take() {
                holder.release().await;
            }
        }
        let link = self.link.lock().take();
        if let Some(link) = link {
            // Failing only if the connection is gone already.
            let _ = link.connection.close(200, "closed".into()).await;
        }
    }

    async fn connect_with(url: &str, options: AmqpOptions) -> Result<Self> {
        let holders = Holders::default();
        let node = Node::start(
            url.to_owned(),
            options.prefix.clone(),
            options.operation_timeout,
            holders.clone(),
        );
        let storage = Self {
            url: url.to_owned(),
            options,
            link: parking_lot::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_stamp: parking_lot::Mutex::new(0),
            declared: parking_lot::Mutex::new(HashSet::new()),
            declaring: Turns::default(),
            appending: Turns::default(),
            holders,
            purge_cursor: parking_lot::Mutex::new(None),
            node,
        };
        storage.link().await?;
        Ok(storage)
    }

    /// The open connection, or a new one if it was lost.
    async fn link(&self) -> Result<Arc<Link>> {
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        let connection = errors::connect(&self.url, self.options.operation_timeout).await?;
        let control = connection
            .create_channel()
            .await
            .map_err(|e| broker_error(e, "channel.open"))?;
        // Declared before any publish to it: publishing to a missing exchange closes the channel.
        nodes::declare_exchange(&control, &self.options.prefix).await?;
        let link = Arc::new(Link {
            connection,
            publishers: parking_lot::Mutex::new(Vec::new()),
            publish_slots: Arc::new(tokio::sync::Semaphore::new(PUBLISH_CHANNELS)),
            controls: parking_lot::Mutex::new(vec![control]),
        });
        // Queues declared on the old connection may have gone with it (x-expires).
        self.declared.lock().clear();
        *self.link.lock() = Some(link.clone());
        Ok(link)
    }

    fn open_link(&self) -> Option<Arc<Link>> {
        self.link
            .lock()
            .clone()
            .filter(|link| link.connection.status().connected())
    }

    /// A channel for declares, deletes and counts; a broker error closes a channel, so a
    /// closed one is replaced.
    async fn control(&self) -> Result<(Arc<Link>, Channel)> {
        let link = self.link().await?;
        let pooled = link.controls.lock().pop();
        if let Some(channel) = pooled.filter(|c| c.status().connected()) {
            return Ok((link, channel));
        }
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| broker_error(e, "channel.open"))?;
        Ok((link, channel))
    }

    /// Hands a control channel back after a step that succeeded (an error closed it).
    fn control_done(link: &Link, channel: Channel, succeeded: bool) {
        if succeeded && channel.status().connected() {
            link.controls.lock().push(channel);
        }
    }

    fn name(&self, recipient: &RecipientId) -> QueueName {
        queue_name(&self.options.prefix, recipient)
    }

    /// The queue's arguments for `quota`.
    fn arguments(&self, quota: &Quota) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        args.insert(
            "x-queue-type".into(),
            text(self.options.queue_type.argument()),
        );
        if let Ok(max) = i64::try_from(quota.max_messages) {
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        }
        if let Ok(max) = i64::try_from(quota.max_bytes) {
            args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(max));
        }
        let overflow = match quota.overflow {
            Overflow::Reject => "reject-publish",
            Overflow::DropOldest => "drop-head",
        };
        args.insert("x-overflow".into(), text(overflow));
        if let Some(idle) = quota.idle_timeout {
            let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
            if (1..=BROKER_MAX_MS).contains(&ms) {
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
                );
            }
        }
        args
    }

    /// Declares the queue unless this process did already, one declare per queue at a time.
    async fn declare(&self, name: &str, quota: &Quota) -> Result<()> {
        if self.declared.lock().contains(name) {
            return Ok(());
        }
        let _turn = self.declaring.take(name).await;
        self.declare_now(name, quota).await
    }

    async fn declare_now(&self, name: &str, quota: &Quota) -> Result<()> {
        if self.declared.lock().contains(name) {
            return Ok(()); // declared while this caller waited its turn
        }
        let (link, channel) = self.control().await?;
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let declared = self
            .within(
                "queue.declare",
                channel.queue_declare(name.into(), options, self.arguments(quota)),
            )
            .await;
        Self::control_done(&link, channel, declared.is_ok());
        declared.map_err(|mut error| {
            if let Error::Storage { message, .. } = &mut error {
                message.push_str(&format!(
                    " (queue {name}; this storage declares it with {:?})",
                    self.arguments(quota)
                ));
            }
            error
        })?;
        let mut declared = self.declared.lock();
        if declared.len() >= DECLARED_CACHE {
            declared.clear();
        }
        declared.insert(name.to_owned());
        Ok(())
    }

    /// Messages ready in the queue (not held by any node); `None` if it does not exist.
    async fn ready(&self, name: &str) -> Result<Option<u64>> {
        let (link, channel) = self.control().await?;
        let found =
            tokio::time::timeout(self.options.operation_timeout, ready_count(&channel, name)).await;
        let answered = matches!(found, Ok(Ok(_)));
        Self::control_done(&link, channel, answered);
        match found {
            Ok(Ok(count)) => Ok(Some(u64::from(count))),
            Ok(Err(e)) if is_not_found(&e) => Ok(None),
            Ok(Err(e)) => Err(broker_error(e, "queue.declare passive")),
            Err(_) => Err(self.timed_out("queue.declare passive")),
        }
    }

    /// `step` within [`AmqpOptions::operation_timeout`]; past it, a retryable error.
    async fn within<T>(
        &self,
        what: &str,
        step: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.options.operation_timeout, step).await {
            Ok(result) => result.map_err(|e| broker_error(e, what)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    fn timed_out(&self, what: &str) -> Error {
        Error::storage_msg(
            Retry::Yes,
            format!(
                "amqp {what}: no answer from the broker within {:?} (a queue without a leader, \
                 a broker out of memory or disk, a network partition)",
                self.options.operation_timeout
            ),
        )
    }

    /// The next seq to stamp.
    fn stamp(&self) -> u64 {
        let behind = u64::try_from(self.options.clock_behind.as_millis()).unwrap_or(u64::MAX);
        let clock = Timestamp::now_system()
            .as_millis()
            .saturating_sub(behind)
            .saturating_mul(1024);
        let mut last = self.last_stamp.lock();
        *last = clock.max(*last + 1);
        *last
    }

    /// A publishing channel of this connection's pool, in confirm mode, for one caller at a
    /// time: lapin hands a returned message to whichever confirmation completes next, so a
    /// channel shared by concurrent appends could credit one append with another's return.
    async fn publisher(&self) -> Result<(Arc<Link>, Publisher)> {
        let link = self.link().await?;
        let permit = link
            .publish_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let pooled = link.publishers.lock().pop();
        let channel = match pooled.filter(|c| c.status().connected()) {
            Some(channel) => channel,
            None => {
                let channel = link
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| broker_error(e, "channel.open"))?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| broker_error(e, "confirm.select"))?;
                channel
            }
        };
        Ok((
            link,
            Publisher {
                channel,
                _permit: permit,
            },
        ))
    }

    /// Publishes `records` in order with their stamps, and a wake-up behind them when `wake`
    /// (a node woken by it finds them). Returns what became of each record, and whether the
    /// wake-up reached a node.
    async fn publish(
        &self,
        name: &QueueName,
        recipient: &RecipientId,
        records: &[(u64, &NewRecord)],
        now: Timestamp,
        wake: bool,
    ) -> Result<(Vec<Published>, Option<bool>)> {
        let hashed = name.hashed.then_some(recipient);
        let (link, publisher) = self.publisher().await?;
        let channel = &publisher.channel;
        let mut pending = Vec::with_capacity(records.len() + 1);
        for (seq, record) in records {
            let ttl = record.expires_at.and_then(|at| {
                let ms = at.as_millis().saturating_sub(now.as_millis());
                let ms = ms.saturating_add(BROKER_TTL_GRACE_MS);
                (ms <= BROKER_MAX_MS).then_some(ms)
            });
            let properties = record::properties(record, *seq, hashed, ttl);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    name.name.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &record.body,
                    properties,
                )
                .await
                .map_err(|e| broker_error(e, "basic.publish"))?;
            pending.push(confirm);
        }
        if wake {
            pending.push(self.publish_wake(channel, recipient, false).await?);
        }
        // Which message a return belongs to is read from the return itself (its seq header,
        // or the wake-up exchange); an ack or a nack is exact per message.
        let mut acked = Vec::with_capacity(pending.len());
        let mut returned_seqs = HashSet::new();
        let mut wake_returned = false;
        for confirm in pending {
            // Past the bound the channel is dropped, not pooled: its late confirms and returns
            // must not reach another append.
            let confirmation = self
                .within("publish confirm (the record may have been stored)", confirm)
                .await?;
            let (ok, returned) = match confirmation {
                Confirmation::Ack(returned) => (true, returned),
                Confirmation::Nack(returned) => (false, returned),
                Confirmation::NotRequested => {
                    return Err(Error::storage_msg(
                        Retry::No,
                        "amqp: the publish channel is not in confirm mode",
                    ));
                }
            };
            acked.push(ok);
            if let Some(returned) = returned {
                if returned.delivery.exchange.as_str().is_empty() {
                    returned_seqs.extend(record::seq_of(&returned.delivery.properties));
                } else {
                    wake_returned = true;
                }
            }
        }
        link.publishers.lock().push(publisher.channel);
        let woke = wake.then(|| {
            acked.pop();
            !wake_returned
        });
        let outcomes = records
            .iter()
            .zip(acked)
            .map(|((seq, _), ok)| match (ok, returned_seqs.contains(seq)) {
                (_, true) => Published::Returned,
                (true, false) => Published::Stored,
                (false, false) => Published::Rejected,
            })
            .collect();
        Ok((outcomes, woke))
    }

    fn queue_full(&self, ready: u64, records: &[NewRecord], quota: &Quota) -> Error {
        Error::QueueFull {
            messages: ready,
            bytes: 0,
            adding_messages: records.len() as u64,
            adding_bytes: records.iter().map(|r| r.body.len() as u64).sum(),
            max_messages: quota.max_messages,
            max_bytes: quota.max_bytes,
        }
    }

    /// The holder slot for `recipient`, made if missing.
    fn slot(&self, recipient: &RecipientId) -> Arc<tokio::sync::Mutex<Option<Holder>>> {
        self.holders
            .lock()
            .entry(recipient.clone())
            .or_default()
            .clone()
    }

    /// Runs `step` on the recipient's holder (opening a channel for it if needed). A broker
    /// error drops the holder: its channel is gone, and the broker took its records back.
    async fn with_holder<T>(
        &self,
        recipient: &RecipientId,
        step: impl AsyncFnOnce(&mut Holder) -> Result<T>,
    ) -> Result<T> {
        let slot = self.slot(recipient);
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|h| !h.is_open()) {
            *guard = None;
        }
        if guard.is_none() {
            let name = self.name(recipient).name;
            let link = self.link().await?;
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(|e| broker_error(e, "channel.open"))?;
            let consumer_wait = (self.options.queue_type == QueueType::Quorum)
                .then_some(self.options.consumer_wait);
            let ledger = LedgerQueue::new(ledger_name(&self.options.prefix, recipient));
            *guard = Some(Holder::new(
                channel,
                name,
                ledger,
                recipient.clone(),
                consumer_wait,
            ));
        }
        let holder = guard.as_mut().expect("set above");
        let bounded = tokio::time::timeout(self.options.operation_timeout, step(holder)).await;
        // A step cut short may have taken records it never held: letting go of the channel
        // hands them back.
        match bounded.unwrap_or_else(|_| Err(self.timed_out("read or ack"))) {
            Ok(value) => Ok(value),
            Err(error) => {
                if let Some(holder) = guard.take() {
                    holder.release().await;
                }
                Err(error)
            }
        }
    }

    /// True if the broker says the queue does not exist (so there is nothing to hold).
    async fn missing(&self, recipient: &RecipientId) -> Result<bool> {
        let held = self.holders.lock().contains_key(recipient);
        Ok(!held && self.ready(&self.name(recipient).name).await?.is_none())
    }
}

#[async_trait]
impl Storage for AmqpStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_durable(true)
            .with_max_read_batch(self.options.max_read_batch)
            // Not exact on either queue type: limits count ready records only, so what
            // readers hold comes on top; a quorum queue admits one more record besides.
            .with_exact_quotas(false)
    }

    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        if records.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let adding_bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        if records.len() as u64 > quota.max_messages || adding_bytes > quota.max_bytes {
            return Err(self.queue_full(0, &records, quota));
        }
        let name = self.name(recipient);
        self.declare(&name.name, quota).await?;
        // One append per queue at a time on this node, stamped and confirmed in turn, so the
        // queue holds this node's records in stamp order and no reader renumbers them.
        let _turn = self.appending.take(&name.name).await;
        if records.len() > 1 && quota.overflow == Overflow::Reject {
            // The broker rejects record by record: check the batch whole first.
            let ready = self.ready(&name.name).await?.unwrap_or(0);
            if ready.saturating_add(records.len() as u64) > quota.max_messages {
                return Err(self.queue_full(ready, &records, quota));
            }
        }
        let stamped: Vec<(u64, &NewRecord)> = records.iter().map(|r| (self.stamp(), r)).collect();
        let mut to_send = stamped.clone();
        let mut live_elsewhere = false;
        for attempt in 0..=PUBLISH_TRIES {
            // The first try also wakes the nodes holding a session for the recipient.
            let (outcomes, woke) = self
                .publish(&name, recipient, &to_send, now, attempt == 0)
                .await?;
            if let Some(routed) = woke {
                live_elsewhere = routed && !self.node.live.lock().contains(recipient);
            }
            let Some(first_failed) = outcomes.iter().position(|o| *o != Published::Stored) else {
                break;
            };
            let failed = &outcomes[first_failed..];
            let returned = failed.contains(&Published::Returned);
            let rejected = failed.iter().filter(|o| **o == Published::Rejected).count();
            if rejected > 0 {
                // A nack is `reject-publish` refusing a full queue, or the broker unable to
                // take the record yet (a quorum queue still starting or electing its leader):
                // only a queue that may be at a limit is full. The broker does not say its
                // bytes, so a queue holding anything under a byte limit may be.
                let ready = self.ready(&name.name).await?.unwrap_or(0);
                let count_reached = ready.saturating_add(records.len() as u64) > quota.max_messages;
                let bytes_reached = quota.max_bytes < u64::MAX && ready > 0;
                if count_reached || bytes_reached {
                    return Err(self.queue_full(ready, &records, quota));
                }
            }
            // Publishing again keeps the append's order only while what failed is a tail.
            let tail = !failed.contains(&Published::Stored);
            if !tail || attempt == PUBLISH_TRIES {
                let what = if returned {
                    "the queue vanished while they were published"
                } else {
                    "the broker refused them while the queue was under its limits"
                };
                let unstored = failed.iter().filter(|o| **o != Published::Stored).count();
                return Err(Error::storage_msg(
                    Retry::Yes,
                    format!(
                        "amqp: {unstored} of {} records for queue {} were not stored, {what}; the \
                         other {} were stored",
                        records.len(),
                        name.name,
                        records.len() - unstored
                    ),
                ));
            }
            if returned {
                // The queue is gone (removed, or idle past x-expires) since it was declared.
                self.declared.lock().remove(&name.name);
                self.declare(&name.name, quota).await?;
            } else {
                tokio::time::sleep(PUBLISH_RETRY_PAUSE * (1 << attempt)).await;
            }
            to_send = to_send[first_failed..].to_vec();
        }
        Ok(AppendOutcome {
            records: stamped
                .iter()
                .map(|(seq, _)| Appended::Stored(Seq(*seq)))
                .collect(),
            dropped: 0,
            // The queue's count would cost a round trip per send (`exact_stats` false).
            pending: records.len() as u64,
            live_elsewhere,
        })
    }

    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        if self.missing(recipient).await? {
            return Ok(ReadBatch::default());
        }
        self.with_holder(recipient, async |h| h.read(after, limit, now, false).await)
            .await
    }

    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&Ack>,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<DeliveryRead> {
        if self.missing(recipient).await? {
            return Ok(DeliveryRead::default());
        }
        self.with_holder(recipient, async |h| {
            let acked = match ack {
                Some(ack) => h.ack(ack).await?,
                None => 0,
            };
            let batch = h.read(after, limit, now, true).await?;
            Ok(DeliveryRead { acked, batch })
        })
        .await
    }

    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        if seqs.is_empty() || self.missing(recipient).await? {
            return Ok(());
        }
        self.with_holder(recipient, async |h| h.mark_delivered(seqs).await)
            .await
    }

    async fn ack(&self, recipient: &RecipientId, ack: &Ack, _now: Timestamp) -> Result<u64> {
        let names_records = ack.through.is_some() || !ack.seqs.is_empty();
        if (!names_records && ack.passed_over.is_empty()) || self.missing(recipient).await? {
            return Ok(0);
        }
        self.with_holder(recipient, async |h| h.ack(ack).await)
            .await
    }

    async fn purge(
        &self,
        _now: Timestamp,
        _idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<PurgeOutcome> {
        // Records and queues expire by the broker's clock; what is left to do here is to
        // hand back records held by sessions that went quiet.
        // A sweep goes through the holders in id order, `budget` a call, resuming after the
        // last one examined: every call makes progress, and a sweep ends.
        let idle = self.options.hold_idle;
        let cursor = self.purge_cursor.lock().take();
        let mut slots: Vec<(RecipientId, Arc<tokio::sync::Mutex<Option<Holder>>>)> = self
            .holders
            .lock()
            .iter()
            .filter(|(r, _)| cursor.as_ref().is_none_or(|after| *r > after))
            .map(|(r, s)| (r.clone(), s.clone()))
            .collect();
        slots.sort_by(|a, b| a.0.cmp(&b.0));
        let more = slots.len() > budget;
        slots.truncate(budget);
        if more {
            *self.purge_cursor.lock() = slots.last().map(|(r, _)| r.clone()).or(cursor);
        }
        let examined = slots.len() as u64;
        for (recipient, slot) in slots {
            let Ok(mut guard) = slot.try_lock() else {
                continue; // in use right now: not idle
            };
            let quiet = guard
                .as_ref()
                .is_none_or(|h| !h.is_open() || h.last_used.elapsed() >= idle);
            if quiet {
                if let Some(holder) = guard.take() {
                    holder.release().await;
                }
                drop(guard);
                let mut holders = self.holders.lock();
                // Only if nobody took the slot up again meanwhile.
                if holders
                    .get(&recipient)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2)
                {
                    holders.remove(&recipient);
                }
            }
        }
        Ok(PurgeOutcome {
            expired: 0,
            idle_recipients: 0,
            more,
            examined,
        })
    }

    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        let Some(ready) = self.ready(&self.name(recipient).name).await? else {
            return Ok(RecipientStats::default());
        };
        let slot = self.holders.lock().get(recipient).cloned();
        let (held, bytes, oldest, newest) = match slot {
            Some(slot) => match slot.lock().await.as_ref().filter(|h| h.is_open()) {
                Some(holder) => holder.held(),
                None => (0, 0, None, None),
            },
            None => (0, 0, None, None),
        };
        Ok(RecipientStats {
            messages: ready + held,
            bytes,
            oldest_sent_at: oldest,
            newest_seq: newest,
            lost: 0,
        })
    }

    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        // The queue is deleted while this node still holds what it took: the broker's count
        // is of ready records, so the held ones are added, not counted twice after a hand-back
        // the broker may not have finished.
        let slot = self.holders.lock().remove(recipient);
        let holder = match slot {
            Some(slot) => slot.lock().await.take(),
            None => None,
        };
        let held = holder
            .as_ref()
            .filter(|h| h.is_open())
            .map_or(0, |h| h.held().0);
        let name = self.name(recipient).name;
        self.declared.lock().remove(&name);
        let deleted = async {
            let (link, channel) = self.control().await?;
            let deleted = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            Self::control_done(&link, channel, deleted.is_ok());
            let count = match deleted {
                Ok(count) => u64::from(count) + held,
                Err(e) if is_not_found(&e) => 0,
                Err(e) => return Err(broker_error(e, "queue.delete")),
            };
            // The ledger after the records: a ledger left behind by a failure is only a floor
            // below every seq stamped from now on.
            let ledger = ledger_name(&self.options.prefix, recipient);
            let (link, channel) = self.control().await?;
            let deleted = channel
                .queue_delete(ledger.as_str().into(), QueueDeleteOptions::default())
                .await;
            Self::control_done(&link, channel, deleted.is_ok());
            if let Err(e) = deleted
                && !is_not_found(&e)
            {
                // The records are gone: the call did what it was for. The ledger left
                // behind expires by itself.
                tracing::warn!(queue = %ledger, error = %e, "amqp: the ledger was not deleted");
            }
            Ok(count)
        }
        .await;
        if let Some(holder) = holder {
            // After a delete this closes a channel on records that are gone; after a failed
            // one it hands them back.
            holder.release().await;
        }
        deleted
    }
}
