//! `AmqpStorage` beside raw `lapin` on the same RabbitMQ, in the same run (issue 18):
//! - send: 64 concurrent senders, each calling `Storage::append_one` with one record (a
//!   100-byte body, a 30-day deadline, a generated id) 50 times in turn, spread round-robin
//!   over 1,000 recipients: 3,200 appends per iteration. The raw way publishes the same bodies
//!   to the same queues, persistent, from 64 tasks each with a channel of its own in confirm
//!   mode, each waiting for its confirm before its next publish (pipelined as the senders
//!   are).
//! - send to one recipient (`amqp_send_64_one_recipient`): the same, all to one recipient,
//!   whose appends on a node take turns (stamped and confirmed one append at a time, so the
//!   queue holds them in stamp order); the raw publishes do not.
//! - drain: 10,000 records pending for one recipient, read by `read_for_delivery` in batches
//!   of 100, each call carrying the previous batch's cumulative ack (as a session does), until
//!   a read comes back empty. The raw way consumes the same queue with a prefetch of 100 and
//!   one `multiple` ack per 100 messages. Refilling is not timed.
//!
//! The storage runs before the raw way and again after it (`*_again`), so a drift shows.
//!
//! ```sh
//! OFFLINE_QUEUE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo bench --features amqp --bench amqp
//! ```
//!
//! Without `OFFLINE_QUEUE_AMQP_URL` the groups say so and measure nothing. Each group uses a
//! queue prefix of its own (`oqbench-*`) and deletes its queues at its end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use offline_queue::storage::{Ack, NewRecord};
use offline_queue::{
    AmqpStorage, BatchLimit, MessageId, Quota, RecipientId, Seq, Storage, Timestamp,
};

const BODY: usize = 100;
const SENDERS: usize = 64;
const PER_SENDER: usize = 50;
const RECIPIENTS: usize = 1_000;
const PENDING: usize = 10_000;
const BATCH: usize = 100;
const TTL_MS: u64 = 30 * 24 * 3600 * 1000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_AMQP_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: OFFLINE_QUEUE_AMQP_URL is not set");
            None
        }
    }
}

fn record(now: Timestamp) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: Some(Timestamp::from_millis(now.as_millis() + TTL_MS)),
        body: vec![7u8; BODY],
    }
}

fn prefix(group: &str) -> String {
    format!("oqbench-{group}-{}", std::process::id())
}

/// The queue name `AmqpStorage` gives `recipient` under `prefix` (short ids: hex).
fn queue_name(prefix: &str, recipient: &RecipientId) -> String {
    let hex: String = recipient
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}.{hex}")
}

/// Runs `iters` rounds of 64 concurrent senders through `storage`, and times them.
fn time_appends(
    runtime: &tokio::runtime::Runtime,
    storage: &Arc<AmqpStorage>,
    recipients: &Arc<Vec<RecipientId>>,
    next: &Arc<AtomicUsize>,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let senders = (0..SENDERS).map(|_| {
                let storage = storage.clone();
                let recipients = recipients.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    for _ in 0..PER_SENDER {
                        let i = next.fetch_add(1, Ordering::Relaxed) % recipients.len();
                        let now = Timestamp::now_system();
                        storage
                            .append_one(&recipients[i], record(now), &Quota::UNLIMITED, now)
                            .await
                            .unwrap();
                    }
                })
            });
            for sender in futures::future::join_all(senders).await {
                sender.unwrap();
            }
        }
        start.elapsed()
    })
}

/// The raw way: 64 tasks, a confirm-mode channel each, one publish in flight per task.
fn time_raw_publishes(
    runtime: &tokio::runtime::Runtime,
    connection: &Connection,
    queues: &Arc<Vec<String>>,
    next: &Arc<AtomicUsize>,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..SENDERS {
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            channels.push(channel);
        }
        let start = Instant::now();
        for _ in 0..iters {
            let senders = channels.iter().cloned().map(|channel| {
                let queues = queues.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    for _ in 0..PER_SENDER {
                        let i = next.fetch_add(1, Ordering::Relaxed) % queues.len();
                        let confirm = channel
                            .basic_publish(
                                "".into(),
                                queues[i].as_str().into(),
                                BasicPublishOptions::default(),
                                &[7u8; BODY],
                                BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                            .unwrap();
                        assert!(confirm.await.unwrap().is_ack());
                    }
                })
            });
            for sender in futures::future::join_all(senders).await {
                sender.unwrap();
            }
        }
        start.elapsed()
    })
}

fn connect(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    prefix: &str,
) -> (Arc<AmqpStorage>, Connection) {
    runtime.block_on(async {
        let storage = AmqpStorage::options()
            .prefix(prefix)
            .connect(url)
            .await
            .unwrap();
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        (Arc::new(storage), connection)
    })
}

fn send(c: &mut Criterion) {
    send_to(c, "amqp_send_64", RECIPIENTS);
}

/// All 64 senders to one recipient: a node's appends to one queue take turns (so the queue
/// holds them in stamp order), where raw publishes from 64 channels do not.
fn send_one_recipient(c: &mut Criterion) {
    send_to(c, "amqp_send_64_one_recipient", 1);
}

fn send_to(c: &mut Criterion, group_name: &str, recipient_count: usize) {
    let Some(url) = url() else {
        return;
    };
    let runtime = runtime();
    let prefix = prefix(group_name);
    let (storage, connection) = connect(&runtime, &url, &prefix);
    let recipients: Arc<Vec<RecipientId>> = Arc::new(
        (0..recipient_count)
            .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
            .collect(),
    );
    let queues = Arc::new(
        recipients
            .iter()
            .map(|r| queue_name(&prefix, r))
            .collect::<Vec<_>>(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    // Every queue made before timing: making a quorum queue is a Raft group starting, not a
    // send.
    runtime.block_on(async {
        let now = Timestamp::now_system();
        for recipient in recipients.iter() {
            storage
                .append_one(recipient, record(now), &Quota::UNLIMITED, now)
                .await
                .unwrap();
        }
    });
    let mut group = c.benchmark_group(group_name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Elements((SENDERS * PER_SENDER) as u64));
    group.bench_function("storage", |b| {
        b.iter_custom(|iters| time_appends(&runtime, &storage, &recipients, &next, iters))
    });
    group.bench_function("raw_confirmed_publishes", |b| {
        b.iter_custom(|iters| time_raw_publishes(&runtime, &connection, &queues, &next, iters))
    });
    group.bench_function("storage_again", |b| {
        b.iter_custom(|iters| time_appends(&runtime, &storage, &recipients, &next, iters))
    });
    group.finish();
    runtime.block_on(async {
        for recipient in recipients.iter() {
            storage.remove_recipient(recipient).await.unwrap();
        }
    });
}

/// Fills `recipient`'s queue with `PENDING` records (not timed).
fn fill(runtime: &tokio::runtime::Runtime, storage: &AmqpStorage, recipient: &RecipientId) {
    runtime.block_on(async {
        let now = Timestamp::now_system();
        for _ in 0..PENDING / BATCH {
            let records = (0..BATCH).map(|_| record(now)).collect();
            storage
                .append(recipient, records, &Quota::UNLIMITED, now)
                .await
                .unwrap();
        }
    });
}

/// Drains `recipient` as a session does, and times it.
fn time_storage_drain(
    runtime: &tokio::runtime::Runtime,
    storage: &AmqpStorage,
    recipient: &RecipientId,
) -> Duration {
    runtime.block_on(async {
        let limit = BatchLimit {
            max_messages: BATCH,
            max_bytes: usize::MAX,
        };
        let start = Instant::now();
        let mut after: Option<Seq> = None;
        let mut read = 0;
        loop {
            let ack = after.map(|seq| Ack {
                through: Some(seq),
                ..Ack::default()
            });
            let now = Timestamp::now_system();
            let batch = storage
                .read_for_delivery(recipient, ack.as_ref(), after, limit, now)
                .await
                .unwrap()
                .batch;
            let Some(last) = batch.records.last() else {
                break;
            };
            read += batch.records.len();
            after = Some(last.seq);
        }
        assert_eq!(read, PENDING);
        start.elapsed()
    })
}

/// Drains `queue` with a consumer (prefetch 100, a `multiple` ack per 100), and times it.
fn time_raw_drain(
    runtime: &tokio::runtime::Runtime,
    connection: &Connection,
    queue: &str,
) -> Duration {
    runtime.block_on(async {
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(BATCH as u16, BasicQosOptions::default())
            .await
            .unwrap();
        let start = Instant::now();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for n in 1..=PENDING {
            let delivery = consumer.next().await.unwrap().unwrap();
            if n % BATCH == 0 {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
            }
        }
        let elapsed = start.elapsed();
        channel.close(200, "done".into()).await.unwrap();
        elapsed
    })
}

fn drain(c: &mut Criterion) {
    let Some(url) = url() else {
        return;
    };
    let runtime = runtime();
    let prefix = prefix("drain");
    let (storage, connection) = connect(&runtime, &url, &prefix);
    let recipient = RecipientId::new("drained").unwrap();
    let queue = queue_name(&prefix, &recipient);
    let mut group = c.benchmark_group("amqp_drain_10k");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Elements(PENDING as u64));
    let storage_drain = |b: &mut criterion::Bencher| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fill(&runtime, &storage, &recipient);
                total += time_storage_drain(&runtime, &storage, &recipient);
            }
            total
        })
    };
    group.bench_function("storage", storage_drain);
    group.bench_function("raw_consumer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fill(&runtime, &storage, &recipient);
                total += time_raw_drain(&runtime, &connection, &queue);
            }
            total
        })
    });
    group.bench_function("storage_again", storage_drain);
    group.finish();
    runtime.block_on(async {
        storage.remove_recipient(&recipient).await.unwrap();
    });
}

criterion_group!(benches, send, send_one_recipient, drain);
criterion_main!(benches);
