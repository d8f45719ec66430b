//! `RedbStorage::compact`: after a backlog drains, the file gives its space back, and every
//! message still pending is intact, before and after reopening.

#![cfg(feature = "redb")]

use futures::executor::block_on;
use offline_queue::storage::NewRecord;
use offline_queue::{MessageId, Quota, RecipientId, RedbStorage, Storage, StorageExt, Timestamp};
use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn record(i: usize) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: NOW,
        expires_at: None,
        body: format!("{i:06}|{}", "x".repeat(4000)).into_bytes(),
    }
}

fn bodies(storage: &RedbStorage, who: &RecipientId) -> Vec<Vec<u8>> {
    block_on(storage.read_all(who, NOW))
        .unwrap()
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

#[test]
fn compaction_gives_drained_space_back_and_keeps_what_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (spike, kept) = (
        RecipientId::new("spike").unwrap(),
        RecipientId::new("kept").unwrap(),
    );
    let storage = RedbStorage::open(&path).unwrap();
    // A backlog of about 8 MB for one recipient, beside a few messages for another.
    for batch in 0..40 {
        let records = (0..50).map(|i| record(batch * 50 + i)).collect();
        block_on(storage.append(&spike, records, &Quota::UNLIMITED, NOW)).unwrap();
    }
    let records = (0..10).map(record).collect();
    block_on(storage.append(&kept, records, &Quota::UNLIMITED, NOW)).unwrap();
    let pending = bodies(&storage, &kept);
    // The backlog drains.
    let last = block_on(storage.stats(&spike)).unwrap().newest_seq.unwrap();
    block_on(storage.ack_through(&spike, last, NOW)).unwrap();
    let drained = std::fs::metadata(&path).unwrap().len();

    assert!(block_on(storage.compact()).unwrap(), "the file changed");
    let compacted = std::fs::metadata(&path).unwrap().len();
    println!("drained: {drained} bytes, compacted: {compacted} bytes");
    assert!(
        compacted * 4 < drained,
        "the drained space went back: {drained} -> {compacted} bytes"
    );
    assert_eq!(bodies(&storage, &kept), pending, "pending messages intact");
    assert_eq!(block_on(storage.stats(&spike)).unwrap().messages, 0);
    // It keeps serving: a new message is stored and read back.
    block_on(storage.append(&kept, vec![record(99)], &Quota::UNLIMITED, NOW)).unwrap();
    assert_eq!(bodies(&storage, &kept).len(), 11);
    drop(storage);

    let reopened = RedbStorage::open(&path).unwrap();
    let after = bodies(&reopened, &kept);
    assert_eq!(after.len(), 11, "all pending messages survive reopening");
    assert_eq!(after[..10], pending[..]);
}

#[test]
fn compaction_amid_concurrent_writes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RedbStorage::open(dir.path().join("queue.redb")).unwrap();
    let senders = (0..32).map(|s| {
        let storage = &storage;
        async move {
            let who = RecipientId::new(format!("user-{s}")).unwrap();
            for i in 0..20 {
                storage
                    .append(&who, vec![record(i)], &Quota::UNLIMITED, NOW)
                    .await
                    .unwrap();
            }
        }
    });
    // Compactions arrive while groups gather: each waits for its group's commit.
    let compactions = async {
        for _ in 0..5 {
            storage.compact().await.unwrap();
        }
    };
    block_on(futures::future::join(
        futures::future::join_all(senders),
        compactions,
    ));
    for s in 0..32 {
        let who = RecipientId::new(format!("user-{s}")).unwrap();
        let got: Vec<Vec<u8>> = bodies(&storage, &who);
        let want: Vec<Vec<u8>> = (0..20).map(|i| record(i).body).collect();
        assert_eq!(got, want, "{who}: every append kept, in order");
    }
}

/// A backlog stored among another recipient's messages lies scattered over the log, so its ack
/// only retires the records (module docs); compaction deletes them first.
#[test]
fn compaction_deletes_records_retired_by_an_ack_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (spike, chatter) = (
        RecipientId::new("spike").unwrap(),
        RecipientId::new("chatter").unwrap(),
    );
    let storage = RedbStorage::open(&path).unwrap();
    let small = |i: usize| NewRecord {
        body: format!("{i}").into_bytes(),
        ..record(i)
    };
    // Each large message between two small ones of another recipient.
    for i in 0..2_000 {
        block_on(storage.append(&spike, vec![record(i)], &Quota::UNLIMITED, NOW)).unwrap();
        let records = vec![small(2 * i), small(2 * i + 1)];
        block_on(storage.append(&chatter, records, &Quota::UNLIMITED, NOW)).unwrap();
    }
    let pending = bodies(&storage, &chatter);
    let last = block_on(storage.stats(&spike)).unwrap().newest_seq.unwrap();
    assert_eq!(
        block_on(storage.ack_through(&spike, last, NOW)).unwrap(),
        2_000
    );
    assert_eq!(block_on(storage.stats(&spike)).unwrap().messages, 0);
    let drained = std::fs::metadata(&path).unwrap().len();

    assert!(block_on(storage.compact()).unwrap(), "the file changed");
    let compacted = std::fs::metadata(&path).unwrap().len();
    println!("drained: {drained} bytes, compacted: {compacted} bytes");
    // (redb compacts this interleaved file to about half, deleted at the ack or retired.)
    assert!(compacted < drained, "{drained} -> {compacted} bytes");
    assert_eq!(
        bodies(&storage, &chatter),
        pending,
        "pending messages intact"
    );
    drop(storage);
    // Only the other recipient's rows are left, and nothing waits to be deleted.
    let db = redb::Database::open(&path).unwrap();
    let read = db.begin_read().unwrap();
    let rows = |name: &str| {
        let table: TableDefinition<u64, &[u8]> = TableDefinition::new(name);
        read.open_table(table).unwrap().len().unwrap()
    };
    assert_eq!(rows("log"), 4_000);
    let retired: TableDefinition<u64, ()> = TableDefinition::new("retired");
    assert_eq!(read.open_table(retired).unwrap().len().unwrap(), 0);
    drop((read, db));
    let reopened = RedbStorage::open(&path).unwrap();
    assert_eq!(bodies(&reopened, &chatter), pending, "and after reopening");
    assert_eq!(block_on(reopened.stats(&spike)).unwrap().messages, 0);
}
