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
use crate::{FsyncPolicy, LogPosition, MAX_RECORD_SIZE, Store, StoreConfig, StoreError};

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
    let first = store.append(b"hello", 1).expect("append");
    let empty = store.append(b"", 0).expect("append");
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
        let at = store.append(&bytes, 0).expect("append");
        appended.push((at, bytes));
    }
    // One record larger than a segment gets a segment to itself.
    let big = payload(99, 10_000);
    let big_at = store.append(&big, 0).expect("append big");
    appended.push((big_at, big));
    let after = store.append(b"after", 0).expect("append after big");
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
    let next = store.append(b"next", 0).expect("append");
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
        store.append(&huge, 0),
        Err(StoreError::RecordTooLarge { .. })
    ));
    assert_eq!(store.stats().appended_records, 0);
}

#[test]
fn corrupted_record_reads_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(StoreConfig::new(dir.path()));
    let at = store.append(b"precious", 0).expect("append");
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
        .map(|index| store.append(&payload(index, 1500), 1).expect("append"))
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
    let next = store.append(b"next", 0).expect("append");
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
        store.append(&payload(index, 1500), 0).expect("append");
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
        .map(|index| store.append(&payload(index, 100), 0).expect("append"))
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
        let next = store.append(b"x", 0).expect("append");
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
    let kept = store.append(b"kept", 0).expect("append");
    drop(store);
    // A crash right after creating the next segment file, before its magic was written.
    let next = dir.path().join("log").join(format!("{:020}.log", kept.end));
    std::fs::write(&next, b"HF").expect("write");
    let (store, visited) = open(cfg.clone());
    assert_eq!(visited, vec![(kept.position, b"kept".to_vec())]);
    assert_eq!(std::fs::read(&next).expect("read"), MAGIC);
    let after = store.append(b"after", 0).expect("append");
    assert_eq!(after.position.0, kept.end + MAGIC_LEN);
    drop(store);
    let (_store, visited) = open(cfg);
    assert_eq!(visited.len(), 2);
}

#[test]
fn never_and_interval_confirm_on_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 1 << 20, FsyncPolicy::Never));
    let at = store.append(b"quick", 0).expect("append");
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
    let at = store.append(b"quick", 0).expect("append");
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
    let at = store.append(b"last words", 0).expect("append");
    store.shutdown().expect("shutdown");
    assert_eq!(store.stats().durable, at.end);
    assert!(matches!(store.append(b"late", 0), Err(StoreError::Closed)));
    store.shutdown().expect("second shutdown is a no-op");
}

#[test]
fn failed_fsync_poisons_the_store() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg).expect("open");
    let good = store.append(b"good", 0).expect("append");
    block_on(store.wait_durable(good.end)).expect("durable");

    fs.set_fail_sync(true);
    let doomed = store
        .append(b"doomed", 0)
        .expect("the write itself succeeds");
    let waited = block_on(store.wait_durable(doomed.end));
    assert!(waited.is_err(), "{waited:?}");
    assert!(store.durable().borrow().is_err());
    assert!(matches!(
        store.append(b"more", 0),
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
    store.append(&[1; 3000], 0).expect("append");
    fs.set_fail_sync(true);
    assert!(matches!(
        store.append(&[2; 3000], 0),
        Err(StoreError::Io { .. })
    ));
    assert!(store.durable().borrow().is_err());
    assert!(matches!(store.append(b"x", 0), Err(StoreError::Poisoned)));
}

#[test]
fn unsynced_segment_creation_is_lost_on_power_loss() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Never);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let synced = store.append(&[1; 100], 0).expect("append");
    store.sync_all().expect("sync");
    store.append(&[2; 100], 0).expect("append, never synced");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(visited, vec![(synced.position, vec![1; 100])]);
}

/// Under `Always` a roll fsyncs only the old segment; the new segment's magic and name
/// become durable with the flusher's next fsync. Lazy appends wake no flusher, so the
/// state between the two is observable: the durable offset stops at the new segment's
/// base, and a power cut there loses the new segment (and nothing before it).
#[test]
fn roll_under_always_leaves_the_new_segment_to_the_flusher() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let first = store.append_lazy(&[1; 3000], 0).expect("append");
    store.sync_all().expect("sync");
    let second = store.append_lazy(&[2; 3000], 0).expect("append that rolls");
    assert_eq!(
        store.stats().segments,
        2,
        "the second record starts a segment"
    );
    let new_base = second.position.0 - MAGIC_LEN;
    assert_eq!(*store.durable().borrow(), Ok(new_base));
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(visited, vec![(first.position, vec![1; 3000])]);
}

/// The flusher's directory fsync after a roll fails: nothing in the new segment is ever
/// confirmed (the store is poisoned instead), and a power cut keeps what was confirmed.
#[test]
fn failed_directory_sync_after_a_roll_confirms_nothing_in_the_new_segment() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let first = store.append(&[1; 3000], 0).expect("append");
    block_on(store.wait_durable(first.end)).expect("durable");
    fs.set_fail_dir_sync(true);
    let second = store.append(&[2; 3000], 0).expect("append that rolls");
    assert!(block_on(store.wait_durable(second.end)).is_err());
    assert!(store.durable().borrow().is_err(), "the store is poisoned");
    assert!(matches!(store.append(b"x", 0), Err(StoreError::Poisoned)));
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(visited, vec![(first.position, vec![1; 3000])]);
}

/// A record confirmed in a segment the flusher has not synced yet survives a power cut:
/// the flusher fsyncs the directory with the new file before it confirms.
#[test]
fn first_confirm_in_a_new_segment_survives_power_loss() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let first = store.append(&[1; 3000], 0).expect("append");
    block_on(store.wait_durable(first.end)).expect("durable");
    let second = store.append(&[2; 3000], 0).expect("append that rolls");
    block_on(store.wait_durable(second.end)).expect("durable");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(
        visited,
        vec![
            (first.position, vec![1; 3000]),
            (second.position, vec![2; 3000])
        ]
    );
}

/// Two rolls before any flusher fsync: the second roll syncs the directory entry of the
/// segment it seals, so a power cut leaves no gap (the sealed segments both survive).
#[test]
fn second_roll_before_a_flusher_sync_makes_the_first_new_segment_durable() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let records: Vec<_> = (1..=3u8)
        .map(|byte| store.append_lazy(&[byte; 3000], 0).expect("append"))
        .collect();
    assert_eq!(store.stats().segments, 3);
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(
        visited,
        vec![
            (records[0].position, vec![1; 3000]),
            (records[1].position, vec![2; 3000]),
        ]
    );
}

/// A dead segment is unlinked only once the log is durable up to what was written when it
/// died (whatever settled its last message may not be on disk yet). With fsyncs failing,
/// the log never gets there: the segment must stay.
#[test]
fn dead_segment_stays_until_the_log_is_durable_past_its_death() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg).expect("open");
    store.collect_garbage();
    let original = store.append(&[1; 3000], 1).expect("append");
    block_on(store.wait_durable(original.end)).expect("durable");
    store.append_lazy(&[2; 3000], 0).expect("append that rolls");
    store.sync_all().expect("sync");
    fs.set_fail_sync(true);
    // The "copy" that replaces the original, then the original's release.
    store.append(&[3; 100], 1).expect("append");
    store.release(original.position);
    assert_eq!(store.stats().segments, 1, "the dead segment left the table");
    store.wait_for_deletions();
    let files = crate::file_layer::FileSystem::list_dir(&fs, Path::new("/sim/log")).expect("list");
    assert_eq!(
        files.len(),
        2,
        "the dead segment's file was deleted: {files:?}"
    );
}

/// Appends from several threads under `Always`, cuts the power at a random moment, and
/// checks that every record whose `wait_durable` returned `Ok` before the cut survives
/// with its position and payload. Repeats on the surviving state.
#[test]
fn confirmed_records_survive_power_loss() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let cfg = config(Path::new("/sim"), 8192, FsyncPolicy::Always);
    let mut fs = SimFileSystem::default();
    // Every record ever confirmed, by position.
    let mut confirmed: BTreeMap<LogPosition, Vec<u8>> = BTreeMap::new();
    let mut total_confirmed = 0;
    for round in 0..25 {
        let (store, visited) = open_sim(&fs, cfg.clone()).expect("reopen after power loss");
        let recovered: BTreeMap<LogPosition, Vec<u8>> = visited.into_iter().collect();
        for (position, bytes) in &confirmed {
            assert_eq!(
                recovered.get(position),
                Some(bytes),
                "round {round}: confirmed record at {position} lost or changed"
            );
        }
        // What was recovered is durable now (open fsyncs it): it must survive too.
        confirmed = recovered;

        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..3)
            .map(|worker| {
                let store = store.clone();
                let stop = Arc::clone(&stop);
                let log = Arc::clone(&log);
                let seed = rng.random::<u64>();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    let mut sequence = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        let len = rng.random_range(0..1500);
                        let bytes = payload(worker * 1_000_000 + sequence, len);
                        sequence += 1;
                        let Ok(at) = store.append(&bytes, 1) else {
                            return;
                        };
                        if runtime.block_on(store.wait_durable(at.end)).is_err() {
                            return;
                        }
                        log.lock().push((at.position, bytes));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        // Snapshot the confirmations first: each was durable before the power went.
        let confirmed_now: Vec<_> = log.lock().clone();
        let survivor = fs.power_loss();
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().expect("worker");
        }
        drop(store);
        total_confirmed += confirmed_now.len();
        confirmed.extend(confirmed_now);
        fs = survivor;
    }
    let (_store, visited) = open_sim(&fs, cfg).expect("final reopen");
    let recovered: BTreeMap<LogPosition, Vec<u8>> = visited.into_iter().collect();
    for (position, bytes) in &confirmed {
        assert_eq!(recovered.get(position), Some(bytes));
    }
    println!("power-loss test: {total_confirmed} confirmed records across 25 cuts");
    assert!(total_confirmed > 0);
}

/// Messages move between segments the way dead-lettering moves them (a copy appended,
/// then the original released) and are finally acked (released) while garbage collection
/// deletes dead segments; the power goes at a random moment. Every message confirmed and
/// not yet acked when the power went must survive in some copy: a segment is never
/// unlinked before the copy that replaced its last message is durable.
#[test]
fn moved_messages_survive_garbage_collection_and_power_loss() {
    fn message(id: u64, len: usize) -> Vec<u8> {
        let mut body = id.to_le_bytes().to_vec();
        body.resize(len.max(8), 0x5a);
        body
    }
    let mut rng = StdRng::seed_from_u64(0x6c0de);
    let cfg = config(Path::new("/sim"), 8192, FsyncPolicy::Always);
    let mut promised_total = 0;
    let mut deleted_segments = 0;
    for round in 0..60 {
        let fs = SimFileSystem::default();
        // Flushes take time, unlinks do not: the window a deletion must not use.
        fs.set_sync_delay(Duration::from_micros(500));
        let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
        store.collect_garbage();
        // Confirmed and not acked. Workers ack (remove, then release) under this lock, and
        // the power is cut under it, so the snapshot is exactly what was promised.
        let live = Arc::new(parking_lot::Mutex::new(BTreeSet::<u64>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..6u64)
            .map(|worker| {
                let store = store.clone();
                let live = Arc::clone(&live);
                let stop = Arc::clone(&stop);
                let seed = rng.random::<u64>();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    let mut next = 0;
                    // This worker's confirmed, unacked messages: (id, position, body).
                    let mut held: Vec<(u64, LogPosition, Vec<u8>)> = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let action = rng.random_range(0..10);
                        if held.len() < 4 || (action < 4 && held.len() < 40) {
                            let id = worker * 1_000_000 + next;
                            next += 1;
                            let body = message(id, rng.random_range(8..1200));
                            let Ok(original) = store.append(&body, 1) else {
                                return;
                            };
                            if runtime.block_on(store.wait_durable(original.end)).is_err() {
                                return;
                            }
                            live.lock().insert(id);
                            held.push((id, original.position, body));
                        } else if action < 8 {
                            // Move: the copy first, then the original goes (not waiting
                            // for the copy's fsync, as dead-lettering does not).
                            let index = rng.random_range(0..held.len());
                            let Ok(copy) = store.append(&held[index].2, 1) else {
                                return;
                            };
                            store.release(held[index].1);
                            held[index].1 = copy.position;
                        } else {
                            let (id, at, _) = held.swap_remove(rng.random_range(0..held.len()));
                            let mut live = live.lock();
                            live.remove(&id);
                            store.release(at);
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_micros(rng.random_range(10_000..60_000)));
        let (promised, survivor) = {
            let live = live.lock();
            (live.clone(), fs.power_loss())
        };
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().expect("worker");
        }
        drop(store);
        let files = crate::file_layer::FileSystem::list_dir(&survivor, Path::new("/sim/log"))
            .expect("list");
        let (_store, visited) = open_sim(&survivor, cfg.clone()).expect("reopen");
        let recovered: BTreeSet<u64> = visited
            .iter()
            .map(|(_, body)| u64::from_le_bytes(body[..8].try_into().expect("id")))
            .collect();
        for id in &promised {
            assert!(
                recovered.contains(id),
                "round {round}: confirmed, unacked message {id} lost"
            );
        }
        promised_total += promised.len();
        // Segment names start at base 0; a missing first one means deletion happened.
        if !files
            .iter()
            .any(|name| name.starts_with("00000000000000000000"))
        {
            deleted_segments += 1;
        }
    }
    println!(
        "moved-messages power-loss test: {promised_total} promised messages checked, \
         {deleted_segments} of 60 rounds had deleted segments"
    );
    assert!(promised_total > 0);
    assert!(deleted_segments > 0, "garbage collection never ran");
}

/// A full disk: the short write is cut back, the caller gets a recoverable error, the
/// store keeps working once space returns, and no torn bytes sit between records.
#[test]
fn failed_write_is_undone_and_the_store_keeps_working() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Always);
    // Too little room to reserve the segment: appends write synchronously, and a full
    // disk surfaces on the write itself.
    fs.set_free_space(Some(10_000));
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let good = store.append(&payload(1, 100), 1).expect("append");
    block_on(store.wait_durable(good.end)).expect("durable");
    let before = store.stats();

    fs.set_free_space(Some(50));
    let refused = store.append(&payload(2, 100), 1);
    let error = refused.expect_err("no room for 108 bytes");
    assert!(matches!(error, StoreError::WriteFailed { .. }), "{error:?}");
    assert!(error.is_out_of_space());
    assert!(store.durable().borrow().is_ok(), "not poisoned");
    assert_eq!(store.stats().written, before.written);

    fs.set_free_space(None);
    let next = store
        .append(&payload(3, 100), 1)
        .expect("append after space returns");
    assert_eq!(
        next.position.0, good.end,
        "lands right after the last good record"
    );
    block_on(store.wait_durable(next.end)).expect("durable");
    drop(store);

    let (_store, visited) = open_sim(&fs, cfg).expect("reopen");
    assert_eq!(
        visited,
        vec![
            (good.position, payload(1, 100)),
            (next.position, payload(3, 100))
        ]
    );
}

/// A segment that cannot be created for lack of space is removed again; appends stay
/// on the old segment's successor once space returns.
#[test]
fn failed_segment_creation_is_undone() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Never);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let first = store.append(&payload(1, 3000), 1).expect("append");
    fs.set_free_space(Some(4));
    let error = store
        .append(&payload(2, 3000), 1)
        .expect_err("no room for the new segment's magic");
    assert!(error.is_out_of_space(), "{error:?}");
    assert!(store.durable().borrow().is_ok(), "not poisoned");
    assert_eq!(store.stats().segments, 1);

    fs.set_free_space(None);
    let second = store.append(&payload(3, 3000), 1).expect("append");
    assert_eq!(
        second.position.0,
        first.end + MAGIC_LEN,
        "rolled at first.end"
    );
    store.sync_all().expect("sync");
    drop(store);
    let (_store, visited) = open_sim(&fs, cfg).expect("reopen");
    assert_eq!(
        visited,
        vec![
            (first.position, payload(1, 3000)),
            (second.position, payload(3, 3000))
        ]
    );
}

#[test]
fn lazy_appends_wait_for_a_requested_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig::new(dir.path()), |_, _| {}).expect("open");
    let before = store.stats().fsyncs;
    let mut last = None;
    for _ in 0..50 {
        last = Some(store.append_lazy(b"ack record", 0).expect("append"));
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
    let appended = store.append(b"message", 1).expect("append");
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
    let real = store.append(&[1; 20], 1).expect("append");
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

/// With the segment's storage reserved, appends that ask for an fsync leave their bytes
/// to the flusher (one write per fsync), a full disk no longer fails them, and a power
/// cut after `wait_durable` keeps every one of them.
#[test]
fn reserved_segment_defers_writes_to_the_flusher_and_survives_power_loss() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    fs.set_free_space(Some(0));
    let mut appended = Vec::new();
    for i in 0..50 {
        appended.push((
            store.append(&payload(i, 500), 1).expect("append"),
            payload(i, 500),
        ));
    }
    let last = appended.last().expect("appended").0;
    assert_eq!(
        store
            .read(appended[7].0.position, 500)
            .expect("readable before any fsync"),
        payload(7, 500)
    );
    block_on(store.wait_durable(last.end)).expect("durable");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    let expected: Vec<(LogPosition, Vec<u8>)> =
        appended.into_iter().map(|(a, p)| (a.position, p)).collect();
    assert_eq!(visited, expected);
}

/// A volatile record (a transient message) may wait in the pending buffer: readable at
/// once, written out by `flush_deferred` (the broker's tick), and lost by a crash before
/// that — which is fine, nothing recovers it.
#[test]
fn volatile_records_are_readable_at_once_and_written_on_the_tick() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let kept = store.append_volatile(&[3; 40], 1).expect("append");
    store.flush_deferred().expect("tick");
    store.sync_all().expect("sync");
    let lost = store.append_volatile(&[4; 40], 1).expect("append");
    assert_eq!(
        store.read(lost.position, 40).expect("read").as_ref(),
        &[4; 40]
    );
    let unread = store.append_volatile(&[5; 40], 1).expect("append");
    let survivor = fs.power_loss();
    drop(store);
    let (_store, visited) = open_sim(&survivor, cfg).expect("reopen");
    assert_eq!(visited, vec![(kept.position, vec![3; 40])]);
    assert!(unread.position > lost.position);
}
