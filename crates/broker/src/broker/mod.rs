//! The broker's entry points. Each takes the state lock once, does its work, writes what
//! the log needs, and returns an outcome; deliveries caused along the way go out as
//! [`Outbound`](crate::Outbound) events.
//!
//! Split by AMQP class: [`exchanges`], [`queues`], [`basic`]; this file holds the broker
//! itself, recovery at open, and connection/channel lifecycle.

mod basic;
mod durable;
mod exchanges;
mod queues;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use holdfast_codec::{AMQPValue, FieldTable};
use holdfast_store::{Store, StoreConfig};
use parking_lot::Mutex;
use rand::Rng;
use rand::distr::Alphanumeric;
use tracing::{info, warn};

use crate::alarm::{AlarmConfig, Alarms};
use crate::channel::ChannelState;
use crate::enqueue::now_ms;
use crate::error::{AmqpException, AmqpResult, BrokerError, ReplyCode};
use crate::outbound::Outbound;
use crate::queue::MessageRef;
use crate::record::{StoredMessage, decode_message};
use crate::recovery::Replay;
use crate::state::{ConnectionState, Disposition, Settlements, State};
use crate::{ChannelKey, ConnectionId, OutboundSink, QueueId};

/// How to open the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The store's configuration.
    pub store: StoreConfig,
    /// How long a delivery may stay unacknowledged before its channel is closed with
    /// 406, for queues without `x-consumer-timeout`.
    pub consumer_timeout: Duration,
    /// Free-disk limit and memory high-watermark.
    pub alarms: AlarmConfig,
}

/// RabbitMQ's default consumer ack timeout.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How often expiry, `x-expires` and ack timeouts are checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

impl BrokerConfig {
    /// Defaults for everything but the store.
    #[must_use]
    pub fn new(store: StoreConfig) -> Self {
        Self {
            store,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            alarms: AlarmConfig::default(),
        }
    }
}

/// `queue.declare` arguments.
#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    /// Name; empty asks for a server-generated one.
    pub name: String,
    /// Only check that it exists.
    pub passive: bool,
    /// Survives restarts.
    pub durable: bool,
    /// Owned by the declaring connection.
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Arguments, kept as given.
    pub arguments: FieldTable,
}

/// `queue.declare-ok` contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclareOk {
    /// The queue's name (generated if none was given).
    pub name: String,
    /// Ready messages.
    pub message_count: u32,
    /// Consumers.
    pub consumer_count: u32,
}

/// `basic.consume` arguments.
#[derive(Debug, Clone, Default)]
pub struct ConsumeRequest {
    /// The queue.
    pub queue: String,
    /// Tag; empty asks for a server-generated one.
    pub consumer_tag: String,
    /// Settle on delivery.
    pub no_ack: bool,
    /// Sole consumer of the queue.
    pub exclusive: bool,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Message headers, for headers exchanges.
    pub headers: Option<FieldTable>,
    /// Raw basic properties.
    pub properties: Bytes,
    /// Body.
    pub body: Bytes,
    /// Per-message TTL from the `expiration` property, ms.
    pub expiration: Option<u64>,
    /// Deduplication key: the `x-deduplication-header` header, else `message-id`.
    pub dedup_key: Option<Bytes>,
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Whether at least one queue was routed to.
    pub routed: bool,
    /// A full queue with `reject-publish(-dlx)` refused it: confirm with a nack.
    pub rejected: bool,
    /// Log offset that must be durable before a confirm may be sent; `None` when no
    /// queue must recover the message (transient or unroutable).
    pub durable_end: Option<u64>,
}

/// A message taken by `basic.get`.
#[derive(Debug, Clone)]
pub struct GetOk {
    /// Delivery tag on the channel.
    pub delivery_tag: u64,
    /// Whether it may have been delivered before.
    pub redelivered: bool,
    /// Ready messages left in the queue.
    pub message_count: u32,
    /// Failed deliveries so far; sent as `x-delivery-count` when non-zero.
    pub delivery_count: u32,
    /// The stored message.
    pub message: MessageRef,
    /// Settled already (no-ack): release the reference after reading.
    pub release_after_read: bool,
}

/// The broker core.
pub struct Broker {
    state: Mutex<State>,
    store: Store,
    alarms: Alarms,
    /// Where confirms may be sent up to, when something other than the local log's
    /// durability decides it (a leader in sync mode: its in-sync followers too).
    confirm_watermark: std::sync::OnceLock<ConfirmWatermark>,
}

/// How far the log is durable as far as confirms are concerned, or the poison that
/// stops them for good.
pub type ConfirmWatermark =
    tokio::sync::watch::Receiver<Result<u64, holdfast_store::StorePoisoned>>;

fn not_found_queue(name: &str, vhost: &str) -> AmqpException {
    AmqpException::channel(
        ReplyCode::NotFound,
        format!("no queue '{name}' in vhost '{vhost}'"),
    )
}

fn not_found_exchange(name: &str, vhost: &str) -> AmqpException {
    AmqpException::channel(
        ReplyCode::NotFound,
        format!("no exchange '{name}' in vhost '{vhost}'"),
    )
}

fn default_exchange_refused() -> AmqpException {
    AmqpException::channel(
        ReplyCode::AccessRefused,
        "operation not permitted on the default exchange",
    )
}

fn locked(name: &str, vhost: &str) -> AmqpException {
    AmqpException::channel(
        ReplyCode::ResourceLocked,
        format!(
            "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could \
             be originally declared on another connection or the exclusive property value does \
             not match that of the original declaration."
        ),
    )
}

fn inequivalent(
    arg: &str,
    kind: &str,
    name: &str,
    vhost: &str,
    received: &str,
    current: &str,
) -> AmqpException {
    AmqpException::channel(
        ReplyCode::PreconditionFailed,
        format!(
            "inequivalent arg '{arg}' for {kind} '{name}' in vhost '{vhost}': received '{received}' but current is '{current}'"
        ),
    )
}

fn random_suffix(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The `x-` arguments of a table: RabbitMQ compares only those on re-declaration.
fn x_arguments(table: &FieldTable) -> Vec<(&str, &AMQPValue)> {
    table
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-"))
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

impl Broker {
    /// Opens the store, replays the log and restores durable definitions and messages.
    ///
    /// # Errors
    /// When the store cannot be opened or the definitions cannot be read.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        let store_config = config.store.clone();
        Self::open_with_store(config, move |visit| Store::open(store_config, visit))
    }

    /// [`Broker::open`] on a store that `open_store` opens, passing every recovered
    /// record to the visitor it is given (tests open one on a simulated disk).
    ///
    /// # Errors
    /// As [`Broker::open`].
    pub fn open_with_store(
        config: BrokerConfig,
        open_store: impl FnOnce(
            &mut dyn FnMut(holdfast_store::LogPosition, &[u8]),
        ) -> Result<Store, holdfast_store::StoreError>,
    ) -> Result<Arc<Broker>, BrokerError> {
        let mut replay = Replay::default();
        let store = open_store(&mut |position, payload| replay.visit(position, payload))?;
        let consumer_timeout =
            u64::try_from(config.consumer_timeout.as_millis()).unwrap_or(u64::MAX);
        let state = replay.into_state(
            &store,
            consumer_timeout,
            config.store.segment_size,
            config.store.fsync != holdfast_store::FsyncPolicy::Always,
        )?;
        let broker = Arc::new(Broker {
            state: Mutex::new(state),
            store,
            alarms: Alarms::new(config.alarms, config.store.dir.clone()),
            confirm_watermark: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&broker);
        std::thread::Builder::new()
            .name("holdfast-housekeeping".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(HOUSEKEEPING_INTERVAL);
                    let Some(broker) = weak.upgrade() else { break };
                    broker.housekeeping(now_ms());
                }
            })
            .map_err(|source| BrokerError::Thread { source })?;
        Ok(broker)
    }

    /// Time-driven work: expires messages at queue heads, deletes queues unused for
    /// their `x-expires`, closes channels whose deliveries outlived the ack timeout.
    pub fn housekeeping(&self, now: u64) {
        let mut state = self.state.lock();
        let mut settlements = Settlements::new(&self.store);
        let queue_ids: Vec<QueueId> = state.queues.keys().copied().collect();
        for id in queue_ids {
            state.expire_head(id, now, &mut settlements);
            let Some(queue) = state.queues.get(&id) else {
                continue;
            };
            let unused_for = now.saturating_sub(queue.last_used);
            if queue.consumers.is_empty() && queue.policy.expires.is_some_and(|ms| unused_for >= ms)
            {
                let (name, vhost) = (queue.name.clone(), queue.vhost.clone());
                match self.delete_queue_logged(&mut state, id, &mut settlements) {
                    Ok(_) => info!(queue = %name, %vhost, "queue expired (x-expires)"),
                    Err(err) => {
                        warn!(queue = %name, %vhost, cause = %err.text, "expired queue kept: its deletion could not be logged; retried");
                    }
                }
            }
        }
        self.checkpoint_definitions(&mut state);
        // Acks wait in the store for the next write; on an idle log, this is it.
        if let Err(err) = self.store.flush_deferred() {
            tracing::warn!(cause = %err, "deferred ack records could not be written");
        }
        state.checkpoint_dedup_windows(now);
        state.release_delayed(now, &mut settlements);
        state.retry_dead_letters(now, &mut settlements);
        state.release_held(now, &mut settlements);
        let overdue: Vec<(ChannelKey, u64)> = state
            .channels
            .iter()
            .filter_map(|(key, channel)| {
                channel.unacked.values().find_map(|unacked| {
                    let timeout = state
                        .queues
                        .get(&unacked.queue)
                        .and_then(|q| q.policy.consumer_timeout)
                        .unwrap_or(state.consumer_timeout);
                    (now.saturating_sub(unacked.delivered_at) > timeout).then_some((*key, timeout))
                })
            })
            .collect();
        for (key, timeout) in overdue {
            warn!(
                connection = key.connection,
                channel = key.channel,
                timeout_ms = timeout,
                "consumer ack timeout; closing channel"
            );
            let touched = self.close_channel_locked(&mut state, key, &mut settlements);
            if let Some(connection) = state.connections.get(&key.connection) {
                (connection.outbound)(Outbound::CloseChannel {
                    channel: key.channel,
                    code: ReplyCode::PreconditionFailed,
                    text: format!(
                        "delivery acknowledgement on channel {} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more",
                        key.channel
                    ),
                });
            }
            for queue in touched {
                state.dispatch(queue, &mut settlements);
            }
        }
        settlements.apply();
    }

    /// Runs `look` on the state under the lock: the model test compares every queue's
    /// contents with its model.
    #[cfg(test)]
    pub(crate) fn inspect<R>(&self, look: impl FnOnce(&State) -> R) -> R {
        look(&self.state.lock())
    }

    /// Where publisher confirms, and every reply that promises durability, may be sent
    /// up to: the local log's durable offset ([`Store::durable`]), unless the node set
    /// another with [`Broker::use_confirm_watermark`].
    #[must_use]
    pub fn confirmed(&self) -> ConfirmWatermark {
        match self.confirm_watermark.get() {
            Some(watermark) => watermark.clone(),
            None => self.store.durable(),
        }
    }

    /// Makes confirms wait for `watermark` instead of the local log alone (a leader in
    /// sync mode passes the minimum over itself and its in-sync followers). Set once,
    /// before connections are served.
    ///
    /// # Errors
    /// Gives the watermark back if one was set already.
    pub fn use_confirm_watermark(
        &self,
        watermark: ConfirmWatermark,
    ) -> Result<(), ConfirmWatermark> {
        self.confirm_watermark.set(watermark)
    }

    /// The store, for reading message bodies and awaiting durability.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The resource alarms (the caller starts their monitor).
    #[must_use]
    pub fn alarms(&self) -> &Alarms {
        &self.alarms
    }

    /// Reads a stored message.
    ///
    /// # Errors
    /// When the store cannot read it or the record is not a message.
    pub fn read_message(&self, message: MessageRef) -> Result<StoredMessage, BrokerError> {
        let record = self.store.read(message.position, message.len)?;
        decode_message(&record).ok_or(BrokerError::Corrupt {
            position: message.position.0,
        })
    }

    /// Drops a reference the caller held to read a settled message.
    pub fn release(&self, message: MessageRef) {
        self.store.release(message.position);
    }

    /// Registers a connection that opened `vhost`.
    ///
    /// # Errors
    /// 530 NOT_ALLOWED when the vhost does not exist.
    pub fn connect(&self, vhost: &str, outbound: OutboundSink) -> AmqpResult<ConnectionId> {
        let mut state = self.state.lock();
        if !state.vhosts.contains_key(vhost) {
            return Err(AmqpException::connection(
                ReplyCode::NotAllowed,
                format!("vhost {vhost} not found"),
            ));
        }
        state.next_connection_id += 1;
        let id = state.next_connection_id;
        state.connections.insert(
            id,
            ConnectionState {
                vhost: vhost.into(),
                outbound,
                channels: HashSet::new(),
                exclusive_queues: HashSet::new(),
            },
        );
        Ok(id)
    }

    /// Forgets a connection: its channels close (unacked messages return to their queues)
    /// and its exclusive queues are deleted.
    pub fn disconnect(&self, connection: ConnectionId) {
        let mut state = self.state.lock();
        let mut settlements = Settlements::new(&self.store);
        let channels: Vec<u16> = state
            .connections
            .get(&connection)
            .map(|c| c.channels.iter().copied().collect())
            .unwrap_or_default();
        let mut touched = HashSet::new();
        for channel in channels {
            touched.extend(self.close_channel_locked(
                &mut state,
                ChannelKey {
                    connection,
                    channel,
                },
                &mut settlements,
            ));
        }
        let exclusive: Vec<QueueId> = state
            .connections
            .get(&connection)
            .map(|c| c.exclusive_queues.iter().copied().collect())
            .unwrap_or_default();
        for queue in exclusive {
            // Exclusive queues are never logged: they die with their connection.
            let _ = self.delete_queue_logged(&mut state, queue, &mut settlements);
            touched.remove(&queue);
        }
        state.connections.remove(&connection);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply();
    }

    /// Opens a channel.
    pub fn channel_open(&self, key: ChannelKey) {
        let mut state = self.state.lock();
        if let Some(connection) = state.connections.get_mut(&key.connection) {
            connection.channels.insert(key.channel);
            state.channels.insert(key, ChannelState::default());
        }
    }

    /// Closes a channel: cancels its consumers and requeues what it had not acked.
    pub fn channel_close(&self, key: ChannelKey) {
        let mut state = self.state.lock();
        let mut settlements = Settlements::new(&self.store);
        let touched = self.close_channel_locked(&mut state, key, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply();
    }

    fn close_channel_locked(
        &self,
        state: &mut State,
        key: ChannelKey,
        settlements: &mut Settlements,
    ) -> HashSet<QueueId> {
        let Some(channel) = state.channels.get(&key) else {
            return HashSet::new();
        };
        let tags: Vec<Arc<str>> = channel.consumers.keys().cloned().collect();
        let mut auto_deleted = Vec::new();
        for tag in tags {
            if let Some(queue) = state.remove_consumer(key, &tag) {
                auto_deleted.push(queue);
            }
        }
        let unacked = state
            .channels
            .remove(&key)
            .map(|c| c.unacked.into_iter().collect())
            .unwrap_or_default();
        if let Some(connection) = state.connections.get_mut(&key.connection) {
            connection.channels.remove(&key.channel);
        }
        let mut touched = state.finish_deliveries(key, unacked, Disposition::Requeue, settlements);
        for queue in auto_deleted {
            if let Err(err) = self.delete_queue_logged(state, queue, settlements) {
                warn!(cause = %err.text, "auto-delete queue kept: its deletion could not be logged");
            }
            touched.remove(&queue);
        }
        touched
    }

    /// `channel.flow`: pauses or resumes deliveries to the channel.
    pub fn channel_flow(&self, key: ChannelKey, active: bool) {
        let mut state = self.state.lock();
        if let Some(channel) = state.channels.get_mut(&key) {
            channel.flow_active = active;
        }
        if active {
            let mut settlements = Settlements::new(&self.store);
            state.dispatch_channel(key, &mut settlements);
            settlements.apply();
        }
    }

    fn vhost_of(state: &State, connection: ConnectionId) -> AmqpResult<Arc<str>> {
        state
            .connections
            .get(&connection)
            .map(|c| c.vhost.clone())
            .ok_or_else(|| {
                AmqpException::connection(ReplyCode::InternalError, "unknown connection")
            })
    }

    /// Looks up a queue by name, enforcing exclusivity.
    fn queue_id(
        state: &State,
        connection: ConnectionId,
        vhost: &str,
        name: &str,
    ) -> AmqpResult<QueueId> {
        let id = state
            .vhosts
            .get(vhost)
            .and_then(|v| v.queues.get(name))
            .copied()
            .ok_or_else(|| not_found_queue(name, vhost))?;
        let queue = state
            .queues
            .get(&id)
            .ok_or_else(|| not_found_queue(name, vhost))?;
        if queue
            .exclusive_owner
            .is_some_and(|owner| owner != connection)
        {
            return Err(locked(name, vhost));
        }
        Ok(id)
    }
}
