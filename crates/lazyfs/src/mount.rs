//! Mounting in-process, for tests: [`Mounted`] serves the filesystem on background threads,
//! sends control commands through the control file like any other program would, and
//! unmounts on drop (lazily, with `umount -l`, if something still holds it busy).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use fuser::{BackgroundSession, Config, MountOption, Session};

use crate::control::Command;
use crate::filesystem::LazyFs;
use crate::model::CONTROL_NAME;

/// The mount options and threads used by [`Mounted`] and the `holdfast-lazyfs` binary.
#[must_use]
pub fn config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("holdfast-lazyfs".to_owned()),
        MountOption::Subtype("lazyfs".to_owned()),
        MountOption::RW,
        MountOption::NoAtime,
    ];
    config.n_threads = Some(2);
    config
}

/// Mounts the filesystem over `backing` at `mountpoint`; the session is ready (the FUSE
/// handshake done) when this returns.
///
/// # Errors
/// When the backing directory cannot be read or the mount fails (e.g. not root and no
/// `fusermount3`).
pub fn session(backing: &Path, mountpoint: &Path) -> io::Result<Session<LazyFs>> {
    Session::new(LazyFs::new(backing)?, mountpoint, &config())
}

/// A mounted lazy filesystem, unmounted on drop.
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

/// Counters read from the control file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// Whether fsyncs fail now.
    pub fail_fsync: bool,
    /// Bytes written and not yet fsynced.
    pub pending_bytes: u64,
    /// Directory entries changed and not yet made durable.
    pub pending_entries: u64,
    /// Successful fsyncs.
    pub fsyncs: u64,
    /// Fsyncs failed on purpose.
    pub failed_fsyncs: u64,
    /// Crashes simulated.
    pub crashes: u64,
    /// Bytes thrown away by crashes.
    pub dropped_bytes: u64,
    /// Directory entry changes thrown away by crashes.
    pub dropped_entries: u64,
    /// Unsynced pages torn crashes let reach the disk.
    pub torn_pages: u64,
}

impl Status {
    /// Parses the control file's `key=value` lines (unknown keys are ignored).
    #[must_use]
    pub fn parse(text: &str) -> Status {
        let mut status = Status::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let number = value.trim().parse().unwrap_or(0);
            match key.trim() {
                "fail_fsync" => status.fail_fsync = value.trim() == "true",
                "pending_bytes" => status.pending_bytes = number,
                "pending_entries" => status.pending_entries = number,
                "fsyncs" => status.fsyncs = number,
                "failed_fsyncs" => status.failed_fsyncs = number,
                "crashes" => status.crashes = number,
                "dropped_bytes" => status.dropped_bytes = number,
                "dropped_entries" => status.dropped_entries = number,
                "torn_pages" => status.torn_pages = number,
                _ => {}
            }
        }
        status
    }
}

impl Mounted {
    /// Mounts over `backing` at `mountpoint` (both must exist).
    ///
    /// # Errors
    /// As [`session`].
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Mounted> {
        let session = session(backing, mountpoint)?.spawn()?;
        Ok(Mounted {
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// Where it is mounted.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Runs a control command; it has taken effect when this returns.
    ///
    /// # Errors
    /// When the control file cannot be written.
    pub fn command(&self, command: Command) -> io::Result<()> {
        send(&self.mountpoint, command)
    }

    /// Reads the counters.
    ///
    /// # Errors
    /// When the control file cannot be read.
    pub fn status(&self) -> io::Result<Status> {
        status(&self.mountpoint)
    }

    /// Unmounts now.
    ///
    /// # Errors
    /// When even a lazy unmount fails.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if session.umount_and_join().is_ok() {
            return Ok(());
        }
        // Busy (or the thread ended oddly): detach it so nothing stays mounted.
        let status = Process::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status()?;
        if status.success() || !is_mounted(&self.mountpoint) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "umount -l {} failed: {status}",
                self.mountpoint.display()
            )))
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_now() {
            eprintln!("holdfast-lazyfs: {error}");
        }
    }
}

/// Sends `command` to the lazy filesystem mounted at `mountpoint` (in this process or
/// another).
///
/// # Errors
/// When the control file cannot be written.
pub fn send(mountpoint: &Path, command: Command) -> io::Result<()> {
    std::fs::write(mountpoint.join(CONTROL_NAME), command.as_str())
}

/// Reads the counters of the lazy filesystem mounted at `mountpoint`.
///
/// # Errors
/// When the control file cannot be read.
pub fn status(mountpoint: &Path) -> io::Result<Status> {
    Ok(Status::parse(&std::fs::read_to_string(
        mountpoint.join(CONTROL_NAME),
    )?))
}

/// Whether `path` is a mount point according to `/proc/self/mountinfo`.
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}
