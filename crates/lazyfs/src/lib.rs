//! A FUSE filesystem that loses what was not fsynced, after Jepsen's LazyFS: the way to
//! test "a confirmed message is never lost" against a real power loss, which `kill -9`
//! alone cannot (the page cache survives a process crash).
//!
//! It passes through to a backing directory, but:
//! - writes and truncations stay in memory (reads see them) until the file is fsynced
//!   (`fsync` or `fdatasync`); then its dirty ranges are applied to the backing file;
//! - creations, renames, unlinks and `mkdir`s stay in memory until their directory is
//!   fsynced; then the directory's names are applied to the backing directory;
//! - `crash` forgets everything in memory and reloads the backing directory: a power loss;
//! - `fail-fsync` makes every fsync return `EIO` (and sync nothing) until `heal`.
//!
//! Commands go through the control file `/.lazyfs-control` at the mount root (see
//! [`control`]). Not modelled: permissions, owners, times, links, xattrs, and sizes past
//! 4 GiB (every file's current and synced bytes are held in memory). `flock` is left to
//! the kernel's local locking, which is enough for one program per mount.
//!
//! Mount in-process with [`Mounted`] (tests), or run the `holdfast-lazyfs` binary. Either
//! needs root (or `fusermount3`) and `/dev/fuse`.

pub mod control;
mod filesystem;
pub mod model;
mod mount;

pub use control::Command;
pub use filesystem::LazyFs;
pub use mount::{Mounted, Status, config, is_mounted, send, session, status};
