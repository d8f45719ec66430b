//! The conformance suite: the [`Storage`] contract written once, for every backend, in-tree or
//! not (as arrow-rs `object_store` does with its integration tests).
//!
//! ```
//! # futures::executor::block_on(async {
//! use std::sync::Arc;
//! use offline_queue::{MemoryStorage, Storage};
//! offline_queue::testing::run_all(|| async { Arc::new(MemoryStorage::new()) as Arc<dyn Storage> }).await;
//! # });
//! ```
//!
//! Each check is also public on its own, taking a fresh, empty storage. Checks panic with a
//! message naming the broken rule. Time is passed explicitly, so no check sleeps.

use std::future::Future;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::limits::{BatchLimit, Quota};
use crate::message::{MessageId, RecipientId, Seq};
use crate::storage::{Appended, NewRecord, Storage, StorageExt};

mod acks;
mod dedup;
mod delivery;
mod engine;
mod expiry;
mod isolation;
mod order;
mod quotas;
mod stats;

pub use acks::{acks, loss_confirmation_is_idempotent, passed_over_counts_once};
pub use dedup::dedup;
pub use delivery::{delivery_counts, read_for_delivery, read_for_delivery_with_ack};
pub use engine::{engine_round_trip, engine_sends_keep_poll_order};
pub use expiry::{
    expiry, idle_from_the_append_that_refilled, idle_refiling_is_bounded, idle_removal,
    purge_budget, purge_work_is_proportional,
};
pub use isolation::isolation;
pub use order::{
    appends_in_poll_order, concurrent_appends, order_and_seqs, read_bounds,
    seqs_never_reused_after_empty,
};
pub use quotas::{
    append_one, global_budget, global_budget_full_then_retry, quota_drop_oldest,
    quota_reject_is_atomic,
};
pub use stats::stats_and_remove;

/// The time every check starts at.
pub const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// A recipient id for tests.
pub fn recipient(name: &str) -> RecipientId {
    RecipientId::new(name).expect("valid test recipient")
}

/// A record with a fresh id, no dedup, sent at `T0`, never expiring.
pub fn record(body: &[u8]) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: T0,
        expires_at: None,
        body: body.to_vec(),
    }
}

fn expiring(body: &[u8], expires_at: Timestamp) -> NewRecord {
    NewRecord {
        expires_at: Some(expires_at),
        ..record(body)
    }
}

fn deduped(body: &[u8], id: MessageId) -> NewRecord {
    NewRecord {
        id,
        dedup: true,
        ..record(body)
    }
}

const ALL: BatchLimit = BatchLimit {
    max_messages: usize::MAX,
    max_bytes: usize::MAX,
};

async fn bodies(storage: &dyn Storage, who: &RecipientId, now: Timestamp) -> Vec<Vec<u8>> {
    storage
        .read_all(who, now)
        .await
        .expect("read_all")
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

async fn append(storage: &dyn Storage, who: &RecipientId, records: Vec<NewRecord>) -> Vec<Seq> {
    storage
        .append(who, records, &Quota::UNLIMITED, T0)
        .await
        .expect("append")
        .records
        .into_iter()
        .map(Appended::seq)
        .collect()
}

/// Polls `future` once with a waker that does nothing, so it does now whatever it does before
/// it first waits; its output if that finished it. Poll it on (or await it) otherwise.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(future).poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Runs every check, each against a fresh storage from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Storage>>,
{
    order_and_seqs(&*make().await).await;
    seqs_never_reused_after_empty(&*make().await).await;
    read_bounds(&*make().await).await;
    acks(&*make().await).await;
    delivery_counts(&*make().await).await;
    read_for_delivery(&*make().await).await;
    read_for_delivery_with_ack(&*make().await).await;
    dedup(&*make().await).await;
    quota_reject_is_atomic(&*make().await).await;
    quota_drop_oldest(&*make().await).await;
    append_one(&*make().await).await;
    loss_confirmation_is_idempotent(&*make().await).await;
    global_budget(&*make().await).await;
    global_budget_full_then_retry(&*make().await).await;
    expiry(&*make().await).await;
    passed_over_counts_once(&*make().await).await;
    purge_budget(&*make().await).await;
    purge_work_is_proportional(&*make().await).await;
    idle_removal(&*make().await).await;
    idle_refiling_is_bounded(&*make().await).await;
    idle_from_the_append_that_refilled(&*make().await).await;
    isolation(&*make().await).await;
    stats_and_remove(&*make().await).await;
    concurrent_appends(make().await).await;
    appends_in_poll_order(make().await).await;
    engine_round_trip(make().await).await;
    engine_sends_keep_poll_order(make().await).await;
}
