//! `holdfast bench idempotent`: throughput of the SDK's idempotent consumer.
//!
//! The queue (declared with its dead-letter queue, as the consumer declares it) is first
//! filled with N persistent messages with unique message ids, through
//! [`Producer::send_all`] in chunks of 1000 (pipelined confirms). Then an
//! [`IdempotentConsumer`] drains it with `--prefetch P` and `--concurrency C` handlers;
//! per message it begins a transaction, records the message id in `holdfast_processed`,
//! runs the handler (one `INSERT` into `bench_effects`), commits and acknowledges. The
//! clock runs from the start of the consumer until it has acknowledged N messages.
//!
//! The run then checks that `bench_effects` gained exactly N rows (no unique constraint
//! there, so a double effect would show) and cleans up (queue and `.dlq`, `bench_effects`,
//! and the consumer's `holdfast_processed` rows).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use holdfast_client::sqlx::{self, Database, Pool, Transaction};
use holdfast_client::{
    Backend, ConsumerConfig, Delivery, IdempotentConsumer, Message, Producer, ProducerConfig,
    TxOutcome,
};
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use serde_json::json;

use crate::args::IdempotentArgs;
use crate::common::{self, Target};
use crate::error::{AmqpContext, BenchError, ClientContext};
use crate::report::Report;
use crate::sdk::{self, Db};

/// The consumer name under which message ids are recorded.
const CONSUMER: &str = "bench";

/// Messages per `send_all` while pre-filling.
const PREFILL_CHUNK: u64 = 1000;

/// The handler's effect table. No unique constraint: a message processed twice would
/// leave two rows, which the final count catches.
const EFFECTS_DDL: &str =
    "CREATE TABLE IF NOT EXISTS bench_effects (message_id TEXT NOT NULL, body_len BIGINT NOT NULL)";

/// What the consume phase measured.
struct Consumed {
    prefill_secs: f64,
    secs: f64,
    duplicates: u64,
    retried: u64,
    dead_lettered: u64,
    effects: i64,
}

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, database or broker failures, a stalled consumer, or a result that
/// does not add up (effects other than N).
pub async fn run(args: IdempotentArgs) -> Result<Report, BenchError> {
    args.sdk.validate()?;
    if args.concurrency == 0 || args.prefetch == 0 {
        return Err(BenchError::InvalidArgs(
            "--prefetch and --concurrency must be at least 1".into(),
        ));
    }
    let target = Target::parse(&args.sdk.url)?;
    let db = Db::parse(&args.sdk.database)?;
    match &db {
        Db::Sqlite(path) => run_on(Db::sqlite(path).await?, &args, target, &db).await,
        Db::Postgres(url) => {
            // One connection per running handler, and a few to spare.
            let connections = u32::try_from(args.concurrency)
                .unwrap_or(u32::MAX)
                .saturating_add(4);
            run_on(Db::postgres(url, connections).await?, &args, target, &db).await
        }
    }
}

async fn run_on<DB: Backend>(
    pool: Pool<DB>,
    args: &IdempotentArgs,
    target: Target,
    db: &Db,
) -> Result<Report, BenchError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let sdk_args = &args.sdk;
    let queue = sdk_args
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("idempotent"));
    let consumer = IdempotentConsumer::new(pool.clone(), CONSUMER);
    consumer
        .migrate()
        .await
        .sdk("creating the processed-message table")?;
    sdk::execute(&pool, EFFECTS_DDL, "creating bench_effects").await?;

    let (admin, admin_channel) = target.channel("holdfast-bench admin").await?;
    // The consumer declares its queue with dead-lettering arguments; declaring it the
    // same way first lets the pre-fill land in the queue the consumer will read.
    holdfast_client::consumer::declare_topology(&admin_channel, &queue, FieldTable::default())
        .await
        .ctx("queue.declare")?;

    let measured = measure(&pool, &consumer, args, &admin_channel, &queue).await;

    if !sdk_args.keep {
        let mut queues = vec![
            queue.clone(),
            holdfast_client::consumer::dead_letter_queue(&queue),
        ];
        // Delay queues exist only when a handler asked for a retry; a missing one would
        // close the channel, so each gets its own.
        if measured.as_ref().map_or(true, |m| m.retried > 0) {
            queues.extend(
                [1000, 2000, 4000, 8000, 16000, 32000, 60000]
                    .map(|ms| holdfast_client::consumer::retry_queue(&queue, ms)),
            );
        }
        for name in queues {
            if let Ok(channel) = admin.create_channel().await {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "deleted".into()).await;
            }
        }
        let _ = sdk::execute(&pool, "DROP TABLE IF EXISTS bench_effects", "cleanup").await;
        let _ = sqlx::query("DELETE FROM holdfast_processed WHERE consumer = $1")
            .bind(CONSUMER.to_owned())
            .execute(&pool)
            .await;
    }
    common::close(&admin).await;
    pool.close().await;
    let consumed = measured?;

    let n = sdk_args.messages;
    let params = json!({
        "database": db.kind(),
        "database_location": db.location(),
        "size": sdk_args.size,
        "prefetch": args.prefetch,
        "concurrency": args.concurrency,
        "queue": queue,
    });
    Ok(Report::new(
        "idempotent",
        target.host,
        params,
        n,
        consumed.secs,
        sdk_args.size,
    )
    .with("prefilled", n)
    .with("prefill_secs", sdk::secs(consumed.prefill_secs))
    .with("duplicates", consumed.duplicates)
    .with("retried", consumed.retried)
    .with("dead_lettered", consumed.dead_lettered)
    .with("effects", consumed.effects))
}

async fn measure<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &IdempotentConsumer<DB>,
    args: &IdempotentArgs,
    admin_channel: &lapin::Channel,
    queue: &str,
) -> Result<Consumed, BenchError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let n = args.sdk.messages;
    let effects_before = sdk::count_rows(pool, "bench_effects")
        .await
        .map_err(|source| BenchError::Database {
            context: "counting bench_effects",
            source,
        })?;

    let prefill_started = Instant::now();
    prefill(args, queue).await?;
    let prefill_secs = prefill_started.elapsed().as_secs_f64();
    let depth = sdk::queue_depth(admin_channel, queue).await?;
    if depth != n {
        return Err(BenchError::Check(format!(
            "queue {queue} should hold the {n} pre-filled messages, but holds {depth}"
        )));
    }

    let acked = Arc::new(AtomicU64::new(0));
    let progress = common::progress(
        "idempotent",
        vec![("processed", Arc::clone(&acked))],
        args.sdk.quiet,
    );
    let quiet = args.sdk.quiet;
    let started = Instant::now();
    let handle = consumer
        .start(
            ConsumerConfig::new(args.sdk.url.as_str(), queue)
                .prefetch(args.prefetch, args.concurrency),
            move |delivery, tx| effect::<DB>(delivery, tx, quiet),
        )
        .sdk("IdempotentConsumer::start")?;
    let waited = sdk::wait_for("acknowledged messages", n, &acked, || {
        handle.stats().acked.load(Ordering::Relaxed)
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    let stats = handle.stats();
    let duplicates = stats.duplicates.load(Ordering::Relaxed);
    let retried = stats.retried.load(Ordering::Relaxed);
    let dead_lettered = stats.dead_lettered.load(Ordering::Relaxed);
    handle.shutdown().await;
    waited?;

    let effects = sdk::count_rows(pool, "bench_effects")
        .await
        .map_err(|source| BenchError::Database {
            context: "counting bench_effects",
            source,
        })?
        - effects_before;
    if effects != i64::try_from(n).unwrap_or(i64::MAX) {
        return Err(BenchError::Check(format!(
            "bench_effects should have gained {n} rows, but gained {effects}"
        )));
    }
    Ok(Consumed {
        prefill_secs,
        secs,
        duplicates,
        retried,
        dead_lettered,
        effects,
    })
}

/// N persistent messages with unique ids, confirmed, in chunks of [`PREFILL_CHUNK`].
async fn prefill(args: &IdempotentArgs, queue: &str) -> Result<(), BenchError> {
    let n = args.sdk.messages;
    if !args.sdk.quiet {
        eprintln!("[idempotent] pre-filling {queue} with {n} messages");
    }
    let producer = Producer::connect(ProducerConfig::new(args.sdk.url.as_str()))
        .await
        .sdk("Producer::connect")?;
    let run_id = common::unique_name("msg");
    let body = common::payload(args.sdk.size);
    let mut first = 0;
    while first < n {
        let end = (first + PREFILL_CHUNK).min(n);
        let batch = (first..end)
            .map(|i| Message::to_queue(queue, body.clone()).message_id(format!("{run_id}-{i}")))
            .collect();
        for result in producer.send_all(batch).await {
            result.sdk("pre-fill Producer::send_all")?;
        }
        first = end;
    }
    let _ = producer.close().await;
    Ok(())
}

/// The handler: one effect row in the consumer's transaction.
async fn effect<DB: Backend>(
    delivery: Delivery,
    mut tx: Transaction<'static, DB>,
    quiet: bool,
) -> TxOutcome<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
{
    let inserted = sqlx::query("INSERT INTO bench_effects (message_id, body_len) VALUES ($1, $2)")
        .bind(delivery.message_id.clone().unwrap_or_default())
        .bind(i64::try_from(delivery.body.len()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await;
    match inserted {
        Ok(_) => TxOutcome::Commit(tx),
        Err(e) => {
            if !quiet {
                eprintln!("[idempotent] effect failed, retrying: {e}");
            }
            TxOutcome::Retry
        }
    }
}
