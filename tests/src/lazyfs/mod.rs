//! A FUSE filesystem that behaves like a disk with a volatile write cache,
//! after LazyFS (the one Jepsen uses): tests run the unmodified
//! `txmq-broker` on it and then cut the power.
//!
//! The test process holds the filesystem in memory ([`model`]) and serves it
//! through the kernel ([`fs`], fuser's pure-Rust mount: no libfuse needed;
//! as root it mounts with `mount(2)`, otherwise through `fusermount3`).
//! Every file has current and durable contents, every directory current and
//! durable entries; `fsync` of a file makes its data durable, `fsync` of a
//! directory its entries (see [`model`] for the exact rules).
//!
//! [`LazyFs::power_cut`] unmounts, throws away everything not durable
//! (optionally tearing the last unsynced write of each file), and mounts the
//! same tree again at the same place. Unmounting is what guarantees that no
//! kernel cache (pages, attributes, entries) outlives the cut: the new mount
//! is a new superblock that starts cold, like a machine after a reboot.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let fs = txmq_tests::lazyfs::LazyFs::mount(dir.path())?;
//! std::fs::write(dir.path().join("f"), b"not synced")?;
//! fs.power_cut(None)?;
//! assert!(!dir.path().join("f").exists());
//! # Ok(())
//! # }
//! ```

mod contents;
pub mod fs;
pub mod model;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};

pub use contents::PAGE_SIZE;
pub use model::{CutReport, Model, Stats, TornWrite};

/// How long [`LazyFs::power_cut`] waits for the files of a killed process
/// to be released by the kernel.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A mounted lazy filesystem, unmounted when dropped. Locals drop in reverse
/// order, so declare it after the temporary directory it is mounted on and
/// before the processes that use it: they die first, then it unmounts, then
/// the directory goes.
#[derive(Debug)]
pub struct LazyFs {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
}

impl LazyFs {
    /// Mounts an empty lazy filesystem at `mountpoint` (an existing empty
    /// directory), served by a thread of this process.
    ///
    /// Fails with a message naming the cause when FUSE is not usable here
    /// (no `/dev/fuse`, no permission to mount).
    pub fn mount(mountpoint: &Path) -> io::Result<LazyFs> {
        if !Path::new("/dev/fuse").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "lazyfs needs FUSE: /dev/fuse does not exist (load the fuse module, \
                 or give the container the device)",
            ));
        }
        let model = Arc::new(Mutex::new(Model::new()));
        let session = Self::spawn(&model, mountpoint)?;
        Ok(LazyFs {
            model,
            mountpoint: mountpoint.to_path_buf(),
            session: Mutex::new(Some(session)),
        })
    }

    fn spawn(model: &Arc<Mutex<Model>>, mountpoint: &Path) -> io::Result<BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazyfs".into()),
            // The kernel checks permissions from the modes we report.
            MountOption::DefaultPermissions,
        ];
        fuser::spawn_mount(fs::LazyFsOps::new(model.clone()), mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot mount lazyfs at {} (FUSE mount as root via mount(2), \
                     else fusermount3 from Debian's fuse3): {e}",
                    mountpoint.display()
                ),
            )
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: unmounts, drops every write, size change, creation,
    /// removal and rename that was not made durable by an `fsync` of the
    /// file (data) or of its directory (entries), and mounts the survivors
    /// again at the same place.
    ///
    /// With `tear = Some(seed)`, each file with unsynced writes keeps a
    /// random prefix (possibly empty, never all) of its last unsynced write
    /// as the kernel sent it (a `pwrite` larger than the FUSE maximum write,
    /// 128 KiB to 1 MiB, arrives in pieces; the last piece is torn). The
    /// choice is reproducible from the seed. Without a seed the cut is
    /// clean: exactly the durable state survives.
    ///
    /// Call it when no process has a file open on the filesystem (kill
    /// the broker with `kill -9` and reap it first): it waits up to 10 s
    /// for the kernel to release the files of a dead process, then fails,
    /// leaving everything as it was. It fails too if the unmount or the
    /// mount fails; then the filesystem is no longer mounted.
    pub fn power_cut(&self, tear: Option<u64>) -> io::Result<CutReport> {
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            let open = self.model().open_handles();
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "power cut: {open} files or directories are still open on {}; \
                         stop every process using it first",
                        self.mountpoint.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(s) = session.take() {
            if let Err(e) = s.umount_and_join() {
                lazy_unmount(&self.mountpoint);
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "power cut: cannot unmount {} (a process has its working \
                         directory there?): {e}",
                        self.mountpoint.display()
                    ),
                ));
            }
        }
        let report = self.model().power_cut(tear);
        *session = Some(Self::spawn(&self.model, &self.mountpoint)?);
        Ok(report)
    }

    /// Bytes written since their file's last `fsync`, over all files: what
    /// a power cut now would lose.
    pub fn unsynced_bytes(&self) -> u64 {
        self.model().unsynced_bytes()
    }

    /// Counters since the mount: writes, fsyncs, cuts, and what the last
    /// cut threw away.
    pub fn stats(&self) -> Stats {
        self.model().stats()
    }

    /// Runs `f` on the model under its lock, for introspection (e.g.
    /// [`Model::resolve`] and [`Model::allocated_pages`]). `f` must not touch
    /// files on the mount: the filesystem waits while it runs.
    pub fn with_model<R>(&self, f: impl FnOnce(&Model) -> R) -> R {
        f(&self.model())
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let session = self
            .session
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = session {
            if s.umount_and_join().is_err() {
                // Busy (a test failed with a process still using it): detach
                // it so that the temporary directory can go; the kernel ends
                // the connection when the last user is gone.
                lazy_unmount(&self.mountpoint);
            }
        }
    }
}

/// `umount -l`: detaches a busy mount from the tree.
fn lazy_unmount(mountpoint: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
}
