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

/// A read after the storage learned the queue's front and its small bodies goes the run way
/// (records straight from `LRANGE`); when bigger bodies then cut the batch by bytes, it
/// still returns exactly the longest run within the bound, as every backend does.
#[tokio::test]
async fn a_run_cut_by_bytes_is_exact() {
    use offline_queue::storage::NewRecord;
    use offline_queue::{BatchLimit, MessageId, Quota, RecipientId, Seq, StorageExt, Timestamp};

    let Some(target) = Target::single() else {
        return;
    };
    let storage = fresh(&target, &redis_support::unique_prefix("run")).await;
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let append = |sizes: Vec<usize>| {
        let records = sizes
            .into_iter()
            .map(|size| NewRecord {
                id: MessageId::generate(),
                dedup: false,
                sent_at: now,
                expires_at: None,
                body: vec![7; size],
            })
            .collect();
        storage.append(&bob, records, &Quota::UNLIMITED, now)
    };
    let seqs = |batch: &offline_queue::storage::ReadBatch| -> Vec<Seq> {
        batch.records.iter().map(|r| r.seq).collect()
    };
    let first = append(vec![10; 5]).await.unwrap().records[0].seq();
    let limit = BatchLimit {
        max_messages: 10,
        max_bytes: 2100,
    };
    let batch = storage.read(&bob, None, limit, now).await.unwrap();
    assert_eq!(batch.records.len(), 5);
    storage
        .ack_through(&bob, Seq(first.0 + 4), now)
        .await
        .unwrap();

    append([vec![10; 3], vec![1000; 7]].concat()).await.unwrap();
    let batch = storage
        .read(&bob, Some(Seq(first.0 + 4)), limit, now)
        .await
        .unwrap();
    // Three of 10 bytes and two of 1,000 fit in 2,100; a third of 1,000 would not.
    assert_eq!(
        seqs(&batch),
        (5..10).map(|i| Seq(first.0 + i)).collect::<Vec<_>>()
    );
    let batch = storage
        .read(&bob, Some(Seq(first.0 + 9)), limit, now)
        .await
        .unwrap();
    assert_eq!(
        seqs(&batch),
        (10..12).map(|i| Seq(first.0 + i)).collect::<Vec<_>>()
    );
    storage.remove_recipient(&bob).await.unwrap();
}
