//! FCM HTTP v1 against a fake FCM and token endpoint on loopback: the service account's
//! assertion verified with the key's public half (in Python, apart from the crate), the access
//! token cached and renewed after a 401, the v1 message checked field by field, and each
//! answer read as FCM documents it.

mod push_support;

use std::sync::Arc;
use std::time::Duration;

use offline_queue::push::{
    Device, Fcm, FcmOptions, FcmServiceAccount, MemoryPushTargets, PushAttempt, PushNotifier,
    PushOptions, PushProvider, PushToken,
};
use offline_queue::{Nudge, NudgeReason, RecipientId};
use push_support::{FakePushService, check_jwts, checker_missing, new_key};

const CLIENT_EMAIL: &str = "pusher@example-project.iam.gserviceaccount.com";

/// A provider whose service account has a fresh key and points at `service`; and the key's
/// public half.
fn fcm(service: &FakePushService) -> (Fcm, String) {
    let (private_pem, public_pem) = new_key("rsa-key");
    let account = serde_json::json!({
        "type": "service_account",
        "project_id": "example-project",
        "private_key": private_pem,
        "client_email": CLIENT_EMAIL,
        "token_uri": service.url("token"),
    });
    let account = FcmServiceAccount::from_json(&account.to_string()).unwrap();
    let mut options = FcmOptions::default();
    options.endpoint = Some(format!("http://{}", service.addr));
    options.ttl = Some(Duration::from_secs(3600));
    (Fcm::with_options(account, options).unwrap(), public_pem)
}

fn device(token: &str) -> Device {
    Device::Fcm(PushToken::new(token).unwrap())
}

fn nudge(reason: NudgeReason, pending: Option<u64>) -> Nudge {
    Nudge {
        recipient: RecipientId::new("bob").unwrap(),
        pending,
        reason,
        ttl: None,
    }
}

fn assertions(service: &FakePushService) -> Vec<String> {
    service
        .received
        .lock()
        .iter()
        .filter(|r| r.path == "token")
        .map(|r| {
            let form = String::from_utf8(r.body.to_vec()).unwrap();
            assert!(
                form.starts_with(
                    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="
                ),
                "{form}"
            );
            form.rsplit_once("assertion=").unwrap().1.to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_message_for_an_offline_recipient_becomes_one_data_only_fcm_message() {
    if checker_missing() {
        return;
    }
    let mut service = FakePushService::start().await;
    let (provider, public_pem) = fcm(&service);
    let targets = Arc::new(MemoryPushTargets::new());
    let bob = RecipientId::new("bob").unwrap();
    targets.add(bob.clone(), device("ok"));
    let (notifier, task) =
        PushNotifier::start(targets, vec![Arc::new(provider)], PushOptions::default()).unwrap();
    let queue = push_support::send_to_offline_bob(&notifier).await;

    // The token grant, then the message.
    let requests = service.wait_for(2).await;
    let message = &requests[1];
    assert_eq!(message.path, "v1/projects/example-project/messages:send");
    assert_eq!(message.header("authorization"), "Bearer access-1");
    assert_eq!(message.header("content-type"), "application/json");
    let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
    let collapse = body["message"]["android"]["collapse_key"].as_str().unwrap();
    assert_eq!(collapse.len(), 32);
    assert_eq!(
        body,
        serde_json::json!({"message": {
            "token": "ok",
            "data": {"pending": "1", "reason": "urgent"},
            "android": {"priority": "HIGH", "collapse_key": collapse, "ttl": "120s"},
        }})
    );

    let checked = check_jwts(&public_pem, &assertions(&service));
    assert_eq!(
        checked[0].header,
        serde_json::json!({"alg": "RS256", "typ": "JWT"})
    );
    let claims = &checked[0].claims;
    assert_eq!(claims["iss"], CLIENT_EMAIL);
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(claims["aud"], service.url("token"));
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);

    drop(queue);
    drop(notifier);
    let metrics = task.await.unwrap();
    assert_eq!((metrics.queued, metrics.delivered), (1, 1));
}

#[tokio::test]
async fn each_answer_of_fcm_is_read_as_documented_and_the_token_is_fetched_once() {
    if checker_missing() {
        return;
    }
    let mut service = FakePushService::start().await;
    let (provider, public_pem) = fcm(&service);
    let cases = [
        ("ok", PushAttempt::Delivered),
        ("unregistered", PushAttempt::DeviceGone),
        // A 404 without FCM's UNREGISTERED (a wrong project, a proxy): refused, not pruned.
        (
            "missing",
            PushAttempt::Rejected("FCM answered 404 : ".into()),
        ),
        ("invalid-token", PushAttempt::DeviceGone),
        ("wrong-sender", PushAttempt::DeviceGone),
        (
            "busy",
            PushAttempt::Retry {
                after: Some(Duration::from_secs(120)),
                reason: "FCM answered 429 ".into(),
            },
        ),
        (
            "down",
            PushAttempt::Retry {
                after: None,
                reason: "FCM answered 503 ".into(),
            },
        ),
        (
            "invalid-data",
            PushAttempt::Rejected("FCM answered 400 INVALID_ARGUMENT: Invalid data payload".into()),
        ),
    ];
    for (i, (token, expected)) in cases.iter().enumerate() {
        let reason = if i % 2 == 0 {
            NudgeReason::Background
        } else {
            NudgeReason::Unacked
        };
        let attempt = provider.push(&device(token), &nudge(reason, None)).await;
        assert_eq!(&attempt, expected, "answer to {token}");
    }
    let requests = service.wait_for(1 + cases.len()).await;
    // One token grant served every push.
    assert_eq!(assertions(&service).len(), 1);
    for request in requests.iter().filter(|r| r.path != "token") {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        // Not urgent: normal priority; no count known: none sent.
        assert_eq!(body["message"]["android"]["priority"], "NORMAL");
        // A nudge without a TTL of its own: the provider's.
        assert_eq!(body["message"]["android"]["ttl"], "3600s");
        let data = body["message"]["data"].as_object().unwrap();
        assert_eq!(data.len(), 1, "{data:?}");
        assert!(["background", "unacked"].contains(&data["reason"].as_str().unwrap()));
    }
    check_jwts(&public_pem, &assertions(&service));
}

#[tokio::test]
async fn the_failure_matrix_through_fcm() {
    if checker_missing() {
        return;
    }
    let service = FakePushService::start().await;
    let (provider, _) = fcm(&service);
    let received = service.received.clone();
    push_support::failure_matrix(Arc::new(provider), device, "unregistered", |name| {
        received
            .lock()
            .iter()
            .filter(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                body["message"]["token"] == name
            })
            .count()
    })
    .await;
}

#[tokio::test]
async fn a_401_drops_the_access_token_and_the_retry_fetches_a_new_one() {
    if checker_missing() {
        return;
    }
    let mut service = FakePushService::start().await;
    let (provider, _) = fcm(&service);
    let first = provider
        .push(&device("stale-auth"), &nudge(NudgeReason::Urgent, Some(2)))
        .await;
    assert!(
        matches!(&first, PushAttempt::Retry { after: None, reason } if reason.contains("401")),
        "{first:?}"
    );
    let second = provider
        .push(&device("stale-auth"), &nudge(NudgeReason::Urgent, Some(2)))
        .await;
    assert_eq!(second, PushAttempt::Delivered);
    let requests = service.wait_for(4).await;
    let paths: Vec<_> = requests.iter().map(|r| r.path.as_str()).collect();
    let send = "v1/projects/example-project/messages:send";
    assert_eq!(paths, ["token", send, "token", send]);
    assert_eq!(requests[3].header("authorization"), "Bearer access-2");
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_retried_and_refused_credentials_are_not() {
    if checker_missing() {
        return;
    }
    let service = FakePushService::start().await;
    let (private_pem, _) = new_key("rsa-key");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let account = |token_uri: String| {
        FcmServiceAccount::from_json(
            &serde_json::json!({
                "project_id": "example-project",
                "private_key": private_pem,
                "client_email": CLIENT_EMAIL,
                "token_uri": token_uri,
            })
            .to_string(),
        )
        .unwrap()
    };
    let mut options = FcmOptions::default();
    options.endpoint = Some(format!("http://{}", service.addr));
    let unreachable =
        Fcm::with_options(account(format!("http://{closed}/token")), options.clone()).unwrap();
    let attempt = unreachable
        .push(&device("ok"), &nudge(NudgeReason::Urgent, None))
        .await;
    assert!(matches!(attempt, PushAttempt::Retry { .. }), "{attempt:?}");
    // The fake answers 400 to a path it does not know: a refused grant.
    let refused = Fcm::with_options(account(service.url("refuse")), options).unwrap();
    let attempt = refused
        .push(&device("ok"), &nudge(NudgeReason::Urgent, None))
        .await;
    let PushAttempt::Rejected(reason) = attempt else {
        panic!("{attempt:?}");
    };
    assert!(reason.contains("token endpoint answered 400"), "{reason}");
}
