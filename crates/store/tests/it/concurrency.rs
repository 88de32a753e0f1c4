//! Group commit: concurrent appenders under `FsyncPolicy::Always` share fsyncs.

use std::time::Instant;

use holdfast_store::{Durability, FsyncPolicy, Store, StoreConfig};

const THREADS: usize = 4;
const APPENDS_PER_THREAD: usize = 250;

#[test]
fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        dir: dir.path().to_path_buf(),
        segment_size: 256 * 1024,
        fsync: FsyncPolicy::Always,
    };
    let store = Store::open(config.clone(), |_, _| {}).expect("open");
    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let store = store.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                (0..APPENDS_PER_THREAD)
                    .map(|index| {
                        let payload = format!("thread {thread} record {index}").repeat(4);
                        let at = store
                            .append(payload.as_bytes(), 1, Durability::Requested)
                            .expect("append");
                        runtime
                            .block_on(store.wait_durable(at.end))
                            .expect("durable");
                        (at, payload)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.join().expect("worker thread"));
    }
    let elapsed = started.elapsed();
    let stats = store.stats();
    let appends = THREADS * APPENDS_PER_THREAD;
    println!(
        "group commit: {appends} appends, {} fsyncs, {:.2} appends per fsync, {elapsed:?}",
        stats.fsyncs,
        appends as f64 / stats.fsyncs as f64
    );
    assert_eq!(stats.appended_records, appends as u64);
    assert!(
        (stats.fsyncs as usize) < appends,
        "no group commit: {} fsyncs for {appends} appends",
        stats.fsyncs
    );
    for (at, payload) in &all {
        assert_eq!(
            &store.read(at.position, at.len).expect("read")[..],
            payload.as_bytes()
        );
    }
    drop(store);

    let mut recovered = Vec::new();
    let _store = Store::open(config, |position, payload| {
        recovered.push((position, payload.to_vec()));
    })
    .expect("reopen");
    all.sort_by_key(|(at, _)| at.position);
    let expected: Vec<_> = all
        .iter()
        .map(|(at, payload)| (at.position, payload.as_bytes().to_vec()))
        .collect();
    assert_eq!(recovered, expected);
}
