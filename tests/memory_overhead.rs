//! Memory held per stored message by the engine plus `MemoryStorage`, beyond the payload,
//! counted by a wrapping allocator (bytes requested, net of frees; the allocator's own
//! per-block overhead is not included). The target is at most 96 bytes per message.
//!
//! One test in this binary, so no other test's allocations are counted.

use std::alloc::System;
use std::sync::Arc;

use offline_queue::{Envelope, MemoryStorage, OfflineQueue, RecipientId};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PAYLOAD: usize = 100;

/// Net bytes held after storing `per_recipient` messages for each of `recipients`, divided by
/// the message count, minus the payload.
fn overhead_per_message(recipients: usize, per_recipient: usize) -> f64 {
    let queue = OfflineQueue::builder()
        .storage(Arc::new(MemoryStorage::new()))
        .build()
        .unwrap();
    let ids: Vec<RecipientId> = (0..recipients)
        .map(|i| RecipientId::new(format!("user-{i:08}")).unwrap())
        .collect();
    let payload = vec![7u8; PAYLOAD];
    // Warm up lazily allocated statics (id salt, tracing callsites) outside the region.
    futures::executor::block_on(queue.send(Envelope::new(
        RecipientId::new("warm").unwrap(),
        payload.clone(),
    )))
    .unwrap();
    let region = Region::new(GLOBAL);
    futures::executor::block_on(async {
        for _ in 0..per_recipient {
            for id in &ids {
                queue
                    .send(Envelope::new(id.clone(), payload.clone()))
                    .await
                    .unwrap();
            }
        }
    });
    let stats = region.change();
    // stats_alloc already folds reallocations into these two.
    let held = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    let messages = (recipients * per_recipient) as f64;
    held / messages - PAYLOAD as f64
}

#[test]
fn memory_per_stored_message_is_at_most_96_bytes_beyond_the_payload() {
    let deep = overhead_per_message(100, 1_000);
    let wide = overhead_per_message(10_000, 10);
    println!(
        "overhead per message beyond the {PAYLOAD}-byte payload: {deep:.1} B (100 recipients x 1000), {wide:.1} B (10,000 recipients x 10)"
    );
    assert!(deep <= 96.0, "deep queues: {deep:.1} bytes per message");
    // Shallow queues also carry each recipient's queue state, and a deque's spare capacity
    // weighs more per record: a 10-record queue holds room for 16 records of 80 bytes.
    assert!(
        wide <= 96.0 + 96.0,
        "wide: {wide:.1} bytes per message incl. per-recipient state"
    );
}
