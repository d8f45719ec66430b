//! The chat server's frame parser (`examples/chat_server/server/protocol.rs`) on any text a
//! client can send: never a panic, and what it accepts is exactly what the frame said. Shared
//! by the cargo-fuzz target `chat_frames` and `tests/fuzz_corpus.rs`, each of which includes
//! the example's `protocol` module at its root.

use std::time::Duration;

use offline_queue::{Envelope, MessageId, RecipientId};

use crate::protocol::{
    ChatMessage, ClientFrame, DeviceFrame, MAX_CLIENT_ID_CHARS, PushDevice, Request, ServerFrame,
    parse_frame,
};

/// Checks one frame of `data` (a WebSocket text frame is UTF-8; other bytes never reach the
/// parser).
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let from = RecipientId::new("fuzzer").expect("a valid sender");
    let parsed = parse_frame(&from, text);
    let frame = serde_json::from_str::<ClientFrame>(text);
    match (parsed, frame) {
        (
            Ok(Request::Send { id, to, envelope }),
            Ok(ClientFrame::Send {
                to: to_text,
                body,
                id: id_text,
                ttl_secs,
            }),
        ) => {
            assert_eq!(id, id_text, "the client's id is echoed as given");
            assert_eq!(to.as_bytes(), to_text.as_bytes(), "the recipient as given");
            assert_eq!(envelope.recipient, to);
            if let Some(id) = &id {
                let chars = id.chars().count();
                assert!(
                    (1..=MAX_CLIENT_ID_CHARS).contains(&chars),
                    "id of {chars} chars"
                );
                assert!(
                    !id.chars().any(char::is_control),
                    "control character in {id:?}"
                );
                assert_eq!(
                    envelope.id,
                    Some(MessageId::derive(from.as_bytes(), id.as_bytes())),
                    "dedup is per (sender, client id)"
                );
            } else {
                assert_eq!(envelope.id, None, "no client id: the engine makes one");
            }
            assert_eq!(envelope.ttl, ttl_secs.map(Duration::from_secs));
            let expected = ChatMessage {
                from: from.to_string(),
                body,
                client_id: id,
            };
            let stored = Envelope::encode(to, &expected).expect("encodes");
            assert_eq!(
                envelope.payload, stored.payload,
                "the payload is the frame's message"
            );
        }
        (Ok(Request::AckThrough(through)), Ok(ClientFrame::Ack { up_to, seqs })) => {
            assert_eq!((Some(through.0), seqs.len()), (up_to, 0));
        }
        (Ok(Request::Ack(acked)), Ok(ClientFrame::Ack { up_to, seqs })) => {
            assert_eq!(up_to, None);
            assert!(!acked.is_empty());
            assert_eq!(acked.iter().map(|s| s.0).collect::<Vec<_>>(), seqs);
        }
        (Ok(Request::PushRegister(device)), Ok(ClientFrame::PushRegister(frame)))
        | (Ok(Request::PushUnregister(device)), Ok(ClientFrame::PushUnregister(frame))) => {
            let expected = match frame {
                DeviceFrame {
                    web_push: Some(web),
                    fcm: None,
                    apns: None,
                } => PushDevice::WebPush {
                    endpoint: web.endpoint,
                    p256dh: web.keys.p256dh,
                    auth: web.keys.auth,
                },
                DeviceFrame {
                    web_push: None,
                    fcm: Some(token),
                    apns: None,
                } => PushDevice::Fcm(token),
                DeviceFrame {
                    web_push: None,
                    fcm: None,
                    apns: Some(token),
                } => PushDevice::Apns(token),
                other => panic!("accepted a device of other than one kind: {other:?}"),
            };
            assert_eq!(device, expected, "the device as given");
        }
        (Ok(request), frame) => panic!("accepted {request:?} from {frame:?}"),
        (
            Err(refusal),
            Ok(ClientFrame::PushRegister(frame) | ClientFrame::PushUnregister(frame)),
        ) => {
            let kinds = [
                frame.web_push.is_some(),
                frame.fcm.is_some(),
                frame.apns.is_some(),
            ];
            assert_ne!(
                kinds.iter().filter(|k| **k).count(),
                1,
                "refused a device of one kind: {refusal:?}"
            );
        }
        // A refusal needs a reason: a recipient or client id out of its limits, or an ack
        // with neither or both of its forms.
        (Err(refusal), Ok(ClientFrame::Send { to, id, .. })) => {
            let id_fits = id.as_ref().is_none_or(|id| {
                (1..=MAX_CLIENT_ID_CHARS).contains(&id.chars().count())
                    && !id.chars().any(char::is_control)
            });
            assert!(
                RecipientId::new(&to).is_err() || !id_fits,
                "refused a valid send: {refusal:?}"
            );
        }
        (Err(refusal), Ok(ClientFrame::Ack { up_to, seqs })) => {
            assert_eq!(
                up_to.is_some(),
                !seqs.is_empty(),
                "refused a valid ack: {refusal:?}"
            );
        }
        (Err(refusal), Err(_)) => {
            assert!(
                matches!(refusal, ServerFrame::Error { .. }),
                "a refusal is an error frame: {refusal:?}"
            );
            serde_json::to_string(&refusal).expect("a refusal serializes");
        }
    }
}
