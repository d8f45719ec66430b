//! `RedbStorage` when the disk fills up mid-load: a child process with a file-size limit
//! (`prlimit --fsize`, SIGXFSZ ignored, so writes past it fail with EFBIG as on a full disk)
//! sends from concurrent senders until writes fail; every failure must be a retryable error.
//! The test then lifts the limit ("space returns"): the same storage, without a restart, must
//! serve again. Finally the file is reopened: every send that returned `Ok` is there, and
//! nothing of a failed send is.

#![cfg(all(feature = "redb", target_os = "linux"))]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::executor::block_on;
use offline_queue::storage::NewRecord;
use offline_queue::{MessageId, Quota, RecipientId, RedbStorage, Storage, StorageExt, Timestamp};

const CHILD_ENV: &str = "OFFLINE_QUEUE_DISK_FULL_FILE";
const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const SENDERS: usize = 8;
const FAILURES_WANTED: usize = 16;

fn record(body: &str) -> NewRecord {
    NewRecord {
        id: MessageId::generate(),
        dedup: false,
        sent_at: NOW,
        expires_at: None,
        // Padded so the file grows quickly; the label comes first.
        body: format!("{body}|{}", "x".repeat(2048)).into_bytes(),
    }
}

async fn sender(
    storage: &RedbStorage,
    sender: usize,
    phase: &str,
    failures: &AtomicUsize,
    stop_after: Option<usize>,
) {
    let out = std::io::stdout();
    let who = RecipientId::new(format!("user-{sender}")).unwrap();
    for n in 0.. {
        if stop_after.is_some_and(|max| n >= max)
            || (stop_after.is_none() && failures.load(Ordering::SeqCst) >= FAILURES_WANTED)
        {
            return;
        }
        let label = format!("{phase}-{sender}-{n}");
        match storage
            .append(&who, vec![record(&label)], &Quota::UNLIMITED, NOW)
            .await
        {
            Ok(_) => writeln!(out.lock(), "S {label}").unwrap(),
            Err(error) => {
                assert!(
                    error.is_retryable(),
                    "a full disk must be a retryable error, got {error}"
                );
                writeln!(out.lock(), "E {label}").unwrap();
                failures.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The child: fills the disk, waits for "GO", then sends again.
#[test]
#[ignore = "the child process of full_disk_fails_cleanly_and_recovers; it starts this itself"]
fn disk_full_child() {
    let path = std::env::var(CHILD_ENV).expect("run by full_disk_fails_cleanly_and_recovers");
    let storage = RedbStorage::open(&path).unwrap();
    let failures = AtomicUsize::new(0);
    block_on(futures::future::join_all(
        (0..SENDERS).map(|s| sender(&storage, s, "before", &failures, None)),
    ));
    println!("FULL");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    let none = AtomicUsize::new(0);
    block_on(futures::future::join_all(
        (0..SENDERS).map(|s| sender(&storage, s, "after", &none, Some(5))),
    ));
    assert_eq!(
        none.load(Ordering::SeqCst),
        0,
        "sends failed after space returned"
    );
    println!("RECOVERED");
}

#[test]
fn full_disk_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.redb");
    drop(RedbStorage::open(&path).unwrap());
    let limit = std::fs::metadata(&path).unwrap().len() + 512 * 1024;
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "trap '' XFSZ; exec prlimit --fsize={limit}:unlimited -- '{}' --ignored --exact disk_full_child --nocapture --test-threads=1",
        exe.display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // A safety net so a broken child cannot hang CI; nothing is measured against it.
    let next = || {
        lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the child went silent")
    };
    let (mut ok, mut failed) = (BTreeSet::new(), BTreeSet::new());
    let mut take = |line: &str| match line.split_once(' ') {
        Some(("S", label)) => {
            ok.insert(label.to_string());
        }
        Some(("E", label)) => {
            failed.insert(label.to_string());
        }
        _ => {}
    };
    loop {
        let line = next();
        if line == "FULL" {
            break;
        }
        take(&line);
    }
    // Space returns.
    let pid = child.id().to_string();
    let lifted = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .unwrap();
    assert!(lifted.success());
    writeln!(child.stdin.as_mut().unwrap(), "GO").unwrap();
    loop {
        let line = next();
        if line == "RECOVERED" {
            break;
        }
        take(&line);
    }
    assert!(child.wait().unwrap().success(), "the child failed");
    assert!(
        failed.len() >= FAILURES_WANTED,
        "the limit never bit: {} failures",
        failed.len()
    );
    let before: usize = ok.iter().filter(|l| l.starts_with("before")).count();
    assert!(before > 0, "nothing succeeded before the disk filled");
    assert_eq!(
        ok.iter().filter(|l| l.starts_with("after")).count(),
        SENDERS * 5,
        "every send after space returned succeeded"
    );

    let storage = Arc::new(RedbStorage::open(&path).unwrap());
    let mut stored = BTreeSet::new();
    for sender in 0..SENDERS {
        let who = RecipientId::new(format!("user-{sender}")).unwrap();
        for record in block_on(storage.read_all(&who, NOW)).unwrap() {
            let body = String::from_utf8(record.body.to_vec()).unwrap();
            stored.insert(body.split('|').next().unwrap().to_string());
        }
    }
    let lost: Vec<_> = ok.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "sends that returned Ok are missing: {lost:?}"
    );
    let half_written: Vec<_> = failed.intersection(&stored).collect();
    assert!(
        half_written.is_empty(),
        "sends that failed are visible: {half_written:?}"
    );
    println!(
        "disk full: {} sends ok before, {} failed cleanly, all {} after space returned ok",
        before,
        failed.len(),
        SENDERS * 5
    );
}
