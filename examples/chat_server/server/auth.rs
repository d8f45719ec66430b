//! Who a request is: the user id comes from a signed token, never from the query string alone.
//!
//! Tokens are JSON Web Tokens signed with HS256 (HMAC-SHA256) under `--auth-secret`:
//! `base64url(header).base64url(claims).base64url(signature)`, with the header's `alg` exactly
//! `"HS256"` and the claims `{"sub":"<user id>","exp":<unix seconds>}` (`nbf`, if present, is
//! honoured too). Any JWT library or identity service that signs HS256 with the same secret
//! issues tokens this server accepts: that is how a deployment plugs in its own login.
//! A client passes its token as `?token=` (browsers cannot set headers on a WebSocket) or as
//! `Authorization: Bearer <token>`.
//!
//! Only HS256 is accepted, whatever the header says otherwise (`none`, RS256 with the secret
//! as a "public key"): the classic JWT confusions have nothing to work with. The check is
//! written here rather than with a JWT crate because HS256 needs only `hmac` and `sha2`,
//! already in the tree, where a JWT crate's algorithm set (RSA, EC) would add some ninety
//! crates to every build for algorithms this server refuses.
//!
//! For the demo page, `POST /login` issues tokens to whoever holds the login key printed at
//! start (as Jupyter does); `--no-login` turns it off when real tokens come from elsewhere.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use offline_queue::RecipientId;
use serde::Deserialize;
use sha2::Sha256;

/// Shortest `--auth-secret` accepted: HS256 wants a key at least as long as its output.
pub const MIN_SECRET_BYTES: usize = 32;

/// The token checks and the login key, from the flags.
pub struct Auth {
    secret: Vec<u8>,
    /// `POST /login`'s key; `None` when logins are off.
    login_key: Option<String>,
    /// Lifetime of a token issued by `POST /login`.
    token_ttl: Duration,
    /// `--insecure-no-auth`: `?user=` is believed.
    open: bool,
}

/// Why a request was refused; the 401's body says which.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed(&'static str),
    Forged,
    Expired,
    NotYetValid,
    OtherUser,
    BadUser(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "no token: pass ?token= or Authorization: Bearer"),
            Self::Malformed(what) => write!(f, "malformed token: {what}"),
            Self::Forged => write!(f, "token signature does not verify"),
            Self::Expired => write!(f, "token expired"),
            Self::NotYetValid => write!(f, "token not valid yet (nbf)"),
            Self::OtherUser => write!(f, "token is for another user"),
            Self::BadUser(error) => write!(f, "token subject: {error}"),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{self}\n"),
        )
            .into_response()
    }
}

/// What `/ws` and `/stats` take: the token, and optionally the user it must be for.
#[derive(Deserialize)]
pub struct Credentials {
    pub token: Option<String>,
    pub user: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    nbf: Option<u64>,
}

impl Auth {
    pub fn new(secret: Vec<u8>, login: bool, token_ttl: Duration, open: bool) -> Self {
        Self {
            secret,
            login_key: login.then(|| random_hex(16)),
            token_ttl,
            open,
        }
    }

    /// The key `POST /login` asks for, if logins are on.
    pub fn login_key(&self) -> Option<&str> {
        self.login_key.as_deref()
    }

    /// The user a request is for. Open mode believes `?user=`; otherwise the token decides, and
    /// a `?user=` that names someone else is refused.
    pub fn authenticate(
        &self,
        credentials: &Credentials,
        headers: &HeaderMap,
    ) -> Result<RecipientId, Refusal> {
        let token = credentials
            .token
            .as_deref()
            .or_else(|| bearer(headers))
            .filter(|token| !token.is_empty());
        let user = match (self.open, &credentials.user, token) {
            (true, Some(user), _) => user.clone(),
            (_, _, None) => return Err(Refusal::Missing),
            (_, claimed, Some(token)) => {
                let subject = self.verify(token, unix_now())?;
                if claimed.as_ref().is_some_and(|claimed| *claimed != subject) {
                    return Err(Refusal::OtherUser);
                }
                subject
            }
        };
        RecipientId::new(&user).map_err(|error| Refusal::BadUser(error.to_string()))
    }

    /// The token's subject, if its signature verifies under the secret and `now` (unix seconds)
    /// is within its validity.
    pub fn verify(&self, token: &str, now: u64) -> Result<String, Refusal> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed("expected three dot-separated parts"));
        };
        let header: Header = decode_json(header, "header is not base64url JSON with alg")?;
        if header.alg != "HS256" {
            return Err(Refusal::Malformed("alg must be HS256"));
        }
        let signed = &token[..token.len() - signature.len() - 1];
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Refusal::Malformed("signature is not base64url"))?;
        // The claims are read only once the signature vouches for them.
        self.mac()
            .chain_update(signed)
            .verify_slice(&signature)
            .map_err(|_| Refusal::Forged)?;
        let claims: Claims = decode_json(claims, "claims are not base64url JSON with sub and exp")?;
        if now >= claims.exp {
            return Err(Refusal::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now < nbf) {
            return Err(Refusal::NotYetValid);
        }
        Ok(claims.sub)
    }

    /// A token for `user`, valid for `--token-ttl-secs` from now.
    pub fn issue(&self, user: &RecipientId) -> (String, u64) {
        let expires_at = unix_now() + self.token_ttl.as_secs();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims =
            serde_json::json!({"sub": String::from_utf8_lossy(user.as_bytes()), "exp": expires_at});
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.mac().chain_update(&signed).finalize().into_bytes();
        (
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)),
            expires_at,
        )
    }

    /// Whether `headers` carry the login key (always, in open mode).
    pub fn may_log_in(&self, headers: &HeaderMap) -> bool {
        if self.open {
            return true;
        }
        let (Some(key), Some(given)) = (&self.login_key, bearer(headers)) else {
            return false;
        };
        // Compared through their MACs: equal-length digests, compared in constant time.
        let expected = self.mac().chain_update(key).finalize().into_bytes();
        self.mac()
            .chain_update(given)
            .verify_slice(&expected)
            .is_ok()
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes a key of any length")
    }
}

/// One base64url JSON part of a token; `expected` names it in the refusal.
fn decode_json<T: serde::de::DeserializeOwned>(
    part: &str,
    expected: &'static str,
) -> Result<T, Refusal> {
    URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(Refusal::Malformed(expected))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// `bytes` random bytes from the OS, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0; bytes];
    getrandom::fill(&mut buffer).expect("the OS random source");
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}
