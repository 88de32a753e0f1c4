//! Events the broker sends to a connection on its own initiative (not as a reply).

use std::sync::Arc;

use crate::queue::MessageRef;

/// Something a connection must write to its peer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// `basic.deliver`: the connection reads the record and writes method, header, body.
    Deliver {
        /// Channel number.
        channel: u16,
        /// Consumer tag.
        consumer_tag: Arc<str>,
        /// Delivery tag on that channel.
        delivery_tag: u64,
        /// Whether it may have been delivered before.
        redelivered: bool,
        /// The stored message.
        message: MessageRef,
        /// The message was settled on delivery (no-ack): the connection releases the
        /// record's reference once it has read it, so its segment outlives the read.
        release_after_read: bool,
    },
    /// Server-initiated `basic.cancel` (the queue went away).
    Cancel {
        /// Channel number.
        channel: u16,
        /// Consumer tag.
        consumer_tag: Arc<str>,
    },
}
