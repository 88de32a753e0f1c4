//! [`Relay`]: publishes pending outbox rows with confirms and records the outcome.
//!
//! One pass: claim up to `batch_size` due rows for `lease` (so other relays skip them),
//! publish them in order through [`Producer::send_all`] (confirms pipelined), then mark
//! each confirmed row sent and each failed row for a later attempt, or `failed` once
//! it has used `max_attempts`. A full batch starts the next pass at once; otherwise the
//! relay sleeps until `poll_interval` passes or [`RelayHandle::wake`] is called (e.g.
//! right after the application commits).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{Outbox, millis, now_ms};
use crate::sql::Backend;
use crate::{Error, Producer, RetryPolicy};

/// How a [`Relay`] works.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Written into `claimed_by`; must differ between relays sharing a database.
    /// Defaults to a UUIDv7.
    pub relay_id: String,
    /// Rows claimed and published per pass.
    pub batch_size: usize,
    /// The longest sleep between passes when there is nothing to do.
    pub poll_interval: Duration,
    /// How long a claim keeps other relays away. A relay that dies holding rows
    /// delays them by at most this; keep it well above the time a pass takes.
    pub lease: Duration,
    /// Publish attempts before a row is marked failed.
    pub max_attempts: u32,
    /// The wait before the next attempt of a row whose publish failed (the
    /// producer's own retries, if any, happen inside one attempt).
    pub backoff: RetryPolicy,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: uuid::Uuid::now_v7().to_string(),
            batch_size: 256,
            poll_interval: Duration::from_millis(250),
            lease: Duration::from_secs(60),
            max_attempts: 10,
            backoff: RetryPolicy {
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(300),
                ..RetryPolicy::default()
            },
        }
    }
}

/// Counters of one relay since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows confirmed by the broker and marked sent.
    pub sent: AtomicU64,
    /// Publish attempts that failed (each row may fail several times).
    pub failed_attempts: AtomicU64,
    /// Rows marked failed after their last attempt: each needs a person.
    pub gave_up: AtomicU64,
    /// Passes that could not reach the database.
    pub database_errors: AtomicU64,
}

/// Publishes one outbox's rows. Run it with [`spawn`](Self::spawn) or drive passes
/// yourself with [`run_once`](Self::run_once).
pub struct Relay<DB: Backend> {
    outbox: Outbox<DB>,
    producer: Producer,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    wake: Arc<Notify>,
}

impl<DB: Backend> Relay<DB> {
    pub(super) fn new(outbox: Outbox<DB>, producer: Producer, config: RelayConfig) -> Self {
        Relay {
            outbox,
            producer,
            config,
            stats: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// This relay's counters.
    #[must_use]
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// One pass; returns how many rows it claimed.
    ///
    /// # Errors
    /// [`ErrorKind::Database`](crate::ErrorKind::Database) when claiming or marking
    /// fails; rows already published are then re-sent after their lease (same ids).
    pub async fn run_once(&self) -> Result<usize, Error> {
        let now = now_ms();
        let limit = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let rows = DB::outbox_claim(
            self.outbox.pool(),
            &self.config.relay_id,
            now,
            now + millis(self.config.lease),
            limit,
        )
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(rows.len());
        let mut publishable = Vec::with_capacity(rows.len());
        for row in &rows {
            match row.to_message() {
                Ok(message) => {
                    batch.push(message);
                    publishable.push(row);
                }
                // An undecodable row can never be published: straight to failed.
                Err(e) => {
                    self.record_failure(row.id, &row.message_id, i64::from(u32::MAX), &e)
                        .await?;
                }
            }
        }
        let results = self.producer.send_all(batch).await;
        let mut confirmed = Vec::with_capacity(rows.len());
        for (row, result) in publishable.into_iter().zip(results) {
            match result {
                Ok(_) => confirmed.push(row.id),
                Err(e) => {
                    self.record_failure(row.id, &row.message_id, row.attempts + 1, &e)
                        .await?;
                }
            }
        }
        DB::outbox_mark_sent(self.outbox.pool(), &confirmed, now_ms()).await?;
        self.stats
            .sent
            .fetch_add(confirmed.len() as u64, Ordering::Relaxed);
        Ok(rows.len())
    }

    async fn record_failure(
        &self,
        id: i64,
        message_id: &str,
        attempts: i64,
        error: &Error,
    ) -> Result<(), Error> {
        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let give_up = attempts >= i64::from(self.config.max_attempts);
        let retry = u32::try_from(attempts).unwrap_or(u32::MAX);
        let next = now_ms() + millis(self.config.backoff.backoff(retry));
        DB::outbox_mark_failure(
            self.outbox.pool(),
            id,
            attempts,
            next,
            &error.to_string(),
            give_up,
        )
        .await?;
        if give_up {
            self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                outbox_id = id,
                message_id,
                attempts,
                error = %error,
                "outbox message failed for good and needs a person: \
                 `holdfast outbox list --status failed`, then `retry` or `discard`"
            );
        } else {
            tracing::warn!(outbox_id = id, message_id, attempts, error = %error, "outbox publish failed; will retry");
        }
        Ok(())
    }

    /// Runs passes on a task until [`RelayHandle::shutdown`].
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    #[must_use]
    pub fn spawn(self) -> RelayHandle {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let wake = Arc::clone(&self.wake);
        let stats = Arc::clone(&self.stats);
        let task = tokio::spawn(async move {
            loop {
                let full = match self.run_once().await {
                    Ok(n) => n >= self.config.batch_size,
                    Err(e) => {
                        self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "outbox relay pass failed");
                        false
                    }
                };
                if *stop_rx.borrow() {
                    break;
                }
                if full {
                    continue;
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop_rx.changed() => break,
                }
            }
        });
        RelayHandle {
            wake,
            stats,
            stop: stop_tx,
            task,
        }
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    wake: Arc<Notify>,
    stats: Arc<RelayStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Starts the next pass now instead of at the next poll (call it after committing
    /// a transaction that enqueued messages).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The relay's counters.
    #[must_use]
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Lets the current pass finish (its confirms awaited and recorded), then stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
        let _ = self.task.await;
    }
}
