//! Static replication with real processes: a leader (`--replication-listen`) ships its
//! log to a follower (`--follow`). In sync mode a confirmed message survives the loss of
//! the leader's machine: a server started on the follower's data directory has it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::*;

use crate::binary;
use crate::support::*;
use holdfast_testkit::Server;

/// A `holdfast server --follow` process (it serves no AMQP, so the testkit's server,
/// which waits for the AMQP address, does not fit).
struct Follower {
    child: Child,
}

impl Follower {
    fn start(data: &Path, leader: &str) -> Follower {
        let mut child = Command::new(binary())
            .arg("server")
            .arg("--data-dir")
            .arg(data)
            .args(["--follow", leader])
            .env("HOLDFAST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("follower starts");
        let stderr = child.stderr.take().expect("stderr");
        let (ready, started) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("HOLDFAST_TEST_ECHO").is_some() {
                    eprintln!("[follower] {line}");
                }
                if line.contains("connected to the leader") {
                    let _ = ready.send(());
                }
            }
        });
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the follower connected to the leader");
        Follower { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn start_leader(data: &Path, mode: &str) -> (Server, String) {
    let leader = Server::start_in(
        binary(),
        data,
        &["--replication-listen", "127.0.0.1:0", "--replication", mode],
    );
    let address = leader
        .logged_value("replication")
        .expect("the leader logs its replication address");
    (leader, address)
}

/// Publishes `ids` persistent and waits for every confirm.
async fn publish_all(channel: &lapin::Channel, queue: &str, ids: std::ops::Range<u32>) {
    let mut confirms = Vec::new();
    for id in ids {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &id.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_confirmed_in_sync_mode_survives_the_loss_of_the_leaders_machine() {
    let temp = tempfile::tempdir().expect("tempdir");
    let (leader_dir, follower_dir) = (temp.path().join("leader"), temp.path().join("follower"));
    let (mut leader, address) = start_leader(&leader_dir, "sync");
    let mut follower = Follower::start(&follower_dir, &address);
    let connection = leader.connect().await;
    let channel = confirming_channel(&connection).await;
    declare(&channel, "orders", true).await;
    publish_all(&channel, "orders", 0..2000).await;
    // The leader's machine is lost: its process and its disk.
    leader.kill9();
    std::fs::remove_dir_all(&leader_dir).expect("the leader's disk is gone");
    follower.kill9();
    // A person promotes the follower: a server on its data directory.
    let promoted = Server::start_in(binary(), &follower_dir, &[]);
    let connection = promoted.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(message_count(&channel, "orders").await, 2000);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(message) = channel
        .basic_get("orders".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        let id = u32::from_be_bytes(message.delivery.data[..4].try_into().expect("id"));
        assert!(seen.insert(id), "message {id} twice");
    }
    assert_eq!(seen.len(), 2000, "every confirmed message, once");
}

/// In sync mode a confirm waits for the follower: with the follower down it does not
/// come, and it comes once the follower is back. (Without an in-sync set to shrink,
/// which needs coordination, a missing follower stalls confirms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_sync_mode_a_confirm_waits_for_the_follower() {
    let temp = tempfile::tempdir().expect("tempdir");
    let follower_dir = temp.path().join("follower");
    let (leader, address) = start_leader(&temp.path().join("leader"), "sync");
    let mut follower = Follower::start(&follower_dir, &address);
    let connection = leader.connect().await;
    let channel = confirming_channel(&connection).await;
    declare(&channel, "orders", true).await;
    follower.kill9();
    let confirm = channel
        .basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            b"waits for the follower",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    let mut confirm = Box::pin(confirm);
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), &mut confirm)
            .await
            .is_err(),
        "confirmed although the follower was down"
    );
    let _follower = Follower::start(&follower_dir, &address);
    let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .expect("confirmed once the follower was back")
        .expect("confirmation");
    assert!(confirmation.is_ack());
}

/// In async mode the leader's fsync alone confirms: no follower needed.
#[tokio::test]
async fn in_async_mode_a_confirm_needs_no_follower() {
    let temp = tempfile::tempdir().expect("tempdir");
    let (leader, _) = start_leader(temp.path(), "async");
    let connection = leader.connect().await;
    let channel = confirming_channel(&connection).await;
    declare(&channel, "orders", true).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        publish_confirmed(&channel, "", "orders", b"m"),
    )
    .await
    .expect("confirmed without a follower");
}
