//! `PostgresStorage` beside the raw floor of the same PostgreSQL, in the same run, and the
//! same workloads on `RedisStorage` (issue 16):
//! - send: 64 concurrent senders, each calling `Storage::append` with one record (a 100-byte
//!   body, a 30-day deadline as the engine's default TTL gives, a generated id so no dedup)
//!   50 times in turn, the records spread round-robin over 1,000 recipients: 3,200 appends
//!   per iteration. The floor inserts the same 3,200 rows per iteration into a plain table
//!   (`rid bytea, seq bigint, body bytea`, primary key `(rid, seq)`, nothing else) as
//!   multi-row `INSERT ... VALUES` statements, one transaction each, with as many
//!   connections as the storage's pool (16) inserting at once; its transactions carry the
//!   storage's mean group size G (`group_commit_counts` over the storage's run just before,
//!   warm-up included): 3,200 / G of them, rounded, of ⌊G⌋ and ⌈G⌉ rows. `synchronous_commit`
//!   is on for both.
//! - drain: 10,000 pending records for one recipient read in batches of 100 by
//!   `read_for_delivery`, each call carrying the previous batch's cumulative ack (as a session
//!   does), until a read comes back empty (that read applies the last ack): 101 calls, each
//!   one transaction. The floor deletes the same rows in batches of 100 with
//!   `DELETE ... WHERE ctid = ANY (ARRAY(SELECT ctid ... WHERE rid = $1 ORDER BY seq
//!   LIMIT 100)) RETURNING seq, body` until it deletes nothing (the cheapest form: its inner
//!   query walks the primary key, the delete finds its rows by tid; `seq IN (SELECT ...)`
//!   plans a hash join over the whole queue). Both tables are analyzed once with 10,000 rows
//!   in them before timing, as autovacuum would have; refilling is not timed.
//! - the same send and drain on `RedisStorage`, for the README's "which backend" table.
//!
//! The storage runs before its floor and again after it (`*_again`), so a drift during the
//! run shows.
//!
//! ```sh
//! OFFLINE_QUEUE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//! OFFLINE_QUEUE_REDIS_URL=redis://127.0.0.1:6379/ \
//!     cargo bench --features postgres,redis --bench postgres
//! ```
//!
//! Without `OFFLINE_QUEUE_POSTGRES_URL` (or `OFFLINE_QUEUE_REDIS_URL`) the groups on that
//! server say so and measure nothing. Each PostgreSQL group works in a schema of its own
//! (`oq_bench_*`, the storage's tables and the floor's), dropped at its end; each Redis group
//! uses a prefix of its own (`oq-bench-*`) and deletes every key under it at its end.

#[allow(dead_code)] // Only the quota is used here.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use offline_queue::storage::{Ack, NewRecord};
use offline_queue::{
    BatchLimit, MessageId, PostgresStorage, RecipientId, RedisStorage, Seq, Storage, Timestamp,
};
use tokio_postgres::{Client, NoTls, Statement};

const BODY: usize = 100;
const SENDERS: usize = 64;
const PER_SENDER: usize = 50;
const RECIPIENTS: usize = 1_000;
const POOL: usize = 16;
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

fn postgres_url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: OFFLINE_QUEUE_POSTGRES_URL is not set");
            None
        }
    }
}

fn redis_url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: OFFLINE_QUEUE_REDIS_URL is not set");
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

fn recipients() -> Arc<Vec<RecipientId>> {
    Arc::new(
        (0..RECIPIENTS)
            .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
            .collect(),
    )
}

/// A connection of the floor's (or the bench's own), `synchronous_commit` on.
async fn raw_client(url: &str) -> Client {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.options("-c synchronous_commit=on");
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A PostgreSQL group's storage, its schema and a connection for the floor's setup.
struct Pg {
    runtime: tokio::runtime::Runtime,
    url: String,
    schema: String,
    storage: PostgresStorage,
    admin: Client,
}

fn pg_setup() -> Option<Pg> {
    let url = postgres_url()?;
    let runtime = runtime();
    let schema = format!(
        "oq_bench_{}",
        MessageId::generate().to_string().to_lowercase()
    );
    let (storage, admin) = runtime.block_on(async {
        let storage = PostgresStorage::options()
            .schema(schema.clone())
            .pool_size(POOL)
            .connect(&url)
            .await
            .unwrap();
        (storage, raw_client(&url).await)
    });
    Some(Pg {
        runtime,
        url,
        schema,
        storage,
        admin,
    })
}

impl Pg {
    fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.schema)
    }

    fn create_raw_table(&self, name: &str) {
        let sql = format!(
            "CREATE TABLE {} (rid bytea NOT NULL, seq bigint NOT NULL, body bytea NOT NULL, \
             PRIMARY KEY (rid, seq))",
            self.table(name)
        );
        self.runtime
            .block_on(self.admin.batch_execute(&sql))
            .unwrap();
    }

    fn analyze(&self, tables: &[&str]) {
        for table in tables {
            let sql = format!("ANALYZE {}", self.table(table));
            self.runtime
                .block_on(self.admin.batch_execute(&sql))
                .unwrap();
        }
    }

    fn drop_schema(self) {
        let Pg {
            runtime,
            schema,
            storage,
            admin,
            ..
        } = self;
        drop(storage);
        runtime
            .block_on(admin.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")))
            .unwrap();
    }
}

/// Runs `iters` rounds of 64 concurrent senders, each appending `PER_SENDER` single records
/// through `storage`, and times them.
fn time_appends(
    runtime: &tokio::runtime::Runtime,
    storage: Arc<dyn Storage>,
    recipients: &Arc<Vec<RecipientId>>,
    next: &Arc<AtomicUsize>,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let tasks: Vec<_> = (0..SENDERS)
                .map(|_| {
                    let (storage, recipients, next) =
                        (storage.clone(), recipients.clone(), next.clone());
                    tokio::spawn(async move {
                        let quota = support::roomy_quota();
                        for _ in 0..PER_SENDER {
                            let who =
                                &recipients[next.fetch_add(1, Ordering::Relaxed) % RECIPIENTS];
                            let now = Timestamp::now_system();
                            let outcome = storage
                                .append(who, vec![record(now)], &quota, now)
                                .await
                                .unwrap();
                            assert_eq!(outcome.records.len(), 1);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        }
        start.elapsed()
    })
}

/// The floor's connections, each with its two `INSERT`s prepared: of `base` rows and of
/// `base + 1`.
struct Floor {
    clients: Vec<Arc<(Client, Statement, Statement)>>,
    /// Transactions per iteration (`SENDERS * PER_SENDER` rows, as the storage's iteration).
    transactions: usize,
    base: usize,
    /// How many of them carry `base + 1` rows.
    longer: usize,
}

impl Floor {
    /// Transactions whose mean size is `mean`, the nearest a whole number of them allows.
    fn connect(pg: &Pg, mean: f64) -> Self {
        let rows = SENDERS * PER_SENDER;
        let transactions = ((rows as f64 / mean).round() as usize).clamp(1, rows);
        let (base, longer) = (rows / transactions, rows % transactions);
        let insert = |n: usize| {
            let values: Vec<String> = (0..n)
                .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
                .collect();
            format!(
                "INSERT INTO {} (rid, seq, body) VALUES {}",
                pg.table("raw_send"),
                values.join(", ")
            )
        };
        let (short, long) = (insert(base), insert(base + 1));
        let clients = pg.runtime.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..POOL {
                let client = raw_client(&pg.url).await;
                let short = client.prepare(&short).await.unwrap();
                let long = client.prepare(&long).await.unwrap();
                clients.push(Arc::new((client, short, long)));
            }
            clients
        });
        Self {
            clients,
            transactions,
            base,
            longer,
        }
    }

    fn mean(&self) -> f64 {
        (SENDERS * PER_SENDER) as f64 / self.transactions as f64
    }

    /// Runs `iters` iterations, each inserting `SENDERS * PER_SENDER` rows in `transactions`
    /// transactions on every connection at once (each takes the next transaction when done),
    /// and times them.
    fn time(
        &self,
        runtime: &tokio::runtime::Runtime,
        recipients: &Arc<Vec<RecipientId>>,
        next: &Arc<AtomicUsize>,
        seq: &Arc<AtomicI64>,
        iters: u64,
    ) -> Duration {
        runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                let taken = Arc::new(AtomicUsize::new(0));
                let tasks: Vec<_> = self
                    .clients
                    .iter()
                    .map(|client| {
                        let (client, recipients, next, seq, taken) = (
                            client.clone(),
                            recipients.clone(),
                            next.clone(),
                            seq.clone(),
                            taken.clone(),
                        );
                        let (transactions, base, longer) =
                            (self.transactions, self.base, self.longer);
                        tokio::spawn(async move {
                            let body = vec![7u8; BODY];
                            loop {
                                let t = taken.fetch_add(1, Ordering::Relaxed);
                                if t >= transactions {
                                    break;
                                }
                                let rows = if t < longer { base + 1 } else { base };
                                let seqs: Vec<i64> = (0..rows)
                                    .map(|_| seq.fetch_add(1, Ordering::Relaxed))
                                    .collect();
                                let rids: Vec<&[u8]> = (0..rows)
                                    .map(|_| {
                                        recipients
                                            [next.fetch_add(1, Ordering::Relaxed) % RECIPIENTS]
                                            .as_bytes()
                                    })
                                    .collect();
                                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                                    Vec::with_capacity(3 * rows);
                                for i in 0..rows {
                                    params.push(&rids[i]);
                                    params.push(&seqs[i]);
                                    params.push(&body);
                                }
                                let (client, short, long) = &*client;
                                let statement = if rows > base { long } else { short };
                                let n = client.execute(statement, &params).await.unwrap();
                                assert_eq!(n, rows as u64);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            }
            start.elapsed()
        })
    }
}

fn postgres_send(c: &mut Criterion) {
    let Some(pg) = pg_setup() else { return };
    pg.create_raw_table("raw_send");
    let recipients = recipients();
    let next = Arc::new(AtomicUsize::new(0));
    let storage: Arc<dyn Storage> = Arc::new(pg.storage.clone());
    let mut group = c.benchmark_group("postgres_send_64_senders");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements((SENDERS * PER_SENDER) as u64));
    let before = pg.storage.group_commit_counts();
    group.bench_function("storage_append", |b| {
        b.iter_custom(|iters| time_appends(&pg.runtime, storage.clone(), &recipients, &next, iters))
    });
    let mut counts = pg.storage.group_commit_counts();
    if counts.commits == before.commits {
        // Filtered out: a warm-up to learn the group size.
        time_appends(&pg.runtime, storage.clone(), &recipients, &next, 3);
        counts = pg.storage.group_commit_counts();
    }
    let (commits, appends) = (
        counts.commits - before.commits,
        counts.appends - before.appends,
    );
    let mean = appends as f64 / commits as f64;
    let floor = Floor::connect(&pg, mean);
    eprintln!(
        "postgres send: {appends} appends in {commits} commits, mean group {mean:.2}; the floor \
         inserts {} rows in {} transactions per iteration ({} of {} rows, the rest of {}), \
         mean {:.2}",
        SENDERS * PER_SENDER,
        floor.transactions,
        floor.longer,
        floor.base + 1,
        floor.base,
        floor.mean()
    );
    let seq = Arc::new(AtomicI64::new(1));
    group.bench_function("raw_insert_same_mean_txn_size", |b| {
        b.iter_custom(|iters| floor.time(&pg.runtime, &recipients, &next, &seq, iters))
    });
    // Once more after the floor, so a drift during the run shows.
    group.bench_function("storage_append_again", |b| {
        b.iter_custom(|iters| time_appends(&pg.runtime, storage.clone(), &recipients, &next, iters))
    });
    group.finish();
    drop(floor);
    pg.drop_schema();
}

/// Appends `PENDING` records for `who`, 500 per append (not timed).
fn fill(runtime: &tokio::runtime::Runtime, storage: &dyn Storage, who: &RecipientId) {
    runtime.block_on(async {
        let now = Timestamp::now_system();
        for _ in 0..PENDING / 500 {
            let records = (0..500).map(|_| record(now)).collect();
            storage
                .append(who, records, &support::roomy_quota(), now)
                .await
                .unwrap();
        }
    })
}

/// Drains `who` as a session does: batches of 100, each read carrying the previous batch's
/// cumulative ack, until a read comes back empty (that read applies the last ack).
async fn drain(storage: &dyn Storage, who: &RecipientId) -> usize {
    let limit = BatchLimit {
        max_messages: BATCH,
        max_bytes: 1 << 20,
    };
    let (mut after, mut ack): (Option<Seq>, Option<Ack>) = (None, None);
    let mut delivered = 0;
    loop {
        let read = storage
            .read_for_delivery(who, ack.as_ref(), after, limit, Timestamp::now_system())
            .await
            .unwrap();
        let Some(last) = read.batch.records.last() else {
            break;
        };
        delivered += read.batch.records.len();
        after = Some(last.seq);
        ack = Some(Ack {
            through: Some(last.seq),
            ..Ack::default()
        });
    }
    delivered
}

/// Runs `iters` drains of `PENDING` through `storage`, filling before each (not timed).
fn time_drains(
    runtime: &tokio::runtime::Runtime,
    storage: &dyn Storage,
    who: &RecipientId,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        fill(runtime, storage, who);
        let start = Instant::now();
        let delivered = runtime.block_on(drain(storage, who));
        total += start.elapsed();
        assert_eq!(delivered, PENDING);
    }
    total
}

fn drain_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(PENDING as u64));
    group
}

fn postgres_drain(c: &mut Criterion) {
    let Some(pg) = pg_setup() else { return };
    pg.create_raw_table("raw_drain");
    let who = RecipientId::new("bob").unwrap();
    // Statistics first (as autovacuum would have gathered them for a queue in use), taken
    // with a queue of 10,000 in the table; then that queue drained, untimed.
    fill(&pg.runtime, &pg.storage, &who);
    pg.analyze(&["oq_records", "oq_queues"]);
    pg.runtime.block_on(drain(&pg.storage, &who));
    let mut group = drain_group(c, "postgres_drain_10k");
    group.bench_function("storage_read_for_delivery", |b| {
        b.iter_custom(|iters| time_drains(&pg.runtime, &pg.storage, &who, iters))
    });
    let (fill_sql, delete_sql) = (
        format!(
            "INSERT INTO {} (rid, seq, body) SELECT $1::bytea, $2::bigint + g, $3::bytea FROM generate_series(1, $4::bigint) AS g",
            pg.table("raw_drain")
        ),
        format!(
            "DELETE FROM {t} WHERE ctid = ANY (ARRAY(\
             SELECT ctid FROM {t} WHERE rid = $1 ORDER BY seq LIMIT {BATCH})) RETURNING seq, body",
            t = pg.table("raw_drain")
        ),
    );
    let client = pg.runtime.block_on(raw_client(&pg.url));
    let (fill, delete) = pg.runtime.block_on(async {
        (
            client.prepare(&fill_sql).await.unwrap(),
            client.prepare(&delete_sql).await.unwrap(),
        )
    });
    let rid = who.as_bytes();
    let body = vec![7u8; BODY];
    let mut base = 0i64;
    let raw_drain = |base: i64| {
        pg.runtime.block_on(async {
            client
                .execute(&fill, &[&rid, &base, &body, &(PENDING as i64)])
                .await
                .unwrap();
        });
        let start = Instant::now();
        let delivered = pg.runtime.block_on(async {
            let mut delivered = 0;
            loop {
                let rows = client.query(&delete, &[&rid]).await.unwrap();
                if rows.is_empty() {
                    break delivered;
                }
                for row in &rows {
                    let _: i64 = row.get(0);
                    let body: &[u8] = row.get(1);
                    assert_eq!(body.len(), BODY);
                }
                delivered += rows.len();
            }
        });
        let elapsed = start.elapsed();
        assert_eq!(delivered, PENDING);
        elapsed
    };
    // As for the storage: statistics taken with 10,000 rows in the table.
    pg.runtime.block_on(async {
        client
            .execute(&fill, &[&rid, &-(PENDING as i64), &body, &(PENDING as i64)])
            .await
            .unwrap();
    });
    pg.analyze(&["raw_drain"]);
    pg.runtime
        .block_on(async { while !client.query(&delete, &[&rid]).await.unwrap().is_empty() {} });
    group.bench_function("raw_delete_returning", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += raw_drain(base);
                base += PENDING as i64;
            }
            total
        })
    });
    group.bench_function("storage_read_for_delivery_again", |b| {
        b.iter_custom(|iters| time_drains(&pg.runtime, &pg.storage, &who, iters))
    });
    group.finish();
    drop(client);
    pg.drop_schema();
}

/// A `RedisStorage` under a prefix of its own, and what `redis_cleanup` needs.
struct Redis {
    storage: RedisStorage,
    url: String,
    prefix: String,
}

fn redis_setup(runtime: &tokio::runtime::Runtime) -> Option<Redis> {
    let url = redis_url()?;
    let prefix = format!("oq-bench-{}", MessageId::generate());
    let storage = runtime.block_on(async {
        RedisStorage::options()
            .prefix(prefix.clone())
            .connect(&url)
            .await
            .unwrap()
    });
    Some(Redis {
        storage,
        url,
        prefix,
    })
}

/// Deletes every key under the run's prefix (removing the recipients would leave the
/// prefix's shared expiry and idle indexes behind).
fn redis_cleanup(runtime: &tokio::runtime::Runtime, redis: Redis) {
    let Redis {
        storage,
        url,
        prefix,
    } = redis;
    drop(storage);
    runtime.block_on(async {
        let mut connection = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    });
}

fn redis_send(c: &mut Criterion) {
    let runtime = runtime();
    let Some(redis) = redis_setup(&runtime) else {
        return;
    };
    let recipients = recipients();
    let next = Arc::new(AtomicUsize::new(0));
    let storage: Arc<dyn Storage> = Arc::new(redis.storage.clone());
    let mut group = c.benchmark_group("redis_send_64_senders");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements((SENDERS * PER_SENDER) as u64));
    group.bench_function("storage_append", |b| {
        b.iter_custom(|iters| time_appends(&runtime, storage.clone(), &recipients, &next, iters))
    });
    group.finish();
    drop(storage);
    redis_cleanup(&runtime, redis);
}

fn redis_drain(c: &mut Criterion) {
    let runtime = runtime();
    let Some(redis) = redis_setup(&runtime) else {
        return;
    };
    let who = RecipientId::new("bob").unwrap();
    let mut group = drain_group(c, "redis_drain_10k");
    group.bench_function("storage_read_for_delivery", |b| {
        b.iter_custom(|iters| time_drains(&runtime, &redis.storage, &who, iters))
    });
    group.finish();
    redis_cleanup(&runtime, redis);
}

criterion_group!(
    benches,
    postgres_send,
    postgres_drain,
    redis_send,
    redis_drain
);
criterion_main!(benches);
