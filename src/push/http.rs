//! The providers' HTTP client: hyper over rustls (ring), HTTP/1.1 and HTTP/2 by ALPN.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::PushError;

/// Most bytes of an answer read: push services answer with a short JSON error at most.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// A pooled client; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A push service's answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl HttpClient {
    /// A client trusting `roots_pem`, or Mozilla's roots.
    pub fn new(roots_pem: Option<&[u8]>) -> Result<Self, PushError> {
        let tls = crate::tls::client_config(roots_pem)
            .map_err(|reason| PushError::new("push tls root certificates", reason))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { client })
    }

    /// A provider's one attempt: the answer to `request`, or the attempt's outcome when there
    /// is none (a request that could not be built is refused; one that got no answer is
    /// retried).
    pub async fn attempt(
        &self,
        request: Result<Request<Full<Bytes>>, hyper::http::Error>,
    ) -> Result<Reply, super::PushAttempt> {
        let request = request
            .map_err(|error| super::PushAttempt::Rejected(format!("bad request: {error}")))?;
        self.send(request)
            .await
            .map_err(|reason| super::PushAttempt::Retry {
                after: None,
                reason,
            })
    }

    /// Sends `request` and reads the answer (its body up to a bound). The caller bounds the
    /// time.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(Reply {
            status,
            retry_after,
            body,
        })
    }
}

/// `url` as a provider's fixed endpoint: `https://`, or `http://` to this machine only (a test
/// double), so a typo never sends credentials in the clear.
pub(crate) fn checked_endpoint(what: &'static str, url: &str) -> Result<hyper::Uri, PushError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| PushError::new(what, format!("{url:?} is not a URL: {e}")))?;
    let loopback = matches!(uri.host(), Some("127.0.0.1" | "[::1]" | "localhost"));
    match uri.scheme_str() {
        Some("https") if uri.host().is_some() => Ok(uri),
        Some("http") if loopback => Ok(uri),
        _ => Err(PushError::new(
            what,
            format!("{url:?}: must be https:// (http:// only to 127.0.0.1, [::1] or localhost)"),
        )),
    }
}

/// The error and its causes, one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3), from `now`.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_endpoint_is_https_or_local_http() {
        assert!(checked_endpoint("x", "https://fcm.googleapis.com").is_ok());
        assert!(checked_endpoint("x", "http://127.0.0.1:9000/token").is_ok());
        assert!(checked_endpoint("x", "http://localhost:9000").is_ok());
        let err =
            checked_endpoint("FcmOptions::endpoint", "http://fcm.googleapis.com").unwrap_err();
        assert_eq!(err.what, "FcmOptions::endpoint");
        assert!(err.reason.contains("must be https://"), "{err}");
        assert!(checked_endpoint("x", "not a url").is_err());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past means now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
