//! Where the PostgreSQL-backed tests find their server, and fresh storages on it, each in a
//! schema of its own that is dropped when the test is done with it.

#![allow(dead_code)]

use offline_queue::PostgresStorage;

// Each test binary that uses both Redis and PostgreSQL gets two copies: harmless (no state).
#[allow(clippy::duplicate_mod)]
#[path = "../skip_support/mod.rs"]
mod skip_support;

/// `OFFLINE_QUEUE_POSTGRES_URL`, or `None` after saying the test is skipped; fails instead
/// when `OFFLINE_QUEUE_REQUIRE_SERVERS=1` (as in CI), where a missing server is an error.
pub fn url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
                panic!(
                    "OFFLINE_QUEUE_POSTGRES_URL is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 \
                     requires its server"
                );
            }
            skip_support::record("OFFLINE_QUEUE_POSTGRES_URL is not set");
            None
        }
    }
}

/// A schema name no other run uses (lowercase, as the storage requires).
pub fn unique_schema(what: &str) -> String {
    format!(
        "oq_test_{what}_{}",
        offline_queue::MessageId::generate()
            .to_string()
            .to_lowercase()
    )
}

/// A storage in a new schema.
pub async fn fresh(url: &str, schema: &str) -> PostgresStorage {
    PostgresStorage::options()
        .schema(schema)
        .pool_size(4)
        .connect(url)
        .await
        .expect("postgres answers")
}

/// A plain connection, for what a test does around the storage.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("postgres answers");
    tokio::spawn(connection);
    client
}

/// Drops `schemas` and everything in them.
pub async fn drop_schemas(url: &str, schemas: &[String]) {
    let client = raw(url).await;
    for schema in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .expect("drop test schema");
    }
}

/// Debian's self-signed certificate, which its PostgreSQL serves by default.
pub const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// The test server's URL over TLS: the host its certificate names, `sslmode=require`. `None`
/// (the test skipped) without the server, its certificate, or its TLS; a failure instead under
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1`.
pub async fn tls_url() -> Option<(String, String)> {
    let url = url()?;
    if skip_support::program_missing(SNAKEOIL, "ssl-cert", ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1")) {
        return None;
    }
    let ssl: String = raw(&url)
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    if ssl != "on" {
        assert!(
            std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "the PostgreSQL at {url} has ssl = {ssl}"
        );
        skip_support::record("the test PostgreSQL has TLS off");
        return None;
    }
    let local = url.replace("@127.0.0.1:", "@localhost:");
    let separator = if local.contains('?') { '&' } else { '?' };
    Some((url, format!("{local}{separator}sslmode=require")))
}
