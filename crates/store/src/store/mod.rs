//! [`Store`]: the commit log's public face and its shared state. The parts of the story
//! live beside it: [`writer`] (appends, the pending buffer, rolls, cut-backs),
//! [`flusher`] (group-commit fsync, the durable offset, poisoning), [`reads`] (reads and
//! per-segment references, prefix deletion) and [`recovery`] (scanning at open).
//!
//! Appends other than lazy ones are encoded into a pending buffer under the writer lock,
//! when the active segment's storage is reserved (`fallocate`) so that the later write
//! cannot fail for a full disk; the flusher writes the buffer right before it fsyncs
//! (`Always`) or as soon as an append waits for it (`Interval`, `Never`). A read of a
//! pending record writes the buffer out first. Dead segments are deleted by the
//! [`Reaper`] thread once the log is durable past the moment they died.
//!
//! # Lock order
//! `gc_lock` → `segments`; `writer` → `segments`; `writer` → `sync_lock`. The flusher and
//! `sync_all` release `writer` before taking `sync_lock` for the fsync itself, so appends
//! proceed while an fsync is in flight and share the next one.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use tokio::sync::watch;

use crate::config::{FsyncPolicy, StoreConfig};
use crate::error::{StoreError, StorePoisoned};
use crate::file_layer::{FileSystem, LockGuard, LogFile, StdFileSystem};
use crate::position::LogPosition;
use crate::reaper::Reaper;
mod flusher;
mod reads;
mod recovery;
mod replica;
mod writer;

pub use replica::RawRecord;

use recovery::recover;

use crate::segment::{
    HEADER_LEN, MAGIC, MAGIC_LEN, MAX_RECORD_SIZE, Segment, decode_header, encode_record,
    parse_segment_file_name, record_crc, scan, segment_file_name,
};

/// Where an appended record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Position of the record (pass it to [`Store::read`], `retain`, `release`).
    pub position: LogPosition,
    /// Payload length (pass it to [`Store::read`]).
    pub len: u32,
    /// Logical offset just past this record: the record is confirmable once
    /// [`Store::durable`] reaches it.
    pub end: u64,
}

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Segments in the log (a dead segment's file may outlive its entry here until the
    /// reaper deletes it).
    pub segments: usize,
    /// Sum of segment file lengths.
    pub bytes_on_disk: u64,
    /// Logical offset just past the last byte handed to the OS.
    pub written: u64,
    /// Logical offset up to which every byte is known fsynced (whatever the policy).
    pub durable: u64,
    /// Successful `fsync` (`sync_data`) calls on segment files since open.
    pub fsyncs: u64,
    /// Records appended since open.
    pub appended_records: u64,
    /// Bytes of a torn tail (a partly written or corrupt last record) recovery cut off
    /// at open.
    pub torn_bytes_cut_at_open: u64,
}

/// The commit log. Cheap to clone; all clones share one log. Dropping the last clone (or
/// calling [`Store::shutdown`]) stops the flusher after a final fsync.
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

/// Owns the flusher thread; its `Drop` is the shutdown of the last `Store` clone.
struct Handle {
    core: Arc<Core>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

struct Core {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    log_dir: PathBuf,
    segment_size: u64,
    policy: FsyncPolicy,
    /// Position assignment and the write syscall happen together under this lock.
    writer: Mutex<Writer>,
    /// Wakes the flusher: an append that waits for durability, poisoning, shutdown.
    flusher_wake: Condvar,
    /// Serialises fsyncs so that after one fails no later one can publish progress.
    sync_lock: Mutex<()>,
    /// Set (under `sync_lock`) once any fsync failed.
    sync_failed: AtomicBool,
    /// Every live segment by base offset; the last entry is the active segment.
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    /// Keeps segment unlinks in base order even when two releases collect at once.
    gc_lock: Mutex<()>,
    /// Deletion starts with the first `collect_garbage` call, after the broker retained
    /// everything it recovered.
    gc_enabled: AtomicBool,
    /// Serialises `write_definitions` (they share `definitions.tmp`).
    definitions_lock: Mutex<()>,
    durable_tx: watch::Sender<Result<u64, StorePoisoned>>,
    fsyncs: AtomicU64,
    appended_records: AtomicU64,
    torn_bytes_cut_at_open: u64,
    /// Logical offset below which every byte is handed to the OS (readable).
    flushed: AtomicU64,
    /// Deletes the segments garbage collection takes out of the table.
    reaper: Reaper,
    _lock: LockGuard,
}

/// Pending bytes above which an append writes them at once.
const PENDING_LIMIT: usize = 1 << 20;

struct Writer {
    active: Arc<Segment>,
    /// File offset of the next record in the active segment (bytes below it are
    /// written or in `pending`).
    active_len: u64,
    /// `active.base + active_len`: every position below it is assigned.
    written: u64,
    /// Encoded records at `[flushed_len, active_len)` of the active segment, not yet
    /// handed to the OS. Only ever non-empty inside space reserved by `preallocate` (so
    /// their write cannot fail for a full disk); the flusher writes them before it fsyncs
    /// (under `Always`) or as soon as an append waits for them (under `Interval` and
    /// `Never`, which confirm on write): the write leaves the append path and many
    /// records share one `pwrite`.
    pending: Vec<u8>,
    /// File offset in the active segment up to which bytes are handed to the OS.
    flushed_len: u64,
    /// The active segment has storage reserved up to this file offset (0: none).
    preallocated: u64,
    /// Every byte below this is fsynced.
    synced: u64,
    /// Highest offset somebody waits to see durable. Under `Always` the flusher syncs
    /// only while this is ahead of `synced`: records nobody waits for (acks, transient
    /// messages) ride along with the next requested fsync instead of causing their own.
    requested: u64,
    /// Records handed to [`Store::append_deferred`] and not written yet; they go out
    /// ahead of the next write (an append, the flusher's next fsync, or
    /// [`Store::flush_deferred`]).
    deferred: Vec<Vec<u8>>,
    deferred_bytes: usize,
    /// The active segment was created by a roll under `Always` and neither its magic nor
    /// its directory entry is fsynced yet; the next `sync_locked` syncs both before it
    /// publishes anything in it.
    unsynced_dir: bool,
    poisoned: Option<StorePoisoned>,
    shutdown: bool,
}

/// What the writer of a record needs of its write ([`Store::append`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Someone waits for it (a publisher confirm): the flusher is asked to fsync it.
    Requested,
    /// Nobody waits for it (an ack, a copy nobody confirms): no fsync of its own, it
    /// becomes durable with the next requested one or at shutdown; a crash may lose it.
    Lazy,
    /// No recovery needs it (a transient message, read back only while the process
    /// lives): may wait in the pending buffer like a requested one; a read writes it out.
    Volatile,
}

/// Deferred bytes above which [`Store::append_deferred`] writes at once.
const DEFERRED_LIMIT: usize = 256 * 1024;

/// Reserves storage for a whole segment; returns the file offset writes are safe below
/// (0 when the filesystem cannot reserve, e.g. FUSE, or the disk is too full: appends then
/// write synchronously and a full disk is reported per append).
fn preallocate(file: &dyn LogFile, segment_size: u64) -> u64 {
    match file.preallocate(segment_size) {
        Ok(()) => segment_size,
        Err(error) => {
            tracing::debug!(error = %error, "segment storage not reserved; writing synchronously");
            0
        }
    }
}

const LOCK_FILE: &str = "LOCK";
const LOG_DIR: &str = "log";
const DEFINITIONS_FILE: &str = "definitions";
const DEFINITIONS_TMP_FILE: &str = "definitions.tmp";

impl Store {
    /// Opens the store in `config.dir` (creating it if needed), locks it, replays every
    /// valid record to `visit` in log order, cuts a torn tail, and starts the flusher.
    ///
    /// After open every segment has zero live references: call [`Store::retain`] for each
    /// recovered record still needed, then [`Store::collect_garbage`] once.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process has the directory open,
    /// [`StoreError::Io`] on I/O failure, [`StoreError::InvalidConfig`] if `segment_size`
    /// cannot hold a record header.
    pub fn open(
        config: StoreConfig,
        mut visit: impl FnMut(LogPosition, &[u8]),
    ) -> Result<Store, StoreError> {
        Store::open_with(Arc::new(StdFileSystem), config, &mut visit)
    }

    /// [`Store::open`] on the simulated file system (tests of crates built on the store).
    ///
    /// # Errors
    /// As [`Store::open`].
    #[cfg(any(test, feature = "sim"))]
    pub fn open_on(
        fs: &crate::sim::SimFileSystem,
        config: StoreConfig,
        mut visit: impl FnMut(LogPosition, &[u8]),
    ) -> Result<Store, StoreError> {
        Store::open_with(Arc::new(fs.clone()), config, &mut visit)
    }

    pub(crate) fn open_with(
        fs: Arc<dyn FileSystem>,
        config: StoreConfig,
        visit: &mut dyn FnMut(LogPosition, &[u8]),
    ) -> Result<Store, StoreError> {
        if config.segment_size < MAGIC_LEN + HEADER_LEN {
            return Err(StoreError::InvalidConfig {
                reason: format!(
                    "segment_size {} is below the minimum of {}",
                    config.segment_size,
                    MAGIC_LEN + HEADER_LEN
                ),
            });
        }
        let dir = config.dir.clone();
        let log_dir = dir.join(LOG_DIR);
        fs.create_dir_all(&log_dir)
            .map_err(StoreError::io(format!("creating {}", log_dir.display())))?;
        // A directory just created survives power loss only once its parent is fsynced:
        // make `log` durable in `dir`, and `dir` in its parent, before anything written
        // under them is confirmed. (Ancestors above `dir` that `create_dir_all` created
        // are the operator's to make durable.)
        let parent = match dir.parent() {
            Some(parent) if parent.as_os_str().is_empty() => Some(Path::new(".")),
            other => other,
        };
        for synced in std::iter::once(dir.as_path()).chain(parent) {
            fs.sync_dir(synced)
                .map_err(StoreError::io(format!("syncing {}", synced.display())))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs
            .try_lock(&lock_path)
            .map_err(StoreError::io(format!("locking {}", lock_path.display())))?
            .ok_or(StoreError::Locked { path: lock_path })?;

        let (segments, torn_bytes_cut_at_open) = recover(fs.as_ref(), &log_dir, visit)?;
        let active = Arc::clone(
            segments
                .values()
                .next_back()
                .expect("recover always leaves at least one segment"),
        );
        let active_len = active.len.load(Ordering::SeqCst);
        let written = active.base + active_len;
        let preallocated = preallocate(active.file.as_ref(), config.segment_size);
        let (durable_tx, _) = watch::channel(Ok(written));
        let reaper = Reaper::start(Arc::clone(&fs), log_dir.clone(), durable_tx.subscribe())
            .map_err(StoreError::io("spawning the segment reaper thread"))?;
        let core = Arc::new(Core {
            fs,
            dir,
            log_dir,
            segment_size: config.segment_size,
            policy: config.fsync,
            writer: Mutex::new(Writer {
                active,
                active_len,
                written,
                pending: Vec::new(),
                flushed_len: active_len,
                preallocated,
                synced: written,
                requested: written,
                deferred: Vec::new(),
                deferred_bytes: 0,
                unsynced_dir: false,
                poisoned: None,
                shutdown: false,
            }),
            flusher_wake: Condvar::new(),
            sync_lock: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            segments: RwLock::new(segments),
            gc_lock: Mutex::new(()),
            gc_enabled: AtomicBool::new(false),
            definitions_lock: Mutex::new(()),
            durable_tx,
            fsyncs: AtomicU64::new(0),
            appended_records: AtomicU64::new(0),
            torn_bytes_cut_at_open,
            flushed: AtomicU64::new(written),
            reaper,
            _lock: lock,
        });
        let flusher_core = Arc::clone(&core);
        let flusher = std::thread::Builder::new()
            .name("holdfast-store-flusher".to_owned())
            .spawn(move || flusher_core.run_flusher())
            .map_err(StoreError::io("spawning the flusher thread"))?;
        tracing::info!(dir = %config.dir.display(), fsync = %config.fsync, written, "store opened");
        Ok(Store {
            handle: Arc::new(Handle {
                core,
                flusher: Mutex::new(Some(flusher)),
            }),
        })
    }

    /// Appends one record holding `refs` live references (0 for bookkeeping records),
    /// with the [`Durability`] its writer needs. [`Store::read`] sees it at once;
    /// durability is reported through [`Store::durable`] / [`Store::wait_durable`].
    /// Inside a segment whose storage is reserved, the bytes are handed to the OS by the
    /// flusher (under `Always` just before its fsync, under the other policies at once;
    /// many appends share one write), so a process crash before that loses the record —
    /// as it was not confirmed yet. Otherwise they are written before this returns.
    ///
    /// # Errors
    /// [`StoreError::RecordTooLarge`] above 512 MiB; [`StoreError::Poisoned`] after an
    /// earlier failure; [`StoreError::WriteFailed`] if the write fails (e.g. the disk is
    /// full) and was undone: nothing of it is in the log and the store stays usable;
    /// [`StoreError::Io`] if an fsync fails or a failed write cannot be undone (which
    /// poisons the store); [`StoreError::Closed`] after shutdown.
    pub fn append(
        &self,
        payload: &[u8],
        refs: u32,
        durability: Durability,
    ) -> Result<Appended, StoreError> {
        let mut appended = self.append_records(&[(payload, refs)], durability)?;
        Ok(appended.pop().expect("one record in, one position out"))
    }

    /// Appends several [`Durability::Requested`] records with as few writes as possible
    /// (one per segment touched); positions are returned in input order.
    ///
    /// # Errors
    /// As [`Store::append`]. If a later record of the batch fails, earlier ones may be in
    /// the log (and be replayed after a restart) although the call returned an error.
    pub fn append_batch(&self, payloads: &[(&[u8], u32)]) -> Result<Vec<Appended>, StoreError> {
        self.append_records(payloads, Durability::Requested)
    }

    /// Queues a record nobody will ever wait on or read back (an ack) without a write
    /// of its own: it goes to the OS ahead of the next write — the next append, the
    /// flusher's next fsync, [`Store::flush_deferred`] — or at once when 256 KiB are
    /// waiting. A process crash may lose it (not only a power cut), which its writer
    /// must accept; a write failure drops it with a warning.
    ///
    /// # Errors
    /// [`StoreError::RecordTooLarge`], [`StoreError::Poisoned`], [`StoreError::Closed`],
    /// or the failure of the write it triggered.
    pub fn append_deferred(&self, payload: impl Into<Vec<u8>>) -> Result<(), StoreError> {
        let payload = payload.into();
        if payload.len() > MAX_RECORD_SIZE {
            return Err(StoreError::RecordTooLarge {
                len: payload.len(),
                max: MAX_RECORD_SIZE,
            });
        }
        let core = &self.handle.core;
        let full = {
            let mut writer = core.writer.lock();
            if writer.poisoned.is_some() {
                return Err(StoreError::Poisoned);
            }
            if writer.shutdown {
                return Err(StoreError::Closed);
            }
            writer.deferred_bytes += payload.len();
            writer.deferred.push(payload);
            writer.deferred_bytes >= DEFERRED_LIMIT
        };
        if full {
            self.flush_deferred()?;
        }
        Ok(())
    }

    /// Writes the deferred records now (the broker calls it on a timer, so an idle
    /// log does not hold them back for long).
    ///
    /// # Errors
    /// As [`Store::append`].
    pub fn flush_deferred(&self) -> Result<(), StoreError> {
        // A lazy append of nothing writes the deferred records and whatever is pending.
        self.append_records(&[], Durability::Lazy).map(|_| ())
    }

    /// Asks for everything up to `end` to become durable (fsynced under `Always`, handed
    /// to the OS under the other policies). Waiters then watch [`Store::durable`].
    pub fn request_durable(&self, end: u64) {
        self.handle.core.request(end);
    }

    fn append_records(
        &self,
        payloads: &[(&[u8], u32)],
        durability: Durability,
    ) -> Result<Vec<Appended>, StoreError> {
        let core = &self.handle.core;
        let (appended, rolled) = core.append_batch(payloads, durability, None)?;
        if rolled && core.gc_enabled.load(Ordering::SeqCst) {
            core.collect_garbage();
        }
        Ok(appended)
    }

    /// A watch of the confirmable logical offset: under [`FsyncPolicy::Always`] every byte
    /// below it is fsynced; under `Interval` and `Never` it is the offset written to the
    /// OS. Becomes `Err` once the store is poisoned and never changes again.
    pub fn durable(&self) -> watch::Receiver<Result<u64, StorePoisoned>> {
        self.handle.core.durable_tx.subscribe()
    }

    /// Waits until [`Store::durable`] reaches `end` (an [`Appended::end`]).
    ///
    /// # Errors
    /// The poison if the store is (or becomes) poisoned before that.
    pub async fn wait_durable(&self, end: u64) -> Result<(), StorePoisoned> {
        self.request_durable(end);
        let mut receiver = self.durable();
        loop {
            match &*receiver.borrow_and_update() {
                Ok(durable) if *durable >= end => return Ok(()),
                Err(poisoned) => return Err(poisoned.clone()),
                Ok(_) => {}
            }
            if receiver.changed().await.is_err() {
                return Err(StorePoisoned {
                    message: "store closed".to_owned(),
                });
            }
        }
    }

    /// Fsyncs everything written so far and blocks until done.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] if already poisoned; [`StoreError::Io`] if the fsync fails
    /// (which poisons the store).
    pub fn sync_all(&self) -> Result<(), StoreError> {
        let core = &self.handle.core;
        self.flush_deferred()?;
        let mut writer = core.writer.lock();
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        core.sync_locked(&mut writer)
    }

    /// Stops the flusher and fsyncs everything written. Later appends fail with
    /// [`StoreError::Closed`]. Dropping the last clone does the same.
    ///
    /// # Errors
    /// As [`Store::sync_all`].
    pub fn shutdown(&self) -> Result<(), StoreError> {
        self.handle.shutdown()
    }

    /// Atomically replaces the definitions blob: writes `definitions.tmp`, fsyncs it,
    /// renames it over `definitions`, fsyncs the directory.
    ///
    /// # Errors
    /// [`StoreError::Io`] if any step fails; the previous blob is then still intact. This
    /// does not poison the log.
    pub fn write_definitions(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let core = &self.handle.core;
        let _guard = core.definitions_lock.lock();
        let tmp = core.dir.join(DEFINITIONS_TMP_FILE);
        let path = core.dir.join(DEFINITIONS_FILE);
        let context = |what: &str| format!("{what} {}", tmp.display());
        let file = core
            .fs
            .open(&tmp, true)
            .map_err(StoreError::io(context("creating")))?;
        file.set_len(0)
            .map_err(StoreError::io(context("truncating")))?;
        file.write_at(bytes, 0)
            .map_err(StoreError::io(context("writing")))?;
        file.sync_data()
            .map_err(StoreError::io(context("syncing")))?;
        core.fs
            .rename(&tmp, &path)
            .map_err(StoreError::io(format!("renaming over {}", path.display())))?;
        core.fs
            .sync_dir(&core.dir)
            .map_err(StoreError::io(format!("syncing {}", core.dir.display())))
    }

    /// The definitions blob last written, or `None` if there never was one.
    ///
    /// # Errors
    /// [`StoreError::Io`] if reading fails.
    pub fn read_definitions(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let core = &self.handle.core;
        let path = core.dir.join(DEFINITIONS_FILE);
        let context = || format!("reading {}", path.display());
        let file = match core.fs.open(&path, false) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(StoreError::io(context())(error)),
        };
        let len = file.len().map_err(StoreError::io(context()))?;
        let mut bytes = vec![
            0u8;
            usize::try_from(len).map_err(|_| StoreError::Corrupt {
                position: 0,
                reason: "definitions file larger than memory".to_owned(),
            })?
        ];
        file.read_at(&mut bytes, 0)
            .map_err(StoreError::io(context()))?;
        Ok(Some(bytes))
    }

    /// Current counters.
    pub fn stats(&self) -> StoreStats {
        let core = &self.handle.core;
        let (written, durable) = {
            let writer = core.writer.lock();
            (writer.written, writer.synced)
        };
        let segments = core.segments.read();
        StoreStats {
            segments: segments.len(),
            bytes_on_disk: segments
                .values()
                .map(|segment| segment.len.load(Ordering::SeqCst))
                .sum(),
            written,
            durable,
            fsyncs: core.fsyncs.load(Ordering::SeqCst),
            appended_records: core.appended_records.load(Ordering::SeqCst),
            torn_bytes_cut_at_open: core.torn_bytes_cut_at_open,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("dir", &self.handle.core.dir)
            .field("policy", &self.handle.core.policy)
            .finish_non_exhaustive()
    }
}

impl Handle {
    fn shutdown(&self) -> Result<(), StoreError> {
        let Some(flusher) = self.flusher.lock().take() else {
            return Ok(());
        };
        if let Err(error) = self.core.append_batch(&[], Durability::Lazy, None) {
            tracing::warn!(error = %error, "deferred records could not be written at shutdown");
        }
        self.core.writer.lock().shutdown = true;
        self.core.flusher_wake.notify_all();
        if flusher.join().is_err() {
            tracing::error!("store flusher thread panicked");
        }
        let synced = {
            let mut writer = self.core.writer.lock();
            if writer.poisoned.is_some() {
                Err(StoreError::Poisoned)
            } else {
                self.core.sync_locked(&mut writer)
            }
        };
        // After the final fsync, which queued deletions wait for.
        self.core.reaper.stop();
        synced
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(error = %error, "final sync at store shutdown failed");
        }
    }
}
