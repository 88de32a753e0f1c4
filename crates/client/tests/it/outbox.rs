//! The outbox against real databases (SQLite file, PostgreSQL server) and real brokers
//! (Holdfast, RabbitMQ): atomicity with the business write, relay, failure bookkeeping,
//! manual retry/discard, concurrent relays, re-send after a lost lease.
//!
//! The test bodies are written once in `outbox_tests!` and instantiated for each
//! database, so both run exactly the same checks.

use std::collections::HashMap;
use std::time::Duration;

use holdfast_client::lapin::types::{AMQPValue, FieldTable};
use holdfast_client::outbox::{OutboxStatus, RelayConfig};
use holdfast_client::{Message, Outbox, Producer, ProducerConfig, RetryPolicy};

use crate::{Broker, args, durable};

/// A relay that tries fast, so failure paths finish within a test.
pub fn quick_relay(max_attempts: u32) -> RelayConfig {
    RelayConfig {
        batch_size: 64,
        poll_interval: Duration::from_millis(20),
        lease: Duration::from_secs(30),
        max_attempts,
        backoff: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            full_jitter: false,
            ..RetryPolicy::default()
        },
        ..RelayConfig::default()
    }
}

/// A producer that leaves retrying to the relay.
pub async fn relay_producer(url: &str) -> Producer {
    Producer::connect(
        ProducerConfig::new(url)
            .confirm_timeout(Duration::from_secs(5))
            .retry(RetryPolicy::no_retry()),
    )
    .await
    .expect("producer connects")
}

pub async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(ids: &HashMap<String, usize>) -> (usize, usize) {
    (ids.len(), ids.values().filter(|n| **n > 1).count())
}

macro_rules! outbox_tests {
    ($db:ident, $pool:expr) => {
        mod $db {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn committed_rows_are_published_once_and_rolled_back_rows_never() {
                let (pool, _guard) = $pool.await;
                sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
                    .execute(&pool)
                    .await
                    .expect("orders table");
                let outbox = Outbox::new(pool.clone());
                outbox.migrate().await.expect("migrate");
                outbox.migrate().await.expect("migrate is idempotent");
                let broker = Broker::holdfast();
                let queue = broker.queue("orders");
                let producer = relay_producer(&broker.url()).await;
                producer
                    .declare_queue(&queue, durable(), FieldTable::default())
                    .await
                    .expect("declare");

                let mut committed = Vec::new();
                for i in 0..20_i64 {
                    let mut tx = pool.begin().await.expect("begin");
                    sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
                        .bind(format!("order-{i}"))
                        .bind(i * 100)
                        .execute(&mut *tx)
                        .await
                        .expect("business row");
                    let message = Message::to_queue(queue.as_str(), format!("order-{i} created"))
                        .header("order", AMQPValue::LongString(format!("order-{i}").into()))
                        .content_type("text/plain");
                    let id = outbox.enqueue(&mut tx, message).await.expect("enqueue");
                    if i % 4 == 3 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                        committed.push(id);
                    }
                }
                assert_eq!(outbox.counts().await.expect("counts").pending, 15);

                let relay = outbox.relay(producer.clone(), quick_relay(3)).spawn();
                wait_for("15 rows sent", || async {
                    outbox.counts().await.expect("counts").sent == 15
                })
                .await;
                relay.shutdown().await;

                let messages = broker.drain_with_headers(&queue).await;
                let ids: HashMap<String, usize> =
                    messages.iter().fold(HashMap::new(), |mut m, (id, _, _)| {
                        *m.entry(id.clone()).or_default() += 1;
                        m
                    });
                assert_eq!(count(&ids), (15, 0), "each committed row once");
                for id in &committed {
                    assert_eq!(ids.get(id), Some(&1), "{id}");
                }
                // Properties survive the round trip through the table.
                let (_, body, headers) = &messages[0];
                assert_eq!(body, b"order-0 created");
                assert!(headers.contains("order-0"), "{headers}");
                let sent = outbox
                    .list(Some(OutboxStatus::Sent), 100)
                    .await
                    .expect("list");
                assert_eq!(sent.len(), 15);
                assert!(sent.iter().all(|r| r.attempts == 1 && r.sent_at.is_some()));
                assert_eq!(outbox.purge_sent(Duration::ZERO).await.expect("purge"), 15);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unpublishable_rows_are_marked_failed_and_can_be_retried_or_discarded() {
                let (pool, _guard) = $pool.await;
                let outbox = Outbox::new(pool.clone());
                outbox.migrate().await.expect("migrate");
                let broker = Broker::holdfast();
                let queue = broker.queue("late");
                let producer = relay_producer(&broker.url()).await;
                let mut tx = pool.begin().await.expect("begin");
                // No queue of that name yet: every mandatory publish comes back (312).
                outbox
                    .enqueue(
                        &mut tx,
                        Message::to_queue(queue.as_str(), "a").message_id("a"),
                    )
                    .await
                    .expect("enqueue");
                outbox
                    .enqueue(
                        &mut tx,
                        Message::to_queue(queue.as_str(), "b").message_id("b"),
                    )
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");

                let relay = outbox.relay(producer.clone(), quick_relay(3)).spawn();
                wait_for("2 rows failed", || async {
                    outbox.counts().await.expect("counts").failed == 2
                })
                .await;
                assert_eq!(
                    relay
                        .stats()
                        .gave_up
                        .load(std::sync::atomic::Ordering::Relaxed),
                    2
                );
                assert_eq!(
                    relay
                        .stats()
                        .failed_attempts
                        .load(std::sync::atomic::Ordering::Relaxed),
                    6,
                    "three attempts each"
                );
                let failed = outbox
                    .list(Some(OutboxStatus::Failed), 10)
                    .await
                    .expect("list");
                assert_eq!(failed.len(), 2);
                assert!(failed.iter().all(|r| r.attempts == 3));
                assert!(
                    failed[0]
                        .last_error
                        .as_deref()
                        .unwrap_or("")
                        .contains("312"),
                    "{:?}",
                    failed[0].last_error
                );

                // A person fixes the cause, retries one row and discards the other.
                producer
                    .declare_queue(&queue, durable(), FieldTable::default())
                    .await
                    .expect("declare");
                assert_eq!(outbox.retry(Some(&[failed[0].id])).await.expect("retry"), 1);
                assert_eq!(outbox.discard(&[failed[1].id]).await.expect("discard"), 1);
                wait_for("the retried row sent", || async {
                    outbox.counts().await.expect("counts").sent == 1
                })
                .await;
                relay.shutdown().await;
                let counts = outbox.counts().await.expect("counts");
                assert_eq!(
                    (counts.pending, counts.sent, counts.failed, counts.discarded),
                    (0, 1, 0, 1)
                );
                let ids = broker.drain(&queue).await;
                assert_eq!(ids.len(), 1);
                assert_eq!(ids.get("a"), Some(&1));
                // Discarded rows stay out of the relay's reach; `retry(None)` only takes
                // failed rows.
                assert_eq!(outbox.retry(None).await.expect("retry all failed"), 0);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn three_concurrent_relays_send_every_row_exactly_once() {
                let (pool, _guard) = $pool.await;
                let outbox = Outbox::new(pool.clone());
                outbox.migrate().await.expect("migrate");
                let broker = Broker::holdfast();
                let queue = broker.queue("many");
                let producer = relay_producer(&broker.url()).await;
                producer
                    .declare_queue(&queue, durable(), FieldTable::default())
                    .await
                    .expect("declare");
                let rows = 1500;
                for chunk in 0..(rows / 100) {
                    let mut tx = pool.begin().await.expect("begin");
                    for i in 0..100 {
                        outbox
                            .enqueue(
                                &mut tx,
                                Message::to_queue(queue.as_str(), format!("{chunk}-{i}")),
                            )
                            .await
                            .expect("enqueue");
                    }
                    tx.commit().await.expect("commit");
                }
                let mut relays = Vec::new();
                for _ in 0..3 {
                    let p = relay_producer(&broker.url()).await;
                    relays.push(outbox.relay(p, quick_relay(3)).spawn());
                }
                wait_for("every row sent", || async {
                    outbox.counts().await.expect("counts").sent == rows
                })
                .await;
                let per_relay: Vec<u64> = relays
                    .iter()
                    .map(|r| r.stats().sent.load(std::sync::atomic::Ordering::Relaxed))
                    .collect();
                for relay in relays {
                    relay.shutdown().await;
                }
                let ids = broker.drain(&queue).await;
                assert_eq!(count(&ids), (rows as usize, 0), "per relay: {per_relay:?}");
                assert_eq!(per_relay.iter().sum::<u64>(), rows as u64);
                eprintln!("{} rows, sent per relay: {per_relay:?}", rows);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_claim_whose_relay_died_is_resent_with_the_same_id_and_deduplicated() {
                let (pool, _guard) = $pool.await;
                let outbox = Outbox::new(pool.clone());
                outbox.migrate().await.expect("migrate");
                let broker = Broker::holdfast();
                let queue = broker.queue("dedup");
                let producer = relay_producer(&broker.url()).await;
                producer
                    .declare_queue(
                        &queue,
                        durable(),
                        args(&[("x-message-deduplication", AMQPValue::Boolean(true))]),
                    )
                    .await
                    .expect("declare");
                let mut tx = pool.begin().await.expect("begin");
                let id = outbox
                    .enqueue(&mut tx, Message::to_queue(queue.as_str(), "charge 42"))
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");

                // Relay A claims with a short lease, publishes, and dies before marking.
                let mut dying = quick_relay(3);
                dying.lease = Duration::from_millis(300);
                dying.relay_id = "relay-a".into();
                let claimed = <_ as holdfast_client::Backend>::outbox_claim(
                    outbox.pool(),
                    "relay-a",
                    now_ms(),
                    now_ms() + 300,
                    10,
                )
                .await
                .expect("claim");
                assert_eq!(claimed.len(), 1);
                producer
                    .send(claimed[0].to_message().expect("message"))
                    .await
                    .expect("first publish confirmed");

                // Relay B waits out the lease, then publishes it again with the same id.
                let relay = outbox.relay(producer.clone(), quick_relay(3)).spawn();
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(
                    outbox.counts().await.expect("counts").pending,
                    1,
                    "still leased to A"
                );
                wait_for("the row re-sent", || async {
                    outbox.counts().await.expect("counts").sent == 1
                })
                .await;
                relay.shutdown().await;
                let ids = broker.drain(&queue).await;
                assert_eq!(
                    ids.get(&id),
                    Some(&1),
                    "the broker absorbed the re-send: {ids:?}"
                );
            }
        }
    };
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

outbox_tests!(sqlite, crate::sqlite_pool());
outbox_tests!(postgres, crate::postgres_pool());

/// The same relay path against RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_to_rabbitmq() {
    let (pool, _guard) = crate::sqlite_pool().await;
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await.expect("migrate");
    let broker = Broker::rabbitmq();
    let queue = broker.queue("outbox");
    let producer = relay_producer(&broker.url()).await;
    producer
        .declare_queue(&queue, durable(), FieldTable::default())
        .await
        .expect("declare");
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..50 {
        outbox
            .enqueue(&mut tx, Message::to_queue(queue.as_str(), format!("m{i}")))
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let relay = outbox.relay(producer, quick_relay(3)).spawn();
    relay.wake();
    wait_for("50 rows sent", || async {
        outbox.counts().await.expect("counts").sent == 50
    })
    .await;
    relay.shutdown().await;
    let ids = broker.drain(&queue).await;
    assert_eq!(count(&ids), (50, 0));
    broker.delete_queue(&queue).await;
}
