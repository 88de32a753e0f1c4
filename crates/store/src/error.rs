//! The store's error types. [`StoreError`] is what operations return; [`StorePoisoned`] is
//! the fatal state after a failed fsync (or a failed write that could not be undone), after
//! which nothing is confirmed again. A failed write that was undone is
//! [`StoreError::WriteFailed`]: recoverable, the log is as it was before the call.

use std::io;
use std::path::PathBuf;

/// The store has seen a failed write or fsync and refuses further work. Fatal: the broker
/// process is expected to exit and recover from the log on restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store poisoned: {message}")]
pub struct StorePoisoned {
    /// What failed.
    pub message: String,
}

/// Errors returned by [`crate::Store`] operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("I/O error while {context}")]
    Io {
        /// The underlying error.
        #[source]
        source: io::Error,
        /// What the store was doing.
        context: String,
    },
    /// A record read back does not match its checksum or expected length.
    #[error("corrupt record at position {position}: {reason}")]
    Corrupt {
        /// Logical position of the record.
        position: u64,
        /// What did not match.
        reason: String,
    },
    /// Another process holds the data directory lock.
    #[error("data directory {path} is locked by another process")]
    Locked {
        /// Path of the lock file.
        path: PathBuf,
    },
    /// A write failed (typically `ENOSPC`: the disk is full) and was undone: the segment
    /// was cut back to its last good record, so nothing of the failed call is in the log
    /// and later appends land right after the last good record. Not fatal: the caller
    /// refuses the work (a publisher gets a nack) and may retry once space returns.
    #[error("write failed and was undone while {context}")]
    WriteFailed {
        /// The underlying error.
        #[source]
        source: io::Error,
        /// What the store was doing.
        context: String,
    },
    /// A replicated record's position is not where this log continues.
    #[error("replicated record at {position} does not continue the log, which ends at {expected}")]
    OutOfSequence {
        /// Where this log ends.
        expected: u64,
        /// Where the record was placed in the leader's log.
        position: u64,
    },
    /// The store is poisoned by an earlier failed write or fsync (see [`StorePoisoned`];
    /// the cause was logged at error level when it happened).
    #[error("store poisoned by an earlier write or fsync failure")]
    Poisoned,
    /// A payload exceeds the maximum record size.
    #[error("record of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// Payload length.
        len: usize,
        /// Maximum payload length.
        max: usize,
    },
    /// The store was shut down.
    #[error("store is shut down")]
    Closed,
    /// The configuration cannot work.
    #[error("invalid store configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// `read` was given a position that no live segment holds.
    #[error("no segment holds position {position}")]
    NotFound {
        /// The requested position.
        position: u64,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { source, context }
    }
}

impl StoreError {
    /// Whether this is a write refused for lack of space (`ENOSPC` or `EDQUOT`) that
    /// left the log intact: the disk alarm's business, not a fatal error.
    #[must_use]
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            StoreError::WriteFailed { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
        )
    }
}

impl From<StorePoisoned> for StoreError {
    fn from(_: StorePoisoned) -> StoreError {
        StoreError::Poisoned
    }
}
