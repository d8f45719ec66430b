//! The chat_server example, tested from outside over real WebSockets: each test starts the
//! server as its own process (this test binary, re-run as `chat_server_process` with the
//! server's flags) and talks to it as a browser would.
//!
//! No test waits on a guess: replies are awaited (with a generous bound that only turns a hang
//! into a failure), and state is polled until it holds.

#[path = "../examples/chat_server/server/mod.rs"]
mod server;

#[cfg(feature = "amqp")]
mod amqp_support;
mod chat_support;
#[cfg(feature = "nats")]
mod nats_support;
#[cfg(feature = "postgres")]
mod postgres_support;
#[cfg(feature = "web-push")]
mod push_support;
mod skip_support;

use std::time::Duration;

use chat_support::{Client, Server, TEST_SECRET, http, http_get, sign_token, token, wait_until};
use serde_json::{Value, json};

/// The server process of the other tests; does nothing unless they start it.
#[test]
#[ignore = "the server process the other tests start"]
fn chat_server_process() {
    let Some(args) = chat_support::child_args() else {
        return;
    };
    use clap::Parser as _;
    let config = server::Config::try_parse_from(args).expect("flags");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if let Err(error) = runtime.block_on(server::run(config)) {
        // As the example's main reports a failed start, on stdout where the parent reads it.
        println!("chat_server: {error}");
        std::process::exit(1);
    }
}

#[tokio::test]
async fn offline_messages_arrive_in_order_in_batches_then_caught_up() {
    offline_then_batches(&[]).await;
}

/// The same protocol on PostgreSQL (`OFFLINE_QUEUE_POSTGRES_URL`; skipped, and says so, when
/// it is unset): offline messages in batches, then acks and redelivery.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_protocol_holds_on_postgres() {
    let Some(url) = postgres_support::url() else {
        return;
    };
    // Each scenario in a schema of its own, as each starts from empty queues.
    for scenario in 0..2 {
        let schema = postgres_support::unique_schema("chat");
        let flags = ["--storage", &url, "--postgres-schema", &schema];
        if scenario == 0 {
            offline_then_batches(&flags).await;
        } else {
            acked_gone_unacked_back(&flags).await;
        }
        postgres_support::drop_schemas(&url, &[schema]).await;
    }
}

/// The same protocol on NATS JetStream (`OFFLINE_QUEUE_NATS_URL`; skipped, and says so, when
/// it is unset), in both layouts, each scenario on streams of its own.
#[cfg(feature = "nats")]
#[tokio::test]
async fn the_protocol_holds_on_nats() {
    let Some(url) = nats_support::url() else {
        return;
    };
    for layout in ["shared", "owned"] {
        for scenario in 0..2 {
            let name = nats_support::unique_name();
            let flags = [
                "--storage",
                &url,
                "--nats-stream",
                &name,
                "--nats-layout",
                layout,
            ];
            if scenario == 0 {
                offline_then_batches(&flags).await;
            } else {
                acked_gone_unacked_back(&flags).await;
            }
            nats_support::delete(&url, &[name]).await;
        }
    }
}

/// The same protocol on RabbitMQ (`OFFLINE_QUEUE_AMQP_URL`; skipped, and says so, when it is
/// unset), each scenario in a virtual host of its own.
#[cfg(feature = "amqp")]
#[tokio::test]
async fn the_protocol_holds_on_amqp() {
    let Some(url) = amqp_support::url() else {
        return;
    };
    for scenario in 0..2 {
        let vhost = amqp_support::Vhost::new(&url, "chat");
        let flags = ["--storage", &vhost.url];
        if scenario == 0 {
            offline_then_batches(&flags).await;
        } else {
            acked_gone_unacked_back(&flags).await;
        }
    }
}

/// The same on PostgreSQL over TLS: `?sslmode=require` and `--postgres-tls-roots` with the
/// certificate Debian's PostgreSQL serves (its snakeoil one, for `localhost`).
#[cfg(feature = "postgres-tls")]
#[tokio::test]
async fn the_protocol_holds_on_postgres_over_tls() {
    use postgres_support::SNAKEOIL;
    let Some((url, tls)) = postgres_support::tls_url().await else {
        return;
    };
    let schema = postgres_support::unique_schema("chat_tls");
    let flags = [
        "--storage",
        &tls,
        "--postgres-schema",
        &schema,
        "--postgres-tls-roots",
        SNAKEOIL,
    ];
    offline_then_batches(&flags).await;
    postgres_support::drop_schemas(&url, &[schema]).await;
}

/// Alice sends five to bob, offline; bob connects and gets them in batches of two.
async fn offline_then_batches(storage: &[&str]) {
    let mut args = vec!["--batch-max", "2"];
    args.extend_from_slice(storage);
    let server = Server::start(&args);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let mut seqs = Vec::new();
    for i in 1..=5 {
        seqs.push(alice.send_message("bob", &format!("m{i}")).await);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs grow: {seqs:?}");
    wait_until("bob has 5 waiting", || async {
        server.pending("bob").await == 5
    })
    .await;

    let mut bob = Client::connect(&server, "bob").await;
    let backlog = bob.drain().await;
    let sizes: Vec<usize> = backlog.batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1], "batches of --batch-max 2");
    let messages: Vec<&Value> = backlog.batches.iter().flatten().collect();
    let bodies: Vec<&str> = messages
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m1", "m2", "m3", "m4", "m5"]);
    for (message, seq) in messages.iter().zip(&seqs) {
        assert_eq!(message["seq"], *seq);
        assert_eq!(message["from"], "alice");
        assert_eq!(message["redelivered"], false);
        let sent_at = message["sent_at_ms"].as_u64().unwrap();
        let expires_at = message["expires_at_ms"].as_u64().unwrap();
        assert_eq!(
            expires_at - sent_at,
            604_800_000,
            "the default TTL of 7 days"
        );
    }
    assert_eq!(backlog.gap, 0);
}

#[tokio::test]
async fn live_messages_reach_an_online_recipient() {
    let server = Server::start(&[]);
    let mut bob = Client::connect(&server, "bob").await;
    bob.expect_caught_up_empty().await;
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let seq = alice.send_message("bob", "are you there?").await;
    let frame = bob.recv().await;
    assert_eq!(frame["type"], "deliver");
    assert_eq!(frame["messages"][0]["body"], "are you there?");
    assert_eq!(frame["messages"][0]["seq"], seq);
}

#[tokio::test]
async fn acked_messages_are_gone_and_unacked_come_back_marked() {
    acked_gone_unacked_back(&[]).await;
}

/// Bob acks two of three; the third comes back, marked, on his next connection.
async fn acked_gone_unacked_back(storage: &[&str]) {
    let server = Server::start(storage);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    for body in ["one", "two", "three"] {
        alice.send_message("bob", body).await;
    }

    let mut bob = Client::connect(&server, "bob").await;
    let first = bob.drain().await.messages();
    assert_eq!(first.len(), 3);
    bob.send(json!({"type": "ack", "seqs": [first[0]["seq"]]}))
        .await;
    bob.send(json!({"type": "ack", "up_to": first[1]["seq"]}))
        .await;
    wait_until("acks stored", || async { server.pending("bob").await == 1 }).await;
    bob.close().await;

    let mut bob = Client::connect(&server, "bob").await;
    let again = bob.drain().await.messages();
    assert_eq!(again.len(), 1, "only the unacked message: {again:?}");
    assert_eq!(again[0]["body"], "three");
    assert_eq!(again[0]["redelivered"], true);
    assert_eq!(again[0]["id"], first[2]["id"], "the same message, by id");
}

#[tokio::test]
async fn expired_messages_are_not_delivered_and_are_reported_as_a_gap() {
    let server = Server::start(&[]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    alice
        .send(json!({"type": "send", "to": "bob", "body": "gone soon", "ttl_secs": 1}))
        .await;
    assert_eq!(alice.recv().await["type"], "sent");
    alice.send_message("bob", "still here").await;
    // Expiry is judged against sent_at + ttl; waiting past that deadline is the test itself.
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let mut bob = Client::connect(&server, "bob").await;
    let backlog = bob.drain().await;
    let bodies: Vec<Value> = backlog
        .messages()
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(bodies, [json!("still here")]);
    assert_eq!(
        backlog.gap, 1,
        "the expired message is counted, not silently missing"
    );
}

#[tokio::test]
async fn a_resend_with_the_same_client_id_is_stored_once() {
    let server = Server::start(&[]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    // A UUID, a short string, digits, 128 characters of any script: each is just a string.
    let ids = [
        "7f0c2a4e-9a51-4c1e-8f57-1b2d3c4d5e6f".to_string(),
        "m-1".to_string(),
        "42".to_string(),
        "é".repeat(128),
    ];
    let mut message_ids = Vec::new();
    for id in &ids {
        let frame = json!({"type": "send", "to": "bob", "body": format!("once {id}"), "id": id});
        alice.send(frame.clone()).await;
        let first = alice.recv().await;
        alice.send(frame).await;
        let second = alice.recv().await;
        assert_eq!(first["type"], "sent", "{first}");
        assert_eq!(first, second, "same id, same seq");
        assert_eq!(first["id"], id.as_str(), "sent echoes the client's own id");
        message_ids.push(first["message_id"].clone());
    }
    assert_eq!(server.pending("bob").await, ids.len() as u64);

    let mut bob = Client::connect(&server, "bob").await;
    let delivered = bob.drain().await.messages();
    assert_eq!(delivered.len(), ids.len());
    for ((message, id), message_id) in delivered.iter().zip(&ids).zip(&message_ids) {
        assert_eq!(message["client_id"], id.as_str(), "{message}");
        assert_eq!(
            &message["id"], message_id,
            "the stored id, as sent answered it"
        );
    }
}

/// Dedup is per sender: alice and carol both send bob `id X`; both are stored and delivered,
/// each with its sender's id, and a resend by either is still one message.
#[tokio::test]
async fn the_same_client_id_from_two_senders_is_two_messages() {
    let server = Server::start(&[]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let mut carol = Client::connect(&server, "carol").await;
    carol.expect_caught_up_empty().await;
    let mut sent = Vec::new();
    for (client, body) in [(&mut alice, "from alice"), (&mut carol, "from carol")] {
        let frame = json!({"type": "send", "to": "bob", "body": body, "id": "X"});
        client.send(frame.clone()).await;
        let first = client.recv().await;
        client.send(frame).await;
        assert_eq!(
            client.recv().await,
            first,
            "a resend by one sender is one message"
        );
        assert_eq!(first["type"], "sent", "{first}");
        sent.push(first);
    }
    assert_ne!(
        sent[0]["seq"], sent[1]["seq"],
        "carol's is not taken for alice's"
    );
    assert_ne!(sent[0]["message_id"], sent[1]["message_id"]);
    assert_eq!(server.pending("bob").await, 2);

    let mut bob = Client::connect(&server, "bob").await;
    let delivered = bob.drain().await.messages();
    let seen: Vec<(&str, &str, &str)> = delivered
        .iter()
        .map(|m| {
            (
                m["from"].as_str().unwrap(),
                m["body"].as_str().unwrap(),
                m["client_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("alice", "from alice", "X"), ("carol", "from carol", "X")]
    );
}

#[tokio::test]
async fn every_error_code_answers_and_the_connection_stays_open() {
    let server = Server::start(&["--max-message-bytes", "200", "--max-pending", "2"]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let big = "x".repeat(300);
    let cases = [
        (
            json!({"type": "send", "to": "bob", "body": big, "id": "00000000000000000000000000000001"}),
            "message_too_large",
        ),
        (
            json!({"type": "send", "to": "", "body": "hi"}),
            "invalid_recipient",
        ),
        (
            json!({"type": "send", "to": "x".repeat(256), "body": "hi"}),
            "invalid_recipient",
        ),
        (
            json!({"type": "send", "to": "bob", "body": "hi", "ttl_secs": 0}),
            "invalid_ttl",
        ),
        (
            json!({"type": "send", "to": "bob", "body": "hi", "ttl_secs": 10_000_000_000u64}),
            "invalid_ttl",
        ),
        (
            json!({"type": "send", "to": "bob", "body": "hi", "id": ""}),
            "bad_request",
        ),
        (
            json!({"type": "send", "to": "bob", "body": "hi", "id": "i".repeat(129)}),
            "bad_request",
        ),
        (
            json!({"type": "send", "to": "bob", "body": "hi", "id": "m\u{0}-1"}),
            "bad_request",
        ),
        (json!({"type": "send", "to": "bob"}), "bad_request"),
        (json!({"type": "shout", "to": "bob"}), "bad_request"),
        (json!({"type": "ack"}), "bad_request"),
        (
            json!({"type": "ack", "up_to": 3, "seqs": [1]}),
            "bad_request",
        ),
        (json!([1, 2, 3]), "bad_request"),
    ];
    for (frame, code) in cases {
        alice.send(frame.clone()).await;
        let reply = alice.recv().await;
        assert_eq!(reply["type"], "error", "{frame} -> {reply}");
        assert_eq!(reply["code"], code, "{frame} -> {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    let reply = alice.send_raw_text("{not json").await;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.send_binary(vec![1, 2, 3]).await;
    assert_eq!(reply["code"], "bad_request");
    // The id of a refused send is echoed so the client can match the error to its message.
    alice
        .send(json!({"type": "send", "to": "bob", "body": "x".repeat(300), "id": "00000000000000000000000000000002"}))
        .await;
    assert_eq!(alice.recv().await["id"], "00000000000000000000000000000002");

    // The queue limit: two fit, the third is refused with the limit named.
    alice.send_message("bob", "1").await;
    alice.send_message("bob", "2").await;
    alice
        .send(json!({"type": "send", "to": "bob", "body": "3"}))
        .await;
    let full = alice.recv().await;
    assert_eq!(full["code"], "queue_full", "{full}");
    assert!(
        full["message"]
            .as_str()
            .unwrap()
            .contains("exceed 2 messages"),
        "{full}"
    );
    // Still open and serving.
    alice.send_message("carol", "after all that").await;
    assert_eq!(server.pending("bob").await, 2);
}

#[tokio::test]
async fn a_storage_failure_answers_unavailable_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.redb");
    // A file size limit on the server process: writes past it fail as on a full disk.
    let server = Server::start_with_file_limit(&path, 2 * 1024 * 1024);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let body = "y".repeat(60_000);
    let mut stored = 0;
    let failure = loop {
        assert!(stored < 200, "the file limit was never reached");
        alice
            .send(json!({"type": "send", "to": "bob", "body": body}))
            .await;
        let reply = alice.recv().await;
        match reply["type"].as_str() {
            Some("sent") => stored += 1,
            _ => break reply,
        }
    };
    assert_eq!(failure["code"], "unavailable", "{failure}");
    assert!(stored > 0);
    // Small messages still fit in the pages the file already has, or fail the same way: either
    // way the connection answers.
    alice
        .send(json!({"type": "send", "to": "carol", "body": "hi"}))
        .await;
    let reply = alice.recv().await;
    assert!(
        reply["type"] == "sent" || reply["code"] == "unavailable",
        "{reply}"
    );
    assert_eq!(http_get(server.addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn a_killed_server_loses_nothing_it_answered_sent_for() {
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("redb:{}", dir.path().join("chat.redb").display());
    let server = Server::start(&["--storage", &storage]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.send_message("bob", &format!("durable {i}")).await);
    }
    let mut bob = Client::connect(&server, "bob").await;
    let first = bob.drain().await.messages();
    assert_eq!(first.len(), 20);
    bob.send(json!({"type": "ack", "up_to": first[9]["seq"]}))
        .await;
    wait_until("ten acked", || async { server.pending("bob").await == 10 }).await;
    server.kill();

    let server = Server::start(&["--storage", &storage]);
    let mut bob = Client::connect(&server, "bob").await;
    let after = bob.drain().await.messages();
    let seqs: Vec<u64> = after.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        sent[10..],
        "the unacked ten, in order; the acked ten gone"
    );
    assert!(after.iter().all(|m| m["redelivered"] == true));
}

#[tokio::test]
async fn sigterm_closes_sessions_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("redb:{}", dir.path().join("chat.redb").display());
    let server = Server::start(&["--storage", &storage]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    alice.send_message("bob", "kept across the restart").await;
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let close = alice.recv_close().await.expect("the client is told");
    assert_eq!(u16::from(close.code), 1001, "going away");

    let server = Server::start(&["--storage", &storage]);
    let mut bob = Client::connect(&server, "bob").await;
    let messages = bob.drain().await.messages();
    assert_eq!(messages[0]["body"], "kept across the restart");
}

#[tokio::test]
async fn a_newer_connection_displaces_the_older_one() {
    let server = Server::start(&[]);
    let mut first = Client::connect(&server, "bob").await;
    first.expect_caught_up_empty().await;
    let mut second = Client::connect(&server, "bob").await;
    second.expect_caught_up_empty().await;
    let close = first.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4000);
}

#[tokio::test]
async fn a_silent_client_is_dropped_and_one_that_answers_pings_is_kept() {
    let server = Server::start(&["--idle-timeout-ms", "300"]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    // Alice keeps reading, so her client answers the server's pings; she sends nothing else.
    let reader = tokio::spawn(async move {
        loop {
            alice.recv().await;
        }
    });
    let mut bob = Client::connect(&server, "bob").await;
    bob.expect_caught_up_empty().await;
    assert!(server.online("bob").await);
    // Bob stops reading: no pongs. His connection goes, and with it his presence, so pushes
    // for him resume.
    wait_until("bob dropped", || async { !server.online("bob").await }).await;
    // Alice connected earlier and has been as quiet as bob, pongs aside: only they kept her.
    assert!(server.online("alice").await, "pongs count as signs of life");
    assert!(!reader.is_finished(), "alice's connection is open");
    reader.abort();
}

#[tokio::test]
async fn webhook_pushes_are_coalesced_retried_and_carry_no_content() {
    let (hook, mut posts) = chat_support::WebhookReceiver::start(1).await;
    let server = Server::start(&[
        "--notify-webhook",
        &hook,
        "--notify-retry-ms",
        "20",
        "--notify-cooldown-secs",
        "3600",
    ]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    for i in 0..3 {
        alice.send_message("bob", &format!("secret {i}")).await;
    }
    // Carol connected: nothing for her is pushed.
    let mut carol = Client::connect(&server, "carol").await;
    carol.expect_caught_up_empty().await;
    alice.send_message("carol", "you are online").await;
    // Dave's push goes out after everything above (one sender, in order): once it is here,
    // every push the messages above caused has been made.
    alice.send_message("dave", "hello").await;

    let mut received = Vec::new();
    loop {
        let post = posts.recv().await;
        let done = post.body["recipient"] == "dave";
        received.push(post);
        if done {
            break;
        }
    }
    let for_bob: Vec<_> = received
        .iter()
        .filter(|p| p.body["recipient"] == "bob")
        .collect();
    assert_eq!(
        for_bob.len(),
        2,
        "one push, refused once and retried: {received:?}"
    );
    assert_eq!(for_bob[0].status, 500);
    assert_eq!(for_bob[1].status, 200);
    assert_eq!(for_bob[1].body, json!({"recipient": "bob", "pending": 1}));
    assert!(
        received.iter().all(|p| p.body["recipient"] != "carol"),
        "{received:?}"
    );
    assert!(
        received
            .iter()
            .all(|p| !p.raw.contains("secret") && !p.raw.contains("alice")),
        "no content or sender in a push"
    );

    let (status, metrics) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("offline_queue_notifications_sent_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("offline_queue_notifications_coalesced_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE offline_queue_live_sessions gauge\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("offline_queue_live_sessions 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_page_health_and_bad_upgrades_answer() {
    let server = Server::start(&[]);
    let (status, page) = http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>offline-queue chat</title>"));
    assert_eq!(
        http_get(server.addr, "/healthz").await,
        (200, "ok\n".to_string())
    );
    let (status, body) = http_get(server.addr, &format!("/stats?token={}", token(""))).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token subject"), "{body}");
    let (status, body) = http_get(server.addr, &format!("/stats?token={}", token("nobody"))).await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        stats,
        json!({"user": "nobody", "online": false, "pending": 0, "bytes": 0})
    );
    assert!(
        Client::try_connect(&server, "").await.is_err(),
        "an empty user is refused"
    );
}

#[test]
fn bad_flags_fail_at_start_naming_the_flag() {
    for (args, expected) in [
        // Built with the Redis backend, a server that does not answer is named; without it,
        // the missing feature is.
        (
            vec!["--storage", "redis://127.0.0.1:1"],
            if cfg!(feature = "redis") {
                "redis://127.0.0.1:1"
            } else {
                "built without the `redis` feature"
            },
        ),
        // Likewise for PostgreSQL.
        (
            vec!["--storage", "postgres://postgres@127.0.0.1:1/test"],
            if cfg!(feature = "postgres") {
                "does not answer"
            } else {
                "built without the `postgres` feature"
            },
        ),
        // And for NATS.
        (
            vec!["--storage", "nats://127.0.0.1:1"],
            if cfg!(feature = "nats") {
                "does not answer"
            } else {
                "built without the `nats` feature"
            },
        ),
        // And for RabbitMQ.
        (
            vec!["--storage", "amqp://guest:guest@127.0.0.1:1/%2f"],
            if cfg!(feature = "amqp") {
                "does not answer"
            } else {
                "built without the `amqp` feature"
            },
        ),
        (vec!["--storage", "floppy:a"], "--storage \"floppy:a\""),
        (
            vec!["--notify-webhook", "https://push.example"],
            "--notify-webhook",
        ),
        (vec!["--listen", "192.0.2.1:80"], "--listen 192.0.2.1:80"),
        (
            vec!["--batch-max", "0"],
            "--batch-max 0: must be between 1 and",
        ),
        (vec!["--default-ttl-secs", "0"], "--default-ttl-secs 0"),
        (
            vec!["--default-ttl-secs", "99999999"],
            "--default-ttl-secs 99999999",
        ),
        (vec!["--max-pending", "0"], "--max-pending 0"),
        (
            vec!["--auth-secret", "too short"],
            "--auth-secret (or CHAT_AUTH_SECRET): 9 bytes; must be at least 32",
        ),
        (vec!["--token-ttl-secs", "0"], "--token-ttl-secs 0"),
    ] {
        let message = Server::start_failure(&args);
        assert!(message.contains(expected), "{args:?}: {message}");
    }
}

/// The demo page in a real browser: alice sends to bob while he is offline, the page shows the
/// message waiting, bob connects and the page shows it delivered. Needs Debian's chromium;
/// skipped without it unless `OFFLINE_QUEUE_BROWSER=required` (as in `.ci/run`).
#[tokio::test]
async fn the_page_shows_offline_delivery_in_a_browser() {
    use chat_support::browser::{Browser, CHROMIUM};
    if skip_support::program_missing(CHROMIUM, "chromium", ("OFFLINE_QUEUE_BROWSER", "required")) {
        return;
    }
    let server = Server::start(&[]);
    let mut browser = Browser::launch().await;
    // Through the link the server printed: its login key signs the page's users in.
    let page = server.page.clone().expect("the server printed its page");
    browser.open(&page, "#user-carol .status", "offline").await;

    browser.click("#user-alice .connect").await;
    browser.wait_for_text("#user-alice .status", "online").await;
    browser
        .eval("document.querySelector('#user-alice .to').value = 'bob'")
        .await;
    browser
        .fill("#user-alice .text", "hello bob, from the browser")
        .await;
    browser.click("#user-alice .send").await;
    browser
        .wait_for_text("#user-alice .messages", "sent, stored as seq")
        .await;
    browser
        .wait_for_text("#user-bob .status", "1 waiting")
        .await;
    assert!(browser.text("#user-bob .status").await.contains("offline"));
    // What the server did for offline bob: one content-free push, and its counters.
    browser
        .wait_for_text("#user-bob .pushes", "new message, 1 waiting at")
        .await;
    let pushes = browser.text("#user-bob .pushes").await;
    assert!(!pushes.contains("hello"), "no content in a push: {pushes}");
    assert_eq!(
        browser.text("#user-carol .pushes").await,
        "",
        "nothing pushed to carol"
    );
    browser.wait_for_text("#counters", "stored 1 ·").await;
    browser.wait_for_text("#counters", "pushes 1 ·").await;

    browser.click("#user-bob .connect").await;
    browser
        .wait_for_text("#user-bob .messages", "caught up")
        .await;
    let bob = browser.text("#user-bob .messages").await;
    assert!(bob.contains("batch of 1 message"), "{bob}");
    assert!(bob.contains("alice: hello bob, from the browser"), "{bob}");
    browser.wait_for_text("#user-bob .status", "online").await;
    wait_until("bob's message acked", || async {
        server.pending("bob").await == 0
    })
    .await;
    // The page polls once a second; ask it now, so the screenshot shows the final state.
    browser.eval("refreshAll()").await;
    browser
        .wait_for_exact_text("#user-bob .status", "● online")
        .await;

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat_page.png");
    browser.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
}

/// Cluster mode: two server processes on one Redis (and on one Redis Cluster). A user
/// connected to the second receives, at once, what was sent through the first.
#[cfg(feature = "redis")]
#[tokio::test]
async fn two_servers_on_one_redis_deliver_across() {
    let targets = [
        std::env::var("OFFLINE_QUEUE_REDIS_URL").ok(),
        std::env::var("OFFLINE_QUEUE_REDIS_CLUSTER_URLS").ok(),
    ];
    if targets.iter().all(Option::is_none) {
        assert!(
            std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "OFFLINE_QUEUE_REQUIRE_SERVERS=1 needs OFFLINE_QUEUE_REDIS_URL"
        );
        skip_support::record(
            "OFFLINE_QUEUE_REDIS_URL and OFFLINE_QUEUE_REDIS_CLUSTER_URLS are unset",
        );
        return;
    }
    for storage in targets.into_iter().flatten() {
        let prefix = format!("chat-test-{}", offline_queue::MessageId::generate());
        let flags = ["--storage", &storage, "--redis-prefix", &prefix];
        let first = Server::start(&flags);
        let second = Server::start(&flags);
        let mut bob = Client::connect(&second, "bob").await;
        bob.expect_caught_up_empty().await;
        // Bob's presence reaches Redis within a round trip of his connecting.
        let mut alice = Client::connect(&first, "alice").await;
        alice.expect_caught_up_empty().await;
        wait_until("bob is online as the first server sees it", || async {
            first.online("bob").await
        })
        .await;
        let seq = alice.send_message("bob", "across servers").await;
        let frame = bob.recv().await;
        assert_eq!(frame["type"], "deliver", "{frame}");
        assert_eq!(frame["messages"][0]["body"], "across servers");
        assert_eq!(frame["messages"][0]["seq"], seq);
        assert_eq!(frame["messages"][0]["from"], "alice");
    }
}

/// Two server processes on one PostgreSQL schema: a user connected to the second receives, at
/// once, what was sent through the first (woken over LISTEN/NOTIFY), and the first sees him
/// online (no push).
#[cfg(feature = "postgres")]
#[tokio::test]
async fn two_servers_on_one_postgres_deliver_across() {
    let Some(url) = postgres_support::url() else {
        return;
    };
    let schema = postgres_support::unique_schema("chat");
    two_servers_deliver_across(&["--storage", &url, "--postgres-schema", &schema]).await;
    postgres_support::drop_schemas(&url, &[schema]).await;
}

/// Two server processes started with `flags`: bob, connected to the second, receives at once
/// what alice sends through the first, which sees him online.
#[cfg(any(feature = "postgres", feature = "nats", feature = "amqp"))]
async fn two_servers_deliver_across(flags: &[&str]) {
    let first = Server::start(flags);
    let second = Server::start(flags);
    let mut bob = Client::connect(&second, "bob").await;
    bob.expect_caught_up_empty().await;
    let mut alice = Client::connect(&first, "alice").await;
    alice.expect_caught_up_empty().await;
    wait_until("bob is online as the first server sees it", || async {
        first.online("bob").await
    })
    .await;
    for body in ["across servers", "and again"] {
        let seq = alice.send_message("bob", body).await;
        let frame = bob.recv().await;
        assert_eq!(frame["type"], "deliver", "{frame}");
        assert_eq!(frame["messages"][0]["body"], body);
        assert_eq!(frame["messages"][0]["seq"], seq);
        assert_eq!(frame["messages"][0]["from"], "alice");
    }
}

/// Two server processes on one NATS JetStream, in each layout: a user connected to the second
/// receives, at once, what was sent through the first (woken by its request on core NATS),
/// and the first sees him online (no push). With `owned`, the first to touch a queue owns
/// it and the other forwards to it.
#[cfg(feature = "nats")]
#[tokio::test]
async fn two_servers_on_one_nats_deliver_across() {
    let Some(url) = nats_support::url() else {
        return;
    };
    for layout in ["shared", "owned"] {
        let name = nats_support::unique_name();
        let flags = [
            "--storage",
            &url,
            "--nats-stream",
            &name,
            "--nats-layout",
            layout,
        ];
        two_servers_deliver_across(&flags).await;
        nats_support::delete(&url, &[name]).await;
    }
}

/// Two server processes on one RabbitMQ virtual host: a user connected to the second receives,
/// at once, what was sent through the first (woken through the exchange), and the first sees
/// him online (no push).
#[cfg(feature = "amqp")]
#[tokio::test]
async fn two_servers_on_one_amqp_deliver_across() {
    let Some(url) = amqp_support::url() else {
        return;
    };
    let vhost = amqp_support::Vhost::new(&url, "chat2");
    two_servers_deliver_across(&["--storage", &vhost.url]).await;
}

/// A client that sends without waiting (300 frames, some refused) gets one reply per frame, in
/// the order of its frames, and each recipient gets its messages in the order they were sent,
/// with a bound of 8 sends in flight (the server stops reading past it, then goes on). On
/// memory storage a send is done in the poll that starts it.
#[tokio::test]
async fn pipelined_sends_are_answered_and_stored_in_order() {
    pipelined_sends_in_order(&[]).await;
}

/// The same on redb, whose sends are still pending after the poll that gives them their place
/// in the writer's order: none waits for another, and each finishes in the connection's loop.
#[tokio::test]
async fn pipelined_sends_on_redb_are_answered_and_stored_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("redb:{}", dir.path().join("chat.redb").display());
    pipelined_sends_in_order(&["--storage", &storage]).await;
}

/// The same on Redis, whose appends do not keep poll order: there each send waits for the
/// connection's previous one to the same recipient (the path every backend but memory and
/// redb takes).
#[cfg(feature = "redis")]
#[tokio::test]
async fn pipelined_sends_on_redis_are_answered_and_stored_in_order() {
    let Ok(url) = std::env::var("OFFLINE_QUEUE_REDIS_URL") else {
        assert!(
            std::env::var("OFFLINE_QUEUE_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "OFFLINE_QUEUE_REQUIRE_SERVERS=1 needs OFFLINE_QUEUE_REDIS_URL"
        );
        skip_support::record("OFFLINE_QUEUE_REDIS_URL is unset");
        return;
    };
    let prefix = format!("chat-test-{}", offline_queue::MessageId::generate());
    pipelined_sends_in_order(&["--storage", &url, "--redis-prefix", &prefix]).await;
}

async fn pipelined_sends_in_order(storage: &[&str]) {
    let mut flags = vec!["--max-sends-in-flight", "8"];
    flags.extend_from_slice(storage);
    let server = Server::start(&flags);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    let frames: Vec<(String, Value)> = (0..300)
        .map(|i| {
            let id = if i % 7 == 3 {
                String::new()
            } else {
                format!("m-{i}")
            };
            let to = if i % 2 == 0 { "bob" } else { "carol" };
            (
                id.clone(),
                json!({"type": "send", "to": to, "body": format!("{i}"), "id": id}),
            )
        })
        .collect();
    for (_, frame) in &frames {
        alice.send(frame.clone()).await;
    }
    let mut last_seq = std::collections::HashMap::new();
    for (id, frame) in &frames {
        let reply = alice.recv().await;
        assert_eq!(reply["id"], id.as_str(), "replies in frame order: {reply}");
        if id.is_empty() {
            assert_eq!(reply["code"], "bad_request", "{reply}");
            continue;
        }
        assert_eq!(reply["type"], "sent", "{reply}");
        let seq = reply["seq"].as_u64().unwrap();
        let to = frame["to"].as_str().unwrap();
        if let Some(previous) = last_seq.insert(to, seq) {
            assert!(seq > previous, "stored in send order for {to}");
        }
    }
    for user in ["bob", "carol"] {
        let mut client = Client::connect(&server, user).await;
        let bodies: Vec<u64> = client
            .drain()
            .await
            .messages()
            .iter()
            .map(|m| m["body"].as_str().unwrap().parse().unwrap())
            .collect();
        let expected: Vec<u64> = (0..300)
            .filter(|i| i % 7 != 3 && (i % 2 == 0) == (user == "bob"))
            .collect();
        assert_eq!(bodies, expected, "{user} gets its messages once, in order");
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Each way of lacking a valid token gets 401 and no socket, on `/ws` and on `/stats`, and
/// changes nothing: what waits for bob stays stored and undelivered.
#[tokio::test]
async fn requests_without_a_valid_token_are_refused_and_change_nothing() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let server = Server::start(&[]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    for i in 0..3 {
        alice.send_message("bob", &format!("m{i}")).await;
    }

    let now = unix_now();
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let claims = |user: &str, exp: u64| json!({"sub": user, "exp": exp}).to_string();
    let alices = token("alice");
    let signature = alices.rsplit('.').next().unwrap();
    let tampered = format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(hs256),
        URL_SAFE_NO_PAD.encode(claims("bob", now + 3600))
    );
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims("bob", now + 3600))
    );
    let forged = sign_token(
        b"not-the-servers-secret-0123456789abcdef",
        hs256,
        &claims("bob", now + 3600),
    );
    let expired = sign_token(TEST_SECRET.as_bytes(), hs256, &claims("bob", now - 1));
    let early = sign_token(
        TEST_SECRET.as_bytes(),
        hs256,
        &json!({"sub": "bob", "exp": now + 7200, "nbf": now + 3600}).to_string(),
    );
    let refused = [
        ("no token", String::new(), "no token"),
        ("a user but no token", "user=bob".into(), "no token"),
        ("malformed", "token=not-a-token".into(), "malformed"),
        ("alg none", format!("token={unsigned}"), "alg must be HS256"),
        ("forged", format!("token={forged}"), "does not verify"),
        ("tampered", format!("token={tampered}"), "does not verify"),
        ("expired", format!("token={expired}"), "expired"),
        ("not yet valid", format!("token={early}"), "not valid yet"),
        (
            "another user's",
            format!("token={alices}&user=bob"),
            "another user",
        ),
    ];
    for (what, query, reason) in &refused {
        match Client::connect_with(&server, query).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body =
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned();
                assert_eq!(response.status().as_u16(), 401, "{what}: {body}");
                assert!(body.contains(reason), "{what}: {body}");
            }
            Ok(_) => panic!("{what}: connected"),
            Err(other) => panic!("{what}: {other}"),
        }
        let (status, body) = http_get(server.addr, &format!("/stats?{query}")).await;
        assert_eq!(
            (status, body.contains(reason)),
            (401, true),
            "{what}: {body}"
        );
    }
    let forged_header = format!("Bearer {forged}");
    let (status, _) = http(
        server.addr,
        "GET",
        "/stats",
        &[("authorization", &forged_header)],
        "",
    )
    .await;
    assert_eq!(status, 401, "a forged bearer token");

    // Nothing was read or acked: bob's three wait, and come on his first delivery.
    let bobs_header = format!("Bearer {}", token("bob"));
    let (status, body) = http(
        server.addr,
        "GET",
        "/stats",
        &[("authorization", &bobs_header)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["pending"], 3);
    let mut bob = Client::connect(&server, "bob").await;
    let messages = bob.drain().await.messages();
    let bodies: Vec<&str> = messages
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    assert!(
        messages.iter().all(|m| m["redelivered"] == false),
        "{messages:?}"
    );
}

/// `POST /login` issues tokens only to holders of the key the server printed; `--no-login`
/// removes it.
#[tokio::test]
async fn login_issues_tokens_only_for_the_printed_key() {
    let server = Server::start(&[]);
    let request = r#"{"user":"bob"}"#;
    let wrong_keys = [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {TEST_SECRET}")),
        Some(format!("Bearer {}x", server.login_key())),
    ];
    for key in wrong_keys {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(key.as_deref().map(|key| ("authorization", key)));
        let (status, body) = http(server.addr, "POST", "/login", &headers, request).await;
        assert_eq!(status, 401, "{key:?}: {body}");
    }
    let key = format!("Bearer {}", server.login_key());
    let headers = [
        ("content-type", "application/json"),
        ("authorization", &key),
    ];
    let (status, body) = http(server.addr, "POST", "/login", &headers, request).await;
    assert_eq!(status, 200, "{body}");
    let login: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(login["user"], "bob");
    assert!(
        login["expires_at"].as_u64().unwrap() > unix_now() + 3600,
        "{login}"
    );
    let mut bob = Client::connect_with(
        &server,
        &format!("token={}", login["token"].as_str().unwrap()),
    )
    .await
    .expect("the issued token connects");
    bob.expect_caught_up_empty().await;
    assert!(server.online("bob").await);

    let closed = Server::start(&["--no-login"]);
    assert_eq!(closed.page, None, "no login key printed");
    let (status, _) = http(closed.addr, "POST", "/login", &headers, request).await;
    assert_eq!(status, 404);
}

/// `--no-login` without a secret would leave a server whose random secret nobody else knows,
/// so that no token could ever connect: it is refused at start, naming what is missing.
#[test]
fn no_login_without_a_secret_is_refused_at_start() {
    let output = Server::start_failure_without_secret(&["--no-login"]);
    assert!(
        output.contains("--no-login needs --auth-secret"),
        "{output}"
    );
}

/// `--insecure-no-auth` believes `?user=`, as the open demo did.
#[tokio::test]
async fn insecure_no_auth_believes_the_user_parameter() {
    let server = Server::start(&["--insecure-no-auth"]);
    let mut bob = Client::connect_with(&server, "user=bob")
        .await
        .expect("connected");
    bob.expect_caught_up_empty().await;
    let (status, body) = http_get(server.addr, "/stats?user=bob").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["online"],
        true
    );
}

/// `/metrics` documents every family (`# HELP` and `# TYPE`) and passes `promtool check
/// metrics` (Debian's `prometheus` package). Without promtool the lint is skipped, unless
/// `OFFLINE_QUEUE_REQUIRE_SERVERS=1` (as in `.ci/run`, which installs it).
#[tokio::test]
async fn metrics_are_documented_and_pass_promtool() {
    let server = Server::start(&[]);
    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    alice.send_message("bob", "hi").await;
    let (status, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("offline_queue_stored_total 1\n"), "{text}");
    for sample in text.lines().filter(|line| !line.starts_with('#')) {
        let family = sample.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family}: {text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}: {text}"
        );
    }

    let promtool = "/usr/bin/promtool";
    if skip_support::program_missing(
        promtool,
        "prometheus",
        ("OFFLINE_QUEUE_REQUIRE_SERVERS", "1"),
    ) {
        return;
    }
    let mut lint = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = lint.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}

/// A browser registers its push subscription; a message while it is away becomes one Web
/// Push, which the fake push service receives and the independent checker verifies and
/// decrypts: the count and the reason, nothing of the message.
#[cfg(feature = "web-push")]
#[tokio::test]
async fn a_registered_browser_gets_an_encrypted_content_free_web_push() {
    /// RFC 8291's example user agent: its public key, auth secret and private key.
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    if push_support::checker_missing() {
        return;
    }
    let mut service = push_support::FakePushService::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = offline_queue::push::VapidKey::generate().unwrap();
    let key_file = dir.path().join("vapid.key");
    std::fs::write(&key_file, key.private_key_base64url()).unwrap();
    let server = Server::start(&[
        "--push-web-vapid-key",
        key_file.to_str().unwrap(),
        "--push-web-subject",
        "mailto:ops@example.com",
        "--push-allow-http",
    ]);
    let (status, body) = http_get(server.addr, "/push/vapid-key").await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["public_key"], key.public_key_base64url());

    let mut bob = Client::connect(&server, "bob").await;
    bob.expect_caught_up_empty().await;
    let subscription = json!({
        "endpoint": service.url("push/bob/ok"),
        "expirationTime": null,
        "keys": {"p256dh": UA_PUBLIC, "auth": AUTH},
    });
    bob.send(json!({"type": "push_register", "web_push": subscription}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "push_registered", "provider": "web_push"})
    );
    // No FCM on this server; a malformed subscription says what is wrong.
    bob.send(json!({"type": "push_register", "fcm": "token"}))
        .await;
    let refused = bob.recv().await;
    assert_eq!(refused["code"], "push_unavailable", "{refused}");
    bob.send(json!({"type": "push_register", "web_push": {
        "endpoint": "ftp://push.example/x", "keys": {"p256dh": UA_PUBLIC, "auth": AUTH},
    }}))
    .await;
    let refused = bob.recv().await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("web push endpoint"),
        "{refused}"
    );
    bob.close().await;
    wait_until("bob offline", || async { !server.online("bob").await }).await;

    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    alice.send_message("bob", "the secret plan").await;
    let requests = service.wait_for(1).await;
    assert_eq!(requests[0].header("urgency"), "high");
    let checked = push_support::check_web_push(UA_PRIVATE, AUTH, &requests);
    assert_eq!(checked[0].plaintext, r#"{"pending":1,"reason":"urgent"}"#);

    let (status, pushes) = http_get(server.addr, &format!("/pushes?token={}", token("bob"))).await;
    assert_eq!(status, 200);
    let pushes: Value = serde_json::from_str(&pushes).unwrap();
    assert_eq!(pushes["pushes"][0]["push"], true, "{pushes}");
    assert_eq!(pushes["pushes"][0]["webhook"], false, "{pushes}");

    // Unregistered: no more pushes there.
    let mut bob = Client::connect(&server, "bob").await;
    bob.drain().await;
    bob.send(json!({"type": "push_unregister", "web_push": subscription}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "push_unregistered", "provider": "web_push", "removed": true})
    );
}

#[test]
fn a_push_flag_without_its_parts_is_refused_at_start() {
    let refused = Server::start_failure(&["--push-web-vapid-key", "/nonexistent/vapid.key"]);
    #[cfg(feature = "web-push")]
    assert!(
        refused.contains("--push-web-vapid-key /nonexistent/vapid.key"),
        "{refused}"
    );
    #[cfg(not(feature = "web-push"))]
    assert!(refused.contains("built without"), "{refused}");
}

/// FCM and APNs turned on by their flags: a user's two registered devices each get one push
/// when a message waits, at the fakes of both services.
#[cfg(all(feature = "fcm", feature = "apns", feature = "web-push"))]
#[tokio::test]
async fn fcm_and_apns_flags_push_to_registered_devices() {
    if push_support::checker_missing() {
        return;
    }
    let mut fcm = push_support::FakePushService::start().await;
    let mut apns = push_support::FakeApns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (rsa_private, _) = push_support::new_key("rsa-key");
    let account = json!({
        "type": "service_account",
        "project_id": "chat-test",
        "private_key": rsa_private,
        "client_email": "pusher@chat-test.iam.gserviceaccount.com",
        "token_uri": fcm.url("token"),
    });
    let account_file = dir.path().join("firebase.json");
    std::fs::write(&account_file, account.to_string()).unwrap();
    let (ec_private, _) = push_support::new_key("ec-key");
    let p8 = dir.path().join("AuthKey.p8");
    std::fs::write(&p8, ec_private).unwrap();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &apns.cert_pem).unwrap();
    let fcm_endpoint = format!("http://{}", fcm.addr);
    let apns_endpoint = apns.url();
    let server = Server::start(&[
        "--push-fcm-account",
        account_file.to_str().unwrap(),
        "--push-fcm-endpoint",
        &fcm_endpoint,
        "--push-apns-key",
        p8.to_str().unwrap(),
        "--push-apns-key-id",
        "KEY1234567",
        "--push-apns-team-id",
        "TEAM123456",
        "--push-apns-bundle-id",
        "com.example.chat",
        "--push-apns-endpoint",
        &apns_endpoint,
        "--push-roots",
        roots.to_str().unwrap(),
    ]);
    let mut bob = Client::connect(&server, "bob").await;
    bob.expect_caught_up_empty().await;
    bob.send(json!({"type": "push_register", "fcm": "ok"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "push_registered", "provider": "fcm"})
    );
    let apns_token = push_support::apns_token("ok");
    bob.send(json!({"type": "push_register", "apns": apns_token}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "push_registered", "provider": "apns"})
    );
    // Web Push is off on this server.
    bob.send(json!({"type": "push_register", "web_push": {
        "endpoint": "https://push.example.net/x",
        "keys": {"p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4", "auth": "BTBZMqHH6r4Tts7J_aSIgg"},
    }}))
    .await;
    assert_eq!(bob.recv().await["code"], "push_unavailable");
    bob.close().await;
    wait_until("bob offline", || async { !server.online("bob").await }).await;

    let mut alice = Client::connect(&server, "alice").await;
    alice.expect_caught_up_empty().await;
    alice.send_message("bob", "the secret plan").await;
    // FCM: the token grant, then the message; APNs: the push.
    let to_fcm = fcm.wait_for(2).await;
    let message: Value = serde_json::from_slice(&to_fcm[1].body).unwrap();
    assert_eq!(message["message"]["token"], "ok");
    assert_eq!(
        message["message"]["data"],
        json!({"pending": "1", "reason": "urgent"})
    );
    let to_apns = apns.wait_for(1).await;
    assert_eq!(to_apns[0].path, format!("3/device/{apns_token}"));
    assert_eq!(to_apns[0].header("apns-topic"), "com.example.chat");
    let body = String::from_utf8_lossy(&to_apns[0].body).into_owned();
    assert!(
        !body.contains("secret") && !body.contains("alice"),
        "{body}"
    );
}
