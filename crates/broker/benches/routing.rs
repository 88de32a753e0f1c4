//! Topic routing microbenchmarks (issue 5): one routing-key lookup in a [`TopicTrie`]
//! holding 10, 1,000 or 100,000 bindings with a mix of exact, `*` and `#` patterns.
//!
//! The trie is what a topic exchange routes with (`crates/broker/src/topic.rs`); it is
//! re-exported from the crate root only so that this benchmark can reach it.
//!
//! Run: `cargo bench -p holdfast-broker --bench routing`.

use std::collections::HashSet;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use holdfast_broker::TopicTrie;

/// Three-word keys `region.service.event` over these vocabularies (5 M distinct keys).
const REGIONS: u64 = 100;
const SERVICES: u64 = 1_000;
const EVENTS: u64 = 50;
/// Routing keys cycled through per size, so the lookup is not one cached path.
const KEYS: usize = 4_096;

/// A small deterministic generator (xorshift64*), so every run routes the same keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn words(&mut self) -> (String, String, String) {
        (
            format!("r{}", self.below(REGIONS)),
            format!("s{}", self.below(SERVICES)),
            format!("e{}", self.below(EVENTS)),
        )
    }
}

/// `count` bindings: 60% exact `r.s.e`, 15% `r.*.e`, 10% `r.s.#`, 10% `*.s.*`, 5% `#.e`.
/// Each binding has its own destination (as if each were a different queue).
fn trie(count: usize, rng: &mut Rng) -> TopicTrie<u32> {
    let mut trie = TopicTrie::default();
    for destination in 0..count {
        let (region, service, event) = rng.words();
        let pattern = match rng.below(100) {
            0..60 => format!("{region}.{service}.{event}"),
            60..75 => format!("{region}.*.{event}"),
            75..85 => format!("{region}.{service}.#"),
            85..95 => format!("*.{service}.*"),
            _ => format!("#.{event}"),
        };
        trie.insert(&pattern, u32::try_from(destination).expect("fits"));
    }
    trie
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_route");
    group.throughput(Throughput::Elements(1));
    for bindings in [10usize, 1_000, 100_000] {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ bindings as u64);
        let trie = trie(bindings, &mut rng);
        let keys: Vec<String> = (0..KEYS)
            .map(|_| {
                let (region, service, event) = rng.words();
                format!("{region}.{service}.{event}")
            })
            .collect();
        let mut out = HashSet::new();
        let matched: usize = keys
            .iter()
            .map(|key| {
                out.clear();
                trie.route(key, &mut out);
                out.len()
            })
            .sum();
        println!(
            "topic_route/{bindings}: {:.2} destinations matched per key on average",
            matched as f64 / KEYS as f64
        );
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(bindings), &trie, |b, trie| {
            b.iter(|| {
                out.clear();
                trie.route(&keys[next % KEYS], &mut out);
                next = next.wrapping_add(1);
                black_box(out.len())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
