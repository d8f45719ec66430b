//! The last test binary `cargo test` runs (they run in name order): prints, as one line, every
//! test this run skipped and why. libtest hides what a passing test prints, so without this a
//! plain `cargo test` would pass silently over the tests that need a server or a tool.

mod skip_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;

#[test]
fn list_what_this_run_skipped() {
    let path = skip_support::log_path();
    let Ok(log) = std::fs::read_to_string(&path) else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    let run = std::os::unix::process::parent_id().to_string();
    // Reason -> the tests skipped for it (a test may skip many times: a proptest, each case).
    let mut reasons: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for line in log.lines() {
        // Lines of an earlier run (another `cargo test`) are dropped with the file.
        if let Some((pid, rest)) = line.split_once(' ')
            && pid == run
            && let Some((test, reason)) = rest.split_once('\t')
        {
            reasons.entry(reason).or_default().insert(test);
        }
    }
    let total: BTreeSet<&str> = reasons.values().flatten().copied().collect();
    if total.is_empty() {
        return;
    }
    let list: Vec<String> = reasons
        .iter()
        .map(|(reason, tests)| format!("{reason} ({})", tests.len()))
        .collect();
    let total = total.len();
    // Straight to the terminal: libtest captures only what `print!` and `eprint!` write.
    let _ = std::io::stderr().write_all(
        format!(
            "\nskipped {total} tests, in whole or in part: {}. README says how to run them.\n",
            list.join("; ")
        )
        .as_bytes(),
    );
}
