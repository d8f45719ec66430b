//! `NatsStorage` beside the way JetStream users hold messages for offline recipients today, in
//! the same run, on the same server (issue 17):
//! - **store**: 10,000 messages of 256 bytes over 200 recipients, 64 concurrent senders.
//!   `NatsStorage::append_one` (read the queue's meta, write it back by compare-and-set,
//!   publish the record: three round trips) against a bare JetStream publish awaiting its ack
//!   (one round trip, no quota, no order per recipient, no dedup of our own).
//!   `storage_append_one_10_recipients`: the same to 10 hot recipients (about six appends to
//!   each in flight), where a node's appends to one queue share its compare-and-sets. A
//!   retryable failure is retried and counted (printed after each target's groups).
//! - **drain**: the same 10,000 pending messages (filled untimed), 16 recipients drained at
//!   once. `read_for_delivery` in batches of 100 with the previous batch's cumulative ack (as a
//!   session does) against the usual JetStream way: a durable pull consumer per recipient
//!   (made before the messages came, as a subscription would be), `fetch` of up to 100, and an
//!   ack of the last (`AckPolicy::All`). The storage removes acked records in the background:
//!   `storage_read_for_delivery_and_removal` times the same drain until the records stream
//!   is empty too. `storage_read_for_delivery_one_get_each`: the same with one direct get a
//!   record, as on servers before 2.11 (where the two are the same).
//!
//!
//! The same groups run twice: on the server at `OFFLINE_QUEUE_NATS_URL` (one replica), and
//! on a 3-node cluster the bench starts itself from Debian's `nats-server` (`nats_r3_*`:
//! every stream, the baseline's included, replicated three times).
//!
//! ```sh
//! OFFLINE_QUEUE_NATS_URL=nats://127.0.0.1:4222 cargo bench --features nats --bench nats
//! ```
//!
//! Without `OFFLINE_QUEUE_NATS_URL` the single-server groups say so and measure nothing;
//! without `/usr/sbin/nats-server`, the cluster's. Each fill works on streams of its own
//! (`OQB_*`), deleted once it is drained (a drain's fill serves one or more iterations).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use offline_queue::storage::{Ack, NewRecord};
use offline_queue::{
    BatchLimit, MessageId, NatsStorage, OwnedNatsStorage, Quota, RecipientId, Seq, Storage,
    Timestamp,
};

#[allow(dead_code)]
#[path = "../tests/nats_support/own_server.rs"]
mod own_server;

const RECIPIENTS: usize = 200;
const PER_RECIPIENT: usize = 50;
const MESSAGES: usize = RECIPIENTS * PER_RECIPIENT;
/// The usual messages to 10 hot recipients.
const HOT: Shape = Shape {
    recipients: 10,
    per_recipient: MESSAGES / 10,
};
/// The bench's usual workload.
const USUAL: Shape = Shape {
    recipients: RECIPIENTS,
    per_recipient: PER_RECIPIENT,
};
/// Issue 17's drain workload: 1,000 recipients × 100 messages.
const ISSUE_SCALE: Shape = Shape {
    recipients: 1_000,
    per_recipient: 100,
};
/// The recipients a consumer-per-recipient iteration drains at `ISSUE_SCALE`.
const ISSUE_SLICE: usize = 100;

/// How many recipients, and messages each.
#[derive(Clone, Copy)]
struct Shape {
    recipients: usize,
    per_recipient: usize,
}

impl Shape {
    fn messages(self) -> usize {
        self.recipients * self.per_recipient
    }
}
const BODY: usize = 256;
const SENDERS: usize = 64;
const DRAINING: usize = 16;
const BATCH: usize = 100;

/// Appends that failed retryably and were retried (printed after each target's groups).
static RETRIED: AtomicU64 = AtomicU64::new(0);

fn url() -> Option<String> {
    let url = std::env::var("OFFLINE_QUEUE_NATS_URL").ok();
    if url.is_none() {
        eprintln!("OFFLINE_QUEUE_NATS_URL is not set: the NATS benches measure nothing");
    }
    url
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn name() -> String {
    format!("OQB_{}", MessageId::generate())
}

fn recipient(r: usize) -> RecipientId {
    RecipientId::new(format!("r{r}")).unwrap()
}

async fn storage(url: &str, name: &str, replicas: usize) -> NatsStorage {
    storage_reading(url, name, replicas, true).await
}

/// A storage whose reads are batched direct gets on a server of 2.11 or later (`batched`), or
/// one direct get a record.
/// The single-owner layout on streams called `name`.
async fn owned_storage(url: &str, name: &str, replicas: usize) -> OwnedNatsStorage {
    NatsStorage::options()
        .stream(name)
        .prefix(name)
        .replicas(replicas)
        .connect_owned(url)
        .await
        .unwrap()
}

async fn storage_reading(url: &str, name: &str, replicas: usize, batched: bool) -> NatsStorage {
    NatsStorage::options()
        .stream(name)
        .prefix(name)
        .replicas(replicas)
        .batched_reads(batched)
        .connect(url)
        .await
        .unwrap()
}

/// A client of every server in `url` (one, or several separated by commas).
async fn client(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|server| server.parse().unwrap())
        .collect();
    async_nats::connect(servers).await
}

async fn delete(url: &str, name: &str) {
    let context = jetstream::new(client(url).await.unwrap());
    for suffix in ["", "_META", "_DEDUP", "_BASE", "_LOG", "_PAGES", "_STATE"] {
        let _ = context.delete_stream(format!("{name}{suffix}")).await;
    }
}

/// Every message appended by `SENDERS` tasks, each taking every `SENDERS`-th message, spread
/// over `recipients`.
async fn store_with_storage<S: Storage + Clone>(storage: &S, shape: Shape) {
    let (recipients, messages) = (shape.recipients, shape.messages());
    let now = Timestamp::now_system();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let storage = storage.clone();
            tokio::spawn(async move {
                for n in (sender..messages).step_by(SENDERS) {
                    let record = NewRecord {
                        id: MessageId::generate(),
                        dedup: false,
                        sent_at: now,
                        expires_at: None,
                        body: vec![b'x'; BODY],
                    };
                    let to = recipient(n % recipients);
                    // A retryable failure is retried, as a sender would, and counted.
                    loop {
                        match storage
                            .append_one(&to, record.clone(), &Quota::UNLIMITED, now)
                            .await
                        {
                            Ok(_) => break,
                            Err(error) if error.is_retryable() => {
                                RETRIED.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => panic!("{error}"),
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The baseline's stream: a subject per recipient, file storage.
async fn base_stream(context: &jetstream::Context, name: &str, replicas: usize) -> stream::Stream {
    context
        .get_or_create_stream(stream::Config {
            name: format!("{name}_BASE"),
            subjects: vec![format!("{name}.base.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn store_with_publish(context: &jetstream::Context, name: &str, shape: Shape) {
    let tasks: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (context, name) = (context.clone(), name.to_owned());
            tokio::spawn(async move {
                for n in (sender..shape.messages()).step_by(SENDERS) {
                    let subject = format!("{name}.base.{}", n % shape.recipients);
                    let ack = context.publish(subject, vec![b'x'; BODY].into()).await;
                    ack.unwrap().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn drain_with_storage<S: Storage>(storage: &S, shape: Shape) -> usize {
    drain_recipients(storage, 0..shape.recipients).await
}

/// Drains `recipients`, 16 at once, each in batches of 100 with the previous batch's ack.
async fn drain_recipients<S: Storage>(storage: &S, recipients: std::ops::Range<usize>) -> usize {
    let now = Timestamp::now_system();
    let limit = BatchLimit {
        max_messages: BATCH,
        max_bytes: usize::MAX,
    };
    futures::stream::iter(recipients)
        .map(|r| async move {
            let who = recipient(r);
            let (mut after, mut ack, mut got): (Option<Seq>, Option<Ack>, usize) = (None, None, 0);
            loop {
                let read = storage
                    .read_for_delivery(&who, ack.as_ref(), after, limit, now)
                    .await
                    .unwrap();
                let Some(last) = read.batch.records.last().map(|r| r.seq) else {
                    break got;
                };
                got += read.batch.records.len();
                after = Some(last);
                ack = Some(Ack {
                    through: Some(last),
                    ..Ack::default()
                });
            }
        })
        .buffer_unordered(DRAINING)
        .fold(0, |sum, got| async move { sum + got })
        .await
}

/// Drains `recipients` through their consumers, `per_recipient` messages each.
async fn drain_with_consumers(
    stream: &stream::Stream,
    recipients: std::ops::Range<usize>,
    per_recipient: usize,
) -> usize {
    futures::stream::iter(recipients)
        .map(|r| async move {
            let consumer: consumer::PullConsumer =
                stream.get_consumer(&format!("r{r}")).await.unwrap();
            let mut got = 0;
            while got < per_recipient {
                let mut batch = consumer
                    .fetch()
                    .max_messages(BATCH)
                    .messages()
                    .await
                    .unwrap();
                let mut last = None;
                while let Some(message) = batch.next().await {
                    got += 1;
                    last = Some(message.unwrap());
                }
                if let Some(last) = last {
                    last.ack().await.unwrap();
                }
            }
            got
        })
        .buffer_unordered(DRAINING)
        .fold(0, |sum, got| async move { sum + got })
        .await
}

/// Recipients filled with messages (untimed), on streams called `name`, and the first
/// recipient not yet drained.
struct Prepared<T> {
    name: String,
    filled: T,
    next: usize,
}

/// Times draining `shape`, `slice` recipients an iteration, 16 at once: `fill` makes
/// streams called as it is given and fills them (untimed), once every recipient of the last
/// fill was drained; `drain` drains a range of recipients and returns how many messages it
/// got. Each iteration's throughput is `slice` recipients' messages.
fn drain_in_slices<T>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    function: &str,
    target: &Target,
    (shape, slice): (Shape, usize),
    fill: impl AsyncFn(&str) -> T,
    drain: impl AsyncFn(&T, std::ops::Range<usize>) -> usize,
) {
    assert_eq!(shape.recipients % slice, 0, "slices of equal size");
    let Target { url, runtime, .. } = *target;
    group.throughput(Throughput::Elements((slice * shape.per_recipient) as u64));
    let mut prepared: Option<Prepared<T>> = None;
    group.bench_function(function, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if prepared.as_ref().is_none_or(|p| p.next == shape.recipients) {
                        if let Some(drained) = prepared.take() {
                            delete(url, &drained.name).await;
                        }
                        let name = name();
                        let filled = fill(&name).await;
                        prepared = Some(Prepared {
                            name,
                            filled,
                            next: 0,
                        });
                    }
                    let prepared = prepared.as_mut().unwrap();
                    let recipients = prepared.next..prepared.next + slice;
                    prepared.next = recipients.end;
                    let start = Instant::now();
                    let got = drain(&prepared.filled, recipients).await;
                    total += start.elapsed();
                    assert_eq!(got, slice * shape.per_recipient);
                }
                total
            })
        });
    });
    if let Some(left) = prepared {
        runtime.block_on(delete(url, &left.name));
    }
}

/// Where a group runs: the server's URL and the streams' replicas.
struct Target<'a> {
    url: &'a str,
    replicas: usize,
    runtime: &'a tokio::runtime::Runtime,
}

fn single(c: &mut Criterion) {
    let Some(url) = url() else {
        return;
    };
    let runtime = runtime();
    let target = Target {
        url: &url,
        replicas: 1,
        runtime: &runtime,
    };
    store(c, &target, "nats_store_10k_64_senders");
    drain(c, &target, "nats_drain_10k_200_recipients");
    drain_at_issue_scale(c, &target, "nats_drain_100k_1000_recipients");
    report_retries("one server");
}

fn report_retries(on: &str) {
    let retried = RETRIED.swap(0, Ordering::Relaxed);
    eprintln!("appends retried after a retryable failure on {on}: {retried}");
}

/// The same groups on a 3-node cluster this bench starts (Debian's `nats-server`, free
/// loopback ports, a temporary directory), every stream replicated three times (R3).
fn cluster(c: &mut Criterion) {
    if !std::path::Path::new(own_server::NATS_SERVER).exists() {
        eprintln!(
            "{} is missing: the R3 benches measure nothing",
            own_server::NATS_SERVER
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (nodes, url) = own_server::start_cluster(dir.path());
    let runtime = runtime();
    let name = name();
    runtime.block_on(async {
        own_server::connect_when_ready(
            || {
                NatsStorage::options()
                    .stream(&name)
                    .prefix(&name)
                    .replicas(3)
            },
            &url,
        )
        .await;
        delete(&url, &name).await;
    });
    let target = Target {
        url: &url,
        replicas: 3,
        runtime: &runtime,
    };
    store(c, &target, "nats_r3_store_10k_64_senders");
    drain(c, &target, "nats_r3_drain_10k_200_recipients");
    drain_at_issue_scale(c, &target, "nats_r3_drain_100k_1000_recipients");
    drop(nodes);
    report_retries("the R3 cluster");
}

/// A group of 10 flat samples over 20 s, counting `MESSAGES` per iteration.
fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group
}

fn store(c: &mut Criterion, target: &Target, group_name: &str) {
    let Target {
        url,
        replicas,
        runtime,
    } = *target;
    let mut group = group(c, group_name);
    // Then hot queues: the same messages to 10 recipients, about six appends to each in flight.
    for (function, recipients) in [
        ("storage_append_one", USUAL),
        ("storage_append_one_10_recipients", HOT),
    ] {
        group.bench_function(function, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let name = name();
                        let storage = storage(url, &name, replicas).await;
                        let start = Instant::now();
                        store_with_storage(&storage, recipients).await;
                        total += start.elapsed();
                        delete(url, &name).await;
                    }
                    total
                })
            });
        });
    }
    // The single-owner layout (`OwnedNatsStorage`): one publish a record. New queues (each
    // recipient's first send claims, loads and writes its queue), or `_warm`: queues already
    // in use, as on a node that has been running, each given one message untimed first.
    for (function, recipients, warm) in [
        ("owned_append_one", USUAL, false),
        ("owned_append_one_warm", USUAL, true),
        ("owned_append_one_10_recipients", HOT, false),
    ] {
        group.bench_function(function, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let name = name();
                        let storage = owned_storage(url, &name, replicas).await;
                        if warm {
                            store_with_storage(
                                &storage,
                                Shape {
                                    recipients: recipients.recipients,
                                    per_recipient: 1,
                                },
                            )
                            .await;
                        }
                        let start = Instant::now();
                        store_with_storage(&storage, recipients).await;
                        total += start.elapsed();
                        delete(url, &name).await;
                    }
                    total
                })
            });
        });
    }
    group.bench_function("jetstream_publish", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let context = jetstream::new(client(url).await.unwrap());
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let name = name();
                    base_stream(&context, &name, replicas).await;
                    let start = Instant::now();
                    store_with_publish(&context, &name, USUAL).await;
                    total += start.elapsed();
                    delete(url, &name).await;
                }
                total
            })
        });
    });
    group.finish();
}

fn drain(c: &mut Criterion, target: &Target, group_name: &str) {
    let Target {
        url,
        replicas,
        runtime,
    } = *target;
    let mut group = group(c, group_name);
    // On a server of 2.11 or later, reads ask for 64 records a request; `_one_get_each` reads
    // as on 2.9 (the same on 2.9).
    for (function, batched) in [
        ("storage_read_for_delivery", true),
        ("storage_read_for_delivery_one_get_each", false),
    ] {
        group.bench_function(function, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let name = name();
                        let storage = storage_reading(url, &name, replicas, batched).await;
                        store_with_storage(&storage, USUAL).await;
                        let start = Instant::now();
                        let got = drain_with_storage(&storage, USUAL).await;
                        total += start.elapsed();
                        assert_eq!(got, MESSAGES);
                        delete(url, &name).await;
                    }
                    total
                })
            });
        });
    }
    // The same drain, timed until the acked records have also left the stream (the storage
    // removes them in the background, behind the acks).
    group.bench_function("storage_read_for_delivery_and_removal", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let context = jetstream::new(client(url).await.unwrap());
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let name = name();
                    let storage = storage(url, &name, replicas).await;
                    store_with_storage(&storage, USUAL).await;
                    let mut records = context.get_stream(&name).await.unwrap();
                    let start = Instant::now();
                    let got = drain_with_storage(&storage, USUAL).await;
                    while records.info().await.unwrap().state.messages > 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    total += start.elapsed();
                    assert_eq!(got, MESSAGES);
                    delete(url, &name).await;
                }
                total
            })
        });
    });
    owned_and_consumers_drain(&mut group, target, USUAL, USUAL.recipients);
    group.finish();
}

/// The single-owner layout's drain (pages of 15 records a request; acked pages purged
/// behind), then the consumer-per-recipient way's, on `shape`, `slice` recipients an
/// iteration (see [`drain_in_slices`]).
fn owned_and_consumers_drain(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    target: &Target,
    shape: Shape,
    slice: usize,
) {
    let Target { url, replicas, .. } = *target;
    drain_in_slices(
        group,
        "owned_read_for_delivery",
        target,
        (shape, slice),
        async |name: &str| {
            let storage = owned_storage(url, name, replicas).await;
            store_with_storage(&storage, shape).await;
            storage
        },
        async |storage: &OwnedNatsStorage, recipients| drain_recipients(storage, recipients).await,
    );
    drain_in_slices(
        group,
        "durable_consumer_per_recipient",
        target,
        (shape, slice),
        async |name: &str| {
            let context = jetstream::new(client(url).await.unwrap());
            let stream = base_stream(&context, name, replicas).await;
            consumers_for(&stream, name, shape).await;
            store_with_publish(&context, name, shape).await;
            stream
        },
        async |stream: &stream::Stream, recipients| {
            drain_with_consumers(stream, recipients, shape.per_recipient).await
        },
    );
}

/// Issue 17's drain at its own scale, 1,000 recipients × 100 messages: the single-owner
/// layout against a durable consumer per recipient, the two drains alone (the storage made
/// by `NatsStorage` drains at about the consumers' rate: see the usual group). Both drain
/// `ISSUE_SLICE` recipients an iteration, 16 at once, from one fill of all 1,000: on the R3
/// cluster making a thousand consumers takes minutes, so each fill serves several samples.
fn drain_at_issue_scale(c: &mut Criterion, target: &Target, group_name: &str) {
    let shape = ISSUE_SCALE;
    let mut group = c.benchmark_group(group_name);
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(30));
    owned_and_consumers_drain(&mut group, target, shape, ISSUE_SLICE);
    group.finish();
}

/// A durable pull consumer per recipient, acking all up to the one acked.
async fn consumers_for(stream: &stream::Stream, name: &str, shape: Shape) {
    for r in 0..shape.recipients {
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("r{r}")),
                filter_subject: format!("{name}.base.{r}"),
                ack_policy: consumer::AckPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

criterion_group!(benches, single, cluster);
criterion_main!(benches);
