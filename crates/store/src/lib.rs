//! Holdfast's commit log: one append-only log of opaque records in fixed-size segment
//! files, a CRC per record, group-commit fsync, recovery by scanning, deletion of dead
//! segment prefixes, and an atomically replaced opaque "definitions" blob.
//!
//! The store knows nothing of AMQP: the broker encodes records, keeps their
//! [`LogPosition`]s, and counts live references with [`Store::retain`] /
//! [`Store::release`].
//!
//! # On-disk layout
//! ```text
//! <dir>/LOCK                         exclusive lock (flock) while a Store is open
//! <dir>/definitions                  opaque blob, replaced via definitions.tmp + rename
//! <dir>/log/{base:020}.log           segments; base = logical offset of the file's first byte
//!
//! segment = magic record*
//! magic   = "HFLOG\0\0\x01"          8 bytes; the last byte is the format version
//! record  = len:u32le crc:u32le payload[len]
//! crc     = CRC-32C(len:u32le ++ payload)
//! ```
//! A record's position is `base + offset of its header in the file`, so the first record
//! of segment `B` is at `B + 8`. The CRC covers the length bytes so that a corrupted length
//! is caught, and so that an all-zero header (a zero-filled tail) is never a valid record.
//! Payloads are at most 512 MiB. A record never spans segments: when it does not fit in
//! the rest of the active segment (and the segment already holds a record), the active
//! segment is fsynced and the next one is created at `base = old base + old file length`;
//! its magic and the directory are fsynced before anything in it counts as durable (under
//! `Always` by the flusher's next fsync, so a roll costs appends one fsync; under the other
//! policies by the roll itself). Positions therefore strictly increase and are never shared
//! between two records that both survive. Dead segments leave the segment table at once and
//! are unlinked on a reaper thread, oldest first (freeing a large file's blocks takes tens
//! of milliseconds, which no append or read should wait for).
//!
//! # Durability
//! Appends assign positions and issue the write syscall under one mutex, so a record is
//! readable as soon as `append` returns. One flusher thread implements the
//! [`FsyncPolicy`]. Under `Always` it fsyncs whatever was written when it wakes; all
//! appends that arrive during an fsync share the next one (group commit), and
//! [`Store::durable`] publishes the offset up to which every byte is fsynced. Under
//! `Interval`/`Never` it publishes the offset handed to the OS (at once, or as soon as the
//! flusher wrote what an append left pending). A failed write or
//! fsync poisons the store: the watch turns to `Err`, later appends fail, and no durable
//! offset past the failure is ever published.
//!
//! # Recovery
//! [`Store::open`] scans segments in base order and visits each valid record. The first
//! incomplete, oversized or checksum-failing record ends a segment: in the last segment the
//! file is truncated there (the torn tail of a crash); in an older segment the rest of that
//! segment is skipped with a warning, later segments are still read. A last segment without
//! valid magic is reset to just the magic. Recovered bytes are fsynced before the store
//! accepts appends.
//!
//! # Segment deletion
//! Only a prefix of the log is deleted: a segment goes when it and every older segment have
//! no live references, and never while it is the active one. Ack records in later segments
//! thus always outlive the messages they ack. Deletion is enabled by the first
//! [`Store::collect_garbage`] call, which the broker makes after re-retaining what it
//! recovered (every segment opens with zero references).

#![warn(missing_docs)]

mod config;
mod error;
mod file_layer;
mod position;
mod reaper;
mod segment;
/// An in-memory file system that models power cuts, torn write-back, full disks and
/// failing I/O, for tests of the store and of what is built on it (feature `sim`).
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod store;
#[cfg(test)]
mod tests;

pub use config::{DEFAULT_SEGMENT_SIZE, FsyncPolicy, ParseFsyncPolicyError, StoreConfig};
pub use error::{StoreError, StorePoisoned};
pub use position::LogPosition;
pub use segment::MAX_RECORD_SIZE;
pub use store::{Appended, Durability, RawRecord, Store, StoreStats};
