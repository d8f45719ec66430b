//! TLS for the storage's connections, chosen by the URL: `sslmode=require` connects over TLS
//! (the `postgres-tls` feature: rustls, the server's certificate verified against Mozilla's
//! roots or the certificates given to [`PostgresOptions::tls_root_certificates_pem`], host
//! name included); any other mode connects in the clear, as before. `prefer` does not try TLS:
//! a connection that may silently fall back to plain text is not offered.
//!
//! [`PostgresOptions::tls_root_certificates_pem`]: super::PostgresOptions::tls_root_certificates_pem

use deadpool_postgres::{Manager, ManagerConfig};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

use super::errors::pg_error;
use crate::error::{Error, Result};

/// How the storage's connections are made.
#[derive(Clone)]
pub(super) enum Tls {
    /// In the clear.
    Off,
    /// Over TLS, verified.
    #[cfg(feature = "postgres-tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Off => "off",
            #[cfg(feature = "postgres-tls")]
            Tls::Rustls(_) => "rustls",
        })
    }
}

impl Tls {
    /// What `config` asks for, with `roots_pem` (PEM certificates) trusted in place of the
    /// public roots when given.
    pub(super) fn for_config(
        config: &tokio_postgres::Config,
        roots_pem: Option<&[u8]>,
    ) -> Result<Self> {
        if !matches!(config.get_ssl_mode(), SslMode::Require) {
            return Ok(Tls::Off);
        }
        #[cfg(feature = "postgres-tls")]
        {
            Ok(Tls::Rustls(rustls_connector(roots_pem)?))
        }
        #[cfg(not(feature = "postgres-tls"))]
        {
            let _ = roots_pem;
            Err(Error::InvalidConfig {
                field: "postgres url",
                reason: "sslmode=require needs the crate's `postgres-tls` feature".into(),
            })
        }
    }

    /// The pool's connection manager.
    pub(super) fn manager(
        &self,
        config: tokio_postgres::Config,
        manager: ManagerConfig,
    ) -> Manager {
        match self {
            Tls::Off => Manager::from_config(config, NoTls, manager),
            #[cfg(feature = "postgres-tls")]
            Tls::Rustls(tls) => Manager::from_config(config, tls.clone(), manager),
        }
    }

    /// One connection outside the pool (the wake-up listener's): the client, and a task that
    /// drives the connection and forwards each notification's payload to `notes`. The task
    /// ends with the connection's error, or `Ok` when the client is dropped.
    pub(super) async fn connect_listening(
        &self,
        config: &tokio_postgres::Config,
        notes: futures::channel::mpsc::UnboundedSender<String>,
    ) -> Result<(
        Client,
        tokio::task::JoinHandle<std::result::Result<(), tokio_postgres::Error>>,
    )> {
        Ok(match self {
            Tls::Off => {
                let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
                (
                    client,
                    tokio::spawn(forward_notifications(connection, notes)),
                )
            }
            #[cfg(feature = "postgres-tls")]
            Tls::Rustls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(pg_error)?;
                (
                    client,
                    tokio::spawn(forward_notifications(connection, notes)),
                )
            }
        })
    }
}

/// Drives a connection, forwarding each notification's payload.
async fn forward_notifications<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notes: futures::channel::mpsc::UnboundedSender<String>,
) -> std::result::Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(note) = message? {
            let _ = notes.unbounded_send(note.payload().to_owned());
        }
    }
    Ok(())
}

/// A verifying rustls connector (ring), trusting `roots_pem` or else Mozilla's roots.
#[cfg(feature = "postgres-tls")]
fn rustls_connector(roots_pem: Option<&[u8]>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let config = crate::tls::client_config(roots_pem).map_err(|reason| Error::InvalidConfig {
        field: "postgres tls root certificates",
        reason,
    })?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
