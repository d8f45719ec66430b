//! Offline recipients cost storage, not the engine's memory: the heap the whole process holds
//! (engine, `RedbStorage` with its page cache capped at 4 MiB, everything) after one message
//! (256 B) is sent through `OfflineQueue` to each of 10,000, 100,000 and 1,000,000 offline
//! recipients, once the push-coalescing period has passed. Counted by a counting allocator
//! (bytes requested, net of frees), with the process RSS beside it. Fails unless the heap
//! held is flat: the largest size holds at most 8 MiB more than the smallest.
//!
//! `cargo bench --bench offline_memory` (a minute or two; `OFFLINE_QUEUE_MEMORY_SIZES=a,b,c`
//! for other sizes).

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::executor::block_on;
use offline_queue::{
    Envelope, ManualClock, NotifyPolicy, OfflineQueue, RecipientId, RedbStorage, Timestamp,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CONCURRENCY: usize = 256;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Heap bytes held, and RSS in KiB, with `recipients` offline recipients holding a message.
fn held_with(recipients: usize) -> (i64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::new(GLOBAL);
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let storage = RedbStorage::options()
        .cache_bytes(4 << 20)
        .open(dir.path().join("offline.redb"))
        .unwrap();
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let started = Instant::now();
    block_on(
        futures::stream::iter(0..recipients)
            .map(|r| {
                let queue = queue.clone();
                async move {
                    let who = RecipientId::new(format!("device-{r:08}")).unwrap();
                    queue
                        .send(Envelope::new(who, vec![7u8; 256]))
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<()>(),
    );
    // Past every push-coalescing period: what remains is what offline recipients cost.
    let policy = NotifyPolicy::default();
    clock.advance(policy.urgent_cooldown.max(policy.background_interval) + Duration::from_secs(1));
    block_on(queue.maintain(10_000)).unwrap();
    let stats = region.change();
    let held = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64;
    let rss = rss_kib();
    println!(
        "{recipients:>9} offline recipients: heap held {:>7.2} MiB, RSS {:>7.1} MiB (sent in {:.1} s)",
        held as f64 / (1 << 20) as f64,
        rss as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(queue.nudge_state_len(), 0);
    let probe = RecipientId::new(format!("device-{:08}", recipients / 2)).unwrap();
    assert_eq!(block_on(queue.stats(&probe)).unwrap().messages, 1);
    (held, rss)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let sizes: Vec<usize> = std::env::var("OFFLINE_QUEUE_MEMORY_SIZES").map_or_else(
        |_| vec![10_000, 100_000, 1_000_000],
        |sizes| {
            sizes
                .split(',')
                .map(|s| s.trim().parse().unwrap())
                .collect()
        },
    );
    let held: Vec<i64> = sizes.iter().map(|&n| held_with(n).0).collect();
    let spread = held.iter().max().unwrap() - held.iter().min().unwrap();
    println!(
        "heap held spread over {sizes:?}: {:.2} MiB (at most 8 MiB: flat)",
        spread as f64 / (1 << 20) as f64
    );
    assert!(
        spread <= 8 << 20,
        "the engine's memory grows with offline recipients"
    );
}
