//! `holdfast bench publish`: publish rate of N producers, each on its own connection and
//! channel, in one of three modes: fire-and-forget, publisher confirms with a window of
//! unconfirmed messages, or transactions of B publishes then `tx.commit`.
//!
//! Fire-and-forget counts messages once lapin has written them to the socket; confirms and
//! transactions count messages the broker took responsibility for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::json;

use crate::args::PublishArgs;
use crate::common::{self, Quota, Stop, Target};
use crate::error::{AmqpContext, BenchError};
use crate::report::Report;

/// How a producer publishes.
#[derive(Debug, Clone, Copy)]
enum Mode {
    FireAndForget,
    Confirm { window: u32 },
    Tx { batch: u32 },
}

/// What one producer achieved.
struct Outcome {
    messages: u64,
    nacked: u64,
    latency: Histogram<u64>,
}

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, connection failures, broker errors.
pub async fn run(args: PublishArgs) -> Result<Report, BenchError> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    let limit = common.time_limit()?;
    if args.producers == 0 {
        return Err(BenchError::InvalidArgs(
            "--producers must be at least 1".into(),
        ));
    }
    let mode = match (args.confirm, args.tx_batch) {
        (_, Some(0)) => {
            return Err(BenchError::InvalidArgs(
                "--tx-batch must be at least 1".into(),
            ));
        }
        (false, Some(batch)) => Mode::Tx { batch },
        (true, _) => Mode::Confirm {
            window: args.window,
        },
        (false, None) => Mode::FireAndForget,
    };
    let persistent = common.is_persistent();
    let queue = common
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("publish"));

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

    let mut producers = Vec::new();
    for i in 0..args.producers {
        producers.push(
            target
                .channel(&format!("holdfast-bench producer {i}"))
                .await?,
        );
    }

    let quota = Quota::new(common.messages);
    let stop = Stop::new();
    let counter = Arc::new(AtomicU64::new(0));
    let body: Arc<[u8]> = common::payload(common.size).into();
    let properties = common::properties(persistent);
    let pipeline = common.pipeline;
    let started = Instant::now();
    let deadline = stop.after(limit);
    let progress = common::progress(
        "publish",
        vec![("published", Arc::clone(&counter))],
        common.quiet,
    );
    let mut tasks = Vec::new();
    for (_, channel) in &producers {
        let channel = channel.clone();
        let queue = queue.clone();
        let body = Arc::clone(&body);
        let properties = properties.clone();
        let quota = Arc::clone(&quota);
        let stop = stop.clone();
        let counter = Arc::clone(&counter);
        tasks.push(tokio::spawn(async move {
            produce(
                &channel,
                &queue,
                &body,
                &properties,
                mode,
                pipeline,
                &quota,
                &stop,
                &counter,
            )
            .await
        }));
    }
    let mut messages = 0;
    let mut nacked = 0;
    let mut latency = common::histogram()?;
    let mut first_error = None;
    for task in tasks {
        match task.await? {
            Ok(outcome) => {
                messages += outcome.messages;
                nacked += outcome.nacked;
                common::merge(&mut latency, &outcome.latency)?;
            }
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
    for (connection, _) in &producers {
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

    let (mode_name, window, tx_batch) = match mode {
        Mode::FireAndForget => ("fire-and-forget", None, None),
        Mode::Confirm { window } => ("confirm", Some(window), None),
        Mode::Tx { batch } => ("tx", None, Some(batch)),
    };
    let params = json!({
        "producers": args.producers,
        "mode": mode_name,
        "window": window,
        "tx_batch": tx_batch,
        "size": common.size,
        "persistent": persistent,
        "queue": queue,
        "requested_messages": common.messages,
        "requested_duration_secs": limit.map(|d| d.as_secs_f64()),
    });
    let latency_kind = match mode {
        Mode::Tx { .. } => "commit",
        _ => "confirm",
    };
    let mut report = Report::new(
        "publish",
        target.host,
        params,
        messages,
        elapsed,
        common.size,
    )
    .with_latency(latency_kind, common::percentiles(&latency));
    if matches!(mode, Mode::Confirm { .. }) {
        report = report.with("nacked", nacked);
    }
    Ok(report)
}

/// One producer's loop.
#[allow(clippy::too_many_arguments)]
async fn produce(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    mode: Mode,
    pipeline: usize,
    quota: &Quota,
    stop: &Stop,
    counter: &Arc<AtomicU64>,
) -> Result<Outcome, BenchError> {
    match mode {
        Mode::Confirm { window } => {
            let confirmed = common::publish_confirmed(
                channel, "", queue, body, properties, window, pipeline, quota, stop, counter,
            )
            .await?;
            Ok(Outcome {
                messages: confirmed.acked,
                nacked: confirmed.nacked,
                latency: confirmed.latency,
            })
        }
        Mode::FireAndForget => {
            let mut messages = 0;
            let mut inflight = common::Pipeline::new(pipeline);
            while !stop.is_set() && quota.claim() {
                for written in inflight
                    .push(publish(channel, queue, body, properties))
                    .await
                {
                    written?;
                    messages += 1;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            for written in inflight.finish().await {
                written?;
                messages += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Outcome {
                messages,
                nacked: 0,
                latency: common::histogram()?,
            })
        }
        Mode::Tx { batch } => {
            channel.tx_select().await.ctx("tx.select")?;
            let mut latency = common::histogram()?;
            let mut messages = 0;
            loop {
                let mut in_batch = 0;
                let mut inflight = common::Pipeline::new(pipeline);
                while in_batch < batch && !stop.is_set() && quota.claim() {
                    for written in inflight
                        .push(publish(channel, queue, body, properties))
                        .await
                    {
                        written?;
                    }
                    in_batch += 1;
                }
                for written in inflight.finish().await {
                    written?;
                }
                if in_batch == 0 {
                    break;
                }
                let commit = Instant::now();
                channel.tx_commit().await.ctx("tx.commit")?;
                common::record(&mut latency, commit.elapsed());
                messages += u64::from(in_batch);
                counter.fetch_add(u64::from(in_batch), Ordering::Relaxed);
            }
            Ok(Outcome {
                messages,
                nacked: 0,
                latency,
            })
        }
    }
}

async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
) -> Result<(), BenchError> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties.clone(),
        )
        .await
        .ctx("basic.publish")?;
    Ok(())
}
