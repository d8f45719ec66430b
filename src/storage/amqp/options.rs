//! [`AmqpOptions`]: how [`AmqpStorage`](super::AmqpStorage) names and declares its queues.

use std::time::Duration;

use crate::error::{Error, Result};

use super::AmqpStorage;
use super::names::check_prefix;

/// The kind of queue each recipient gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// Replicated over the broker's cluster by Raft, on a majority's disks before a publish
    /// is confirmed (the default). The broker counts every hand-back of a record
    /// (`x-delivery-count`), so `max_deliveries` ends a record that keeps coming back from
    /// nodes that die holding it. Each queue is a Raft group, a broker process per member, so
    /// each recipient costs more than a classic queue (BENCHMARKS.md: about 130 KiB of broker
    /// memory against 35 KiB, and 35 KiB more once the recipient was read, for its ledger, a
    /// classic queue: see the [module docs](super)); and the broker admits a record while
    /// the queue is under its limits, so a queue can pass `max_messages` or `max_bytes` by one record beyond what readers hold
    /// ([`Capabilities::exact_quotas`](crate::storage::Capabilities::exact_quotas) is false
    /// on both types). Reads take a batch with a short-lived consumer (a `basic.get` here is
    /// a command through the queue's Raft log, one at a time): a backlog drains at about
    /// 33 k msg/s on this project's 2-core machine, two thirds of a raw consumer
    /// (BENCHMARKS.md). See [`AmqpOptions::consumer_wait`].
    #[default]
    Quorum,
    /// One broker node's queue, persistent messages on disk before a publish is confirmed:
    /// cheaper per queue, limits kept exactly, not replicated. The broker only marks a
    /// handed-back record redelivered, without a count: a record read again after its holder
    /// died counts as delivered once before, however often that happened, so
    /// `max_deliveries` only counts the deliveries one node made.
    Classic,
}

impl QueueType {
    pub(super) fn argument(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Settings for [`AmqpStorage`]; from [`AmqpStorage::options`].
#[derive(Clone, Debug)]
pub struct AmqpOptions {
    pub(super) prefix: String,
    pub(super) queue_type: QueueType,
    pub(super) hold_idle: Duration,
    pub(super) max_read_batch: usize,
    pub(super) operation_timeout: Duration,
    pub(super) consumer_wait: Duration,
    /// How far behind the wall clock this node stamps (tests only: a node whose clock lags).
    pub(super) clock_behind: Duration,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            prefix: "oq".to_owned(),
            queue_type: QueueType::Quorum,
            hold_idle: Duration::from_secs(30),
            max_read_batch: 1_000,
            operation_timeout: Duration::from_secs(10),
            consumer_wait: Duration::from_millis(250),
            clock_behind: Duration::ZERO,
        }
    }
}

impl AmqpOptions {
    /// The start of every queue name (default `oq`): ASCII letters, digits, `_`, `-` and `.`,
    /// 1 to 64 bytes, not `amq.`. Two applications on one virtual host need different
    /// prefixes (or a virtual host each, in the URL).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The kind of queue each recipient gets (default [`QueueType::Quorum`]).
    #[must_use]
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// How long this node keeps holding the records it read for a recipient after the last
    /// read or ack (default 30 s). Held records are invisible to other nodes; `purge` (the
    /// engine's maintenance) hands back those idle this long, and the broker hands them on.
    #[must_use]
    pub fn hold_idle(mut self, idle: Duration) -> Self {
        self.hold_idle = idle;
        self
    }

    /// The most records one read returns (default 1,000). A read takes at most 100 records
    /// from the broker at a time: a burst of `basic.get`s on a classic queue, a consumer on a
    /// quorum queue.
    #[must_use]
    pub fn max_read_batch(mut self, max: usize) -> Self {
        self.max_read_batch = max;
        self
    }

    /// How long one step waits for the broker (default 10 s): a publish's confirm, a read's
    /// `basic.get`s, a declare. Past it the step fails with a retryable error, so a queue the
    /// broker cannot serve (a quorum queue without a leader, a broker blocked on memory or
    /// disk) fails sends instead of hanging them. A publish that timed out may still have
    /// been stored.
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// On a quorum queue, how long a read's consumer waits for the records the broker said
    /// were ready before it is cancelled (default 250 ms). It only runs out when fewer come
    /// (they expired, a length limit dropped them, or another node took them meanwhile), and
    /// then costs the read that long. The broker takes back what was still on its way, and
    /// counts that as a hand-back in the record's `x-delivery-count`, so a short wait can
    /// count deliveries no session saw. Zero cancels each consumer at once: nothing is lost,
    /// but reads are slower. Classic queues read with `basic.get` and do not wait.
    #[must_use]
    pub fn consumer_wait(mut self, wait: Duration) -> Self {
        self.consumer_wait = wait;
        self
    }

    /// Stamps seqs as if this node's clock were `by` behind (for tests of nodes whose clocks
    /// differ).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    #[must_use]
    pub fn clock_behind_for_tests(mut self, by: Duration) -> Self {
        self.clock_behind = by;
        self
    }

    /// Connects to the broker at `url` (`amqp://user:password@host:port/vhost`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad prefix or batch size; a retryable storage error if
    /// the broker does not answer.
    pub async fn connect(self, url: &str) -> Result<AmqpStorage> {
        check_prefix(&self.prefix).map_err(|reason| Error::InvalidConfig {
            field: "AmqpOptions::prefix",
            reason,
        })?;
        if self.operation_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "AmqpOptions::operation_timeout",
                reason: "must be above zero".to_owned(),
            });
        }
        if self.max_read_batch == 0 {
            return Err(Error::InvalidConfig {
                field: "AmqpOptions::max_read_batch",
                reason: "must be at least 1".to_owned(),
            });
        }
        AmqpStorage::connect_with(url, self).await
    }
}
