//! The whole offline-to-delivered path in one process, on the embedded durable storage:
//! alice sends three messages to bob while he is offline (they go to a redb file, fsynced),
//! bob gets one push nudge (not three), connects, receives them in one batch, acks them, and
//! his queue is empty.
//!
//! Run it: `cargo run --example quickstart`
//! (the file is `offline-queue-data/quickstart.redb` under the current directory).

use std::sync::Arc;

use futures::StreamExt;
use offline_queue::{
    Envelope, Notifier, NotifyError, Nudge, OfflineQueue, Outbound, RecipientId, RedbStorage,
    channel_transport,
};

/// A notifier that prints instead of calling a push service. A real one queues the nudge
/// (`ChannelNotifier`) and calls FCM, APNs or a webhook from its own task, so `send` never
/// waits on the network.
struct PrintingNotifier;

impl Notifier for PrintingNotifier {
    fn notify(&self, nudge: Nudge) -> Result<(), NotifyError> {
        println!(
            "push -> {}: {:?}, {} message(s) waiting (no content in the push)",
            nudge.recipient,
            nudge.reason,
            nudge.pending.unwrap_or(0)
        );
        Ok(())
    }
}

fn main() -> Result<(), offline_queue::Error> {
    // No runtime needed: the engine is plain futures. A tokio server would `.await` the same calls.
    futures::executor::block_on(run())
}

async fn run() -> Result<(), offline_queue::Error> {
    // Durable: a send returns once its message is on disk. For tests, leave `.storage(..)`
    // out and the queue keeps messages in memory.
    let storage = RedbStorage::open("offline-queue-data/quickstart.redb")?;
    println!("storage: {}", storage.path().display());
    let queue = OfflineQueue::builder()
        .storage(Arc::new(storage))
        .notifier(Arc::new(PrintingNotifier))
        .build()?;
    let bob = RecipientId::new("bob")?;

    println!("bob is offline; alice sends three messages");
    for text in ["hi bob", "are you there?", "call me"] {
        let receipt = queue.send(Envelope::new(bob.clone(), text)).await?;
        println!(
            "stored {} as seq {} (bob online: {})",
            receipt.id, receipt.seq, receipt.recipient_online
        );
    }
    let stats = queue.stats(&bob).await?;
    println!(
        "bob's queue: {} messages, {} bytes",
        stats.messages, stats.bytes
    );

    println!("bob connects");
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    // The driver future delivers; a server would spawn it next to the socket's read loop.
    let driver = session.run();
    let client = async {
        while let Some(item) = inbox.next().await {
            match item {
                Outbound::Batch(batch) => {
                    println!("bob receives a batch of {}", batch.messages.len());
                    for message in &batch.messages {
                        println!(
                            "  seq {}: {:?} (redelivered: {})",
                            message.seq,
                            String::from_utf8_lossy(&message.payload),
                            message.redelivered
                        );
                    }
                    let last = batch.messages.last().expect("a batch with messages").seq;
                    println!("bob acks through seq {last}");
                    handle.ack_through(last);
                }
                Outbound::CaughtUp => {
                    println!("bob has caught up");
                    handle.close();
                }
                other => println!("bob receives {other:?}"),
            }
        }
    };
    let (end, ()) = futures::join!(driver, client);
    println!("session ended: {:?}", end?);

    let stats = queue.stats(&bob).await?;
    println!("bob's queue after acks: {} messages", stats.messages);
    let metrics = queue.metrics();
    println!(
        "metrics: stored {}, delivered {}, acked {}, pushes sent {}, pushes coalesced {}",
        metrics.stored,
        metrics.delivered,
        metrics.acked,
        metrics.notifications_sent,
        metrics.notifications_coalesced
    );
    Ok(())
}
