//! [`Fcm`]: nudges to Android (and any Firebase) apps through Firebase Cloud Messaging's HTTP v1
//! API, authorised by a service account.
//!
//! **Auth.** The service account's RSA key signs a JWT (RS256) that Google's token endpoint
//! exchanges for an OAuth access token (scope `firebase.messaging`). The token is cached until
//! five minutes before it expires, fetched by one push while the others wait, and dropped on a
//! 401 so the next attempt fetches a new one.
//!
//! **Why ring.** The JWT needs RS256 over a PKCS#8 key: `ring`, already in the build as rustls'
//! crypto, does it in two calls, where `jsonwebtoken` or an OAuth crate would add a second
//! crypto stack and an HTTP client beside the one the providers share.
//!
//! **The message.** Data only (`{"pending": "3", "reason": "urgent"}`; FCM data values are
//! strings), so the app decides what to show; never the content or the sender. Android
//! priority `HIGH` for an urgent nudge, `NORMAL` otherwise (Android may defer normal ones in
//! Doze); a `collapse_key` per recipient, so an offline device keeps one nudge; `ttl` from
//! [`FcmOptions::ttl`], or the nudge's own [`ttl`](crate::Nudge::ttl) when shorter.
//!
//! **Answers.** 2xx delivered; `UNREGISTERED` (404), an `INVALID_ARGUMENT` about the
//! registration token (400) and `SENDER_ID_MISMATCH` (403) mean the token is gone (a 404
//! without FCM's `UNREGISTERED` is refused, not pruned: it may be a wrong project or
//! endpoint); 429 and 5xx are retried,
//! honouring `Retry-After`; 401 drops the cached access token and retries; anything else is
//! refused for good.
//!
//! What it does not promise: FCM throttles (a device gets at most a few high-priority
//! messages that show nothing before Android lowers their priority) and may collapse or delay
//! pushes; a push is a hint to reconnect, the messages wait in storage regardless.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

use super::http::HttpClient;
use super::{Device, PushAttempt, PushError, PushProvider, collapse_key, reason_name};
use crate::notifier::{Nudge, NudgeReason};

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A cached access token is replaced when less than this is left of it.
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// How long the signed assertion is valid (Google accepts at most an hour).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// A Firebase service account: the JSON file the Firebase console downloads
/// (`type`, `project_id`, `private_key`, `client_email`, `token_uri`).
pub struct FcmServiceAccount {
    project_id: String,
    client_email: String,
    token_uri: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for FcmServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct AccountFile {
    project_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

impl FcmServiceAccount {
    /// Reads the service account's JSON.
    ///
    /// # Errors
    /// A [`PushError`] naming the field that is missing or wrong (the private key must be an
    /// RSA key in PKCS#8 PEM, as Google issues them).
    pub fn from_json(json: &str) -> Result<Self, PushError> {
        let file: AccountFile = serde_json::from_str(json)
            .map_err(|e| PushError::new("fcm service account", format!("not its JSON: {e}")))?;
        let field = |value: Option<String>, name: &'static str| {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| PushError::new(name, "missing from the service account JSON"))
        };
        let project_id = field(file.project_id, "fcm service account project_id")?;
        let client_email = field(file.client_email, "fcm service account client_email")?;
        let pem = field(file.private_key, "fcm service account private_key")?;
        if !project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(PushError::new(
                "fcm service account project_id",
                format!("{project_id:?} is not a Firebase project id (letters, digits, '-')"),
            ));
        }
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            PushError::new(
                "fcm service account private_key",
                format!("not a PKCS#8 PEM key: {e}"),
            )
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            PushError::new(
                "fcm service account private_key",
                format!("not a usable RSA key: {e}"),
            )
        })?;
        let token_uri = file
            .token_uri
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
        super::http::checked_endpoint("fcm service account token_uri", &token_uri)?;
        Ok(Self {
            project_id,
            client_email,
            token_uri,
            key,
        })
    }

    /// The Firebase project the pushes go through.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// The signed JWT asking for an access token, issued at `now` (Unix seconds).
    fn assertion(&self, now: u64) -> Result<String, String> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "RSA signing failed".to_string())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// How [`Fcm`] sends. Start from `FcmOptions::default()`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct FcmOptions {
    /// How long FCM keeps a nudge for a device it cannot reach (Android `ttl`). `None`: one
    /// day.
    pub ttl: Option<Duration>,
    /// FCM's base URL. `None`: `https://fcm.googleapis.com`. For tests against a local fake
    /// (`http://` only to this machine).
    pub endpoint: Option<String>,
    /// Trust these PEM certificates instead of Mozilla's roots.
    pub root_certificates_pem: Option<Vec<u8>>,
}

/// The FCM HTTP v1 provider. See the [module docs](self).
pub struct Fcm {
    account: FcmServiceAccount,
    send_url: Uri,
    ttl: Duration,
    client: HttpClient,
    /// The access token and when it expires; one fetch at a time.
    token: tokio::sync::Mutex<Option<(String, SystemTime)>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("account", &self.account)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

/// Why an access token could not be had.
enum TokenError {
    /// Try again later (the token endpoint unreachable, throttled or failing).
    Retry(String),
    /// The credentials are refused: no retry helps.
    Refused(String),
}

impl Fcm {
    /// A provider sending as `account`.
    ///
    /// # Errors
    /// As [`Fcm::with_options`].
    pub fn new(account: FcmServiceAccount) -> Result<Self, PushError> {
        Self::with_options(account, FcmOptions::default())
    }

    /// As [`Fcm::new`], with options.
    ///
    /// # Errors
    /// A [`PushError`] when the endpoint is not a URL or the certificates are not usable.
    pub fn with_options(
        account: FcmServiceAccount,
        options: FcmOptions,
    ) -> Result<Self, PushError> {
        let base = options.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let send_url = super::http::checked_endpoint(
            "FcmOptions::endpoint",
            &format!(
                "{}/v1/projects/{}/messages:send",
                base.trim_end_matches('/'),
                account.project_id
            ),
        )?;
        let ttl = options.ttl.unwrap_or(DEFAULT_TTL);
        Ok(Self {
            account,
            send_url,
            ttl,
            client: HttpClient::new(options.root_certificates_pem.as_deref())?,
            token: tokio::sync::Mutex::new(None),
        })
    }

    async fn access_token(&self) -> Result<String, TokenError> {
        let mut cached = self.token.lock().await;
        let now = SystemTime::now();
        if let Some((token, expires)) = cached.as_ref()
            && *expires > now + TOKEN_RENEW_BEFORE
        {
            return Ok(token.clone());
        }
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let assertion = self.account.assertion(unix).map_err(TokenError::Refused)?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let request = Request::post(self.account.token_uri.as_str())
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Refused(format!("token request: {e}")))?;
        let reply = self
            .client
            .send(request)
            .await
            .map_err(|e| TokenError::Retry(format!("token endpoint: {e}")))?;
        let status = reply.status.as_u16();
        if status == 429 || status >= 500 {
            return Err(TokenError::Retry(format!(
                "token endpoint answered {status}"
            )));
        }
        #[derive(serde::Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: u64,
        }
        let granted: Granted = match serde_json::from_slice(&reply.body) {
            Ok(granted) if reply.status.is_success() => granted,
            _ => {
                return Err(TokenError::Refused(format!(
                    "token endpoint answered {status}: {}",
                    snippet(&reply.body)
                )));
            }
        };
        let expires = now + Duration::from_secs(granted.expires_in);
        *cached = Some((granted.access_token.clone(), expires));
        Ok(granted.access_token)
    }

    /// Forgets `token` if it is still the cached one (a 401 says it is no longer good).
    async fn forget_token(&self, token: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|(t, _)| t == token) {
            *cached = None;
        }
    }

    fn message(&self, token: &str, nudge: &Nudge) -> String {
        let mut data = serde_json::Map::new();
        if let Some(pending) = nudge.pending {
            data.insert("pending".into(), pending.to_string().into());
        }
        data.insert("reason".into(), reason_name(nudge.reason).into());
        let priority = if nudge.reason == NudgeReason::Urgent {
            "HIGH"
        } else {
            "NORMAL"
        };
        serde_json::json!({
            "message": {
                "token": token,
                "data": data,
                "android": {
                    "priority": priority,
                    "collapse_key": collapse_key(&nudge.recipient),
                    "ttl": format!("{}s", nudge.ttl.map_or(self.ttl, |t| t.min(self.ttl)).as_secs()),
                },
            }
        })
        .to_string()
    }
}

/// FCM's error body: `{"error": {"status": .., "message": .., "details": [{"errorCode": ..}]}}`.
fn error_code(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &value["error"];
    let code = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["errorCode"].as_str())
        .or_else(|| error["status"].as_str())
        .unwrap_or("")
        .to_owned();
    (code, error["message"].as_str().unwrap_or("").to_owned())
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

#[async_trait]
impl PushProvider for Fcm {
    fn name(&self) -> &'static str {
        "fcm"
    }

    fn serves(&self, device: &Device) -> bool {
        matches!(device, Device::Fcm(_))
    }

    async fn push(&self, device: &Device, nudge: &Nudge) -> PushAttempt {
        let Device::Fcm(token) = device else {
            return PushAttempt::Rejected("not an FCM device".into());
        };
        let access = match self.access_token().await {
            Ok(access) => access,
            Err(TokenError::Retry(reason)) => {
                return PushAttempt::Retry {
                    after: None,
                    reason,
                };
            }
            Err(TokenError::Refused(reason)) => return PushAttempt::Rejected(reason),
        };
        let request = Request::post(self.send_url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {access}"))
            .body(Full::new(Bytes::from(self.message(token.as_str(), nudge))));
        let reply = match self.client.attempt(request).await {
            Ok(reply) => reply,
            Err(attempt) => return attempt,
        };
        let status = reply.status.as_u16();
        if reply.status.is_success() {
            return PushAttempt::Delivered;
        }
        let (code, message) = error_code(&reply.body);
        // Only FCM's own word prunes a token: a bare 404 (a wrong project id or endpoint, a
        // proxy's page) would otherwise delete every token there is.
        match (status, code.as_str()) {
            (_, "UNREGISTERED") | (403, "SENDER_ID_MISMATCH") => PushAttempt::DeviceGone,
            (400, "INVALID_ARGUMENT")
                if message.to_ascii_lowercase().contains("registration token") =>
            {
                PushAttempt::DeviceGone
            }
            (401, _) => {
                self.forget_token(&access).await;
                PushAttempt::Retry {
                    after: None,
                    reason: "FCM answered 401: access token refused, fetching a new one".into(),
                }
            }
            (429, _) | (500..=599, _) => PushAttempt::Retry {
                after: reply.retry_after,
                reason: format!("FCM answered {status} {code}"),
            },
            _ => PushAttempt::Rejected(format!("FCM answered {status} {code}: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_names_what_is_missing_or_wrong() {
        let err = FcmServiceAccount::from_json("{").unwrap_err();
        assert_eq!(err.what, "fcm service account");
        let err =
            FcmServiceAccount::from_json(r#"{"project_id":"p","client_email":"a@b"}"#).unwrap_err();
        assert_eq!(err.what, "fcm service account private_key");
        let err = FcmServiceAccount::from_json(
            r#"{"project_id":"p/../x","client_email":"a@b","private_key":"k"}"#,
        )
        .unwrap_err();
        assert_eq!(err.what, "fcm service account project_id");
        let err = FcmServiceAccount::from_json(
            r#"{"project_id":"p","client_email":"a@b","private_key":"not pem"}"#,
        )
        .unwrap_err();
        assert!(err.reason.contains("not a PKCS#8 PEM key"), "{err}");
    }

    #[test]
    fn fcm_error_bodies_give_their_code() {
        let body = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(
            error_code(body),
            (
                "UNREGISTERED".into(),
                "Requested entity was not found.".into()
            )
        );
        let body = br#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(error_code(body).0, "INVALID_ARGUMENT");
        assert_eq!(error_code(b"<html>").0, "");
    }
}
