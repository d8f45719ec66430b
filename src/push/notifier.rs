//! [`PushNotifier`]: the queue and the task between the engine's nudges and the push services.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::{Device, PushError, PushTargets};
use crate::message::RecipientId;
use crate::notifier::{Notifier, NotifyError, Nudge};

/// How one request to a push service went, as its provider reads the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushAttempt {
    /// The push service accepted the push.
    Delivered,
    /// The push service says the device is gone (uninstalled app, expired token, cancelled
    /// subscription): [`PushTargets::device_gone`] is told, and nothing is retried.
    DeviceGone,
    /// Worth trying again: throttled (429), the service unavailable (5xx), or no answer.
    Retry {
        /// How long the service asked to wait (`Retry-After`); otherwise the notifier backs off
        /// on its own.
        after: Option<Duration>,
        /// What happened, for the log.
        reason: String,
    },
    /// Refused for good (a malformed request, bad credentials): counted and logged, not
    /// retried.
    Rejected(String),
}

/// One push service. [`PushNotifier`] calls [`push`](PushProvider::push) once per attempt
/// and device, with a timeout around it, and does the retrying itself.
#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// A short name for logs and errors (`"web-push"`).
    fn name(&self) -> &'static str;

    /// Whether this provider reaches `device`.
    fn serves(&self, device: &Device) -> bool;

    /// Sends `nudge` to `device`, once, and reads the answer.
    async fn push(&self, device: &Device, nudge: &Nudge) -> PushAttempt;
}

/// How [`PushNotifier`] queues, sends and retries. Start from `PushOptions::default()` and set
/// the fields you need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushOptions {
    /// Nudges waiting to be sent; a nudge past it is dropped and counted in
    /// [`PushMetrics::dropped_queue_full`], so a slow push service never slows a send. As
    /// many again may be in progress (sending, or waiting to retry): memory stays bounded
    /// whatever the push services do. Default 1,024.
    pub queue_capacity: usize,
    /// Requests to push services (and device lookups) at once. A push waiting to retry holds
    /// none, so services that fail or stall slow no one else's pushes. Default 32.
    pub concurrency: usize,
    /// An attempt without an answer by then counts as failed and is retried (a hung push
    /// service holds a slot this long, never a send). Default 10 s.
    pub request_timeout: Duration,
    /// Wait before the first retry; it doubles after each retry, up to `max_retry_wait`, and
    /// each wait is drawn at random from its upper half (jitter, so retries of many nudges
    /// spread out). A `Retry-After` from the service lengthens a wait, never shortens it.
    /// Default 1 s; more than zero.
    pub first_retry: Duration,
    /// Longest wait between two attempts when the service named none. Default 60 s.
    pub max_retry_wait: Duration,
    /// A push not delivered this long after its first attempt is given up, counted in
    /// [`PushMetrics::gave_up`] (a wait, `Retry-After` included, that would end past it is not
    /// started). Default 5 minutes: later, the nudge is stale, and the next message nudges
    /// again. At most a day.
    pub give_up_after: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            concurrency: 32,
            request_timeout: Duration::from_secs(10),
            first_retry: Duration::from_secs(1),
            max_retry_wait: Duration::from_secs(60),
            give_up_after: Duration::from_secs(5 * 60),
        }
    }
}

/// What a [`PushNotifier`] has done since it started: nudges counted once each where they end,
/// pushes (one per nudge and device) counted by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushMetrics {
    /// Nudges queued.
    pub queued: u64,
    /// Nudges dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Nudges for a recipient with no device a provider serves.
    pub without_device: u64,
    /// Nudges whose device lookup failed or timed out.
    pub lookup_failed: u64,
    /// Pushes a push service accepted.
    pub delivered: u64,
    /// Attempts that will be tried again (throttled, unavailable, or no answer).
    pub retried: u64,
    /// Attempts that got no answer within [`PushOptions::request_timeout`] (also in
    /// `retried` or `gave_up`).
    pub timed_out: u64,
    /// Pushes given up after [`PushOptions::give_up_after`].
    pub gave_up: u64,
    /// Pushes refused for good (bad request, bad credentials).
    pub rejected: u64,
    /// Devices the push service said are gone, reported to [`PushTargets::device_gone`].
    pub devices_gone: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    dropped_queue_full: AtomicU64,
    without_device: AtomicU64,
    lookup_failed: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    timed_out: AtomicU64,
    gave_up: AtomicU64,
    rejected: AtomicU64,
    devices_gone: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A [`Notifier`] that sends nudges through [`PushProvider`]s to the devices [`PushTargets`]
/// lists. `notify` only queues (never blocks); the task [`start`](PushNotifier::start) spawns
/// does the rest. Clones share the queue and the counters: give one to the engine
/// (`OfflineQueueBuilder::notifier`) and keep one to read [`metrics`](PushNotifier::metrics).
#[derive(Clone)]
pub struct PushNotifier {
    queue: mpsc::Sender<Nudge>,
    counters: Arc<Counters>,
    capacity: usize,
}

impl std::fmt::Debug for PushNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushNotifier")
            .field("capacity", &self.capacity)
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl PushNotifier {
    /// Spawns the sending task on the current tokio runtime. The task ends once every clone of
    /// the notifier is dropped and the nudges already queued are sent or given up; it returns
    /// the final counters.
    ///
    /// # Errors
    /// A [`PushError`] when no provider is given, an option is zero, or there is no tokio
    /// runtime to spawn on.
    pub fn start(
        targets: Arc<dyn PushTargets>,
        providers: Vec<Arc<dyn PushProvider>>,
        options: PushOptions,
    ) -> Result<(Self, JoinHandle<PushMetrics>), PushError> {
        if providers.is_empty() {
            return Err(PushError::new("push providers", "none given"));
        }
        for (what, value) in [
            ("PushOptions::queue_capacity", options.queue_capacity),
            ("PushOptions::concurrency", options.concurrency),
        ] {
            if value == 0 {
                return Err(PushError::new(what, "must be at least 1"));
            }
        }
        if options.concurrency > Semaphore::MAX_PERMITS {
            return Err(PushError::new(
                "PushOptions::concurrency",
                format!("over the limit of {}", Semaphore::MAX_PERMITS),
            ));
        }
        for (what, value) in [
            ("PushOptions::request_timeout", options.request_timeout),
            ("PushOptions::first_retry", options.first_retry),
            ("PushOptions::max_retry_wait", options.max_retry_wait),
            ("PushOptions::give_up_after", options.give_up_after),
        ] {
            if value.is_zero() || value > MAX_WAIT {
                return Err(PushError::new(
                    what,
                    format!("{value:?}: must be more than zero and at most {MAX_WAIT:?}"),
                ));
            }
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| PushError::new("push task", format!("no tokio runtime: {e}")))?;
        let (queue, nudges) = mpsc::channel(options.queue_capacity);
        let counters = Arc::new(Counters::default());
        let sender = Arc::new(Sender {
            targets,
            providers,
            options,
            counters: counters.clone(),
            requests: Arc::new(Semaphore::new(options.concurrency)),
            reported_gone: Mutex::new(HashMap::new()),
        });
        let task = runtime.spawn(async move {
            sender.clone().run(nudges).await;
            metrics_of(&sender.counters)
        });
        Ok((
            Self {
                queue,
                counters,
                capacity: options.queue_capacity,
            },
            task,
        ))
    }

    /// The counters so far.
    pub fn metrics(&self) -> PushMetrics {
        metrics_of(&self.counters)
    }
}

fn metrics_of(c: &Counters) -> PushMetrics {
    {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PushMetrics {
            queued: get(&c.queued),
            dropped_queue_full: get(&c.dropped_queue_full),
            without_device: get(&c.without_device),
            lookup_failed: get(&c.lookup_failed),
            delivered: get(&c.delivered),
            retried: get(&c.retried),
            timed_out: get(&c.timed_out),
            gave_up: get(&c.gave_up),
            rejected: get(&c.rejected),
            devices_gone: get(&c.devices_gone),
        }
    }
}

impl Notifier for PushNotifier {
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError> {
        match self.queue.try_send(nudge) {
            Ok(()) => {
                bump(&self.counters.queued);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.dropped_queue_full);
                Err(NotifyError(format!(
                    "push queue full ({} nudges waiting)",
                    self.capacity
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(NotifyError("the push task has stopped".into()))
            }
        }
    }
}

/// The longest any of the options' durations may be.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Devices reported gone are remembered (by hash) for `give_up_after`, the longest any push
/// to them may still be under way, so concurrent pushes to one dead device report it once;
/// past this many, the expired entries are forgotten.
const REMEMBERED_GONE: usize = 10_000;

struct Sender {
    targets: Arc<dyn PushTargets>,
    providers: Vec<Arc<dyn PushProvider>>,
    options: PushOptions,
    counters: Arc<Counters>,
    /// One permit per request to a push service or device lookup under way.
    requests: Arc<Semaphore>,
    reported_gone: Mutex<HashMap<u64, Instant>>,
}

impl Sender {
    async fn run(self: Arc<Self>, mut nudges: mpsc::Receiver<Nudge>) {
        // Nudges in progress, retries waiting included: at most a queue's worth. Past it the
        // queue fills and drops: the bound on memory whatever the push services do.
        let in_progress = Arc::new(Semaphore::new(self.options.queue_capacity));
        let mut sending = JoinSet::new();
        while let Some(nudge) = nudges.recv().await {
            let Ok(place) = in_progress.clone().acquire_owned().await else {
                break;
            };
            while sending.try_join_next().is_some() {}
            let sender = self.clone();
            sending.spawn(async move {
                sender.send(nudge).await;
                drop(place);
            });
        }
        while sending.join_next().await.is_some() {}
    }

    /// Runs `step` holding a request permit, within the request timeout; `None` if it timed
    /// out.
    async fn request<T>(&self, step: impl Future<Output = T>) -> Option<T> {
        let _permit = self.requests.acquire().await.ok()?;
        tokio::time::timeout(self.options.request_timeout, step)
            .await
            .ok()
    }

    async fn send(&self, nudge: Nudge) {
        let lookup = self.request(self.targets.devices(&nudge.recipient)).await;
        let devices = match lookup {
            Some(Ok(devices)) => devices,
            Some(Err(error)) => {
                bump(&self.counters.lookup_failed);
                tracing::warn!(%error, "push: device lookup failed");
                return;
            }
            None => {
                bump(&self.counters.lookup_failed);
                tracing::warn!("push: device lookup timed out");
                return;
            }
        };
        let pushes: Vec<_> = devices
            .iter()
            .filter_map(|device| {
                let provider = self.providers.iter().find(|p| p.serves(device))?;
                Some(self.push_until_done(provider.as_ref(), device, &nudge))
            })
            .collect();
        if pushes.is_empty() {
            bump(&self.counters.without_device);
            return;
        }
        futures::future::join_all(pushes).await;
    }

    async fn push_until_done(&self, provider: &dyn PushProvider, device: &Device, nudge: &Nudge) {
        let started = Instant::now();
        let mut backoff = self.options.first_retry;
        loop {
            let attempt = match self.request(provider.push(device, nudge)).await {
                Some(attempt) => attempt,
                None => {
                    bump(&self.counters.timed_out);
                    PushAttempt::Retry {
                        after: None,
                        reason: format!("no answer within {:?}", self.options.request_timeout),
                    }
                }
            };
            match attempt {
                PushAttempt::Delivered => {
                    bump(&self.counters.delivered);
                    return;
                }
                PushAttempt::DeviceGone => {
                    self.report_gone(&nudge.recipient, device).await;
                    return;
                }
                PushAttempt::Rejected(reason) => {
                    bump(&self.counters.rejected);
                    tracing::warn!(provider = provider.name(), %reason, "push refused");
                    return;
                }
                PushAttempt::Retry { after, reason } => {
                    // The service's `Retry-After` (which may be 0, or absurdly long) only
                    // lengthens the wait: never sooner than the backoff.
                    let wait = jittered(backoff).max(after.unwrap_or_default());
                    backoff = backoff.saturating_mul(2).min(self.options.max_retry_wait);
                    let left = self.options.give_up_after.saturating_sub(started.elapsed());
                    if wait > left {
                        bump(&self.counters.gave_up);
                        tracing::warn!(provider = provider.name(), %reason, "push given up");
                        return;
                    }
                    bump(&self.counters.retried);
                    tracing::debug!(provider = provider.name(), %reason, ?wait, "push retried");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn report_gone(&self, recipient: &RecipientId, device: &Device) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (recipient, device).hash(&mut hasher);
        let key = hasher.finish();
        let now = Instant::now();
        let remembered = self.options.give_up_after;
        let first = {
            let mut gone = self.reported_gone.lock();
            if gone.len() >= REMEMBERED_GONE {
                gone.retain(|_, at| now.duration_since(*at) < remembered);
            }
            match gone.get(&key) {
                Some(at) if now.duration_since(*at) < remembered => false,
                _ => {
                    gone.insert(key, now);
                    true
                }
            }
        };
        if first {
            bump(&self.counters.devices_gone);
            // The host's database may hang too: bounded like a request.
            if self
                .request(self.targets.device_gone(recipient, device))
                .await
                .is_none()
            {
                tracing::warn!(%recipient, "push: device_gone did not return in time");
            }
        }
    }
}

/// A wait drawn at random from `[base / 2, base]`.
fn jittered(base: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    // Without randomness (never on Linux), no jitter: still a correct backoff.
    let draw = getrandom::fill(&mut bytes).map_or(u64::MAX, |()| u64::from_le_bytes(bytes));
    let half = base / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(if nanos == 0 { 0 } else { draw % (nanos + 1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let base = Duration::from_millis(800);
        for _ in 0..1000 {
            let wait = jittered(base);
            assert!(wait >= base / 2 && wait <= base, "{wait:?}");
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
