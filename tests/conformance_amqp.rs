//! The shared conformance suite against `AmqpStorage` (`OFFLINE_QUEUE_AMQP_URL`), in a virtual
//! host of the test's own with a queue prefix per check; then what only this backend has:
//! ids of any bytes, queue arguments that differ, and records held by one node handed to
//! another. Skipped, and says so, when the variable is unset.

#![cfg(all(feature = "amqp", feature = "testing"))]

mod amqp_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amqp_support::{Vhost, url};
use offline_queue::storage::NewRecord;
use offline_queue::storage::QueueType;
use offline_queue::{
    AmqpStorage, MessageId, Quota, RecipientId, Seq, Storage, StorageExt, testing,
};

async fn storage(url: &str, prefix: &str) -> AmqpStorage {
    AmqpStorage::options()
        .prefix(prefix)
        .connect(url)
        .await
        .expect("connect")
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

/// The number a test record's body starts with (`record(&n.to_be_bytes())`).
fn number(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// The suite on `queue_type`, with `consumer_wait` if given (else the default).
async fn conformance(queue_type: QueueType, consumer_wait: Option<Duration>) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "conformance");
    let next = AtomicU32::new(0);
    testing::run_all(|| {
        let prefix = format!("c{}", next.fetch_add(1, Ordering::Relaxed));
        let url = vhost.url.clone();
        async move {
            let mut options = AmqpStorage::options().prefix(prefix).queue_type(queue_type);
            if let Some(wait) = consumer_wait {
                options = options.consumer_wait(wait);
            }
            let storage = options.connect(&url).await.expect("connect");
            Arc::new(storage) as Arc<dyn Storage>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_pass_the_conformance_suite() {
    conformance(QueueType::Quorum, None).await;
}

/// A read's consumer cancelled the moment it has taken what already arrived: deliveries are
/// still on their way at every cancel, so this is the fence's test. What reached the client
/// before the cancel's answer is held, the broker takes back the rest, and the next
/// `basic.get` sees it: no record is skipped, held unseen, or read out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_pass_the_conformance_suite_with_consumers_cancelled_at_once() {
    conformance(QueueType::Quorum, Some(Duration::ZERO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_pass_the_conformance_suite() {
    conformance(QueueType::Classic, None).await;
}

/// Ids with dots, stars, NUL and every byte value, up to the 255-byte limit (a hashed queue
/// name): each sees only its own records, stored exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_any_bytes_are_isolated_and_stored_exactly() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "ids");
    let storage = storage(&vhost.url, "ids").await;
    let all_bytes: Vec<u8> = (0..=254u8).rev().collect();
    let ids: Vec<Vec<u8>> = vec![
        b"a.b".to_vec(),
        b"a*b>".to_vec(),
        b"nul\0id".to_vec(),
        b"amq.x".to_vec(),
        vec![0xff; 255],
        all_bytes,
    ];
    for (i, id) in ids.iter().enumerate() {
        let who = RecipientId::new(id).unwrap();
        storage
            .append(
                &who,
                vec![record(&[i as u8])],
                &Quota::UNLIMITED,
                testing::T0,
            )
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let who = RecipientId::new(id).unwrap();
        let got = storage.read_all(&who, testing::T0).await.unwrap();
        let bodies: Vec<Vec<u8>> = got.iter().map(|r| r.body.to_vec()).collect();
        assert_eq!(bodies, [vec![i as u8]], "id {i}");
    }
}

/// A queue that exists with other limits is refused, naming the argument, never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_other_limits_is_refused() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "args");
    let bob = RecipientId::new("bob").unwrap();
    let first = storage(&vhost.url, "args").await;
    let small = Quota {
        max_messages: 5,
        ..Quota::UNLIMITED
    };
    first
        .append(&bob, vec![record(b"1")], &small, testing::T0)
        .await
        .unwrap();
    let second = storage(&vhost.url, "args").await;
    let err = second
        .append(&bob, vec![record(b"2")], &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_retryable() && text.contains("x-max-length"),
        "{text}"
    );
    assert_eq!(first.read_all(&bob, testing::T0).await.unwrap().len(), 1);
}

/// The first sends to a new quorum queue, from many tasks on two nodes at once, are all
/// stored. (A quorum queue declared again while its first declare is still starting it used
/// to nack the publishes that followed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sends_racing_to_a_new_queue_are_all_stored() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "first");
    let bob = RecipientId::new("bob").unwrap();
    for round in 0..30 {
        let prefix = format!("first{round}");
        let nodes = [
            Arc::new(storage(&vhost.url, &prefix).await),
            Arc::new(storage(&vhost.url, &prefix).await),
        ];
        let sends = (0..16u8).map(|i| {
            let node = nodes[usize::from(i % 2)].clone();
            let bob = bob.clone();
            async move {
                node.append(&bob, vec![record(&[i])], &Quota::UNLIMITED, testing::T0)
                    .await
            }
        });
        for (i, sent) in futures::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(error) = sent {
                panic!("round {round}, send {i}: {error}");
            }
        }
        let mut bodies: Vec<u8> = nodes[0]
            .read_all(&bob, testing::T0)
            .await
            .unwrap()
            .iter()
            .map(|r| r.body[0])
            .collect();
        bodies.sort();
        assert_eq!(bodies, (0..16).collect::<Vec<_>>(), "round {round}");
    }
}

/// Records one node read and still holds are invisible to another until the first lets go
/// (its purge after `hold_idle`, or its end); then the other reads them in order, with their
/// seqs, each counted once more: the broker counts every hand-back, whether the node that
/// held a record delivered it or only read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_by_one_node_pass_to_another_when_it_lets_go() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "hold");
    let bob = RecipientId::new("bob").unwrap();
    let one = AmqpStorage::options()
        .prefix("hold")
        .hold_idle(std::time::Duration::ZERO)
        .connect(&vhost.url)
        .await
        .unwrap();
    let two = AmqpStorage::options()
        .prefix("hold")
        .hold_idle(std::time::Duration::ZERO)
        .connect(&vhost.url)
        .await
        .unwrap();
    let seqs: Vec<_> = one
        .append(
            &bob,
            (0..3u8).map(|i| record(&[i])).collect(),
            &Quota::UNLIMITED,
            testing::T0,
        )
        .await
        .unwrap()
        .records
        .iter()
        .map(|a| a.seq())
        .collect();
    let limit = offline_queue::BatchLimit {
        max_messages: 2,
        max_bytes: usize::MAX,
    };
    let held = one
        .read_for_delivery(&bob, None, None, limit, testing::T0)
        .await
        .unwrap();
    assert_eq!(held.batch.records.len(), 2);
    let other = two.read_all(&bob, testing::T0).await.unwrap();
    let bodies: Vec<u8> = other.iter().map(|r| r.body[0]).collect();
    assert_eq!(bodies, [2], "the held two are not readable elsewhere");
    assert_eq!(
        two.stats(&bob).await.unwrap().messages,
        1,
        "only what is ready, and its own"
    );
    // Both let go. The broker puts handed-back records first, in the order they came back,
    // and two nodes' hand-backs can come back either way round: the reader keeps seqs
    // increasing (renumbering what comes after a higher one), not the send order.
    one.purge(testing::T0, None, 100).await.unwrap();
    two.purge(testing::T0, None, 100).await.unwrap();
    let after = two.read_all(&bob, testing::T0).await.unwrap();
    let mut got: Vec<(u8, u32)> = after
        .iter()
        .map(|r| (r.body[0], r.delivery_count))
        .collect();
    got.sort();
    assert_eq!(got, [(0, 1), (1, 1), (2, 1)], "handed back, counted once");
    let read: Vec<_> = after.iter().map(|r| r.seq).collect();
    assert!(
        read.windows(2).all(|w| w[0] < w[1]) && read[0] >= seqs[0],
        "seqs increase: {read:?} (sent as {seqs:?})"
    );
    // One node holding them all hands them back in order, with their seqs.
    two.purge(testing::T0, None, 100).await.unwrap();
    let again = one.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(
        again.iter().map(|r| r.seq).collect::<Vec<_>>(),
        read,
        "the next node reads them in the same order, at the same seqs"
    );
}

/// On a quorum queue a read takes its batch with a consumer of its own, prefetching what the
/// broker said was ready. Another consumer on the queue (a raw one, taking and acking one
/// record at a time) gets part of that, so the read waits for deliveries that never come and
/// cancels its consumer. Every record is still read exactly once by one of the two: none is
/// left taken and unseen by the reading node, and none is read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_sharing_a_queue_with_another_consumer_hide_nothing() {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
    };

    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "share");
    let bob = RecipientId::new("bob").unwrap();
    let reader = storage(&vhost.url, "share").await;
    const SENT: u16 = 300;
    let records = (0..SENT).map(|i| record(&i.to_be_bytes())).collect();
    reader
        .append(&bob, records, &Quota::UNLIMITED, testing::T0)
        .await
        .unwrap();

    let connection = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut other = channel
        .basic_consume(
            "share.626f62".into(),
            "other".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let other_task = tokio::spawn(async move {
        let mut taken = Vec::new();
        while let Some(delivery) = other.next().await {
            let delivery = delivery.unwrap();
            taken.push(number(&delivery.data));
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        taken
    });

    let limit = offline_queue::BatchLimit {
        max_messages: 50,
        max_bytes: usize::MAX,
    };
    let mut read = Vec::new();
    let mut after = None;
    loop {
        let batch = reader.read(&bob, after, limit, testing::T0).await.unwrap();
        let Some(last) = batch.records.last() else {
            break;
        };
        reader
            .ack_through(&bob, last.seq, testing::T0)
            .await
            .unwrap();
        after = Some(last.seq);
        read.extend(batch.records.iter().map(|r| number(&r.body)));
    }
    channel
        .basic_cancel("other".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let taken = other_task.await.unwrap();
    // What the other consumer had on its way when it was cancelled went back to the queue.
    let rest = reader.read_all(&bob, testing::T0).await.unwrap();
    if let Some(last) = rest.last() {
        reader
            .ack_through(&bob, last.seq, testing::T0)
            .await
            .unwrap();
    }
    read.extend(rest.iter().map(|r| number(&r.body)));

    assert!(
        !read.is_empty() && !taken.is_empty(),
        "both consumers got some: read {}, taken {}",
        read.len(),
        taken.len()
    );
    let mut all: Vec<u16> = read.iter().chain(&taken).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..SENT).collect::<Vec<_>>(),
        "each record once: read {}, taken by the other {}",
        read.len(),
        taken.len()
    );
    reader.close().await;
    let after_close = storage(&vhost.url, "share").await;
    assert!(
        after_close
            .read_all(&bob, testing::T0)
            .await
            .unwrap()
            .is_empty(),
        "nothing was held unseen, to come back when the reader let go"
    );
}

/// One node's concurrent appends to one recipient reach its queue in stamp order: every
/// record is read at the seq its append returned (none renumbered), so a seq means the same
/// record to every reader, before and after a hand-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nodes_concurrent_appends_are_read_at_the_seqs_they_returned() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "stamps");
    let bob = RecipientId::new("bob").unwrap();
    let node = Arc::new(storage(&vhost.url, "stamps").await);
    let senders = (0..16u8).map(|sender| {
        let node = node.clone();
        let bob = bob.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..20u8 {
                let outcome = node
                    .append(
                        &bob,
                        vec![record(&[sender, i])],
                        &Quota::UNLIMITED,
                        testing::T0,
                    )
                    .await
                    .unwrap();
                sent.push(([sender, i], outcome.records[0].seq()));
            }
            sent
        })
    });
    let mut sent = std::collections::HashMap::new();
    for task in futures::future::join_all(senders).await {
        sent.extend(task.unwrap());
    }
    let read = node.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(read.len(), sent.len());
    for record in &read {
        let body = [record.body[0], record.body[1]];
        assert_eq!(
            record.seq, sent[&body],
            "record {body:?} read at the seq its append returned"
        );
    }
}

/// Records one node took over several reads and then let go come back to the next node in the
/// order sent, at the seqs their appends returned. A classic queue puts them back where they
/// were. A quorum queue puts back each consumer's share in the order of the consumers' keys:
/// the batch consumers' tags count up, and a holder that holds records asks the queue's count
/// instead of taking with a get (each get is a consumer of its own, whose record would come
/// back ahead of the rest). Past 32 consumers a quorum queue hands back in no set order, and
/// the next node puts them in order when it takes the queue over.
async fn records_taken_in_many_reads_come_back_in_order_when_let_go(
    queue_type: QueueType,
    waves: u16,
    per_wave: u16,
) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "handback");
    let bob = RecipientId::new("bob").unwrap();
    let node = async || {
        AmqpStorage::options()
            .prefix("handback")
            .queue_type(queue_type)
            .connect(&vhost.url)
            .await
            .unwrap()
    };
    let one = node().await;
    let limit = offline_queue::BatchLimit {
        max_messages: 40,
        max_bytes: usize::MAX,
    };
    let body = |r: &offline_queue::storage::StoredRecord| number(&r.body);
    // Waves, each read to its end before the next is sent: later reads start with the node
    // already holding records.
    let mut sent: Vec<Seq> = Vec::new();
    let mut after = None;
    let mut taken = Vec::new();
    for wave in 0..waves {
        let records = (wave * per_wave..(wave + 1) * per_wave)
            .map(|i| record(&i.to_be_bytes()))
            .collect();
        let appended = one
            .append(&bob, records, &Quota::UNLIMITED, testing::T0)
            .await
            .unwrap();
        sent.extend(appended.records.iter().map(|a| a.seq()));
        while taken.len() < sent.len() {
            let batch = one.read(&bob, after, limit, testing::T0).await.unwrap();
            assert!(
                !batch.records.is_empty(),
                "a read came back empty after {}",
                taken.len()
            );
            taken.extend(batch.records.iter().map(body));
            after = batch.records.last().map(|r| r.seq);
        }
    }
    let all: Vec<u16> = (0..waves * per_wave).collect();
    assert_eq!(taken, all, "the first node reads them in order");
    one.close().await;
    let two = node().await;
    let again = two.read_all(&bob, testing::T0).await.unwrap();
    let bodies: Vec<u16> = again.iter().map(body).collect();
    assert_eq!(bodies, all, "in the order sent");
    let seqs: Vec<Seq> = again.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, sent, "at the seqs their appends returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_taken_in_many_reads_come_back_in_order_from_a_classic_queue() {
    records_taken_in_many_reads_come_back_in_order_when_let_go(QueueType::Classic, 3, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_taken_in_many_reads_come_back_in_order_from_a_quorum_queue() {
    records_taken_in_many_reads_come_back_in_order_when_let_go(QueueType::Quorum, 3, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_taken_by_more_than_32_consumers_come_back_in_order_from_a_quorum_queue() {
    records_taken_in_many_reads_come_back_in_order_when_let_go(QueueType::Quorum, 48, 5).await;
}

/// A node of prefix `prefix` on `queue_type` queues whose clock is `behind` the others'.
async fn skewed_node(
    url: &str,
    prefix: &str,
    queue_type: QueueType,
    behind: Duration,
) -> AmqpStorage {
    AmqpStorage::options()
        .prefix(prefix)
        .queue_type(queue_type)
        .clock_behind_for_tests(behind)
        .connect(url)
        .await
        .expect("connect")
}

/// What a read returned: (the number in each body, its seq).
fn numbered(records: &[offline_queue::storage::StoredRecord]) -> Vec<(u16, Seq)> {
    records.iter().map(|r| (number(&r.body), r.seq)).collect()
}

/// Appends record number `n` for `bob` within `quota`; the seq the node stamped.
async fn append_numbered(node: &AmqpStorage, bob: &RecipientId, n: u16, quota: &Quota) -> Seq {
    node.append(bob, vec![record(&n.to_be_bytes())], quota, testing::T0)
        .await
        .unwrap()
        .records[0]
        .seq()
}

/// Waits until `bob`'s queue has `count` records ready (a hand-back the broker finishes in
/// its own time), at most 10 s.
async fn until_ready(node: &AmqpStorage, bob: &RecipientId, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node.stats(bob).await.unwrap().messages != count {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never had {count} ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const MINUTE: Duration = Duration::from_secs(60);

/// A node whose clock is a minute behind sends after another node's record was read and
/// acked: its stamp is below the acked seq. The next node to read the queue, which never saw
/// the ack, must still number it above (the ledger's floor), or the client would see a seq
/// it already acked come back.
async fn a_late_stamp_is_read_above_the_acked_seq(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "floor");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let ahead = skewed_node(url, "floor", queue_type, Duration::ZERO).await;
    let behind = skewed_node(url, "floor", queue_type, MINUTE).await;
    let sent = append_numbered(&ahead, &bob, 1, &Quota::UNLIMITED).await;
    let first = skewed_node(url, "floor", queue_type, Duration::ZERO).await;
    let read = first.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(numbered(&read), [(1, sent)]);
    assert_eq!(first.ack_through(&bob, sent, testing::T0).await.unwrap(), 1);
    first.close().await;
    let late = append_numbered(&behind, &bob, 2, &Quota::UNLIMITED).await;
    assert!(late < sent, "stamped a minute behind: {late:?} < {sent:?}");
    let second = skewed_node(url, "floor", queue_type, Duration::ZERO).await;
    let read = second.read_all(&bob, testing::T0).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(number(&read[0].body), 2);
    assert!(
        read[0].seq > sent,
        "read at {:?}, at or below the acked {sent:?}",
        read[0].seq
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_stamp_is_read_above_the_acked_seq_on_a_classic_queue() {
    a_late_stamp_is_read_above_the_acked_seq(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_stamp_is_read_above_the_acked_seq_on_a_quorum_queue() {
    a_late_stamp_is_read_above_the_acked_seq(QueueType::Quorum).await;
}

/// A node that reads while another still holds the records finds nothing. The other then
/// acks and lets go, and a late stamp below that ack arrives: the first node's next read
/// still numbers it above the ack, because a holder that has taken nothing yet reads the
/// ledger again before each read.
async fn a_reader_that_found_nothing_sees_the_acks_made_meanwhile(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "meanwhile");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let ahead = skewed_node(url, "meanwhile", queue_type, Duration::ZERO).await;
    let behind = skewed_node(url, "meanwhile", queue_type, MINUTE).await;
    let sent = append_numbered(&ahead, &bob, 1, &Quota::UNLIMITED).await;
    let first = skewed_node(url, "meanwhile", queue_type, Duration::ZERO).await;
    let second = skewed_node(url, "meanwhile", queue_type, Duration::ZERO).await;
    let read = numbered(&first.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read, [(1, sent)]);
    assert!(
        second.read_all(&bob, testing::T0).await.unwrap().is_empty(),
        "held by the first node"
    );
    assert_eq!(first.ack_through(&bob, sent, testing::T0).await.unwrap(), 1);
    first.close().await;
    let late = append_numbered(&behind, &bob, 2, &Quota::UNLIMITED).await;
    assert!(late < sent);
    let read = numbered(&second.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read.len(), 1);
    assert!(
        read[0].0 == 2 && read[0].1 > sent,
        "read {read:?}, at or below the acked {sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_found_nothing_sees_the_acks_made_meanwhile_on_a_classic_queue() {
    a_reader_that_found_nothing_sees_the_acks_made_meanwhile(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_found_nothing_sees_the_acks_made_meanwhile_on_a_quorum_queue() {
    a_reader_that_found_nothing_sees_the_acks_made_meanwhile(QueueType::Quorum).await;
}

/// A record a node renumbered (stamped below one read before it) keeps that seq when the
/// next node reads it, even when the record it was numbered after is gone without an ack
/// (here dropped by a length limit): the ledger pins it.
async fn a_renumbered_record_keeps_its_seq_on_the_next_node(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "pins");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let two = Quota {
        max_messages: 2,
        overflow: offline_queue::Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    let ahead = skewed_node(url, "pins", queue_type, Duration::ZERO).await;
    let behind = skewed_node(url, "pins", queue_type, MINUTE).await;
    let first_sent = append_numbered(&ahead, &bob, 1, &two).await;
    let late = append_numbered(&behind, &bob, 2, &two).await;
    assert!(late < first_sent);
    let first = skewed_node(url, "pins", queue_type, Duration::ZERO).await;
    let read = numbered(&first.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read.len(), 2);
    assert_eq!(read[0], (1, first_sent));
    let (number, renumbered) = read[1];
    assert!(number == 2 && renumbered > first_sent, "{read:?}");
    first.close().await;
    until_ready(&ahead, &bob, 2).await;
    // A third record: the queue holds two, so the broker drops the oldest, record 1.
    let third = append_numbered(&ahead, &bob, 3, &two).await;
    until_ready(&ahead, &bob, 2).await;
    let second = skewed_node(url, "pins", queue_type, Duration::ZERO).await;
    let read = numbered(&second.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read.len(), 2, "{read:?}");
    assert_eq!(
        read[0],
        (2, renumbered),
        "the seq the first node handed out"
    );
    assert_eq!(read[1].0, 3);
    assert!(read[1].1 > renumbered && read[1].1 >= third, "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renumbered_record_keeps_its_seq_on_the_next_node_from_a_classic_queue() {
    a_renumbered_record_keeps_its_seq_on_the_next_node(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renumbered_record_keeps_its_seq_on_the_next_node_from_a_quorum_queue() {
    a_renumbered_record_keeps_its_seq_on_the_next_node(QueueType::Quorum).await;
}

/// This backend stores a resend again (no dedup): two records with one message id. When
/// the resend, from a node whose clock lags, is renumbered, the next node still gives each
/// copy the seq it had: a pin names a record by id and stamp, not by id alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renumbered_resend_and_its_original_keep_their_seqs_on_the_next_node() {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "resend");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let ahead = skewed_node(url, "resend", QueueType::Classic, Duration::ZERO).await;
    let behind = skewed_node(url, "resend", QueueType::Classic, MINUTE).await;
    let original = record(&1u16.to_be_bytes());
    let mut resend = record(&2u16.to_be_bytes());
    resend.id = original.id;
    for (node, record) in [(&ahead, original), (&behind, resend)] {
        node.append(&bob, vec![record], &Quota::UNLIMITED, testing::T0)
            .await
            .unwrap();
    }
    let first = skewed_node(url, "resend", QueueType::Classic, Duration::ZERO).await;
    let read = numbered(&first.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read.len(), 2);
    assert!(
        read[0].0 == 1 && read[1].0 == 2 && read[1].1 > read[0].1,
        "{read:?}"
    );
    first.close().await;
    until_ready(&ahead, &bob, 2).await;
    let second = skewed_node(url, "resend", QueueType::Classic, Duration::ZERO).await;
    let again = numbered(&second.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(again, read, "each copy at the seq it had");
}

/// A record left unacked below one acked on its own (an ack of seqs, not through) keeps its
/// seq on the next node, rather than coming back above the acked one.
async fn a_record_left_below_an_acked_one_keeps_its_seq(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "below");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let node = skewed_node(url, "below", queue_type, Duration::ZERO).await;
    let sent: Vec<Seq> = node
        .append(
            &bob,
            (1..=3u16).map(|n| record(&n.to_be_bytes())).collect(),
            &Quota::UNLIMITED,
            testing::T0,
        )
        .await
        .unwrap()
        .records
        .iter()
        .map(|a| a.seq())
        .collect();
    let first = skewed_node(url, "below", queue_type, Duration::ZERO).await;
    let read = numbered(&first.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(read, [(1, sent[0]), (2, sent[1]), (3, sent[2])]);
    assert_eq!(
        first.ack_seqs(&bob, &[sent[1]], testing::T0).await.unwrap(),
        1
    );
    first.close().await;
    until_ready(&node, &bob, 2).await;
    let second = skewed_node(url, "below", queue_type, Duration::ZERO).await;
    let read = numbered(&second.read_all(&bob, testing::T0).await.unwrap());
    assert_eq!(
        read,
        [(1, sent[0]), (3, sent[2])],
        "at the seqs handed out before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_left_below_an_acked_one_keeps_its_seq_on_a_classic_queue() {
    a_record_left_below_an_acked_one_keeps_its_seq(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_left_below_an_acked_one_keeps_its_seq_on_a_quorum_queue() {
    a_record_left_below_an_acked_one_keeps_its_seq(QueueType::Quorum).await;
}

/// Two nodes send to one recipient at once, one with its clock `skew` behind, while readers
/// on two other nodes take the queue over in turn: each reads a batch, acks part of it (up to
/// a seq, or single seqs, or nothing), and lets go. Across all of it, a record keeps the seq
/// it was first read at, a seq names one record, a record first read after an ack is above
/// every seq acked, no acked record comes back, every record is read, and each sender's
/// records are read in the order sent. (A quorum queue puts a record handed back a second
/// time behind those handed back once: the reader that takes over puts them in order.)
async fn two_senders_with_clocks_apart_and_readers_taking_over(queue_type: QueueType) {
    let Some(url) = url() else {
        return;
    };
    let vhost = Vhost::new(&url, "takeover");
    let bob = RecipientId::new("bob").unwrap();
    let url = vhost.url.as_str();
    let senders = [
        skewed_node(url, "takeover", queue_type, Duration::ZERO).await,
        skewed_node(url, "takeover", queue_type, Duration::from_millis(40)).await,
    ];
    let readers = [
        skewed_node(url, "takeover", queue_type, Duration::ZERO).await,
        skewed_node(url, "takeover", queue_type, Duration::ZERO).await,
    ];
    // A fixed walk (an LCG), the same every run.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |below: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % below
    };
    // Record body: [sender, n as u16]; what each was read at, and what each seq named.
    let mut seq_of: std::collections::HashMap<(u8, u16), Seq> = Default::default();
    let mut record_at: std::collections::HashMap<Seq, (u8, u16)> = Default::default();
    let mut acked: std::collections::HashSet<(u8, u16)> = Default::default();
    let mut floor: Option<Seq> = None;
    let mut sent = [0u16; 2];
    let body = |r: &offline_queue::storage::StoredRecord| {
        (r.body[0], u16::from_be_bytes([r.body[1], r.body[2]]))
    };
    for round in 0..40 {
        if round < 32 {
            // Both send a few at once, each in its own order.
            let mut sends = Vec::new();
            for (sender, node) in senders.iter().enumerate() {
                let count = 1 + next(4) as u16;
                let from = sent[sender];
                sent[sender] += count;
                let bob = &bob;
                sends.push(async move {
                    for n in from..from + count {
                        let mut record = record(&[]);
                        record.body = [&[sender as u8][..], &n.to_be_bytes()].concat();
                        node.append(bob, vec![record], &Quota::UNLIMITED, testing::T0)
                            .await
                            .unwrap();
                    }
                });
            }
            futures::future::join_all(sends).await;
        }
        let reader = &readers[round % 2];
        let limit = offline_queue::BatchLimit {
            max_messages: 1 + next(12) as usize,
            max_bytes: usize::MAX,
        };
        let batch = reader.read(&bob, None, limit, testing::T0).await.unwrap();
        for record in &batch.records {
            let key = body(record);
            assert!(
                !acked.contains(&key),
                "round {round}: {key:?} read after its ack"
            );
            match seq_of.get(&key) {
                Some(&seq) => assert_eq!(seq, record.seq, "round {round}: {key:?} renumbered"),
                None => {
                    assert!(
                        floor.is_none_or(|floor| record.seq > floor),
                        "round {round}: {key:?} first read at {:?}, at or below the acked {floor:?}",
                        record.seq
                    );
                    seq_of.insert(key, record.seq);
                }
            }
            let named = *record_at.entry(record.seq).or_insert(key);
            assert_eq!(
                named, key,
                "round {round}: {:?} names two records",
                record.seq
            );
        }
        let seqs: Vec<Seq> = batch.records.iter().map(|r| r.seq).collect();
        let ack = match (next(3), seqs.len()) {
            (_, 0) | (0, _) => Vec::new(),
            (1, n) => seqs[..=next(n as u64) as usize].to_vec(),
            (_, n) => seqs
                .iter()
                .copied()
                .filter(|_| next(2) == 0)
                .take(n)
                .collect(),
        };
        if !ack.is_empty() {
            reader.ack_seqs(&bob, &ack, testing::T0).await.unwrap();
            for seq in &ack {
                acked.insert(record_at[seq]);
                floor = floor.max(Some(*seq));
            }
        }
        reader.close().await;
        let waiting = u64::from(sent[0]) + u64::from(sent[1]) - acked.len() as u64;
        until_ready(&readers[(round + 1) % 2], &bob, waiting).await;
    }
    // The rest, by one node.
    let rest = readers[0].read_all(&bob, testing::T0).await.unwrap();
    for record in &rest {
        let key = body(record);
        assert!(!acked.contains(&key), "{key:?} read after its ack");
        if let Some(&seq) = seq_of.get(&key) {
            assert!(seq == record.seq, "{key:?} renumbered at the end");
        }
        seq_of.entry(key).or_insert(record.seq);
    }
    for sender in 0..2u8 {
        let order: Vec<Seq> = (0..sent[sender as usize])
            .map(|n| seq_of[&(sender, n)])
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "sender {sender}'s records out of order: {order:?}"
        );
    }
    assert_eq!(seq_of.len(), usize::from(sent[0]) + usize::from(sent[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_with_clocks_apart_and_readers_taking_over_a_classic_queue() {
    two_senders_with_clocks_apart_and_readers_taking_over(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_with_clocks_apart_and_readers_taking_over_a_quorum_queue() {
    two_senders_with_clocks_apart_and_readers_taking_over(QueueType::Quorum).await;
}
