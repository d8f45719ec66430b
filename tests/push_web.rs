//! Web Push against a fake push service on loopback: every request's VAPID token is verified
//! and its body decrypted by an independent implementation (Python's http_ece), the headers
//! checked, and each answer of the service read as the RFCs mean it.

mod push_support;

use std::sync::Arc;
use std::time::Duration;

use offline_queue::push::{
    Device, MemoryPushTargets, PushAttempt, PushNotifier, PushOptions, PushProvider, VapidKey,
    WebPush, WebPushOptions, WebPushSubscription,
};
use offline_queue::{Nudge, NudgeReason, RecipientId};
use push_support::{FakePushService, check_web_push, checker_missing};

/// RFC 8291's example user agent: its key pair and auth secret.
const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
const UA_PUBLIC: &str =
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
const SUBJECT: &str = "mailto:ops@example.com";

fn web_push(allow_plain_http: bool) -> WebPush {
    let mut options = WebPushOptions::default();
    options.allow_plain_http = allow_plain_http;
    options.allow_any_host = allow_plain_http;
    options.ttl = Some(Duration::from_secs(3600));
    WebPush::with_options(VapidKey::generate().unwrap(), SUBJECT, options).unwrap()
}

fn device(url: &str) -> Device {
    Device::WebPush(WebPushSubscription::new(url, UA_PUBLIC, AUTH).unwrap())
}

fn nudge(reason: NudgeReason, pending: Option<u64>) -> Nudge {
    Nudge {
        recipient: RecipientId::new("bob").unwrap(),
        pending,
        reason,
        ttl: None,
    }
}

#[tokio::test]
async fn a_message_for_an_offline_recipient_becomes_one_encrypted_content_free_push() {
    if checker_missing() {
        return;
    }
    let mut service = FakePushService::start().await;
    let targets = Arc::new(MemoryPushTargets::new());
    let bob = RecipientId::new("bob").unwrap();
    targets.add(bob.clone(), device(&service.url("push/bob-device/ok")));
    let (notifier, task) = PushNotifier::start(
        targets,
        vec![Arc::new(web_push(true))],
        PushOptions::default(),
    )
    .unwrap();
    let queue = push_support::send_to_offline_bob(&notifier).await;

    let requests = service.wait_for(1).await;
    let request = &requests[0];
    // The message's 120 s, shorter than the provider's 3600 s.
    assert_eq!(request.header("ttl"), "120");
    assert_eq!(request.header("urgency"), "high");
    assert_eq!(request.header("content-encoding"), "aes128gcm");
    let topic = request.header("topic");
    assert_eq!(topic.len(), 32, "{topic}");
    let checked = check_web_push(UA_PRIVATE, AUTH, &requests);
    assert_eq!(checked[0].plaintext, r#"{"pending":1,"reason":"urgent"}"#);
    let claims = &checked[0].claims;
    assert_eq!(claims["aud"], format!("http://{}", service.addr));
    assert_eq!(claims["sub"], SUBJECT);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = claims["exp"].as_u64().unwrap();
    assert!(
        expires > now && expires <= now + 24 * 3600,
        "exp {expires}, now {now}"
    );

    drop(queue);
    drop(notifier);
    let metrics = task.await.unwrap();
    assert_eq!((metrics.queued, metrics.delivered), (1, 1));
}

#[tokio::test]
async fn each_answer_of_the_push_service_is_read_as_the_rfcs_mean_it() {
    if checker_missing() {
        return;
    }
    let mut service = FakePushService::start().await;
    let provider = web_push(true);
    let cases = [
        ("ok", PushAttempt::Delivered),
        ("gone", PushAttempt::DeviceGone),
        ("missing", PushAttempt::DeviceGone),
        (
            "busy",
            PushAttempt::Retry {
                after: Some(Duration::from_secs(120)),
                reason: "push service answered 429".into(),
            },
        ),
        (
            "down",
            PushAttempt::Retry {
                after: None,
                reason: "push service answered 503".into(),
            },
        ),
        (
            "bad",
            PushAttempt::Rejected("push service answered 400: malformed push".into()),
        ),
    ];
    let reasons = [
        (NudgeReason::Urgent, "high", "urgent"),
        (NudgeReason::Background, "low", "background"),
        (NudgeReason::Unacked, "normal", "unacked"),
    ];
    for (i, (path, expected)) in cases.iter().enumerate() {
        let (reason, _, _) = reasons[i % 3];
        let attempt = provider
            .push(
                &device(&service.url(&format!("push/{path}"))),
                &nudge(reason, Some(i as u64)),
            )
            .await;
        assert_eq!(&attempt, expected, "answer {path}");
    }
    let requests = service.wait_for(cases.len()).await;
    // Every request, whatever its answer, was signed and encrypted as the RFCs say, and
    // carries only the count and the reason.
    let checked = check_web_push(UA_PRIVATE, AUTH, &requests);
    for (i, (request, checked)) in requests.iter().zip(&checked).enumerate() {
        let (_, urgency, reason) = reasons[i % 3];
        assert_eq!(request.header("urgency"), urgency);
        // A nudge without a TTL of its own: the provider's.
        assert_eq!(request.header("ttl"), "3600");
        assert_eq!(
            checked.plaintext,
            format!(r#"{{"pending":{i},"reason":"{reason}"}}"#)
        );
        assert_eq!(checked.claims["sub"], SUBJECT);
    }
    // One recipient, one topic: the device keeps the latest nudge only.
    assert!(
        requests
            .iter()
            .all(|r| r.header("topic") == requests[0].header("topic"))
    );
}

#[tokio::test]
async fn the_failure_matrix_through_web_push() {
    let service = FakePushService::start().await;
    let received = service.received.clone();
    let url = |name: &str| service.url(&format!("push/{name}"));
    push_support::failure_matrix(
        Arc::new(web_push(true)),
        |name| device(&url(name)),
        "gone",
        |name| {
            received
                .lock()
                .iter()
                .filter(|r| r.path == format!("push/{name}"))
                .count()
        },
    )
    .await;
}

#[tokio::test]
async fn an_http_or_address_endpoint_is_refused_unless_allowed_and_nothing_is_sent() {
    let service = FakePushService::start().await;
    let attempt = web_push(false)
        .push(
            &device(&service.url("push/ok")),
            &nudge(NudgeReason::Urgent, None),
        )
        .await;
    let PushAttempt::Rejected(reason) = attempt else {
        panic!("{attempt:?}");
    };
    assert!(reason.contains("only https"), "{reason}");
    // An address is no push service, however spelled (all of these are this machine): pruned,
    // never connected to. (The unit tests check the rule on more spellings.)
    for endpoint in [
        "https://127.0.0.1/push",
        "https://2130706433/push",
        "https://[::1]/push",
        "https://localhost/push",
    ] {
        let attempt = web_push(false)
            .push(&device(endpoint), &nudge(NudgeReason::Urgent, None))
            .await;
        assert_eq!(attempt, PushAttempt::DeviceGone, "{endpoint}");
    }
    assert!(service.received.lock().is_empty());
}

#[tokio::test]
async fn a_service_that_cannot_be_reached_is_retried() {
    // A port nobody listens on: bind one, then close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let attempt = web_push(true)
        .push(
            &device(&format!("http://{addr}/push/ok")),
            &nudge(NudgeReason::Urgent, None),
        )
        .await;
    assert!(
        matches!(attempt, PushAttempt::Retry { after: None, .. }),
        "{attempt:?}"
    );
}
