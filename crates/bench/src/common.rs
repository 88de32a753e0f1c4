//! What the scenarios share: the broker URL, connections, stop conditions, message
//! quotas, progress lines, latency histograms, and the confirmed publisher.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{AmqpContext, BenchError};
use crate::report::LatencyUs;

/// How long the AMQP handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker to benchmark.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    uri: AMQPUri,
    /// `host:port`, for reports (no credentials).
    pub host: String,
}

impl Target {
    /// Parses `--url`.
    pub(crate) fn parse(url: &str) -> Result<Self, BenchError> {
        let uri = AMQPUri::from_str(url).map_err(|reason| BenchError::InvalidUrl {
            url: redact(url),
            reason,
        })?;
        if uri.authority.host.is_empty() {
            return Err(BenchError::InvalidUrl {
                url: redact(url),
                reason: "no host".into(),
            });
        }
        let host = format!("{}:{}", uri.authority.host, uri.authority.port);
        Ok(Target { uri, host })
    }

    /// Opens one connection, with a bounded handshake time.
    pub(crate) async fn connect(&self, name: &str) -> Result<Connection, BenchError> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(source)) => Err(BenchError::Connect {
                host: self.host.clone(),
                source,
            }),
            Err(_) => Err(BenchError::ConnectTimeout {
                host: self.host.clone(),
                secs: CONNECT_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Opens one connection and one channel on it.
    pub(crate) async fn channel(&self, name: &str) -> Result<(Connection, Channel), BenchError> {
        let connection = self.connect(name).await?;
        let channel = connection.create_channel().await.ctx("channel.open")?;
        Ok((connection, channel))
    }
}

/// Hides the password of `amqp://user:password@host`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Closes a connection politely; errors at this point change nothing.
pub(crate) async fn close(connection: &Connection) {
    let _ = connection.close(200, "holdfast bench done".into()).await;
}

/// A name nobody else uses: `holdfast-bench-<scenario>-<pid>-<micros>`.
pub(crate) fn unique_name(scenario: &str) -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("holdfast-bench-{scenario}-{}-{micros}", std::process::id())
}

/// Delivery mode 2 (persistent) or 1 (transient).
pub(crate) fn properties(persistent: bool) -> BasicProperties {
    BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 })
}

/// A body of `size` bytes.
pub(crate) fn payload(size: usize) -> Vec<u8> {
    vec![b'h'; size]
}

/// A broadcast "stop now", set by a deadline, a quota or the driver.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    tx: Arc<watch::Sender<bool>>,
}

impl Stop {
    pub(crate) fn new() -> Self {
        Stop {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Stops everyone.
    pub(crate) fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub(crate) fn is_set(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once stopped.
    pub(crate) async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Triggers after `limit`, if there is one.
    pub(crate) fn after(&self, limit: Option<Duration>) -> Option<JoinHandle<()>> {
        let limit = limit?;
        let stop = self.clone();
        Some(tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            stop.trigger();
        }))
    }
}

/// A shared budget of messages: each producer or consumer claims one at a time, so the
/// total is exact however the work is spread.
#[derive(Debug)]
pub(crate) struct Quota {
    limit: Option<u64>,
    claimed: AtomicU64,
}

impl Quota {
    pub(crate) fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Quota {
            limit,
            claimed: AtomicU64::new(0),
        })
    }

    /// Takes one message from the budget; false once it is spent.
    pub(crate) fn claim(&self) -> bool {
        match self.limit {
            None => true,
            Some(limit) => self
                .claimed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// Whether this claim was the last one.
    pub(crate) fn spent(&self) -> bool {
        self.limit
            .is_some_and(|limit| self.claimed.load(Ordering::Relaxed) >= limit)
    }
}

/// Prints `label: Ns  total  rate now  average` on stderr once per second.
pub(crate) fn progress(
    scenario: &'static str,
    counters: Vec<(&'static str, Arc<AtomicU64>)>,
    quiet: bool,
) -> Option<JoinHandle<()>> {
    if quiet {
        return None;
    }
    Some(tokio::spawn(async move {
        let start = Instant::now();
        let mut last: Vec<u64> = vec![0; counters.len()];
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        loop {
            ticker.tick().await;
            let secs = start.elapsed().as_secs_f64();
            let mut line = format!("[{scenario}] {secs:5.1}s");
            for ((label, counter), last) in counters.iter().zip(last.iter_mut()) {
                let now = counter.load(Ordering::Relaxed);
                line.push_str(&format!(
                    "  {label} {now} ({} msg/s now, {} avg)",
                    now.saturating_sub(*last),
                    rate(now, secs).round()
                ));
                *last = now;
            }
            eprintln!("{line}");
        }
    }))
}

/// messages per second, 0 for an empty interval.
pub(crate) fn rate(messages: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        messages as f64 / secs
    } else {
        0.0
    }
}

/// A latency histogram in nanoseconds, 1 ns to 1 hour, 3 significant digits.
pub(crate) fn histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|err| BenchError::Histogram(err.to_string()))
}

/// Adds `from` into `into`.
pub(crate) fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> Result<(), BenchError> {
    into.add(from)
        .map_err(|err| BenchError::Histogram(err.to_string()))
}

/// Records one latency.
pub(crate) fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(nanos);
}

/// p50/p99/p99.9/max in microseconds, or nothing for an empty histogram.
pub(crate) fn percentiles(histogram: &Histogram<u64>) -> Option<LatencyUs> {
    if histogram.is_empty() {
        return None;
    }
    let us = |nanos: u64| (nanos as f64 / 100.0).round() / 10.0;
    Some(LatencyUs {
        p50: us(histogram.value_at_quantile(0.50)),
        p99: us(histogram.value_at_quantile(0.99)),
        p999: us(histogram.value_at_quantile(0.999)),
        max: us(histogram.max()),
    })
}

/// What a confirmed publisher achieved.
#[derive(Debug)]
pub(crate) struct Confirmed {
    /// Messages the broker acked.
    pub acked: u64,
    /// Messages the broker nacked.
    pub nacked: u64,
    /// Publish → confirm latency.
    pub latency: Histogram<u64>,
}

/// Publishes with confirms, at most `window` unconfirmed, until `quota` is spent or
/// `stop` is set; then waits for the outstanding confirms. `counter` counts acks.
///
/// Confirms arrive in publish order (AMQP acks by increasing delivery tag), so awaiting
/// them in order from a separate task measures each one when it resolves.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: &BasicProperties,
    window: u32,
    pipeline: usize,
    quota: &Quota,
    stop: &Stop,
    counter: &Arc<AtomicU64>,
) -> Result<Confirmed, BenchError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ctx("confirm.select")?;
    let window = usize::try_from(window.max(1)).unwrap_or(usize::MAX);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(window));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
        Instant,
        lapin::PublisherConfirm,
        tokio::sync::OwnedSemaphorePermit,
    )>();
    let counter = Arc::clone(counter);
    let waiter = tokio::spawn(async move {
        let mut confirmed = Confirmed {
            acked: 0,
            nacked: 0,
            latency: histogram()?,
        };
        while let Some((sent, confirm, permit)) = rx.recv().await {
            let outcome = confirm.await.ctx("publisher confirm")?;
            record(&mut confirmed.latency, sent.elapsed());
            drop(permit);
            if outcome.is_nack() {
                confirmed.nacked += 1;
            } else {
                confirmed.acked += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok::<_, BenchError>(confirmed)
    });
    let mut publish_error = None;
    let mut inflight = Pipeline::new(pipeline);
    while !stop.is_set() && quota.claim() {
        let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else {
            break;
        };
        let sent = Instant::now();
        let publish = async move {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .await;
            (sent, permit, confirm)
        };
        let mut stopped = false;
        for (sent, permit, confirm) in inflight.push(publish).await {
            if !forward(&tx, sent, permit, confirm, &mut publish_error) {
                stopped = true;
            }
        }
        if stopped {
            break;
        }
    }
    for (sent, permit, confirm) in inflight.finish().await {
        forward(&tx, sent, permit, confirm, &mut publish_error);
    }
    drop(tx);
    let confirmed = waiter.await??;
    match publish_error {
        Some(err) => Err(err),
        None => Ok(confirmed),
    }
}

type ConfirmSender = tokio::sync::mpsc::UnboundedSender<(
    Instant,
    lapin::PublisherConfirm,
    tokio::sync::OwnedSemaphorePermit,
)>;

/// Hands a written publish's confirm to the waiter; false once publishing must stop.
fn forward(
    tx: &ConfirmSender,
    sent: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
    confirm: lapin::Result<lapin::PublisherConfirm>,
    publish_error: &mut Option<BenchError>,
) -> bool {
    match confirm {
        // The waiter stopped on an error; it reports it.
        Ok(confirm) => tx.send((sent, confirm, permit)).is_ok(),
        Err(source) => {
            publish_error.get_or_insert(BenchError::Amqp {
                context: "basic.publish",
                source,
            });
            false
        }
    }
}

/// Up to `depth` lapin operations in flight, completed in order.
///
/// lapin's `basic_publish` and `basic_ack` resolve only once its I/O loop has written
/// the frames, so awaiting each in turn costs a thread hand-off per message; with several
/// in flight the loop writes them together.
pub(crate) struct Pipeline<F: std::future::Future> {
    inflight: futures_util::stream::FuturesOrdered<F>,
    depth: usize,
}

impl<F: std::future::Future> Pipeline<F> {
    pub(crate) fn new(depth: usize) -> Self {
        Pipeline {
            inflight: futures_util::stream::FuturesOrdered::new(),
            depth: depth.max(1),
        }
    }

    /// Starts `operation`; returns the operations finished meanwhile, waiting for the
    /// oldest when `depth` are in flight.
    pub(crate) async fn push(&mut self, operation: F) -> Vec<F::Output> {
        use futures_util::{FutureExt, StreamExt};
        self.inflight.push_back(operation);
        let mut done = Vec::new();
        // Polling starts the new operation (lapin queues its frames on first poll).
        while let Some(Some(output)) = self.inflight.next().now_or_never() {
            done.push(output);
        }
        while self.inflight.len() >= self.depth {
            match self.inflight.next().await {
                Some(output) => done.push(output),
                None => break,
            }
        }
        done
    }

    /// Waits for everything still in flight.
    pub(crate) async fn finish(&mut self) -> Vec<F::Output> {
        use futures_util::StreamExt;
        let mut done = Vec::new();
        while let Some(output) = self.inflight.next().await {
            done.push(output);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn parses_host_and_port() {
        let target = Target::parse("amqp://guest:guest@127.0.0.1:5673/%2f").expect("valid");
        assert_eq!(target.host, "127.0.0.1:5673");
        let target = Target::parse("amqp://localhost").expect("valid");
        assert_eq!(target.host, "localhost:5672");
        assert!(matches!(
            Target::parse("http//nope"),
            Err(BenchError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn quota_is_exact() {
        let quota = Quota::new(Some(3));
        assert!(quota.claim() && quota.claim() && quota.claim());
        assert!(quota.spent());
        assert!(!quota.claim());
        assert!(Quota::new(None).claim());
    }
}
