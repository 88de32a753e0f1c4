//! A queue: its ready messages (positions in the log, never bodies), its consumers and
//! the round-robin cursor. Messages are kept in log order; a requeued message goes back
//! to its original place, so requeues preserve publish order as RabbitMQ does.

use std::collections::VecDeque;
use std::sync::Arc;

use holdfast_codec::FieldTable;
use holdfast_store::LogPosition;

use crate::arguments::QueuePolicy;
use crate::dead_letter::DeathReason;
use crate::{ChannelKey, ConnectionId, QueueId};

/// What a queue has counted since it was created (this process).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Rejected with requeue=false.
    pub rejected: u64,
    /// Expired.
    pub expired: u64,
    /// Pushed out or refused by a length limit.
    pub maxlen: u64,
    /// Over the delivery limit.
    pub delivery_limit: u64,
    /// Publishes refused by `reject-publish(-dlx)`.
    pub refused: u64,
    /// Publishes recognised as duplicates and not enqueued.
    pub duplicates: u64,
}

impl QueueStats {
    /// Counts a message leaving for `reason` (dead-lettered or dropped).
    pub fn count_death(&mut self, reason: DeathReason) {
        match reason {
            DeathReason::Rejected => self.rejected += 1,
            DeathReason::Expired => self.expired += 1,
            DeathReason::Maxlen => self.maxlen += 1,
            DeathReason::DeliveryLimit => self.delivery_limit += 1,
        }
    }
}

/// A reference to a stored message: where its record is and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef {
    /// Record position in the log.
    pub position: LogPosition,
    /// Record length.
    pub len: u32,
}

/// A dead letter waiting for a target that takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingDeadLetter {
    /// The message, still referenced by its queue.
    pub entry: QueueEntry,
    /// Why it died.
    pub reason: crate::dead_letter::DeathReason,
    /// Moves tried since the first refusal.
    pub attempts: u32,
    /// When the next move is tried, ms since the UNIX epoch.
    pub due_at: u64,
}

/// One message in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    /// The stored message.
    pub message: MessageRef,
    /// Body size, for byte counts.
    pub body_size: u32,
    /// Whether it may have been delivered before.
    pub redelivered: bool,
    /// Whether the queue must get it back after a restart (durable queue, persistent
    /// message); only such entries get ack records.
    pub recoverable: bool,
    /// How often it was returned to the queue unacknowledged (nack/reject with requeue,
    /// channel closed, recover); sent as `x-delivery-count` and checked against
    /// `x-delivery-limit`.
    pub delivery_count: u32,
    /// When it expires, ms since the UNIX epoch; `u64::MAX` for never.
    pub expires_at: u64,
}

/// A consumer attached to a queue.
#[derive(Debug, Clone)]
pub struct Consumer {
    /// The channel it belongs to.
    pub channel: ChannelKey,
    /// Its tag.
    pub tag: Arc<str>,
    /// Messages are settled on delivery.
    pub no_ack: bool,
    /// Whether it holds the queue exclusively.
    pub exclusive: bool,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u16,
    /// Deliveries not yet settled.
    pub unacked: u32,
}

impl Consumer {
    /// Whether its own prefetch allows another delivery.
    #[must_use]
    pub fn has_credit(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.unacked < u32::from(self.prefetch)
    }
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    /// Never reused, so log records of a deleted queue cannot reach a new one.
    pub id: QueueId,
    /// Its name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Survives restarts.
    pub durable: bool,
    /// Owner connection, for exclusive queues.
    pub exclusive_owner: Option<ConnectionId>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declared arguments, kept as given.
    pub arguments: FieldTable,
    /// The behaviour the arguments ask for.
    pub policy: QueuePolicy,
    /// Last time it was used (declared, consumed from, polled), ms since the UNIX epoch;
    /// `x-expires` counts from here.
    pub last_used: u64,
    /// Counters.
    pub stats: QueueStats,
    /// For the hidden queue of an `x-delayed-message` exchange: that exchange's name.
    /// Its entries' `expires_at` is when they are due, and they are then routed by the
    /// exchange instead of expiring.
    pub delay_for: Option<String>,
    /// Recently seen message keys, for `x-message-deduplication`.
    pub dedup: Option<crate::dedup::DedupWindow>,
    /// Ready messages in log order.
    pub ready: VecDeque<QueueEntry>,
    /// Retries waiting out their `x-redelivery-delay`, by (due time, position).
    pub held: std::collections::BTreeMap<(u64, u64), QueueEntry>,
    /// Dead letters no target took yet: out of the ready list (neither delivered nor
    /// counted), still in the log, retried with backoff.
    pub dead_letter_pending: VecDeque<PendingDeadLetter>,
    /// Bytes of ready bodies.
    pub ready_bytes: u64,
    /// Attached consumers.
    pub consumers: Vec<Consumer>,
    /// Where round-robin resumes.
    pub cursor: usize,
    /// Whether it ever had a consumer (auto-delete only triggers after one).
    pub had_consumer: bool,
}

impl Queue {
    /// An empty queue.
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        id: QueueId,
        name: String,
        vhost: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
        policy: QueuePolicy,
        now: u64,
    ) -> Queue {
        let policy_dedup = policy.deduplication;
        Queue {
            id,
            name,
            vhost,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            policy,
            last_used: now,
            delay_for: None,
            stats: QueueStats::default(),
            dedup: policy_dedup.map(|(size, ttl)| crate::dedup::DedupWindow::new(size, ttl)),
            ready: std::collections::VecDeque::new(),
            held: std::collections::BTreeMap::new(),
            dead_letter_pending: VecDeque::new(),
            ready_bytes: 0,
            consumers: Vec::new(),
            cursor: 0,
            had_consumer: false,
        }
    }

    /// Adds a message at its place in log order (the back, for a fresh publish).
    pub fn push(&mut self, entry: QueueEntry) {
        self.ready_bytes += u64::from(entry.body_size);
        match self.ready.back() {
            Some(last) if last.message.position > entry.message.position => {
                let at = self
                    .ready
                    .partition_point(|e| e.message.position < entry.message.position);
                self.ready.insert(at, entry);
            }
            _ => self.ready.push_back(entry),
        }
    }

    /// Puts a delivered message back at its original place, marked redelivered.
    pub fn requeue(&mut self, mut entry: QueueEntry) {
        entry.redelivered = true;
        self.push(entry);
    }

    /// Takes the head message.
    pub fn pop(&mut self) -> Option<QueueEntry> {
        let entry = self.ready.pop_front()?;
        self.ready_bytes -= u64::from(entry.body_size);
        Some(entry)
    }

    /// Whether one more message of `body_size` bytes would exceed a length limit.
    #[must_use]
    pub fn is_full_for(&self, body_size: u32) -> bool {
        self.policy
            .max_length
            .is_some_and(|max| self.ready.len() as u64 >= max)
            || self
                .policy
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes + u64::from(body_size) > max)
    }

    /// Whether the queue holds more than a length limit allows.
    #[must_use]
    pub fn is_over_limit(&self) -> bool {
        self.policy
            .max_length
            .is_some_and(|max| self.ready.len() as u64 > max)
            || self
                .policy
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    /// Number of ready messages.
    #[must_use]
    pub fn message_count(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX)
    }

    /// Number of consumers.
    #[must_use]
    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.consumers.len()).unwrap_or(u32::MAX)
    }

    /// Whether a consumer holds it exclusively.
    #[must_use]
    pub fn has_exclusive_consumer(&self) -> bool {
        self.consumers.iter().any(|c| c.exclusive)
    }
}
