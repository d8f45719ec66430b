//! Crash safety through the engine: a child process sends through `OfflineQueue` on
//! `RedbStorage`, each message with a sender-chosen id, printing the attempt before the call
//! and the seq after it returned `Ok`; the test kills it with SIGKILL at a random moment, opens
//! the file again in a new engine and resends every attempted message with the same id. Each
//! one answered `Ok` before the kill must come back as a duplicate with its seq (dedup survived
//! the crash); every attempt, answered or not, must end up stored exactly once.
//!
//! `OFFLINE_QUEUE_CRASH_ROUNDS` sets the number of rounds (default 6).

#![cfg(feature = "redb")]

mod child_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use offline_queue::{Envelope, MessageId, OfflineQueue, RecipientId, RedbStorage};

const CHILD_ENV: &str = "OFFLINE_QUEUE_ENGINE_CRASH_FILE";
const SENDERS: usize = 4;
const RECIPIENTS: u64 = 3;

fn queue(path: &str) -> OfflineQueue {
    let storage = RedbStorage::open(path).unwrap();
    OfflineQueue::builder()
        .storage(Arc::new(storage))
        .build()
        .unwrap()
}

/// A message: its recipient, and its id from the sender's own key.
fn message(key: &str) -> Envelope {
    let counter: u64 = key.rsplit(':').next().unwrap().parse().unwrap();
    let who = RecipientId::new(format!("r{}", counter % RECIPIENTS)).unwrap();
    Envelope::new(who, key.as_bytes().to_vec()).with_id(MessageId::derive(b"crash", key.as_bytes()))
}

/// The child: sends until killed. Not a test of its own; the parent starts it.
#[test]
#[ignore = "the child process of engine_dedup_survives_a_kill; it starts this itself"]
fn engine_crash_child() {
    let path = std::env::var(CHILD_ENV).expect("run by engine_dedup_survives_a_kill");
    let round = std::env::var("OFFLINE_QUEUE_CRASH_ROUND").unwrap();
    let queue = queue(&path);
    // Ends the test harness's own "test ... " line, so the first report is a line of its own.
    println!();
    let threads: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (queue, round) = (queue.clone(), round.clone());
            std::thread::spawn(move || {
                let out = std::io::stdout();
                for counter in 0u64.. {
                    let key = format!("{round}:{sender}:{counter}");
                    // The attempt first: killed mid-call, it may or may not be stored.
                    writeln!(out.lock(), "T {key}").unwrap();
                    let receipt = block_on(queue.send(message(&key))).unwrap();
                    writeln!(out.lock(), "S {key} {}", receipt.seq.0).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn engine_dedup_survives_a_kill() {
    let rounds: u64 = std::env::var("OFFLINE_QUEUE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine-crash.redb");
    let path = path.to_str().unwrap().to_string();
    let mut delays = 0x2545_f491_4f6c_dd1du64;
    for round in 0..rounds {
        delays ^= delays << 13;
        delays ^= delays >> 7;
        delays ^= delays << 17;
        let lines = child_support::kill_after_first(
            "engine_crash_child",
            &[
                (CHILD_ENV, path.clone()),
                ("OFFLINE_QUEUE_CRASH_ROUND", round.to_string()),
            ],
            "S ",
            Duration::from_millis(delays % 300),
            &format!("round {round}"),
        );

        let mut attempted = Vec::new();
        let mut answered: HashMap<String, u64> = HashMap::new();
        for line in lines {
            match line.split(' ').collect::<Vec<_>>()[..] {
                ["T", key] => attempted.push(key.to_string()),
                ["S", key, seq] => {
                    answered.insert(key.to_string(), seq.parse().unwrap());
                }
                _ => {}
            }
        }
        assert!(!answered.is_empty(), "round {round}: nothing answered");

        // A new engine on the same file: every attempt again, with its own id.
        let queue = queue(&path);
        for key in &attempted {
            let receipt = block_on(queue.send(message(key)))
                .unwrap_or_else(|e| panic!("round {round}: resend of {key}: {e}"));
            if let Some(&seq) = answered.get(key) {
                assert!(
                    receipt.duplicate && receipt.seq.0 == seq,
                    "round {round}: {key} was answered seq {seq} before the kill; its resend \
                     got {receipt:?}"
                );
            }
        }
        // Stored exactly once each, whatever the kill interrupted.
        let mut stored: BTreeMap<String, usize> = BTreeMap::new();
        for r in 0..RECIPIENTS {
            let who = RecipientId::new(format!("r{r}")).unwrap();
            for delivery in block_on(queue.peek(&who, 100_000)).unwrap() {
                let key = String::from_utf8(delivery.payload.to_vec()).unwrap();
                if key.starts_with(&format!("{round}:")) {
                    *stored.entry(key).or_default() += 1;
                }
            }
        }
        for key in &attempted {
            assert_eq!(
                stored.get(key),
                Some(&1),
                "round {round}: {key} is not stored exactly once"
            );
        }
        let extra: Vec<&String> = stored.keys().filter(|k| !attempted.contains(k)).collect();
        assert!(
            extra.is_empty(),
            "round {round}: stored but never attempted: {extra:?}"
        );
        drop(queue);
    }
}
