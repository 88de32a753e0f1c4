//! Power cuts: what survives when every unsynced byte is dropped, across rolls and
//! garbage collection.

use super::*;

#[test]
fn unsynced_segment_creation_is_lost_on_power_loss() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 4096, FsyncPolicy::Never);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let synced = store
        .append(&[1; 100], 0, Durability::Requested)
        .expect("append");
    store.sync_all().expect("sync");
    store
        .append(&[2; 100], 0, Durability::Requested)
        .expect("append, never synced");
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
    let first = store
        .append(&[1; 3000], 0, Durability::Lazy)
        .expect("append");
    store.sync_all().expect("sync");
    let second = store
        .append(&[2; 3000], 0, Durability::Lazy)
        .expect("append that rolls");
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
    let first = store
        .append(&[1; 3000], 0, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(first.end)).expect("durable");
    fs.set_fail_dir_sync(true);
    let second = store
        .append(&[2; 3000], 0, Durability::Requested)
        .expect("append that rolls");
    assert!(block_on(store.wait_durable(second.end)).is_err());
    assert!(store.durable().borrow().is_err(), "the store is poisoned");
    assert!(matches!(
        store.append(b"x", 0, Durability::Requested),
        Err(StoreError::Poisoned)
    ));
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
    let first = store
        .append(&[1; 3000], 0, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(first.end)).expect("durable");
    let second = store
        .append(&[2; 3000], 0, Durability::Requested)
        .expect("append that rolls");
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
        .map(|byte| {
            store
                .append(&[byte; 3000], 0, Durability::Lazy)
                .expect("append")
        })
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
    let original = store
        .append(&[1; 3000], 1, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(original.end)).expect("durable");
    store
        .append(&[2; 3000], 0, Durability::Lazy)
        .expect("append that rolls");
    store.sync_all().expect("sync");
    fs.set_fail_sync(true);
    // The "copy" that replaces the original, then the original's release.
    store
        .append(&[3; 100], 1, Durability::Requested)
        .expect("append");
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
    let torn = power_cuts_under_load(false, 25);
    assert_eq!(torn, 0, "a clean cut leaves nothing torn");
}

/// The same with torn write-back: at each cut a random subset of the unsynced pages
/// reached the disk, with holes. Torn tails are cut by the CRC and never served, nothing
/// confirmed is lost, and the mode must prove that it tears.
#[test]
fn confirmed_records_survive_torn_power_loss() {
    let torn = power_cuts_under_load(true, 60);
    assert!(torn > 0, "no cut left a torn tail for recovery to cut");
}

/// Starts `count` threads, each repeating the step `make(worker)` gives it (with its own
/// seeded RNG and a runtime to wait for durability in) until `stop` is set or the step
/// returns false (the store failed, as it does once the power is gone).
fn spawn_workers<Step>(
    count: u64,
    rng: &mut StdRng,
    stop: &Arc<AtomicBool>,
    make: impl Fn(u64) -> Step,
) -> Vec<std::thread::JoinHandle<()>>
where
    Step: FnMut(&mut StdRng, &tokio::runtime::Runtime) -> bool + Send + 'static,
{
    (0..count)
        .map(|worker| {
            let mut step = make(worker);
            let stop = Arc::clone(stop);
            let seed = rng.random::<u64>();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                while !stop.load(Ordering::SeqCst) && step(&mut rng, &runtime) {}
            })
        })
        .collect()
}

/// Cuts the power `rounds` times under load; returns how many reopenings cut a torn
/// tail.
fn power_cuts_under_load(torn_writeback: bool, rounds: usize) -> usize {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let cfg = config(Path::new("/sim"), 8192, FsyncPolicy::Always);
    let mut fs = SimFileSystem::default();
    // Every record ever confirmed, by position.
    let mut confirmed: BTreeMap<LogPosition, Vec<u8>> = BTreeMap::new();
    let mut total_confirmed = 0;
    let mut torn_rounds = 0;
    let mut torn_bytes = 0;
    // In torn mode, keep cutting (up to four times as long) until a cut has torn.
    let mut round = 0;
    while round < rounds || (torn_writeback && torn_rounds == 0 && round < 4 * rounds) {
        round += 1;
        let (store, visited) = open_sim(&fs, cfg.clone()).expect("reopen after power loss");
        if torn_writeback {
            // Slow flushes and lazy appends keep unsynced pages around for a cut to tear.
            fs.set_sync_delay(Duration::from_millis(1));
        }
        let cut = store.stats().torn_bytes_cut_at_open;
        if cut > 0 {
            torn_rounds += 1;
            torn_bytes += cut;
        }
        let recovered: BTreeMap<LogPosition, Vec<u8>> = visited.into_iter().collect();
        // Nothing that was never written is served: every recovered record is one that
        // some worker appended (payloads are self-describing).
        for (position, bytes) in &recovered {
            if let Some(expected) = confirmed.get(position) {
                assert_eq!(
                    bytes, expected,
                    "round {round}: record at {position} changed"
                );
            }
        }
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
        let workers = spawn_workers(3, &mut rng, &stop, |worker| {
            let store = store.clone();
            let log = Arc::clone(&log);
            let mut sequence = 0usize;
            move |rng: &mut StdRng, runtime: &tokio::runtime::Runtime| {
                let len = rng.random_range(0..1500);
                let bytes = payload(worker as usize * 1_000_000 + sequence, len);
                sequence += 1;
                if torn_writeback && sequence.is_multiple_of(3) {
                    // Written at once, fsynced with the next flush; never confirmed.
                    return store.append(&bytes, 1, Durability::Lazy).is_ok();
                }
                let Ok(at) = store.append(&bytes, 1, Durability::Requested) else {
                    return false;
                };
                if runtime.block_on(store.wait_durable(at.end)).is_err() {
                    return false;
                }
                log.lock().push((at.position, bytes));
                true
            }
        });
        std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        // Snapshot the confirmations first: each was durable before the power went.
        let confirmed_now: Vec<_> = log.lock().clone();
        let survivor = if torn_writeback {
            fs.power_loss_torn(&mut rng)
        } else {
            fs.power_loss()
        };
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().expect("worker");
        }
        drop(store);
        total_confirmed += confirmed_now.len();
        confirmed.extend(confirmed_now);
        fs = survivor;
    }
    let (store, visited) = open_sim(&fs, cfg).expect("final reopen");
    let recovered: BTreeMap<LogPosition, Vec<u8>> = visited.into_iter().collect();
    for (position, bytes) in &confirmed {
        assert_eq!(recovered.get(position), Some(bytes));
    }
    if store.stats().torn_bytes_cut_at_open > 0 {
        torn_rounds += 1;
        torn_bytes += store.stats().torn_bytes_cut_at_open;
    }
    println!(
        "power-loss test (torn write-back: {torn_writeback}): {total_confirmed} confirmed \
         records across {round} cuts, 0 lost; {torn_rounds} reopenings cut a torn tail \
         ({torn_bytes} bytes)"
    );
    assert!(total_confirmed > 0);
    torn_rounds
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
        let workers = spawn_workers(6, &mut rng, &stop, |worker| {
            let store = store.clone();
            let live = Arc::clone(&live);
            let mut next = 0;
            // This worker's confirmed, unacked messages: (id, position, body).
            let mut held: Vec<(u64, LogPosition, Vec<u8>)> = Vec::new();
            move |rng: &mut StdRng, runtime: &tokio::runtime::Runtime| {
                let action = rng.random_range(0..10);
                if held.len() < 4 || (action < 4 && held.len() < 40) {
                    let id = worker * 1_000_000 + next;
                    next += 1;
                    let body = message(id, rng.random_range(8..1200));
                    let Ok(original) = store.append(&body, 1, Durability::Requested) else {
                        return false;
                    };
                    if runtime.block_on(store.wait_durable(original.end)).is_err() {
                        return false;
                    }
                    live.lock().insert(id);
                    held.push((id, original.position, body));
                } else if action < 8 {
                    // Move: the copy first, then the original goes (not waiting for the
                    // copy's fsync, as dead-lettering does not).
                    let index = rng.random_range(0..held.len());
                    let Ok(copy) = store.append(&held[index].2, 1, Durability::Requested) else {
                        return false;
                    };
                    store.release(held[index].1);
                    held[index].1 = copy.position;
                } else {
                    let (id, at, _) = held.swap_remove(rng.random_range(0..held.len()));
                    let mut live = live.lock();
                    live.remove(&id);
                    store.release(at);
                }
                true
            }
        });
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
