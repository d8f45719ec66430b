//! The engine bench's workload, shared with the allocation count (`benches/allocations.rs`):
//! 100 recipients × 100 messages of 256 B through the engine over `MemoryStorage`, and the
//! same through a bare `VecDeque` per recipient behind one mutex (the baseline).

#![allow(dead_code)] // Each bench uses its part.

use std::collections::{HashMap, VecDeque};

use offline_queue::{Envelope, OfflineQueue, RecipientId};
use parking_lot::Mutex;

use super::support;

pub const RECIPIENTS: usize = 100;
pub const PER_RECIPIENT: usize = 100;
pub const MESSAGES: usize = RECIPIENTS * PER_RECIPIENT;
pub const PAYLOAD: usize = 256;

pub fn queue() -> OfflineQueue {
    support::queue(std::sync::Arc::new(offline_queue::MemoryStorage::new()))
}

pub fn ids() -> Vec<RecipientId> {
    (0..RECIPIENTS)
        .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
        .collect()
}

pub async fn engine_send(queue: &OfflineQueue, ids: &[RecipientId], payload: &[u8]) {
    for _ in 0..PER_RECIPIENT {
        for id in ids {
            queue
                .send(Envelope::new(id.clone(), payload.to_vec()))
                .await
                .unwrap();
        }
    }
}

pub async fn engine_drain(queue: &OfflineQueue, ids: &[RecipientId]) {
    for id in ids {
        support::drain(queue, id).await;
    }
}

pub type Baseline = Mutex<HashMap<usize, VecDeque<(u64, Vec<u8>)>>>;

pub fn baseline_send(store: &Baseline, payload: &[u8]) {
    let mut seq = 0;
    for _ in 0..PER_RECIPIENT {
        for r in 0..RECIPIENTS {
            seq += 1;
            store
                .lock()
                .entry(r)
                .or_default()
                .push_back((seq, payload.to_vec()));
        }
    }
}

pub fn baseline_drain(store: &Baseline) -> usize {
    let mut delivered = 0;
    for r in 0..RECIPIENTS {
        loop {
            let batch: Vec<(u64, Vec<u8>)> = {
                let mut store = store.lock();
                let queue = store.entry(r).or_default();
                let n = queue.len().min(100);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            delivered += std::hint::black_box(batch).len();
        }
    }
    delivered
}

/// A typed payload as a chat server sends one: who from, a text of [`PAYLOAD`] bytes, when.
#[derive(serde::Serialize)]
pub struct TypedPayload {
    pub from: String,
    pub text: String,
    pub sent_at: u64,
}

pub fn typed_payload() -> TypedPayload {
    TypedPayload {
        from: "alice".into(),
        text: "x".repeat(PAYLOAD),
        sent_at: 1_796_600_000_000,
    }
}

/// [`Envelope::encode`]: the crate's codec.
pub fn codec_encode(recipient: &RecipientId, value: &TypedPayload) -> Envelope {
    Envelope::encode(recipient.clone(), value).unwrap()
}

/// The baseline: bincode's own `encode_to_vec`, with the codec's configuration.
pub fn bincode_encode(recipient: &RecipientId, value: &TypedPayload) -> Envelope {
    let config = bincode::config::standard().with_limit::<{ 16 << 20 }>();
    Envelope::new(
        recipient.clone(),
        bincode::serde::encode_to_vec(value, config).unwrap(),
    )
}
