//! The chat_server against the brokers it would replace, on one offline-delivery workload, in
//! one run on one machine:
//!
//! 1. `--recipients` (1,000) offline recipients each get `--per-recipient` (100) messages of
//!    `--body-bytes` (256), sent by `--publishers` (16) connections that each keep
//!    `--in-flight` (256) sends unanswered. *Store* is the time until every send is answered
//!    (`sent`, PUBACK, JetStream publish ack): stored as the system promises.
//! 2. Every recipient connects at once and drains with acks. *Drain* is the time until every
//!    recipient has all its messages. Each must get exactly its messages, in order, with the
//!    right bodies, or the run fails.
//!
//! The peers run from Debian's packages on free loopback ports in temporary directories:
//! Mosquitto (MQTT 3.1.1, QoS 1, persistent sessions, `persistence true`) and NATS JetStream
//! (file store, a durable pull consumer per recipient, `AckAll`). The chat_server runs from
//! `target/release/examples/chat_server` on each `--systems` storage.
//!
//! With `--cpu`, each phase's CPU time is printed too: the system's process by thread name and
//! this tool's own, per message. On two cores shared by both, a phase can take no less than
//! their sum over two; a phase much longer than that spent its time waiting (on an fsync, say).
//!
//! ```text
//! cargo build --release --features redis --example chat_server
//! cargo run --release --manifest-path load/Cargo.toml -- --systems chat:redb,mosquitto,nats
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Clone, Debug)]
struct Args {
    /// Offline recipients.
    #[arg(long, default_value_t = 1000)]
    recipients: usize,
    /// Messages each recipient gets.
    #[arg(long, default_value_t = 100)]
    per_recipient: usize,
    /// Bytes per message body.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Sends each publisher keeps unanswered.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// What to run, comma separated, in this order: `chat:redb`, `chat:memory`,
    /// `chat:redis://host:port`, `chat:postgres://..`, `chat:nats://..` (a chat_server built
    /// with `--features nats`), `mosquitto`, `nats` (a durable consumer per recipient); and
    /// ways a storage backend inside a server could keep and read a recipient's backlog in
    /// JetStream without a consumer each, over one connection (each mode's doc comment on
    /// `nats::Read` says more; "2.11+" needs such a server, see `--nats-server`):
    /// - a subject per recipient: `nats-direct` (read by direct get of the next message, one
    ///   request each), `nats-batched` (the same, 100 a request, 2.11+), `nats-ordered` (a
    ///   short-lived ordered consumer filtered to the subject);
    /// - a subject per message: `nats-keyed` (one direct get each), `nats-keyed-batched`
    ///   (100 a request, 2.11+), `nats-keyed-checked` (each publish expecting the
    ///   recipient's previous one as the last of its subjects, 2.11+);
    /// - appends by a recipient's single owner, with no compare-and-set:
    ///   `nats-keyed-owned` (each publish expecting its subject empty),
    ///   `nats-keyed-owned-limit` (the stream refuses a second message on a subject),
    ///   `nats-owned-paged` (also a sealed page every `--page-records` records),
    ///   `nats-owned-log` (records in a log stream of their own, read and removed by page);
    /// - pages rewritten with every append: `nats-paged`, `nats-paged-open` and
    ///   `nats-paged-lazy` (the queue's state in a tail subject, or in the open page itself,
    ///   or in a tail that keeps a full page until its publish is answered).
    #[arg(long, default_value = "chat:redb,mosquitto,nats")]
    systems: String,
    /// The chat_server binary.
    #[arg(long)]
    chat_server: Option<PathBuf>,
    /// Runs of the whole list; each system's best store and drain are reported too.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Recipients in the middle of connecting at once (TCP and protocol handshake). All
    /// connect together, but a storm of 1,000 SYNs overflows listen queues (Mosquitto listens
    /// with a backlog of 100), and the kernel's 1 s retransmit would be measured instead of
    /// the system.
    #[arg(long, default_value_t = 64)]
    connecting: usize,
    /// How the modes without a consumer ack what a recipient read: `purge` (the
    /// recipient's subjects purged through the last message), `delete` (each message
    /// deleted by its seq), `none` (nothing removed: what acks kept apart from the stream,
    /// as a cursor, would cost the drain) or, for the modes with a subject per message,
    /// `exact` (a purge of each stored message's own subject: records and pages with
    /// `nats-owned-paged`, pages alone with `nats-owned-log`). The `nats-paged` modes
    /// remove each page read by a purge
    /// of its subject or a delete by its seq, and write the state back unless `none`.
    #[arg(long, default_value = "purge")]
    nats_ack: String,
    /// Records per page for the `nats-paged` modes.
    #[arg(long, default_value_t = 15)]
    page_records: usize,
    /// Also print the CPU time each phase took: the system's process by thread name (the
    /// chat_server, mosquitto or nats-server; not a Redis or PostgreSQL behind the
    /// chat_server) and this tool's own, from the kernel's per-thread accounting.
    #[arg(long)]
    cpu: bool,
    /// The nats-server the NATS systems start (Debian's by default; `nats-batched` needs
    /// 2.11 or later, such as the one `.ci/newer-nats-server` fetches).
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
}

impl Args {
    fn total(&self) -> usize {
        self.recipients * self.per_recipient
    }

    /// Message `index` for `recipient`: says whose and which, padded to `--body-bytes`.
    fn body(&self, recipient: usize, index: usize) -> Vec<u8> {
        let mut body = format!("{recipient}:{index}:").into_bytes();
        body.resize(self.body_bytes.max(body.len()), b'x');
        body
    }

    /// The recipients publisher `p` sends to, so each recipient's messages come from one
    /// connection, in order.
    fn recipients_of(&self, publisher: usize) -> Vec<usize> {
        (publisher..self.recipients)
            .step_by(self.publishers)
            .collect()
    }
}

/// Bounds the recipients in the middle of connecting; each holds a permit until connected.
type Handshakes = Arc<Semaphore>;

/// Checks what `recipient` received as its `index`th message.
fn check(args: &Args, recipient: usize, index: usize, body: &[u8]) -> Result<(), BoxError> {
    if body != args.body(recipient, index).as_slice() {
        let head = String::from_utf8_lossy(&body[..body.len().min(24)]).into_owned();
        return Err(format!("recipient {recipient}: message {index} was {head:?}..").into());
    }
    Ok(())
}

struct Timing {
    store: Duration,
    drain: Duration,
    /// CPU each phase took: the system's process, by thread name, and this tool's own.
    store_cpu: PhaseCpu,
    drain_cpu: PhaseCpu,
}

/// CPU time one phase took, from the kernel's per-thread accounting.
struct PhaseCpu {
    /// The system's process (the chat_server, mosquitto or nats-server; not a Redis or
    /// PostgreSQL the chat_server uses), summed by thread name, most first.
    system: Vec<(String, Duration)>,
    /// This load tool's own threads.
    tool: Duration,
}

impl PhaseCpu {
    fn between(system: (&CpuSnapshot, &CpuSnapshot), tool: (&CpuSnapshot, &CpuSnapshot)) -> Self {
        let mut by_name: Vec<(String, Duration)> = Vec::new();
        for (name, spent) in system.1.since(system.0) {
            match by_name.iter_mut().find(|(n, _)| *n == name) {
                Some(entry) => entry.1 += spent,
                None => by_name.push((name, spent)),
            }
        }
        by_name.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        Self {
            system: by_name,
            tool: tool.1.since(tool.0).map(|(_, spent)| spent).sum(),
        }
    }

    /// One line: CPU seconds, and microseconds per message on both sides.
    fn describe(&self, messages: usize) -> String {
        let system: Duration = self.system.iter().map(|(_, spent)| *spent).sum();
        let per_message = |d: Duration| d.as_secs_f64() * 1e6 / messages as f64;
        let threads: Vec<String> = self
            .system
            .iter()
            .take(3)
            .map(|(name, spent)| format!("{name} {:.2}", spent.as_secs_f64()))
            .collect();
        format!(
            "system {:.2} s ({}), tool {:.2} s; per message {:.1} + {:.1} us",
            system.as_secs_f64(),
            threads.join(", "),
            self.tool.as_secs_f64(),
            per_message(system),
            per_message(self.tool)
        )
    }
}

/// Each thread's CPU time so far (`/proc/<pid>/task/<tid>/schedstat`, nanoseconds on a CPU),
/// by thread id, with its name. Empty where /proc has no such accounting.
struct CpuSnapshot(Vec<(u64, String, Duration)>);

impl CpuSnapshot {
    fn take(pid: u32) -> Self {
        let mut threads = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Self(threads);
        };
        for task in tasks.flatten() {
            let path = task.path();
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let ran = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if let Some(ns) = ran {
                threads.push((tid, name.trim().to_string(), Duration::from_nanos(ns)));
            }
        }
        Self(threads)
    }

    /// Each thread's CPU since `earlier` (a thread born since counts from zero; one that
    /// ended meanwhile is not counted: none of the systems' threads end during a phase).
    fn since<'a>(&'a self, earlier: &'a Self) -> impl Iterator<Item = (String, Duration)> + 'a {
        self.0.iter().map(move |(tid, name, ran)| {
            let before = earlier
                .0
                .iter()
                .find(|(t, _, _)| t == tid)
                .map_or(Duration::ZERO, |(_, _, r)| *r);
            (name.clone(), ran.saturating_sub(before))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let systems: Vec<String> = args
        .systems
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let chat_server = args.chat_server.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/examples/chat_server")
    });
    println!(
        "workload: {} recipients x {} messages of {} B, {} publishers x {} in flight; {} round(s)",
        args.recipients,
        args.per_recipient,
        args.body_bytes,
        args.publishers,
        args.in_flight,
        args.rounds
    );
    let mut best: Vec<(String, f64, f64)> = Vec::new();
    for round in 1..=args.rounds {
        for system in &systems {
            let timing = match system.split_once(':') {
                Some(("chat", storage)) => chat::run(&args, &chat_server, storage).await?,
                None if system == "mosquitto" => mqtt::run(&args).await?,
                None if system == "nats" => nats::run(&args, nats::Read::Durable).await?,
                None if system == "nats-direct" => nats::run(&args, nats::Read::Direct).await?,
                None if system == "nats-ordered" => nats::run(&args, nats::Read::Ordered).await?,
                None if system == "nats-batched" => nats::run(&args, nats::Read::Batched).await?,
                None if system == "nats-keyed-batched" => {
                    nats::run(&args, nats::Read::KeyedBatched).await?
                }
                None if system == "nats-keyed" => nats::run(&args, nats::Read::Keyed).await?,
                None if system == "nats-keyed-checked" => {
                    nats::run(&args, nats::Read::KeyedChecked).await?
                }
                None if system == "nats-keyed-owned" => {
                    nats::run(&args, nats::Read::KeyedOwned).await?
                }
                None if system == "nats-keyed-owned-limit" => {
                    nats::run(&args, nats::Read::KeyedOwnedLimit).await?
                }
                None if system == "nats-owned-paged" => {
                    nats::run(&args, nats::Read::OwnedPaged).await?
                }
                None if system == "nats-owned-log" => {
                    nats::run(&args, nats::Read::OwnedLog).await?
                }
                None if system == "nats-paged" => nats::run(&args, nats::Read::Paged).await?,
                None if system == "nats-paged-open" => {
                    nats::run(&args, nats::Read::PagedOpen).await?
                }
                None if system == "nats-paged-lazy" => {
                    nats::run(&args, nats::Read::PagedLazy).await?
                }
                _ => return Err(format!("--systems: unknown {system:?}").into()),
            };
            let store = args.total() as f64 / timing.store.as_secs_f64();
            let drain = args.total() as f64 / timing.drain.as_secs_f64();
            println!(
                "round {round} {system:<14} store {store:>9.0} msg/s ({:>6.2} s)   drain {drain:>9.0} msg/s ({:>6.2} s)   all {} delivered in order",
                timing.store.as_secs_f64(),
                timing.drain.as_secs_f64(),
                args.total()
            );
            if args.cpu {
                println!(
                    "    cpu, store: {}\n    cpu, drain: {}",
                    timing.store_cpu.describe(args.total()),
                    timing.drain_cpu.describe(args.total())
                );
            }
            match best.iter_mut().find(|(name, _, _)| name == system) {
                Some(entry) => {
                    entry.1 = entry.1.max(store);
                    entry.2 = entry.2.max(drain);
                }
                None => best.push((system.clone(), store, drain)),
            }
        }
    }
    let peers = best
        .iter()
        .filter(|(name, _, _)| !name.starts_with("chat:"));
    let (peer_store, peer_drain) = peers.fold((0.0f64, 0.0f64), |(s, d), (_, store, drain)| {
        (s.max(*store), d.max(*drain))
    });
    println!(
        "\nbest of {} round(s), and against the faster peer:",
        args.rounds
    );
    for (system, store, drain) in &best {
        let ratios = if peer_store > 0.0 && system.starts_with("chat:") {
            format!(
                "   store {:.2}x, drain {:.2}x the faster peer",
                store / peer_store,
                drain / peer_drain
            )
        } else {
            String::new()
        };
        println!("{system:<14} store {store:>9.0} msg/s   drain {drain:>9.0} msg/s{ratios}");
    }
    Ok(())
}

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something listens on `port`.
async fn await_port(port: u16, what: &str) -> Result<(), BoxError> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{what} does not listen on {port}").into())
}

/// Times the store phase (a task per publisher, each sending its recipients' messages), then
/// the drain phase (a task per recipient, at most `--connecting` of them mid-handshake).
async fn timed_phases<Store, Drain>(
    args: &Args,
    system_pid: u32,
    publish: impl Fn(usize) -> Store,
    drain: impl Fn(usize, Handshakes) -> Drain,
) -> Result<Timing, BoxError>
where
    Store: Future<Output = Result<(), BoxError>> + Send + 'static,
    Drain: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let snapshot = || {
        (
            CpuSnapshot::take(system_pid),
            CpuSnapshot::take(std::process::id()),
        )
    };
    let before_store = snapshot();
    let started = Instant::now();
    join_all(
        (0..args.publishers)
            .map(|p| tokio::spawn(publish(p)))
            .collect(),
    )
    .await?;
    let store = started.elapsed();
    let before_drain = snapshot();
    let started = Instant::now();
    let handshakes = Arc::new(Semaphore::new(args.connecting));
    join_all(
        (0..args.recipients)
            .map(|r| tokio::spawn(drain(r, handshakes.clone())))
            .collect(),
    )
    .await?;
    let drain = started.elapsed();
    let after = snapshot();
    Ok(Timing {
        store,
        drain,
        store_cpu: PhaseCpu::between(
            (&before_store.0, &before_drain.0),
            (&before_store.1, &before_drain.1),
        ),
        drain_cpu: PhaseCpu::between((&before_drain.0, &after.0), (&before_drain.1, &after.1)),
    })
}

/// A phase that takes longer than this has lost something (a message, an answer): fail.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

async fn join_all(
    tasks: Vec<tokio::task::JoinHandle<Result<(), BoxError>>>,
) -> Result<(), BoxError> {
    tokio::time::timeout(PHASE_LIMIT, async {
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
    .await
    .map_err(|_| format!("a phase ran past {PHASE_LIMIT:?}: something was lost"))?
}

mod chat {
    use super::*;

    const SECRET: &str = "offline-queue-load-tool-secret-0123456789";

    /// An HS256 JWT for `user`, as the server's `--auth-secret` checks it.
    fn token(user: &str) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use hmac::{KeyInit, Mac};
        let claims = json!({"sub": user, "exp": 4_000_000_000u64}).to_string();
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    pub async fn run(args: &Args, binary: &Path, storage: &str) -> Result<Timing, BoxError> {
        let dir = tempfile::tempdir()?;
        let storage = match storage {
            "redb" => format!("redb:{}", dir.path().join("chat.redb").display()),
            other => other.to_string(),
        };
        // Each run its own keys or schema, so a round never starts on an earlier one's queues.
        let prefix = format!(
            "load{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros()
        );
        let mut child = Command::new(binary)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--storage",
                &storage,
                "--no-login",
            ])
            .args(["--redis-prefix", &prefix, "--postgres-schema", &prefix])
            .args(["--nats-stream", &prefix])
            .env("CHAT_AUTH_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "{}: {e} (cargo build --release --example chat_server)",
                    binary.display()
                )
            })?;
        let stdout = child.stdout.take().unwrap();
        let pid = child.id();
        let _server = Process(child);
        let addr: SocketAddr = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                if let Some(addr) = line.ok()?.strip_prefix("listening on http://") {
                    return addr.trim().parse().ok();
                }
            }
            None
        })
        .await?
        .ok_or("the chat_server did not start")?;

        timed_phases(
            args,
            pid,
            |publisher| publish(args.clone(), addr, publisher),
            |recipient, handshakes| drain(args.clone(), addr, recipient, handshakes),
        )
        .await
    }

    async fn connect(
        addr: SocketAddr,
        user: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        BoxError,
    > {
        let url = format!("ws://{addr}/ws?token={}", token(user));
        Ok(tokio_tungstenite::connect_async(url).await?.0)
    }

    /// One publisher: its recipients' messages in order, `--in-flight` unanswered at most.
    async fn publish(args: Args, addr: SocketAddr, publisher: usize) -> Result<(), BoxError> {
        let socket = connect(addr, &format!("publisher{publisher}")).await?;
        let (mut sink, mut frames) = socket.split();
        let recipients = args.recipients_of(publisher);
        let expected = recipients.len() * args.per_recipient;
        let window = Arc::new(Semaphore::new(args.in_flight));
        let replies = {
            let window = window.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                while answered < expected {
                    let Some(frame) = frames.next().await else {
                        return Err::<(), BoxError>("the server closed a publisher".into());
                    };
                    let Message::Text(text) = frame? else {
                        continue;
                    };
                    let reply: Value = serde_json::from_str(&text)?;
                    match reply["type"].as_str() {
                        Some("sent") => {
                            answered += 1;
                            window.add_permits(1);
                        }
                        Some("error") => return Err(format!("send refused: {reply}").into()),
                        _ => {}
                    }
                }
                Ok(())
            })
        };
        for index in 0..args.per_recipient {
            for &recipient in &recipients {
                let permit = match window.try_acquire() {
                    Ok(permit) => permit,
                    Err(_) => {
                        // The window is full: put what is written on the wire, then wait.
                        sink.flush().await?;
                        window.acquire().await?
                    }
                };
                permit.forget();
                let body = String::from_utf8(args.body(recipient, index))?;
                let frame = json!({"type": "send", "to": format!("r{recipient}"), "body": body});
                sink.feed(Message::Text(frame.to_string().into())).await?;
            }
        }
        sink.flush().await?;
        replies.await??;
        let _ = sink.close().await;
        Ok(())
    }

    /// One recipient: connects, takes every batch and acks it, until it has all its messages.
    async fn drain(
        args: Args,
        addr: SocketAddr,
        recipient: usize,
        handshakes: Handshakes,
    ) -> Result<(), BoxError> {
        let permit = handshakes.acquire().await?;
        let mut socket = connect(addr, &format!("r{recipient}")).await?;
        drop(permit);
        let mut received = 0;
        while received < args.per_recipient {
            let Some(frame) = socket.next().await else {
                return Err(format!("recipient {recipient}: closed after {received}").into());
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text)?;
            if frame["type"] != "deliver" {
                continue;
            }
            for message in frame["messages"]
                .as_array()
                .ok_or("deliver without messages")?
            {
                let body = message["body"].as_str().ok_or("message without a body")?;
                check(&args, recipient, received, body.as_bytes())?;
                received += 1;
            }
            let ack = json!({"type": "ack", "up_to": frame["position"]});
            socket.send(Message::Text(ack.to_string().into())).await?;
        }
        let _ = socket.close(None).await;
        Ok(())
    }
}

mod mqtt {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    /// Mosquitto as its users run it for offline delivery: persistent sessions kept across
    /// restarts (`persistence true`: an in-memory store, saved to disk every
    /// `autosave_interval`, 30 minutes by default, and at a clean shutdown).
    fn config(dir: &Path, port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
            dir.display()
        )
    }

    pub async fn run(args: &Args) -> Result<Timing, BoxError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, config(dir.path(), port))?;
        let _broker = Process(
            Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?,
        );
        await_port(port, "mosquitto").await?;

        // Each recipient's persistent session and subscription, made while it was online.
        for chunk in (0..args.recipients).collect::<Vec<_>>().chunks(100) {
            let mut tasks = Vec::new();
            for &recipient in chunk {
                tasks.push(tokio::spawn(subscribe(port, recipient)));
            }
            join_all(tasks).await?;
        }

        timed_phases(
            args,
            _broker.0.id(),
            |publisher| publish(args.clone(), port, publisher),
            |recipient, handshakes| drain(args.clone(), port, recipient, handshakes),
        )
        .await
    }

    fn options(client_id: String, port: u16, clean: bool, in_flight: u16) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_clean_session(clean);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_inflight(in_flight);
        options
    }

    async fn subscribe(port: u16, recipient: usize) -> Result<(), BoxError> {
        let (client, mut events) =
            AsyncClient::new(options(format!("r{recipient}"), port, false, 20), 10);
        client
            .subscribe(format!("u/{recipient}"), QoS::AtLeastOnce)
            .await?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
                break;
            }
        }
        client.disconnect().await?;
        while !matches!(
            events.poll().await,
            Err(_) | Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
        ) {}
        Ok(())
    }

    async fn publish(args: Args, port: u16, publisher: usize) -> Result<(), BoxError> {
        let (client, mut events) = AsyncClient::new(
            options(
                format!("publisher{publisher}"),
                port,
                true,
                args.in_flight as u16,
            ),
            args.in_flight,
        );
        let recipients = args.recipients_of(publisher);
        let expected = recipients.len() * args.per_recipient;
        let sender = tokio::spawn({
            let args = args.clone();
            async move {
                for index in 0..args.per_recipient {
                    for &recipient in &recipients {
                        let topic = format!("u/{recipient}");
                        client
                            .publish(topic, QoS::AtLeastOnce, false, args.body(recipient, index))
                            .await?;
                    }
                }
                Ok::<_, BoxError>(client)
            }
        });
        let mut acked = 0;
        while acked < expected {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                acked += 1;
            }
        }
        let client = sender.await??;
        client.disconnect().await?;
        Ok(())
    }

    async fn drain(
        args: Args,
        port: u16,
        recipient: usize,
        handshakes: Handshakes,
    ) -> Result<(), BoxError> {
        // The same client id and no clean session: the broker sends what it kept.
        let (client, mut events) =
            AsyncClient::new(options(format!("r{recipient}"), port, false, 20), 10);
        let mut permit = Some(handshakes.acquire().await?);
        let mut received = 0;
        while received < args.per_recipient {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => permit = None,
                Event::Incoming(Packet::Publish(publish)) => {
                    check(&args, recipient, received, &publish.payload)?;
                    received += 1;
                }
                _ => {}
            }
        }
        drop(permit);
        // The last PUBACK goes out before the DISCONNECT.
        client.disconnect().await?;
        while !matches!(
            events.poll().await,
            Err(_) | Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
        ) {}
        Ok(())
    }
}

mod nats {
    use super::*;
    use async_nats::jetstream::{self, consumer, stream};

    const STREAM: &str = "OFFLINE";
    /// `OwnedLog`'s records.
    const LOG_STREAM: &str = "OFFLINE_LOG";

    /// How recipients read their backlog.
    #[derive(Clone, Copy, PartialEq)]
    pub enum Read {
        /// A durable pull consumer per recipient, each recipient on its own connection: how
        /// JetStream users do it today.
        Durable,
        /// Direct get of the next message on the recipient's subject, one request each, over
        /// the one connection a server-side backend would hold.
        Direct,
        /// As `Direct`, but up to a batch of 100 messages a request (`next_by_subj` with
        /// `batch`, answered message by message and closed by a `204` status): nats-server
        /// 2.11 or later.
        Batched,
        /// An ordered (ephemeral) consumer filtered to the recipient's subject, made for the
        /// drain, over that one connection.
        Ordered,
        /// A subject per message (`u.<recipient>.<index>`, as a key-value bucket keys its
        /// entries), read by direct get of the last message on each, one request each.
        Keyed,
        /// As `Keyed`, the last message of up to 100 listed subjects a request
        /// (`multi_last`): nats-server 2.11 or later.
        KeyedBatched,
        /// As `KeyedBatched`, each publish expecting the recipient's previous one as the
        /// last of its subjects: 2.11 or later.
        KeyedChecked,
        /// As `Keyed`, each publish expecting its own subject empty, as a node that owned the
        /// recipient's positions would append (positions from its memory, every publish
        /// pipelined); read 100 a request as `KeyedBatched` on 2.11 or later, one request
        /// each as `Keyed` on older servers.
        KeyedOwned,
        /// As `KeyedOwned`, but plain publishes to a stream that refuses a second message on
        /// a subject (`max_messages_per_subject` 1, `discard_new_per_subject`).
        KeyedOwnedLimit,
        /// As `KeyedOwnedLimit`, and each `--page-records` records of a recipient are also
        /// published together as a sealed page (`u.<recipient>.p<n>`), as the recipient's
        /// owner could without a compare-and-set: a read gets the full pages, then the
        /// records after the last (in one batched request on 2.11 or later).
        OwnedPaged,
        /// As `OwnedPaged`, but records go to a stream of their own (`w.<recipient>.<index>`,
        /// a write-ahead log its limits would empty, so no record is ever purged), and a
        /// recipient's last records are sealed as a shorter page once the sends stop (as an
        /// owner would after a pause): a read gets pages only, and an ack purges pages only.
        OwnedLog,
        /// A recipient's records in pages of `--page-records`: the open page in the tail
        /// (`u.<recipient>.t`) beside the queue's state, each sealed page on a subject of its
        /// own (`u.<recipient>.<page>`), one message kept per subject. An append rewrites the
        /// tail by compare-and-set, after publishing the open page as a sealed one when it is
        /// full; appends that wait for the recipient's write in flight share the next one. A
        /// drain reads the tail, then a batch's pages by direct get, all at once; each
        /// batch's ack removes its pages and writes the tail back.
        Paged,
        /// As `Paged`, but the queue's state rides in the open page, on the page's own
        /// subject: an append is one compare-and-set of the open page, and a full page is
        /// followed by the next (expected empty) and a pointer to it (`u.<recipient>.h`)
        /// written without waiting; a reader starts at the pointer and looks one page on.
        PagedOpen,
        /// As `Paged`, but a full page's publish is not waited for: the tail keeps its
        /// records until the page is stored, and the first tail write after that drops them.
        /// The tail stays the one message changed by compare-and-set.
        PagedLazy,
    }

    impl Read {
        /// Whether each message is published to a subject of its own (`u.<recipient>.<index>`,
        /// or `w.` in `OwnedLog`'s log) rather than the recipient's one subject.
        fn subject_per_message(self) -> bool {
            matches!(
                self,
                Read::Keyed
                    | Read::KeyedBatched
                    | Read::KeyedChecked
                    | Read::KeyedOwned
                    | Read::KeyedOwnedLimit
                    | Read::OwnedPaged
                    | Read::OwnedLog
            )
        }

        /// Whether the stream refuses a second message on a subject (the single owner's
        /// fence, from the stream's limits).
        fn refuses_second_message(self) -> bool {
            matches!(
                self,
                Read::KeyedOwnedLimit | Read::OwnedPaged | Read::OwnedLog
            )
        }
    }

    /// The subject a message is published to.
    fn subject(read: Read, recipient: usize, index: usize) -> String {
        match read {
            Read::OwnedLog => format!("w.{recipient}.{index}"),
            _ if read.subject_per_message() => format!("u.{recipient}.{index}"),
            _ => format!("u.{recipient}"),
        }
    }

    pub async fn run(args: &Args, read: Read) -> Result<Timing, BoxError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let _server = Process(
            Command::new(&args.nats_server)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("nats-server: {e} (apt-get install nats-server)"))?,
        );
        await_port(port, "nats-server").await?;
        let url = format!("nats://127.0.0.1:{port}");

        // A file-stored stream over every recipient's subject, and a durable consumer each.
        let client = async_nats::connect(&url).await?;
        let setup = jetstream::new(client.clone());
        let stream = setup
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec!["u.>".into()],
                storage: stream::StorageType::File,
                allow_direct: !matches!(read, Read::Durable | Read::Ordered),
                // A page's older versions go as its newer one is stored; for the single
                // owner a second message on a subject is refused.
                max_messages_per_subject: if read.refuses_second_message()
                    || matches!(read, Read::Paged | Read::PagedOpen | Read::PagedLazy)
                {
                    1
                } else {
                    0
                },
                discard: if read.refuses_second_message() {
                    stream::DiscardPolicy::New
                } else {
                    stream::DiscardPolicy::Old
                },
                discard_new_per_subject: read.refuses_second_message(),
                ..Default::default()
            })
            .await?;
        if matches!(read, Read::OwnedPaged | Read::OwnedLog) && args.page_records == 0 {
            return Err("--page-records must be at least 1".into());
        }
        if read == Read::OwnedLog {
            // The records' log: the same refusal of a second message on a subject; its
            // `max_age` is what would empty it (nothing here lives that long).
            setup
                .create_stream(stream::Config {
                    name: LOG_STREAM.into(),
                    subjects: vec!["w.>".into()],
                    storage: stream::StorageType::File,
                    max_messages_per_subject: 1,
                    discard: stream::DiscardPolicy::New,
                    discard_new_per_subject: true,
                    max_age: Duration::from_secs(3600),
                    ..Default::default()
                })
                .await?;
        }
        if read != Read::Durable {
            // One connection for every drain, made before the clock starts.
            let shared = stream.clone();
            if let Some(layout) = match read {
                Read::Paged => Some(paged::Layout::Tail),
                Read::PagedOpen => Some(paged::Layout::Open),
                Read::PagedLazy => Some(paged::Layout::Lazy),
                _ => None,
            } {
                if args.page_records == 0 {
                    return Err("--page-records must be at least 1".into());
                }
                return timed_phases(
                    args,
                    _server.0.id(),
                    |publisher| paged::publish(args.clone(), url.clone(), publisher, layout),
                    |recipient, reads| {
                        let (args, js, stream) = (args.clone(), setup.clone(), shared.clone());
                        async move {
                            let _permit = reads.acquire().await?;
                            paged::drain(&args, &js, &stream, recipient, layout).await
                        }
                    },
                )
                .await;
            }
            return timed_phases(
                args,
                _server.0.id(),
                |publisher| publish(args.clone(), url.clone(), publisher, read),
                |recipient, reads| {
                    let (args, stream, client) = (args.clone(), shared.clone(), client.clone());
                    async move {
                        // A backend bounds its concurrent reads (`--connecting` of them); a
                        // thousand at once time out in JetStream's API.
                        let _permit = reads.acquire().await?;
                        let seqs = match read {
                            Read::Direct => drain_direct(&args, &stream, recipient).await?,
                            Read::Batched | Read::KeyedBatched | Read::KeyedChecked => {
                                drain_batched(&args, &client, recipient, read).await?
                            }
                            Read::KeyedOwned | Read::KeyedOwnedLimit if batched_gets(&client) => {
                                drain_batched(&args, &client, recipient, read).await?
                            }
                            Read::KeyedOwned | Read::KeyedOwnedLimit => {
                                drain_keyed(&args, &stream, recipient).await?
                            }
                            Read::OwnedPaged | Read::OwnedLog => {
                                drain_owned_paged(&args, &client, &stream, recipient, read).await?
                            }
                            Read::Keyed => drain_keyed(&args, &stream, recipient).await?,
                            _ => drain_ordered(&args, &stream, recipient).await?,
                        };
                        let last = seqs.iter().max().copied().unwrap_or(0);
                        match args.nats_ack.as_str() {
                            "purge" => {
                                // (`OwnedLog`: its pages; the log empties itself.)
                                let filter = if read.subject_per_message() {
                                    format!("u.{recipient}.>")
                                } else {
                                    format!("u.{recipient}")
                                };
                                stream.purge().filter(filter).sequence(last + 1).await?;
                            }
                            "delete" => {
                                for seq in seqs {
                                    stream.delete_message(seq).await?;
                                }
                            }
                            // One purge of an exact subject per stored message (records, and
                            // pages with `OwnedPaged`), as `NatsStorage` removes them.
                            "exact" if read.subject_per_message() => {
                                // With `OwnedPaged` also the records sealed into pages; with
                                // `OwnedLog` the pages alone (its log empties itself).
                                let mut subjects = owned_subjects(&args, recipient, read);
                                if read == Read::OwnedPaged {
                                    let sealed =
                                        subjects.len() - args.per_recipient % args.page_records;
                                    subjects.extend(
                                        (0..sealed * args.page_records)
                                            .map(|index| subject(read, recipient, index)),
                                    );
                                }
                                for subject in subjects {
                                    stream.purge().filter(subject).await?;
                                }
                            }
                            "none" => {}
                            other => {
                                return Err(format!(
                                    "--nats-ack: {other:?} is unknown or not for this mode"
                                )
                                .into());
                            }
                        }
                        Ok(())
                    }
                },
            )
            .await;
        }
        for recipient in 0..args.recipients {
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("r{recipient}")),
                    filter_subject: format!("u.{recipient}"),
                    ack_policy: consumer::AckPolicy::All,
                    ..Default::default()
                })
                .await?;
        }

        timed_phases(
            args,
            _server.0.id(),
            |publisher| publish(args.clone(), url.clone(), publisher, read),
            |recipient, handshakes| drain(args.clone(), url.clone(), recipient, handshakes),
        )
        .await
    }

    async fn publish(
        args: Args,
        url: String,
        publisher: usize,
        read: Read,
    ) -> Result<(), BoxError> {
        let js = jetstream::new(async_nats::connect(&url).await?);
        if read == Read::KeyedChecked {
            return publish_checked(args, js, publisher).await;
        }
        // `OwnedPaged`: each recipient's records since its last sealed page.
        let mut open: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut unanswered = VecDeque::new();
        for index in 0..args.per_recipient {
            for recipient in args.recipients_of(publisher) {
                // `>=`: a sealed page is one more publish in flight after its record's.
                while unanswered.len() >= args.in_flight {
                    let ack: jetstream::context::PublishAckFuture = unanswered.pop_front().unwrap();
                    ack.await?;
                }
                let body = bytes::Bytes::from(args.body(recipient, index));
                let subject = subject(read, recipient, index);
                unanswered.push_back(if read == Read::KeyedOwned {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
                    js.publish_with_headers(subject, headers, body.clone())
                        .await?
                } else {
                    js.publish(subject, body.clone()).await?
                });
                if matches!(read, Read::OwnedPaged | Read::OwnedLog) {
                    let page = open.entry(recipient).or_default();
                    page.extend_from_slice(&(body.len() as u32).to_be_bytes());
                    page.extend_from_slice(&body);
                    if (index + 1) % args.page_records == 0 {
                        let sealed = bytes::Bytes::from(std::mem::take(page));
                        let name = format!("u.{recipient}.p{}", index / args.page_records);
                        unanswered.push_back(js.publish(name, sealed).await?);
                    }
                }
            }
        }
        if read == Read::OwnedLog {
            // The sends stopped: each recipient's last records become a shorter page.
            for (recipient, page) in open {
                if !page.is_empty() {
                    let name = format!("u.{recipient}.p{}", args.per_recipient / args.page_records);
                    unanswered.push_back(js.publish(name, bytes::Bytes::from(page)).await?);
                }
            }
        }
        for ack in unanswered {
            ack.await?;
        }
        Ok(())
    }

    /// Publishes as `publish`, each message to a subject of its own, expecting the last
    /// sequence of all the recipient's subjects (`Nats-Expected-Last-Subject-Sequence` with
    /// `-Subject` `u.<recipient>.>`, nats-server 2.11 or later) to be its previous message's:
    /// an append checked by the record's own publish. Each recipient has one publish in
    /// flight at a time (the next needs the previous one's sequence).
    async fn publish_checked(
        args: Args,
        js: jetstream::Context,
        publisher: usize,
    ) -> Result<(), BoxError> {
        let mut last: HashMap<usize, u64> = HashMap::new();
        let mut unanswered: VecDeque<(usize, jetstream::context::PublishAckFuture)> =
            VecDeque::new();
        async fn answered(
            last: &mut HashMap<usize, u64>,
            (recipient, ack): (usize, jetstream::context::PublishAckFuture),
        ) -> Result<(), BoxError> {
            last.insert(recipient, ack.await?.sequence);
            Ok(())
        }
        for index in 0..args.per_recipient {
            for recipient in args.recipients_of(publisher) {
                while unanswered.len() == args.in_flight
                    || unanswered.iter().any(|(waiting, _)| *waiting == recipient)
                {
                    answered(&mut last, unanswered.pop_front().unwrap()).await?;
                }
                let mut headers = async_nats::HeaderMap::new();
                let expected = last.get(&recipient).copied().unwrap_or(0);
                headers.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string());
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence-Subject",
                    format!("u.{recipient}.>"),
                );
                let body = bytes::Bytes::from(args.body(recipient, index));
                let subject = subject(Read::KeyedChecked, recipient, index);
                let ack = js.publish_with_headers(subject, headers, body).await?;
                unanswered.push_back((recipient, ack));
            }
        }
        while let Some(one) = unanswered.pop_front() {
            answered(&mut last, one).await?;
        }
        Ok(())
    }

    /// Reads the recipient's messages one direct get at a time; returns their seqs.
    async fn drain_direct(
        args: &Args,
        stream: &stream::Stream,
        recipient: usize,
    ) -> Result<Vec<u64>, BoxError> {
        let subject = format!("u.{recipient}");
        let mut seqs = Vec::with_capacity(args.per_recipient);
        for index in 0..args.per_recipient {
            let next = seqs.last().map_or(1, |seq| seq + 1);
            let message = stream
                .direct_get_next_for_subject(&subject, Some(next))
                .await?;
            let message = jetstream::message::StreamMessage::try_from(message.message)?;
            check(args, recipient, index, &message.payload)?;
            seqs.push(message.sequence);
        }
        Ok(seqs)
    }

    /// Reads the recipient's messages a batch of up to 100 a request, each answer bounded
    /// by the server's `max_payload` (what it leaves out is asked for next): by `next_by_subj`
    /// on the recipient's subject (`Read::Batched`), or by `multi_last` of the next messages'
    /// own subjects (`Read::KeyedBatched`, `Read::KeyedChecked`). Returns their seqs.
    async fn drain_batched(
        args: &Args,
        client: &async_nats::Client,
        recipient: usize,
        read: Read,
    ) -> Result<Vec<u64>, BoxError> {
        let max_bytes = client.server_info().max_payload.max(1);
        let mut seqs: Vec<u64> = Vec::with_capacity(args.per_recipient);
        while seqs.len() < args.per_recipient {
            let first = seqs.len();
            let batch = (args.per_recipient - first).min(100);
            let request = if read == Read::Batched {
                let next = seqs.last().map_or(1, |seq| seq + 1);
                format!(
                    r#"{{"seq":{next},"next_by_subj":"u.{recipient}","batch":{batch},"max_bytes":{max_bytes}}}"#
                )
            } else {
                let subjects: Vec<String> = (first..first + batch)
                    .map(|index| subject(read, recipient, index))
                    .collect();
                multi_last(&subjects, max_bytes)
            };
            let messages = batched_get(client, request).await?;
            if messages.is_empty() {
                return Err(format!("recipient {recipient}: no message {first}").into());
            }
            for message in messages {
                check(args, recipient, seqs.len(), &message.payload)?;
                seqs.push(message.sequence);
            }
        }
        Ok(seqs)
    }

    /// A batched direct get of the last message on each of `subjects` (digits and dots:
    /// nothing to escape), answers bounded by `max_bytes`.
    fn multi_last(subjects: &[String], max_bytes: usize) -> String {
        format!(
            r#"{{"multi_last":["{}"],"batch":{},"max_bytes":{max_bytes}}}"#,
            subjects.join(r#"",""#),
            subjects.len()
        )
    }

    /// Whether the server answers batched direct gets (2.11 or later).
    fn batched_gets(client: &async_nats::Client) -> bool {
        let version = client.server_info().version;
        let mut parts = version
            .split('.')
            .map(|part| part.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (2, 11)
    }

    /// One batched direct get: the messages it answers with, until its `204` (the end) or
    /// `404` (nothing more).
    async fn batched_get(
        client: &async_nats::Client,
        request: String,
    ) -> Result<Vec<jetstream::message::StreamMessage>, BoxError> {
        let inbox = client.new_inbox();
        // Dropped on return, which unsubscribes.
        let mut answers = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{STREAM}"),
                inbox,
                request.into(),
            )
            .await?;
        let mut messages = Vec::new();
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
                .await
                .map_err(|_| {
                    "a batched direct get had no end within 10 s (a server before 2.11 \
                     answers one message and no end: nats-server 2.11 or later needed)"
                })?
                .ok_or("the connection closed during a batched direct get")?;
            match answer.status.map(|status| status.as_u16()) {
                None => messages.push(jetstream::message::StreamMessage::try_from(answer)?),
                Some(204 | 404) => return Ok(messages),
                Some(status) => {
                    return Err(format!(
                        "a batched direct get answered {status} {} (nats-server 2.11 or later needed)",
                        answer.description.unwrap_or_default()
                    )
                    .into());
                }
            }
        }
    }

    /// Reads the recipient's messages by their own subjects; returns their seqs.
    async fn drain_keyed(
        args: &Args,
        stream: &stream::Stream,
        recipient: usize,
    ) -> Result<Vec<u64>, BoxError> {
        let mut seqs = Vec::with_capacity(args.per_recipient);
        for index in 0..args.per_recipient {
            let message = stream
                .direct_get_last_for_subject(subject(Read::Keyed, recipient, index))
                .await?;
            check(args, recipient, index, &message.payload)?;
            seqs.push(message.sequence);
        }
        Ok(seqs)
    }

    /// Where the recipient's messages are to be read, in order: with `OwnedPaged` its full
    /// pages, then the records after the last; with `OwnedLog` its pages (the last may be
    /// shorter); otherwise each message's own subject.
    fn owned_subjects(args: &Args, recipient: usize, read: Read) -> Vec<String> {
        let pages = match read {
            Read::OwnedPaged => args.per_recipient / args.page_records,
            Read::OwnedLog => args.per_recipient.div_ceil(args.page_records),
            _ => 0,
        };
        let records = match read {
            Read::OwnedLog => args.per_recipient..args.per_recipient,
            _ => pages * args.page_records..args.per_recipient,
        };
        (0..pages)
            .map(|page| format!("u.{recipient}.p{page}"))
            .chain(records.map(|index| subject(read, recipient, index)))
            .collect()
    }

    /// Reads the recipient's sealed pages, then the records after the last; returns the
    /// seqs of what it read (pages and records).
    async fn drain_owned_paged(
        args: &Args,
        client: &async_nats::Client,
        stream: &stream::Stream,
        recipient: usize,
        read: Read,
    ) -> Result<Vec<u64>, BoxError> {
        let subjects = owned_subjects(args, recipient, read);
        let messages = if batched_gets(client) {
            let max_bytes = client.server_info().max_payload.max(1);
            let mut messages = Vec::with_capacity(subjects.len());
            for chunk in subjects.chunks(100) {
                messages.extend(batched_get(client, multi_last(chunk, max_bytes)).await?);
            }
            messages
        } else {
            let mut messages = Vec::with_capacity(subjects.len());
            for subject in &subjects {
                messages.push(stream.direct_get_last_for_subject(subject).await?);
            }
            messages
        };
        if messages.len() != subjects.len() {
            return Err(format!(
                "recipient {recipient}: {} of {} pages and records read",
                messages.len(),
                subjects.len()
            )
            .into());
        }
        let mut index = 0;
        for (message, subject) in messages.iter().zip(&subjects) {
            if message.subject.as_str() != subject {
                return Err(
                    format!("recipient {recipient}: {} for {subject}", message.subject).into(),
                );
            }
            if subject.contains(".p") {
                let mut page = &message.payload[..];
                while let Some((length, rest)) = page.split_first_chunk::<4>() {
                    let length = u32::from_be_bytes(*length) as usize;
                    let record = rest.get(..length).ok_or("a page cut short")?;
                    check(args, recipient, index, record)?;
                    index += 1;
                    page = &rest[length..];
                }
            } else {
                check(args, recipient, index, &message.payload)?;
                index += 1;
            }
        }
        if index != args.per_recipient {
            return Err(format!("recipient {recipient}: {index} records read").into());
        }
        Ok(messages.iter().map(|message| message.sequence).collect())
    }

    /// Reads the recipient's messages through an ordered consumer made for the purpose;
    /// returns their seqs.
    async fn drain_ordered(
        args: &Args,
        stream: &stream::Stream,
        recipient: usize,
    ) -> Result<Vec<u64>, BoxError> {
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("u.{recipient}"),
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut seqs = Vec::with_capacity(args.per_recipient);
        for index in 0..args.per_recipient {
            let message = messages.next().await.ok_or("the consumer ended")??;
            check(args, recipient, index, &message.payload)?;
            seqs.push(message.info()?.stream_sequence);
        }
        Ok(seqs)
    }

    async fn drain(
        args: Args,
        url: String,
        recipient: usize,
        handshakes: Handshakes,
    ) -> Result<(), BoxError> {
        let permit = handshakes.acquire().await?;
        let js = jetstream::new(async_nats::connect(&url).await?);
        drop(permit);
        let consumer: consumer::PullConsumer = js
            .get_consumer_from_stream(format!("r{recipient}"), STREAM)
            .await?;
        let mut received = 0;
        while received < args.per_recipient {
            let mut batch = consumer
                .fetch()
                .max_messages(args.per_recipient - received)
                .messages()
                .await?;
            let mut last = None;
            while let Some(message) = batch.next().await {
                let message = message?;
                check(&args, recipient, received, &message.payload)?;
                received += 1;
                last = Some(message);
            }
            // AckAll: acking the last acks the batch, as the chat client's `up_to` does.
            if let Some(last) = last {
                last.ack().await?;
            }
        }
        Ok(())
    }

    /// The `nats-paged` modes: what a backend keeping a recipient's records in
    /// pages would cost. Every write carries the queue's state (its size, not its logic);
    /// the rest of a backend is left out (no quotas, dedup or expiry, and each recipient
    /// has one writer here, so nothing else changes its pages).
    mod paged {
        use super::*;
        use async_nats::jetstream::context::Publish;
        use tokio::sync::{OwnedSemaphorePermit, mpsc};

        fn page_subject(recipient: usize, page: usize) -> String {
            format!("u.{recipient}.{page}")
        }

        /// Bytes a backend keeps with each record besides its body: its id (16), sent time (8) and
        /// expiry (8), as `NatsStorage` does. Written as zeros here, and skipped on reading.
        const ENVELOPE: usize = 32;

        /// A page: each record's body length (u32, little-endian), its envelope, its body.
        fn encode(records: &[impl AsRef<[u8]>]) -> bytes::Bytes {
            let mut out = Vec::with_capacity(
                records
                    .iter()
                    .map(|r| r.as_ref().len() + 4 + ENVELOPE)
                    .sum(),
            );
            for record in records.iter().map(AsRef::as_ref) {
                out.extend_from_slice(&(record.len() as u32).to_le_bytes());
                out.extend_from_slice(&[0; ENVELOPE]);
                out.extend_from_slice(record);
            }
            out.into()
        }

        /// A page's bodies.
        fn decode(mut page: &[u8]) -> Result<Vec<&[u8]>, BoxError> {
            let mut records = Vec::new();
            while !page.is_empty() {
                let (len, rest) = page.split_at_checked(4).ok_or("a page cut short")?;
                let len = u32::from_le_bytes(len.try_into()?) as usize;
                let (record, rest) = rest
                    .get(ENVELOPE..)
                    .and_then(|rest| rest.split_at_checked(len))
                    .ok_or("a page cut short")?;
                records.push(record);
                page = rest;
            }
            Ok(records)
        }

        /// Where the queue's state and open page live.
        #[derive(Clone, Copy, PartialEq)]
        pub enum Layout {
            /// A tail subject of their own; a full page is published to its own subject.
            Tail,
            /// The open page's subject; a pointer to it is written when a page fills.
            Open,
            /// As `Tail`, but a full page's publish is not waited for (see `writer`).
            Lazy,
        }

        /// One sender: each of its recipients has a writer task; a send is answered (its permit
        /// of the `--in-flight` window let go) once the page holding it is stored.
        pub async fn publish(
            args: Args,
            url: String,
            publisher: usize,
            layout: Layout,
        ) -> Result<(), BoxError> {
            let js = jetstream::new(async_nats::connect(&url).await?);
            let window = Arc::new(Semaphore::new(args.in_flight));
            let mut inboxes = Vec::new();
            let mut writers = Vec::new();
            for recipient in args.recipients_of(publisher) {
                let (tx, rx) = mpsc::unbounded_channel();
                inboxes.push((recipient, tx));
                writers.push(tokio::spawn(writer(
                    js.clone(),
                    recipient,
                    args.page_records,
                    layout,
                    rx,
                )));
            }
            for index in 0..args.per_recipient {
                for (recipient, inbox) in &inboxes {
                    let permit = window.clone().acquire_owned().await?;
                    let body = bytes::Bytes::from(args.body(*recipient, index));
                    inbox
                        .send((body, permit))
                        .map_err(|_| "a page writer stopped")?;
                }
            }
            drop(inboxes);
            join_all(writers).await
        }

        /// The tail's subject: the queue's state and its open page.
        fn tail_subject(recipient: usize) -> String {
            format!("u.{recipient}.t")
        }

        /// The queue's state as a backend would keep it beside the open page: sealed pages,
        /// then a few bytes per live record (a size and a delivery count, as `NatsStorage`'s
        /// meta keeps them). Only its length and the page count matter here.
        fn state(sealed: usize, live: usize) -> Vec<u8> {
            let mut state = (sealed as u64).to_le_bytes().to_vec();
            state.resize(24 + 3 * live, 0);
            state
        }

        /// A tail: the state's length (u32), the state, then the open page's records.
        fn encode_tail(state: &[u8], open: &[impl AsRef<[u8]>]) -> bytes::Bytes {
            let mut out = (state.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(state);
            out.extend_from_slice(&encode(open));
            out.into()
        }

        /// (sealed pages, the open page's records)
        fn decode_tail(tail: &[u8]) -> Result<(usize, Vec<&[u8]>), BoxError> {
            let (len, rest) = tail.split_at_checked(4).ok_or("a tail cut short")?;
            let len = u32::from_le_bytes(len.try_into()?) as usize;
            let (state, records) = rest.split_at_checked(len).ok_or("a tail cut short")?;
            let sealed = u64::from_le_bytes(state.get(..8).ok_or("no state")?.try_into()?);
            Ok((sealed as usize, decode(records)?))
        }

        fn head_subject(recipient: usize) -> String {
            format!("u.{recipient}.h")
        }

        /// Appends a recipient's records: every record waiting when the last write was
        /// answered goes into the next one. A write is one compare-and-set of the message that
        /// holds the state and the open page. When the open page is full, the next write
        /// first seals it: `Layout::Tail` publishes it to a subject of its own and waits;
        /// `Layout::Open` leaves it where it is, starts the next page (its first write expects
        /// the subject empty) and writes the pointer to it without waiting. `Layout::Lazy`
        /// publishes each full page without waiting and keeps its records in the tail (so the
        /// tail may hold more than a page) until that publish is answered; the next tail write
        /// after it drops them and counts the page sealed.
        async fn writer(
            js: jetstream::Context,
            recipient: usize,
            page_records: usize,
            layout: Layout,
            mut inbox: mpsc::UnboundedReceiver<(bytes::Bytes, OwnedSemaphorePermit)>,
        ) -> Result<(), BoxError> {
            let (mut sealed, mut open, mut live, mut holder_seq) = (0, Vec::new(), 0, 0u64);
            let mut pointers = Vec::new();
            // `Layout::Lazy`: pages published (sealed or not), and the publishes not yet
            // taken into account, oldest first.
            let mut published = 0;
            let mut seals = std::collections::VecDeque::new();
            while let Some(first) = inbox.recv().await {
                let mut waiting = vec![first];
                while let Ok(next) = inbox.try_recv() {
                    waiting.push(next);
                }
                let mut waiting = waiting.into_iter().peekable();
                while waiting.peek().is_some() {
                    if layout != Layout::Lazy && open.len() == page_records {
                        match layout {
                            Layout::Tail => {
                                js.send_publish(
                                    page_subject(recipient, sealed),
                                    Publish::build()
                                        .payload(encode(&open))
                                        .expected_last_subject_sequence(0),
                                )
                                .await?
                                .await?;
                            }
                            Layout::Open => {
                                holder_seq = 0;
                                let pointer = js
                                    .publish(
                                        head_subject(recipient),
                                        (sealed as u64 + 1).to_le_bytes().to_vec().into(),
                                    )
                                    .await?;
                                pointers.push(tokio::spawn(pointer.into_future()));
                            }
                            Layout::Lazy => unreachable!(),
                        }
                        sealed += 1;
                        open.clear();
                    }
                    if layout == Layout::Lazy {
                        // Pages whose publish is answered leave the tail, in order; a tail
                        // four pages long waits for its oldest.
                        while seals
                            .front()
                            .is_some_and(|seal: &tokio::task::JoinHandle<_>| {
                                seal.is_finished() || open.len() >= 4 * page_records
                            })
                        {
                            seals.pop_front().expect("looked at").await??;
                            open.drain(..page_records);
                            sealed += 1;
                        }
                    }
                    let mut answered = Vec::new();
                    while (layout == Layout::Lazy || open.len() < page_records)
                        && let Some((body, permit)) = waiting.next()
                    {
                        open.push(body);
                        answered.push(permit);
                    }
                    live += answered.len();
                    if layout == Layout::Lazy {
                        while (published + 1 - sealed) * page_records <= open.len() {
                            let from = (published - sealed) * page_records;
                            let page = js
                                .send_publish(
                                    page_subject(recipient, published),
                                    Publish::build()
                                        .payload(encode(&open[from..from + page_records]))
                                        .expected_last_subject_sequence(0),
                                )
                                .await?;
                            seals.push_back(tokio::spawn(page.into_future()));
                            published += 1;
                        }
                    }
                    let holder = match layout {
                        Layout::Tail | Layout::Lazy => tail_subject(recipient),
                        Layout::Open => page_subject(recipient, sealed),
                    };
                    let ack = js
                        .send_publish(
                            holder,
                            Publish::build()
                                .payload(encode_tail(&state(sealed, live), &open))
                                .expected_last_subject_sequence(holder_seq),
                        )
                        .await?
                        .await?;
                    holder_seq = ack.sequence;
                    drop(answered);
                }
            }
            for pointer in pointers {
                pointer.await??;
            }
            for seal in seals {
                seal.await??;
            }
            Ok(())
        }

        /// Reads a recipient's queue as a session would, then acks it all:
        /// 1. finds its state: the tail (`Layout::Tail`), or the pointer, the page it names and a
        ///    look one page on (`Layout::Open`, the state being in the open page);
        /// 2. per batch (100 records): gets the batch's sealed pages at once, writes the state
        ///    back by compare-and-set (the batch's delivery counts, and the previous batch's
        ///    ack, which rides on this read) while the previous batch's pages are removed,
        ///    then checks every record; the open page's records come last;
        /// 3. writes the state back once more for the last batch's ack, while its pages are
        ///    removed (`--nats-ack none`: no removals, no ack writes).
        pub async fn drain(
            args: &Args,
            js: &jetstream::Context,
            stream: &stream::Stream,
            recipient: usize,
            layout: Layout,
        ) -> Result<(), BoxError> {
            use async_nats::jetstream::stream::DirectGetErrorKind;
            if !matches!(args.nats_ack.as_str(), "purge" | "delete" | "none") {
                return Err(format!("--nats-ack: unknown {:?}", args.nats_ack).into());
            }
            let found =
                |result: Result<jetstream::message::StreamMessage, stream::DirectGetError>| {
                    match result {
                        Ok(message) => Ok(Some(message)),
                        Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
                        Err(error) => Err(BoxError::from(error)),
                    }
                };
            // The message holding the state and the open page.
            let holder = match layout {
                Layout::Tail | Layout::Lazy => {
                    stream
                        .direct_get_last_for_subject(tail_subject(recipient))
                        .await?
                }
                Layout::Open => {
                    let pointer = found(
                        stream
                            .direct_get_last_for_subject(head_subject(recipient))
                            .await,
                    )?;
                    let mut page = match pointer {
                        Some(message) => {
                            u64::from_le_bytes(message.payload[..].try_into()?) as usize
                        }
                        None => 0,
                    };
                    let mut holder = stream
                        .direct_get_last_for_subject(page_subject(recipient, page))
                        .await?;
                    while let Some(next) = found(
                        stream
                            .direct_get_last_for_subject(page_subject(recipient, page + 1))
                            .await,
                    )? {
                        (holder, page) = (next, page + 1);
                    }
                    holder
                }
            };
            let holder_subject = holder.subject.to_string();
            let mut holder_seq = holder.sequence;
            let (sealed, open) = decode_tail(&holder.payload)?;
            let per_batch = 100usize.div_ceil(args.page_records);
            let acking = args.nats_ack != "none";
            let mut index = 0;
            let mut unremoved: Vec<jetstream::message::StreamMessage> = Vec::new();
            // The state write, with the removal of the pages an ack took, at once.
            #[allow(clippy::too_many_arguments)] // one call site each; a struct would only rename them
            async fn settle(
                args: &Args,
                js: &jetstream::Context,
                stream: &stream::Stream,
                subject: &str,
                expected: u64,
                payload: bytes::Bytes,
                acked: Vec<jetstream::message::StreamMessage>,
                also_purged: Vec<String>,
            ) -> Result<u64, BoxError> {
                let write = async {
                    let ack = js
                        .send_publish(
                            subject.to_string(),
                            Publish::build()
                                .payload(payload)
                                .expected_last_subject_sequence(expected),
                        )
                        .await?
                        .await?;
                    Ok::<_, BoxError>(ack.sequence)
                };
                let removals = futures::future::try_join_all(acked.iter().map(|page| async move {
                    if args.nats_ack == "purge" {
                        stream.purge().filter(page.subject.to_string()).await?;
                    } else {
                        stream.delete_message(page.sequence).await?;
                    }
                    Ok::<_, BoxError>(())
                }));
                let purges = futures::future::try_join_all(also_purged.into_iter().map(
                    |subject| async move {
                        stream.purge().filter(subject).await?;
                        Ok::<_, BoxError>(())
                    },
                ));
                let (seq, _, _) = futures::future::try_join3(write, removals, purges).await?;
                Ok(seq)
            }
            // Batches of `per_batch` pages over the sealed pages, then the open one.
            let mut first = 0;
            loop {
                let last = (first + per_batch).min(sealed + 1);
                let pages =
                    futures::future::try_join_all((first..last.min(sealed)).map(|page| {
                        stream.direct_get_last_for_subject(page_subject(recipient, page))
                    }))
                    .await?;
                let with_open = last > sealed;
                if acking {
                    // Live: everything not yet checked (the previous batches are acked).
                    holder_seq = settle(
                        args,
                        js,
                        stream,
                        &holder_subject,
                        holder_seq,
                        encode_tail(&state(sealed, args.per_recipient - index), &open),
                        std::mem::take(&mut unremoved),
                        Vec::new(),
                    )
                    .await?;
                }
                for page in &pages {
                    // An open layout's sealed page keeps the state it was last written with.
                    let records = match layout {
                        Layout::Tail | Layout::Lazy => decode(&page.payload)?,
                        Layout::Open => decode_tail(&page.payload)?.1,
                    };
                    for record in records {
                        check(args, recipient, index, record)?;
                        index += 1;
                    }
                }
                if with_open {
                    for &record in &open {
                        check(args, recipient, index, record)?;
                        index += 1;
                    }
                }
                unremoved = pages;
                if with_open {
                    break;
                }
                first = last;
            }
            if acking {
                settle(
                    args,
                    js,
                    stream,
                    &holder_subject,
                    holder_seq,
                    encode_tail(&state(sealed, 0), &[] as &[&[u8]]),
                    unremoved,
                    // `Layout::Lazy`: pages stored whose records the tail still held.
                    match layout {
                        Layout::Lazy => (sealed..sealed + open.len() / args.page_records)
                            .map(|page| page_subject(recipient, page))
                            .collect(),
                        _ => Vec::new(),
                    },
                )
                .await?;
            }
            if index != args.per_recipient {
                return Err(format!(
                    "recipient {recipient}: {index} records, not {}",
                    args.per_recipient
                )
                .into());
            }
            Ok(())
        }
    }
}
