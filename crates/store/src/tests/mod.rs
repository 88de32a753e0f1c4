//! Unit tests of the store against the real filesystem (tempdirs) and the power-loss
//! simulator (`crate::sim`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::segment::{MAGIC, MAGIC_LEN};
use crate::sim::SimFileSystem;
use crate::{
    Durability, FsyncPolicy, LogPosition, MAX_RECORD_SIZE, Store, StoreConfig, StoreError,
};

mod disk_full;
mod power_loss;
mod replication;

type Visited = Vec<(LogPosition, Vec<u8>)>;

fn config(dir: &Path, segment_size: u64, fsync: FsyncPolicy) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        segment_size,
        fsync,
    }
}

fn open(config: StoreConfig) -> (Store, Visited) {
    let mut visited = Vec::new();
    let store = Store::open(config, |position, payload| {
        visited.push((position, payload.to_vec()));
    })
    .expect("open store");
    (store, visited)
}

fn open_sim(fs: &SimFileSystem, config: StoreConfig) -> Result<(Store, Visited), StoreError> {
    let mut visited = Vec::new();
    let store = Store::open_with(Arc::new(fs.clone()), config, &mut |position, payload| {
        visited.push((position, payload.to_vec()));
    })?;
    Ok((store, visited))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build runtime")
        .block_on(future)
}

fn payload(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|byte| (index * 31 + byte) as u8).collect()
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("log"))
        .expect("read log dir")
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn append_read_roundtrip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, visited) = open(StoreConfig::new(dir.path()));
    assert!(visited.is_empty());
    let first = store
        .append(b"hello", 1, Durability::Requested)
        .expect("append");
    let empty = store.append(b"", 0, Durability::Requested).expect("append");
    assert_eq!(first.position, LogPosition(MAGIC_LEN));
    assert_eq!(first.len, 5);
    assert_eq!(first.end, MAGIC_LEN + 8 + 5);
    assert_eq!(empty.position.0, first.end);
    assert_eq!(
        &store.read(first.position, first.len).expect("read")[..],
        b"hello"
    );
    assert!(store.read(empty.position, 0).expect("read").is_empty());
    assert!(matches!(
        store.read(first.position, 4),
        Err(StoreError::Corrupt { .. })
    ));
    block_on(store.wait_durable(empty.end)).expect("durable");
    let stats = store.stats();
    assert_eq!(stats.appended_records, 2);
    assert_eq!(stats.written, empty.end);
    assert_eq!(stats.durable, empty.end);
    assert_eq!(stats.segments, 1);
}

#[test]
fn positions_increase_across_rolls_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 4096, FsyncPolicy::Never);
    let (store, _) = open(cfg.clone());
    let mut appended = Vec::new();
    for index in 0..40 {
        let bytes = payload(index, (index * 137) % 1800);
        let at = store
            .append(&bytes, 0, Durability::Requested)
            .expect("append");
        appended.push((at, bytes));
    }
    // One record larger than a segment gets a segment to itself.
    let big = payload(99, 10_000);
    let big_at = store
        .append(&big, 0, Durability::Requested)
        .expect("append big");
    appended.push((big_at, big));
    let after = store
        .append(b"after", 0, Durability::Requested)
        .expect("append after big");
    appended.push((after, b"after".to_vec()));
    for pair in appended.windows(2) {
        assert!(pair[0].0.end <= pair[1].0.position.0);
        assert!(pair[0].0.position < pair[1].0.position);
    }
    assert!(store.stats().segments > 5, "{:?}", store.stats());
    for (at, bytes) in &appended {
        assert_eq!(
            &store.read(at.position, at.len).expect("read")[..],
            &bytes[..]
        );
    }
    // Segment names are base offsets; each base is the previous base + file length.
    let names = segment_files(dir.path());
    let mut expected_base = 0;
    for name in &names {
        assert_eq!(name, &format!("{expected_base:020}.log"));
        let len = std::fs::metadata(dir.path().join("log").join(name))
            .expect("metadata")
            .len();
        expected_base += len;
    }
    drop(store);
    let (store, visited) = open(cfg);
    let expected: Visited = appended
        .iter()
        .map(|(at, bytes)| (at.position, bytes.clone()))
        .collect();
    assert_eq!(visited, expected);
    let next = store
        .append(b"next", 0, Durability::Requested)
        .expect("append");
    assert!(next.position.0 >= after.end);
}

#[test]
fn append_batch_spans_a_roll_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 4096, FsyncPolicy::Always));
    let payloads: Vec<Vec<u8>> = (0..10).map(|index| payload(index, 1000)).collect();
    let batch: Vec<(&[u8], u32)> = payloads.iter().map(|bytes| (&bytes[..], 1)).collect();
    let appended = store.append_batch(&batch).expect("append batch");
    assert_eq!(appended.len(), 10);
    for pair in appended.windows(2) {
        assert!(pair[0].end <= pair[1].position.0);
    }
    for (at, bytes) in appended.iter().zip(&payloads) {
        assert_eq!(
            &store.read(at.position, at.len).expect("read")[..],
            &bytes[..]
        );
    }
    block_on(store.wait_durable(appended[9].end)).expect("durable");
    assert!(store.stats().segments >= 3);
}

#[test]
fn too_large_record_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(StoreConfig::new(dir.path()));
    // calloc'd: no memory is touched.
    let huge = vec![0u8; MAX_RECORD_SIZE + 1];
    assert!(matches!(
        store.append(&huge, 0, Durability::Requested),
        Err(StoreError::RecordTooLarge { .. })
    ));
    assert_eq!(store.stats().appended_records, 0);
}

#[test]
fn corrupted_record_reads_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(StoreConfig::new(dir.path()));
    let at = store
        .append(b"precious", 0, Durability::Requested)
        .expect("append");
    store.sync_all().expect("written out");
    let path = dir.path().join("log").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&path).expect("read segment");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).expect("corrupt segment");
    assert!(matches!(
        store.read(at.position, at.len),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.read(LogPosition(1_000_000), 1),
        Err(StoreError::Io { .. })
    ));
}

/// Four ~1.5 KiB records per two segments: records 0,1 in segment A, 2,3 in B, ...
fn store_with_segments(dir: &Path) -> (Store, Vec<crate::Appended>) {
    let (store, _) = open(config(dir, 4096, FsyncPolicy::Never));
    let appended: Vec<_> = (0..8)
        .map(|index| {
            store
                .append(&payload(index, 1500), 1, Durability::Requested)
                .expect("append")
        })
        .collect();
    (store, appended)
}

#[test]
fn release_deletes_only_a_dead_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, appended) = store_with_segments(dir.path());
    assert_eq!(store.stats().segments, 4);
    store.collect_garbage();
    assert_eq!(store.stats().segments, 4, "everything is referenced");

    // Segment B dies, but A before it is alive: nothing is deleted.
    store.release(appended[2].position);
    store.release(appended[3].position);
    assert_eq!(store.stats().segments, 4);
    store.wait_for_deletions();
    assert_eq!(segment_files(dir.path()).len(), 4);

    // A dies: A and B go together.
    store.release(appended[0].position);
    assert_eq!(store.stats().segments, 4);
    store.release(appended[1].position);
    assert_eq!(store.stats().segments, 2);
    store.wait_for_deletions();
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert!(matches!(
        store.read(appended[0].position, appended[0].len),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store
            .read(appended[4].position, appended[4].len)
            .expect("read")
            .len(),
        1500
    );

    // The active segment is never deleted, even with no references.
    for at in &appended[4..] {
        store.release(at.position);
    }
    assert_eq!(store.stats().segments, 1);
    assert_eq!(
        store
            .read(appended[7].position, appended[7].len)
            .expect("read")
            .len(),
        1500
    );

    // Positions keep increasing after deletion and reopen.
    let last_end = appended[7].end;
    drop(store);
    let (store, visited) = open(config(dir.path(), 4096, FsyncPolicy::Never));
    assert_eq!(visited.len(), 2);
    assert_eq!(visited[1].0, appended[7].position);
    let next = store
        .append(b"next", 0, Durability::Requested)
        .expect("append");
    assert!(next.position.0 >= last_end);
}

#[test]
fn nothing_is_deleted_before_collect_garbage_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, appended) = store_with_segments(dir.path());
    drop(store);
    let (store, visited) = open(config(dir.path(), 4096, FsyncPolicy::Never));
    assert_eq!(visited.len(), 8);
    // Rolls before collect_garbage must not delete unretained recovered segments.
    for index in 0..4 {
        store
            .append(&payload(index, 1500), 0, Durability::Requested)
            .expect("append");
    }
    assert_eq!(store.stats().segments, 6);
    // The broker keeps record 4 (segment C): A and B go, C and later stay.
    store.retain(appended[4].position);
    store.collect_garbage();
    assert_eq!(store.stats().segments, 4);
    store.release(appended[4].position);
    assert_eq!(store.stats().segments, 1);
}

#[test]
fn definitions_roundtrip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(StoreConfig::new(dir.path()));
    assert_eq!(store.read_definitions().expect("read"), None);
    store
        .write_definitions(b"first, longer version")
        .expect("write");
    store.write_definitions(b"second").expect("write");
    assert_eq!(
        store.read_definitions().expect("read").as_deref(),
        Some(&b"second"[..])
    );
    drop(store);
    let (store, _) = open(StoreConfig::new(dir.path()));
    assert_eq!(
        store.read_definitions().expect("read").as_deref(),
        Some(&b"second"[..])
    );
    assert!(!dir.path().join("definitions.tmp").exists());
}

#[test]
fn second_open_of_a_locked_dir_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(StoreConfig::new(dir.path()));
    let second = Store::open(StoreConfig::new(dir.path()), |_, _| {});
    assert!(
        matches!(second, Err(StoreError::Locked { .. })),
        "{second:?}"
    );
    drop(store);
    let (_store, _) = open(StoreConfig::new(dir.path()));
}

#[test]
fn torn_and_zero_filled_tails_are_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open(cfg.clone());
    let kept: Vec<_> = (0..3)
        .map(|index| {
            store
                .append(&payload(index, 100), 0, Durability::Requested)
                .expect("append")
        })
        .collect();
    drop(store);
    let path = dir.path().join("log").join(format!("{:020}.log", 0));
    let clean_len = std::fs::metadata(&path).expect("metadata").len();
    for tail in [vec![0u8; 4096], vec![7u8; 3], vec![0xff; 100]] {
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&tail);
        std::fs::write(&path, &bytes).expect("write");
        let (store, visited) = open(cfg.clone());
        assert_eq!(visited.len(), 3);
        assert_eq!(std::fs::metadata(&path).expect("metadata").len(), clean_len);
        let next = store
            .append(b"x", 0, Durability::Requested)
            .expect("append");
        assert_eq!(next.position.0, kept[2].end);
        drop(store);
        // Remove "x" again for the next round.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(clean_len)
            .expect("truncate");
    }
}

#[test]
fn last_segment_without_magic_is_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open(cfg.clone());
    let kept = store
        .append(b"kept", 0, Durability::Requested)
        .expect("append");
    drop(store);
    // A crash right after creating the next segment file, before its magic was written.
    let next = dir.path().join("log").join(format!("{:020}.log", kept.end));
    std::fs::write(&next, b"HF").expect("write");
    let (store, visited) = open(cfg.clone());
    assert_eq!(visited, vec![(kept.position, b"kept".to_vec())]);
    assert_eq!(std::fs::read(&next).expect("read"), MAGIC);
    let after = store
        .append(b"after", 0, Durability::Requested)
        .expect("append");
    assert_eq!(after.position.0, kept.end + MAGIC_LEN);
    drop(store);
    let (_store, visited) = open(cfg);
    assert_eq!(visited.len(), 2);
}

#[test]
fn never_and_interval_confirm_on_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 1 << 20, FsyncPolicy::Never));
    let at = store
        .append(b"quick", 0, Durability::Requested)
        .expect("append");
    // Confirmed once written (the flusher writes pending appends), without an fsync.
    block_on(store.wait_durable(at.end)).expect("durable");
    assert_eq!(store.stats().fsyncs, 0);
    let on_disk = std::fs::read(dir.path().join("log").join(&segment_files(dir.path())[0]))
        .expect("read segment");
    assert!(
        on_disk.windows(5).any(|w| w == b"quick"),
        "confirmed before it was handed to the OS"
    );
    store.sync_all().expect("sync");
    assert_eq!(store.stats().fsyncs, 1);
    assert_eq!(store.stats().durable, at.end);
    drop(store);

    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(
        dir.path(),
        1 << 20,
        FsyncPolicy::Interval(Duration::from_millis(10)),
    ));
    let at = store
        .append(b"quick", 0, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(at.end)).expect("durable");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stats().durable < at.end {
        assert!(
            std::time::Instant::now() < deadline,
            "interval flusher never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(store.stats().fsyncs >= 1);
}

#[test]
fn shutdown_syncs_and_refuses_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 1 << 20, FsyncPolicy::Never));
    let at = store
        .append(b"last words", 0, Durability::Requested)
        .expect("append");
    store.shutdown().expect("shutdown");
    assert_eq!(store.stats().durable, at.end);
    assert!(matches!(
        store.append(b"late", 0, Durability::Requested),
        Err(StoreError::Closed)
    ));
    store.shutdown().expect("second shutdown is a no-op");
}

#[test]
fn failed_fsync_poisons_the_store() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg).expect("open");
    let good = store
        .append(b"good", 0, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(good.end)).expect("durable");

    fs.set_fail_sync(true);
    let doomed = store
        .append(b"doomed", 0, Durability::Requested)
        .expect("the write itself succeeds");
    let waited = block_on(store.wait_durable(doomed.end));
    assert!(waited.is_err(), "{waited:?}");
    assert!(store.durable().borrow().is_err());
    assert!(matches!(
        store.append(b"more", 0, Durability::Requested),
        Err(StoreError::Poisoned)
    ));
    assert!(matches!(store.sync_all(), Err(StoreError::Poisoned)));
    // Even if the device recovers, no progress past the failure is ever published.
    fs.set_fail_sync(false);
    std::thread::sleep(Duration::from_millis(20));
    assert!(store.durable().borrow().is_err());
    assert!(store.stats().durable < doomed.end);
    // Reads of what was written keep working.
    assert_eq!(
        &store.read(good.position, good.len).expect("read")[..],
        b"good"
    );
}

#[test]
fn failed_fsync_at_roll_poisons_the_store() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Never);
    let (store, _) = open_sim(&fs, cfg).expect("open");
    store
        .append(&[1; 3000], 0, Durability::Requested)
        .expect("append");
    fs.set_fail_sync(true);
    assert!(matches!(
        store.append(&[2; 3000], 0, Durability::Requested),
        Err(StoreError::Io { .. })
    ));
    assert!(store.durable().borrow().is_err());
    assert!(matches!(
        store.append(b"x", 0, Durability::Requested),
        Err(StoreError::Poisoned)
    ));
}

#[test]
fn lazy_appends_wait_for_a_requested_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig::new(dir.path()), |_, _| {}).expect("open");
    let before = store.stats().fsyncs;
    let mut last = None;
    for _ in 0..50 {
        last = Some(
            store
                .append(b"ack record", 0, Durability::Lazy)
                .expect("append"),
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(store.stats().fsyncs, before, "nobody asked: no fsync");
    let end = last.expect("appended").end;
    store.request_durable(end);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.stats().durable < end {
        assert!(
            std::time::Instant::now() < deadline,
            "requested fsync never happened"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(store.stats().fsyncs > before);
    // A normal append is requested by itself.
    let appended = store
        .append(b"message", 1, Durability::Requested)
        .expect("append");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.stats().durable < appended.end {
        assert!(
            std::time::Instant::now() < deadline,
            "append was not made durable"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Deferred records (acks) cost no write of their own: they go out ahead of the next
/// append, on `flush_deferred`, `sync_all`, at shutdown, or once 256 KiB wait — and a
/// crash before any of those loses them.
#[test]
fn deferred_records_ride_along_with_the_next_write() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Never);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let start = store.stats().written;
    store.append_deferred(vec![7; 10]).expect("deferred");
    assert_eq!(store.stats().written, start, "no write of its own");
    let real = store
        .append(&[1; 20], 1, Durability::Requested)
        .expect("append");
    assert_eq!(
        real.position.0,
        start + 8 + 10,
        "the deferred record went out first"
    );
    store.append_deferred(vec![8; 10]).expect("deferred");
    store.sync_all().expect("sync");
    store
        .append_deferred(vec![9; 10])
        .expect("deferred, never written");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    let payloads: Vec<Vec<u8>> = visited.into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![vec![7; 10], vec![1; 20], vec![8; 10]]);

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open(cfg.clone());
    let start = store.stats().written;
    for i in 0..300 {
        store.append_deferred(payload(i, 1024)).expect("deferred");
    }
    assert!(
        store.stats().written > start,
        "256 KiB waiting are written without being asked"
    );
    store.append_deferred(vec![5; 3]).expect("deferred");
    drop(store);
    let (_store, visited) = open(cfg);
    assert_eq!(
        visited.len(),
        301,
        "shutdown writes what was still deferred"
    );
    assert_eq!(visited[300].1, vec![5; 3]);
}

/// A volatile record (a transient message) may wait in the pending buffer: readable at
/// once, written out by `flush_deferred` (the broker's tick), and lost by a crash before
/// that — which is fine, nothing recovers it.
#[test]
fn volatile_records_are_readable_at_once_and_written_on_the_tick() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let kept = store
        .append(&[3; 40], 1, Durability::Volatile)
        .expect("append");
    store.flush_deferred().expect("tick");
    store.sync_all().expect("sync");
    let lost = store
        .append(&[4; 40], 1, Durability::Volatile)
        .expect("append");
    assert_eq!(
        store.read(lost.position, 40).expect("read").as_ref(),
        &[4; 40]
    );
    let unread = store
        .append(&[5; 40], 1, Durability::Volatile)
        .expect("append");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(visited, vec![(kept.position, vec![3; 40])]);
    assert!(unread.position > lost.position);
}
