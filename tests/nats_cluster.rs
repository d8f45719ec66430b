//! `NatsStorage` on a 3-node cluster with replicated streams (R3), started by the test from
//! Debian's `nats-server` on free loopback ports in a temporary directory.

#![cfg(feature = "nats")]

mod nats_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use nats_support::own_server::{NATS_SERVER, connect_when_ready, start_cluster};
use nats_support::skip_support;
use offline_queue::storage::NewRecord;
use offline_queue::{MessageId, NatsStorage, Quota, RecipientId, Storage, StorageExt, Timestamp};
use parking_lot::Mutex;

const RECIPIENTS: usize = 8;
const SENDERS: usize = 64;
const PER_SENDER: usize = 20;

/// Many concurrent appends from one node to a few queues of a replicated stream. A cluster
/// checks a compare-and-set's expected sequence on the leader before it replicates the write,
/// so two of a node's writes of one queue's meta in flight at once could both pass and one
/// be lost (measured: without a node's changes of a queue going one at a time, 795 and 858 of
/// this test's 1,280 appends failed in two runs). Every append succeeds, and each queue holds
/// exactly what was appended to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_one_node_to_a_replicated_queue_all_land_once() {
    if skip_support::program_missing(
        NATS_SERVER,
        "nats-server",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, url) = start_cluster(dir.path());
    let storage = connect_when_ready(|| NatsStorage::options().replicas(3), &url).await;
    let appended: Arc<Mutex<BTreeMap<usize, Vec<Vec<u8>>>>> = Arc::default();
    let now = Timestamp::now_system();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (storage, appended) = (storage.clone(), appended.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for n in 0..PER_SENDER {
                    let r = (sender + n) % RECIPIENTS;
                    let body = format!("{sender}:{n}").into_bytes();
                    let record = NewRecord {
                        id: MessageId::generate(),
                        dedup: false,
                        sent_at: now,
                        expires_at: None,
                        body: body.clone(),
                    };
                    let to = RecipientId::new(format!("r{r}")).unwrap();
                    match storage
                        .append_one(&to, record, &Quota::UNLIMITED, now)
                        .await
                    {
                        Ok(_) => appended.lock().entry(r).or_default().push(body),
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {} appends failed, first: {}",
        failures.len(),
        SENDERS * PER_SENDER,
        failures[0]
    );
    let appended = appended.lock().clone();
    for (r, mut expected) in appended {
        let to = RecipientId::new(format!("r{r}")).unwrap();
        let read = storage.read_all(&to, now).await.unwrap();
        assert!(
            read.windows(2).all(|pair| pair[0].seq < pair[1].seq),
            "r{r}: positions strictly increase"
        );
        let mut stored: Vec<Vec<u8>> = read.into_iter().map(|r| r.body.to_vec()).collect();
        stored.sort();
        expected.sort();
        assert_eq!(stored, expected, "r{r}: every append stored, once");
    }
}
