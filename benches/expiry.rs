//! Purge cost: removing 1,000 expired records among N stored, for N = 10k, 100k and 1M, on
//! `MemoryStorage`, on `RedbStorage` (each purge one durable commit) and, with the `redis`
//! feature and `OFFLINE_QUEUE_REDIS_URL` set, on `RedisStorage` (under a key prefix of its own,
//! every key of which is deleted afterwards). Flat across N is the goal (an expiry index makes the cost follow what is
//! removed, not what is stored).
//!
//! `cargo bench --bench expiry`, or with Redis:
//! `OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ cargo bench --features redis --bench expiry`

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use offline_queue::storage::NewRecord;
use offline_queue::{
    MemoryStorage, MessageId, Quota, RecipientId, RedbStorage, Storage, Timestamp,
};

const EXPIRING: usize = 1_000;

/// Runs `future` to its end: on a tokio runtime when Redis may be in use (its client needs
/// one), else on the calling thread.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    #[cfg(feature = "redis")]
    {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .block_on(future)
    }
    #[cfg(not(feature = "redis"))]
    futures::executor::block_on(future)
}

/// The backends to measure: memory and redb always, Redis when its URL is set.
fn backends() -> Vec<&'static str> {
    let mut backends = vec!["memory", "redb"];
    if cfg!(feature = "redis") {
        match std::env::var("OFFLINE_QUEUE_REDIS_URL") {
            Ok(_) => backends.push("redis"),
            Err(_) => eprintln!("expiry on Redis skipped: OFFLINE_QUEUE_REDIS_URL is not set"),
        }
    }
    backends
}

/// A fresh storage of `backend` for the `stored` case, and the Redis key prefix it writes
/// under (for [`remove_keys`]).
fn open(backend: &str, stored: usize, dir: &std::path::Path) -> (Arc<dyn Storage>, String) {
    match backend {
        "memory" => (Arc::new(MemoryStorage::new()), String::new()),
        "redb" => (
            Arc::new(RedbStorage::open(dir.join(format!("expiry-{stored}.redb"))).unwrap()),
            String::new(),
        ),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = std::env::var("OFFLINE_QUEUE_REDIS_URL").unwrap();
            let prefix = format!("oq-bench-expiry-{}", MessageId::generate());
            let storage = block_on(
                offline_queue::RedisStorage::options()
                    .prefix(prefix.clone())
                    .connect(&url),
            )
            .unwrap();
            (Arc::new(storage), prefix)
        }
        _ => unreachable!("unknown backend {backend}"),
    }
}

/// Deletes every Redis key under `prefix`: the queues, and the indexes and byte counter beside
/// them (removing each recipient would leave those).
#[cfg(feature = "redis")]
fn remove_keys(prefix: &str) {
    let url = std::env::var("OFFLINE_QUEUE_REDIS_URL").unwrap();
    block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    });
}
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
    let recipients: Vec<RecipientId> = (0..10_000)
        .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
        .collect();
    let mut group = c.benchmark_group("expiry");
    group.sample_size(20);
    let dir = tempfile::tempdir().unwrap();
    for backend in backends() {
        for stored in [10_000usize, 100_000, 1_000_000] {
            let (storage, prefix) = open(backend, stored, dir.path());
            // N long-lived records spread evenly over 10,000 recipients (1, 10 or 100 each),
            // appended a recipient's share at a time (one commit each on redb).
            block_on(async {
                for (r, who) in recipients.iter().enumerate() {
                    let share =
                        stored / recipients.len() + usize::from(r < stored % recipients.len());
                    let records = (0..share).map(|_| record(later)).collect();
                    storage
                        .append(who, records, &Quota::UNLIMITED, T0)
                        .await
                        .unwrap();
                }
            });
            purge_1000(
                &mut group,
                backend,
                stored,
                &storage,
                &recipients,
                soon,
                purge_at,
            );
            // What Redis holds would outlive the bench; memory and the temporary redb files go
            // by themselves.
            drop(storage);
            #[cfg(feature = "redis")]
            if backend == "redis" {
                remove_keys(&prefix);
            }
            #[cfg(not(feature = "redis"))]
            let _ = prefix;
        }
    }
    group.finish();
}

/// Times purging 1,000 due records among what `storage` holds.
fn purge_1000(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    backend: &str,
    stored: usize,
    storage: &Arc<dyn Storage>,
    recipients: &[RecipientId],
    soon: Timestamp,
    purge_at: Timestamp,
) {
    {
        let storage = storage.clone();
        group.bench_with_input(
            BenchmarkId::new(format!("purge_1000/{backend}"), stored),
            &stored,
            |b, _| {
                b.iter_batched(
                    || {
                        // 1,000 records due, spread over recipients that also hold long-lived
                        // ones, appended concurrently (grouped into few commits on redb).
                        block_on(futures::future::join_all((0..EXPIRING).map(|i| {
                            let who = &recipients[(i * 7) % recipients.len()];
                            let storage = storage.clone();
                            async move {
                                storage
                                    .append(who, vec![record(soon)], &Quota::UNLIMITED, T0)
                                    .await
                                    .unwrap();
                            }
                        })));
                    },
                    |()| {
                        let outcome = block_on(storage.purge(purge_at, None, EXPIRING)).unwrap();
                        assert_eq!(outcome.expired, EXPIRING as u64);
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
