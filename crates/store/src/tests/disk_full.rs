//! A full disk: refused writes are cut back, the store keeps working, and reserved
//! segments keep their promise.

use super::*;

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
    let good = store
        .append(&payload(1, 100), 1, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(good.end)).expect("durable");
    let before = store.stats();

    fs.set_free_space(Some(50));
    let refused = store.append(&payload(2, 100), 1, Durability::Requested);
    let error = refused.expect_err("no room for 108 bytes");
    assert!(matches!(error, StoreError::WriteFailed { .. }), "{error:?}");
    assert!(error.is_out_of_space());
    assert!(store.durable().borrow().is_ok(), "not poisoned");
    assert_eq!(store.stats().written, before.written);

    fs.set_free_space(None);
    let next = store
        .append(&payload(3, 100), 1, Durability::Requested)
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
    let first = store
        .append(&payload(1, 3000), 1, Durability::Requested)
        .expect("append");
    fs.set_free_space(Some(4));
    let error = store
        .append(&payload(2, 3000), 1, Durability::Requested)
        .expect_err("no room for the new segment's magic");
    assert!(error.is_out_of_space(), "{error:?}");
    assert!(store.durable().borrow().is_ok(), "not poisoned");
    assert_eq!(store.stats().segments, 1);

    fs.set_free_space(None);
    let second = store
        .append(&payload(3, 3000), 1, Durability::Requested)
        .expect("append");
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
            store
                .append(&payload(i, 500), 1, Durability::Requested)
                .expect("append"),
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

/// A write cut back after a failure truncates the segment, and truncation frees the
/// storage reserved beyond the new end. The store must not go on believing it reserved:
/// a later deferred write would then meet a full disk in the flusher and poison the
/// node, where it should have been refused as one append.
#[test]
fn a_cut_back_write_does_not_leave_a_reservation_believed_that_is_gone() {
    let fs = SimFileSystem::default();
    let cfg = config(Path::new("/sim"), 1 << 20, FsyncPolicy::Always);
    let (store, _) = open_sim(&fs, cfg.clone()).expect("open");
    let good = store
        .append(&payload(1, 100), 1, Durability::Requested)
        .expect("append");
    block_on(store.wait_durable(good.end)).expect("durable");

    // The disk is full (the segment's reservation still holds); one write fails and is
    // cut back, which frees the reservation; the freed space goes to someone else.
    fs.set_free_space(Some(0));
    fs.set_fail_writes(true);
    let failed = store.append(&payload(2, 100), 1, Durability::Lazy);
    assert!(failed.is_err(), "the write failed");
    fs.set_fail_writes(false);
    fs.set_free_space(Some(0));
    assert!(
        store.durable().borrow().is_ok(),
        "a refused write poisons nothing"
    );

    // The next append is refused on its own, or taken and made durable; never poison.
    match store.append(&payload(3, 100), 1, Durability::Requested) {
        Ok(appended) => {
            block_on(store.wait_durable(appended.end))
                .expect("an append the store took becomes durable");
        }
        Err(error) => assert!(error.is_out_of_space(), "{error:?}"),
    }
    assert!(
        store.durable().borrow().is_ok(),
        "the store was poisoned by a write it believed reserved"
    );

    fs.set_free_space(None);
    let after = store
        .append(&payload(4, 100), 1, Durability::Requested)
        .expect("space is back");
    block_on(store.wait_durable(after.end)).expect("durable");
}
