//! Engine throughput over `MemoryStorage`, each beside its bare baseline in the same group:
//! a `VecDeque` per recipient behind one mutex doing the same pushes and pops.
//!
//! `cargo bench --bench engine`

mod support;
#[path = "support/engine_workload.rs"]
mod workload;

use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use offline_queue::RecipientId;
use workload::{
    Baseline, MESSAGES, PAYLOAD, baseline_drain, baseline_send, engine_drain, engine_send, ids,
    queue,
};

fn bench(c: &mut Criterion) {
    let payload = vec![7u8; PAYLOAD];
    let ids = ids();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.sample_size(20);

    group.bench_function("send/engine", |b| {
        b.iter_batched(
            queue,
            |q| {
                block_on(engine_send(&q, &ids, &payload));
                q // dropped outside the timing
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("send/baseline", |b| {
        b.iter_batched(
            Baseline::default,
            |s| {
                baseline_send(&s, &payload);
                s
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("deliver_ack/engine", |b| {
        b.iter_batched(
            || {
                let q = queue();
                block_on(engine_send(&q, &ids, &payload));
                q
            },
            |q| block_on(engine_drain(&q, &ids)),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("deliver_ack/baseline", |b| {
        b.iter_batched(
            || {
                let s = Baseline::default();
                baseline_send(&s, &payload);
                s
            },
            |s| assert_eq!(baseline_drain(&s), MESSAGES),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("round_trip/engine", |b| {
        b.iter_batched(
            queue,
            |q| {
                block_on(async {
                    engine_send(&q, &ids, &payload).await;
                    engine_drain(&q, &ids).await;
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("round_trip/baseline", |b| {
        b.iter_batched(
            Baseline::default,
            |s| {
                baseline_send(&s, &payload);
                assert_eq!(baseline_drain(&s), MESSAGES);
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// The same phases in a heap that stays warm: every iteration runs the whole round trip, and
/// only the phase named is timed. The fresh-queue group above also times the page faults of a
/// heap glibc just gave back to the kernel, which a long-running server does not pay.
fn bench_warm(c: &mut Criterion) {
    let payload = vec![7u8; PAYLOAD];
    let ids = ids();
    let mut group = c.benchmark_group("engine_warm");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.sample_size(50);
    for (phase, time_send) in [("send", true), ("deliver_ack", false)] {
        group.bench_function(format!("{phase}/engine"), |b| {
            b.iter_custom(|rounds| {
                let mut timed = Duration::ZERO;
                for _ in 0..rounds {
                    let q = queue();
                    let start = Instant::now();
                    block_on(engine_send(&q, &ids, &payload));
                    let sent = start.elapsed();
                    let start = Instant::now();
                    block_on(engine_drain(&q, &ids));
                    timed += if time_send { sent } else { start.elapsed() };
                }
                timed
            })
        });
        group.bench_function(format!("{phase}/baseline"), |b| {
            b.iter_custom(|rounds| {
                let mut timed = Duration::ZERO;
                for _ in 0..rounds {
                    let s = Baseline::default();
                    let start = Instant::now();
                    baseline_send(&s, &payload);
                    let sent = start.elapsed();
                    let start = Instant::now();
                    assert_eq!(baseline_drain(&s), MESSAGES);
                    timed += if time_send { sent } else { start.elapsed() };
                }
                timed
            })
        });
    }
    group.finish();
}

/// A typed payload encoded by [`Envelope::encode`] (sized, then written into one buffer)
/// beside bincode's `encode_to_vec` (a buffer grown as it writes).
fn bench_encode(c: &mut Criterion) {
    let value = workload::typed_payload();
    let recipient = RecipientId::new("bob").unwrap();
    let mut group = c.benchmark_group("envelope_encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("codec", |b| {
        b.iter(|| workload::codec_encode(&recipient, &value))
    });
    group.bench_function("bincode_encode_to_vec", |b| {
        b.iter(|| workload::bincode_encode(&recipient, &value))
    });
    group.finish();
}

criterion_group!(benches, bench, bench_warm, bench_encode);
criterion_main!(benches);
