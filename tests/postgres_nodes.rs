//! Several nodes on one PostgreSQL schema (`OFFLINE_QUEUE_POSTGRES_URL`; skipped, and says so,
//! when unset): presence seen across nodes, wake-ups over LISTEN/NOTIFY sent by the append,
//! the listening connection dropped and made again (every session re-reads), leases that end
//! when a node dies, and a node that stops cleanly leaving at once.

#![cfg(all(feature = "postgres", feature = "testing"))]

mod postgres_support;

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use offline_queue::storage::NewRecord;
use offline_queue::{
    Coordination, MessageId, PostgresStorage, Presence, Quota, RecipientId, Storage, testing,
};
use postgres_support::{drop_schemas, raw, unique_schema, url};

async fn node(url: &str, schema: &str, presence_ttl: Duration) -> PostgresStorage {
    PostgresStorage::options()
        .schema(schema)
        .pool_size(4)
        .presence_ttl(presence_ttl)
        .connect(url)
        .await
        .expect("postgres answers")
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

/// Polls `check` until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next wake-up, within 10 s.
async fn next_wakeup(stream: &mut BoxStream<'static, RecipientId>, what: &str) -> RecipientId {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("no wake-up: {what}"))
        .expect("the wake-up stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_an_append_wakes_the_other() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("nodes");
    let a = node(&url, &schema, Duration::from_secs(30)).await;
    let b = node(&url, &schema, Duration::from_secs(30)).await;
    let (bob, carol) = (
        RecipientId::new("bob").unwrap(),
        RecipientId::new("carol").unwrap(),
    );
    assert!(!b.live_elsewhere(&bob).await.unwrap());
    a.presence(&bob, Presence::Connected);
    eventually("b sees bob's session on a", || async {
        b.live_elsewhere(&bob).await.unwrap()
    })
    .await;
    assert!(
        !a.live_elsewhere(&bob).await.unwrap(),
        "a's own session is not elsewhere for a"
    );
    let mut wakeups = a.wakeups();
    // Once listening, a wakes every session it holds (wake-ups before that were not heard).
    assert_eq!(next_wakeup(&mut wakeups, "a listening").await, bob);

    let outcome = b
        .append(&bob, vec![record(b"hi")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    assert!(
        outcome.live_elsewhere,
        "b's append found bob's session on a"
    );
    assert_eq!(next_wakeup(&mut wakeups, "b's append for bob").await, bob);
    // Grouped appends wake too, once per recipient.
    let appends = futures::future::join_all(
        (0..4u8).map(|i| b.append(&bob, vec![record(&[i])], &Quota::UNLIMITED, testing::T0)),
    )
    .await;
    assert!(appends.iter().all(|o| o.as_ref().unwrap().live_elsewhere));
    assert_eq!(next_wakeup(&mut wakeups, "b's grouped appends").await, bob);

    let outcome = b
        .append(&carol, vec![record(b"x")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    assert!(!outcome.live_elsewhere, "nobody holds carol");
    assert!(!b.announce(&carol).await.unwrap());
    assert!(b.announce(&bob).await.unwrap());
    assert_eq!(next_wakeup(&mut wakeups, "b's announce for bob").await, bob);
    let own = a
        .append(&bob, vec![record(b"own")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    assert!(
        !own.live_elsewhere,
        "a's own session does not count for a's append"
    );

    a.presence(&bob, Presence::Disconnected);
    eventually("bob's session on a ends for b", || async {
        !b.live_elsewhere(&bob).await.unwrap()
    })
    .await;
    drop((a, b));
    drop_schemas(&url, &[schema]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listener_comes_back_and_every_session_reads_again() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("listen");
    let a = node(&url, &schema, Duration::from_secs(30)).await;
    let b = node(&url, &schema, Duration::from_secs(30)).await;
    let bob = RecipientId::new("bob").unwrap();
    a.presence(&bob, Presence::Connected);
    eventually("b sees bob on a", || async {
        b.live_elsewhere(&bob).await.unwrap()
    })
    .await;
    let mut wakeups = a.wakeups();
    assert_eq!(next_wakeup(&mut wakeups, "a listening").await, bob);

    // Kill a's listening connection (with every other listener in this database: each comes
    // back by itself).
    let admin = raw(&url).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'offline-queue wake-up listener' \
             AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "a listener was running");
    // Back, a re-reads every session it holds: what was sent meanwhile is not waited for.
    assert_eq!(next_wakeup(&mut wakeups, "a listening again").await, bob);
    b.append(&bob, vec![record(b"after")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();
    assert_eq!(
        next_wakeup(&mut wakeups, "an append after the reconnect").await,
        bob
    );
    drop((a, b));
    drop_schemas(&url, &[schema]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_lease_ends_and_a_clean_stop_leaves_at_once() {
    let Some(url) = url() else {
        return;
    };
    let schema = unique_schema("lease");
    let a = node(&url, &schema, Duration::from_millis(600)).await;
    let b = node(&url, &schema, Duration::from_secs(30)).await;
    let bob = RecipientId::new("bob").unwrap();
    let admin = raw(&url).await;

    // A node that died holding bob: a lease of 500 ms, never renewed.
    admin
        .batch_execute(&format!(
            "INSERT INTO \"{schema}\".oq_nodes VALUES ('\\xdead', clock_timestamp() + interval '500 milliseconds'); \
             INSERT INTO \"{schema}\".oq_presence VALUES ('\\x626f62', '\\xdead');"
        ))
        .await
        .unwrap();
    assert!(
        b.live_elsewhere(&bob).await.unwrap(),
        "live while the lease runs"
    );
    eventually("the dead node's lease ends", || async {
        !b.live_elsewhere(&bob).await.unwrap()
    })
    .await;

    // A live node renews (every 200 ms here) and removes the dead one's rows.
    let carol = RecipientId::new("carol").unwrap();
    a.presence(&carol, Presence::Connected);
    let leases = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::HashSet::new()));
    let query = format!(
        "SELECT n.lease_until::text FROM \"{schema}\".oq_nodes n \
         JOIN \"{schema}\".oq_presence p ON p.node = n.node WHERE p.rid = 'carol'::bytea"
    );
    eventually("a renews its lease three times", || async {
        if let Ok(Some(row)) = admin.query_opt(&query, &[]).await {
            leases.lock().insert(row.get::<_, String>(0));
        }
        leases.lock().len() >= 3
    })
    .await;
    assert!(
        b.live_elsewhere(&carol).await.unwrap(),
        "renewed, a still counts"
    );
    let dead_rows: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".oq_nodes WHERE node = '\\xdead'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        dead_rows, 0,
        "a renewal removed the dead node and its presence"
    );

    // Stopped cleanly, a leaves at once (not after its lease).
    drop(a);
    eventually("a's sessions end for b when a stops", || async {
        !b.live_elsewhere(&carol).await.unwrap()
    })
    .await;
    drop(b);
    drop_schemas(&url, &[schema]).await;
}
