//! A log copied record by record from a running one ([`Store::read_records`], then
//! [`Store::append_replicated`]) is the same log: the same bytes in the same segment
//! files, the same records at open. What does not continue the copy is refused.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::RawRecord;

/// Every segment file of the log in `dir`, by name.
fn log_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("log"))
        .expect("log dir")
        .map(|entry| {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).expect("read segment"))
        })
        .collect()
}

/// Copies what `from` has past `cursor` into `to`, `chunk` bytes per read.
fn copy(from: &Store, to: &Store, cursor: &mut u64, chunk: usize) {
    loop {
        let records = from.read_records(*cursor, chunk).expect("read records");
        let Some(last) = records.last() else {
            return;
        };
        *cursor = last.end();
        for record in &records {
            to.append_replicated(record, 1).expect("replicated append");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Records of any size (some larger than a segment), appended lazily or with an
    /// fsync requested, copied while the leader writes, in reads of any size: the copy
    /// has the leader's segment files byte for byte, although its own segment size is
    /// different, and recovers the same records.
    #[test]
    fn a_log_copied_from_the_tail_is_the_same_log(
        appends in proptest::collection::vec((0usize..10_000, any::<bool>(), 1usize..20_000, 0u8..4), 1..60),
    ) {
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let follower_dir = tempfile::tempdir().expect("tempdir");
        let (leader, _) = open(config(leader_dir.path(), 8192, FsyncPolicy::Always));
        let (follower, _) = open(config(follower_dir.path(), 4096, FsyncPolicy::Always));
        let mut cursor = 0;
        for (index, (len, lazy, chunk, copy_now)) in appends.into_iter().enumerate() {
            let durability = if lazy { Durability::Lazy } else { Durability::Requested };
            leader.append(&payload(index, len), 1, durability).expect("append");
            if copy_now == 0 {
                copy(&leader, &follower, &mut cursor, chunk);
            }
        }
        leader.sync_all().expect("sync");
        copy(&leader, &follower, &mut cursor, 64 * 1024);
        prop_assert_eq!(follower.stats().written, leader.stats().written);
        leader.shutdown().expect("shutdown");
        follower.shutdown().expect("shutdown");
        drop((leader, follower));
        prop_assert_eq!(log_files(follower_dir.path()), log_files(leader_dir.path()));
        let (_, leader_records) = open(config(leader_dir.path(), 8192, FsyncPolicy::Always));
        let (_, follower_records) = open(config(follower_dir.path(), 4096, FsyncPolicy::Always));
        prop_assert_eq!(follower_records, leader_records);
    }
}

/// A record out of order, repeated, corrupted or cut short is refused and leaves the
/// copy as it was; the next right one is taken.
#[test]
fn a_record_that_does_not_continue_the_copy_is_refused() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (leader, _) = open(config(leader_dir.path(), 8192, FsyncPolicy::Always));
    let (follower, _) = open(config(follower_dir.path(), 8192, FsyncPolicy::Always));
    for index in 0..3 {
        leader
            .append(&payload(index, 100), 1, Durability::Lazy)
            .expect("append");
    }
    let records = leader.read_records(0, usize::MAX).expect("read");
    assert_eq!(records.len(), 3);
    let end = || follower.stats().written;
    let empty = end();
    let refused = follower.append_replicated(&records[1], 1);
    assert!(
        matches!(refused, Err(StoreError::OutOfSequence { expected, position }) if expected == empty && position == records[1].position.0),
        "{refused:?}"
    );
    follower.append_replicated(&records[0], 1).expect("first");
    assert!(matches!(
        follower.append_replicated(&records[0], 1),
        Err(StoreError::OutOfSequence { .. })
    ));
    let mut corrupted = records[1].bytes.to_vec();
    corrupted[50] ^= 1;
    let cut_short = records[1].bytes.slice(..60);
    for bad in [
        Bytes::from(corrupted),
        cut_short,
        Bytes::from_static(&[1, 2]),
    ] {
        let record = RawRecord {
            position: records[1].position,
            bytes: bad,
        };
        assert!(matches!(
            follower.append_replicated(&record, 1),
            Err(StoreError::Corrupt { .. })
        ));
    }
    assert_eq!(end(), records[0].end(), "refusals left the copy as it was");
    follower.append_replicated(&records[1], 1).expect("second");
    follower.append_replicated(&records[2], 1).expect("third");
    assert_eq!(end(), leader.stats().written);
}

/// The tail reader does not serve what the log no longer has: a deleted segment, or an
/// offset inside a record.
#[test]
fn reading_records_a_log_no_longer_has_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 4096, FsyncPolicy::Always));
    let first = store
        .append(&payload(0, 3000), 1, Durability::Lazy)
        .expect("append");
    assert!(matches!(
        store.read_records(first.position.0 + 1, 1),
        Err(StoreError::NotFound { .. })
    ));
    store
        .append(&payload(1, 3000), 1, Durability::Lazy)
        .expect("append that rolls");
    store.release(first.position);
    store.collect_garbage();
    store.wait_for_deletions();
    assert!(matches!(
        store.read_records(0, 1),
        Err(StoreError::NotFound { .. })
    ));
    let rest = store.read_records(first.end, usize::MAX).expect("the rest");
    assert_eq!(rest.len(), 1, "the live segment is still served");
}
