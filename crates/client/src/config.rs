//! [`ProducerConfig`] and [`RetryPolicy`]: where to connect and how hard to try.

use std::time::Duration;

/// How a failed send is retried: exponential backoff with full jitter, bounded by a
/// number of attempts and by an overall deadline.
///
/// The sleep before attempt `n + 1` is a uniform random value in
/// `[0, min(max_backoff, initial_backoff * multiplier^(n-1))]` ("full jitter"), so that
/// many producers failing together do not retry in lock-step.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// The backoff cap before the first retry.
    pub initial_backoff: Duration,
    /// The largest backoff cap.
    pub max_backoff: Duration,
    /// Growth of the cap per attempt.
    pub multiplier: f64,
    /// Draw the actual sleep uniformly in `[0, cap]`; when false, sleep the cap.
    pub full_jitter: bool,
    /// Time from the call to the last moment an attempt may still be waiting for its
    /// confirm; after it the send fails with
    /// [`ErrorKind::DeadlineExceeded`](crate::ErrorKind::DeadlineExceeded).
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            full_jitter: true,
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy of exactly one attempt.
    #[must_use]
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The backoff cap before retry number `retry` (1-based).
    pub(crate) fn cap(&self, retry: u32) -> Duration {
        let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.multiplier.max(1.0).powi(exp);
        let secs = self.initial_backoff.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            self.max_backoff
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The sleep before retry number `retry`.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let cap = self.cap(retry);
        if self.full_jitter {
            let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(rand::random_range(0..=nanos))
        } else {
            cap
        }
    }
}

/// Configuration of a [`Producer`](crate::Producer).
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// AMQP URLs (`amqp://user:pass@host:port/vhost`), tried in order; after a lost
    /// connection the producer moves on to the next one, wrapping around.
    pub urls: Vec<String>,
    /// How long one attempt waits for its publisher confirm.
    pub confirm_timeout: Duration,
    /// How failed sends are retried.
    pub retry: RetryPolicy,
}

impl ProducerConfig {
    /// One URL, default timeouts and retry policy.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_urls([url.into()])
    }

    /// Several URLs, tried in order.
    #[must_use]
    pub fn with_urls(urls: impl IntoIterator<Item = String>) -> Self {
        ProducerConfig {
            urls: urls.into_iter().collect(),
            confirm_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }

    /// Replaces the confirm timeout.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Replaces the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            full_jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(10));
        assert_eq!(p.backoff(2), Duration::from_millis(20));
        assert_eq!(p.backoff(4), Duration::from_millis(80));
        assert_eq!(p.backoff(5), Duration::from_millis(100));
        assert_eq!(p.backoff(500), Duration::from_millis(100));
        let j = RetryPolicy {
            full_jitter: true,
            ..p
        };
        for _ in 0..100 {
            assert!(j.backoff(3) <= Duration::from_millis(40));
        }
    }
}
