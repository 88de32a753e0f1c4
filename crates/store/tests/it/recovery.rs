//! Property test: random appends with `sync_all` at random points, then a simulated crash
//! that damages the log at or after the last synced offset. Reopening must replay exactly
//! a prefix of what was appended (same positions, same payloads) that contains every
//! record synced before the crash, and the log must keep working afterwards.

use std::path::Path;

use holdfast_store::{Appended, Durability, FsyncPolicy, LogPosition, Store, StoreConfig};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEGMENT_SIZE: u64 = 4096;
const MAGIC_LEN: u64 = 8;

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Sync,
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// The file ends at the crash point.
    Truncate,
    /// Everything from the crash point on is random bytes.
    Garbage,
    /// One bit at the crash point is flipped.
    FlipBit,
    /// Everything from the crash point on is zeros, and the file grew (preallocation).
    Zeros,
}

type Visited = Vec<(LogPosition, Vec<u8>)>;

fn open(dir: &Path) -> (Store, Visited) {
    let config = StoreConfig {
        dir: dir.to_path_buf(),
        segment_size: SEGMENT_SIZE,
        fsync: FsyncPolicy::Never,
    };
    let mut visited = Vec::new();
    let store = Store::open(config, |position, payload| {
        visited.push((position, payload.to_vec()));
    })
    .expect("open store");
    (store, visited)
}

fn random_payload(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    bytes
}

/// `(base, path)` of the newest segment.
fn last_segment(dir: &Path) -> (u64, std::path::PathBuf) {
    std::fs::read_dir(dir.join("log"))
        .expect("read log dir")
        .filter_map(|entry| {
            let path = entry.expect("dir entry").path();
            let base = path.file_stem()?.to_str()?.parse::<u64>().ok()?;
            Some((base, path))
        })
        .max()
        .expect("at least one segment")
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            8 => (0usize..3000).prop_map(Op::Append),
            1 => Just(Op::Sync),
        ],
        1..40,
    )
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::Truncate),
        Just(Damage::Garbage),
        Just(Damage::FlipBit),
        Just(Damage::Zeros),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn recovery_replays_a_prefix_containing_everything_synced(
        ops in ops(),
        damage in damage(),
        crash_fraction in 0.0f64..=1.0,
        seed in any::<u64>(),
        more in prop::collection::vec(0usize..3000, 0..5),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, visited) = open(dir.path());
        prop_assert!(visited.is_empty());

        let mut appended: Vec<(Appended, Vec<u8>)> = Vec::new();
        let mut last_synced = MAGIC_LEN;
        for op in &ops {
            match *op {
                Op::Append(len) => {
                    let bytes = random_payload(&mut rng, len);
                    let at = store.append(&bytes, 0, Durability::Requested).expect("append");
                    appended.push((at, bytes));
                }
                Op::Sync => {
                    store.sync_all().expect("sync_all");
                    last_synced = store.stats().written;
                }
            }
        }
        let written = store.stats().written;
        drop(store);

        // Every roll fsyncs the sealed segment, so damage is confined to the newest one.
        let (last_base, path) = last_segment(dir.path());
        let lower = last_synced.max(last_base);
        let crash_at = lower + ((written - lower) as f64 * crash_fraction) as u64;
        let offset = usize::try_from(crash_at - last_base).expect("small file");
        let mut bytes = std::fs::read(&path).expect("read segment");
        let changed = match damage {
            Damage::Truncate => {
                bytes.truncate(offset);
                true
            }
            Damage::Garbage => {
                let extra = rng.random_range(1..200);
                bytes.truncate(offset);
                bytes.extend(random_payload(&mut rng, extra));
                true
            }
            Damage::FlipBit => {
                if offset < bytes.len() {
                    bytes[offset] ^= 1 << rng.random_range(0..8);
                    true
                } else {
                    false
                }
            }
            Damage::Zeros => {
                let extra = rng.random_range(1..4096);
                for byte in &mut bytes[offset..] {
                    *byte = 0;
                }
                bytes.extend(std::iter::repeat_n(0u8, extra));
                true
            }
        };
        std::fs::write(&path, &bytes).expect("damage segment");

        let (store, visited) = open(dir.path());
        let must_keep = appended.iter().filter(|(at, _)| at.end <= crash_at).count();
        prop_assert!(visited.len() <= appended.len());
        prop_assert!(
            visited.len() >= must_keep,
            "lost synced records: visited {} of {}, must keep {}",
            visited.len(), appended.len(), must_keep
        );
        for ((position, payload), (at, expected)) in visited.iter().zip(&appended) {
            prop_assert_eq!(*position, at.position);
            prop_assert_eq!(payload, expected);
        }
        match damage {
            Damage::Truncate | Damage::FlipBit if changed => {
                prop_assert_eq!(visited.len(), must_keep);
            }
            _ => {}
        }
        for (position, payload) in &visited {
            let len = u32::try_from(payload.len()).expect("small payload");
            prop_assert_eq!(&store.read(*position, len).expect("read")[..], &payload[..]);
        }

        // The log keeps working on top of the recovered prefix.
        let mut expected = visited.clone();
        for len in more {
            let bytes = random_payload(&mut rng, len);
            let at = store.append(&bytes, 0, Durability::Requested).expect("append after recovery");
            if let Some((last, _)) = expected.last() {
                prop_assert!(at.position > *last);
            }
            expected.push((at.position, bytes));
        }
        store.sync_all().expect("sync_all");
        drop(store);
        let (_store, visited) = open(dir.path());
        prop_assert_eq!(visited, expected);
    }
}
