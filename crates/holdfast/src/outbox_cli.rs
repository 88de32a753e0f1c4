//! `holdfast outbox list|stats|retry|discard`: the person's side of the transactional
//! outbox (rows the relay gave up on), against the application's own database.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use holdfast_client::outbox::{Outbox, OutboxStatus, StatusCounts, StoredMessage, connect_sqlite};
use holdfast_client::sqlx;

/// `holdfast outbox ...`
#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// The application's database: a SQLite path or `sqlite:` URL, or a
    /// `postgres://` URL.
    #[arg(long, env = "HOLDFAST_OUTBOX_DATABASE", global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// List rows, oldest first.
    List {
        /// Only rows in this status: pending, sent, failed, discarded.
        #[arg(long)]
        status: Option<OutboxStatus>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Count rows per status.
    Stats,
    /// Put failed (or discarded) rows back to pending with a fresh attempt count.
    Retry {
        /// Row ids (the `id` column of `list`).
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        ids: Vec<i64>,
        /// Every failed row.
        #[arg(long)]
        all_failed: bool,
    },
    /// Never publish these pending or failed rows.
    Discard {
        /// Row ids (the `id` column of `list`).
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

/// Runs an outbox command; the process exit code is 1 on any error, including ids
/// that were not in a state the command applies to.
///
/// # Errors
/// An unreachable database, an unknown URL scheme, or rows that did not change.
pub async fn run(args: OutboxArgs) -> anyhow::Result<()> {
    let database = args
        .database
        .context("no database: pass --database or set HOLDFAST_OUTBOX_DATABASE")?;
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            // sqlx retries refused connections until this passes; a person is waiting.
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(&database)
            .await
            .with_context(|| format!("cannot connect to {}", redact(&database)))?;
        execute(Outbox::new(pool), args.command).await
    } else if database.contains("://") {
        bail!(
            "unsupported database URL {}: use a SQLite path, sqlite:PATH or postgres://",
            redact(&database)
        )
    } else {
        if !database.starts_with("sqlite:") && !std::path::Path::new(&database).exists() {
            bail!("no SQLite database at {database}");
        }
        let pool = connect_sqlite(&database)
            .await
            .with_context(|| format!("cannot open {database}"))?;
        execute(Outbox::new(pool), args.command).await
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn execute<DB: holdfast_client::Backend>(
    outbox: Outbox<DB>,
    command: OutboxCommand,
) -> anyhow::Result<()> {
    match command {
        OutboxCommand::List {
            status,
            limit,
            json,
        } => {
            let rows = outbox.list(status, limit).await?;
            if json {
                for row in &rows {
                    println!("{}", row_json(row));
                }
            } else {
                print_table(&rows);
            }
        }
        OutboxCommand::Stats => {
            let StatusCounts {
                pending,
                sent,
                failed,
                discarded,
            } = outbox.counts().await?;
            println!("pending {pending}\nsent {sent}\nfailed {failed}\ndiscarded {discarded}");
        }
        OutboxCommand::Retry { ids, all_failed } => {
            if all_failed {
                let n = outbox.retry(None).await?;
                println!("{n} failed rows back to pending");
            } else {
                let n = outbox.retry(Some(&ids)).await?;
                println!("{n} of {} rows back to pending", ids.len());
                unchanged(n, &ids, "only failed or discarded rows can be retried")?;
            }
        }
        OutboxCommand::Discard { ids } => {
            let n = outbox.discard(&ids).await?;
            println!("{n} of {} rows discarded", ids.len());
            unchanged(n, &ids, "only pending or failed rows can be discarded")?;
        }
    }
    Ok(())
}

fn unchanged(changed: u64, ids: &[i64], why: &str) -> anyhow::Result<()> {
    if changed < ids.len() as u64 {
        bail!(
            "{} of the given rows were not changed ({why}; missing ids count too)",
            ids.len() as u64 - changed
        );
    }
    Ok(())
}

fn status_name(row: &StoredMessage) -> String {
    row.status()
        .map_or_else(|| format!("status-{}", row.status), |s| s.name().to_owned())
}

fn row_json(row: &StoredMessage) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "message_id": row.message_id,
        "status": status_name(row),
        "attempts": row.attempts,
        "exchange": row.exchange,
        "routing_key": row.routing_key,
        "body_bytes": row.body.len(),
        "created_at_ms": row.created_at,
        "next_attempt_at_ms": row.next_attempt_at,
        "sent_at_ms": row.sent_at,
        "last_error": row.last_error,
    })
}

fn print_table(rows: &[StoredMessage]) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    println!(
        "{:>8}  {:<9}  {:>8}  {:<36}  {:<24}  {:>10}  LAST ERROR",
        "ID", "STATUS", "ATTEMPTS", "MESSAGE ID", "EXCHANGE / ROUTING KEY", "AGE"
    );
    for row in rows {
        let target = format!("{}/{}", row.exchange, row.routing_key);
        let age = format!("{}s", (now - row.created_at).max(0) / 1000);
        let error: String = row
            .last_error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        println!(
            "{:>8}  {:<9}  {:>8}  {:<36}  {:<24}  {:>10}  {error}",
            row.id,
            status_name(row),
            row.attempts,
            row.message_id,
            target,
            age
        );
    }
    println!("({} rows)", rows.len());
}
