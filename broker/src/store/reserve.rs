//! Disk blocks reserved before they are written.
//!
//! Where the file system allocates a file's blocks as it writes its pages
//! back (ext4's delayed allocation), a write into blocks not allocated yet
//! can wait behind writeback, which holds the file's block map and pages
//! while it allocates: the commit log's writer stalled for 1-26 ms that
//! way. So the commit log reserves a segment's blocks when it creates it
//! (`commit_log.rs`), and the files that grow by appends, the consume
//! queues and the message index, are reserved a little ahead of their
//! appends with each checkpoint, off the write path ([`Ahead`]).

use std::fs::File;
use std::io;

/// Reservations ahead of appends grow in steps of this many bytes.
const STEP: u64 = 64 << 10;
/// A file is reserved at most this far ahead of its appends.
const MAX_AHEAD: u64 = 16 << 20;
/// Reservations ahead of appends leave at least this much of the disk free
/// (the commit log's next segment needs room more).
const FLOOR: u64 = 1 << 30;

/// Reserves the blocks of bytes `from..from + len` of `file` (they read as
/// zeros, as a hole does). With `past_length` the range may lie past the
/// file's length, which stays as it is (`FALLOC_FL_KEEP_SIZE`): appends
/// then find their blocks. Nothing happens on tmpfs (memory: no writeback
/// to wait behind, and a reservation would pin it), where the disk has
/// less than twice the range free (other files need room too), nor, past
/// the length, where it would leave less than 1 GiB free.
///
/// # Errors
/// The file system's refusal (it cannot, or the disk or a quota ran out
/// meanwhile, in which case part of the range may be reserved).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn reserve(file: &File, from: u64, len: u64, past_length: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let (Ok(offset), Ok(count)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: fstatfs writes into the zeroed struct this function owns.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if count == 0 || unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return Ok(());
    }
    #[allow(clippy::unnecessary_cast)] // `f_type`'s type differs by target
    let tmpfs = fs.f_type as i64 == libc::TMPFS_MAGIC as i64;
    let free = (fs.f_bavail as u64).saturating_mul(fs.f_bsize as u64);
    if tmpfs || free / 2 < len || (past_length && free < len.saturating_add(FLOOR)) {
        return Ok(());
    }
    let mode = if past_length {
        libc::FALLOC_FL_KEEP_SIZE
    } else {
        0
    };
    // SAFETY: fallocate on a descriptor this function borrows; it reserves
    // blocks and changes no byte read, nor (with KEEP_SIZE) the length.
    if unsafe { libc::fallocate(fd, mode, offset, count) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes an unprivileged writer may still take on the file system holding
/// `dir` (`statvfs`'s `f_bavail`); `None` if it cannot be looked at.
#[allow(unsafe_code)]
pub(crate) fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads the NUL-terminated path and writes into the
    // zeroed struct this function owns.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut fs) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the fields' types differ by target
    Some((fs.f_bavail as u64).saturating_mul(fs.f_frsize as u64))
}

/// Makes bytes `from..from + len` of `file` read as zeros by giving their
/// blocks back (`FALLOC_FL_PUNCH_HOLE`): unlike writing zeros, it needs no
/// free space, so a write that failed on a full disk can still be cleared.
///
/// # Errors
/// The file system's refusal (it cannot punch holes).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn punch_hole(file: &File, from: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(count)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor this function borrows; it changes
    // the bytes of the range only, to zeros, and not the length.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, count) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn punch_hole(_file: &File, _from: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn reserve(_file: &File, _from: u64, _len: u64, _past_length: bool) -> io::Result<()> {
    Ok(())
}

/// The blocks reserved ahead of a file that grows by appends, topped up
/// with each checkpoint: when less than the last interval's growth is left
/// reserved, up to four times that growth past the appends' end (in 64 KiB
/// steps, at most 16 MiB ahead, never past the file's full length). So a
/// busy file is topped up about every fourth checkpoint, with one
/// `fallocate` (which the file's writer waits behind for its duration), and
/// an idle one reserves nothing more.
///
/// What was reserved stays with the file until it is cut or deleted: an
/// idle file keeps it, and a crash or a full disk leaves it. Nothing is
/// released while the writer may be appending into it.
#[derive(Debug, Default)]
pub(crate) struct Ahead {
    /// The file reserved in (its start, as files are named); `None` until
    /// the first top-up.
    file: Option<u64>,
    /// Bytes of it reserved, from its start.
    reserved: u64,
    /// Where its appends ended at the last top-up.
    mark: u64,
    /// How far ahead the last top-up reserved.
    ahead: u64,
}

impl Ahead {
    /// Tops up the reservation of `file` (named `id`), whose appends end at
    /// byte `written`; it holds `empty` bytes before its first append and
    /// `full` bytes when full. Once it is reserved to its full length (it
    /// fills within about four intervals at the recent rate, or is within
    /// a 64 KiB step of its end), returns how much to reserve at the start
    /// of the next file.
    pub(crate) fn top_up(
        &mut self,
        id: u64,
        file: &File,
        empty: u64,
        written: u64,
        full: u64,
    ) -> Option<u64> {
        if let Some((from, to)) = self.plan(id, empty, written, full) {
            if let Err(e) = reserve(file, from, to - from, true) {
                tracing::debug!(error = %e, "not reserved ahead of the appends");
            }
        }
        (self.file == Some(id) && self.reserved >= full).then_some(self.ahead.max(STEP).min(full))
    }

    /// The range to reserve now, if any; counted as reserved from then on
    /// (after a refusal, the next try waits for as much growth).
    fn plan(&mut self, id: u64, empty: u64, written: u64, full: u64) -> Option<(u64, u64)> {
        match self.file {
            Some(f) if f == id => {}
            // A file written before this process started: its growth is
            // measured from now (a restart reserves nothing at once).
            None => {
                *self = Ahead {
                    file: Some(id),
                    reserved: written,
                    mark: written,
                    ahead: 0,
                };
                return None;
            }
            // The next file: it grew from empty.
            Some(_) => {
                *self = Ahead {
                    file: Some(id),
                    reserved: empty,
                    mark: empty,
                    ahead: 0,
                }
            }
        }
        let grown = written.saturating_sub(self.mark);
        self.mark = self.mark.max(written);
        if grown == 0 || self.reserved >= written.saturating_add(grown) {
            return None;
        }
        self.ahead = grown.saturating_mul(4).min(MAX_AHEAD);
        let to = written
            .saturating_add(self.ahead)
            .next_multiple_of(STEP)
            .min(full);
        let from = self.reserved.max(written);
        self.reserved = self.reserved.max(to);
        (to > from).then_some((from, to))
    }
}

/// Whether the file system under `dir` reserves blocks past a file's
/// length (tests say what they skip where it does not).
#[cfg(test)]
pub(crate) fn reserves_past_length(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = File::create(dir.join("probe")).unwrap();
    reserve(&probe, 0, 1 << 20, true).unwrap_or(());
    let meta = probe.metadata().unwrap();
    std::fs::remove_file(dir.join("probe")).unwrap();
    meta.blocks() * 512 >= 1 << 20 && meta.len() == 0
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;

    use super::*;

    fn allocated(f: &File) -> u64 {
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn reservations_follow_the_growth_of_the_last_interval() {
        const FULL: u64 = 6 << 20;
        let mut a = Ahead::default();
        // First sight (a file from before a restart): nothing yet.
        assert_eq!(a.plan(0, 0, 1000, FULL), None);
        // 100,000 bytes in an interval: four times that ahead, in steps.
        assert_eq!(a.plan(0, 0, 101_000, FULL), Some((101_000, 524_288)));
        // Enough left for another such interval: nothing new, thrice.
        assert_eq!(a.plan(0, 0, 201_000, FULL), None);
        assert_eq!(a.plan(0, 0, 301_000, FULL), None);
        assert_eq!(a.plan(0, 0, 401_000, FULL), None);
        // Idle: nothing new either.
        assert_eq!(a.plan(0, 0, 401_000, FULL), None);
        // Less than an interval's growth left: topped up.
        assert_eq!(a.plan(0, 0, 501_000, FULL), Some((524_288, 917_504)));
        // A burst: at most 16 MiB ahead, never past the full length.
        assert_eq!(a.plan(0, 0, 3 << 20, FULL), Some((3 << 20, FULL)));
        assert_eq!(a.plan(0, 0, FULL, FULL), None);
        let mut big = Ahead::default();
        assert_eq!(big.plan(0, 0, 0, 1 << 30), None);
        assert_eq!(
            big.plan(0, 0, 10 << 20, 1 << 30),
            Some((10 << 20, 26 << 20))
        );
        // The next file grew from its empty size since the last top-up.
        assert_eq!(a.plan(FULL, 4096, 104_096, FULL), Some((104_096, 524_288)));
    }

    #[test]
    fn an_appended_file_is_reserved_past_its_length_which_stays() {
        let dir = tempfile::tempdir().unwrap();
        if !reserves_past_length(dir.path()) {
            eprintln!("skipped: this file system does not reserve past a file's length");
            return;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("q"))
            .unwrap();
        let mut ahead = Ahead::default();
        f.write_all_at(&[1; 1000], 0).unwrap();
        ahead.top_up(0, &f, 0, 1000, 6 << 20);
        f.write_all_at(&[2; 100_000], 1000).unwrap();
        ahead.top_up(0, &f, 0, 101_000, 6 << 20);
        assert_eq!(f.metadata().unwrap().len(), 101_000);
        assert!(allocated(&f) >= 524_288, "{} allocated", allocated(&f));
        let mut back = vec![0u8; 101_000];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..1000].iter().all(|b| *b == 1));
        assert!(back[1000..].iter().all(|b| *b == 2));
    }

    #[test]
    fn a_range_larger_than_half_the_free_space_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("big")).unwrap();
        let len = super::free_bytes(dir.path()).unwrap() / 2 + (64 << 20);
        if f.set_len(len).is_err() {
            eprintln!("skipped: this file system refuses a file of {len} bytes");
            return;
        }
        reserve(&f, 0, len, false).unwrap();
        reserve(&f, len, len, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), len);
        assert!(allocated(&f) < 1 << 20);
    }

    #[test]
    fn nothing_is_reserved_on_tmpfs() {
        let shm = Path::new("/dev/shm");
        let Ok(dir) = tempfile::tempdir_in(shm) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let f = File::create(dir.path().join("seg")).unwrap();
        f.set_len(1 << 20).unwrap();
        reserve(&f, 0, 1 << 20, false).unwrap();
        reserve(&f, 1 << 20, 1 << 20, true).unwrap();
        assert_eq!(f.metadata().unwrap().blocks(), 0, "memory pinned");
    }
}
