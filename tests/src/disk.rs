//! What the broker's files hold on disk: allocated blocks, and whether the
//! file system reserves blocks on request (`fallocate`), as the broker
//! does for its commit-log segments and ahead of its queue and index files.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes of disk the file at `path` holds (its allocated blocks).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Bytes of disk the file at `path` holds past its length: blocks its
/// data (what `SEEK_DATA` finds below the length) does not account for.
#[allow(unsafe_code)]
pub fn allocated_past_end(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let (fd, mut at, mut data) = (f.as_raw_fd(), 0i64, 0u64);
    while at < len {
        // SAFETY: lseek on the descriptor opened here.
        let from = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if from < 0 {
            break;
        }
        let to = unsafe { libc::lseek(fd, from, libc::SEEK_HOLE) }.min(len);
        // Whole blocks: the data's first and last block are allocated.
        data += ((to + 4095) / 4096 - from / 4096) as u64 * 4096;
        at = to;
    }
    allocated(path).saturating_sub(data)
}

/// Whether the broker reserves blocks in `dir`: the file system can
/// (`fallocate`, also past a file's length), it is not tmpfs (memory,
/// which the broker leaves alone), and more than the broker keeps free
/// (1 GiB) is free.
#[allow(unsafe_code)]
pub fn reserves_blocks(dir: &Path) -> bool {
    let path = dir.join("probe");
    let probe = std::fs::File::create(&path).unwrap();
    let fd = probe.as_raw_fd();
    // SAFETY: fstatfs writes into the zeroed struct owned here; fallocate
    // works on the descriptor of the file created here.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstatfs(fd, &mut fs) }, 0);
    #[allow(clippy::unnecessary_cast)]
    let tmpfs = fs.f_type as i64 == libc::TMPFS_MAGIC as i64;
    let free = (fs.f_bavail as u64) * (fs.f_bsize as u64);
    let reserved = unsafe { libc::fallocate(fd, 0, 0, 1 << 20) } == 0
        && unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20) } == 0
        && probe.metadata().unwrap().len() == 1 << 20;
    std::fs::remove_file(&path).unwrap();
    !tmpfs && reserved && free > (2 << 30)
}
