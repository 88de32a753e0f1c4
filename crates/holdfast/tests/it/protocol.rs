//! Connection-level behaviour: heartbeats, frame_max splitting, flow, update-secret,
//! server properties, the "last declared queue" shorthand.

use std::time::{Duration, Instant};

use holdfast_codec::{AMQPClass, AMQPValue, Frame, connection, queue};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::raw::{RawClient, open};
use crate::start;
use crate::support::*;

#[tokio::test]
async fn silent_peer_is_dropped_after_two_heartbeat_intervals_and_server_beats() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    client.login("guest", "guest").await;
    match client.expect_method().await {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => {}
        other => panic!("expected tune, got {other:?}"),
    }
    client
        .send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 131_072,
                heartbeat: 1,
            })),
        )
        .await;
    client.send_method(0, open("/")).await;
    let started = Instant::now();
    let mut heartbeats = 0;
    // From now on the client says nothing: the server must beat, then give up on us.
    while let Some(frame) = client.next_frame().await {
        match frame {
            Frame::Heartbeat { channel: 0 } => heartbeats += 1,
            Frame::Method { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(heartbeats >= 1, "server sent no heartbeat");
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6),
        "dropped after {elapsed:?}"
    );
}

#[tokio::test]
async fn server_properties_advertise_capabilities() {
    let server = start();
    let mut client = RawClient::tcp(server.addr).await;
    client.send_header().await;
    let (_, method) = client.expect_method().await;
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = method else {
        panic!("expected connection.start");
    };
    let Some(AMQPValue::FieldTable(capabilities)) =
        start.server_properties.inner().get("capabilities")
    else {
        panic!("no capabilities table");
    };
    for capability in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            capabilities.inner().get(capability),
            Some(&AMQPValue::Boolean(true)),
            "{capability}"
        );
    }
}

#[tokio::test]
async fn bodies_larger_than_frame_max_are_split_and_joined() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "big", true).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publish_confirmed(&channel, "", "big", &body).await;
    let mut consumer = channel
        .basic_consume(
            "big".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.data.len(), body.len());
    assert!(delivery.data == body, "body corrupted in transit");
}

#[tokio::test]
async fn channel_flow_pauses_deliveries() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "flowq", false).await;
    let mut consumer = channel
        .basic_consume(
            "flowq".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    assert!(
        !channel
            .channel_flow(ChannelFlowOptions { active: false })
            .await
            .expect("flow off")
    );
    let publisher = connection.create_channel().await.expect("channel");
    publish(&publisher, "", "flowq", b"held", false).await;
    assert_no_delivery(&mut consumer).await;
    assert!(
        channel
            .channel_flow(ChannelFlowOptions { active: true })
            .await
            .expect("flow on")
    );
    assert_eq!(next_delivery(&mut consumer).await.data, b"held");
}

#[tokio::test]
async fn update_secret_is_acknowledged() {
    let server = start();
    let connection = server.connect().await;
    connection
        .update_secret("new-token".into(), "rotation".into())
        .await
        .expect("update-secret-ok");
    let channel = connection
        .create_channel()
        .await
        .expect("channel still works");
    declare(&channel, "after-secret", false).await;
}

#[tokio::test]
async fn empty_queue_name_means_the_last_declared_queue() {
    let server = start();
    let mut client = RawClient::open(server.addr).await;
    client.open_channel(1).await;
    let reply = client
        .call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "".into(),
                passive: false,
                durable: false,
                exclusive: true,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
    let AMQPClass::Queue(queue::AMQPMethod::DeclareOk(declared)) = reply else {
        panic!("expected declare-ok, got {reply:?}");
    };
    let reply = client
        .call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "".into(),
                exchange: "amq.fanout".into(),
                routing_key: "".into(),
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
    assert!(
        matches!(reply, AMQPClass::Queue(queue::AMQPMethod::BindOk(_))),
        "{reply:?}"
    );
    let reply = client
        .call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: "".into(),
                nowait: false,
            })),
        )
        .await;
    assert!(
        matches!(reply, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(_))),
        "{reply:?}"
    );
    // A fanout publish reaches the server-named queue through the binding made with "".
    let connection = Connection::connect(&server.url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            "amq.fanout".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = client
        .call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: "".into(),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })),
        )
        .await;
    let AMQPClass::Queue(queue::AMQPMethod::DeleteOk(deleted)) = reply else {
        panic!("expected delete-ok, got {reply:?}");
    };
    assert_eq!(deleted.message_count, 1, "{}", declared.queue);
}
