//! Resource alarms: a full disk (a size-limited tmpfs the test mounts) blocks or nacks
//! publishers and never costs a confirmed message; a memory alarm blocks publishers while
//! consumers keep draining.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::Confirmation;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Event};

use crate::binary;
use crate::support::*;
use holdfast_testkit::Server;

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop, also on panic.
pub struct TmpfsMount {
    pub path: PathBuf,
    _parent: tempfile::TempDir,
}

impl TmpfsMount {
    pub fn new(size: &str) -> TmpfsMount {
        let parent = tempfile::tempdir().expect("tempdir");
        let path = parent.path().join("small-disk");
        std::fs::create_dir(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (as on the project's machines and CI)"
        );
        TmpfsMount {
            path,
            _parent: parent,
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Blocked / unblocked notices a connection received, in order.
#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<Option<String>>>>);

impl Notices {
    /// Records `connection`'s blocked (`Some(reason)`) and unblocked (`None`) events.
    fn listen(connection: &Connection) -> Notices {
        let notices = Notices::default();
        let sink = notices.clone();
        let mut events = connection.events_listener();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        sink.0.lock().expect("lock").push(Some(reason))
                    }
                    Event::ConnectionUnblocked => sink.0.lock().expect("lock").push(None),
                    _ => {}
                }
            }
        });
        notices
    }

    fn get(&self) -> Vec<Option<String>> {
        self.0.lock().expect("lock").clone()
    }

    async fn wait_for(&self, wanted: impl Fn(&[Option<String>]) -> bool, what: &str) {
        for _ in 0..200 {
            if wanted(&self.get()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}; notices: {:?}", self.get());
    }
}

/// A publish and its confirm, as one future that can be awaited in parts: lapin stops
/// writing once blocked, so even sending the publish may wait for the alarm to clear.
type Pending = Pin<Box<dyn Future<Output = Confirmation> + Send>>;

fn start_publish(channel: &Channel, queue: &str, body: &[u8]) -> Pending {
    let channel = channel.clone();
    let queue = queue.to_owned();
    let body = body.to_vec();
    Box::pin(async move {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic.publish")
            .await
            .expect("confirm")
    })
}

async fn confirm_within(pending: &mut Pending, limit: Duration) -> Option<Confirmation> {
    tokio::time::timeout(limit, pending.as_mut()).await.ok()
}

fn body(id: u64, len: usize) -> Vec<u8> {
    let mut body = vec![0xAB; len];
    body[..8].copy_from_slice(&id.to_be_bytes());
    body
}

fn id_of(body: &[u8]) -> u64 {
    u64::from_be_bytes(body[..8].try_into().expect("8-byte id"))
}

fn fill_file(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0u8; bytes]).expect("write ballast");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_blocks_and_nacks_publishers_and_loses_nothing_confirmed() {
    let disk = TmpfsMount::new("16m");
    let ballast = disk.path.join("ballast");
    fill_file(&ballast, 6 * 1024 * 1024);
    let data_dir = disk.path.join("data");
    let args = ["--disk-free-limit", "1048576", "--segment-size", "4194304"];
    let mut server = Server::start_in(binary(), &data_dir, &args);
    const LEN: usize = 64 * 1024;

    let connection = server.connect().await;
    let notices = Notices::listen(&connection);
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    declare(&channel, "full", true).await;

    // Publish one at a time until the broker stops taking messages.
    let mut acked: HashSet<u64> = HashSet::new();
    let mut nacked = 0u32;
    let mut held: Option<(u64, Pending)> = None;
    for id in 0..1000u64 {
        let mut pending = start_publish(&channel, "full", &body(id, LEN));
        match confirm_within(&mut pending, Duration::from_secs(2)).await {
            Some(confirm) if confirm.is_ack() => {
                acked.insert(id);
            }
            Some(_) => nacked += 1,
            None => {
                held = Some((id, pending));
                break;
            }
        }
    }
    let (held_id, mut held_pending) = held.expect("the publisher was blocked before 1000 x 64 KiB");
    notices
        .wait_for(
            |seen| seen.first() == Some(&Some("low on disk".to_owned())),
            "connection.blocked",
        )
        .await;
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "a full disk must not stop the node"
    );
    println!(
        "disk full after {} acked, {nacked} nacked; publish {held_id} held",
        acked.len()
    );
    assert!(
        acked.len() >= 100,
        "10 MiB free hold ~150 messages of 64 KiB"
    );
    // The path this test is about ran: a write the disk refused was cut back out of the
    // log, and its publish was nacked (not confirmed, not lost).
    assert!(nacked >= 1, "no publish was refused for lack of space");
    assert!(
        server.log_lines_containing("cut back") + server.log_lines_containing("was undone") >= 1,
        "the broker logged no cut-back of a refused write"
    );

    // Space returns: the alarm clears, the held publish goes through, publishing resumes.
    std::fs::remove_file(&ballast).expect("remove ballast");
    notices
        .wait_for(|seen| seen.last() == Some(&None), "connection.unblocked")
        .await;
    let confirm = confirm_within(&mut held_pending, Duration::from_secs(10))
        .await
        .expect("the held publish is confirmed once unblocked");
    if confirm.is_ack() {
        acked.insert(held_id);
    } else {
        nacked += 1;
    }
    for id in 1000..1020u64 {
        let mut pending = start_publish(&channel, "full", &body(id, LEN));
        let confirm = confirm_within(&mut pending, Duration::from_secs(10))
            .await
            .expect("confirm after recovery");
        assert!(confirm.is_ack(), "publish {id} after recovery: {confirm:?}");
        acked.insert(id);
    }

    // A crash, then every acked message exactly once, and nothing else.
    server.kill9();
    drop(connection);
    server.restart();
    let connection = server.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut recovered = Vec::new();
    while let Some(body) = get_body(&channel, "full").await {
        assert_eq!(body.len(), LEN, "message intact");
        recovered.push(id_of(&body));
    }
    let unique: HashSet<u64> = recovered.iter().copied().collect();
    assert_eq!(unique.len(), recovered.len(), "a message came back twice");
    let missing: Vec<&u64> = acked.difference(&unique).collect();
    assert!(missing.is_empty(), "acked but lost: {missing:?}");
    let extra: Vec<&u64> = unique.difference(&acked).collect();
    assert!(extra.is_empty(), "never acked but present: {extra:?}");
    println!(
        "after kill -9: {} acked, {} recovered, {nacked} nacked",
        acked.len(),
        recovered.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_publishers_while_consumers_drain() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().join("data");
    {
        let server = Server::start_in(binary(), &data_dir, &[]);
        let connection = server.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        declare(&channel, "work", true).await;
        for i in 0..20u64 {
            publish_confirmed(&channel, "", "work", &i.to_be_bytes()).await;
        }
    }
    // Any process uses more than 1 MiB: the memory alarm is raised from the start.
    let server = Server::start_in(binary(), &data_dir, &["--memory-high-watermark", "1048576"]);

    let consumer_connection = server.connect().await;
    let consumer_notices = Notices::listen(&consumer_connection);
    let publisher_connection = server.connect().await;
    let publisher_notices = Notices::listen(&publisher_connection);

    let publisher = publisher_connection
        .create_channel()
        .await
        .expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let mut pending = start_publish(&publisher, "work", b"while blocked");
    assert!(
        confirm_within(&mut pending, Duration::from_millis(300))
            .await
            .is_none(),
        "no confirm while blocked"
    );
    publisher_notices
        .wait_for(
            |seen| seen == [Some("low on memory".to_owned())],
            "connection.blocked",
        )
        .await;
    assert!(
        confirm_within(&mut pending, Duration::from_millis(500))
            .await
            .is_none(),
        "no confirm while blocked"
    );

    // The consumer drains all 20, acking each, and is never blocked.
    let channel = consumer_connection.create_channel().await.expect("channel");
    channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "work".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..20u64 {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.data, i.to_be_bytes());
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_no_delivery(&mut consumer).await;
    let check = consumer_connection.create_channel().await.expect("channel");
    assert_eq!(
        message_count(&check, "work").await,
        0,
        "the held publish was not read"
    );
    assert!(consumer_notices.get().is_empty(), "consumer was blocked");
    assert!(
        confirm_within(&mut pending, Duration::from_millis(100))
            .await
            .is_none(),
        "still no confirm"
    );
}
