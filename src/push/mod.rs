//! Push nudges sent by the crate: the devices of each recipient, a provider per push service,
//! and [`PushNotifier`], the [`Notifier`](crate::Notifier) that ties them together.
//!
//! The engine decides *when* to nudge an offline recipient ([`NotifyPolicy`](crate::NotifyPolicy):
//! coalescing, cooldowns, the delayed nudge after a session ends with messages pending). This
//! module does the sending, so a host does not write OAuth, JWTs, payload encryption, token
//! pruning and retries again:
//!
//! - **[`PushTargets`]**: the host's lookup of a recipient's devices, and the callback that tells
//!   it a device is gone (the push service said the token or subscription is dead) so it can
//!   delete it. [`MemoryPushTargets`] is an in-memory one.
//! - **[`PushProvider`]**: one push service, one request per device. [`WebPush`] (feature
//!   `web-push`) is built in; a host can write its own.
//! - **[`PushNotifier`]**: queues each nudge without blocking (a full queue drops it and counts
//!   it), and a task sends it: at most [`PushOptions::concurrency`] nudges at a time, each
//!   request bounded by a timeout, retries with backoff and jitter, `Retry-After` honoured, a
//!   give-up after [`PushOptions::give_up_after`], every outcome counted in [`PushMetrics`].
//!
//! A push is a hint, never the delivery: the message waits in storage until the recipient
//! connects and acks it, whether the push arrived, was throttled or was coalesced by the push
//! service. The payload carries no message content and no sender, only what the [`Nudge`](crate::Nudge) has
//! (how many messages wait, and why).
//!
//! ```no_run
//! # #[cfg(feature = "web-push")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use offline_queue::push::{
//!     Device, MemoryPushTargets, PushNotifier, PushOptions, VapidKey, WebPush,
//!     WebPushSubscription,
//! };
//! use offline_queue::{OfflineQueue, RecipientId};
//!
//! let targets = Arc::new(MemoryPushTargets::new());
//! // What the browser's PushSubscription.toJSON() gave you:
//! let subscription = WebPushSubscription::new(
//!     "https://push.example.net/send/abc",
//!     "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
//!     "BTBZMqHH6r4Tts7J_aSIgg",
//! )?;
//! targets.add(RecipientId::new("bob")?, Device::WebPush(subscription));
//!
//! let vapid = VapidKey::from_base64url(&std::env::var("VAPID_PRIVATE_KEY")?)?;
//! let web_push = WebPush::new(vapid, "mailto:ops@example.com")?;
//! let (notifier, _task) =
//!     PushNotifier::start(targets, vec![Arc::new(web_push)], PushOptions::default())?;
//! let queue = OfflineQueue::builder().notifier(Arc::new(notifier.clone())).build()?;
//! // Later: notifier.metrics() says what was delivered, retried, given up or gone.
//! # Ok(()) }
//! ```

#[cfg(feature = "apns")]
pub mod apns;
mod device;
#[cfg(feature = "fcm")]
pub mod fcm;
// push-http on its own (no provider) builds the client and uses none of it.
#[cfg(feature = "push-http")]
#[cfg_attr(
    not(any(feature = "web-push", feature = "fcm", feature = "apns")),
    allow(dead_code)
)]
mod http;
mod notifier;
#[cfg(feature = "web-push")]
pub mod web_push;

#[cfg(feature = "apns")]
pub use apns::{Apns, ApnsKey, ApnsOptions};
pub use device::{
    Device, MAX_ENDPOINT_BYTES, MAX_TOKEN_BYTES, MemoryPushTargets, PushTargets, PushToken,
    WebPushSubscription,
};
#[cfg(feature = "fcm")]
pub use fcm::{Fcm, FcmOptions, FcmServiceAccount};
pub use notifier::{PushAttempt, PushMetrics, PushNotifier, PushOptions, PushProvider};
#[cfg(feature = "web-push")]
pub use web_push::{VapidKey, WebPush, WebPushOptions};

/// Bad push configuration or device data: what was wrong, and the limit where there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("push: {what}: {reason}")]
pub struct PushError {
    /// What was wrong (a field, a key, a subscription part).
    pub what: &'static str,
    /// Why, with the limit where there is one.
    pub reason: String,
}

/// The collapse key of a recipient's nudges (Web Push `Topic`, FCM `collapse_key`, APNs
/// `apns-collapse-id`): the same for every nudge to them, so a device that is offline keeps
/// only the latest. 32 hex digits of a SHA-256 of the id: within every service's limits and
/// alphabet, and the id itself never leaves the server.
#[cfg(feature = "push-http")]
#[cfg_attr(
    not(any(feature = "web-push", feature = "fcm", feature = "apns")),
    allow(dead_code)
)]
pub(crate) fn collapse_key(recipient: &crate::RecipientId) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(recipient.as_bytes());
    crate::hex::encode(&digest[..16])
}

/// The nudge's reason as the payloads name it.
#[cfg(feature = "push-http")]
#[cfg_attr(
    not(any(feature = "web-push", feature = "fcm", feature = "apns")),
    allow(dead_code)
)]
pub(crate) fn reason_name(reason: crate::NudgeReason) -> &'static str {
    match reason {
        crate::NudgeReason::Urgent => "urgent",
        crate::NudgeReason::Background => "background",
        crate::NudgeReason::Unacked => "unacked",
    }
}

impl PushError {
    /// An error about `what`, for `reason` (a host's [`PushTargets`] returns these too).
    pub fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}

#[cfg(all(test, feature = "push-http"))]
mod tests {
    use super::*;

    #[test]
    fn the_collapse_key_is_32_hex_digits_per_recipient() {
        let id = |s: &str| crate::RecipientId::new(s).unwrap();
        let bob = collapse_key(&id("bob"));
        assert_eq!(bob.len(), 32);
        assert!(bob.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(bob, collapse_key(&id("bob")));
        assert_ne!(bob, collapse_key(&id("bob2")));
    }
}
