//! How many recipients one RabbitMQ holds: sends one message to each of N recipients through
//! `AmqpStorage` (a queue each), from 64 concurrent senders, and prints how long it took. Run
//! it against a broker of its own and read the broker's memory before and after
//! (`benches/amqp_scale.sh` does all of it; figures in BENCHMARKS.md):
//!
//! ```sh
//! cargo run --release --features amqp --example amqp_scale -- \
//!     amqp://guest:guest@127.0.0.1:5672/%2f 10000 quorum
//! ```
//!
//! Arguments: the broker's URL, the number of recipients (default 10,000), and `quorum`
//! (default) or `classic`. Queues are named `oqscale.<hex id>` and left in place, to be
//! measured; a broker of the run's own is thrown away after.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use offline_queue::storage::{NewRecord, QueueType};
use offline_queue::{AmqpStorage, MessageId, Quota, RecipientId, Storage, Timestamp};

const SENDERS: usize = 64;
const BODY: usize = 256;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: amqp_scale URL [RECIPIENTS] [quorum|classic]")?;
    let recipients: usize = args.next().map_or(Ok(10_000), |n| n.parse())?;
    let queue_type = match args.next().as_deref() {
        None | Some("quorum") => QueueType::Quorum,
        Some("classic") => QueueType::Classic,
        Some(other) => return Err(format!("queue type {other:?}: quorum or classic").into()),
    };
    let storage = Arc::new(
        AmqpStorage::options()
            .prefix("oqscale")
            .queue_type(queue_type)
            .connect(&url)
            .await?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let senders = (0..SENDERS).map(|_| {
        let storage = storage.clone();
        let next = next.clone();
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= recipients {
                    return Ok::<_, offline_queue::Error>(());
                }
                let recipient = RecipientId::new(format!("user-{i}"))?;
                let now = Timestamp::now_system();
                let record = NewRecord {
                    id: MessageId::generate(),
                    dedup: false,
                    sent_at: now,
                    expires_at: None,
                    body: vec![7; BODY],
                };
                storage
                    .append_one(&recipient, record, &Quota::UNLIMITED, now)
                    .await?;
            }
        })
    });
    for sender in futures::future::join_all(senders).await {
        sender??;
    }
    let elapsed = start.elapsed();
    println!(
        "{recipients} {queue_type:?} queues of one {BODY}-byte message each in {:.1} s \
         ({:.0} queues/s)",
        elapsed.as_secs_f64(),
        recipients as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
