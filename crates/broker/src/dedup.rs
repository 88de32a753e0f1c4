//! Broker-side deduplication (`x-message-deduplication` on a queue or an exchange): a
//! window of recently seen message keys per queue or exchange. The key is the
//! `x-deduplication-header` header or, without it, the `message-id` property. A
//! duplicate is confirmed to its publisher (the retry succeeds) but not enqueued again.
//!
//! Through a deduplicating exchange a publish is all or nothing: the key is remembered
//! only once every routed queue took the message, so the retry of a refused or
//! unroutable publish is not taken for a duplicate. (A queue's own window is checked
//! and recorded where the message is offered to it, in `enqueue`.)
//!
//! The windows are rebuilt from the log after a restart: publish records carry their
//! key and the windows that recorded it, and a checkpoint record with every durable
//! window is written from time to time so that keys of messages whose segments were
//! deleted (consumed long ago) are not forgotten.

use std::collections::{HashMap, VecDeque};

use holdfast_store::{Durability, LogPosition};
use tracing::error;

use crate::QueueId;
use crate::arguments::Overflow;
use crate::enqueue::{Message, now_ms};
use crate::record::{WindowSnapshot, encode_dedup_checkpoint};
use crate::state::State;

/// How often deduplication windows are checkpointed at most, ms.
const DEDUP_CHECKPOINT_INTERVAL: u64 = 1000;

/// Keys kept when `x-cache-size` is not given.
pub const DEFAULT_CACHE_SIZE: usize = 10_000;

/// The recent keys of one queue, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupWindow {
    capacity: usize,
    ttl: Option<u64>,
    seen: HashMap<Vec<u8>, u64>,
    order: VecDeque<(Vec<u8>, u64)>,
    /// Changed since the last checkpoint.
    pub dirty: bool,
}

impl DedupWindow {
    /// An empty window of at most `capacity` keys, each forgotten after `ttl` ms.
    #[must_use]
    pub fn new(capacity: usize, ttl: Option<u64>) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            ..Self::default()
        }
    }

    fn evict(&mut self, now: u64) {
        while let Some((key, at)) = self.order.front() {
            let expired = self.ttl.is_some_and(|ttl| now.saturating_sub(*at) >= ttl);
            if self.order.len() <= self.capacity && !expired {
                break;
            }
            if self.seen.get(key) == Some(at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Whether `key` was seen within the window; records it if not.
    #[cfg(test)]
    fn check_and_insert(&mut self, key: &[u8], now: u64) -> bool {
        self.evict(now);
        if self.seen.contains_key(key) {
            return true;
        }
        self.insert(key.to_vec(), now);
        false
    }

    /// Whether `key` is in the window (without recording it).
    pub fn seen(&mut self, key: &[u8], now: u64) -> bool {
        self.evict(now);
        self.seen.contains_key(key)
    }

    /// Records a key seen at `at` (replay and checkpoints).
    pub fn insert(&mut self, key: Vec<u8>, at: u64) {
        self.seen.insert(key.clone(), at);
        self.order.push_back((key, at));
        self.dirty = true;
        self.evict(at);
    }

    /// Forgets `key` if it is the one recorded last (its message could not be stored).
    pub fn forget_latest(&mut self, key: &[u8]) {
        if let Some((last, at)) = self.order.back()
            && last.as_slice() == key
        {
            if self.seen.get(key) == Some(at) {
                self.seen.remove(key);
            }
            self.order.pop_back();
        }
    }

    /// The keys in the window, oldest first, for a checkpoint.
    pub fn entries(&mut self, now: u64) -> impl Iterator<Item = &(Vec<u8>, u64)> {
        self.evict(now);
        self.order.iter()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// What an exchange's deduplication window said about a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeDedup {
    /// The exchange does not deduplicate (or does not exist).
    NotDeduplicating,
    /// Seen before: confirm, do not route.
    Duplicate,
    /// A key not seen yet; the scope to persist it under, for a durable exchange.
    New(Option<QueueId>),
}

impl State {
    /// Checks a message key against the exchange's deduplication window, without
    /// recording it: the key is remembered only once the publish has been taken whole
    /// ([`State::exchange_dedup_record`]).
    pub fn exchange_dedup(
        &mut self,
        vhost: &str,
        exchange: &str,
        key: &[u8],
        now: u64,
    ) -> ExchangeDedup {
        let Some(exchange) = self
            .vhosts
            .get_mut(vhost)
            .and_then(|v| v.exchanges.get_mut(exchange))
        else {
            return ExchangeDedup::NotDeduplicating;
        };
        let Some(window) = exchange.dedup.as_mut() else {
            return ExchangeDedup::NotDeduplicating;
        };
        if window.seen(key, now) {
            ExchangeDedup::Duplicate
        } else {
            ExchangeDedup::New(exchange.dedup_scope.filter(|_| exchange.durable))
        }
    }

    /// Records `key` in the exchange's window: every target took the message.
    pub fn exchange_dedup_record(&mut self, vhost: &str, exchange: &str, key: &[u8], now: u64) {
        if let Some(window) = self
            .vhosts
            .get_mut(vhost)
            .and_then(|v| v.exchanges.get_mut(exchange))
            .and_then(|e| e.dedup.as_mut())
        {
            window.insert(key.to_vec(), now);
        }
    }

    /// For an all-or-nothing publish (through a deduplicating exchange): whether some
    /// target would refuse the message for being full. Each refusing queue counts it.
    /// A queue that already holds the key takes nothing, so it refuses nothing either.
    pub fn refused_by_any(&mut self, message: &Message<'_>, targets: &[QueueId]) -> bool {
        let body_size = u32::try_from(message.body.len()).unwrap_or(u32::MAX);
        let mut refused = Vec::new();
        for id in targets {
            let Some(queue) = self.queues.get_mut(id) else {
                continue;
            };
            let duplicate = match (queue.dedup.as_mut(), message.dedup_key) {
                (Some(window), Some(key)) => window.seen(key, message.published_at),
                _ => false,
            };
            if !duplicate
                && queue.policy.overflow != Overflow::DropHead
                && queue.is_full_for(body_size)
            {
                refused.push(*id);
            }
        }
        for id in &refused {
            if let Some(queue) = self.queues.get_mut(id) {
                queue.stats.refused += 1;
            }
        }
        !refused.is_empty()
    }

    /// Puts the replayed keys (the last checkpoint's, then those of later publish
    /// records) back into their windows, and keeps the checkpoint record pinned.
    pub fn restore_dedup_windows(
        &mut self,
        keys: HashMap<QueueId, VecDeque<(Vec<u8>, u64)>>,
        checkpoint: Option<LogPosition>,
    ) {
        for (scope, keys) in keys {
            // A scope is a queue id or the id of an exchange's window.
            let window = match self.queues.get_mut(&scope) {
                Some(queue) => queue.dedup.as_mut(),
                None => self
                    .vhosts
                    .values_mut()
                    .flat_map(|vhost| vhost.exchanges.values_mut())
                    .find(|exchange| exchange.dedup_scope == Some(scope))
                    .and_then(|exchange| exchange.dedup.as_mut()),
            };
            if let Some(window) = window {
                for (key, at) in keys {
                    window.insert(key, at);
                }
            }
        }
        if let Some(position) = checkpoint {
            self.store.retain(position);
            self.dedup_checkpoint = Some((position, now_ms()));
        }
    }

    /// Writes every durable queue's deduplication window as one record when one has
    /// changed (at most once a second), so keys outlive the segments of their messages.
    /// The record holds a reference, which keeps it; the previous one is let go.
    pub fn checkpoint_dedup_windows(&mut self, now: u64) {
        if self
            .dedup_checkpoint
            .is_some_and(|(_, at)| now.saturating_sub(at) < DEDUP_CHECKPOINT_INTERVAL)
        {
            return;
        }
        let dirty = self
            .queues
            .values()
            .any(|q| q.durable && q.dedup.as_ref().is_some_and(|w| w.dirty))
            || self.vhosts.values().any(|v| {
                v.exchanges
                    .values()
                    .any(|e| e.durable && e.dedup.as_ref().is_some_and(|w| w.dirty))
            });
        // An old checkpoint pins its segment and, since segments go oldest first, every
        // later one: rewrite it once the log has moved a segment past it.
        let stale = self.dedup_checkpoint.is_some_and(|(position, _)| {
            self.store.stats().written.saturating_sub(position.0) > self.segment_size
        });
        if !dirty && !stale {
            return;
        }
        let mut windows: Vec<WindowSnapshot<'_>> = Vec::new();
        for queue in self.queues.values_mut() {
            if !queue.durable || queue.exclusive_owner.is_some() {
                continue;
            }
            if let Some(window) = queue.dedup.as_mut() {
                window.dirty = false;
                windows.push((
                    queue.id,
                    window
                        .entries(now)
                        .map(|(k, at)| (k.as_slice(), *at))
                        .collect(),
                ));
            }
        }
        for exchange in self
            .vhosts
            .values_mut()
            .flat_map(|v| v.exchanges.values_mut())
        {
            if !exchange.durable {
                continue;
            }
            if let (Some(window), Some(scope)) = (exchange.dedup.as_mut(), exchange.dedup_scope) {
                window.dirty = false;
                windows.push((
                    scope,
                    window
                        .entries(now)
                        .map(|(k, at)| (k.as_slice(), *at))
                        .collect(),
                ));
            }
        }
        // The previous checkpoint is released right after; the store deletes its segment
        // only once the log is durable past this one.
        match self
            .store
            .append(&encode_dedup_checkpoint(&windows), 1, Durability::Requested)
        {
            Ok(appended) => {
                if let Some((previous, _)) = self.dedup_checkpoint.replace((appended.position, now))
                {
                    self.store.release(previous);
                }
            }
            Err(err) => error!(cause = %err, "deduplication checkpoint could not be written"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_ttl_bound_the_window() {
        let mut window = DedupWindow::new(2, Some(100));
        assert!(!window.check_and_insert(b"a", 0));
        assert!(window.check_and_insert(b"a", 10));
        assert!(!window.check_and_insert(b"b", 20));
        assert!(!window.check_and_insert(b"c", 30));
        assert!(
            !window.check_and_insert(b"a", 40),
            "a was evicted by capacity"
        );
        assert!(window.check_and_insert(b"c", 50));
        assert!(!window.check_and_insert(b"c", 200), "c expired");
        assert!(window.len() <= 2);
    }

    #[test]
    fn forget_latest_undoes_only_the_last_insert() {
        let mut window = DedupWindow::new(10, None);
        assert!(!window.check_and_insert(b"a", 0));
        assert!(!window.check_and_insert(b"b", 1));
        window.forget_latest(b"a");
        assert!(window.check_and_insert(b"a", 2), "a was not the latest");
        window.forget_latest(b"b");
        assert!(!window.check_and_insert(b"b", 3), "b forgotten");
    }
}
