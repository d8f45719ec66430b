//! A ready background task for [`OfflineQueue::maintain`] on tokio (feature `tokio`).

use std::sync::Arc;
use std::time::Duration;

use super::OfflineQueue;
use crate::error::{Error, Result};

impl OfflineQueue {
    /// A future that calls [`maintain`](Self::maintain)`(budget)`, then waits `every`, and
    /// again, for hosts on tokio that would rather spawn it than run a timer of their own:
    ///
    /// ```no_run
    /// # async fn run(queue: offline_queue::OfflineQueue) -> offline_queue::Result<()> {
    /// use std::time::Duration;
    /// tokio::spawn(queue.background_maintenance(Duration::from_secs(5), 10_000)?);
    /// # Ok(()) }
    /// ```
    ///
    /// When a call reports more work left ([`MaintenanceReport::more`](super::MaintenanceReport::more)),
    /// the next runs at once (after yielding to the runtime), not after `every`. A failing call
    /// is logged (`tracing` warning) and retried on the next tick. Nudges for sessions that
    /// ended with messages pending go out on a tick, so pick `every` well under
    /// [`NotifyPolicy::unacked_delay`](crate::NotifyPolicy::unacked_delay).
    ///
    /// The task holds the engine weakly: it ends by itself once every other handle (the
    /// `OfflineQueue` clones and the sessions) is dropped. Abort its `JoinHandle` to stop it
    /// sooner.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero `every` or `budget`.
    pub fn background_maintenance(
        &self,
        every: Duration,
        budget: usize,
    ) -> Result<impl Future<Output = ()> + Send + 'static> {
        if every.is_zero() {
            return Err(Error::InvalidConfig {
                field: "every",
                reason: "must be longer than zero".into(),
            });
        }
        if budget == 0 {
            return Err(Error::InvalidConfig {
                field: "budget",
                reason: "must be at least 1".into(),
            });
        }
        let engine = Arc::downgrade(&self.inner);
        Ok(async move {
            loop {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                let result = OfflineQueue { inner }.maintain(budget).await;
                match result {
                    Ok(report) if report.more => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "maintenance failed; retried next tick"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}
