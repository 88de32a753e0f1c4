//! [`RedisIdempotentConsumer`]: duplicate suppression with Redis `SET NX`, for handlers
//! whose effect is not in a SQL database (an HTTP call, an e-mail).
//!
//! **Weaker than [`IdempotentConsumer`](super::IdempotentConsumer).** The mark and the
//! effect are not one transaction:
//! - per delivery the consumer sets `holdfast:processed:<name>:<message id>` to
//!   `processing` with `SET NX PX <lease>`; if the key exists and says `done`, the
//!   message is a duplicate and is acknowledged; if it says `processing` (another
//!   consumer is on it, or one crashed mid-way), the message is retried after the lease;
//! - after the handler succeeds the key becomes `done` for `done_ttl`, then the message
//!   is acknowledged; after a failure the key is deleted so a retry can run.
//!
//! So: a crash after the effect but before the `done` mark repeats the effect once the
//! lease runs out (the effect should itself be idempotent or harmless to repeat); a
//! Redis restart without persistence, or a redelivery later than `done_ttl`, forgets
//! marks and lets a duplicate through. Use the SQL-backed consumer for payments.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use super::{Consumer, ConsumerConfig, ConsumerHandle, ConsumerStats, Delivery, Handler, Outcome};
use crate::{Error, ErrorKind};

/// A consumer that suppresses redeliveries with Redis (see the module documentation for
/// what it does not guarantee).
#[derive(Debug, Clone)]
pub struct RedisIdempotentConsumer {
    client: redis::Client,
    name: String,
    lease: Duration,
    done_ttl: Duration,
}

impl RedisIdempotentConsumer {
    /// Marks under `name` in the Redis at `url` (`redis://host:port/db`), with a 30 s
    /// lease and marks kept for 7 days.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a malformed URL.
    pub fn new(url: &str, name: impl Into<String>) -> Result<Self, Error> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::new(ErrorKind::Config(format!("redis URL: {e}"))))?;
        Ok(RedisIdempotentConsumer {
            client,
            name: name.into(),
            lease: Duration::from_secs(30),
            done_ttl: Duration::from_secs(7 * 24 * 3600),
        })
    }

    /// How long a `processing` mark blocks other attempts; longer than the handler
    /// ever takes.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a `done` mark is kept; longer than any redelivery or replay can take.
    #[must_use]
    pub fn done_ttl(mut self, done_ttl: Duration) -> Self {
        self.done_ttl = done_ttl;
        self
    }

    /// Starts consuming with `handler`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when there is no URL.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn start<H: Handler>(
        &self,
        config: ConsumerConfig,
        handler: H,
    ) -> Result<ConsumerHandle, Error> {
        let stats = Arc::new(ConsumerStats::default());
        let wrapped = RedisIdempotent {
            store: self.clone(),
            connection: OnceCell::new(),
            handler,
            stats: Arc::clone(&stats),
        };
        Consumer::start_with_stats(config, wrapped, stats)
    }
}

struct RedisIdempotent<H> {
    store: RedisIdempotentConsumer,
    /// Connected on first use; reconnects by itself after failures.
    connection: OnceCell<ConnectionManager>,
    handler: H,
    stats: Arc<ConsumerStats>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<H: Handler> RedisIdempotent<H> {
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.connection
            .get_or_try_init(|| ConnectionManager::new(self.store.client.clone()))
            .await
            .cloned()
    }

    /// Whether this delivery may run the effect.
    async fn claim(&self, key: &str) -> redis::RedisResult<Claim> {
        let mut conn = self.connection().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg("processing")
            .arg("NX")
            .arg("PX")
            .arg(millis(self.store.lease))
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(Claim::Run);
        }
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        Ok(match state.as_deref() {
            Some("done") => Claim::Done,
            // Vanished between SET and GET (expired): try again soon.
            None => Claim::Busy(Duration::from_millis(10)),
            Some(_) => Claim::Busy(self.store.lease),
        })
    }
}

enum Claim {
    Run,
    Done,
    Busy(Duration),
}

impl<H: Handler> Handler for RedisIdempotent<H> {
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let Some(message_id) = delivery.message_id.clone() else {
            return Outcome::Reject("no message-id: cannot process idempotently".into());
        };
        let key = format!("holdfast:processed:{}:{message_id}", self.store.name);
        match self.claim(&key).await {
            Ok(Claim::Run) => {}
            Ok(Claim::Done) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Outcome::Ack;
            }
            Ok(Claim::Busy(wait)) => return Outcome::RetryAfter(wait),
            Err(e) => {
                tracing::warn!(message_id, error = %e, "redis unavailable; retrying");
                return Outcome::Retry;
            }
        }
        let outcome = self.handler.handle(delivery).await;
        let result: redis::RedisResult<()> = async {
            let mut conn = self.connection().await?;
            if outcome == Outcome::Ack {
                redis::cmd("SET")
                    .arg(&key)
                    .arg("done")
                    .arg("PX")
                    .arg(millis(self.store.done_ttl))
                    .query_async(&mut conn)
                    .await
            } else {
                redis::cmd("DEL").arg(&key).query_async(&mut conn).await
            }
        }
        .await;
        if let Err(e) = result {
            // The effect happened (or not) regardless; the lease bounds the damage.
            tracing::warn!(message_id, error = %e, "cannot update the redis mark");
        }
        outcome
    }
}
