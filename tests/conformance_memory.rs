//! The shared conformance suite against `MemoryStorage`, with one and with many shards.

use std::sync::Arc;

use offline_queue::{MemoryStorage, Storage, testing};

#[test]
fn memory_storage_passes_the_conformance_suite() {
    futures::executor::block_on(testing::run_all(|| async {
        Arc::new(MemoryStorage::new()) as Arc<dyn Storage>
    }));
}

#[test]
fn single_shard_memory_storage_passes_the_conformance_suite() {
    futures::executor::block_on(testing::run_all(|| async {
        Arc::new(MemoryStorage::with_shards(1)) as Arc<dyn Storage>
    }));
}
