//! Publisher confirms and transactions.

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::start;
use crate::support::*;

#[tokio::test]
async fn many_confirms_in_flight_all_acked() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "conf", true).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let mut pending = Vec::new();
    for i in 0..500u32 {
        pending.push(
            channel
                .basic_publish(
                    "".into(),
                    "conf".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in pending {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    assert_eq!(message_count(&channel, "conf").await, 500);
}

#[tokio::test]
async fn transactions_commit_and_rollback_publishes_and_acks() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "txq", true).await;
    channel.tx_select().await.expect("tx.select");
    publish(&channel, "", "txq", b"rolled back", true).await;
    assert_eq!(
        message_count(&channel, "txq").await,
        0,
        "uncommitted publish is invisible"
    );
    channel.tx_rollback().await.expect("rollback");
    assert_eq!(message_count(&channel, "txq").await, 0);
    publish(&channel, "", "txq", b"one", true).await;
    publish(&channel, "", "txq", b"two", true).await;
    channel.tx_commit().await.expect("commit");
    assert_eq!(message_count(&channel, "txq").await, 2);
    // Acks inside a transaction take effect on commit only.
    let first = channel
        .basic_get("txq".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("message");
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    channel.tx_rollback().await.expect("rollback the ack");
    channel
        .basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .expect("recover");
    assert_eq!(
        message_count(&channel, "txq").await,
        2,
        "rolled-back ack left the message unacked"
    );
    let first = channel
        .basic_get("txq".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("message");
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    channel.tx_commit().await.expect("commit the ack");
    channel
        .basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .expect("recover");
    assert_eq!(message_count(&channel, "txq").await, 1);
}

#[tokio::test]
async fn confirm_and_tx_modes_exclude_each_other() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel.tx_select().await.expect("tx");
    let err = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect_err("mixed");
    assert_eq!(reply_code(&err), Some(406));
    let channel = connection.create_channel().await.expect("channel");
    let err = channel.tx_commit().await.expect_err("not transactional");
    assert_eq!(reply_code(&err), Some(406));
    let _ = FieldTable::default();
}

#[tokio::test]
async fn confirms_in_flight_arrive_before_channel_close_ok() {
    let server = start();
    let connection = server.connect().await;
    let setup = connection.create_channel().await.expect("channel");
    declare(&setup, "close-confirms", true).await;
    for _ in 0..5 {
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        let mut pending = Vec::new();
        for i in 0..200u32 {
            pending.push(
                channel
                    .basic_publish(
                        "".into(),
                        "close-confirms".into(),
                        BasicPublishOptions::default(),
                        &i.to_be_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish"),
            );
        }
        channel.close(200, "done".into()).await.expect("close");
        for confirm in pending {
            let confirmation = confirm.await.expect("confirmed before close-ok");
            assert!(confirmation.is_ack());
        }
    }
    assert_eq!(message_count(&setup, "close-confirms").await, 1000);
}
