//! A leader and a follower, each with its own store, linked over loopback TCP: the
//! follower's log becomes the leader's, byte for byte; the link fences older epochs and
//! refuses a follower whose log runs past the leader's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use holdfast_cluster::watermark::confirm_watermark;
use holdfast_cluster::{LinkError, follower, leader};
use holdfast_store::{Durability, FsyncPolicy, LogPosition, Store, StoreConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type Records = Vec<(LogPosition, Vec<u8>)>;

fn open(dir: &Path, segment_size: u64) -> (Store, Records) {
    let mut records = Vec::new();
    let store = Store::open(
        StoreConfig {
            dir: dir.to_owned(),
            segment_size,
            fsync: FsyncPolicy::Always,
        },
        |position, payload| records.push((position, payload.to_vec())),
    )
    .expect("store opens");
    (store, records)
}

fn log_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("log"))
        .expect("log dir")
        .map(|entry| {
            let entry = entry.expect("entry");
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("segment"),
            )
        })
        .collect()
}

fn payload(index: usize) -> Vec<u8> {
    let len = (index * 7919) % 5000;
    (0..len).map(|byte| (index + byte) as u8).collect()
}

/// Connects a follower (having seen epoch `seen`) to a leader of `epoch`; returns both
/// sides' results and the leader's view of the follower's durable end.
async fn link(
    leader_store: Store,
    follower_store: Store,
    epoch: u64,
    seen: u64,
) -> (
    tokio::task::JoinHandle<Result<(), LinkError>>,
    tokio::task::JoinHandle<Result<(), LinkError>>,
    watch::Receiver<u64>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (acked_tx, acked) = watch::channel(0);
    let leader = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        leader::serve(socket, leader_store, epoch, std::sync::Arc::new(acked_tx)).await
    });
    let follower = tokio::spawn(async move {
        let socket = TcpStream::connect(address).await?;
        follower::follow(socket, follower_store, seen).await
    });
    (leader, follower, acked)
}

/// Records appended while the link runs (some before it starts, some lazily, across
/// many segment rolls) reach the follower: the leader sees the follower durable at its
/// own end, and afterwards both logs have the same files and recover the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_becomes_a_byte_for_byte_copy_of_the_leader() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (leader_store, _) = open(leader_dir.path(), 16 * 1024);
    let (follower_store, _) = open(follower_dir.path(), 64 * 1024);
    for index in 0..50 {
        leader_store
            .append(&payload(index), 1, Durability::Requested)
            .expect("append");
    }
    let (leader, follower, mut acked) =
        link(leader_store.clone(), follower_store.clone(), 1, 0).await;
    // Sync mode's confirm watermark over this link: it must never pass what the
    // follower has made durable.
    let mut watermark = confirm_watermark(leader_store.durable(), vec![acked.clone()]);
    let checker = {
        let follower_durable = follower_store.durable();
        let mut watermark = watermark.clone();
        tokio::spawn(async move {
            while watermark.changed().await.is_ok() {
                let at = watermark.borrow_and_update().clone().expect("healthy");
                let follower_at = follower_durable.borrow().clone().expect("healthy");
                assert!(
                    at <= follower_at,
                    "watermark {at} passed the follower's {follower_at}"
                );
            }
        })
    };
    let writer = {
        let store = leader_store.clone();
        tokio::spawn(async move {
            for index in 50..2000 {
                let durability = if index % 3 == 0 {
                    Durability::Lazy
                } else {
                    Durability::Requested
                };
                let appended = store
                    .append(&payload(index), 1, durability)
                    .expect("append");
                if index % 50 == 0 {
                    store.wait_durable(appended.end).await.expect("durable");
                }
            }
        })
    };
    writer.await.expect("writer");
    leader_store.sync_all().expect("sync");
    let end = leader_store.stats().written;
    tokio::time::timeout(Duration::from_secs(20), acked.wait_for(|at| *at >= end))
        .await
        .expect("the follower caught up within 20 s")
        .expect("link alive");
    tokio::time::timeout(
        Duration::from_secs(5),
        watermark.wait_for(|at| at.as_ref().is_ok_and(|at| *at >= end)),
    )
    .await
    .expect("the watermark reached the end")
    .expect("watermark alive");
    assert!(
        leader_store.stats().segments > 10,
        "the test rolled segments"
    );
    leader.abort();
    follower.abort();
    let _ = (leader.await, follower.await);
    checker.abort();
    if let Err(panic) = checker.await
        && panic.is_panic()
    {
        std::panic::resume_unwind(panic.into_panic());
    }
    leader_store.shutdown().expect("shutdown");
    follower_store.shutdown().expect("shutdown");
    drop((leader_store, follower_store));
    assert_eq!(log_files(follower_dir.path()), log_files(leader_dir.path()));
    let (_, leader_records) = open(leader_dir.path(), 16 * 1024);
    let (_, follower_records) = open(follower_dir.path(), 64 * 1024);
    assert_eq!(follower_records.len(), 2000);
    assert_eq!(follower_records, leader_records);
}

/// A leader whose epoch is older than one the follower has seen is deposed: the
/// follower's hello tells it so, it refuses the link, and the follower writes nothing.
#[tokio::test]
async fn a_leader_of_an_older_epoch_is_refused() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (leader_store, _) = open(leader_dir.path(), 16 * 1024);
    let (follower_store, _) = open(follower_dir.path(), 16 * 1024);
    leader_store
        .append(b"from a deposed leader", 1, Durability::Requested)
        .expect("append");
    let before = follower_store.stats().written;
    let (leader, follower, _) = link(leader_store, follower_store.clone(), 3, 5).await;
    let leader = leader.await.expect("leader task");
    let follower = follower.await.expect("follower task");
    assert!(
        matches!(leader, Err(LinkError::StaleEpoch { got: 3, seen: 5 })),
        "{leader:?}"
    );
    assert!(
        matches!(follower, Err(LinkError::Refused(_))),
        "{follower:?}"
    );
    assert_eq!(
        follower_store.stats().written,
        before,
        "nothing was written"
    );
}

/// A follower whose log runs past the leader's must be cut back first (not built): the
/// link is refused rather than shipping records that would not continue its log.
#[tokio::test]
async fn a_follower_ahead_of_the_leader_is_refused() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (leader_store, _) = open(leader_dir.path(), 16 * 1024);
    let (follower_store, _) = open(follower_dir.path(), 16 * 1024);
    follower_store
        .append(b"written only here", 1, Durability::Requested)
        .expect("append");
    let (leader, follower, _) = link(leader_store, follower_store, 1, 1).await;
    let leader = leader.await.expect("leader task");
    assert!(
        matches!(leader, Err(LinkError::FollowerAhead { .. })),
        "{leader:?}"
    );
    assert!(matches!(
        follower.await.expect("follower task"),
        Err(LinkError::Refused(_))
    ));
}

/// A deposed leader that ignores the follower's hello and sends records anyway (a zombie
/// after a pause) is fenced by the follower itself: records of an older epoch than one
/// it has seen are refused and nothing is written.
#[tokio::test]
async fn a_follower_refuses_records_of_an_older_epoch() {
    use holdfast_cluster::frame::{Frame, read_frame, write_frame};
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let (follower_store, _) = open(follower_dir.path(), 16 * 1024);
    let (zombie_store, _) = open(leader_dir.path(), 16 * 1024);
    zombie_store
        .append(b"from a zombie", 1, Durability::Requested)
        .expect("append");
    zombie_store.sync_all().expect("sync");
    let records = zombie_store.read_records(0, usize::MAX).expect("records");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let zombie = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let hello = read_frame(&mut socket).await.expect("hello");
        assert_eq!(
            hello,
            Frame::Hello {
                epoch: 5,
                log_end: 8
            }
        );
        let frame = Frame::Records {
            epoch: 4,
            leader_durable: 0,
            records,
        };
        write_frame(&mut socket, &frame).await.expect("records");
        read_frame(&mut socket)
            .await
            .expect("the follower's answer")
    });
    let socket = TcpStream::connect(address).await.expect("connect");
    let followed = follower::follow(socket, follower_store.clone(), 5).await;
    assert!(
        matches!(followed, Err(LinkError::StaleEpoch { got: 4, seen: 5 })),
        "{followed:?}"
    );
    assert!(matches!(
        zombie.await.expect("zombie"),
        Frame::Refuse { .. }
    ));
    assert_eq!(follower_store.stats().written, 8, "nothing was written");
}
