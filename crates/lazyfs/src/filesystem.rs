//! The FUSE side: translates kernel requests into [`LazyState`] calls under one mutex.
//!
//! Every file is opened with `FOPEN_DIRECT_IO` and every entry and attribute has a zero
//! TTL, so the kernel caches nothing: each `pwrite` and `read` of the program under test
//! reaches the model, and nothing survives a `crash` in the kernel either.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::control;
use crate::model::{Attributes, CONTROL, CONTROL_NAME, Kind, LazyState, ROOT};

const TTL: Duration = Duration::ZERO;

/// The filesystem served over FUSE.
pub struct LazyFs {
    state: Mutex<LazyState>,
    backing: std::path::PathBuf,
    uid: u32,
    gid: u32,
}

impl LazyFs {
    /// A filesystem over `backing` (which must exist), owned by the backing directory's
    /// owner.
    ///
    /// # Errors
    /// When the backing directory cannot be read.
    pub fn new(backing: &Path) -> std::io::Result<LazyFs> {
        let metadata = std::fs::metadata(backing)?;
        Ok(LazyFs {
            state: Mutex::new(LazyState::open(backing)?),
            backing: backing.to_owned(),
            uid: metadata.uid(),
            gid: metadata.gid(),
        })
    }

    fn attr(&self, attributes: Attributes) -> FileAttr {
        let (kind, perm, nlink) = match attributes.kind {
            Kind::File => (FileType::RegularFile, 0o644, 1),
            Kind::Directory => (FileType::Directory, 0o755, 2),
        };
        FileAttr {
            ino: INodeNo(attributes.inode),
            size: attributes.size,
            blocks: attributes.size.div_ceil(512),
            atime: attributes.modified,
            mtime: attributes.modified,
            ctime: attributes.modified,
            crtime: attributes.modified,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn control_attr(&self) -> FileAttr {
        let mut attr = self.attr(Attributes {
            inode: CONTROL,
            kind: Kind::File,
            size: 0,
            modified: SystemTime::UNIX_EPOCH,
        });
        attr.perm = 0o600;
        attr
    }

    fn attributes(&self, inode: u64) -> Result<FileAttr, Errno> {
        if inode == CONTROL {
            return Ok(self.control_attr());
        }
        Ok(self.attr(self.state.lock().attributes(inode)?))
    }
}

impl Filesystem for LazyFs {
    /// The backing filesystem's figures: the broker checks free space (disk alarm) on
    /// its data directory, and fuser's default of zero blocks would look like a full
    /// disk. Pending (unsynced) bytes live in memory and are not counted.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.backing) {
            Ok(stats) => reply.statfs(
                stats.blocks(),
                stats.blocks_free(),
                stats.blocks_available(),
                stats.files(),
                stats.files_free(),
                u32::try_from(stats.block_size()).unwrap_or(4096),
                u32::try_from(stats.name_max()).unwrap_or(255),
                u32::try_from(stats.fragment_size()).unwrap_or(4096),
            ),
            Err(errno) => reply.error(Errno::from_i32(errno as i32)),
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == CONTROL_NAME {
            reply.entry(&TTL, &self.control_attr(), Generation(0));
            return;
        }
        match self.state.lock().lookup(parent.0, name) {
            Ok(attributes) => reply.entry(&TTL, &self.attr(attributes), Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attributes(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Only the size matters here; modes, owners and times are not modelled.
        if let (Some(size), true) = (size, ino.0 != CONTROL)
            && let Err(errno) = self.state.lock().set_len(ino.0, size)
        {
            reply.error(errno);
            return;
        }
        match self.attributes(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.state.lock().create_directory(parent.0, name) {
            Ok(attributes) => reply.entry(&TTL, &self.attr(attributes), Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 == ROOT && name == CONTROL_NAME {
            reply.error(Errno::EPERM);
            return;
        }
        match self.state.lock().unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state.lock().rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        match self
            .state
            .lock()
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attributes(ino.0) {
            Ok(attr) if attr.kind == FileType::RegularFile => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state.lock();
        if ino.0 == CONTROL {
            let status = control::status(&state);
            let bytes = status.as_bytes();
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            let end = start.saturating_add(size as usize).min(bytes.len());
            reply.data(&bytes[start..end]);
            return;
        }
        match state.read(ino.0, offset, size) {
            Ok(bytes) => reply.data(bytes),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state.lock();
        let result = if ino.0 == CONTROL {
            control::run(&mut state, data)
        } else {
            state.write(ino.0, offset, data)
        };
        match result.and_then(|()| u32::try_from(data.len()).map_err(|_| Errno::EFBIG)) {
            Ok(written) => reply.written(written),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state.lock().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    /// Only `FALLOC_FL_KEEP_SIZE` (reserve without growing), which the store uses so
    /// its deferred writes cannot fail for space. Unsynced bytes live in memory here, so
    /// there is nothing to reserve: accepting it lets the power-loss tests run the store's
    /// deferred-write path, as on ext4.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const FALLOC_FL_KEEP_SIZE: i32 = 1;
        if mode != FALLOC_FL_KEEP_SIZE {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        match self.attributes(ino.0) {
            Ok(attr) if attr.kind == FileType::RegularFile => reply.ok(),
            Ok(_) => reply.error(Errno::EISDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attributes(ino.0) {
            Ok(attr) if attr.kind == FileType::Directory => {
                reply.opened(FileHandle(0), FopenFlags::empty());
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.state.lock().list(ino.0) {
            Ok(entries) => entries,
            Err(errno) => {
                reply.error(errno);
                return;
            }
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".").to_owned()),
            (ROOT, FileType::Directory, OsStr::new("..").to_owned()),
        ];
        let listed = entries.into_iter().map(|(name, child, kind)| {
            let kind = match kind {
                Kind::File => FileType::RegularFile,
                Kind::Directory => FileType::Directory,
            };
            (child, kind, name)
        });
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (child, kind, name)) in dots.into_iter().chain(listed).enumerate().skip(skip) {
            if reply.add(INodeNo(child), index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state.lock().fsync_directory(ino.0) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state.lock();
        let result = match state.lookup(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(existing) if existing.kind == Kind::Directory => Err(Errno::EISDIR),
            Ok(existing) if flags & libc::O_TRUNC != 0 => state
                .set_len(existing.inode, 0)
                .and_then(|()| state.attributes(existing.inode)),
            Ok(existing) => Ok(existing),
            Err(_) => state.create_file(parent.0, name),
        };
        drop(state);
        match result {
            Ok(attributes) => reply.created(
                &TTL,
                &self.attr(attributes),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(errno) => reply.error(errno),
        }
    }
}
