//! Holdfast SDK over [lapin], for Holdfast or any AMQP 0-9-1 broker (RabbitMQ included):
//! a reliable [`Producer`], a transactional [`outbox`] with its [`Relay`], and a
//! [`consumer`] with retries, dead-lettering and exactly-once effects
//! ([`IdempotentConsumer`]). The guide is `docs/sdk.md` in the repository.
//!
//! Three send modes, as in the RocketMQ vocabulary:
//! - [`Producer::send`] waits for the broker's publisher confirm; a nack, a return of a
//!   mandatory message, a timeout or a lost connection is an [`Error`].
//! - [`Producer::send_async`] returns a [`SendHandle`] at once (or calls a callback with
//!   [`Producer::send_with_callback`]); thousands may be in flight.
//! - [`Producer::send_oneway`] waits for nothing; the message **may be lost**.
//!
//! Every message carries a `message-id` (a UUIDv7 unless the caller set one). Retries
//! (exponential backoff with full jitter, bounded by attempts and a deadline, see
//! [`RetryPolicy`]) and re-sends after a reconnect reuse that id, so a queue declared with
//! `x-message-deduplication: true` or an idempotent consumer absorbs the duplicates that
//! at-least-once delivery implies. When the connection is lost the producer connects to
//! the next URL of its list and replays the exchanges, queues and bindings declared
//! through it.
//!
//! ```no_run
//! use holdfast_client::{Message, Producer, ProducerConfig, ErrorKind};
//! use holdfast_client::lapin::{options::QueueDeclareOptions, types::FieldTable};
//!
//! # async fn run() -> Result<(), holdfast_client::Error> {
//! let producer = Producer::connect(ProducerConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
//! producer
//!     .declare_queue("orders", QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
//!     .await?;
//! match producer.send(Message::to_queue("orders", "order 42 created")).await {
//!     Ok(confirmation) => println!("stored as {}", confirmation.message_id),
//!     Err(e) if matches!(e.kind(), ErrorKind::Returned { .. }) => eprintln!("unroutable: {e}"),
//!     Err(e) => eprintln!("not confirmed, hand it to the outbox: {e}"),
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
pub mod consumer;
mod error;
mod message;
pub mod outbox;
mod producer;
mod sql;

pub use config::{ProducerConfig, RetryPolicy};
pub use consumer::{
    Consumer, ConsumerConfig, ConsumerHandle, Delivery, IdempotentConsumer, Outcome, TxOutcome,
};
pub use error::{Error, ErrorKind};
pub use message::Message;
pub use outbox::{Outbox, Relay, RelayConfig};
pub use producer::{Confirmation, Producer, SendHandle};
pub use sql::Backend;

/// sqlx, for pools and transactions of the outbox and the idempotent consumer.
pub use sqlx;

/// The lapin crate, for its option and field-table types used in declarations.
pub use lapin;
