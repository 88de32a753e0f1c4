//! `holdfast bench`: a neutral AMQP 0-9-1 load generator.
//!
//! It drives a broker through lapin, a third-party client, so the same run can be pointed
//! at Holdfast, RabbitMQ or any other AMQP 0-9-1 broker by URL and the figures compared.
//! Six scenarios, one module each:
//!
//! - [`publish`]: N producers, fire-and-forget, publisher confirms with a window, or
//!   transactions of B publishes;
//! - [`consume`]: drain a (pre-filled) queue with N consumers, a prefetch, and acks every K
//!   deliveries or auto-ack;
//! - [`latency`]: end-to-end latency at a fixed, paced rate, from a timestamp in the body;
//! - [`fanout`]: one fanout exchange to N durable queues, publish rate and delivered rate;
//! - [`outbox`]: the SDK's transactional outbox on SQLite or PostgreSQL, enqueue
//!   transactions per second, then relay rate;
//! - [`idempotent`]: the SDK's idempotent consumer on SQLite or PostgreSQL, messages
//!   processed (effect, processed-id record, commit, ack) per second.
//!
//! The last two go through `holdfast-client` rather than bare lapin: they measure the SDK.
//!
//! Every run prints a human-readable summary, then exactly one line of JSON
//! ([`report::Report`]) on stdout, and a progress line once per second on stderr.

pub mod args;
mod common;
pub mod consume;
mod error;
pub mod fanout;
pub mod idempotent;
pub mod latency;
pub mod outbox;
pub mod publish;
pub mod report;
mod sdk;

pub use args::{BenchArgs, Scenario};
pub use error::BenchError;
pub use report::Report;

/// Runs the scenario chosen in `args`, prints its summary and JSON line on stdout, and
/// returns the report.
///
/// # Errors
/// A bad URL, a failed connection, a broker error, or a run that could not complete.
pub async fn run(args: BenchArgs) -> Result<Report, BenchError> {
    let report = match args.scenario {
        Scenario::Publish(a) => publish::run(a).await?,
        Scenario::Consume(a) => consume::run(a).await?,
        Scenario::Latency(a) => latency::run(a).await?,
        Scenario::Fanout(a) => fanout::run(a).await?,
        Scenario::Outbox(a) => outbox::run(a).await?,
        Scenario::Idempotent(a) => idempotent::run(a).await?,
    };
    report.print()?;
    Ok(report)
}
