//! APNs against a fake over HTTP/2 and TLS (a certificate made for the test, ALPN h2 only):
//! the provider token verified with the .p8 key's public half (in Python, apart from the
//! crate), every header and the content-free payload checked, one connection reused for
//! every push, and each answer read as Apple documents it.

mod push_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use offline_queue::push::{
    Apns, ApnsKey, ApnsOptions, Device, MemoryPushTargets, PushAttempt, PushNotifier, PushOptions,
    PushProvider, PushToken,
};
use offline_queue::{Nudge, NudgeReason, RecipientId};
use push_support::{FakeApns, apns_token, check_jwts, checker_missing, new_key};

const KEY_ID: &str = "KEY1234567";
const TEAM_ID: &str = "TEAM123456";
const BUNDLE: &str = "com.example.chat";

/// A provider with a fresh key, trusting the fake's certificate; and the key's public half.
fn apns(fake: &FakeApns) -> (Apns, String) {
    let (private_pem, public_pem) = new_key("ec-key");
    let key = ApnsKey::from_p8_pem(&private_pem, KEY_ID, TEAM_ID).unwrap();
    let mut options = ApnsOptions::default();
    options.endpoint = Some(fake.url());
    options.root_certificates_pem = Some(fake.cert_pem.clone());
    options.ttl = Some(Duration::from_secs(3600));
    (
        Apns::with_options(key, BUNDLE, options).unwrap(),
        public_pem,
    )
}

fn device(name: &str) -> Device {
    Device::Apns(PushToken::new(&apns_token(name)).unwrap())
}

fn nudge(reason: NudgeReason, pending: Option<u64>) -> Nudge {
    Nudge {
        recipient: RecipientId::new("bob").unwrap(),
        pending,
        reason,
        ttl: None,
    }
}

fn provider_tokens(requests: &[push_support::Received]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            r.header("authorization")
                .strip_prefix("bearer ")
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn an_urgent_message_for_an_offline_recipient_becomes_one_content_free_alert() {
    if checker_missing() {
        return;
    }
    let mut fake = FakeApns::start().await;
    let (provider, public_pem) = apns(&fake);
    let targets = Arc::new(MemoryPushTargets::new());
    let bob = RecipientId::new("bob").unwrap();
    targets.add(bob.clone(), device("ok"));
    let (notifier, task) =
        PushNotifier::start(targets, vec![Arc::new(provider)], PushOptions::default()).unwrap();
    let queue = push_support::send_to_offline_bob(&notifier).await;

    let requests = fake.wait_for(1).await;
    let request = &requests[0];
    assert_eq!(request.path, format!("3/device/{}", apns_token("ok")));
    assert_eq!(request.header("apns-topic"), BUNDLE);
    assert_eq!(request.header("apns-push-type"), "alert");
    assert_eq!(request.header("apns-priority"), "10");
    assert_eq!(request.header("apns-collapse-id").len(), 32);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiration: u64 = request.header("apns-expiration").parse().unwrap();
    assert!(
        expiration.abs_diff(now + 120) <= 60,
        "{expiration} vs {now}"
    );
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "aps": {"alert": {"loc-key": "NEW_MESSAGES"}, "mutable-content": 1},
            "pending": 1,
            "reason": "urgent",
        })
    );
    let checked = check_jwts(&public_pem, &provider_tokens(&requests));
    assert_eq!(
        checked[0].header,
        serde_json::json!({"alg": "ES256", "kid": KEY_ID})
    );
    assert_eq!(checked[0].claims["iss"], TEAM_ID);
    assert!(checked[0].claims["iat"].as_u64().unwrap().abs_diff(now) <= 60);

    drop(queue);
    drop(notifier);
    let metrics = task.await.unwrap();
    assert_eq!((metrics.queued, metrics.delivered), (1, 1));
}

#[tokio::test]
async fn each_answer_is_read_as_apple_documents_it_over_one_reused_connection() {
    if checker_missing() {
        return;
    }
    let mut fake = FakeApns::start().await;
    let (provider, public_pem) = apns(&fake);
    let cases = [
        ("ok", PushAttempt::Delivered),
        ("gone", PushAttempt::DeviceGone),
        ("badtoken", PushAttempt::DeviceGone),
        (
            "busy",
            PushAttempt::Retry {
                after: Some(Duration::from_secs(120)),
                reason: "APNs answered 429 TooManyRequests".into(),
            },
        ),
        (
            "down",
            PushAttempt::Retry {
                after: None,
                reason: "APNs answered 503 ServiceUnavailable".into(),
            },
        ),
        (
            "topic",
            PushAttempt::Rejected("APNs answered 400 BadTopic".into()),
        ),
        (
            "expired",
            PushAttempt::Retry {
                after: None,
                reason: "APNs answered 403 ExpiredProviderToken: token renewed".into(),
            },
        ),
    ];
    for (name, expected) in &cases {
        let attempt = provider
            .push(&device(name), &nudge(NudgeReason::Background, Some(4)))
            .await;
        assert_eq!(&attempt, expected, "answer to {name}");
    }
    let requests = fake.wait_for(cases.len()).await;
    assert_eq!(
        fake.connections.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection"
    );
    for request in &requests {
        assert_eq!(request.header("apns-push-type"), "background");
        assert_eq!(request.header("apns-priority"), "5");
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"aps": {"content-available": 1}, "pending": 4, "reason": "background"})
        );
    }
    // Signed once and reused (all within the same run, well inside 50 minutes), until the
    // last answer, ExpiredProviderToken, renewed it: the next push carries a token signed
    // now (the same bytes only if signed within the same second as the first).
    let tokens = provider_tokens(&requests);
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    let after = provider
        .push(&device("ok"), &nudge(NudgeReason::Background, Some(4)))
        .await;
    assert_eq!(after, PushAttempt::Delivered);
    let renewed = provider_tokens(&fake.wait_for(cases.len() + 1).await[cases.len()..]);
    let checked = check_jwts(&public_pem, &[tokens[0].clone(), renewed[0].clone()]);
    let iat = |i: usize| checked[i].claims["iat"].as_u64().unwrap();
    assert!(iat(1) >= iat(0));
    assert_eq!(tokens[0] == renewed[0], iat(1) == iat(0));
}

#[tokio::test]
async fn the_failure_matrix_through_apns() {
    if checker_missing() {
        return;
    }
    let fake = FakeApns::start().await;
    let (provider, _) = apns(&fake);
    let received = fake.received.clone();
    push_support::failure_matrix(Arc::new(provider), device, "gone", |name| {
        let path = format!("3/device/{}", apns_token(name));
        received.lock().iter().filter(|r| r.path == path).count()
    })
    .await;
}

#[tokio::test]
async fn a_token_that_is_not_hex_is_pruned_without_a_request() {
    if checker_missing() {
        return;
    }
    let fake = FakeApns::start().await;
    let (provider, _) = apns(&fake);
    let attempt = provider
        .push(
            &Device::Apns(PushToken::new("../../3/device/other").unwrap()),
            &nudge(NudgeReason::Urgent, None),
        )
        .await;
    assert_eq!(attempt, PushAttempt::DeviceGone);
    assert!(fake.received.lock().is_empty());
}

#[tokio::test]
async fn an_untrusted_certificate_is_retried_never_sent_to() {
    if checker_missing() {
        return;
    }
    let fake = FakeApns::start().await;
    let (private_pem, _) = new_key("ec-key");
    let mut options = ApnsOptions::default();
    options.endpoint = Some(fake.url());
    // Mozilla's roots: the fake's self-signed certificate is refused.
    let provider = Apns::with_options(
        ApnsKey::from_p8_pem(&private_pem, KEY_ID, TEAM_ID).unwrap(),
        BUNDLE,
        options,
    )
    .unwrap();
    let attempt = provider
        .push(&device("ok"), &nudge(NudgeReason::Urgent, None))
        .await;
    let PushAttempt::Retry { reason, .. } = attempt else {
        panic!("{attempt:?}");
    };
    assert!(reason.to_lowercase().contains("certificate"), "{reason}");
    assert!(fake.received.lock().is_empty());
}
