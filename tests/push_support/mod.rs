//! A fake push service for the provider tests: records every request and answers as the path
//! says (FCM: as the device token says, with its token endpoint at `/token`), and the
//! independent checkers, in Python, that verify and decrypt what the providers sent.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use parking_lot::Mutex;
use tokio::sync::mpsc;

// A test binary may load skip_support itself as well.
#[allow(clippy::duplicate_mod)]
#[path = "../skip_support/mod.rs"]
mod skip_support;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A push service on a free loopback port. Its answer depends on the last path segment:
/// `ok` 201, `gone` 410, `missing` 404, `busy` 429 with `Retry-After: 120`, `down` 503,
/// `bad` 400, `hang` never.
pub struct FakePushService {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    arrivals: mpsc::UnboundedReceiver<()>,
    server: tokio::task::JoinHandle<()>,
}

type Shared = (Arc<Mutex<Vec<Received>>>, mpsc::UnboundedSender<()>);

async fn answer(
    State((received, arrivals)): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    // FCM: the answer follows the device token in the message; its token endpoint grants.
    let last = if path.ends_with("messages:send") {
        let message: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        message["message"]["token"]
            .as_str()
            .unwrap_or("")
            .to_string()
    } else {
        path.rsplit('/').next().unwrap_or("").to_string()
    };
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let grants = received.lock().iter().filter(|r| r.path == "token").count();
    received.lock().push(Received {
        path: path.clone(),
        headers,
        body,
    });
    let _ = arrivals.send(());
    let fcm_error = |status: StatusCode, code: &str, message: &str| {
        let body = serde_json::json!({"error": {
            "code": status.as_u16(), "message": message, "status": code,
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}],
        }});
        (status, body.to_string()).into_response()
    };
    match last.as_str() {
        "token" => {
            let grant = serde_json::json!({
                "access_token": format!("access-{}", grants + 1),
                "expires_in": 3600,
                "token_type": "Bearer",
            });
            (StatusCode::OK, grant.to_string()).into_response()
        }
        "ok" => StatusCode::CREATED.into_response(),
        "unregistered" => fcm_error(
            StatusCode::NOT_FOUND,
            "UNREGISTERED",
            "Requested entity was not found.",
        ),
        "invalid-token" => fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
        ),
        "invalid-data" => fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Invalid data payload",
        ),
        "wrong-sender" => fcm_error(
            StatusCode::FORBIDDEN,
            "SENDER_ID_MISMATCH",
            "SenderId mismatch",
        ),
        // 401 to the first access token, accepted from the second on.
        "stale-auth" if authorization == "Bearer access-1" => fcm_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        ),
        "stale-auth" => StatusCode::OK.into_response(),
        "gone" => StatusCode::GONE.into_response(),
        "missing" => StatusCode::NOT_FOUND.into_response(),
        "busy" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "120")]).into_response(),
        "down" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "hang" => std::future::pending().await,
        _ => (StatusCode::BAD_REQUEST, "malformed push").into_response(),
    }
}

impl FakePushService {
    pub async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, arrivals) = mpsc::unbounded_channel();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(answer))
            .with_state((received.clone(), tx));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            received,
            arrivals,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Waits (at most 30 s, then fails) until `count` requests have arrived in all.
    pub async fn wait_for(&mut self, count: usize) -> Vec<Received> {
        wait_for(&self.received, &mut self.arrivals, count).await
    }
}

impl Drop for FakePushService {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A fake's requests once `count` have arrived in all (waiting at most 30 s, then failing).
async fn wait_for(
    received: &Mutex<Vec<Received>>,
    arrivals: &mut mpsc::UnboundedReceiver<()>,
    count: usize,
) -> Vec<Received> {
    while received.lock().len() < count {
        tokio::time::timeout(std::time::Duration::from_secs(30), arrivals.recv())
            .await
            .expect("the fake got no request within 30 s")
            .expect("the fake stopped");
    }
    received.lock().clone()
}

/// An engine nudging through `notifier`, and one urgent message sent with it to bob (offline),
/// its text and sender what no push may carry, its TTL 120 s.
pub async fn send_to_offline_bob(
    notifier: &offline_queue::push::PushNotifier,
) -> offline_queue::OfflineQueue {
    use offline_queue::{Envelope, OfflineQueue, RecipientId, Urgency};
    let queue = OfflineQueue::builder()
        .notifier(Arc::new(notifier.clone()))
        .build()
        .unwrap();
    queue
        .send(
            Envelope::new(
                RecipientId::new("bob").unwrap(),
                "the secret plan, from alice",
            )
            .with_urgency(Urgency::Urgent)
            .with_ttl(std::time::Duration::from_secs(120)),
        )
        .await
        .unwrap();
    queue
}

/// What the checker made of one request.
#[derive(Debug, serde::Deserialize)]
pub struct Checked {
    pub claims: serde_json::Value,
    pub plaintext: String,
}

/// Whether Python's `http_ece` is missing: then the test is skipped, unless
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1` (as in CI), where it is a failure.
pub fn checker_missing() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import http_ece, cryptography"])
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return false;
    }
    assert_ne!(
        std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref(),
        Ok("1"),
        "python3 with http_ece is missing (OFFLINE_QUEUE_REQUIRE_SERVERS=1)"
    );
    skip_support::record("python3 with http_ece is not installed (pip install http_ece)");
    true
}

const CHECKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/push_support/checker.py");

/// A new key from the checker, `"rsa-key"` (2048 bits) or `"ec-key"` (P-256): (PKCS#8
/// private PEM, public PEM).
pub fn new_key(kind: &str) -> (String, String) {
    let out = std::process::Command::new("python3")
        .args([CHECKER, kind])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        keys["private_pem"].as_str().unwrap().to_owned(),
        keys["public_pem"].as_str().unwrap().to_owned(),
    )
}

/// A JWT as the checker verified it.
#[derive(Debug, serde::Deserialize)]
pub struct Jwt {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// Verifies each JWT's signature (RS256 or ES256) with `public_pem`, in Python.
pub fn check_jwts(public_pem: &str, tokens: &[String]) -> Vec<Jwt> {
    let input = serde_json::json!({ "public_pem": public_pem, "tokens": tokens });
    run_checker(&["verify-jwt"], &input)
}

fn run_checker<T: serde::de::DeserializeOwned>(args: &[&str], input: &serde_json::Value) -> T {
    let mut child = std::process::Command::new("python3")
        .arg(CHECKER)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.to_string().as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the checker refused a request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Verifies each request's VAPID token and decrypts its body with the subscription's private
/// key, in Python (`tests/push_support/checker.py`), apart from the crate's code.
pub fn check_web_push(ua_private: &str, auth: &str, requests: &[Received]) -> Vec<Checked> {
    use base64::Engine as _;
    let input = serde_json::json!({
        "ua_private": ua_private,
        "auth": auth,
        "requests": requests.iter().map(|r| serde_json::json!({
            "authorization": r.header("authorization"),
            "body": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&r.body),
        })).collect::<Vec<_>>(),
    });
    run_checker(&["web-push"], &input)
}

/// A fake APNs: HTTP/2 over TLS (ALPN `h2` only, as Apple's), with a certificate for
/// `localhost` from a test CA the client must be told to trust (`cert_pem`). Answers by the device token, read as hex
/// of a name: `ok` 200, `gone` 410 `Unregistered`, `badtoken` 400 `BadDeviceToken`, `busy` 429
/// (with `Retry-After: 120`),
/// `down` 503, `expired` 403 `ExpiredProviderToken`, `hang` never, anything else 400 `BadTopic`.
pub struct FakeApns {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    pub cert_pem: Vec<u8>,
    arrivals: mpsc::UnboundedReceiver<()>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeApns {
    pub async fn start() -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("python3")
            .args([CHECKER, "tls-cert", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cert_pem = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let certs = CertificateDer::pem_file_iter(dir.path().join("cert.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("key.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, arrivals) = mpsc::unbounded_channel();
        let server = {
            let (received, connections) = (received.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (acceptor, received, tx) = (acceptor.clone(), received.clone(), tx.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |request| {
                            apns_answer(request, received.clone(), tx.clone())
                        });
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                    });
                }
            })
        };
        Self {
            port,
            received,
            connections,
            cert_pem,
            arrivals,
            server,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// Waits (at most 30 s, then fails) until `count` requests have arrived in all.
    pub async fn wait_for(&mut self, count: usize) -> Vec<Received> {
        wait_for(&self.received, &mut self.arrivals, count).await
    }
}

impl Drop for FakeApns {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The device token the fake reads as `name`.
pub fn apns_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

async fn apns_answer(
    request: hyper::Request<hyper::body::Incoming>,
    received: Arc<Mutex<Vec<Received>>>,
    arrivals: mpsc::UnboundedSender<()>,
) -> Result<hyper::Response<http_body_util::Full<Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;
    assert_eq!(request.version(), hyper::Version::HTTP_2);
    let path = request.uri().path().trim_start_matches('/').to_string();
    let headers = request.headers().clone();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let token = path.strip_prefix("3/device/").unwrap_or("");
    let name: String = (0..token.len() / 2)
        .filter_map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16).ok())
        .map(char::from)
        .collect();
    received.lock().push(Received {
        path: path.clone(),
        headers,
        body,
    });
    let _ = arrivals.send(());
    let (status, reason) = match name.as_str() {
        "ok" => (200, ""),
        "gone" => (410, "Unregistered"),
        "badtoken" => (400, "BadDeviceToken"),
        "busy" => (429, "TooManyRequests"),
        "down" => (503, "ServiceUnavailable"),
        "expired" => (403, "ExpiredProviderToken"),
        "hang" => std::future::pending().await,
        _ => (400, "BadTopic"),
    };
    let body = if reason.is_empty() {
        Bytes::new()
    } else {
        Bytes::from(serde_json::json!({ "reason": reason }).to_string())
    };
    let mut response = hyper::Response::builder();
    if status == 429 {
        response = response.header("retry-after", "120");
    }
    Ok(response
        .status(status)
        .header("apns-id", "00000000-0000-0000-0000-000000000001")
        .body(http_body_util::Full::new(body))
        .unwrap())
}

/// The notifier's failure matrix through a real provider and its fake, on the real clock with
/// short bounds (the paused-clock tests in `push_notifier.rs` time the waits exactly; here a
/// fake's socket would not wait for a paused clock). `device` makes the device the fake answers
/// as the name says (`ok`, `gone` — or the provider's own name for it — `busy` 429 with
/// `Retry-After: 120`, `down` 503, `hang`), and `requests_to` counts the requests a name got.
pub async fn failure_matrix(
    provider: Arc<dyn offline_queue::push::PushProvider>,
    device: impl Fn(&str) -> offline_queue::push::Device,
    gone: &str,
    requests_to: impl Fn(&str) -> usize,
) {
    use offline_queue::push::{MemoryPushTargets, PushNotifier, PushOptions};
    use offline_queue::{Notifier as _, Nudge, NudgeReason, RecipientId};
    use std::time::Duration;

    let targets = Arc::new(MemoryPushTargets::new());
    let names = ["ok", gone, "busy", "down", "hang"];
    for name in names {
        targets.add(RecipientId::new(name).unwrap(), device(name));
    }
    let mut options = PushOptions::default();
    options.queue_capacity = 6;
    options.concurrency = 2;
    // Bounds loose enough for a loaded machine: a hung attempt times out once, then a retry
    // would start past the give-up time.
    options.request_timeout = Duration::from_secs(3);
    options.first_retry = Duration::from_millis(20);
    options.max_retry_wait = Duration::from_millis(80);
    options.give_up_after = Duration::from_secs(3);
    let (notifier, task) = PushNotifier::start(targets.clone(), vec![provider], options).unwrap();
    let nudge = |name: &str| Nudge {
        recipient: RecipientId::new(name).unwrap(),
        pending: Some(1),
        reason: NudgeReason::Urgent,
        ttl: None,
    };
    // No await in between: the task takes none before the queue is full.
    for name in ["ok", gone, gone, "busy", "down", "hang"] {
        notifier.notify(nudge(name)).unwrap();
    }
    assert!(
        notifier.notify(nudge("ok")).is_err(),
        "the seventh does not fit"
    );
    drop(notifier);
    let metrics = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the push task ends once its queue is done")
        .unwrap();

    assert_eq!((metrics.queued, metrics.dropped_queue_full), (6, 1));
    assert_eq!(metrics.delivered, 1);
    // The dead device: removed, and reported once however many pushes found it dead.
    assert_eq!(metrics.devices_gone, 1);
    assert!(targets.list(&RecipientId::new(gone).unwrap()).is_empty());
    assert_eq!(targets.list(&RecipientId::new("ok").unwrap()).len(), 1);
    // 503: retried until the give-up time, then dropped. 429 asking for 120 s, past the
    // give-up time: dropped at once, with no second request. The hung service: timed out,
    // dropped.
    assert!(requests_to("down") >= 2, "503 was retried");
    assert_eq!(
        requests_to("busy"),
        1,
        "Retry-After was honoured, not retried early"
    );
    assert_eq!(metrics.gave_up, 3);
    assert_eq!(metrics.timed_out, 1);
    assert_eq!(metrics.retried as usize, requests_to("down") - 1);
}
