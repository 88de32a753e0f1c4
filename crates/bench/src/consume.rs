//! `holdfast bench consume`: drain rate of a queue. The queue is first topped up to
//! `--prefill N` messages (published fast, with confirms) unless it already holds them;
//! then N consumers, each on its own connection, drain it with a prefetch and either acks
//! (`multiple = true` every K deliveries) or auto-ack, until the target count is consumed
//! or the time limit ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::json;

use crate::args::ConsumeArgs;
use crate::common::{self, Quota, Stop, Target};
use crate::error::{AmqpContext, BenchError};
use crate::report::Report;

/// A consumer that saw nothing for this long while a target count is set gives up: the
/// queue ran dry before the target.
const IDLE_LIMIT: Duration = Duration::from_secs(5);

/// The confirm window used to pre-fill.
const PREFILL_WINDOW: u32 = 1000;

/// How a consumer settles deliveries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Acks {
    /// no-ack consume.
    Auto,
    /// `basic.ack(multiple = true)` every K deliveries, and once at the end.
    Every(u32),
}

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, connection failures, broker errors.
pub async fn run(args: ConsumeArgs) -> Result<Report, BenchError> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    if args.consumers == 0 {
        return Err(BenchError::InvalidArgs(
            "--consumers must be at least 1".into(),
        ));
    }
    if !args.auto_ack && args.ack_every == 0 {
        return Err(BenchError::InvalidArgs(
            "--ack-every must be at least 1".into(),
        ));
    }
    if !args.auto_ack && args.prefetch != 0 && args.ack_every > u32::from(args.prefetch) {
        return Err(BenchError::InvalidArgs(
            "--ack-every larger than --prefetch would stall the consumers".into(),
        ));
    }
    let wanted = common.messages.or(args.prefill);
    // A run with a count to reach stops when it is reached; without one, after the time
    // limit (default 10 s).
    let limit = match (common.duration, wanted) {
        (None, Some(_)) => None,
        _ => common.time_limit()?,
    };
    let acks = if args.auto_ack {
        Acks::Auto
    } else {
        Acks::Every(args.ack_every)
    };
    let persistent = common.is_persistent();
    let queue = common
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("consume"));

    let (admin, admin_channel) = target.channel("holdfast-bench admin").await?;
    let declared = admin_channel
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
    let held = u64::from(declared.message_count());
    let mut prefilled = 0;
    let mut prefill_secs = 0.0;
    if let Some(prefill) = args.prefill
        && held < prefill
    {
        let started = Instant::now();
        let missing = prefill - held;
        if !common.quiet {
            eprintln!("[consume] pre-filling {queue} with {missing} messages");
        }
        let (connection, channel) = target.channel("holdfast-bench prefill").await?;
        let counter = Arc::new(AtomicU64::new(0));
        let confirmed = common::publish_confirmed(
            &channel,
            "",
            &queue,
            &common::payload(common.size),
            &common::properties(persistent),
            PREFILL_WINDOW,
            common.pipeline,
            &Quota::new(Some(missing)),
            &Stop::new(),
            &counter,
        )
        .await?;
        common::close(&connection).await;
        prefilled = confirmed.acked;
        prefill_secs = started.elapsed().as_secs_f64();
        if confirmed.nacked > 0 {
            eprintln!(
                "[consume] warning: the broker nacked {} pre-fill messages",
                confirmed.nacked
            );
        }
    }

    let mut connections = Vec::new();
    let mut subscriptions = Vec::new();
    for i in 0..args.consumers {
        let (connection, channel) = target
            .channel(&format!("holdfast-bench consumer {i}"))
            .await?;
        subscriptions.push(subscribe(&channel, &queue, args.prefetch, acks).await?);
        connections.push((connection, channel));
    }

    let quota = Quota::new(wanted);
    let stop = Stop::new();
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = stop.after(limit);
    let progress = common::progress(
        "consume",
        vec![("consumed", Arc::clone(&counter))],
        common.quiet,
    );
    let idle = wanted.map(|_| IDLE_LIMIT);
    let pipeline = common.pipeline;
    let mut tasks = Vec::new();
    for ((_, channel), consumer) in connections.iter().zip(subscriptions) {
        let channel = channel.clone();
        let quota = Arc::clone(&quota);
        let stop = stop.clone();
        let counter = Arc::clone(&counter);
        tasks.push(tokio::spawn(async move {
            drain(
                &channel, consumer, acks, pipeline, &quota, &stop, &counter, idle,
            )
            .await
        }));
    }
    let mut consumed = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await? {
            Ok(n) => consumed += n,
            Err(err) => {
                stop.trigger();
                first_error.get_or_insert(err);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    if let Some(deadline) = deadline {
        deadline.abort();
    }
    for (connection, _) in &connections {
        common::close(connection).await;
    }
    if !common.keep {
        let _ = admin_channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    common::close(&admin).await;
    if let Some(err) = first_error {
        return Err(err);
    }
    if let Some(wanted) = wanted
        && consumed < wanted
        && !common.quiet
    {
        eprintln!("[consume] note: consumed {consumed} of {wanted} requested");
    }

    let params = json!({
        "consumers": args.consumers,
        "prefetch": args.prefetch,
        "ack_every": match acks { Acks::Auto => None, Acks::Every(k) => Some(k) },
        "auto_ack": args.auto_ack,
        "size": common.size,
        "persistent": persistent,
        "queue": queue,
        "prefill": args.prefill,
        "requested_messages": wanted,
        "requested_duration_secs": limit.map(|d| d.as_secs_f64()),
    });
    Ok(Report::new(
        "consume",
        target.host,
        params,
        consumed,
        elapsed,
        common.size,
    )
    .with("prefilled", prefilled)
    .with("prefill_secs", (prefill_secs * 1000.0).round() / 1000.0))
}

/// `basic.qos` then `basic.consume` on `queue`.
pub(crate) async fn subscribe(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    acks: Acks,
) -> Result<Consumer, BenchError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .ctx("basic.qos")?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: matches!(acks, Acks::Auto),
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ctx("basic.consume")
}

/// Consumes until `stop`, the quota is spent (which sets `stop`), or `idle` passes
/// without a delivery; acks what it took. Returns the number of deliveries counted.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn drain(
    channel: &Channel,
    mut consumer: Consumer,
    acks: Acks,
    pipeline: usize,
    quota: &Quota,
    stop: &Stop,
    counter: &AtomicU64,
    idle: Option<Duration>,
) -> Result<u64, BenchError> {
    let mut consumed = 0;
    let mut unacked = 0;
    let mut last_tag = None;
    let mut inflight = common::Pipeline::new(pipeline);
    loop {
        let next = tokio::select! {
            biased;
            () = stop.wait() => break,
            next = next_delivery(&mut consumer, idle) => next,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery.ctx("basic.deliver")?;
        if !quota.claim() {
            // Beyond the target: left unacked, the broker requeues it when we close.
            stop.trigger();
            break;
        }
        consumed += 1;
        counter.fetch_add(1, Ordering::Relaxed);
        if let Acks::Every(every) = acks {
            unacked += 1;
            last_tag = Some(delivery.delivery_tag);
            if unacked >= every {
                for acked in inflight.push(ack(channel, delivery.delivery_tag)).await {
                    acked?;
                }
                unacked = 0;
                last_tag = None;
            }
        }
        if quota.spent() {
            stop.trigger();
            break;
        }
    }
    for acked in inflight.finish().await {
        acked?;
    }
    if let Some(tag) = last_tag {
        ack(channel, tag).await?;
    }
    Ok(consumed)
}

/// The next delivery, or `None` when the consumer ends or stays idle too long.
async fn next_delivery(
    consumer: &mut Consumer,
    idle: Option<Duration>,
) -> Option<lapin::Result<lapin::message::Delivery>> {
    match idle {
        None => consumer.next().await,
        Some(idle) => tokio::time::timeout(idle, consumer.next())
            .await
            .ok()
            .flatten(),
    }
}

async fn ack(channel: &Channel, tag: u64) -> Result<(), BenchError> {
    channel
        .basic_ack(tag, BasicAckOptions { multiple: true })
        .await
        .ctx("basic.ack")
}
