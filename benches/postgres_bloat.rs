//! Bloat on `PostgresStorage` while a transaction holds the xmin horizon (issue 16): the same
//! send-and-drain run twice, each in a schema of its own (dropped afterwards), once clean and
//! once with a second connection holding a snapshot open for the whole run
//! (`BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;`, as a long report query or a stuck
//! client would). A plain binary without criterion: one long run measured once, not a
//! function timed many times, and not a test (too slow for every `cargo test`).
//!
//! The run: 1,000 recipients, 10 rounds; each round sends 10 messages to every recipient
//! (10,000 appends of one 100-byte record by 64 concurrent senders through
//! `Storage::append`), then drains every recipient (16 at a time, each as a session does:
//! `read_for_delivery` in batches of 100 carrying the previous batch's cumulative ack until a
//! read comes back empty), then runs `VACUUM` on the schema's tables, as autovacuum would (it
//! is off on the server these figures come from, so the bench does its work, between rounds,
//! untimed). 100,000 messages sent and drained in all. Per round it prints send and drain
//! rates, the time `VACUUM` took and the tables' sizes (`pg_total_relation_size`, indexes and
//! TOAST included); at the end, per table, the dead rows `VACUUM` left (`n_dead_tup` after
//! it: rows it could not remove), `pgstattuple`'s count when the extension can be created, and
//! the sizes again after the snapshot is released and `VACUUM` runs once more.
//!
//! ```sh
//! OFFLINE_QUEUE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench --features postgres --bench postgres_bloat
//! ```
//!
//! Arguments after `--`: `clean` or `held` to run only that one (default: both, clean
//! first). Without `OFFLINE_QUEUE_POSTGRES_URL` it says so and measures nothing.

#[allow(dead_code)] // Only the quota is used here.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use offline_queue::storage::{Ack, NewRecord};
use offline_queue::{BatchLimit, MessageId, PostgresStorage, RecipientId, Seq, Storage, Timestamp};
use tokio_postgres::{Client, NoTls};

const RECIPIENTS: usize = 1_000;
const PER_ROUND: usize = 10;
const ROUNDS: usize = 10;
const SENDERS: usize = 64;
const DRAINERS: usize = 16;
const POOL: usize = 16;
const BODY: usize = 100;
const TTL_MS: u64 = 30 * 24 * 3600 * 1000;
const TABLES: [&str; 4] = ["oq_records", "oq_queues", "oq_bytes", "oq_dedup"];

fn record(now: Timestamp) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: Some(Timestamp::from_millis(now.as_millis() + TTL_MS)),
        body: vec![7u8; BODY],
    }
}

async fn connect(url: &str) -> Client {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.options("-c synchronous_commit=on");
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Drains `who` as a session does; returns how many records it delivered.
async fn drain(storage: &dyn Storage, who: &RecipientId) -> usize {
    let limit = BatchLimit {
        max_messages: 100,
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
            return delivered;
        };
        delivered += read.batch.records.len();
        after = Some(last.seq);
        ack = Some(Ack {
            through: Some(last.seq),
            ..Ack::default()
        });
    }
}

#[derive(Clone, Copy, Default)]
struct TableStats {
    size: i64,
    live: i64,
    dead: i64,
    /// `pgstattuple`'s dead tuples, when the extension could be created.
    dead_exact: Option<i64>,
}

struct Outcome {
    send: Duration,
    drain: Duration,
    /// Per table, at the end (after the last round's `VACUUM`, snapshot still held).
    end: Vec<TableStats>,
    /// Per table, after the snapshot was released and `VACUUM` ran again.
    released: Vec<TableStats>,
}

async fn table_stats(admin: &Client, schema: &str, pgstattuple: bool) -> Vec<TableStats> {
    let mut all = Vec::new();
    for table in TABLES {
        let name = format!("\"{schema}\".{table}");
        let row = admin
            .query_one(
                "SELECT pg_total_relation_size($1::text::regclass), \
                 coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0) \
                 FROM (SELECT 1) AS one LEFT JOIN pg_stat_user_tables s \
                 ON s.relid = $1::text::regclass",
                &[&name],
            )
            .await
            .unwrap();
        let dead_exact = if pgstattuple {
            let row = admin
                .query_one(
                    &format!(
                        "SELECT dead_tuple_count FROM \"{schema}\".pgstattuple($1::text::regclass)"
                    ),
                    &[&name],
                )
                .await
                .unwrap();
            Some(row.get::<_, i64>(0))
        } else {
            None
        };
        all.push(TableStats {
            size: row.get(0),
            live: row.get(1),
            dead: row.get(2),
            dead_exact,
        });
    }
    all
}

async fn vacuum(admin: &Client, schema: &str) -> Duration {
    let start = Instant::now();
    let tables: Vec<String> = TABLES.iter().map(|t| format!("\"{schema}\".{t}")).collect();
    admin
        .batch_execute(&format!("VACUUM {}", tables.join(", ")))
        .await
        .unwrap();
    start.elapsed()
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn run(url: &str, hold: bool) -> Outcome {
    let label = if hold { "held" } else { "clean" };
    let schema = format!(
        "oq_bloat_{}",
        MessageId::generate().to_string().to_lowercase()
    );
    let storage = PostgresStorage::options()
        .schema(schema.clone())
        .pool_size(POOL)
        .connect(url)
        .await
        .unwrap();
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let admin = connect(url).await;
    let pgstattuple = admin
        .batch_execute(&format!(
            "CREATE EXTENSION IF NOT EXISTS pgstattuple SCHEMA \"{schema}\""
        ))
        .await
        .is_ok();
    if !pgstattuple {
        eprintln!("({label}: pgstattuple could not be created; n_dead_tup only)");
    }
    let holder = if hold {
        let holder = connect(url).await;
        holder
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;")
            .await
            .unwrap();
        Some(holder)
    } else {
        None
    };
    let recipients: Arc<Vec<RecipientId>> = Arc::new(
        (0..RECIPIENTS)
            .map(|i| RecipientId::new(format!("user-{i}")).unwrap())
            .collect(),
    );
    println!(
        "{label}: round  send msg/s  drain msg/s  vacuum ms  oq_records MiB  oq_queues MiB  oq_bytes MiB"
    );
    let (mut send_total, mut drain_total) = (Duration::ZERO, Duration::ZERO);
    for round in 1..=ROUNDS {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..SENDERS)
            .map(|_| {
                let (storage, recipients, next) =
                    (storage.clone(), recipients.clone(), next.clone());
                tokio::spawn(async move {
                    let quota = support::roomy_quota();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= RECIPIENTS * PER_ROUND {
                            break;
                        }
                        let now = Timestamp::now_system();
                        storage
                            .append(&recipients[i % RECIPIENTS], vec![record(now)], &quota, now)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let send = start.elapsed();
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..DRAINERS)
            .map(|_| {
                let (storage, recipients, next) =
                    (storage.clone(), recipients.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= RECIPIENTS {
                            break;
                        }
                        assert_eq!(drain(&*storage, &recipients[i]).await, PER_ROUND);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let drained = start.elapsed();
        send_total += send;
        drain_total += drained;
        let vacuumed = vacuum(&admin, &schema).await;
        let stats = table_stats(&admin, &schema, false).await;
        let messages = (RECIPIENTS * PER_ROUND) as f64;
        println!(
            "{label}: {round:5}  {:10.0}  {:11.0}  {:9.0}  {:14.2}  {:13.2}  {:12.2}",
            messages / send.as_secs_f64(),
            messages / drained.as_secs_f64(),
            vacuumed.as_secs_f64() * 1e3,
            mib(stats[0].size),
            mib(stats[1].size),
            mib(stats[2].size),
        );
    }
    drop(storage);
    let end = table_stats(&admin, &schema, pgstattuple).await;
    if let Some(holder) = holder {
        holder.batch_execute("ROLLBACK").await.unwrap();
    }
    vacuum(&admin, &schema).await;
    let released = table_stats(&admin, &schema, pgstattuple).await;
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    Outcome {
        send: send_total,
        drain: drain_total,
        end,
        released,
    }
}

fn main() {
    let Ok(url) = std::env::var("OFFLINE_QUEUE_POSTGRES_URL") else {
        eprintln!("skipped: OFFLINE_QUEUE_POSTGRES_URL is not set");
        return;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = |what: &str| args.iter().any(|a| a == what);
    let (clean, held) = match (only("clean"), only("held")) {
        (false, false) => (true, true),
        chosen => chosen,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut outcomes = Vec::new();
    for (run_it, hold) in [(clean, false), (held, true)] {
        if run_it {
            outcomes.push((hold, runtime.block_on(run(&url, hold))));
        }
    }
    let messages = (RECIPIENTS * PER_ROUND * ROUNDS) as f64;
    println!();
    println!(
        "run    send msg/s  drain msg/s  table                 size MiB  live  dead (n_dead_tup / pgstattuple)  after release + VACUUM: size MiB, dead"
    );
    for (hold, outcome) in &outcomes {
        let label = if *hold { "held" } else { "clean" };
        for (i, table) in TABLES.iter().enumerate() {
            let (end, released) = (outcome.end[i], outcome.released[i]);
            let exact = |s: TableStats| s.dead_exact.map_or("-".to_string(), |d| d.to_string());
            let (send, drain) = if i == 0 {
                (
                    format!("{:.0}", messages / outcome.send.as_secs_f64()),
                    format!("{:.0}", messages / outcome.drain.as_secs_f64()),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "{label:5}  {send:>10}  {drain:>11}  {table:20}  {:8.2}  {:4}  {:>8} / {:<8}                  {:8.2}, {} / {}",
                mib(end.size),
                end.live,
                end.dead,
                exact(end),
                mib(released.size),
                released.dead,
                exact(released),
            );
        }
    }
}
