//! Durable definitions (exchanges, queues, bindings) as one JSON document, replaced
//! atomically by the store whenever a durable definition changes. Definitions change
//! rarely, so rewriting the whole document is simpler and safer than logging deltas.

use holdfast_codec::FieldTable;
use serde::{Deserialize, Serialize};

use crate::QueueId;
use crate::arguments::QueuePolicy;
use crate::enqueue::now_ms;
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::queue::Queue;
use crate::state::{State, VHost};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Definitions {
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

#[derive(Debug, Serialize, Deserialize)]
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

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueDefinition {
    pub id: QueueId,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BindingDefinition {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Exchanges every vhost has; they are recreated, not stored.
pub fn is_builtin_exchange(name: &str) -> bool {
    name.is_empty()
        || matches!(
            name,
            "amq.direct" | "amq.fanout" | "amq.topic" | "amq.headers" | "amq.match"
        )
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
                    exchanges.push(ExchangeDefinition {
                        name: exchange.name.clone(),
                        kind: exchange.kind,
                        delay_queue: exchange.delay_queue,
                        dedup_scope: exchange.dedup_scope,
                        auto_delete: exchange.auto_delete,
                        internal: exchange.internal,
                        arguments: exchange.arguments.clone(),
                    });
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
            next_queue_id: state.next_queue_id,
            vhosts,
        }
    }

    /// Rebuilds vhosts, exchanges, empty queues and bindings into `state`.
    pub fn restore(self, state: &mut State) {
        let now = now_ms();
        state.next_queue_id = state.next_queue_id.max(self.next_queue_id);
        for definitions in self.vhosts {
            let vhost = state
                .vhosts
                .entry(definitions.name.clone())
                .or_insert_with(VHost::with_builtin_exchanges);
            let mut delay_queues = Vec::new();
            for exchange in definitions.exchanges {
                let mut restored = Exchange::new(
                    exchange.name.clone(),
                    exchange.kind,
                    true,
                    exchange.auto_delete,
                    exchange.internal,
                    exchange.arguments,
                );
                restored.delay_queue = exchange.delay_queue;
                if let Some(scope) = exchange.dedup_scope {
                    state.next_queue_id = state.next_queue_id.max(scope.0 + 1);
                    restored.dedup_scope = Some(scope);
                    restored.dedup =
                        QueuePolicy::parse(&restored.arguments, &restored.name, &definitions.name)
                            .ok()
                            .and_then(|policy| policy.deduplication)
                            .map(|(size, ttl)| crate::dedup::DedupWindow::new(size, ttl));
                }
                if let Some(id) = exchange.delay_queue {
                    delay_queues.push((id, exchange.name.clone()));
                }
                vhost.exchanges.insert(exchange.name, restored);
            }
            for queue in definitions.queues {
                vhost.queues.insert(queue.name.clone(), queue.id);
                state.next_queue_id = state.next_queue_id.max(queue.id.0 + 1);
                // Accepted when declared, so it parses; a newer version's argument that
                // this one refuses falls back to no special behaviour rather than
                // losing the queue.
                let policy = QueuePolicy::parse(&queue.arguments, &queue.name, &definitions.name)
                    .unwrap_or_default();
                state.queues.insert(
                    queue.id,
                    Queue::new(
                        queue.id,
                        queue.name,
                        definitions.name.clone(),
                        true,
                        None,
                        queue.auto_delete,
                        queue.arguments,
                        policy,
                        now,
                    ),
                );
            }
            for (id, exchange) in delay_queues {
                state.next_queue_id = state.next_queue_id.max(id.0 + 1);
                let mut queue = Queue::new(
                    id,
                    format!("amq.delayed.{exchange}"),
                    definitions.name.clone(),
                    true,
                    None,
                    false,
                    FieldTable::default(),
                    QueuePolicy::default(),
                    now,
                );
                queue.delay_for = Some(exchange);
                state.queues.insert(id, queue);
            }
            let vhost = state
                .vhosts
                .get_mut(&definitions.name)
                .expect("vhost inserted above");
            for binding in definitions.bindings {
                if let Some(exchange) = vhost.exchanges.get_mut(&binding.source) {
                    exchange.bind(Binding {
                        destination: binding.destination,
                        routing_key: binding.routing_key,
                        arguments: binding.arguments,
                    });
                }
            }
        }
    }
}
