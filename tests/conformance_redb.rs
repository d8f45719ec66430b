//! The shared conformance suite against `RedbStorage`, each check on a fresh file.

#![cfg(feature = "redb")]

use std::sync::Arc;

use offline_queue::{RedbStorage, Storage, testing};

#[test]
fn redb_storage_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    futures::executor::block_on(testing::run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("conformance-{n}.redb"));
        async move { Arc::new(RedbStorage::open(path).unwrap()) as Arc<dyn Storage> }
    }));
}
