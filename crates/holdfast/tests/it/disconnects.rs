//! Connections that end badly: a reset in the middle of deliveries must cost nothing
//! beyond the connection itself, and the disk it pinned must be reclaimed.

use std::time::Duration;

use holdfast_codec::{AMQPClass, FieldTable as CodecTable, basic};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::binary;
use crate::raw::RawClient;
use crate::support::*;
use holdfast_testkit::Server;

fn segment_files(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("log"))
        .expect("log dir")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
        })
        .count()
}

/// A consumer whose socket is reset while deliveries are still queued for it: the
/// deliveries go back to the queue, another consumer takes and acks them, and then the
/// segments that held them are deleted (a queued delivery pins its record until the
/// connection's writer has read it; a writer that stopped must still let go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_consumer_leaves_no_pinned_segments() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");
    let server = Server::start_in(binary(), &data_dir, &["--segment-size", "1048576"]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "pinned", true).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let body = vec![5u8; 16 * 1024];
    let messages = 1000;
    let mut window = Vec::new();
    for _ in 0..messages {
        window.push(
            channel
                .basic_publish(
                    "".into(),
                    "pinned".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in window {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    let before = segment_files(&data_dir);
    assert!(before >= 10, "{before} segments for 16 MB");

    // A consumer that reads nothing: its socket fills, deliveries queue up behind it.
    let mut stuck = RawClient::tcp_with_small_window(server.addr, 4096)
        .await
        .handshake()
        .await;
    stuck.open_channel(1).await;
    stuck
        .call(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1000,
                global: false,
            })),
        )
        .await;
    stuck
        .send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "pinned".into(),
                consumer_tag: "stuck".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: CodecTable::default(),
            })),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stuck.reset();

    // Everything comes back and is taken by a well-behaved consumer.
    channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "pinned".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..messages {
        let delivery = next_delivery(&mut consumer).await;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let mut left = segment_files(&data_dir);
    for _ in 0..100 {
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = segment_files(&data_dir);
    }
    assert!(
        left <= 2,
        "{left} of {before} segment files remain after every message was acked"
    );
}
