//! Idempotent send (contract rule 3): a sender-chosen id is stored once per recipient within
//! the dedup window.

use std::time::Duration;

use super::{T0, deduped, recipient};
use crate::limits::Quota;
use crate::message::MessageId;
use crate::storage::{Appended, Storage, StorageExt};

/// A sender-chosen id is stored once per recipient within the window, even after it was acked
/// and within one append; other recipients and generated ids are unaffected.
///
/// Skipped without [`Capabilities::dedup`](crate::storage::Capabilities::dedup).
pub async fn dedup(storage: &dyn Storage) {
    if !storage.capabilities().dedup {
        return;
    }
    let (bob, carol) = (recipient("bob"), recipient("carol"));
    let id = MessageId::from_bytes([7; 16]);
    let quota = Quota {
        dedup_window: Duration::from_secs(60),
        ..Quota::UNLIMITED
    };
    let first = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, T0)
        .await
        .unwrap();
    let Appended::Stored(seq) = first.records[0] else {
        panic!("first send must store")
    };
    let later = T0.saturating_add(Duration::from_secs(30));
    let again = storage
        .append(
            &bob,
            vec![deduped(b"x", id), deduped(b"x", id)],
            &quota,
            later,
        )
        .await
        .unwrap();
    assert_eq!(
        again.records,
        [Appended::Duplicate(seq), Appended::Duplicate(seq)],
        "resend within window"
    );
    storage.ack_through(&bob, seq, later).await.unwrap();
    let after_ack = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, later)
        .await
        .unwrap();
    assert_eq!(
        after_ack.records,
        [Appended::Duplicate(seq)],
        "acked then resent within window"
    );
    let other = storage
        .append(&carol, vec![deduped(b"x", id)], &quota, later)
        .await
        .unwrap();
    assert!(
        matches!(other.records[0], Appended::Stored(_)),
        "dedup is per recipient"
    );
    let within = storage
        .append(
            &bob,
            vec![deduped(b"y", MessageId::from_bytes([8; 16])); 2],
            &quota,
            later,
        )
        .await
        .unwrap();
    assert!(
        matches!(within.records[..], [Appended::Stored(a), Appended::Duplicate(b)] if a == b),
        "dup within one append"
    );
    let expired_window = T0.saturating_add(Duration::from_secs(61));
    let fresh = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, expired_window)
        .await
        .unwrap();
    let Appended::Stored(stored_again) = fresh.records[0] else {
        panic!("the window ended")
    };
    // Forgetting the first store (its window ended at T0 + 60 s) must not forget the second
    // (stored at T0 + 61 s): another append here prunes, then the resend is checked.
    let past_first = T0.saturating_add(Duration::from_secs(90));
    storage
        .append(
            &bob,
            vec![deduped(b"z", MessageId::from_bytes([9; 16]))],
            &quota,
            past_first,
        )
        .await
        .unwrap();
    let resent = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, past_first)
        .await
        .unwrap();
    assert_eq!(
        resent.records,
        [Appended::Duplicate(stored_again)],
        "a resend within the window of the id's second store"
    );
    storage.remove_recipient(&bob).await.unwrap();
    let after_removal = storage
        .append(&bob, vec![deduped(b"x", id)], &quota, past_first)
        .await
        .unwrap();
    assert!(
        matches!(after_removal.records[0], Appended::Stored(_)),
        "removing the queue forgets its ids"
    );
}
