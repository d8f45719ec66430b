//! A fake push service for the provider tests: records every request and answers as the path
//! says, and the independent checker that verifies and decrypts Web Push requests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use parking_lot::Mutex;
use tokio::sync::mpsc;

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
    let last = path.rsplit('/').next().unwrap_or("").to_string();
    received.lock().push(Received {
        path: path.clone(),
        headers,
        body,
    });
    let _ = arrivals.send(());
    match last.as_str() {
        "ok" => StatusCode::CREATED.into_response(),
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
        let deadline = std::time::Duration::from_secs(30);
        while self.received.lock().len() < count {
            tokio::time::timeout(deadline, self.arrivals.recv())
                .await
                .expect("the push service got no request within 30 s")
                .expect("the fake stopped");
        }
        self.received.lock().clone()
    }
}

impl Drop for FakePushService {
    fn drop(&mut self) {
        self.server.abort();
    }
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

/// Verifies each request's VAPID token and decrypts its body with the subscription's private
/// key, in Python (`tests/push_support/web_push_check.py`), apart from the crate's code.
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
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/push_support/web_push_check.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
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
