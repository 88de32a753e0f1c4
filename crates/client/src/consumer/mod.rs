//! [`Consumer`]: manual acknowledgement after the handler, retries through delay
//! queues, rejects to the dead-letter queue, graceful shutdown.
//!
//! The handler returns an [`Outcome`]:
//! - [`Outcome::Ack`]: done; the message is acknowledged.
//! - [`Outcome::Retry`] / [`Outcome::RetryAfter`]: try again later. The consumer
//!   publishes a copy (same message id, attempt header + 1) to a delay queue
//!   `<queue>.retry.<ms>` whose TTL dead-letters it back to `<queue>`, waits for the
//!   broker's confirm, then acknowledges the original. A crash between the two leaves
//!   both: the retry and the redelivered original carry the same message id, which the
//!   [idempotent consumer](IdempotentConsumer) absorbs. Delay queues work on any broker
//!   (RabbitMQ included); each distinct delay is one queue, so keep delays to a few
//!   steps (the default policy doubles from 1 s to 60 s).
//! - [`Outcome::Reject`], or a retry beyond [`ConsumerConfig::max_attempts`]: the
//!   message is rejected without requeue, and the queue's dead-letter exchange moves it
//!   to `<queue>.dlq` with its `x-death` history (see [`declare_topology`] and
//!   [`replay_dead_letters`]).
//!
//! A handler that panics counts as [`Outcome::Retry`]. Up to `concurrency` handlers run
//! at once; the broker sends at most `prefetch` unacknowledged messages. After a lost
//! connection the consumer reconnects to the next URL and consumes again; messages whose
//! acknowledgement was lost are redelivered by the broker (at least once).

mod dead_letter;
mod idempotent;
mod redis_store;
mod topology;

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use dead_letter::{ReplayReport, replay_dead_letters};
pub use idempotent::{IdempotentConsumer, TxHandler, TxOutcome};
pub use redis_store::RedisIdempotentConsumer;
pub use topology::{dead_letter_queue, declare_topology, retry_queue};

use crate::{Error, ErrorKind, RetryPolicy};

/// The header carrying the attempt number (1 for the first delivery).
pub const ATTEMPT_HEADER: &str = "x-holdfast-attempt";

/// What the handler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: acknowledge.
    Ack,
    /// Failed, try again after the policy's delay for this attempt.
    Retry,
    /// Failed, try again after this delay.
    RetryAfter(Duration),
    /// Never processable: dead-letter it now. The reason is logged.
    Reject(String),
}

/// A message handed to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The `message-id` property, when the publisher set one.
    pub message_id: Option<String>,
    /// The body.
    pub body: Bytes,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// 1 for the first attempt, 2 after one retry, ...
    pub attempt: u32,
    /// All properties, headers included.
    pub properties: BasicProperties,
}

impl Delivery {
    /// Takes the body without copying it; the acker goes to whoever settles.
    fn from_lapin(delivery: lapin::message::Delivery) -> (Self, lapin::Acker) {
        let lapin::message::Delivery {
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let attempt = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(&ShortString::from(ATTEMPT_HEADER)))
            .and_then(amqp_u32)
            .unwrap_or(1)
            .max(1);
        let message = Delivery {
            message_id: properties.message_id().as_ref().map(ToString::to_string),
            body: Bytes::from(data),
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            redelivered,
            attempt,
            properties,
        };
        (message, acker)
    }
}

fn amqp_u32(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::ShortShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u32::from(*v)),
        AMQPValue::ShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u32::from(*v)),
        AMQPValue::LongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(*v),
        AMQPValue::LongLongInt(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

/// Processes deliveries. Implemented for every `Fn(Delivery) -> impl Future<Output =
/// Outcome>`.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Outcome> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Outcome> + Send {
        self(delivery)
    }
}

/// How a [`Consumer`] consumes.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// AMQP URLs, tried in order; after a lost connection the next one.
    pub urls: Vec<String>,
    /// The queue to consume.
    pub queue: String,
    /// Unacknowledged messages the broker may send ahead (`basic.qos`).
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Attempts before a failing message goes to the dead-letter queue.
    pub max_attempts: u32,
    /// The delay before retry `n` is `retry_delay.cap(n)` (no jitter: each distinct delay
    /// is a queue).
    pub retry_delay: RetryPolicy,
    /// Declare the queue, its dead-letter queue and the delay queues on connect (see
    /// [`declare_topology`]). Turn off when the queue is declared elsewhere with other
    /// arguments; retries still declare their delay queues.
    pub declare: bool,
    /// Extra arguments for the queue when `declare` is on (e.g. `x-queue-type`).
    pub queue_arguments: FieldTable,
    /// The wait between reconnection attempts.
    pub reconnect_delay: Duration,
}

impl ConsumerConfig {
    /// Consume `queue` from `url` with the defaults: prefetch 64, 8 handlers, 5
    /// attempts, delays 1 s, 2 s, 4 s, ... up to 60 s, topology declared.
    #[must_use]
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self::with_urls([url.into()], queue)
    }

    /// Several URLs, tried in order.
    #[must_use]
    pub fn with_urls(urls: impl IntoIterator<Item = String>, queue: impl Into<String>) -> Self {
        ConsumerConfig {
            urls: urls.into_iter().collect(),
            queue: queue.into(),
            prefetch: 64,
            concurrency: 8,
            max_attempts: 5,
            retry_delay: RetryPolicy {
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
                multiplier: 2.0,
                full_jitter: false,
                ..RetryPolicy::default()
            },
            declare: true,
            queue_arguments: FieldTable::default(),
            reconnect_delay: Duration::from_millis(500),
        }
    }

    /// Replaces prefetch and concurrency.
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16, concurrency: usize) -> Self {
        self.prefetch = prefetch;
        self.concurrency = concurrency.max(1);
        self
    }

    /// Replaces the attempt limit.
    #[must_use]
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Replaces the retry delays.
    #[must_use]
    pub fn retry_delay(mut self, retry_delay: RetryPolicy) -> Self {
        self.retry_delay = retry_delay;
        self
    }
}

/// Counters of one consumer since it started.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages acknowledged after the handler succeeded.
    pub acked: AtomicU64,
    /// Messages sent to a delay queue for another attempt.
    pub retried: AtomicU64,
    /// Messages rejected to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Redeliveries the idempotent consumer recognised and acknowledged unprocessed.
    pub duplicates: AtomicU64,
    /// Handlers that panicked.
    pub panics: AtomicU64,
    /// Connections (re)established.
    pub connections: AtomicU64,
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    stats: Arc<ConsumerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsumerHandle {
    /// The consumer's counters.
    #[must_use]
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Stops taking messages (`basic.cancel`), waits for the running handlers to finish
    /// and acknowledge, then closes the connection; prefetched messages not yet started
    /// go back to the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Consumes a queue with a [`Handler`].
pub struct Consumer;

impl Consumer {
    /// Starts consuming on a task (connecting in the background, retrying until it
    /// succeeds or the handle is shut down).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when there is no URL.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn start<H: Handler>(config: ConsumerConfig, handler: H) -> Result<ConsumerHandle, Error> {
        Self::start_with_stats(config, handler, Arc::default())
    }

    pub(crate) fn start_with_stats<H: Handler>(
        config: ConsumerConfig,
        handler: H,
        stats: Arc<ConsumerStats>,
    ) -> Result<ConsumerHandle, Error> {
        if config.urls.is_empty() {
            return Err(Error::new(ErrorKind::Config("no broker URL".into())));
        }
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            handler,
            stats: Arc::clone(&stats),
            declared_delays: Mutex::default(),
        });
        let task = tokio::spawn(run(shared, stop_rx));
        Ok(ConsumerHandle { stop, stats, task })
    }
}

struct Shared<H> {
    config: ConsumerConfig,
    handler: H,
    stats: Arc<ConsumerStats>,
    /// Delay queues declared on the current connection.
    declared_delays: Mutex<HashSet<u64>>,
}

/// Connects, consumes until the connection is lost or a stop is asked, repeats.
async fn run<H: Handler>(shared: Arc<Shared<H>>, mut stop: watch::Receiver<bool>) {
    let mut url_index = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let url = &shared.config.urls[url_index % shared.config.urls.len()];
        url_index += 1;
        match consume_one_connection(&shared, url, &mut stop).await {
            Ok(Finished::Stopped) => return,
            Ok(Finished::Lost) => {
                tracing::warn!(queue = %shared.config.queue, "consumer connection lost; reconnecting")
            }
            Err(e) => {
                tracing::warn!(queue = %shared.config.queue, error = %e, "consumer cannot connect; retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(shared.config.reconnect_delay) => {}
            _ = stop.changed() => return,
        }
    }
}

enum Finished {
    Stopped,
    Lost,
}

/// The channels one connection's handlers use.
struct Link {
    consume: Channel,
    /// In confirm mode, for copies sent to delay queues.
    publish: Channel,
}

async fn consume_one_connection<H: Handler>(
    shared: &Arc<Shared<H>>,
    url: &str,
    stop: &mut watch::Receiver<bool>,
) -> Result<Finished, Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let result = consume_on(shared, &connection, stop).await;
    let _ = connection
        .close(200, ShortString::from("consumer stopped"))
        .await;
    result
}

async fn consume_on<H: Handler>(
    shared: &Arc<Shared<H>>,
    connection: &Connection,
    stop: &mut watch::Receiver<bool>,
) -> Result<Finished, Error> {
    let config = &shared.config;
    let consume = connection.create_channel().await?;
    if config.declare {
        declare_topology(&consume, &config.queue, config.queue_arguments.clone()).await?;
    }
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    consume
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            config.queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let tag = deliveries.tag();
    lock(&shared.declared_delays).clear();
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    tracing::info!(queue = %config.queue, "consuming");
    let link = Arc::new(Link { consume, publish });
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut running = JoinSet::new();
    let finished = loop {
        // A free handler slot first, then a delivery, each abandoned on a stop: a
        // delivery taken but not started stays unacknowledged and returns to the queue
        // when the channel closes.
        let permit = tokio::select! {
            _ = stop.changed() => break Finished::Stopped,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Finished::Lost,
            },
        };
        let delivery = tokio::select! {
            _ = stop.changed() => break Finished::Stopped,
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => delivery,
                _ => break Finished::Lost,
            },
        };
        let shared = Arc::clone(shared);
        let link = Arc::clone(&link);
        running.spawn(async move {
            process(&shared, &link, delivery).await;
            drop(permit);
        });
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
    };
    if matches!(finished, Finished::Stopped) {
        let _ = link
            .consume
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
    }
    // Let the running handlers finish and acknowledge (on a lost connection their
    // acknowledgements fail and the broker redelivers).
    while running.join_next().await.is_some() {}
    Ok(finished)
}

async fn process<H: Handler>(shared: &Shared<H>, link: &Link, delivery: lapin::message::Delivery) {
    let (message, acker) = Delivery::from_lapin(delivery);
    let attempt = message.attempt;
    let message_id = message.message_id.clone().unwrap_or_default();
    // Kept for a retry copy (the body is shared, not copied).
    let body = message.body.clone();
    let properties = message.properties.clone();
    let outcome = match AssertUnwindSafe(shared.handler.handle(message))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            shared.stats.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(message_id, attempt, "handler panicked; retrying");
            Outcome::Retry
        }
    };
    let config = &shared.config;
    let result = match outcome {
        Outcome::Ack => acker.ack(BasicAckOptions::default()).await.map(|_| {
            shared.stats.acked.fetch_add(1, Ordering::Relaxed);
        }),
        Outcome::Retry | Outcome::RetryAfter(_) if attempt >= config.max_attempts => {
            tracing::warn!(message_id, attempt, "attempts exhausted; dead-lettering");
            dead_letter(shared, &acker).await
        }
        Outcome::Retry | Outcome::RetryAfter(_) => {
            let delay = match outcome {
                Outcome::RetryAfter(delay) => delay,
                _ => config.retry_delay.cap(attempt),
            };
            retry(shared, link, &acker, &body, properties, attempt, delay).await
        }
        Outcome::Reject(reason) => {
            tracing::warn!(
                message_id,
                attempt,
                reason,
                "handler rejected; dead-lettering"
            );
            dead_letter(shared, &acker).await
        }
    };
    if let Err(e) = result {
        // The channel is gone: the broker redelivers the message to the next consumer.
        tracing::debug!(message_id, error = %e, "settling failed; the broker will redeliver");
    }
}

async fn dead_letter<H>(shared: &Shared<H>, acker: &lapin::Acker) -> Result<(), lapin::Error> {
    acker.reject(BasicRejectOptions { requeue: false }).await?;
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Publishes a copy to the delay queue, then acknowledges the original; if the copy is
/// not confirmed the original is requeued instead, so the message is never lost.
async fn retry<H>(
    shared: &Shared<H>,
    link: &Link,
    acker: &lapin::Acker,
    body: &[u8],
    properties: BasicProperties,
    attempt: u32,
    delay: Duration,
) -> Result<(), lapin::Error> {
    let queue = &shared.config.queue;
    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let delay_queue = retry_queue(queue, delay_ms);
    let needs_declare = !lock(&shared.declared_delays).contains(&delay_ms);
    if needs_declare {
        topology::declare_retry_queue(&link.publish, queue, delay_ms).await?;
        lock(&shared.declared_delays).insert(delay_ms);
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt + 1));
    let confirm = link
        .publish
        .basic_publish(
            ShortString::from(""),
            delay_queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties.with_headers(headers),
        )
        .await?
        .await?;
    if matches!(confirm, lapin::Confirmation::Ack(None)) {
        acker.ack(BasicAckOptions::default()).await?;
        shared.stats.retried.fetch_add(1, Ordering::Relaxed);
    } else {
        tracing::warn!(
            delay_queue,
            "delay queue refused the retry copy; requeueing"
        );
        acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
