//! Holdfast's broker core: vhosts, exchanges, bindings, routing, queues, consumers,
//! acknowledgements and confirm bookkeeping. It knows nothing of sockets: the amqp layer
//! calls [`Broker`] with decoded commands and receives [`Outbound`] events for the
//! deliveries it must write.
//!
//! # Locking
//! One mutex guards all broker state ([`Broker`]'s `state`). The store has its own
//! internal locks and is only ever called *inside* the broker lock or with no lock held,
//! never the other way round, so the order is always broker state → store.
#![warn(missing_docs)]

pub mod alarm;
mod arguments;
mod broker;
mod channel;
mod dead_letter;
mod dedup;
mod definitions;
mod delayed;
mod enqueue;
mod error;
mod exchange;
mod headers;
mod outbound;
mod queue;
mod record;
mod recovery;
mod state;
mod topic;

use serde::{Deserialize, Serialize};

pub use alarm::{AlarmConfig, AlarmState, Alarms, MemoryWatermark};
pub use broker::{
    Broker, BrokerConfig, ConfirmWatermark, ConsumeRequest, GetOk, PublishOutcome, PublishRequest,
    QueueDeclare, QueueDeclareOk,
};
pub use error::{AmqpException, AmqpResult, BrokerError, ReplyCode, Scope};
pub use exchange::ExchangeKind;
pub use outbound::Outbound;
pub use queue::MessageRef;
pub use record::StoredMessage;
pub use state::Disposition;
/// The topic-pattern trie behind topic exchanges; public for `benches/routing.rs`.
pub use topic::TopicTrie;

/// Identifies a connection for the lifetime of the process.
pub type ConnectionId = u64;

/// A channel of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The connection.
    pub connection: ConnectionId,
    /// The channel number.
    pub channel: u16,
}

/// A queue's identity; never reused, also across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueId(pub u64);

/// Where the broker sends a connection's [`Outbound`] events; returns false once the
/// connection is gone. A callback rather than a channel type so the connection can put
/// events in the same ordered queue as its own replies.
pub type OutboundSink = Box<dyn Fn(Outbound) -> bool + Send + Sync>;

/// The vhost every installation has.
pub const DEFAULT_VHOST: &str = "/";

#[cfg(test)]
mod tests;
