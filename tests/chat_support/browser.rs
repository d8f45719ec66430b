//! Headless Chromium driven over the DevTools protocol (a WebSocket of JSON commands), enough
//! to load a page, run JavaScript in it, and take a screenshot.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::PATIENCE;

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless browser with one page open. The browser is killed when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium with a fresh profile and attaches to a blank page.
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, url)) = line.split_once("DevTools listening on ") {
                    let _ = url_tx.send(url.trim().to_string());
                }
            }
        });
        let url = url_rx
            .recv_timeout(PATIENCE)
            .expect("chromium prints its DevTools address");
        let (devtools, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut browser = Self {
            child,
            _profile: profile,
            devtools,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .command("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .command(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends one command (to the page once attached) and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.devtools
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.devtools.next())
                .await
                .expect("a DevTools reply in time");
            let Some(Ok(Message::Text(text))) = frame else {
                panic!("DevTools connection ended: {frame:?}");
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            // Events (no id) and replies to other commands are not ours.
            if reply["id"] != id {
                continue;
            }
            assert!(reply.get("error").is_none(), "{method}: {reply}");
            return reply["result"].clone();
        }
    }

    /// Loads `url` and waits until an element matching `ready` shows `ready_text`: the page's
    /// own sign of life, not `document.readyState`, which about:blank also reports.
    pub async fn open(&mut self, url: &str, ready: &str, ready_text: &str) {
        self.command("Page.navigate", json!({"url": url})).await;
        self.wait_for_text(ready, ready_text).await;
    }

    /// Runs `expression` in the page; its value (JSON-able).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// The visible text of the first element matching `selector`.
    pub async fn text(&mut self, selector: &str) -> String {
        let expression = format!(
            "(document.querySelector({}) || {{}}).innerText || ''",
            json!(selector)
        );
        self.eval(&expression)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Clicks the first element matching `selector`.
    pub async fn click(&mut self, selector: &str) {
        let clicked = self
            .eval(&format!(
                "(e => e ? (e.click(), true) : false)(document.querySelector({}))",
                json!(selector)
            ))
            .await;
        assert_eq!(clicked, true, "no element {selector}");
    }

    /// Types `text` into the input matching `selector`.
    pub async fn fill(&mut self, selector: &str, text: &str) {
        let filled = self
            .eval(&format!(
                "(e => e ? (e.value = {}, true) : false)(document.querySelector({}))",
                json!(text),
                json!(selector)
            ))
            .await;
        assert_eq!(filled, true, "no element {selector}");
    }

    /// Polls until the element matching `selector` shows `expected` among its text.
    pub async fn wait_for_text(&mut self, selector: &str, expected: &str) {
        self.wait_for(selector, expected, |seen| seen.contains(expected))
            .await;
    }

    /// Polls until the element matching `selector` shows exactly `expected`.
    pub async fn wait_for_exact_text(&mut self, selector: &str, expected: &str) {
        self.wait_for(selector, expected, |seen| seen.trim() == expected)
            .await;
    }

    async fn wait_for(&mut self, selector: &str, expected: &str, done: impl Fn(&str) -> bool) {
        let mut seen = String::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(&seen) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{selector} never showed {expected:?}; it shows {seen:?}"
            );
            seen = self.text(selector).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Saves a PNG of the page at `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        let shot = self
            .command("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
