//! [`WebPush`]: nudges to browsers and service workers through their push service (RFC 8030),
//! the payload encrypted for the subscription (RFC 8291, `aes128gcm`) and the request signed
//! with the application server's key (RFC 8292, VAPID).
//!
//! Why these pieces: the `web-push` crate needs OpenSSL (a C library and its build on every
//! host); RustCrypto's `p256`, `hkdf` and `aes-gcm` are pure Rust, audited, and enough for the
//! few lines the RFCs ask. The encryption reproduces RFC 8291's worked example byte for byte
//! (a unit test), and the crate's tests decrypt and verify every request with an independent
//! implementation (Python's `http_ece` and `cryptography`).
//!
//! Each request carries:
//! - `TTL`: how long the push service keeps the push for an unreachable device (0: deliver
//!   now or never): [`WebPushOptions::ttl`], or the nudge's own [`ttl`](crate::Nudge::ttl)
//!   when shorter.
//! - `Urgency`: `high` for an urgent message, `normal` for a session that ended with messages
//!   pending, `low` for background messages (the device may hold low pushes to save battery).
//! - `Topic`: the same for every push to one recipient, so a device that is offline keeps one
//!   nudge, the latest, not one per message.
//! - the body: `{"pending":N,"reason":"urgent"}`, encrypted; never the content or the sender.
//!
//! Answers: 2xx delivered; 404 and 410 the subscription is gone (told to
//! [`PushTargets::device_gone`](super::PushTargets::device_gone)); 429 and 5xx retried
//! (honouring `Retry-After`); anything else refused for good (400 malformed, 403 the VAPID key
//! is not the one the subscription was made with, 413 too large).
//!
//! **Endpoints come from clients.** A subscription's endpoint is whatever the client sent, so
//! it could name a host on your own network. Only `https://` endpoints with a host name are
//! sent to (an address literal such as `169.254.169.254` is a device gone), and only an
//! encrypted body goes out; a name that resolves to a private address is not caught here:
//! where that matters, check endpoints against your push services' hosts when clients
//! register them.
//!
//! What it does not promise: the push service may delay, coalesce or drop pushes (browsers
//! limit pushes to a page that shows no notification); a push is a hint to reconnect, the
//! messages wait in storage regardless.

mod encrypt;
mod vapid;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};
use parking_lot::Mutex;

pub use self::vapid::VapidKey;
use super::http::HttpClient;
use super::{Device, PushAttempt, PushError, PushProvider, collapse_key, reason_name};
use crate::notifier::{Nudge, NudgeReason};

/// How [`WebPush`] sends. Start from `WebPushOptions::default()`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct WebPushOptions {
    /// How long a push service keeps a push for a device it cannot reach yet (the `TTL`
    /// header, whole seconds). `None`: one day. A nudge older than that is stale: the next
    /// message nudges again.
    pub ttl: Option<Duration>,
    /// Trust these PEM certificates instead of Mozilla's roots (a private push service, or a
    /// test's).
    pub root_certificates_pem: Option<Vec<u8>>,
    /// Send to `http://` endpoints too. Off by default: a real push service is always HTTPS,
    /// so an `http://` endpoint is refused, never sent in the clear. For tests against a local
    /// push service.
    pub allow_plain_http: bool,
    /// Send to any host and port. Off by default: an endpoint comes from a client, and push
    /// services are public names on the default port, so an endpoint whose host is an
    /// address in any spelling (`169.254.169.254`, `2852039166`, `127.1`, `[::1]`), a name
    /// without a dot (`localhost`) or with a numeric last label, or that names a port other
    /// than 443, is a device gone, never connected to. For tests against a local push
    /// service.
    pub allow_any_host: bool,
}

const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a signed VAPID token is valid; RFC 8292 allows at most 24 hours.
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// A cached token is signed again when less than this is left of it.
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(60 * 60);
/// Signed tokens kept, one per push service.
const MAX_CACHED_TOKENS: usize = 64;

/// Whether `authority` can be a public push service: a DNS name with a dot and an alphabetic
/// (or IDN) top-level label, on the default port. Every spelling of an address fails: dotted
/// or not, decimal, octal or hex, IPv6 in brackets.
fn is_push_service_host(authority: &hyper::http::uri::Authority) -> bool {
    if authority.port_u16().is_some_and(|port| port != 443) {
        return false;
    }
    let host = authority.host().trim_end_matches('.');
    let Some((_, top)) = host.rsplit_once('.') else {
        return false;
    };
    top.starts_with("xn--") || (!top.is_empty() && top.bytes().all(|b| b.is_ascii_alphabetic()))
}

/// The Web Push provider. See the [module docs](self).
pub struct WebPush {
    vapid: VapidKey,
    subject: String,
    ttl_seconds: u64,
    allow_plain_http: bool,
    allow_any_host: bool,
    client: HttpClient,
    /// Signed tokens by audience (a push service's origin), with their expiry (Unix seconds):
    /// one signature per push service and 11 hours, not one per push.
    tokens: Mutex<Vec<(String, u64, String)>>,
}

impl std::fmt::Debug for WebPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPush")
            .field("vapid", &self.vapid)
            .field("subject", &self.subject)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl WebPush {
    /// A provider signing with `vapid`. `subject` is how the push service reaches you about
    /// your pushes: a `mailto:` or `https:` URL (RFC 8292 §2.1).
    ///
    /// # Errors
    /// As [`WebPush::with_options`].
    pub fn new(vapid: VapidKey, subject: &str) -> Result<Self, PushError> {
        Self::with_options(vapid, subject, WebPushOptions::default())
    }

    /// As [`WebPush::new`], with options.
    ///
    /// # Errors
    /// A [`PushError`] when `subject` is not a `mailto:` or `https:` URL, or the certificates
    /// given are not usable.
    pub fn with_options(
        vapid: VapidKey,
        subject: &str,
        options: WebPushOptions,
    ) -> Result<Self, PushError> {
        let contact = subject
            .strip_prefix("mailto:")
            .or_else(|| subject.strip_prefix("https://"));
        if contact.is_none_or(str::is_empty) || subject.len() > 1024 {
            return Err(PushError::new(
                "vapid subject",
                format!("{subject:?} is not a mailto: or https: URL of at most 1024 bytes"),
            ));
        }
        let ttl = options.ttl.unwrap_or(DEFAULT_TTL);
        Ok(Self {
            vapid,
            subject: subject.to_owned(),
            ttl_seconds: ttl.as_secs(),
            allow_plain_http: options.allow_plain_http,
            allow_any_host: options.allow_any_host,
            client: HttpClient::new(options.root_certificates_pem.as_deref())?,
            tokens: Mutex::new(Vec::new()),
        })
    }

    /// The `Authorization` value for `audience`, signed again only when the cached one is
    /// near its end.
    fn authorization(&self, audience: &str) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut tokens = self.tokens.lock();
        if let Some((_, expires, value)) = tokens.iter().find(|(a, _, _)| a == audience)
            && *expires > now + TOKEN_RENEW_BEFORE.as_secs()
        {
            return value.clone();
        }
        let expires = now + TOKEN_LIFETIME.as_secs();
        let value = self.vapid.authorization(audience, expires, &self.subject);
        tokens.retain(|(a, e, _)| a != audience && *e > now);
        // A handful of push services exist; many audiences mean hostile endpoints: keep the
        // newest only.
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.remove(0);
        }
        tokens.push((audience.to_owned(), expires, value.clone()));
        value
    }
}

/// The body the device decrypts: what the nudge says, nothing of the message.
fn payload(nudge: &Nudge) -> Vec<u8> {
    serde_json::json!({ "pending": nudge.pending, "reason": reason_name(nudge.reason) })
        .to_string()
        .into_bytes()
}

fn urgency(reason: NudgeReason) -> &'static str {
    match reason {
        NudgeReason::Urgent => "high",
        NudgeReason::Unacked => "normal",
        NudgeReason::Background => "low",
    }
}

#[async_trait]
impl PushProvider for WebPush {
    fn name(&self) -> &'static str {
        "web-push"
    }

    fn serves(&self, device: &Device) -> bool {
        matches!(device, Device::WebPush(_))
    }

    async fn push(&self, device: &Device, nudge: &Nudge) -> PushAttempt {
        let Device::WebPush(subscription) = device else {
            return PushAttempt::Rejected("not a Web Push device".into());
        };
        let Ok(endpoint) = subscription.endpoint().parse::<Uri>() else {
            return PushAttempt::DeviceGone;
        };
        let (Some(scheme), Some(authority)) = (endpoint.scheme_str(), endpoint.authority()) else {
            return PushAttempt::DeviceGone;
        };
        if scheme != "https" && !(scheme == "http" && self.allow_plain_http) {
            return PushAttempt::Rejected(format!(
                "endpoint scheme {scheme:?}: only https is sent to (WebPushOptions::allow_plain_http for tests)"
            ));
        }
        if !self.allow_any_host && !is_push_service_host(authority) {
            return PushAttempt::DeviceGone;
        }
        let audience = format!("{scheme}://{authority}");
        let sender = match vapid::random_secret() {
            Ok(secret) => secret,
            Err(error) => return PushAttempt::Rejected(error.to_string()),
        };
        let mut salt = [0u8; 16];
        if let Err(error) = getrandom::fill(&mut salt) {
            return PushAttempt::Rejected(format!("no randomness for the salt: {error}"));
        }
        let body = match encrypt::encrypt(
            &payload(nudge),
            subscription.p256dh(),
            subscription.auth(),
            &sender,
            &salt,
        ) {
            Ok(body) => body,
            // The subscription's key is not a usable P-256 point: no push can ever reach it.
            Err(_) => return PushAttempt::DeviceGone,
        };
        let request = Request::post(endpoint)
            .header(
                "TTL",
                nudge
                    .ttl
                    .map_or(self.ttl_seconds, |ttl| ttl.as_secs().min(self.ttl_seconds)),
            )
            .header("Urgency", urgency(nudge.reason))
            .header("Topic", collapse_key(&nudge.recipient))
            .header(hyper::header::CONTENT_ENCODING, "aes128gcm")
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header(hyper::header::AUTHORIZATION, self.authorization(&audience))
            .body(Full::new(Bytes::from(body)));
        let reply = match self.client.attempt(request).await {
            Ok(reply) => reply,
            Err(attempt) => return attempt,
        };
        let status = reply.status.as_u16();
        match status {
            200..=299 => PushAttempt::Delivered,
            404 | 410 => PushAttempt::DeviceGone,
            429 | 500..=599 => PushAttempt::Retry {
                after: reply.retry_after,
                reason: format!("push service answered {status}"),
            },
            // The answer comes from a host a client chose: escaped before it reaches a log.
            _ => PushAttempt::Rejected(format!(
                "push service answered {status}: {}",
                String::from_utf8_lossy(&reply.body[..reply.body.len().min(200)]).escape_debug()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_host_names_on_the_default_port_are_push_services() {
        let ok = |endpoint: &str| {
            let uri: Uri = endpoint.parse().unwrap();
            is_push_service_host(uri.authority().unwrap())
        };
        for public in [
            "https://fcm.googleapis.com/fcm/send/x",
            "https://updates.push.services.mozilla.com/wpush/v2/x",
            "https://web.push.apple.com:443/x",
            "https://push.example.xn--p1ai/x",
        ] {
            assert!(ok(public), "{public}");
        }
        for private in [
            "https://169.254.169.254/latest",
            "https://2852039166/x",
            "https://127.1/x",
            "https://0x7f.1/x",
            "https://0177.0.0.1/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://localhost/x",
            "https://push.example.com:8443/x",
            "https://10.0.0.5/x",
        ] {
            assert!(!ok(private), "{private}");
        }
    }

    #[test]
    fn a_subject_must_be_mailto_or_https() {
        let key = VapidKey::generate().unwrap();
        assert!(WebPush::new(key.clone(), "mailto:ops@example.com").is_ok());
        assert!(WebPush::new(key.clone(), "https://example.com/contact").is_ok());
        for bad in ["ops@example.com", "mailto:", "http://example.com"] {
            let err = WebPush::new(key.clone(), bad).unwrap_err();
            assert_eq!(err.what, "vapid subject", "{bad}");
        }
    }

    #[test]
    fn a_token_is_signed_once_per_audience_and_reused() {
        let web_push = WebPush::new(VapidKey::generate().unwrap(), "mailto:a@b.c").unwrap();
        let first = web_push.authorization("https://a.example");
        assert_eq!(web_push.authorization("https://a.example"), first);
        assert_ne!(web_push.authorization("https://b.example"), first);
        assert_eq!(web_push.tokens.lock().len(), 2);
    }
}
