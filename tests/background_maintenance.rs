//! `OfflineQueue::background_maintenance` (feature `tokio`), on tokio's paused clock: each
//! step below runs when the runtime has nothing else to do, so no timing is guessed.

#![cfg(feature = "tokio")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use offline_queue::{
    Envelope, Error, ManualClock, MemoryStorage, OfflineQueue, RecipientId, Timestamp,
};

const EVERY: Duration = Duration::from_secs(10);

fn queue(clock: &ManualClock) -> OfflineQueue {
    OfflineQueue::builder()
        .storage(Arc::new(MemoryStorage::new()))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap()
}

async fn send_expiring(queue: &OfflineQueue, to: &RecipientId, n: usize) {
    for _ in 0..n {
        let envelope = Envelope::new(to.clone(), "soon gone").with_ttl(Duration::from_secs(1));
        queue.send(envelope).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn purges_on_each_tick_and_ends_with_the_engine() {
    let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
    let queue = queue(&clock);
    let bob = RecipientId::new("bob").unwrap();
    send_expiring(&queue, &bob, 3).await;
    clock.advance(Duration::from_secs(2));

    let task = tokio::spawn(queue.background_maintenance(EVERY, 1_000).unwrap());
    // The first tick runs as soon as the task is polled.
    tokio::task::yield_now().await;
    assert_eq!(queue.metrics().expired, 3);
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 0);

    send_expiring(&queue, &bob, 2).await;
    clock.advance(Duration::from_secs(2));
    // Not before the next tick...
    tokio::time::sleep(EVERY / 2).await;
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 2);
    // ...and on it.
    tokio::time::sleep(EVERY).await;
    assert_eq!(queue.metrics().expired, 5);
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 0);

    drop(queue);
    tokio::time::timeout(EVERY * 2, task)
        .await
        .expect("the task ends once the engine is dropped")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn more_work_than_the_budget_runs_again_without_waiting_a_tick() {
    let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
    let queue = queue(&clock);
    for i in 0..10 {
        send_expiring(&queue, &RecipientId::new(format!("r{i}")).unwrap(), 10).await;
    }
    clock.advance(Duration::from_secs(2));
    let _task = tokio::spawn(queue.background_maintenance(EVERY, 7).unwrap());
    // 100 expired at 7 per call: 15 calls, all before the first tick's wait is over.
    tokio::time::sleep(EVERY / 2).await;
    assert_eq!(queue.metrics().expired, 100);
}

#[tokio::test(start_paused = true)]
async fn a_failing_call_is_retried_on_the_next_tick_not_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let storage = common::Shaped::new();
    storage.fail_purges.store(true, SeqCst);
    let purges = storage.purges.clone();
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage))
        .build()
        .unwrap();
    let _task = tokio::spawn(queue.background_maintenance(EVERY, 10).unwrap());
    tokio::time::sleep(EVERY / 2).await;
    assert_eq!(purges.load(SeqCst), 1);
    tokio::time::sleep(EVERY).await;
    assert_eq!(purges.load(SeqCst), 2);
}

#[test]
fn a_zero_interval_or_budget_is_refused() {
    let queue = queue(&ManualClock::new(Timestamp::from_millis(0)));
    let error = queue
        .background_maintenance(Duration::ZERO, 10)
        .err()
        .unwrap();
    assert!(
        matches!(error, Error::InvalidConfig { field: "every", .. }),
        "{error:?}"
    );
    let error = queue.background_maintenance(EVERY, 0).err().unwrap();
    assert!(
        matches!(
            error,
            Error::InvalidConfig {
                field: "budget",
                ..
            }
        ),
        "{error:?}"
    );
}
