//! The message path inside the broker lock: routing, writing a message once, enqueueing
//! it everywhere it goes, length limits, expiry and dead-lettering. Client publishes and
//! dead-letter moves take the same path, so a dead-lettered copy obeys the target
//! queues' limits and TTLs like any other message.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use holdfast_codec::FieldTable;
use holdfast_store::{Durability, StoreError};
use tracing::warn;

use crate::QueueId;
use crate::arguments::Overflow;
use crate::dead_letter::DeathReason;
use crate::exchange::Destination;
use crate::queue::{MessageRef, QueueEntry};
use crate::record::{NewPublish, encode_publish};
use crate::state::{Settlements, State};

/// Milliseconds since the UNIX epoch: TTLs are wall-clock, so they survive restarts.
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When an entry expires: the earlier of the queue's and the message's TTL, counted
/// from when the broker took the message. `u64::MAX` is never.
#[must_use]
pub fn expiry(published_at: u64, queue_ttl: Option<u64>, message_ttl: Option<u64>) -> u64 {
    match (queue_ttl, message_ttl) {
        (None, None) => u64::MAX,
        (Some(ttl), None) | (None, Some(ttl)) => published_at.saturating_add(ttl),
        (Some(a), Some(b)) => published_at.saturating_add(a.min(b)),
    }
}

/// The most durable queues one persistent message may reach (a publish record counts
/// them in 16 bits). A wider fan-out is refused whole (the publisher gets a nack).
pub const MAX_DURABLE_TARGETS: usize = u16::MAX as usize;

/// A message on its way into queues.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Exchange it is published to.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Headers (for headers exchanges and dead-letter bookkeeping).
    pub headers: Option<&'a FieldTable>,
    /// Raw basic properties.
    pub properties: &'a [u8],
    /// Body.
    pub body: &'a [u8],
    /// Per-message TTL (`expiration` property), ms.
    pub expiration: Option<u64>,
    /// Deduplication key (`x-deduplication-header` or `message-id`).
    pub dedup_key: Option<&'a [u8]>,
    /// The exchange's deduplication window that records the key once the message is
    /// stored (durable exchanges only), so the record carries it for replay.
    pub dedup_scope: Option<QueueId>,
    /// When the broker took it, ms since the UNIX epoch.
    pub published_at: u64,
}

/// Routing failed in a way the publisher must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The exchange does not exist.
    NoExchange,
    /// The exchange is internal.
    Internal,
}

/// What became of a message offered to queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// At least one queue took it.
    pub stored: bool,
    /// A full queue with `reject-publish(-dlx)` refused it: the publisher gets a nack.
    pub rejected: bool,
    /// Log offset to be durable before a confirm.
    pub durable_end: Option<u64>,
    /// A deduplicating queue had already seen it.
    pub duplicate: bool,
}

impl State {
    /// The queues a message reaches from `exchange` (exchange-to-exchange bindings
    /// followed, each queue once, cycles harmless), in id order.
    ///
    /// # Errors
    /// [`RouteError`] for a missing or internal exchange.
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Result<Vec<QueueId>, RouteError> {
        let Some(vhost) = self.vhosts.get(vhost) else {
            return Err(RouteError::NoExchange);
        };
        let mut targets = Vec::new();
        if exchange.is_empty() {
            if let Some(id) = vhost.queues.get(routing_key) {
                targets.push(*id);
            }
            return Ok(targets);
        }
        let first = vhost
            .exchanges
            .get(exchange)
            .ok_or(RouteError::NoExchange)?;
        if first.internal {
            return Err(RouteError::Internal);
        }
        let mut visited: HashSet<&str> = HashSet::new();
        let mut pending = vec![first];
        let mut destinations = HashSet::new();
        let mut seen = HashSet::new();
        while let Some(exchange) = pending.pop() {
            if !visited.insert(exchange.name.as_str()) {
                continue;
            }
            destinations.clear();
            exchange.route(routing_key, headers, &mut destinations);
            for destination in &destinations {
                match destination {
                    Destination::Queue(id) => {
                        if self.queues.contains_key(id) && seen.insert(*id) {
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
        Ok(targets)
    }

    /// Writes `message` once and enqueues it in `targets` (those with room), settling
    /// `settles` in the same record. Full queues apply their overflow rule.
    ///
    /// # Errors
    /// When the store cannot take the write.
    pub fn enqueue(
        &mut self,
        message: &Message<'_>,
        targets: &[QueueId],
        settles: &[(QueueId, u64)],
        settlements: &mut Settlements<'_>,
    ) -> Result<Enqueued, StoreError> {
        // Cheap guard first: only a fan-out this wide can name too many durable queues,
        // so the common publish pays one comparison.
        if message.persistent && targets.len() > MAX_DURABLE_TARGETS {
            let durable = targets
                .iter()
                .filter(|id| self.queues.get(id).is_some_and(|q| q.durable))
                .count();
            if durable > MAX_DURABLE_TARGETS {
                // A publish record names at most this many queues; cutting the list would
                // confirm a message that some of its queues lose at the next restart.
                warn!(
                    exchange = message.exchange,
                    routing_key = message.routing_key,
                    durable_queues = durable,
                    "persistent publish routed to more durable queues than one record can name (65,535): refused"
                );
                return Ok(Enqueued {
                    rejected: true,
                    ..Enqueued::default()
                });
            }
        }
        let body_size = u32::try_from(message.body.len()).unwrap_or(u32::MAX);
        let mut outcome = Enqueued::default();
        let mut accepted = Vec::with_capacity(targets.len());
        let mut refused_to_dead_letter = Vec::new();
        let mut dedup_scopes: Vec<QueueId> = message.dedup_scope.into_iter().collect();
        for id in targets {
            let Some(queue) = self.queues.get_mut(id) else {
                continue;
            };
            let key = message.dedup_key.filter(|_| queue.dedup.is_some());
            if let (Some(window), Some(key)) = (queue.dedup.as_mut(), key)
                && window.seen(key, message.published_at)
            {
                queue.stats.duplicates += 1;
                outcome.duplicate = true;
                continue;
            }
            if queue.policy.overflow != Overflow::DropHead && queue.is_full_for(body_size) {
                // Refused, so not remembered: the producer's retry must get in later.
                outcome.rejected = true;
                queue.stats.refused += 1;
                if queue.policy.overflow == Overflow::RejectPublishDlx {
                    refused_to_dead_letter.push(*id);
                }
                continue;
            }
            if let (Some(window), Some(key)) = (queue.dedup.as_mut(), key) {
                window.insert(key.to_vec(), message.published_at);
                if queue.durable {
                    dedup_scopes.push(*id);
                }
            }
            accepted.push(*id);
        }
        if !accepted.is_empty() || !settles.is_empty() {
            let durable_queues: Vec<QueueId> = if message.persistent {
                accepted
                    .iter()
                    .copied()
                    .filter(|id| self.queues.get(id).is_some_and(|q| q.durable))
                    .collect()
            } else {
                Vec::new()
            };
            let record = encode_publish(&NewPublish {
                persistent: message.persistent,
                published_at: message.published_at,
                expiration: message.expiration,
                dedup: match message.dedup_key {
                    Some(key) if !dedup_scopes.is_empty() => Some((key, &dedup_scopes)),
                    _ => None,
                },
                exchange: message.exchange,
                routing_key: message.routing_key,
                durable_queues: &durable_queues,
                settles,
                properties: message.properties,
                body: message.body,
            });
            let refs = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
            // Only a message some queue must recover asks for an fsync of its own; the
            // rest (transient messages, copies nobody waits for) ride along with the next.
            let written = if !durable_queues.is_empty() {
                self.store.append(&record, refs, Durability::Requested)
            } else if settles.is_empty() && dedup_scopes.is_empty() {
                // Nothing here is ever recovered (no durable copy, no removal of a durable
                // original, no dedup key of a durable queue): the record only serves reads.
                self.store.append(&record, refs, Durability::Volatile)
            } else {
                self.store.append(&record, refs, Durability::Lazy)
            };
            let appended = match written {
                Ok(appended) => appended,
                Err(err) => {
                    // Nothing was stored: a retry must not be taken for a duplicate.
                    if let Some(key) = message.dedup_key {
                        for id in &accepted {
                            if let Some(window) =
                                self.queues.get_mut(id).and_then(|q| q.dedup.as_mut())
                            {
                                window.forget_latest(key);
                            }
                        }
                    }
                    return Err(err);
                }
            };
            outcome.stored = !accepted.is_empty();
            if !durable_queues.is_empty() {
                outcome.durable_end = Some(appended.end);
            }
            for id in &accepted {
                let recoverable = durable_queues.contains(id);
                if let Some(queue) = self.queues.get_mut(id) {
                    let expires_at = expiry(
                        message.published_at,
                        queue.policy.message_ttl,
                        message.expiration,
                    );
                    queue.push(QueueEntry {
                        message: MessageRef {
                            position: appended.position,
                            len: appended.len,
                        },
                        body_size,
                        redelivered: false,
                        recoverable,
                        delivery_count: 0,
                        expires_at,
                    });
                }
                self.make_room(*id, settlements);
            }
            for id in &accepted {
                self.dispatch(*id, settlements);
            }
        }
        if outcome.duplicate {
            // The original may still be waiting for its fsync: the duplicate's confirm
            // must not overtake it, so it waits for everything written so far.
            let written = self.store.stats().written;
            self.store.request_durable(written);
            outcome.durable_end = Some(outcome.durable_end.unwrap_or(0).max(written));
        }
        for id in refused_to_dead_letter {
            // The publisher hears of the refusal (nack); the copy is dead-lettered if a
            // target takes it now, and otherwise not kept.
            let _ = self.dead_letter_copy(id, DeathReason::Maxlen, message, &[], settlements);
        }
        Ok(outcome)
    }

    /// Drops (or dead-letters) head messages while a drop-head queue is over a limit.
    fn make_room(&mut self, queue_id: QueueId, settlements: &mut Settlements<'_>) {
        loop {
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                return;
            };
            if queue.policy.overflow != Overflow::DropHead || !queue.is_over_limit() {
                return;
            }
            let Some(entry) = queue.pop() else {
                return;
            };
            if !self.dead_letter(queue_id, entry, DeathReason::Maxlen, settlements) {
                return;
            }
        }
    }

    /// Dead-letters expired messages at the head of a queue (RabbitMQ expires messages
    /// when they reach the head; none is ever delivered after its expiry).
    pub fn expire_head(&mut self, queue_id: QueueId, now: u64, settlements: &mut Settlements<'_>) {
        loop {
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                return;
            };
            if queue.delay_for.is_some() {
                return;
            }
            if queue
                .ready
                .front()
                .is_none_or(|entry| entry.expires_at > now)
            {
                return;
            }
            let Some(entry) = queue.pop() else {
                return;
            };
            if !self.dead_letter(queue_id, entry, DeathReason::Expired, settlements) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A persistent fan-out wider than a record can name is refused whole, and nothing
    /// is written: before, the list of durable queues was cut at 65,535 and the message
    /// confirmed, so the queues past the cut lost it at the next restart.
    #[test]
    fn a_fan_out_wider_than_a_record_can_name_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = holdfast_store::Store::open(
            holdfast_store::StoreConfig {
                dir: dir.path().to_owned(),
                segment_size: 1 << 20,
                fsync: holdfast_store::FsyncPolicy::Never,
            },
            |_, _| {},
        )
        .expect("store");
        let mut state = State::new(store.clone(), 0, 1 << 20);
        let targets: Vec<QueueId> = (1..=MAX_DURABLE_TARGETS as u64 + 1).map(QueueId).collect();
        for id in &targets {
            let queue = crate::queue::Queue::new(
                *id,
                format!("q{}", id.0),
                "/".to_owned(),
                true,
                None,
                false,
                FieldTable::default(),
                crate::arguments::QueuePolicy::default(),
                0,
            );
            state.queues.insert(*id, queue);
        }
        let message = Message {
            exchange: "wide",
            routing_key: "",
            persistent: true,
            headers: None,
            properties: &[0, 0],
            body: b"m",
            expiration: None,
            dedup_key: None,
            dedup_scope: None,
            published_at: 0,
        };
        let before = store.stats().appended_records;
        let mut settlements = Settlements::new(&store);
        let outcome = state
            .enqueue(&message, &targets, &[], &mut settlements)
            .expect("no store error");
        settlements.apply();
        assert!(outcome.rejected && !outcome.stored, "{outcome:?}");
        assert_eq!(store.stats().appended_records, before, "nothing written");
        assert!(state.queues.values().all(|q| q.message_count() == 0));
        // One queue fewer fits in a record: taken by all.
        let mut settlements = Settlements::new(&store);
        let outcome = state
            .enqueue(&message, &targets[1..], &[], &mut settlements)
            .expect("no store error");
        settlements.apply();
        assert!(outcome.stored && !outcome.rejected);
        assert_eq!(state.queues[&targets[1]].message_count(), 1);
        assert_eq!(
            state.queues[&targets[MAX_DURABLE_TARGETS]].message_count(),
            1
        );
    }

    #[test]
    fn expiry_takes_the_earlier_ttl() {
        assert_eq!(expiry(1000, None, None), u64::MAX);
        assert_eq!(expiry(1000, Some(50), None), 1050);
        assert_eq!(expiry(1000, Some(50), Some(20)), 1020);
        assert_eq!(expiry(u64::MAX - 1, Some(50), None), u64::MAX);
    }
}
