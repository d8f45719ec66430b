//! Broker and client errors as the crate's: which are retryable, and what a user is told.

use std::sync::Arc;

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::error::Error;

/// Maps a client error during `what` to ours. Retryable: the connection or channel lost or
/// refused, and the broker's codes for faults that pass (a resource locked, a broker
/// shutting down or out of resources, a connection forced closed). Anything else (access
/// refused, a queue declared with other arguments, a frame the broker refused) will not pass
/// by itself.
pub(super) fn broker_error(error: lapin::Error, what: &str) -> Error {
    let retryable = match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => matches!(soft, AMQPSoftError::RESOURCELOCKED),
            AMQPErrorKind::Hard(hard) => matches!(
                hard,
                AMQPHardError::CONNECTIONFORCED | AMQPHardError::RESOURCEERROR
            ),
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::MissingHeartbeatError => true,
        _ => false,
    };
    Error::Storage {
        message: format!("amqp {what}: {error}"),
        retryable,
        source: Some(Arc::new(error)),
    }
}

/// True if `error` is the broker saying the queue does not exist (404 NOT_FOUND).
pub(super) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Connects within `timeout`: a broker still booting (or wedged) takes the TCP connection and
/// never answers the handshake.
pub(super) async fn connect(
    url: &str,
    timeout: std::time::Duration,
) -> Result<lapin::Connection, Error> {
    match tokio::time::timeout(
        timeout,
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    {
        Ok(connected) => connected.map_err(|e| connect_error(e, url)),
        Err(_) => Err(Error::storage_msg(
            crate::error::Retry::Yes,
            format!(
                "amqp at {} does not answer: no handshake within {timeout:?}",
                shown(url)
            ),
        )),
    }
}

/// `url` without its user and password.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A connection refused or failed: retryable, naming the broker without the URL's password.
pub(super) fn connect_error(error: lapin::Error, url: &str) -> Error {
    let shown = shown(url);
    let mut mapped = broker_error(error, "connect");
    if let Error::Storage {
        message, retryable, ..
    } = &mut mapped
    {
        *message = format!("amqp at {shown} does not answer: {message}");
        // A refused login will be refused again; anything else (no route, reset) may pass.
        *retryable = *retryable || message.contains("os error");
    }
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_error_names_the_broker_but_not_the_password() {
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let error = connect_error(io, "amqp://guest:secret@127.0.0.1:1/%2f");
        let text = error.to_string();
        assert!(
            text.contains("amqp at amqp://127.0.0.1:1/%2f does not answer"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        assert!(error.is_retryable());
    }
}
