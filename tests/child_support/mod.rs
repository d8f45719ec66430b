//! Crash tests' child processes: this test binary run again for one ignored test, killed with
//! SIGKILL while it works, its complete stdout lines kept (the last may be cut by the kill).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs the ignored test `child` of this binary with `envs`; once it has printed a line
/// starting with `first` (within 60 s, or panics naming `what`), lets it run `then` more,
/// kills it with SIGKILL and returns every complete line it printed.
pub fn kill_after_first(
    child: &str,
    envs: &[(&str, String)],
    first: &'static str,
    then: Duration,
    what: &str,
) -> Vec<String> {
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            child,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = process.stdout.take().unwrap();
    let (seen, first_seen) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line.ends_with('\n') {
                if line.starts_with(first) {
                    let _ = seen.send(());
                }
                lines.push(line.trim_end().to_string());
            }
            line.clear();
        }
        lines
    });
    first_seen
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: no {first:?} line within 60 s"));
    std::thread::sleep(then);
    process.kill().unwrap();
    process.wait().unwrap();
    reader.join().unwrap()
}
