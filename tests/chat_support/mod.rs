//! What the chat_server tests share: the server as a child process, a WebSocket client that
//! speaks the protocol, a webhook receiver, and small HTTP helpers.

pub mod browser;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use axum::body::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bounds every wait, so a hang fails the test instead of stalling CI; nothing is timed by it.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Carries the server's flags from a test to its child process.
const CHILD_ARGS: &str = "OFFLINE_QUEUE_CHAT_SERVER_ARGS";

/// In the child process: the flags to start the server with (program name first).
pub fn child_args() -> Option<Vec<String>> {
    let json = std::env::var(CHILD_ARGS).ok()?;
    let mut args = vec!["chat_server".to_string()];
    args.extend(serde_json::from_str::<Vec<String>>(&json).expect("child args"));
    Some(args)
}

/// The `--auth-secret` tests start the server with, unless they choose their own.
pub const TEST_SECRET: &str = "chat-server-tests-secret-0123456789abcdef";

/// The chat server, running as a child process. Killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The demo page's URL as the server printed it (with the login key in its fragment).
    pub page: Option<String>,
}

impl Server {
    /// Starts the server with `args` on a free port; in memory unless `--storage` is given.
    pub fn start(args: &[&str]) -> Self {
        let (child, lines) = spawn(&with_defaults(args), None);
        Self::await_listening(child, &lines)
    }

    /// Starts the server on the redb file `path`, with the process unable to grow any file
    /// more than `extra` bytes past the size of a new, empty store.
    pub fn start_with_file_limit(path: &std::path::Path, extra: u64) -> Self {
        drop(offline_queue::RedbStorage::open(path).unwrap());
        let limit = std::fs::metadata(path).unwrap().len() + extra;
        let storage = format!("redb:{}", path.display());
        let (child, lines) = spawn(&with_defaults(&["--storage", &storage]), Some(limit));
        Self::await_listening(child, &lines)
    }

    /// Starts the server with `args`, expects it to exit with an error, and returns its output.
    pub fn start_failure(args: &[&str]) -> String {
        Self::failure(with_defaults(args))
    }

    /// As [`Server::start_failure`], without the test secret every other start adds.
    pub fn start_failure_without_secret(args: &[&str]) -> String {
        Self::failure(local_defaults(args))
    }

    fn failure(args: Vec<String>) -> String {
        let (mut child, lines) = spawn(&args, None);
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?}: the server did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Until the reader thread reaches the end of the pipe: every line the child wrote.
        let output: Vec<String> = lines.iter().collect();
        assert!(!status.success(), "{args:?} started: {output:?}");
        output.join("\n")
    }

    fn await_listening(mut child: Child, lines: &std_mpsc::Receiver<String>) -> Self {
        let mut page = None;
        loop {
            let line = match lines.recv_timeout(PATIENCE) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not start: {:?}", child.wait());
                }
            };
            // libtest may print its own words before ours on the same line.
            if let Some((_, url)) = line.split_once("page: ") {
                page = Some(url.trim().to_string());
            }
            if let Some((_, addr)) = line.split_once("listening on http://") {
                let addr = addr.trim().parse().expect("an address");
                return Self { child, addr, page };
            }
        }
    }

    /// The login key printed at start, from the page's URL.
    pub fn login_key(&self) -> &str {
        let page = self.page.as_deref().expect("the server printed its page");
        page.split_once("#login=").expect("a login key").1
    }

    /// Messages stored for `user`, from `GET /stats`.
    pub async fn pending(&self, user: &str) -> u64 {
        self.stats(user).await["pending"].as_u64().unwrap()
    }

    /// Whether `user` has a live session, from `GET /stats`.
    pub async fn online(&self, user: &str) -> bool {
        self.stats(user).await["online"].as_bool().unwrap()
    }

    async fn stats(&self, user: &str) -> Value {
        let path = format!("/stats?token={}", token(user));
        let (status, body) = http_get(self.addr, &path).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// SIGKILL: no shutdown, no flush; what survives is what was durable.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the process to exit on its own.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tests run on a free port, with [`TEST_SECRET`] and, unless they say otherwise, in memory.
fn with_defaults(args: &[&str]) -> Vec<String> {
    let mut all = local_defaults(args);
    if !args.contains(&"--auth-secret") && !args.contains(&"--insecure-no-auth") {
        all.extend(["--auth-secret".into(), TEST_SECRET.into()]);
    }
    all
}

/// A free port and, unless `args` say otherwise, memory storage.
fn local_defaults(args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if !args.contains(&"--listen") {
        all.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    if !args.contains(&"--storage") {
        all.extend(["--storage".into(), "memory".into()]);
    }
    all
}

/// Re-runs this test binary as the server (`chat_server_process`); its stdout lines arrive on
/// the channel.
fn spawn(args: &[String], file_limit: Option<u64>) -> (Child, std_mpsc::Receiver<String>) {
    let exe = std::env::current_exe().unwrap();
    let test_args = "--ignored --exact chat_server_process --nocapture --test-threads=1";
    let mut command = match file_limit {
        // SIGXFSZ ignored, so a write past the limit fails with EFBIG, as on a full disk.
        Some(limit) => {
            let mut command = Command::new("bash");
            command.args([
                "-c",
                &format!(
                    "trap '' XFSZ; exec prlimit --fsize={limit}:unlimited -- '{}' {test_args}",
                    exe.display()
                ),
            ]);
            command
        }
        None => {
            let mut command = Command::new(exe);
            command.args(test_args.split(' '));
            command
        }
    };
    let mut child = command
        .env(CHILD_ARGS, serde_json::to_string(args).unwrap())
        // Only the arguments say which secret a test's server has.
        .env_remove("CHAT_AUTH_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even when nobody listens any more: a closed pipe would fail the
        // child's last words (libtest's summary) and its exit status with them.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    (child, lines)
}

/// Percent-encodes everything but unreserved characters.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET http://addr/path`: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], "").await
}

/// An HTTP request to `addr`: status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = within(client.request(request)).await.unwrap();
    let status = response.status().as_u16();
    let body = within(response.into_body().collect()).await.unwrap();
    (status, String::from_utf8(body.to_bytes().to_vec()).unwrap())
}

/// A token for `user` under [`TEST_SECRET`], valid for an hour. Signed here, independently of
/// the server's code, as any HS256 JWT issuer would.
pub fn token(user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sign_token(
        TEST_SECRET.as_bytes(),
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &serde_json::json!({"sub": user, "exp": now + 3600}).to_string(),
    )
}

/// `base64url(header).base64url(claims).base64url(HMAC-SHA256(secret, the first two))`.
pub fn sign_token(secret: &[u8], header: &str, claims: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{KeyInit, Mac};
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// Polls `condition` until it holds; panics, naming `what`, if it never does.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("no answer in time")
}

/// A WebSocket client speaking the chat protocol.
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a connection received before `caught_up`.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Each `deliver` frame's messages.
    pub batches: Vec<Vec<Value>>,
    /// The sum of the frames' gaps.
    pub gap: u64,
}

impl Backlog {
    /// Every delivered message, in order.
    pub fn messages(&self) -> Vec<Value> {
        self.batches.iter().flatten().cloned().collect()
    }
}

impl Client {
    pub async fn connect(server: &Server, user: &str) -> Self {
        Self::try_connect(server, user).await.expect("connected")
    }

    /// Connects as `user`, with a valid token for them.
    pub async fn try_connect(
        server: &Server,
        user: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        Self::connect_with(server, &format!("token={}", url_encode(&token(user)))).await
    }

    /// Connects to `/ws?<query>` as given.
    pub async fn connect_with(
        server: &Server,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{}/ws?{query}", server.addr);
        let (socket, _) = within(tokio_tungstenite::connect_async(url)).await?;
        Ok(Self { socket })
    }

    pub async fn send(&mut self, frame: Value) {
        within(self.socket.send(Message::Text(frame.to_string().into())))
            .await
            .unwrap();
    }

    /// Sends a text frame as is and returns the reply.
    pub async fn send_raw_text(&mut self, text: &str) -> Value {
        within(self.socket.send(Message::Text(text.into())))
            .await
            .unwrap();
        self.recv().await
    }

    /// Sends a binary frame and returns the reply.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Value {
        within(self.socket.send(Message::Binary(bytes.into())))
            .await
            .unwrap();
        self.recv().await
    }

    /// The next JSON frame; panics if the connection closes first.
    pub async fn recv(&mut self) -> Value {
        loop {
            match within(self.socket.next()).await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Waits for the server to close the connection; its close frame, if it sent one.
    pub async fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match within(self.socket.next()).await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Sends `body` to `to` and returns the seq of the `sent` reply.
    pub async fn send_message(&mut self, to: &str, body: &str) -> u64 {
        self.send(serde_json::json!({"type": "send", "to": to, "body": body}))
            .await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "sent", "{reply}");
        reply["seq"].as_u64().unwrap()
    }

    /// Receives `deliver` frames until `caught_up`.
    pub async fn drain(&mut self) -> Backlog {
        let mut backlog = Backlog::default();
        loop {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("deliver") => {
                    backlog.gap += frame["gap"].as_u64().unwrap_or(0);
                    backlog
                        .batches
                        .push(frame["messages"].as_array().unwrap().clone());
                }
                Some("caught_up") => return backlog,
                _ => panic!("unexpected frame while draining: {frame}"),
            }
        }
    }

    /// Expects a connection with nothing waiting: `caught_up` first.
    pub async fn expect_caught_up_empty(&mut self) {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "caught_up", "{frame}");
    }

    /// Closes the connection and waits until the server has seen it.
    pub async fn close(mut self) {
        within(self.socket.close(None)).await.unwrap();
        while let Some(Ok(_)) = within(self.socket.next()).await {}
    }
}

/// One webhook call as the receiver saw it.
#[derive(Debug)]
pub struct Post {
    /// What the receiver answered.
    pub status: u16,
    pub body: Value,
    pub raw: String,
}

/// A webhook endpoint on a free port that refuses its first `fail_first` calls with 500.
pub struct WebhookReceiver;

impl WebhookReceiver {
    /// Its URL, and the calls as they arrive.
    pub async fn start(fail_first: usize) -> (String, Posts) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/push",
            axum::routing::post(move |raw: String| {
                let tx = tx.clone();
                let calls = calls.clone();
                async move {
                    let status = if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                        500
                    } else {
                        200
                    };
                    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
                    let _ = tx.send(Post { status, body, raw });
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, Posts(rx))
    }
}

/// The webhook calls received, in order.
pub struct Posts(tokio::sync::mpsc::UnboundedReceiver<Post>);

impl Posts {
    pub async fn recv(&mut self) -> Post {
        within(self.0.recv()).await.expect("receiver running")
    }
}
