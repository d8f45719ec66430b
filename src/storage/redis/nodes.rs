//! Several engines on one Redis: each is a node with its own id. Presence marks (which nodes
//! hold a session for a recipient), wake-ups over sharded pub/sub to each node's own channel,
//! the node's background task, and the [`Coordination`] impl built on them.

use std::collections::HashSet;

use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc as fmpsc;
use futures::stream::BoxStream;
use redis::{PushInfo, PushKind, Value};

use super::errors::redis_error;
use super::{RedisStorage, Shared, keys};
use crate::coordination::{Coordination, Listeners, Presence};
use crate::error::Result;
use crate::message::RecipientId;

/// What the node's background task acts on.
pub(super) enum NodeEvent {
    /// This node now holds (or no longer holds) a session for the recipient.
    Presence(RecipientId, Presence),
    /// The server dropped the wake-up subscription (a slot moved): subscribe again.
    Resubscribe,
    /// The wake-up subscription was (re)made: wake-ups may have been missed meanwhile, so
    /// every local session reads again.
    WakeAll,
}

/// The channels between the connection's push sender, the node task and the engine.
pub(super) struct Plumbing {
    pub(super) events: fmpsc::UnboundedSender<NodeEvent>,
    pub(super) event_rx: fmpsc::UnboundedReceiver<NodeEvent>,
    pub(super) listeners: Listeners,
}

impl Plumbing {
    pub(super) fn new(prefix: &str, node: &str) -> (WakeupSender, Self) {
        let (events, event_rx) = fmpsc::unbounded();
        let listeners = Listeners::default();
        let sender = WakeupSender {
            channel: keys::wake_channel(prefix, node).into_bytes(),
            listeners: listeners.clone(),
            events: events.clone(),
        };
        (
            sender,
            Self {
                events,
                event_rx,
                listeners,
            },
        )
    }
}

/// Turns the connection's pushes on this node's channel into recipients to wake, and tells
/// the node task when the subscription is lost or made again.
pub(super) struct WakeupSender {
    channel: Vec<u8>,
    listeners: Listeners,
    events: fmpsc::UnboundedSender<NodeEvent>,
}

impl redis::aio::AsyncPushSender for WakeupSender {
    fn send(&self, info: PushInfo) -> std::result::Result<(), redis::aio::SendError> {
        let ours = matches!(info.data.first(), Some(Value::BulkString(c)) if *c == self.channel);
        // A closed channel means the storage is gone: nothing to wake or resubscribe.
        match info.kind {
            PushKind::SMessage | PushKind::Message if ours => {
                if let Some(Value::BulkString(payload)) = info.data.get(1)
                    && let Some(recipient) = keys::from_hex(payload)
                {
                    self.listeners.wake(&recipient);
                }
            }
            PushKind::SUnsubscribe if ours => {
                let _ = self.events.unbounded_send(NodeEvent::Resubscribe);
            }
            PushKind::SSubscribe if ours => {
                let _ = self.events.unbounded_send(NodeEvent::WakeAll);
            }
            _ => {}
        }
        Ok(())
    }
}

impl RedisStorage {
    /// The nodes holding a session for `recipient` now, by their presence marks (this node
    /// included): what an append consults before it pushes.
    ///
    /// # Errors
    /// A storage error.
    pub async fn sessions_on(&self, recipient: &RecipientId) -> Result<Vec<String>> {
        let (_, keys) = self.keys(recipient);
        let ((seconds, micros), marks): ((u64, u64), Vec<(String, u64)>) = redis::pipe()
            .cmd("TIME")
            .cmd("HGETALL")
            .arg(&keys[6])
            .query_async(&mut self.connection())
            .await
            .map_err(redis_error)?;
        let now = seconds * 1000 + micros / 1000;
        Ok(marks
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(node, _)| node)
            .collect())
    }

    /// The nodes other than this one holding a session for `recipient` now.
    async fn other_nodes(&self, recipient: &RecipientId) -> Result<Vec<String>> {
        let mut nodes = self.sessions_on(recipient).await?;
        nodes.retain(|node| *node != self.shared.node);
        Ok(nodes)
    }

    /// Publishes a wake-up for the recipient (named by its hex) to each of these nodes'
    /// channels. A failed publish is logged: the message is stored all the same, and that
    /// node's session finds it on its next read.
    pub(super) async fn wake_nodes(&self, recipient: &RecipientId, hex: &str, nodes: &[String]) {
        // One command per channel: on a cluster each node's channel has its own slot.
        let wakes = nodes.iter().map(|node| {
            let mut connection = self.connection();
            let channel = keys::wake_channel(&self.shared.options.prefix, node);
            async move {
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(hex)
                    .exec_async(&mut connection)
                    .await
            }
        });
        for result in futures::future::join_all(wakes).await {
            if let Err(error) = result {
                tracing::warn!(%recipient, %error, "wake-up publish failed");
            }
        }
    }
}

/// The node's background task: writes presence marks (each change at once, and all of them
/// again every `presence_ttl / 3`, so a dead node's marks outlive it by at most
/// `presence_ttl`), keeps the wake-up subscription, and wakes every local session after the
/// subscription was made again. Ends with the storage.
pub(super) async fn run_node(
    shared: std::sync::Weak<Shared>,
    mut events: fmpsc::UnboundedReceiver<NodeEvent>,
) {
    let Some(ttl) = shared.upgrade().map(|s| s.options.presence_ttl) else {
        return;
    };
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut live: HashSet<RecipientId> = HashSet::new();
    let mut refresh = tokio::time::interval(ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let marks: Vec<(RecipientId, bool)> = tokio::select! {
            // Changes first: a connect or disconnect must not wait behind a refresh.
            biased;
            event = events.next() => match event {
                Some(NodeEvent::Presence(recipient, presence)) => {
                    let on = presence == Presence::Connected;
                    if on {
                        live.insert(recipient.clone());
                    } else {
                        live.remove(&recipient);
                    }
                    vec![(recipient, on)]
                }
                Some(NodeEvent::Resubscribe) => {
                    let Some(shared) = shared.upgrade() else { return };
                    let channel = keys::wake_channel(&shared.options.prefix, &shared.node);
                    let mut connection = shared.connection.clone();
                    let subscribed = redis::cmd("SSUBSCRIBE")
                        .arg(channel)
                        .exec_async(&mut connection)
                        .await;
                    if let Err(error) = subscribed {
                        tracing::warn!(%error, "wake-up subscription lost");
                    }
                    Vec::new()
                }
                Some(NodeEvent::WakeAll) => {
                    let Some(shared) = shared.upgrade() else { return };
                    for recipient in &live {
                        shared.listeners.wake(recipient);
                    }
                    Vec::new()
                }
                None => return,
            },
            _ = refresh.tick() => live.iter().map(|r| (r.clone(), true)).collect(),
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let storage = RedisStorage { shared };
        // Concurrently, 64 at a time: a refresh of many recipients stays well inside ttl / 3.
        for chunk in marks.chunks(64) {
            let writes = chunk.iter().map(|(recipient, on)| {
                let storage = storage.clone();
                async move {
                    let (_, keys) = storage.keys(recipient);
                    let result: redis::RedisResult<i64> = storage
                        .shared
                        .steps
                        .presence
                        .key(&keys[..])
                        .arg(&storage.shared.node)
                        .arg(ttl_ms)
                        .arg(u8::from(*on))
                        .invoke_async(&mut storage.connection())
                        .await;
                    if let Err(error) = result {
                        // The next refresh writes it again; a lost "off" expires by itself.
                        tracing::warn!(%recipient, %error, "presence update failed");
                    }
                }
            });
            futures::future::join_all(writes).await;
        }
    }
}

/// Presence marks in the recipient's presence hash, wake-ups over sharded pub/sub to each
/// node's own channel. Set it with
/// [`OfflineQueueBuilder::shared_storage`](crate::OfflineQueueBuilder::shared_storage): an
/// append then reads the marks and wakes the other nodes itself, in the same step.
#[async_trait]
impl Coordination for RedisStorage {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        self.shared.listeners.subscribe().boxed()
    }

    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        // The task is gone only when the storage is: nothing left to tell.
        let _ = self
            .shared
            .events
            .unbounded_send(NodeEvent::Presence(recipient.clone(), presence));
    }

    async fn announce(&self, recipient: &RecipientId) -> Result<bool> {
        let others = self.other_nodes(recipient).await?;
        self.wake_nodes(recipient, &keys::hex(recipient), &others)
            .await;
        Ok(!others.is_empty())
    }

    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool> {
        Ok(!self.other_nodes(recipient).await?.is_empty())
    }
}
