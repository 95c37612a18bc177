//! The in-memory filesystem behind [`super::LazyFs`]: a tree of inodes, each
//! with a *current* state (what processes see) and a *durable* state (what
//! would survive a power cut), as on a disk with a volatile write cache.
//!
//! - A file's contents and size: `write`, `set_len` and `fallocate` change
//!   the current copy; `fsync` (or `fdatasync`) of the file makes it durable.
//! - A directory's entries: `create`, `mkdir`, `unlink`, `rmdir` and
//!   `rename` change the current entries of the directories they touch;
//!   `fsyncdir` of a directory makes its entries durable. Nothing else does:
//!   neither an `fsync` of a new file (its name is the directory's business)
//!   nor an `fsync` of the parent's parent. This is the strict reading of
//!   POSIX that real filesystems are allowed to be, so a program that passes
//!   here does not depend on ext4's kindness.
//! - Attributes other than the size (mode, owner, times) are not modelled
//!   as volatile: they keep their current value across a cut.
//!
//! [`Model::power_cut`] throws away everything that is not durable. Every
//! operation here is what a FUSE callback calls; errors are `Errno`s to
//! reply with, and nothing panics on any input.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::contents::{Contents, PAGE_SIZE};
use crate::rng::Rng;

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// The largest file size accepted (16 TiB); past it a write or `set_len`
/// fails with `EFBIG`.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// The longest name accepted.
const NAME_MAX: usize = 255;

/// `S_IFMT` and `S_IFREG` of `st_mode` (the same on every Linux).
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
/// `FALLOC_FL_KEEP_SIZE`.
const FALLOC_FL_KEEP_SIZE: i32 = 1;

/// Counters of what the filesystem saw since it was mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `write` calls (as the kernel sent them: one `pwrite` may be split).
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// `fsync` / `fdatasync` calls on files.
    pub fsyncs: u64,
    /// `fsync` calls on directories.
    pub dir_fsyncs: u64,
    /// Power cuts so far.
    pub cuts: u64,
    /// What the last power cut threw away, if there was one.
    pub last_cut: Option<CutReport>,
}

/// What one power cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Bytes written since their file's last `fsync` and lost (the kept
    /// prefix of a torn write is not counted).
    pub unsynced_bytes_lost: u64,
    /// Files whose current contents or size differed from the durable ones.
    pub files_reverted: usize,
    /// Inodes (files and directories) that no durable entry reaches any
    /// more and that are gone.
    pub inodes_lost: usize,
    /// Directories whose current entries differed from the durable ones.
    pub dirs_reverted: usize,
    /// The paths (relative to the mount point) that were visible before the
    /// cut and are gone after it, sorted: what was created, or moved there,
    /// without an fsync of the directory.
    pub lost_paths: Vec<PathBuf>,
    /// The writes that were torn (only with a tear seed).
    pub torn: Vec<TornWrite>,
}

/// A write of which only a prefix survived a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// The file's path after the cut, relative to the mount point.
    pub path: PathBuf,
    /// Where the write started.
    pub offset: u64,
    /// How many bytes it wrote.
    pub len: u64,
    /// How many of them (from the start) survived: always fewer than `len`.
    pub kept: u64,
}

#[derive(Debug)]
struct File {
    current: Contents,
    durable: Contents,
    /// The last write since the last fsync: where, and its bytes.
    last_write: Option<(u64, Vec<u8>)>,
    /// Bytes written since the last fsync.
    unsynced: u64,
}

#[derive(Debug, Default)]
struct Dir {
    current: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    /// The current parent (for `..`).
    parent: u64,
}

#[derive(Debug)]
enum Body {
    File(File),
    Dir(Dir),
}

#[derive(Debug)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
    /// Current directory entries naming this inode.
    links: u32,
    /// Durable directory entries naming this inode.
    durable_links: u32,
    /// References the kernel holds (lookups not yet forgotten).
    lookups: u64,
    /// Open file handles.
    open: u32,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            body,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            links: 0,
            durable_links: 0,
            lookups: 0,
            open: 0,
        }
    }

    fn file_mut(&mut self) -> Result<&mut File, Errno> {
        match &mut self.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn dir(&self) -> Result<&Dir, Errno> {
        match &self.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self) -> Result<&mut Dir, Errno> {
        match &mut self.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }
}

/// Attribute changes asked for by `setattr`; `None` leaves one as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// New permission bits (the file type bits are ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (files only).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SystemTime>,
    /// New modification time.
    pub mtime: Option<SystemTime>,
}

/// The filesystem: inodes by number, open handles, counters.
#[derive(Debug)]
pub struct Model {
    inodes: HashMap<u64, Inode>,
    /// Never reused, not even across a cut, so a stale kernel reference can
    /// never name a different file.
    next_ino: u64,
    handles: HashMap<u64, u64>,
    next_handle: u64,
    stats: Stats,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// An empty filesystem: a root directory owned by the current user.
    pub fn new() -> Model {
        let mut root = Inode::new(
            Body::Dir(Dir {
                parent: ROOT,
                ..Dir::default()
            }),
            0o755,
            0,
            0,
        );
        root.links = 1;
        root.durable_links = 1;
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, root);
        Model {
            inodes,
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
            stats: Stats::default(),
        }
    }

    fn inode(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The attributes of `ino` as `stat` shows them.
    pub fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inode(ino)?;
        let (size, blocks, nlink) = match &inode.body {
            Body::File(f) => (
                f.current.size(),
                (f.current.allocated_pages() * PAGE_SIZE / 512) as u64,
                inode.links,
            ),
            Body::Dir(d) => {
                let subdirs = d
                    .current
                    .values()
                    .filter(
                        |c| matches!(self.inodes.get(c), Some(i) if matches!(i.body, Body::Dir(_))),
                    )
                    .count();
                (
                    PAGE_SIZE as u64,
                    (PAGE_SIZE / 512) as u64,
                    2 + subdirs as u32,
                )
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.crtime,
            kind: inode.kind(),
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        })
    }

    /// Looks `name` up in directory `parent`; the kernel now holds one more
    /// reference to the inode found.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        self.reference(ino)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<Option<u64>, Errno> {
        Ok(self.inode(parent)?.dir()?.current.get(name).copied())
    }

    /// Counts one kernel reference to `ino` and returns its attributes.
    fn reference(&mut self, ino: u64) -> Result<FileAttr, Errno> {
        self.inode_mut(ino)?.lookups += 1;
        self.getattr(ino)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.lookups = inode.lookups.saturating_sub(n);
        }
        self.collect(ino);
    }

    /// Changes attributes; a new size changes only the current contents.
    pub fn setattr(&mut self, ino: u64, set: SetAttr) -> Result<FileAttr, Errno> {
        let now = SystemTime::now();
        let inode = self.inode_mut(ino)?;
        if let Some(size) = set.size {
            if size > MAX_FILE_SIZE {
                return Err(Errno::EFBIG);
            }
            inode.file_mut()?.current.set_len(size);
            inode.mtime = now;
        }
        if let Some(mode) = set.mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        if let Some(atime) = set.atime {
            inode.atime = atime;
        }
        if let Some(mtime) = set.mtime {
            inode.mtime = mtime;
        }
        inode.ctime = now;
        self.getattr(ino)
    }

    fn check_name(name: &OsStr) -> Result<(), Errno> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/')
        {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// Adds a new inode named `name` in `parent` (current entries only).
    fn add_child(
        &mut self,
        parent: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        Self::check_name(name)?;
        if self.child(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut inode = Inode::new(body, perm, uid, gid);
        inode.links = 1;
        self.inodes.insert(ino, inode);
        let now = SystemTime::now();
        let dir = self.inode_mut(parent)?;
        dir.mtime = now;
        dir.ctime = now;
        dir.dir_mut()?.current.insert(name.to_os_string(), ino);
        self.reference(ino)
    }

    /// Creates an empty regular file `name` in `parent` with `mode`
    /// (whose type bits, if any, must say a regular file).
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        if mode & S_IFMT != 0 && mode & S_IFMT != S_IFREG {
            // Devices, fifos and sockets are not modelled.
            return Err(Errno::EPERM);
        }
        let file = File {
            current: Contents::default(),
            durable: Contents::default(),
            last_write: None,
            unsynced: 0,
        };
        self.add_child(
            parent,
            name,
            Body::File(file),
            (mode & 0o7777) as u16,
            uid,
            gid,
        )
    }

    /// Creates an empty directory `name` in `parent`.
    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let dir = Dir {
            parent,
            ..Dir::default()
        };
        self.add_child(
            parent,
            name,
            Body::Dir(dir),
            (mode & 0o7777) as u16,
            uid,
            gid,
        )
    }

    /// Removes the current entry `name` (a file) from `parent`.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        if let Body::Dir(_) = self.inode(ino)?.body {
            return Err(Errno::EISDIR);
        }
        self.remove_entry(parent, name, ino)
    }

    /// Removes the current entry `name` (an empty directory) from `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        if !self.inode(ino)?.dir()?.current.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_entry(parent, name, ino)
    }

    fn remove_entry(&mut self, parent: u64, name: &OsStr, ino: u64) -> Result<(), Errno> {
        let now = SystemTime::now();
        let dir = self.inode_mut(parent)?;
        dir.dir_mut()?.current.remove(name);
        dir.mtime = now;
        dir.ctime = now;
        let inode = self.inode_mut(ino)?;
        inode.links = inode.links.saturating_sub(1);
        inode.ctime = now;
        self.collect(ino);
        Ok(())
    }

    /// Renames `parent/name` to `new_parent/new_name`, replacing a target
    /// that exists unless `no_replace` (then `EEXIST`).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        Self::check_name(new_name)?;
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        self.inode(new_parent)?.dir()?;
        let moving_dir = matches!(self.inode(ino)?.body, Body::Dir(_));
        if moving_dir {
            // A directory cannot move into itself or below itself.
            let mut at = new_parent;
            loop {
                if at == ino {
                    return Err(Errno::EINVAL);
                }
                if at == ROOT {
                    break;
                }
                at = self.inode(at)?.dir()?.parent;
            }
        }
        let target = self.child(new_parent, new_name)?;
        if let Some(target) = target {
            if target == ino {
                // Both names are links to one inode: POSIX says do nothing.
                return Ok(());
            }
            if no_replace {
                return Err(Errno::EEXIST);
            }
            match (&self.inode(target)?.body, moving_dir) {
                (Body::Dir(d), true) if !d.current.is_empty() => return Err(Errno::ENOTEMPTY),
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
            self.remove_entry(new_parent, new_name, target)?;
        }
        let now = SystemTime::now();
        let old = self.inode_mut(parent)?;
        old.dir_mut()?.current.remove(name);
        old.mtime = now;
        old.ctime = now;
        let new = self.inode_mut(new_parent)?;
        new.dir_mut()?.current.insert(new_name.to_os_string(), ino);
        new.mtime = now;
        new.ctime = now;
        let inode = self.inode_mut(ino)?;
        inode.ctime = now;
        if let Body::Dir(d) = &mut inode.body {
            d.parent = new_parent;
        }
        Ok(())
    }

    /// Opens `ino`; returns the handle to give the kernel.
    pub fn open(&mut self, ino: u64) -> Result<u64, Errno> {
        self.inode_mut(ino)?.open += 1;
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, ino);
        Ok(fh)
    }

    /// Closes handle `fh`.
    pub fn release(&mut self, fh: u64) {
        if let Some(ino) = self.handles.remove(&fh) {
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.open = inode.open.saturating_sub(1);
            }
            self.collect(ino);
        }
    }

    /// Open handles (files and directories) right now.
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Reads up to `len` current bytes of file `ino` from `offset`.
    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        match &self.inode(ino)?.body {
            Body::File(f) => Ok(f.current.read(offset, len)),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// Writes `data` at `offset` into the current contents of file `ino`.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= MAX_FILE_SIZE => {}
            _ => return Err(Errno::EFBIG),
        }
        let inode = self.inode_mut(ino)?;
        let file = inode.file_mut()?;
        file.current.write(offset, data);
        file.unsynced += data.len() as u64;
        match &mut file.last_write {
            Some((at, bytes)) => {
                *at = offset;
                bytes.clear();
                bytes.extend_from_slice(data);
            }
            None => file.last_write = Some((offset, data.to_vec())),
        }
        let now = SystemTime::now();
        inode.mtime = now;
        inode.ctime = now;
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        Ok(len)
    }

    /// `fallocate`: mode 0 grows the file to `offset + len` if it is
    /// shorter (the new range reads as zeros); `FALLOC_FL_KEEP_SIZE` alone
    /// is accepted and changes nothing (space is not modelled). Other modes
    /// (punching holes, ...) are `EOPNOTSUPP`.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let end = match offset.checked_add(len) {
            Some(end) if end <= MAX_FILE_SIZE => end,
            _ => return Err(Errno::EFBIG),
        };
        let file = self.inode_mut(ino)?.file_mut()?;
        match mode {
            0 => {
                if end > file.current.size() {
                    file.current.set_len(end);
                }
                Ok(())
            }
            FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// `fsync`/`fdatasync` of file `ino`: its current contents and size
    /// become durable. (On a directory this is [`Model::fsyncdir`].)
    pub fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        let inode = self.inode_mut(ino)?;
        if let Body::Dir(_) = inode.body {
            return self.fsyncdir(ino);
        }
        let file = inode.file_mut()?;
        file.durable = file.current.clone();
        file.last_write = None;
        file.unsynced = 0;
        self.stats.fsyncs += 1;
        Ok(())
    }

    /// `fsync` of directory `ino`: its current entries become durable.
    pub fn fsyncdir(&mut self, ino: u64) -> Result<(), Errno> {
        let dir = self.inode_mut(ino)?.dir_mut()?;
        let old = std::mem::replace(&mut dir.durable, dir.current.clone());
        let new: Vec<u64> = dir.durable.values().copied().collect();
        self.stats.dir_fsyncs += 1;
        for child in new {
            if let Some(i) = self.inodes.get_mut(&child) {
                i.durable_links += 1;
            }
        }
        for child in old.into_values() {
            if let Some(i) = self.inodes.get_mut(&child) {
                i.durable_links = i.durable_links.saturating_sub(1);
            }
            self.collect(child);
        }
        Ok(())
    }

    /// The current entries of directory `ino`, with `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let dir = self.inode(ino)?.dir()?;
        let mut out = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (dir.parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, &child) in &dir.current {
            if let Some(inode) = self.inodes.get(&child) {
                out.push((child, inode.kind(), name.clone()));
            }
        }
        Ok(out)
    }

    /// Checks that `ino` exists (for `access`).
    pub fn exists(&self, ino: u64) -> bool {
        self.inodes.contains_key(&ino)
    }

    /// `(used blocks, used inodes)` for `statfs`, in `PAGE_SIZE` blocks.
    pub fn usage(&self) -> (u64, u64) {
        let pages: usize = self
            .inodes
            .values()
            .map(|i| match &i.body {
                Body::File(f) => f.current.allocated_pages().max(f.durable.allocated_pages()),
                Body::Dir(_) => 1,
            })
            .sum();
        (pages as u64, self.inodes.len() as u64)
    }

    /// Bytes written since their file's last `fsync`, over all files: what
    /// a power cut now would lose (or tear).
    pub fn unsynced_bytes(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.body {
                Body::File(f) => f.unsynced,
                Body::Dir(_) => 0,
            })
            .sum()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Drops `ino` if nothing names or holds it any more: no current or
    /// durable entry, no kernel reference, no open handle. Its durable
    /// entries (a removed directory's) then stop counting too.
    fn collect(&mut self, ino: u64) {
        let mut todo = vec![ino];
        while let Some(ino) = todo.pop() {
            let dead = matches!(
                self.inodes.get(&ino),
                Some(i) if ino != ROOT && i.links == 0 && i.durable_links == 0 && i.lookups == 0 && i.open == 0
            );
            if !dead {
                continue;
            }
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.remove(&ino)
            {
                for child in d.durable.into_values() {
                    if let Some(i) = self.inodes.get_mut(&child) {
                        i.durable_links = i.durable_links.saturating_sub(1);
                    }
                    todo.push(child);
                }
            }
        }
    }

    /// The power cut: every file goes back to its durable contents and
    /// every directory to its durable entries; what no durable entry
    /// reaches from the root is gone. Open handles and kernel references
    /// are forgotten (the caller unmounted first).
    ///
    /// With `tear = Some(seed)`, each file that has unsynced writes keeps a
    /// prefix of its *last* unsynced write (as the kernel sent it) over its
    /// durable contents: a random length, from nothing to all but one byte,
    /// drawn from `seed` in inode order. The file grows if that prefix ends
    /// past the durable size. Earlier unsynced writes are lost whole (a disk
    /// cache need not write back in order).
    ///
    /// A file that was renamed from one directory to another with only the
    /// new directory fsynced has both names after the cut (two links); a
    /// directory reached twice so keeps only the first name found.
    pub fn power_cut(&mut self, tear: Option<u64>) -> CutReport {
        let mut report = CutReport::default();
        let before = self.current_paths();
        let mut rng = tear.map(Rng::new);
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        let mut torn: Vec<(u64, u64, u64, u64)> = Vec::new();
        for &ino in &inos {
            let Some(inode) = self.inodes.get_mut(&ino) else {
                continue;
            };
            inode.lookups = 0;
            inode.open = 0;
            match &mut inode.body {
                Body::File(f) => {
                    if f.current != f.durable || f.unsynced > 0 {
                        report.files_reverted += 1;
                    }
                    let mut lost = f.unsynced;
                    f.current = f.durable.clone();
                    if let (Some(rng), Some((offset, bytes))) = (rng.as_mut(), f.last_write.take())
                    {
                        if !bytes.is_empty() {
                            let kept = rng.below(bytes.len() as u64);
                            f.current.write(offset, &bytes[..kept as usize]);
                            lost = lost.saturating_sub(kept);
                            torn.push((ino, offset, bytes.len() as u64, kept));
                        }
                    }
                    report.unsynced_bytes_lost += lost;
                    f.last_write = None;
                    f.unsynced = 0;
                }
                Body::Dir(d) => {
                    if d.current != d.durable {
                        report.dirs_reverted += 1;
                    }
                    d.current = d.durable.clone();
                }
            }
        }
        self.handles.clear();

        // Walk the durable tree from the root; count links afresh.
        for inode in self.inodes.values_mut() {
            inode.links = 0;
            inode.durable_links = 0;
        }
        let mut paths: HashMap<u64, PathBuf> = HashMap::new();
        paths.insert(ROOT, PathBuf::new());
        let mut queue = std::collections::VecDeque::from([ROOT]);
        if let Some(root) = self.inodes.get_mut(&ROOT) {
            root.links = 1;
            root.durable_links = 1;
        }
        while let Some(dir_ino) = queue.pop_front() {
            let entries: Vec<(OsString, u64)> = match self.inodes.get(&dir_ino) {
                Some(Inode {
                    body: Body::Dir(d), ..
                }) => d.current.iter().map(|(n, &i)| (n.clone(), i)).collect(),
                _ => continue,
            };
            let mut drop_names = Vec::new();
            for (name, child) in entries {
                let seen = paths.contains_key(&child);
                let Some(inode) = self.inodes.get_mut(&child) else {
                    drop_names.push(name);
                    continue;
                };
                match &mut inode.body {
                    Body::Dir(d) => {
                        if seen || child == ROOT {
                            drop_names.push(name);
                            continue;
                        }
                        d.parent = dir_ino;
                        queue.push_back(child);
                    }
                    Body::File(_) => {}
                }
                inode.links += 1;
                inode.durable_links += 1;
                if !seen {
                    let base = paths.get(&dir_ino).cloned().unwrap_or_default();
                    paths.insert(child, base.join(&name));
                }
            }
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.get_mut(&dir_ino)
            {
                for name in drop_names {
                    d.current.remove(&name);
                    d.durable.remove(&name);
                }
            }
        }
        let count = self.inodes.len();
        self.inodes.retain(|ino, _| paths.contains_key(ino));
        report.inodes_lost = count - self.inodes.len();
        let after = self.current_paths();
        report.lost_paths = before.difference(&after).cloned().collect();
        report.torn = torn
            .into_iter()
            .filter_map(|(ino, offset, len, kept)| {
                let path = paths.get(&ino)?.clone();
                Some(TornWrite {
                    path,
                    offset,
                    len,
                    kept,
                })
            })
            .collect();
        self.stats.cuts += 1;
        self.stats.last_cut = Some(report.clone());
        report
    }

    /// Every path the current entries reach from the root (each name of a
    /// file with several).
    fn current_paths(&self) -> std::collections::BTreeSet<PathBuf> {
        let mut out = std::collections::BTreeSet::new();
        let mut todo = vec![(ROOT, PathBuf::new())];
        while let Some((ino, path)) = todo.pop() {
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.get(&ino)
            {
                for (name, &child) in &d.current {
                    let child_path = path.join(name);
                    if out.insert(child_path.clone()) {
                        todo.push((child, child_path));
                    }
                }
            }
        }
        out
    }

    /// The inode at `path` (relative to the root, `/`-separated), following
    /// current entries. For tests and introspection.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        let mut at = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at = *self
                .inode(at)
                .ok()?
                .dir()
                .ok()?
                .current
                .get(OsStr::new(part))?;
        }
        Some(at)
    }

    /// How many pages file `ino` holds, current and durable (shared pages
    /// count in both). For tests of sparseness.
    pub fn allocated_pages(&self, ino: u64) -> Option<(usize, usize)> {
        match &self.inode(ino).ok()?.body {
            Body::File(f) => Some((f.current.allocated_pages(), f.durable.allocated_pages())),
            Body::Dir(_) => None,
        }
    }

    /// Inodes held right now (for tests: removed files do not linger).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }
}

/// Converts a `setattr` time argument.
pub fn time_or_now(t: fuser::TimeOrNow) -> SystemTime {
    match t {
        fuser::TimeOrNow::SpecificTime(t) => t,
        fuser::TimeOrNow::Now => SystemTime::now(),
    }
}

/// How long the kernel may cache attributes and entries: not at all, so
/// that every `stat` and path walk asks the model.
pub const TTL: Duration = Duration::ZERO;

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
