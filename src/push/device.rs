//! Where a recipient's nudges go: [`Device`], and the host's [`PushTargets`].

use std::collections::HashMap;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;

use super::PushError;
use crate::message::RecipientId;

/// Longest endpoint URL a Web Push subscription may have. Push services issue URLs of a few
/// hundred bytes; this bound keeps a hostile client from storing megabytes in one.
pub const MAX_ENDPOINT_BYTES: usize = 2048;

/// One device of a recipient: the push service that reaches it, and its address there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Device {
    /// A browser or service worker subscribed with the Push API (RFC 8030).
    WebPush(WebPushSubscription),
    /// An Android app, by its FCM registration token (the nudge sets FCM's Android options;
    /// reach Apple devices with [`Device::Apns`]).
    Fcm(PushToken),
    /// An iOS, iPadOS or macOS app, by its APNs device token (hex).
    Apns(PushToken),
}

impl Device {
    /// Where the device is reached: its endpoint or token.
    fn address(&self) -> &str {
        match self {
            Device::WebPush(subscription) => subscription.endpoint(),
            Device::Fcm(token) | Device::Apns(token) => token.as_str(),
        }
    }
}

/// Longest registration or device token accepted. FCM's are about 160 bytes, APNs' 32 bytes
/// (64 hex digits); the bound only keeps hostile input small.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// An opaque token a push service issued for one app on one device (an FCM registration
/// token). `Debug` shows only its start: a token is enough to push to the device.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PushToken(String);

impl PushToken {
    /// Checks and keeps a token: 1 to [`MAX_TOKEN_BYTES`] printable ASCII characters, no
    /// spaces.
    ///
    /// # Errors
    /// A [`PushError`] saying what is wrong.
    pub fn new(token: &str) -> Result<Self, PushError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(PushError::new(
                "push token",
                format!("{} bytes, must be 1 to {MAX_TOKEN_BYTES}", token.len()),
            ));
        }
        if let Some(bad) = token.bytes().find(|b| !b.is_ascii_graphic()) {
            return Err(PushError::new(
                "push token",
                format!("byte 0x{bad:02x} is not printable ASCII"),
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PushToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: String = self.0.chars().take(6).collect();
        write!(f, "PushToken({shown}…)")
    }
}

/// A Web Push subscription, as the browser's `PushSubscription.toJSON()` gives it: the push
/// service's endpoint URL, the user agent's P-256 public key (`keys.p256dh`) and its 16-byte
/// authentication secret (`keys.auth`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WebPushSubscription {
    endpoint: String,
    p256dh: [u8; 65],
    auth: [u8; 16],
}

impl WebPushSubscription {
    /// Checks and keeps a subscription: `endpoint` an `http(s)://` URL of at most
    /// [`MAX_ENDPOINT_BYTES`], `p256dh` an uncompressed P-256 point (65 bytes) and `auth` 16
    /// bytes, both base64url as browsers give them (padding allowed).
    ///
    /// # Errors
    /// A [`PushError`] naming the part that is wrong.
    pub fn new(endpoint: &str, p256dh: &str, auth: &str) -> Result<Self, PushError> {
        if endpoint.len() > MAX_ENDPOINT_BYTES {
            return Err(PushError::new(
                "web push endpoint",
                format!(
                    "{} bytes, over the limit of {MAX_ENDPOINT_BYTES}",
                    endpoint.len()
                ),
            ));
        }
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
            || endpoint.parse::<hyper::Uri>().is_err()
        {
            return Err(PushError::new(
                "web push endpoint",
                format!("{endpoint:?} is not an http(s) URL"),
            ));
        }
        let p256dh: [u8; 65] = decode_fixed("web push keys.p256dh", p256dh)?;
        if p256dh[0] != 0x04 {
            return Err(PushError::new(
                "web push keys.p256dh",
                "not an uncompressed P-256 point (must start with 0x04)",
            ));
        }
        let auth = decode_fixed("web push keys.auth", auth)?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            p256dh,
            auth,
        })
    }

    /// The push service's URL for this subscription.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The user agent's public key, uncompressed (65 bytes).
    pub fn p256dh(&self) -> &[u8; 65] {
        &self.p256dh
    }

    /// The user agent's authentication secret.
    pub fn auth(&self) -> &[u8; 16] {
        &self.auth
    }
}

impl std::fmt::Debug for WebPushSubscription {
    // The endpoint is a bearer capability: whoever has it can push to the device. Logs get
    // its origin only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origin = self
            .endpoint
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|uri| uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        f.debug_struct("WebPushSubscription")
            .field("endpoint_host", &origin)
            .finish_non_exhaustive()
    }
}

fn decode_fixed<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], PushError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| PushError::new(what, format!("not base64url: {e}")))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| PushError::new(what, format!("{len} bytes, must be {N}")))
}

/// The host's record of which devices each recipient has. Implement it over your database;
/// [`MemoryPushTargets`] keeps them in memory.
#[async_trait]
pub trait PushTargets: Send + Sync + 'static {
    /// The recipient's devices (none is fine: the nudge is counted as without a device).
    ///
    /// # Errors
    /// A lookup failure; the nudge is counted as failed and not retried (the next message
    /// nudges again).
    async fn devices(&self, recipient: &RecipientId) -> Result<Vec<Device>, PushError>;

    /// The push service said `device` is gone (the app was uninstalled, the token expired, the
    /// subscription was cancelled): delete it so no more nudges go there. Called once per
    /// device and provider answer, from the push task.
    async fn device_gone(&self, recipient: &RecipientId, device: &Device);
}

/// [`PushTargets`] in memory: for tests, examples, and hosts that rebuild them at start.
#[derive(Debug, Default)]
pub struct MemoryPushTargets {
    devices: Mutex<HashMap<RecipientId, Vec<Device>>>,
}

impl MemoryPushTargets {
    /// No devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Most devices kept per recipient; adding one more forgets the oldest, so one account
    /// cannot make a nudge fan out without bound.
    pub const MAX_DEVICES: usize = 10;

    /// Adds `device` to the recipient's devices. A device at the same address (endpoint or
    /// token) is replaced: a browser that subscribed again with new keys keeps one entry.
    pub fn add(&self, recipient: RecipientId, device: Device) {
        let mut devices = self.devices.lock();
        let list = devices.entry(recipient).or_default();
        list.retain(|d| d.address() != device.address());
        if list.len() >= Self::MAX_DEVICES {
            list.remove(0);
        }
        list.push(device);
    }

    /// Removes `device`; returns whether it was there.
    pub fn remove(&self, recipient: &RecipientId, device: &Device) -> bool {
        let mut devices = self.devices.lock();
        let Some(list) = devices.get_mut(recipient) else {
            return false;
        };
        let before = list.len();
        list.retain(|d| d != device);
        let removed = list.len() != before;
        if list.is_empty() {
            devices.remove(recipient);
        }
        removed
    }

    /// The recipient's devices now.
    pub fn list(&self, recipient: &RecipientId) -> Vec<Device> {
        self.devices
            .lock()
            .get(recipient)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait]
impl PushTargets for MemoryPushTargets {
    async fn devices(&self, recipient: &RecipientId) -> Result<Vec<Device>, PushError> {
        Ok(self.list(recipient))
    }

    async fn device_gone(&self, recipient: &RecipientId, device: &Device) {
        self.remove(recipient, device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn a_subscription_names_the_part_that_is_wrong() {
        let ok = WebPushSubscription::new("https://push.example.net/x", P256DH, AUTH).unwrap();
        assert_eq!(ok.auth().len(), 16);
        // Browsers sometimes pad; the padding is ignored.
        assert!(
            WebPushSubscription::new("https://p.example/x", P256DH, "BTBZMqHH6r4Tts7J_aSIgg==")
                .is_ok()
        );

        let err = WebPushSubscription::new("ftp://push.example.net/x", P256DH, AUTH).unwrap_err();
        assert_eq!(err.what, "web push endpoint");
        let long = format!("https://p.example/{}", "a".repeat(MAX_ENDPOINT_BYTES));
        let err = WebPushSubscription::new(&long, P256DH, AUTH).unwrap_err();
        assert!(err.reason.contains("over the limit of 2048"), "{err}");
        let err = WebPushSubscription::new("https://p.example/x", &P256DH[..80], AUTH).unwrap_err();
        assert_eq!(
            (err.what, err.reason.as_str()),
            ("web push keys.p256dh", "60 bytes, must be 65")
        );
        let err =
            WebPushSubscription::new("https://p.example/x", P256DH, "not base64!").unwrap_err();
        assert_eq!(err.what, "web push keys.auth");
        let compressed = URL_SAFE_NO_PAD.encode([0x02; 65]);
        let err = WebPushSubscription::new("https://p.example/x", &compressed, AUTH).unwrap_err();
        assert!(err.reason.contains("uncompressed"), "{err}");
    }

    #[test]
    fn a_subscription_debug_shows_the_host_not_the_capability_url() {
        let s =
            WebPushSubscription::new("https://push.example.net/secret-path", P256DH, AUTH).unwrap();
        let shown = format!("{s:?}");
        assert!(
            shown.contains("push.example.net") && !shown.contains("secret-path"),
            "{shown}"
        );
    }

    #[test]
    fn a_token_is_printable_and_bounded_and_debug_hides_it() {
        let token = PushToken::new("dGVzdC10b2tlbi1mb3ItZmNt:APA91b").unwrap();
        assert_eq!(format!("{token:?}"), "PushToken(dGVzdC…)");
        assert_eq!(
            PushToken::new("").unwrap_err().reason,
            "0 bytes, must be 1 to 4096"
        );
        assert!(PushToken::new(&"a".repeat(MAX_TOKEN_BYTES)).is_ok());
        assert!(PushToken::new(&"a".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert_eq!(
            PushToken::new("ab cd").unwrap_err().reason,
            "byte 0x20 is not printable ASCII"
        );
    }

    #[test]
    fn memory_targets_add_once_and_forget_gone_devices() {
        let targets = MemoryPushTargets::new();
        let bob = RecipientId::new("bob").unwrap();
        let device =
            Device::WebPush(WebPushSubscription::new("https://p.example/x", P256DH, AUTH).unwrap());
        targets.add(bob.clone(), device.clone());
        targets.add(bob.clone(), device.clone());
        assert_eq!(targets.list(&bob).len(), 1);
        futures::executor::block_on(targets.device_gone(&bob, &device));
        assert!(targets.list(&bob).is_empty());
        assert!(!targets.remove(&bob, &device));
    }

    #[test]
    fn memory_targets_keep_one_device_per_address_and_a_bounded_number() {
        let targets = MemoryPushTargets::new();
        let bob = RecipientId::new("bob").unwrap();
        let device =
            Device::WebPush(WebPushSubscription::new("https://p.example/x", P256DH, AUTH).unwrap());
        targets.add(bob.clone(), device.clone());
        // Subscribed again at the same endpoint with new keys: replaced, not added.
        let rekeyed = Device::WebPush(
            WebPushSubscription::new("https://p.example/x", P256DH, "AAAAAAAAAAAAAAAAAAAAAA")
                .unwrap(),
        );
        targets.add(bob.clone(), rekeyed.clone());
        assert_eq!(targets.list(&bob), std::slice::from_ref(&rekeyed));
        // Past the bound, the oldest go.
        for n in 0..MemoryPushTargets::MAX_DEVICES {
            let token = PushToken::new(&format!("token-{n}")).unwrap();
            targets.add(bob.clone(), Device::Fcm(token));
        }
        let list = targets.list(&bob);
        assert_eq!(list.len(), MemoryPushTargets::MAX_DEVICES);
        assert!(!list.contains(&rekeyed), "the oldest was forgotten");
    }
}
