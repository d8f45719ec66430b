//! Several engines on one broker: each node has an exclusive, auto-delete queue bound to the
//! direct exchange `<prefix>.wake` with the queue name of every recipient it holds a session
//! for. The binding is the presence, and its lease is the node's connection: the broker
//! removes the queue and its bindings when the connection dies. A wake-up is a message
//! published to the exchange with the recipient's queue name as routing key, `mandatory`: the
//! broker returns it when no node is bound, which is how `announce` and `live_elsewhere` know.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::BoxStream;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind, PublisherConfirm};
use parking_lot::Mutex;

use super::AmqpStorage;
use super::errors::broker_error;
use super::holder::Holder;
use super::names::queue_name;
use crate::coordination::{Coordination, Listeners, Presence};
use crate::error::{Error, Result};
use crate::message::RecipientId;

/// A node's header on its wake-ups, so it can skip its own.
const NODE: &str = "oq-node";
/// Set on a message that only asks whether anyone is bound (`live_elsewhere`).
const PING: &str = "oq-ping";
/// The longest wait between two tries to get the node's queue back after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) type Holders = Arc<Mutex<HashMap<RecipientId, Arc<tokio::sync::Mutex<Option<Holder>>>>>>;

/// The exchange wake-ups go through.
pub(super) fn exchange(prefix: &str) -> String {
    format!("{prefix}.wake")
}

/// Declares the wake-up exchange (durable, direct); idempotent.
pub(super) async fn declare_exchange(channel: &Channel, prefix: &str) -> Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange(prefix).as_str().into(),
            ExchangeKind::Direct,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker_error(e, "exchange.declare"))
}

/// What this node knows of itself.
pub(super) struct Node {
    pub(super) id: u64,
    /// Recipients this node holds a session for.
    pub(super) live: Arc<Mutex<HashSet<RecipientId>>>,
    pub(super) listeners: Listeners,
    pub(super) events: mpsc::UnboundedSender<(RecipientId, Presence)>,
}

impl Node {
    /// Starts the node task, on a connection of its own; it ends with the storage.
    pub(super) fn start(url: String, prefix: String, timeout: Duration, holders: Holders) -> Self {
        let id = u64::from_be_bytes(
            crate::MessageId::generate().to_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let live = Arc::new(Mutex::new(HashSet::new()));
        let listeners = Listeners::default();
        let (events, receiver) = mpsc::unbounded();
        let task = Task {
            url,
            prefix,
            timeout,
            id,
            live: live.clone(),
            listeners: listeners.clone(),
            holders,
        };
        tokio::spawn(task.run(receiver));
        Self {
            id,
            live,
            listeners,
            events,
        }
    }
}

struct Task {
    url: String,
    prefix: String,
    /// Bounds the connect (a broker can take a connection and never answer it).
    timeout: Duration,
    id: u64,
    live: Arc<Mutex<HashSet<RecipientId>>>,
    listeners: Listeners,
    holders: Holders,
}

impl Task {
    /// Keeps the node's queue bound to what the node holds, through reconnects, until the
    /// storage is dropped.
    async fn run(self, mut events: mpsc::UnboundedReceiver<(RecipientId, Presence)>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.serve(&mut events).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "amqp node queue lost; binding again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One connection's life: Ok when the storage is gone, Err when the connection is.
    async fn serve(
        &self,
        events: &mut mpsc::UnboundedReceiver<(RecipientId, Presence)>,
    ) -> Result<()> {
        let connection = super::errors::connect(&self.url, self.timeout).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| broker_error(e, "channel.open"))?;
        declare_exchange(&channel, &self.prefix).await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .map_err(|e| broker_error(e, "queue.declare"))?;
        let queue = queue.name().as_str().to_owned();
        let present: Vec<RecipientId> = self.live.lock().iter().cloned().collect();
        for recipient in &present {
            self.bind(&channel, &queue, recipient, true).await?;
        }
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(e, "basic.consume"))?;
        // Wake-ups sent while the queue was gone are lost: every session here reads again.
        for recipient in &present {
            self.listeners.wake(recipient);
        }
        loop {
            tokio::select! {
                event = events.next() => {
                    let Some((recipient, presence)) = event else {
                        let _ = connection.close(200, "storage dropped".into()).await;
                        return Ok(());
                    };
                    let on = presence == Presence::Connected;
                    // The engine set `live` before sending; act on what holds now.
                    let live = self.live.lock().contains(&recipient);
                    if on == live {
                        self.bind(&channel, &queue, &recipient, on).await?;
                    }
                    if !live && self.release(&recipient).await {
                        // A session for the recipient on another node may have read while
                        // this node held these records, found none, and now waits: wake it.
                        // Not `mandatory`: this channel takes no confirms, and nobody would
                        // collect a return.
                        let wake = Wake {
                            node: self.id,
                            ping: false,
                            mandatory: false,
                        };
                        wake.publish(&channel, &self.prefix, &recipient).await?;
                    }
                }
                delivery = consumer.next() => {
                    let delivery = match delivery {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(e)) => return Err(broker_error(e, "wake-up consumer")),
                        None => return Err(Error::storage_msg(
                            crate::error::Retry::Yes,
                            "amqp: the wake-up consumer was cancelled",
                        )),
                    };
                    let headers = delivery.properties.headers().as_ref();
                    let ping = headers.is_some_and(|h| h.inner().contains_key(PING));
                    let own = headers
                        .and_then(|h| match h.inner().get(NODE) {
                            Some(AMQPValue::LongLongInt(id)) => Some(*id as u64 == self.id),
                            _ => None,
                        })
                        .unwrap_or(false);
                    if !ping && !own && let Ok(recipient) = RecipientId::new(&delivery.data) {
                        self.listeners.wake(&recipient);
                    }
                }
            }
        }
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        recipient: &RecipientId,
        on: bool,
    ) -> Result<()> {
        let key = queue_name(&self.prefix, recipient).name;
        let exchange = exchange(&self.prefix);
        if on {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker_error(e, "queue.bind"))
        } else {
            channel
                .queue_unbind(
                    queue.into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker_error(e, "queue.unbind"))
        }
    }

    /// The session ended: hands back what this node held for the recipient, so another node
    /// can deliver it at once (unless a read is running, which means a new session here).
    /// True if it held anything.
    async fn release(&self, recipient: &RecipientId) -> bool {
        let slot = self.holders.lock().get(recipient).cloned();
        let Some(slot) = slot else {
            return false;
        };
        let Ok(mut guard) = slot.try_lock() else {
            return false;
        };
        match guard.take() {
            Some(holder) => holder.release().await,
            None => false,
        }
    }
}

/// A wake-up to publish for a recipient.
struct Wake {
    /// The sending node, which ignores its own wake-ups.
    node: u64,
    /// Only asks whether any node is bound; wakes none.
    ping: bool,
    /// Returned when no node is bound, so a confirm-mode channel's confirmation says so.
    mandatory: bool,
}

impl Wake {
    async fn publish(
        &self,
        channel: &Channel,
        prefix: &str,
        recipient: &RecipientId,
    ) -> Result<PublisherConfirm> {
        let mut headers = FieldTable::default();
        headers.insert(NODE.into(), AMQPValue::LongLongInt(self.node as i64));
        if self.ping {
            headers.insert(PING.into(), AMQPValue::Boolean(true));
        }
        channel
            .basic_publish(
                exchange(prefix).as_str().into(),
                queue_name(prefix, recipient).name.as_str().into(),
                BasicPublishOptions {
                    mandatory: self.mandatory,
                    immediate: false,
                },
                recipient.as_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await
            .map_err(|e| broker_error(e, "basic.publish wake-up"))
    }
}

/// Whether a confirmed wake-up reached a node (a return means no node is bound).
pub(super) fn routed(confirmation: Confirmation) -> Result<bool> {
    match confirmation {
        Confirmation::Ack(None) => Ok(true),
        Confirmation::Ack(Some(_)) => Ok(false),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(Error::storage_msg(
            crate::error::Retry::Yes,
            "amqp: the broker refused a wake-up",
        )),
    }
}

impl AmqpStorage {
    /// Publishes a wake-up (or a ping) for `recipient` on `channel` (the storage's publish
    /// channel, locked by the caller); its confirmation says whether a node is bound.
    pub(super) async fn publish_wake(
        &self,
        channel: &Channel,
        recipient: &RecipientId,
        ping: bool,
    ) -> Result<PublisherConfirm> {
        let wake = Wake {
            node: self.node.id,
            ping,
            mandatory: true,
        };
        wake.publish(channel, &self.options.prefix, recipient).await
    }

    /// Publishes a wake-up (or a ping); Some(routed) once confirmed, None when not waited for.
    async fn wake(&self, recipient: &RecipientId, ping: bool, wait: bool) -> Result<Option<bool>> {
        let (link, publisher) = self.publisher().await?;
        let confirm = self
            .publish_wake(&publisher.channel, recipient, ping)
            .await?;
        if !wait {
            // The channel goes back to the pool once confirmed, so its return (if any) cannot
            // reach the next caller's confirmations.
            tokio::spawn(async move {
                if confirm.await.is_ok() {
                    link.publishers.lock().push(publisher.channel.clone());
                }
                drop(publisher);
            });
            return Ok(None);
        }
        let confirmation = confirm
            .await
            .map_err(|e| broker_error(e, "wake-up confirm"))?;
        link.publishers.lock().push(publisher.channel.clone());
        routed(confirmation).map(Some)
    }
}

#[async_trait]
impl Coordination for AmqpStorage {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        Box::pin(self.node.listeners.subscribe())
    }

    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        {
            let mut live = self.node.live.lock();
            match presence {
                Presence::Connected => live.insert(recipient.clone()),
                Presence::Disconnected => live.remove(recipient),
            };
        }
        let _ = self
            .node
            .events
            .unbounded_send((recipient.clone(), presence));
    }

    async fn announce(&self, recipient: &RecipientId) -> Result<bool> {
        let here = self.node.live.lock().contains(recipient);
        // Held here: wake the others without waiting; the engine delivers here anyway.
        Ok(self.wake(recipient, false, !here).await?.unwrap_or(false))
    }

    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool> {
        if self.node.live.lock().contains(recipient) {
            return Ok(false);
        }
        Ok(self.wake(recipient, true, true).await?.unwrap_or(false))
    }
}
