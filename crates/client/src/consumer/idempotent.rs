//! [`IdempotentConsumer`]: runs the handler's effect and records the message id in the
//! **same database transaction**, so a redelivered message is acknowledged without
//! running the effect again ("消息重复消费": a unique constraint on the processed-message
//! table, `holdfast_processed (consumer, message_id)`).
//!
//! Per delivery: `BEGIN`; insert `(consumer, message_id)` — if it is already there,
//! roll back and acknowledge (a duplicate); otherwise hand the open transaction to the
//! handler, which does its writes and returns [`TxOutcome::Commit`]; commit; then
//! acknowledge. A crash before the commit undoes both the effect and the record (the
//! message is redelivered and processed once); a crash after the commit but before the
//! acknowledgement leaves the record, so the redelivery is recognised. On PostgreSQL a
//! concurrent duplicate waits on the first one's row lock and then sees it; on SQLite
//! writers are serialised.
//!
//! Messages without a `message-id` cannot be recognised and are rejected to the
//! dead-letter queue (the SDK's producer and outbox always set one).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::{Pool, Transaction};

use super::{Consumer, ConsumerConfig, ConsumerHandle, ConsumerStats, Delivery, Handler, Outcome};
use crate::Error;
use crate::outbox::{millis, now_ms};
use crate::sql::Backend;

/// What an idempotent handler decided.
pub enum TxOutcome<DB: sqlx::Database> {
    /// Commit the handler's writes with the processed-message record, then acknowledge.
    Commit(Transaction<'static, DB>),
    /// Roll back; try again after the policy's delay.
    Retry,
    /// Roll back; try again after this delay.
    RetryAfter(Duration),
    /// Roll back; dead-letter the message.
    Reject(String),
}

impl<DB: sqlx::Database> std::fmt::Debug for TxOutcome<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxOutcome::Commit(_) => f.write_str("Commit"),
            TxOutcome::Retry => f.write_str("Retry"),
            TxOutcome::RetryAfter(d) => write!(f, "RetryAfter({d:?})"),
            TxOutcome::Reject(r) => write!(f, "Reject({r:?})"),
        }
    }
}

/// Processes a delivery inside a transaction. Implemented for every
/// `Fn(Delivery, Transaction<'static, DB>) -> impl Future<Output = TxOutcome<DB>>`.
pub trait TxHandler<DB: Backend>: Send + Sync + 'static {
    /// Does the effect with `tx` and returns it in [`TxOutcome::Commit`] to commit.
    fn handle(
        &self,
        delivery: Delivery,
        tx: Transaction<'static, DB>,
    ) -> impl Future<Output = TxOutcome<DB>> + Send;
}

impl<DB, F, Fut> TxHandler<DB> for F
where
    DB: Backend,
    F: Fn(Delivery, Transaction<'static, DB>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TxOutcome<DB>> + Send,
{
    fn handle(
        &self,
        delivery: Delivery,
        tx: Transaction<'static, DB>,
    ) -> impl Future<Output = TxOutcome<DB>> + Send {
        self(delivery, tx)
    }
}

/// A consumer whose effects happen exactly once per message id, in `pool`'s database.
#[derive(Debug)]
pub struct IdempotentConsumer<DB: Backend> {
    pool: Pool<DB>,
    name: String,
}

impl<DB: Backend> IdempotentConsumer<DB> {
    /// Records processed messages under `name` (one name per logical consumer: two
    /// services consuming the same message each process it once).
    #[must_use]
    pub fn new(pool: Pool<DB>, name: impl Into<String>) -> Self {
        IdempotentConsumer {
            pool,
            name: name.into(),
        }
    }

    /// Creates the `holdfast_processed` table if it does not exist.
    ///
    /// # Errors
    /// [`ErrorKind::Database`](crate::ErrorKind::Database).
    pub async fn migrate(&self) -> Result<(), Error> {
        DB::processed_migrate(&self.pool).await.map_err(Error::from)
    }

    /// Forgets message ids processed more than `older_than` ago (keep it longer than
    /// any redelivery or replay can take). Returns how many.
    ///
    /// # Errors
    /// [`ErrorKind::Database`](crate::ErrorKind::Database).
    pub async fn purge(&self, older_than: Duration) -> Result<u64, Error> {
        DB::processed_purge(&self.pool, &self.name, now_ms() - millis(older_than))
            .await
            .map_err(Error::from)
    }

    /// Starts consuming with `handler`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when there is no URL.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn start<H: TxHandler<DB>>(
        &self,
        config: ConsumerConfig,
        handler: H,
    ) -> Result<ConsumerHandle, Error> {
        let stats = Arc::new(ConsumerStats::default());
        let wrapped = Idempotent {
            pool: self.pool.clone(),
            name: self.name.clone(),
            handler,
            stats: Arc::clone(&stats),
        };
        Consumer::start_with_stats(config, wrapped, stats)
    }
}

struct Idempotent<DB: Backend, H> {
    pool: Pool<DB>,
    name: String,
    handler: H,
    stats: Arc<ConsumerStats>,
}

impl<DB: Backend, H: TxHandler<DB>> Handler for Idempotent<DB, H> {
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let Some(message_id) = delivery.message_id.clone() else {
            return Outcome::Reject("no message-id: cannot process idempotently".into());
        };
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::warn!(message_id, error = %e, "cannot begin a transaction");
                return Outcome::Retry;
            }
        };
        match DB::processed_insert(&mut *tx, &self.name, &message_id, now_ms()).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = tx.rollback().await;
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(message_id, "already processed; acknowledging");
                return Outcome::Ack;
            }
            Err(e) => {
                tracing::warn!(message_id, error = %e, "cannot record the message id");
                return Outcome::Retry;
            }
        }
        match self.handler.handle(delivery, tx).await {
            TxOutcome::Commit(tx) => match tx.commit().await {
                Ok(()) => Outcome::Ack,
                Err(e) => {
                    tracing::warn!(message_id, error = %e, "commit failed; retrying");
                    Outcome::Retry
                }
            },
            TxOutcome::Retry => Outcome::Retry,
            TxOutcome::RetryAfter(d) => Outcome::RetryAfter(d),
            TxOutcome::Reject(reason) => Outcome::Reject(reason),
        }
    }
}
