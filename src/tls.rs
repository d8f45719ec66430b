//! The one way this crate makes a TLS client: rustls with ring, verifying the server against
//! Mozilla's roots or the certificates a user gives (PostgreSQL over TLS, push providers).

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A verifying client configuration trusting `roots_pem` (PEM certificates), or Mozilla's
/// roots when `None`. The error says what was wrong with the PEM.
pub(crate) fn client_config(roots_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match roots_pem {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|e| format!("not PEM: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("not a usable certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("no certificate in the PEM given".into());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
