//! The consumer against Holdfast and RabbitMQ: ack, retry through delay queues, reject
//! and exhausted attempts to the DLQ with history, DLQ replay, graceful shutdown, and
//! the idempotent consumer on SQLite and PostgreSQL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_client::consumer::{ConsumerConfig, dead_letter_queue, replay_dead_letters};
use holdfast_client::{Consumer, IdempotentConsumer, Message, Outcome, RetryPolicy, TxOutcome};

use crate::Broker;
use crate::outbox::{relay_producer, wait_for};

fn quick(url: String, queue: &str) -> ConsumerConfig {
    ConsumerConfig::new(url, queue)
        .max_attempts(3)
        .retry_delay(RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            full_jitter: false,
            ..RetryPolicy::default()
        })
}

/// good → ack; flaky → fails twice, then ack; bad → always retry (DLQ after 3
/// attempts); poison → reject at once. Then the DLQ is replayed after a "fix".
async fn retries_and_dead_letters(broker: Broker) {
    let queue = broker.queue("work");
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let handler = {
        let seen = Arc::clone(&seen);
        let fixed = Arc::clone(&fixed);
        move |d: holdfast_client::Delivery| {
            let seen = Arc::clone(&seen);
            let fixed = Arc::clone(&fixed);
            async move {
                let body = String::from_utf8_lossy(&d.body).to_string();
                seen.lock()
                    .expect("lock")
                    .entry(body.clone())
                    .or_default()
                    .push(d.attempt);
                if fixed.load(Ordering::SeqCst) {
                    return Outcome::Ack;
                }
                match body.as_str() {
                    "flaky" if d.attempt < 3 => Outcome::Retry,
                    "bad" => Outcome::Retry,
                    "poison" => Outcome::Reject("cannot parse".into()),
                    _ => Outcome::Ack,
                }
            }
        }
    };
    let consumer = Consumer::start(quick(broker.url(), &queue), handler).expect("consumer");
    let producer = relay_producer(&broker.url()).await;
    // The consumer declares the queue when it connects; wait until it exists.
    wait_for("the consumer connected and declared its queues", || async {
        consumer.stats().connections.load(Ordering::Relaxed) >= 1
    })
    .await;
    for body in ["good", "flaky", "bad", "poison"] {
        producer
            .send(Message::to_queue(queue.as_str(), body).message_id(body))
            .await
            .expect("sent");
    }
    let dlq = dead_letter_queue(&queue);
    wait_for("two dead letters", || async {
        broker.message_count(&dlq).await == 2
    })
    .await;
    wait_for("flaky acked", || async {
        consumer.stats().acked.load(Ordering::Relaxed) == 2
    })
    .await;
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen["good"], vec![1]);
        assert_eq!(seen["flaky"], vec![1, 2, 3]);
        assert_eq!(seen["bad"], vec![1, 2, 3]);
        assert_eq!(seen["poison"], vec![1]);
    }
    assert_eq!(consumer.stats().retried.load(Ordering::Relaxed), 4);
    assert_eq!(consumer.stats().dead_lettered.load(Ordering::Relaxed), 2);

    // The dead letters carry their history.
    let conn = holdfast_client::lapin::Connection::connect(
        &broker.url(),
        holdfast_client::lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut histories = HashMap::new();
    for _ in 0..2 {
        let m = channel
            .basic_get(
                dlq.as_str().into(),
                holdfast_client::lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .expect("get")
            .expect("a dead letter");
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let headers = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(crate::headers_text)
            .unwrap_or_default();
        histories.insert(id, headers);
    }
    let _ = conn.close(200, "looked".into()).await; // both go back to the DLQ
    let bad = &histories["bad"];
    assert!(bad.contains("x-death") && bad.contains("rejected"), "{bad}");
    assert!(
        bad.contains(&format!("{queue}.retry.50")),
        "the delay queues are in the history: {bad}"
    );
    assert!(bad.contains("x-holdfast-attempt: LongUInt(3)"), "{bad}");
    assert!(
        histories["poison"].contains("rejected"),
        "{}",
        histories["poison"]
    );

    // A person fixes the handler and replays the DLQ.
    fixed.store(true, Ordering::SeqCst);
    let report = replay_dead_letters(&broker.url(), &dlq, 100)
        .await
        .expect("replay");
    assert_eq!((report.replayed, report.skipped), (2, 0));
    wait_for("replayed messages acked", || async {
        consumer.stats().acked.load(Ordering::Relaxed) == 4
    })
    .await;
    assert_eq!(broker.message_count(&dlq).await, 0);
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(
            seen["bad"],
            vec![1, 2, 3, 1],
            "the replay starts a fresh attempt count"
        );
    }
    consumer.shutdown().await;
    if let Broker::RabbitMq(_) = broker {
        for q in [
            queue.clone(),
            dlq,
            format!("{queue}.retry.50"),
            format!("{queue}.retry.100"),
        ] {
            broker.delete_queue(&q).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_on_holdfast() {
    retries_and_dead_letters(Broker::holdfast()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_on_rabbitmq() {
    retries_and_dead_letters(Broker::rabbitmq()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_handlers_finish_and_returns_the_rest() {
    let broker = Broker::holdfast();
    let queue = "slow";
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let handler = {
        let started = Arc::clone(&started);
        let finished = Arc::clone(&finished);
        move |_d: holdfast_client::Delivery| {
            let started = Arc::clone(&started);
            let finished = Arc::clone(&finished);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(400)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Outcome::Ack
            }
        }
    };
    let config = quick(broker.url(), queue).prefetch(10, 3);
    let consumer = Consumer::start(config, handler).expect("consumer");
    let producer = relay_producer(&broker.url()).await;
    wait_for("the consumer connected and declared its queues", || async {
        consumer.stats().connections.load(Ordering::Relaxed) >= 1
    })
    .await;
    for i in 0..10 {
        producer
            .send(Message::to_queue(queue, format!("{i}")))
            .await
            .expect("sent");
    }
    wait_for("three handlers running", || async {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    consumer.shutdown().await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        3,
        "no new handler after shutdown began"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        3,
        "running handlers finished"
    );
    assert_eq!(
        broker.message_count(queue).await,
        7,
        "the other seven are back in the queue"
    );
}

macro_rules! idempotent_tests {
    ($db:ident, $pool:expr, $broker:expr) => {
        mod $db {
            use super::*;

            /// The same message id delivered three times (a producer re-send, a relay
            /// re-send, a replay) charges once; a message without an id is dead-lettered;
            /// a handler that asks to retry rolls back its effect.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_message_id_is_processed_once() {
                let (pool, _guard) = $pool.await;
                sqlx::query("CREATE TABLE payments (order_id TEXT NOT NULL, attempt BIGINT NOT NULL)")
                    .execute(&pool)
                    .await
                    .expect("payments table");
                let idem = IdempotentConsumer::new(pool.clone(), "payments");
                idem.migrate().await.expect("migrate");
                let broker = $broker;
                let queue_name = broker.queue("orders");
                let queue = queue_name.as_str();
                let consumer = idem
                    .start(quick(broker.url(), queue), |d: holdfast_client::Delivery, mut tx: sqlx::Transaction<'static, _>| async move {
                        let order = String::from_utf8_lossy(&d.body).to_string();
                        if let Err(e) = sqlx::query("INSERT INTO payments (order_id, attempt) VALUES ($1, $2)")
                            .bind(&order)
                            .bind(i64::from(d.attempt))
                            .execute(&mut *tx)
                            .await
                        {
                            return TxOutcome::Reject(e.to_string());
                        }
                        if order == "flaky" && d.attempt == 1 {
                            // The insert above is rolled back with the transaction.
                            return TxOutcome::Retry;
                        }
                        TxOutcome::Commit(tx)
                    })
                    .expect("consumer");
                let producer = relay_producer(&broker.url()).await;
                wait_for("the consumer connected and declared its queues", || async {
        consumer.stats().connections.load(Ordering::Relaxed) >= 1
    })
    .await;
                for _ in 0..3 {
                    producer.send(Message::to_queue(queue, "order-1").message_id("m-1")).await.expect("sent");
                }
                producer.send(Message::to_queue(queue, "order-2").message_id("m-2")).await.expect("sent");
                producer.send(Message::to_queue(queue, "flaky").message_id("m-3")).await.expect("sent");
                // No message id: the raw channel, since the SDK always sets one.
                {
                    let conn = holdfast_client::lapin::Connection::connect(
                        &broker.url(),
                        holdfast_client::lapin::ConnectionProperties::default(),
                    )
                    .await
                    .expect("connect");
                    let ch = conn.create_channel().await.expect("channel");
                    ch.basic_publish(
                        "".into(),
                        queue.into(),
                        Default::default(),
                        b"anonymous",
                        Default::default(),
                    )
                    .await
                    .expect("publish");
                    let _ = conn.close(200, "done".into()).await;
                }
                let dlq = dead_letter_queue(queue);
                wait_for("all settled", || async {
                    consumer.stats().acked.load(Ordering::Relaxed) == 5
                        && broker.message_count(&dlq).await == 1
                })
                .await;
                assert_eq!(consumer.stats().duplicates.load(Ordering::Relaxed), 2);
                consumer.shutdown().await;
                let rows: Vec<(String, i64)> = sqlx::query_as("SELECT order_id, attempt FROM payments ORDER BY order_id")
                    .fetch_all(&pool)
                    .await
                    .expect("payments");
                assert_eq!(
                    rows,
                    vec![("flaky".to_owned(), 2), ("order-1".to_owned(), 1), ("order-2".to_owned(), 1)]
                );
                assert_eq!(idem.purge(Duration::ZERO).await.expect("purge"), 3);
                for q in [queue.to_owned(), dlq, format!("{queue}.retry.50")] {
                    broker.delete_queue(&q).await;
                }
            }
        }
    };
}

idempotent_tests!(idempotent_sqlite, crate::sqlite_pool(), Broker::holdfast());
idempotent_tests!(
    idempotent_postgres,
    crate::postgres_pool(),
    Broker::holdfast()
);
idempotent_tests!(
    idempotent_sqlite_rabbitmq,
    crate::sqlite_pool(),
    Broker::rabbitmq()
);

/// Redis marks: the same message id three times runs the effect once; a `processing`
/// mark left by a crashed consumer holds the message back until its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_marks_suppress_duplicates_and_hold_back_during_a_lease() {
    let redis = tokio::task::spawn_blocking(holdfast_testkit::services::Redis::start)
        .await
        .expect("redis");
    let broker = Broker::holdfast();
    let queue = "emails";
    let effects: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let store = holdfast_client::consumer::RedisIdempotentConsumer::new(&redis.url(), "mailer")
        .expect("redis url")
        .lease(Duration::from_millis(400));
    let consumer = store
        .start(quick(broker.url(), queue), {
            let effects = Arc::clone(&effects);
            move |d: holdfast_client::Delivery| {
                let effects = Arc::clone(&effects);
                async move {
                    let id = d.message_id.clone().unwrap_or_default();
                    effects.lock().expect("lock").push((id, d.attempt));
                    Outcome::Ack
                }
            }
        })
        .expect("consumer");
    let producer = relay_producer(&broker.url()).await;
    wait_for("the consumer connected and declared its queues", || async {
        consumer.stats().connections.load(Ordering::Relaxed) >= 1
    })
    .await;
    for _ in 0..3 {
        producer
            .send(Message::to_queue(queue, "hi").message_id("e-1"))
            .await
            .expect("sent");
    }
    wait_for("three settled", || async {
        consumer.stats().acked.load(Ordering::Relaxed) == 3
    })
    .await;
    assert_eq!(consumer.stats().duplicates.load(Ordering::Relaxed), 2);

    // A consumer died holding e-2: its mark says `processing` until the lease ends.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", redis.port())).expect("redis");
    std::io::Write::write_all(
        &mut raw,
        b"SET holdfast:processed:mailer:e-2 processing PX 400\r\n",
    )
    .expect("set");
    let mut reply = [0u8; 5];
    std::io::Read::read_exact(&mut raw, &mut reply).expect("reply");
    assert_eq!(&reply, b"+OK\r\n");
    producer
        .send(Message::to_queue(queue, "hi").message_id("e-2"))
        .await
        .expect("sent");
    wait_for("e-2 processed", || async {
        consumer.stats().acked.load(Ordering::Relaxed) == 4
    })
    .await;
    consumer.shutdown().await;
    let effects = effects.lock().expect("lock").clone();
    assert_eq!(
        effects,
        vec![("e-1".to_owned(), 1), ("e-2".to_owned(), 2)],
        "e-2 ran once, after a retry"
    );
}
