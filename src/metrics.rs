//! Counters the engine keeps, and the snapshot it reports.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($(#[doc = $help:literal] $name:ident),* $(,)?) => {
        /// Live counters, updated with relaxed atomics.
        #[derive(Debug, Default)]
        pub(crate) struct Metrics {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A copy of the engine's counters at one moment. Counters only grow, except the
        /// `live_sessions` gauge.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct MetricsSnapshot {
            $(#[doc = $help] pub $name: u64,)*
            /// Sessions connected to this engine now.
            pub live_sessions: u64,
        }

        impl Metrics {
            pub(crate) fn snapshot(&self, live_sessions: u64) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    live_sessions,
                }
            }
        }

        impl MetricsSnapshot {
            /// Every value as `(name, value)`, for exporters (Prometheus, logs).
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name),)* ("live_sessions", self.live_sessions)].into_iter()
            }

            /// Every value with its one-line description, as `(name, help, value)`: what an
            /// exporter needs to document each series (Prometheus `# HELP`). All are counters
            /// except `live_sessions`, a gauge.
            pub fn iter_described(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> {
                [
                    $((stringify!($name), $help.trim(), self.$name),)*
                    ("live_sessions", LIVE_SESSIONS_HELP, self.live_sessions),
                ]
                .into_iter()
            }
        }
    };
}

/// `live_sessions`'s description, as its field's doc says it.
const LIVE_SESSIONS_HELP: &str = "Sessions connected to this engine now.";

metrics! {
    /// Messages stored.
    stored,
    /// Sends that matched an id within the dedup window and were not stored again.
    duplicates,
    /// Messages handed to a transport (redeliveries included).
    delivered,
    /// Messages handed to a transport that had been handed over before.
    redelivered,
    /// Messages acked by recipients.
    acked,
    /// Messages expired before an ack (purged, or passed over at delivery).
    expired,
    /// Messages dropped by `Overflow::DropOldest`.
    dropped,
    /// Messages sent to the dead-letter hook after `max_deliveries`.
    dead_lettered,
    /// Stored records that failed to decode (reported to the recipient as a gap).
    corrupt,
    /// Sends rejected: payload over `max_message_bytes`.
    rejected_too_large,
    /// Sends rejected: recipient queue full.
    rejected_queue_full,
    /// Sends rejected: storage byte budget reached.
    rejected_storage_full,
    /// Sends rejected: invalid TTL.
    rejected_invalid_ttl,
    /// Sends that failed in storage.
    storage_errors,
    /// Ephemeral messages handed to a live session.
    ephemeral_delivered,
    /// Ephemeral messages dropped (no live session, or its buffer was full).
    ephemeral_dropped,
    /// Nudges the notifier accepted.
    notifications_sent,
    /// Nudges not sent because one went out recently.
    notifications_coalesced,
    /// Nudges the notifier failed.
    notifications_failed,
    /// Recipient queues removed for being idle.
    idle_recipients_removed,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    // Most adds on the hot path are zero (no duplicates, no drops): skip the atomic.
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_has_its_description() {
        let metrics = Metrics::default();
        metrics.stored.store(7, Ordering::Relaxed);
        let snapshot = metrics.snapshot(3);
        let plain: Vec<_> = snapshot.iter().collect();
        let described: Vec<_> = snapshot.iter_described().collect();
        assert_eq!(plain.len(), described.len());
        for ((name, value), (described_name, help, described_value)) in plain.iter().zip(&described)
        {
            assert_eq!((name, value), (described_name, described_value));
            assert!(
                help.ends_with('.') && !help.starts_with(' '),
                "{name}: {help:?}"
            );
        }
        assert!(described.contains(&("stored", "Messages stored.", 7)));
        assert!(described.contains(&("live_sessions", LIVE_SESSIONS_HELP, 3)));
    }
}
