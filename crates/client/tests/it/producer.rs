//! The three send modes, error kinds, and a broker crash mid-stream.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use holdfast_client::lapin::options::QueueDeclareOptions;
use holdfast_client::lapin::types::{AMQPValue, FieldTable};
use holdfast_client::{ErrorKind, Message, RetryPolicy};

use crate::{args, drain, durable, fast_retry, producer, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_is_confirmed_with_a_uuid_v7_id_and_keeps_a_caller_id() {
    let server = start();
    let p = producer(&server, fast_retry(3)).await;
    p.declare_queue("q", durable(), FieldTable::default())
        .await
        .expect("declare");
    let c = p
        .send(Message::to_queue("q", "hello"))
        .await
        .expect("confirmed");
    assert_eq!(c.attempts, 1);
    let uuid = uuid_version(&c.message_id);
    assert_eq!(uuid, Some(7), "{}", c.message_id);
    let c2 = p
        .send(Message::to_queue("q", "again").message_id("order-42"))
        .await
        .expect("confirmed");
    assert_eq!(c2.message_id, "order-42");
    let ids = drain(&server, "q").await;
    assert_eq!(ids.get(&c.message_id), Some(&1));
    assert_eq!(ids.get("order-42"), Some(&1));
    assert_eq!(ids.len(), 2);
}

fn uuid_version(s: &str) -> Option<u32> {
    // xxxxxxxx-xxxx-Vxxx-...
    let b = s.as_bytes();
    (s.len() == 36 && b[8] == b'-' && b[13] == b'-')
        .then(|| char::from(b[14]).to_digit(16))
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_mandatory_message_is_returned_with_312() {
    let server = start();
    let p = producer(&server, fast_retry(5)).await;
    let err = p
        .send(Message::to_queue("no-such-queue", "x"))
        .await
        .expect_err("returned");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Returned {
                reply_code: 312,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reply_code(), Some(312));
    assert!(err.message_id().is_some());
    // Still usable afterwards.
    p.declare_queue("ok", durable(), FieldTable::default())
        .await
        .expect("declare");
    p.send(Message::to_queue("ok", "x"))
        .await
        .expect("confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_with_reject_publish_is_nacked() {
    let server = start();
    let p = producer(&server, fast_retry(3)).await;
    let a = args(&[
        ("x-max-length", AMQPValue::LongLongInt(1)),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
    ]);
    p.declare_queue("full", durable(), a)
        .await
        .expect("declare");
    p.send(Message::to_queue("full", "1")).await.expect("fits");
    let err = p
        .send(Message::to_queue("full", "2"))
        .await
        .expect_err("nacked");
    assert_eq!(err.kind(), &ErrorKind::Nacked, "{err}");
    assert_eq!(err.reply_code(), None);

    let once = producer(&server, RetryPolicy::no_retry()).await;
    let started = Instant::now();
    let err = once
        .send(Message::to_queue("full", "3"))
        .await
        .expect_err("nacked");
    assert_eq!(err.kind(), &ErrorKind::Nacked);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(drain(&server, "full").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_async_sends_in_flight_are_all_confirmed() {
    let server = start();
    let p = producer(&server, fast_retry(5)).await;
    p.declare_queue("many", durable(), FieldTable::default())
        .await
        .expect("declare");
    let handles: Vec<_> = (0..2000)
        .map(|i| p.send_async(Message::to_queue("many", format!("m{i}"))))
        .collect();
    let mut confirmed = HashSet::new();
    for h in handles {
        let c = h.await.expect("confirmed");
        confirmed.insert(c.message_id);
    }
    assert_eq!(confirmed.len(), 2000);
    let ids = drain(&server, "many").await;
    assert_eq!(ids.len(), 2000);
    assert!(confirmed.iter().all(|id| ids.get(id) == Some(&1)));

    let (tx, rx) = tokio::sync::oneshot::channel();
    let id = p.send_with_callback(Message::to_queue("many", "cb"), move |r| {
        let _ = tx.send(r);
    });
    let c = rx.await.expect("callback ran").expect("confirmed");
    assert_eq!(c.message_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_oneway_publishes() {
    let server = start();
    let p = producer(&server, fast_retry(3)).await;
    p.declare_queue("oneway", durable(), FieldTable::default())
        .await
        .expect("declare");
    for i in 0..100 {
        p.send_oneway(Message::to_queue("oneway", format!("{i}")))
            .await
            .expect("written");
    }
    // A confirmed send on the other channel of the same connection; oneway frames were
    // written earlier, so give the broker a moment to route them.
    p.send(Message::to_queue("oneway", "last"))
        .await
        .expect("confirmed");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut total = 0;
    while Instant::now() < deadline {
        total += drain(&server, "oneway").await.values().sum::<usize>();
        if total >= 101 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(total, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let mut server = start();
    let p = producer(
        &server,
        RetryPolicy {
            max_attempts: 10_000,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(300),
            multiplier: 2.0,
            full_jitter: true,
            deadline: Duration::from_secs(60),
        },
    )
    .await;
    let dedup = args(&[("x-message-deduplication", AMQPValue::Boolean(true))]);
    p.declare_queue("crash", durable(), dedup)
        .await
        .expect("declare");
    // Transient: gone after a restart, so finding it again proves the replay.
    p.declare_queue(
        "transient",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");

    let sender = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut handles = Vec::new();
            for i in 0..1500 {
                handles.push(p.send_async(Message::to_queue("crash", format!("m{i}"))));
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            let mut results = Vec::new();
            for h in handles {
                let id = h.message_id().to_owned();
                results.push((id, h.await));
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    let results = sender.await.expect("sender task");

    let mut confirmed = HashSet::new();
    let mut retried = 0;
    for (id, r) in &results {
        let c = r.as_ref().unwrap_or_else(|e| panic!("{id} failed: {e}"));
        assert_eq!(&c.message_id, id, "same id across attempts");
        if c.attempts > 1 {
            retried += 1;
        }
        confirmed.insert(id.clone());
    }
    assert_eq!(confirmed.len(), 1500);
    assert!(retried > 0, "the crash hit no send in flight");

    let ids = drain(&server, "crash").await;
    for id in &confirmed {
        assert_eq!(ids.get(id), Some(&1), "{id}: lost or duplicated");
    }
    assert_eq!(ids.len(), 1500);

    let conn = server.connect().await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "transient".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the producer re-declared the transient queue");
    eprintln!("{retried} of 1500 sends were retried across the crash");
}

/// The send modes against RabbitMQ, the other broker the SDK must work with, and
/// `send_all`'s ordering on both brokers.
async fn send_modes(broker: crate::Broker) {
    let p = holdfast_client::Producer::connect(
        holdfast_client::ProducerConfig::new(broker.url())
            .confirm_timeout(Duration::from_secs(5))
            .retry(fast_retry(3)),
    )
    .await
    .expect("producer");
    let q = broker.queue("modes");
    p.declare_queue(&q, durable(), FieldTable::default())
        .await
        .expect("declare");
    let c = p
        .send(Message::to_queue(q.as_str(), "one"))
        .await
        .expect("confirmed");
    assert_eq!(uuid_version(&c.message_id), Some(7));
    let batch: Vec<Message> = (0..300)
        .map(|i| Message::to_queue(q.as_str(), format!("{i}")).message_id(format!("b{i}")))
        .collect();
    let results = p.send_all(batch).await;
    assert!(results.iter().all(Result::is_ok));
    let handles: Vec<_> = (0..300)
        .map(|i| p.send_async(Message::to_queue(q.as_str(), format!("a{i}"))))
        .collect();
    for h in handles {
        h.await.expect("confirmed");
    }
    for i in 0..20 {
        p.send_oneway(Message::to_queue(q.as_str(), format!("o{i}")))
            .await
            .expect("written");
    }
    p.send(Message::to_queue(q.as_str(), "last"))
        .await
        .expect("confirmed");
    let err = p
        .send(Message::to_queue(broker.queue("nowhere").as_str(), "x"))
        .await
        .expect_err("returned");
    assert_eq!(err.reply_code(), Some(312), "{err}");
    let full = broker.queue("full");
    p.declare_queue(
        &full,
        durable(),
        args(&[
            ("x-max-length", AMQPValue::LongLongInt(1)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    )
    .await
    .expect("declare");
    p.send(Message::to_queue(full.as_str(), "1"))
        .await
        .expect("fits");
    let err = p
        .send(Message::to_queue(full.as_str(), "2"))
        .await
        .expect_err("nacked");
    assert_eq!(err.kind(), &ErrorKind::Nacked, "{err}");

    let drained = broker.drain_with_headers(&q).await;
    let batch_order: Vec<String> = drained
        .iter()
        .map(|(id, _, _)| id.clone())
        .filter(|id| id.starts_with('b'))
        .collect();
    let expected: Vec<String> = (0..300).map(|i| format!("b{i}")).collect();
    assert_eq!(batch_order, expected, "send_all keeps order");
    let bodies: Vec<&[u8]> = drained.iter().map(|(_, b, _)| b.as_slice()).collect();
    assert_eq!(
        bodies.len(),
        1 + 300 + 300 + 20 + 1,
        "everything arrived once"
    );
    for queue in [q, full] {
        broker.delete_queue(&queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_modes_on_rabbitmq() {
    send_modes(crate::Broker::rabbitmq()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_modes_on_holdfast() {
    send_modes(crate::Broker::holdfast()).await;
}
