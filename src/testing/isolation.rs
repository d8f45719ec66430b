//! Isolation (contract rule 6): no recipient id reads, acks or removes another's records,
//! whatever its bytes.

use super::{T0, append, bodies, record};
use crate::message::RecipientId;
use crate::storage::{Storage, StorageExt};

/// Look-alike ids (prefixes, separators, hash-tag braces, NUL, invalid UTF-8) never see each
/// other's records, acks or purges.
pub async fn isolation(storage: &dyn Storage) {
    let ids: Vec<RecipientId> = [
        &b"a"[..],
        b"a:",
        b"a:b",
        b"a\0",
        b"a\0b",
        b"{a}",
        b"{a}:b",
        b"a}",
        b"\xff\xfe",
        b"a*",
        b"a b",
        b"*",
        b"a/..",
        b"A",
    ]
    .iter()
    .map(|raw| RecipientId::new(raw).unwrap())
    .collect();
    let mut seqs = Vec::new();
    for (i, who) in ids.iter().enumerate() {
        seqs.push(append(storage, who, vec![record(&[i as u8])]).await[0]);
    }
    for (i, who) in ids.iter().enumerate() {
        assert_eq!(
            bodies(storage, who, T0).await,
            [[i as u8]],
            "{who} sees only its own"
        );
    }
    // Acking one id's seq through another id removes nothing of either. (Seqs are per
    // recipient, so two ids may hold the same number: such pairs are skipped.)
    for (i, who) in ids.iter().enumerate() {
        let j = (i + 1) % ids.len();
        if seqs[i] == seqs[j] {
            continue;
        }
        let other = &ids[j];
        storage.ack_seqs(other, &[seqs[i]], T0).await.unwrap();
        assert_eq!(
            storage.stats(who).await.unwrap().messages,
            1,
            "{other} acked {who}'s record"
        );
        assert_eq!(
            storage.stats(other).await.unwrap().messages,
            1,
            "{other} lost its own"
        );
    }
    storage.remove_recipient(&ids[0]).await.unwrap();
    for who in &ids[1..] {
        assert_eq!(
            storage.stats(who).await.unwrap().messages,
            1,
            "removing a removed {who}"
        );
    }
}
