//! A deterministic harness: one `LocalPool` runs session drivers; tests step it until it
//! stalls, so "nothing more arrived" is a fact, not a timeout.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use offline_queue::{
    Batch, Clock, Envelope, ManualClock, OfflineQueue, OfflineQueueBuilder, Outbound, RecipientId,
    RecordingNotifier, Result, SessionEnd, SessionHandle, Timestamp, channel_transport,
};

pub const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

pub struct Harness {
    pub pool: LocalPool,
    pub clock: ManualClock,
    pub notifier: Arc<RecordingNotifier>,
    pub queue: OfflineQueue,
}

pub fn id(name: &str) -> RecipientId {
    RecipientId::new(name).unwrap()
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|b| b)
    }

    pub fn with(configure: impl FnOnce(OfflineQueueBuilder) -> OfflineQueueBuilder) -> Self {
        let clock = ManualClock::new(T0);
        let notifier = Arc::new(RecordingNotifier::new());
        let builder = OfflineQueue::builder()
            .clock(Arc::new(clock.clone()))
            .notifier(notifier.clone());
        let queue = configure(builder).build().unwrap();
        Self {
            pool: LocalPool::new(),
            clock,
            notifier,
            queue,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Runs a future to completion, letting sessions progress meanwhile.
    pub fn run<T>(&mut self, future: impl Future<Output = T>) -> T {
        self.pool.run_until(future)
    }

    pub fn send(&mut self, to: &str, payload: &[u8]) -> offline_queue::SendReceipt {
        let envelope = Envelope::new(id(to), payload.to_vec());
        let queue = self.queue.clone();
        self.run(queue.send(envelope)).unwrap()
    }

    pub fn try_send(&mut self, envelope: Envelope) -> Result<offline_queue::SendReceipt> {
        let queue = self.queue.clone();
        self.run(queue.send(envelope))
    }

    /// Connects `who` with a channel transport of `buffer` items and spawns its driver.
    pub fn connect(&mut self, who: &str) -> Client {
        self.connect_buffered(who, 1024)
    }

    pub fn connect_buffered(&mut self, who: &str, buffer: usize) -> Client {
        let (transport, inbox) = channel_transport(buffer);
        let session = self.queue.connect(id(who), transport);
        let handle = session.handle();
        let (tx, end) = oneshot::channel();
        self.pool
            .spawner()
            .spawn_local(async move {
                let _ = tx.send(session.run().await);
            })
            .unwrap();
        self.pool.run_until_stalled();
        Client { inbox, handle, end }
    }

    pub fn stall(&mut self) {
        self.pool.run_until_stalled();
    }

    pub fn stats(&mut self, who: &str) -> offline_queue::QueueStats {
        let queue = self.queue.clone();
        self.run(queue.stats(&id(who))).unwrap()
    }

    pub fn maintain(&mut self) -> offline_queue::MaintenanceReport {
        let queue = self.queue.clone();
        self.run(queue.maintain(10_000)).unwrap()
    }
}

pub struct Client {
    pub inbox: mpsc::Receiver<Outbound>,
    pub handle: SessionHandle,
    pub end: oneshot::Receiver<Result<SessionEnd>>,
}

impl Client {
    /// Everything delivered so far, after the pool stalled.
    pub fn drain(&mut self, harness: &mut Harness) -> Vec<Outbound> {
        harness.stall();
        let mut out = Vec::new();
        while let Ok(item) = self.inbox.try_recv() {
            out.push(item);
            harness.stall();
        }
        out
    }

    /// The batches delivered so far.
    pub fn batches(&mut self, harness: &mut Harness) -> Vec<Batch> {
        self.drain(harness)
            .into_iter()
            .filter_map(|item| match item {
                Outbound::Batch(batch) => Some(batch),
                _ => None,
            })
            .collect()
    }

    /// Closes the session and returns how it ended.
    pub fn close(mut self, harness: &mut Harness) -> SessionEnd {
        self.handle.close();
        harness.stall();
        self.end
            .try_recv()
            .unwrap()
            .expect("session ended")
            .unwrap()
    }

    pub fn ended(&mut self, harness: &mut Harness) -> Option<Result<SessionEnd>> {
        harness.stall();
        self.end.try_recv().unwrap()
    }
}

pub fn payloads(batches: &[Batch]) -> Vec<Vec<u8>> {
    batches
        .iter()
        .flat_map(|b| b.messages.iter().map(|m| m.payload.to_vec()))
        .collect()
}

/// Runs a future to completion on this thread, parking between polls. Unlike
/// `futures::executor::block_on` it may be called from inside a `LocalPool` task.
pub fn wait<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Makes a storage whose work completes on other threads (a writer thread) look synchronous
/// to the harness's `LocalPool`, so "the pool stalled" still means "everything settled".
pub struct Settled<S>(pub S);

#[async_trait::async_trait]
impl<S: offline_queue::Storage> offline_queue::Storage for Settled<S> {
    fn capabilities(&self) -> offline_queue::storage::Capabilities {
        self.0.capabilities()
    }
    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<offline_queue::storage::NewRecord>,
        quota: &offline_queue::Quota,
        now: Timestamp,
    ) -> Result<offline_queue::storage::AppendOutcome> {
        wait(self.0.append(recipient, records, quota, now))
    }
    async fn append_one(
        &self,
        recipient: &RecipientId,
        record: offline_queue::storage::NewRecord,
        quota: &offline_queue::Quota,
        now: Timestamp,
    ) -> Result<offline_queue::storage::AppendOneOutcome> {
        wait(self.0.append_one(recipient, record, quota, now))
    }
    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<offline_queue::Seq>,
        limit: offline_queue::BatchLimit,
        now: Timestamp,
    ) -> Result<offline_queue::storage::ReadBatch> {
        wait(self.0.read(recipient, after, limit, now))
    }
    async fn mark_delivered(
        &self,
        recipient: &RecipientId,
        seqs: &[offline_queue::Seq],
    ) -> Result<()> {
        wait(self.0.mark_delivered(recipient, seqs))
    }
    async fn ack(
        &self,
        recipient: &RecipientId,
        ack: &offline_queue::storage::Ack,
        now: Timestamp,
    ) -> Result<u64> {
        wait(self.0.ack(recipient, ack, now))
    }
    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&offline_queue::storage::Ack>,
        after: Option<offline_queue::Seq>,
        limit: offline_queue::BatchLimit,
        now: Timestamp,
    ) -> Result<offline_queue::storage::DeliveryRead> {
        wait(self.0.read_for_delivery(recipient, ack, after, limit, now))
    }
    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<offline_queue::storage::PurgeOutcome> {
        wait(self.0.purge(now, idle_before, budget))
    }
    async fn stats(
        &self,
        recipient: &RecipientId,
    ) -> Result<offline_queue::storage::RecipientStats> {
        wait(self.0.stats(recipient))
    }
    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        wait(self.0.remove_recipient(recipient))
    }
}

/// A `MemoryStorage` with a different face: capabilities the test chooses, its own
/// coordination whose wake-up streams end with the storage, and purges that fail on demand
/// (counted).
pub struct Shaped {
    inner: offline_queue::MemoryStorage,
    total_byte_budget: bool,
    /// Stats that name no newest seq, with `exact_stats` false.
    inexact_stats: bool,
    listeners: parking_lot::Mutex<Vec<mpsc::UnboundedSender<RecipientId>>>,
    pub fail_purges: std::sync::atomic::AtomicBool,
    pub purges: Arc<std::sync::atomic::AtomicU64>,
    /// Calls of `Coordination::announce`.
    pub announces: std::sync::atomic::AtomicU64,
}

impl Shaped {
    pub fn new() -> Self {
        Self {
            inner: offline_queue::MemoryStorage::new(),
            total_byte_budget: true,
            inexact_stats: false,
            listeners: parking_lot::Mutex::default(),
            fail_purges: false.into(),
            purges: Arc::default(),
            announces: 0.into(),
        }
    }

    /// Says it keeps no storage-wide byte budget.
    pub fn without_byte_budget(mut self) -> Self {
        self.total_byte_budget = false;
        self
    }

    /// Says its stats are not exact, and names no newest seq in them (as RabbitMQ's, for a
    /// recipient the node holds nothing of).
    pub fn with_inexact_stats(mut self) -> Self {
        self.inexact_stats = true;
        self
    }

    /// A wake-up for `recipient`, as another node's append would send, to every stream.
    pub fn wake(&self, recipient: &RecipientId) {
        self.listeners
            .lock()
            .retain(|l| l.unbounded_send(recipient.clone()).is_ok());
    }
}

#[async_trait::async_trait]
impl offline_queue::Storage for Shaped {
    fn capabilities(&self) -> offline_queue::storage::Capabilities {
        self.inner
            .capabilities()
            .with_total_byte_budget(self.total_byte_budget)
            .with_exact_stats(!self.inexact_stats)
    }
    async fn append(
        &self,
        recipient: &RecipientId,
        records: Vec<offline_queue::storage::NewRecord>,
        quota: &offline_queue::Quota,
        now: Timestamp,
    ) -> Result<offline_queue::storage::AppendOutcome> {
        self.inner.append(recipient, records, quota, now).await
    }
    async fn append_one(
        &self,
        recipient: &RecipientId,
        record: offline_queue::storage::NewRecord,
        quota: &offline_queue::Quota,
        now: Timestamp,
    ) -> Result<offline_queue::storage::AppendOneOutcome> {
        self.inner.append_one(recipient, record, quota, now).await
    }
    async fn read(
        &self,
        recipient: &RecipientId,
        after: Option<offline_queue::Seq>,
        limit: offline_queue::BatchLimit,
        now: Timestamp,
    ) -> Result<offline_queue::storage::ReadBatch> {
        self.inner.read(recipient, after, limit, now).await
    }
    async fn mark_delivered(
        &self,
        recipient: &RecipientId,
        seqs: &[offline_queue::Seq],
    ) -> Result<()> {
        self.inner.mark_delivered(recipient, seqs).await
    }
    async fn read_for_delivery(
        &self,
        recipient: &RecipientId,
        ack: Option<&offline_queue::storage::Ack>,
        after: Option<offline_queue::Seq>,
        limit: offline_queue::BatchLimit,
        now: Timestamp,
    ) -> Result<offline_queue::storage::DeliveryRead> {
        self.inner
            .read_for_delivery(recipient, ack, after, limit, now)
            .await
    }
    async fn ack(
        &self,
        recipient: &RecipientId,
        ack: &offline_queue::storage::Ack,
        now: Timestamp,
    ) -> Result<u64> {
        self.inner.ack(recipient, ack, now).await
    }
    async fn purge(
        &self,
        now: Timestamp,
        idle_before: Option<Timestamp>,
        budget: usize,
    ) -> Result<offline_queue::storage::PurgeOutcome> {
        use std::sync::atomic::Ordering::SeqCst;
        self.purges.fetch_add(1, SeqCst);
        if self.fail_purges.load(SeqCst) {
            return Err(offline_queue::Error::storage_msg(
                offline_queue::Retry::Yes,
                "purge refused by the test",
            ));
        }
        self.inner.purge(now, idle_before, budget).await
    }
    async fn stats(
        &self,
        recipient: &RecipientId,
    ) -> Result<offline_queue::storage::RecipientStats> {
        let mut stats = self.inner.stats(recipient).await?;
        if self.inexact_stats {
            stats.newest_seq = None;
        }
        Ok(stats)
    }
    async fn remove_recipient(&self, recipient: &RecipientId) -> Result<u64> {
        self.inner.remove_recipient(recipient).await
    }
}

#[async_trait::async_trait]
impl offline_queue::Coordination for Shaped {
    fn wakeups(&self) -> futures::stream::BoxStream<'static, RecipientId> {
        use futures::StreamExt;
        let (sender, receiver) = mpsc::unbounded();
        self.listeners.lock().push(sender);
        receiver.boxed()
    }
    fn presence(&self, _recipient: &RecipientId, _presence: offline_queue::Presence) {}
    async fn announce(&self, _recipient: &RecipientId) -> Result<bool> {
        self.announces
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(false)
    }
    async fn live_elsewhere(&self, _recipient: &RecipientId) -> Result<bool> {
        Ok(false)
    }
}
