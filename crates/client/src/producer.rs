//! [`Producer`]: publishes with publisher confirms, retries with backoff, reconnects.
//!
//! Invariants:
//! - A send owns its [`Message`] until it resolves; every attempt publishes the same
//!   bytes with the same `message-id`. A confirm lost with a connection is therefore
//!   "re-tracked" by re-sending: broker-side deduplication or an idempotent consumer
//!   absorbs the copy.
//! - The current link (connection + channels) sits behind a `std::sync::Mutex` that is
//!   held only to clone or swap an `Arc`, never across an `.await`; thousands of sends
//!   share one confirm channel and wait on their own `PublisherConfirm` futures.
//! - Reconnection is serialised by an async mutex and keyed by a generation number, so
//!   the many sends that notice one lost connection cause one reconnect, not many.
//! - Declarations made through the producer are recorded only once they succeed and
//!   are replayed, in order, on every new connection before any publish.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;

use crate::{Error, ErrorKind, Message, ProducerConfig};

/// The outcome of a confirmed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    /// The message id the broker confirmed (generated or the caller's).
    pub message_id: String,
    /// Attempts it took, 1 when the first publish was confirmed.
    pub attempts: u32,
}

/// A declaration recorded for replay after a reconnect.
#[derive(Debug, Clone, PartialEq)]
enum Declaration {
    Exchange {
        name: String,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    },
    Queue {
        name: String,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    },
    Bind {
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    },
}

impl Declaration {
    async fn apply(&self, channel: &Channel) -> Result<(), lapin::Error> {
        match self {
            Declaration::Exchange {
                name,
                kind,
                options,
                arguments,
            } => {
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        kind.clone(),
                        *options,
                        arguments.clone(),
                    )
                    .await
            }
            Declaration::Queue {
                name,
                options,
                arguments,
            } => channel
                .queue_declare(name.as_str().into(), *options, arguments.clone())
                .await
                .map(|_| ()),
            Declaration::Bind {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        arguments.clone(),
                    )
                    .await
            }
        }
    }
}

/// One connection and its two publishing channels.
struct Link {
    /// Increases with every new connection; identifies the link a failure came from.
    generation: u64,
    connection: Connection,
    /// In confirm mode: every publish yields a confirm.
    confirm: Channel,
    /// Not in confirm mode, for `send_oneway`: no confirm bookkeeping at all.
    oneway: Channel,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
            && self.confirm.status().connected()
            && self.oneway.status().connected()
    }
}

struct Inner {
    config: ProducerConfig,
    current: Mutex<Option<Arc<Link>>>,
    /// Held while connecting, so that one lost connection leads to one reconnect.
    reconnecting: tokio::sync::Mutex<()>,
    topology: Mutex<Vec<Declaration>>,
    /// Index in `config.urls` of the next URL to try.
    next_url: AtomicUsize,
    generation: AtomicU64,
}

/// A reliable producer. Cheap to clone; clones share the connection.
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("urls", &self.inner.config.urls.len())
            .finish_non_exhaustive()
    }
}

/// The pending result of [`Producer::send_async`]; resolves when the broker confirmed the
/// message or the send failed for good. The send runs on its own task whether or not
/// this handle is polled; dropping the handle does not cancel it.
#[derive(Debug)]
pub struct SendHandle {
    message_id: String,
    task: tokio::task::JoinHandle<Result<Confirmation, Error>>,
}

impl SendHandle {
    /// The id of the message being sent.
    #[must_use]
    pub fn message_id(&self) -> &str {
        &self.message_id
    }
}

impl std::future::Future for SendHandle {
    type Output = Result<Confirmation, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let id = self.message_id.clone();
        std::pin::Pin::new(&mut self.task)
            .poll(cx)
            .map(|r| match r {
                Ok(result) => result,
                Err(_) => Err(Error::new(ErrorKind::Closed).with_message_id(&id)),
            })
    }
}

fn confirmation_result(confirmation: lapin::Confirmation) -> Result<(), ErrorKind> {
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(ret)) | lapin::Confirmation::Nack(Some(ret)) => {
            Err(ErrorKind::Returned {
                reply_code: ret.reply_code,
                reply_text: ret.reply_text.to_string(),
            })
        }
        lapin::Confirmation::Nack(None) => Err(ErrorKind::Nacked),
        lapin::Confirmation::NotRequested => Err(ErrorKind::Other(
            "publisher confirms are not enabled on the channel".into(),
        )),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data (an Arc or a Vec) intact.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Producer {
    /// Connects to the first reachable URL of `config`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when `config.urls` is empty or `max_attempts` is 0;
    /// [`ErrorKind::ConnectionLost`] when no URL is reachable.
    pub async fn connect(config: ProducerConfig) -> Result<Producer, Error> {
        if config.urls.is_empty() {
            return Err(Error::new(ErrorKind::Config("no broker URL".into())));
        }
        if config.retry.max_attempts == 0 {
            return Err(Error::new(ErrorKind::Config(
                "retry.max_attempts must be at least 1".into(),
            )));
        }
        let producer = Producer {
            inner: Arc::new(Inner {
                config,
                current: Mutex::new(None),
                reconnecting: tokio::sync::Mutex::new(()),
                topology: Mutex::new(Vec::new()),
                next_url: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
            }),
        };
        producer.inner.link().await?;
        Ok(producer)
    }

    /// Sends `message` and waits for the broker's publisher confirm, retrying per the
    /// policy on nacks, timeouts and lost connections (with the same message id).
    ///
    /// # Errors
    /// [`ErrorKind::Returned`] for an unroutable mandatory message (never retried);
    /// [`ErrorKind::Nacked`], [`ErrorKind::Timeout`] or [`ErrorKind::ConnectionLost`] once
    /// the attempts are exhausted; [`ErrorKind::DeadlineExceeded`] when the policy's
    /// deadline passes first; [`ErrorKind::Protocol`] when the broker rejects the publish
    /// (e.g. 404, no such exchange).
    pub async fn send(&self, mut message: Message) -> Result<Confirmation, Error> {
        let id = message.ensure_id();
        self.inner.send(message, id).await
    }

    /// Sends `messages` in order, pipelined: all are published back to back on one
    /// channel (so the broker receives them in this order), then their confirms are
    /// awaited. Results are in the same order; a message whose first attempt failed is
    /// retried on its own per the policy (after that, order is not kept).
    pub async fn send_all(&self, messages: Vec<Message>) -> Vec<Result<Confirmation, Error>> {
        let messages = messages
            .into_iter()
            .map(|mut m| {
                let id = m.ensure_id();
                (m, id)
            })
            .collect();
        self.inner.send_all(messages).await
    }

    /// Starts sending `message` on its own task and returns at once; the handle resolves
    /// like [`send`](Self::send). Any number may be in flight; they share one channel.
    /// Concurrent sends reach the broker in no particular order (use
    /// [`send_all`](Self::send_all) for a batch that must stay in order).
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    #[must_use = "the handle carries the confirm; use send_oneway to ignore it"]
    pub fn send_async(&self, mut message: Message) -> SendHandle {
        let id = message.ensure_id();
        let inner = Arc::clone(&self.inner);
        let task_id = id.clone();
        let task = tokio::spawn(async move { inner.send(message, task_id).await });
        SendHandle {
            message_id: id,
            task,
        }
    }

    /// Like [`send_async`](Self::send_async), but calls `callback` with the result on the
    /// send's task. Returns the message id.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn send_with_callback<F>(&self, mut message: Message, callback: F) -> String
    where
        F: FnOnce(Result<Confirmation, Error>) + Send + 'static,
    {
        let id = message.ensure_id();
        let inner = Arc::clone(&self.inner);
        let task_id = id.clone();
        tokio::spawn(async move { callback(inner.send(message, task_id).await) });
        id
    }

    /// Publishes `message` without waiting for any confirm, on a channel without confirms.
    ///
    /// **The message may be lost**: `Ok` only means the frames were handed to the
    /// connection; a broker crash or a network failure right after loses it silently, and
    /// it is not retried. `mandatory` is ignored (an unroutable message is dropped). Use
    /// it for data whose loss is acceptable (metrics, logs); use [`send`](Self::send)
    /// otherwise.
    ///
    /// # Errors
    /// [`ErrorKind::ConnectionLost`] when no connection could be obtained or the publish
    /// could not be written.
    pub async fn send_oneway(&self, mut message: Message) -> Result<(), Error> {
        let id = message.ensure_id();
        let link = self
            .inner
            .link()
            .await
            .map_err(|e| e.with_message_id(&id))?;
        let result = async {
            link.oneway
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    message.properties(),
                )
                .await?
                // Resolves at once with NotRequested on a channel without confirms.
                .await
                .map(|_| ())
        }
        .await;
        result.map_err(|e| {
            let err = Error::from(e).with_message_id(&id);
            if err.kind() == &ErrorKind::ConnectionLost {
                self.inner.drop_link(link.generation);
            }
            err
        })
    }

    /// Declares an exchange and records the declaration for replay after reconnects.
    ///
    /// # Errors
    /// The broker's refusal ([`ErrorKind::Protocol`], e.g. 406 when it exists with other
    /// properties) or [`ErrorKind::ConnectionLost`]; nothing is recorded then.
    pub async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.inner
            .declare(Declaration::Exchange {
                name: name.to_owned(),
                kind,
                options,
                arguments,
            })
            .await
    }

    /// Declares a queue and records the declaration for replay after reconnects.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an empty (server-named) queue name, whose name would
    /// change on replay; otherwise as [`declare_exchange`](Self::declare_exchange).
    pub async fn declare_queue(
        &self,
        name: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::new(ErrorKind::Config(
                "server-named queues cannot be replayed; give the queue a name".into(),
            )));
        }
        self.inner
            .declare(Declaration::Queue {
                name: name.to_owned(),
                options,
                arguments,
            })
            .await
    }

    /// Binds a queue to an exchange and records the binding for replay after reconnects.
    ///
    /// # Errors
    /// As [`declare_exchange`](Self::declare_exchange).
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.inner
            .declare(Declaration::Bind {
                queue: queue.to_owned(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            })
            .await
    }

    /// Closes the connection. Sends still in flight fail or reconnect.
    ///
    /// # Errors
    /// When the close handshake fails (the connection is dropped anyway).
    pub async fn close(&self) -> Result<(), Error> {
        let link = lock(&self.inner.current).take();
        if let Some(link) = link {
            link.connection
                .close(200, ShortString::from("producer closed"))
                .await?;
        }
        Ok(())
    }
}

impl Inner {
    async fn send(&self, message: Message, id: String) -> Result<Confirmation, Error> {
        let policy = &self.config.retry;
        let deadline = Instant::now() + policy.deadline;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let timeout = self.config.confirm_timeout.min(remaining);
            let kind = match self.attempt(&message, timeout).await {
                Ok(()) => {
                    return Ok(Confirmation {
                        message_id: id,
                        attempts: attempt,
                    });
                }
                Err(kind) => kind,
            };
            if !kind.is_retryable() || attempt >= policy.max_attempts {
                return Err(Error::new(kind).with_message_id(&id));
            }
            let sleep = policy.backoff(attempt);
            if Instant::now() + sleep >= deadline {
                return Err(Error::new(ErrorKind::DeadlineExceeded {
                    last: Box::new(kind),
                })
                .with_message_id(&id));
            }
            tracing::debug!(message_id = %id, attempt, error = %kind, ?sleep, "send failed, retrying");
            tokio::time::sleep(sleep).await;
        }
    }

    /// One publish and its confirm.
    async fn attempt(&self, message: &Message, timeout: Duration) -> Result<(), ErrorKind> {
        let link = self.link().await.map_err(|e| e.kind().clone())?;
        let publish = async {
            link.confirm
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        immediate: false,
                    },
                    &message.body,
                    message.properties(),
                )
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(timeout, publish).await {
            Err(_) => return Err(ErrorKind::Timeout),
            Ok(Err(e)) => return Err(self.publish_failed(&link, e)),
            Ok(Ok(c)) => c,
        };
        confirmation_result(confirmation)
    }

    /// The kind of a failed publish; a channel closed by a protocol error is as
    /// unusable as a dead connection, so both make the next attempt start over on a
    /// fresh link.
    fn publish_failed(&self, link: &Link, e: lapin::Error) -> ErrorKind {
        let kind = Error::from(e).kind().clone();
        if matches!(kind, ErrorKind::ConnectionLost | ErrorKind::Protocol { .. }) {
            self.drop_link(link.generation);
        }
        kind
    }

    /// Publishes `messages` back to back in order on one channel, then waits for their
    /// confirms; a failed one gets the usual retries on its own.
    async fn send_all(&self, messages: Vec<(Message, String)>) -> Vec<Result<Confirmation, Error>> {
        let timeout = self.config.confirm_timeout;
        let mut first = Vec::with_capacity(messages.len());
        match self.link().await {
            Ok(link) => {
                let mut broken = None;
                for (message, _) in &messages {
                    if let Some(kind) = &broken {
                        first.push(Err(Clone::clone(kind)));
                        continue;
                    }
                    let publish = link
                        .confirm
                        .basic_publish(
                            message.exchange.as_str().into(),
                            message.routing_key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: message.mandatory,
                                immediate: false,
                            },
                            &message.body,
                            message.properties(),
                        )
                        .await;
                    match publish {
                        Ok(confirm) => first.push(Ok(confirm)),
                        Err(e) => {
                            let kind = self.publish_failed(&link, e);
                            broken = Some(kind.clone());
                            first.push(Err(kind));
                        }
                    }
                }
                let deadline = Instant::now() + timeout;
                let mut outcomes = Vec::with_capacity(first.len());
                for published in first {
                    outcomes.push(match published {
                        Err(kind) => Err(kind),
                        Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                            Err(_) => Err(ErrorKind::Timeout),
                            Ok(Err(e)) => Err(self.publish_failed(&link, e)),
                            Ok(Ok(c)) => confirmation_result(c),
                        },
                    });
                }
                let mut results = Vec::with_capacity(messages.len());
                for ((message, id), outcome) in messages.into_iter().zip(outcomes) {
                    results.push(match outcome {
                        Ok(()) => Ok(Confirmation {
                            message_id: id,
                            attempts: 1,
                        }),
                        Err(kind) if kind.is_retryable() && self.config.retry.max_attempts > 1 => {
                            self.send(message, id).await.map(|mut c| {
                                c.attempts += 1;
                                c
                            })
                        }
                        Err(kind) => Err(Error::new(kind).with_message_id(&id)),
                    });
                }
                results
            }
            Err(e) => {
                let mut results = Vec::with_capacity(messages.len());
                for (message, id) in messages {
                    results.push(if self.config.retry.max_attempts > 1 {
                        self.send(message, id).await
                    } else {
                        Err(Error::new(e.kind().clone()).with_message_id(&id))
                    });
                }
                results
            }
        }
    }

    async fn declare(&self, declaration: Declaration) -> Result<(), Error> {
        let link = self.link().await?;
        // A separate channel, so that a refused declaration does not close the
        // publishing channels.
        let result = async {
            let channel = link.connection.create_channel().await?;
            declaration.apply(&channel).await?;
            channel
                .close(200, ShortString::from("declared"))
                .await
                .or_else(|_| Ok::<(), lapin::Error>(()))
        }
        .await;
        if let Err(e) = result {
            let err = Error::from(e);
            if err.kind() == &ErrorKind::ConnectionLost {
                self.drop_link(link.generation);
            }
            return Err(err);
        }
        let mut topology = lock(&self.topology);
        if !topology.contains(&declaration) {
            topology.push(declaration);
        }
        Ok(())
    }

    /// Forgets the link of `generation` if it is still the current one.
    fn drop_link(&self, generation: u64) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|l| l.generation == generation) {
            *current = None;
        }
    }

    /// The current healthy link, connecting if there is none.
    async fn link(&self) -> Result<Arc<Link>, Error> {
        let stale = {
            let current = lock(&self.current);
            match current.as_ref() {
                Some(link) if link.healthy() => return Ok(Arc::clone(link)),
                Some(link) => Some(link.generation),
                None => None,
            }
        };
        let _guard = self.reconnecting.lock().await;
        {
            let mut current = lock(&self.current);
            match current.as_ref() {
                // Someone else reconnected while we waited for the lock.
                Some(link) if link.healthy() && Some(link.generation) != stale => {
                    return Ok(Arc::clone(link));
                }
                _ => *current = None,
            }
        }
        let link = Arc::new(self.connect_any().await?);
        *lock(&self.current) = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Tries every URL once, starting with the next one in order.
    async fn connect_any(&self) -> Result<Link, Error> {
        let urls = &self.config.urls;
        let start = self.next_url.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..urls.len() {
            let index = (start + i) % urls.len();
            match tokio::time::timeout(self.config.confirm_timeout, self.connect_one(&urls[index]))
                .await
            {
                Ok(Ok(link)) => {
                    // After this connection is lost, try the following URL first.
                    self.next_url
                        .store((index + 1) % urls.len(), Ordering::Relaxed);
                    tracing::info!(url_index = index, generation = link.generation, "connected");
                    return Ok(link);
                }
                Ok(Err(e)) => {
                    tracing::debug!(url_index = index, error = %e, "connect failed");
                    last = Some(e);
                }
                Err(_) => {
                    tracing::debug!(url_index = index, "connect timed out");
                    last = Some(Error::new(ErrorKind::ConnectionLost));
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::ConnectionLost)))
    }

    async fn connect_one(&self, url: &str) -> Result<Link, Error> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| {
                // Whatever the cause (refused, reset, auth), for the caller the broker
                // is unreachable; the lapin error stays available as the source.
                let mut err = Error::from(e);
                if !matches!(err.kind(), ErrorKind::Protocol { .. }) {
                    err = err.into_kind(ErrorKind::ConnectionLost);
                }
                err
            })?;
        let declarations = lock(&self.topology).clone();
        if !declarations.is_empty() {
            let channel = connection.create_channel().await?;
            for declaration in &declarations {
                declaration.apply(&channel).await?;
            }
            let _ = channel.close(200, ShortString::from("replayed")).await;
        }
        let confirm = connection.create_channel().await?;
        confirm
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let oneway = connection.create_channel().await?;
        Ok(Link {
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            connection,
            confirm,
            oneway,
        })
    }
}
