//! The transactional outbox: the article's compensation mechanism ("消息补偿机制").
//!
//! The application writes its business row and an outbox row in **one local database
//! transaction** ([`Outbox::enqueue`]); either both exist or neither does. A [`Relay`]
//! then publishes pending rows with publisher confirms and marks them sent (status 0 → 1,
//! as in the article), retries failed publishes with exponential backoff, and after
//! [`RelayConfig::max_attempts`] marks a row `failed` (status 2) for a person to look at
//! (an error log line, [`RelayStats::gave_up`], and `holdfast outbox list|retry|discard`).
//!
//! Delivery is at least once: a relay that dies between the broker's confirm and the
//! `sent` mark leaves the row claimed; when its lease runs out another relay (or the
//! restarted one) publishes it again **with the same message id**, which broker-side
//! deduplication (`x-message-deduplication`) or an [idempotent
//! consumer](crate::consumer::IdempotentConsumer) absorbs. Several relays may run at once:
//! each claims rows for a lease before publishing them, so they do not send the same rows
//! concurrently.
//!
//! Order: rows are published in insertion order within a pass, but a row whose publish
//! fails is retried later, after rows behind it; the outbox does not promise order.

mod relay;

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use sqlx::Pool;

pub use relay::{Relay, RelayConfig, RelayHandle, RelayStats};

use crate::sql::{Backend, NewMessage};
pub use crate::sql::{StatusCounts, StoredMessage};
use crate::{Error, ErrorKind, Message};

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxStatus {
    /// Waiting for the relay (0).
    Pending,
    /// Confirmed by the broker (1).
    Sent,
    /// Given up after the maximum attempts (2): needs a person.
    Failed,
    /// Discarded by a person (3); never published again.
    Discarded,
}

impl OutboxStatus {
    /// The integer stored in the `status` column.
    #[must_use]
    pub fn code(self) -> i64 {
        match self {
            OutboxStatus::Pending => 0,
            OutboxStatus::Sent => 1,
            OutboxStatus::Failed => 2,
            OutboxStatus::Discarded => 3,
        }
    }

    /// The status for a stored code.
    #[must_use]
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(OutboxStatus::Pending),
            1 => Some(OutboxStatus::Sent),
            2 => Some(OutboxStatus::Failed),
            3 => Some(OutboxStatus::Discarded),
            _ => None,
        }
    }

    /// Lower-case name, as the CLI prints and parses it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Failed => "failed",
            OutboxStatus::Discarded => "discarded",
        }
    }
}

impl FromStr for OutboxStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" | "0" => Ok(OutboxStatus::Pending),
            "sent" | "1" => Ok(OutboxStatus::Sent),
            "failed" | "2" => Ok(OutboxStatus::Failed),
            "discarded" | "3" => Ok(OutboxStatus::Discarded),
            other => Err(format!(
                "unknown status {other:?} (pending, sent, failed, discarded)"
            )),
        }
    }
}

/// The message properties an outbox row keeps besides exchange, routing key and body.
#[derive(Debug, Serialize, Deserialize)]
struct StoredProperties {
    persistent: bool,
    mandatory: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    headers: Option<FieldTable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
}

impl StoredMessage {
    /// The message this row publishes, with its stored id.
    ///
    /// # Errors
    /// [`ErrorKind::Database`] when the stored properties are not valid JSON.
    pub fn to_message(&self) -> Result<Message, Error> {
        let props: StoredProperties = serde_json::from_str(&self.properties).map_err(|e| {
            Error::new(ErrorKind::Database(format!(
                "outbox row {}: properties: {e}",
                self.id
            )))
        })?;
        let mut message = Message::new(
            self.exchange.as_str(),
            self.routing_key.as_str(),
            self.body.clone(),
        )
        .persistent(props.persistent)
        .mandatory(props.mandatory)
        .message_id(self.message_id.as_str());
        if let Some(headers) = props.headers {
            message = message.headers(headers);
        }
        message.content_type = props.content_type;
        message.correlation_id = props.correlation_id;
        message.expiration = props.expiration;
        Ok(message)
    }

    /// The row's status.
    #[must_use]
    pub fn status(&self) -> Option<OutboxStatus> {
        OutboxStatus::from_code(self.status)
    }
}

fn encode_properties(message: &Message) -> Result<String, Error> {
    let headers = message.headers.inner();
    // The producer adds x-deduplication-header from the message id at publish time.
    let only_dedup =
        headers.len() == 1 && headers.contains_key(&ShortString::from("x-deduplication-header"));
    let props = StoredProperties {
        persistent: message.persistent,
        mandatory: message.mandatory,
        headers: (!headers.is_empty() && !only_dedup).then(|| message.headers.clone()),
        content_type: message.content_type.clone(),
        correlation_id: message.correlation_id.clone(),
        expiration: message.expiration.clone(),
    };
    serde_json::to_string(&props)
        .map_err(|e| Error::new(ErrorKind::Other(format!("encoding properties: {e}"))))
}

pub(crate) fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The outbox table of one database. Cheap to clone (a pool handle).
#[derive(Debug)]
pub struct Outbox<DB: Backend> {
    pool: Pool<DB>,
}

impl<DB: Backend> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Outbox {
            pool: self.pool.clone(),
        }
    }
}

impl<DB: Backend> Outbox<DB> {
    /// The outbox in the database of `pool` (the application's own database, so that
    /// business rows and outbox rows share transactions).
    #[must_use]
    pub fn new(pool: Pool<DB>) -> Self {
        Outbox { pool }
    }

    /// The pool this outbox uses.
    #[must_use]
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Creates the `holdfast_outbox` table and its index if they do not exist.
    ///
    /// # Errors
    /// [`ErrorKind::Database`] when the database refuses.
    pub async fn migrate(&self) -> Result<(), Error> {
        DB::outbox_migrate(&self.pool).await.map_err(Error::from)
    }

    /// Adds `message` to the outbox inside the caller's transaction and returns its
    /// message id (a UUIDv7 unless the message carries one). Nothing is published
    /// until the transaction commits and a relay picks the row up; if the transaction
    /// rolls back, the message never existed.
    ///
    /// # Errors
    /// [`ErrorKind::Database`], e.g. a unique-constraint violation when the same
    /// caller-chosen message id is enqueued twice (the transaction is then unusable on
    /// PostgreSQL: roll it back).
    pub async fn enqueue(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        mut message: Message,
    ) -> Result<String, Error> {
        let id = message.ensure_id();
        let properties = encode_properties(&message)?;
        DB::outbox_insert(
            &mut *tx,
            NewMessage {
                message_id: &id,
                exchange: &message.exchange,
                routing_key: &message.routing_key,
                body: &message.body,
                properties: &properties,
                now: now_ms(),
            },
        )
        .await
        .map_err(|e| Error::from(e).with_message_id(&id))?;
        Ok(id)
    }

    /// Rows in `status` (all when `None`), oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn list(
        &self,
        status: Option<OutboxStatus>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        DB::outbox_list(&self.pool, status.map(OutboxStatus::code), limit)
            .await
            .map_err(Error::from)
    }

    /// One row by its key.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn get(&self, id: i64) -> Result<Option<StoredMessage>, Error> {
        DB::outbox_get(&self.pool, id).await.map_err(Error::from)
    }

    /// Puts failed or discarded rows back to pending with a fresh attempt count
    /// (`ids`, or every failed row when `None`). Returns how many rows changed.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn retry(&self, ids: Option<&[i64]>) -> Result<u64, Error> {
        let from = [OutboxStatus::Failed.code(), OutboxStatus::Discarded.code()];
        let from: &[i64] = if ids.is_some() { &from } else { &from[..1] };
        DB::outbox_transition(
            &self.pool,
            ids,
            from,
            OutboxStatus::Pending.code(),
            now_ms(),
        )
        .await
        .map_err(Error::from)
    }

    /// Marks pending or failed rows discarded: the relay never publishes them. Returns
    /// how many rows changed.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn discard(&self, ids: &[i64]) -> Result<u64, Error> {
        let from = [OutboxStatus::Pending.code(), OutboxStatus::Failed.code()];
        DB::outbox_transition(
            &self.pool,
            Some(ids),
            &from,
            OutboxStatus::Discarded.code(),
            now_ms(),
        )
        .await
        .map_err(Error::from)
    }

    /// How many rows are in each status.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn counts(&self) -> Result<StatusCounts, Error> {
        DB::outbox_counts(&self.pool).await.map_err(Error::from)
    }

    /// Deletes sent rows confirmed more than `older_than` ago; returns how many.
    ///
    /// # Errors
    /// [`ErrorKind::Database`].
    pub async fn purge_sent(&self, older_than: Duration) -> Result<u64, Error> {
        DB::outbox_purge_sent(&self.pool, now_ms() - millis(older_than))
            .await
            .map_err(Error::from)
    }

    /// A relay publishing this outbox's rows through `producer`.
    #[must_use]
    pub fn relay(&self, producer: crate::Producer, config: RelayConfig) -> Relay<DB> {
        Relay::new(self.clone(), producer, config)
    }
}

/// Opens (creating if missing) a SQLite database for the outbox and the idempotent
/// consumer: WAL journal, `synchronous = FULL` (a committed transaction survives a
/// power cut), and a 30 s busy timeout so that several relays or processes writing the
/// same file wait for each other instead of failing.
///
/// `url` is a path or a `sqlite:` URL.
///
/// # Errors
/// [`ErrorKind::Database`] when the file cannot be opened.
pub async fn connect_sqlite(url: &str) -> Result<sqlx::SqlitePool, Error> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let options = if url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url).map_err(Error::from)?
    } else {
        SqliteConnectOptions::new().filename(url)
    };
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(Error::from)
}
