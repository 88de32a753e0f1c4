//! The one error type of the bench library.

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The `--url` is not an AMQP URL.
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password hidden.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// An argument combination makes no sense.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to {host}")]
    Connect {
        /// host:port.
        host: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not finish the handshake in time.
    #[error("cannot connect to {host}: no answer within {secs} s")]
    ConnectTimeout {
        /// host:port.
        host: String,
        /// The timeout.
        secs: u64,
    },
    /// An AMQP operation failed (channel or connection closed by the broker, ...).
    #[error("{context} failed")]
    Amqp {
        /// What was being done.
        context: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The latency histogram could not be created or merged.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
    /// The SDK (holdfast-client) failed: producer, outbox, relay or consumer.
    #[error("{context} failed")]
    Client {
        /// What was being done.
        context: &'static str,
        /// The SDK's error.
        #[source]
        source: holdfast_client::Error,
    },
    /// The application database failed.
    #[error("{context} failed")]
    Database {
        /// What was being done.
        context: &'static str,
        /// sqlx's error.
        #[source]
        source: holdfast_client::sqlx::Error,
    },
    /// A run finished, but its result is not what it should be (lost or extra
    /// messages, missing rows), or it stopped making progress.
    #[error("{0}")]
    Check(String),
    /// A worker task panicked or was cancelled.
    #[error("a benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Adds a context to lapin results.
pub(crate) trait AmqpContext<T> {
    /// Wraps the error with what was being done.
    fn ctx(self, context: &'static str) -> Result<T, BenchError>;
}

impl<T> AmqpContext<T> for Result<T, lapin::Error> {
    fn ctx(self, context: &'static str) -> Result<T, BenchError> {
        self.map_err(|source| BenchError::Amqp { context, source })
    }
}

/// Adds a context to SDK results.
pub(crate) trait ClientContext<T> {
    /// Wraps the error with what was being done.
    fn sdk(self, context: &'static str) -> Result<T, BenchError>;
}

impl<T> ClientContext<T> for Result<T, holdfast_client::Error> {
    fn sdk(self, context: &'static str) -> Result<T, BenchError> {
        self.map_err(|source| BenchError::Client { context, source })
    }
}

/// Adds a context to database results.
pub(crate) trait DbContext<T> {
    /// Wraps the error with what was being done.
    fn db(self, context: &'static str) -> Result<T, BenchError>;
}

impl<T> DbContext<T> for Result<T, holdfast_client::sqlx::Error> {
    fn db(self, context: &'static str) -> Result<T, BenchError> {
        self.map_err(|source| BenchError::Database { context, source })
    }
}
