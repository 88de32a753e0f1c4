//! Store configuration: where the log lives, how big segments are, when to fsync.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// When appended bytes are forced to stable storage, and hence what "confirmable" means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append is confirmable only once fsynced; concurrent appends share one fsync
    /// (group commit). Text form: `always`.
    #[default]
    Always,
    /// Fsync at most every interval when something is new; appends are confirmable as soon
    /// as the OS has them. Text form: `interval:<milliseconds>`.
    Interval(Duration),
    /// Never fsync except on segment roll, `sync_all` and shutdown; appends are confirmable
    /// as soon as the OS has them. Text form: `never`.
    Never,
}

/// Error from parsing a [`FsyncPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fsync policy {input:?}: expected \"always\", \"interval:<ms>\" (ms > 0) or \"never\""
)]
pub struct ParseFsyncPolicyError {
    /// The text that failed to parse.
    pub input: String,
}

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = || ParseFsyncPolicyError {
            input: input.to_owned(),
        };
        match input.trim() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let millis = other
                    .strip_prefix("interval:")
                    .ok_or_else(error)?
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| error())?;
                if millis == 0 {
                    return Err(error());
                }
                Ok(FsyncPolicy::Interval(Duration::from_millis(millis)))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => formatter.write_str("always"),
            FsyncPolicy::Interval(interval) => {
                write!(formatter, "interval:{}", interval.as_millis())
            }
            FsyncPolicy::Never => formatter.write_str("never"),
        }
    }
}

/// Everything [`crate::Store::open`] needs.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Data directory; holds `LOCK`, `definitions` and the `log/` segment directory.
    pub dir: PathBuf,
    /// Target segment file size in bytes (magic included). A record that does not fit in
    /// the rest of the active segment starts a new one; a record larger than this gets a
    /// segment to itself.
    pub segment_size: u64,
    /// When to fsync.
    pub fsync: FsyncPolicy,
}

impl StoreConfig {
    /// A config for `dir` with the default segment size and [`FsyncPolicy::Always`].
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            fsync: FsyncPolicy::Always,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_displays() {
        for (text, policy) in [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            (
                "interval:250",
                FsyncPolicy::Interval(Duration::from_millis(250)),
            ),
        ] {
            assert_eq!(text.parse::<FsyncPolicy>(), Ok(policy));
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(FsyncPolicy::default(), FsyncPolicy::Always);
    }

    #[test]
    fn fsync_policy_rejects_garbage() {
        for text in [
            "",
            "Always2",
            "interval",
            "interval:",
            "interval:x",
            "interval:0",
            "sometimes",
        ] {
            let error = text.parse::<FsyncPolicy>().expect_err(text);
            assert_eq!(error.input, text);
            assert!(error.to_string().contains("interval:<ms>"));
        }
    }
}
