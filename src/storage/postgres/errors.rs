//! PostgreSQL and pool errors as the crate's: which are retryable, and what a user is told.

use std::sync::Arc;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::error::Error;

/// Maps a driver error to ours. Retryable: a connection lost, closed or refused (no
/// SQLSTATE, and the client closed or an I/O error underneath), and the server's codes for
/// faults that pass: class `08` connection, `40` serialization failure and deadlock, `53`
/// insufficient resources, `57P01`-`57P03` shutdown and startup, `57014` a statement
/// cancelled (a timeout), `55P03` lock not available, `25006` a read-only standby (after a
/// failover), `58000` and `58030` system and I/O errors. Anything else (a constraint, a
/// syntax error, a permission, a reply the client could not decode, a parameter it could
/// not encode) will not pass by itself.
pub(super) fn pg_error(error: tokio_postgres::Error) -> Error {
    let retryable = match error.code() {
        // A certificate refused will be refused again.
        None if tls_refused(&error) => false,
        None => error.is_closed() || io_underneath(&error),
        Some(code) => {
            let code = code.code();
            ["08", "40", "53"]
                .iter()
                .any(|class| code.starts_with(class))
                || [
                    SqlState::ADMIN_SHUTDOWN.code(),
                    SqlState::CRASH_SHUTDOWN.code(),
                    SqlState::CANNOT_CONNECT_NOW.code(),
                    SqlState::QUERY_CANCELED.code(),
                    SqlState::LOCK_NOT_AVAILABLE.code(),
                    SqlState::READ_ONLY_SQL_TRANSACTION.code(),
                    SqlState::SYSTEM_ERROR.code(),
                    SqlState::IO_ERROR.code(),
                ]
                .contains(&code)
        }
    };
    Error::Storage {
        message: format!("postgres: {}", describe(&error)),
        retryable,
        source: Some(Arc::new(error)),
    }
}

/// True if an I/O error (a connection reset, a refused connect, a timeout) caused `error`.
fn io_underneath(error: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        if inner.is::<std::io::Error>() {
            return true;
        }
        cause = inner.source();
    }
    false
}

/// True if TLS refused the server (its certificate, or the handshake): rustls's error
/// underneath, inside the I/O error the TLS stream reports it as.
fn tls_refused(error: &tokio_postgres::Error) -> bool {
    #[cfg(feature = "postgres-tls")]
    {
        let mut cause = std::error::Error::source(error);
        while let Some(inner) = cause {
            let rustls = inner.is::<rustls::Error>()
                || inner
                    .downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref)
                    .is_some_and(|inner| inner.is::<rustls::Error>());
            if rustls {
                return true;
            }
            cause = inner.source();
        }
    }
    #[cfg(not(feature = "postgres-tls"))]
    let _ = error;
    false
}

/// The server's message with its detail, or the driver's with its causes (a TLS handshake
/// that failed says why: the certificate's issuer unknown, its name another host's).
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => {
            let mut text = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                let said = inner.to_string();
                if !text.contains(&said) {
                    text = format!("{text}: {said}");
                }
                cause = inner.source();
            }
            text
        }
    }
}

/// A connection that could not be had from the pool: retryable unless the pool was closed or
/// misbuilt.
pub(super) fn pool_error(error: PoolError) -> Error {
    match error {
        PoolError::Backend(error) => pg_error(error),
        PoolError::Closed | PoolError::NoRuntimeSpecified => Error::Storage {
            message: format!("postgres pool: {error}"),
            retryable: false,
            source: Some(Arc::new(error)),
        },
        other => Error::Storage {
            message: format!("postgres pool: {other}"),
            retryable: true,
            source: Some(Arc::new(other)),
        },
    }
}
