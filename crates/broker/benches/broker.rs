//! The broker core end to end without sockets (issue 5): `Broker::open` on a tempdir with
//! `fsync = never`, one connection with a no-op outbound sink, one durable queue, then
//! `basic_publish` → `basic_get` → `read_message` → `basic_settle(ack)` per message. The
//! only I/O is the commit log (page cache; no fsync). This also exercises the queue index
//! (`Queue::push`/`pop`/`requeue` on its `VecDeque`, which is not public) at 1 M entries.
//!
//! * `e2e/persistent_1KiB`, `e2e/transient_16B`: one message through an empty queue.
//! * `backlog_1M/publish_get_ack`: the same with 1,000,000 messages already ready, so
//!   each iteration pushes at the back and pops at the front of a 1 M-entry index.
//! * `backlog_1M/get_requeue`: take the head and give it back (`Disposition::Requeue`,
//!   which reinserts at its log position, here the front) with 1 M ready behind it.
//!
//! Under `cargo test` (criterion's test mode, each benchmark run once) the backlog is
//! 10,000 messages, so the CI test command stays fast.
//!
//! Run: `cargo bench -p holdfast-broker --bench broker`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use holdfast_broker::{
    Broker, BrokerConfig, ChannelKey, ConnectionId, Disposition, PublishRequest, QueueDeclare,
};
use holdfast_store::{DEFAULT_SEGMENT_SIZE, FsyncPolicy, StoreConfig};

/// Raw basic properties with no field set.
const NO_PROPERTIES: &[u8] = &[0, 0];

/// Whether criterion runs in test mode (`cargo test`, or `cargo bench -- --test`).
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

struct Fixture {
    // Dropped after the broker (fields drop in order).
    broker: Arc<Broker>,
    connection: ConnectionId,
    key: ChannelKey,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = Broker::open(BrokerConfig::new(StoreConfig {
            dir: dir.path().to_owned(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            fsync: FsyncPolicy::Never,
        }))
        .expect("broker opens");
        let connection = broker
            .connect("/", Box::new(|_| true))
            .expect("vhost / exists");
        let key = ChannelKey {
            connection,
            channel: 1,
        };
        broker.channel_open(key);
        broker
            .queue_declare(
                connection,
                QueueDeclare {
                    name: "q".to_owned(),
                    durable: true,
                    ..QueueDeclare::default()
                },
            )
            .expect("declare");
        Fixture {
            broker,
            connection,
            key,
            _dir: dir,
        }
    }

    fn publish(&self, request: &PublishRequest) {
        let outcome = self
            .broker
            .basic_publish(self.connection, request)
            .expect("publish");
        assert!(outcome.routed);
    }

    /// `basic.get` + read the body as the writer would, then settle it.
    fn get_settle(&self, disposition: Disposition) {
        let got = self
            .broker
            .basic_get(self.key, "q", false)
            .expect("get")
            .expect("a message is ready");
        let stored = self.broker.read_message(got.message).expect("readable");
        black_box(stored.body);
        self.broker
            .basic_settle(self.key, got.delivery_tag, false, disposition)
            .expect("settle");
    }
}

fn request(persistent: bool, size: usize) -> PublishRequest {
    PublishRequest {
        exchange: String::new(),
        routing_key: "q".to_owned(),
        persistent,
        headers: None,
        properties: Bytes::from_static(NO_PROPERTIES),
        body: Bytes::from(vec![0xA5u8; size]),
        expiration: None,
        dedup_key: None,
    }
}

fn e2e(c: &mut Criterion) {
    let mut group = c.benchmark_group("e2e");
    group.throughput(Throughput::Elements(1));
    for (name, persistent, size) in [
        ("persistent_1KiB", true, 1024),
        ("transient_16B", false, 16),
    ] {
        let fixture = Fixture::new();
        let request = request(persistent, size);
        group.bench_function(name, |b| {
            b.iter(|| {
                fixture.publish(&request);
                fixture.get_settle(Disposition::Ack);
            });
        });
    }
    group.finish();
}

fn backlog(c: &mut Criterion) {
    let backlog = if test_mode() { 10_000 } else { 1_000_000 };
    let fixture = Fixture::new();
    let filler = request(true, 16);
    let started = std::time::Instant::now();
    for _ in 0..backlog {
        fixture.publish(&filler);
    }
    println!(
        "backlog: {backlog} persistent 16 B messages published in {:.2?}",
        started.elapsed()
    );
    let request = request(true, 1024);
    let mut group = c.benchmark_group("backlog_1M");
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish_get_ack", |b| {
        b.iter(|| {
            fixture.publish(&request);
            fixture.get_settle(Disposition::Ack);
        });
    });
    group.bench_function("get_requeue", |b| {
        b.iter(|| fixture.get_settle(Disposition::Requeue));
    });
    group.finish();
    let (ready, _) = fixture.broker.queue_counts("/", "q").expect("queue exists");
    assert_eq!(u64::from(ready), backlog, "the backlog stayed in place");
}

criterion_group!(benches, e2e, backlog);
criterion_main!(benches);
