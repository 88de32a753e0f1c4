//! All broker state behind the one lock, and the internal operations that keep its parts
//! consistent: dispatching to consumers, settling, requeueing, deleting queues.

use std::collections::HashSet;
use std::sync::Arc;

use holdfast_codec::FieldTable;
use holdfast_store::{Durability, Store};
use tracing::error;

use crate::channel::{ChannelState, Unacked};
use crate::dead_letter::DeathReason;
use crate::enqueue::now_ms;
use crate::exchange::{Destination, Exchange, ExchangeKind};
use crate::outbound::Outbound;
use crate::queue::{Queue, QueueEntry};
use crate::record::{encode_ack, encode_requeue};
use crate::{ChannelKey, ConnectionId, QueueId};

/// The maps behind the broker lock, looked up several times per message: foldhash
/// (randomly seeded per map) instead of SipHash, which was ~4% of broker CPU on a
/// publish load.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A vhost's names.
#[derive(Debug, Default)]
pub struct VHost {
    /// Exchanges by name.
    pub exchanges: FastMap<String, Exchange>,
    /// Queue ids by name.
    pub queues: FastMap<String, QueueId>,
}

impl VHost {
    /// A vhost with the exchanges every AMQP broker predeclares.
    pub fn with_builtin_exchanges() -> Self {
        let mut vhost = VHost::default();
        for (name, kind) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            vhost.exchanges.insert(
                name.to_owned(),
                Exchange::new(
                    name.to_owned(),
                    kind,
                    true,
                    false,
                    false,
                    FieldTable::default(),
                ),
            );
        }
        vhost
    }
}

/// A connection as the broker sees it.
pub struct ConnectionState {
    /// The vhost it opened.
    pub vhost: Arc<str>,
    /// Where its events go.
    pub outbound: crate::OutboundSink,
    /// Open channel numbers.
    pub channels: HashSet<u16>,
    /// Exclusive queues it owns.
    pub exclusive_queues: HashSet<QueueId>,
}

/// Everything behind the broker lock.
pub struct State {
    /// The log, for writing messages and reading them back when dead-lettering.
    pub store: Store,
    /// Vhosts by name.
    pub vhosts: FastMap<String, VHost>,
    /// Queues by id.
    pub queues: FastMap<QueueId, Queue>,
    /// Open connections.
    pub connections: FastMap<ConnectionId, ConnectionState>,
    /// Open channels.
    pub channels: FastMap<ChannelKey, ChannelState>,
    /// Next queue id to hand out; persisted with the definitions.
    pub next_queue_id: u64,
    /// Next connection id.
    pub next_connection_id: ConnectionId,
    /// Ack timeout for deliveries of queues without `x-consumer-timeout`, ms.
    pub consumer_timeout: u64,
    /// The log's segment size, to tell when a checkpoint has fallen behind.
    pub segment_size: u64,
    /// The last deduplication checkpoint record (pinned in the log) and when it was
    /// written.
    pub dedup_checkpoint: Option<(holdfast_store::LogPosition, u64)>,
    /// Definition records not yet reflected by the definitions checkpoint, oldest first;
    /// each is pinned in the log until a checkpoint covers it.
    pub definition_records: Vec<holdfast_store::LogPosition>,
    /// Where the last definition record ends: a reply to a definition method leaves
    /// only once the log is durable up to here (also for a re-declare of something
    /// whose record is still on its way to disk).
    pub definitions_end: u64,
    /// The fsync policy confirms on write (`never`, `interval`): a definition record is
    /// then fsynced at once, since a declare-ok promises more than a message confirm.
    pub sync_definitions: bool,
}

impl State {
    /// Empty state over `store`.
    pub fn new(store: Store, consumer_timeout: u64, segment_size: u64) -> State {
        State {
            store,
            vhosts: FastMap::default(),
            queues: FastMap::default(),
            connections: FastMap::default(),
            channels: FastMap::default(),
            next_queue_id: 0,
            next_connection_id: 0,
            consumer_timeout,
            segment_size,
            dedup_checkpoint: None,
            definition_records: Vec::new(),
            definitions_end: 0,
            sync_definitions: false,
        }
    }
}

/// What becomes of deliveries taken off a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Acknowledged: gone.
    Ack,
    /// Returned to the queue because the channel closed or the client asked to recover.
    Requeue,
    /// The consumer asked to try again later (nack/reject with requeue): returned to the
    /// queue, after the queue's `x-redelivery-delay` backoff if it has one.
    Retry,
    /// Rejected without requeue: dead-lettered, or dropped without a DLX.
    Reject,
}

/// Settlements that must reach the log: ack records for recoverable entries, and
/// references to release. Collected during an operation and applied once at its end.
#[derive(Debug)]
pub struct Settlements<'a> {
    store: &'a Store,
    acks: Vec<(QueueId, u64)>,
    requeues: Vec<(QueueId, u64)>,
    releases: Vec<holdfast_store::LogPosition>,
}

impl<'a> Settlements<'a> {
    /// Nothing settled yet.
    pub fn new(store: &'a Store) -> Self {
        Self {
            store,
            acks: Vec::new(),
            requeues: Vec::new(),
            releases: Vec::new(),
        }
    }

    /// Pins a record for a delivery in flight, at once: the connection may read and
    /// release it on another thread before this operation ends. Without the pin, a
    /// message requeued by a closing channel, redelivered elsewhere and acked could have
    /// its segment deleted before a stale delivery event of the first channel is read.
    pub fn pin(&mut self, position: holdfast_store::LogPosition) {
        self.store.retain(position);
    }

    /// Drops a reference without any record (the removal is logged elsewhere, or the
    /// entry was never recoverable).
    pub fn release(&mut self, position: holdfast_store::LogPosition) {
        self.releases.push(position);
    }

    /// Records a failed delivery of a recoverable entry, so its count survives restarts.
    pub fn count_requeue(&mut self, queue: QueueId, entry: &QueueEntry) {
        if entry.recoverable {
            self.requeues.push((queue, entry.message.position.0));
        }
    }

    /// Records that `queue` no longer holds `entry`.
    pub fn settle(&mut self, queue: QueueId, entry: &QueueEntry) {
        if entry.recoverable {
            self.acks.push((queue, entry.message.position.0));
        }
        self.releases.push(entry.message.position);
    }

    /// Like `settle`, but the reference is released later by whoever still reads it.
    pub fn settle_keep_reference(&mut self, queue: QueueId, entry: &QueueEntry) {
        if entry.recoverable {
            self.acks.push((queue, entry.message.position.0));
        }
    }

    /// Writes one ack record for all recoverable entries, then releases references.
    /// The ack needs no write or fsync of its own (it is deferred to the next write of
    /// the log, or the housekeeping tick): if it is lost in a crash the message comes
    /// back marked redelivered, which at-least-once delivery allows. Releasing first is
    /// safe: a segment deleted before its ack record is written takes the message with it.
    pub fn apply(self) {
        let store = self.store;
        if !self.requeues.is_empty()
            && let Err(err) = store.append(&encode_requeue(&self.requeues), 0, Durability::Lazy)
        {
            error!(cause = %err, "requeue record could not be written");
        }
        if !self.acks.is_empty()
            && let Err(err) = store.append_deferred(encode_ack(&self.acks))
        {
            error!(cause = %err, "ack record could not be written");
        }
        for position in self.releases {
            store.release(position);
        }
    }
}

impl State {
    /// Delivers ready messages of `queue_id` to consumers with credit, round-robin (or
    /// only to the first consumer, for a single-active-consumer queue). Expired heads
    /// are dead-lettered on the way, never delivered.
    pub fn dispatch(&mut self, queue_id: QueueId, settlements: &mut Settlements<'_>) {
        // The clock is read once, and only when it matters (a message to expire or to
        // deliver): a publish to a queue without consumers never needs it.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(now_ms);
        loop {
            let head_may_expire = self
                .queues
                .get(&queue_id)
                .and_then(|queue| queue.ready.front())
                .is_some_and(|entry| entry.expires_at != u64::MAX);
            if head_may_expire {
                self.expire_head(queue_id, now(), settlements);
            }
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                return;
            };
            if queue.ready.is_empty() || queue.consumers.is_empty() {
                return;
            }
            let count = if queue.policy.single_active_consumer {
                1
            } else {
                queue.consumers.len()
            };
            let chosen = (0..count)
                .map(|i| (queue.cursor + i) % count)
                .find(|&index| {
                    let consumer = &queue.consumers[index];
                    consumer.has_credit()
                        && self
                            .channels
                            .get(&consumer.channel)
                            .is_some_and(ChannelState::can_deliver)
                });
            let Some(index) = chosen else {
                return;
            };
            queue.cursor = (index + 1) % count;
            let Some(entry) = queue.pop() else {
                return;
            };
            let consumer = &mut queue.consumers[index];
            let Some(channel) = self.channels.get_mut(&consumer.channel) else {
                return;
            };
            let delivery_tag = channel.next_delivery_tag();
            if consumer.no_ack {
                // The queue's reference passes to the delivery, released after the read.
                settlements.settle_keep_reference(queue_id, &entry);
            } else {
                settlements.pin(entry.message.position);
                consumer.unacked += 1;
                channel.unacked.insert(
                    delivery_tag,
                    Unacked {
                        queue: queue_id,
                        entry,
                        consumer_tag: Some(consumer.tag.clone()),
                        delivered_at: now(),
                    },
                );
            }
            let event = Outbound::Deliver {
                channel: consumer.channel.channel,
                consumer_tag: consumer.tag.clone(),
                delivery_tag,
                redelivered: entry.redelivered,
                delivery_count: entry.delivery_count,
                message: entry.message,
            };
            let sent = self
                .connections
                .get(&consumer.channel.connection)
                .is_some_and(|connection| (connection.outbound)(event));
            if !sent {
                // The connection is gone: drop the reference it would have released
                // after reading (its unacked entry comes back when it disconnects).
                settlements.releases.push(entry.message.position);
            }
        }
    }

    /// Dispatches every queue that a consumer of `channel` reads from.
    pub fn dispatch_channel(&mut self, channel: ChannelKey, settlements: &mut Settlements<'_>) {
        let queues: HashSet<QueueId> = self
            .channels
            .get(&channel)
            .map(|state| state.consumers.values().copied().collect())
            .unwrap_or_default();
        for queue in queues {
            self.dispatch(queue, settlements);
        }
    }

    /// Finishes deliveries taken off a channel: requeued (redelivered) or settled.
    /// Frees the consumers' credit; the caller dispatches afterwards.
    pub fn finish_deliveries(
        &mut self,
        channel: ChannelKey,
        deliveries: Vec<(u64, Unacked)>,
        disposition: Disposition,
        settlements: &mut Settlements<'_>,
    ) -> HashSet<QueueId> {
        let mut touched = HashSet::new();
        for (_, unacked) in deliveries {
            let Some(queue) = self.queues.get_mut(&unacked.queue) else {
                // The queue was deleted while the message was out: only the reference
                // remains to drop.
                settlements.releases.push(unacked.entry.message.position);
                continue;
            };
            if let Some(tag) = &unacked.consumer_tag
                && let Some(consumer) = queue
                    .consumers
                    .iter_mut()
                    .find(|c| c.channel == channel && &c.tag == tag)
            {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
            touched.insert(unacked.queue);
            if disposition == Disposition::Ack {
                settlements.settle(unacked.queue, &unacked.entry);
            } else if matches!(disposition, Disposition::Requeue | Disposition::Retry) {
                let mut entry = unacked.entry;
                entry.delivery_count = entry.delivery_count.saturating_add(1);
                if queue
                    .policy
                    .delivery_limit
                    .is_some_and(|limit| entry.delivery_count > limit)
                {
                    self.dead_letter(
                        unacked.queue,
                        entry,
                        DeathReason::DeliveryLimit,
                        settlements,
                    );
                } else {
                    settlements.count_requeue(unacked.queue, &entry);
                    match queue.policy.redelivery_delay {
                        Some(backoff) if disposition == Disposition::Retry => {
                            let delay = backoff.delay(entry.delivery_count);
                            queue.hold_for_retry(entry, now_ms().saturating_add(delay));
                        }
                        _ => queue.requeue(entry),
                    }
                }
            } else if queue.policy.dead_letter_exchange.is_some() {
                self.dead_letter(
                    unacked.queue,
                    unacked.entry,
                    DeathReason::Rejected,
                    settlements,
                );
            } else {
                queue.stats.count_death(DeathReason::Rejected);
                settlements.settle(unacked.queue, &unacked.entry);
            }
        }
        touched
    }

    /// Removes a consumer from its queue and channel. Returns the queue id if the queue
    /// is auto-delete and now has no consumers (the caller deletes it).
    pub fn remove_consumer(&mut self, channel: ChannelKey, tag: &Arc<str>) -> Option<QueueId> {
        let queue_id = self.channels.get_mut(&channel)?.consumers.remove(tag)?;
        let queue = self.queues.get_mut(&queue_id)?;
        queue
            .consumers
            .retain(|c| !(c.channel == channel && &c.tag == tag));
        if queue.cursor >= queue.consumers.len() {
            queue.cursor = 0;
        }
        (queue.auto_delete && queue.had_consumer && queue.consumers.is_empty()).then_some(queue_id)
    }

    /// Deletes a queue: its bindings, its ready messages (settled), and its consumers
    /// (told with a server-side cancel). Deliveries still out are settled when they come
    /// back. Returns the number of ready messages dropped and the auto-delete exchanges
    /// it left without bindings: deleting those is the caller's (a change of its own).
    pub fn delete_queue(
        &mut self,
        queue_id: QueueId,
        settlements: &mut Settlements<'_>,
    ) -> QueueRemoval {
        let Some(mut queue) = self.queues.remove(&queue_id) else {
            return QueueRemoval::default();
        };
        let dropped = queue.message_count();
        let mut emptied = Vec::new();
        while let Some(entry) = queue.pop() {
            settlements.settle(queue_id, &entry);
        }
        for entry in std::mem::take(&mut queue.held).into_values() {
            settlements.settle(queue_id, &entry);
        }
        // Deleting a queue deletes what waited in it for a dead-letter target too.
        for pending in std::mem::take(&mut queue.dead_letter_pending) {
            settlements.settle(queue_id, &pending.entry);
        }
        for consumer in &queue.consumers {
            if let Some(channel) = self.channels.get_mut(&consumer.channel) {
                channel.consumers.remove(&consumer.tag);
            }
            if let Some(connection) = self.connections.get(&consumer.channel.connection) {
                (connection.outbound)(Outbound::Cancel {
                    channel: consumer.channel.channel,
                    consumer_tag: consumer.tag.clone(),
                });
            }
        }
        if let Some(owner) = queue.exclusive_owner
            && let Some(connection) = self.connections.get_mut(&owner)
        {
            connection.exclusive_queues.remove(&queue_id);
        }
        if let Some(vhost) = self.vhosts.get_mut(&queue.vhost) {
            if vhost.queues.get(&queue.name) == Some(&queue_id) {
                vhost.queues.remove(&queue.name);
            }
            let destination = Destination::Queue(queue_id);
            for exchange in vhost.exchanges.values_mut() {
                if exchange.unbind_destination(&destination) > 0
                    && exchange.auto_delete
                    && exchange.bindings().is_empty()
                {
                    emptied.push(exchange.name.clone());
                }
            }
        }
        QueueRemoval {
            dropped,
            vhost: queue.vhost,
            emptied_exchanges: emptied,
        }
    }

    /// Deletes an exchange, every binding to it and its delay queue (with the messages
    /// still waiting in it, as in the RabbitMQ plugin).
    pub fn remove_exchange(&mut self, vhost: &str, name: &str, settlements: &mut Settlements<'_>) {
        let Some(exchanges) = self.vhosts.get_mut(vhost).map(|v| &mut v.exchanges) else {
            return;
        };
        let Some(exchange) = exchanges.remove(name) else {
            return;
        };
        let destination = Destination::Exchange(name.to_owned());
        for other in exchanges.values_mut() {
            other.unbind_destination(&destination);
        }
        if let Some(queue) = exchange.delay_queue {
            let _ = self.delete_queue(queue, settlements);
        }
    }
}

/// What deleting a queue did.
#[derive(Debug, Default)]
pub struct QueueRemoval {
    /// Ready messages dropped.
    pub dropped: u32,
    /// Its vhost.
    pub vhost: String,
    /// Auto-delete exchanges left without bindings, still there.
    pub emptied_exchanges: Vec<String>,
}
