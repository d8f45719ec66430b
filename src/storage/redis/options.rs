//! Building a [`RedisStorage`]: the options, the connection to one server or a cluster, and
//! what is checked and loaded at connect (the function library, the wake-up subscription,
//! whether the server persists what it acknowledges).

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, Value};

use super::errors::{invalid_url, redis_error, unreachable_server};
use super::library::{Library, Steps};
use super::nodes::{Plumbing, run_node};
use super::{RedisStorage, Shared, keys, run_read};
use crate::error::{Error, Result};
use crate::limits::TTL_CEILING;
use crate::message::MessageId;

/// How to build a [`RedisStorage`]: `RedisStorage::options()`, then `connect` or
/// `connect_cluster`.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub(super) prefix: String,
    pub(super) node_id: Option<String>,
    pub(super) presence_ttl: Duration,
    pub(super) durable: Option<bool>,
    pub(super) track_total_bytes: bool,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "oq".into(),
            node_id: None,
            presence_ttl: Duration::from_secs(30),
            durable: None,
            track_total_bytes: false,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
        }
    }
}

impl RedisOptions {
    /// Prefix of every key (default `oq`); lets several queues share one Redis. No braces.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This node's id among the engines sharing the storage (default: random). Stable ids let
    /// a restarted node take its presence marks back at once.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// How long a node's presence mark outlives its last refresh: the longest a dead node
    /// can hold back pushes for its recipients. Default 30 s.
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl;
        self
    }

    /// Declares whether the server keeps every write it acknowledged across its own crash
    /// ([`Capabilities::durable`](crate::storage::Capabilities::durable)), instead of asking it. By default the storage asks at
    /// connect (`CONFIG GET appendonly`, every master of a cluster): durable only with the
    /// append-only file on. Set it for a server that refuses `CONFIG` (many managed ones), or
    /// to declare a replicated setup you trust.
    pub fn assume_durable(mut self, durable: bool) -> Self {
        self.durable = Some(durable);
        self
    }

    /// Keeps a storage-wide byte counter, which `Limits::max_total_bytes` needs. Costs one
    /// more command per append and ack. Default off; a quota with a global budget is refused
    /// without it.
    pub fn track_total_bytes(mut self, track: bool) -> Self {
        self.track_total_bytes = track;
        self
    }

    /// Bounds connecting, and each command once connected. Default 5 s each.
    pub fn timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    /// Connects to one Redis server (`redis://host:port/db`), through a connection manager
    /// that reconnects by itself.
    ///
    /// # Errors
    /// A URL that does not parse, or a server that does not answer: an [`Error::Storage`]
    /// naming the URL.
    pub async fn connect(self, url: &str) -> Result<RedisStorage> {
        let node = self.validate()?;
        let (pushes, plumbing) = Plumbing::new(&self.prefix, &node);
        let info = url
            .into_connection_info()
            .map_err(|e| invalid_url(url, e))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|e| invalid_url(url, e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(2)
            .set_push_sender(pushes)
            .set_automatic_resubscription();
        let manager = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| unreachable_server(url, e))?;
        RedisStorage::start(self, node, Connection::Single(manager), plumbing).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each).
    ///
    /// # Errors
    /// As [`RedisOptions::connect`], naming the URLs.
    pub async fn connect_cluster(self, urls: &[&str]) -> Result<RedisStorage> {
        let named = urls.join(",");
        let node = self.validate()?;
        let (pushes, plumbing) = Plumbing::new(&self.prefix, &node);
        let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            .push_sender(pushes)
            .build()
            .map_err(|e| invalid_url(&named, e))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| unreachable_server(&named, e))?;
        RedisStorage::start(self, node, Connection::Cluster(connection), plumbing).await
    }

    /// Checks the prefix and node id (no braces: they would break the hash tags) and the
    /// durations, and returns the node id.
    fn validate(&self) -> Result<String> {
        if self.prefix.contains(['{', '}']) || self.prefix.is_empty() {
            return Err(Error::InvalidConfig {
                field: "redis prefix",
                reason: format!("{:?} must be non-empty and without braces", self.prefix),
            });
        }
        let node = self
            .node_id
            .clone()
            .unwrap_or_else(|| MessageId::generate().to_string());
        if node.contains(['{', '}']) || node.is_empty() {
            return Err(Error::InvalidConfig {
                field: "redis node id",
                reason: format!("{node:?} must be non-empty and without braces"),
            });
        }
        if self.presence_ttl < Duration::from_millis(30) || self.presence_ttl > TTL_CEILING {
            return Err(Error::InvalidConfig {
                field: "redis presence_ttl",
                reason: format!(
                    "{:?} must be between 30 ms and {TTL_CEILING:?}",
                    self.presence_ttl
                ),
            });
        }
        Ok(node)
    }
}

/// A connection to one server (reconnecting) or to a cluster (following its slots).
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStorage {
    /// Whether the storage is on a cluster (where reads of a run go the ordinary way).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.shared.connection, Connection::Cluster(_))
    }

    /// Subscribes to this node's wake-up channel, loads the function library, learns whether
    /// the server is durable, and starts the node's background task.
    pub(super) async fn start(
        options: RedisOptions,
        node: String,
        mut connection: Connection,
        plumbing: Plumbing,
    ) -> Result<Self> {
        redis::cmd("SSUBSCRIBE")
            .arg(keys::wake_channel(&options.prefix, &node))
            .exec_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let library = Library::new();
        library.load(&mut connection).await.map_err(|error| {
            if error.code() == Some("ERR")
                && error
                    .detail()
                    .is_some_and(|d| d.contains("unknown command"))
            {
                Error::Storage {
                    message: format!(
                        "RedisStorage needs Redis 7.0 or later (it runs as a function \
                         library): {error}"
                    ),
                    retryable: false,
                    source: Some(Arc::new(error)),
                }
            } else {
                redis_error(error)
            }
        })?;
        let durable = match options.durable {
            Some(durable) => durable,
            None => appendonly_everywhere(&mut connection).await,
        };
        let shared = Arc::new(Shared {
            durable,
            connection,
            options,
            node,
            steps: Steps::new(&library),
            fronts: run_read::Fronts::default(),
            listeners: plumbing.listeners,
            next_bucket: AtomicU32::new(0),
            events: plumbing.events,
        });
        tokio::spawn(run_node(Arc::downgrade(&shared), plumbing.event_rx));
        Ok(Self { shared })
    }
}

/// True if the server (every master of a cluster) answers `CONFIG GET appendonly` with `yes`:
/// then a write it acknowledged is in its append-only file before the reply, and survives a
/// kill of the server. False when any says `no`, or when `CONFIG` is refused.
async fn appendonly_everywhere(connection: &mut Connection) -> bool {
    /// Every text in a reply, in order, however the client shaped it (a map, pairs, a map
    /// per node of a cluster).
    fn texts(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => out.push(s.clone()),
            Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| texts(v, out)),
            Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                texts(k, out);
                texts(v, out);
            }),
            _ => {}
        }
    }
    let mut ask = redis::cmd("CONFIG");
    ask.arg("GET").arg("appendonly");
    let reply: redis::RedisResult<Value> = match connection {
        Connection::Single(single) => ask.query_async(single).await,
        // Each master, not the one node a cluster client would pick: a map of answers.
        Connection::Cluster(cluster) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let every_master = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            cluster.route_command(ask, every_master).await
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) => {
            tracing::info!(%error, "CONFIG GET appendonly refused: the storage counts as not durable (see RedisOptions::assume_durable)");
            return false;
        }
    };
    let mut all = Vec::new();
    texts(&reply, &mut all);
    let answers: Vec<&String> = all
        .windows(2)
        .filter(|pair| pair[0].eq_ignore_ascii_case("appendonly"))
        .map(|pair| &pair[1])
        .collect();
    !answers.is_empty() && answers.iter().all(|a| a.eq_ignore_ascii_case("yes"))
}
