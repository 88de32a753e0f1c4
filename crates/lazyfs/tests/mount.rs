//! The real FUSE mount, driven through std::fs like the store drives it: the binary in a
//! child process, and the in-process [`Mounted`].

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use holdfast_lazyfs::{Command, Mounted, is_mounted, send, status};

/// The binary, mounted; unmounted and reaped on drop.
struct BinaryMount {
    child: Child,
    mountpoint: PathBuf,
    _dirs: [tempfile::TempDir; 2],
}

impl BinaryMount {
    fn start() -> BinaryMount {
        let backing = tempfile::tempdir().expect("backing");
        let mountpoint = tempfile::tempdir().expect("mountpoint");
        let mut child = Process::new(env!("CARGO_BIN_EXE_holdfast-lazyfs"))
            .arg(backing.path())
            .arg(mountpoint.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("holdfast-lazyfs starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        assert!(line.contains("mounted"), "unexpected first line {line:?}");
        BinaryMount {
            child,
            mountpoint: mountpoint.path().to_owned(),
            _dirs: [backing, mountpoint],
        }
    }
}

impl Drop for BinaryMount {
    fn drop(&mut self) {
        if Process::new("umount")
            .arg(&self.mountpoint)
            .status()
            .map_or(true, |status| !status.success())
        {
            let _ = Process::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
}

/// What the store does, checked against what a power loss leaves.
fn exercise(root: &Path) {
    let data = root.join("data");
    fs::create_dir(&data).expect("mkdir");
    sync_dir(root);
    let log = data.join("log");
    fs::create_dir(&log).expect("mkdir log");
    sync_dir(&data);

    // The data directory lock: flock is local to the kernel, and works.
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data.join("LOCK"))
        .expect("lock file");
    lock.try_lock().expect("first lock");
    let second = File::open(data.join("LOCK")).expect("lock file again");
    assert!(matches!(
        second.try_lock(),
        Err(fs::TryLockError::WouldBlock)
    ));
    drop((lock, second));

    // A segment: header synced, then an append that is only written.
    let segment_path = log.join("00000000000000000000.log");
    let segment = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&segment_path)
        .expect("segment");
    segment.set_len(0).expect("truncate");
    segment.write_all_at(b"HEADER", 0).expect("write");
    segment.sync_data().expect("fdatasync");
    sync_dir(&log);
    segment.write_all_at(b"-synced", 6).expect("write");
    segment.sync_data().expect("fdatasync");
    segment.write_all_at(b"-lost", 13).expect("write");
    let mut read_back = vec![0; 18];
    segment.read_exact_at(&mut read_back, 0).expect("read");
    assert_eq!(read_back, b"HEADER-synced-lost");
    assert_eq!(segment.metadata().expect("stat").len(), 18);

    // A new file whose data is synced but whose name is not.
    let orphan = File::create(log.join("orphan.log")).expect("orphan");
    orphan.write_all_at(b"x", 0).expect("write");
    orphan.sync_data().expect("fdatasync");

    // Definitions: tmp, fsync, rename, directory fsync.
    fs::write(data.join("definitions.tmp"), b"v1").expect("write tmp");
    File::open(data.join("definitions.tmp"))
        .expect("tmp")
        .sync_all()
        .expect("fsync tmp");
    fs::rename(data.join("definitions.tmp"), data.join("definitions")).expect("rename");
    sync_dir(&data);
    // ... and a second version renamed without the directory fsync.
    fs::write(data.join("definitions.tmp"), b"v2").expect("write tmp");
    File::open(data.join("definitions.tmp"))
        .expect("tmp")
        .sync_all()
        .expect("fsync tmp");
    fs::rename(data.join("definitions.tmp"), data.join("definitions")).expect("rename");
    assert_eq!(fs::read(data.join("definitions")).expect("read"), b"v2");

    let before = status(root).expect("status");
    assert!(before.pending_bytes >= 5, "{before:?}");
    drop((segment, orphan));
    send(root, Command::Crash).expect("crash");
    let after = status(root).expect("status");
    assert_eq!(after.crashes, before.crashes + 1);
    assert_eq!(after.pending_bytes, 0);
    assert!(after.dropped_bytes >= before.dropped_bytes + 5, "{after:?}");

    assert_eq!(
        fs::read(&segment_path).expect("segment survives"),
        b"HEADER-synced"
    );
    assert!(!log.join("orphan.log").exists(), "name never made durable");
    assert_eq!(fs::read(data.join("definitions")).expect("read"), b"v1");
    assert!(!data.join("definitions.tmp").exists());
    let mut names: Vec<_> = fs::read_dir(&data)
        .expect("ls")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    names.sort();
    // LOCK was made durable by the directory fsync after the first rename.
    assert_eq!(names, ["LOCK", "definitions", "log"]);

    // Failed fsyncs: EIO, and nothing becomes durable.
    let segment = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment_path)
        .expect("segment");
    segment.write_all_at(b"-doomed", 13).expect("write");
    send(root, Command::FailFsync).expect("fail-fsync");
    assert!(status(root).expect("status").fail_fsync);
    let error = segment.sync_data().expect_err("fsync fails");
    assert_eq!(error.raw_os_error(), Some(5), "{error}");
    let error = File::open(&log)
        .expect("dir")
        .sync_all()
        .expect_err("dir fsync fails");
    assert_eq!(error.raw_os_error(), Some(5), "{error}");
    drop(segment);
    send(root, Command::Crash).expect("crash");
    send(root, Command::Heal).expect("heal");
    assert_eq!(fs::read(&segment_path).expect("segment"), b"HEADER-synced");
    let segment = OpenOptions::new()
        .write(true)
        .open(&segment_path)
        .expect("segment");
    segment.write_all_at(b"-healed", 13).expect("write");
    segment.sync_data().expect("fsync works again");
    drop(segment);
    send(root, Command::Crash).expect("crash");
    assert_eq!(
        fs::read(&segment_path).expect("segment"),
        b"HEADER-synced-healed"
    );

    // Unlink needs the directory fsync too.
    fs::remove_file(&segment_path).expect("unlink");
    assert!(!segment_path.exists());
    send(root, Command::Crash).expect("crash");
    assert!(segment_path.exists(), "unlink was not made durable");
    fs::remove_file(&segment_path).expect("unlink");
    sync_dir(&log);
    send(root, Command::Crash).expect("crash");
    assert!(!segment_path.exists());

    // Unknown commands are refused.
    let error = fs::write(root.join(".lazyfs-control"), "explode").expect_err("refused");
    assert_eq!(error.raw_os_error(), Some(22), "{error}");
}

#[test]
fn the_binary_loses_exactly_what_was_not_fsynced() {
    let mount = BinaryMount::start();
    assert!(is_mounted(&mount.mountpoint));
    exercise(&mount.mountpoint);
    let mountpoint = mount.mountpoint.clone();
    drop(mount);
    assert!(!is_mounted(&mountpoint), "unmounted on drop");
}

#[test]
fn the_in_process_mount_behaves_the_same_and_unmounts_on_drop() {
    let backing = tempfile::tempdir().expect("backing");
    let mountpoint = tempfile::tempdir().expect("mountpoint");
    {
        let mount = Mounted::mount(backing.path(), mountpoint.path()).expect("mount");
        assert!(is_mounted(mount.path()));
        exercise(mount.path());
        // What survived the last crash is in the backing directory, plainly.
        assert_eq!(
            fs::read(backing.path().join("data/definitions")).expect("backing"),
            b"v1"
        );
    }
    assert!(!is_mounted(mountpoint.path()), "unmounted on drop");
    // A new mount over the same backing directory sees the durable state.
    let mount = Mounted::mount(backing.path(), mountpoint.path()).expect("mount again");
    assert_eq!(
        fs::read(mount.path().join("data/definitions")).expect("read"),
        b"v1"
    );
    mount.unmount().expect("unmount");
}
