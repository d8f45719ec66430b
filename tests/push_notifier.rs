//! PushNotifier's failure matrix against a scripted provider, on tokio's paused clock: a full
//! queue drops and counts, a dead device is pruned and reported once, `Retry-After` is waited
//! exactly, retries back off with jitter and give up, a hung provider times out without
//! holding any send, and concurrency stays within its bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use offline_queue::push::{
    Device, MemoryPushTargets, PushAttempt, PushError, PushMetrics, PushNotifier, PushOptions,
    PushProvider, PushTargets, WebPushSubscription,
};
use offline_queue::{
    Envelope, Notifier as _, NotifyError, Nudge, NudgeReason, OfflineQueue, RecipientId,
};
use parking_lot::Mutex;
use tokio::time::Instant;

/// What the scripted provider does on one call.
#[derive(Clone, Debug)]
enum Step {
    Answer(PushAttempt),
    /// Answers after this long (a slow service).
    After(Duration, PushAttempt),
    /// Never answers.
    Hang,
}

/// A provider that plays its script, then `then` for every later call, and records when each
/// call came and how many ran at once.
struct Scripted {
    script: Mutex<VecDeque<Step>>,
    then: Step,
    calls: Mutex<Vec<(Instant, RecipientId)>>,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

impl Scripted {
    fn new(script: Vec<Step>, then: Step) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script.into()),
            then,
            calls: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
        })
    }

    fn call_times(&self) -> Vec<Instant> {
        self.calls.lock().iter().map(|(at, _)| *at).collect()
    }
}

#[async_trait]
impl PushProvider for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn serves(&self, device: &Device) -> bool {
        matches!(device, Device::WebPush(_))
    }

    async fn push(&self, _device: &Device, nudge: &Nudge) -> PushAttempt {
        self.calls
            .lock()
            .push((Instant::now(), nudge.recipient.clone()));
        let step = self
            .script
            .lock()
            .pop_front()
            .unwrap_or_else(|| self.then.clone());
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now_running, Ordering::SeqCst);
        let attempt = match step {
            Step::Answer(attempt) => attempt,
            Step::After(wait, attempt) => {
                tokio::time::sleep(wait).await;
                attempt
            }
            Step::Hang => std::future::pending().await,
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        attempt
    }
}

fn device(n: u32) -> Device {
    Device::WebPush(
        WebPushSubscription::new(
            &format!("https://push.example.net/{n}"),
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
            "BTBZMqHH6r4Tts7J_aSIgg",
        )
        .unwrap(),
    )
}

fn recipient(n: u32) -> RecipientId {
    RecipientId::new(format!("user-{n}")).unwrap()
}

fn nudge(n: u32) -> Nudge {
    Nudge {
        recipient: recipient(n),
        pending: Some(1),
        reason: NudgeReason::Urgent,
        ttl: None,
    }
}

/// Targets with one device for each of `recipients`, counting `device_gone` calls.
#[derive(Default)]
struct Targets {
    devices: MemoryPushTargets,
    gone_reports: AtomicUsize,
}

#[async_trait]
impl PushTargets for Targets {
    async fn devices(&self, recipient: &RecipientId) -> Result<Vec<Device>, PushError> {
        if recipient.as_bytes() == b"lookup-fails" {
            return Err(PushError {
                what: "test lookup",
                reason: "the database is down".into(),
            });
        }
        self.devices.devices(recipient).await
    }

    async fn device_gone(&self, recipient: &RecipientId, device: &Device) {
        self.gone_reports.fetch_add(1, Ordering::SeqCst);
        self.devices.device_gone(recipient, device).await;
    }
}

fn targets(recipients: u32) -> Arc<Targets> {
    let targets = Arc::new(Targets::default());
    for n in 0..recipients {
        targets.devices.add(recipient(n), device(n));
    }
    targets
}

fn options() -> PushOptions {
    let mut options = PushOptions::default();
    options.first_retry = Duration::from_secs(1);
    options.max_retry_wait = Duration::from_secs(4);
    options.give_up_after = Duration::from_secs(20);
    options.request_timeout = Duration::from_secs(10);
    options
}

fn start(
    targets: Arc<Targets>,
    provider: Arc<Scripted>,
    options: PushOptions,
) -> (PushNotifier, tokio::task::JoinHandle<PushMetrics>) {
    PushNotifier::start(targets, vec![provider], options).unwrap()
}

/// Drops the notifier and waits for its task to finish what was queued.
async fn finish(notifier: PushNotifier, task: tokio::task::JoinHandle<PushMetrics>) -> PushMetrics {
    drop(notifier);
    task.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_drops_and_counts_without_waiting() {
    let provider = Scripted::new(vec![], Step::Answer(PushAttempt::Delivered));
    let mut options = options();
    options.queue_capacity = 2;
    let (notifier, task) = start(targets(10), provider.clone(), options);
    let keep = notifier.clone();
    // No await between the calls: the task has not taken any nudge yet.
    let results: Vec<_> = (0..10).map(|n| notifier.notify(nudge(n))).collect();
    assert!(results[..2].iter().all(Result::is_ok));
    for result in &results[2..] {
        assert_eq!(
            result,
            &Err(NotifyError("push queue full (2 nudges waiting)".into()))
        );
    }
    let metrics = keep.metrics();
    assert_eq!((metrics.queued, metrics.dropped_queue_full), (2, 8));
    drop(keep);
    let metrics = finish(notifier, task).await;
    assert_eq!(provider.calls.lock().len(), 2);
    assert_eq!(metrics.delivered, 2);
}

#[tokio::test(start_paused = true)]
async fn a_dead_device_is_pruned_and_reported_once() {
    let provider = Scripted::new(
        vec![],
        Step::After(Duration::from_millis(10), PushAttempt::DeviceGone),
    );
    let targets = targets(1);
    let (notifier, task) = start(targets.clone(), provider.clone(), options());
    // Two nudges in flight at once to the same dead device.
    notifier.notify(nudge(0)).unwrap();
    notifier.notify(nudge(0)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A later nudge finds no device left.
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    assert_eq!(provider.calls.lock().len(), 2, "no push after the prune");
    assert_eq!(targets.gone_reports.load(Ordering::SeqCst), 1);
    assert!(targets.devices.list(&recipient(0)).is_empty());
    assert_eq!((metrics.devices_gone, metrics.without_device), (1, 1));
    assert_eq!((metrics.delivered, metrics.retried), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_exactly() {
    let provider = Scripted::new(
        vec![Step::Answer(PushAttempt::Retry {
            after: Some(Duration::from_secs(7)),
            reason: "429".into(),
        })],
        Step::Answer(PushAttempt::Delivered),
    );
    let (notifier, task) = start(targets(1), provider.clone(), options());
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    let times = provider.call_times();
    assert_eq!(times.len(), 2);
    assert_eq!(times[1] - times[0], Duration::from_secs(7));
    assert_eq!((metrics.retried, metrics.delivered), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_give_up_time_gives_up_at_once() {
    let provider = Scripted::new(
        vec![Step::Answer(PushAttempt::Retry {
            // Whatever a service says, however long: no overflow, no hour-long wait.
            after: Some(Duration::MAX),
            reason: "429".into(),
        })],
        Step::Answer(PushAttempt::Delivered),
    );
    let (notifier, task) = start(targets(1), provider.clone(), options());
    let began = Instant::now();
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    assert_eq!(Instant::now() - began, Duration::ZERO, "no hour-long wait");
    assert_eq!(provider.calls.lock().len(), 1);
    assert_eq!(
        (metrics.gave_up, metrics.retried, metrics.delivered),
        (1, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn server_errors_back_off_with_jitter_then_give_up() {
    let provider = Scripted::new(
        vec![],
        Step::Answer(PushAttempt::Retry {
            after: None,
            reason: "503".into(),
        }),
    );
    let (notifier, task) = start(targets(1), provider.clone(), options());
    let began = Instant::now();
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    let times = provider.call_times();
    // Waits double from 1 s to at most 4 s, each drawn from its upper half.
    let bounds = [(500, 1000), (1000, 2000), (2000, 4000)];
    for (i, pair) in times.windows(2).enumerate() {
        let wait = (pair[1] - pair[0]).as_millis();
        let (low, high) = bounds[i.min(2)];
        assert!(low <= wait && wait <= high, "wait {i}: {wait} ms");
    }
    // Every attempt within the give-up time, and no wait started that would end past it.
    let last = *times.last().unwrap() - began;
    assert!(last <= Duration::from_secs(20), "{last:?}");
    assert!(times.len() >= 6, "{} attempts", times.len());
    assert_eq!(metrics.gave_up, 1);
    assert_eq!(metrics.retried, times.len() as u64 - 1);
    assert_eq!(metrics.delivered, 0);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_counted_and_not_retried() {
    let provider = Scripted::new(vec![], Step::Answer(PushAttempt::Rejected("400".into())));
    let (notifier, task) = start(targets(1), provider.clone(), options());
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    assert_eq!(provider.calls.lock().len(), 1);
    assert_eq!((metrics.rejected, metrics.retried), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_is_counted() {
    let provider = Scripted::new(vec![], Step::Answer(PushAttempt::Delivered));
    let (notifier, task) = start(targets(1), provider.clone(), options());
    notifier
        .notify(Nudge {
            recipient: RecipientId::new("lookup-fails").unwrap(),
            pending: None,
            reason: NudgeReason::Background,
            ttl: None,
        })
        .unwrap();
    let metrics = finish(notifier, task).await;
    assert!(provider.calls.lock().is_empty());
    assert_eq!(metrics.lookup_failed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_provider_times_out_and_never_holds_a_send() {
    let provider = Scripted::new(vec![], Step::Hang);
    let mut options = options();
    options.give_up_after = Duration::from_secs(15);
    options.concurrency = 100;
    let (notifier, task) = start(targets(100), provider.clone(), options);
    let queue = OfflineQueue::builder()
        .notifier(Arc::new(notifier.clone()))
        .build()
        .unwrap();
    // Every send returns at once, whatever the push service does.
    let began = Instant::now();
    for n in 0..100 {
        queue
            .send(Envelope::new(recipient(n), "hello"))
            .await
            .unwrap();
    }
    assert_eq!(Instant::now() - began, Duration::ZERO);
    drop(queue);
    let metrics = finish(notifier, task).await;
    // Each hung attempt takes the whole 10 s timeout: the first at 0 s, the retry after a wait
    // of at most 1 s; a third would start past 15 s, so each push gives up after two.
    assert_eq!(metrics.queued + metrics.dropped_queue_full, 100);
    assert_eq!(metrics.gave_up, metrics.queued);
    assert_eq!(metrics.timed_out, 2 * metrics.queued);
    assert_eq!(metrics.delivered, 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_of_zero_still_backs_off() {
    let provider = Scripted::new(
        vec![],
        Step::Answer(PushAttempt::Retry {
            after: Some(Duration::ZERO),
            reason: "429".into(),
        }),
    );
    let (notifier, task) = start(targets(1), provider.clone(), options());
    notifier.notify(nudge(0)).unwrap();
    let metrics = finish(notifier, task).await;
    let times = provider.call_times();
    assert!(
        times
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(500)),
        "no retry sooner than the backoff"
    );
    // Each wait is drawn from the upper half of the backoff (1 s, 2 s, then 4 s at most), so
    // the shortest waits (0.5, 1, then 2 s) allow attempts at 0, 0.5, 1.5, 3.5, ..., 19.5 s:
    // 12 at most within the 20 s give-up time, however the jitter falls. Without the backoff,
    // a Retry-After of 0 would retry at once, without end.
    assert!(times.len() <= 12, "{} attempts in 20 s", times.len());
    assert_eq!(metrics.gave_up, 1);
}

/// A provider that fails for `user-0` and delivers for everyone else, noting when.
struct FailsForOne {
    calls: Mutex<Vec<(Instant, RecipientId)>>,
}

#[async_trait]
impl PushProvider for FailsForOne {
    fn name(&self) -> &'static str {
        "fails-for-one"
    }

    fn serves(&self, _device: &Device) -> bool {
        true
    }

    async fn push(&self, _device: &Device, nudge: &Nudge) -> PushAttempt {
        self.calls
            .lock()
            .push((Instant::now(), nudge.recipient.clone()));
        if nudge.recipient == recipient(0) {
            PushAttempt::Retry {
                after: None,
                reason: "503".into(),
            }
        } else {
            PushAttempt::Delivered
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_push_waiting_to_retry_holds_no_request_slot() {
    let provider = Arc::new(FailsForOne {
        calls: Mutex::new(Vec::new()),
    });
    let mut options = options();
    options.concurrency = 1;
    let (notifier, task) =
        PushNotifier::start(targets(2), vec![provider.clone()], options).unwrap();
    let began = Instant::now();
    notifier.notify(nudge(0)).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    notifier.notify(nudge(1)).unwrap();
    let metrics = finish(notifier, task).await;
    let calls = provider.calls.lock();
    let delivered_at = calls
        .iter()
        .find(|(_, who)| *who == recipient(1))
        .map(|(at, _)| *at - began)
        .unwrap();
    // user-1 was pushed while user-0 waited to retry, not after user-0 gave up.
    assert!(delivered_at < Duration::from_millis(10), "{delivered_at:?}");
    assert!(calls.iter().filter(|(_, who)| *who == recipient(0)).count() >= 3);
    assert_eq!((metrics.delivered, metrics.gave_up), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn no_more_pushes_run_at_once_than_the_bound() {
    let provider = Scripted::new(
        vec![],
        Step::After(Duration::from_secs(1), PushAttempt::Delivered),
    );
    let mut options = options();
    options.concurrency = 3;
    let (notifier, task) = start(targets(20), provider.clone(), options);
    for n in 0..20 {
        notifier.notify(nudge(n)).unwrap();
    }
    let began = Instant::now();
    let metrics = finish(notifier, task).await;
    assert_eq!(provider.most_running.load(Ordering::SeqCst), 3);
    // 20 pushes of 1 s, 3 at a time: 7 rounds.
    assert_eq!(Instant::now() - began, Duration::from_secs(7));
    assert_eq!(metrics.delivered, 20);
}

#[tokio::test]
async fn bad_options_are_refused_with_their_name() {
    let provider = Scripted::new(vec![], Step::Answer(PushAttempt::Delivered));
    let mut zero = options();
    zero.concurrency = 0;
    let err = PushNotifier::start(targets(0), vec![provider.clone()], zero).unwrap_err();
    assert_eq!(
        (err.what, err.reason.as_str()),
        ("PushOptions::concurrency", "must be at least 1")
    );
    let err = PushNotifier::start(targets(0), vec![], options()).unwrap_err();
    assert_eq!(err.what, "push providers");
    let mut zero = options();
    zero.first_retry = Duration::ZERO;
    let err = PushNotifier::start(targets(0), vec![provider.clone()], zero).unwrap_err();
    assert_eq!(err.what, "PushOptions::first_retry");
    let mut long = options();
    long.give_up_after = Duration::from_secs(2 * 24 * 3600);
    let err = PushNotifier::start(targets(0), vec![provider.clone()], long).unwrap_err();
    assert_eq!(
        (err.what, err.reason.as_str()),
        (
            "PushOptions::give_up_after",
            "172800s: must be more than zero and at most 86400s"
        )
    );
}

#[test]
fn starting_outside_a_runtime_is_an_error_not_a_panic() {
    let provider = Scripted::new(vec![], Step::Answer(PushAttempt::Delivered));
    let err = PushNotifier::start(targets(0), vec![provider], options()).unwrap_err();
    assert_eq!(err.what, "push task");
}
