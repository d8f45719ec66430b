//! The shared conformance suite against `PostgresStorage` (`OFFLINE_QUEUE_POSTGRES_URL`), each
//! check in a schema of its own, dropped afterwards; then what only this backend has: ids of
//! any bytes stored exactly, and the schema's version and ownership checks. Skipped, and says
//! so, when the variable is unset.

#![cfg(all(feature = "postgres", feature = "testing"))]

mod postgres_support;

use std::sync::Arc;

use offline_queue::storage::NewRecord;
use offline_queue::{
    Error, MessageId, PostgresStorage, Quota, RecipientId, Storage, StorageExt, Timestamp, testing,
};
use parking_lot::Mutex;
use postgres_support::{drop_schemas, fresh, raw, unique_schema, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_storage_passes_the_conformance_suite() {
    let Some(url) = url() else {
        return;
    };
    let schemas = Arc::new(Mutex::new(Vec::new()));
    testing::run_all(|| {
        let schema = unique_schema("conformance");
        schemas.lock().push(schema.clone());
        let url = url.clone();
        async move { Arc::new(fresh(&url, &schema).await) as Arc<dyn Storage> }
    })
    .await;
    let schemas = schemas.lock().clone();
    drop_schemas(&url, &schemas).await;
}

fn record(body: &[u8]) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: testing::T0,
        expires_at: None,
        body: body.to_vec(),
    }
}

/// Ids with quotes, backslashes, NUL, SQL and every byte value: each sees only its own
/// records, and the bytes stored for it are its exact bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_any_bytes_are_isolated_and_stored_exactly() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("ids");
    let storage = fresh(&url, &schema).await;
    let all_bytes: Vec<u8> = (0..=254u8).rev().collect();
    let raw_ids: Vec<Vec<u8>> = vec![
        b"'".to_vec(),
        b"''".to_vec(),
        b"a'; DROP TABLE oq_records; --".to_vec(),
        b"\"".to_vec(),
        b"\\".to_vec(),
        b"\\x00".to_vec(),
        b"\\'".to_vec(),
        b"\0".to_vec(),
        b"a\0".to_vec(),
        b"a\0b".to_vec(),
        b"$1".to_vec(),
        b"%".to_vec(),
        b"_".to_vec(),
        vec![0xff; 255],
        all_bytes.clone(),
        all_bytes[1..].to_vec(),
    ];
    assert_eq!(all_bytes.len(), 255);
    let ids: Vec<RecipientId> = raw_ids
        .iter()
        .map(|raw| RecipientId::new(raw).unwrap())
        .collect();
    for (i, who) in ids.iter().enumerate() {
        storage
            .append(
                who,
                vec![record(&[i as u8])],
                &Quota::UNLIMITED,
                testing::T0,
            )
            .await
            .unwrap();
    }
    for (i, who) in ids.iter().enumerate() {
        let read = storage.read_all(who, testing::T0).await.unwrap();
        let bodies: Vec<&[u8]> = read.iter().map(|r| &r.body[..]).collect();
        assert_eq!(bodies, [&[i as u8][..]], "id {i} sees only its own");
        assert_eq!(storage.stats(who).await.unwrap().messages, 1);
    }
    // The rows hold the ids' exact bytes, one row each.
    let client = raw(&url).await;
    let stored: Vec<Vec<u8>> = client
        .query(
            &format!("SELECT rid FROM \"{schema}\".oq_queues ORDER BY rid"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut expected = raw_ids.clone();
    expected.sort();
    assert_eq!(stored, expected, "stored exactly");
    // Removing one removes nothing of the others.
    assert_eq!(storage.remove_recipient(&ids[7]).await.unwrap(), 1);
    for (i, who) in ids.iter().enumerate() {
        let want = u64::from(i != 7);
        assert_eq!(storage.stats(who).await.unwrap().messages, want, "id {i}");
    }
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// A schema migrated by a later build (a higher version row) is refused, naming the version,
/// and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_version_is_refused() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("version");
    let storage = fresh(&url, &schema).await;
    let bob = RecipientId::new("bob").unwrap();
    storage
        .append(&bob, vec![record(b"kept")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    drop(storage);
    let client = raw(&url).await;
    client
        .execute(
            &format!("UPDATE \"{schema}\".oq_info SET value = '999' WHERE key = 'version'"),
            &[],
        )
        .await
        .unwrap();
    let err = PostgresStorage::options()
        .schema(&schema)
        .connect(&url)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("version 999") && message.contains(&schema),
        "{message}"
    );
    assert!(!err.is_retryable(), "{err:?}");
    let version: String = client
        .query_one(
            &format!("SELECT value FROM \"{schema}\".oq_info WHERE key = 'version'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, "999", "left untouched");
    // Set back, the same data reads again.
    client
        .execute(
            &format!("UPDATE \"{schema}\".oq_info SET value = '1' WHERE key = 'version'"),
            &[],
        )
        .await
        .unwrap();
    let storage = fresh(&url, &schema).await;
    let read = storage.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(&read[0].body[..], b"kept");
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// Another application's table of one of this crate's names is refused, naming it, and never
/// altered; so is an `oq_info` that is not ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_table_is_refused_and_left_alone() {
    let Some(url) = url() else {
        return;
    };
    let client = raw(&url).await;
    let schema = unique_schema("foreign");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\"; \
             CREATE TABLE \"{schema}\".oq_records (theirs text); \
             INSERT INTO \"{schema}\".oq_records VALUES ('their row');"
        ))
        .await
        .unwrap();
    let err = PostgresStorage::options()
        .schema(&schema)
        .connect(&url)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("oq_records"), "{err}");
    let columns: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'oq_records'",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(columns, ["theirs"], "their table is unchanged");
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "nothing of ours was created beside it");

    let other = unique_schema("foreign_info");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{other}\"; CREATE TABLE \"{other}\".oq_info (k int);"
        ))
        .await
        .unwrap();
    let err = PostgresStorage::options()
        .schema(&other)
        .connect(&url)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("oq_info"), "{err}");
    drop_schemas(&url, &[schema, other]).await;
}

/// Schema names are identifiers, checked before anything reaches the server.
#[tokio::test]
async fn schema_names_are_validated() {
    for bad in [
        "",
        "Upper",
        "a-b",
        "a\"b",
        "1abc",
        "pg_x",
        "a b",
        &"x".repeat(64),
    ] {
        let err = PostgresStorage::options()
            .schema(bad)
            .connect("postgres://nobody@127.0.0.1:1/none")
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let _ = Timestamp::from_millis(0);
}
