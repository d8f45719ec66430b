//! Every key of a recipient carries a Redis TTL, the engine's idle timeout, so an abandoned
//! queue vanishes even if no engine ever runs maintenance; activity pushes it back. Skipped, and says so, without
//! `OFFLINE_QUEUE_REDIS_URL`.

#![cfg(feature = "redis")]

mod redis_support;

use std::time::Duration;

use offline_queue::storage::NewRecord;
use offline_queue::{
    MessageId, Quota, RecipientId, RedisStorage, Seq, Storage, StorageExt, Timestamp,
};

/// Asserts that `key` expires, and no later than `ttl` from now.
async fn assert_ttl_within(raw: &mut redis::aio::MultiplexedConnection, key: &str, ttl: Duration) {
    let pttl: i64 = redis::cmd("PTTL").arg(key).query_async(raw).await.unwrap();
    assert!(
        pttl > 0 && pttl <= ttl.as_millis() as i64,
        "{key} has no TTL ({pttl})"
    );
}

#[tokio::test]
async fn every_recipient_key_carries_a_ttl() {
    let Some(redis_support::Target::Single(url)) = redis_support::Target::single() else {
        return;
    };
    let prefix = redis_support::unique_prefix("ttl");
    let ttl = Duration::from_secs(3600);
    let storage = RedisStorage::options()
        .prefix(prefix.clone())
        .connect(&url)
        .await
        .unwrap();
    // The engine passes `Limits::idle_recipient_timeout` in every append's quota.
    let quota = Quota {
        idle_timeout: Some(ttl),
        ..Quota::UNLIMITED
    };
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let record = |dedup, ttl| NewRecord {
        id: MessageId::generate(),
        dedup,
        sent_at: now,
        expires_at: Some(now.saturating_add(Duration::from_secs(ttl))),
        body: b"hi\0".to_vec(),
    };
    // The second is due before the first: an exception to deadline order, so the
    // exceptions key exists too.
    storage
        .append(&bob, vec![record(false, 60), record(true, 30)], &quota, now)
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
    // Twice: a first delivery in order only moves the queue's watermark; a redelivery is
    // what writes the deliveries key.
    for _ in 0..2 {
        storage
            .mark_delivered(&bob, &[first.records[0].seq])
            .await
            .unwrap();
    }

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{626f62}}:*"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        keys.len() >= 6,
        "meta, log, exceptions, deliveries, dedup ids and times: {keys:?}"
    );
    for key in keys {
        assert_ttl_within(&mut raw, &key, ttl).await;
    }
    storage.remove_recipient(&bob).await.unwrap();
}

/// Purging progresses even past deadlines of records the queue no longer holds (keys drifted
/// apart, say by eviction), with any budget, and big appends fit in Lua's limits.
#[tokio::test]
async fn purge_progresses_and_big_batches_fit() {
    let Some(target @ redis_support::Target::Single(_)) = redis_support::Target::single() else {
        return;
    };
    let redis_support::Target::Single(url) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("purge");
    let storage = redis_support::fresh(&target, &prefix).await;
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::from_millis(1_700_000_000_000);
    let soon = now.saturating_add(Duration::from_secs(1));
    let records: Vec<NewRecord> = (0..5000u32)
        .map(|i| NewRecord {
            id: MessageId::generate(),
            dedup: i % 2 == 0,
            sent_at: now,
            // The first is due last, so the other 4,999 are exceptions to deadline order.
            expires_at: Some(if i == 0 {
                soon.saturating_add(Duration::from_millis(500))
            } else {
                soon
            }),
            body: i.to_be_bytes().to_vec(),
        })
        .collect();
    let appended = storage
        .append(&bob, records, &Quota::UNLIMITED, now)
        .await
        .expect("5,000 records in one append");
    assert_eq!(appended.records.len(), 5000);
    let seqs: Vec<Seq> = appended.records.iter().map(|r| r.seq()).collect();
    storage
        .mark_delivered(&bob, &seqs)
        .await
        .expect("5,000 marks in one call");

    // Drift: the exceptions list a record the queue does not hold.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{prefix}:{{626f62}}:x"))
        .arg(soon.as_millis())
        .arg(seqs[0].0 - 1)
        .query_async(&mut raw)
        .await
        .unwrap();

    let later = soon.saturating_add(Duration::from_secs(1));
    let purged = storage.purge(later, None, usize::MAX).await.unwrap();
    assert_eq!(purged.expired, 5000, "every record it held");
    assert!(!purged.more);
    let again = storage.purge(later, None, usize::MAX).await.unwrap();
    assert_eq!(
        (again.expired, again.more),
        (0, false),
        "nothing left, no loop"
    );
    storage.remove_recipient(&bob).await.unwrap();
}

/// A "latest only" queue (one message, `DropOldest`): each append drops the one record there
/// was, which deletes the log, and the log the append then writes carries a TTL again.
#[tokio::test]
async fn a_log_recreated_after_drop_oldest_keeps_a_ttl() {
    let Some(redis_support::Target::Single(url)) = redis_support::Target::single() else {
        return;
    };
    let prefix = redis_support::unique_prefix("ttl-drop");
    let ttl = Duration::from_secs(3600);
    let storage = RedisStorage::options()
        .prefix(prefix.clone())
        .connect(&url)
        .await
        .unwrap();
    // The engine passes `Limits::idle_recipient_timeout` in every append's quota.
    let quota = Quota {
        idle_timeout: Some(ttl),
        ..Quota::UNLIMITED
    };
    let bob = RecipientId::new("bob").unwrap();
    let latest_only = Quota {
        max_messages: 1,
        overflow: offline_queue::Overflow::DropOldest,
        ..quota
    };
    let now = Timestamp::now_system();
    for body in [&b"one"[..], b"two", b"three"] {
        let record = NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: now,
            expires_at: None,
            body: body.to_vec(),
        };
        storage
            .append(&bob, vec![record], &latest_only, now)
            .await
            .unwrap();
    }
    let batch = storage
        .read(&bob, None, offline_queue::BatchLimit::default(), now)
        .await
        .unwrap();
    let bodies: Vec<&[u8]> = batch.records.iter().map(|r| &r.body[..]).collect();
    assert_eq!(bodies, [&b"three"[..]]);

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    assert_ttl_within(&mut raw, &format!("{prefix}:{{626f62}}:l"), ttl).await;
    storage.remove_recipient(&bob).await.unwrap();
}

/// A record acked before its deadline leaves the exceptions set with it, so a queue that
/// never empties (here held open by a record that never expires) keeps no entry per record
/// it ever held.
#[tokio::test]
async fn exceptions_leave_with_their_records() {
    let Some(redis_support::Target::Single(url)) = redis_support::Target::single() else {
        return;
    };
    let prefix = redis_support::unique_prefix("exceptions");
    let storage = RedisStorage::options()
        .prefix(prefix.clone())
        .connect(&url)
        .await
        .unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let record = |expires_at| NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at,
        body: b"x".to_vec(),
    };
    // The first never expires, so every later one with a deadline is an exception.
    let soon = Some(now.saturating_add(Duration::from_secs(60)));
    let seqs: Vec<Seq> = storage
        .append(
            &bob,
            vec![record(None), record(soon), record(soon), record(soon)],
            &Quota::UNLIMITED,
            now,
        )
        .await
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq())
        .collect();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let exceptions = format!("{prefix}:{{626f62}}:x");
    let listed: u64 = redis::cmd("ZCARD")
        .arg(&exceptions)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(listed, 3);

    assert_eq!(storage.ack_seqs(&bob, &seqs[1..], now).await.unwrap(), 3);
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 1);
    let listed: u64 = redis::cmd("ZCARD")
        .arg(&exceptions)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(listed, 0, "acked records are no exceptions any more");
    storage.remove_recipient(&bob).await.unwrap();
}

/// The PTTL of each of bob's keys under `prefix`.
async fn pttls(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<(String, i64)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{626f62}}:*"))
        .query_async(raw)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(raw).await.unwrap();
        out.push((key, pttl));
    }
    out
}

/// The idle TTL travels with the queue: an ack through a node that never appended refreshes
/// the keys by the value the last append stored, and an append with no idle timeout takes
/// the TTLs away, so a queue the engine keeps is not lost to an earlier setting.
#[tokio::test]
async fn the_idle_ttl_lives_in_the_queue_and_none_keeps_it() {
    let Some(target @ redis_support::Target::Single(_)) = redis_support::Target::single() else {
        return;
    };
    let redis_support::Target::Single(url) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("ttl-travels");
    let sender = redis_support::fresh(&target, &prefix).await;
    let reader = redis_support::fresh(&target, &prefix).await;
    let bob = RecipientId::new("bob").unwrap();
    let hour = Duration::from_secs(3600);
    let now = Timestamp::now_system();
    let record = || NewRecord {
        id: MessageId::generate(),
        dedup: true,
        sent_at: now,
        expires_at: None,
        body: b"x".to_vec(),
    };
    let with_idle = |idle| Quota {
        idle_timeout: idle,
        ..Quota::UNLIMITED
    };
    let seqs: Vec<Seq> = sender
        .append(&bob, vec![record(), record()], &with_idle(Some(hour)), now)
        .await
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq())
        .collect();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    // As if most of the hour had passed: every key is about to vanish.
    for (key, _) in pttls(&mut raw, &prefix).await {
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(&key)
            .arg(60_000)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    // An ack a minute later (past a 64th of the hour), through the other node.
    let later = now.saturating_add(Duration::from_secs(60));
    assert_eq!(reader.ack_seqs(&bob, &seqs[..1], later).await.unwrap(), 1);
    let refreshed = pttls(&mut raw, &prefix).await;
    assert!(refreshed.len() >= 4, "{refreshed:?}");
    for (key, pttl) in &refreshed {
        assert!(
            *pttl > 60_000 && *pttl <= hour.as_millis() as i64,
            "{key} refreshed to the hour: {pttl}"
        );
    }
    // The engine now keeps idle queues: the next append takes every TTL away.
    sender
        .append(&bob, vec![record()], &with_idle(None), later)
        .await
        .unwrap();
    let kept = pttls(&mut raw, &prefix).await;
    assert!(kept.len() >= 4, "{kept:?}");
    for (key, pttl) in &kept {
        assert_eq!(*pttl, -1, "{key} has no TTL any more");
    }
    sender.remove_recipient(&bob).await.unwrap();
}

/// Metadata written before it held the idle TTL (17 fields) is read, keeps the TTLs its keys
/// have until an append brings one, and is written back whole.
#[tokio::test]
async fn metadata_without_the_idle_ttl_is_read_and_upgraded() {
    let Some(target @ redis_support::Target::Single(_)) = redis_support::Target::single() else {
        return;
    };
    let redis_support::Target::Single(url) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("ttl-upgrade");
    let storage = redis_support::fresh(&target, &prefix).await;
    let bob = RecipientId::new("bob").unwrap();
    let now = Timestamp::now_system();
    let record = || NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: None,
        body: b"x".to_vec(),
    };
    let quota = Quota {
        idle_timeout: Some(Duration::from_secs(3600)),
        ..Quota::UNLIMITED
    };
    let first = storage
        .append(&bob, vec![record(), record()], &quota, now)
        .await
        .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let meta = format!("{prefix}:{{626f62}}:m2");
    let packed: Vec<u8> = redis::cmd("GET")
        .arg(&meta)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(packed.len(), 18 * 8, "18 fields now");
    let _: () = redis::cmd("SET")
        .arg(&meta)
        .arg(&packed[..17 * 8])
        .arg("KEEPTTL")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 2);
    let later = now.saturating_add(Duration::from_secs(120));
    storage
        .ack_seqs(&bob, &[first.records[0].seq()], later)
        .await
        .unwrap();
    for (key, pttl) in pttls(&mut raw, &prefix).await {
        assert!(pttl > 0, "{key} keeps its TTL: {pttl}");
    }
    storage
        .append(&bob, vec![record()], &quota, later)
        .await
        .unwrap();
    let packed: Vec<u8> = redis::cmd("GET")
        .arg(&meta)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(packed.len(), 18 * 8, "written back whole");
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 2);
    storage.remove_recipient(&bob).await.unwrap();
}
