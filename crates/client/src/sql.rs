//! The SQL behind the outbox and the processed-message store, for SQLite and PostgreSQL.
//!
//! [`Backend`] is implemented for [`sqlx::Sqlite`] and [`sqlx::Postgres`] by one macro, so
//! both databases run the same statements (sqlx binds `$1`-style parameters on SQLite too)
//! and differ only where the dialects do: column types in the DDL, and row locking when
//! relays claim rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite serialises writers,
//! so its single-statement claim is already exclusive).
//!
//! Timestamps are Unix milliseconds taken from the client's clock; statuses are small
//! integers (see [`OutboxStatus`](crate::outbox::OutboxStatus)).

use std::future::Future;

use sqlx::{Pool, Row};

/// A row of the outbox as the relay and the CLI see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The row's primary key, in insertion order.
    pub id: i64,
    /// The AMQP message id every publish of this row carries.
    pub message_id: String,
    /// Target exchange ("" for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// Headers and other properties, as JSON (see `outbox::encode_properties`).
    pub properties: String,
    /// 0 pending, 1 sent, 2 failed, 3 discarded.
    pub status: i64,
    /// Publish attempts so far.
    pub attempts: i64,
    /// When the relay may next try it (Unix ms).
    pub next_attempt_at: i64,
    /// The last publish failure, if any.
    pub last_error: Option<String>,
    /// When the application enqueued it (Unix ms).
    pub created_at: i64,
    /// When the broker confirmed it (Unix ms).
    pub sent_at: Option<i64>,
}

/// Everything but the generated key, for an insert.
#[doc(hidden)]
#[allow(missing_docs)]
pub struct NewMessage<'a> {
    pub message_id: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: &'a str,
    pub now: i64,
}

/// How many rows are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Waiting for the relay (status 0).
    pub pending: i64,
    /// Confirmed by the broker (status 1).
    pub sent: i64,
    /// Gave up after the maximum attempts (status 2): needs a person.
    pub failed: i64,
    /// Discarded by a person (status 3).
    pub discarded: i64,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
}

type Result<T> = std::result::Result<T, sqlx::Error>;

/// A database the outbox and the idempotent consumer can use: [`sqlx::Sqlite`] or
/// [`sqlx::Postgres`]. Sealed; its methods are the SDK's own.
#[allow(missing_docs)]
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    fn outbox_migrate(pool: &Pool<Self>) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn outbox_insert(
        conn: &mut Self::Connection,
        row: NewMessage<'_>,
    ) -> impl Future<Output = Result<i64>> + Send;
    #[doc(hidden)]
    fn outbox_claim(
        pool: &Pool<Self>,
        relay: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<StoredMessage>>> + Send;
    #[doc(hidden)]
    fn outbox_mark_sent(
        pool: &Pool<Self>,
        ids: &[i64],
        now: i64,
    ) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn outbox_mark_failure(
        pool: &Pool<Self>,
        id: i64,
        attempts: i64,
        next_attempt_at: i64,
        error: &str,
        give_up: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn outbox_list(
        pool: &Pool<Self>,
        status: Option<i64>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<StoredMessage>>> + Send;
    #[doc(hidden)]
    fn outbox_get(
        pool: &Pool<Self>,
        id: i64,
    ) -> impl Future<Output = Result<Option<StoredMessage>>> + Send;
    #[doc(hidden)]
    fn outbox_transition(
        pool: &Pool<Self>,
        ids: Option<&[i64]>,
        from: &[i64],
        to: i64,
        now: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    #[doc(hidden)]
    fn outbox_counts(pool: &Pool<Self>) -> impl Future<Output = Result<StatusCounts>> + Send;
    #[doc(hidden)]
    fn outbox_purge_sent(
        pool: &Pool<Self>,
        before: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    #[doc(hidden)]
    fn processed_migrate(pool: &Pool<Self>) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn processed_insert(
        conn: &mut Self::Connection,
        consumer: &str,
        message_id: &str,
        now: i64,
    ) -> impl Future<Output = Result<bool>> + Send;
    #[doc(hidden)]
    fn processed_purge(
        pool: &Pool<Self>,
        consumer: &str,
        before: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
}

const COLUMNS: &str = "id, message_id, exchange, routing_key, body, properties, status, attempts, \
                       next_attempt_at, last_error, created_at, sent_at";

macro_rules! backend {
    (
        $db:ty,
        $row:ty,
        outbox_ddl: $outbox_ddl:expr,
        processed_ddl: $processed_ddl:expr,
        lock: $lock:expr,
        ids_match: $ids_match:expr,
        ids_bind: $ids_bind:expr
    ) => {
        impl Backend for $db {
            async fn outbox_migrate(pool: &Pool<Self>) -> Result<()> {
                for statement in $outbox_ddl {
                    sqlx::query(statement).execute(pool).await?;
                }
                Ok(())
            }

            async fn outbox_insert(
                conn: &mut Self::Connection,
                row: NewMessage<'_>,
            ) -> Result<i64> {
                let inserted = sqlx::query(
                    "INSERT INTO holdfast_outbox \
                     (message_id, exchange, routing_key, body, properties, status, attempts, \
                      next_attempt_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5, 0, 0, $6, $6) RETURNING id",
                )
                .bind(row.message_id)
                .bind(row.exchange)
                .bind(row.routing_key)
                .bind(row.body)
                .bind(row.properties)
                .bind(row.now)
                .fetch_one(&mut *conn)
                .await?;
                inserted.try_get::<i64, _>(0)
            }

            async fn outbox_claim(
                pool: &Pool<Self>,
                relay: &str,
                now: i64,
                lease_until: i64,
                limit: i64,
            ) -> Result<Vec<StoredMessage>> {
                let sql = format!(
                    "UPDATE holdfast_outbox SET claimed_by = $1, claimed_until = $2 \
                     WHERE id IN (SELECT id FROM holdfast_outbox \
                                  WHERE status = 0 AND next_attempt_at <= $3 \
                                    AND (claimed_until IS NULL OR claimed_until < $3) \
                                  ORDER BY id LIMIT $4 {}) \
                     RETURNING {COLUMNS}",
                    $lock
                );
                let rows = sqlx::query(&sql)
                    .bind(relay)
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                let mut claimed = rows.iter().map(decode).collect::<Result<Vec<_>>>()?;
                // RETURNING promises no order; publish in insertion order.
                claimed.sort_by_key(|m| m.id);
                Ok(claimed)
            }

            async fn outbox_mark_sent(pool: &Pool<Self>, ids: &[i64], now: i64) -> Result<()> {
                if ids.is_empty() {
                    return Ok(());
                }
                // One statement for the whole batch: a round trip per row made marking
                // slower than publishing.
                let sql = format!(
                    "UPDATE holdfast_outbox SET status = 1, sent_at = $2, \
                     attempts = attempts + 1, claimed_by = NULL, claimed_until = NULL \
                     WHERE id {} AND status = 0",
                    $ids_match
                );
                sqlx::query(&sql)
                    .bind($ids_bind(ids))
                    .bind(now)
                    .execute(pool)
                    .await?;
                Ok(())
            }

            async fn outbox_mark_failure(
                pool: &Pool<Self>,
                id: i64,
                attempts: i64,
                next_attempt_at: i64,
                error: &str,
                give_up: bool,
            ) -> Result<()> {
                sqlx::query(
                    "UPDATE holdfast_outbox SET attempts = $2, next_attempt_at = $3, \
                     last_error = $4, status = $5, claimed_by = NULL, claimed_until = NULL \
                     WHERE id = $1 AND status = 0",
                )
                .bind(id)
                .bind(attempts)
                .bind(next_attempt_at)
                .bind(error)
                .bind(if give_up { 2_i64 } else { 0 })
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn outbox_list(
                pool: &Pool<Self>,
                status: Option<i64>,
                limit: i64,
            ) -> Result<Vec<StoredMessage>> {
                let sql = format!(
                    "SELECT {COLUMNS} FROM holdfast_outbox \
                     WHERE ($1 IS NULL OR status = $1) ORDER BY id LIMIT $2"
                );
                let rows = sqlx::query(&sql).bind(status).bind(limit).fetch_all(pool).await?;
                rows.iter().map(decode).collect()
            }

            async fn outbox_get(pool: &Pool<Self>, id: i64) -> Result<Option<StoredMessage>> {
                let sql = format!("SELECT {COLUMNS} FROM holdfast_outbox WHERE id = $1");
                let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
                row.as_ref().map(decode).transpose()
            }

            async fn outbox_transition(
                pool: &Pool<Self>,
                ids: Option<&[i64]>,
                from: &[i64],
                to: i64,
                now: i64,
            ) -> Result<u64> {
                // Moving back to pending restarts the attempt count, so the relay's
                // maximum applies afresh after a person asked for a retry.
                let from_list = from.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
                let set = "status = $1, \
                           attempts = CASE WHEN $1 = 0 THEN 0 ELSE attempts END, \
                           next_attempt_at = CASE WHEN $1 = 0 THEN $2 ELSE next_attempt_at END, \
                           claimed_by = NULL, claimed_until = NULL";
                let mut tx = pool.begin().await?;
                let mut changed = 0;
                match ids {
                    Some(ids) => {
                        let sql = format!(
                            "UPDATE holdfast_outbox SET {set} WHERE id = $3 AND status IN ({from_list})"
                        );
                        for id in ids {
                            changed += sqlx::query(&sql)
                                .bind(to)
                                .bind(now)
                                .bind(id)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                        }
                    }
                    None => {
                        let sql = format!(
                            "UPDATE holdfast_outbox SET {set} WHERE status IN ({from_list})"
                        );
                        changed += sqlx::query(&sql)
                            .bind(to)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                }
                tx.commit().await?;
                Ok(changed)
            }

            async fn outbox_counts(pool: &Pool<Self>) -> Result<StatusCounts> {
                let rows = sqlx::query(
                    "SELECT status, COUNT(*) FROM holdfast_outbox GROUP BY status",
                )
                .fetch_all(pool)
                .await?;
                let mut counts = StatusCounts::default();
                for row in &rows {
                    let status: i64 = row.try_get(0)?;
                    let n: i64 = row.try_get(1)?;
                    match status {
                        0 => counts.pending = n,
                        1 => counts.sent = n,
                        2 => counts.failed = n,
                        _ => counts.discarded += n,
                    }
                }
                Ok(counts)
            }

            async fn outbox_purge_sent(pool: &Pool<Self>, before: i64) -> Result<u64> {
                Ok(sqlx::query("DELETE FROM holdfast_outbox WHERE status = 1 AND sent_at < $1")
                    .bind(before)
                    .execute(pool)
                    .await?
                    .rows_affected())
            }

            async fn processed_migrate(pool: &Pool<Self>) -> Result<()> {
                for statement in $processed_ddl {
                    sqlx::query(statement).execute(pool).await?;
                }
                Ok(())
            }

            async fn processed_insert(
                conn: &mut Self::Connection,
                consumer: &str,
                message_id: &str,
                now: i64,
            ) -> Result<bool> {
                let done = sqlx::query(
                    "INSERT INTO holdfast_processed (consumer, message_id, processed_at) \
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(consumer)
                .bind(message_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn processed_purge(pool: &Pool<Self>, consumer: &str, before: i64) -> Result<u64> {
                Ok(sqlx::query(
                    "DELETE FROM holdfast_processed WHERE consumer = $1 AND processed_at < $2",
                )
                .bind(consumer)
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected())
            }
        }

        fn decode(row: &$row) -> Result<StoredMessage> {
            Ok(StoredMessage {
                id: row.try_get("id")?,
                message_id: row.try_get("message_id")?,
                exchange: row.try_get("exchange")?,
                routing_key: row.try_get("routing_key")?,
                body: row.try_get("body")?,
                properties: row.try_get("properties")?,
                status: row.try_get("status")?,
                attempts: row.try_get("attempts")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                last_error: row.try_get("last_error")?,
                created_at: row.try_get("created_at")?,
                sent_at: row.try_get("sent_at")?,
            })
        }
    };
}

mod sqlite {
    use super::*;

    backend!(
        sqlx::Sqlite,
        sqlx::sqlite::SqliteRow,
        outbox_ddl: [
            "CREATE TABLE IF NOT EXISTS holdfast_outbox (\
               id INTEGER PRIMARY KEY AUTOINCREMENT, \
               message_id TEXT NOT NULL UNIQUE, \
               exchange TEXT NOT NULL, \
               routing_key TEXT NOT NULL, \
               body BLOB NOT NULL, \
               properties TEXT NOT NULL, \
               status INTEGER NOT NULL, \
               attempts INTEGER NOT NULL, \
               next_attempt_at INTEGER NOT NULL, \
               claimed_by TEXT, \
               claimed_until INTEGER, \
               last_error TEXT, \
               created_at INTEGER NOT NULL, \
               sent_at INTEGER)",
            "CREATE INDEX IF NOT EXISTS holdfast_outbox_due \
               ON holdfast_outbox (status, next_attempt_at, id)",
        ],
        processed_ddl: [
            "CREATE TABLE IF NOT EXISTS holdfast_processed (\
               consumer TEXT NOT NULL, \
               message_id TEXT NOT NULL, \
               processed_at INTEGER NOT NULL, \
               PRIMARY KEY (consumer, message_id))",
        ],
        lock: "",
        // SQLite has no arrays: the ids travel as a JSON array.
        ids_match: "IN (SELECT value FROM json_each($1))",
        ids_bind: |ids: &[i64]| serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned())
    );
}

mod postgres {
    use super::*;

    backend!(
        sqlx::Postgres,
        sqlx::postgres::PgRow,
        outbox_ddl: [
            "CREATE TABLE IF NOT EXISTS holdfast_outbox (\
               id BIGSERIAL PRIMARY KEY, \
               message_id TEXT NOT NULL UNIQUE, \
               exchange TEXT NOT NULL, \
               routing_key TEXT NOT NULL, \
               body BYTEA NOT NULL, \
               properties TEXT NOT NULL, \
               status BIGINT NOT NULL, \
               attempts BIGINT NOT NULL, \
               next_attempt_at BIGINT NOT NULL, \
               claimed_by TEXT, \
               claimed_until BIGINT, \
               last_error TEXT, \
               created_at BIGINT NOT NULL, \
               sent_at BIGINT)",
            "CREATE INDEX IF NOT EXISTS holdfast_outbox_due \
               ON holdfast_outbox (status, next_attempt_at, id)",
        ],
        processed_ddl: [
            "CREATE TABLE IF NOT EXISTS holdfast_processed (\
               consumer TEXT NOT NULL, \
               message_id TEXT NOT NULL, \
               processed_at BIGINT NOT NULL, \
               PRIMARY KEY (consumer, message_id))",
        ],
        lock: "FOR UPDATE SKIP LOCKED",
        ids_match: "= ANY($1)",
        ids_bind: <[i64]>::to_vec
    );
}
