//! Commit-log append microbenchmarks (issue 5), on a tempdir (the machine's real disk).
//!
//! * `append/never_1KiB`: [`Store::append`] of a 1 KiB record under
//!   [`FsyncPolicy::Never`]: the pure append cost (CRC, lock, `write` to the page cache).
//!   Records hold no reference and garbage collection is on, so full segments are deleted
//!   and the disk does not fill; a segment roll (every 64 MiB) still fsyncs.
//! * `group_commit/always_1KiB/{1,4}_threads`: under [`FsyncPolicy::Always`], each thread
//!   appends a 1 KiB record and waits until it is durable before appending the next, as a
//!   publisher waiting for its confirm does. Throughput is appends/s over all threads;
//!   appends per fsync (from [`Store::stats`]) is printed once per case — above 1 only
//!   when concurrent appends share an fsync (group commit).
//!
//! Run: `cargo bench -p holdfast-store --bench append`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use holdfast_store::{Durability, FsyncPolicy, Store, StoreConfig};

const RECORD: usize = 1024;

fn open(policy: FsyncPolicy) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.fsync = policy;
    let store = Store::open(config, |_, _| {}).expect("store opens");
    // Enables deletion of segments without live references (all of them here).
    store.collect_garbage();
    (store, dir)
}

fn append_never(c: &mut Criterion) {
    let (store, _dir) = open(FsyncPolicy::Never);
    let payload = vec![0x5Au8; RECORD];
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(RECORD as u64));
    group.bench_function("never_1KiB", |b| {
        b.iter(|| {
            black_box(
                store
                    .append(&payload, 0, Durability::Requested)
                    .expect("append"),
            )
        });
    });
    group.finish();
    store.shutdown().expect("shutdown");
}

/// `iters` appends spread over `threads` threads, each waiting for durability after every
/// append; returns the wall time.
fn durable_appends(store: &Store, threads: u64, iters: u64) -> Duration {
    let payload = vec![0x5Au8; RECORD];
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            // The first `iters % threads` threads take one more.
            let count = iters / threads + u64::from(thread < iters % threads);
            let payload = &payload;
            scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                for _ in 0..count {
                    let appended = store
                        .append(payload, 0, Durability::Requested)
                        .expect("append");
                    runtime
                        .block_on(store.wait_durable(appended.end))
                        .expect("durable");
                }
            });
        }
    });
    started.elapsed()
}

fn group_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_commit/always_1KiB");
    // Each append waits for an fsync (milliseconds): few, flat samples.
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    for threads in [1u64, 4] {
        let (store, _dir) = open(FsyncPolicy::Always);
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| durable_appends(&store, threads, iters));
        });
        let stats = store.stats();
        println!(
            "group_commit/always_1KiB/{threads}_threads: {} appends, {} fsyncs, {:.2} appends per fsync",
            stats.appended_records,
            stats.fsyncs,
            stats.appended_records as f64 / stats.fsyncs.max(1) as f64
        );
        store.shutdown().expect("shutdown");
    }
    group.finish();
}

criterion_group!(benches, append_never, group_commit);
criterion_main!(benches);
