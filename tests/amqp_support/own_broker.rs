//! A RabbitMQ node a test starts itself (Debian's `rabbitmq-server`, a free loopback port, its
//! database and logs in a temporary directory), killed with SIGKILL or stopped as the test
//! needs, and stopped on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bounds each wait for the broker (it starts in about 7 s here), so a hang fails.
const PATIENCE: Duration = Duration::from_secs(90);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One RabbitMQ node on its own ports and files.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    node: String,
    pub port: u16,
    dist_port: u16,
    /// The `rabbitmq-server` started last (a script that waits on the VM), reaped after it.
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl OwnBroker {
    /// Starts a node and waits until it has finished starting (`rabbitmqctl await_startup`).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The server runs as the `rabbitmq` user when started by root: let it write here.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq"])
            .arg(dir.path())
            .status();
        let port = free_port();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        let broker = Self {
            node: format!("oqtest{}x{port}@localhost", std::process::id()),
            port,
            dist_port: free_port(),
            dir,
            child: std::sync::Mutex::new(None),
        };
        broker.launch();
        broker
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn launch(&self) {
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq.conf"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env("RABBITMQ_PID_FILE", self.path("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.path("plugins"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server starts");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!(
                    "rabbitmq-server exited ({status}) before it listened; its log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server never listened; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The listener opens before the node has finished booting, and a client that
        // connects in between can be cut off (CI saw "connection aborted" on the first
        // connect): wait until the node says it has started.
        let status = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "await_startup", "--timeout"])
            .arg(PATIENCE.as_secs().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmqctl runs");
        assert!(
            status.success(),
            "rabbitmq-server never finished starting ({status}); its log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL to the node's Erlang VM: no shutdown, no flush. Returns once it is gone.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.path("pid")).expect("the node wrote its pid");
        let pid = pid.trim();
        Command::new("kill").args(["-9", pid]).status().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        {
            assert!(Instant::now() < deadline, "the killed node is still there");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reap();
    }

    /// Waits for the script started last to exit (it does when its VM is gone).
    fn reap(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let deadline = Instant::now() + PATIENCE;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The node's log, for a failure's message.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.path("log").join(format!("{}.log", self.node)))
            .unwrap_or_default()
    }

    /// Stops the node cleanly (`rabbitmqctl stop`: connections closed, queues shut down).
    pub fn stop(&self) {
        let pid = std::fs::read_to_string(self.path("pid")).unwrap_or_default();
        let status = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl stop: {status}");
        let deadline = Instant::now() + PATIENCE;
        while std::path::Path::new(&format!("/proc/{}", pid.trim())).exists() {
            assert!(Instant::now() < deadline, "the stopped node is still there");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reap();
    }

    /// Starts the node again on its files.
    pub fn restart(&self) {
        self.launch();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Ok(pid) = std::fs::read_to_string(self.path("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        self.reap();
    }
}
