//! Push nudges as webhook calls: `POST <url>` with `{"recipient": .., "pending": ..}`.
//!
//! The engine hands nudges to a [`ChannelNotifier`] without waiting; this task drains it and
//! does the network part, with retries. A slow or failing webhook delays later pushes, never a
//! send: when the channel is full the nudge is dropped and counted as a failed notification.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, Uri, header};
use futures::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use offline_queue::{ChannelNotifier, Nudge};

/// Nudges waiting for the webhook; beyond this, new ones are dropped (and counted).
const QUEUED_NUDGES: usize = 1024;
/// Tries per nudge, the first included.
const ATTEMPTS: u32 = 5;
/// A webhook that takes longer than this to answer has failed this attempt: one hung endpoint
/// must not hold every later push.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to deliver nudges.
#[derive(Clone, Debug)]
pub struct Webhook {
    pub url: Uri,
    /// Wait before the first retry; it doubles after each failure.
    pub retry_base: Duration,
}

impl Webhook {
    /// Checks `url` now, so a typo fails at start-up rather than at the first push.
    pub fn new(url: &str, retry_base: Duration) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|error| format!("--notify-webhook {url:?}: {error}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "--notify-webhook {url:?}: must be an http:// URL with a host (put a TLS proxy in front for https)"
            ));
        }
        Ok(Self {
            url: uri,
            retry_base,
        })
    }

    /// The notifier to give the engine, and the task that posts what it queues. The task ends
    /// when the engine (and so the notifier) is dropped, after the nudges already queued.
    pub fn start(self) -> (ChannelNotifier, tokio::task::JoinHandle<()>) {
        let (notifier, mut nudges) = ChannelNotifier::new(QUEUED_NUDGES);
        let task = tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            while let Some(nudge) = nudges.next().await {
                self.post_with_retries(&client, &nudge).await;
            }
        });
        (notifier, task)
    }

    async fn post_with_retries(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
        nudge: &Nudge,
    ) {
        // Who and how many: never the content or the sender.
        let body = serde_json::json!({
            "recipient": nudge.recipient.to_string(),
            "pending": nudge.pending,
        })
        .to_string();
        let mut wait = self.retry_base;
        for attempt in 1..=ATTEMPTS {
            let request = Request::post(self.url.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .expect("a checked URL makes a valid request");
            let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(request)).await
            {
                Ok(Ok(response)) if response.status().is_success() => return,
                Ok(Ok(response)) => format!("status {}", response.status()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer in {REQUEST_TIMEOUT:?}"),
            };
            tracing::warn!(recipient = %nudge.recipient, attempt, %outcome, "webhook push failed");
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
        }
        tracing::error!(recipient = %nudge.recipient, "webhook push given up after {ATTEMPTS} attempts");
    }
}
