//! `holdfast bench latency`: end-to-end latency at a fixed rate. One producer publishes
//! `--rate R` messages per second, paced by an absolute schedule (message i is due at
//! `start + i / R`, so a stall is followed by catching up rather than by a slower rate);
//! one consumer receives them. Each body starts with its send time, 8 bytes big-endian,
//! in nanoseconds since an `Instant` shared by the producer and the consumer (both live in
//! this process, so no clock synchronisation is involved). Latencies go into an HDR
//! histogram: p50, p99, p99.9 and max, in microseconds, plus the achieved rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::json;

use crate::args::LatencyArgs;
use crate::common::{self, Quota, Stop, Target};
use crate::consume::{Acks, subscribe};
use crate::error::{AmqpContext, BenchError};
use crate::report::Report;

/// The consumer acks (multiple) every this many deliveries, or every prefetch/2.
const ACK_EVERY: u64 = 64;

/// After the producer stops, how long to wait for the messages still in flight.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, connection failures, broker errors.
pub async fn run(args: LatencyArgs) -> Result<Report, BenchError> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    let limit = common.time_limit()?;
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000_000.0) {
        return Err(BenchError::InvalidArgs(format!(
            "--rate must be a positive number of messages per second, not {}",
            args.rate
        )));
    }
    let size = common.size.max(8);
    let persistent = common.is_persistent();
    let queue = common
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("latency"));

    let (admin, admin_channel) = target.channel("holdfast-bench admin").await?;
    admin_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: persistent,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ctx("queue.declare")?;
    let (consumer_connection, consumer_channel) =
        target.channel("holdfast-bench latency consumer").await?;
    let consumer = subscribe(&consumer_channel, &queue, args.prefetch, Acks::Every(1)).await?;
    let ack_every = match args.prefetch {
        0 => ACK_EVERY,
        prefetch => (u64::from(prefetch) / 2).clamp(1, ACK_EVERY),
    };
    let (producer_connection, producer_channel) =
        target.channel("holdfast-bench latency producer").await?;

    let origin = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop_producer = Stop::new();
    let stop_consumer = Stop::new();
    let deadline = stop_producer.after(limit);
    let progress = common::progress(
        "latency",
        vec![
            ("sent", Arc::clone(&sent)),
            ("received", Arc::clone(&received)),
        ],
        common.quiet,
    );
    let receiver = {
        let received = Arc::clone(&received);
        let stop = stop_consumer.clone();
        tokio::spawn(async move {
            receive(
                &consumer_channel,
                consumer,
                ack_every,
                origin,
                &received,
                &stop,
            )
            .await
        })
    };
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let quota = Quota::new(common.messages);
    let produced = produce(
        &producer_channel,
        &queue,
        size,
        persistent,
        interval,
        origin,
        &quota,
        &stop_producer,
        &sent,
    )
    .await;
    let send_secs = origin.elapsed().as_secs_f64();
    if produced.is_ok() {
        let grace = Instant::now() + DRAIN_GRACE;
        while received.load(Ordering::Relaxed) < sent.load(Ordering::Relaxed)
            && Instant::now() < grace
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop_consumer.trigger();
    let histogram = receiver.await?;
    if let Some(progress) = progress {
        progress.abort();
    }
    if let Some(deadline) = deadline {
        deadline.abort();
    }
    common::close(&producer_connection).await;
    common::close(&consumer_connection).await;
    if !common.keep {
        let _ = admin_channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    common::close(&admin).await;
    produced?;
    let histogram = histogram?;

    let sent = sent.load(Ordering::Relaxed);
    let received = received.load(Ordering::Relaxed);
    let params = json!({
        "rate": args.rate,
        "size": size,
        "persistent": persistent,
        "prefetch": args.prefetch,
        "queue": queue,
        "requested_messages": common.messages,
        "requested_duration_secs": limit.map(|d| d.as_secs_f64()),
    });
    let achieved = common::rate(sent, send_secs);
    Ok(
        Report::new("latency", target.host, params, received, send_secs, size)
            .with_latency("end-to-end", common::percentiles(&histogram))
            .with("sent", sent)
            .with("achieved_rate", achieved.round()),
    )
}

/// Publishes on schedule until the quota is spent or `stop`.
#[allow(clippy::too_many_arguments)]
async fn produce(
    channel: &Channel,
    queue: &str,
    size: usize,
    persistent: bool,
    interval: Duration,
    origin: Instant,
    quota: &Quota,
    stop: &Stop,
    sent: &AtomicU64,
) -> Result<(), BenchError> {
    let mut body = common::payload(size);
    let properties = common::properties(persistent);
    let start = tokio::time::Instant::now();
    let mut due = start;
    while !stop.is_set() && quota.claim() {
        tokio::time::sleep_until(due).await;
        if stop.is_set() {
            break;
        }
        let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        body[..8].copy_from_slice(&now.to_be_bytes());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await
            .ctx("basic.publish")?;
        sent.fetch_add(1, Ordering::Relaxed);
        due += interval;
    }
    Ok(())
}

/// Records the latency of every delivery until `stop`.
async fn receive(
    channel: &Channel,
    mut consumer: Consumer,
    ack_every: u64,
    origin: Instant,
    received: &AtomicU64,
    stop: &Stop,
) -> Result<Histogram<u64>, BenchError> {
    let mut histogram = common::histogram()?;
    let mut unacked = 0;
    let mut last_tag = None;
    loop {
        let next = tokio::select! {
            biased;
            () = stop.wait() => break,
            next = consumer.next() => next,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery.ctx("basic.deliver")?;
        let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(stamp) = delivery.data.first_chunk::<8>() {
            let sent_at = u64::from_be_bytes(*stamp);
            common::record(
                &mut histogram,
                Duration::from_nanos(now.saturating_sub(sent_at)),
            );
        }
        received.fetch_add(1, Ordering::Relaxed);
        unacked += 1;
        last_tag = Some(delivery.delivery_tag);
        if unacked >= ack_every {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .ctx("basic.ack")?;
            unacked = 0;
            last_tag = None;
        }
    }
    if let Some(tag) = last_tag {
        channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .ctx("basic.ack")?;
    }
    Ok(histogram)
}
