//! The shared conformance suite against `MemoryStorage`, with one and with many shards.

use std::sync::Arc;

use offline_queue::storage::{
    Ack, AppendOutcome, Capabilities, NewRecord, PurgeOutcome, ReadBatch, RecipientStats,
};
use offline_queue::{
    BatchLimit, MemoryStorage, Quota, RecipientId, Result, Seq, Storage, Timestamp, testing,
};

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

/// A storage whose purge does nothing, saying so: the suite skips what it cannot do (a medium
/// that expires and removes idle queues by its own clock) and checks the rest.
struct PurgesNothing(MemoryStorage);

#[async_trait::async_trait]
impl Storage for PurgesNothing {
    fn capabilities(&self) -> Capabilities {
        let full = self.0.capabilities();
        Capabilities::default()
            .with_exact_contract()
            .with_max_read_batch(full.max_read_batch)
            .with_total_byte_budget(full.total_byte_budget)
    }
    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<NewRecord>,
        quota: &Quota,
        now: Timestamp,
    ) -> Result<AppendOutcome> {
        self.0.append(recipient, records, quota, now).await
    }
    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<Seq>,
        limit: BatchLimit,
        now: Timestamp,
    ) -> Result<ReadBatch> {
        self.0.read(recipient, after, limit, now).await
    }
    async fn mark_delivered(&self, recipient: &RecipientId, seqs: &[Seq]) -> Result<()> {
        self.0.mark_delivered(recipient, seqs).await
    }
    async fn ack(&self, recipient: &RecipientId, ack: &Ack, now: Timestamp) -> Result<u64> {
        self.0.ack(recipient, ack, now).await
    }
    async fn purge(
        &self,
        _now: Timestamp,
        _idle_before: Option<Timestamp>,
        _budget: usize,
    ) -> Result<PurgeOutcome> {
        Ok(PurgeOutcome::default())
    }
    async fn stats(&self, recipient: &RecipientId) -> Result<RecipientStats> {
        self.0.stats(recipient).await
    }
    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        self.0.remove_recipient(recipient).await
    }
}

#[test]
fn the_suite_skips_purging_by_capability_and_checks_the_rest() {
    futures::executor::block_on(testing::run_all(|| async {
        Arc::new(PurgesNothing(MemoryStorage::new())) as Arc<dyn Storage>
    }));
}
