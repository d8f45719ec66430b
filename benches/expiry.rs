//! Purge cost: removing 1,000 expired records among N stored, for N = 10k, 100k and 1M.
//! Flat across N is the goal (the expiry index makes the cost follow what is removed).
//!
//! `cargo bench --bench expiry`

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::executor::block_on;
use offline_queue::storage::NewRecord;
use offline_queue::{MemoryStorage, MessageId, Quota, RecipientId, Storage, Timestamp};

const EXPIRING: usize = 1_000;
const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn record(expires_at: Timestamp) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: T0,
        expires_at: Some(expires_at),
        body: vec![0; 64],
    }
}

fn bench(c: &mut Criterion) {
    let soon = T0.saturating_add(Duration::from_secs(1));
    let later = T0.saturating_add(Duration::from_secs(86_400));
    let purge_at = T0.saturating_add(Duration::from_secs(2));
    let mut group = c.benchmark_group("expiry");
    group.sample_size(20);
    for stored in [10_000usize, 100_000, 1_000_000] {
        // N long-lived records spread evenly over 10,000 recipients (1, 10 or 100 each).
        let storage = Arc::new(MemoryStorage::new());
        let recipients: Vec<RecipientId> = (0..10_000)
            .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
            .collect();
        block_on(async {
            for i in 0..stored {
                let who = &recipients[i % recipients.len()];
                storage
                    .append(who, vec![record(later)], &Quota::UNLIMITED, T0)
                    .await
                    .unwrap();
            }
        });
        group.bench_with_input(BenchmarkId::new("purge_1000", stored), &stored, |b, _| {
            b.iter_batched(
                || {
                    // 1,000 records due, spread over recipients that also hold long-lived ones.
                    block_on(async {
                        for i in 0..EXPIRING {
                            let who = &recipients[(i * 7) % recipients.len()];
                            storage
                                .append(who, vec![record(soon)], &Quota::UNLIMITED, T0)
                                .await
                                .unwrap();
                        }
                    })
                },
                |()| {
                    let outcome = block_on(storage.purge(purge_at, None, EXPIRING)).unwrap();
                    assert_eq!(outcome.expired, EXPIRING as u64);
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
