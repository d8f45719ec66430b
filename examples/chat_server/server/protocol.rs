//! The JSON frames of the WebSocket protocol, and how engine types map onto them.

use std::time::Duration;

use offline_queue::{Batch, Delivery, Envelope, Error, MessageId, RecipientId, Seq};
use serde::{Deserialize, Serialize};

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Store `body` for `to` (delivered at once if `to` is online).
    Send {
        to: String,
        body: String,
        /// The client's own id for this message (its transaction id): any 1 to
        /// [`MAX_CLIENT_ID_CHARS`] printable characters. The dedup key, per sender: a resend
        /// with the same id within the dedup window is not stored twice.
        id: Option<String>,
        ttl_secs: Option<u64>,
    },
    /// Acks every message through `up_to`, or exactly the listed `seqs`.
    Ack {
        up_to: Option<u64>,
        #[serde(default)]
        seqs: Vec<u64>,
    },
    /// Pushes for this user go to this device too (exactly one of the three).
    PushRegister(DeviceFrame),
    /// No more pushes to this device.
    PushUnregister(DeviceFrame),
}

/// A device in `push_register` and `push_unregister`.
#[derive(Debug, Deserialize)]
pub struct DeviceFrame {
    /// A browser's subscription, as `PushSubscription.toJSON()` gives it.
    pub web_push: Option<WebPushFrame>,
    /// An FCM registration token.
    pub fcm: Option<String>,
    /// An APNs device token (hex).
    pub apns: Option<String>,
}

/// A browser's push subscription (its `expirationTime`, if sent, is ignored).
#[derive(Debug, Deserialize)]
pub struct WebPushFrame {
    pub endpoint: String,
    pub keys: WebPushKeys,
}

/// A subscription's keys, base64url.
#[derive(Debug, Deserialize)]
pub struct WebPushKeys {
    pub p256dh: String,
    pub auth: String,
}

/// A device a client registered for pushes, not yet checked by a provider.
#[derive(Debug, PartialEq, Eq)]
pub enum PushDevice {
    WebPush {
        endpoint: String,
        p256dh: String,
        auth: String,
    },
    Fcm(String),
    Apns(String),
}

impl TryFrom<DeviceFrame> for PushDevice {
    type Error = ServerFrame;

    fn try_from(frame: DeviceFrame) -> Result<Self, ServerFrame> {
        match (frame.web_push, frame.fcm, frame.apns) {
            (Some(web), None, None) => Ok(PushDevice::WebPush {
                endpoint: web.endpoint,
                p256dh: web.keys.p256dh,
                auth: web.keys.auth,
            }),
            (None, Some(token), None) => Ok(PushDevice::Fcm(token)),
            (None, None, Some(token)) => Ok(PushDevice::Apns(token)),
            _ => Err(ServerFrame::bad_request(
                None,
                "a device is exactly one of web_push, fcm or apns",
            )),
        }
    }
}

/// What the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// A send was stored (or was a duplicate of one stored before): the client's own id
    /// (when it gave one), the stored message's id (as `deliver` carries it) and its seq.
    Sent {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        message_id: String,
        seq: u64,
    },
    /// A frame was refused; the connection stays open.
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: &'static str,
        message: String,
    },
    /// A batch of stored messages, in seq order.
    Deliver {
        messages: Vec<WireMessage>,
        /// Messages lost (expired unread, dropped, damaged) before this batch; absent when none.
        #[serde(skip_serializing_if = "is_zero")]
        gap: u64,
        /// The seq to ack once the batch is processed: it covers a gap-only batch too.
        position: u64,
    },
    /// The backlog present at connect has been delivered.
    CaughtUp,
    /// A `push_register` was taken: pushes for this user now go to the device too.
    // Built only with a push provider on (the features `web-push`, `fcm`, `apns`).
    #[cfg_attr(not(feature = "push-core"), allow(dead_code))]
    PushRegistered { provider: &'static str },
    /// A `push_unregister` was taken; `removed` is false if the device was not registered.
    #[cfg_attr(not(feature = "push-core"), allow(dead_code))]
    PushUnregistered {
        provider: &'static str,
        removed: bool,
    },
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// One delivered message.
#[derive(Debug, Serialize)]
pub struct WireMessage {
    /// The stored message's id: the same on every redelivery.
    pub id: String,
    pub seq: u64,
    pub from: String,
    /// The sender's own id for the message, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub body: String,
    pub sent_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub redelivered: bool,
}

/// The stored payload: the engine stores it encoded by its codec and never looks inside.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatMessage {
    pub from: String,
    pub body: String,
    pub client_id: Option<String>,
}

/// The longest client id, in characters.
pub const MAX_CLIENT_ID_CHARS: usize = 128;

/// Checks a client's id: 1 to [`MAX_CLIENT_ID_CHARS`] characters, none a control character.
pub fn check_client_id(id: &str) -> Result<(), String> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_CLIENT_ID_CHARS {
        return Err(format!(
            "id must be 1 to {MAX_CLIENT_ID_CHARS} characters long, not {chars}"
        ));
    }
    if id.chars().any(char::is_control) {
        return Err("id must be printable characters (no control characters)".into());
    }
    Ok(())
}

impl ServerFrame {
    /// A delivered batch, with each payload decoded back into its sender and text.
    pub fn deliver(batch: &Batch) -> Self {
        ServerFrame::Deliver {
            messages: batch.messages.iter().map(WireMessage::from).collect(),
            gap: batch.gap,
            position: batch.position.0,
        }
    }

    /// An error frame for an engine error.
    pub fn from_error(id: Option<String>, error: &Error) -> Self {
        ServerFrame::Error {
            id,
            code: error_code(error),
            message: error.to_string(),
        }
    }

    /// An error frame for a frame that is not valid protocol.
    pub fn bad_request(id: Option<String>, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<&Delivery> for WireMessage {
    fn from(delivery: &Delivery) -> Self {
        // Every message this server stores is a ChatMessage; a payload stored by another
        // program on the same storage is shown as text rather than dropped.
        let ChatMessage {
            from,
            body,
            client_id,
        } = delivery.decode().unwrap_or_else(|_| ChatMessage {
            from: String::new(),
            body: String::from_utf8_lossy(&delivery.payload).into_owned(),
            client_id: None,
        });
        WireMessage {
            id: delivery.id.to_string(),
            seq: delivery.seq.0,
            from,
            client_id,
            body,
            sent_at_ms: delivery.sent_at.as_millis(),
            expires_at_ms: delivery.expires_at.map(|at| at.as_millis()),
            redelivered: delivery.redelivered,
        }
    }
}

/// What one client frame asks for, checked: what the connection acts on.
#[derive(Debug)]
pub enum Request {
    /// Store `envelope` for `to`; `id` is the client's own id, echoed in the reply.
    Send {
        id: Option<String>,
        to: RecipientId,
        envelope: Envelope,
    },
    /// Ack every message through this seq.
    AckThrough(Seq),
    /// Ack exactly these seqs.
    Ack(Vec<Seq>),
    /// Push to this device too.
    PushRegister(PushDevice),
    /// Stop pushing to this device.
    PushUnregister(PushDevice),
}

/// Parses and checks one text frame from `from`: the request, or the error frame that refuses
/// it before the engine sees it (the connection stays open either way).
pub fn parse_frame(from: &RecipientId, text: &str) -> Result<Request, ServerFrame> {
    let frame = serde_json::from_str::<ClientFrame>(text)
        .map_err(|error| ServerFrame::bad_request(None, error.to_string()))?;
    match frame {
        ClientFrame::Send {
            to,
            body,
            id,
            ttl_secs,
        } => {
            let (to, envelope) = prepare_send(from, to, body, id.clone(), ttl_secs)?;
            Ok(Request::Send { id, to, envelope })
        }
        ClientFrame::Ack { up_to, seqs } => match (up_to, seqs.is_empty()) {
            (Some(up_to), true) => Ok(Request::AckThrough(Seq(up_to))),
            (None, false) => Ok(Request::Ack(seqs.into_iter().map(Seq).collect())),
            _ => Err(ServerFrame::bad_request(
                None,
                "an ack carries either up_to or a non-empty seqs list",
            )),
        },
        ClientFrame::PushRegister(device) => Ok(Request::PushRegister(device.try_into()?)),
        ClientFrame::PushUnregister(device) => Ok(Request::PushUnregister(device.try_into()?)),
    }
}

/// A send's envelope, or the error frame that refuses it before the engine sees it.
fn prepare_send(
    from: &RecipientId,
    to: String,
    body: String,
    client_id: Option<String>,
    ttl_secs: Option<u64>,
) -> Result<(RecipientId, Envelope), ServerFrame> {
    let to = match RecipientId::new(&to) {
        Ok(to) => to,
        Err(error) => return Err(ServerFrame::from_error(client_id, &error)),
    };
    if let Some(id) = &client_id
        && let Err(reason) = check_client_id(id)
    {
        return Err(ServerFrame::bad_request(client_id, reason));
    }
    let message = ChatMessage {
        from: from.to_string(),
        body,
        client_id: client_id.clone(),
    };
    let mut envelope = match Envelope::encode(to.clone(), &message) {
        Ok(envelope) => envelope,
        Err(error) => return Err(ServerFrame::from_error(client_id, &error)),
    };
    if let Some(id) = &client_id {
        // Dedup per (sender, client id): the same id from two senders is two messages.
        envelope = envelope.with_id(MessageId::derive(from.as_bytes(), id.as_bytes()));
    }
    if let Some(secs) = ttl_secs {
        envelope = envelope.with_ttl(Duration::from_secs(secs));
    }
    Ok((to, envelope))
}

/// The protocol's error code for an engine error. Only `unavailable` is worth retrying as is.
pub fn error_code(error: &Error) -> &'static str {
    match error {
        Error::MessageTooLarge { .. } => "message_too_large",
        Error::QueueFull { .. } | Error::StorageFull { .. } => "queue_full",
        Error::RecipientIdEmpty | Error::RecipientIdTooLong { .. } => "invalid_recipient",
        Error::TtlZero | Error::TtlTooLong { .. } => "invalid_ttl",
        Error::InvalidMessageId { .. } | Error::Codec(_) => "bad_request",
        _ => "unavailable",
    }
}
