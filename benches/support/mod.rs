//! Shared by the benches: a client that acks everything and leaves once caught up.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use offline_queue::{
    BatchLimit, Limits, OfflineQueue, Outbound, RecipientId, SessionHandle, Storage, Transport,
    TransportClosed,
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

/// The queue every bench measures: room for any backlog, batches of 100 up to 1 MiB.
pub fn queue(storage: Arc<dyn Storage>) -> OfflineQueue {
    OfflineQueue::builder()
        .storage(storage)
        .limits(Limits {
            max_messages_per_recipient: 1_000_000,
            ..Limits::default()
        })
        .batch(BatchLimit {
            max_messages: 100,
            max_bytes: 1 << 20,
        })
        .build()
        .unwrap()
}

/// The quota the engine's default `Limits` give a storage call, with room for any backlog
/// (a million messages, 1 GiB per recipient), for benches that call a `Storage` directly.
#[allow(dead_code)] // Not every bench calls a storage directly.
pub fn roomy_quota() -> offline_queue::Quota {
    let defaults = Limits::default();
    offline_queue::Quota {
        max_messages: 1_000_000,
        max_bytes: 1 << 30,
        overflow: defaults.overflow,
        max_total_bytes: None,
        dedup_window: defaults.dedup_window,
        idle_timeout: defaults.idle_recipient_timeout,
    }
}
