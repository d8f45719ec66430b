//! What the NATS tests share: the server's URL or a recorded skip, and storages on streams of
//! their own, deleted when done.

#![allow(dead_code)]

#[allow(clippy::duplicate_mod)]
#[path = "../skip_support/mod.rs"]
pub mod skip_support;

pub mod own_server;

use offline_queue::{MessageId, NatsStorage, OwnedNatsStorage};
use own_server::NEWER_NATS_SERVER;
use parking_lot::Mutex;

/// `OFFLINE_QUEUE_NATS_URL`, or `None` with the skip recorded; a failure instead under
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1`.
pub fn url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "OFFLINE_QUEUE_NATS_URL is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires it"
            );
            skip_support::record("OFFLINE_QUEUE_NATS_URL is not set");
            None
        }
    }
}

/// The newer server's path, or `None` with the skip recorded; a failure instead under
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1`.
pub fn newer_nats_server() -> Option<String> {
    match std::env::var(NEWER_NATS_SERVER) {
        Ok(path) if !path.is_empty() => {
            assert!(
                std::path::Path::new(&path).exists(),
                "{NEWER_NATS_SERVER}={path} does not exist"
            );
            Some(path)
        }
        _ => {
            assert!(
                std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "{NEWER_NATS_SERVER} is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires it"
            );
            skip_support::record(&format!(
                "{NEWER_NATS_SERVER} is not set (.ci/newer-nats-server prints a path for it)"
            ));
            None
        }
    }
}

/// A newer server ([`newer_nats_server`]) of the test's own on a free port, storing under
/// `dir` and serving its monitoring endpoints on `monitor` if given, started; with its URL.
/// `None` (the skip recorded) when no newer server is named.
pub fn start_newer_server(
    dir: &std::path::Path,
    monitor: Option<u16>,
) -> Option<(own_server::OwnNats, String)> {
    let newer = newer_nats_server()?;
    let port = own_server::free_port();
    let mut server = own_server::OwnNats::new(dir, "newer", port, None);
    server.program(&newer);
    if let Some(monitor) = monitor {
        server.monitor(monitor);
    }
    server.start();
    Some((server, format!("nats://127.0.0.1:{port}")))
}

/// A subject prefix no other run uses.
pub fn unique_prefix() -> String {
    format!("oqtest.{}", MessageId::generate())
}

/// Streams made by a test, deleted by [`Streams::delete`].
#[derive(Default)]
pub struct Streams(Mutex<Vec<String>>);

impl Streams {
    /// A storage on streams and a prefix of its own.
    pub async fn storage(&self, url: &str) -> NatsStorage {
        let name = unique_name();
        self.0.lock().push(name.clone());
        connect(url, &name).await
    }

    /// An [`OwnedNatsStorage`] on streams and a prefix of its own.
    pub async fn owned_storage(&self, url: &str) -> OwnedNatsStorage {
        let name = unique_name();
        self.0.lock().push(name.clone());
        connect_owned(url, &name).await
    }

    pub async fn delete(&self, url: &str) {
        let names = std::mem::take(&mut *self.0.lock());
        delete(url, &names).await;
    }
}

/// A name for a test's streams and prefix, unique to it.
pub fn unique_name() -> String {
    // The whole id: its first half is a clock, alike for two tests started together.
    format!("OQT_{}", MessageId::generate())
}

/// A storage on the streams called `name` (made if missing), subjects under a prefix of the
/// same name.
pub async fn connect(url: &str, name: &str) -> NatsStorage {
    NatsStorage::options()
        .stream(name)
        .prefix(name)
        .connect(url)
        .await
        .expect("nats answers")
}

/// An `OwnedNatsStorage` on the streams called `name` (made if missing), subjects under a
/// prefix of the same name.
#[allow(dead_code)]
pub async fn connect_owned(url: &str, name: &str) -> OwnedNatsStorage {
    NatsStorage::options()
        .stream(name)
        .prefix(name)
        .connect_owned(url)
        .await
        .expect("nats answers")
}

/// Deletes the streams called `names`.
pub async fn delete(url: &str, names: &[String]) {
    let context = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    for name in names {
        for suffix in ["", "_META", "_DEDUP", "_LOG", "_PAGES", "_STATE"] {
            let _ = context.delete_stream(format!("{name}{suffix}")).await;
        }
    }
}
