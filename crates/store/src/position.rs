//! [`LogPosition`]: where a record starts in the logical log.
//!
//! The logical log is the concatenation of all segment files ever created, each file
//! starting at its base offset (its file name). A position is `base + offset in file`,
//! so it points at the record header, never at the segment magic. Positions strictly
//! increase and survive the deletion of older segments.

use std::fmt;

/// Global byte offset of a record's header in the logical log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition(pub u64);

impl fmt::Display for LogPosition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}
