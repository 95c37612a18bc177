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

/// Reserves the blocks of bytes `from..from + len` of `file` (they read as
/// zeros, as a hole does). With `past_length` the range may lie past the
/// file's length, which stays as it is (`FALLOC_FL_KEEP_SIZE`): appends
/// then find their blocks. Nothing happens on tmpfs (memory: no writeback
/// to wait behind, and a reservation would pin it) or where the disk has
/// less than twice the range free (other files need room too).
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
    if tmpfs || free / 2 < len {
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

#[cfg(not(target_os = "linux"))]
pub(crate) fn reserve(_file: &File, _from: u64, _len: u64, _past_length: bool) -> io::Result<()> {
    Ok(())
}

/// The blocks reserved ahead of a file that grows by appends, topped up
/// with each checkpoint: when less than the last interval's growth is left
/// reserved, up to twice that growth past the appends' end (in 64 KiB
/// steps, never past the file's full length). So a busy file stays about
/// two checkpoint intervals ahead, and an idle one reserves nothing.
///
/// What a crash or a full disk leaves reserved past a file's end stays
/// with the file (bounded by the same amount) until it is cut or deleted;
/// nothing is released while the writer may be appending into it.
#[derive(Debug, Default)]
pub(crate) struct Ahead {
    /// The file reserved in (its start, as files are named); `None` until
    /// the first top-up.
    file: Option<u64>,
    /// Bytes of it reserved, from its start.
    reserved: u64,
    /// Where its appends ended at the last top-up.
    mark: u64,
}

impl Ahead {
    /// Tops up the reservation of `file` (named `id`), whose appends end at
    /// byte `written` and which holds `full` bytes when full.
    pub(crate) fn top_up(&mut self, id: u64, file: &File, written: u64, full: u64) {
        match self.file {
            Some(f) if f == id => {}
            // A file written before this process started: its growth is
            // measured from now (a restart reserves nothing at once).
            None => {
                *self = Ahead {
                    file: Some(id),
                    reserved: written,
                    mark: written,
                };
                return;
            }
            // The next file: it grew from empty.
            Some(_) => {
                *self = Ahead {
                    file: Some(id),
                    reserved: 0,
                    mark: 0,
                }
            }
        }
        let grown = written.saturating_sub(self.mark);
        self.mark = self.mark.max(written);
        if grown == 0 || self.reserved >= written.saturating_add(grown) {
            return;
        }
        let to = written
            .saturating_add(2 * grown)
            .next_multiple_of(STEP)
            .min(full);
        let from = self.reserved.max(written);
        if to <= from {
            return;
        }
        if let Err(e) = reserve(file, from, to - from, true) {
            tracing::debug!(error = %e, "not reserved ahead of the appends");
        }
        // Also after a refusal: the next try waits for as much growth.
        self.reserved = to;
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
    fn an_appended_file_is_reserved_ahead_by_its_growth_and_keeps_its_length() {
        let dir = tempfile::tempdir().unwrap();
        if !reserves_past_length(dir.path()) {
            eprintln!("skipped: this file system does not reserve past a file's length");
            return;
        }
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let f = open("q");
        const FULL: u64 = 4 << 20;
        let mut ahead = Ahead::default();
        f.write_all_at(&[1; 1000], 0).unwrap();
        // First sight (a file from before a restart): nothing yet.
        ahead.top_up(0, &f, 1000, FULL);
        assert!(allocated(&f) < STEP, "{}", allocated(&f));

        // 200,000 bytes in an interval: 400,000 more reserved, in steps.
        f.write_all_at(&[2; 200_000], 1000).unwrap();
        ahead.top_up(0, &f, 201_000, FULL);
        assert_eq!(f.metadata().unwrap().len(), 201_000);
        let reserved = allocated(&f);
        assert!(
            (601_000..=601_000_u64.next_multiple_of(STEP) + 4096).contains(&reserved),
            "{reserved} allocated"
        );
        // Still more than an interval's growth ahead: nothing new.
        f.write_all_at(&[3; 100_000], 201_000).unwrap();
        ahead.top_up(0, &f, 301_000, FULL);
        assert_eq!(allocated(&f), reserved);
        // Idle: nothing new either.
        ahead.top_up(0, &f, 301_000, FULL);
        assert_eq!(allocated(&f), reserved);

        // A burst: capped at the file's full length.
        f.write_all_at(&vec![4; 3 << 20], 301_000).unwrap();
        let written = 301_000 + (3 << 20);
        ahead.top_up(0, &f, written, FULL);
        assert!(allocated(&f) <= FULL + 4096, "{}", allocated(&f));
        assert!(allocated(&f) >= FULL - 4096, "{}", allocated(&f));
        assert_eq!(f.metadata().unwrap().len(), written);
        let mut back = vec![0u8; 1000];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 1));

        // The next file grew from empty since the last top-up.
        let g = open("q2");
        g.write_all_at(&[5; 100_000], 0).unwrap();
        ahead.top_up(FULL, &g, 100_000, FULL);
        assert!(allocated(&g) >= 300_000, "{}", allocated(&g));
    }

    /// Free bytes in `dir`'s file system.
    #[allow(unsafe_code)]
    fn free_bytes(dir: &Path) -> u64 {
        use std::os::fd::AsRawFd;
        let d = File::open(dir).unwrap();
        // SAFETY: fstatfs writes into the zeroed struct owned here.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(d.as_raw_fd(), &mut fs) }, 0);
        (fs.f_bavail as u64) * (fs.f_bsize as u64)
    }

    #[test]
    fn a_range_larger_than_half_the_free_space_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("big")).unwrap();
        let len = free_bytes(dir.path()) / 2 + (64 << 20);
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
