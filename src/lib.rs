//! Holds messages for recipients who are not connected and delivers them, in order and in
//! batches, when they come back.
//!
//! Your server owns its sockets and users; this crate owns the waiting: storage, TTL expiry,
//! size limits and quotas, batched delivery on reconnect with acks and redelivery, and
//! coalesced, content-free push nudges for offline recipients.
//!
//! ```
//! use offline_queue::{channel_transport, Envelope, OfflineQueue, Outbound, RecipientId};
//! use futures::StreamExt;
//!
//! # futures::executor::block_on(async {
//! let queue = OfflineQueue::builder().build()?; // in-memory storage, system clock
//! let bob = RecipientId::new("bob")?;
//!
//! // Bob is offline: the message is stored.
//! let receipt = queue.send(Envelope::new(bob.clone(), "hi bob")).await?;
//! assert!(!receipt.recipient_online);
//!
//! // Bob connects: his session hands the backlog to his transport in batches.
//! let (transport, mut inbox) = channel_transport(16);
//! let session = queue.connect(bob.clone(), transport);
//! let handle = session.handle();
//! let driver = session.run(); // spawn this, or poll it in the connection's task
//! let client = async {
//!     let Some(Outbound::Batch(batch)) = inbox.next().await else { panic!() };
//!     assert_eq!(batch.messages[0].payload, &b"hi bob"[..]);
//!     handle.ack_through(batch.messages[0].seq); // acked: removed from storage
//!     assert_eq!(inbox.next().await, Some(Outbound::CaughtUp));
//!     handle.close();
//! };
//! let (end, ()) = futures::join!(driver, client);
//! end?;
//! assert_eq!(queue.stats(&bob).await?.messages, 0);
//! # Ok::<(), offline_queue::Error>(())
//! # }).unwrap();
//! ```
//!
//! # The parts
//! - [`OfflineQueue`]: the engine, built once with [`OfflineQueue::builder`] and cloned into
//!   every connection. [`send`](OfflineQueue::send) validates, stores, then wakes the
//!   recipient's live session or nudges them; [`connect`](OfflineQueue::connect) returns a
//!   [`Session`] whose driver future the host runs.
//! - [`Storage`]: where messages wait. [`MemoryStorage`] is the in-RAM reference backend; every
//!   backend passes the same conformance suite (`testing` feature).
//! - [`Transport`]: how a batch reaches a connected recipient (your socket).
//! - [`Notifier`]: how an offline recipient is nudged. Write your own, or turn on the
//!   `web-push`, `fcm` and `apns` features (`push` for all three) and use
//!   `offline_queue::push::PushNotifier`, which sends through Web Push, Firebase Cloud
//!   Messaging and APNs, with retries, token pruning and bounded memory.
//! - [`Coordination`]: how engine instances sharing one storage find and wake each other
//!   (one on its own needs none).
//!
//! # The delivery contract
//! 1. **No loss**: a `send` that returned `Ok` stays stored until acked, expired, or dropped
//!    by the overflow policy you chose (and then reported to the recipient as a gap).
//! 2. **At least once, in order**: per recipient, in seq order; a message not acked when its
//!    session ended is redelivered, marked `redelivered`, with the same [`MessageId`]. After
//!    `max_deliveries` it goes to the dead-letter hook instead of looping (and counts in the
//!    recipient's next gap).
//! 3. **Idempotent send**: a sender-chosen id is stored once per recipient within the dedup
//!    window.
//! 4. **Expiry**: a message past its deadline is never delivered.
//! 5. **Limits fail fast**: each violated limit has its own [`Error`] variant, returned before
//!    anything is written.
//! 6. **Isolation**: no recipient id can read or ack another's messages, whatever its bytes.
//! 7. **Offline costs only storage**: the engine's memory follows live sessions, not offline
//!    recipients.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod clock;
mod codec;
mod coordination;
mod error;
mod fnv;
// Not API: exists only for the fuzz targets (`fuzz/`) and their corpus regression test
// (`tests/fuzz_corpus.rs`), which reach the private codec through it (as do the two tests that
// decode stored record bodies).
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzz;
mod hex;
mod limits;
mod message;
mod metrics;
mod notifier;
#[cfg(feature = "push-core")]
pub mod push;
mod queue;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(any(feature = "postgres-tls", feature = "push-http"))]
mod tls;
mod transport;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
#[cfg(feature = "nats")]
pub use coordination::nats::{NatsCoordination, NatsCoordinationOptions};
pub use coordination::{Coordination, Presence, SingleNode};
pub use error::{Error, Result, Retry};
pub use limits::{Admission, BatchLimit, Limits, Overflow, Quota, TTL_CEILING};
pub use message::{
    Batch, Delivery, Envelope, Ephemeral, MessageId, RecipientId, SendReceipt, Seq, Urgency,
};
pub use metrics::MetricsSnapshot;
pub use notifier::{
    ChannelNotifier, NoopNotifier, Notifier, NotifyError, NotifyPolicy, Nudge, NudgeReason,
    RecordingNotifier,
};
pub use queue::{
    DeadLetterHook, MaintenanceReport, OfflineQueue, OfflineQueueBuilder, QueueStats, Session,
    SessionEnd, SessionHandle,
};
#[cfg(feature = "amqp")]
pub use storage::{AmqpOptions, AmqpStorage};
pub use storage::{MemoryStorage, Storage, StorageExt};
#[cfg(feature = "nats")]
pub use storage::{NatsOptions, NatsStorage, OwnedNatsStorage};
#[cfg(feature = "postgres")]
pub use storage::{PostgresOptions, PostgresStorage};
#[cfg(feature = "redb")]
pub use storage::{RedbOptions, RedbStorage};
#[cfg(feature = "redis")]
pub use storage::{RedisOptions, RedisStorage};
/// README's examples, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use transport::{ChannelTransport, Outbound, Transport, TransportClosed, channel_transport};
