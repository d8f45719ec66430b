//! [`Transport`]: how the engine hands things to one connected recipient. The host implements
//! it over its own connection (a WebSocket sink, a gRPC stream); [`channel_transport`] covers
//! hosts that prefer to pull from a channel.

use async_trait::async_trait;
use futures::SinkExt;
use futures::channel::mpsc;

use crate::message::{Batch, Ephemeral};

/// What a session hands to its transport.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outbound {
    /// Stored messages, in seq order, possibly with a gap report. The client acks them through
    /// the [`SessionHandle`](crate::SessionHandle).
    Batch(Batch),
    /// Sent once per session, after the backlog present at connect was handed over: the client
    /// has caught up and may show its inbox.
    CaughtUp,
    /// A live-only payload (typing, presence); not acked.
    Ephemeral(Ephemeral),
}

/// The connection is gone; the session ends and unacked messages stay stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("transport closed: {0}")]
pub struct TransportClosed(pub String);

/// Hands [`Outbound`] items to one connected recipient.
///
/// `send` should return once the item is handed to the connection (written to the socket or
/// queued in a bounded buffer), not wait for the client's ack: acks return through the session
/// handle so many batches can be in flight. Awaiting in `send` is how a slow client applies
/// backpressure. An error ends the session.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Hands `item` to the connection.
    async fn send(&self, item: Outbound) -> Result<(), TransportClosed>;
}

/// A [`Transport`] that puts items on a bounded channel; the host reads the other end.
#[derive(Clone, Debug)]
pub struct ChannelTransport(mpsc::Sender<Outbound>);

/// A channel transport with room for `buffer` items, and the receiving end.
pub fn channel_transport(buffer: usize) -> (ChannelTransport, mpsc::Receiver<Outbound>) {
    let (tx, rx) = mpsc::channel(buffer);
    (ChannelTransport(tx), rx)
}

#[async_trait]
impl Transport for ChannelTransport {
    async fn send(&self, item: Outbound) -> Result<(), TransportClosed> {
        self.0
            .clone()
            .send(item)
            .await
            .map_err(|_| TransportClosed("receiver dropped".into()))
    }
}
