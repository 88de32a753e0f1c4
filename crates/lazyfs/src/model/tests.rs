use std::ffi::OsStr;

use super::*;

fn state() -> (tempfile::TempDir, LazyState) {
    let backing = tempfile::tempdir().expect("tempdir");
    let state = LazyState::open(backing.path()).expect("open");
    (backing, state)
}

fn name(text: &str) -> &OsStr {
    OsStr::new(text)
}

fn contents(state: &LazyState, parent: u64, file: &str) -> Option<Vec<u8>> {
    let inode = state.lookup(parent, name(file)).ok()?.inode;
    Some(state.read(inode, 0, u32::MAX).expect("read").to_vec())
}

#[test]
fn unsynced_writes_and_names_are_lost_and_synced_ones_kept() {
    let (backing, mut state) = state();
    let dir = state
        .create_directory(ROOT, name("d"))
        .expect("mkdir")
        .inode;
    let file = state.create_file(dir, name("f")).expect("create").inode;
    state.write(file, 0, b"hello").expect("write");
    assert_eq!(contents(&state, dir, "f").as_deref(), Some(&b"hello"[..]));
    assert_eq!(state.pending_bytes(), 5);
    // Data fsynced, but neither name is durable: all gone.
    state.fsync(file).expect("fsync");
    state.crash().expect("crash");
    assert_eq!(state.lookup(ROOT, name("d")), Err(Errno::ENOENT));
    assert!(backing.path().read_dir().expect("ls").next().is_none());

    let dir = state
        .create_directory(ROOT, name("d"))
        .expect("mkdir")
        .inode;
    let file = state.create_file(dir, name("f")).expect("create").inode;
    state.write(file, 0, b"hello").expect("write");
    state.fsync(file).expect("fsync");
    state.fsync(dir).expect("fsync dir");
    state.fsync(ROOT).expect("fsync root");
    state.write(file, 5, b" world").expect("write");
    assert_eq!(state.pending_bytes(), 6);
    state.crash().expect("crash");
    let dir = state.lookup(ROOT, name("d")).expect("durable dir").inode;
    assert_eq!(contents(&state, dir, "f").as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        fs::read(backing.path().join("d/f")).expect("backing"),
        b"hello"
    );
    let stats = state.stats();
    assert_eq!(stats.crashes, 2);
    assert_eq!(stats.dropped_bytes, 6, "only dirty bytes count");
    assert_eq!(stats.dropped_entries, 2);
}

#[test]
fn handles_from_before_a_crash_are_stale() {
    let (_backing, mut state) = state();
    let file = state.create_file(ROOT, name("f")).expect("create").inode;
    state.fsync(ROOT).expect("fsync root");
    state.crash().expect("crash");
    assert_eq!(state.write(file, 0, b"x"), Err(Errno::ESTALE));
    assert_ne!(state.lookup(ROOT, name("f")).expect("kept").inode, file);
}

#[test]
fn rename_over_is_atomic_only_after_the_directory_fsync() {
    let (backing, mut state) = state();
    let old = state.create_file(ROOT, name("defs")).expect("create").inode;
    state.write(old, 0, b"old").expect("write");
    state.fsync(old).expect("fsync");
    state.fsync(ROOT).expect("fsync root");

    let tmp = state
        .create_file(ROOT, name("defs.tmp"))
        .expect("create")
        .inode;
    state.write(tmp, 0, b"new!").expect("write");
    state.fsync(tmp).expect("fsync");
    state
        .rename(ROOT, name("defs.tmp"), ROOT, name("defs"), false)
        .expect("rename");
    assert_eq!(
        contents(&state, ROOT, "defs").as_deref(),
        Some(&b"new!"[..])
    );
    assert_eq!(state.pending_entries(), 1);
    state.crash().expect("crash");
    assert_eq!(contents(&state, ROOT, "defs").as_deref(), Some(&b"old"[..]));
    assert_eq!(state.lookup(ROOT, name("defs.tmp")), Err(Errno::ENOENT));

    let tmp = state
        .create_file(ROOT, name("defs.tmp"))
        .expect("create")
        .inode;
    state.write(tmp, 0, b"new!").expect("write");
    state.fsync(tmp).expect("fsync");
    state
        .rename(ROOT, name("defs.tmp"), ROOT, name("defs"), false)
        .expect("rename");
    state.fsync(ROOT).expect("fsync root");
    assert_eq!(
        fs::read(backing.path().join("defs")).expect("read"),
        b"new!"
    );
    assert!(!backing.path().join("defs.tmp").exists());
    state.crash().expect("crash");
    assert_eq!(
        contents(&state, ROOT, "defs").as_deref(),
        Some(&b"new!"[..])
    );
}

#[test]
fn a_renamed_file_keeps_only_its_synced_bytes_under_the_new_name() {
    let (_backing, mut state) = state();
    let file = state.create_file(ROOT, name("a")).expect("create").inode;
    state.write(file, 0, b"synced").expect("write");
    state.fsync(file).expect("fsync");
    state.write(file, 6, b"+dirty").expect("write");
    state
        .rename(ROOT, name("a"), ROOT, name("b"), false)
        .expect("rename");
    state.fsync(ROOT).expect("fsync root");
    state.crash().expect("crash");
    assert_eq!(contents(&state, ROOT, "b").as_deref(), Some(&b"synced"[..]));
    assert_eq!(state.lookup(ROOT, name("a")), Err(Errno::ENOENT));
}

#[test]
fn truncate_then_extend_is_zeros_once_synced_and_old_bytes_if_not() {
    let (_backing, mut state) = state();
    let file = state.create_file(ROOT, name("f")).expect("create").inode;
    state.fsync(ROOT).expect("fsync root");
    state.write(file, 0, b"abcdefgh").expect("write");
    state.fsync(file).expect("fsync");
    state.set_len(file, 2).expect("truncate");
    state.set_len(file, 6).expect("extend");
    state.write(file, 6, b"XY").expect("write");
    assert_eq!(
        contents(&state, ROOT, "f").as_deref(),
        Some(&b"ab\0\0\0\0XY"[..])
    );
    state.crash().expect("crash");
    assert_eq!(
        contents(&state, ROOT, "f").as_deref(),
        Some(&b"abcdefgh"[..])
    );
    let file = state.lookup(ROOT, name("f")).expect("f").inode;
    state.set_len(file, 2).expect("truncate");
    state.set_len(file, 6).expect("extend");
    state.fsync(file).expect("fsync");
    state.crash().expect("crash");
    assert_eq!(
        contents(&state, ROOT, "f").as_deref(),
        Some(&b"ab\0\0\0\0"[..])
    );
}

#[test]
fn failed_fsyncs_make_nothing_durable_until_healed() {
    let (_backing, mut state) = state();
    let file = state.create_file(ROOT, name("f")).expect("create").inode;
    state.fsync(ROOT).expect("fsync root");
    state.write(file, 0, b"data").expect("write");
    state.set_fail_fsync(true);
    assert_eq!(state.fsync(file), Err(Errno::EIO));
    assert_eq!(state.fsync(ROOT), Err(Errno::EIO));
    assert_eq!(state.stats().failed_fsyncs, 2);
    state.crash().expect("crash");
    assert_eq!(contents(&state, ROOT, "f").as_deref(), Some(&b""[..]));
    state.set_fail_fsync(false);
    let file = state.lookup(ROOT, name("f")).expect("f").inode;
    state.write(file, 0, b"data").expect("write");
    state.fsync(file).expect("fsync");
    state.crash().expect("crash");
    assert_eq!(contents(&state, ROOT, "f").as_deref(), Some(&b"data"[..]));
}

#[test]
fn unlink_is_undone_by_a_crash_before_the_directory_fsync() {
    let (backing, mut state) = state();
    let file = state.create_file(ROOT, name("f")).expect("create").inode;
    state.write(file, 0, b"x").expect("write");
    state.fsync(file).expect("fsync");
    state.fsync(ROOT).expect("fsync root");
    state.unlink(ROOT, name("f")).expect("unlink");
    state.crash().expect("crash");
    assert_eq!(contents(&state, ROOT, "f").as_deref(), Some(&b"x"[..]));
    state.unlink(ROOT, name("f")).expect("unlink");
    state.fsync(ROOT).expect("fsync root");
    assert!(!backing.path().join("f").exists());
    state.crash().expect("crash");
    assert_eq!(state.lookup(ROOT, name("f")), Err(Errno::ENOENT));
}

#[test]
fn dirty_ranges_merge() {
    let mut file = FileNode::new(Vec::new());
    file.mark_dirty(10, 20);
    file.mark_dirty(30, 40);
    file.mark_dirty(0, 5);
    assert_eq!(file.dirty, vec![(0, 5), (10, 20), (30, 40)]);
    file.mark_dirty(20, 30);
    assert_eq!(file.dirty, vec![(0, 5), (10, 40)]);
    file.mark_dirty(4, 11);
    assert_eq!(file.dirty, vec![(0, 40)]);
}

#[test]
fn the_control_name_is_reserved_and_directories_cannot_move_into_themselves() {
    let (_backing, mut state) = state();
    assert_eq!(
        state.create_file(ROOT, name(CONTROL_NAME)).map(|a| a.inode),
        Err(Errno::EEXIST)
    );
    let a = state
        .create_directory(ROOT, name("a"))
        .expect("mkdir")
        .inode;
    state.create_directory(a, name("b")).expect("mkdir");
    let b = state.lookup(a, name("b")).expect("b").inode;
    assert_eq!(
        state.rename(ROOT, name("a"), b, name("a"), false),
        Err(Errno::EINVAL)
    );
}

/// A torn crash keeps the synced bytes and a random subset of the unsynced pages: each
/// page after the synced prefix is either exactly what was written or absent (a hole of
/// zeros below the new end), and across seeds both happen.
#[test]
fn a_torn_crash_keeps_a_random_subset_of_unsynced_pages() {
    const PAGE: usize = 4096;
    let written: Vec<u8> = (0..8 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
    let (mut kept_pages, mut lost_pages) = (0, 0);
    for seed in 1..=16u64 {
        let (_backing, mut state) = state();
        let file = state.create_file(ROOT, name("f")).expect("create").inode;
        state.write(file, 0, &written[..PAGE]).expect("write");
        state.fsync(file).expect("fsync");
        state.fsync(ROOT).expect("fsync root");
        state
            .write(file, PAGE as u64, &written[PAGE..])
            .expect("write");
        state.crash_torn(seed).expect("torn crash");
        let after = contents(&state, ROOT, "f").expect("durable file");
        assert_eq!(&after[..PAGE], &written[..PAGE], "synced bytes survive");
        assert_eq!(after.len() % PAGE, 0);
        for page in 1..8 {
            let range = page * PAGE..(page + 1) * PAGE;
            match after.get(range.clone()) {
                Some(bytes) if bytes == &written[range.clone()] => kept_pages += 1,
                Some(bytes) => {
                    assert!(bytes.iter().all(|b| *b == 0), "a page is whole or a hole");
                    lost_pages += 1;
                }
                None => lost_pages += 1,
            }
        }
    }
    assert!(
        kept_pages > 0 && lost_pages > 0,
        "{kept_pages} kept, {lost_pages} lost"
    );
}
