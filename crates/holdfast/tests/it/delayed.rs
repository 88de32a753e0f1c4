//! Delayed delivery: the `x-delayed-message` exchange (RabbitMQ plugin semantics,
//! surviving restarts) and the queue-level `x-redelivery-delay` backoff for retries.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::support::*;
use crate::{binary, start};
use holdfast_testkit::Server;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        table.insert(ShortString::from(*name), value.clone());
    }
    table
}

fn delayed(ms: i64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table(&[("x-delay", AMQPValue::LongLongInt(ms))]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_exchange_holds_messages_until_due_across_kill_9() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_in(binary(), &temp.path().join("data"), &[]);
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        channel
            .exchange_declare(
                "later".into(),
                lapin::ExchangeKind::Custom("x-delayed-message".into()),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                table(&[(
                    "x-delayed-type",
                    AMQPValue::LongString(LongString::from("direct")),
                )]),
            )
            .await
            .expect("delayed exchange");
        declare(&channel, "due", true).await;
        channel
            .queue_bind(
                "due".into(),
                "later".into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        // No delay: routed at once, like the underlying direct exchange.
        channel
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"now",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert_eq!(
            get_body(&channel, "due").await.as_deref(),
            Some(&b"now"[..])
        );
        let sent = Instant::now();
        let confirm = channel
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"in 300 ms",
                delayed(300),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
        assert_eq!(
            message_count(&channel, "due").await,
            0,
            "not before its delay"
        );
        let mut body = None;
        while sent.elapsed() < Duration::from_secs(5) && body.is_none() {
            body = get_body(&channel, "due").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(body.as_deref(), Some(&b"in 300 ms"[..]));
        assert!(
            sent.elapsed() >= Duration::from_millis(280),
            "released after {:?}",
            sent.elapsed()
        );
        // A long delay survives a crash.
        channel
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"after the crash",
                delayed(1500),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(message_count(&channel, "due").await, 0);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        get_body(&channel, "due").await.as_deref(),
        Some(&b"after the crash"[..])
    );
    // The type is checked on re-declaration and is required.
    let err = channel
        .exchange_declare(
            "later".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let err = channel
        .exchange_declare(
            "no-type".into(),
            lapin::ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("x-delayed-type required");
    assert_eq!(reply_code(&err), Some(406));
}

#[tokio::test]
async fn redelivery_delay_backs_off_exponentially() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "backoff".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[
                ("x-redelivery-delay", AMQPValue::LongInt(150)),
                ("x-redelivery-delay-multiplier", AMQPValue::LongInt(2)),
                ("x-redelivery-delay-max", AMQPValue::LongInt(1000)),
            ]),
        )
        .await
        .expect("declare");
    publish(&channel, "", "backoff", b"flaky", true).await;
    let mut consumer = channel
        .basic_consume(
            "backoff".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    for attempt in 0..3 {
        let delivery = next_delivery(&mut consumer).await;
        if attempt > 0 {
            gaps.push(last.elapsed());
            assert!(delivery.redelivered);
        }
        last = Instant::now();
        if attempt < 2 {
            delivery
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .expect("retry later");
        } else {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        }
    }
    assert!(
        gaps[0] >= Duration::from_millis(140),
        "first retry after {:?}",
        gaps[0]
    );
    assert!(
        gaps[1] >= Duration::from_millis(290),
        "second retry after {:?}",
        gaps[1]
    );
    assert!(gaps[1] < Duration::from_secs(3));
    // While held back, the retry is not delivered to anyone else either.
    publish(&channel, "", "backoff", b"second", true).await;
    let second = next_delivery(&mut consumer).await;
    assert_eq!(second.data, b"second");
}
