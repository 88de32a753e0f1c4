//! [`Store`]: the append path, the flusher thread (group commit), reads, live-reference
//! counting with prefix deletion, and recovery at open.
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

/// What an append's caller needs of its write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    /// Confirmable once fsynced: the flusher is asked to sync it.
    Requested,
    /// No fsync of its own, but handed to the OS before the append returns.
    Lazy,
    /// Neither: no recovery needs it.
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

        let segments = recover(fs.as_ref(), &log_dir, visit)?;
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

    /// Appends one record holding `refs` live references (0 for bookkeeping records).
    /// [`Store::read`] sees it at once; durability is reported through
    /// [`Store::durable`] / [`Store::wait_durable`]. Inside a segment whose storage is
    /// reserved, the bytes are handed to the OS by the flusher (under `Always` just
    /// before its fsync, under the other policies at once; many appends share one
    /// write), so a process crash before that loses the record — as it was not
    /// confirmed yet. Otherwise they are written before this returns.
    ///
    /// # Errors
    /// [`StoreError::RecordTooLarge`] above 512 MiB; [`StoreError::Poisoned`] after an
    /// earlier failure; [`StoreError::WriteFailed`] if the write fails (e.g. the disk is
    /// full) and was undone: nothing of it is in the log and the store stays usable;
    /// [`StoreError::Io`] if an fsync fails or a failed write cannot be undone (which
    /// poisons the store); [`StoreError::Closed`] after shutdown.
    pub fn append(&self, payload: &[u8], refs: u32) -> Result<Appended, StoreError> {
        let mut appended = self.append_batch(&[(payload, refs)])?;
        Ok(appended.pop().expect("one record in, one position out"))
    }

    /// Appends several records with as few writes as possible (one per segment touched);
    /// positions are returned in input order.
    ///
    /// # Errors
    /// As [`Store::append`]. If a later record of the batch fails, earlier ones may be in
    /// the log (and be replayed after a restart) although the call returned an error.
    pub fn append_batch(&self, payloads: &[(&[u8], u32)]) -> Result<Vec<Appended>, StoreError> {
        self.append_records(payloads, Durability::Requested)
    }

    /// Appends a record that nobody will wait on (an ack, a transient message): under
    /// `Always` it does not start an fsync of its own but becomes durable with the next
    /// requested one (or at shutdown). A crash may lose it, which its writer must accept.
    ///
    /// # Errors
    /// As [`Store::append`].
    pub fn append_lazy(&self, payload: &[u8], refs: u32) -> Result<Appended, StoreError> {
        let mut appended = self.append_records(&[(payload, refs)], Durability::Lazy)?;
        Ok(appended.pop().expect("one record in, one position out"))
    }

    /// Appends a record that no recovery needs (a transient message: it is read back
    /// while the process lives, never replayed): like [`Store::append_lazy`], but the
    /// bytes may wait in the pending buffer like a requested append's — a process crash
    /// may lose them, and a read writes them out first.
    ///
    /// # Errors
    /// As [`Store::append`].
    pub fn append_volatile(&self, payload: &[u8], refs: u32) -> Result<Appended, StoreError> {
        let mut appended = self.append_records(&[(payload, refs)], Durability::Volatile)?;
        Ok(appended.pop().expect("one record in, one position out"))
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
        let (appended, rolled) = core.append_batch(payloads, durability)?;
        if rolled && core.gc_enabled.load(Ordering::SeqCst) {
            core.collect_garbage();
        }
        Ok(appended)
    }

    /// Reads the payload of the record at `position` (as returned by `append` or passed to
    /// the `open` visitor). Safe from any thread, concurrently with appends and deletion.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no live segment holds `position`;
    /// [`StoreError::Corrupt`] if the stored length or checksum does not match;
    /// [`StoreError::Io`] if the read fails (including past the end of the file).
    pub fn read(&self, position: LogPosition, len: u32) -> Result<Bytes, StoreError> {
        let end = position.0 + HEADER_LEN + u64::from(len);
        let core = &self.handle.core;
        if end > core.flushed.load(Ordering::SeqCst) {
            // Still in the pending buffer: hand it to the OS first.
            let mut writer = core.writer.lock();
            core.flush_pending(&mut writer)?;
        }
        let segment = self
            .handle
            .core
            .segment_for(position)
            .ok_or(StoreError::NotFound {
                position: position.0,
            })?;
        let offset = position.0 - segment.base;
        if offset < MAGIC_LEN {
            return Err(StoreError::NotFound {
                position: position.0,
            });
        }
        let mut buf = vec![0u8; HEADER_LEN as usize + len as usize];
        segment
            .file
            .read_at(&mut buf, offset)
            .map_err(StoreError::io(format!("reading record at {position}")))?;
        let header: [u8; 8] = buf[..8]
            .try_into()
            .expect("buffer starts with a full header");
        let (stored_len, stored_crc) = decode_header(&header);
        let corrupt = |reason: String| StoreError::Corrupt {
            position: position.0,
            reason,
        };
        if stored_len != len {
            return Err(corrupt(format!(
                "stored length {stored_len}, expected {len}"
            )));
        }
        let payload = Bytes::from(buf).slice(HEADER_LEN as usize..);
        if record_crc(&payload) != stored_crc {
            return Err(corrupt("checksum mismatch".to_owned()));
        }
        Ok(payload)
    }

    /// Adds a live reference to the segment holding `position`.
    pub fn retain(&self, position: LogPosition) {
        let segments = self.handle.core.segments.read();
        match segments.range(..=position.0).next_back() {
            Some((_, segment)) => {
                segment.refs.fetch_add(1, Ordering::SeqCst);
            }
            None => tracing::warn!(%position, "retain of a position in no live segment"),
        }
    }

    /// Drops one live reference to the segment holding `position`; once garbage collection
    /// is enabled (first [`Store::collect_garbage`]), deletes the oldest segments that have
    /// no live references, up to the first one that has (never the active segment).
    pub fn release(&self, position: LogPosition) {
        let core = &self.handle.core;
        let now_free = {
            let segments = core.segments.read();
            let Some((_, segment)) = segments.range(..=position.0).next_back() else {
                tracing::warn!(%position, "release of a position in no live segment");
                return;
            };
            match segment
                .refs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |refs| {
                    refs.checked_sub(1)
                }) {
                Ok(previous) => previous == 1,
                Err(_) => {
                    tracing::warn!(%position, "release of a segment with no live references");
                    false
                }
            }
        };
        if now_free && core.gc_enabled.load(Ordering::SeqCst) {
            core.collect_garbage();
        }
    }

    /// Enables garbage collection and deletes the unreferenced prefix of the log now.
    pub fn collect_garbage(&self) {
        let core = &self.handle.core;
        core.gc_enabled.store(true, Ordering::SeqCst);
        core.collect_garbage();
    }

    /// Blocks until the segment files garbage collection gave up so far are deleted
    /// (deletion runs on a thread of its own).
    pub fn wait_for_deletions(&self) {
        self.handle.core.reaper.wait_idle();
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
        if let Err(error) = self.core.append_batch(&[], Durability::Lazy) {
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

impl Core {
    /// Raises the requested durability offset (bounded by what is written) and wakes the
    /// flusher.
    /// Returns the offset asked for: `end`, bounded by what is written.
    fn request(&self, end: u64) -> u64 {
        let mut writer = self.writer.lock();
        let end = end.min(writer.written);
        if end > writer.requested {
            writer.requested = end;
            self.flusher_wake.notify_all();
        }
        end
    }

    fn append_batch(
        &self,
        payloads: &[(&[u8], u32)],
        durability: Durability,
    ) -> Result<(Vec<Appended>, bool), StoreError> {
        let request = durability == Durability::Requested;
        for (payload, _) in payloads {
            if payload.len() > MAX_RECORD_SIZE {
                return Err(StoreError::RecordTooLarge {
                    len: payload.len(),
                    max: MAX_RECORD_SIZE,
                });
            }
        }
        let mut writer = self.writer.lock();
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        if writer.shutdown {
            return Err(StoreError::Closed);
        }
        let mut appended = Vec::with_capacity(payloads.len());
        let mut rolled = false;
        // Deferred records go first, through the same roll checks; they return no
        // position (nobody reads them back).
        let deferred = std::mem::take(&mut writer.deferred);
        writer.deferred_bytes = 0;
        let deferred_count = deferred.len();
        let records = deferred
            .iter()
            .map(|payload| (payload.as_slice(), 0, false))
            .chain(
                payloads
                    .iter()
                    .map(|&(payload, refs)| (payload, refs, true)),
            );
        // Where this call's records start in the active segment, when nothing of an
        // earlier call is pending: a failed write can then be undone by cutting back.
        let mut own = writer
            .pending
            .is_empty()
            .then_some((writer.active_len, 0u64));
        for (payload, refs, report) in records {
            let size = HEADER_LEN + payload.len() as u64;
            let at = writer.active_len;
            if at > MAGIC_LEN && at + size > self.segment_size {
                self.write_out(&mut writer, own)?;
                self.roll(&mut writer)?;
                rolled = true;
                own = Some((writer.active_len, 0));
            }
            let position = writer.active.base + writer.active_len;
            encode_record(&mut writer.pending, payload);
            writer.active_len += size;
            writer.written = writer.active.base + writer.active_len;
            // Counted at once: the active segment is never collected, and a release
            // may come before the write.
            writer
                .active
                .refs
                .fetch_add(u64::from(refs), Ordering::SeqCst);
            if let Some((_, own_refs)) = own.as_mut() {
                *own_refs += u64::from(refs);
            }
            if report {
                appended.push(Appended {
                    position: LogPosition(position),
                    len: u32::try_from(payload.len()).expect("checked against MAX_RECORD_SIZE"),
                    end: position + size,
                });
            }
        }
        // Records that asked for an fsync (or that no recovery needs) wait for the
        // flusher's write; a lazy record (a requeue count, a dead-letter copy that settles
        // a durable original) is handed to the OS before this returns, so that a process
        // crash keeps it.
        let defer = durability != Durability::Lazy
            && writer.active_len <= writer.preallocated
            && writer.pending.len() < PENDING_LIMIT;
        if !defer && let Err(error) = self.write_out(&mut writer, own) {
            if deferred_count > 0 {
                tracing::warn!(records = deferred_count, error = %error, "deferred records dropped with a failed write");
            }
            return Err(error);
        }
        self.appended_records
            .fetch_add((payloads.len() + deferred_count) as u64, Ordering::SeqCst);
        match self.policy {
            FsyncPolicy::Always => {
                if request {
                    writer.requested = writer.written;
                    self.flusher_wake.notify_all();
                }
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {
                // Confirmable once handed to the OS: at once if this call wrote, else as
                // soon as the flusher writes what is pending (one write for many appends).
                self.publish(self.flushed.load(Ordering::SeqCst));
                if request && !writer.pending.is_empty() {
                    writer.requested = writer.written;
                    self.flusher_wake.notify_all();
                }
            }
        }
        Ok((appended, rolled))
    }

    /// Hands the pending bytes to the OS (poisoning the store if that fails: they may
    /// belong to earlier appends that already returned).
    fn flush_pending(&self, writer: &mut Writer) -> Result<(), StoreError> {
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        self.write_out(writer, None)
    }

    /// Writes the pending bytes at `flushed_len`. `own` = (start, refs) of the records of
    /// the current append when they are all that is pending: a failure then cuts the
    /// file back to `start` and forgets them (a refused append, the store stays usable);
    /// otherwise a failure poisons the store.
    fn write_out(&self, writer: &mut Writer, own: Option<(u64, u64)>) -> Result<(), StoreError> {
        if writer.pending.is_empty() {
            return Ok(());
        }
        let offset = writer.flushed_len;
        if let Err(error) = writer.active.file.write_at(&writer.pending, offset) {
            let undo = own.filter(|(start, _)| *start == offset);
            let Some((start, refs)) = undo else {
                tracing::error!(error = %error, "writing pending log records failed");
                return Err(self.poison(writer, "writing pending log records", error));
            };
            // A short write may have left a torn record: cut the file back to the last
            // good record, so nothing torn sits before later appends. If even that
            // fails, the file's contents are unknown and the store must stop.
            return match writer.active.file.set_len(start) {
                Ok(()) => {
                    tracing::warn!(
                        segment = %writer.active.path.display(),
                        offset = start,
                        bytes = writer.pending.len(),
                        error = %error,
                        "segment write failed; cut back to the last good record"
                    );
                    writer.pending.clear();
                    writer.active_len = start;
                    writer.written = writer.active.base + start;
                    // The truncate freed the storage reserved beyond `start`: reserve it
                    // again, or write synchronously from now on (a deferred write must
                    // never be the one that finds the disk full).
                    writer.preallocated =
                        preallocate(writer.active.file.as_ref(), self.segment_size);
                    let _ =
                        writer
                            .active
                            .refs
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                                Some(r.saturating_sub(refs))
                            });
                    Err(StoreError::WriteFailed {
                        source: error,
                        context: "writing a segment".to_owned(),
                    })
                }
                Err(truncate_error) => {
                    tracing::error!(error = %error, "segment write failed");
                    Err(self.poison(
                        writer,
                        "cutting a failed segment write back",
                        truncate_error,
                    ))
                }
            };
        }
        writer.pending.clear();
        writer.flushed_len = writer.active_len;
        writer.active.len.store(writer.active_len, Ordering::SeqCst);
        self.flushed.store(writer.written, Ordering::SeqCst);
        Ok(())
    }

    /// Seals the active segment (fsynced) and starts the next one, named by its base
    /// offset = old base + old length. Its magic and directory entry are fsynced here,
    /// or under `Always` by the flusher before it publishes anything in it.
    fn roll(&self, writer: &mut Writer) -> Result<(), StoreError> {
        debug_assert!(
            writer.pending.is_empty(),
            "pending bytes are written before a roll"
        );
        let old = Arc::clone(&writer.active);
        if let Err(error) = self.sync_file(old.file.as_ref()) {
            return Err(self.poison(writer, "fsyncing a segment before roll", error));
        }
        // A second roll before the flusher synced the directory (lazy appends, which
        // wake no flusher, or one batch spanning segments): the older name must be
        // durable before a newer one, or a power cut could leave a gap between segments.
        if writer.unsynced_dir {
            if let Err(error) = self.fs.sync_dir(&self.log_dir) {
                return Err(self.poison(writer, "syncing the log directory before roll", error));
            }
            writer.unsynced_dir = false;
        }
        let base = old.base + writer.active_len;
        let path = self.log_dir.join(segment_file_name(base));
        let written = self.fs.open(&path, true).and_then(|file| {
            file.set_len(0)?;
            file.write_at(&MAGIC, 0)?;
            Ok(file)
        });
        let file = match written {
            Ok(file) => file,
            // Nothing points into the new file yet: remove it (durably: a stale empty
            // file named by an offset the old segment then grows past would overlap it
            // after a crash) and stay on the old segment, so a full disk is a refused
            // append, not a stopped node.
            Err(error) => {
                let removed = match self.fs.remove_file(&path) {
                    Err(remove_error) if remove_error.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
                .and_then(|()| self.fs.sync_dir(&self.log_dir));
                return match removed {
                    Err(remove_error) => {
                        tracing::error!(error = %error, "segment creation failed");
                        Err(self.poison(
                            writer,
                            "removing a segment that could not be created",
                            remove_error,
                        ))
                    }
                    Ok(()) => {
                        tracing::warn!(segment = %path.display(), error = %error, "segment creation failed; staying on the active segment");
                        Err(StoreError::WriteFailed {
                            source: error,
                            context: "creating a segment".to_owned(),
                        })
                    }
                };
            }
        };
        // Under `Always` the new segment's magic and directory entry are fsynced by the
        // flusher, before it publishes anything written into it: appends wait for one
        // fsync at a roll (the old segment's tail) instead of three. The old segment is
        // complete on disk, so a power cut before that leaves at most a torn last
        // segment, which recovery cuts or resets. Other policies publish on write, so
        // the roll makes the new segment durable itself.
        let defer_sync = self.policy == FsyncPolicy::Always;
        if !defer_sync {
            let synced = self
                .sync_file(file.as_ref())
                .and_then(|()| self.fs.sync_dir(&self.log_dir));
            if let Err(error) = synced {
                return Err(self.poison(writer, "creating a segment", error));
            }
        }
        let segment = Arc::new(Segment {
            base,
            path,
            file,
            len: AtomicU64::new(MAGIC_LEN),
            refs: AtomicU64::new(0),
        });
        let preallocated = preallocate(segment.file.as_ref(), self.segment_size);
        self.segments.write().insert(base, Arc::clone(&segment));
        writer.active = segment;
        writer.active_len = MAGIC_LEN;
        writer.written = base + MAGIC_LEN;
        writer.flushed_len = MAGIC_LEN;
        writer.preallocated = preallocated;
        self.flushed.store(writer.written, Ordering::SeqCst);
        if defer_sync {
            // The old segment is fsynced to its end; the new magic is not yet.
            writer.unsynced_dir = true;
            writer.synced = base;
            self.publish(base);
        } else {
            writer.synced = writer.written;
        }
        tracing::debug!(base, "segment rolled");
        Ok(())
    }

    /// Writes what is pending and fsyncs the active segment (and the log directory when a
    /// roll left its entry unsynced), with `writer` released during the fsync, then
    /// advances `synced` and publishes: the synced offset under `Always`, the offset
    /// handed to the OS under the other policies.
    fn sync_locked(&self, writer: &mut MutexGuard<'_, Writer>) -> Result<(), StoreError> {
        self.flush_pending(writer)?;
        let target = writer.written;
        let file = Arc::clone(&writer.active.file);
        let active_base = writer.active.base;
        let sync_dir = writer.unsynced_dir;
        let result = MutexGuard::unlocked(writer, || {
            self.sync_file(file.as_ref())?;
            if sync_dir {
                self.fs.sync_dir(&self.log_dir)?;
            }
            Ok(())
        });
        if let Err(error) = result {
            return Err(self.poison(
                writer,
                "fsyncing a segment (or the log directory after a roll)",
                error,
            ));
        }
        // A roll meanwhile synced this directory entry itself and set the flag anew for
        // the segment after it.
        if sync_dir && writer.active.base == active_base {
            writer.unsynced_dir = false;
        }
        if writer.poisoned.is_some() {
            return Err(StoreError::Poisoned);
        }
        if target > writer.synced {
            writer.synced = target;
        }
        if self.policy == FsyncPolicy::Always {
            self.publish(target);
        } else {
            self.publish(self.flushed.load(Ordering::SeqCst));
        }
        Ok(())
    }

    /// Under `Interval` and `Never`: writes what is pending when somebody waits for it
    /// (or anything written meanwhile by a read or a tick) and publishes it.
    fn write_requested(&self, writer: &mut Writer) {
        let published = match &*self.durable_tx.borrow() {
            Ok(durable) => *durable,
            Err(_) => return,
        };
        if writer.requested > published && self.flush_pending(writer).is_ok() {
            self.publish(self.flushed.load(Ordering::SeqCst));
        }
    }

    /// One fsync, serialised with all others; refuses once any fsync has failed.
    fn sync_file(&self, file: &dyn LogFile) -> io::Result<()> {
        let _guard = self.sync_lock.lock();
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(io::Error::other("an earlier fsync failed"));
        }
        match file.sync_data() {
            Ok(()) => {
                self.fsyncs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(error) => {
                self.sync_failed.store(true, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// Raises the confirmable offset to `offset`; never lowers it, never clears a poison.
    fn publish(&self, offset: u64) {
        self.durable_tx.send_if_modified(|current| match current {
            Ok(durable) if *durable < offset => {
                *durable = offset;
                true
            }
            _ => false,
        });
    }

    /// Poisons the store: no write or durability progress from now on.
    fn poison(&self, writer: &mut Writer, context: &'static str, error: io::Error) -> StoreError {
        if writer.poisoned.is_none() {
            tracing::error!(
                context,
                error = %error,
                written = writer.written,
                synced = writer.synced,
                "store poisoned: refusing further writes"
            );
            let poisoned = StorePoisoned {
                message: format!("{context}: {error}"),
            };
            writer.poisoned = Some(poisoned.clone());
            // The previous value (the last durable offset) is no longer of interest.
            let _previous = self.durable_tx.send_replace(Err(poisoned));
        }
        self.flusher_wake.notify_all();
        StoreError::Io {
            source: error,
            context: context.to_owned(),
        }
    }

    fn run_flusher(&self) {
        let mut writer = self.writer.lock();
        loop {
            if writer.shutdown || writer.poisoned.is_some() {
                return;
            }
            match self.policy {
                FsyncPolicy::Always => {
                    if writer.requested > writer.synced {
                        // A failure poisons the store; the loop then exits.
                        let _ = self.sync_locked(&mut writer);
                    } else {
                        self.flusher_wake.wait(&mut writer);
                    }
                }
                FsyncPolicy::Interval(period) => {
                    let deadline = Instant::now() + period;
                    while !writer.shutdown && writer.poisoned.is_none() {
                        self.write_requested(&mut writer);
                        if self
                            .flusher_wake
                            .wait_until(&mut writer, deadline)
                            .timed_out()
                        {
                            break;
                        }
                        MutexGuard::unlocked(&mut writer, std::thread::yield_now);
                    }
                    if !writer.shutdown
                        && writer.poisoned.is_none()
                        && writer.written > writer.synced
                    {
                        let _ = self.sync_locked(&mut writer);
                    }
                }
                FsyncPolicy::Never => {
                    self.write_requested(&mut writer);
                    self.flusher_wake.wait(&mut writer);
                    // Woken by the first append that waits: let the appends running
                    // alongside it join the batch (one write for ~35 instead of ~10).
                    MutexGuard::unlocked(&mut writer, std::thread::yield_now);
                }
            }
        }
    }

    fn segment_for(&self, position: LogPosition) -> Option<Arc<Segment>> {
        let segments = self.segments.read();
        segments
            .range(..=position.0)
            .next_back()
            .map(|(_, segment)| Arc::clone(segment))
    }

    /// Takes the longest prefix of unreferenced segments (never the active, last one) out
    /// of the table and hands it to the reaper, which unlinks them oldest first, each
    /// unlink made durable before the next, so a crash never leaves a newer segment
    /// deleted and an older one present, and only once the log is durable up to what is
    /// written now.
    fn collect_garbage(&self) {
        let _guard = self.gc_lock.lock();
        let mut dead = Vec::new();
        {
            let mut segments = self.segments.write();
            while segments.len() > 1 {
                let Some(entry) = segments.first_entry() else {
                    break;
                };
                if entry.get().refs.load(Ordering::SeqCst) != 0 {
                    break;
                }
                dead.push(entry.remove());
            }
        }
        if dead.is_empty() {
            return;
        }
        // Out of the table (reads now fail with NotFound). The files go on the reaper's
        // thread, in this order, once everything written by now is durable: that
        // includes whatever settled their last messages.
        let after = self.request(u64::MAX);
        for segment in dead {
            self.reaper.delete(segment, after);
        }
    }
}

/// Scans `log_dir`, visits every valid record, repairs the tail, and returns the segment
/// table (never empty: a fresh log gets segment 0).
fn recover(
    fs: &dyn FileSystem,
    log_dir: &Path,
    visit: &mut dyn FnMut(LogPosition, &[u8]),
) -> Result<BTreeMap<u64, Arc<Segment>>, StoreError> {
    let mut bases: Vec<u64> = fs
        .list_dir(log_dir)
        .map_err(StoreError::io(format!("listing {}", log_dir.display())))?
        .iter()
        .filter_map(|name| parse_segment_file_name(name))
        .collect();
    bases.sort_unstable();
    let mut segments = BTreeMap::new();
    let count = bases.len();
    for (index, base) in bases.into_iter().enumerate() {
        let is_last = index + 1 == count;
        let path = log_dir.join(segment_file_name(base));
        let io_error = |what: &str| StoreError::io(format!("{what} {}", path.display()));
        let file = fs.open(&path, false).map_err(io_error("opening"))?;
        let mut len = file.len().map_err(io_error("reading length of"))?;
        let mut magic = [0u8; MAGIC.len()];
        let magic_ok = len >= MAGIC_LEN && {
            file.read_at(&mut magic, 0).map_err(io_error("reading"))?;
            magic == MAGIC
        };
        if !magic_ok {
            if is_last {
                tracing::warn!(segment = %path.display(), lost_bytes = len, "segment without magic reset");
                file.set_len(0).map_err(io_error("truncating"))?;
                file.write_at(&MAGIC, 0)
                    .map_err(io_error("writing magic to"))?;
                file.sync_data().map_err(io_error("syncing"))?;
                len = MAGIC_LEN;
            } else {
                tracing::warn!(segment = %path.display(), lost_bytes = len, "sealed segment without magic skipped");
            }
        } else {
            let outcome = scan(file.as_ref(), base, len, &mut |position, payload| {
                visit(LogPosition(position), payload);
            })
            .map_err(io_error("scanning"))?;
            if let Some(reason) = outcome.torn {
                let offset = outcome.valid_len;
                let lost_bytes = len - offset;
                if is_last {
                    file.set_len(offset).map_err(io_error("truncating"))?;
                    file.sync_data().map_err(io_error("syncing"))?;
                    tracing::warn!(segment = %path.display(), offset, lost_bytes, reason, "torn tail cut");
                    len = offset;
                } else {
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        lost_bytes,
                        reason,
                        "corrupt record in a sealed segment; rest of the segment skipped"
                    );
                }
            }
        }
        segments.insert(
            base,
            Arc::new(Segment {
                base,
                path,
                file,
                len: AtomicU64::new(len),
                refs: AtomicU64::new(0),
            }),
        );
    }
    let sync_dir = |fs: &dyn FileSystem| {
        fs.sync_dir(log_dir)
            .map_err(StoreError::io(format!("syncing {}", log_dir.display())))
    };
    match segments.values().next_back() {
        Some(last) => {
            // Recovered bytes may exist only in the page cache (after a process crash);
            // make them durable before anything new builds on them.
            last.file
                .sync_data()
                .map_err(StoreError::io(format!("syncing {}", last.path.display())))?;
            sync_dir(fs)?;
        }
        None => {
            let path = log_dir.join(segment_file_name(0));
            let io_error = |what: &str| StoreError::io(format!("{what} {}", path.display()));
            let file = fs.open(&path, true).map_err(io_error("creating"))?;
            file.set_len(0).map_err(io_error("truncating"))?;
            file.write_at(&MAGIC, 0)
                .map_err(io_error("writing magic to"))?;
            file.sync_data().map_err(io_error("syncing"))?;
            sync_dir(fs)?;
            segments.insert(
                0,
                Arc::new(Segment {
                    base: 0,
                    path,
                    file,
                    len: AtomicU64::new(MAGIC_LEN),
                    refs: AtomicU64::new(0),
                }),
            );
        }
    }
    Ok(segments)
}
