//! Creates orders at a steady rate; each order row and its "order created" message are
//! committed together (the outbox), and a relay publishes the messages.
//!
//! ```text
//! order-service --amqp amqp://guest:guest@127.0.0.1:5672/%2f --database orders.db --orders 1000
//! ```
//!
//! Restartable at any point (also after `kill -9`): it continues numbering from the
//! orders already committed, and the relay picks up whatever was not confirmed. Exits 0
//! once `--orders` orders exist and every outbox row is sent.

use std::time::Duration;

use clap::Parser;
use holdfast_client::outbox::RelayConfig;
use holdfast_client::sqlx::{self, Database, Pool};
use holdfast_client::{Backend, Message, Outbox, Producer, ProducerConfig, RetryPolicy};
use holdfast_example_orders::{EXCHANGE, ORDER_CREATED, declare_topology_any, init_logging};

#[derive(Debug, Parser)]
struct Args {
    /// Broker URLs, tried in order (repeat the flag).
    #[arg(long = "amqp", required = true)]
    urls: Vec<String>,
    /// The orders database: a SQLite path or a postgres:// URL.
    #[arg(long)]
    database: String,
    /// Stop creating orders when this many exist.
    #[arg(long, default_value_t = 1000)]
    orders: i64,
    /// Orders created per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    declare_topology_any(&args.urls).await;
    if args.database.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
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
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await?;
    // The relay does its own retrying (attempts, backoff, `failed`); one attempt per send.
    let producer = Producer::connect(
        ProducerConfig::with_urls(args.urls.clone())
            .confirm_timeout(Duration::from_secs(5))
            .retry(RetryPolicy::no_retry()),
    )
    .await?;
    let relay = outbox
        .relay(
            producer,
            RelayConfig {
                // Short, so that a killed relay's claims are taken over quickly.
                lease: Duration::from_secs(3),
                poll_interval: Duration::from_millis(100),
                max_attempts: 1000,
                backoff: RetryPolicy {
                    initial_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    ..RetryPolicy::default()
                },
                ..RelayConfig::default()
            },
        )
        .spawn();

    let (existing,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    let pause = Duration::from_secs(1) / args.rate.max(1);
    for n in existing..args.orders {
        let order_id = format!("order-{n}");
        let amount = 100 + n % 900;
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
            .bind(order_id.clone())
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        let body = serde_json::json!({ "order_id": order_id, "amount": amount }).to_string();
        outbox
            .enqueue(
                &mut tx,
                Message::new(EXCHANGE, ORDER_CREATED, body).content_type("application/json"),
            )
            .await?;
        tx.commit().await?;
        relay.wake();
        tokio::time::sleep(pause).await;
    }
    tracing::info!(
        orders = args.orders,
        "all orders created; waiting for the outbox to drain"
    );
    loop {
        let counts = outbox.counts().await?;
        if counts.pending == 0 {
            anyhow::ensure!(counts.failed == 0, "{} outbox rows failed", counts.failed);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.shutdown().await;
    println!("done: {} orders, outbox drained", args.orders);
    Ok(())
}
