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
        /// Failed deliveries so far; sent as `x-delivery-count` when non-zero.
        delivery_count: u32,
        /// The stored message. The delivery holds its own reference on the record: the
        /// connection must release it once it has read the record, so the segment
        /// outlives the read even if the message is settled elsewhere meanwhile.
        message: MessageRef,
    },
    /// The broker closes a channel on its own (e.g. a delivery was not acknowledged
    /// within the consumer timeout); its state in the broker is already gone.
    CloseChannel {
        /// Channel number.
        channel: u16,
        /// Reply code.
        code: crate::ReplyCode,
        /// Reply text, without the code name.
        text: String,
    },
    /// Server-initiated `basic.cancel` (the queue went away).
    Cancel {
        /// Channel number.
        channel: u16,
        /// Consumer tag.
        consumer_tag: Arc<str>,
    },
}
