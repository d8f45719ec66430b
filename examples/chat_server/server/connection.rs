//! One WebSocket connection: a read loop for the client's frames, a writer task for the
//! server's, and the engine's session driver between them.
//!
//! A connection's sends run concurrently (so sends from many connections, and many from one,
//! share the storage's commits), up to `--max-sends-in-flight`; past it the loop stops
//! reading the socket until one is answered (backpressure, nothing buffered without bound).
//! Replies go out in the order of the client's frames, and sends to one recipient are stored
//! in that order too. Where the storage keeps the order in which appends are first polled
//! (redb, memory: `OfflineQueue::sends_keep_poll_order`), each send is polled once as its
//! frame is read and none waits for another, so a connection's sends to one recipient share
//! commits; elsewhere each waits for the connection's previous send to the same recipient,
//! which is what keeps their order there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::future::{FutureExt, Shared};
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use offline_queue::{Outbound, RecipientId, SessionEnd, SessionHandle, Transport, TransportClosed};
use tokio::sync::mpsc;

use super::App;
use super::protocol::{Request, ServerFrame, parse_frame};

/// Frames queued for the socket. Bounded: a client that stops reading slows its own delivery
/// (the session's `Transport::send` waits), never the server.
const OUTBOX: usize = 64;
/// Most frames put in one socket write.
const WRITE_BATCH: usize = 64;
/// A socket write that takes longer than this means the client is not reading: drop it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket close code (private range) for a connection replaced by a newer one.
const CLOSE_DISPLACED: u16 = 4000;
/// WebSocket close code for "going away" (RFC 6455): the server is shutting down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// WebSocket close code for an internal error that retrying will not fix.
const CLOSE_INTERNAL: u16 = 1011;
/// WebSocket close code for "try again later" (IANA registry): a transient server failure.
const CLOSE_TRY_AGAIN: u16 = 1013;

/// Per-connection bounds, from the flags.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest WebSocket message accepted.
    pub max_frame_bytes: usize,
    /// Silence after which the connection is closed; the server pings three times as often.
    pub idle_timeout: Duration,
    /// Sends unanswered at once before the connection stops reading.
    pub max_sends_in_flight: usize,
}

/// A frame's reply, in the making (a send's commit), or ready.
type Reply = Pin<Box<dyn Future<Output = Option<ServerFrame>> + Send>>;

/// Done when the connection's latest send to a recipient is (stored or refused).
type Settled = Shared<tokio::sync::oneshot::Receiver<()>>;

/// The frames read and not yet answered, in order, and each recipient's latest send.
struct InFlight {
    replies: FuturesOrdered<Reply>,
    latest: HashMap<RecipientId, Settled>,
}

impl InFlight {
    /// The send to `to` waits for the one before it to the same recipient, so a connection's
    /// messages to one recipient are stored in the order it sent them.
    fn chain(&mut self, to: &RecipientId) -> (Option<Settled>, tokio::sync::oneshot::Sender<()>) {
        if self.latest.len() > 1024 {
            self.latest.retain(|_, settled| settled.peek().is_none());
        }
        let (done, settled) = tokio::sync::oneshot::channel();
        let before = self.latest.insert(to.clone(), settled.shared());
        (before, done)
    }
}

/// Why a connection's read loop stopped.
enum Ended {
    /// The client closed, went silent, or the socket failed.
    ClientLeft,
    /// The server is shutting down.
    ShuttingDown,
    /// The session's driver ended by itself (displaced, or it failed).
    Session(Result<offline_queue::Result<SessionEnd>, tokio::task::JoinError>),
}

/// Hands the engine's batches to the connection's writer task.
struct SocketTransport(mpsc::Sender<ServerFrame>);

#[async_trait]
impl Transport for SocketTransport {
    async fn send(&self, item: Outbound) -> Result<(), TransportClosed> {
        let frame = match item {
            Outbound::Batch(batch) => ServerFrame::deliver(&batch),
            Outbound::CaughtUp => ServerFrame::CaughtUp,
            // This server sends no ephemeral messages.
            _ => return Ok(()),
        };
        self.0
            .send(frame)
            .await
            .map_err(|_| TransportClosed("socket closed".into()))
    }
}

/// Serves `user` on `socket` until the client leaves, a newer connection of the same user
/// displaces this one, or the server shuts down.
pub async fn serve(socket: WebSocket, user: RecipientId, app: App) {
    let (sink, mut incoming) = socket.split();
    let (outbox, frames) = mpsc::channel(OUTBOX);
    let (close_tx, close_rx) = tokio::sync::oneshot::channel();
    let ping_every = app.limits.idle_timeout / 3;
    let writer = tokio::spawn(write_frames(sink, frames, close_rx, ping_every));

    let session = app
        .queue
        .connect(user.clone(), SocketTransport(outbox.clone()));
    let handle = session.handle();
    let mut driver = tokio::spawn(session.run());
    let mut shutdown = app.shutdown.clone();
    let mut last_heard = tokio::time::Instant::now();
    let mut in_flight = InFlight {
        replies: FuturesOrdered::new(),
        latest: HashMap::new(),
    };
    tracing::info!(%user, "connected");

    let ended = loop {
        tokio::select! {
            frame = incoming.next(), if in_flight.replies.len() < app.limits.max_sends_in_flight => {
                last_heard = tokio::time::Instant::now();
                let reply = match frame {
                    Some(Ok(Message::Text(text))) => {
                        handle_frame(&text, &user, &handle, &app, &mut in_flight)
                    }
                    Some(Ok(Message::Binary(_))) => {
                        Some(ServerFrame::bad_request(None, "frames are JSON text"))
                    }
                    // Pings are answered by axum; pongs only prove the client is there.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break Ended::ClientLeft,
                };
                // Behind the sends before it, as the client sent them.
                if let Some(reply) = reply {
                    in_flight.replies.push_back(Box::pin(async move { Some(reply) }));
                }
            }
            Some(reply) = in_flight.replies.next(), if !in_flight.replies.is_empty() => {
                if let Some(reply) = reply
                    && outbox.send(reply).await.is_err()
                {
                    break Ended::ClientLeft;
                }
            }
            end = &mut driver => break Ended::Session(end),
            // Mapped to `()`: the watch guard it returns must not live across an await.
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                break Ended::ShuttingDown;
            }
            _ = tokio::time::sleep_until(last_heard + app.limits.idle_timeout) => {
                tracing::info!(%user, "silent for {:?}: closing", app.limits.idle_timeout);
                break Ended::ClientLeft;
            }
        }
    };

    // Sends already started finish (stored or refused), though no reply may reach the client;
    // one never answered is resent by a client that keeps its own ids, and found a duplicate.
    while in_flight.replies.next().await.is_some() {}
    // Closing the session ends the driver after the item it is handing over; whatever was
    // delivered but not acked stays stored and comes back, marked, on the next connection.
    handle.close();
    let shutting_down = matches!(ended, Ended::ShuttingDown);
    let end = match ended {
        Ended::Session(end) => end,
        Ended::ClientLeft | Ended::ShuttingDown => driver.await,
    };
    let close = |code, reason| {
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    };
    let close = match end {
        _ if shutting_down => close(CLOSE_GOING_AWAY, "server shutting down"),
        Ok(Ok(SessionEnd::Displaced)) => close(CLOSE_DISPLACED, "displaced by a newer connection"),
        Ok(Ok(_)) => None,
        // Storage failed under the session: a retryable fault means "come back later".
        Ok(Err(error)) => {
            tracing::warn!(%user, %error, "session failed");
            if error.is_retryable() {
                close(CLOSE_TRY_AGAIN, "storage unavailable, reconnect later")
            } else {
                close(CLOSE_INTERNAL, "storage failed")
            }
        }
        Err(panic) => {
            tracing::error!(%user, %panic, "session task failed");
            close(CLOSE_INTERNAL, "internal error")
        }
    };
    let _ = close_tx.send(close);
    drop(outbox);
    let _ = writer.await;
    tracing::info!(%user, "disconnected");
}

/// Writes queued frames, and a ping every `ping_every`, until every sender is gone; then a
/// close frame. A write the client does not take within `WRITE_TIMEOUT` ends the writer,
/// which ends the session (its transport fails) and so the connection.
async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut frames: mpsc::Receiver<ServerFrame>,
    close: tokio::sync::oneshot::Receiver<Option<CloseFrame>>,
    ping_every: Duration,
) {
    let text = |frame: ServerFrame| {
        Message::Text(
            serde_json::to_string(&frame)
                .expect("frames serialize")
                .into(),
        )
    };
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let first = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => text(frame),
                None => break,
            },
            _ = pings.tick() => Message::Ping(Default::default()),
        };
        // Frames already waiting go out with it in one write: under load, one system call
        // carries many `sent` replies instead of one each. Each step has its own timeout, so
        // a client reading slowly but steadily is not dropped for a large batch.
        if !in_time(sink.feed(first)).await {
            return;
        }
        for _ in 1..WRITE_BATCH {
            let Ok(frame) = frames.try_recv() else { break };
            if !in_time(sink.feed(text(frame))).await {
                return;
            }
        }
        if !in_time(sink.flush()).await {
            return;
        }
    }
    let reason = close.await.ok().flatten();
    // The client may be gone already; a close that cannot be sent needs no retry.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(reason))).await;
}

/// Whether a socket write step finished, without error, within [`WRITE_TIMEOUT`].
async fn in_time<E>(step: impl Future<Output = Result<(), E>>) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, step).await, Ok(Ok(())))
}

/// The reply to a send: `sent`, or the error.
fn sent(
    id: Option<String>,
    outcome: offline_queue::Result<offline_queue::SendReceipt>,
) -> ServerFrame {
    match outcome {
        // `message_id` is what the recipient's `deliver` carries for it.
        Ok(receipt) => ServerFrame::Sent {
            id,
            message_id: receipt.id.to_string(),
            seq: receipt.seq.0,
        },
        Err(error) => ServerFrame::from_error(id, &error),
    }
}

/// Acts on one text frame: an ack at once; a send started in `in_flight`, which answers it.
/// Returns the reply of a frame answered at once (an error), if any.
fn handle_frame(
    text: &str,
    user: &RecipientId,
    handle: &SessionHandle,
    app: &App,
    in_flight: &mut InFlight,
) -> Option<ServerFrame> {
    match parse_frame(user, text) {
        Err(refused) => Some(refused),
        Ok(Request::Send { id, to, envelope }) => {
            let queue = app.queue.clone();
            if queue.sends_keep_poll_order() {
                let mut reply: Reply =
                    Box::pin(async move { Some(sent(id, queue.send(envelope).await)) });
                // This first poll gives the send its place in the storage's order, in the
                // order of the frames; the connection's loop polls it on from there.
                let first = reply.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                if let Poll::Ready(frame) = first {
                    reply = Box::pin(std::future::ready(frame));
                }
                in_flight.replies.push_back(reply);
                return None;
            }
            let (before, done) = in_flight.chain(&to);
            in_flight.replies.push_back(Box::pin(async move {
                if let Some(before) = before {
                    // Stored or refused, or its connection's future dropped: go on.
                    let _ = before.await;
                }
                let reply = sent(id, queue.send(envelope).await);
                let _ = done.send(());
                Some(reply)
            }));
            None
        }
        Ok(Request::AckThrough(through)) => {
            handle.ack_through(through);
            None
        }
        Ok(Request::Ack(seqs)) => {
            handle.ack(seqs);
            None
        }
        Ok(Request::PushRegister(device)) => Some(app.push.register(user, device)),
        Ok(Request::PushUnregister(device)) => Some(app.push.unregister(user, device)),
    }
}
