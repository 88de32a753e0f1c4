//! Consumers: prefetch, round-robin, acks, nack/reject, requeue order with the
//! redelivered flag, recover, cancel, basic.get.

use lapin::options::*;
use lapin::types::FieldTable;

use crate::start;
use crate::support::*;

#[tokio::test]
async fn prefetch_limits_unacked_deliveries() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "pf", false).await;
    for i in 0..10u8 {
        publish(&channel, "", "pf", &[i], false).await;
    }
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(3, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            "pf".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut consumer).await);
    }
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&channel, "pf").await, 7);
    // Acking one frees one slot.
    held.remove(0)
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let fourth = next_delivery(&mut consumer).await;
    assert_eq!(fourth.data, vec![3]);
    assert_no_delivery(&mut consumer).await;
    // multiple=true acks everything up to the tag.
    fourth
        .ack(BasicAckOptions { multiple: true })
        .await
        .expect("ack multiple");
    for expected in 4..7u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, vec![expected]);
    }
}

#[tokio::test]
async fn global_qos_is_shared_by_the_channel() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "g1", false).await;
    declare(&channel, "g2", false).await;
    for i in 0..5u8 {
        publish(&channel, "", "g1", &[i], false).await;
        publish(&channel, "", "g2", &[i], false).await;
    }
    let consuming = connection.create_channel().await.expect("channel");
    consuming
        .basic_qos(2, BasicQosOptions { global: true })
        .await
        .expect("qos");
    let mut first = consuming
        .basic_consume(
            "g1".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut second = consuming
        .basic_consume(
            "g2".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let _a = next_delivery(&mut first).await;
    let _b = next_delivery(&mut first).await;
    assert_no_delivery(&mut second).await;
    assert_eq!(
        message_count(&channel, "g1").await + message_count(&channel, "g2").await,
        8
    );
}

#[tokio::test]
async fn round_robin_across_consumers() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "rr", false).await;
    let a_channel = connection.create_channel().await.expect("channel");
    let b_channel = connection.create_channel().await.expect("channel");
    let mut a = a_channel
        .basic_consume(
            "rr".into(),
            "a".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut b = b_channel
        .basic_consume(
            "rr".into(),
            "b".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..6u8 {
        publish(&channel, "", "rr", &[i], false).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..3 {
        got_a.push(next_delivery(&mut a).await.data[0]);
        got_b.push(next_delivery(&mut b).await.data[0]);
    }
    assert_eq!(got_a, vec![0, 2, 4]);
    assert_eq!(got_b, vec![1, 3, 5]);
}

#[tokio::test]
async fn unacked_messages_return_in_order_marked_redelivered_when_channel_closes() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "requeue", true).await;
    for i in 0..5u8 {
        publish(&channel, "", "requeue", &[i], true).await;
    }
    let consuming = connection.create_channel().await.expect("channel");
    let mut consumer = consuming
        .basic_consume(
            "requeue".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = Vec::new();
    for _ in 0..5 {
        let delivery = next_delivery(&mut consumer).await;
        assert!(!delivery.redelivered);
        deliveries.push(delivery);
    }
    // Ack the middle one; the rest go back when the channel closes.
    deliveries[2]
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    consuming.close(200, "bye".into()).await.expect("close");
    let again = connection.create_channel().await.expect("channel");
    let mut consumer = again
        .basic_consume(
            "requeue".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for expected in [0u8, 1, 3, 4] {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.data, vec![expected]);
        assert!(delivery.redelivered);
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_no_delivery(&mut consumer).await;
}

#[tokio::test]
async fn nack_and_reject_requeue_or_drop() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "nr", false).await;
    for body in [b"a", b"b", b"c"] {
        publish(&channel, "", "nr", body, false).await;
    }
    let mut consumer = channel
        .basic_consume(
            "nr".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let a = next_delivery(&mut consumer).await;
    let b = next_delivery(&mut consumer).await;
    let c = next_delivery(&mut consumer).await;
    a.reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject drop");
    b.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    })
    .await
    .expect("nack requeue");
    let b_again = next_delivery(&mut consumer).await;
    assert_eq!(b_again.data, b"b");
    assert!(b_again.redelivered);
    c.reject(BasicRejectOptions { requeue: true })
        .await
        .expect("reject requeue");
    let c_again = next_delivery(&mut consumer).await;
    assert_eq!(c_again.data, b"c");
    // nack multiple without requeue drops both.
    c_again
        .nack(BasicNackOptions {
            multiple: true,
            requeue: false,
        })
        .await
        .expect("nack multiple");
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&channel, "nr").await, 0);
}

#[tokio::test]
async fn basic_get_and_recover() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "getq", false).await;
    assert!(
        channel
            .basic_get("getq".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .is_none()
    );
    publish(&channel, "", "getq", b"one", false).await;
    publish(&channel, "", "getq", b"two", false).await;
    let first = channel
        .basic_get("getq".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("message");
    assert_eq!(first.delivery.data, b"one");
    assert_eq!(first.message_count, 1);
    assert!(!first.delivery.redelivered);
    channel
        .basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .expect("recover");
    let again = channel
        .basic_get("getq".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("message");
    assert_eq!(again.delivery.data, b"one");
    assert!(again.delivery.redelivered);
    again
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    assert_eq!(message_count(&channel, "getq").await, 1);
}

#[tokio::test]
async fn cancel_stops_deliveries_and_queue_delete_notifies_consumers() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "cq", false).await;
    let mut consumer = channel
        .basic_consume(
            "cq".into(),
            "tag-1".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    publish(&channel, "", "cq", b"1", false).await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"1");
    channel
        .basic_cancel("tag-1".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    publish(&channel, "", "cq", b"2", false).await;
    assert_eq!(message_count(&channel, "cq").await, 1);
    // A consumer on a queue that gets deleted is cancelled by the server.
    let other = connection.create_channel().await.expect("channel");
    let mut watched = other
        .basic_consume(
            "cq".into(),
            "tag-2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let _ = next_delivery(&mut watched).await;
    channel
        .queue_delete("cq".into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut watched),
    )
    .await
    .expect("stream ends");
    assert!(
        end.is_none(),
        "consumer stream should end after server cancel"
    );
    // The channel is still usable.
    declare(&other, "after-cancel", false).await;
}

#[tokio::test]
async fn consumer_tag_reuse_and_exclusive_consumers() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "ex-consume", false).await;
    // lapin cancels a consumer when its handle is dropped: keep it.
    let _solo = channel
        .basic_consume(
            "ex-consume".into(),
            "solo".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exclusive consume");
    let second = connection.create_channel().await.expect("channel");
    let err = second
        .basic_consume(
            "ex-consume".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("queue in exclusive use");
    assert_eq!(reply_code(&err), Some(403));
    let err = channel
        .basic_consume(
            "ex-consume".into(),
            "solo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("tag reuse");
    assert_eq!(reply_code(&err), Some(530));
}
