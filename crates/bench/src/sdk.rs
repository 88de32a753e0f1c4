//! What the SDK scenarios ([`outbox`](crate::outbox), [`idempotent`](crate::idempotent))
//! share: the application database (SQLite file or PostgreSQL URL), a few statements on
//! it, queue depths, and waiting on the SDK's counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_client::sqlx::{self, Database, Pool};
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::error::{AmqpContext, BenchError, DbContext};

/// How often the SDK's counters are read while waiting for the end of a phase.
pub(crate) const POLL: Duration = Duration::from_millis(10);

/// A phase whose counter stays still this long has stalled (broker gone, rows failing,
/// messages dead-lettered): the run fails instead of hanging.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// The application database named by `--database`.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    /// A SQLite file path or `sqlite:` URL.
    Sqlite(String),
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
}

impl Db {
    pub(crate) fn parse(database: &str) -> Result<Self, BenchError> {
        if database.is_empty() {
            return Err(BenchError::InvalidArgs(
                "--database must be a SQLite path or a postgres:// URL".into(),
            ));
        }
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            Ok(Db::Postgres(database.to_owned()))
        } else {
            Ok(Db::Sqlite(database.to_owned()))
        }
    }

    /// `sqlite` or `postgres`, for reports.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Where the database is, without credentials: the path, or `host:port/db`.
    pub(crate) fn location(&self) -> String {
        match self {
            Db::Sqlite(path) => path.clone(),
            Db::Postgres(url) => {
                let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
                rest.split('?').next().unwrap_or(rest).to_owned()
            }
        }
    }

    /// Opens a SQLite pool the SDK's way (WAL, synchronous FULL, busy timeout).
    pub(crate) async fn sqlite(path: &str) -> Result<sqlx::SqlitePool, BenchError> {
        holdfast_client::outbox::connect_sqlite(path)
            .await
            .map_err(|source| BenchError::Client {
                context: "opening the SQLite database",
                source,
            })
    }

    /// Opens a PostgreSQL pool of at most `connections`.
    pub(crate) async fn postgres(url: &str, connections: u32) -> Result<sqlx::PgPool, BenchError> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .connect(url)
            .await
            .db("connecting to PostgreSQL")
    }
}

/// `SELECT COUNT(*) FROM table`; an error when the table does not exist.
pub(crate) async fn count_rows<DB: holdfast_client::Backend>(
    pool: &Pool<DB>,
    table: &str,
) -> Result<i64, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(pool)
        .await?;
    Ok(n)
}

/// Runs one statement without parameters.
pub(crate) async fn execute<DB: holdfast_client::Backend>(
    pool: &Pool<DB>,
    sql: &str,
    context: &'static str,
) -> Result<(), BenchError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    sqlx::query(sql).execute(pool).await.db(context)?;
    Ok(())
}

/// How many ready messages `queue` holds (passive `queue.declare`).
pub(crate) async fn queue_depth(channel: &Channel, queue: &str) -> Result<u64, BenchError> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ctx("queue.declare (passive)")?;
    Ok(u64::from(declared.message_count()))
}

/// Reads `current()` every [`POLL`] until it reaches `target`, mirroring it into
/// `counter` for the progress line; fails once it has not moved for [`STALL_LIMIT`].
pub(crate) async fn wait_for(
    what: &str,
    target: u64,
    counter: &AtomicU64,
    mut current: impl FnMut() -> u64,
) -> Result<(), BenchError> {
    let mut last = 0;
    let mut moved = Instant::now();
    loop {
        let now = current();
        counter.store(now, Ordering::Relaxed);
        if now >= target {
            return Ok(());
        }
        if now != last {
            last = now;
            moved = Instant::now();
        } else if moved.elapsed() >= STALL_LIMIT {
            return Err(BenchError::Check(format!(
                "stalled: {what} stayed at {now} of {target} for {} s",
                STALL_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Seconds, rounded to the millisecond, for reports.
pub(crate) fn secs(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_sqlite_from_postgres_and_hides_credentials() {
        let pg = Db::parse("postgres://bench:secret@127.0.0.1:5433/postgres?sslmode=disable")
            .expect("valid");
        assert_eq!(pg.kind(), "postgres");
        assert_eq!(pg.location(), "127.0.0.1:5433/postgres");
        let lite = Db::parse("/tmp/bench.db").expect("valid");
        assert_eq!(lite.kind(), "sqlite");
        assert_eq!(lite.location(), "/tmp/bench.db");
        assert!(Db::parse("").is_err());
    }
}
