//! `RedbStorage` facing files it should refuse or that were damaged: someone else's file,
//! someone else's redb database, a newer format, truncation, flipped bits, a damaged record.
//! Each gives a typed error naming the path (or a gap for the damaged record), never a panic
//! and never wrong data.

#![cfg(feature = "redb")]

mod common;

use std::path::Path;
use std::sync::Arc;

use futures::executor::block_on;
use offline_queue::{
    Envelope, Error, OfflineQueue, Outbound, RecipientId, RedbStorage, Storage, StorageExt,
    Timestamp, channel_transport,
};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn open_error(path: &Path) -> String {
    match RedbStorage::open(path) {
        Err(
            error @ Error::Storage {
                retryable: false, ..
            },
        ) => {
            let text = error.to_string();
            assert!(
                text.contains(&path.display().to_string()),
                "error does not name the path: {text}"
            );
            text
        }
        Err(other) => panic!("expected a storage error, got {other:?}"),
        Ok(_) => panic!("{} opened", path.display()),
    }
}

/// Stores `count` messages for each of three recipients through the engine; returns them.
fn fill(path: &Path, count: usize) -> Vec<(RecipientId, Vec<Vec<u8>>)> {
    let storage = Arc::new(RedbStorage::open(path).unwrap());
    let queue = OfflineQueue::builder().storage(storage).build().unwrap();
    let mut all = Vec::new();
    for r in 0..3 {
        let who = RecipientId::new(format!("user-{r}")).unwrap();
        let payloads: Vec<Vec<u8>> = (0..count)
            .map(|i| format!("message {i} for {r}").repeat(20).into_bytes())
            .collect();
        for payload in &payloads {
            block_on(queue.send(Envelope::new(who.clone(), payload.clone()))).unwrap();
        }
        all.push((who, payloads));
    }
    all
}

#[test]
fn a_file_that_is_not_a_database_is_refused_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are my notes, not a queue\n".repeat(500)).unwrap();
    open_error(&path);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "these are my notes, not a queue\n".repeat(500),
        "left untouched"
    );
}

#[test]
fn someone_elses_redb_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("users");
            txn.open_table(table)
                .unwrap()
                .insert("alice", "admin")
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let text = open_error(&path);
    assert!(text.contains("not offline-queue's"), "{text}");
}

/// Creates our file at `path`, then rewrites its format number.
fn stamp_format(path: &Path, format: u64) {
    drop(RedbStorage::open(path).unwrap());
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let info: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("info");
        txn.open_table(info)
            .unwrap()
            .insert("format", format)
            .unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.redb");
    stamp_format(&path, 99);
    let text = open_error(&path);
    assert!(text.contains("newer version"), "{text}");
}

#[test]
fn an_older_development_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("older.redb");
    stamp_format(&path, 1);
    let text = open_error(&path);
    assert!(text.contains("earlier development version"), "{text}");
}

#[test]
fn the_directory_is_created_and_data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dirs/queue.redb");
    let stored = fill(&path, 5);
    let storage = RedbStorage::open(&path).unwrap();
    for (who, payloads) in stored {
        let records = block_on(storage.read_all(&who, NOW)).unwrap();
        let bodies: Vec<Vec<u8>> = records
            .into_iter()
            .map(|r| {
                offline_queue::fuzz::decode_body(r.body, 1 << 20)
                    .unwrap()
                    .to_vec()
            })
            .collect();
        assert_eq!(bodies, payloads);
    }
}

/// Reads every recipient; each read is either an error or exactly the original data.
fn check_never_wrong(path: &Path, stored: &[(RecipientId, Vec<Vec<u8>>)]) -> &'static str {
    let storage = match RedbStorage::open(path) {
        Err(Error::Storage { message, .. }) => {
            assert!(message.contains(&path.display().to_string()), "{message}");
            return "refused on open";
        }
        Err(other) => panic!("unexpected error kind: {other:?}"),
        Ok(storage) => storage,
    };
    let mut outcome = "read back intact";
    for (who, payloads) in stored {
        match block_on(storage.read(
            who,
            None,
            offline_queue::BatchLimit {
                max_messages: 1000,
                max_bytes: usize::MAX,
            },
            NOW,
        )) {
            Err(Error::Storage { .. }) => outcome = "error on read",
            Err(other) => panic!("unexpected error kind: {other:?}"),
            Ok(batch) => {
                if !batch.damaged.is_empty() {
                    outcome = "damaged records reported";
                }
                for record in batch.records {
                    let body = offline_queue::fuzz::decode_body(record.body, 1 << 20)
                        .expect("a checked record decodes")
                        .to_vec();
                    assert!(
                        payloads.contains(&body),
                        "{who}: wrong data returned as valid"
                    );
                }
            }
        }
    }
    outcome
}

#[test]
fn truncated_files_give_errors_not_panics_or_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.redb");
    let stored = fill(&original, 50);
    let len = std::fs::metadata(&original).unwrap().len();
    for keep in [1, 512, 4096, len / 4, len / 2, len - 1] {
        let path = dir.path().join(format!("truncated-{keep}.redb"));
        std::fs::copy(&original, &path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let outcome = std::panic::catch_unwind(|| check_never_wrong(&path, &stored));
        let outcome = outcome
            .unwrap_or_else(|_| panic!("truncating to {keep} of {len} bytes caused a panic"));
        println!("truncated to {keep} of {len} bytes: {outcome}");
    }
}

#[test]
fn flipped_bits_give_errors_not_panics_or_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.redb");
    let stored = fill(&original, 50);
    let bytes = std::fs::read(&original).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut outcomes = std::collections::BTreeMap::new();
    for trial in 0..200 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % bytes.len() as u64) as usize;
        let bit = (state >> 32) % 8;
        let mut damaged = bytes.clone();
        damaged[offset] ^= 1 << bit;
        let path = dir.path().join(format!("flip-{trial}.redb"));
        std::fs::write(&path, &damaged).unwrap();
        let outcome = std::panic::catch_unwind(|| check_never_wrong(&path, &stored))
            .unwrap_or_else(|_| panic!("flipping bit {bit} at byte {offset} caused a panic"));
        *outcomes.entry(outcome).or_insert(0) += 1;
        std::fs::remove_file(&path).unwrap();
    }
    println!("200 single-bit flips: {outcomes:?}");
}

/// Damages the body of `who`'s `index`-th record (of `count`), as a bad sector would.
fn damage_record(path: &Path, who: &RecipientId, index: usize, count: usize) {
    let db = redb::Database::create(path).unwrap();
    let log: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(log).unwrap();
        // A log value names its recipient after a checksum and a flags byte.
        let who = who.as_bytes();
        let records: Vec<(u64, Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value(), v.value().to_vec())
            })
            .filter(|(_, v)| usize::from(v[5]) == who.len() && &v[6..6 + who.len()] == who)
            .collect();
        assert_eq!(
            records.len(),
            count,
            "the recipient's records are in the log"
        );
        let (seq, mut value) = records[index].clone();
        let last = value.len() - 2;
        value[last] ^= 0x20;
        table.insert(seq, &value[..]).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_damaged_record_nobody_reads_is_purged_and_counted_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let stored = fill(&path, 3);
    let (bob, payloads) = &stored[0];
    damage_record(&path, bob, 1, payloads.len());
    let storage = RedbStorage::open(&path).unwrap();
    let before = block_on(storage.stats(bob)).unwrap();
    assert_eq!(before.messages, 3);
    // Past every default TTL: purge removes all of bob's, the damaged one too.
    let later =
        Timestamp::now_system().saturating_add(std::time::Duration::from_secs(400 * 24 * 3600));
    while block_on(storage.purge(later, None, 2)).unwrap().more {}
    let after = block_on(storage.stats(bob)).unwrap();
    assert_eq!(
        (after.messages, after.bytes, after.lost),
        (0, 0, 3),
        "every record purged and counted lost, the damaged one included"
    );
}

#[test]
fn a_damaged_record_reaches_the_client_as_a_gap_not_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let stored = fill(&path, 3);
    let (bob, payloads) = &stored[0];
    damage_record(&path, bob, 1, payloads.len());
    let storage = Arc::new(RedbStorage::open(&path).unwrap());
    let queue = OfflineQueue::builder()
        .storage(storage.clone())
        .build()
        .unwrap();
    let (transport, mut inbox) = channel_transport(16);
    let session = queue.connect(bob.clone(), transport);
    let handle = session.handle();
    let client = async {
        use futures::StreamExt;
        let Some(Outbound::Batch(batch)) = inbox.next().await else {
            panic!("a batch")
        };
        handle.close();
        batch
    };
    let (end, batch) = block_on(async { futures::join!(session.run(), client) });
    end.unwrap();
    let got: Vec<&[u8]> = batch.messages.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(
        got,
        [&payloads[0], &payloads[2]],
        "the damaged one is not delivered"
    );
    assert_eq!(batch.gap, 1, "and the client is told one is missing");
    assert_eq!(queue.metrics().corrupt, 1);
    assert_eq!(
        block_on(storage.stats(bob)).unwrap().messages,
        2,
        "the damaged record was removed"
    );
}

/// One recipient's damaged metadata row costs only that recipient: its own steps fail (not
/// retryable: retrying cannot mend it), while every other recipient's sends, gathered into the
/// same group commits, are stored.
#[test]
fn a_damaged_metadata_row_costs_only_its_recipient() {
    use offline_queue::Quota;
    use offline_queue::storage::NewRecord;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let names = ["alice", "bob", "carol"];
    let who = |name: &str| RecipientId::new(name).unwrap();
    let record = |body: String| NewRecord {
        id: offline_queue::MessageId::generate(),
        dedup: false,
        sent_at: NOW,
        expires_at: None,
        body: body.into_bytes(),
    };
    {
        let storage = RedbStorage::open(&path).unwrap();
        for name in names {
            block_on(storage.append(
                &who(name),
                vec![record(format!("{name} before"))],
                &Quota::UNLIMITED,
                NOW,
            ))
            .unwrap();
        }
    }
    // A bad sector in alice's metadata row.
    {
        let db = redb::Database::create(&path).unwrap();
        let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(meta).unwrap();
            table
                .insert(&b"alice"[..], &b"\x07not metadata"[..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let storage = RedbStorage::open(&path).unwrap();
    let mut stored = 0;
    for round in 0..20 {
        // All submitted at once: the writer gathers them into shared commits.
        let sends = (0..30).map(|i| {
            let name = names[i % 3];
            let storage = &storage;
            async move {
                let result = storage
                    .append(
                        &who(name),
                        vec![record(format!("{name} {round} {i}"))],
                        &Quota::UNLIMITED,
                        NOW,
                    )
                    .await;
                (name, result)
            }
        });
        for (name, result) in block_on(futures::future::join_all(sends)) {
            match (name, result) {
                ("alice", Err(error)) => assert!(!error.is_retryable(), "{error}"),
                ("alice", Ok(outcome)) => panic!("alice's damaged row took an append: {outcome:?}"),
                (_, Ok(_)) => stored += 1,
                (name, Err(error)) => panic!("{name}'s send failed for alice's damage: {error}"),
            }
        }
    }
    assert_eq!(stored, 20 * 20);
    for name in ["bob", "carol"] {
        assert_eq!(
            block_on(storage.stats(&who(name))).unwrap().messages,
            201,
            "{name}'s sends all stored"
        );
    }
    let removal = block_on(storage.remove_recipient(&who("alice")));
    assert!(
        removal.as_ref().is_err_and(|e| !e.is_retryable()),
        "{removal:?}"
    );
    block_on(storage.append(
        &who("bob"),
        vec![record("bob after".into())],
        &Quota::UNLIMITED,
        NOW,
    ))
    .expect("a removal that failed on alice's row ended no one else's group");
}

/// The rows of the file's `deliveries` table (a record's own delivery count).
fn delivery_rows(path: &Path) -> u64 {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let deliveries: redb::TableDefinition<u64, u32> = redb::TableDefinition::new("deliveries");
    txn.open_table(deliveries).unwrap().len().unwrap()
}

fn counts(records: &[offline_queue::storage::StoredRecord]) -> Vec<u32> {
    records.iter().map(|r| r.delivery_count).collect()
}

/// Draining in order moves the recipient's delivery watermark instead of writing a
/// `deliveries` row per message (format 4), with or without an ack riding on the read; the
/// counts read as the contract says, and a redelivery gives each record its own row.
#[test]
fn in_order_reads_count_deliveries_without_a_row_per_message() {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{BatchLimit, MessageId, Quota, Seq};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watermark.redb");
    let storage = RedbStorage::open(&path).unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let records: Vec<NewRecord> = (0..300u16)
        .map(|i| NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: NOW,
            expires_at: None,
            body: i.to_be_bytes().to_vec(),
        })
        .collect();
    let seqs: Vec<Seq> = block_on(storage.append(&bob, records, &Quota::UNLIMITED, NOW))
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq())
        .collect();
    let hundred = BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    let mut after = None;
    for batch in 0..3 {
        let ack = after.map(|through| Ack {
            through: Some(through),
            ..Ack::default()
        });
        let read = block_on(storage.read_for_delivery(&bob, ack.as_ref(), after, hundred, NOW))
            .unwrap()
            .batch;
        let got: Vec<Seq> = read.records.iter().map(|r| r.seq).collect();
        assert_eq!(got, seqs[batch * 100..][..100], "batch {batch} in order");
        assert_eq!(
            counts(&read.records),
            vec![0; 100],
            "never delivered before"
        );
        after = got.last().copied();
    }
    assert_eq!(
        counts(&block_on(storage.read_all(&bob, NOW)).unwrap()),
        vec![1; 100],
        "the unacked batch was handed over once"
    );
    drop(storage);
    assert_eq!(delivery_rows(&path), 0, "no row per message");

    let storage = RedbStorage::open(&path).unwrap();
    let again = block_on(storage.read_for_delivery(&bob, None, None, hundred, NOW))
        .unwrap()
        .batch;
    assert_eq!(
        counts(&again.records),
        vec![1; 100],
        "the counts from before"
    );
    assert_eq!(
        counts(&block_on(storage.read_all(&bob, NOW)).unwrap()),
        vec![2; 100],
        "the redelivery counted"
    );
    drop(storage);
    assert_eq!(delivery_rows(&path), 100, "a redelivery writes each count");
}

/// A format 3 file (no watermarks) opens, keeps its counts, and is marked with the newest
/// format (6), so an older build, which would read neither the watermarks, the retired
/// records nor the lengths in lists, refuses it from then on.
#[test]
fn a_format_three_file_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.redb");
    let stored = fill(&path, 2);
    let (who, _) = &stored[0];
    {
        let storage = RedbStorage::open(&path).unwrap();
        let first = block_on(storage.read_all(who, NOW)).unwrap()[0].seq;
        // As format 3 counted: a row per hand-over.
        block_on(storage.mark_delivered(who, &[first])).unwrap();
        block_on(storage.mark_delivered(who, &[first])).unwrap();
    }
    let db = redb::Database::create(&path).unwrap();
    let info: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("info");
    let txn = db.begin_write().unwrap();
    txn.open_table(info).unwrap().insert("format", 3).unwrap();
    txn.commit().unwrap();
    drop(db);

    let storage = RedbStorage::open(&path).unwrap();
    let records = block_on(storage.read_all(who, NOW)).unwrap();
    assert_eq!(counts(&records), [2, 0]);
    // Its own count and the watermark together: one more each.
    let two = offline_queue::BatchLimit {
        max_messages: 2,
        max_bytes: usize::MAX,
    };
    let read = block_on(storage.read_for_delivery(who, None, None, two, NOW)).unwrap();
    assert_eq!(counts(&read.batch.records), [2, 0]);
    assert_eq!(
        counts(&block_on(storage.read_all(who, NOW)).unwrap()),
        [3, 1]
    );
    drop(storage);
    let db = redb::Database::open(&path).unwrap();
    let format = db
        .begin_read()
        .unwrap()
        .open_table(info)
        .unwrap()
        .get("format")
        .unwrap()
        .map(|v| v.value());
    assert_eq!(format, Some(6));
}

/// Rewrites every list row of the file at `path` as format 5 wrote it (seqs only, no lengths)
/// and marks the file format 5.
fn strip_list_lengths(path: &Path) {
    let db = redb::Database::create(path).unwrap();
    let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");
    let chunks: redb::TableDefinition<(&[u8], u64), &[u8]> = redb::TableDefinition::new("chunks");
    let info: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("info");
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(meta).unwrap();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().to_vec(), v.value().to_vec())
            })
            .collect();
        for (who, row) in rows {
            // Format 6: 48 fixed bytes, n seqs, n lengths, the watermark, a CRC-32, the mark 2.
            assert_eq!(row.last(), Some(&2));
            let n = (row.len() - 48 - 13) / 12;
            let mut older = row[..48 + 8 * n].to_vec();
            let delivered = &row[row.len() - 13..row.len() - 5];
            if delivered != [0; 8] {
                older.extend_from_slice(delivered);
                older.push(1);
            }
            table.insert(&who[..], &older[..]).unwrap();
        }
        let mut table = txn.open_table(chunks).unwrap();
        type ChunkRow = ((Vec<u8>, u64), Vec<u8>);
        let rows: Vec<ChunkRow> = table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                let (who, seq) = k.value();
                ((who.to_vec(), seq), v.value().to_vec())
            })
            .collect();
        assert!(!rows.is_empty(), "the test needs chunk rows");
        for ((who, seq), value) in rows {
            // Format 6: n seqs, n lengths, a CRC-32, the mark 2.
            assert_eq!(value.last(), Some(&2));
            let n = (value.len() - 5) / 12;
            table.insert((&who[..], seq), &value[..8 * n]).unwrap();
        }
        txn.open_table(info).unwrap().insert("format", 5).unwrap();
    }
    txn.commit().unwrap();
}

/// Lists written by format 5 hold no lengths: their records are read when they leave, and
/// the byte counts come out the same as for records listed with their lengths (appended
/// after the upgrade, in the same lists), whether acked scattered among other recipients'
/// records or dropped by the quota; and every row leaves the file.
#[test]
fn format_five_lists_read_and_count_bytes_as_format_six_lists() {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{Overflow, Quota};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("five.redb");
    let (bob, carol) = (
        RecipientId::new("bob").unwrap(),
        RecipientId::new("carol").unwrap(),
    );
    let record = |len: usize| NewRecord {
        id: offline_queue::MessageId::generate(),
        dedup: false,
        sent_at: NOW,
        expires_at: None,
        body: vec![7; len],
    };
    let dave = RecipientId::new("dave").unwrap();
    let fill = |storage: &RedbStorage, lens: std::ops::Range<usize>| {
        // Each recipient's records lie one in three in the log: scattered.
        for len in lens {
            for who in [&bob, &carol, &dave] {
                block_on(storage.append(who, vec![record(len)], &Quota::UNLIMITED, NOW)).unwrap();
            }
        }
    };
    let stats = |storage: &RedbStorage, who: &RecipientId| {
        let s = block_on(storage.stats(who)).unwrap();
        (s.messages, s.bytes)
    };
    {
        let storage = RedbStorage::open(&path).unwrap();
        fill(&storage, 1..41);
    }
    strip_list_lengths(&path);

    let storage = RedbStorage::open(&path).unwrap();
    let older: u64 = (1..41).sum();
    assert_eq!(stats(&storage, &bob), (40, older));
    fill(&storage, 41..61);
    let newer: u64 = (41..61).sum();
    assert_eq!(stats(&storage, &bob), (60, older + newer));

    let bobs_seqs = || -> Vec<_> {
        block_on(storage.read_all(&bob, NOW))
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    };
    // bob acks his first 50 (40 listed before the upgrade, 10 after), scattered.
    let seqs = bobs_seqs();
    let ack = Ack {
        through: Some(seqs[49]),
        ..Ack::default()
    };
    assert_eq!(block_on(storage.ack(&bob, &ack, NOW)).unwrap(), 50);
    let left: u64 = (51..61).sum();
    assert_eq!(stats(&storage, &bob), (10, left));

    // carol's oldest are dropped to make room: lengths from the older rows.
    let two = Quota {
        max_messages: 2,
        overflow: Overflow::DropOldest,
        ..Quota::UNLIMITED
    };
    let outcome = block_on(storage.append(&carol, vec![record(3)], &two, NOW)).unwrap();
    assert_eq!(outcome.dropped, 59);
    assert_eq!(stats(&storage, &carol), (2, 60 + 3));

    // Selective acks of the rest, then nothing is left of either.
    let ack = Ack {
        seqs: bobs_seqs(),
        ..Ack::default()
    };
    assert_eq!(block_on(storage.ack(&bob, &ack, NOW)).unwrap(), 10);
    assert_eq!(stats(&storage, &bob), (0, 0));
    assert_eq!(block_on(storage.remove_recipient(&carol)).unwrap(), 2);
    assert_eq!(stats(&storage, &carol), (0, 0));
    assert_eq!(block_on(storage.remove_recipient(&dave)).unwrap(), 60);
    drop(storage);
    // Compaction sweeps every retired row: the file holds no record any more.
    let storage = RedbStorage::open(&path).unwrap();
    block_on(storage.compact()).unwrap();
    drop(storage);
    let db = redb::Database::open(&path).unwrap();
    let log: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
    assert_eq!(
        db.begin_read()
            .unwrap()
            .open_table(log)
            .unwrap()
            .len()
            .unwrap(),
        0
    );
}

/// A session whose queue emptied (its `meta` row went with it) and filled again reads on from
/// its cursor, past the new row's watermark of 0 with nothing listed between: the watermark
/// still moves, and no row per message is written.
#[test]
fn the_watermark_moves_on_after_the_queue_emptied_and_filled_again() {
    use offline_queue::storage::{Ack, NewRecord};
    use offline_queue::{BatchLimit, MessageId, Quota};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refilled.redb");
    let storage = RedbStorage::open(&path).unwrap();
    let bob = RecipientId::new("bob").unwrap();
    let ten = || -> Vec<NewRecord> {
        (0..10u8)
            .map(|i| NewRecord {
                id: MessageId::generate(),
                dedup: false,
                sent_at: NOW,
                expires_at: None,
                body: vec![i],
            })
            .collect()
    };
    let all = BatchLimit {
        max_messages: 100,
        max_bytes: usize::MAX,
    };
    block_on(storage.append(&bob, ten(), &Quota::UNLIMITED, NOW)).unwrap();
    let first = block_on(storage.read_for_delivery(&bob, None, None, all, NOW)).unwrap();
    let cursor = first.batch.records.last().unwrap().seq;
    let ack = Ack {
        through: Some(cursor),
        ..Ack::default()
    };
    let emptied =
        block_on(storage.read_for_delivery(&bob, Some(&ack), Some(cursor), all, NOW)).unwrap();
    assert_eq!((emptied.acked, emptied.batch.records.len()), (10, 0));
    block_on(storage.append(&bob, ten(), &Quota::UNLIMITED, NOW)).unwrap();
    let again = block_on(storage.read_for_delivery(&bob, None, Some(cursor), all, NOW)).unwrap();
    assert_eq!(counts(&again.batch.records), vec![0; 10]);
    assert_eq!(
        counts(&block_on(storage.read_all(&bob, NOW)).unwrap()),
        vec![1; 10]
    );
    drop(storage);
    assert_eq!(delivery_rows(&path), 0, "no row per message");
}
