//! Offline recipients cost disk, not RAM: stores 10 messages (256-byte payloads) for each of
//! 1,000,000 recipients in `RedbStorage` and reports the process's resident memory before and
//! after (redb's page cache is capped at 32 MiB and counted in the figure).
//!
//! `cargo bench --bench redb_memory` (several minutes; `OFFLINE_QUEUE_RSS_RECIPIENTS` to scale).

use std::sync::Arc;
use std::time::Instant;

use futures::executor::block_on;
use offline_queue::storage::NewRecord;
use offline_queue::{MessageId, Quota, RecipientId, RedbStorage, Storage, Timestamp};

const PER_RECIPIENT: usize = 10;
const CONCURRENCY: usize = 256;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let recipients: usize =
        std::env::var("OFFLINE_QUEUE_RSS_RECIPIENTS").map_or(1_000_000, |v| v.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rss.redb");
    let storage = Arc::new(
        RedbStorage::options()
            .cache_bytes(32 << 20)
            .open(&path)
            .unwrap(),
    );
    let now = Timestamp::now_system();
    let before = rss_kib();
    let started = Instant::now();
    let workers = (0..CONCURRENCY).map(|w| {
        let storage = storage.clone();
        async move {
            let mut r = w;
            while r < recipients {
                let who = RecipientId::new(format!("device-{r:08}")).unwrap();
                let records = (0..PER_RECIPIENT)
                    .map(|_| NewRecord {
                        id: MessageId::generate(),
                        dedup: false,
                        sent_at: now,
                        expires_at: Some(
                            now.saturating_add(std::time::Duration::from_secs(86_400)),
                        ),
                        body: vec![7u8; 257],
                    })
                    .collect();
                storage
                    .append(&who, records, &Quota::UNLIMITED, now)
                    .await
                    .unwrap();
                r += CONCURRENCY;
            }
        }
    });
    block_on(futures::future::join_all(workers));
    let elapsed = started.elapsed();
    let after = rss_kib();
    let file = std::fs::metadata(&path).unwrap().len();
    let messages = recipients * PER_RECIPIENT;
    println!(
        "stored {messages} messages for {recipients} recipients in {:.1} s ({:.0} msg/s)",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64()
    );
    println!("file size: {:.1} MiB", file as f64 / (1 << 20) as f64);
    println!(
        "RSS before: {:.1} MiB, after: {:.1} MiB, growth: {:.1} MiB (redb cache capped at 32 MiB)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0
    );
    let probe = RecipientId::new(format!("device-{:08}", recipients / 2)).unwrap();
    let stats = block_on(storage.stats(&probe)).unwrap();
    assert_eq!(stats.messages, PER_RECIPIENT as u64);
}
