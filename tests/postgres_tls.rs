//! `PostgresStorage` over TLS (`sslmode=require`, feature `postgres-tls`), against the local
//! server at `OFFLINE_QUEUE_POSTGRES_URL` with its TLS on (Debian's default: `ssl = on` with
//! the snakeoil certificate for `localhost`). Verified against that certificate it connects and
//! works, and the server says both the pool's and the wake-up listener's connections are
//! encrypted; against the public roots it is refused, naming the certificate; a PEM without a
//! certificate is refused before connecting.

#![cfg(all(feature = "postgres-tls", feature = "testing"))]

mod postgres_support;

use std::time::{Duration, Instant};

use offline_queue::storage::NewRecord;
use offline_queue::{
    Coordination, Error, MessageId, PostgresStorage, Quota, RecipientId, Storage, StorageExt,
};
use postgres_support::{SNAKEOIL, drop_schemas, raw, tls_url, unique_schema};

/// How many of the server's connections from `application` are encrypted, and how many not.
async fn encrypted(url: &str, application: &str) -> (i64, i64) {
    let row = raw(url)
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1 AND a.datname = current_database()",
            &[&application],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_tls_connects_and_every_connection_is_encrypted() {
    let Some((url, tls)) = tls_url().await else {
        return;
    };
    let schema = unique_schema("tls");
    let storage = PostgresStorage::options()
        .schema(&schema)
        .pool_size(2)
        .tls_root_certificates_pem(std::fs::read(SNAKEOIL).unwrap())
        .connect(&tls)
        .await
        .expect("connects over TLS");
    // Reading wake-ups starts the listener, on its own connection.
    let _wakeups = storage.wakeups();
    let bob = RecipientId::new("bob").unwrap();
    let now = offline_queue::Timestamp::now_system();
    let record = NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: None,
        body: b"over tls".to_vec(),
    };
    storage
        .append(&bob, vec![record], &Quota::UNLIMITED, now)
        .await
        .unwrap();
    let read = storage.read_all(&bob, now).await.unwrap();
    assert_eq!(read[0].body.as_ref(), b"over tls");

    // Other tests' storages connect in the clear under the same name: ours are the
    // encrypted ones. The listener connects in the background; wait for it, bounded.
    let (pool, _) = encrypted(&url, "offline-queue").await;
    assert!(pool > 0, "no encrypted pool connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (listener, _) = encrypted(&url, "offline-queue wake-up listener").await;
        if listener > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wake-up listener never connected over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_roots_do_not_vouch_for_is_refused() {
    let Some((_, tls)) = tls_url().await else {
        return;
    };
    let refused = PostgresStorage::options()
        .schema(unique_schema("tls_refused"))
        .connect(&tls)
        .await
        .expect_err("a self-signed certificate is not in Mozilla's roots");
    assert!(
        refused.to_string().contains("certificate"),
        "names the certificate: {refused}"
    );
    assert!(
        !refused.is_retryable(),
        "a refused certificate is refused again"
    );
}

#[tokio::test]
async fn root_certificates_that_do_not_parse_are_refused_before_connecting() {
    // Nothing listens here: the PEM is refused first.
    let url = "postgres://postgres@127.0.0.1:1/test?sslmode=require";
    let refused = PostgresStorage::options()
        .tls_root_certificates_pem(b"not a certificate".to_vec())
        .connect(url)
        .await
        .expect_err("no certificate");
    assert!(
        matches!(
            &refused,
            Error::InvalidConfig {
                field: "postgres tls root certificates",
                ..
            }
        ),
        "{refused:?}"
    );
}
