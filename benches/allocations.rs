//! Allocator calls per message: the engine bench's workload (`benches/engine.rs`) with a
//! counting global allocator, engine and baseline side by side. Counts, not times: they are
//! the same on every run and every machine.
//!
//! `cargo bench --bench allocations`

mod support;
#[path = "support/engine_workload.rs"]
mod workload;

use std::alloc::System;

use futures::executor::block_on;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use workload::{
    Baseline, MESSAGES, PAYLOAD, baseline_drain, baseline_send, engine_drain, engine_send, ids,
    queue,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations, frees and reallocations per message while `phase` runs.
fn per_message(phase: impl FnOnce()) -> (f64, f64, f64) {
    let region = Region::new(GLOBAL);
    phase();
    let stats = region.change();
    let per = |n: usize| n as f64 / MESSAGES as f64;
    // stats_alloc counts a reallocation in neither allocations nor frees.
    (
        per(stats.allocations),
        per(stats.deallocations),
        per(stats.reallocations),
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it once, as a smoke test.
    let payload = vec![7u8; PAYLOAD];
    let ids = ids();
    // Warm: the first round also builds the queue's shards and maps.
    let q = queue();
    block_on(engine_send(&q, &ids, &payload));
    block_on(engine_drain(&q, &ids));

    let engine_send_counts = per_message(|| block_on(engine_send(&q, &ids, &payload)));
    let engine_drain_counts = per_message(|| block_on(engine_drain(&q, &ids)));
    let store = Baseline::default();
    baseline_send(&store, &payload);
    assert_eq!(baseline_drain(&store), MESSAGES);
    let baseline_send_counts = per_message(|| baseline_send(&store, &payload));
    let baseline_drain_counts = per_message(|| assert_eq!(baseline_drain(&store), MESSAGES));

    let value = workload::typed_payload();
    let bob = offline_queue::RecipientId::new("bob").unwrap();
    let encode_counts = per_message(|| {
        for _ in 0..MESSAGES {
            std::hint::black_box(workload::codec_encode(&bob, &value));
        }
    });
    let bincode_counts = per_message(|| {
        for _ in 0..MESSAGES {
            std::hint::black_box(workload::bincode_encode(&bob, &value));
        }
    });

    println!("allocator calls per message ({MESSAGES} messages of {PAYLOAD} B, warm):");
    println!("| | allocations | frees | reallocations |");
    println!("|---|---|---|---|");
    for (what, (alloc, free, realloc)) in [
        ("engine send", engine_send_counts),
        ("baseline send", baseline_send_counts),
        ("engine deliver + ack", engine_drain_counts),
        ("baseline drain", baseline_drain_counts),
        ("Envelope::encode of a typed payload", encode_counts),
        ("bincode's encode_to_vec of the same", bincode_counts),
    ] {
        println!("| {what} | {alloc:.2} | {free:.2} | {realloc:.2} |");
    }
}
