//! `RedisStorage` beside the raw floor of the same Redis, in the same run:
//! - send: 64 concurrent senders, 256-byte payloads, through the engine, against 64
//!   concurrent `LPUSH`es of the same bytes through redis-rs with no logic (one multiplexed
//!   connection each way, so concurrent commands are pipelined alike);
//!   and against a production-style insert: one script call per message, as large chat servers
//!   write to a per-device queue in Redis (dedup through a per-queue id hash, a per-queue
//!   counter, a sorted set by position, both keys' expiry, the queue in a shard index), with
//!   no quota and no per-message TTL; and our append alone at the `Storage` trait (quota,
//!   dedup and a per-message TTL), which is what that baseline compares with;
//! - drain: 10,000 pending messages delivered and acked in batches of 100, against
//!   `LRANGE` + `LTRIM` of 100 at a time from one list;
//! - on a cluster (`OFFLINE_QUEUE_REDIS_CLUSTER_URLS`), the same drain at the `Storage` trait,
//!   each read carrying the previous batch's ack (one pipeline) against the ack and the read
//!   as two calls (how the cluster drained before the pipeline).
//!
//! `OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ cargo bench --features redis --bench redis`
//! (without the variable it says so and measures nothing).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use offline_queue::{Envelope, OfflineQueue, RecipientId, RedisStorage};
use redis::aio::ConnectionManager;

const PAYLOAD: usize = 256;
const SENDERS: usize = 64;
const PER_SENDER: usize = 100;

struct Setup {
    runtime: tokio::runtime::Runtime,
    queue: OfflineQueue,
    storage: RedisStorage,
    raw: ConnectionManager,
    prefix: String,
}

fn setup() -> Option<Setup> {
    let Ok(url) = std::env::var("OFFLINE_QUEUE_REDIS_URL") else {
        eprintln!("skipped: OFFLINE_QUEUE_REDIS_URL is not set");
        return None;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("oq-bench-{}", offline_queue::MessageId::generate());
    let (storage, raw) = runtime.block_on(async {
        let storage = RedisStorage::options()
            .prefix(prefix.clone())
            .connect(&url)
            .await
            .unwrap();
        let raw = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        (storage, raw)
    });
    let queue = support::queue(Arc::new(storage.clone()));
    Some(Setup {
        runtime,
        queue,
        storage,
        raw,
        prefix,
    })
}

fn recipient(sender: usize) -> RecipientId {
    RecipientId::new(format!("user-{sender}")).unwrap()
}

/// Runs `iters` rounds of `SENDERS` concurrent tasks made by `sender`, and times them.
fn time_senders<F, Fut>(s: &Setup, iters: u64, sender: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    s.runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let tasks: Vec<_> = (0..SENDERS).map(|i| tokio::spawn(sender(i))).collect();
            for task in tasks {
                task.await.unwrap();
            }
        }
        start.elapsed()
    })
}

fn send(c: &mut Criterion) {
    let Some(s) = setup() else { return };
    let mut group = c.benchmark_group("redis_send_64_senders");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements((SENDERS * PER_SENDER) as u64));
    group.bench_function("engine", |b| {
        b.iter_custom(|iters| {
            time_senders(&s, iters, |sender| {
                let queue = s.queue.clone();
                async move {
                    let who = recipient(sender);
                    for _ in 0..PER_SENDER {
                        let envelope = Envelope::new(who.clone(), vec![7u8; PAYLOAD]);
                        queue.send(envelope).await.unwrap();
                    }
                }
            })
        })
    });
    // The append alone, at the `Storage` trait (no engine around it), with the engine's quota
    // and a per-message TTL: what the production-style insert below is compared with.
    let quota = support::roomy_quota();
    group.bench_function("storage_append", |b| {
        b.iter_custom(|iters| {
            time_senders(&s, iters, |sender| {
                use offline_queue::Storage;
                let storage = s.storage.clone();
                async move {
                    let who = recipient(sender);
                    for _ in 0..PER_SENDER {
                        let now = offline_queue::Timestamp::from_millis(1_700_000_000_000);
                        let record = offline_queue::storage::NewRecord {
                            id: offline_queue::MessageId::generate(),
                            dedup: true,
                            sent_at: now,
                            expires_at: Some(
                                now.saturating_add(Duration::from_secs(7 * 24 * 3600)),
                            ),
                            body: vec![7u8; PAYLOAD],
                        };
                        storage.append_one(&who, record, &quota, now).await.unwrap();
                    }
                }
            })
        })
    });
    // The same with the clock running, as in use: the dedup ids' times (a sorted set's scores)
    // then grow, as the production-style insert's positions do, where above they are all equal
    // and each id lands at a random place in the set.
    group.bench_function("storage_append_clock", |b| {
        b.iter_custom(|iters| {
            time_senders(&s, iters, |sender| {
                use offline_queue::Storage;
                let storage = s.storage.clone();
                async move {
                    let who = recipient(sender);
                    for _ in 0..PER_SENDER {
                        let now = offline_queue::Timestamp::now_system();
                        let record = offline_queue::storage::NewRecord {
                            id: offline_queue::MessageId::generate(),
                            dedup: true,
                            sent_at: now,
                            expires_at: Some(
                                now.saturating_add(Duration::from_secs(7 * 24 * 3600)),
                            ),
                            body: vec![7u8; PAYLOAD],
                        };
                        storage.append_one(&who, record, &quota, now).await.unwrap();
                    }
                }
            })
        })
    });
    // The production-style insert, exactly the work the module docs describe, no more.
    let insert = redis::Script::new(
        r"
        local pos = redis.call('HGET', KEYS[2], ARGV[1])
        if pos then return tonumber(pos) end
        pos = redis.call('HINCRBY', KEYS[2], '#next', 1)
        redis.call('ZADD', KEYS[1], pos, ARGV[1] .. ARGV[2])
        redis.call('HSET', KEYS[2], ARGV[1], pos)
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        redis.call('PEXPIRE', KEYS[2], ARGV[3])
        redis.call('ZADD', KEYS[3], ARGV[4], KEYS[1])
        return pos
        ",
    );
    group.bench_function("production_style_insert", |b| {
        b.iter_custom(|iters| {
            time_senders(&s, iters, |sender| {
                let mut raw = s.raw.clone();
                let insert = insert.clone();
                let queue = format!("{}:prod:{{q{sender}}}:msgs", s.prefix);
                let ids = format!("{}:prod:{{q{sender}}}:ids", s.prefix);
                let index = format!("{}:prod:index:{}", s.prefix, sender % 16);
                async move {
                    for _ in 0..PER_SENDER {
                        let id = offline_queue::MessageId::generate().to_bytes();
                        let _: i64 = insert
                            .key(&queue)
                            .key(&ids)
                            .key(&index)
                            .arg(&id[..])
                            .arg(vec![7u8; PAYLOAD])
                            .arg(7 * 24 * 3600 * 1000)
                            .arg(1_700_000_000_000u64)
                            .invoke_async(&mut raw)
                            .await
                            .unwrap();
                    }
                }
            })
        })
    });
    group.bench_function("raw_lpush", |b| {
        b.iter_custom(|iters| {
            time_senders(&s, iters, |sender| {
                let mut raw = s.raw.clone();
                let key = format!("{}:raw:{sender}", s.prefix);
                async move {
                    for _ in 0..PER_SENDER {
                        let _: () = redis::cmd("LPUSH")
                            .arg(&key)
                            .arg(vec![7u8; PAYLOAD])
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                    }
                }
            })
        })
    });
    group.finish();
    cleanup(&s);
}

fn drain(c: &mut Criterion) {
    const PENDING: usize = 10_000;
    let Some(s) = setup() else { return };
    let mut group = c.benchmark_group("redis_drain_10k");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(PENDING as u64));
    let who = RecipientId::new("bob").unwrap();
    group.bench_function("engine", |b| {
        b.iter_batched(
            || {
                s.runtime.block_on(async {
                    let envelopes: Vec<Envelope> = (0..PENDING)
                        .map(|_| Envelope::new(who.clone(), vec![7u8; PAYLOAD]))
                        .collect();
                    for chunk in envelopes.chunks(500) {
                        for result in s.queue.send_many(chunk.to_vec()).await.unwrap() {
                            result.unwrap();
                        }
                    }
                })
            },
            |()| s.runtime.block_on(support::drain(&s.queue, &who)),
            BatchSize::PerIteration,
        )
    });
    let key = format!("{}:raw:drain", s.prefix);
    group.bench_function("raw_lrange_ltrim", |b| {
        b.iter_batched(
            || {
                s.runtime.block_on(async {
                    let mut raw = s.raw.clone();
                    for _ in 0..PENDING / 500 {
                        let values = vec![vec![7u8; PAYLOAD]; 500];
                        let _: () = redis::cmd("RPUSH")
                            .arg(&key)
                            .arg(values)
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                    }
                })
            },
            |()| {
                s.runtime.block_on(async {
                    let mut raw = s.raw.clone();
                    loop {
                        let (batch, ()): (Vec<Vec<u8>>, ()) = redis::pipe()
                            .cmd("LRANGE")
                            .arg(&key)
                            .arg(0)
                            .arg(99)
                            .cmd("LTRIM")
                            .arg(&key)
                            .arg(100)
                            .arg(-1)
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                        if batch.is_empty() {
                            break;
                        }
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    cleanup(&s);
}

/// The drain on a cluster at the `Storage` trait: each read carrying the previous batch's
/// cumulative ack (one pipeline to the queue's node), against the ack and the read as two
/// calls (two round trips, as before the pipeline), alternating in one run.
fn cluster_drain(c: &mut Criterion) {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{BatchLimit, Quota, Storage, Timestamp};

    const PENDING: usize = 10_000;
    let Ok(urls) = std::env::var("OFFLINE_QUEUE_REDIS_CLUSTER_URLS") else {
        eprintln!("skipped: OFFLINE_QUEUE_REDIS_CLUSTER_URLS is not set");
        return;
    };
    let urls: Vec<&str> = urls.split(',').collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let storage = runtime.block_on(
        RedisStorage::options()
            .prefix(format!("oq-bench-{}", offline_queue::MessageId::generate()))
            .connect_cluster(&urls),
    );
    let storage = storage.unwrap();
    let who = RecipientId::new("bob").unwrap();
    let now = Timestamp::from_millis(1_700_000_000_000);
    let limit = BatchLimit {
        max_messages: 100,
        max_bytes: 1 << 20,
    };
    let fill = || {
        runtime.block_on(async {
            for _ in 0..PENDING / 500 {
                let records = (0..500)
                    .map(|_| NewRecord {
                        id: offline_queue::MessageId::generate(),
                        dedup: false,
                        sent_at: now,
                        expires_at: None,
                        body: vec![7u8; PAYLOAD],
                    })
                    .collect();
                storage
                    .append(&who, records, &Quota::UNLIMITED, now)
                    .await
                    .unwrap();
            }
        })
    };
    let drain = |pipelined: bool| {
        runtime.block_on(async {
            let (mut ack, mut after) = (None::<Ack>, None);
            loop {
                let read = if pipelined {
                    storage
                        .read_for_delivery(&who, ack.as_ref(), after, limit, now)
                        .await
                        .unwrap()
                        .batch
                } else {
                    if let Some(ack) = &ack {
                        storage.ack(&who, ack, now).await.unwrap();
                    }
                    storage
                        .read_for_delivery(&who, None, after, limit, now)
                        .await
                        .unwrap()
                        .batch
                };
                let Some(last) = read.records.last() else {
                    break;
                };
                after = Some(last.seq);
                ack = Some(Ack {
                    through: Some(last.seq),
                    ..Ack::default()
                });
            }
            if let Some(ack) = &ack {
                storage.ack(&who, ack, now).await.unwrap();
            }
        })
    };
    let mut group = c.benchmark_group("redis_cluster_drain_10k");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(PENDING as u64));
    group.bench_function("ack_in_read_pipeline", |b| {
        b.iter_batched(fill, |()| drain(true), BatchSize::PerIteration)
    });
    group.bench_function("ack_then_read", |b| {
        b.iter_batched(fill, |()| drain(false), BatchSize::PerIteration)
    });
    group.finish();
    runtime.block_on(storage.remove_recipient(&who)).unwrap();
}

/// Removes what the bench stored.
fn cleanup(s: &Setup) {
    use offline_queue::Storage;
    s.runtime.block_on(async {
        let mut raw = s.raw.clone();
        for sender in 0..SENDERS {
            s.storage
                .remove_recipient(&recipient(sender))
                .await
                .unwrap();
            let _: () = redis::cmd("DEL")
                .arg(format!("{}:raw:{sender}", s.prefix))
                .arg(format!("{}:prod:{{q{sender}}}:msgs", s.prefix))
                .arg(format!("{}:prod:{{q{sender}}}:ids", s.prefix))
                .arg(format!("{}:prod:index:{}", s.prefix, sender % 16))
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        s.storage
            .remove_recipient(&RecipientId::new("bob").unwrap())
            .await
            .unwrap();
    });
}

criterion_group!(benches, send, drain, cluster_drain);
criterion_main!(benches);
