//! RFC 8291 message encryption for Web Push: ECDH on P-256 with the subscription's key, HKDF
//! over the subscription's auth secret, one `aes128gcm` record (RFC 8188).

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Key, Nonce};
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToSec1Point as _;
use p256::{PublicKey, SecretKey};
use sha2::Sha256;

/// The record size announced in the header. One record holds the whole (tiny) payload.
const RECORD_SIZE: u32 = 4096;
/// The plaintext one record holds: the record size less the tag (16) and the delimiter (1).
pub(super) const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - 17;

/// The `aes128gcm` body for `plaintext`: the header (salt, record size, the sender's public key)
/// then one encrypted, last record. `sender` is a fresh key per message, `salt` 16 fresh
/// random bytes.
pub(super) fn encrypt(
    plaintext: &[u8],
    ua_public: &[u8; 65],
    auth_secret: &[u8; 16],
    sender: &SecretKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, String> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(format!(
            "payload of {} bytes, over the limit of {MAX_PLAINTEXT}",
            plaintext.len()
        ));
    }
    let ua = PublicKey::from_sec1_bytes(ua_public)
        .map_err(|_| "keys.p256dh is not a point on P-256".to_string())?;
    let sender_public = sender.public_key().to_sec1_point(false);
    let sender_public = sender_public.as_bytes();
    let shared = p256::ecdh::diffie_hellman(sender.to_nonzero_scalar(), ua.as_affine());

    // RFC 8291 §3.3: the input keying material, bound to both public keys.
    let mut key_info = Vec::with_capacity(14 + 65 + 65);
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(sender_public);
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth_secret), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .map_err(|e| e.to_string())?;

    // RFC 8188 §2.2 and §2.3: the content key and the nonce (the first record's: sequence 0).
    let keys = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let mut cek = [0u8; 16];
    let mut nonce = [0u8; 12];
    keys.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .and_then(|()| keys.expand(b"Content-Encoding: nonce\0", &mut nonce))
        .map_err(|e| e.to_string())?;

    let mut record = Vec::with_capacity(plaintext.len() + 1);
    record.extend_from_slice(plaintext);
    record.push(2); // the last record's padding delimiter, no padding
    let sealed = Aes128Gcm::new(&Key::<Aes128Gcm>::from(cek))
        .encrypt(&Nonce::from(nonce), record.as_slice())
        .map_err(|e| e.to_string())?;

    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + sealed.len());
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(65);
    body.extend_from_slice(sender_public);
    body.extend_from_slice(&sealed);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn b64(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).unwrap()
    }

    /// RFC 8291 §5 (Appendix A): fixed keys and salt give exactly the RFC's message.
    #[test]
    fn the_rfc_8291_example_encrypts_to_the_rfc_bytes() {
        let sender =
            SecretKey::from_slice(&b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")).unwrap();
        let ua_public: [u8; 65] = b64(
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        )
        .try_into()
        .unwrap();
        let auth: [u8; 16] = b64("BTBZMqHH6r4Tts7J_aSIgg").try_into().unwrap();
        let salt: [u8; 16] = b64("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let body = encrypt(
            b"When I grow up, I want to be a watermelon",
            &ua_public,
            &auth,
            &sender,
            &salt,
        )
        .unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWA\
             mS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxs\
             j_Qulcy4a-fN"
        );
    }

    #[test]
    fn a_key_off_the_curve_or_a_long_payload_is_refused() {
        let sender = SecretKey::from_slice(&[7u8; 32]).unwrap();
        let mut off_curve = [0u8; 65];
        off_curve[0] = 4;
        off_curve[64] = 1;
        let err = encrypt(b"x", &off_curve, &[0; 16], &sender, &[0; 16]).unwrap_err();
        assert!(err.contains("not a point"), "{err}");
        let ua = sender.public_key().to_sec1_point(false);
        let ua: [u8; 65] = ua.as_bytes().try_into().unwrap();
        assert!(encrypt(&[0; MAX_PLAINTEXT], &ua, &[0; 16], &sender, &[0; 16]).is_ok());
        let err = encrypt(&[0; MAX_PLAINTEXT + 1], &ua, &[0; 16], &sender, &[0; 16]).unwrap_err();
        assert!(err.contains("over the limit of 4079"), "{err}");
    }
}
