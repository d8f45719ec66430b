//! Durable send throughput on `RedbStorage` with 1, 16 and 256 concurrent senders (256-byte
//! payloads), beside (a) the same backend with one write transaction per message and (b) the
//! raw floor: the same bytes appended to a plain file with one `fdatasync` per group of the
//! same size. Then the drain rate on reconnect: 10,000 pending messages delivered and acked in
//! batches of 100, beside the same drain on `MemoryStorage`; and the drain of 100 backlogs
//! whose records lie scattered among each other's.
//!
//! `cargo bench --bench redb`

mod support;

use std::io::Write;
use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use offline_queue::{Envelope, MemoryStorage, OfflineQueue, RecipientId, RedbStorage, Storage};

const PAYLOAD: usize = 256;

fn queue(storage: Arc<dyn Storage>) -> OfflineQueue {
    support::queue(storage)
}

/// `senders` concurrent senders, each sending `per_sender` messages one after another, to 64
/// recipients in turn.
async fn send_concurrently(queue: &OfflineQueue, senders: usize, per_sender: usize) {
    let who: Vec<RecipientId> = (0..senders)
        .map(|s| RecipientId::new(format!("user-{}", s % 64)).unwrap())
        .collect();
    send_each_at_once(queue, &who, per_sender).await;
}

/// The floor: `groups` rounds of writing `group` payloads to a plain file and one fdatasync.
fn raw_fdatasync(file: &mut std::fs::File, group: usize, groups: usize) {
    let bytes = vec![7u8; PAYLOAD * group];
    for _ in 0..groups {
        file.write_all(&bytes).unwrap();
        file.sync_data().unwrap();
    }
}

fn durable_send(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_send");
    group.sample_size(10);
    for (senders, per_sender) in [(1usize, 100usize), (16, 50), (256, 16)] {
        let messages = senders * per_sender;
        group.throughput(Throughput::Elements(messages as u64));
        let dir = tempfile::tempdir().unwrap();
        let grouped = queue(Arc::new(
            RedbStorage::open(dir.path().join("grouped.redb")).unwrap(),
        ));
        group.bench_with_input(
            BenchmarkId::new("group_commit", senders),
            &senders,
            |b, &n| b.iter(|| block_on(send_concurrently(&grouped, n, per_sender))),
        );
        let single = queue(Arc::new(
            RedbStorage::options()
                .max_group(1)
                .open(dir.path().join("single.redb"))
                .unwrap(),
        ));
        group.bench_with_input(
            BenchmarkId::new("txn_per_message", senders),
            &senders,
            |b, &n| b.iter(|| block_on(send_concurrently(&single, n, per_sender))),
        );
        let mut file = std::fs::File::create(dir.path().join("raw.log")).unwrap();
        group.bench_with_input(
            BenchmarkId::new("raw_fdatasync", senders),
            &senders,
            |b, &n| b.iter(|| raw_fdatasync(&mut file, n, per_sender)),
        );
    }
    group.finish();
}

fn drain_on_reconnect(c: &mut Criterion) {
    const PENDING: usize = 10_000;
    let mut group = c.benchmark_group("drain_10k");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PENDING as u64));
    let who = RecipientId::new("bob").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let redb = queue(Arc::new(
        RedbStorage::open(dir.path().join("drain.redb")).unwrap(),
    ));
    let memory = queue(Arc::new(MemoryStorage::new()));
    for (name, queue) in [("redb", &redb), ("memory", &memory)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                // Filled with 256 concurrent senders so filling is quick; only the drain is timed.
                || block_on(send_concurrently_to(queue, &who, PENDING)),
                |()| block_on(support::drain(queue, &who)),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

async fn send_concurrently_to(queue: &OfflineQueue, who: &RecipientId, count: usize) {
    let payload = vec![7u8; PAYLOAD];
    let envelopes: Vec<Envelope> = (0..count)
        .map(|_| Envelope::new(who.clone(), payload.clone()))
        .collect();
    for chunk in envelopes.chunks(500) {
        for result in queue.send_many(chunk.to_vec()).await.unwrap() {
            result.unwrap();
        }
    }
}

/// 100 recipients' backlogs of 100, their records scattered through the log (sent at once by
/// one sender each, so every group commit holds some of each), then all reconnecting at once
/// and draining: each ack retires records lying among other recipients' (the chat server's
/// drain after a busy store), and the acks share group commits. Beside the same on
/// `MemoryStorage`.
fn drain_scattered(c: &mut Criterion) {
    const RECIPIENTS: usize = 100;
    const EACH: usize = 100;
    let mut group = c.benchmark_group("drain_scattered_100x100");
    group.sample_size(10);
    group.throughput(Throughput::Elements((RECIPIENTS * EACH) as u64));
    let who: Vec<RecipientId> = (0..RECIPIENTS)
        .map(|r| RecipientId::new(format!("scattered-{r}")).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let redb = queue(Arc::new(
        RedbStorage::open(dir.path().join("scattered.redb")).unwrap(),
    ));
    let memory = queue(Arc::new(MemoryStorage::new()));
    for (name, queue) in [("redb", &redb), ("memory", &memory)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || block_on(send_each_at_once(queue, &who, EACH)),
                |()| {
                    block_on(futures::future::join_all(
                        who.iter().map(|who| support::drain(queue, who)),
                    ))
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// One sender per recipient, all at once, each sending `each` messages one after another.
async fn send_each_at_once(queue: &OfflineQueue, who: &[RecipientId], each: usize) {
    let payload = vec![7u8; PAYLOAD];
    let tasks = who.iter().map(|who| {
        let (queue, payload) = (queue.clone(), payload.clone());
        async move {
            for _ in 0..each {
                queue
                    .send(Envelope::new(who.clone(), payload.clone()))
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(tasks).await;
}

criterion_group!(benches, durable_send, drain_on_reconnect, drain_scattered);
criterion_main!(benches);
