//! Skips that cannot hide. libtest shows nothing a passing test prints, so a test skipped for
//! want of a server or a tool also records why, and `tests/zz_skipped.rs`, the last test
//! binary `cargo test` runs, lists every skip of the run in one line.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::PathBuf;

/// Where this run's skips are recorded, one line each: the pid of the `cargo test` that ran
/// the test binary (so a later run ignores an earlier one's lines), the test, a tab, and the
/// reason.
pub fn log_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped.log")
}

/// Says the current test is skipped because of `reason`, and records it for the summary.
pub fn record(reason: &str) {
    eprintln!("skipped: {reason}");
    // libtest names each test's thread after the test.
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.file_stem()?.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let test = format!("{binary}::{}", thread.name().unwrap_or("?"));
    let line = format!("{} {test}\t{reason}\n", std::os::unix::process::parent_id());
    // One short append per line: concurrent tests do not interleave within it.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())
        .and_then(|mut log| log.write_all(line.as_bytes()));
}

/// Whether the program at `path` is missing. If so, the test is skipped (and says how to
/// install it from `package`), unless the environment variable `required.0` is `required.1`,
/// which makes a missing program a failure (as `.ci/run` does).
pub fn program_missing(path: &str, package: &str, required: (&str, &str)) -> bool {
    if std::path::Path::new(path).exists() {
        return false;
    }
    let (variable, value) = required;
    assert_ne!(
        std::env::var(variable).as_deref(),
        Ok(value),
        "{path} is missing ({variable}={value})"
    );
    record(&format!(
        "{path} is not installed (apt-get install {package})"
    ));
    true
}
