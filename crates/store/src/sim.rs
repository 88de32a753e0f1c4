//! An in-memory [`FileSystem`] that models what survives a power cut, after Jepsen's
//! LazyFS: each file keeps its written bytes and, apart, the bytes as of its last
//! successful `sync_data`; each directory keeps its current names and, apart, the names as
//! of its last `sync_dir`. [`SimFileSystem::power_loss`] kills the running instance (every
//! later operation on it fails with `EIO`) and returns a fresh one holding only the
//! durable state. `fail_sync` makes every `sync_data` fail, for poisoning tests, and
//! `fail_writes` every `write_at`;
//! `set_free_space` models a nearly full disk: a write that grows files past the free
//! space writes what fits, then fails with `ENOSPC`, as a real short write would.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::file_layer::{FileSystem, LockGuard, LogFile};

#[derive(Default)]
struct Flags {
    dead: AtomicBool,
    fail_sync: AtomicBool,
    fail_dir_sync: AtomicBool,
    /// Every `write_at` fails with `EIO` (nothing written).
    fail_writes: AtomicBool,
    /// Bytes files may still grow by; `None` is unlimited.
    free_space: Mutex<Option<u64>>,
    /// How long each `sync_data` takes, µs (a real disk's flush is slow while metadata
    /// operations such as unlink return at once; races between the two need that).
    sync_delay_micros: std::sync::atomic::AtomicU64,
}

impl Flags {
    fn check_alive(&self) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(io::Error::other("simulated machine is powered off"))
        } else {
            Ok(())
        }
    }
}

#[derive(Default)]
struct Contents {
    current: Vec<u8>,
    synced: Vec<u8>,
    /// Bytes of space reserved by `preallocate` (writes below it cost no free space).
    reserved: usize,
}

struct SimFile {
    contents: Mutex<Contents>,
    flags: Arc<Flags>,
}

impl LogFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.flags.check_alive()?;
        if self.flags.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut contents = self.contents.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let mut end = start + buf.len();
        let mut result = Ok(());
        if let Some(free) = self.flags.free_space.lock().as_mut() {
            let allocated = contents.current.len().max(contents.reserved);
            let growth = end.saturating_sub(allocated) as u64;
            if growth > *free {
                end -= usize::try_from(growth - *free).map_err(io::Error::other)?;
                *free = 0;
                result = Err(io::Error::from(io::ErrorKind::StorageFull));
            } else {
                *free -= growth;
            }
        }
        if contents.current.len() < end {
            contents.current.resize(end, 0);
        }
        if end > start {
            contents.current[start..end].copy_from_slice(&buf[..end - start]);
        }
        result
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.flags.check_alive()?;
        let contents = self.contents.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let source = contents
            .current
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.flags.check_alive()?;
        if self.flags.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let delay = self.flags.sync_delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            // What was handed over before the flush started is what it makes durable.
            let snapshot = self.contents.lock().current.clone();
            std::thread::sleep(std::time::Duration::from_micros(delay));
            self.flags.check_alive()?;
            let mut contents = self.contents.lock();
            if contents.synced.len() <= snapshot.len() {
                contents.synced = snapshot;
            }
            return Ok(());
        }
        let mut contents = self.contents.lock();
        contents.synced = contents.current.clone();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.flags.check_alive()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut contents = self.contents.lock();
        // As on ext4, a truncate (to the current length too) frees what was reserved
        // beyond the new end.
        let reserved_after = if len <= contents.current.len() {
            contents.reserved.min(len)
        } else {
            contents.reserved
        };
        if let Some(free) = self.flags.free_space.lock().as_mut() {
            let before = contents.current.len().max(contents.reserved);
            let after = len.max(reserved_after);
            if after > before {
                let growth = (after - before) as u64;
                if growth > *free {
                    return Err(io::Error::from(io::ErrorKind::StorageFull));
                }
                *free -= growth;
            } else {
                *free += (before - after) as u64;
            }
        }
        contents.reserved = reserved_after;
        contents.current.resize(len, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.flags.check_alive()?;
        Ok(self.contents.lock().current.len() as u64)
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        self.flags.check_alive()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut contents = self.contents.lock();
        let allocated = contents.current.len().max(contents.reserved);
        if len > allocated {
            if let Some(free) = self.flags.free_space.lock().as_mut() {
                let growth = (len - allocated) as u64;
                if growth > *free {
                    return Err(io::Error::from(io::ErrorKind::StorageFull));
                }
                *free -= growth;
            }
            contents.reserved = len;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Namespace {
    current: HashMap<PathBuf, Arc<SimFile>>,
    durable: HashMap<PathBuf, Arc<SimFile>>,
}

/// See the module docs.
#[derive(Clone, Default)]
pub struct SimFileSystem {
    namespace: Arc<Mutex<Namespace>>,
    flags: Arc<Flags>,
}

impl SimFileSystem {
    /// Makes every later `sync_data` fail with `EIO` (or succeed again).
    pub fn set_fail_sync(&self, fail: bool) {
        self.flags.fail_sync.store(fail, Ordering::SeqCst);
    }

    /// Makes every later `sync_dir` fail with `EIO` (or succeed again).
    pub fn set_fail_dir_sync(&self, fail: bool) {
        self.flags.fail_dir_sync.store(fail, Ordering::SeqCst);
    }

    /// Makes every later `write_at` fail with `EIO` (or succeed again).
    pub fn set_fail_writes(&self, fail: bool) {
        self.flags.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Makes every later `sync_data` take `delay`.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.flags.sync_delay_micros.store(micros, Ordering::SeqCst);
    }

    /// Lets files grow by only `free` more bytes (`None`: unlimited again).
    pub fn set_free_space(&self, free: Option<u64>) {
        *self.flags.free_space.lock() = free;
    }

    /// Cuts the power: this instance fails every operation from now on; the returned one
    /// holds exactly what was durable.
    pub fn power_loss(&self) -> SimFileSystem {
        self.cut_power(None)
    }

    /// Cuts the power as a real disk would: besides what was durable, a random subset of
    /// the pages written since the last sync reached the disk (written back partially
    /// and out of order). A page that did not is a hole (zeros) if a later one did, so a
    /// file may end in a random prefix of its unsynced tail, with holes in it.
    pub fn power_loss_torn(&self, rng: &mut impl rand::Rng) -> SimFileSystem {
        self.cut_power(Some(rng))
    }

    fn cut_power(&self, mut torn: Option<&mut dyn rand::RngCore>) -> SimFileSystem {
        let namespace = self.namespace.lock();
        self.flags.dead.store(true, Ordering::SeqCst);
        let flags = Arc::new(Flags::default());
        let mut survivor = Namespace::default();
        for (path, file) in &namespace.durable {
            let bytes = {
                let contents = file.contents.lock();
                match torn.as_deref_mut() {
                    Some(rng) => written_back(&contents, rng),
                    None => contents.synced.clone(),
                }
            };
            let file = Arc::new(SimFile {
                contents: Mutex::new(Contents {
                    current: bytes.clone(),
                    synced: bytes,
                    reserved: 0,
                }),
                flags: Arc::clone(&flags),
            });
            survivor.current.insert(path.clone(), Arc::clone(&file));
            survivor.durable.insert(path.clone(), file);
        }
        SimFileSystem {
            namespace: Arc::new(Mutex::new(survivor)),
            flags,
        }
    }
}

/// The page size of the torn write-back model.
const PAGE: usize = 4096;

/// What of a file reaches the disk in a torn power cut: the synced bytes, and each page
/// written since (one that differs from the synced bytes, or lies past them) with
/// probability 1/2.
fn written_back(contents: &Contents, rng: &mut dyn rand::RngCore) -> Vec<u8> {
    use rand::Rng;
    let synced = &contents.synced;
    let current = &contents.current;
    let mut result = synced.clone();
    let pages = current.len().max(synced.len()).div_ceil(PAGE);
    for page in 0..pages {
        let from = page * PAGE;
        let to = ((page + 1) * PAGE).min(current.len());
        if from >= to {
            continue;
        }
        let dirty = to > synced.len() || current[from..to] != synced[from..to];
        if dirty && rng.random_bool(0.5) {
            if result.len() < to {
                result.resize(to, 0);
            }
            result[from..to].copy_from_slice(&current[from..to]);
        }
    }
    result
}

impl FileSystem for SimFileSystem {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories themselves are modelled as always present and durable.
        self.flags.check_alive()
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.flags.check_alive()?;
        let namespace = self.namespace.lock();
        Ok(namespace
            .current
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        self.flags.check_alive()?;
        let mut namespace = self.namespace.lock();
        if let Some(file) = namespace.current.get(path) {
            return Ok(Arc::clone(file) as Arc<dyn LogFile>);
        }
        if !create {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let file = Arc::new(SimFile {
            contents: Mutex::new(Contents::default()),
            flags: Arc::clone(&self.flags),
        });
        namespace
            .current
            .insert(path.to_path_buf(), Arc::clone(&file));
        Ok(file)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.flags.check_alive()?;
        self.namespace
            .lock()
            .current
            .remove(path)
            .map(drop)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.flags.check_alive()?;
        let mut namespace = self.namespace.lock();
        let file = namespace
            .current
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        namespace.current.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.flags.check_alive()?;
        if self.flags.fail_dir_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut namespace = self.namespace.lock();
        namespace.durable.retain(|path, _| parent_dir(path) != dir);
        let entries: Vec<_> = namespace
            .current
            .iter()
            .filter(|(path, _)| parent_dir(path) == dir)
            .map(|(path, file)| (path.clone(), Arc::clone(file)))
            .collect();
        namespace.durable.extend(entries);
        Ok(())
    }

    fn try_lock(&self, _path: &Path) -> io::Result<Option<LockGuard>> {
        self.flags.check_alive()?;
        Ok(Some(Box::new(())))
    }
}

/// The directory `path` lives in.
fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
