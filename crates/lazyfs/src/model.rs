//! The lazy model: every file and directory as the running program sees it (`current`)
//! and as it would be after a power loss (`synced` bytes, `durable` names), with no FUSE in
//! it so that it can be tested directly.
//!
//! The backing directory always holds exactly the durable tree: the names made durable by
//! a directory fsync, each with the bytes made durable by a file fsync. A file fsync
//! applies only the dirty ranges of that file to its durable paths; a directory fsync
//! applies the name changes in that directory. [`LazyState::crash`] forgets everything in
//! memory and reloads the backing directory under fresh inode numbers, so the state after
//! a crash is, by construction, what a restart of this filesystem would see too.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fuser::Errno;

/// Inode number of the mount root.
pub const ROOT: u64 = 1;
/// Inode number of the control file.
pub const CONTROL: u64 = 2;
/// Name of the control file in the mount root (hidden from `readdir`).
pub const CONTROL_NAME: &str = ".lazyfs-control";
const FIRST_INODE: u64 = 3;

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// What `getattr` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    /// Inode number.
    pub inode: u64,
    /// File or directory.
    pub kind: Kind,
    /// Current length in bytes (0 for directories).
    pub size: u64,
    /// Last change through this filesystem.
    pub modified: SystemTime,
}

/// Counters, reported by reading the control file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful file and directory fsyncs.
    pub fsyncs: u64,
    /// Fsyncs answered with `EIO` because of `fail-fsync`.
    pub failed_fsyncs: u64,
    /// Crashes simulated.
    pub crashes: u64,
    /// Dirty bytes thrown away by all crashes so far.
    pub dropped_bytes: u64,
    /// Directory entries whose creation, rename or removal was thrown away by crashes.
    pub dropped_entries: u64,
    /// Unsynced pages that torn crashes let reach the disk.
    pub torn_pages: u64,
}

struct FileNode {
    current: Vec<u8>,
    synced: Vec<u8>,
    /// Sorted, disjoint half-open ranges of `current` that may differ from `synced`
    /// (a truncation dirties everything from the new length on).
    dirty: Vec<(u64, u64)>,
    modified: SystemTime,
}

impl FileNode {
    fn new(bytes: Vec<u8>) -> FileNode {
        FileNode {
            current: bytes.clone(),
            synced: bytes,
            dirty: Vec::new(),
            modified: SystemTime::now(),
        }
    }

    fn mark_dirty(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        let mut kept = Vec::with_capacity(self.dirty.len() + 1);
        for &(from, to) in &self.dirty {
            if to < start || from > end {
                kept.push((from, to));
            } else {
                start = start.min(from);
                end = end.max(to);
            }
        }
        let at = kept.partition_point(|&(from, _)| from < start);
        kept.insert(at, (start, end));
        self.dirty = kept;
    }

    /// Dirty ranges clipped to the current length.
    fn dirty_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let len = self.current.len() as u64;
        self.dirty.iter().filter_map(move |&(from, to)| {
            let to = to.min(len);
            (from < to).then_some((from as usize, to as usize))
        })
    }

    fn dirty_bytes(&self) -> u64 {
        let ranges: u64 = self
            .dirty_ranges()
            .map(|(from, to)| (to - from) as u64)
            .sum();
        // A pending shrink counts as the bytes it would cut.
        ranges + (self.synced.len() as u64).saturating_sub(self.current.len() as u64)
    }
}

struct DirectoryNode {
    current: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    modified: SystemTime,
}

enum Node {
    File(FileNode),
    Directory(DirectoryNode),
}

/// The whole filesystem: current view, durable view, and the backing directory that
/// mirrors the durable view.
pub struct LazyState {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    next_inode: u64,
    fail_fsync: bool,
    stats: Stats,
}

fn backing_error(error: io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(Errno::EIO.code()))
}

impl LazyState {
    /// Loads the backing directory as the initial (fully durable) state.
    ///
    /// # Errors
    /// When the backing directory cannot be read.
    pub fn open(backing: &Path) -> io::Result<LazyState> {
        let mut state = LazyState {
            backing: backing.to_owned(),
            nodes: HashMap::new(),
            next_inode: FIRST_INODE,
            fail_fsync: false,
            stats: Stats::default(),
        };
        state.load()?;
        Ok(state)
    }

    fn load(&mut self) -> io::Result<()> {
        self.nodes.clear();
        let root = self.load_directory(&self.backing.clone())?;
        self.nodes.insert(ROOT, root);
        Ok(())
    }

    fn load_directory(&mut self, path: &Path) -> io::Result<Node> {
        let mut names = BTreeMap::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            if path == self.backing && name == CONTROL_NAME {
                continue;
            }
            let file_type = entry.file_type()?;
            let node = if file_type.is_dir() {
                self.load_directory(&entry.path())?
            } else if file_type.is_file() {
                Node::File(FileNode::new(fs::read(entry.path())?))
            } else {
                continue;
            };
            let inode = self.allocate(node);
            names.insert(name, inode);
        }
        Ok(Node::Directory(DirectoryNode {
            current: names.clone(),
            durable: names,
            modified: SystemTime::now(),
        }))
    }

    fn allocate(&mut self, node: Node) -> u64 {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.nodes.insert(inode, node);
        inode
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether fsyncs currently fail.
    #[must_use]
    pub fn failing_fsync(&self) -> bool {
        self.fail_fsync
    }

    /// Bytes written but not yet fsynced, over all files.
    #[must_use]
    pub fn pending_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|node| match node {
                Node::File(file) => file.dirty_bytes(),
                Node::Directory(_) => 0,
            })
            .sum()
    }

    /// Directory entries created, renamed or removed but not yet made durable.
    #[must_use]
    pub fn pending_entries(&self) -> u64 {
        self.nodes
            .values()
            .map(|node| match node {
                Node::File(_) => 0,
                Node::Directory(dir) => names_differing(&dir.current, &dir.durable),
            })
            .sum()
    }

    /// Power loss: everything not fsynced is gone. Inode numbers change, so handles
    /// opened before the crash answer `ESTALE`.
    ///
    /// # Errors
    /// When the backing directory cannot be reloaded.
    pub fn crash(&mut self) -> io::Result<()> {
        self.stats.crashes += 1;
        self.stats.dropped_bytes += self.pending_bytes();
        self.stats.dropped_entries += self.pending_entries();
        self.load()
    }

    /// Power loss as a real disk sees it: of the pages written since the last fsync, a
    /// random half (chosen from `seed`) reached the disk before the power went, in no
    /// particular order; the rest is gone. A page that reached the disk past the synced
    /// end extends the file, and the pages before it that did not are holes (zeros).
    /// Directory changes not fsynced are lost as in [`LazyState::crash`].
    ///
    /// # Errors
    /// When the backing files cannot be written or reloaded.
    pub fn crash_torn(&mut self, seed: u64) -> io::Result<()> {
        const PAGE: usize = 4096;
        let mut random = seed | 1;
        let mut coin = move || {
            // xorshift64: enough to pick pages.
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random & 1 == 1
        };
        let inodes: Vec<u64> = self.nodes.keys().copied().collect();
        for inode in inodes {
            let Some(Node::File(file)) = self.nodes.get(&inode) else {
                continue;
            };
            let mut pages: Vec<(usize, usize)> = Vec::new();
            for (from, to) in file.dirty_ranges() {
                let mut page = from / PAGE * PAGE;
                while page < to {
                    let (start, end) = (page.max(from), (page + PAGE).min(to));
                    if coin() {
                        pages.push((start, end));
                    }
                    page += PAGE;
                }
            }
            if pages.is_empty() {
                continue;
            }
            let written: Vec<(usize, Vec<u8>)> = pages
                .iter()
                .map(|&(from, to)| (from, file.current[from..to].to_vec()))
                .collect();
            // A file whose name is not durable yet is gone whole, torn or not.
            let paths = self.durable_paths(inode);
            for path in &paths {
                let backing = fs::OpenOptions::new().write(true).open(path)?;
                for (offset, bytes) in &written {
                    backing.write_all_at(bytes, *offset as u64)?;
                }
            }
            if !paths.is_empty() {
                self.stats.torn_pages += written.len() as u64;
            }
        }
        self.crash()
    }

    /// From now on every fsync fails with `EIO` (`true`), or works again (`false`).
    pub fn set_fail_fsync(&mut self, fail: bool) {
        self.fail_fsync = fail;
    }

    fn file(&self, inode: u64) -> Result<&FileNode, Errno> {
        match self.nodes.get(&inode) {
            Some(Node::File(file)) => Ok(file),
            Some(Node::Directory(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ESTALE),
        }
    }

    fn file_mut(&mut self, inode: u64) -> Result<&mut FileNode, Errno> {
        match self.nodes.get_mut(&inode) {
            Some(Node::File(file)) => Ok(file),
            Some(Node::Directory(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ESTALE),
        }
    }

    fn directory(&self, inode: u64) -> Result<&DirectoryNode, Errno> {
        match self.nodes.get(&inode) {
            Some(Node::Directory(dir)) => Ok(dir),
            Some(Node::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ESTALE),
        }
    }

    fn directory_mut(&mut self, inode: u64) -> Result<&mut DirectoryNode, Errno> {
        match self.nodes.get_mut(&inode) {
            Some(Node::Directory(dir)) => Ok(dir),
            Some(Node::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ESTALE),
        }
    }

    /// Attributes of `inode`.
    ///
    /// # Errors
    /// `ESTALE` for an unknown inode.
    pub fn attributes(&self, inode: u64) -> Result<Attributes, Errno> {
        match self.nodes.get(&inode) {
            Some(Node::File(file)) => Ok(Attributes {
                inode,
                kind: Kind::File,
                size: file.current.len() as u64,
                modified: file.modified,
            }),
            Some(Node::Directory(dir)) => Ok(Attributes {
                inode,
                kind: Kind::Directory,
                size: 0,
                modified: dir.modified,
            }),
            None => Err(Errno::ESTALE),
        }
    }

    /// Looks `name` up in directory `parent`.
    ///
    /// # Errors
    /// `ENOENT` if there is no such entry.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attributes, Errno> {
        let dir = self.directory(parent)?;
        let inode = *dir.current.get(name).ok_or(Errno::ENOENT)?;
        self.attributes(inode)
    }

    /// Entries of directory `inode` (without `.` and `..`), sorted by name.
    ///
    /// # Errors
    /// `ENOTDIR`, `ESTALE`.
    pub fn list(&self, inode: u64) -> Result<Vec<(OsString, u64, Kind)>, Errno> {
        let dir = self.directory(inode)?;
        Ok(dir
            .current
            .iter()
            .filter_map(|(name, &child)| {
                let kind = match self.nodes.get(&child)? {
                    Node::File(_) => Kind::File,
                    Node::Directory(_) => Kind::Directory,
                };
                Some((name.clone(), child, kind))
            })
            .collect())
    }

    fn check_new_name(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if parent == ROOT && name == CONTROL_NAME {
            return Err(Errno::EEXIST);
        }
        if self.directory(parent)?.current.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    /// Creates an empty file (its name is pending until `parent` is fsynced).
    ///
    /// # Errors
    /// `EEXIST` if the name is taken.
    pub fn create_file(&mut self, parent: u64, name: &OsStr) -> Result<Attributes, Errno> {
        self.check_new_name(parent, name)?;
        let inode = self.allocate(Node::File(FileNode {
            current: Vec::new(),
            synced: Vec::new(),
            dirty: Vec::new(),
            modified: SystemTime::now(),
        }));
        self.insert_name(parent, name, inode)?;
        self.attributes(inode)
    }

    /// Creates an empty directory (pending until `parent` is fsynced).
    ///
    /// # Errors
    /// `EEXIST` if the name is taken.
    pub fn create_directory(&mut self, parent: u64, name: &OsStr) -> Result<Attributes, Errno> {
        self.check_new_name(parent, name)?;
        let inode = self.allocate(Node::Directory(DirectoryNode {
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            modified: SystemTime::now(),
        }));
        self.insert_name(parent, name, inode)?;
        self.attributes(inode)
    }

    fn insert_name(&mut self, parent: u64, name: &OsStr, inode: u64) -> Result<(), Errno> {
        let dir = self.directory_mut(parent)?;
        dir.current.insert(name.to_owned(), inode);
        dir.modified = SystemTime::now();
        Ok(())
    }

    /// Removes a file name (pending until `parent` is fsynced).
    ///
    /// # Errors
    /// `ENOENT`, `EISDIR`.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let inode = *self
            .directory(parent)?
            .current
            .get(name)
            .ok_or(Errno::ENOENT)?;
        self.file(inode)?;
        self.remove_name(parent, name)
    }

    /// Removes an empty directory (pending until `parent` is fsynced).
    ///
    /// # Errors
    /// `ENOENT`, `ENOTDIR`, `ENOTEMPTY`.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let inode = *self
            .directory(parent)?
            .current
            .get(name)
            .ok_or(Errno::ENOENT)?;
        if !self.directory(inode)?.current.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_name(parent, name)
    }

    fn remove_name(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let dir = self.directory_mut(parent)?;
        dir.current.remove(name);
        dir.modified = SystemTime::now();
        Ok(())
    }

    /// Renames, replacing a file (or an empty directory) at the target; pending until
    /// both directories are fsynced. `no_replace` is `RENAME_NOREPLACE`.
    ///
    /// # Errors
    /// `ENOENT`, `EEXIST` (with `no_replace`), `EISDIR`/`ENOTDIR`/`ENOTEMPTY` for a target
    /// of the wrong kind, `EINVAL` when a directory would move into itself.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        if (parent == ROOT && name == CONTROL_NAME)
            || (new_parent == ROOT && new_name == CONTROL_NAME)
        {
            return Err(Errno::EPERM);
        }
        let inode = *self
            .directory(parent)?
            .current
            .get(name)
            .ok_or(Errno::ENOENT)?;
        let moving_directory = matches!(self.nodes.get(&inode), Some(Node::Directory(_)));
        if moving_directory && self.is_within(new_parent, inode) {
            return Err(Errno::EINVAL);
        }
        if let Some(&target) = self.directory(new_parent)?.current.get(new_name) {
            if target == inode {
                return Ok(());
            }
            if no_replace {
                return Err(Errno::EEXIST);
            }
            match (moving_directory, self.nodes.get(&target)) {
                (false, Some(Node::Directory(_))) => return Err(Errno::EISDIR),
                (true, Some(Node::File(_))) => return Err(Errno::ENOTDIR),
                (true, Some(Node::Directory(dir))) if !dir.current.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                _ => {}
            }
        }
        self.remove_name(parent, name)?;
        self.insert_name(new_parent, new_name, inode)
    }

    /// Whether `inode` is `ancestor` or below it in the current tree.
    fn is_within(&self, inode: u64, ancestor: u64) -> bool {
        if inode == ancestor {
            return true;
        }
        match self.nodes.get(&ancestor) {
            Some(Node::Directory(dir)) => dir
                .current
                .values()
                .any(|&child| self.is_within(inode, child)),
            _ => false,
        }
    }

    /// Reads up to `size` bytes at `offset`.
    ///
    /// # Errors
    /// `EISDIR`, `ESTALE`.
    pub fn read(&self, inode: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        let file = self.file(inode)?;
        let len = file.current.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
        let end = start.saturating_add(size as usize).min(len);
        Ok(&file.current[start..end])
    }

    /// Writes `data` at `offset` (in memory only).
    ///
    /// # Errors
    /// `EISDIR`, `ESTALE`, `EFBIG` past 4 GiB (all of it is held in memory).
    pub fn write(&mut self, inode: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let file = self.file_mut(inode)?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= 1 << 32)
            .ok_or(Errno::EFBIG)?;
        let (start, stop) = (offset as usize, end as usize);
        if file.current.len() < stop {
            file.current.resize(stop, 0);
        }
        file.current[start..stop].copy_from_slice(data);
        file.mark_dirty(offset, end);
        file.modified = SystemTime::now();
        Ok(())
    }

    /// Truncates or extends (in memory only).
    ///
    /// # Errors
    /// `EISDIR`, `ESTALE`, `EFBIG`.
    pub fn set_len(&mut self, inode: u64, len: u64) -> Result<(), Errno> {
        if len > 1 << 32 {
            return Err(Errno::EFBIG);
        }
        let file = self.file_mut(inode)?;
        let old = file.current.len() as u64;
        file.current.resize(len as usize, 0);
        file.mark_dirty(len.min(old), u64::MAX);
        file.modified = SystemTime::now();
        Ok(())
    }

    /// Makes the data of `inode` durable: applies its dirty ranges to every durable path
    /// of it in the backing directory. For a directory, see [`LazyState::fsync_directory`].
    ///
    /// # Errors
    /// `EIO` while `fail-fsync` is on, or when the backing directory cannot be written.
    pub fn fsync(&mut self, inode: u64) -> Result<(), Errno> {
        if matches!(self.nodes.get(&inode), Some(Node::Directory(_))) {
            return self.fsync_directory(inode);
        }
        if inode == CONTROL {
            return Ok(());
        }
        if self.fail_fsync {
            self.stats.failed_fsyncs += 1;
            return Err(Errno::EIO);
        }
        let paths = self.durable_paths(inode);
        let file = self.file_mut(inode)?;
        let len = file.current.len();
        let ranges: Vec<(usize, usize)> = file.dirty_ranges().collect();
        for path in &paths {
            let backing = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(backing_error)?;
            backing.set_len(len as u64).map_err(backing_error)?;
            for &(from, to) in &ranges {
                backing
                    .write_all_at(&file.current[from..to], from as u64)
                    .map_err(backing_error)?;
            }
        }
        file.synced.resize(len, 0);
        for &(from, to) in &ranges {
            file.synced[from..to].copy_from_slice(&file.current[from..to]);
        }
        file.dirty.clear();
        self.stats.fsyncs += 1;
        Ok(())
    }

    /// Makes the names in directory `inode` durable: creations, renames and removals
    /// done in it so far survive a crash (with the synced bytes of the files named).
    ///
    /// # Errors
    /// `EIO` while `fail-fsync` is on, or when the backing directory cannot be written.
    pub fn fsync_directory(&mut self, inode: u64) -> Result<(), Errno> {
        if self.fail_fsync {
            self.stats.failed_fsyncs += 1;
            return Err(Errno::EIO);
        }
        let paths = self.durable_paths(inode);
        let dir = self.directory(inode)?;
        let removed: Vec<OsString> = dir
            .durable
            .iter()
            .filter(|(name, child)| dir.current.get(*name) != Some(*child))
            .map(|(name, _)| name.clone())
            .collect();
        let added: Vec<(OsString, u64)> = dir
            .current
            .iter()
            .filter(|(name, child)| dir.durable.get(*name) != Some(*child))
            .map(|(name, &child)| (name.clone(), child))
            .collect();
        for path in &paths {
            for name in &removed {
                remove_backing(&path.join(name)).map_err(backing_error)?;
            }
            for (name, child) in &added {
                let target = path.join(name);
                remove_backing(&target).map_err(backing_error)?;
                self.materialize(*child, &target).map_err(backing_error)?;
            }
        }
        let dir = self.directory_mut(inode)?;
        dir.durable = dir.current.clone();
        self.stats.fsyncs += 1;
        Ok(())
    }

    /// Writes the durable state of `inode` (synced bytes, or durable names recursively)
    /// at `path` in the backing directory.
    fn materialize(&self, inode: u64, path: &Path) -> io::Result<()> {
        match self.nodes.get(&inode) {
            Some(Node::File(file)) => fs::write(path, &file.synced),
            Some(Node::Directory(dir)) => {
                fs::create_dir(path)?;
                for (name, &child) in &dir.durable {
                    self.materialize(child, &path.join(name))?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Where `inode` lives in the backing directory: every path reachable from the root
    /// through durable names only.
    fn durable_paths(&self, inode: u64) -> Vec<PathBuf> {
        let mut found = Vec::new();
        self.collect_durable_paths(ROOT, &self.backing, inode, &mut found);
        found
    }

    fn collect_durable_paths(&self, at: u64, path: &Path, wanted: u64, found: &mut Vec<PathBuf>) {
        if at == wanted {
            found.push(path.to_owned());
        }
        if let Some(Node::Directory(dir)) = self.nodes.get(&at) {
            for (name, &child) in &dir.durable {
                self.collect_durable_paths(child, &path.join(name), wanted, found);
            }
        }
    }
}

/// Names whose entry differs between the two maps (added, removed or replaced).
fn names_differing(current: &BTreeMap<OsString, u64>, durable: &BTreeMap<OsString, u64>) -> u64 {
    let changed = current
        .iter()
        .filter(|(name, child)| durable.get(*name) != Some(*child))
        .count();
    let removed = durable
        .keys()
        .filter(|name| !current.contains_key(*name))
        .count();
    (changed + removed) as u64
}

fn remove_backing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests;
