//! AMQP exceptions as values. The broker decides *what* went wrong and whether it ends a
//! channel or the whole connection; the amqp layer renders it as `channel.close` or
//! `connection.close`.

use std::fmt;

/// Reply codes of AMQP 0-9-1 (§1.2 constants). Wire-visible; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ReplyCode {
    /// 200: success.
    ReplySuccess = 200,
    /// 312: a mandatory message could not be routed (basic.return).
    NoRoute = 312,
    /// 320: the server closed the connection (e.g. shutdown).
    ConnectionForced = 320,
    /// 402: invalid path (unknown vhost in some brokers).
    InvalidPath = 402,
    /// 403: access refused.
    AccessRefused = 403,
    /// 404: entity not found.
    NotFound = 404,
    /// 405: resource locked (exclusive queue of another connection).
    ResourceLocked = 405,
    /// 406: precondition failed.
    PreconditionFailed = 406,
    /// 501: malformed frame.
    FrameError = 501,
    /// 502: malformed method arguments.
    SyntaxError = 502,
    /// 503: method not valid here.
    CommandInvalid = 503,
    /// 504: channel misuse.
    ChannelError = 504,
    /// 505: frame out of sequence.
    UnexpectedFrame = 505,
    /// 506: resource error.
    ResourceError = 506,
    /// 530: not allowed.
    NotAllowed = 530,
    /// 540: not implemented.
    NotImplemented = 540,
    /// 541: internal error.
    InternalError = 541,
}

impl ReplyCode {
    /// The numeric code.
    #[must_use]
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The name RabbitMQ prefixes reply texts with.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::ReplySuccess => "OK",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether the specification makes this code a connection (hard) error.
    #[must_use]
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::InvalidPath
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }
}

/// Whether an exception closes one channel or the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `channel.close`.
    Channel,
    /// `connection.close`.
    Connection,
}

/// An AMQP exception: the reply code, RabbitMQ-style text, and the method that caused it
/// (filled in by the amqp layer, which knows the method ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpException {
    /// Channel or connection.
    pub scope: Scope,
    /// The reply code.
    pub code: ReplyCode,
    /// Human-readable text, without the code name prefix.
    pub text: String,
    /// Class id of the offending method, 0 if none.
    pub class_id: u16,
    /// Method id of the offending method, 0 if none.
    pub method_id: u16,
}

impl AmqpException {
    /// A channel-level exception.
    pub fn channel(code: ReplyCode, text: impl Into<String>) -> Self {
        Self {
            scope: Scope::Channel,
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// A connection-level exception.
    pub fn connection(code: ReplyCode, text: impl Into<String>) -> Self {
        Self {
            scope: Scope::Connection,
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attaches the offending method's ids.
    #[must_use]
    pub fn with_method(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// The reply text as sent on the wire: `"NOT_FOUND - no queue 'q' in vhost '/'"`,
    /// cut to fit a short string.
    #[must_use]
    pub fn reply_text(&self) -> String {
        let mut text = format!("{} - {}", self.code.name(), self.text);
        if text.len() > 255 {
            let mut cut = 255;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        text
    }
}

impl fmt::Display for AmqpException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.reply_text())
    }
}

impl std::error::Error for AmqpException {}

/// Failures to start or run the broker (not protocol errors).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] holdfast_store::StoreError),
    /// A record did not decode as the message it should be.
    #[error("record at log position {position} is not a message")]
    Corrupt {
        /// Where.
        position: u64,
    },
    /// The housekeeping thread could not start.
    #[error("cannot start the housekeeping thread: {source}")]
    Thread {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log holds records this version cannot interpret (written by a newer one, or
    /// damaged in a way the CRC did not catch). Skipping them could silently drop acks,
    /// moves or definitions, so the broker does not open.
    #[error(
        "log record of kind {kind:#04x} at position {position} cannot be interpreted by this \
         version ({count} such records); refusing to open rather than skip them"
    )]
    UnknownRecord {
        /// The record's kind byte.
        kind: u8,
        /// Where the first one is.
        position: u64,
        /// How many there are.
        count: u64,
    },
    /// Stored definitions could not be read.
    #[error("definitions are unreadable: {0}")]
    Definitions(#[source] serde_json::Error),
}

/// Shorthand for results carrying an [`AmqpException`].
pub type AmqpResult<T> = Result<T, AmqpException>;
