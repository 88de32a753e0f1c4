//! The seed article's scenario, end to end on the Holdfast SDK.
//!
//! - `order-service` creates orders: each order row and its "order created" message are
//!   written in **one** database transaction (the outbox); a relay in the same process
//!   publishes the messages with confirms and marks them sent.
//! - `payment-service` consumes "order created" and charges the order: the payment row
//!   and the processed-message record are written in **one** transaction (the idempotent
//!   consumer), so a redelivered message never charges twice.
//!
//! Both take a list of broker URLs (failover), and a database URL: a SQLite path or a
//! `postgres://` URL. The fault-injection test in `tests/` kills all three processes
//! at random and counts the charges.

use std::time::Duration;

use holdfast_client::lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use holdfast_client::lapin::types::FieldTable;
use holdfast_client::lapin::{Connection, ConnectionProperties, ExchangeKind};

/// The exchange orders are announced on.
pub const EXCHANGE: &str = "orders";
/// The routing key of "order created".
pub const ORDER_CREATED: &str = "order.created";
/// The payment service's queue.
pub const PAYMENT_QUEUE: &str = "payment.order-created";

/// Declares the exchange, the payment queue (with its dead-letter queue) and the
/// binding; safe to run from both services at every start.
///
/// # Errors
/// The broker is unreachable or refuses a declaration.
pub async fn declare_topology(url: &str) -> anyhow::Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    holdfast_client::consumer::declare_topology(&channel, PAYMENT_QUEUE, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            PAYMENT_QUEUE.into(),
            EXCHANGE.into(),
            ORDER_CREATED.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

/// Declares the topology on the first URL that answers, retrying until one does.
pub async fn declare_topology_any(urls: &[String]) {
    loop {
        for url in urls {
            match declare_topology(url).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "cannot declare the topology yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Logs to stderr, `HOLDFAST_LOG` or `info`.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
}
