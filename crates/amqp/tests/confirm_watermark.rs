//! Confirms leave when the broker's confirm watermark allows, not when the local log
//! alone is durable: a leader in sync mode holds them back until its in-sync followers
//! have the message too.

use std::sync::Arc;
use std::time::Duration;

use holdfast_amqp::{ServerConfig, serve};
use holdfast_broker::{Broker, BrokerConfig};
use holdfast_store::{FsyncPolicy, StoreConfig};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_waits_for_the_brokers_confirm_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::open(BrokerConfig::new(StoreConfig {
        dir: dir.path().to_owned(),
        segment_size: 1 << 20,
        fsync: FsyncPolicy::Always,
    }))
    .expect("broker");
    let (watermark, watermark_rx) = watch::channel(Ok(u64::MAX));
    assert!(broker.use_confirm_watermark(watermark_rx).is_ok());
    let (_other, other_rx) = watch::channel(Ok(0));
    assert!(broker.use_confirm_watermark(other_rx).is_err(), "set once");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (_shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        Arc::clone(&broker),
        Arc::new(ServerConfig::default()),
        shutdown_rx,
    ));
    let connection = Connection::connect(
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    // Hold confirms at what is written now: the next publish lies beyond.
    let held = broker.store().stats().written;
    let _ = watermark.send_replace(Ok(held));
    let confirm = channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    let mut confirm = Box::pin(confirm);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut confirm)
            .await
            .is_err(),
        "the confirm left before the watermark reached the message"
    );
    assert!(
        broker.store().durable().borrow().clone().expect("healthy") > held,
        "the local log alone is durable past the message"
    );
    let _ = watermark.send_replace(Ok(u64::MAX));
    let confirmation = tokio::time::timeout(Duration::from_secs(5), confirm)
        .await
        .expect("the confirm left once the watermark moved")
        .expect("confirmation");
    assert!(confirmation.is_ack());
}
