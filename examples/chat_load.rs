//! A load generator for the chat_server example, over real WebSockets.
//!
//! ```text
//! cargo build --release --example chat_server --example chat_load
//! target/release/examples/chat_load                     # starts its own server (redb, temp dir)
//! target/release/examples/chat_load --url ws://127.0.0.1:8080 --server-pid <pid>
//! ```
//!
//! `--users` recipients (default 1,000) come and go: each is offline about `--offline-share`
//! of the time. `--senders` connections send as fast as the server answers, to recipients
//! picked with a skewed (Zipf, s = 1) fan-in, so a few users get most messages. Reports send
//! throughput, delivery latency for online recipients (server accept to client receipt),
//! drain time on reconnect (connect to `caught_up`), and the server's RSS.

// The server's own token code: this tool signs its users' tokens with the server's secret.
#[path = "chat_server/server/auth.rs"]
#[allow(dead_code, reason = "the tool only issues tokens")]
mod auth;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(name = "chat_load")]
struct Args {
    /// The server's WebSocket base URL; when absent, a chat_server is started next to this
    /// binary on a free port with redb storage in a temporary directory.
    #[arg(long)]
    url: Option<String>,
    /// Storage of the server this tool starts: `redb` (in a temporary directory) or `memory`.
    #[arg(long, default_value = "redb")]
    server_storage: String,
    /// The server's pid, for its RSS (known when this tool starts the server).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Recipients.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Sending connections.
    #[arg(long, default_value_t = 32)]
    senders: usize,
    /// Share of time each recipient spends offline.
    #[arg(long, default_value_t = 0.5)]
    offline_share: f64,
    /// Mean length of an online period, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    online_ms: u64,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// The server's `--auth-secret`, to sign the users' tokens (with `--url`; a server this
    /// tool starts gets a random one).
    #[arg(long, env = "CHAT_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
}

/// What the run measured.
#[derive(Default)]
struct Results {
    sent: u64,
    refused: BTreeMap<String, u64>,
    live_latency_ms: Vec<u64>,
    drain_ms: Vec<u64>,
    drained_messages: Vec<u64>,
    delivered: u64,
    redelivered: u64,
}

type Shared = Arc<Mutex<Results>>;

/// xorshift64*: enough randomness for a load shape, with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// An exponentially distributed duration with the given mean.
    fn exp(&mut self, mean_ms: f64) -> Duration {
        Duration::from_millis((-(1.0 - self.unit()).ln() * mean_ms) as u64)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !(0.0..1.0).contains(&args.offline_share) {
        return Err(format!(
            "--offline-share {}: must be at least 0 and below 1",
            args.offline_share
        )
        .into());
    }
    let secret = match (&args.url, &args.auth_secret) {
        (_, Some(secret)) => secret.clone(),
        (None, None) => auth::random_hex(32),
        (Some(_), None) => return Err("--url needs the server's --auth-secret".into()),
    };
    let tokens = auth::Auth::new(
        secret.clone().into_bytes(),
        false,
        Duration::from_secs(86_400),
        false,
    );
    let token = |user: String| -> Result<String, offline_queue::Error> {
        Ok(tokens.issue(&offline_queue::RecipientId::new(user)?).0)
    };
    let (_server, url, pid, _dir) = match &args.url {
        Some(url) => (ServerGuard(None), url.clone(), args.server_pid, None),
        None => {
            let dir = tempfile::tempdir()?;
            let storage = match args.server_storage.as_str() {
                "memory" => "memory".to_string(),
                _ => format!("redb:{}", dir.path().join("load.redb").display()),
            };
            let (child, addr) = start_server(&storage, &secret)?;
            let pid = child.id();
            (
                ServerGuard(Some(child)),
                format!("ws://{addr}"),
                Some(pid),
                Some(dir),
            )
        }
    };
    let rss_before = pid.and_then(|pid| rss_kib(pid, "VmRSS"));
    let results: Shared = Arc::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.duration_secs);
    let started = Instant::now();

    let mut tasks = Vec::new();
    for user in 0..args.users {
        let offline_ms = args.online_ms as f64 * args.offline_share / (1.0 - args.offline_share);
        tasks.push(tokio::spawn(recipient(
            format!("{url}/ws?token={}", token(format!("u{user}"))?),
            Rng(0x9e37_79b9_7f4a_7c15 ^ (user as u64 + 1)),
            args.online_ms as f64,
            offline_ms,
            deadline,
            results.clone(),
        )));
    }
    let popularity = zipf_cdf(args.users);
    let body = "x".repeat(args.body_bytes);
    for sender in 0..args.senders {
        tasks.push(tokio::spawn(send_loop(
            format!("{url}/ws?token={}", token(format!("sender{sender}"))?),
            Rng(0xdead_beef ^ (sender as u64 + 1) << 20),
            popularity.clone(),
            body.clone(),
            deadline,
            results.clone(),
        )));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let rss_after = pid.and_then(|pid| rss_kib(pid, "VmRSS"));
    let rss_peak = pid.and_then(|pid| rss_kib(pid, "VmHWM"));
    report(
        &args,
        &results.lock(),
        elapsed,
        rss_before,
        rss_after,
        rss_peak,
    );
    Ok(())
}

/// The server this tool started, stopped however the run ends.
struct ServerGuard(Option<Child>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `chat_server` from the directory of this binary on a free port.
fn start_server(
    storage: &str,
    secret: &str,
) -> Result<(Child, String), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?.with_file_name("chat_server");
    let mut child = Command::new(&exe)
        .args(["--listen", "127.0.0.1:0", "--max-pending", "100000"])
        .args(["--storage", storage])
        .env("RUST_LOG", "warn")
        .env("CHAT_AUTH_SECRET", secret)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "{}: {e} (build it: cargo build --release --example chat_server)",
                exe.display()
            )
        })?;
    // The server's last line at start names its address.
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    for line in lines {
        if let Some(addr) = line?.trim().strip_prefix("listening on http://") {
            return Ok((child, addr.to_string()));
        }
    }
    Err("the server exited before listening".into())
}

/// One recipient: offline for a while, then connected until its online period ends, acking
/// each batch as it arrives.
async fn recipient(
    url: String,
    mut rng: Rng,
    online_mean_ms: f64,
    offline_mean_ms: f64,
    deadline: tokio::time::Instant,
    results: Shared,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    // Half start online, half offline, so the run begins in its steady state.
    let mut offline = rng.unit() < offline_mean_ms / (online_mean_ms + offline_mean_ms);
    while tokio::time::Instant::now() < deadline {
        if offline {
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + rng.exp(offline_mean_ms)),
            )
            .await;
            offline = false;
            continue;
        }
        let connecting = Instant::now();
        let (socket, _) = tokio_tungstenite::connect_async(&url).await?;
        let (mut sink, mut frames) = socket.split();
        let online_until = deadline.min(tokio::time::Instant::now() + rng.exp(online_mean_ms));
        let mut caught_up = false;
        let mut drained = 0u64;
        loop {
            let frame = tokio::select! {
                frame = frames.next() => frame,
                _ = tokio::time::sleep_until(online_until) => break,
            };
            let Some(Ok(Message::Text(text))) = frame else {
                break;
            };
            let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            match frame["type"].as_str() {
                Some("deliver") => {
                    let received = now_ms();
                    let messages = frame["messages"].as_array().cloned().unwrap_or_default();
                    {
                        let mut results = results.lock();
                        results.delivered += messages.len() as u64;
                        for message in &messages {
                            if message["redelivered"] == true {
                                results.redelivered += 1;
                            }
                            if caught_up {
                                let sent = message["sent_at_ms"].as_u64().unwrap_or(received);
                                results.live_latency_ms.push(received.saturating_sub(sent));
                            }
                        }
                    }
                    if !caught_up {
                        drained += messages.len() as u64;
                    }
                    let ack = json!({"type": "ack", "up_to": frame["position"]});
                    sink.send(Message::Text(ack.to_string().into())).await?;
                }
                Some("caught_up") => {
                    caught_up = true;
                    let mut results = results.lock();
                    results
                        .drain_ms
                        .push(connecting.elapsed().as_millis() as u64);
                    results.drained_messages.push(drained);
                }
                _ => {}
            }
        }
        let _ = sink.close().await;
        offline = true;
    }
    Ok(())
}

/// One sender: sends to a skewed choice of recipient, one message at a time, until the end.
async fn send_loop(
    url: String,
    mut rng: Rng,
    popularity: Arc<Vec<f64>>,
    body: String,
    deadline: tokio::time::Instant,
    results: Shared,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    while tokio::time::Instant::now() < deadline {
        let pick = rng.unit();
        let user = popularity.partition_point(|&p| p < pick);
        let frame = json!({"type": "send", "to": format!("u{user}"), "body": body});
        socket.send(Message::Text(frame.to_string().into())).await?;
        // Skip frames that are not the answer (this sender's own caught_up).
        let reply = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if reply["type"] == "sent" || reply["type"] == "error" {
                        break reply;
                    }
                }
                Some(Ok(_)) => {}
                _ => return Ok(()),
            }
        };
        let mut results = results.lock();
        if reply["type"] == "sent" {
            results.sent += 1;
        } else {
            let code = reply["code"].as_str().unwrap_or("?").to_string();
            *results.refused.entry(code).or_default() += 1;
        }
    }
    let _ = socket.close(None).await;
    Ok(())
}

/// Cumulative Zipf (s = 1) weights over `n` recipients: user 0 is the most popular.
fn zipf_cdf(n: usize) -> Arc<Vec<f64>> {
    let weights: Vec<f64> = (1..=n).map(|rank| 1.0 / rank as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut sum = 0.0;
    Arc::new(
        weights
            .iter()
            .map(|w| {
                sum += w / total;
                sum
            })
            .collect(),
    )
}

/// A process's memory figure from /proc, in KiB.
fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn report(
    args: &Args,
    results: &Results,
    elapsed: Duration,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    rss_peak: Option<u64>,
) {
    let secs = elapsed.as_secs_f64();
    let mut latency = results.live_latency_ms.clone();
    let mut drain = results.drain_ms.clone();
    let mut drained = results.drained_messages.clone();
    println!(
        "chat_load: server storage {}, {} users ({:.0}% offline), {} senders, {}-byte bodies, {:.1} s",
        args.url.as_deref().unwrap_or(&args.server_storage),
        args.users,
        args.offline_share * 100.0,
        args.senders,
        args.body_bytes,
        secs
    );
    println!(
        "send:      {} stored, {:.0} msg/s; refused: {:?}",
        results.sent,
        results.sent as f64 / secs,
        results.refused
    );
    println!(
        "delivered: {} ({} redelivered)",
        results.delivered, results.redelivered
    );
    println!(
        "live delivery latency (accept -> client), {} msgs: p50 {} ms, p99 {} ms, max {} ms",
        latency.len(),
        percentile(&mut latency, 0.5),
        percentile(&mut latency, 0.99),
        latency.last().copied().unwrap_or(0)
    );
    println!(
        "drain on reconnect (connect -> caught_up), {} reconnects: p50 {} ms, p99 {} ms; messages drained p50 {}, p99 {}, max {}",
        drain.len(),
        percentile(&mut drain, 0.5),
        percentile(&mut drain, 0.99),
        percentile(&mut drained, 0.5),
        percentile(&mut drained, 0.99),
        drained.last().copied().unwrap_or(0)
    );
    match (rss_before, rss_after, rss_peak) {
        (Some(before), Some(after), Some(peak)) => println!(
            "server RSS: {:.1} MiB at start, {:.1} MiB at end, {:.1} MiB peak",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            peak as f64 / 1024.0
        ),
        _ => println!("server RSS: unknown (pass --server-pid)"),
    }
}
