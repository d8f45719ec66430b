//! Building a [`PostgresStorage`]: the options, the pool, and what is checked at connect (the
//! schema, whether commits are durable).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::errors::{describe, pg_error, pool_error};
use super::schema::{self, Statements};
use super::tls::Tls;
use super::{PostgresStorage, Shared, group_commit};
use crate::error::{Error, Result};

/// How to build a [`PostgresStorage`]: `PostgresStorage::options()`, then
/// [`connect`](PostgresOptions::connect).
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    pub(super) schema: String,
    pub(super) pool_size: usize,
    pub(super) synchronous_commit: bool,
    pub(super) connect_timeout: Duration,
    pub(super) wait_timeout: Duration,
    pub(super) max_group: usize,
    pub(super) presence_ttl: Duration,
    pub(super) tls_roots_pem: Option<Vec<u8>>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: "offline_queue".into(),
            pool_size: 16,
            synchronous_commit: true,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(10),
            max_group: 256,
            presence_ttl: Duration::from_secs(30),
            tls_roots_pem: None,
        }
    }
}

impl PostgresOptions {
    /// The schema holding the tables and functions (default `offline_queue`); created if
    /// missing. Lowercase ASCII letters, digits and underscores, at most 63 bytes, not
    /// starting with a digit or `pg_`. Several queues can share a database under different
    /// schemas. A schema holding another application's table of one of this crate's names
    /// (`oq_*`) is refused at connect, never altered.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Most connections the storage keeps open (default 16, at least 1). Each concurrent call
    /// holds one for its single round trip.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Whether each step's commit waits for its WAL to reach disk (`synchronous_commit`,
    /// default on, set on every connection whatever the server's default). Off, commits return
    /// before the flush: a crash of the PostgreSQL server (not of this process) can lose the
    /// last few hundred milliseconds of Ok'd sends, acks and purges (up to three times
    /// `wal_writer_delay`), though never corrupt the tables; the storage then reports itself
    /// not durable ([`Capabilities::durable`](crate::storage::Capabilities::durable)).
    pub fn synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }

    /// How long opening one connection may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a call waits for a free connection when all are busy (default 10 s); then it
    /// fails with a retryable error.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Most appends one commit carries (default 256; 1 turns group commit off). Concurrent
    /// appends on this node that wait for a connection at the same moment go together, in one
    /// transaction and one round trip, each answered once the group committed (see
    /// [`PostgresStorage::group_commit_counts`]). A group also stops at 4 MiB of bodies.
    pub fn max_group(mut self, appends: usize) -> Self {
        self.max_group = appends.max(1);
        self
    }

    /// How long a node's lease outlives its last renewal (renewed every third of it): the
    /// longest a node that died without ending its sessions still counts as holding them,
    /// holding back pushes for its recipients. Default 30 s; at least 3 ms.
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl.max(Duration::from_millis(3));
        self
    }

    /// Certificates (PEM: a private CA's, or a server's own self-signed one) trusted for TLS
    /// in place of Mozilla's roots. TLS is used when the URL says `sslmode=require`, with the
    /// `postgres-tls` feature; the server's certificate must then chain to one of these and
    /// name the host the URL connects to. A PEM without a usable certificate is refused at
    /// connect.
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots_pem = Some(pem.into());
        self
    }

    /// Connects to the PostgreSQL at `url` (`postgres://user:password@host:port/database`, or
    /// a `key=value` connection string), creates or migrates the schema, and asks whether
    /// commits are durable (`fsync` on and `synchronous_commit` not off). TCP or a Unix
    /// socket; over TLS when the URL says `sslmode=require` (feature `postgres-tls`, see
    /// [`tls_root_certificates_pem`](Self::tls_root_certificates_pem)), in the clear
    /// otherwise (`prefer` does not try TLS).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a URL or schema name that does not parse, a schema
    /// holding another application's `oq_*` table, `sslmode=require` without the
    /// `postgres-tls` feature, or root certificates that do not parse; [`Error::Storage`] for a server that does
    /// not answer (retryable) or a schema at a newer version than this build (not
    /// retryable).
    pub async fn connect(self, url: &str) -> Result<PostgresStorage> {
        let quoted = schema::validate(&self.schema)?;
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| Error::InvalidConfig {
                    field: "postgres url",
                    reason: format!("does not parse: {e}"),
                })?;
        let setting = if self.synchronous_commit { "on" } else { "off" };
        // Every statement the storage runs is meant to go through an index, and PL/pgSQL and
        // prepared statements keep their plans: one made while a drained table looked empty
        // (after a VACUUM) would scan the whole table once it has grown back, on every call.
        // Measured: appends 2.5x slower for the rest of a round after each `VACUUM`.
        let ours = format!("-c synchronous_commit={setting} -c enable_seqscan=off");
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {ours}"),
            _ => ours,
        };
        config
            .options(&options)
            .connect_timeout(self.connect_timeout)
            .application_name("offline-queue");
        // The wake-up listener's connection: keepalives find a silently dead peer in about a
        // minute, after which it connects again and every local session reads again.
        let mut listen_config = config.clone();
        listen_config
            .application_name("offline-queue wake-up listener")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        let tls = Tls::for_config(&config, self.tls_roots_pem.as_deref())?;
        let manager = tls.manager(
            config,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.wait_timeout))
            .create_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| Error::InvalidConfig {
                field: "postgres pool",
                reason: e.to_string(),
            })?;
        let mut client = pool.get().await.map_err(|e| {
            let mut error = pool_error(e);
            if let Error::Storage {
                message, retryable, ..
            } = &mut error
            {
                // Retryable: it did not answer (yet). Not: it answered and was refused.
                let what = if *retryable {
                    "does not answer"
                } else {
                    "refused the connection"
                };
                *message = format!("postgres for schema {:?} {what}: {message}", self.schema);
            }
            error
        })?;
        schema::prepare(&mut client, &self.schema, &quoted).await?;
        let durable = if self.synchronous_commit {
            let fsync: String = client
                .query_one("SHOW fsync", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            let commit: String = client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(|e| Error::storage_msg(crate::Retry::Yes, describe(&e)))?
                .get(0);
            fsync == "on" && commit != "off"
        } else {
            false
        };
        drop(client);
        let shared = Arc::new(Shared {
            node: crate::MessageId::generate().to_bytes(),
            channel: super::nodes::channel(&self.schema),
            presence_ttl: self.presence_ttl,
            live: Default::default(),
            listeners: Default::default(),
            config: listen_config,
            tls,
            statements: Statements::new(&quoted),
            purge_lock: schema::lock_key(&self.schema, "purge"),
            schema: self.schema,
            durable,
            counters: Default::default(),
        });
        let appends =
            group_commit::start(pool.clone(), shared.clone(), self.pool_size, self.max_group);
        let events = super::nodes::start(pool.clone(), shared.clone());
        Ok(PostgresStorage {
            shared,
            pool,
            appends,
            events,
        })
    }
}
