use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

use crate::start;

#[tokio::test]
async fn publish_with_confirm_then_consume() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "q1".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let confirm = channel
        .basic_publish(
            "".into(),
            "q1".into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let mut consumer = channel
        .basic_consume(
            "q1".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = consumer.next().await.expect("a delivery").expect("ok");
    assert_eq!(delivery.data, b"hello");
    assert!(!delivery.redelivered);
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    connection.close(200, "bye".into()).await.expect("close");
}

#[tokio::test]
async fn topic_routing_with_wildcards() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    for (queue, key) in [("all", "#"), ("errors", "*.error"), ("kern", "kern.*")] {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue");
        channel
            .queue_bind(
                queue.into(),
                "logs".into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    for key in ["kern.error", "app.error", "kern.info", "x"] {
        channel
            .basic_publish(
                "logs".into(),
                key.into(),
                BasicPublishOptions::default(),
                key.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish");
    }
    let count = |queue: &'static str| {
        let channel = channel.clone();
        async move {
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("passive")
                .message_count()
        }
    };
    assert_eq!(count("all").await, 4);
    assert_eq!(count("errors").await, 2);
    assert_eq!(count("kern").await, 2);
}
