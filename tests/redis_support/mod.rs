//! Where the Redis-backed tests find their server, and fresh storages on it.

#![allow(dead_code)]

use std::time::Duration;

use offline_queue::{RecipientId, RedisStorage};

// Each test binary that uses both Redis and PostgreSQL gets two copies: harmless (no state).
#[allow(clippy::duplicate_mod)]
#[path = "../skip_support/mod.rs"]
mod skip_support;

/// Bounds each wait so a hang fails instead of stalling; nothing is timed by it.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A Redis to test against: one server, or a cluster's nodes.
#[derive(Clone, Debug)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    /// `OFFLINE_QUEUE_REDIS_URL`, or `None` after saying the test is skipped.
    pub fn single() -> Option<Self> {
        match std::env::var("OFFLINE_QUEUE_REDIS_URL") {
            Ok(url) if !url.is_empty() => Some(Target::Single(url)),
            _ => skip("OFFLINE_QUEUE_REDIS_URL"),
        }
    }

    /// `OFFLINE_QUEUE_REDIS_CLUSTER_URLS` (comma separated), or `None` after saying so.
    pub fn cluster() -> Option<Self> {
        match std::env::var("OFFLINE_QUEUE_REDIS_CLUSTER_URLS") {
            Ok(urls) if !urls.is_empty() => Some(Target::Cluster(
                urls.split(',').map(|u| u.trim().to_string()).collect(),
            )),
            _ => skip("OFFLINE_QUEUE_REDIS_CLUSTER_URLS"),
        }
    }
}

/// Says a test is skipped for want of `variable`, or fails it when
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1` (as in CI), where a missing server is an error.
pub fn skip<T>(variable: &str) -> Option<T> {
    if std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
        panic!("{variable} is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires its server");
    }
    skip_support::record(&format!("{variable} is not set"));
    None
}

/// A key prefix no other run uses.
pub fn unique_prefix(what: &str) -> String {
    format!("oq-test-{what}-{}", offline_queue::MessageId::generate())
}

/// A storage on `target` under `prefix`, with the byte budget counter on (the suite checks
/// it). Its keys' TTLs follow the quotas the tests append with.
pub async fn fresh(target: &Target, prefix: &str) -> RedisStorage {
    let options = RedisStorage::options()
        .prefix(prefix)
        .track_total_bytes(true);
    match target {
        Target::Single(url) => options.connect(url).await,
        Target::Cluster(urls) => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            options.connect_cluster(&urls).await
        }
    }
    .expect("redis answers")
}

/// For tests that drive a storage from blocking code: a fresh storage on `target` under a
/// unique prefix, with the guard that keeps the shared tokio runtime (which drives its
/// connection) entered on this thread. Hold the guard while using the storage.
pub fn fresh_blocking(
    target: &Target,
    what: &str,
) -> (tokio::runtime::EnterGuard<'static>, RedisStorage) {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    });
    let context = runtime.enter();
    let storage = runtime.block_on(fresh(target, &unique_prefix(what)));
    (context, storage)
}

/// Waits until exactly the nodes `expected` (in any order) hold a session for `who`.
pub async fn wait_for_sessions(storage: &RedisStorage, who: &RecipientId, expected: &[&str]) {
    let mut expected: Vec<&str> = expected.to_vec();
    expected.sort_unstable();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut nodes = storage.sessions_on(who).await.unwrap();
            nodes.sort();
            if nodes == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{who} never present on exactly {expected:?}"));
}
