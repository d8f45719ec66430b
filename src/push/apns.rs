//! [`Apns`]: nudges to iOS, iPadOS and macOS apps through Apple's Push Notification service,
//! over HTTP/2, authorised by a token-signing key (`.p8`).
//!
//! **Auth.** An ES256 JWT (`kid` the key id, `iss` the team id, `iat`) signed with the `.p8`
//! key, reused for 50 minutes: Apple refuses a token older than an hour and asks that it be
//! renewed at most every 20 minutes. An `ExpiredProviderToken` answer renews it at once.
//! Signed with RustCrypto's `p256`, as Web Push is (it reads Apple's PKCS#8 key with or
//! without its public half); the `a2` crate would bring its own HTTP stack beside the one the
//! providers share, and `apns-h2` is little used.
//!
//! **Connection.** One HTTP/2 connection per host, reused for every push (the client pool
//! multiplexes them), as Apple asks: opening a connection per push gets a provider throttled.
//!
//! **The push.** An urgent nudge is an alert (`apns-push-type: alert`, `apns-priority: 10`) with
//! no text of the message: a localised key ([`ApnsOptions::alert_loc_key`]) and
//! `mutable-content: 1`, so the app's notification service extension can fetch and show what
//! waits. Any other nudge is a background push (`content-available: 1`,
//! `apns-push-type: background`, `apns-priority: 5`), which wakes the app to connect. Both carry
//! `pending` and `reason` beside `aps`, an `apns-collapse-id` per recipient (the device keeps
//! the latest), and an `apns-expiration` ([`ApnsOptions::ttl`] from now, or the nudge's own
//! [`ttl`](crate::Nudge::ttl) when shorter).
//!
//! **Answers.** 200 delivered; 410 `Unregistered` and 400 `BadDeviceToken` mean the token is
//! gone (a `BadDeviceToken` is also what a development build's token gets from production:
//! point [`ApnsOptions::endpoint`] at the sandbox for those, or they are pruned);
//! `DeviceTokenNotForTopic` is refused, not pruned (a wrong bundle id would prune them all); 429 and 5xx are retried (honouring
//! `Retry-After`); 403 `ExpiredProviderToken` renews the JWT and retries; anything else is
//! refused for good.
//!
//! What it does not promise: Apple throttles background pushes hard (a few an hour per
//! device, fewer on low battery) and keeps only the latest push per app for an offline
//! device; a push is a hint to reconnect, the messages wait in storage regardless.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use p256::SecretKey;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use parking_lot::Mutex;

use super::http::HttpClient;
use super::{Device, PushAttempt, PushError, PushProvider, collapse_key, reason_name};
use crate::notifier::{Nudge, NudgeReason};

const PRODUCTION: &str = "https://api.push.apple.com";
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A token is renewed after this long: inside Apple's window of 20 to 60 minutes.
const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// An APNs token-signing key: the `.p8` file from Apple's developer site, its key id and your
/// team id. `Debug` never shows the key.
#[derive(Clone)]
pub struct ApnsKey {
    signing: SigningKey,
    key_id: String,
    team_id: String,
}

impl std::fmt::Debug for ApnsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsKey")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

impl ApnsKey {
    /// Reads the `.p8` key (PKCS#8 PEM, P-256). `key_id` and `team_id` are Apple's
    /// ten-character ids.
    ///
    /// # Errors
    /// A [`PushError`] naming what is wrong: the PEM, or an id that is not 10 letters and
    /// digits.
    pub fn from_p8_pem(pem: &str, key_id: &str, team_id: &str) -> Result<Self, PushError> {
        for (what, id) in [("apns key id", key_id), ("apns team id", team_id)] {
            if id.len() != 10 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(PushError::new(
                    what,
                    format!("{id:?} is not 10 letters and digits"),
                ));
            }
        }
        let secret = SecretKey::from_pkcs8_pem(pem.trim()).map_err(|e| {
            PushError::new("apns .p8 key", format!("not a P-256 PKCS#8 PEM key: {e}"))
        })?;
        Ok(Self {
            signing: SigningKey::from(&secret),
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
        })
    }

    /// The provider token, issued at `now` (Unix seconds).
    fn token(&self, now: u64) -> String {
        let header = serde_json::json!({ "alg": "ES256", "kid": self.key_id });
        let claims = serde_json::json!({ "iss": self.team_id, "iat": now });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = self.signing.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

/// How [`Apns`] sends. Start from `ApnsOptions::default()`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ApnsOptions {
    /// APNs' base URL. `None`: production, `https://api.push.apple.com`; Apple's sandbox (for
    /// development builds of an app) is `https://api.sandbox.push.apple.com`.
    pub endpoint: Option<String>,
    /// How long Apple keeps a nudge for a device it cannot reach (`apns-expiration`). `None`:
    /// one day.
    pub ttl: Option<Duration>,
    /// The localisation key of an urgent nudge's alert, looked up in the app's
    /// `Localizable.strings`. `None`: `NEW_MESSAGES`.
    pub alert_loc_key: Option<String>,
    /// Trust these PEM certificates instead of Mozilla's roots.
    pub root_certificates_pem: Option<Vec<u8>>,
}

/// The APNs provider. See the [module docs](self).
pub struct Apns {
    key: ApnsKey,
    topic: String,
    base: String,
    ttl: Duration,
    alert_loc_key: String,
    client: HttpClient,
    /// The provider token and when it was issued (Unix seconds).
    token: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("key", &self.key)
            .field("topic", &self.topic)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Apns {
    /// A provider pushing to the app `bundle_id` (the `apns-topic`) with `key`.
    ///
    /// # Errors
    /// As [`Apns::with_options`].
    pub fn new(key: ApnsKey, bundle_id: &str) -> Result<Self, PushError> {
        Self::with_options(key, bundle_id, ApnsOptions::default())
    }

    /// As [`Apns::new`], with options.
    ///
    /// # Errors
    /// A [`PushError`] when the bundle id or the endpoint is malformed, or the certificates are
    /// not usable.
    pub fn with_options(
        key: ApnsKey,
        bundle_id: &str,
        options: ApnsOptions,
    ) -> Result<Self, PushError> {
        if bundle_id.is_empty()
            || bundle_id.len() > 255
            || !bundle_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(PushError::new(
                "apns bundle id",
                format!("{bundle_id:?} is not a bundle id (1 to 255 letters, digits, '.', '-')"),
            ));
        }
        let base = options
            .endpoint
            .unwrap_or_else(|| PRODUCTION.to_owned())
            .trim_end_matches('/')
            .to_owned();
        super::http::checked_endpoint("ApnsOptions::endpoint", &base)?;
        Ok(Self {
            key,
            topic: bundle_id.to_owned(),
            base,
            ttl: options.ttl.unwrap_or(DEFAULT_TTL),
            alert_loc_key: options
                .alert_loc_key
                .unwrap_or_else(|| "NEW_MESSAGES".to_owned()),
            client: HttpClient::new(options.root_certificates_pem.as_deref())?,
            token: Mutex::new(None),
        })
    }

    /// The provider token, signed again when it is `TOKEN_LIFETIME` old or `renew` says the
    /// one in hand was refused.
    fn provider_token(&self, now: u64, renew: Option<&str>) -> String {
        let mut cached = self.token.lock();
        match cached.as_ref() {
            Some((token, issued))
                if now < issued + TOKEN_LIFETIME.as_secs() && renew != Some(token.as_str()) =>
            {
                token.clone()
            }
            _ => {
                let token = self.key.token(now);
                *cached = Some((token.clone(), now));
                token
            }
        }
    }

    fn payload(&self, nudge: &Nudge) -> String {
        let aps = if nudge.reason == NudgeReason::Urgent {
            serde_json::json!({
                "alert": { "loc-key": self.alert_loc_key },
                "mutable-content": 1,
            })
        } else {
            serde_json::json!({ "content-available": 1 })
        };
        let mut body = serde_json::json!({ "aps": aps, "reason": reason_name(nudge.reason) });
        if let Some(pending) = nudge.pending {
            body["pending"] = pending.into();
        }
        body.to_string()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[async_trait]
impl PushProvider for Apns {
    fn name(&self) -> &'static str {
        "apns"
    }

    fn serves(&self, device: &Device) -> bool {
        matches!(device, Device::Apns(_))
    }

    async fn push(&self, device: &Device, nudge: &Nudge) -> PushAttempt {
        let Device::Apns(token) = device else {
            return PushAttempt::Rejected("not an APNs device".into());
        };
        // Apple's device tokens are hex; anything else cannot be one (and must not reach the
        // request path).
        if !token.as_str().bytes().all(|b| b.is_ascii_hexdigit()) {
            return PushAttempt::DeviceGone;
        }
        let now = unix_now();
        let urgent = nudge.reason == NudgeReason::Urgent;
        let send = |provider_token: String| {
            Request::post(format!("{}/3/device/{}", self.base, token.as_str()))
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("bearer {provider_token}"),
                )
                .header("apns-topic", self.topic.as_str())
                .header(
                    "apns-push-type",
                    if urgent { "alert" } else { "background" },
                )
                .header("apns-priority", if urgent { "10" } else { "5" })
                .header(
                    "apns-expiration",
                    now + nudge.ttl.map_or(self.ttl, |t| t.min(self.ttl)).as_secs(),
                )
                .header("apns-collapse-id", collapse_key(&nudge.recipient))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(self.payload(nudge))))
        };
        let provider_token = self.provider_token(now, None);
        let reply = match self.client.attempt(send(provider_token.clone())).await {
            Ok(reply) => reply,
            Err(attempt) => return attempt,
        };
        let status = reply.status.as_u16();
        if status == 200 {
            return PushAttempt::Delivered;
        }
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        let reason = body["reason"].as_str().unwrap_or("");
        match (status, reason) {
            // `DeviceTokenNotForTopic` is refused, not pruned: a wrong bundle id would get it
            // for every token there is.
            (410, _) | (400, "BadDeviceToken") => PushAttempt::DeviceGone,
            (403, "ExpiredProviderToken") => {
                self.provider_token(now, Some(&provider_token));
                PushAttempt::Retry {
                    after: None,
                    reason: "APNs answered 403 ExpiredProviderToken: token renewed".into(),
                }
            }
            (429 | 500..=599, _) => PushAttempt::Retry {
                after: reply.retry_after,
                reason: format!("APNs answered {status} {reason}"),
            },
            _ => PushAttempt::Rejected(format!("APNs answered {status} {reason}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway key made for this test (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256 | openssl pkcs8 -topk8 -nocrypt`).
    const P8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgihTij60917uZuJHZ
hdSabry9nnw5CHn1HX8prbtrHYmhRANCAAQlR6PcdLWXB9nnRkNWaAJjv7WKw1+k
AjOW5n3mcTgsAFaB6iKvjRHaVT2CIRnk0pnBw8jKFyZaRNyLEfe30C2Q
-----END PRIVATE KEY-----";

    #[test]
    fn a_key_names_what_is_wrong() {
        let err = ApnsKey::from_p8_pem(P8, "SHORT", "TEAM123456").unwrap_err();
        assert_eq!(err.what, "apns key id");
        let err = ApnsKey::from_p8_pem(P8, "KEY1234567", "team 12345").unwrap_err();
        assert_eq!(err.what, "apns team id");
        let err = ApnsKey::from_p8_pem("nope", "KEY1234567", "TEAM123456").unwrap_err();
        assert!(err.reason.contains("PKCS#8"), "{err}");
        let err = Apns::new(
            ApnsKey::from_p8_pem(P8, "KEY1234567", "TEAM123456").unwrap(),
            "com.example/app",
        )
        .unwrap_err();
        assert_eq!(err.what, "apns bundle id");
    }

    #[test]
    fn the_token_is_reused_for_its_lifetime_and_renewed_when_refused() {
        let key = ApnsKey::from_p8_pem(P8, "KEY1234567", "TEAM123456").unwrap();
        let apns = Apns::new(key, "com.example.app").unwrap();
        let first = apns.provider_token(1_000, None);
        assert_eq!(apns.provider_token(1_000 + 49 * 60, None), first);
        let renewed = apns.provider_token(1_000 + 50 * 60, None);
        assert_ne!(renewed, first);
        // Refused: a new one at once, and a refusal of an older token changes nothing.
        let again = apns.provider_token(4_100, Some(&renewed));
        assert_ne!(again, renewed);
        assert_eq!(apns.provider_token(4_100, Some(&renewed)), again);
    }
}
