//! The control interface: commands written to `/.lazyfs-control` at the mount root, and
//! the status text read back from it.
//!
//! ```text
//! crash        power loss: drop every write, create, rename and unlink not yet fsynced
//! fail-fsync   from now on every fsync (file or directory) returns EIO and syncs nothing
//! heal         fsyncs work again
//! ```
//! A write of several lines runs them in order. The write returns only once the commands
//! ran, so `echo crash > mnt/.lazyfs-control` is synchronous; an unknown command fails it
//! with `EINVAL`.

use std::fmt;

use fuser::Errno;

use crate::model::LazyState;

/// One control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Throw away everything not yet fsynced.
    Crash,
    /// Power loss with partial write-back: a random half of the unsynced pages reach
    /// the disk first.
    CrashTorn,
    /// Make every fsync fail with `EIO`.
    FailFsync,
    /// Make fsyncs work again.
    Heal,
}

impl Command {
    /// Parses one command word.
    #[must_use]
    pub fn parse(word: &str) -> Option<Command> {
        match word {
            "crash" => Some(Command::Crash),
            "crash-torn" => Some(Command::CrashTorn),
            "fail-fsync" => Some(Command::FailFsync),
            "heal" => Some(Command::Heal),
            _ => None,
        }
    }

    /// The text form, as written to the control file.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Crash => "crash",
            Command::CrashTorn => "crash-torn",
            Command::FailFsync => "fail-fsync",
            Command::Heal => "heal",
        }
    }

    /// Runs the command.
    ///
    /// # Errors
    /// `EIO` when a crash cannot reload the backing directory.
    pub fn apply(self, state: &mut LazyState) -> Result<(), Errno> {
        match self {
            Command::Crash => state.crash().map_err(|_| Errno::EIO),
            Command::CrashTorn => {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64);
                state.crash_torn(seed).map_err(|_| Errno::EIO)
            }
            Command::FailFsync => {
                state.set_fail_fsync(true);
                Ok(())
            }
            Command::Heal => {
                state.set_fail_fsync(false);
                Ok(())
            }
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Runs every command in `text` (one per line or separated by blanks), all or nothing as
/// far as parsing goes.
///
/// # Errors
/// `EINVAL` if any word is not a command (then none runs); `EIO` as in [`Command::apply`].
pub fn run(state: &mut LazyState, text: &[u8]) -> Result<(), Errno> {
    let text = std::str::from_utf8(text).map_err(|_| Errno::EINVAL)?;
    let commands = text
        .split_whitespace()
        .map(|word| Command::parse(word).ok_or(Errno::EINVAL))
        .collect::<Result<Vec<_>, _>>()?;
    for command in commands {
        command.apply(state)?;
    }
    Ok(())
}

/// The status text read from the control file: `key=value` lines.
#[must_use]
pub fn status(state: &LazyState) -> String {
    let stats = state.stats();
    format!(
        "fail_fsync={}\npending_bytes={}\npending_entries={}\nfsyncs={}\nfailed_fsyncs={}\ncrashes={}\ndropped_bytes={}\ndropped_entries={}\ntorn_pages={}\n",
        state.failing_fsync(),
        state.pending_bytes(),
        state.pending_entries(),
        stats.fsyncs,
        stats.failed_fsyncs,
        stats.crashes,
        stats.dropped_bytes,
        stats.dropped_entries,
        stats.torn_pages,
    )
}
