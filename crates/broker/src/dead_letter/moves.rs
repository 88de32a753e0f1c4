//! The dead-letter move: a message that died in a queue (rejected, expired, pushed out
//! by a length limit, over its delivery limit) becomes a copy with `x-death` history,
//! published to the queue's dead-letter exchange. The copy and the removal of the
//! original are one log record, so a crash leaves the message in exactly one place.
//!
//! Nothing is dropped because its target cannot take it. When the dead-letter exchange
//! is missing, routes nowhere, or every queue it routes to refuses the copy (full with
//! `reject-publish`), the message leaves its queue's ready list (it is not delivered
//! again, nor counted) but stays in the log, waiting; the move is retried with backoff
//! until a target takes it. Only a queue without a dead-letter exchange, and a
//! dead-letter cycle nobody rejected in, drop messages, as in RabbitMQ.

use holdfast_codec::{decode_properties, encode_properties};
use tracing::{debug, warn};

use super::{Death, DeathReason, is_cycle, record_death, routing_keys};
use crate::QueueId;
use crate::arguments::Overflow;
use crate::enqueue::{Message, now_ms};
use crate::queue::{PendingDeadLetter, QueueEntry};
use crate::record::{decode_message, encode_park};
use crate::state::{Settlements, State};

/// The first retry of a waiting dead letter comes this long after the refusal; each
/// further one waits twice as long, up to [`MAX_RETRY_DELAY_MS`].
const FIRST_RETRY_DELAY_MS: u64 = 50;
const MAX_RETRY_DELAY_MS: u64 = 1000;

/// What became of a dead-lettered copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyOutcome {
    /// Written, with the removal of the original.
    Written,
    /// No dead-letter exchange, or a cycle: dropped, counted.
    Dropped,
    /// No target took it (exchange missing, routed nowhere, every target full): the
    /// original waits and the move is retried.
    NoTarget,
    /// The log refused the write: the original must stay.
    WriteFailed,
}

impl State {
    /// Moves an entry that left `queue_id` to the queue's dead-letter exchange, or drops
    /// it if the queue has none; an entry no target takes waits in the queue's
    /// dead-letter-pending list.
    ///
    /// Returns false when the copy could not be written (no disk space): the entry is
    /// then back in its queue, and loops that dead-letter must stop for now.
    pub fn dead_letter(
        &mut self,
        queue_id: QueueId,
        entry: QueueEntry,
        reason: DeathReason,
        settlements: &mut Settlements<'_>,
    ) -> bool {
        let Some(queue) = self.queues.get_mut(&queue_id) else {
            settlements.release(entry.message.position);
            return true;
        };
        queue.stats.count_death(reason);
        match self.move_to_dead_letter_exchange(queue_id, &entry, reason, settlements) {
            CopyOutcome::Written | CopyOutcome::Dropped => true,
            CopyOutcome::NoTarget => {
                self.wait_for_target(queue_id, entry, reason, 0, now_ms());
                true
            }
            // Nothing may vanish because the disk is full: the message goes back to its
            // place and is dead-lettered later (or delivered, if it was not expired).
            CopyOutcome::WriteFailed => {
                if let Some(queue) = self.queues.get_mut(&queue_id) {
                    queue.push(entry);
                }
                false
            }
        }
    }

    /// Retries the moves of waiting dead letters whose backoff has passed.
    pub fn retry_dead_letters(&mut self, now: u64, settlements: &mut Settlements<'_>) {
        let due: Vec<QueueId> = self
            .queues
            .values()
            .filter(|q| q.dead_letter_pending.iter().any(|p| p.due_at <= now))
            .map(|q| q.id)
            .collect();
        for queue_id in due {
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                continue;
            };
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut queue.dead_letter_pending)
                .into_iter()
                .partition(|p| p.due_at <= now);
            queue.dead_letter_pending = waiting.into();
            for pending in ready {
                match self.move_to_dead_letter_exchange(
                    queue_id,
                    &pending.entry,
                    pending.reason,
                    settlements,
                ) {
                    CopyOutcome::Written | CopyOutcome::Dropped => {}
                    CopyOutcome::NoTarget | CopyOutcome::WriteFailed => self.wait_for_target(
                        queue_id,
                        pending.entry,
                        pending.reason,
                        pending.attempts + 1,
                        now,
                    ),
                }
            }
        }
    }

    fn wait_for_target(
        &mut self,
        queue_id: QueueId,
        entry: QueueEntry,
        reason: DeathReason,
        attempts: u32,
        now: u64,
    ) {
        let Some(queue) = self.queues.get_mut(&queue_id) else {
            return;
        };
        if attempts == 0 {
            warn!(queue = %queue.name, vhost = %queue.vhost, reason = reason.as_str(), "no dead-letter target takes the message; it waits and the move is retried");
            if entry.recoverable {
                // So that a restart keeps it waiting rather than delivering it again.
                // Deferred like an ack: a crash may lose it, and then the message is
                // back in its queue, which at-least-once allows.
                let record = encode_park(reason.code(), &[(queue_id, entry.message.position.0)]);
                if let Err(err) = self.store.append_deferred(record) {
                    warn!(cause = %err, "park record could not be written");
                }
            }
        }
        let delay = FIRST_RETRY_DELAY_MS
            .saturating_mul(1u64 << attempts.min(16))
            .min(MAX_RETRY_DELAY_MS);
        queue.dead_letter_pending.push_back(PendingDeadLetter {
            entry,
            reason,
            attempts,
            due_at: now.saturating_add(delay),
        });
    }

    /// One attempt at the move. On `Written` and `Dropped` the entry is settled; on the
    /// others it is untouched (the caller keeps it).
    fn move_to_dead_letter_exchange(
        &mut self,
        queue_id: QueueId,
        entry: &QueueEntry,
        reason: DeathReason,
        settlements: &mut Settlements<'_>,
    ) -> CopyOutcome {
        let Some(queue) = self.queues.get(&queue_id) else {
            settlements.release(entry.message.position);
            return CopyOutcome::Dropped;
        };
        if queue.policy.dead_letter_exchange.is_none() {
            if reason == DeathReason::DeliveryLimit {
                warn!(queue = %queue.name, vhost = %queue.vhost, "message dropped after exceeding its delivery limit (no dead-letter exchange)");
            } else {
                debug!(queue = %queue.name, reason = reason.as_str(), "message dropped (no dead-letter exchange)");
            }
            settlements.settle(queue_id, entry);
            return CopyOutcome::Dropped;
        }
        let record = match self.store.read(entry.message.position, entry.message.len) {
            Ok(record) => record,
            Err(err) => {
                warn!(cause = %err, "dead-lettering: original unreadable; dropped");
                settlements.settle(queue_id, entry);
                return CopyOutcome::Dropped;
            }
        };
        let Some(stored) = decode_message(&record) else {
            settlements.settle(queue_id, entry);
            return CopyOutcome::Dropped;
        };
        let Ok(properties) = decode_properties(&stored.properties) else {
            settlements.settle(queue_id, entry);
            return CopyOutcome::Dropped;
        };
        let exchange = String::from_utf8_lossy(&stored.exchange).into_owned();
        let routing_key = String::from_utf8_lossy(&stored.routing_key).into_owned();
        let original = Message {
            exchange: &exchange,
            routing_key: &routing_key,
            persistent: properties.delivery_mode() == &Some(2),
            headers: properties.headers().as_ref(),
            properties: &stored.properties,
            body: &stored.body,
            expiration: None,
            dedup_key: None,
            dedup_scope: None,
            published_at: 0,
        };
        let settles: Vec<(QueueId, u64)> = if entry.recoverable {
            vec![(queue_id, entry.message.position.0)]
        } else {
            Vec::new()
        };
        let outcome = self.dead_letter_copy(queue_id, reason, &original, &settles, settlements);
        match outcome {
            // The new record carries the removal; only our reference remains to drop.
            CopyOutcome::Written => settlements.release(entry.message.position),
            CopyOutcome::Dropped => settlements.settle(queue_id, entry),
            CopyOutcome::NoTarget | CopyOutcome::WriteFailed => {}
        }
        outcome
    }

    /// Publishes the dead-lettered copy of `original` (which died in `queue_id`) to the
    /// queue's dead-letter exchange, settling `settles` in the same record.
    pub(crate) fn dead_letter_copy(
        &mut self,
        queue_id: QueueId,
        reason: DeathReason,
        original: &Message<'_>,
        settles: &[(QueueId, u64)],
        settlements: &mut Settlements<'_>,
    ) -> CopyOutcome {
        let Some(queue) = self.queues.get(&queue_id) else {
            return CopyOutcome::Dropped;
        };
        let Some(exchange) = queue.policy.dead_letter_exchange.clone() else {
            return CopyOutcome::Dropped;
        };
        let queue_name = queue.name.clone();
        let vhost = queue.vhost.clone();
        let dead_letter_key = queue.policy.dead_letter_routing_key.clone();
        let Ok(properties) = decode_properties(original.properties) else {
            return CopyOutcome::Dropped;
        };
        let keys = routing_keys(original.routing_key, original.headers);
        let copy = record_death(
            &properties,
            &Death {
                queue: &queue_name,
                reason,
                exchange: original.exchange,
                routing_keys: keys.clone(),
                time: now_ms() / 1000,
            },
        );
        let headers = copy.headers().clone();
        let raw = encode_properties(&copy);
        let route_keys = match &dead_letter_key {
            Some(key) => vec![key.clone()],
            None => keys,
        };
        let mut targets: Vec<QueueId> = Vec::new();
        for key in &route_keys {
            match self.route(&vhost, &exchange, key, headers.as_ref()) {
                Ok(found) => targets.extend(found),
                Err(_) => {
                    debug!(queue = %queue_name, dead_letter_exchange = %exchange, "dead-letter exchange missing; the message waits");
                    return CopyOutcome::NoTarget;
                }
            }
        }
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            debug!(queue = %queue_name, "dead-lettered message routed nowhere; it waits");
            return CopyOutcome::NoTarget;
        }
        if reason != DeathReason::Rejected {
            targets.retain(|target| {
                let name = self
                    .queues
                    .get(target)
                    .map(|q| q.name.as_str())
                    .unwrap_or("");
                !is_cycle(headers.as_ref(), name)
            });
            if targets.is_empty() {
                debug!(queue = %queue_name, "dead-letter cycle broken; message dropped");
                return CopyOutcome::Dropped;
            }
        }
        let message = Message {
            exchange: &exchange,
            routing_key: route_keys.first().map_or("", String::as_str),
            persistent: original.persistent,
            headers: headers.as_ref(),
            properties: &raw,
            body: original.body,
            expiration: None,
            dedup_key: None,
            dedup_scope: None,
            published_at: now_ms(),
        };
        if !self.any_takes(&message, &targets) {
            // Writing now would settle the original with the copy refused everywhere.
            return CopyOutcome::NoTarget;
        }
        match self.enqueue(&message, &targets, settles, settlements) {
            Ok(_) => CopyOutcome::Written,
            Err(err) => {
                warn!(cause = %err, "dead-letter copy could not be written; the original stays");
                CopyOutcome::WriteFailed
            }
        }
    }

    /// Whether at least one of `targets` has room for `message` (or makes room for it).
    fn any_takes(&self, message: &Message<'_>, targets: &[QueueId]) -> bool {
        let body_size = u32::try_from(message.body.len()).unwrap_or(u32::MAX);
        targets.iter().any(|id| {
            self.queues.get(id).is_some_and(|queue| {
                queue.policy.overflow == Overflow::DropHead || !queue.is_full_for(body_size)
            })
        })
    }
}
