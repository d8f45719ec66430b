//! [`Coordination`]: what engine instances sharing one storage tell each other. Wake-ups ("R
//! has new messages"), presence ("this node holds a session for R") and "is R live on another
//! node" are about nodes, not about where messages wait, so they are a trait of their own, set
//! on the builder: a host may pair any shared storage with any coordination.
//!
//! One engine on its own needs none: [`SingleNode`], the default, does nothing.
//! [`RedisStorage`](crate::RedisStorage) is both a storage and a coordination (presence marks
//! in Redis, wake-ups over sharded pub/sub); set it with
//! [`OfflineQueueBuilder::shared_storage`](crate::OfflineQueueBuilder::shared_storage), and
//! its appends find and wake the other nodes in the same round trip.
//! [`NatsCoordination`](crate::NatsCoordination) (feature `nats`) pairs with any shared
//! storage: presence as subscriptions on core NATS, wake-ups as requests.

#[cfg(feature = "nats")]
pub(crate) mod nats;

use std::sync::Arc;

use async_trait::async_trait;
use futures::channel::mpsc;
use futures::stream::BoxStream;
use parking_lot::Mutex;

use crate::error::Result;
use crate::message::RecipientId;

/// Whether this node holds a session for a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Presence {
    /// A session opened on this node.
    Connected,
    /// This node's session ended (or was displaced by a newer one on this node).
    Disconnected,
}

/// How engine instances (nodes) sharing one storage find and wake each other.
///
/// Object-safe: the engine holds an `Arc<dyn Coordination>`. Every method has a meaning on one
/// node ([`SingleNode`]), so the engine never asks whether it runs alone.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// A new stream of recipients that got messages through another node, whose session on
    /// this node should read again. Each call returns its own stream, fed from then on; the
    /// stream ends when the coordination is dropped. [`OfflineQueue::wakeup_listener`] runs
    /// one.
    ///
    /// A coordination that may have missed wake-ups (its subscription was lost and made again)
    /// yields every recipient it holds a session for, so each reads again.
    ///
    /// [`OfflineQueue::wakeup_listener`]: crate::OfflineQueue::wakeup_listener
    fn wakeups(&self) -> BoxStream<'static, RecipientId>;

    /// This node now holds, or no longer holds, a session for `recipient`. Called by the
    /// engine on connect and when a session ends, in the order they happened (under the
    /// engine's session lock): must not block, nor call back into the engine (queue the
    /// change for a task of your own).
    fn presence(&self, recipient: &RecipientId, presence: Presence);

    /// `recipient` got new messages: wakes the nodes that hold a session for it. Returns true
    /// if a node other than this one holds one (the engine then sends no push). When this node
    /// holds a session for `recipient` itself, a coordination may wake the others without
    /// waiting for their answers and return false: the engine delivers here and sends no push
    /// either way.
    ///
    /// # Errors
    /// A coordination error; the engine logs it and treats the recipient as offline (the
    /// message is stored either way).
    async fn announce(&self, recipient: &RecipientId) -> Result<bool>;

    /// Whether a node other than this one holds a session for `recipient` now, so this one
    /// holds back a delayed push. The engine asks only about recipients this node holds no
    /// session for; for one it holds, a coordination may answer false without asking.
    ///
    /// # Errors
    /// A coordination error.
    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool>;
}

/// One engine instance on its own: no other node to wake or ask. The builder's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleNode;

#[async_trait]
impl Coordination for SingleNode {
    /// An empty stream, ended at once.
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        Box::pin(futures::stream::empty())
    }

    fn presence(&self, _recipient: &RecipientId, _presence: Presence) {}

    async fn announce(&self, _recipient: &RecipientId) -> Result<bool> {
        Ok(false)
    }

    async fn live_elsewhere(&self, _recipient: &RecipientId) -> Result<bool> {
        Ok(false)
    }
}

/// Every wake-up stream a coordination handed out ([`Coordination::wakeups`]): each gets
/// every wake-up from its creation on. A stream dropped by its reader is forgotten at the next
/// wake-up.
#[cfg_attr(
    not(any(
        feature = "redis",
        feature = "postgres",
        feature = "nats",
        feature = "amqp"
    )),
    allow(dead_code)
)]
#[derive(Clone, Default)]
pub(crate) struct Listeners(Arc<Mutex<Vec<mpsc::UnboundedSender<RecipientId>>>>);

#[cfg_attr(
    not(any(
        feature = "redis",
        feature = "postgres",
        feature = "nats",
        feature = "amqp"
    )),
    allow(dead_code)
)]
impl Listeners {
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "amqp")),
        allow(dead_code)
    )]
    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<RecipientId> {
        self.subscribe_with(None)
    }

    /// As [`Listeners::subscribe`], the stream starting with `first`.
    pub(crate) fn subscribe_with(
        &self,
        first: impl IntoIterator<Item = RecipientId>,
    ) -> mpsc::UnboundedReceiver<RecipientId> {
        let (sender, receiver) = mpsc::unbounded();
        for recipient in first {
            let _ = sender.unbounded_send(recipient);
        }
        self.0.lock().push(sender);
        receiver
    }

    pub(crate) fn wake(&self, recipient: &RecipientId) {
        self.0
            .lock()
            .retain(|sender| sender.unbounded_send(recipient.clone()).is_ok());
    }
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("streams", &self.0.lock().len())
            .finish()
    }
}
