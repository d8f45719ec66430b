//! The shared conformance suite against `NatsStorage` (feature `nats`), each check on streams
//! of its own, deleted at the end. Needs `OFFLINE_QUEUE_NATS_URL` (skipped, and says so, when
//! it is unset).

#![cfg(all(feature = "nats", feature = "testing"))]

#[path = "skip_support/mod.rs"]
mod skip_support;

use std::sync::Arc;

use offline_queue::{MessageId, NatsStorage, Storage, testing};
use parking_lot::Mutex;

fn url() -> Option<String> {
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

/// Streams made by a test, deleted when it ends.
#[derive(Default)]
struct Streams(Mutex<Vec<String>>);

impl Streams {
    async fn storage(&self, url: &str) -> NatsStorage {
        let id = MessageId::generate().to_string();
        let stream = format!("OQT_{}", &id[..16]);
        self.0.lock().push(stream.clone());
        NatsStorage::options()
            .stream(&stream)
            .prefix(format!("oqt.{}", &id[..16]))
            .connect(url)
            .await
            .expect("nats answers")
    }

    async fn delete(&self, url: &str) {
        let context = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let names = std::mem::take(&mut *self.0.lock());
        for name in names {
            for suffix in ["", "_META", "_DEDUP"] {
                let _ = context.delete_stream(format!("{name}{suffix}")).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_storage_passes_the_conformance_suite() {
    let Some(url) = url() else {
        return;
    };
    let streams = Arc::new(Streams::default());
    testing::run_all(|| {
        let (streams, url) = (streams.clone(), url.clone());
        async move { Arc::new(streams.storage(&url).await) as Arc<dyn Storage> }
    })
    .await;
    streams.delete(&url).await;
}
