//! The shared conformance suite against `RedisStorage`, on a single server
//! (`OFFLINE_QUEUE_REDIS_URL`) and on a Redis Cluster (`OFFLINE_QUEUE_REDIS_CLUSTER_URLS`, comma
//! separated). Each check gets its own key prefix, so runs never see each other's data. Skipped,
//! and says so, when the variable is unset.

#![cfg(all(feature = "redis", feature = "testing"))]

mod redis_support;

use std::sync::Arc;

use offline_queue::{Storage, testing};
use redis_support::{Target, fresh};

async fn conformance(target: Target) {
    let prefix = redis_support::unique_prefix("conformance");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    testing::run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (target, prefix) = (target.clone(), format!("{prefix}-{n}"));
        async move { Arc::new(fresh(&target, &prefix).await) as Arc<dyn Storage> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_storage_passes_the_conformance_suite_on_one_server() {
    let Some(target) = Target::single() else {
        return;
    };
    conformance(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_storage_passes_the_conformance_suite_on_a_cluster() {
    let Some(target) = Target::cluster() else {
        return;
    };
    conformance(target).await;
}
