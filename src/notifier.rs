//! [`Notifier`]: how an offline recipient is nudged to reconnect (FCM, APNs, Web Push, a
//! webhook). The engine decides when, by [`NotifyPolicy`]; the notifier only sends.

use std::time::Duration;

use futures::channel::mpsc;
use parking_lot::Mutex;

use crate::message::RecipientId;

/// Why a nudge goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NudgeReason {
    /// An urgent message was stored for an offline recipient.
    Urgent,
    /// A background message was stored for an offline recipient.
    Background,
    /// A session ended with messages still unacked or undelivered.
    Unacked,
}

/// A content-free push: who, why, and how many messages wait. Never the payload or the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nudge {
    /// Who to nudge.
    pub recipient: RecipientId,
    /// Messages waiting, when the engine knows.
    pub pending: Option<u64>,
    /// Why.
    pub reason: NudgeReason,
    /// How long the nudge is worth delivering: the time the message that caused it has left
    /// to live (the longest, for several sent at once). `None` when it never expires, or for
    /// a session's end. Push providers keep a nudge no longer than this (FCM `ttl`, APNs
    /// `apns-expiration`, Web Push `TTL`), nor longer than their own setting.
    pub ttl: Option<Duration>,
}

/// The push failed; the message it announced is stored all the same.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("notify failed: {0}")]
pub struct NotifyError(pub String);

/// Hands a nudge for an offline recipient to the push service.
///
/// Called from `send` after the message is stored, and deliberately not `async`: a send never
/// waits on a push service, and a hung push service cannot hang a send. A notifier that talks
/// to the network queues the nudge and sends it from its own task ([`ChannelNotifier`] is that
/// queue: drain its receiver in a task that calls FCM, APNs or a webhook, with retries). An
/// error is counted and logged; it never fails or loses a send.
pub trait Notifier: Send + Sync + 'static {
    /// Queues `nudge` for sending; must not block.
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError>;
}

/// A notifier that does nothing (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopNotifier;

impl Notifier for NoopNotifier {
    fn notify(&self, _nudge: Nudge) -> Result<(), NotifyError> {
        Ok(())
    }
}

/// A notifier that keeps every nudge, for tests and examples.
#[derive(Debug, Default)]
pub struct RecordingNotifier(Mutex<Vec<Nudge>>);

impl RecordingNotifier {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the nudges recorded so far.
    pub fn take(&self) -> Vec<Nudge> {
        std::mem::take(&mut self.0.lock())
    }
}

impl Notifier for RecordingNotifier {
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError> {
        self.0.lock().push(nudge);
        Ok(())
    }
}

/// A notifier that queues nudges on a bounded channel and never waits: a full channel fails
/// the nudge (counted by the engine), so a slow push service never slows a send. Clones share
/// the one channel and its bound.
#[derive(Clone, Debug)]
pub struct ChannelNotifier(std::sync::Arc<Mutex<mpsc::Sender<Nudge>>>);

impl ChannelNotifier {
    /// A notifier with room for `buffer` queued nudges, and the receiving end to drain them.
    pub fn new(buffer: usize) -> (Self, mpsc::Receiver<Nudge>) {
        let (tx, rx) = mpsc::channel(buffer);
        (Self(std::sync::Arc::new(Mutex::new(tx))), rx)
    }
}

impl Notifier for ChannelNotifier {
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError> {
        // One sender, never cloned per call: each futures-channel sender clone brings its own
        // extra slot, so cloning here would make the bound meaningless.
        self.0.lock().try_send(nudge).map_err(|e| {
            NotifyError(if e.is_full() {
                "queue full".into()
            } else {
                "receiver dropped".into()
            })
        })
    }
}

/// When the engine nudges. Defaults follow Signal's: urgent at once then at most once a minute,
/// background at most once per 20 minutes, and a session that ends with messages pending earns
/// a nudge a minute later (sent by [`OfflineQueue::maintain`](crate::OfflineQueue::maintain)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyPolicy {
    /// After a nudge, further urgent messages do not nudge for this long.
    pub urgent_cooldown: Duration,
    /// Background messages nudge at most once per this period.
    pub background_interval: Duration,
    /// Delay before nudging a recipient whose session ended with messages pending.
    pub unacked_delay: Duration,
    /// Most entries the coalescing state keeps of each kind: nudges sent within the longest
    /// period above (one per nudge, so a recipient nudged often holds several) and session
    /// ends awaiting their delayed nudge. Its memory is then bounded by a count as well as by
    /// the periods, whatever a burst to distinct recipients brings. Default 1,000,000 (about
    /// 100 bytes each); 0 counts as 1. Past it the oldest are forgotten early: a recipient
    /// forgotten as recently nudged may be nudged again within its cooldown (a push too many,
    /// never one too few); a session end forgotten loses its delayed nudge (unless another
    /// end of the same recipient is still kept), counted in `notifications_failed`.
    pub max_tracked_recipients: usize,
}

impl Default for NotifyPolicy {
    fn default() -> Self {
        Self {
            urgent_cooldown: Duration::from_secs(60),
            background_interval: Duration::from_secs(20 * 60),
            unacked_delay: Duration::from_secs(60),
            max_tracked_recipients: 1_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nudge() -> Nudge {
        Nudge {
            recipient: RecipientId::new("bob").unwrap(),
            pending: Some(1),
            reason: NudgeReason::Urgent,
            ttl: None,
        }
    }

    #[test]
    fn a_channel_notifier_is_bounded_even_through_clones() {
        let (notifier, _receiver) = ChannelNotifier::new(2);
        let clone = notifier.clone();
        let accepted = (0..10)
            .filter(|i| {
                let target = if i % 2 == 0 { &notifier } else { &clone };
                target.notify(nudge()).is_ok()
            })
            .count();
        // futures' channel holds `buffer` plus one slot for the one sender.
        assert_eq!(accepted, 3);
        assert_eq!(
            notifier.notify(nudge()),
            Err(NotifyError("queue full".into()))
        );
    }
}
