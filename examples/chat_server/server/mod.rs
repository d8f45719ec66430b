//! The chat server: flags, the engine's set-up, the HTTP routes, and graceful shutdown.

mod auth;
mod connection;
mod protocol;
mod push;
mod pushes;
mod webhook;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use offline_queue::{
    BatchLimit, Limits, MemoryStorage, NotifyPolicy, OfflineQueue, OfflineQueueBuilder, Overflow,
    RecipientId, RedbStorage,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use auth::{Auth, Credentials};
use push::Push;
use pushes::{LoggingNotifier, PushLog};
use webhook::Webhook;

/// A WebSocket chat server that holds messages for offline users.
#[derive(Clone, Debug, Parser)]
#[command(name = "chat_server")]
pub struct Config {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where messages wait: `redb:<path>` (durable, one file), `memory`, `redis://host:port`
    /// (several, comma separated, for a Redis Cluster; needs the `redis` feature),
    /// `postgres://user@host:port/db` (needs the `postgres` feature), `nats://host:port`
    /// (NATS JetStream; needs the `nats` feature) or `amqp://user:password@host:port/vhost`
    /// (RabbitMQ, a queue per user; needs the `amqp` feature). Redis, PostgreSQL, NATS and
    /// RabbitMQ are shared by every node that names them: each node delivers what any node
    /// stored.
    #[arg(long, default_value = "redb:offline-queue-data/chat.redb")]
    pub storage: String,
    /// With Redis storage: the prefix of every key, so several deployments can share a Redis.
    #[arg(long, default_value = "chat")]
    pub redis_prefix: String,
    /// With NATS storage: the name of its streams (`<name>`, `<name>_META`, `<name>_DEDUP`)
    /// and the first token of its subjects, so several deployments can share a server.
    #[arg(long, default_value = "CHAT")]
    pub nats_stream: String,
    /// With NATS storage: `shared` (`NatsStorage`: any node appends to any queue, each change
    /// a compare-and-set) or `owned` (`OwnedNatsStorage`: each queue has one owner node, the
    /// others forward to it; streams `<name>_LOG`, `<name>_PAGES`, `<name>_STATE`). The two
    /// keep different streams: every node of a deployment names the same layout.
    #[arg(long, default_value = "shared", value_parser = ["shared", "owned"])]
    pub nats_layout: String,
    /// With RabbitMQ storage: the start of every queue's name (`<prefix>.<user id in hex>`)
    /// and of the wake-up exchange (`<prefix>.wake`), so several deployments can share a
    /// virtual host.
    #[arg(long, default_value = "chat")]
    pub amqp_prefix: String,
    /// With PostgreSQL storage: the schema the queues live in.
    #[arg(long, default_value = "chat")]
    pub postgres_schema: String,
    /// With PostgreSQL storage over TLS (`?sslmode=require` in the URL, built with the
    /// `postgres-tls` feature): a PEM file of the certificates to trust (a private CA, or the
    /// server's own) in place of the public roots.
    #[arg(long)]
    pub postgres_tls_roots: Option<std::path::PathBuf>,
    /// With Redis storage: this node's id among the nodes (default: random).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Largest stored message in bytes (sender, text and framing).
    #[arg(long, default_value_t = 65536)]
    pub max_message_bytes: usize,
    /// Most messages waiting per recipient; a send beyond it gets `queue_full`.
    #[arg(long, default_value_t = 10_000)]
    pub max_pending: u64,
    /// TTL of a message sent without `ttl_secs`.
    #[arg(long, default_value_t = 604_800)]
    pub default_ttl_secs: u64,
    /// Most messages per `deliver` frame.
    #[arg(long, default_value_t = 100)]
    pub batch_max: usize,
    /// POST a JSON nudge here when a message waits for an offline user (http:// only).
    #[arg(long)]
    pub notify_webhook: Option<String>,
    /// Web Push: a file holding the VAPID private key (base64url, as `web-push
    /// generate-vapid-keys` prints it). Needs `--push-web-subject`; built with `--features
    /// web-push` (or `push`). Pages get the public key from `GET /push/vapid-key`.
    #[arg(long)]
    pub push_web_vapid_key: Option<std::path::PathBuf>,
    /// Web Push: how push services reach you about your pushes, `mailto:` or `https:`.
    #[arg(long)]
    pub push_web_subject: Option<String>,
    /// FCM: the service account's JSON file from the Firebase console (`--features fcm`).
    #[arg(long)]
    pub push_fcm_account: Option<std::path::PathBuf>,
    /// FCM: another base URL than `https://fcm.googleapis.com` (a test double).
    #[arg(long)]
    pub push_fcm_endpoint: Option<String>,
    /// APNs: the token-signing key (`.p8`) from Apple's developer site (`--features apns`).
    /// Needs `--push-apns-key-id`, `--push-apns-team-id` and `--push-apns-bundle-id`.
    #[arg(long)]
    pub push_apns_key: Option<std::path::PathBuf>,
    /// APNs: the key's ten-character id.
    #[arg(long)]
    pub push_apns_key_id: Option<String>,
    /// APNs: your ten-character team id.
    #[arg(long)]
    pub push_apns_team_id: Option<String>,
    /// APNs: the app's bundle id (the push topic).
    #[arg(long)]
    pub push_apns_bundle_id: Option<String>,
    /// APNs: another base URL than production, e.g. `https://api.sandbox.push.apple.com` for
    /// development builds of the app.
    #[arg(long)]
    pub push_apns_endpoint: Option<String>,
    /// Push providers: a PEM file of certificates to trust in place of the public roots.
    #[arg(long)]
    pub push_roots: Option<std::path::PathBuf>,
    /// Web Push: send to `http://` endpoints, and to addresses and local names (refused
    /// otherwise, as a client chooses its endpoint). For a local test push service only.
    #[arg(long)]
    pub push_allow_http: bool,
    /// After a push, no further push for the same user for this long.
    #[arg(long, default_value_t = 60)]
    pub notify_cooldown_secs: u64,
    /// Wait before retrying a failed webhook call; doubles per retry, up to 10 s.
    #[arg(long, default_value_t = 500)]
    pub notify_retry_ms: u64,
    /// How often expired messages are purged and delayed pushes sent.
    #[arg(long, default_value_t = 1000)]
    pub maintain_interval_ms: u64,
    /// A connection that sends nothing (not even a pong to the server's pings) for this long
    /// is closed, so a vanished client does not keep its user "online" and unpushed.
    #[arg(long, default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Sends one connection may have unanswered at once; past it the server stops reading
    /// that socket until one is answered.
    #[arg(long, default_value_t = 256)]
    pub max_sends_in_flight: usize,
    /// The key that signs and checks users' tokens (HS256), at least 32 bytes. Prefer the
    /// environment variable, which `ps` does not show. Default: random at each start, so
    /// tokens do not outlive the process.
    #[arg(long, env = "CHAT_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Turn off `POST /login`, which issues tokens to holders of the key printed at start (the
    /// demo page's sign-in), when your own identity service issues the tokens.
    #[arg(long)]
    pub no_login: bool,
    /// Lifetime of a token issued by `POST /login`.
    #[arg(long, default_value_t = 86_400)]
    pub token_ttl_secs: u64,
    /// INSECURE, for local play only: believe `?user=` without a token, so anyone who reaches
    /// the port can read and ack any user's messages.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

impl Config {
    /// Checks the numeric flags, naming the flag that is out of range.
    fn validate(&self) -> Result<(), String> {
        let max_ttl_secs = Limits::default().max_ttl.as_secs();
        let checks = [
            (
                "--max-message-bytes",
                self.max_message_bytes as u64,
                1,
                16 << 20,
            ),
            ("--max-pending", self.max_pending, 1, u64::MAX),
            ("--token-ttl-secs", self.token_ttl_secs, 1, 365 * 86_400),
            ("--default-ttl-secs", self.default_ttl_secs, 1, max_ttl_secs),
            ("--batch-max", self.batch_max as u64, 1, 10_000),
            ("--idle-timeout-ms", self.idle_timeout_ms, 100, u64::MAX),
            (
                "--max-sends-in-flight",
                self.max_sends_in_flight as u64,
                1,
                65_536,
            ),
            (
                "--maintain-interval-ms",
                self.maintain_interval_ms,
                1,
                u64::MAX,
            ),
        ];
        for (flag, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(format!("{flag} {value}: must be between {min} and {max}"));
            }
        }
        if self.no_login && self.auth_secret.is_none() && !self.insecure_no_auth {
            return Err(
                "--no-login needs --auth-secret (or CHAT_AUTH_SECRET): with a random secret and \
                 no login, no token could ever be valid"
                    .into(),
            );
        }
        if let Some(secret) = &self.auth_secret
            && secret.len() < auth::MIN_SECRET_BYTES
        {
            return Err(format!(
                "--auth-secret (or CHAT_AUTH_SECRET): {} bytes; must be at least {}",
                secret.len(),
                auth::MIN_SECRET_BYTES
            ));
        }
        Ok(())
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub struct App {
    queue: OfflineQueue,
    /// Turns true when the server is shutting down; connections then close their sessions.
    shutdown: watch::Receiver<bool>,
    /// Each live connection holds a clone; shutdown waits until all are dropped.
    #[expect(dead_code, reason = "held, never read")]
    connections: mpsc::Sender<()>,
    limits: connection::Limits,
    auth: Arc<Auth>,
    /// The pushes made, for `GET /pushes`.
    pushes: Arc<PushLog>,
    /// The push providers on, and the devices registered.
    push: Arc<Push>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens the storage named by `--storage` and sets it on the builder.
async fn with_storage(
    builder: OfflineQueueBuilder,
    config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    let spec = config.storage.as_str();
    if spec == "memory" {
        return Ok(builder.storage(Arc::new(MemoryStorage::new())));
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        return Ok(builder.storage(Arc::new(RedbStorage::open(path)?)));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        return with_redis(builder, spec, config).await;
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        return with_postgres(builder, spec, config).await;
    }
    if spec.starts_with("nats://") {
        return with_nats(builder, spec, config).await;
    }
    if spec.starts_with("amqp://") || spec.starts_with("amqps://") {
        return with_amqp(builder, spec, config).await;
    }
    Err(format!(
        "--storage {spec:?}: expected redb:<path>, memory, redis://.., postgres://.., nats://.. \
         or amqp://.."
    )
    .into())
}

/// Several nodes share one RabbitMQ virtual host: a queue per user, and each node binds its
/// own queue on the wake-up exchange for the users connected to it. RabbitMQ is both the
/// storage and the coordination between the nodes.
#[cfg(feature = "amqp")]
async fn with_amqp(
    builder: OfflineQueueBuilder,
    spec: &str,
    config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    let storage = offline_queue::AmqpStorage::options()
        .prefix(config.amqp_prefix.clone())
        .connect(spec)
        .await?;
    Ok(builder.shared_storage(Arc::new(storage)))
}

#[cfg(not(feature = "amqp"))]
async fn with_amqp(
    _builder: OfflineQueueBuilder,
    _spec: &str,
    _config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    Err("--storage amqp://: built without the `amqp` feature (cargo run --features amqp --example chat_server)".into())
}

/// Several nodes share one NATS JetStream: the queues in its streams, and the nodes find and
/// wake each other over core NATS (a subscription per connected user, a request per send).
#[cfg(feature = "nats")]
async fn with_nats(
    builder: OfflineQueueBuilder,
    spec: &str,
    config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    let name = config.nats_stream.as_str();
    let options = offline_queue::NatsStorage::options()
        .stream(name)
        .prefix(name);
    let storage: Arc<dyn offline_queue::Storage> = if config.nats_layout == "owned" {
        Arc::new(options.connect_owned(spec).await?)
    } else {
        Arc::new(options.connect(spec).await?)
    };
    let coordination = offline_queue::NatsCoordination::options()
        .prefix(name)
        .connect(spec)
        .await?;
    Ok(builder
        .storage(storage)
        .coordination(Arc::new(coordination)))
}

#[cfg(not(feature = "nats"))]
async fn with_nats(
    _builder: OfflineQueueBuilder,
    _spec: &str,
    _config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    Err("--storage nats://: built without the `nats` feature (cargo run --features nats --example chat_server)".into())
}

/// Several nodes share one PostgreSQL schema: each delivers to its own sessions and is woken
/// (LISTEN/NOTIFY) when another node stores for them. PostgreSQL is both the storage and the
/// coordination between the nodes.
#[cfg(feature = "postgres")]
async fn with_postgres(
    builder: OfflineQueueBuilder,
    spec: &str,
    config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    let mut options =
        offline_queue::PostgresStorage::options().schema(config.postgres_schema.clone());
    if let Some(path) = &config.postgres_tls_roots {
        let pem = std::fs::read(path)
            .map_err(|e| format!("--postgres-tls-roots {}: {e}", path.display()))?;
        options = options.tls_root_certificates_pem(pem);
    }
    let storage = options.connect(spec).await?;
    Ok(builder.shared_storage(Arc::new(storage)))
}

#[cfg(not(feature = "postgres"))]
async fn with_postgres(
    _builder: OfflineQueueBuilder,
    _spec: &str,
    _config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    Err("--storage postgres://: built without the `postgres` feature (cargo run --features postgres --example chat_server)".into())
}

/// Several nodes share one Redis (or one cluster: several URLs, comma separated): each
/// delivers to its own sessions and is woken when another node stores for them. Redis is
/// both the storage and the coordination between the nodes.
#[cfg(feature = "redis")]
async fn with_redis(
    builder: OfflineQueueBuilder,
    spec: &str,
    config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    let mut options = offline_queue::RedisStorage::options().prefix(config.redis_prefix.clone());
    if let Some(node) = &config.node_id {
        options = options.node_id(node.clone());
    }
    let urls: Vec<&str> = spec.split(',').map(str::trim).collect();
    let storage = match urls.as_slice() {
        [one] => options.connect(one).await?,
        many => options.connect_cluster(many).await?,
    };
    Ok(builder.shared_storage(Arc::new(storage)))
}

#[cfg(not(feature = "redis"))]
async fn with_redis(
    _builder: OfflineQueueBuilder,
    _spec: &str,
    _config: &Config,
) -> Result<OfflineQueueBuilder, BoxError> {
    Err("--storage redis://: built without the `redis` feature (cargo run --features redis --example chat_server)".into())
}

/// Builds the engine from the flags. The webhook task, if any, ends when the engine is dropped.
/// The engine and what runs beside it.
struct Engine {
    queue: OfflineQueue,
    /// Posts pushes; ends after the engine is dropped.
    webhook_task: Option<tokio::task::JoinHandle<()>>,
    /// Sends pushes through the providers; ends after the engine is dropped.
    push_task: Option<tokio::task::JoinHandle<()>>,
    /// Every push the engine made.
    pushes: Arc<PushLog>,
    /// The push providers on, and the devices registered.
    push: Arc<Push>,
}

async fn build_queue(config: &Config) -> Result<Engine, BoxError> {
    let limits = Limits {
        max_message_bytes: config.max_message_bytes,
        max_messages_per_recipient: config.max_pending,
        overflow: Overflow::Reject,
        default_ttl: Some(Duration::from_secs(config.default_ttl_secs)),
        ..Limits::default()
    };
    let policy = NotifyPolicy {
        urgent_cooldown: Duration::from_secs(config.notify_cooldown_secs),
        ..NotifyPolicy::default()
    };
    let mut builder = with_storage(OfflineQueue::builder(), config)
        .await?
        .limits(limits)
        .batch(BatchLimit {
            max_messages: config.batch_max,
            ..BatchLimit::default()
        })
        .notify_policy(policy);
    let (mut webhook, mut webhook_task) = (None, None);
    if let Some(url) = &config.notify_webhook {
        let (notifier, task) =
            Webhook::new(url, Duration::from_millis(config.notify_retry_ms))?.start();
        webhook = Some(notifier);
        webhook_task = Some(task);
    }
    let (push, push_notifier) = Push::start(config)?;
    let (push_notifier, push_task) = push_notifier.unzip();
    let pushes = Arc::new(PushLog::default());
    builder = builder.notifier(Arc::new(LoggingNotifier {
        log: pushes.clone(),
        webhook,
        push: push_notifier,
    }));
    Ok(Engine {
        queue: builder.build()?,
        webhook_task,
        push_task,
        pushes,
        push: Arc::new(push),
    })
}

/// Opens the storage, binds `--listen`, and serves until SIGINT or SIGTERM. The address is
/// printed only once the server is ready for both traffic and a stop signal: tests and scripts
/// wait for that line.
pub async fn run(config: Config) -> Result<(), BoxError> {
    config.validate()?;
    let Engine {
        queue,
        webhook_task,
        push_task,
        pushes,
        push,
    } = build_queue(&config).await?;
    // With a storage shared by several nodes, another node's sends wake this node's sessions
    // (on one node alone, the listener ends at once).
    tokio::spawn(queue.wakeup_listener());
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let stop = stop_signal()?;
    let auth = Auth::new(
        match &config.auth_secret {
            // Open mode signs with a secret of its own: its `/login`, open to anyone, must not
            // mint tokens that another node sharing `--auth-secret` would accept.
            Some(secret) if !config.insecure_no_auth => secret.clone().into_bytes(),
            _ => auth::random_hex(32).into_bytes(),
        },
        !config.no_login,
        Duration::from_secs(config.token_ttl_secs),
        config.insecure_no_auth,
    );
    let addr = listener.local_addr()?;
    if config.insecure_no_auth {
        tracing::warn!(
            "--insecure-no-auth: NO AUTHENTICATION. Anyone who reaches {addr} can read and \
             ack any user's messages with /ws?user=<id>. For local play only."
        );
        println!("page: http://{addr}/");
    } else if let Some(key) = auth.login_key() {
        // The key rides in the fragment, which browsers never send to the server or in a
        // Referer: only who reads this line can sign in on the page.
        println!("page: http://{addr}/#login={key}");
    }
    println!("listening on http://{addr}");
    serve(&config, queue, listener, stop, auth, pushes, push).await?;
    // Pushes already queued get their chance; bounded, so shutdown cannot hang on them.
    for task in [webhook_task, push_task].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

/// Installs the handlers now; the future resolves on the first SIGINT (Ctrl-C) or SIGTERM.
fn stop_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Serves on `listener` until `stop` resolves, then shuts down gracefully: stops accepting,
/// closes every session (what was delivered and not acked stays stored), waits for the
/// connections to finish, and closes the storage.
async fn serve(
    config: &Config,
    queue: OfflineQueue,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
    auth: Auth,
    pushes: Arc<PushLog>,
    push: Arc<Push>,
) -> Result<(), BoxError> {
    let login = !config.no_login;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (connections, mut all_closed) = mpsc::channel(1);
    let app = App {
        queue: queue.clone(),
        shutdown,
        connections,
        limits: connection::Limits {
            // JSON escaping can make a body up to six times longer on the wire.
            max_frame_bytes: config.max_message_bytes.saturating_mul(6) + 4096,
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            max_sends_in_flight: config.max_sends_in_flight,
        },
        auth: Arc::new(auth),
        pushes,
        push,
    };
    // Purges expired messages and sends the delayed pushes for sessions that ended with
    // messages pending: the engine has no timers of its own, the host runs its upkeep (work
    // per call bounded by the budget; it goes on at once while more is due).
    let maintenance = tokio::spawn(
        queue.background_maintenance(Duration::from_millis(config.maintain_interval_ms), 10_000)?,
    );

    let mut router = Router::new()
        .route("/", get(page))
        .route("/ws", get(websocket))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/pushes", get(recent_pushes))
        .route("/push/vapid-key", get(vapid_key));
    if login {
        router = router.route("/login", post(login_user));
    }
    let router = router.with_state(app.clone());
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stop.await;
            tracing::info!("shutting down");
            let _ = shutdown_tx.send(true);
        })
        .await?;

    // Upgraded WebSockets are not tracked by the HTTP server; wait for them here.
    drop(app);
    if tokio::time::timeout(Duration::from_secs(10), all_closed.recv())
        .await
        .is_err()
    {
        // Nothing is at risk: every `sent` was answered after its message was durable.
        tracing::warn!("connections still open after 10 s; exiting without them");
    }
    maintenance.abort();
    // Its future (which may hold the engine mid-call) is dropped before the engine is.
    let _ = maintenance.await;
    // The last handle closes the storage, which joins redb's writer thread: off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(queue)).await;
    Ok(())
}

/// What one socket read reserves; frames larger than this still arrive, over several reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// `GET /ws?token=<token>`: upgrades to the chat protocol, as the token's user. A request
/// without a valid token gets 401 and no socket: nothing is read or acked.
async fn websocket(
    upgrade: WebSocketUpgrade,
    Query(credentials): Query<Credentials>,
    headers: HeaderMap,
    State(app): State<App>,
) -> Response {
    let user = match app.auth.authenticate(&credentials, &headers) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    if *app.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    // `app` holds a clone of `connections` until the connection ends: shutdown waits for it.
    upgrade
        .max_message_size(app.limits.max_frame_bytes)
        .max_frame_size(app.limits.max_frame_bytes)
        // Each socket read reserves this much (zeroed) and hands it on with the frames read:
        // 128 KiB, the default, is above malloc's mmap threshold, so every read paid for fresh
        // pages (a fault and a clear each), a sixth of the server's time under load.
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| connection::serve(socket, user, app))
}

/// `GET /stats?token=<token>`: what waits for the token's user, for the page's status line.
async fn stats(
    Query(credentials): Query<Credentials>,
    headers: HeaderMap,
    State(app): State<App>,
) -> Response {
    let user = match app.auth.authenticate(&credentials, &headers) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    // On this node, or on another sharing the storage.
    let online = app.queue.is_online_anywhere(&user).await.unwrap_or(false);
    match app.queue.stats(&user).await {
        Ok(stats) => axum::Json(serde_json::json!({
            "user": String::from_utf8_lossy(user.as_bytes()),
            "online": online,
            "pending": stats.messages,
            "bytes": stats.bytes,
        }))
        .into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response(),
    }
}

/// `GET /pushes?token=<token>`: the latest pushes made for the token's user (who, how many,
/// why, when: what their phone would show), for the page.
async fn recent_pushes(
    Query(credentials): Query<Credentials>,
    headers: HeaderMap,
    State(app): State<App>,
) -> Response {
    match app.auth.authenticate(&credentials, &headers) {
        Ok(user) => axum::Json(serde_json::json!({"pushes": app.pushes.for_recipient(&user)}))
            .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// `GET /push/vapid-key`: `{"public_key":"<base64url>"}`, the key a page subscribes with
/// (`pushManager.subscribe({applicationServerKey})`); 404 when Web Push is off.
async fn vapid_key(State(app): State<App>) -> Response {
    match app.push.vapid_public_key() {
        Some(key) => axum::Json(serde_json::json!({ "public_key": key })).into_response(),
        None => (StatusCode::NOT_FOUND, "web push is off\n").into_response(),
    }
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

/// `POST /login` with `{"user":"<id>"}` and `Authorization: Bearer <login key>`: a token for
/// that user. The demo page's sign-in; `--no-login` removes it.
async fn login_user(
    headers: HeaderMap,
    State(app): State<App>,
    axum::Json(login): axum::Json<Login>,
) -> Response {
    if !app.auth.may_log_in(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "login needs the key printed at start: Authorization: Bearer <key>\n",
        )
            .into_response();
    }
    let user = match RecipientId::new(&login.user) {
        Ok(user) => user,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("user: {error}\n")).into_response(),
    };
    let (token, expires_at) = app.auth.issue(&user);
    axum::Json(serde_json::json!({
        "user": String::from_utf8_lossy(user.as_bytes()),
        "token": token,
        "expires_at": expires_at,
    }))
    .into_response()
}

/// `GET /metrics`: the engine's counters in Prometheus text format.
async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let mut text = String::new();
    for (name, help, value) in app.queue.metrics().iter_described() {
        let (kind, suffix) = if name == "live_sessions" {
            ("gauge", "")
        } else {
            ("counter", "_total")
        };
        let _ = writeln!(text, "# HELP offline_queue_{name}{suffix} {help}");
        let _ = writeln!(text, "# TYPE offline_queue_{name}{suffix} {kind}");
        let _ = writeln!(text, "offline_queue_{name}{suffix} {value}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// `GET /`: the demo page.
async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}
