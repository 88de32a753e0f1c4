//! Nothing silently dropped: dead-lettering with RabbitMQ's `x-death`, delivery limits,
//! TTL, length limits, consumer ack timeouts, single active consumer, `x-expires`.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::support::*;
use crate::{binary, start};
use holdfast_testkit::Server;

pub(crate) fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        table.insert(ShortString::from(*name), value.clone());
    }
    table
}

pub(crate) fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A queue `name` dead-lettering to exchange `dlx` (fanout) bound to queue `dlq`.
async fn with_dead_letter_queue(
    channel: &Channel,
    name: &str,
    extra: &[(&str, AMQPValue)],
) -> String {
    with_dead_letter_target(channel, name, extra, &[]).await
}

/// [`with_dead_letter_queue`] with `dlq_arguments` for the dead-letter queue.
pub(crate) async fn with_dead_letter_target(
    channel: &Channel,
    name: &str,
    extra: &[(&str, AMQPValue)],
    dlq_arguments: &[(&str, AMQPValue)],
) -> String {
    let dlx = format!("{name}.dlx");
    let dlq = format!("{name}.dlq");
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("dlx");
    channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(dlq_arguments),
        )
        .await
        .expect("dlq");
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind dlq");
    let mut pairs = vec![("x-dead-letter-exchange", text(&dlx))];
    pairs.extend(extra.iter().cloned());
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&pairs),
        )
        .await
        .expect("queue with dlx");
    dlq
}

pub(crate) fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

pub(crate) fn as_text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The `x-death` entries of a message.
pub(crate) fn deaths(properties: &BasicProperties) -> Vec<FieldTable> {
    match header(properties, "x-death") {
        Some(AMQPValue::FieldArray(array)) => array
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) async fn get_one(channel: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..100 {
        if let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            return message;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no message arrived in {queue}");
}

#[tokio::test]
async fn rejected_message_is_dead_lettered_with_rabbitmq_x_death() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = with_dead_letter_queue(&channel, "work", &[]).await;
    channel
        .exchange_declare(
            "orders".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    channel
        .queue_bind(
            "work".into(),
            "orders".into(),
            "created".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    channel
        .basic_publish(
            "orders".into(),
            "created".into(),
            BasicPublishOptions::default(),
            b"order-1",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id("m-1".into()),
        )
        .await
        .expect("publish");
    let got = get_one_acking(&channel, "work").await;
    got.reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    let dead = get_one(&channel, &dlq).await;
    assert_eq!(dead.delivery.data, b"order-1");
    let properties = &dead.delivery.properties;
    assert_eq!(
        properties.message_id().as_ref().map(|s| s.as_str()),
        Some("m-1"),
        "properties kept"
    );
    assert_eq!(properties.delivery_mode(), &Some(2));
    let entries = deaths(properties);
    assert_eq!(entries.len(), 1);
    let entry = entries[0].inner();
    assert_eq!(entry.get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(as_text(entry.get("reason")).as_deref(), Some("rejected"));
    assert_eq!(as_text(entry.get("queue")).as_deref(), Some("work"));
    assert_eq!(as_text(entry.get("exchange")).as_deref(), Some("orders"));
    match entry.get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => assert_eq!(keys.as_slice(), &[text("created")]),
        other => panic!("routing-keys: {other:?}"),
    }
    assert!(matches!(entry.get("time"), Some(AMQPValue::Timestamp(t)) if *t > 1_700_000_000));
    assert_eq!(
        as_text(header(properties, "x-first-death-reason")).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        as_text(header(properties, "x-first-death-queue")).as_deref(),
        Some("work")
    );
    assert_eq!(
        as_text(header(properties, "x-first-death-exchange")).as_deref(),
        Some("orders")
    );
    assert_eq!(message_count(&channel, "work").await, 0);
}

/// basic.get with manual ack; returns the acker-carrying delivery.
async fn get_one_acking(channel: &Channel, queue: &str) -> lapin::message::Delivery {
    for _ in 0..100 {
        if let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("get")
        {
            return message.delivery;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no message arrived in {queue}");
}

#[tokio::test]
async fn delivery_limit_counts_redeliveries_then_dead_letters() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = with_dead_letter_queue(
        &channel,
        "limited",
        &[("x-delivery-limit", AMQPValue::LongInt(2))],
    )
    .await;
    publish(&channel, "", "limited", b"poison", true).await;
    let mut consumer = channel
        .basic_consume(
            "limited".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for expected_count in [None, Some(1), Some(2)] {
        let delivery = next_delivery(&mut consumer).await;
        let count = match header(&delivery.properties, "x-delivery-count") {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            None => None,
            other => panic!("x-delivery-count {other:?}"),
        };
        assert_eq!(count, expected_count);
        assert_eq!(delivery.redelivered, expected_count.is_some());
        delivery
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
    }
    assert_no_delivery(&mut consumer).await;
    let dead = get_one(&channel, &dlq).await;
    let entries = deaths(&dead.delivery.properties);
    assert_eq!(
        as_text(entries[0].inner().get("reason")).as_deref(),
        Some("delivery_limit")
    );
}

#[tokio::test]
async fn queue_ttl_and_per_message_expiry_dead_letter_and_are_never_delivered() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    // Queue TTL: everything expires at the head without a consumer.
    let dlq = with_dead_letter_queue(
        &channel,
        "ttl",
        &[("x-message-ttl", AMQPValue::LongInt(100))],
    )
    .await;
    for i in 0..3u8 {
        publish(&channel, "", "ttl", &[i], true).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(message_count(&channel, "ttl").await, 0);
    assert_eq!(message_count(&channel, &dlq).await, 3);
    let dead = get_one(&channel, &dlq).await;
    assert_eq!(dead.delivery.data, vec![0]);
    assert_eq!(
        as_text(deaths(&dead.delivery.properties)[0].inner().get("reason")).as_deref(),
        Some("expired")
    );
    // Per-message expiry in the middle of a queue: never delivered, dead-lettered when
    // it reaches the head.
    let dlq = with_dead_letter_queue(&channel, "middle", &[]).await;
    publish(&channel, "", "middle", b"first", true).await;
    channel
        .basic_publish(
            "".into(),
            "middle".into(),
            BasicPublishOptions::default(),
            b"short-lived",
            BasicProperties::default().with_expiration("50".into()),
        )
        .await
        .expect("publish");
    publish(&channel, "", "middle", b"last", true).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut consumer = channel
        .basic_consume(
            "middle".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    assert_eq!(next_delivery(&mut consumer).await.data, b"first");
    assert_eq!(next_delivery(&mut consumer).await.data, b"last");
    let dead = get_one(&channel, &dlq).await;
    assert_eq!(dead.delivery.data, b"short-lived");
    let entry = deaths(&dead.delivery.properties)[0].clone();
    assert_eq!(
        as_text(entry.inner().get("reason")).as_deref(),
        Some("expired")
    );
    assert_eq!(
        as_text(entry.inner().get("original-expiration")).as_deref(),
        Some("50")
    );
    assert_eq!(
        dead.delivery.properties.expiration(),
        &None,
        "expiration removed from the copy"
    );
}

#[tokio::test]
async fn dead_letter_cycles_without_rejection_are_broken() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    // A queue whose expired messages dead-letter back into itself via the default
    // exchange: RabbitMQ drops the message instead of looping forever.
    channel
        .queue_declare(
            "loop".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&[
                ("x-message-ttl", AMQPValue::LongInt(50)),
                ("x-dead-letter-exchange", text("")),
            ]),
        )
        .await
        .expect("declare");
    publish(&channel, "", "loop", b"round and round", true).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(message_count(&channel, "loop").await, 0);
}

#[tokio::test]
async fn length_limits_drop_head_and_reject_publish() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let send = |queue: &'static str, body: &'static [u8]| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish")
                .await
                .expect("confirmation")
        }
    };
    // drop-head: the oldest goes to the DLQ with reason maxlen.
    let dlq = with_dead_letter_queue(
        &channel,
        "headless",
        &[("x-max-length", AMQPValue::LongInt(2))],
    )
    .await;
    for body in [b"1", b"2", b"3"] {
        assert!(send("headless", body).await.is_ack());
    }
    assert_eq!(message_count(&channel, "headless").await, 2);
    let dead = get_one(&channel, &dlq).await;
    assert_eq!(dead.delivery.data, b"1");
    assert_eq!(
        as_text(deaths(&dead.delivery.properties)[0].inner().get("reason")).as_deref(),
        Some("maxlen")
    );
    // reject-publish: the publisher's confirm is a nack, nothing is enqueued.
    let dlq_rp = with_dead_letter_queue(
        &channel,
        "strict",
        &[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    assert!(send("strict", b"a").await.is_ack());
    assert!(send("strict", b"b").await.is_nack());
    assert_eq!(message_count(&channel, "strict").await, 1);
    assert_eq!(message_count(&channel, &dlq_rp).await, 0);
    // reject-publish-dlx: nacked and dead-lettered.
    let dlq_rpd = with_dead_letter_queue(
        &channel,
        "strict-dlx",
        &[
            ("x-max-length-bytes", AMQPValue::LongInt(3)),
            ("x-overflow", text("reject-publish-dlx")),
        ],
    )
    .await;
    assert!(send("strict-dlx", b"abc").await.is_ack());
    assert!(send("strict-dlx", b"d").await.is_nack());
    let dead = get_one(&channel, &dlq_rpd).await;
    assert_eq!(dead.delivery.data, b"d");
    assert_eq!(
        as_text(deaths(&dead.delivery.properties)[0].inner().get("reason")).as_deref(),
        Some("maxlen")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_ack_timeout_closes_the_channel_and_requeues() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "slow".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&[("x-consumer-timeout", AMQPValue::LongInt(300))]),
        )
        .await
        .expect("declare");
    publish(&channel, "", "slow", b"held too long", true).await;
    let consuming = connection.create_channel().await.expect("channel");
    let mut consumer = consuming
        .basic_consume(
            "slow".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let _held = next_delivery(&mut consumer).await;
    // The server closes the channel with 406; lapin ends the consumer with that error.
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("channel closed in time");
    match end {
        Some(Err(err)) => assert_eq!(reply_code(&err), Some(406), "{err:?}"),
        other => panic!("expected the consumer to end with 406, got {other:?}"),
    }
    let again = get_one(&channel, "slow").await;
    assert_eq!(again.delivery.data, b"held too long");
    assert!(again.delivery.redelivered);
}

#[tokio::test]
async fn single_active_consumer_hands_over_on_cancel() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "sac".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
        )
        .await
        .expect("declare");
    let first_channel = connection.create_channel().await.expect("channel");
    let second_channel = connection.create_channel().await.expect("channel");
    let mut first = first_channel
        .basic_consume(
            "sac".into(),
            "first".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut second = second_channel
        .basic_consume(
            "sac".into(),
            "second".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..4u8 {
        publish(&channel, "", "sac", &[i], false).await;
    }
    for i in 0..4u8 {
        assert_eq!(next_delivery(&mut first).await.data, vec![i]);
    }
    assert_no_delivery(&mut second).await;
    first_channel
        .basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    publish(&channel, "", "sac", b"after", false).await;
    assert_eq!(next_delivery(&mut second).await.data, b"after");
}

#[tokio::test]
async fn unused_queue_expires() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "ephemeral".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&[("x-expires", AMQPValue::LongInt(200))]),
        )
        .await
        .expect("declare");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = channel
        .queue_declare(
            "ephemeral".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("expired");
    assert_eq!(reply_code(&err), Some(404));
}

#[tokio::test]
async fn invalid_queue_arguments_are_refused() {
    let server = start();
    let connection = server.connect().await;
    for bad in [
        args(&[("x-message-ttl", AMQPValue::LongInt(-5))]),
        args(&[("x-overflow", text("maybe"))]),
        args(&[("x-dead-letter-routing-key", text("k"))]),
    ] {
        let channel = connection.create_channel().await.expect("channel");
        let err = channel
            .queue_declare("bad-args".into(), QueueDeclareOptions::default(), bad)
            .await
            .expect_err("invalid");
        assert_eq!(reply_code(&err), Some(406));
    }
}

/// The article's consumer flow end to end: a consumer that keeps failing sends the
/// message to the DLQ with its history; a person replays it from there and it is
/// delivered again, and a restart at any point loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_consumer_to_dead_letter_queue_and_replay_survive_kill_9() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_in(binary(), &temp.path().join("data"), &[]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = with_dead_letter_queue(
        &channel,
        "payments",
        &[("x-delivery-limit", AMQPValue::LongInt(3))],
    )
    .await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    publish_confirmed(&channel, "", "payments", b"charge #7").await;
    let consuming = connection.create_channel().await.expect("channel");
    let mut consumer = consuming
        .basic_consume(
            "payments".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Two failures, then a crash: the count must survive.
    for _ in 0..2 {
        next_delivery(&mut consumer)
            .await
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
    }
    let _in_flight = next_delivery(&mut consumer).await;
    drop(consumer);
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            "payments".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // The two counted failures survived the crash (the delivery cut short by the crash
    // is not counted: nobody knows whether it failed).
    let delivery = next_delivery(&mut consumer).await;
    assert!(delivery.redelivered);
    assert_eq!(
        header(&delivery.properties, "x-delivery-count"),
        Some(&AMQPValue::LongLongInt(2))
    );
    delivery
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("nack");
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(
        header(&delivery.properties, "x-delivery-count"),
        Some(&AMQPValue::LongLongInt(3))
    );
    delivery
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("nack");
    // The fourth failure exceeds the limit of 3: the message is now in the DLQ, once.
    let dead = get_one(&channel, &dlq).await;
    assert_eq!(dead.delivery.data, b"charge #7");
    assert_eq!(
        as_text(header(&dead.delivery.properties, "x-first-death-reason")).as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(message_count(&channel, "payments").await, 0);
    assert_eq!(message_count(&channel, &dlq).await, 0);
    // Replay: a person republishes it to its origin; it is delivered again.
    publish(&channel, "", "payments", &dead.delivery.data, true).await;
    let replayed = next_delivery(&mut consumer).await;
    assert_eq!(replayed.data, b"charge #7");
    replayed.ack(BasicAckOptions::default()).await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_move_is_in_exactly_one_queue_after_kill_9() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_in(binary(), &temp.path().join("data"), &[]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = with_dead_letter_queue(&channel, "moving", &[]).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    for i in 0..200u32 {
        channel
            .basic_publish(
                "".into(),
                "moving".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
    }
    channel.wait_for_confirms().await.expect("confirms");
    let consuming = connection.create_channel().await.expect("channel");
    consuming
        .basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consuming
        .basic_consume(
            "moving".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..120 {
        next_delivery(&mut consumer)
            .await
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut seen = std::collections::HashSet::new();
    for queue in ["moving", dlq.as_str()] {
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            let id = u32::from_be_bytes(message.delivery.data[..4].try_into().expect("id"));
            assert!(seen.insert(id), "message {id} is in both queues");
        }
    }
    assert_eq!(seen.len(), 200, "every message is in one of the two queues");
}
