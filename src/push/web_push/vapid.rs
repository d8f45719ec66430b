//! RFC 8292 VAPID: the application server's P-256 key, and the ES256 JWT that proves it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::SecretKey;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToSec1Point as _;

use crate::push::PushError;

/// The application server's VAPID key pair (P-256). The browser subscribes with its public
/// half (`applicationServerKey`); every push is signed with the private half. `Debug` never
/// shows the private key.
#[derive(Clone)]
pub struct VapidKey {
    signing: SigningKey,
    public: [u8; 65],
}

impl VapidKey {
    /// The key from its private scalar, 32 bytes in base64url (as `web-push
    /// generate-vapid-keys` and most libraries print it; padding allowed).
    ///
    /// # Errors
    /// A [`PushError`] when the text is not base64url, not 32 bytes, or not a valid P-256
    /// scalar.
    pub fn from_base64url(private_key: &str) -> Result<Self, PushError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(private_key.trim().trim_end_matches('='))
            .map_err(|e| PushError::new("vapid private key", format!("not base64url: {e}")))?;
        if bytes.len() != 32 {
            return Err(PushError::new(
                "vapid private key",
                format!("{} bytes, must be 32", bytes.len()),
            ));
        }
        let secret = SecretKey::from_slice(&bytes)
            .map_err(|_| PushError::new("vapid private key", "not a valid P-256 private key"))?;
        Ok(Self::from_secret(&secret))
    }

    /// A new random key. Keep [`private_key_base64url`](Self::private_key_base64url) safe and
    /// reuse it: a new key invalidates every subscription made with the old one.
    ///
    /// # Errors
    /// A [`PushError`] if the system has no randomness to give.
    pub fn generate() -> Result<Self, PushError> {
        Ok(Self::from_secret(&random_secret()?))
    }

    fn from_secret(secret: &SecretKey) -> Self {
        let public = secret.public_key().to_sec1_point(false);
        let mut bytes = [0u8; 65];
        bytes.copy_from_slice(public.as_bytes());
        Self {
            signing: SigningKey::from(secret),
            public: bytes,
        }
    }

    /// The public key, uncompressed, in base64url: the `applicationServerKey` a page passes to
    /// `pushManager.subscribe`.
    pub fn public_key_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public)
    }

    /// The private key in base64url, to store and load with
    /// [`from_base64url`](Self::from_base64url).
    pub fn private_key_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.signing.to_bytes())
    }

    /// The `Authorization` header value for a push service at `audience` (its origin):
    /// `vapid t=<ES256 JWT>, k=<public key>`, the JWT valid until `expires` (Unix seconds).
    pub(super) fn authorization(&self, audience: &str, expires: u64, subject: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": audience, "exp": expires, "sub": subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{claims}");
        let signature: Signature = self.signing.sign(input.as_bytes());
        format!(
            "vapid t={input}.{}, k={}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes()),
            self.public_key_base64url()
        )
    }
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKey")
            .field("public", &self.public_key_base64url())
            .finish_non_exhaustive()
    }
}

/// A fresh P-256 private key from the system's randomness.
pub(super) fn random_secret() -> Result<SecretKey, PushError> {
    // A random 32-byte string is a valid scalar except with probability about 2^-32; draw
    // again then.
    for _ in 0..8 {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| PushError::new("randomness", format!("the system gave none: {e}")))?;
        if let Ok(secret) = SecretKey::from_slice(&bytes) {
            return Ok(secret);
        }
    }
    Err(PushError::new(
        "randomness",
        "eight draws in a row were not a P-256 scalar",
    ))
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier;

    use super::*;

    #[test]
    fn the_jwt_is_es256_over_its_claims_and_verifies_with_the_key_sent() {
        let key = VapidKey::generate().unwrap();
        let again = VapidKey::from_base64url(&key.private_key_base64url()).unwrap();
        assert_eq!(again.public_key_base64url(), key.public_key_base64url());

        let value = key.authorization("https://push.example.net", 1_900_000_000, "mailto:a@b.c");
        let rest = value.strip_prefix("vapid t=").unwrap();
        let (jwt, k) = rest.split_once(", k=").unwrap();
        assert_eq!(k, key.public_key_base64url());
        let (input, signature) = jwt.rsplit_once('.').unwrap();
        let (header, claims) = input.split_once('.').unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.net");
        assert_eq!(claims["exp"], 1_900_000_000u64);
        assert_eq!(claims["sub"], "mailto:a@b.c");
        let verifying = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
        verifying.verify(input.as_bytes(), &signature).unwrap();
        let mut tampered = input.to_string();
        tampered.push('x');
        assert!(verifying.verify(tampered.as_bytes(), &signature).is_err());
    }

    #[test]
    fn a_bad_private_key_says_what_is_wrong() {
        assert!(
            VapidKey::from_base64url("***")
                .unwrap_err()
                .reason
                .contains("base64url")
        );
        assert_eq!(
            VapidKey::from_base64url("AAAA").unwrap_err().reason,
            "3 bytes, must be 32"
        );
        let zero = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert!(
            VapidKey::from_base64url(&zero)
                .unwrap_err()
                .reason
                .contains("not a valid")
        );
        let shown = format!("{:?}", VapidKey::generate().unwrap());
        assert!(shown.starts_with("VapidKey { public:"), "{shown}");
    }
}
