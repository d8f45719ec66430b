//! The shared conformance suite against `NatsStorage` (feature `nats`), each check on streams
//! of its own, deleted at the end. Needs `OFFLINE_QUEUE_NATS_URL` (skipped, and says so, when
//! it is unset).

#![cfg(all(feature = "nats", feature = "testing"))]

mod nats_support;

use std::sync::Arc;

use nats_support::{Streams, url};
use offline_queue::{Storage, testing};

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
