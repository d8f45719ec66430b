//! The shared conformance suite against `PostgresStorage` (`OFFLINE_QUEUE_POSTGRES_URL`), each
//! check in a schema of its own, dropped afterwards; then what only this backend has: ids of
//! any bytes stored exactly, and the schema's version and ownership checks. Skipped, and says
//! so, when the variable is unset.

#![cfg(all(feature = "postgres", feature = "testing"))]

mod postgres_support;

use std::sync::Arc;

use offline_queue::storage::NewRecord;
use offline_queue::{
    Error, MessageId, PostgresStorage, Quota, RecipientId, Storage, StorageExt, testing,
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

/// The delivery counts of `records`, in order.
fn counts(records: &[offline_queue::storage::StoredRecord]) -> Vec<u32> {
    records.iter().map(|r| r.delivery_count).collect()
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
    let current: String = client
        .query_one(
            &format!("SELECT value FROM \"{schema}\".oq_info WHERE key = 'version'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
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
            &format!("UPDATE \"{schema}\".oq_info SET value = $1 WHERE key = 'version'"),
            &[&current],
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

/// Schema names are identifiers, checked before anything reaches the server; a server that
/// does not answer is a retryable error.
#[tokio::test]
async fn schema_names_are_validated_and_an_absent_server_is_retryable() {
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
    let err = PostgresStorage::connect("postgres://nobody@127.0.0.1:1/none")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Storage { .. }) && err.is_retryable(),
        "{err:?}"
    );
    let err = PostgresStorage::connect("postgres://[nonsense")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}

/// Nodes starting together on a new schema: one creates it, the others find it ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_create_the_schema_once() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("together");
    let connects = (0..4).map(|_| fresh(&url, &schema));
    let storages = futures::future::join_all(connects).await;
    let bob = RecipientId::new("bob").unwrap();
    for storage in &storages {
        storage
            .append(&bob, vec![record(b"x")], &Quota::UNLIMITED, testing::T0)
            .await
            .unwrap();
    }
    assert_eq!(storages[0].stats(&bob).await.unwrap().messages, 4);
    drop(storages);
    drop_schemas(&url, &[schema]).await;
}

/// Appends (some under a storage-wide budget, some dropping the oldest), acks, session reads,
/// purges and removals from many connections at once: no step deadlocks or fails but by a
/// limit, and afterwards the byte counter, each queue's counts and the records agree exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_keep_the_counters_exact() {
    use std::time::Duration;

    use offline_queue::storage::Ack;
    use offline_queue::{BatchLimit, Overflow};

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("concurrent");
    let storage = Arc::new(
        PostgresStorage::options()
            .schema(&schema)
            .pool_size(8)
            .connect(&url)
            .await
            .unwrap(),
    );
    let who = |i: usize| RecipientId::new(format!("r{}", i % 5)).unwrap();
    let (stored, refused) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let tasks = (0..12usize).map(|task| {
        let storage = storage.clone();
        let (stored, refused) = (stored.clone(), refused.clone());
        tokio::spawn(async move {
            let mut last = std::collections::HashMap::new();
            for step in 0..40usize {
                let recipient = who(task + step);
                let now = testing::T0.saturating_add(Duration::from_millis(step as u64));
                let quota = Quota {
                    max_messages: 20,
                    max_bytes: 2_000,
                    overflow: if task % 2 == 0 {
                        Overflow::DropOldest
                    } else {
                        Overflow::Reject
                    },
                    max_total_bytes: (task % 3 == 0).then_some(5_000),
                    ..Quota::UNLIMITED
                };
                let mut expiring = record(&vec![task as u8; 10 + step]);
                if step % 4 == 0 {
                    expiring.expires_at = Some(now);
                }
                match storage
                    .append(&recipient, vec![record(&[1; 30]), expiring], &quota, now)
                    .await
                {
                    Ok(outcome) => {
                        stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let seq = outcome.records[1].seq();
                        if let Some(previous) = last.insert(recipient.clone(), seq) {
                            assert!(seq > previous, "seqs increase for one writer");
                        }
                    }
                    Err(Error::QueueFull { .. } | Error::StorageFull { .. }) => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(other) => panic!("append: {other:?}"),
                }
                match step % 5 {
                    0 => {
                        let read = storage
                            .read(&recipient, None, BatchLimit::default(), now)
                            .await
                            .unwrap();
                        if let Some(first) = read.records.first() {
                            let ack = Ack {
                                through: Some(first.seq),
                                passed_over: read.expired.clone(),
                                ..Ack::default()
                            };
                            storage
                                .read_for_delivery(
                                    &recipient,
                                    Some(&ack),
                                    None,
                                    BatchLimit::default(),
                                    now,
                                )
                                .await
                                .unwrap();
                        }
                    }
                    1 => {
                        storage.purge(now, Some(now), 7).await.unwrap();
                    }
                    2 if step % 20 == 2 => {
                        storage.remove_recipient(&recipient).await.unwrap();
                    }
                    _ => {}
                }
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let (stored, refused) = (
        stored.load(std::sync::atomic::Ordering::Relaxed),
        refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        stored > 0 && refused > 0,
        "{stored} stored, {refused} refused"
    );
    let client = raw(&url).await;
    let row = client
        .query_one(
            &format!(
                "WITH q AS (SELECT qu.live + coalesce(n.cum_count, 0) AS live, \
                     qu.bytes + coalesce(n.cum_bytes, 0) AS bytes \
                 FROM \"{schema}\".oq_queues qu LEFT JOIN LATERAL ( \
                     SELECT r.cum_count, r.cum_bytes FROM \"{schema}\".oq_records r \
                     WHERE r.rid = qu.rid AND r.seq > qu.folded ORDER BY r.seq DESC LIMIT 1 \
                 ) AS n ON true) \
                 SELECT (SELECT coalesce(sum(bytes), 0)::bigint FROM \"{schema}\".oq_bytes), \
                 (SELECT coalesce(sum(octet_length(body)), 0)::bigint FROM \"{schema}\".oq_records), \
                 (SELECT coalesce(sum(bytes), 0)::bigint FROM q), \
                 (SELECT count(*) FROM \"{schema}\".oq_records), \
                 (SELECT coalesce(sum(live), 0)::bigint FROM q)"
            ),
            &[],
        )
        .await
        .unwrap();
    let (counter, records, queues): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((counter, queues), (records, records), "bytes agree");
    let (count, live): (i64, i64) = (row.get(3), row.get(4));
    assert_eq!(count, live, "record counts agree");
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// With `synchronous_commit` on (the default) and a server that fsyncs, the storage says it
/// is durable; relaxed, it says it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_follows_synchronous_commit() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("durable");
    let fsync: String = raw(&url)
        .await
        .query_one("SHOW fsync", &[])
        .await
        .unwrap()
        .get(0);
    let storage = fresh(&url, &schema).await;
    assert_eq!(storage.capabilities().durable, fsync == "on");
    let relaxed = PostgresStorage::options()
        .schema(&schema)
        .synchronous_commit(false)
        .connect(&url)
        .await
        .unwrap();
    assert!(!relaxed.capabilities().durable);
    drop((storage, relaxed));
    drop_schemas(&url, &[schema]).await;
}

/// Reads walk the queue in pages: batches larger than a page, and runs of expired records,
/// read exactly as the reference backend reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_pages_match_the_reference() {
    use std::time::Duration;

    use offline_queue::{BatchLimit, MemoryStorage};

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("pages");
    let storage = fresh(&url, &schema).await;
    let reference = MemoryStorage::new();
    let bob = RecipientId::new("bob").unwrap();
    let at = |s| testing::T0.saturating_add(Duration::from_secs(s));
    let records: Vec<NewRecord> = (0..700u32)
        .map(|i| {
            let mut r = record(&i.to_le_bytes());
            // Runs of expired records, long and short, between live ones.
            if (100..160).contains(&i) || i % 7 == 0 || (400..650).contains(&i) {
                r.expires_at = Some(at(5));
            }
            r
        })
        .collect();
    async fn first_seq(s: &dyn Storage, bob: &RecipientId, records: Vec<NewRecord>) -> u64 {
        let outcome = s
            .append(bob, records, &Quota::UNLIMITED, testing::T0)
            .await
            .unwrap();
        outcome.records[0].seq().0
    }
    let first = first_seq(&storage, &bob, records.clone()).await;
    let reference_first = first_seq(&reference, &bob, records).await;
    for (max_messages, max_bytes) in [
        (1, usize::MAX),
        (3, 9),
        (8, usize::MAX),
        (150, 400),
        (300, usize::MAX),
        (1000, usize::MAX),
    ] {
        let limit = BatchLimit {
            max_messages,
            max_bytes,
        };
        let (mut after, mut reference_after) = (None, None);
        loop {
            let got = storage.read(&bob, after, limit, at(10)).await.unwrap();
            let want = reference
                .read(&bob, reference_after, limit, at(10))
                .await
                .unwrap();
            let offsets = |seqs: Vec<u64>, base: u64| -> Vec<u64> {
                seqs.into_iter().map(|s| s - base).collect()
            };
            assert_eq!(
                offsets(got.records.iter().map(|r| r.seq.0).collect(), first),
                offsets(
                    want.records.iter().map(|r| r.seq.0).collect(),
                    reference_first
                ),
                "records, limit {limit:?}"
            );
            assert_eq!(
                offsets(got.expired.iter().map(|s| s.0).collect(), first),
                offsets(want.expired.iter().map(|s| s.0).collect(), reference_first),
                "expired, limit {limit:?}"
            );
            let bodies = |b: &offline_queue::storage::ReadBatch| -> Vec<Vec<u8>> {
                b.records.iter().map(|r| r.body.to_vec()).collect()
            };
            assert_eq!(bodies(&got), bodies(&want));
            let last = |b: &offline_queue::storage::ReadBatch| {
                let r = b.records.last().map(|r| r.seq);
                let e = b.expired.last().copied();
                r.max(e)
            };
            match (last(&got), last(&want)) {
                (Some(a), Some(b)) => {
                    after = Some(a);
                    reference_after = Some(b);
                }
                (None, None) => break,
                other => panic!("one ended early: {other:?}"),
            }
        }
    }
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// `Overflow::DropOldest` drops across pages of the queue: many small records make room for
/// one large one, counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_across_pages() {
    use offline_queue::Overflow;

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("drops");
    let storage = fresh(&url, &schema).await;
    let bob = RecipientId::new("bob").unwrap();
    let quota = Quota {
        max_messages: 1_000,
        max_bytes: 300,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    let small: Vec<NewRecord> = (0..300u16).map(|i| record(&[i as u8])).collect();
    storage
        .append(&bob, small, &quota, testing::T0)
        .await
        .unwrap();
    let outcome = storage
        .append(&bob, vec![record(&[9; 150])], &quota, testing::T0)
        .await
        .unwrap();
    assert_eq!((outcome.dropped, outcome.pending), (150, 151));
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!((stats.messages, stats.bytes, stats.lost), (151, 300, 150));
    let left = storage.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(&left[0].body[..], &[150u8][..], "the oldest 150 went");
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// Reads start past the front a cumulative ack removed, and an ack through a seq the queue
/// never held (up to `u64::MAX`) still leaves later appends readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_past_the_end_hide_nothing_appended_later() {
    use offline_queue::Seq;

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("head");
    let storage = fresh(&url, &schema).await;
    let bob = RecipientId::new("bob").unwrap();
    let put = |body: &'static [u8]| {
        storage.append(&bob, vec![record(body)], &Quota::UNLIMITED, testing::T0)
    };
    put(b"a").await.unwrap();
    put(b"b").await.unwrap();
    assert_eq!(
        storage
            .ack_through(&bob, Seq(u64::MAX), testing::T0)
            .await
            .unwrap(),
        2
    );
    let c = put(b"c").await.unwrap().records[0].seq();
    let read = storage.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].seq, &read[0].body[..]), (c, &b"c"[..]));
    assert_eq!(storage.stats(&bob).await.unwrap().newest_seq, Some(c));
    assert_eq!(
        storage
            .ack_through(&bob, Seq(c.0 - 1), testing::T0)
            .await
            .unwrap(),
        0,
        "a stale cumulative ack removes nothing"
    );
    assert_eq!(storage.read_all(&bob, testing::T0).await.unwrap().len(), 1);
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// A purge skips a queue another step holds locked, says there is more, and removes its
/// expired records on a later call: a send to a busy recipient never waits behind a purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_skips_a_busy_queue_and_says_there_is_more() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("purge_skips");
    let storage = fresh(&url, &schema).await;
    let bob = RecipientId::new("bob").unwrap();
    let now = testing::T0;
    let due = now.saturating_add(std::time::Duration::from_secs(1));
    let expiring = NewRecord {
        expires_at: Some(due),
        ..record(b"soon")
    };
    storage
        .append(&bob, vec![expiring], &Quota::UNLIMITED, now)
        .await
        .unwrap();
    let mut holder = raw(&url).await;
    let held = holder.transaction().await.unwrap();
    held.execute(
        &format!("SELECT 1 FROM \"{schema}\".oq_queues WHERE rid = $1 FOR UPDATE"),
        &[&bob.as_bytes()],
    )
    .await
    .unwrap();
    let later = due.saturating_add(std::time::Duration::from_secs(1));
    let skipped = storage.purge(later, None, 100).await.unwrap();
    assert_eq!((skipped.expired, skipped.more), (0, true), "{skipped:?}");
    held.rollback().await.unwrap();
    let purged = storage.purge(later, None, 100).await.unwrap();
    assert_eq!((purged.expired, purged.more), (1, false), "{purged:?}");
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// The server's own counters agree with `PurgeOutcome::examined`: purging 20 expired records
/// among 20,000 reads the records table through its indexes only (no sequential scan) and
/// fetches O(20) rows, not O(20,000). Read from `pg_stat_xact_user_tables`, which counts the
/// current transaction's work, so the purge runs in the test's own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_reads_the_records_table_through_its_indexes_only() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("purge_work");
    let storage = fresh(&url, &schema).await;
    let at = |s| testing::T0.saturating_add(std::time::Duration::from_secs(s));
    let expiring = |deadline| NewRecord {
        expires_at: Some(deadline),
        ..record(b"x")
    };
    for k in 0..20 {
        let who = RecipientId::new(format!("keep-{k}")).unwrap();
        let mut records = vec![expiring(at(10))];
        records.extend((0..1_000).map(|_| expiring(at(1_000_000))));
        storage
            .append(&who, records, &Quota::UNLIMITED, testing::T0)
            .await
            .unwrap();
    }
    let mut client = raw(&url).await;
    // Statistics as autovacuum would have them by now, so the plan is the steady state's, not
    // a guess for a table never analysed.
    client
        .batch_execute(&format!("ANALYZE \"{schema}\".oq_records"))
        .await
        .unwrap();
    let work = client.transaction().await.unwrap();
    let purged = work
        .query_one(
            &format!("SELECT expired, examined FROM \"{schema}\".oq_purge($1, NULL, 100000, 7)"),
            &[&(at(20).as_millis() as i64)],
        )
        .await
        .unwrap();
    let (expired, examined): (i64, i64) = (purged.get(0), purged.get(1));
    assert_eq!((expired, examined), (20, 20));
    let scans = work
        .query_one(
            "SELECT seq_scan, idx_scan, idx_tup_fetch FROM pg_stat_xact_user_tables \
             WHERE schemaname = $1 AND relname = 'oq_records'",
            &[&schema],
        )
        .await
        .unwrap();
    let (seq_scans, index_scans, fetched): (i64, i64, i64) =
        (scans.get(0), scans.get(1), scans.get(2));
    assert_eq!(seq_scans, 0, "the records table was scanned");
    assert!(
        index_scans > 0,
        "no index scan counted: the counters are off"
    );
    assert!(
        fetched <= 4 * 20,
        "purging 20 among 20,020 fetched {fetched} rows through the indexes"
    );
    work.commit().await.unwrap();
    assert!(
        !storage.purge(at(20), None, 100).await.unwrap().more,
        "the purge committed: nothing left due"
    );
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// Appends waiting together share one commit (one connection, so all but the first wait), and
/// each still gets its own outcome: seqs in submission order per recipient, a resent id the
/// seq of the first, a full queue refused alone, the storage-wide budget counted across the
/// group, and the byte counters exact afterwards.
#[tokio::test]
async fn concurrent_appends_share_commits_and_keep_their_own_outcomes() {
    use offline_queue::storage::Appended;
    use offline_queue::{BatchLimit, Overflow};

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("group");
    let storage = PostgresStorage::options()
        .schema(&schema)
        .pool_size(1)
        .connect(&url)
        .await
        .unwrap();
    let (a, b, c) = (
        RecipientId::new("a").unwrap(),
        RecipientId::new("b").unwrap(),
        RecipientId::new("c").unwrap(),
    );
    let budgeted = Quota {
        max_total_bytes: Some(350),
        ..Quota::UNLIMITED
    };
    let small = Quota {
        max_messages: 5,
        overflow: Overflow::Reject,
        ..Quota::UNLIMITED
    };
    let sender_chosen = |key: u8, body: Vec<u8>| NewRecord {
        id: MessageId::from_bytes([key; 16]),
        dedup: true,
        ..record(&body)
    };
    // Submitted in this order, all at once (join_all polls each before any commit is done).
    let mut calls = Vec::new();
    for i in 0..6u8 {
        calls.push((c.clone(), record(&[i; 100]), budgeted));
    }
    for i in 0..60u8 {
        // Every tenth resends the id of the one before it.
        let key = if i % 10 == 9 { i - 1 } else { i };
        calls.push((a.clone(), sender_chosen(key, vec![i; 3]), Quota::UNLIMITED));
        if i < 20 {
            calls.push((b.clone(), record(&[i]), small));
        }
    }
    let outcomes = futures::future::join_all(
        calls
            .iter()
            .map(|(who, rec, quota)| storage.append(who, vec![rec.clone()], quota, testing::T0)),
    )
    .await;
    let counts = storage.group_commit_counts();
    assert_eq!(counts.appends, calls.len() as u64);
    assert!(
        counts.commits < counts.appends / 10,
        "appends waiting together share commits: {counts:?}"
    );

    let (mut c_stored, mut c_refused, mut b_stored, mut b_refused) = (0, 0, 0, 0);
    let mut a_seqs: Vec<(u8, Appended)> = Vec::new();
    for ((who, rec, _), outcome) in calls.iter().zip(outcomes) {
        match (who.as_bytes(), outcome) {
            (b"c", Ok(_)) => c_stored += 1,
            (b"c", Err(Error::StorageFull { used, adding, max })) => {
                assert_eq!((used, adding, max), (300, 100, 350));
                c_refused += 1;
            }
            (b"b", Ok(_)) => b_stored += 1,
            (b"b", Err(Error::QueueFull { messages, .. })) => {
                assert_eq!(messages, 5);
                b_refused += 1;
            }
            (b"a", Ok(outcome)) => a_seqs.push((rec.body[0], outcome.records[0])),
            (who, other) => panic!("{who:?}: {other:?}"),
        }
    }
    assert_eq!(
        (c_stored, c_refused),
        (3, 3),
        "the budget counts the group's own appends"
    );
    assert_eq!((b_stored, b_refused), (5, 15), "a full queue refuses alone");
    let mut last = None;
    for (i, appended) in &a_seqs {
        if i % 10 == 9 {
            assert_eq!(
                *appended,
                Appended::Duplicate(last.unwrap()),
                "a resent id gets the first one's seq"
            );
        } else {
            assert!(matches!(appended, Appended::Stored(_)), "{i}: {appended:?}");
            assert!(last < Some(appended.seq()), "seqs follow submission order");
            last = Some(appended.seq());
        }
    }
    let read = storage
        .read(&a, None, BatchLimit::default(), testing::T0)
        .await
        .unwrap();
    let bodies: Vec<u8> = read.records.iter().map(|r| r.body[0]).collect();
    let expected: Vec<u8> = (0..60u8).filter(|i| i % 10 != 9).collect();
    assert_eq!(bodies, expected, "stored once each, in order, exactly");

    let client = raw(&url).await;
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT sum(bytes)::bigint FROM \"{schema}\".oq_bytes), \
                 (SELECT sum(octet_length(body))::bigint FROM \"{schema}\".oq_records)"
            ),
            &[],
        )
        .await
        .unwrap();
    let (counter, records): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(counter, records, "the byte counter agrees with the rows");
    assert_eq!(records, 300 + 5 + 54 * 3);
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// Makes `quoted` a schema as a version-1 build made it (its DDL, as that build ran it).
async fn version_one_schema(client: &tokio_postgres::Client, quoted: &str) {
    const V1: &[&str] = &[
        include_str!("../src/storage/postgres/sql/tables.sql"),
        include_str!("../src/storage/postgres/sql/ack.sql"),
        include_str!("../src/storage/postgres/sql/read.sql"),
        include_str!("../src/storage/postgres/sql/append.sql"),
        include_str!("../src/storage/postgres/sql/purge.sql"),
        include_str!("../src/storage/postgres/sql/remove.sql"),
    ];
    client
        .batch_execute(&format!("CREATE SCHEMA {quoted}"))
        .await
        .unwrap();
    for ddl in V1 {
        client
            .batch_execute(&ddl.replace("@schema@", quoted))
            .await
            .unwrap();
    }
    client
        .batch_execute(&format!(
            "INSERT INTO {quoted}.oq_info (key, value) VALUES ('owner', 'offline-queue'), \
             ('version', '1')"
        ))
        .await
        .unwrap();
}

/// A migration waits at most a lock timeout for a table another node's step holds, tries
/// again, and gives up with a retryable error, so it never stalls running nodes for long;
/// once the table is free, a connect migrates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_gives_way_to_running_traffic() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("migrate_busy");
    let quoted = format!("\"{schema}\"");
    let mut client = raw(&url).await;
    version_one_schema(&client, &quoted).await;
    let busy = client.transaction().await.unwrap();
    busy.batch_execute(&format!(
        "LOCK TABLE {quoted}.oq_records IN ACCESS SHARE MODE"
    ))
    .await
    .unwrap();
    let refused = PostgresStorage::options()
        .schema(&schema)
        .connect(&url)
        .await
        .map(|_| ())
        .expect_err("the migration cannot take oq_records while a step holds it");
    assert!(refused.is_retryable(), "{refused}");
    assert!(refused.to_string().contains("lock"), "{refused}");
    busy.rollback().await.unwrap();
    let version = || async {
        client
            .query_one(
                &format!("SELECT value FROM {quoted}.oq_info WHERE key = 'version'"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    assert_eq!(version().await, "1", "nothing of the migration stayed");
    drop(fresh(&url, &schema).await);
    assert_eq!(version().await, "6");
    drop_schemas(&url, &[schema]).await;
}

/// A schema a version-1 build made is migrated at connect: its messages stay, the version
/// row moves, and grouped appends work on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_one_schema_is_migrated_in_place() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("migrate");
    let quoted = format!("\"{schema}\"");
    let client = raw(&url).await;
    version_one_schema(&client, &quoted).await;
    // A message stored by version 1's own append.
    client
        .execute(
            &format!(
                "SELECT * FROM {quoted}.oq_append($1, ARRAY[$2::bytea], ARRAY[false], \
                 ARRAY[0::bigint], ARRAY[NULL::bigint], ARRAY[$3::bytea], 100, 100000, false, \
                 NULL, 0, 0)"
            ),
            &[&&b"bob"[..], &&[7u8; 16][..], &&b"from v1"[..]],
        )
        .await
        .unwrap();
    // Handed over twice, as version 1's read counted it.
    client
        .execute(
            &format!("UPDATE {quoted}.oq_records SET deliveries = 2 WHERE rid = $1"),
            &[&&b"bob"[..]],
        )
        .await
        .unwrap();

    let storage = fresh(&url, &schema).await;
    let version: String = client
        .query_one(
            &format!("SELECT value FROM {quoted}.oq_info WHERE key = 'version'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, "6");
    let purged = storage
        .purge(testing::T0, None, 100)
        .await
        .expect("version 3's purge runs on a migrated schema");
    assert_eq!(purged.expired, 0);
    let bob = RecipientId::new("bob").unwrap();
    // Version 4 counts deliveries by a watermark; the count version 1 wrote stands, and
    // grows by one per hand-over.
    let all = offline_queue::BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    let read = storage
        .read_for_delivery(&bob, None, None, all, testing::T0)
        .await
        .unwrap();
    assert_eq!(counts(&read.batch.records), [2]);
    assert_eq!(
        counts(&storage.read_all(&bob, testing::T0).await.unwrap()),
        [3]
    );
    let appends = futures::future::join_all(
        (0..8u8).map(|i| storage.append(&bob, vec![record(&[i])], &Quota::UNLIMITED, testing::T0)),
    )
    .await;
    assert!(appends.iter().all(Result::is_ok), "{appends:?}");
    let read = storage.read_all(&bob, testing::T0).await.unwrap();
    let bodies: Vec<&[u8]> = read.iter().map(|r| &r.body[..]).collect();
    let mut expected: Vec<&[u8]> = vec![b"from v1"];
    let ones: Vec<[u8; 1]> = (0..8u8).map(|i| [i]).collect();
    expected.extend(ones.iter().map(|b| &b[..]));
    assert_eq!(bodies, expected);
    // Version 6's appends update no row; the counts take them in.
    assert_eq!(storage.stats(&bob).await.unwrap().messages, 9);
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// A session reading its queue in order moves the queue row's delivery watermark and rewrites
/// no record it hands over for the first time (each keeps its row version: the same `ctid`),
/// yet every count reads as the contract says; a redelivery counts each record explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_order_reads_count_deliveries_without_rewriting_records() {
    use offline_queue::storage::Ack;
    use offline_queue::{BatchLimit, Seq};

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("watermark");
    let storage = fresh(&url, &schema).await;
    let client = raw(&url).await;
    let bob = RecipientId::new("bob").unwrap();
    let bodies: Vec<NewRecord> = (0..300u16).map(|i| record(&i.to_be_bytes())).collect();
    let seqs: Vec<Seq> = storage
        .append(&bob, bodies, &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq())
        .collect();
    let versions = || async {
        client
            .query(
                &format!(
                    "SELECT seq, ctid::text FROM \"{schema}\".oq_records WHERE rid = $1 \
                     ORDER BY seq"
                ),
                &[&&b"bob"[..]],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    let stored = versions().await;
    assert_eq!(stored.len(), 300);
    let hundred = BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    // As a session: read a batch, then ack it with the read of the next.
    let mut after = None;
    for batch in 0..3 {
        let ack = after.map(|through| Ack {
            through: Some(through),
            ..Ack::default()
        });
        let read = storage
            .read_for_delivery(&bob, ack.as_ref(), after, hundred, testing::T0)
            .await
            .unwrap();
        let got: Vec<(Seq, u32)> = read
            .batch
            .records
            .iter()
            .map(|r| (r.seq, r.delivery_count))
            .collect();
        let want: Vec<(Seq, u32)> = seqs[batch * 100..][..100].iter().map(|&s| (s, 0)).collect();
        assert_eq!(got, want, "batch {batch}: in order, never delivered before");
        assert_eq!(
            versions().await,
            stored[batch * 100..],
            "batch {batch}: no record rewritten (the first read carries no ack, the rest do)"
        );
        after = got.last().map(|&(seq, _)| seq);
    }
    let delivered: i64 = client
        .query_one(
            &format!("SELECT delivered FROM \"{schema}\".oq_queues WHERE rid = $1"),
            &[&&b"bob"[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        delivered as u64, seqs[299].0,
        "the watermark is the last seq handed over"
    );
    let left = storage.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(counts(&left), vec![1; 100], "handed over once");
    // The session reconnects: the same records again, each counted explicitly now.
    let again = storage
        .read_for_delivery(&bob, None, None, hundred, testing::T0)
        .await
        .unwrap();
    assert_eq!(
        counts(&again.batch.records),
        vec![1; 100],
        "counts from before"
    );
    let left = storage.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(counts(&left), vec![2; 100], "the redelivery counted");
    let rewritten = versions().await;
    assert_eq!(rewritten.len(), 100);
    assert!(
        rewritten
            .iter()
            .zip(&stored[200..])
            .all(|(new, old)| new.1 != old.1),
        "a redelivery writes each record's count"
    );
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// Appends that need no decision update no queue row: many at once to one recipient race for
/// its next seq at the primary key, and those that lose go through the locking path. Every one
/// is stored once, at its own seq, and read back in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_racing_for_one_queue_are_each_stored_once() {
    use offline_queue::BatchLimit;
    use offline_queue::storage::Appended;

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("racing");
    let storage = Arc::new(
        PostgresStorage::options()
            .schema(&schema)
            .pool_size(8)
            .connect(&url)
            .await
            .unwrap(),
    );
    let client = raw(&url).await;
    let bob = RecipientId::new("bob").unwrap();
    // The queue exists and holds a record: later appends may take the fast path.
    storage
        .append(&bob, vec![record(b"first")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..200u16).map(|i| i.to_be_bytes().to_vec()).collect();
    let outcomes = futures::future::join_all(bodies.iter().map(|body| {
        let storage = storage.clone();
        let bob = bob.clone();
        let body = body.clone();
        async move {
            storage
                .append(&bob, vec![record(&body)], &Quota::UNLIMITED, testing::T0)
                .await
        }
    }))
    .await;
    let mut stored: Vec<(u64, Vec<u8>)> = Vec::new();
    for (outcome, body) in outcomes.into_iter().zip(&bodies) {
        match outcome.unwrap().records[..] {
            [Appended::Stored(seq)] => stored.push((seq.0, body.clone())),
            ref other => panic!("{other:?}"),
        }
    }
    stored.sort();
    let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    let mut distinct = seqs.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 200, "each append has a seq of its own");
    let read = storage
        .read(
            &bob,
            None,
            BatchLimit {
                max_messages: 1_000,
                max_bytes: usize::MAX,
            },
            testing::T0,
        )
        .await
        .unwrap();
    let got: Vec<(u64, Vec<u8>)> = read
        .records
        .iter()
        .skip(1)
        .map(|r| (r.seq.0, r.body.to_vec()))
        .collect();
    assert_eq!(got, stored, "read back in seq order, exactly");
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!(stats.messages, 201);
    // Records stored by the fast path carry running totals; the locking path's carry none.
    let fast: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".oq_records WHERE cum_count > 0"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fast > 0, "no append took the fast path");
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}

/// A queue removed and seen again numbers its records above every seq it had, though its
/// appends took seqs from its own newest record, not from the shared sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_queue_seen_again_never_reuses_a_seq() {
    use std::time::Duration;

    use offline_queue::storage::Ack;

    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("reseen");
    let storage = fresh(&url, &schema).await;
    let bob = RecipientId::new("bob").unwrap();
    let quota = Quota::UNLIMITED;
    let mut highest = 0;
    for round in 0..3u64 {
        let now = testing::T0.saturating_add(Duration::from_secs(10 * round));
        for _ in 0..5 {
            let outcome = storage
                .append(&bob, vec![record(b"x")], &quota, now)
                .await
                .unwrap();
            let seq = outcome.records[0].seq().0;
            assert!(seq > highest, "round {round}: seq {seq} after {highest}");
            highest = seq;
        }
        // Acked (its last records counted only by the running totals), then removed.
        if round == 1 {
            storage
                .ack(
                    &bob,
                    &Ack {
                        through: Some(offline_queue::Seq(highest)),
                        ..Ack::default()
                    },
                    now,
                )
                .await
                .unwrap();
        }
        let later = now.saturating_add(Duration::from_secs(5));
        if round == 2 {
            storage.remove_recipient(&bob).await.unwrap();
        } else {
            storage.purge(later, Some(later), 100).await.unwrap();
        }
        assert_eq!(storage.stats(&bob).await.unwrap().messages, 0);
    }
    let outcome = storage
        .append(&bob, vec![record(b"x")], &quota, testing::T0)
        .await
        .unwrap();
    assert!(outcome.records[0].seq().0 > highest);
    drop(storage);
    drop_schemas(&url, &[schema]).await;
}
