//! RabbitMQ for the tests: the broker's URL from `OFFLINE_QUEUE_AMQP_URL` (skipped, and says
//! so, when unset; a failure under `OFFLINE_QUEUE_REQUIRE_SERVERS=1`), and a virtual host of
//! the test's own, made with `rabbitmqctl` and deleted (with every queue in it) when dropped.

#![allow(dead_code)]

#[allow(clippy::duplicate_mod)]
#[path = "../skip_support/mod.rs"]
pub mod skip_support;

pub mod own_broker;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The broker's URL, or `None` (the test is skipped) when the variable is unset.
pub fn url() -> Option<String> {
    match std::env::var("OFFLINE_QUEUE_AMQP_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "OFFLINE_QUEUE_AMQP_URL is not set, and OFFLINE_QUEUE_REQUIRE_SERVERS=1 requires it"
            );
            skip_support::record("OFFLINE_QUEUE_AMQP_URL is not set");
            None
        }
    }
}

/// A virtual host for one test, removed with everything in it on drop.
pub struct Vhost {
    pub name: String,
    /// `url` with this virtual host as its path.
    pub url: String,
}

impl Vhost {
    /// Makes a virtual host named after `label`, the process and a counter, on the broker
    /// `url` points at, and lets `url`'s user (guest) use it.
    pub fn new(url: &str, label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "oq-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let base = url.trim_end_matches('/');
        let base = match base.rfind('/') {
            // amqp://host:port/vhost -> amqp://host:port
            Some(at) if at > "amqp://".len() => &base[..at],
            _ => base,
        };
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (the RabbitMQ tests manage virtual hosts with it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
