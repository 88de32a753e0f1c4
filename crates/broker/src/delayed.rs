//! Messages held back for a time: the hidden queue of an `x-delayed-message` exchange
//! (a publish with a positive `x-delay` header waits there and is routed by the
//! exchange when due), and retries held back by a queue's `x-redelivery-delay`.
//!
//! A delayed message is a message of its delay queue, so it is durable and recovered
//! like any other; its release is one record (the routed copy plus its removal from the
//! delay queue), so a crash never loses or doubles one. A held retry stays a message of
//! its queue, out of the ready list until its delay has passed.

use holdfast_codec::{FieldTable, decode_properties};
use tracing::{debug, warn};

use crate::QueueId;
use crate::enqueue::{Message, now_ms};
use crate::queue::{Queue, QueueEntry};
use crate::record::decode_message;
use crate::state::{Settlements, State};

impl Queue {
    /// Holds a retried delivery back until `due` (ms since the UNIX epoch).
    pub fn hold_for_retry(&mut self, mut entry: QueueEntry, due: u64) {
        entry.redelivered = true;
        self.held.insert((due, entry.message.position.0), entry);
    }
}

impl State {
    /// For a publish to an `x-delayed-message` exchange with a positive `x-delay`
    /// header: the exchange's delay queue and the delay in ms.
    #[must_use]
    pub fn delay_for_publish(
        &self,
        vhost: &str,
        exchange: &str,
        headers: Option<&FieldTable>,
    ) -> Option<(QueueId, u64)> {
        // The header first: nearly every publish has none, and that costs no lookups.
        let value = headers?.inner().get("x-delay")?;
        let delay_queue = self
            .vhosts
            .get(vhost)?
            .exchanges
            .get(exchange)?
            .delay_queue?;
        let delay: i128 = match crate::arguments::integer(value) {
            Some(delay) => delay,
            None => crate::arguments::text(value)?.trim().parse().ok()?,
        };
        u64::try_from(delay)
            .ok()
            .filter(|d| *d > 0)
            .map(|d| (delay_queue, d))
    }

    /// Creates the hidden queue of an `x-delayed-message` exchange.
    pub fn create_delay_queue(&mut self, vhost: &str, exchange: &str, durable: bool) -> QueueId {
        let id = QueueId(self.next_queue_id.max(1));
        self.next_queue_id = id.0 + 1;
        let mut queue = crate::queue::Queue::new(
            id,
            format!("amq.delayed.{exchange}"),
            vhost.to_owned(),
            durable,
            None,
            false,
            FieldTable::default(),
            crate::arguments::QueuePolicy::default(),
            now_ms(),
        );
        queue.delay_for = Some(exchange.to_owned());
        self.queues.insert(id, queue);
        id
    }

    /// Routes the messages of delayed exchanges whose delay has passed. Each move is one
    /// record (the routed copy plus removal from the delay queue), like a dead-letter
    /// move, so a crash never loses or doubles one.
    pub fn release_delayed(&mut self, now: u64, settlements: &mut Settlements<'_>) {
        let delay_queues: Vec<QueueId> = self
            .queues
            .values()
            .filter(|q| q.delay_for.is_some() && q.ready.iter().any(|e| e.expires_at <= now))
            .map(|q| q.id)
            .collect();
        for queue_id in delay_queues {
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                continue;
            };
            let exchange = queue.delay_for.clone().unwrap_or_default();
            let vhost = queue.vhost.clone();
            let mut due = Vec::new();
            let mut waiting = std::collections::VecDeque::with_capacity(queue.ready.len());
            while let Some(entry) = queue.pop() {
                if entry.expires_at <= now {
                    due.push(entry);
                } else {
                    waiting.push_back(entry);
                }
            }
            for entry in waiting {
                queue.push(entry);
            }
            for entry in due {
                self.release_one(queue_id, &vhost, &exchange, entry, now, settlements);
            }
        }
    }

    fn release_one(
        &mut self,
        queue_id: QueueId,
        vhost: &str,
        exchange: &str,
        entry: QueueEntry,
        now: u64,
        settlements: &mut Settlements<'_>,
    ) {
        let stored = self
            .store
            .read(entry.message.position, entry.message.len)
            .ok()
            .and_then(|record| decode_message(&record));
        let Some(stored) = stored else {
            warn!(exchange, "delayed message unreadable; dropped");
            settlements.settle(queue_id, &entry);
            return;
        };
        let Ok(properties) = decode_properties(&stored.properties) else {
            settlements.settle(queue_id, &entry);
            return;
        };
        let routing_key = String::from_utf8_lossy(&stored.routing_key).into_owned();
        let headers = properties.headers().clone();
        let targets = self
            .route(vhost, exchange, &routing_key, headers.as_ref())
            .unwrap_or_default();
        if targets.is_empty() {
            debug!(exchange, "delayed message routed nowhere when due; dropped");
            settlements.settle(queue_id, &entry);
            return;
        }
        let expiration = properties
            .expiration()
            .as_ref()
            .and_then(|text| text.as_str().parse().ok());
        let settles: Vec<(QueueId, u64)> = if entry.recoverable {
            vec![(queue_id, entry.message.position.0)]
        } else {
            Vec::new()
        };
        let message = Message {
            exchange,
            routing_key: &routing_key,
            persistent: properties.delivery_mode() == &Some(2),
            headers: headers.as_ref(),
            properties: &stored.properties,
            body: &stored.body,
            expiration,
            dedup_key: None,
            dedup_scope: None,
            published_at: now,
        };
        match self.enqueue(&message, &targets, &settles, settlements) {
            Ok(_) => settlements.release(entry.message.position),
            Err(err) => {
                warn!(cause = %err, "delayed message could not be released; kept");
                if let Some(queue) = self.queues.get_mut(&queue_id) {
                    queue.push(entry);
                }
            }
        }
    }

    /// Returns held-back retries whose redelivery delay has passed to their queues.
    pub fn release_held(&mut self, now: u64, settlements: &mut Settlements<'_>) {
        let due: Vec<QueueId> = self
            .queues
            .values()
            .filter(|q| {
                q.held
                    .first_key_value()
                    .is_some_and(|((at, _), _)| *at <= now)
            })
            .map(|q| q.id)
            .collect();
        for queue_id in due {
            if let Some(queue) = self.queues.get_mut(&queue_id) {
                while queue
                    .held
                    .first_key_value()
                    .is_some_and(|((at, _), _)| *at <= now)
                {
                    if let Some((_, entry)) = queue.held.pop_first() {
                        queue.requeue(entry);
                    }
                }
            }
            self.dispatch(queue_id, settlements);
        }
    }
}
