//! Shared by the benches: a client that acks everything and leaves once caught up.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use offline_queue::{
    OfflineQueue, Outbound, RecipientId, SessionHandle, Transport, TransportClosed,
};

/// Acks each batch as it arrives (through its position) and closes once caught up, so a
/// session's driver runs to completion on its own.
pub struct AckingClient(Arc<OnceLock<SessionHandle>>);

#[async_trait]
impl Transport for AckingClient {
    async fn send(&self, item: Outbound) -> Result<(), TransportClosed> {
        let handle = self.0.get().expect("handle set before run");
        match item {
            Outbound::Batch(batch) => handle.ack_through(batch.position),
            Outbound::CaughtUp => handle.close(),
            _ => {}
        }
        Ok(())
    }
}

/// Connects `who`, delivers and acks everything pending, and returns once caught up.
pub async fn drain(queue: &OfflineQueue, who: &RecipientId) {
    let handle = Arc::new(OnceLock::new());
    let session = queue.connect(who.clone(), AckingClient(handle.clone()));
    handle.set(session.handle()).ok();
    session.run().await.unwrap();
}
