//! Restarts and crashes of the real process: what was confirmed survives exactly once,
//! what was transient or acknowledged does not come back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;

use crate::support::*;
use crate::{binary, start};
use holdfast_testkit::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_state_survives_restart_and_transient_state_does_not() {
    let mut server = start();
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        channel
            .exchange_declare(
                "d-ex".into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        channel
            .exchange_declare(
                "t-ex".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        declare(&channel, "d-q", true).await;
        declare(&channel, "t-q", false).await;
        channel
            .queue_bind(
                "d-q".into(),
                "d-ex".into(),
                "a.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        channel
            .queue_declare(
                "x-q".into(),
                QueueDeclareOptions {
                    durable: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exclusive durable");
        for i in 0..3u8 {
            publish_confirmed(&channel, "d-ex", "a.b", &[i]).await;
        }
        // Transient message to a durable queue, persistent to a transient queue.
        channel
            .basic_publish(
                "".into(),
                "d-q".into(),
                BasicPublishOptions::default(),
                b"transient",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        publish_confirmed(&channel, "", "t-q", b"p").await;
        // Ack the first durable message.
        let first = channel
            .basic_get("d-q".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("message");
        assert_eq!(first.delivery.data, vec![0]);
        first
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        // Hold the second unacked across the restart.
        let held = channel
            .basic_get("d-q".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("message");
        assert_eq!(held.delivery.data, vec![1]);
        // Off the runtime, so lapin can answer the server's connection.close.
        let (returned, status) = tokio::task::spawn_blocking(move || {
            let status = server.terminate();
            (server, status)
        })
        .await
        .expect("terminate");
        server = returned;
        assert!(status.success(), "SIGTERM exit status {status:?}");
    }
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let err = channel
        .exchange_declare(
            "t-ex".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("transient exchange gone");
    assert_eq!(reply_code(&err), Some(404));
    for gone in ["t-q", "x-q"] {
        let channel = connection.create_channel().await.expect("channel");
        let err = channel
            .queue_declare(
                gone.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect_err("gone after restart");
        assert_eq!(reply_code(&err), Some(404), "{gone}");
    }
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(message_count(&channel, "d-q").await, 2);
    let second = channel
        .basic_get("d-q".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("message");
    assert_eq!(second.delivery.data, vec![1]);
    assert!(
        second.delivery.redelivered,
        "a message delivered before the restart is redelivered"
    );
    assert_eq!(get_body(&channel, "d-q").await, Some(vec![2]));
    // The binding survived too.
    publish(&channel, "d-ex", "a.c", b"routed", true).await;
    assert_eq!(
        get_body(&channel, "d-q").await.as_deref(),
        Some(&b"routed"[..])
    );
}

// Multi-threaded, and the blocking wait for the process off the runtime: lapin's I/O
// runs on this runtime and must be free to answer the server's connection.close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_connection_forced() {
    let mut server = start();
    let connection = server.connect().await;
    let mut events = Box::pin(connection.events_listener());
    let started = std::time::Instant::now();
    let (server, status) = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (server, status)
    })
    .await
    .expect("terminate");
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown waited for the close deadline"
    );
    drop(server);
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(err) = event {
                return Some(err);
            }
        }
        None
    })
    .await
    .expect("an event in time")
    .expect("connection error reported");
    assert_eq!(reply_code(&err), Some(320), "{err:?}");
}

async fn connect(url: &str) -> Option<Connection> {
    tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()
}

/// Publishes unique ids with confirms until the connection dies; returns the confirmed.
async fn publish_until_killed(
    url: String,
    producer: u64,
    round: u64,
    confirmed: Arc<Mutex<HashSet<u64>>>,
) {
    let Some(connection) = connect(&url).await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    if channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return;
    }
    let mut in_flight = std::collections::VecDeque::new();
    for seq in 0.. {
        let id = (round << 40) | (producer << 32) | seq;
        let Ok(confirm) = channel
            .basic_publish(
                "".into(),
                "crash".into(),
                BasicPublishOptions::default(),
                &id.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        else {
            break;
        };
        in_flight.push_back((id, confirm));
        // Keep a window of unconfirmed publishes, as a real producer would.
        if in_flight.len() >= 64 {
            let (id, confirm) = in_flight.pop_front().expect("non-empty");
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    confirmed.lock().expect("lock").insert(id);
                }
                _ => break,
            }
        }
    }
    for (id, confirm) in in_flight {
        if confirm.await.is_ok_and(|c| c.is_ack()) {
            confirmed.lock().expect("lock").insert(id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9_exactly_once() {
    const ROUNDS: u64 = 20;
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");
    let mut server = Server::start_in(binary(), &data_dir, &["--segment-size", "262144"]);
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        declare(&channel, "crash", true).await;
    }
    let mut ever_seen: HashSet<u64> = HashSet::new();
    let mut total_confirmed = 0usize;
    let mut total_lost = 0usize;
    for round in 1..=ROUNDS {
        let confirmed = Arc::new(Mutex::new(HashSet::new()));
        let url = server.url();
        let producers: Vec<_> = (0..2)
            .map(|producer| {
                tokio::spawn(publish_until_killed(
                    url.clone(),
                    producer,
                    round,
                    confirmed.clone(),
                ))
            })
            .collect();
        let pause = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        for producer in producers {
            let _ = tokio::time::timeout(Duration::from_secs(10), producer).await;
        }
        server.restart();
        let confirmed = confirmed.lock().expect("lock").clone();
        // Drain the queue and compare.
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let count = message_count(&channel, "crash").await as usize;
        let mut consumer = channel
            .basic_consume(
                "crash".into(),
                "drain".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut this_round = HashSet::new();
        for _ in 0..count {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("delivery in time")
                .expect("stream open")
                .expect("delivery");
            let id = u64::from_be_bytes(delivery.data[..8].try_into().expect("8-byte id"));
            assert!(
                this_round.insert(id),
                "round {round}: id {id:#x} delivered twice"
            );
            assert!(
                !ever_seen.contains(&id),
                "round {round}: id {id:#x} came back after being consumed"
            );
        }
        let lost: Vec<_> = confirmed.difference(&this_round).collect();
        total_lost += lost.len();
        total_confirmed += confirmed.len();
        assert!(
            lost.is_empty(),
            "round {round}: {} confirmed messages lost, e.g. {:#x?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        ever_seen.extend(this_round);
        connection.close(200, "next round".into()).await.ok();
    }
    println!(
        "kill -9 rounds: {ROUNDS}, confirmed: {total_confirmed}, confirmed-but-lost: {total_lost}, delivered: {}",
        ever_seen.len()
    );
    assert!(
        total_confirmed > 0,
        "the test must confirm something to mean anything"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_bodies_stay_on_disk_and_acked_segments_are_deleted() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");
    let server = Server::start_in(binary(), &data_dir, &["--segment-size", "4194304"]);
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel, "backlog", true).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let body = vec![7u8; 64 * 1024];
    let baseline = rss_bytes(server.pid());
    // 192 MiB of persistent messages, confirmed in windows of 64.
    for _ in 0..48 {
        let mut window = Vec::new();
        for _ in 0..64 {
            window.push(
                channel
                    .basic_publish(
                        "".into(),
                        "backlog".into(),
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
    }
    let grown = rss_bytes(server.pid()).saturating_sub(baseline);
    println!(
        "backlog 192 MiB: RSS grew by {} MiB, {} segment files",
        grown >> 20,
        segment_files(&data_dir)
    );
    assert!(
        grown < 64 << 20,
        "broker memory grew by {} MiB for a 192 MiB backlog",
        grown >> 20
    );
    assert!(segment_files(&data_dir) >= 40);
    // Consume and ack everything: the segments holding it go away.
    channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "backlog".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..48 * 64 {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.data.len(), body.len());
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Dead segments are deleted on the store's reaper thread: give it a moment.
    let mut left = segment_files(&data_dir);
    for _ in 0..100 {
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = segment_files(&data_dir);
    }
    println!("after acking everything: {left} segment files");
    assert!(
        left <= 2,
        "{left} segment files remain after every message was acked"
    );
}

/// An exclusive durable queue's persistent messages are logged under its id. After a
/// crash that queue is gone, and a queue declared later must get a new id: otherwise
/// the next restart hands the dead queue's messages to an unrelated queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ids_are_never_reused_across_restarts() {
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
            .queue_declare(
                "mine".into(),
                QueueDeclareOptions {
                    durable: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exclusive durable queue");
        for i in 0..5 {
            publish_confirmed(&channel, "", "mine", format!("old {i}").as_bytes()).await;
        }
    }
    server.kill9();
    server.restart();
    {
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        declare(&channel, "unrelated", true).await;
        assert_eq!(message_count(&channel, "unrelated").await, 0);
    }
    server.kill9();
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(
        message_count(&channel, "unrelated").await,
        0,
        "the dead exclusive queue's messages appeared in a new queue"
    );
}
