//! Durable definitions (exchanges, queues, bindings): a declare the client saw succeed
//! survives a crash, and one that failed leaves no trace, also on a full disk.

use std::io::Write;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use crate::alarms::TmpfsMount;
use crate::binary;
use holdfast_testkit::Server;

/// Fills the file system holding `path` until a write fails for lack of space.
fn fill_up(path: &std::path::Path) {
    let mut file = std::fs::File::create(path).expect("ballast");
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
}

async fn try_declare(connection: &Connection, name: &str) -> Result<Channel, lapin::Error> {
    try_declare_with(connection, name, FieldTable::default()).await
}

async fn try_declare_with(
    connection: &Connection,
    name: &str,
    arguments: FieldTable,
) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    Ok(channel)
}

/// A passive queue.declare on a channel of its own (a 404 closes only that channel).
async fn passive(connection: &Connection, name: &str) -> Result<lapin::Queue, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Arguments that make a declare record of about 100 KiB: larger than what a segment
/// has left after a 64 KiB publish was refused, so the log must roll to take it.
fn bulky_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-note"),
        AMQPValue::LongString(LongString::from(vec![b'n'; 100 * 1024])),
    );
    arguments
}

/// On a full disk, a durable queue.declare either succeeds durably or fails without a
/// trace: publishes the broker confirms to the queue are there after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declare_on_a_full_disk_is_durable_or_leaves_no_trace() {
    let disk = TmpfsMount::new("8m");
    let data_dir = disk.path.join("data");
    let args = ["--disk-free-limit", "0", "--segment-size", "1048576"];
    let mut server = Server::start_in(binary(), &data_dir, &args);
    let ballast = disk.path.join("ballast");
    fill_up(&ballast);

    let mut confirmed = 0u32;
    let mut declared = false;
    for attempt in 0..2 {
        let connection = server.connect().await;
        match try_declare(&connection, "precious").await {
            Ok(channel) => {
                declared = true;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirm");
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        "precious".into(),
                        BasicPublishOptions::default(),
                        b"confirmed",
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirmation");
                if confirm.is_ack() {
                    confirmed += 1;
                }
            }
            Err(err) => println!("declare attempt {attempt} refused: {err}"),
        }
    }
    println!("declared: {declared}, confirmed publishes: {confirmed}");
    std::fs::remove_file(&ballast).expect("free the disk");
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    match passive(&connection, "precious").await {
        Ok(ok) => assert_eq!(
            ok.message_count(),
            confirmed,
            "every confirmed publish is in the queue after the crash"
        ),
        Err(err) => {
            assert_eq!(
                confirmed, 0,
                "the broker confirmed {confirmed} publishes to a queue that did not survive: {err}"
            );
            assert!(!declared, "a declare-ok for a queue that did not survive");
        }
    }
}

/// When the log itself cannot take the declare (the disk is full and the record does not
/// fit in what the current segment has left), the client gets 541 and the queue does not exist, not even in memory; every
/// later declare tries the write again; once space returns a declare sticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declare_the_log_refuses_leaves_no_trace() {
    let disk = TmpfsMount::new("8m");
    let data_dir = disk.path.join("data");
    let args = ["--disk-free-limit", "0", "--segment-size", "1048576"];
    let mut server = Server::start_in(binary(), &data_dir, &args);
    let ballast = disk.path.join("ballast");
    {
        let connection = server.connect().await;
        let channel = try_declare(&connection, "filler").await.expect("filler");
        fill_up(&ballast);
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        // Fill the reserved segment until the log refuses a write.
        let body = vec![1u8; 64 * 1024];
        let mut refused = false;
        for _ in 0..64 {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    "filler".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
            match tokio::time::timeout(std::time::Duration::from_secs(2), confirm).await {
                Ok(Ok(confirmation)) if confirmation.is_ack() => {}
                _ => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "the log never ran out of space");
    }
    for attempt in 0..2 {
        let connection = server.connect().await;
        let err = try_declare_with(&connection, "precious", bulky_arguments())
            .await
            .expect_err("a declare the log cannot take is refused");
        println!("attempt {attempt}: {err}");
        let connection = server.connect().await;
        assert!(
            passive(&connection, "precious").await.is_err(),
            "a refused declare left the queue behind"
        );
    }
    std::fs::remove_file(&ballast).expect("free the disk");
    // Wait out the alarm the refused write latched.
    let connection = server.connect().await;
    let channel = try_declare_with(&connection, "precious", bulky_arguments())
        .await
        .expect("declared once space returned");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let confirm = channel
        .basic_publish(
            "".into(),
            "precious".into(),
            BasicPublishOptions::default(),
            b"kept",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    let confirmation = tokio::time::timeout(std::time::Duration::from_secs(20), confirm)
        .await
        .expect("confirmed once the alarm clears")
        .expect("confirmation");
    assert!(confirmation.is_ack());
    drop(connection);
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let ok = passive(&connection, "precious")
        .await
        .expect("the queue survived the crash");
    assert_eq!(ok.message_count(), 1);
}
