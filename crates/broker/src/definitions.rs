//! Durable definitions (exchanges, queues, bindings). Every change to one is a record in
//! the commit log ([`DefinitionChange`], written before the change is applied, so a
//! change the log refused leaves no trace and one the client saw confirmed survives with
//! the messages that followed it). From time to time the whole set is written as a
//! checkpoint file ([`Definitions`]) stamped with the log offset it reflects; recovery
//! loads the checkpoint and applies the change records at or past that offset, so the
//! change records before it are no longer needed and their segments can go.
//!
//! Replay and the live broker apply a change through the same code
//! ([`DefinitionChange::apply`]), so what recovery rebuilds is what clients saw.
//! Cascades (an auto-delete exchange left without bindings) are separate changes with
//! records of their own, never implied by replay.

use holdfast_codec::FieldTable;
use serde::{Deserialize, Serialize};

use crate::QueueId;
use crate::arguments::QueuePolicy;
use crate::enqueue::now_ms;
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::queue::Queue;
use crate::state::{Settlements, State, VHost};

/// The checkpoint of every durable definition.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Definitions {
    /// Log offset this checkpoint reflects: every definition record before it is in it,
    /// none at or after it. 0 in files from before definitions were logged.
    #[serde(default)]
    pub as_of: u64,
    pub next_queue_id: u64,
    pub vhosts: Vec<VHostDefinitions>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VHostDefinitions {
    pub name: String,
    pub exchanges: Vec<ExchangeDefinition>,
    pub queues: Vec<QueueDefinition>,
    pub bindings: Vec<BindingDefinition>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeDefinition {
    pub name: String,
    pub kind: ExchangeKind,
    /// The hidden queue of an `x-delayed-message` exchange.
    #[serde(default)]
    pub delay_queue: Option<QueueId>,
    /// The id of its deduplication window.
    #[serde(default)]
    pub dedup_scope: Option<QueueId>,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDefinition {
    pub id: QueueId,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindingDefinition {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl BindingDefinition {
    /// The binding as its source exchange holds it.
    #[must_use]
    pub fn binding(&self) -> Binding {
        Binding {
            destination: self.destination.clone(),
            routing_key: self.routing_key.clone(),
            arguments: self.arguments.clone(),
        }
    }
}

/// One change to the durable definitions, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum DefinitionChange {
    /// A durable exchange (with its delay queue and deduplication window, if any).
    DeclareExchange {
        vhost: String,
        exchange: ExchangeDefinition,
    },
    /// An exchange deleted, with every binding to it and its delay queue.
    DeleteExchange { vhost: String, name: String },
    /// A durable queue.
    DeclareQueue {
        vhost: String,
        queue: QueueDefinition,
    },
    /// A queue deleted, with its messages and every binding to it.
    DeleteQueue { vhost: String, id: QueueId },
    /// A binding between durable ends.
    Bind {
        vhost: String,
        binding: BindingDefinition,
    },
    /// A binding removed.
    Unbind {
        vhost: String,
        binding: BindingDefinition,
    },
}

/// Exchanges every vhost has; they are recreated, not stored.
pub fn is_builtin_exchange(name: &str) -> bool {
    name.is_empty()
        || matches!(
            name,
            "amq.direct" | "amq.fanout" | "amq.topic" | "amq.headers" | "amq.match"
        )
}

impl DefinitionChange {
    /// The record's payload (after the record kind byte).
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("definitions serialise")
    }

    /// Parses a record's payload.
    ///
    /// # Errors
    /// When the bytes are not a change this version knows.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Applies the change to `state`, live or in replay. Changes that name something
    /// that is not there (a delete replayed after a checkpoint that already reflects it)
    /// do nothing.
    pub fn apply(self, state: &mut State, settlements: &mut Settlements<'_>) {
        match self {
            DefinitionChange::DeclareExchange { vhost, exchange } => {
                declare_exchange(state, &vhost, exchange);
            }
            DefinitionChange::DeleteExchange { vhost, name } => {
                state.remove_exchange(&vhost, &name, settlements);
            }
            DefinitionChange::DeclareQueue { vhost, queue } => declare_queue(state, &vhost, queue),
            DefinitionChange::DeleteQueue { vhost: _, id } => {
                // The exchanges this leaves without bindings are the caller's to delete,
                // each with a record of its own.
                let _ = state.delete_queue(id, settlements);
            }
            DefinitionChange::Bind { vhost, binding } => {
                if let Some(exchange) = state
                    .vhosts
                    .get_mut(&vhost)
                    .and_then(|v| v.exchanges.get_mut(&binding.source))
                {
                    exchange.bind(binding.binding());
                }
            }
            DefinitionChange::Unbind { vhost, binding } => {
                if let Some(exchange) = state
                    .vhosts
                    .get_mut(&vhost)
                    .and_then(|v| v.exchanges.get_mut(&binding.source))
                {
                    exchange.unbind(&binding.binding());
                }
            }
        }
    }
}

/// Adds a durable exchange, its delay queue and its deduplication window.
fn declare_exchange(state: &mut State, vhost_name: &str, definition: ExchangeDefinition) {
    let mut exchange = Exchange::new(
        definition.name.clone(),
        definition.kind,
        true,
        definition.auto_delete,
        definition.internal,
        definition.arguments,
    );
    exchange.delay_queue = definition.delay_queue;
    if let Some(scope) = definition.dedup_scope {
        state.next_queue_id = state.next_queue_id.max(scope.0 + 1);
        exchange.dedup_scope = Some(scope);
        exchange.dedup = QueuePolicy::parse(&exchange.arguments, &exchange.name, vhost_name)
            .ok()
            .and_then(|policy| policy.deduplication)
            .map(|(size, ttl)| crate::dedup::DedupWindow::new(size, ttl));
    }
    if let Some(id) = definition.delay_queue {
        state.next_queue_id = state.next_queue_id.max(id.0 + 1);
        let mut queue = Queue::new(
            id,
            format!("amq.delayed.{}", definition.name),
            vhost_name.to_owned(),
            true,
            None,
            false,
            FieldTable::default(),
            QueuePolicy::default(),
            now_ms(),
        );
        queue.delay_for = Some(definition.name.clone());
        state.queues.insert(id, queue);
    }
    state
        .vhosts
        .entry(vhost_name.to_owned())
        .or_insert_with(VHost::with_builtin_exchanges)
        .exchanges
        .insert(definition.name, exchange);
}

/// Adds a durable queue, empty.
fn declare_queue(state: &mut State, vhost_name: &str, definition: QueueDefinition) {
    state.next_queue_id = state.next_queue_id.max(definition.id.0 + 1);
    // Accepted when declared, so it parses; a newer version's argument that this one
    // refuses falls back to no special behaviour rather than losing the queue.
    let policy =
        QueuePolicy::parse(&definition.arguments, &definition.name, vhost_name).unwrap_or_default();
    state
        .vhosts
        .entry(vhost_name.to_owned())
        .or_insert_with(VHost::with_builtin_exchanges)
        .queues
        .insert(definition.name.clone(), definition.id);
    state.queues.insert(
        definition.id,
        Queue::new(
            definition.id,
            definition.name,
            vhost_name.to_owned(),
            true,
            None,
            definition.auto_delete,
            definition.arguments,
            policy,
            now_ms(),
        ),
    );
}

/// What of an exchange a checkpoint or a declare record keeps.
#[must_use]
pub fn exchange_definition(exchange: &Exchange) -> ExchangeDefinition {
    ExchangeDefinition {
        name: exchange.name.clone(),
        kind: exchange.kind,
        delay_queue: exchange.delay_queue,
        dedup_scope: exchange.dedup_scope,
        auto_delete: exchange.auto_delete,
        internal: exchange.internal,
        arguments: exchange.arguments.clone(),
    }
}

impl Definitions {
    /// What of `state` must survive a restart.
    pub fn snapshot(state: &State) -> Self {
        let is_durable_queue = |id: &QueueId| {
            state
                .queues
                .get(id)
                .is_some_and(|q| q.durable && q.exclusive_owner.is_none())
        };
        let mut vhosts = Vec::new();
        let mut names: Vec<&String> = state.vhosts.keys().collect();
        names.sort();
        for name in names {
            let vhost = &state.vhosts[name];
            let mut exchanges = Vec::new();
            let mut bindings = Vec::new();
            for exchange in vhost.exchanges.values() {
                if !exchange.durable {
                    continue;
                }
                if !is_builtin_exchange(&exchange.name) {
                    exchanges.push(exchange_definition(exchange));
                }
                for binding in exchange.bindings() {
                    let durable = match &binding.destination {
                        Destination::Queue(id) => is_durable_queue(id),
                        Destination::Exchange(name) => {
                            vhost.exchanges.get(name).is_some_and(|e| e.durable)
                        }
                    };
                    if durable {
                        bindings.push(BindingDefinition {
                            source: exchange.name.clone(),
                            destination: binding.destination.clone(),
                            routing_key: binding.routing_key.clone(),
                            arguments: binding.arguments.clone(),
                        });
                    }
                }
            }
            let mut queues: Vec<QueueDefinition> = vhost
                .queues
                .values()
                .filter(|id| is_durable_queue(id))
                .filter_map(|id| state.queues.get(id))
                .map(|queue| QueueDefinition {
                    id: queue.id,
                    name: queue.name.clone(),
                    auto_delete: queue.auto_delete,
                    arguments: queue.arguments.clone(),
                })
                .collect();
            queues.sort_by_key(|q| q.id);
            exchanges.sort_by(|a, b| a.name.cmp(&b.name));
            vhosts.push(VHostDefinitions {
                name: name.clone(),
                exchanges,
                queues,
                bindings,
            });
        }
        Definitions {
            as_of: 0,
            next_queue_id: state.next_queue_id,
            vhosts,
        }
    }

    /// Rebuilds vhosts, exchanges, empty queues and bindings into `state`, through the
    /// same code that applies logged changes.
    pub fn restore(self, state: &mut State, settlements: &mut Settlements<'_>) {
        state.next_queue_id = state.next_queue_id.max(self.next_queue_id);
        for definitions in self.vhosts {
            let vhost = definitions.name;
            state
                .vhosts
                .entry(vhost.clone())
                .or_insert_with(VHost::with_builtin_exchanges);
            for exchange in definitions.exchanges {
                DefinitionChange::DeclareExchange {
                    vhost: vhost.clone(),
                    exchange,
                }
                .apply(state, settlements);
            }
            for queue in definitions.queues {
                DefinitionChange::DeclareQueue {
                    vhost: vhost.clone(),
                    queue,
                }
                .apply(state, settlements);
            }
            for binding in definitions.bindings {
                DefinitionChange::Bind {
                    vhost: vhost.clone(),
                    binding,
                }
                .apply(state, settlements);
            }
        }
    }
}
