//! When to nudge: the coalescing state behind [`NotifyPolicy`]. Its memory is bounded by the
//! recipients nudged within the longest period and the sessions ended within `unacked_delay`,
//! never by the number of offline recipients; and by `max_tracked_recipients` whatever the
//! periods.

use std::collections::VecDeque;

use crate::clock::Timestamp;
use crate::message::{RecipientId, RecipientMap, Urgency};
use crate::notifier::{NotifyPolicy, NudgeReason};

#[derive(Debug, Default)]
pub(crate) struct NudgeState {
    /// When each recently nudged recipient was last nudged.
    last_sent: RecipientMap<Timestamp>,
    /// `last_sent` insertions in time order, to forget them in order.
    sent_order: VecDeque<(Timestamp, RecipientId)>,
    /// Sessions that ended with messages pending: `(ended at, recipient)`, in time order.
    ended_pending: VecDeque<(Timestamp, RecipientId)>,
}

impl NudgeState {
    /// Whether a message of `urgency` stored for offline `recipient` now earns a nudge; records
    /// it as sent if so.
    pub(crate) fn on_stored(
        &mut self,
        policy: &NotifyPolicy,
        recipient: &RecipientId,
        urgency: Urgency,
        now: Timestamp,
    ) -> Option<NudgeReason> {
        let (reason, period) = match urgency {
            Urgency::Silent => return None,
            Urgency::Urgent => (NudgeReason::Urgent, policy.urgent_cooldown),
            Urgency::Background => (NudgeReason::Background, policy.background_interval),
        };
        if let Some(&last) = self.last_sent.get(recipient)
            && now.duration_since(last) < period
            && now >= last
        {
            return None;
        }
        self.record_sent(policy, recipient, now);
        Some(reason)
    }

    pub(crate) fn record_sent(
        &mut self,
        policy: &NotifyPolicy,
        recipient: &RecipientId,
        now: Timestamp,
    ) {
        self.last_sent.insert(recipient.clone(), now);
        self.sent_order.push_back((now, recipient.clone()));
        // Past the count, the oldest nudge is forgotten before its period ends.
        while self.sent_order.len() > policy.max_tracked_recipients.max(1) {
            self.forget_oldest_sent();
        }
    }

    fn forget_oldest_sent(&mut self) {
        if let Some((at, recipient)) = self.sent_order.pop_front()
            && self.last_sent.get(&recipient) == Some(&at)
        {
            self.last_sent.remove(&recipient);
        }
    }

    /// A session connected: its recipient's next offline message nudges at once.
    pub(crate) fn on_connect(&mut self, recipient: &RecipientId) {
        self.last_sent.remove(recipient);
    }

    /// A session ended with messages pending. Returns whether an older session end was
    /// forgotten to stay within the count (its delayed nudge will not be sent).
    pub(crate) fn on_ended_pending(
        &mut self,
        policy: &NotifyPolicy,
        recipient: &RecipientId,
        now: Timestamp,
    ) -> bool {
        self.ended_pending.push_back((now, recipient.clone()));
        if self.ended_pending.len() > policy.max_tracked_recipients.max(1) {
            self.ended_pending.pop_front();
            return true;
        }
        false
    }

    /// Recipients whose ended session is now due a nudge (skipping any nudged since it ended),
    /// each once; the caller records the ones it actually nudges. Also forgets nudges older
    /// than every period.
    pub(crate) fn due(&mut self, policy: &NotifyPolicy, now: Timestamp) -> Vec<RecipientId> {
        let mut due = Vec::new();
        let mut listed: RecipientMap<()> = RecipientMap::default();
        while let Some((ended, _)) = self.ended_pending.front() {
            if now.duration_since(*ended) < policy.unacked_delay && now >= *ended {
                break;
            }
            let (ended, recipient) = self.ended_pending.pop_front().expect("front exists");
            if self
                .last_sent
                .get(&recipient)
                .is_some_and(|&last| last >= ended)
            {
                continue;
            }
            // A set, not `due.contains`: a mass disconnect makes this list long.
            if listed.insert(recipient.clone(), ()).is_none() {
                due.push(recipient);
            }
        }
        let keep = policy.urgent_cooldown.max(policy.background_interval);
        while let Some((at, _)) = self.sent_order.front() {
            if now.duration_since(*at) < keep && now >= *at {
                break;
            }
            self.forget_oldest_sent();
        }
        self.shrink();
        due
    }

    /// Gives back the room a burst left: a map or deque keeps its capacity when emptied, so
    /// a million recipients nudged once would hold their space long after being forgotten.
    fn shrink(&mut self) {
        fn roomy(len: usize, capacity: usize) -> bool {
            capacity > 1024 && len < capacity / 4
        }
        if roomy(self.last_sent.len(), self.last_sent.capacity()) {
            self.last_sent.shrink_to(self.last_sent.len() * 2);
        }
        if roomy(self.sent_order.len(), self.sent_order.capacity()) {
            self.sent_order.shrink_to(self.sent_order.len() * 2);
        }
        if roomy(self.ended_pending.len(), self.ended_pending.capacity()) {
            self.ended_pending.shrink_to(self.ended_pending.len() * 2);
        }
    }

    /// Entries held (for the memory-bound tests).
    pub(crate) fn len(&self) -> usize {
        self.last_sent.len() + self.sent_order.len() + self.ended_pending.len()
    }
}
