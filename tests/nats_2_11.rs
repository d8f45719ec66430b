//! What NATS servers of 2.11 and later add: per-message TTL (expired records and tombstones
//! leave the stream by the server's clock, and a stream made on 2.9 gains it when its server is
//! upgraded), and batched direct gets (a read asks for 64 records in one request). Runs on
//! servers the tests start themselves: Debian's 2.9.10 and the newer server named by
//! `OFFLINE_QUEUE_NEWER_NATS_SERVER` (skipped, and says so, when it is unset; `.ci/run`
//! fetches one with `.ci/newer-nats-server`).

#![cfg(all(feature = "nats", feature = "testing"))]

mod nats_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::StreamExt;
use nats_support::own_server::{NATS_SERVER, OwnNats, free_port};
use nats_support::skip_support;
use nats_support::{newer_nats_server, start_newer_server};
use offline_queue::storage::{Appended, NewRecord};
use offline_queue::{
    BatchLimit, Envelope, MessageId, NatsOptions, NatsStorage, OfflineQueue, Outbound, Quota,
    RecipientId, Seq, Storage, Timestamp, channel_transport,
};

/// Bounds each wait for the server to remove something.
const PATIENCE: Duration = Duration::from_secs(30);

/// Options whose grace (dedup window plus stale reservation) is 2 s, so a record of 1 s
/// leaves 3 s after it was sent.
fn options(name: &str) -> NatsOptions {
    NatsStorage::options()
        .stream(name)
        .prefix(name)
        .dedup_window(Duration::from_secs(1))
        .stale_reservation(Duration::from_secs(1))
}

async fn connect(url: &str, name: &str) -> NatsStorage {
    nats_support::own_server::connect_when_ready(|| options(name), url).await
}

fn record(body: &[u8], sent_at: Timestamp, lifetime: Option<Duration>) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at,
        expires_at: lifetime.map(|ttl| sent_at.saturating_add(ttl)),
        body: body.to_vec(),
    }
}

fn record_subject(name: &str, who: &RecipientId, seq: Seq) -> String {
    let hex: String = who.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}.r.{hex}.{}", seq.0)
}

/// The message stored at `subject` in the records stream `name`, asked of its leader.
async fn stored(url: &str, name: &str, subject: &str) -> Option<StreamMessage> {
    let context = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = context.get_stream(name).await.unwrap();
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Some(message),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
        Err(error) => panic!("{subject}: {error}"),
    }
}

fn ttl_header(message: &StreamMessage) -> Option<String> {
    message
        .headers
        .get(async_nats::header::NATS_MESSAGE_TTL)
        .map(|value| value.as_str().to_owned())
}

/// What one read from the start returns: each record's seq and body.
async fn read_bodies(
    storage: &NatsStorage,
    who: &RecipientId,
    limit: BatchLimit,
    now: Timestamp,
) -> Vec<(Seq, Vec<u8>)> {
    let batch = storage.read(who, None, limit, now).await.unwrap();
    batch
        .records
        .into_iter()
        .map(|r| (r.seq, r.body.to_vec()))
        .collect()
}

/// Appends `record` alone; its seq.
async fn append_one(storage: &NatsStorage, who: &RecipientId, record: NewRecord) -> Seq {
    let now = record.sent_at;
    storage
        .append(who, vec![record], &Quota::UNLIMITED, now)
        .await
        .unwrap()
        .records[0]
        .seq()
}

/// The `Nats-TTL` header of the record stored at `seq` (which must be there).
async fn ttl_header_at(url: &str, name: &str, who: &RecipientId, seq: Seq) -> Option<String> {
    let message = stored(url, name, &record_subject(name, who, seq)).await;
    ttl_header(&message.expect("the record is stored"))
}

async fn allows_message_ttl(url: &str, name: &str) -> bool {
    let context = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = context.get_stream(name).await.unwrap();
    stream.info().await.unwrap().config.allow_message_ttl
}

/// Waits until the server no longer holds a message at `subject`.
async fn wait_until_removed(url: &str, name: &str, subject: &str) {
    let deadline = Instant::now() + PATIENCE;
    while stored(url, name, subject).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "{subject} still stored after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn debian_server_missing() -> bool {
    skip_support::program_missing(
        NATS_SERVER,
        "nats-server",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_leave_by_the_servers_clock_and_are_counted_lost() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = start_newer_server(dir.path(), None) else {
        return;
    };
    let name = "TTL";
    let storage = connect(&url, name).await;
    assert!(storage.per_message_ttl());
    assert!(allows_message_ttl(&url, name).await);

    let who = RecipientId::new("alice").unwrap();
    let now = Timestamp::now_system();
    let outcome = storage
        .append(
            &who,
            vec![
                record(b"short", now, Some(Duration::from_secs(1))),
                record(b"kept", now, None),
            ],
            &Quota::UNLIMITED,
            now,
        )
        .await
        .unwrap();
    let (short, kept) = (outcome.records[0].seq(), outcome.records[1].seq());
    let short_subject = record_subject(name, &who, short);
    let kept_subject = record_subject(name, &who, kept);
    // 1 s of life, plus the 2 s grace in which a retried send may still look for it.
    let message = stored(&url, name, &short_subject).await.unwrap();
    assert_eq!(ttl_header(&message).as_deref(), Some("3"));
    let message = stored(&url, name, &kept_subject).await.unwrap();
    assert_eq!(ttl_header(&message), None, "no deadline, no TTL");

    wait_until_removed(&url, name, &short_subject).await;

    // The reader finds the expired record gone, closes its position and counts it lost.
    let later = Timestamp::now_system();
    let read = read_bodies(&storage, &who, BatchLimit::default(), later).await;
    assert_eq!(read, vec![(kept, b"kept".to_vec())]);
    let stats = storage.stats(&who).await.unwrap();
    assert_eq!((stats.messages, stats.bytes, stats.lost), (1, 4, 1));

    // A tombstone holds the position, so no late record can land where readers have passed,
    // and it stays until max_age, as a claim on the position may still need it.
    let tombstone = stored(&url, name, &short_subject).await.unwrap();
    assert!(tombstone.payload.is_empty());
    assert_eq!(ttl_header(&tombstone), None);
    assert!(stored(&url, name, &kept_subject).await.is_some());
}

/// A backlog the server expired is passed a batch's worth at a time, each record counted lost
/// once, and what follows it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_the_server_expired_is_passed_a_batch_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let monitor = free_port();
    let Some((_server, url)) = start_newer_server(dir.path(), Some(monitor)) else {
        return;
    };
    let name = "BACKLOG";
    let storage = connect(&url, name).await;
    let who = RecipientId::new("frank").unwrap();
    let now = Timestamp::now_system();
    let mut records: Vec<NewRecord> = (0..150u8)
        .map(|i| record(&[i], now, Some(Duration::from_secs(1))))
        .collect();
    records.push(record(b"kept", now, None));
    let kept = storage
        .append(&who, records, &Quota::UNLIMITED, now)
        .await
        .unwrap()
        .records[150]
        .seq();
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut stream = context.get_stream(name).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while stream.info().await.unwrap().state.messages > 1 {
        assert!(
            Instant::now() < deadline,
            "the server kept the expired records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let later = Timestamp::now_system();
    let limit = BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    let before = messages_in(monitor);
    let first = storage.read(&who, None, limit, later).await.unwrap();
    assert!(first.records.is_empty());
    assert_eq!((first.lost_total, first.lost_unconfirmed), (100, 100));
    let second = storage.read(&who, None, limit, later).await.unwrap();
    let read: Vec<Seq> = second.records.iter().map(|r| r.seq).collect();
    assert_eq!(read, vec![kept]);
    assert_eq!(second.lost_total, 150);
    // One tombstone a record, besides each read's meta get and write and its batched gets:
    // not a wait, a get from the leader and a meta write a record.
    let asked = messages_in(monitor) - before;
    assert!(asked <= 170, "{asked} requests");
    let stats = storage.stats(&who).await.unwrap();
    assert_eq!((stats.messages, stats.lost), (1, 150));
}

/// The engine on a newer server, end to end: a message past its TTL is never delivered and is
/// reported lost, whether the server removed it first or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_delivers_around_records_the_server_expired() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = start_newer_server(dir.path(), None) else {
        return;
    };
    let name = "ENGINE";
    let storage = connect(&url, name).await;
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage.clone()))
        .build()
        .unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let short = queue
        .send(Envelope::new(bob.clone(), "short").with_ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    queue
        .send(Envelope::new(bob.clone(), "long").with_ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    wait_until_removed(&url, name, &record_subject(name, &bob, short.seq)).await;

    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let driver = session.run();
    let client = async {
        let Some(Outbound::Batch(batch)) = inbox.next().await else {
            panic!("a batch first")
        };
        let bodies: Vec<&[u8]> = batch.messages.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(bodies, vec![b"long".as_slice()]);
        assert_eq!(batch.gap, 1, "the expired message is reported lost");
        handle.ack_through(batch.messages[0].seq);
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        handle.close();
    };
    let (end, ()) = futures::join!(driver, client);
    end.unwrap();
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_on_2_9_gains_per_message_ttl_when_its_server_is_upgraded() {
    if debian_server_missing() {
        return;
    }
    let Some(newer) = newer_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let name = "UPGRADE";
    let who = RecipientId::new("carol").unwrap();
    let now = Timestamp::now_system();
    let hour = Some(Duration::from_secs(3600));

    let mut server = OwnNats::new(dir.path(), "solo", port, None);
    server.start();
    let storage = connect(&url, name).await;
    assert!(!storage.per_message_ttl(), "Debian's 2.9.10 has no TTL");
    let old = append_one(&storage, &who, record(b"old", now, hour)).await;
    assert_eq!(ttl_header_at(&url, name, &who, old).await, None);
    assert!(!allows_message_ttl(&url, name).await);
    drop(storage);
    server.kill();

    // The same files, served by the newer server.
    server.program(&newer).start();
    let storage = connect(&url, name).await;
    assert!(storage.per_message_ttl());
    assert!(allows_message_ttl(&url, name).await);
    let new = append_one(&storage, &who, record(b"new", now, hour)).await;
    assert_eq!(
        ttl_header_at(&url, name, &who, new).await.as_deref(),
        Some("3602")
    );
    let read = read_bodies(&storage, &who, BatchLimit::default(), now).await;
    assert_eq!(read, vec![(old, b"old".to_vec()), (new, b"new".to_vec())]);
}

/// The server's count of messages received (`/varz` on its monitoring port).
fn messages_in(monitor: u16) -> u64 {
    use std::io::{Read as _, Write as _};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", monitor)).unwrap();
    http.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let body = &response[response.find("\r\n\r\n").expect("an HTTP answer") + 4..];
    let varz: serde_json::Value = serde_json::from_str(body).unwrap();
    varz["in_msgs"].as_u64().expect("in_msgs")
}

/// A read of 200 records asks a newer server in a few requests (64 records each), not one
/// request a record; both ways read the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_asks_a_newer_server_for_64_records_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let monitor = free_port();
    let Some((_server, url)) = start_newer_server(dir.path(), Some(monitor)) else {
        return;
    };
    let name = "BATCH";
    let who = RecipientId::new("dave").unwrap();
    let now = Timestamp::now_system();
    let batched = connect(&url, name).await;
    let bodies: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let sent: Vec<Seq> = batched
        .append(
            &who,
            bodies.iter().map(|b| record(b, now, None)).collect(),
            &Quota::UNLIMITED,
            now,
        )
        .await
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq())
        .collect();
    let one_each =
        nats_support::own_server::connect_when_ready(|| options(name).batched_reads(false), &url)
            .await;
    let limit = BatchLimit {
        max_messages: 200,
        max_bytes: usize::MAX,
    };
    let mut asked = Vec::new();
    for storage in [&batched, &one_each] {
        let before = messages_in(monitor);
        let read = read_bodies(storage, &who, limit, now).await;
        asked.push(messages_in(monitor) - before);
        let expected: Vec<(Seq, Vec<u8>)> = sent.iter().copied().zip(bodies.clone()).collect();
        assert_eq!(read, expected);
    }
    // The meta's read and four batched gets (64, 64, 64, 8): 5 seen here. One a record: 201.
    assert!(asked[0] <= 6, "batched: {} requests", asked[0]);
    assert!(asked[1] >= 201, "one each: {} requests", asked[1]);
}

/// A server ends a batched answer once it holds the request's `max_bytes` (the server's
/// `max_payload`: 64 KiB here, four records of 16 KiB) and says how many it left out: a read
/// asks again for those, and reads every record, none taken for a hole. The server's
/// `max_pending` is 256 KiB: answers not bounded so (each filled to it, two in flight) made it
/// close the connection as a slow consumer, and the read failed. 101 records, so the last
/// answer of each request leaves one out (which 2.11 counts as none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_answer_cut_short_is_asked_again_for_the_rest() {
    let Some(newer) = newer_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small-answers.conf");
    // max_payload may not exceed max_pending.
    std::fs::write(&config, "max_pending: 262144\nmax_payload: 65536\n").unwrap();
    let (port, monitor) = (free_port(), free_port());
    let mut server = OwnNats::new(dir.path(), "small-answers", port, None);
    server.program(&newer).monitor(monitor).config_file(&config);
    server.start();
    let url = format!("nats://127.0.0.1:{port}");
    let name = "CUT";
    let storage = connect(&url, name).await;
    let who = RecipientId::new("erin").unwrap();
    let now = Timestamp::now_system();
    let bodies: Vec<Vec<u8>> = (0..101u8).map(|i| vec![i; 16 * 1024]).collect();
    let mut sent = Vec::new();
    for chunk in bodies.chunks(10) {
        let records = chunk.iter().map(|body| record(body, now, None)).collect();
        let outcome = storage
            .append(&who, records, &Quota::UNLIMITED, now)
            .await
            .unwrap();
        sent.extend(outcome.records.iter().map(|r| r.seq()));
    }
    let limit = BatchLimit {
        max_messages: 101,
        max_bytes: usize::MAX,
    };
    let before = messages_in(monitor);
    let read = read_bodies(&storage, &who, limit, now).await;
    let asked = messages_in(monitor) - before;
    let expected: Vec<(Seq, Vec<u8>)> = sent.into_iter().zip(bodies).collect();
    assert_eq!(read.len(), expected.len());
    assert!(read == expected, "the records read differ from those sent");
    // The meta's read, then 64 records in 16 answers and 37 in 10: 27. Not asked again, the
    // records left out were taken for holes: the read stopped at the first of them.
    assert!(asked <= 40, "{asked} requests");
    let stats = storage.stats(&who).await.unwrap();
    assert_eq!((stats.messages, stats.lost), (101, 0));
}

/// A send retried with its id is a duplicate while the server keeps the record (its TTL's
/// grace outlasts the dedup window), and is stored again once the server has removed the
/// record: by then its dedup entry has left too (the dedup stream keeps entries for the
/// storage's `dedup_window`, here 1 s), and the record's expiry is counted as a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_a_duplicate_while_its_record_is_kept_and_stored_again_after() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = start_newer_server(dir.path(), None) else {
        return;
    };
    let name = "RETRY";
    let storage = connect(&url, name).await;
    let who = RecipientId::new("frank").unwrap();
    // The storage's dedup window (see `options`): a quota may not ask for more.
    let quota = Quota {
        dedup_window: Duration::from_secs(1),
        ..Quota::UNLIMITED
    };
    let id = MessageId::generate();
    let send = |sent_at: Timestamp, lifetime: Option<Duration>| NewRecord {
        id,
        dedup: true,
        ..record(b"once", sent_at, lifetime)
    };
    let now = Timestamp::now_system();
    let first = storage
        .append(
            &who,
            vec![send(now, Some(Duration::from_secs(1)))],
            &quota,
            now,
        )
        .await
        .unwrap()
        .records[0];
    let Appended::Stored(stored_at) = first else {
        panic!("the first send was not stored: {first:?}");
    };
    let retried = storage
        .append(
            &who,
            vec![send(now, Some(Duration::from_secs(1)))],
            &quota,
            now,
        )
        .await
        .unwrap()
        .records[0];
    assert_eq!(retried, Appended::Duplicate(stored_at));

    wait_until_removed(&url, name, &record_subject(name, &who, stored_at)).await;
    let later = Timestamp::now_system();
    let late = storage
        .append(&who, vec![send(later, None)], &quota, later)
        .await
        .unwrap()
        .records[0];
    let Appended::Stored(stored_again) = late else {
        panic!("a retry after the record left was not stored: {late:?}");
    };
    assert!(stored_again > stored_at);
    let read = read_bodies(&storage, &who, BatchLimit::default(), later).await;
    assert_eq!(read, vec![(stored_again, b"once".to_vec())]);
    let stats = storage.stats(&who).await.unwrap();
    assert_eq!((stats.messages, stats.lost), (1, 1));
}
