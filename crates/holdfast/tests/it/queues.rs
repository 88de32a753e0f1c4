//! Queue and exchange lifecycle: declare variants, equivalence, exclusive and
//! auto-delete, purge, delete conditions.

use lapin::ExchangeKind;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

use crate::start;
use crate::support::*;

#[tokio::test]
async fn server_named_and_passive_declares() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("server-named");
    assert!(
        queue.name().as_str().starts_with("amq.gen-"),
        "{}",
        queue.name()
    );
    publish(&channel, "", queue.name().as_str(), b"x", false).await;
    assert_eq!(message_count(&channel, queue.name().as_str()).await, 1);
    let err = channel
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("passive miss");
    assert_eq!(reply_code(&err), Some(404));
}

#[tokio::test]
async fn inequivalent_redeclare_and_reserved_names() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "eq", true).await;
    declare(&channel, "eq", true).await;
    let err = channel
        .queue_declare(
            "eq".into(),
            QueueDeclareOptions {
                durable: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(5));
    let err = channel
        .queue_declare(
            "eq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect_err("inequivalent argument");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let err = channel
        .queue_declare(
            "amq.mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("reserved");
    assert_eq!(reply_code(&err), Some(403));
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "ex-eq".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let err = channel
        .exchange_declare(
            "ex-eq".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent type");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let err = channel
        .exchange_declare(
            "nope".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("passive miss");
    assert_eq!(reply_code(&err), Some(404));
}

#[tokio::test]
async fn exclusive_queues_are_locked_and_vanish_with_their_connection() {
    let server = start();
    let owner = server.connect().await;
    let channel = owner.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exclusive");
    let other = server.connect().await;
    let other_channel = other.create_channel().await.expect("channel");
    let err = other_channel
        .basic_consume(
            "mine".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("locked");
    assert_eq!(reply_code(&err), Some(405));
    owner.close(200, "bye".into()).await.expect("close");
    let probe = other.create_channel().await.expect("channel");
    let err = probe
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("gone");
    assert_eq!(reply_code(&err), Some(404));
}

#[tokio::test]
async fn auto_delete_queue_vanishes_with_its_last_consumer() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "ad".into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    // lapin cancels a consumer when its handle is dropped: keep them.
    let _c1 = channel
        .basic_consume(
            "ad".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let _c2 = channel
        .basic_consume(
            "ad".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    channel
        .basic_cancel("c1".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    assert_eq!(message_count(&channel, "ad").await, 0);
    channel
        .basic_cancel("c2".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    let err = channel
        .queue_declare(
            "ad".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("gone");
    assert_eq!(reply_code(&err), Some(404));
}

#[tokio::test]
async fn purge_and_conditional_delete() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "pq", true).await;
    for _ in 0..4 {
        publish(&channel, "", "pq", b"m", true).await;
    }
    assert_eq!(
        channel
            .queue_purge("pq".into(), QueuePurgeOptions::default())
            .await
            .expect("purge"),
        4
    );
    publish(&channel, "", "pq", b"m", true).await;
    let err = channel
        .queue_delete(
            "pq".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("not empty");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let _held = channel
        .basic_consume(
            "pq".into(),
            "held".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let probe = connection.create_channel().await.expect("channel");
    let err = probe
        .queue_delete(
            "pq".into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("in use");
    assert_eq!(reply_code(&err), Some(406));
    let probe = connection.create_channel().await.expect("channel");
    probe
        .queue_delete("pq".into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    // Deleting what is not there succeeds, as in RabbitMQ 3.x+.
    assert_eq!(
        probe
            .queue_delete("pq".into(), QueueDeleteOptions::default())
            .await
            .expect("idempotent"),
        0
    );
}

#[tokio::test]
async fn exchange_delete_rules() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let err = channel
        .exchange_delete("amq.direct".into(), ExchangeDeleteOptions::default())
        .await
        .expect_err("builtin");
    assert_eq!(reply_code(&err), Some(403));
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "used".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    declare(&channel, "bound", false).await;
    channel
        .queue_bind(
            "bound".into(),
            "used".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let err = channel
        .exchange_delete(
            "used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("in use");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_delete("used".into(), ExchangeDeleteOptions::default())
        .await
        .expect("delete");
    // Gone: a passive declare of it is 404. (Publishing to it and then calling again
    // raced: when the channel.close 404 arrived before lapin sent the next call, lapin
    // failed that call as "channel closed", without the reply code.)
    let err = channel
        .exchange_declare(
            "used".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("the deleted exchange is gone");
    assert_eq!(reply_code(&err), Some(404));
}
