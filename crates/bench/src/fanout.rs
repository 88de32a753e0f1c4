//! `holdfast bench fanout`: one durable fanout exchange bound to N durable queues.
//! Producers publish persistent messages with confirms (a window each); one consumer per
//! queue drains it. Reports the publish rate (confirmed messages per second) and the
//! delivered rate (N deliveries per message, per second, until every queue has drained
//! everything that was confirmed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use serde_json::json;

use crate::args::FanoutArgs;
use crate::common::{self, Quota, Stop, Target};
use crate::consume::{Acks, drain, subscribe};
use crate::error::{AmqpContext, BenchError};
use crate::report::Report;

/// After publishing ends, the consumers may go this long without a delivery before the
/// run gives up waiting for the rest.
const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, connection failures, broker errors.
pub async fn run(args: FanoutArgs) -> Result<Report, BenchError> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    let limit = common.time_limit()?;
    if args.queues == 0 || args.producers == 0 {
        return Err(BenchError::InvalidArgs(
            "--queues and --producers must be at least 1".into(),
        ));
    }
    if args.ack_every == 0 || (args.prefetch != 0 && args.ack_every > u32::from(args.prefetch)) {
        return Err(BenchError::InvalidArgs(
            "--ack-every must be between 1 and --prefetch".into(),
        ));
    }
    let persistent = common.is_persistent();
    let exchange = common
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("fanout"));
    let queues: Vec<String> = (0..args.queues)
        .map(|i| format!("{exchange}-{i}"))
        .collect();

    let (admin, admin_channel) = target.channel("holdfast-bench admin").await?;
    let declared = declare(&admin_channel, &exchange, &queues, persistent).await;
    let result = match declared {
        Ok(()) => measure(&args, &target, &exchange, &queues, limit).await,
        Err(err) => Err(err),
    };
    if !common.keep {
        for queue in &queues {
            let _ = admin_channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = admin_channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    common::close(&admin).await;
    result
}

async fn declare(
    channel: &Channel,
    exchange: &str,
    queues: &[String],
    durable: bool,
) -> Result<(), BenchError> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ctx("exchange.declare")?;
    for queue in queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ctx("queue.declare")?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .ctx("queue.bind")?;
    }
    Ok(())
}

async fn measure(
    args: &FanoutArgs,
    target: &Target,
    exchange: &str,
    queues: &[String],
    limit: Option<Duration>,
) -> Result<Report, BenchError> {
    let common = &args.common;
    let acks = Acks::Every(args.ack_every);
    let pipeline = args.common.pipeline;
    let mut connections = Vec::new();
    let mut subscriptions = Vec::new();
    for queue in queues {
        let (connection, channel) = target
            .channel(&format!("holdfast-bench consumer {queue}"))
            .await?;
        subscriptions.push(subscribe(&channel, queue, args.prefetch, acks).await?);
        connections.push((connection, channel));
    }
    let mut producers = Vec::new();
    for i in 0..args.producers {
        producers.push(
            target
                .channel(&format!("holdfast-bench producer {i}"))
                .await?,
        );
    }

    let published = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop_producers = Stop::new();
    let stop_consumers = Stop::new();
    let started = Instant::now();
    let deadline = stop_producers.after(limit);
    let progress = common::progress(
        "fanout",
        vec![
            ("published", Arc::clone(&published)),
            ("delivered", Arc::clone(&delivered)),
        ],
        common.quiet,
    );
    let unlimited = Quota::new(None);
    let mut consumers = Vec::new();
    for ((_, channel), consumer) in connections.iter().zip(subscriptions) {
        let channel = channel.clone();
        let quota = Arc::clone(&unlimited);
        let stop = stop_consumers.clone();
        let delivered = Arc::clone(&delivered);
        consumers.push(tokio::spawn(async move {
            drain(
                &channel, consumer, acks, pipeline, &quota, &stop, &delivered, None,
            )
            .await
        }));
    }
    let quota = Quota::new(common.messages);
    let body: Arc<[u8]> = common::payload(common.size).into();
    let properties = common::properties(common.is_persistent());
    let mut publishers = Vec::new();
    for (_, channel) in &producers {
        let channel = channel.clone();
        let exchange = exchange.to_owned();
        let body = Arc::clone(&body);
        let properties = properties.clone();
        let quota = Arc::clone(&quota);
        let stop = stop_producers.clone();
        let published = Arc::clone(&published);
        let window = args.window;
        publishers.push(tokio::spawn(async move {
            common::publish_confirmed(
                &channel,
                &exchange,
                "",
                &body,
                &properties,
                window,
                pipeline,
                &quota,
                &stop,
                &published,
            )
            .await
        }));
    }
    let mut acked = 0;
    let mut nacked = 0;
    let mut latency = common::histogram()?;
    let mut first_error = None;
    for task in publishers {
        match task.await? {
            Ok(confirmed) => {
                acked += confirmed.acked;
                nacked += confirmed.nacked;
                common::merge(&mut latency, &confirmed.latency)?;
            }
            Err(err) => {
                stop_producers.trigger();
                first_error.get_or_insert(err);
            }
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();

    // Wait until every queue has delivered every confirmed message, or nothing moves.
    let expected = acked * u64::from(args.queues);
    let mut last_seen = delivered.load(Ordering::Relaxed);
    let mut last_move = Instant::now();
    let mut delivered_secs = started.elapsed().as_secs_f64();
    while first_error.is_none() {
        let now = delivered.load(Ordering::Relaxed);
        delivered_secs = started.elapsed().as_secs_f64();
        if now >= expected {
            break;
        }
        if now != last_seen {
            last_seen = now;
            last_move = Instant::now();
        } else if last_move.elapsed() > DRAIN_IDLE {
            eprintln!("[fanout] note: delivered {now} of {expected} expected; giving up waiting");
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop_consumers.trigger();
    for task in consumers {
        if let Err(err) = task.await? {
            first_error.get_or_insert(err);
        }
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    if let Some(deadline) = deadline {
        deadline.abort();
    }
    for (connection, _) in producers.iter().chain(connections.iter()) {
        common::close(connection).await;
    }
    if let Some(err) = first_error {
        return Err(err);
    }

    let delivered = delivered.load(Ordering::Relaxed);
    let params = json!({
        "queues": args.queues,
        "producers": args.producers,
        "window": args.window,
        "prefetch": args.prefetch,
        "ack_every": args.ack_every,
        "size": common.size,
        "persistent": common.is_persistent(),
        "exchange": exchange,
        "requested_messages": common.messages,
        "requested_duration_secs": limit.map(|d| d.as_secs_f64()),
    });
    let delivered_rate = common::rate(delivered, delivered_secs);
    Ok(Report::new(
        "fanout",
        target.host.clone(),
        params,
        acked,
        publish_secs,
        common.size,
    )
    .with_latency("confirm", common::percentiles(&latency))
    .with("nacked", nacked)
    .with("delivered", delivered)
    .with("delivered_secs", (delivered_secs * 1000.0).round() / 1000.0)
    .with("delivered_per_sec", delivered_rate.round()))
}
