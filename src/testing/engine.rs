//! The contract end to end (rules 1 and 2): the engine over the storage stores offline,
//! delivers in batches, redelivers what was not acked, marked, and wakes a live session.

use std::sync::Arc;

use super::{T0, recipient};
use crate::clock::ManualClock;
use crate::limits::BatchLimit;
use crate::message::Envelope;
use crate::queue::OfflineQueue;
use crate::storage::Storage;
use crate::transport::{Outbound, channel_transport};

/// The engine over this storage: offline store, batched delivery, ack, redelivery marked on the
/// next session, and a live session woken by a new send.
pub async fn engine_round_trip(storage: Arc<dyn Storage>) {
    use futures::StreamExt;
    let clock = ManualClock::new(T0);
    let queue = OfflineQueue::builder()
        .storage(storage)
        .clock(Arc::new(clock))
        .batch(BatchLimit {
            max_messages: 2,
            max_bytes: usize::MAX,
        })
        .build()
        .unwrap();
    let bob = recipient("bob");
    for i in 0..3u8 {
        queue
            .send(Envelope::new(bob.clone(), vec![i]))
            .await
            .unwrap();
    }
    // First session: receives two batches (2 + 1), acks only the first message.
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let client = async {
        let Some(Outbound::Batch(first)) = inbox.next().await else {
            panic!("first batch")
        };
        let Some(Outbound::Batch(second)) = inbox.next().await else {
            panic!("second batch")
        };
        assert_eq!(
            (first.messages.len(), second.messages.len()),
            (2, 1),
            "batch bound"
        );
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        handle.ack([first.messages[0].seq]);
        handle.close();
    };
    let (end, ()) = futures::join!(session.run(), client);
    end.unwrap();
    // Second session: the two unacked come back marked, then a live send arrives unmarked.
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let client = async {
        let Some(Outbound::Batch(again)) = inbox.next().await else {
            panic!("redelivery")
        };
        let payloads: Vec<&[u8]> = again.messages.iter().map(|d| &d.payload[..]).collect();
        assert_eq!(payloads, [[1u8], [2]], "unacked redelivered in order");
        assert!(
            again.messages.iter().all(|d| d.redelivered),
            "redeliveries are marked"
        );
        assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
        let receipt = queue
            .send(Envelope::new(bob.clone(), vec![9]))
            .await
            .unwrap();
        assert!(receipt.recipient_online);
        let Some(Outbound::Batch(live)) = inbox.next().await else {
            panic!("live delivery")
        };
        assert_eq!(live.messages[0].payload, [9][..]);
        assert!(!live.messages[0].redelivered);
        handle.ack_through(live.messages[0].seq);
        handle.close();
    };
    let (end, ()) = futures::join!(session.run(), client);
    end.unwrap();
    assert_eq!(queue.stats(&bob).await.unwrap().messages, 0, "all acked");
}

/// Where the storage keeps poll order, so does the engine: sends to one recipient, each polled
/// once as it is made and all left in flight, are stored in that order
/// ([`OfflineQueue::sends_keep_poll_order`]), however they are awaited afterwards.
pub async fn engine_sends_keep_poll_order(storage: Arc<dyn Storage>) {
    let queue = OfflineQueue::builder().storage(storage).build().unwrap();
    if !queue.sends_keep_poll_order() {
        return;
    }
    let bob = recipient("bob");
    let mut in_flight = Vec::new();
    for i in 0..40u8 {
        let mut send = Box::pin(queue.send(Envelope::new(bob.clone(), vec![i])));
        let done = super::poll_once(&mut send);
        in_flight.push((done, send));
    }
    let mut seqs = Vec::new();
    // Awaited last to first, so the order of completion is no help.
    for (done, send) in in_flight.into_iter().rev() {
        let receipt = match done {
            Some(receipt) => receipt,
            None => send.await,
        };
        seqs.push(receipt.expect("send").seq);
    }
    seqs.reverse();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sends stored in the order of their first polls: {seqs:?}"
    );
}
