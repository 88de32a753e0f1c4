//! Command-line arguments of `holdfast bench` (clap derive), shared by the binary.

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::error::BenchError;

/// The default broker: RabbitMQ's and Holdfast's default port, guest, vhost `/`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long a run lasts when neither `--duration` nor `--messages` is given.
pub const DEFAULT_DURATION_SECS: f64 = 10.0;

/// `holdfast bench <scenario>`.
#[derive(Debug, Clone, Args)]
#[command(
    about = "Load-test any AMQP 0-9-1 broker (Holdfast, RabbitMQ, ...) by URL",
    long_about = "Load-test any AMQP 0-9-1 broker by URL, through lapin (a neutral client).\n\
                  Prints a summary, then one line of JSON, on stdout; progress on stderr."
)]
pub struct BenchArgs {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Publish rate: N producers, fire-and-forget, confirms with a window, or tx batches.
    Publish(PublishArgs),
    /// Drain rate of a (pre-filled) queue: N consumers, prefetch, ack every K or auto-ack.
    Consume(ConsumeArgs),
    /// End-to-end latency at a fixed, paced publish rate (timestamp in the body).
    Latency(LatencyArgs),
    /// One fanout exchange bound to N queues: publish rate and delivered rate.
    Fanout(FanoutArgs),
    /// The SDK's transactional outbox: enqueue transactions per second, then relay rate.
    Outbox(OutboxArgs),
    /// The SDK's idempotent consumer: messages processed (effect + record + ack) per second.
    Idempotent(IdempotentArgs),
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Broker URL (amqp:// or amqps://; vhost `/` is `%2f`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Run for this many seconds (default 10, unless a message count is given).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Stop after this many messages in total (published, consumed or received).
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,
    /// Message body size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub size: usize,
    /// Queue name (default: a unique `holdfast-bench-...` name).
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// Persistent messages (delivery mode 2) in durable queues: the default.
    #[arg(long, overrides_with = "transient")]
    pub persistent: bool,
    /// Transient messages (delivery mode 1) in non-durable queues.
    #[arg(long, overrides_with = "persistent")]
    pub transient: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Keep the queues and exchanges declared by the run instead of deleting them.
    #[arg(long)]
    pub keep: bool,
    /// Frames handed to lapin before waiting until it wrote them (publishes, acks). 1
    /// awaits each in turn, as most applications do; a larger value lets lapin's I/O loop
    /// write several at once, which costs the client far less CPU per message.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub pipeline: usize,
}

impl CommonArgs {
    /// Persistent messages and durable queues, unless `--transient` came last.
    #[must_use]
    pub fn is_persistent(&self) -> bool {
        !self.transient
    }

    /// The time limit: `--duration`, or the default when `--messages` is not given either.
    ///
    /// # Errors
    /// A duration that is not a positive number of seconds, or `--messages 0`.
    pub fn time_limit(&self) -> Result<Option<Duration>, BenchError> {
        if self.messages == Some(0) {
            return Err(BenchError::InvalidArgs(
                "--messages must be at least 1".into(),
            ));
        }
        match (self.duration, self.messages) {
            (Some(secs), _) => positive_secs(secs).map(Some),
            (None, Some(_)) => Ok(None),
            (None, None) => positive_secs(DEFAULT_DURATION_SECS).map(Some),
        }
    }
}

fn positive_secs(secs: f64) -> Result<Duration, BenchError> {
    if secs.is_finite() && secs > 0.0 && secs < 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(BenchError::InvalidArgs(format!(
            "--duration must be a positive number of seconds, not {secs}"
        )))
    }
}

/// `holdfast bench publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of producers, each with its own connection and channel.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Use publisher confirms (confirm.select) and measure confirm latency.
    #[arg(long, conflicts_with = "tx_batch")]
    pub confirm: bool,
    /// With --confirm: at most this many unconfirmed messages per producer.
    #[arg(long, value_name = "W", default_value_t = 256)]
    pub window: u32,
    /// Use transactions: publish B messages, then tx.commit.
    #[arg(long, value_name = "B")]
    pub tx_batch: Option<u32>,
}

/// `holdfast bench consume`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// First make sure the queue holds N messages (published with confirms); the run then
    /// drains N unless --messages says otherwise.
    #[arg(long, value_name = "N")]
    pub prefill: Option<u64>,
    /// Number of consumers, each with its own connection and channel.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// basic.qos prefetch count per consumer (0 = unlimited).
    #[arg(long, value_name = "P", default_value_t = 1000)]
    pub prefetch: u16,
    /// Ack with multiple=true every K deliveries.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 1,
        conflicts_with = "auto_ack"
    )]
    pub ack_every: u32,
    /// Consume with no-ack (auto-ack).
    #[arg(long)]
    pub auto_ack: bool,
}

/// `holdfast bench latency`.
#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Publish rate in messages per second, paced by absolute schedule.
    #[arg(long, value_name = "R", default_value_t = 1000.0)]
    pub rate: f64,
    /// basic.qos prefetch count of the consumer.
    #[arg(long, value_name = "P", default_value_t = 1000)]
    pub prefetch: u16,
}

/// `holdfast bench fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of queues bound to the fanout exchange (each gets every message).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub queues: u32,
    /// Number of producers (publisher confirms, each its own connection).
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// At most this many unconfirmed messages per producer.
    #[arg(long, value_name = "W", default_value_t = 256)]
    pub window: u32,
    /// basic.qos prefetch count per consumer (one consumer per queue).
    #[arg(long, value_name = "P", default_value_t = 1000)]
    pub prefetch: u16,
    /// Ack with multiple=true every K deliveries.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub ack_every: u32,
}

/// The default message count of the SDK scenarios.
pub const DEFAULT_SDK_MESSAGES: u64 = 20_000;

/// Options of the scenarios that drive the SDK (`holdfast-client`) with a database.
#[derive(Debug, Clone, Args)]
pub struct SdkArgs {
    /// Broker URL (amqp:// or amqps://; vhost `/` is `%2f`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// The application database: a SQLite file path (created if missing) or a
    /// postgres:// URL. Use a scratch database: the run creates and drops tables in it.
    #[arg(long, value_name = "DB")]
    pub database: String,
    /// Messages (and transactions) in the run.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SDK_MESSAGES)]
    pub messages: u64,
    /// Message body size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Queue name (default: a unique `holdfast-bench-...` name).
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Keep the queues and the bench tables instead of deleting them.
    #[arg(long)]
    pub keep: bool,
}

impl SdkArgs {
    /// Checks the options every SDK scenario shares.
    ///
    /// # Errors
    /// `--messages 0`.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.messages == 0 {
            return Err(BenchError::InvalidArgs(
                "--messages must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// `holdfast bench outbox`.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    #[command(flatten)]
    pub sdk: SdkArgs,
    /// Relays publishing the outbox at once, each with its own producer (connection).
    #[arg(long, value_name = "R", default_value_t = 1)]
    pub relays: u32,
    /// Rows a relay claims and publishes per pass.
    #[arg(long, value_name = "B", default_value_t = 256)]
    pub batch: usize,
    /// Application tasks enqueueing at once, each committing one transaction after
    /// the other.
    #[arg(long, value_name = "C", default_value_t = 4)]
    pub enqueue_concurrency: u32,
}

/// `holdfast bench idempotent`.
#[derive(Debug, Clone, Args)]
pub struct IdempotentArgs {
    #[command(flatten)]
    pub sdk: SdkArgs,
    /// basic.qos prefetch count of the consumer.
    #[arg(long, value_name = "P", default_value_t = 256)]
    pub prefetch: u16,
    /// Handlers (transactions) running at once.
    #[arg(long, value_name = "C", default_value_t = 16)]
    pub concurrency: usize,
}
