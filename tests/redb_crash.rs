//! Crash safety of `RedbStorage`: a child process appends and acks under load from concurrent
//! senders, printing each result only after the call returned `Ok`; the test kills it with
//! SIGKILL at a random moment, reopens the same file, and checks that every printed append is
//! there, in order, and that nothing printed as acked came back. Then again, on the same file.
//!
//! `OFFLINE_QUEUE_CRASH_ROUNDS` sets the number of rounds (default 20);
//! `OFFLINE_QUEUE_CRASH_SEED` replays a run's kill timings.

#![cfg(feature = "redb")]

mod child_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use offline_queue::storage::{Ack, NewRecord};
use offline_queue::{BatchLimit, MessageId, Quota, RecipientId, RedbStorage, Storage, Timestamp};

const CHILD_ENV: &str = "OFFLINE_QUEUE_CRASH_CHILD_FILE";
const SENDERS: usize = 8;
const RECIPIENTS_PER_SENDER: usize = 3;
const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// The child: runs until killed. Not a test of its own; the parent starts it.
#[test]
#[ignore = "the child process of kill_and_restart_loses_nothing; it starts this itself"]
fn crash_child() {
    let path = std::env::var(CHILD_ENV).expect("run by kill_and_restart_loses_nothing");
    let round: u64 = std::env::var("OFFLINE_QUEUE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let storage = Arc::new(RedbStorage::open(&path).unwrap());
    // Ends the test harness's own "test ... " line, so the first report is a line of its own.
    println!();
    let threads: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let storage = storage.clone();
            std::thread::spawn(move || sender_loop(&*storage, round, sender))
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

fn sender_loop(storage: &dyn Storage, round: u64, sender: usize) {
    let out = std::io::stdout();
    for counter in 0u64.. {
        let recipient = format!("s{sender}-r{}", counter % RECIPIENTS_PER_SENDER as u64);
        let who = RecipientId::new(&recipient).unwrap();
        let body = format!("{round}:{sender}:{counter}");
        let record = NewRecord {
            id: MessageId::generate(),
            dedup: false,
            sent_at: NOW,
            expires_at: None,
            body: body.clone().into_bytes(),
        };
        let outcome = block_on(storage.append(&who, vec![record], &Quota::UNLIMITED, NOW)).unwrap();
        let seq = outcome.records[0].seq().0;
        writeln!(out.lock(), "S {recipient} {seq} {body}").unwrap();
        if counter % 7 == 3 {
            // Ack the oldest two of this recipient, cumulatively.
            let limit = BatchLimit {
                max_messages: 2,
                max_bytes: usize::MAX,
            };
            let read = block_on(storage.read(&who, None, limit, NOW)).unwrap();
            if let Some(last) = read.records.last() {
                // Announce the ack first: if the kill lands between its commit and the report,
                // the parent knows these records may be gone.
                writeln!(out.lock(), "a {recipient} {}", last.seq.0).unwrap();
                let ack = Ack {
                    through: Some(last.seq),
                    ..Ack::default()
                };
                block_on(storage.ack(&who, &ack, NOW)).unwrap();
                writeln!(out.lock(), "A {recipient} {}", last.seq.0).unwrap();
            }
        }
    }
}

/// A small seeded generator for kill timings (no timing is asserted on).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Expected {
    /// (recipient, seq) -> body, for every append the child reported.
    appended: BTreeMap<(String, u64), String>,
    /// recipient -> highest seq reported acked (cumulative): must be gone.
    acked_through: HashMap<String, u64>,
    /// recipient -> highest seq an ack was started for: may be gone.
    ack_started: HashMap<String, u64>,
}

#[test]
fn kill_and_restart_loses_nothing() {
    let rounds: u64 =
        std::env::var("OFFLINE_QUEUE_CRASH_ROUNDS").map_or(20, |r| r.parse().unwrap());
    let seed: u64 = std::env::var("OFFLINE_QUEUE_CRASH_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        },
        |s| s.parse().unwrap(),
    );
    println!("crash test: {rounds} rounds, seed {seed} (replay: OFFLINE_QUEUE_CRASH_SEED={seed})");
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut expected = Expected::default();
    let mut total_appends = 0;
    for round in 0..rounds {
        let before = total_appends;
        // Every round stores something before its kill, which then lands anywhere from a
        // moment to well into the load (mid-commit included).
        let lines = child_support::kill_after_first(
            "crash_child",
            &[
                (CHILD_ENV, path.display().to_string()),
                ("OFFLINE_QUEUE_CRASH_ROUND", round.to_string()),
            ],
            "S ",
            Duration::from_millis(rng.next() % 400),
            &format!("round {round} (seed {seed})"),
        );
        for line in &lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts[..] {
                ["S", who, seq, body] => {
                    total_appends += 1;
                    let previous = expected
                        .appended
                        .insert((who.to_string(), seq.parse().unwrap()), body.to_string());
                    assert!(previous.is_none(), "seq {seq} of {who} handed out twice");
                }
                ["A", who, seq] => {
                    let seq: u64 = seq.parse().unwrap();
                    let through = expected.acked_through.entry(who.to_string()).or_default();
                    *through = (*through).max(seq);
                }
                ["a", who, seq] => {
                    let seq: u64 = seq.parse().unwrap();
                    let started = expected.ack_started.entry(who.to_string()).or_default();
                    *started = (*started).max(seq);
                }
                _ => {}
            }
        }
        assert!(
            total_appends > before,
            "round {round} (seed {seed}): no acknowledged append before the kill"
        );
        verify(&path, &expected, round, seed);
    }
    println!("crash test: {rounds} kills, {total_appends} acknowledged appends, all accounted for");
}

fn verify(path: &std::path::Path, expected: &Expected, round: u64, seed: u64) {
    let storage = RedbStorage::open(path)
        .unwrap_or_else(|e| panic!("round {round} (seed {seed}): reopen failed: {e}"));
    let mut recipients: Vec<&String> = expected.appended.keys().map(|(who, _)| who).collect();
    recipients.dedup();
    for who in recipients {
        let id = RecipientId::new(who).unwrap();
        let stored = block_on(offline_queue::StorageExt::read_all(&storage, &id, NOW)).unwrap();
        let stored: BTreeMap<u64, String> = stored
            .into_iter()
            .map(|r| (r.seq.0, String::from_utf8(r.body.to_vec()).unwrap()))
            .collect();
        let through = expected.acked_through.get(who).copied().unwrap_or(0);
        if let Some((&seq, _)) = stored.iter().next() {
            assert!(
                seq > through,
                "round {round} (seed {seed}): {who} seq {seq} was acked through {through} but came back"
            );
        }
        let maybe_acked = expected
            .ack_started
            .get(who)
            .copied()
            .unwrap_or(0)
            .max(through);
        for ((_, seq), body) in expected
            .appended
            .range((who.clone(), maybe_acked + 1)..=(who.clone(), u64::MAX))
        {
            assert_eq!(
                stored.get(seq),
                Some(body),
                "round {round} (seed {seed}): {who} seq {seq} was acknowledged but is lost"
            );
        }
        // Order: within a recipient, bodies of one sender ascend with seq.
        let counters: Vec<(u64, u64)> = stored
            .values()
            .map(|b| {
                let p: Vec<u64> = b.split(':').map(|x| x.parse().unwrap()).collect();
                (p[0], p[2])
            })
            .collect();
        assert!(
            counters.windows(2).all(|w| w[0] < w[1]),
            "round {round} (seed {seed}): {who} out of order: {counters:?}"
        );
    }
}
