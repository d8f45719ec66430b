//! A WebSocket chat server that holds messages for offline users and delivers them, in order
//! and in batches, when they come back.
//!
//! ```text
//! cargo run --example chat_server          # then open the `page:` link it prints
//! cargo run --example chat_server -- --help
//! ```
//!
//! Messages wait in `offline-queue-data/chat.redb` (durable: a `sent` reply means the message
//! is on disk). `--storage memory` keeps them in memory instead.
//!
//! # How it embeds the crate
//! - `server/mod.rs` builds one [`offline_queue::OfflineQueue`] from the flags and shares it
//!   with every request; `queue.background_maintenance` runs the upkeep once a second
//!   (expiry, delayed pushes).
//! - `server/connection.rs` serves one socket: `queue.connect(user, transport)` returns a
//!   session whose driver runs in its own task and hands batches to the socket's writer; the
//!   read loop turns frames into `queue.send` and `handle.ack*` calls.
//! - `server/webhook.rs` turns the engine's coalesced nudges into HTTP calls, off the send path.
//! - `server/push.rs` sends them through Web Push, FCM and APNs with the crate's
//!   `PushNotifier`, to the devices clients register with `push_register`.
//!
//! - `server/auth.rs` decides who a request is: an HS256 JSON Web Token, checked before the
//!   upgrade; `POST /login` issues them for the demo page.
//!
//! # Protocol
//! WebSocket at `GET /ws?token=<token>` (or `Authorization: Bearer <token>`); text frames of
//! JSON. The token is an HS256 JWT under `--auth-secret` with claims `{"sub":"<user id>",
//! "exp":<unix seconds>}`; without a valid one the answer is 401 and no socket. `POST /login`
//! with `{"user":"<id>"}` and `Authorization: Bearer <the key printed at start>` issues one
//! (`--no-login` removes it). `--insecure-no-auth` believes `?user=<id>` instead: local play
//! only.
//!
//! Client to server:
//! - `{"type":"send","to":"<user>","body":"<text>","id":"<optional>","ttl_secs":<optional>}`.
//!   `id` is the client's own id for the message, any 1 to 128 printable characters: a
//!   resend with the same id (within 30 minutes) is not stored twice, so a client may resend
//!   whatever it has no `sent` for. Dedup is per sender: the stored message's id is
//!   `MessageId::derive(sender, id)`, so two senders' ids never collide.
//! - `{"type":"ack","up_to":<seq>}` acks everything through `seq`;
//!   `{"type":"ack","seqs":[<seq>,..]}` acks exactly those.
//!
//! Server to client:
//! - `{"type":"sent","id":"<client id, if given>","message_id":"<32 hex>","seq":<seq>}` for
//!   each stored send, in order.
//! - `{"type":"error","id":"<client id, if given>","code":"..","message":".."}`, where code is
//!   `message_too_large`, `queue_full`, `invalid_recipient`, `invalid_ttl`, `bad_request` or
//!   `unavailable` (storage down: try again). A bad frame never closes the connection.
//! - `{"type":"deliver","messages":[{"id","seq","from","client_id","body","sent_at_ms",
//!   "expires_at_ms","redelivered"},..],"gap":<n>,"position":<seq>}`: `id` is the stored
//!   message's id (the same on redelivery), `client_id` the sender's own id when it gave one;
//!   the backlog in batches of up to
//!   `--batch-max` messages (and 1 MiB), then live messages as they come. At most 256
//!   messages are delivered and not yet acked at a time: a client that stops acking stops
//!   receiving. `gap`, present when not zero, counts messages lost before this batch
//!   (expired unread, damaged, or given up on after 10 deliveries without an ack).
//!   `position` is what to ack to cover the whole batch. Unacked messages come again on the
//!   next connection with `"redelivered":true`.
//! - `{"type":"caught_up"}` once per connection, when the backlog present at connect has been
//!   delivered (at once if there was none).
//!
//! A client need not wait for each `sent`: up to `--max-sends-in-flight` (256) sends of one
//! connection are stored concurrently, replies come in the order of its frames, and its
//! messages to one recipient are stored in the order sent.
//!
//! One connection per user: a newer one closes the older with close code 4000. Close code
//! 1001 means the server is shutting down, 1013 that its storage failed (reconnect later),
//! 1011 an internal error. The server pings; a connection silent for 60 s is closed, so a
//! vanished client does not hold its user "online" (and unpushed).
//!
//! Pushes: with `--notify-webhook URL`, a message for an offline user makes a
//! `POST URL` with `{"recipient":"<user>","pending":<count or null>}`: no content, no sender.
//! While a user stays offline, at most one per `--notify-cooldown-secs` (a connection starts
//! the count afresh), plus one a minute after a connection ends with messages unacked.
//! Retried with backoff (5 tries, 10 s each at most), one at a time, never in the way of a
//! send. With `--push-*` flags (README lists them), the same nudges go to the devices a user
//! registered with `{"type":"push_register", ...}` through Web Push, FCM or APNs, content-free
//! too. Also `GET /` (a demo page), `GET /push/vapid-key`, `GET /healthz`, `GET /metrics` (Prometheus text),
//! `GET /stats?token=<token>` (pending count and presence, for the page), `GET
//! /pushes?token=<token>` (the latest pushes made for that user, for the page).
//!
//! SIGINT or SIGTERM shut down gracefully: no new connections, sessions closed (unacked
//! messages stay stored), storage closed after its last commit.

mod server;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of the system allocator: a server that parses, frames and hands over small
/// messages all day spent about two fifths of its CPU in glibc's `malloc` and `free`; with
/// jemalloc it stores about a third faster on redb (BENCHMARKS.md, "The chat server's
/// allocator"). Not on MSVC, where jemalloc does not build.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match server::run(server::Config::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("chat_server: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
