//! `Capabilities::durable` on Redis says what the server does: true only when every master
//! keeps an append-only file, or when the options declare it. Skipped, and says so, without
//! `OFFLINE_QUEUE_REDIS_URL` / `OFFLINE_QUEUE_REDIS_CLUSTER_URLS`.

#![cfg(feature = "redis")]

mod redis_support;

use offline_queue::{RedisStorage, Storage};
use redis_support::Target;

async fn connect(target: &Target, options: offline_queue::RedisOptions) -> RedisStorage {
    match target {
        Target::Single(url) => options.connect(url).await,
        Target::Cluster(urls) => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            options.connect_cluster(&urls).await
        }
    }
    .expect("redis answers")
}

async fn appendonly(url: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let (_, value): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut raw)
        .await
        .unwrap();
    value
}

async fn set_appendonly(url: &str, on: bool) {
    let client = redis::Client::open(url).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg(if on { "yes" } else { "no" })
        .exec_async(&mut raw)
        .await
        .unwrap();
}

#[tokio::test]
async fn one_server_is_durable_as_its_appendonly_says() {
    let Some(target @ Target::Single(_)) = Target::single() else {
        return;
    };
    let Target::Single(url) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("durable");
    let expected = appendonly(url).await == "yes";
    let storage = connect(&target, RedisStorage::options().prefix(&prefix)).await;
    assert_eq!(storage.capabilities().durable, expected);
    for declared in [true, false] {
        let storage = connect(
            &target,
            RedisStorage::options()
                .prefix(&prefix)
                .assume_durable(declared),
        )
        .await;
        assert_eq!(storage.capabilities().durable, declared, "as declared");
    }
}

/// Every master is asked: one without the append-only file makes the whole not durable.
#[tokio::test]
async fn a_cluster_is_durable_only_when_every_master_is() {
    let Some(target @ Target::Cluster(_)) = Target::cluster() else {
        return;
    };
    let Target::Cluster(urls) = &target else {
        unreachable!()
    };
    let prefix = redis_support::unique_prefix("durable-cluster");
    let before: Vec<String> = futures::future::join_all(urls.iter().map(|u| appendonly(u))).await;
    let (first, rest) = urls.split_first().unwrap();
    set_appendonly(first, false).await;
    for url in rest {
        set_appendonly(url, true).await;
    }
    let mixed = connect(&target, RedisStorage::options().prefix(&prefix)).await;
    let mixed = mixed.capabilities().durable;
    set_appendonly(first, true).await;
    let all = connect(&target, RedisStorage::options().prefix(&prefix)).await;
    let all = all.capabilities().durable;
    for (url, value) in urls.iter().zip(&before) {
        set_appendonly(url, value == "yes").await;
    }
    assert!(!mixed, "one master without an append-only file");
    assert!(all, "every master with one");
}
