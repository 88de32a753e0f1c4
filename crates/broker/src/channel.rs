//! What the broker keeps per channel: deliveries awaiting acknowledgement, prefetch
//! limits, consumers, flow.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::QueueId;
use crate::queue::QueueEntry;

/// A delivery not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Unacked {
    /// The queue it came from (it may since have been deleted).
    pub queue: QueueId,
    /// The entry, to requeue or settle.
    pub entry: QueueEntry,
    /// The consumer it went to; `None` for `basic.get`.
    pub consumer_tag: Option<Arc<str>>,
    /// When it was delivered, ms since the UNIX epoch (for the consumer ack timeout).
    pub delivered_at: u64,
}

/// Per-channel state.
#[derive(Debug)]
pub struct ChannelState {
    /// Prefetch given to consumers created from now on (`basic.qos global=false`).
    pub consumer_prefetch: u16,
    /// Limit shared by all consumers of the channel (`basic.qos global=true`).
    pub channel_prefetch: u16,
    /// Deliveries awaiting ack, by delivery tag.
    pub unacked: BTreeMap<u64, Unacked>,
    /// Last delivery tag handed out.
    pub last_delivery_tag: u64,
    /// Consumers on this channel and their queues.
    pub consumers: HashMap<Arc<str>, QueueId>,
    /// `channel.flow`: deliveries paused when false.
    pub flow_active: bool,
}

impl Default for ChannelState {
    fn default() -> Self {
        Self {
            consumer_prefetch: 0,
            channel_prefetch: 0,
            unacked: BTreeMap::new(),
            last_delivery_tag: 0,
            consumers: HashMap::new(),
            flow_active: true,
        }
    }
}

impl ChannelState {
    /// Whether the channel-wide limit and flow allow another delivery.
    #[must_use]
    pub fn can_deliver(&self) -> bool {
        self.flow_active
            && (self.channel_prefetch == 0
                || self.unacked.len() < usize::from(self.channel_prefetch))
    }

    /// The next delivery tag.
    pub fn next_delivery_tag(&mut self) -> u64 {
        self.last_delivery_tag += 1;
        self.last_delivery_tag
    }

    /// Removes and returns the deliveries an ack/nack of `tag` with `multiple` covers;
    /// `None` if `tag` is unknown (tag 0 with `multiple` means all).
    pub fn take_settled(&mut self, tag: u64, multiple: bool) -> Option<Vec<(u64, Unacked)>> {
        if multiple {
            if tag == 0 {
                return Some(std::mem::take(&mut self.unacked).into_iter().collect());
            }
            if !self.unacked.contains_key(&tag) {
                return None;
            }
            let rest = self.unacked.split_off(&(tag + 1));
            let settled = std::mem::replace(&mut self.unacked, rest);
            Some(settled.into_iter().collect())
        } else {
            self.unacked.remove(&tag).map(|u| vec![(tag, u)])
        }
    }
}
