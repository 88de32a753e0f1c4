//! Broker-side deduplication: a retried publish is confirmed but not enqueued twice,
//! also after a crash and after the original was consumed and its segment deleted.

use std::path::Path;
use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

use crate::binary;
use crate::support::*;
use holdfast_testkit::Server;

fn dedup_args(cache_size: i32) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        ShortString::from("x-message-deduplication"),
        AMQPValue::Boolean(true),
    );
    table.insert(
        ShortString::from("x-cache-size"),
        AMQPValue::LongInt(cache_size),
    );
    table
}

async fn send(channel: &Channel, queue: &str, id: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmation");
    assert!(confirm.is_ack(), "a duplicate is still confirmed with ack");
}

#[tokio::test]
async fn duplicates_are_confirmed_but_not_enqueued() {
    let temp = tempfile::tempdir().expect("tempdir");
    let server = Server::start_in(binary(), &temp.path().join("data"), &[]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    channel
        .queue_declare(
            "dedup".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            dedup_args(2),
        )
        .await
        .expect("declare");
    send(&channel, "dedup", "a", b"first").await;
    send(&channel, "dedup", "a", b"retry").await;
    send(&channel, "dedup", "b", b"other").await;
    assert_eq!(message_count(&channel, "dedup").await, 2);
    // The header wins over message-id.
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-deduplication-header"),
        AMQPValue::LongString(LongString::from("order-9")),
    );
    for id in ["x1", "x2"] {
        channel
            .basic_publish(
                "".into(),
                "dedup".into(),
                BasicPublishOptions::default(),
                b"h",
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_headers(headers.clone()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    assert_eq!(message_count(&channel, "dedup").await, 3);
    // Cache size 2: "a" has been pushed out by "b" and "order-9".
    send(&channel, "dedup", "a", b"again").await;
    assert_eq!(message_count(&channel, "dedup").await, 4);
    // Messages without a key are never deduplicated.
    publish(&channel, "", "dedup", b"no key", true).await;
    publish(&channel, "", "dedup", b"no key", true).await;
    assert_eq!(message_count(&channel, "dedup").await, 6);
}

/// Consumes and acks the one message in `queue`, then makes the log forget it: after
/// more than one checkpoint interval, segments are rolled with filler that is purged,
/// so the first segment (holding the consumed message's record and key) has nothing
/// live left; the checkpoint, fallen a segment behind, is rewritten and it goes. With
/// 64 KiB segments.
async fn consume_and_age_out_first_segment(channel: &Channel, queue: &str, data: &Path) {
    declare(channel, "filler", true).await;
    channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message to consume")
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = vec![0u8; 8 * 1024];
    for _ in 0..40 {
        publish_confirmed(channel, "", "filler", &body).await;
    }
    channel
        .queue_purge("filler".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = data.join("log");
    let segments = std::fs::read_dir(&log).expect("log dir").count();
    assert!(
        !log.join(format!("{:020}.log", 0)).exists(),
        "the first segment should have been deleted ({segments} segments)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_survives_kill_9_and_segment_deletion() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_in(
        binary(),
        &temp.path().join("data"),
        &["--segment-size", "65536"],
    );
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        channel
            .queue_declare(
                "orders".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                dedup_args(1000),
            )
            .await
            .expect("declare");
        send(&channel, "orders", "consumed", b"will be consumed").await;
        consume_and_age_out_first_segment(&channel, "orders", &temp.path().join("data")).await;
        send(&channel, "orders", "kept", b"stays in the queue").await;
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    // Producer retries after the crash: both are recognised.
    send(&channel, "orders", "kept", b"retry of kept").await;
    send(&channel, "orders", "consumed", b"retry of consumed").await;
    assert_eq!(message_count(&channel, "orders").await, 1);
    assert_eq!(
        get_body(&channel, "orders").await.as_deref(),
        Some(&b"stays in the queue"[..])
    );
    // A new id still goes through.
    send(&channel, "orders", "new", b"new").await;
    assert_eq!(message_count(&channel, "orders").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_level_deduplication_routes_a_key_once_across_kill_9() {
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
                "events".into(),
                lapin::ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                dedup_args(100),
            )
            .await
            .expect("exchange");
        for queue in ["ev-a", "ev-b"] {
            declare(&channel, queue, true).await;
            channel
                .queue_bind(
                    queue.into(),
                    "events".into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind");
        }
        for id in ["e1", "e1", "e2"] {
            let confirm = channel
                .basic_publish(
                    "events".into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    id.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(id.into()),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack());
        }
        assert_eq!(message_count(&channel, "ev-a").await, 2);
        assert_eq!(message_count(&channel, "ev-b").await, 2);
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    channel
        .basic_publish(
            "events".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"e2",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id("e2".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(
        message_count(&channel, "ev-a").await,
        2,
        "the retry after the crash was recognised"
    );
}

#[tokio::test]
async fn a_refused_publish_is_not_remembered() {
    let server = crate::start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let mut arguments = dedup_args(100);
    arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(1));
    arguments.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(
            "full-dedup".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("declare");
    let publish_id = |id: &'static str| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "".into(),
                    "full-dedup".into(),
                    BasicPublishOptions::default(),
                    id.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(id.into()),
                )
                .await
                .expect("publish")
                .await
                .expect("confirmation")
        }
    };
    assert!(publish_id("a").await.is_ack());
    assert!(publish_id("b").await.is_nack(), "queue full");
    assert_eq!(
        get_body(&channel, "full-dedup").await.as_deref(),
        Some(&b"a"[..])
    );
    assert!(publish_id("b").await.is_ack(), "the retry gets in");
    assert_eq!(
        get_body(&channel, "full-dedup").await.as_deref(),
        Some(&b"b"[..])
    );
}

/// Publishes `id` to `exchange` with a confirm and returns whether it was acked.
async fn publish_to_exchange(channel: &Channel, exchange: &str, id: &str) -> bool {
    channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            id.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmation")
        .is_ack()
}

async fn dedup_fanout(channel: &Channel, name: &str) {
    channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            dedup_args(100),
        )
        .await
        .expect("exchange");
}

async fn bind(channel: &Channel, queue: &str, exchange: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

async fn declare_bounded(channel: &Channel, name: &str, max_length: i32) {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-max-length"),
        AMQPValue::LongInt(max_length),
    );
    arguments.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("declare");
}

#[tokio::test]
async fn an_exchange_remembers_a_key_only_when_every_target_took_the_message() {
    let server = crate::start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");

    // One full reject-publish target: nacked, and the retry after draining gets in.
    dedup_fanout(&channel, "x-full").await;
    declare_bounded(&channel, "x-full-q", 1).await;
    bind(&channel, "x-full-q", "x-full").await;
    assert!(publish_to_exchange(&channel, "x-full", "filler").await);
    assert!(
        !publish_to_exchange(&channel, "x-full", "k").await,
        "the full queue refuses it"
    );
    assert_eq!(
        get_body(&channel, "x-full-q").await.as_deref(),
        Some(&b"filler"[..])
    );
    assert!(publish_to_exchange(&channel, "x-full", "k").await);
    assert_eq!(
        get_body(&channel, "x-full-q").await.as_deref(),
        Some(&b"k"[..]),
        "the retry of a refused publish is stored, not taken for a duplicate"
    );

    // Unroutable first, bound later: the retry is routed.
    dedup_fanout(&channel, "x-late").await;
    assert!(publish_to_exchange(&channel, "x-late", "u").await);
    declare(&channel, "x-late-q", true).await;
    bind(&channel, "x-late-q", "x-late").await;
    assert!(publish_to_exchange(&channel, "x-late", "u").await);
    assert_eq!(
        message_count(&channel, "x-late-q").await,
        1,
        "an unroutable publish leaves no key behind"
    );

    // Fan-out to two queues, one full: all or nothing.
    dedup_fanout(&channel, "x-two").await;
    declare(&channel, "x-two-open", true).await;
    declare_bounded(&channel, "x-two-full", 1).await;
    bind(&channel, "x-two-open", "x-two").await;
    bind(&channel, "x-two-full", "x-two").await;
    assert!(publish_to_exchange(&channel, "x-two", "first").await);
    assert!(!publish_to_exchange(&channel, "x-two", "f").await);
    assert_eq!(
        message_count(&channel, "x-two-open").await,
        1,
        "a refused publish is stored nowhere, not in the queue that had room"
    );
    assert_eq!(
        get_body(&channel, "x-two-full").await.as_deref(),
        Some(&b"first"[..])
    );
    assert!(publish_to_exchange(&channel, "x-two", "f").await);
    assert_eq!(message_count(&channel, "x-two-open").await, 2);
    assert_eq!(message_count(&channel, "x-two-full").await, 1);
    // And now it is a duplicate.
    assert!(publish_to_exchange(&channel, "x-two", "f").await);
    assert_eq!(message_count(&channel, "x-two-open").await, 2);
}

/// A key seen by an exchange long ago, whose message was consumed and whose segment was
/// deleted, is still recognised after a crash: exchange windows are checkpointed with
/// the queue windows, and a checkpoint does not erase the windows it does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_window_survives_checkpoints_kill_9_and_segment_deletion() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path().join("data");
    let mut server = Server::start_in(binary(), &data, &["--segment-size", "65536"]);
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        dedup_fanout(&channel, "orders-x").await;
        declare(&channel, "orders-q", true).await;
        bind(&channel, "orders-q", "orders-x").await;
        assert!(publish_to_exchange(&channel, "orders-x", "consumed").await);
        consume_and_age_out_first_segment(&channel, "orders-q", &data).await;
        assert!(publish_to_exchange(&channel, "orders-x", "kept").await);
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    assert!(publish_to_exchange(&channel, "orders-x", "kept").await);
    assert!(publish_to_exchange(&channel, "orders-x", "consumed").await);
    assert_eq!(
        message_count(&channel, "orders-q").await,
        1,
        "both retries after the crash were recognised"
    );
    assert_eq!(
        get_body(&channel, "orders-q").await.as_deref(),
        Some(&b"kept"[..])
    );
}
