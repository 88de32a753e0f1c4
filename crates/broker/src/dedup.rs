//! Broker-side deduplication (queue argument `x-message-deduplication`): a window of
//! recently seen message keys per queue. The key is the `x-deduplication-header` header
//! or, without it, the `message-id` property. A duplicate is confirmed to its publisher
//! (the retry succeeds) but not enqueued again.
//!
//! The window is rebuilt from the log after a restart: publish records carry their key,
//! and a checkpoint record with every window is written from time to time so that keys
//! of messages whose segments were deleted (consumed long ago) are not forgotten.

use std::collections::{HashMap, VecDeque};

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
