//! Exchanges and their bindings. Each exchange keeps its bindings as the canonical list
//! (what definitions persist and what unbind edits) plus an index for its kind, rebuilt
//! when bindings change: bindings change rarely, publishes route constantly.

use std::collections::{HashMap, HashSet};

use holdfast_codec::FieldTable;
use serde::{Deserialize, Serialize};

use crate::QueueId;
use crate::headers::headers_match;
use crate::topic::TopicTrie;

/// The routing algorithm of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every bound destination.
    Fanout,
    /// Dot-separated patterns with `*` and `#`.
    Topic,
    /// Message headers against binding arguments.
    Headers,
}

impl ExchangeKind {
    /// Parses the type name a client declares.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }

    /// The type name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// The exchange type of RabbitMQ's delayed-message plugin.
pub const DELAYED_MESSAGE: &str = "x-delayed-message";

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// A queue, by id (names can be re-declared; ids are never reused).
    Queue(QueueId),
    /// Another exchange, by name (exchange-to-exchange binding).
    Exchange(String),
}

/// One binding from an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// Where it leads.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub arguments: FieldTable,
}

#[derive(Debug, Default)]
enum RoutingIndex {
    #[default]
    Empty,
    Direct(HashMap<String, Vec<Destination>>),
    Topic(TopicTrie<Destination>),
}

/// An exchange.
#[derive(Debug)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted when its last binding (as a source) goes.
    pub auto_delete: bool,
    /// Clients may not publish to it directly.
    pub internal: bool,
    /// Declared arguments, kept as given.
    pub arguments: FieldTable,
    /// For an `x-delayed-message` exchange (which routes like its `x-delayed-type`,
    /// `kind`): the hidden queue holding messages until their `x-delay` has passed.
    pub delay_queue: Option<QueueId>,
    /// `x-message-deduplication` on the exchange: recent keys; duplicates are not
    /// routed at all.
    pub dedup: Option<crate::dedup::DedupWindow>,
    /// The id its window is persisted under (from the queue id sequence, never reused).
    pub dedup_scope: Option<QueueId>,
    bindings: Vec<Binding>,
    index: RoutingIndex,
}

impl Exchange {
    /// A new exchange without bindings.
    #[must_use]
    pub fn new(
        name: String,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        Self {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            delay_queue: None,
            dedup: None,
            dedup_scope: None,
            bindings: Vec::new(),
            index: RoutingIndex::Empty,
        }
    }

    /// The type name a client declares it with.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        if self.delay_queue.is_some() {
            DELAYED_MESSAGE
        } else {
            self.kind.name()
        }
    }

    /// The bindings from this exchange.
    #[must_use]
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds a binding; binding the same thing twice is a no-op (as in RabbitMQ).
    pub fn bind(&mut self, binding: Binding) -> bool {
        if self.bindings.contains(&binding) {
            return false;
        }
        self.bindings.push(binding);
        self.reindex();
        true
    }

    /// Removes a binding; returns whether it existed.
    pub fn unbind(&mut self, binding: &Binding) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|existing| existing != binding);
        let removed = self.bindings.len() != before;
        if removed {
            self.reindex();
        }
        removed
    }

    /// Removes every binding to `destination`; returns how many.
    pub fn unbind_destination(&mut self, destination: &Destination) -> usize {
        let before = self.bindings.len();
        self.bindings
            .retain(|existing| &existing.destination != destination);
        let removed = before - self.bindings.len();
        if removed > 0 {
            self.reindex();
        }
        removed
    }

    fn reindex(&mut self) {
        self.index = match self.kind {
            ExchangeKind::Direct => {
                let mut map: HashMap<String, Vec<Destination>> = HashMap::new();
                for binding in &self.bindings {
                    let entry = map.entry(binding.routing_key.clone()).or_default();
                    if !entry.contains(&binding.destination) {
                        entry.push(binding.destination.clone());
                    }
                }
                RoutingIndex::Direct(map)
            }
            ExchangeKind::Topic => {
                let mut trie = TopicTrie::default();
                for binding in &self.bindings {
                    trie.insert(&binding.routing_key, binding.destination.clone());
                }
                RoutingIndex::Topic(trie)
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => RoutingIndex::Empty,
        };
    }

    /// Adds to `out` the destinations a message with this key and these headers reaches
    /// through this exchange alone (exchange destinations are followed by the caller).
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut HashSet<Destination>,
    ) {
        match (&self.kind, &self.index) {
            (ExchangeKind::Fanout, _) => {
                out.extend(self.bindings.iter().map(|b| b.destination.clone()));
            }
            (ExchangeKind::Direct, RoutingIndex::Direct(map)) => {
                if let Some(destinations) = map.get(routing_key) {
                    out.extend(destinations.iter().cloned());
                }
            }
            (ExchangeKind::Topic, RoutingIndex::Topic(trie)) => trie.route(routing_key, out),
            (ExchangeKind::Headers, _) => {
                for binding in &self.bindings {
                    if headers_match(&binding.arguments, headers) {
                        out.insert(binding.destination.clone());
                    }
                }
            }
            _ => {}
        }
    }
}
