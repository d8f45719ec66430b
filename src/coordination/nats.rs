//! Nodes coordinated over core NATS: [`NatsCoordination`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::{Client, ConnectErrorKind, Event, RequestErrorKind, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::{Coordination, Listeners, Presence};
use crate::error::{Error, Result, Retry};
use crate::message::{MessageId, RecipientId};

/// The header naming the node that sent a request, so a node ignores its own.
const ORIGIN: &str = "Oq-Origin";
/// The header saying what a request is: [`WAKE`] or [`ASK`].
const KIND: &str = "Oq-Kind";
/// New messages: holders wake their sessions, and answer.
const WAKE: &str = "wake";
/// Only a question: holders answer, and do not wake.
const ASK: &str = "ask";

/// Wake-ups and presence over core NATS (feature `nats`), for nodes that share a storage.
///
/// Pair it with any storage that several nodes share:
///
/// ```no_run
/// use std::sync::Arc;
/// use offline_queue::{NatsCoordination, OfflineQueue, Storage};
///
/// // `storage`: what the nodes share (PostgreSQL, Redis, ...).
/// async fn start(storage: Arc<dyn Storage>) -> offline_queue::Result<OfflineQueue> {
///     let coordination = NatsCoordination::connect("nats://127.0.0.1:4222").await?;
///     let queue = OfflineQueue::builder()
///         .storage(storage)
///         .coordination(Arc::new(coordination))
///         .build()?;
///     // Wake-ups from the other nodes, for the sessions on this one.
///     tokio::spawn(queue.wakeup_listener());
///     Ok(queue)
/// }
/// ```
///
/// # How it maps onto NATS
/// - **Presence is subject interest.** A node that holds a session for recipient R subscribes
///   to `<prefix>.wake.<R in hex>` and unsubscribes when the session ends. Hex holds no `.`,
///   `*`, `>`, space or NUL, so no id, whatever its bytes, can name another subject.
/// - **[`announce`](Coordination::announce)** is a request on that subject. Every other node
///   holding R wakes its session and answers; the first answer means "live elsewhere". When
///   nobody holds R the server answers "no responders" at once, so a send to an offline
///   recipient, this crate's usual case, costs one round trip and waits for no timer.
/// - **[`live_elsewhere`](Coordination::live_elsewhere)** is the same request marked as a
///   question: holders answer and do not wake their sessions.
/// - **This node holds R too**: `announce` publishes the wake-up without waiting for answers,
///   and both calls answer `false` without asking. Its own subscription would count as
///   interest, so "no responders" could not come, and the engine does not need the answer: it
///   delivers here and sends no push.
///
/// # Why interest, and not presence entries with a lease
/// The plan in `docs/backends.md` kept presence in a JetStream KV bucket whose entries expire
/// with a lease. Interest does the same job with less: nothing is written when a session
/// starts, nothing is renewed while it lasts, and there is no bucket to create or size. The
/// server is the lease: it drops a connection's interest when the connection ends, which is at
/// once when a node's process dies (its socket closes), and within the server's ping window
/// (`ping_interval` × `ping_max`, 2 minutes × 2 by default) when its host or network does. In
/// that window a holder cannot answer: `announce` and `live_elsewhere` wait
/// [`request_timeout`](NatsCoordinationOptions::request_timeout) and fail with a retryable
/// error, which the engine logs and takes as "offline" (a push may go out). So does a request
/// that meets a subscription in the instant its session ends (the client has dropped it, the
/// server has not yet heard): rare, and the recipient is then offline on that node anyway.
///
/// # No wake-up is lost
/// - A new subscription counts only once the server has it. After subscribing, the node
///   publishes on its own control subject (`<prefix>.node.<node id>`); the server handles one
///   connection's commands in order, so when that message comes back, the subscription is in
///   place, and the session reads once more: anything stored between its first read and that
///   moment is found then.
/// - After the connection drops and comes back, the client subscribes again; a second probe
///   on the control subject, sent after those subscriptions, wakes every session this node
///   holds, so each reads what was stored while no wake-up could reach it.
/// - A new [`wakeups`](Coordination::wakeups) stream starts with every recipient this node
///   holds, since wake-ups before it existed went to no one.
///
/// Cheap to clone: clones share one connection and one set of subscriptions, which end when
/// the last clone is dropped.
#[derive(Clone)]
pub struct NatsCoordination {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    runtime: Handle,
    prefix: String,
    node: Arc<str>,
    control: String,
    request_timeout: Duration,
    listeners: Listeners,
    /// The recipients this node holds a session for, each with its subscription's task.
    held: Held,
    control_task: AbortHandle,
}

type Held = Arc<Mutex<HashMap<RecipientId, AbortHandle>>>;

impl Drop for Inner {
    fn drop(&mut self) {
        self.control_task.abort();
        for (_, task) in self.held.lock().drain() {
            task.abort();
        }
    }
}

/// Settings for [`NatsCoordination`]; from [`NatsCoordination::options`].
#[derive(Clone, Debug)]
pub struct NatsCoordinationOptions {
    prefix: String,
    request_timeout: Duration,
}

impl Default for NatsCoordinationOptions {
    fn default() -> Self {
        Self {
            prefix: "oq".to_owned(),
            request_timeout: Duration::from_millis(500),
        }
    }
}

impl NatsCoordinationOptions {
    /// The first tokens of every subject this coordination uses (default `oq`). Nodes that
    /// share a prefix wake each other; give each application its own. One or more tokens of
    /// ASCII letters, digits, `_` and `-`, joined by `.`, at most 64 bytes.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long `announce` and `live_elsewhere` wait for a holder's answer (default 500 ms,
    /// at most 60 s). Only a holder that cannot answer is waited for: one whose host died
    /// and which the server has not yet dropped. Nobody holding the recipient is known at
    /// once.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Connects to the server(s) at `url` (`nats://host:port`, several separated by commas,
    /// credentials in the URL as `nats://user:password@host`) and starts listening.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad prefix, timeout or URL; a retryable
    /// [`Error::Storage`] when no server answers.
    pub async fn connect(self, url: &str) -> Result<NatsCoordination> {
        check_prefix(&self.prefix)?;
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(60) {
            return Err(Error::InvalidConfig {
                field: "nats request_timeout",
                reason: format!(
                    "is {:?}; it must be above zero and at most 60 s",
                    self.request_timeout
                ),
            });
        }
        let (reconnects, reconnected) = mpsc::unbounded();
        let client = async_nats::ConnectOptions::new()
            .name("offline-queue coordination")
            .event_callback(move |event| {
                let reconnects = reconnects.clone();
                async move {
                    match event {
                        Event::Connected => {
                            let _ = reconnects.unbounded_send(());
                        }
                        Event::Disconnected => {
                            tracing::warn!("nats coordination disconnected; reconnecting");
                        }
                        _ => {}
                    }
                }
            })
            .connect(servers(url))
            .await
            .map_err(|error| connect_error(url, error))?;
        let node: Arc<str> = MessageId::generate().to_string().into();
        let control = format!("{}.node.{node}", self.prefix);
        let probes = client
            .subscribe(control.clone())
            .await
            .map_err(|error| Error::storage(Retry::Yes, error))?;
        let held = Held::default();
        let listeners = Listeners::default();
        let runtime = Handle::current();
        let control_task = runtime
            .spawn(watch_control(
                client.clone(),
                control.clone(),
                probes,
                reconnected,
                held.clone(),
                listeners.clone(),
            ))
            .abort_handle();
        Ok(NatsCoordination {
            inner: Arc::new(Inner {
                client,
                runtime,
                prefix: self.prefix,
                node,
                control,
                request_timeout: self.request_timeout,
                listeners,
                held,
                control_task,
            }),
        })
    }
}

impl NatsCoordination {
    /// Settings, to change before [`NatsCoordinationOptions::connect`].
    pub fn options() -> NatsCoordinationOptions {
        NatsCoordinationOptions::default()
    }

    /// Connects with the default settings; see [`NatsCoordinationOptions::connect`].
    ///
    /// # Errors
    /// As [`NatsCoordinationOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::options().connect(url).await
    }

    /// This node's id, random per coordination: the origin of its requests.
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The subject a recipient's holders subscribe to.
    fn subject(&self, recipient: &RecipientId) -> String {
        format!(
            "{}.wake.{}",
            self.inner.prefix,
            crate::hex::encode(recipient.as_bytes())
        )
    }

    fn headers(&self, kind: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, &*self.inner.node);
        headers.insert(KIND, kind);
        headers
    }

    fn holds(&self, recipient: &RecipientId) -> bool {
        self.inner.held.lock().contains_key(recipient)
    }

    /// A request on the recipient's subject: true if another node answered.
    async fn ask(&self, recipient: &RecipientId, kind: &'static str) -> Result<bool> {
        let request = async_nats::Request::new()
            .headers(self.headers(kind))
            .timeout(Some(self.inner.request_timeout));
        match self
            .inner
            .client
            .send_request(self.subject(recipient), request)
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == RequestErrorKind::NoResponders => Ok(false),
            Err(error) if error.kind() == RequestErrorKind::TimedOut => Err(Error::Storage {
                message: format!(
                    "nats: a node holding this recipient did not answer within {:?} (its host \
                     may have died; the server drops it within its ping window)",
                    self.inner.request_timeout
                ),
                retryable: true,
                source: Some(Arc::new(error)),
            }),
            Err(error) => Err(Error::storage(Retry::Yes, error)),
        }
    }
}

impl std::fmt::Debug for NatsCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCoordination")
            .field("prefix", &self.inner.prefix)
            .field("node", &self.inner.node)
            .field("held", &self.inner.held.lock().len())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Coordination for NatsCoordination {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        let held: Vec<RecipientId> = self.inner.held.lock().keys().cloned().collect();
        self.inner.listeners.subscribe_with(held).boxed()
    }

    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        let inner = &self.inner;
        let mut held = inner.held.lock();
        match presence {
            Presence::Connected => {
                if held.contains_key(recipient) {
                    return;
                }
                let task = inner.runtime.spawn(hold(
                    inner.client.clone(),
                    self.subject(recipient),
                    inner.control.clone(),
                    inner.node.clone(),
                    inner.listeners.clone(),
                    recipient.clone(),
                ));
                held.insert(recipient.clone(), task.abort_handle());
            }
            Presence::Disconnected => {
                // Aborting drops the subscription, which unsubscribes.
                if let Some(task) = held.remove(recipient) {
                    task.abort();
                }
            }
        }
    }

    async fn announce(&self, recipient: &RecipientId) -> Result<bool> {
        if self.holds(recipient) {
            self.inner
                .client
                .publish_with_headers(self.subject(recipient), self.headers(WAKE), Bytes::new())
                .await
                .map_err(|error| Error::storage(Retry::Yes, error))?;
            return Ok(false);
        }
        self.ask(recipient, WAKE).await
    }

    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool> {
        if self.holds(recipient) {
            return Ok(false);
        }
        self.ask(recipient, ASK).await
    }
}

/// Holds one recipient's subscription while this node holds a session for it: wakes the
/// session on another node's wake-up, and answers other nodes' requests.
async fn hold(
    client: Client,
    subject: String,
    control: String,
    node: Arc<str>,
    listeners: Listeners,
    recipient: RecipientId,
) {
    // Held until the session ends (which aborts this task): a failed subscribe is tried
    // again, or other nodes would take the recipient for offline.
    let mut backoff = Duration::from_millis(50);
    let mut requests = loop {
        match client.subscribe(subject.clone()).await {
            Ok(subscriber) => break subscriber,
            Err(error) => {
                tracing::warn!(%recipient, %error, "nats coordination could not subscribe; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    // Comes back once the server has the subscription (see [`NatsCoordination`]).
    let probe = Bytes::from(crate::hex::encode(recipient.as_bytes()));
    if let Err(error) = client.publish(control, probe).await {
        tracing::warn!(%recipient, %error, "nats coordination could not confirm a subscription");
    }
    while let Some(request) = requests.next().await {
        let header = |name| {
            request
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str())
        };
        if header(ORIGIN) == Some(&*node) {
            continue;
        }
        if header(KIND) != Some(ASK) {
            listeners.wake(&recipient);
        }
        if let Some(reply) = request.reply {
            let _ = client.publish(reply, Bytes::from(node.to_string())).await;
        }
    }
}

/// The control subject's messages, and reconnects: a probe naming a recipient confirms its
/// subscription; an empty one, sent after a reconnect, confirms them all.
async fn watch_control(
    client: Client,
    control: String,
    mut probes: Subscriber,
    mut reconnected: mpsc::UnboundedReceiver<()>,
    held: Held,
    listeners: Listeners,
) {
    loop {
        tokio::select! {
            Some(()) = reconnected.next() => {
                if let Err(error) = client.publish(control.clone(), Bytes::new()).await {
                    tracing::warn!(%error, "nats coordination could not probe after a reconnect");
                }
            }
            probe = probes.next() => {
                let Some(probe) = probe else { break };
                let woken: Vec<RecipientId> = if probe.payload.is_empty() {
                    held.lock().keys().cloned().collect()
                } else {
                    crate::hex::decode(&probe.payload[..])
                        .and_then(|bytes| RecipientId::new(bytes).ok())
                        .filter(|recipient| held.lock().contains_key(recipient))
                        .into_iter()
                        .collect()
                };
                for recipient in &woken {
                    listeners.wake(recipient);
                }
            }
        }
    }
}

pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    let token_ok = |token: &str| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if prefix.len() <= 64 && prefix.split('.').all(token_ok) {
        return Ok(());
    }
    Err(Error::InvalidConfig {
        field: "nats prefix",
        reason: format!(
            "{prefix:?} must be tokens of ASCII letters, digits, '_' and '-' joined by '.', at \
             most 64 bytes"
        ),
    })
}

/// The servers in `url`: one, or several separated by commas.
pub(crate) fn servers(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).collect()
}

pub(crate) fn connect_error(url: &str, error: async_nats::ConnectError) -> Error {
    match error.kind() {
        ConnectErrorKind::ServerParse => Error::InvalidConfig {
            field: "nats url",
            reason: format!("{url:?} does not parse: {error}"),
        },
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Error::Storage {
                message: format!("nats at {url} refused our credentials: {error}"),
                retryable: false,
                source: Some(Arc::new(error)),
            }
        }
        _ => Error::Storage {
            message: format!("nats at {url} does not answer: {error}"),
            retryable: true,
            source: Some(Arc::new(error)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::check_prefix;

    #[test]
    fn prefixes_are_plain_tokens() {
        for good in ["oq", "app-1.oq", "A_b.c-d.e"] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "oq.",
            ".oq",
            "o q",
            "oq.*",
            "oq.>",
            "o\0q",
            "é",
            &"a".repeat(65),
        ] {
            let error = check_prefix(bad).unwrap_err().to_string();
            assert!(error.contains("nats prefix"), "{bad:?}: {error}");
        }
    }
}
