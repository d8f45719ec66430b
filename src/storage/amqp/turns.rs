//! One turn at a time per queue name, for steps on one queue that must not overlap on a node
//! (its first declare; its appends, so the broker receives them in stamp order).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The turns being taken or waited for, by queue name; a name's entry goes with its last turn.
#[derive(Default)]
pub(super) struct Turns(parking_lot::Mutex<HashMap<String, Arc<Mutex<()>>>>);

/// A turn on one queue, until dropped.
pub(super) struct Turn<'a> {
    turns: &'a Turns,
    name: String,
    lock: Arc<Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for the turn on `name`: callers get it one at a time, in the order they asked.
    pub(super) async fn take(&self, name: &str) -> Turn<'_> {
        let lock = self.0.lock().entry(name.to_owned()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Turn {
            turns: self,
            name: name.to_owned(),
            lock,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut turns = self.turns.0.lock();
        // The map's reference and this turn's: nobody else holds or waits for this name (a
        // waiter clones it under this same lock, so none can start meanwhile).
        if Arc::strong_count(&self.lock) == 2 {
            turns.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_on_one_name_come_one_at_a_time_and_leave_nothing_behind() {
        let turns = Turns::default();
        let first = turns.take("q").await;
        let other = turns.take("r").await; // another name does not wait
        let mut second = Box::pin(turns.take("q"));
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "waits while the first turn is held"
        );
        drop(first);
        assert_eq!(turns.len(), 2, "kept while a caller waits for it");
        let second = second.await;
        drop(second);
        drop(other);
        assert_eq!(turns.len(), 0);
    }
}
