//! The SDK's error: one [`Error`] carrying an [`ErrorKind`] that callers match on, the
//! message id it concerns, and the lapin error underneath when there is one.
//!
//! Retryability is a property of the kind ([`ErrorKind::is_retryable`]): a nack, a
//! timeout or a lost connection leave the broker without responsibility for the message,
//! so re-sending it (with the same message id) is safe; a return or a protocol error
//! would only fail again.

use std::fmt;

/// What went wrong. New kinds may be added, so matches need a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// The broker negatively acknowledged the message (e.g. a full queue with
    /// `x-overflow: reject-publish`): it did not take responsibility for it.
    #[error("the broker nacked the message")]
    Nacked,
    /// A mandatory message could not be routed to any queue and came back with
    /// `basic.return`. Permanent: never retried.
    #[error("the broker returned the message: {reply_code} {reply_text}")]
    Returned {
        /// The AMQP reply code, e.g. 312 (`NO_ROUTE`).
        reply_code: u16,
        /// The broker's explanation.
        reply_text: String,
    },
    /// No confirm arrived within the configured confirm timeout.
    #[error("no publisher confirm within the timeout")]
    Timeout,
    /// The connection (or channel) was lost, or no broker URL could be reached.
    #[error("connection to the broker lost")]
    ConnectionLost,
    /// The retry policy's overall deadline passed before a confirm.
    #[error("the send deadline passed (last failure: {last})")]
    DeadlineExceeded {
        /// The failure of the last attempt.
        last: Box<ErrorKind>,
    },
    /// The broker closed the channel or connection with an AMQP error (e.g. 404 for a
    /// missing exchange, 406 for a declaration that does not match).
    #[error("AMQP error {reply_code}: {reply_text}")]
    Protocol {
        /// The AMQP reply code.
        reply_code: u16,
        /// The broker's explanation.
        reply_text: String,
    },
    /// The producer's configuration is unusable (e.g. no URL).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The producer was shut down or a background task was cancelled.
    #[error("the producer is closed")]
    Closed,
    /// The database behind the outbox or the processed-message store failed.
    #[error("database error: {0}")]
    Database(String),
    /// Any other client-side failure.
    #[error("client error: {0}")]
    Other(String),
}

impl ErrorKind {
    /// Whether re-sending the same message may succeed: nacks, timeouts and lost
    /// connections are; returns, protocol and configuration errors are not.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ErrorKind::Nacked | ErrorKind::Timeout | ErrorKind::ConnectionLost
        )
    }
}

/// An error of the Holdfast SDK. Boxed inside, so `Result<_, Error>` stays one pointer
/// wide on the success path.
#[derive(Debug)]
pub struct Error(Box<Repr>);

#[derive(Debug)]
struct Repr {
    kind: ErrorKind,
    message_id: Option<String>,
    source: Option<lapin::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error(Box::new(Repr {
            kind,
            message_id: None,
            source: None,
        }))
    }

    pub(crate) fn with_message_id(mut self, id: &str) -> Self {
        self.0.message_id = Some(id.to_owned());
        self
    }

    pub(crate) fn into_kind(mut self, kind: ErrorKind) -> Self {
        self.0.kind = kind;
        self
    }

    /// What went wrong.
    #[must_use]
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The AMQP reply code, for a return or a protocol error.
    #[must_use]
    pub fn reply_code(&self) -> Option<u16> {
        match &self.0.kind {
            ErrorKind::Returned { reply_code, .. } | ErrorKind::Protocol { reply_code, .. } => {
                Some(*reply_code)
            }
            ErrorKind::DeadlineExceeded { last } => match &**last {
                ErrorKind::Returned { reply_code, .. } | ErrorKind::Protocol { reply_code, .. } => {
                    Some(*reply_code)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The id of the message this error concerns, when it concerns one.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.0.message_id.as_deref()
    }

    /// Whether re-sending the same message may succeed (see [`ErrorKind::is_retryable`]).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.0.kind.is_retryable()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.message_id {
            Some(id) => write!(f, "message {id}: {}", self.0.kind),
            None => write!(f, "{}", self.0.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<lapin::Error> for Error {
    fn from(err: lapin::Error) -> Self {
        let kind = match err.kind() {
            // 320 CONNECTION_FORCED: the broker is shutting down; another may take over.
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 320 => {
                ErrorKind::ConnectionLost
            }
            lapin::ErrorKind::ProtocolError(amqp) => ErrorKind::Protocol {
                reply_code: amqp.get_id(),
                reply_text: amqp.get_message().to_string(),
            },
            lapin::ErrorKind::IOError(_)
            | lapin::ErrorKind::InvalidChannelState(..)
            | lapin::ErrorKind::InvalidConnectionState(_)
            | lapin::ErrorKind::InvalidChannel(_)
            | lapin::ErrorKind::MissingHeartbeatError
            | lapin::ErrorKind::ParsingError(_)
            | lapin::ErrorKind::SerialisationError(_) => ErrorKind::ConnectionLost,
            lapin::ErrorKind::RuntimeShutdownError(_) => ErrorKind::Closed,
            other => ErrorKind::Other(format!("{other:?}")),
        };
        Error(Box::new(Repr {
            kind,
            message_id: None,
            source: Some(err),
        }))
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        Error::new(ErrorKind::Database(err.to_string()))
    }
}
