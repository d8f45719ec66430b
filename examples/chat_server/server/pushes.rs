//! The pushes the server made, kept so a user can see what reached (or would reach) their
//! phone: who, how many waited, why and when. Never the content or the sender: a push carries
//! neither.
//!
//! Every nudge the engine hands over is logged here, then passed on to the webhook when there
//! is one. The log keeps the latest [`KEPT`] pushes over all users, so its memory is bounded
//! by a count whatever the traffic.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use offline_queue::{Notifier, NotifyError, Nudge, NudgeReason, RecipientId};
use parking_lot::Mutex;
use serde::Serialize;

/// Pushes kept, over all users; older ones are forgotten.
const KEPT: usize = 1000;

/// One push, as the page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Push {
    pub at_ms: u64,
    pub pending: Option<u64>,
    pub reason: &'static str,
    /// Whether it went to `--notify-webhook` (without one, it is only logged).
    pub webhook: bool,
    /// Whether it went to the push providers' queue (`--push-*`).
    pub push: bool,
}

/// The latest pushes, shared by the notifier (writer) and `GET /pushes` (reader).
#[derive(Default)]
pub struct PushLog(Mutex<VecDeque<(RecipientId, Push)>>);

impl PushLog {
    /// The pushes for `recipient` still kept, oldest first.
    pub fn for_recipient(&self, recipient: &RecipientId) -> Vec<Push> {
        let log = self.0.lock();
        log.iter()
            .filter(|(to, _)| to == recipient)
            .map(|(_, push)| push.clone())
            .collect()
    }

    fn record(&self, recipient: RecipientId, push: Push) {
        let mut log = self.0.lock();
        if log.len() == KEPT {
            log.pop_front();
        }
        log.push_back((recipient, push));
    }
}

/// The engine's notifier: logs each nudge, then hands it to the webhook's queue and the push
/// providers' queue, where they are on.
pub struct LoggingNotifier<N> {
    pub log: Arc<PushLog>,
    pub webhook: Option<N>,
    pub push: Option<Arc<dyn Notifier>>,
}

impl<N: Notifier> Notifier for LoggingNotifier<N> {
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError> {
        let push = Push {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
            pending: nudge.pending,
            reason: match nudge.reason {
                NudgeReason::Urgent => "new message",
                NudgeReason::Background => "new background message",
                NudgeReason::Unacked => "left unread",
                _ => "other",
            },
            webhook: false,
            push: false,
        };
        let recipient = nudge.recipient.clone();
        // Logged as sent only where a queue took it: a dropped push is not shown as sent.
        let to_webhook = self.webhook.as_ref().map(|w| w.notify(nudge.clone()));
        let to_push = self.push.as_ref().map(|p| p.notify(nudge));
        let push = Push {
            webhook: matches!(to_webhook, Some(Ok(()))),
            push: matches!(to_push, Some(Ok(()))),
            ..push
        };
        // Failed (and counted so by the engine) if every queue there is refused it.
        match (to_webhook, to_push) {
            (Some(Err(error)), None | Some(Err(_))) | (None, Some(Err(error))) => Err(error),
            _ => {
                self.log.record(recipient, push);
                Ok(())
            }
        }
    }
}
