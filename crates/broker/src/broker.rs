//! The broker's entry points. Each takes the state lock once, does its work, writes what
//! the log needs, and returns an outcome; deliveries caused along the way go out as
//! [`Outbound`](crate::Outbound) events.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use holdfast_codec::{AMQPValue, FieldTable};
use holdfast_store::{Store, StoreConfig};
use parking_lot::Mutex;
use rand::Rng;
use rand::distr::Alphanumeric;
use tracing::{info, warn};

use crate::channel::{ChannelState, Unacked};
use crate::definitions::{Definitions, is_builtin_exchange};
use crate::error::{AmqpException, AmqpResult, BrokerError, ReplyCode};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::queue::{Consumer, MessageRef, Queue, QueueEntry};
use crate::record::{StoredMessage, decode_message, encode_publish};
use crate::recovery::Replay;
use crate::state::{ConnectionState, Settlements, State, VHost};
use crate::{ChannelKey, ConnectionId, DEFAULT_VHOST, OutboundSink, QueueId};

/// How to open the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The store's configuration.
    pub store: StoreConfig,
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
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Whether at least one queue took it.
    pub routed: bool,
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
    /// The stored message.
    pub message: MessageRef,
    /// Settled already (no-ack): release the reference after reading.
    pub release_after_read: bool,
}

/// The broker core.
pub struct Broker {
    state: Mutex<State>,
    store: Store,
}

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
        let mut replay = Replay::default();
        let store = Store::open(config.store, |position, payload| {
            replay.visit(position, payload)
        })?;
        if replay.unknown_records > 0 {
            warn!(
                records = replay.unknown_records,
                "log records of an unknown kind skipped"
            );
        }
        let mut state = State::default();
        state
            .vhosts
            .insert(DEFAULT_VHOST.to_owned(), VHost::with_builtin_exchanges());
        if let Some(bytes) = store.read_definitions()? {
            let definitions: Definitions =
                serde_json::from_slice(&bytes).map_err(BrokerError::Definitions)?;
            definitions.restore(&mut state);
        }
        let mut recovered_messages = 0u64;
        for (queue_id, entries) in replay.into_queues() {
            let Some(queue) = state.queues.get_mut(&queue_id) else {
                continue;
            };
            for entry in entries {
                store.retain(entry.message.position);
                queue.push(entry);
                recovered_messages += 1;
            }
        }
        store.collect_garbage();
        info!(
            queues = state.queues.len(),
            messages = recovered_messages,
            "broker state recovered"
        );
        Ok(Arc::new(Broker {
            state: Mutex::new(state),
            store,
        }))
    }

    /// The store, for reading message bodies and awaiting durability.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
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

    fn persist_definitions(&self, state: &State) -> AmqpResult<()> {
        let definitions = Definitions::snapshot(state);
        let bytes = serde_json::to_vec(&definitions).map_err(|err| {
            AmqpException::connection(ReplyCode::InternalError, format!("definitions: {err}"))
        })?;
        self.store.write_definitions(&bytes).map_err(|err| {
            AmqpException::connection(ReplyCode::InternalError, format!("definitions: {err}"))
        })
    }

    // ---- connections and channels ----

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
                vhost: vhost.to_owned(),
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
        let mut settlements = Settlements::default();
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
            state.delete_queue(queue, &mut settlements);
            touched.remove(&queue);
        }
        state.connections.remove(&connection);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply(&self.store);
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
        let mut settlements = Settlements::default();
        let touched = self.close_channel_locked(&mut state, key, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply(&self.store);
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
        let mut touched = state.finish_deliveries(key, unacked, true, settlements);
        let mut definitions_changed = false;
        for queue in auto_deleted {
            definitions_changed |= state.queues.get(&queue).is_some_and(|q| q.durable);
            state.delete_queue(queue, settlements);
            touched.remove(&queue);
        }
        if definitions_changed {
            let _ = self.persist_definitions(state);
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
            let mut settlements = Settlements::default();
            state.dispatch_channel(key, &mut settlements);
            settlements.apply(&self.store);
        }
    }

    fn vhost_of(state: &State, connection: ConnectionId) -> AmqpResult<String> {
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

    // ---- exchanges ----

    /// `exchange.declare`.
    ///
    /// # Errors
    /// 403 for reserved names, 404 for a passive miss, 406 for an inequivalent
    /// re-declaration, 503 (connection) for an unknown type.
    #[allow(clippy::too_many_arguments)]
    pub fn exchange_declare(
        &self,
        connection: ConnectionId,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let vhost = state
            .vhosts
            .get_mut(&vhost_name)
            .ok_or_else(|| not_found_exchange(name, &vhost_name))?;
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if let Some(existing) = vhost.exchanges.get(name) {
            if passive {
                return Ok(());
            }
            if existing.kind.name() != kind {
                return Err(inequivalent(
                    "type",
                    "exchange",
                    name,
                    &vhost_name,
                    kind,
                    existing.kind.name(),
                ));
            }
            for (arg, received, current) in [
                ("durable", durable, existing.durable),
                ("auto_delete", auto_delete, existing.auto_delete),
                ("internal", internal, existing.internal),
            ] {
                if received != current {
                    return Err(inequivalent(
                        arg,
                        "exchange",
                        name,
                        &vhost_name,
                        &received.to_string(),
                        &current.to_string(),
                    ));
                }
            }
            return Ok(());
        }
        if passive {
            return Err(not_found_exchange(name, &vhost_name));
        }
        if name.starts_with("amq.") {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let kind = ExchangeKind::parse(kind).ok_or_else(|| {
            AmqpException::connection(
                ReplyCode::CommandInvalid,
                format!("unknown exchange type '{kind}'"),
            )
        })?;
        vhost.exchanges.insert(
            name.to_owned(),
            Exchange::new(
                name.to_owned(),
                kind,
                durable,
                auto_delete,
                internal,
                arguments,
            ),
        );
        if durable {
            self.persist_definitions(&state)?;
        }
        Ok(())
    }

    /// `exchange.delete`. Deleting an exchange that does not exist succeeds, as in
    /// RabbitMQ 3.x and later.
    ///
    /// # Errors
    /// 403 for the default and `amq.*` exchanges, 406 when `if_unused` and it has
    /// bindings.
    pub fn exchange_delete(
        &self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if is_builtin_exchange(name) {
            return Err(if name.is_empty() {
                default_exchange_refused()
            } else {
                AmqpException::channel(
                    ReplyCode::AccessRefused,
                    format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
                )
            });
        }
        let Some(vhost) = state.vhosts.get_mut(&vhost_name) else {
            return Ok(());
        };
        let Some(exchange) = vhost.exchanges.get(name) else {
            return Ok(());
        };
        if if_unused && !exchange.bindings().is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("exchange '{name}' in vhost '{vhost_name}' in use"),
            ));
        }
        let durable = exchange.durable;
        vhost.exchanges.remove(name);
        let destination = Destination::Exchange(name.to_owned());
        for other in vhost.exchanges.values_mut() {
            other.unbind_destination(&destination);
        }
        if durable {
            self.persist_definitions(&state)?;
        }
        Ok(())
    }

    /// `exchange.bind` / `exchange.unbind` (`bind = false`).
    ///
    /// # Errors
    /// 404 when either exchange is missing, 403 for the default exchange.
    pub fn exchange_binding(
        &self,
        connection: ConnectionId,
        bind: bool,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if source.is_empty() || destination.is_empty() {
            return Err(default_exchange_refused());
        }
        let vhost = state
            .vhosts
            .get_mut(&vhost_name)
            .ok_or_else(|| not_found_exchange(source, &vhost_name))?;
        let destination_durable = match vhost.exchanges.get(destination) {
            Some(exchange) => exchange.durable,
            None if bind => return Err(not_found_exchange(destination, &vhost_name)),
            None => false,
        };
        let binding = Binding {
            destination: Destination::Exchange(destination.to_owned()),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        let Some(exchange) = vhost.exchanges.get_mut(source) else {
            return if bind {
                Err(not_found_exchange(source, &vhost_name))
            } else {
                Ok(())
            };
        };
        let changed = if bind {
            exchange.bind(binding)
        } else {
            exchange.unbind(&binding)
        };
        let durable = exchange.durable && destination_durable;
        if !bind && exchange.auto_delete && exchange.bindings().is_empty() {
            vhost.exchanges.remove(source);
        }
        if changed && durable {
            self.persist_definitions(&state)?;
        }
        Ok(())
    }

    // ---- queues ----

    /// `queue.declare`.
    ///
    /// # Errors
    /// 403 for reserved names, 404 for a passive miss, 405 for another connection's
    /// exclusive queue, 406 for an inequivalent re-declaration.
    pub fn queue_declare(
        &self,
        connection: ConnectionId,
        request: QueueDeclare,
    ) -> AmqpResult<QueueDeclareOk> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let name = if request.name.is_empty() && !request.passive {
            format!("amq.gen-{}", random_suffix(22))
        } else {
            request.name.clone()
        };
        let existing = state
            .vhosts
            .get(&vhost_name)
            .and_then(|v| v.queues.get(&name))
            .copied();
        if let Some(id) = existing {
            let queue = state
                .queues
                .get(&id)
                .ok_or_else(|| not_found_queue(&name, &vhost_name))?;
            if queue
                .exclusive_owner
                .is_some_and(|owner| owner != connection)
            {
                return Err(locked(&name, &vhost_name));
            }
            if !request.passive {
                let exclusive = queue.exclusive_owner.is_some();
                for (arg, received, current) in [
                    ("durable", request.durable, queue.durable),
                    ("exclusive", request.exclusive, exclusive),
                    ("auto_delete", request.auto_delete, queue.auto_delete),
                ] {
                    if received != current {
                        return Err(inequivalent(
                            arg,
                            "queue",
                            &name,
                            &vhost_name,
                            &received.to_string(),
                            &current.to_string(),
                        ));
                    }
                }
                let received = x_arguments(&request.arguments);
                let current = x_arguments(&queue.arguments);
                if received != current {
                    let arg = received
                        .iter()
                        .chain(current.iter())
                        .find(|pair| !received.contains(pair) || !current.contains(pair))
                        .map_or("arguments", |(k, _)| *k);
                    return Err(inequivalent(
                        arg,
                        "queue",
                        &name,
                        &vhost_name,
                        "a different value",
                        "another",
                    ));
                }
            }
            return Ok(QueueDeclareOk {
                name,
                message_count: queue.message_count(),
                consumer_count: queue.consumer_count(),
            });
        }
        if request.passive {
            return Err(not_found_queue(&name, &vhost_name));
        }
        if name.starts_with("amq.") && !request.name.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let id = QueueId(state.next_queue_id.max(1));
        state.next_queue_id = id.0 + 1;
        state.queues.insert(
            id,
            Queue {
                id,
                name: name.clone(),
                vhost: vhost_name.clone(),
                durable: request.durable,
                exclusive_owner: request.exclusive.then_some(connection),
                auto_delete: request.auto_delete,
                arguments: request.arguments,
                ready: VecDeque::new(),
                ready_bytes: 0,
                consumers: Vec::new(),
                cursor: 0,
                had_consumer: false,
            },
        );
        if let Some(vhost) = state.vhosts.get_mut(&vhost_name) {
            vhost.queues.insert(name.clone(), id);
        }
        if request.exclusive {
            if let Some(owner) = state.connections.get_mut(&connection) {
                owner.exclusive_queues.insert(id);
            }
        }
        if request.durable && !request.exclusive {
            self.persist_definitions(&state)?;
        }
        Ok(QueueDeclareOk {
            name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    /// `queue.bind` / `queue.unbind` (`bind = false`).
    ///
    /// # Errors
    /// 404 for a missing queue or exchange, 403 for the default exchange, 405 for another
    /// connection's exclusive queue.
    pub fn queue_binding(
        &self,
        connection: ConnectionId,
        bind: bool,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        let queue_id = Self::queue_id(&state, connection, &vhost_name, queue)?;
        let queue_durable = state
            .queues
            .get(&queue_id)
            .is_some_and(|q| q.durable && q.exclusive_owner.is_none());
        let vhost = state
            .vhosts
            .get_mut(&vhost_name)
            .ok_or_else(|| not_found_exchange(exchange, &vhost_name))?;
        let source = vhost
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| not_found_exchange(exchange, &vhost_name))?;
        let binding = Binding {
            destination: Destination::Queue(queue_id),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        let changed = if bind {
            source.bind(binding)
        } else {
            source.unbind(&binding)
        };
        let durable = source.durable && queue_durable;
        if !bind && source.auto_delete && source.bindings().is_empty() {
            vhost.exchanges.remove(exchange);
        }
        if changed && durable {
            self.persist_definitions(&state)?;
        }
        Ok(())
    }

    /// `queue.purge`: drops ready messages (not those awaiting ack); returns how many.
    ///
    /// # Errors
    /// 404 / 405 as for any queue access.
    pub fn queue_purge(&self, connection: ConnectionId, queue: &str) -> AmqpResult<u32> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let queue_id = Self::queue_id(&state, connection, &vhost_name, queue)?;
        let mut settlements = Settlements::default();
        let mut purged = 0;
        if let Some(queue) = state.queues.get_mut(&queue_id) {
            while let Some(entry) = queue.pop() {
                settlements.settle(queue_id, &entry);
                purged += 1;
            }
        }
        settlements.apply(&self.store);
        Ok(purged)
    }

    /// `queue.delete`; returns the number of ready messages dropped. Deleting a queue
    /// that does not exist succeeds with 0, as in RabbitMQ 3.x and later.
    ///
    /// # Errors
    /// 406 when `if_unused`/`if_empty` do not hold, 405 for another connection's
    /// exclusive queue.
    pub fn queue_delete(
        &self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let queue_id = match Self::queue_id(&state, connection, &vhost_name, queue) {
            Ok(id) => id,
            Err(err) if err.code == ReplyCode::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let Some(target) = state.queues.get(&queue_id) else {
            return Ok(0);
        };
        if if_unused && !target.consumers.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("queue '{queue}' in vhost '{vhost_name}' in use"),
            ));
        }
        if if_empty && !target.ready.is_empty() {
            return Err(AmqpException::channel(
                ReplyCode::PreconditionFailed,
                format!("queue '{queue}' in vhost '{vhost_name}' is not empty"),
            ));
        }
        let durable = target.durable && target.exclusive_owner.is_none();
        let mut settlements = Settlements::default();
        let dropped = state.delete_queue(queue_id, &mut settlements);
        if durable {
            self.persist_definitions(&state)?;
        }
        settlements.apply(&self.store);
        Ok(dropped)
    }

    /// Ready and consumer counts of a queue, if it exists.
    #[must_use]
    pub fn queue_counts(&self, vhost: &str, queue: &str) -> Option<(u32, u32)> {
        let state = self.state.lock();
        let id = state.vhosts.get(vhost)?.queues.get(queue)?;
        let queue = state.queues.get(id)?;
        Some((queue.message_count(), queue.consumer_count()))
    }

    // ---- basic ----

    /// `basic.qos`. A prefetch size other than 0 is refused by the amqp layer, as
    /// RabbitMQ does.
    pub fn basic_qos(&self, key: ChannelKey, prefetch_count: u16, global: bool) {
        let mut state = self.state.lock();
        if let Some(channel) = state.channels.get_mut(&key) {
            if global {
                channel.channel_prefetch = prefetch_count;
            } else {
                channel.consumer_prefetch = prefetch_count;
            }
        }
        let mut settlements = Settlements::default();
        state.dispatch_channel(key, &mut settlements);
        settlements.apply(&self.store);
    }

    /// `basic.consume`: registers the consumer but delivers nothing yet, so the caller
    /// can send `consume-ok` first and then call [`Broker::dispatch`].
    ///
    /// # Errors
    /// 404 / 405 for the queue, 403 for exclusivity conflicts, 530 (connection) for a
    /// reused tag.
    pub fn basic_consume(
        &self,
        key: ChannelKey,
        request: ConsumeRequest,
    ) -> AmqpResult<(Arc<str>, QueueId)> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, key.connection)?;
        let queue_id = Self::queue_id(&state, key.connection, &vhost_name, &request.queue)?;
        let tag: Arc<str> = if request.consumer_tag.is_empty() {
            format!("amq.ctag-{}", random_suffix(22)).into()
        } else {
            request.consumer_tag.as_str().into()
        };
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        if channel.consumers.contains_key(&tag) {
            return Err(AmqpException::connection(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let prefetch = channel.consumer_prefetch;
        let queue = state
            .queues
            .get_mut(&queue_id)
            .ok_or_else(|| not_found_queue(&request.queue, &vhost_name))?;
        if queue.has_exclusive_consumer() || (request.exclusive && !queue.consumers.is_empty()) {
            return Err(AmqpException::channel(
                ReplyCode::AccessRefused,
                format!(
                    "queue '{}' in vhost '{vhost_name}' in exclusive use",
                    request.queue
                ),
            ));
        }
        queue.consumers.push(Consumer {
            channel: key,
            tag: tag.clone(),
            no_ack: request.no_ack,
            exclusive: request.exclusive,
            prefetch,
            unacked: 0,
        });
        queue.had_consumer = true;
        if let Some(channel) = state.channels.get_mut(&key) {
            channel.consumers.insert(tag.clone(), queue_id);
        }
        Ok((tag, queue_id))
    }

    /// Delivers what a queue can deliver now.
    pub fn dispatch(&self, queue: QueueId) {
        let mut state = self.state.lock();
        let mut settlements = Settlements::default();
        state.dispatch(queue, &mut settlements);
        settlements.apply(&self.store);
    }

    /// `basic.cancel`. Unknown tags are not an error (the consumer may have been
    /// cancelled by the server already).
    pub fn basic_cancel(&self, key: ChannelKey, consumer_tag: &str) {
        let mut state = self.state.lock();
        let tag: Arc<str> = consumer_tag.into();
        if let Some(queue) = state.remove_consumer(key, &tag) {
            let mut settlements = Settlements::default();
            let durable = state.queues.get(&queue).is_some_and(|q| q.durable);
            state.delete_queue(queue, &mut settlements);
            if durable {
                let _ = self.persist_definitions(&state);
            }
            settlements.apply(&self.store);
        }
    }

    /// `basic.publish`: routes, writes the message once, enqueues it everywhere.
    ///
    /// # Errors
    /// 404 for a missing exchange, 403 for an internal one, 541 (connection) when the
    /// store cannot take the write.
    pub fn basic_publish(
        &self,
        connection: ConnectionId,
        request: &PublishRequest,
    ) -> AmqpResult<PublishOutcome> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, connection)?;
        let vhost = state
            .vhosts
            .get(&vhost_name)
            .ok_or_else(|| not_found_exchange(&request.exchange, &vhost_name))?;
        let mut targets: Vec<QueueId> = Vec::new();
        if request.exchange.is_empty() {
            if let Some(id) = vhost.queues.get(&request.routing_key) {
                targets.push(*id);
            }
        } else {
            let exchange = vhost
                .exchanges
                .get(&request.exchange)
                .ok_or_else(|| not_found_exchange(&request.exchange, &vhost_name))?;
            if exchange.internal {
                return Err(AmqpException::channel(
                    ReplyCode::AccessRefused,
                    format!(
                        "cannot publish to internal exchange '{}' in vhost '{vhost_name}'",
                        request.exchange
                    ),
                ));
            }
            let mut visited: HashSet<&str> = HashSet::new();
            let mut pending = vec![exchange];
            let mut destinations = HashSet::new();
            let mut seen_queues = HashSet::new();
            while let Some(exchange) = pending.pop() {
                if !visited.insert(exchange.name.as_str()) {
                    continue;
                }
                destinations.clear();
                exchange.route(
                    &request.routing_key,
                    request.headers.as_ref(),
                    &mut destinations,
                );
                for destination in &destinations {
                    match destination {
                        Destination::Queue(id) => {
                            if seen_queues.insert(*id) {
                                targets.push(*id);
                            }
                        }
                        Destination::Exchange(name) => {
                            if let Some(next) = vhost.exchanges.get(name) {
                                pending.push(next);
                            }
                        }
                    }
                }
            }
            targets.sort_unstable();
        }
        targets.retain(|id| state.queues.contains_key(id));
        if targets.is_empty() {
            return Ok(PublishOutcome {
                routed: false,
                durable_end: None,
            });
        }
        let durable_queues: Vec<QueueId> = if request.persistent {
            targets
                .iter()
                .copied()
                .filter(|id| state.queues.get(id).is_some_and(|q| q.durable))
                .collect()
        } else {
            Vec::new()
        };
        let record = encode_publish(
            request.persistent,
            &request.exchange,
            &request.routing_key,
            &durable_queues,
            &request.properties,
            &request.body,
        );
        let refs = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let appended = self.store.append(&record, refs).map_err(|err| {
            AmqpException::connection(
                ReplyCode::InternalError,
                format!("message store failed: {err}"),
            )
        })?;
        let body_size = u32::try_from(request.body.len()).unwrap_or(u32::MAX);
        let mut settlements = Settlements::default();
        for id in &targets {
            let recoverable = durable_queues.contains(id);
            if let Some(queue) = state.queues.get_mut(id) {
                queue.push(QueueEntry {
                    message: MessageRef {
                        position: appended.position,
                        len: appended.len,
                    },
                    body_size,
                    redelivered: false,
                    recoverable,
                });
            }
            state.dispatch(*id, &mut settlements);
        }
        settlements.apply(&self.store);
        Ok(PublishOutcome {
            routed: true,
            durable_end: (!durable_queues.is_empty()).then_some(appended.end),
        })
    }

    /// `basic.get`.
    ///
    /// # Errors
    /// 404 / 405 for the queue.
    pub fn basic_get(
        &self,
        key: ChannelKey,
        queue: &str,
        no_ack: bool,
    ) -> AmqpResult<Option<GetOk>> {
        let mut state = self.state.lock();
        let vhost_name = Self::vhost_of(&state, key.connection)?;
        let queue_id = Self::queue_id(&state, key.connection, &vhost_name, queue)?;
        let Some(queue) = state.queues.get_mut(&queue_id) else {
            return Err(not_found_queue(queue, &vhost_name));
        };
        let Some(entry) = queue.pop() else {
            return Ok(None);
        };
        let message_count = queue.message_count();
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        let delivery_tag = channel.next_delivery_tag();
        if no_ack {
            let mut settlements = Settlements::default();
            settlements.settle_keep_reference(queue_id, &entry);
            settlements.apply(&self.store);
        } else {
            channel.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue_id,
                    entry,
                    consumer_tag: None,
                },
            );
        }
        Ok(Some(GetOk {
            delivery_tag,
            redelivered: entry.redelivered,
            message_count,
            message: entry.message,
            release_after_read: no_ack,
        }))
    }

    /// `basic.ack`, `basic.nack` and `basic.reject`: settles (`requeue = false` or an
    /// ack) or requeues the deliveries the tag covers.
    ///
    /// # Errors
    /// 406 PRECONDITION_FAILED for an unknown delivery tag.
    pub fn basic_settle(
        &self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> AmqpResult<()> {
        let mut state = self.state.lock();
        let Some(channel) = state.channels.get_mut(&key) else {
            return Err(AmqpException::connection(
                ReplyCode::ChannelError,
                "channel not open",
            ));
        };
        let deliveries = channel
            .take_settled(delivery_tag, multiple)
            .ok_or_else(|| {
                AmqpException::channel(
                    ReplyCode::PreconditionFailed,
                    format!("unknown delivery tag {delivery_tag}"),
                )
            })?;
        let mut settlements = Settlements::default();
        let touched = state.finish_deliveries(key, deliveries, requeue, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        state.dispatch_channel(key, &mut settlements);
        settlements.apply(&self.store);
        Ok(())
    }

    /// `basic.recover` with requeue: every unacked delivery of the channel goes back.
    pub fn basic_recover(&self, key: ChannelKey) {
        let mut state = self.state.lock();
        let deliveries: Vec<(u64, Unacked)> = state
            .channels
            .get_mut(&key)
            .map(|c| std::mem::take(&mut c.unacked).into_iter().collect())
            .unwrap_or_default();
        let mut settlements = Settlements::default();
        let touched = state.finish_deliveries(key, deliveries, true, &mut settlements);
        for queue in touched {
            state.dispatch(queue, &mut settlements);
        }
        settlements.apply(&self.store);
    }
}
