//! Charges each created order exactly once: the payment row and the processed-message
//! record commit together, so redeliveries (after a crash, a lost ack, a relay re-send)
//! are acknowledged without charging again.
//!
//! ```text
//! payment-service --amqp amqp://guest:guest@127.0.0.1:5672/%2f --database postgres://127.0.0.1/payments
//! ```
//!
//! Runs until SIGTERM/SIGINT, then finishes the payments in progress. Prints its counters
//! as a `stats ...` line every 200 ms.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use holdfast_client::consumer::ConsumerConfig;
use holdfast_client::sqlx::{self, Database, Pool, Transaction};
use holdfast_client::{Backend, Delivery, IdempotentConsumer, TxOutcome};
use holdfast_example_orders::{PAYMENT_QUEUE, declare_topology_any, init_logging};

#[derive(Debug, Parser)]
struct Args {
    /// Broker URLs, tried in order (repeat the flag).
    #[arg(long = "amqp", required = true)]
    urls: Vec<String>,
    /// The payments database: a SQLite path or a postgres:// URL.
    #[arg(long)]
    database: String,
    /// Payments processed at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    declare_topology_any(&args.urls).await;
    if args.database.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(args.concurrency).unwrap_or(8) + 2)
            .connect(&args.database)
            .await?;
        run(pool, &args).await
    } else {
        let pool = holdfast_client::outbox::connect_sqlite(&args.database).await?;
        run(pool, &args).await
    }
}

async fn run<DB: Backend>(pool: Pool<DB>, args: &Args) -> anyhow::Result<()>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
{
    // No unique constraint on order_id on purpose: a double charge must be visible.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (order_id TEXT NOT NULL, amount BIGINT NOT NULL, \
         message_id TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let consumer = IdempotentConsumer::new(pool, "payment-service");
    consumer.migrate().await?;
    let config =
        ConsumerConfig::with_urls(args.urls.clone(), PAYMENT_QUEUE).prefetch(64, args.concurrency);
    let handle = consumer.start(config, charge::<DB>)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let stats = handle.stats();
        println!(
            "stats acked={} duplicates={} retried={} dead_lettered={} connections={}",
            stats.acked.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
            stats.dead_lettered.load(Ordering::Relaxed),
            stats.connections.load(Ordering::Relaxed),
        );
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    handle.shutdown().await;
    Ok(())
}

async fn charge<DB: Backend>(delivery: Delivery, mut tx: Transaction<'static, DB>) -> TxOutcome<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
{
    let order: serde_json::Value = match serde_json::from_slice(&delivery.body) {
        Ok(v) => v,
        Err(e) => return TxOutcome::Reject(format!("not an order: {e}")),
    };
    let (Some(order_id), Some(amount)) = (order["order_id"].as_str(), order["amount"].as_i64())
    else {
        return TxOutcome::Reject("order without order_id or amount".into());
    };
    let charged =
        sqlx::query("INSERT INTO payments (order_id, amount, message_id) VALUES ($1, $2, $3)")
            .bind(order_id.to_owned())
            .bind(amount)
            .bind(delivery.message_id.clone().unwrap_or_default())
            .execute(&mut *tx)
            .await;
    match charged {
        Ok(_) => TxOutcome::Commit(tx),
        Err(e) => {
            tracing::warn!(order_id, error = %e, "charge failed; retrying");
            TxOutcome::Retry
        }
    }
}
