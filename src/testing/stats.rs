//! Stats and removal: what a recipient's queue reports of itself, and that removing the
//! recipient removes everything.

use std::time::Duration;

use super::{T0, append, recipient, record};
use crate::storage::{NewRecord, Storage};

/// Stats report count, and bytes, oldest and newest where the backend keeps them exactly
/// ([`Capabilities::exact_stats`](crate::storage::Capabilities::exact_stats)); removing a
/// recipient removes everything.
pub async fn stats_and_remove(storage: &dyn Storage) {
    let bob = recipient("bob");
    let seqs = append(
        storage,
        &bob,
        vec![
            record(b"abc"),
            NewRecord {
                sent_at: T0.saturating_add(Duration::from_secs(5)),
                ..record(b"de")
            },
        ],
    )
    .await;
    let stats = storage.stats(&bob).await.unwrap();
    assert_eq!(stats.messages, 2);
    if storage.capabilities().exact_stats {
        assert_eq!(stats.bytes, 5);
        assert_eq!(stats.oldest_sent_at, Some(T0));
        assert_eq!(stats.newest_seq, Some(seqs[1]));
    }
    assert_eq!(storage.remove_recipient(&bob).await.unwrap(), 2);
    assert_eq!(storage.stats(&bob).await.unwrap(), Default::default());
    assert_eq!(storage.remove_recipient(&bob).await.unwrap(), 0);
}
