//! Small lapin helpers shared by the integration tests.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};

/// The AMQP reply code carried by a lapin error, if the broker sent one.
pub fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// A channel of `connection` in confirm mode.
pub async fn confirming_channel(connection: &lapin::Connection) -> Channel {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
}

pub async fn declare(channel: &Channel, name: &str, durable: bool) {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
}

pub async fn publish(channel: &Channel, exchange: &str, key: &str, body: &[u8], persistent: bool) {
    let properties = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("basic.publish");
}

/// Publishes and waits for the broker's confirm (the channel must be in confirm mode).
pub async fn publish_confirmed(channel: &Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("basic.publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "publish was not acked: {confirm:?}");
}

pub async fn message_count(channel: &Channel, queue: &str) -> u32 {
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
        .expect("passive queue.declare")
        .message_count()
}

/// basic.get with no-ack; the body if there was a message.
pub async fn get_body(channel: &Channel, queue: &str) -> Option<Vec<u8>> {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|message| message.delivery.data.clone())
}

pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer stream open")
        .expect("delivery ok")
}

/// Asserts nothing is delivered for a short while.
pub async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await
    {
        panic!(
            "unexpected delivery {:?}",
            String::from_utf8_lossy(&delivery.data)
        );
    }
}

/// The segment files in a data directory's log.
pub fn segment_files(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("log"))
        .expect("log dir")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
        })
        .count()
}
