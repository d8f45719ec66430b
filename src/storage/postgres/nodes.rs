//! Several engines on one PostgreSQL schema: each is a node with a lease and presence rows,
//! woken over LISTEN/NOTIFY on one channel per schema. The node task (presence and lease),
//! the listener task (its own connection, outside the pool), and the [`Coordination`] impl.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::BoxStream;

use super::errors::{pg_error, pool_error};
use super::{PostgresStorage, Shared};
use crate::coordination::{Coordination, Presence};
use crate::error::Result;
use crate::message::RecipientId;

/// What the node task acts on.
pub(super) enum NodeEvent {
    /// This node now holds (or no longer holds) a session for the recipient.
    Presence(RecipientId, Presence),
    /// Someone reads wake-ups: keep a listening connection.
    Listen,
}

/// The NOTIFY channel of `schema`: one for all its recipients, short and made of
/// `[a-z0-9_]`, so it needs no quoting (a schema name may be 63 bytes, a channel no longer).
pub(super) fn channel(schema: &str) -> String {
    format!(
        "oq_wake_{:016x}",
        super::schema::lock_key(schema, "wake") as u64
    )
}

/// Starts the node task; it ends when every sender (every clone of the storage) is gone.
pub(super) fn start(pool: Pool, shared: Arc<Shared>) -> mpsc::UnboundedSender<NodeEvent> {
    let (sender, receiver) = mpsc::unbounded();
    tokio::spawn(run(pool, shared, receiver));
    sender
}

/// Writes presence changes as they come (batched while a write runs), renews the lease every
/// third of its length while this node has ever held a session, and keeps the listener
/// running once someone reads wake-ups. Nothing is written to the database by a node that
/// never holds a session.
async fn run(pool: Pool, shared: Arc<Shared>, mut events: mpsc::UnboundedReceiver<NodeEvent>) {
    let mut refresh = tokio::time::interval(shared.presence_ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listener: Option<tokio::task::JoinHandle<()>> = None;
    let mut pending: HashMap<RecipientId, bool> = HashMap::new();
    let mut joined = false;
    loop {
        let mut apply = |event: NodeEvent, pending: &mut HashMap<RecipientId, bool>| match event {
            NodeEvent::Presence(recipient, presence) => {
                let on = presence == Presence::Connected;
                if on {
                    shared.live.lock().insert(recipient.clone());
                } else {
                    shared.live.lock().remove(&recipient);
                }
                pending.insert(recipient, on);
            }
            NodeEvent::Listen => {
                if listener.is_none() {
                    listener = Some(tokio::spawn(listen(shared.clone())));
                }
            }
        };
        tokio::select! {
            // Changes first: a connect or disconnect must not wait behind a renewal.
            biased;
            event = events.next() => match event {
                Some(event) => {
                    apply(event, &mut pending);
                    while let Ok(event) = events.try_recv() {
                        apply(event, &mut pending);
                    }
                }
                None => break,
            },
            _ = refresh.tick(), if joined || !pending.is_empty() => {}
        }
        if !joined && pending.is_empty() {
            continue;
        }
        let changes = std::mem::take(&mut pending);
        match update(&pool, &shared, &changes).await {
            Ok(created) => {
                if created && joined {
                    // Taken for dead (renewals missed): its presence rows went; write them all.
                    tracing::warn!("this node's lease had ended; writing its presence again");
                    let live = shared
                        .live
                        .lock()
                        .iter()
                        .map(|r| (r.clone(), true))
                        .collect();
                    pending = live;
                    refresh.reset_immediately();
                }
                joined = true;
            }
            Err(error) => {
                // Kept for the next renewal; newer changes win.
                tracing::warn!(%error, "presence update failed; retrying at the next renewal");
                for (recipient, on) in changes {
                    pending.entry(recipient).or_insert(on);
                }
            }
        }
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    if joined {
        // Best effort: otherwise the lease ends by itself.
        if let Ok(client) = pool.get().await
            && let Ok(statement) = client.prepare_cached(&shared.statements.node_leave).await
        {
            let _ = client.execute(&statement, &[&&shared.node[..]]).await;
        }
    }
}

/// Renews the lease and writes `changes`; true if the node's row was missing.
async fn update(
    pool: &Pool,
    shared: &Shared,
    changes: &HashMap<RecipientId, bool>,
) -> Result<bool> {
    let on: Vec<&[u8]> = changes
        .iter()
        .filter(|(_, on)| **on)
        .map(|(r, _)| r.as_bytes())
        .collect();
    let off: Vec<&[u8]> = changes
        .iter()
        .filter(|(_, on)| !**on)
        .map(|(r, _)| r.as_bytes())
        .collect();
    let ttl = i64::try_from(shared.presence_ttl.as_millis()).unwrap_or(i64::MAX);
    let client = pool.get().await.map_err(pool_error)?;
    let statement = client
        .prepare_cached(&shared.statements.node_update)
        .await
        .map_err(pg_error)?;
    let row = client
        .query_one(&statement, &[&&shared.node[..], &ttl, &on, &off])
        .await
        .map_err(pg_error)?;
    row.try_get(0).map_err(pg_error)
}

/// Keeps a connection listening on the schema's channel, and makes it again when it drops.
/// Each time it listens anew, every local session reads again: wake-ups sent while no
/// connection listened are lost, and this is how nothing waits for one.
async fn listen(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&shared).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::warn!(%error, "wake-up listener lost its connection; connecting again");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(shared: &Shared) -> Result<()> {
    let (notes, mut received) = mpsc::unbounded();
    let (client, driver) = shared.tls.connect_listening(&shared.config, notes).await?;
    let listening = client
        .batch_execute(&format!("LISTEN {}", shared.channel))
        .await
        .map_err(pg_error);
    if let Err(error) = listening {
        driver.abort();
        return Err(error);
    }
    let live: Vec<RecipientId> = shared.live.lock().iter().cloned().collect();
    for recipient in &live {
        shared.listeners.wake(recipient);
    }
    let own = crate::hex::encode(&shared.node);
    while let Some(payload) = received.next().await {
        let Some((node, recipient)) = payload.split_once(':') else {
            continue;
        };
        if node == own {
            continue;
        }
        if let Some(recipient) =
            crate::hex::decode(recipient.as_bytes()).and_then(|bytes| RecipientId::new(bytes).ok())
        {
            shared.listeners.wake(&recipient);
        }
    }
    // The notes ended: the connection did.
    drop(client);
    match driver.await {
        Ok(Err(error)) => Err(pg_error(error)),
        _ => Ok(()),
    }
}

/// Presence rows under a lease per node, wake-ups over LISTEN/NOTIFY. Set it with
/// [`OfflineQueueBuilder::shared_storage`](crate::OfflineQueueBuilder::shared_storage): an
/// append then finds the recipient's other nodes and wakes them in its own transaction.
#[async_trait]
impl Coordination for PostgresStorage {
    fn wakeups(&self) -> BoxStream<'static, RecipientId> {
        let stream = self.shared.listeners.subscribe();
        // The task is gone only when the storage is: nothing left to listen for.
        let _ = self.events.unbounded_send(NodeEvent::Listen);
        stream.boxed()
    }

    fn presence(&self, recipient: &RecipientId, presence: Presence) {
        let _ = self
            .events
            .unbounded_send(NodeEvent::Presence(recipient.clone(), presence));
    }

    async fn announce(&self, recipient: &RecipientId) -> Result<bool> {
        let row = self
            .query_one(
                &self.shared.statements.wake_others,
                &[
                    &recipient.as_bytes(),
                    &&self.shared.node[..],
                    &self.shared.channel,
                ],
            )
            .await?;
        row.try_get(0).map_err(pg_error)
    }

    async fn live_elsewhere(&self, recipient: &RecipientId) -> Result<bool> {
        let row = self
            .query_one(
                &self.shared.statements.live_elsewhere,
                &[&recipient.as_bytes(), &&self.shared.node[..]],
            )
            .await?;
        row.try_get(0).map_err(pg_error)
    }
}
