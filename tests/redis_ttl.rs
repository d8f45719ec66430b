//! Every key of a recipient carries a Redis TTL, so an abandoned queue vanishes even if no
//! engine ever runs maintenance; activity pushes it back. Skipped, and says so, without
//! `OFFLINE_QUEUE_REDIS_URL`.

#![cfg(feature = "redis")]

mod redis_support;

use std::time::Duration;

use offline_queue::storage::NewRecord;
use offline_queue::{MessageId, Quota, RecipientId, RedisStorage, Seq, Storage, Timestamp};

#[tokio::test]
async fn every_recipient_key_carries_a_ttl() {
    let Some(redis_support::Target::Single(url)) = redis_support::Target::single() else {
        return;
    };
    let prefix = redis_support::unique_prefix("ttl");
    let ttl = Duration::from_secs(3600);
    let storage = RedisStorage::options()
        .prefix(prefix.clone())
        .idle_ttl(ttl)
        .connect(&url)
        .await
        .unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let record = |dedup| NewRecord {
        id: MessageId::generate(),
        dedup,
        sent_at: now,
        expires_at: Some(now.saturating_add(Duration::from_secs(60))),
        body: b"hi\0".to_vec(),
    };
    storage
        .append(
            &bob,
            vec![record(false), record(true)],
            &Quota::UNLIMITED,
            now,
        )
        .await
        .unwrap();
    storage
        .mark_delivered(&bob, &[Seq(u64::MAX)])
        .await
        .unwrap();
    let first = storage
        .read(&bob, None, offline_queue::BatchLimit::default(), now)
        .await
        .unwrap();
    storage
        .mark_delivered(&bob, &[first.records[0].seq])
        .await
        .unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{626f62}}:*"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        keys.len() >= 7,
        "meta, order, records, deadlines, deliveries, dedup: {keys:?}"
    );
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(
            pttl > 0 && pttl <= ttl.as_millis() as i64,
            "{key} has no TTL ({pttl})"
        );
    }
    storage.remove_recipient(&bob).await.unwrap();
}
