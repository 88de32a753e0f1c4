//! A dead letter that no target takes is never dropped: it leaves its queue's ready
//! list, waits, and is moved once a target has room.

use std::time::Duration;

use lapin::options::*;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};

use crate::dead_letter::{as_text, deaths, get_one, text, with_dead_letter_target};
use crate::start;
use crate::support::*;

/// `name` dead-letters through fanout `name.dlx` into `name.dlq`, which holds one
/// message and refuses more (`reject-publish`).
async fn into_a_full_target(channel: &Channel, name: &str) -> String {
    let full = [
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", text("reject-publish")),
    ];
    let dlq = with_dead_letter_target(channel, name, &[], &full).await;
    publish(channel, "", &dlq, b"filler", true).await;
    dlq
}

/// Takes the next message of `queue` and rejects it without requeue.
async fn reject_next(channel: &Channel, queue: &str) {
    let message = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    message
        .delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
}

async fn wait_for_count(channel: &Channel, queue: &str, wanted: u32) {
    for _ in 0..250 {
        if message_count(channel, queue).await == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{queue} never held {wanted} messages (holds {})",
        message_count(channel, queue).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_by_a_full_target_waits_for_room_and_is_not_dropped() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = into_a_full_target(&channel, "work").await;

    // Rejected by its consumer: the target is full.
    publish(&channel, "", "work", b"rejected", true).await;
    reject_next(&channel, "work").await;
    // Expired at the head of the queue: the target is still full.
    channel
        .basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            b"expired",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_expiration("1".into()),
        )
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Neither is delivered again nor counted in the source queue, and the target still
    // holds only what it had.
    assert!(
        channel
            .basic_get("work".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .is_none(),
        "a message waiting to be dead-lettered was delivered again"
    );
    assert_eq!(message_count(&channel, "work").await, 0);
    assert_eq!(message_count(&channel, &dlq).await, 1);

    // Room in the target, one message at a time: each waiting dead letter moves in.
    let mut moved = Vec::new();
    for _ in 0..3 {
        let body = get_one(&channel, &dlq).await.delivery.data.clone();
        moved.push(String::from_utf8_lossy(&body).into_owned());
    }
    assert_eq!(moved[0], "filler");
    moved[1..].sort();
    assert_eq!(moved[1..], ["expired".to_owned(), "rejected".to_owned()]);
    wait_for_count(&channel, &dlq, 0).await;
    assert_eq!(message_count(&channel, "work").await, 0);
}

/// The moved copy carries the death that sent it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_moved_late_carries_its_x_death_once() {
    let server = start();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = into_a_full_target(&channel, "late").await;
    publish(&channel, "", "late", b"m", true).await;
    reject_next(&channel, "late").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _filler = get_one(&channel, &dlq).await;
    let moved = get_one(&channel, &dlq).await;
    let history = deaths(&moved.delivery.properties);
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        as_text(history[0].inner().get("reason")).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        as_text(history[0].inner().get("queue")).as_deref(),
        Some("late")
    );
}

/// A waiting dead letter still waits after `kill -9`: it is not delivered again to the
/// queue's consumers, and it moves once the target has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_dead_letter_still_waits_after_kill_9() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut server =
        holdfast_testkit::Server::start_in(crate::binary(), &temp.path().join("data"), &[]);
    let dlq = {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let dlq = into_a_full_target(&channel, "crashy").await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        publish_confirmed(&channel, "", "crashy", b"waits").await;
        reject_next(&channel, "crashy").await;
        // The park record goes out with the next write or housekeeping tick (100 ms).
        tokio::time::sleep(Duration::from_millis(500)).await;
        dlq
    };
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert!(
        channel
            .basic_get("crashy".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .is_none(),
        "the waiting dead letter was delivered again after the restart"
    );
    assert_eq!(message_count(&channel, "crashy").await, 0);
    assert_eq!(get_one(&channel, &dlq).await.delivery.data, b"filler");
    let moved = get_one(&channel, &dlq).await;
    assert_eq!(moved.delivery.data, b"waits");
    assert_eq!(deaths(&moved.delivery.properties).len(), 1);
}
