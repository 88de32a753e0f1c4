//! `holdfast bench outbox`: throughput of the SDK's transactional outbox, in two phases
//! measured separately.
//!
//! - Enqueue: what the application pays. `--enqueue-concurrency C` tasks each commit one
//!   transaction after the other (as a service does per request), every transaction
//!   inserting a business row into `bench_orders` and one outbox row with
//!   [`Outbox::enqueue`]. Reported as transactions per second, with commit latencies.
//! - Relay: what the relays sustain. Once all N rows are committed, `--relays R` relays
//!   start, each with its own [`Producer`] (no producer retries: the relay has its own),
//!   and the clock runs until they have marked all N rows sent. Reported as messages per
//!   second.
//!
//! The run then checks that the outbox holds N sent rows and nothing pending, and that
//! the queue holds exactly N messages, and cleans up (queue, `bench_orders`, and the
//! outbox table if the run created it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use holdfast_client::sqlx::{self, Database, Pool};
use holdfast_client::{
    Backend, Message, Outbox, Producer, ProducerConfig, RelayConfig, RetryPolicy,
};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;

use crate::args::OutboxArgs;
use crate::common::{self, Target};
use crate::error::{AmqpContext, BenchError, ClientContext, DbContext};
use crate::report::Report;
use crate::sdk::{self, Db};

/// The business table every enqueue transaction writes to, next to the outbox row.
const ORDERS_DDL: &str =
    "CREATE TABLE IF NOT EXISTS bench_orders (id TEXT PRIMARY KEY, amount BIGINT)";

/// What the enqueue phase measured.
struct Enqueued {
    secs: f64,
    latency: Histogram<u64>,
}

/// What the relay phase measured.
struct Relayed {
    secs: f64,
    failed_attempts: u64,
    database_errors: u64,
}

/// Runs the scenario.
///
/// # Errors
/// Bad arguments, database or broker failures, a stalled relay, or a result that does
/// not add up (rows not sent, a queue depth other than N).
pub async fn run(args: OutboxArgs) -> Result<Report, BenchError> {
    args.sdk.validate()?;
    if args.relays == 0 || args.batch == 0 || args.enqueue_concurrency == 0 {
        return Err(BenchError::InvalidArgs(
            "--relays, --batch and --enqueue-concurrency must be at least 1".into(),
        ));
    }
    let target = Target::parse(&args.sdk.url)?;
    let db = Db::parse(&args.sdk.database)?;
    match &db {
        Db::Sqlite(path) => run_on(Db::sqlite(path).await?, &args, target, &db).await,
        Db::Postgres(url) => {
            // Every enqueue task and every relay holds a connection at times.
            let connections = args.enqueue_concurrency.max(args.relays) + 4;
            run_on(Db::postgres(url, connections).await?, &args, target, &db).await
        }
    }
}

async fn run_on<DB: Backend>(
    pool: Pool<DB>,
    args: &OutboxArgs,
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
    let n = sdk_args.messages;
    let queue = sdk_args
        .queue
        .clone()
        .unwrap_or_else(|| common::unique_name("outbox"));

    // Counting sent rows needs an outbox that holds only this run's rows.
    let outbox_existed = match sdk::count_rows(&pool, "holdfast_outbox").await {
        Ok(0) => true,
        Ok(rows) => {
            return Err(BenchError::InvalidArgs(format!(
                "the outbox of {} already holds {rows} rows; point --database at a scratch \
                 database",
                db.location()
            )));
        }
        Err(_) => false,
    };
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await.sdk("creating the outbox table")?;
    sdk::execute(&pool, ORDERS_DDL, "creating bench_orders").await?;

    let (admin, admin_channel) = target.channel("holdfast-bench admin").await?;
    admin_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ctx("queue.declare")?;

    let measured = measure(&outbox, args, &queue).await;
    let checked = match measured {
        Ok(phases) => check(&outbox, &admin_channel, &queue, n)
            .await
            .map(|depth| (phases, depth)),
        Err(err) => Err(err),
    };

    if !sdk_args.keep {
        let _ = admin_channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = sdk::execute(&pool, "DROP TABLE IF EXISTS bench_orders", "cleanup").await;
        let _ = if outbox_existed {
            sqlx::query("DELETE FROM holdfast_outbox WHERE routing_key = $1")
                .bind(queue.clone())
                .execute(&pool)
                .await
                .map(|_| ())
        } else {
            sqlx::query("DROP TABLE IF EXISTS holdfast_outbox")
                .execute(&pool)
                .await
                .map(|_| ())
        };
    }
    common::close(&admin).await;
    pool.close().await;
    let ((enqueued, relayed), depth) = checked?;

    let params = json!({
        "database": db.kind(),
        "database_location": db.location(),
        "size": sdk_args.size,
        "enqueue_concurrency": args.enqueue_concurrency,
        "relays": args.relays,
        "batch": args.batch,
        "queue": queue,
    });
    let enqueue_rate = common::rate(n, enqueued.secs);
    let relay_rate = common::rate(n, relayed.secs);
    // The headline figures are the relay's; the enqueue phase has its own fields.
    Ok(Report::new(
        "outbox",
        target.host,
        params,
        n,
        relayed.secs,
        sdk_args.size,
    )
    .with_latency("enqueue-commit", common::percentiles(&enqueued.latency))
    .with("enqueue_secs", sdk::secs(enqueued.secs))
    .with("enqueue_tx_per_sec", enqueue_rate.round())
    .with("relay_secs", sdk::secs(relayed.secs))
    .with("relay_msgs_per_sec", relay_rate.round())
    .with("relay_failed_attempts", relayed.failed_attempts)
    .with("relay_database_errors", relayed.database_errors)
    .with("queue_depth", depth))
}

/// Both phases, one after the other.
async fn measure<DB: Backend>(
    outbox: &Outbox<DB>,
    args: &OutboxArgs,
    queue: &str,
) -> Result<(Enqueued, Relayed), BenchError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
{
    let enqueued = enqueue_phase(outbox, args, queue).await?;
    let relayed = relay_phase(outbox, args).await?;
    Ok((enqueued, relayed))
}

async fn enqueue_phase<DB: Backend>(
    outbox: &Outbox<DB>,
    args: &OutboxArgs,
    queue: &str,
) -> Result<Enqueued, BenchError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
{
    let n = args.sdk.messages;
    // Order ids unique across runs, so a kept bench_orders never collides.
    let run_id = Arc::<str>::from(common::unique_name("order"));
    let body: Arc<[u8]> = common::payload(args.sdk.size).into();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = common::progress(
        "outbox enqueue",
        vec![("committed", Arc::clone(&done))],
        args.sdk.quiet,
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.enqueue_concurrency {
        let outbox = outbox.clone();
        let queue = queue.to_owned();
        let run_id = Arc::clone(&run_id);
        let body = Arc::clone(&body);
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let mut latency = common::histogram()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let began = Instant::now();
                let mut tx = outbox.pool().begin().await.db("BEGIN")?;
                sqlx::query("INSERT INTO bench_orders (id, amount) VALUES ($1, $2)")
                    .bind(format!("{run_id}-{i}"))
                    .bind(i64::try_from(i).unwrap_or(i64::MAX))
                    .execute(&mut *tx)
                    .await
                    .db("INSERT INTO bench_orders")?;
                outbox
                    .enqueue(&mut tx, Message::to_queue(queue.as_str(), body.to_vec()))
                    .await
                    .sdk("Outbox::enqueue")?;
                tx.commit().await.db("COMMIT")?;
                common::record(&mut latency, began.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(latency)
        }));
    }
    let mut latency = common::histogram()?;
    let mut first_error = None;
    for task in tasks {
        match task.await? {
            Ok(h) => common::merge(&mut latency, &h)?,
            Err(err) => {
                // Make the other tasks stop after their current transaction.
                next.store(n, Ordering::Relaxed);
                first_error.get_or_insert(err);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(Enqueued { secs, latency }),
    }
}

async fn relay_phase<DB: Backend>(
    outbox: &Outbox<DB>,
    args: &OutboxArgs,
) -> Result<Relayed, BenchError> {
    let n = args.sdk.messages;
    // Connections are opened before the clock starts: the phase measures relaying.
    let mut producers = Vec::new();
    for _ in 0..args.relays {
        producers.push(
            Producer::connect(
                ProducerConfig::new(args.sdk.url.as_str()).retry(RetryPolicy::no_retry()),
            )
            .await
            .sdk("Producer::connect")?,
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let progress = common::progress(
        "outbox relay",
        vec![("sent", Arc::clone(&sent))],
        args.sdk.quiet,
    );
    let started = Instant::now();
    let relays: Vec<_> = producers
        .iter()
        .map(|producer| {
            outbox
                .relay(
                    producer.clone(),
                    RelayConfig {
                        batch_size: args.batch,
                        poll_interval: Duration::from_millis(10),
                        ..RelayConfig::default()
                    },
                )
                .spawn()
        })
        .collect();
    // The relays' own counters (incremented once a batch's sent marks are committed)
    // instead of COUNT queries, which would compete with the relays for the database.
    let waited = sdk::wait_for("rows marked sent", n, &sent, || {
        relays
            .iter()
            .map(|r| r.stats().sent.load(Ordering::Relaxed))
            .sum()
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    let failed_attempts = relays
        .iter()
        .map(|r| r.stats().failed_attempts.load(Ordering::Relaxed))
        .sum();
    let database_errors = relays
        .iter()
        .map(|r| r.stats().database_errors.load(Ordering::Relaxed))
        .sum();
    for relay in relays {
        relay.shutdown().await;
    }
    for producer in &producers {
        let _ = producer.close().await;
    }
    waited?;
    Ok(Relayed {
        secs,
        failed_attempts,
        database_errors,
    })
}

/// The outbox holds N sent rows and nothing else; the queue holds N messages.
async fn check<DB: Backend>(
    outbox: &Outbox<DB>,
    channel: &lapin::Channel,
    queue: &str,
    n: u64,
) -> Result<u64, BenchError> {
    let counts = outbox.counts().await.sdk("Outbox::counts")?;
    let expected = i64::try_from(n).unwrap_or(i64::MAX);
    if counts.sent != expected || counts.pending != 0 || counts.failed != 0 {
        return Err(BenchError::Check(format!(
            "the outbox should hold {n} sent rows, but holds {} sent, {} pending, {} failed",
            counts.sent, counts.pending, counts.failed
        )));
    }
    let depth = sdk::queue_depth(channel, queue).await?;
    if depth != n {
        return Err(BenchError::Check(format!(
            "queue {queue} should hold {n} messages, but holds {depth}"
        )));
    }
    Ok(depth)
}
