//! Bad input for `RedisStorage`: a URL that does not parse, a server that does not answer, a
//! bad prefix, and our keys holding someone else's data (left untouched).

#![cfg(feature = "redis")]

mod redis_support;

use offline_queue::storage::NewRecord;
use offline_queue::{Error, MessageId, Quota, RecipientId, RedisStorage, Storage, Timestamp};

#[tokio::test]
async fn a_url_that_does_not_parse_is_named() {
    let error = RedisStorage::connect("not a url").await.unwrap_err();
    assert!(matches!(error, Error::InvalidConfig { .. }), "{error:?}");
    assert!(error.to_string().contains("not a url"), "{error}");
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_named_and_retryable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let error = RedisStorage::connect(&url).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(error.to_string().contains(&url), "{error}");
}

#[tokio::test]
async fn a_prefix_with_braces_is_refused() {
    let Some(redis_support::Target::Single(url)) = redis_support::Target::single() else {
        return;
    };
    let error = RedisStorage::options()
        .prefix("a{b}")
        .connect(&url)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfig { .. }), "{error:?}");
}

#[tokio::test]
async fn a_total_byte_budget_without_tracking_is_refused_at_build() {
    let Some(target @ redis_support::Target::Single(_)) = redis_support::Target::single() else {
        return;
    };
    let redis_support::Target::Single(url) = &target else {
        unreachable!()
    };
    let limits = offline_queue::Limits {
        max_total_bytes: Some(1 << 20),
        ..offline_queue::Limits::default()
    };
    let untracked = RedisStorage::options()
        .prefix(redis_support::unique_prefix("budget"))
        .connect(url)
        .await
        .unwrap();
    let error = offline_queue::OfflineQueue::builder()
        .storage(std::sync::Arc::new(untracked))
        .limits(limits.clone())
        .build()
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidConfig {
                field: "max_total_bytes",
                ..
            }
        ),
        "{error:?}"
    );
    // With tracking on (as `redis_support` opens it), the same limits build.
    let tracked = redis_support::fresh(&target, &redis_support::unique_prefix("budget")).await;
    offline_queue::OfflineQueue::builder()
        .storage(std::sync::Arc::new(tracked))
        .limits(limits)
        .build()
        .unwrap();
}

/// A storage under a fresh prefix on the single server, with a plain connection beside it
/// to plant someone else's data; `None` (skipped) without `OFFLINE_QUEUE_REDIS_URL`.
async fn with_raw_connection(
    what: &str,
) -> Option<(String, RedisStorage, redis::aio::MultiplexedConnection)> {
    let target @ redis_support::Target::Single(_) = redis_support::Target::single()? else {
        return None;
    };
    let redis_support::Target::Single(url) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix(what);
    let storage = redis_support::fresh(&target, &prefix).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let raw = client.get_multiplexed_async_connection().await.unwrap();
    Some((prefix, storage, raw))
}

#[tokio::test]
async fn keys_holding_another_type_are_an_error_and_stay_untouched() {
    let Some((prefix, storage, mut raw)) = with_raw_connection("wrongtype").await else {
        return;
    };
    // Someone else's list where our dedup hash for "bob" would be.
    let theirs = format!("{prefix}:{{626f62}}:u");
    let _: () = redis::cmd("RPUSH")
        .arg(&theirs)
        .arg("their data")
        .query_async(&mut raw)
        .await
        .unwrap();

    let bob = RecipientId::new("bob").unwrap();
    let record = greeting();
    let error = storage
        .append(
            &bob,
            vec![record],
            &Quota::UNLIMITED,
            Timestamp::now_system(),
        )
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert!(error.to_string().contains("another type"), "{error}");
    let kept: Vec<String> = redis::cmd("LRANGE")
        .arg(&theirs)
        .arg(0)
        .arg(-1)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kept, ["their data"], "their data untouched");
    let meta: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:{{626f62}}:m2"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(meta, 0, "nothing of ours written");
    let _: () = redis::cmd("DEL")
        .arg(&theirs)
        .query_async(&mut raw)
        .await
        .unwrap();
}

/// Metadata of another layout (another build of the crate, or someone else's string) is an
/// error for every step of that recipient, and stays as it was.
#[tokio::test]
async fn metadata_of_another_layout_is_an_error_and_stays_untouched() {
    let Some((prefix, storage, mut raw)) = with_raw_connection("layout").await else {
        return;
    };
    let meta = format!("{prefix}:{{626f62}}:m2");
    let theirs = vec![1u8; 96];
    let _: () = redis::cmd("SET")
        .arg(&meta)
        .arg(&theirs)
        .query_async(&mut raw)
        .await
        .unwrap();

    let bob = RecipientId::new("bob").unwrap();
    let record = greeting();
    let now = Timestamp::now_system();
    let appended = storage
        .append(&bob, vec![record], &Quota::UNLIMITED, now)
        .await
        .unwrap_err();
    let read = storage
        .read(&bob, None, offline_queue::BatchLimit::default(), now)
        .await
        .unwrap_err();
    for error in [appended, read] {
        assert!(!error.is_retryable(), "{error:?}");
        assert!(error.to_string().contains("another version"), "{error}");
    }
    let kept: Vec<u8> = redis::cmd("GET")
        .arg(&meta)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kept, theirs, "left as it was");
    let _: () = redis::cmd("DEL")
        .arg(&meta)
        .query_async(&mut raw)
        .await
        .unwrap();
}

/// A record to store, sent now and never expiring.
fn greeting() -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: Timestamp::now_system(),
        expires_at: None,
        body: b"hi\0".to_vec(),
    }
}
