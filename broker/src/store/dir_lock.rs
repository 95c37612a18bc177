//! One broker per data directory: a `LOCK` file held with `flock` for the
//! broker's life (the kernel lets go of it when the process ends, however
//! it ends). A second broker on the same directory would hand out the same
//! log positions and queue offsets, and remove segments the first one
//! writes in.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::Path;

/// Held while the broker runs.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (made if missing), and writes this
    /// process's id into it for whoever finds it taken.
    ///
    /// # Errors
    /// Another process holds it (the message names its pid), or an I/O
    /// error.
    pub fn acquire(dir: &Path) -> Result<DirLock, String> {
        let path = dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if let Err(e) = lock(&file) {
            if e.kind() != io::ErrorKind::WouldBlock {
                // A file system without locks (some network or FUSE ones):
                // the broker runs, unguarded, as before there was a lock.
                tracing::warn!(path = %path.display(), error = %e, "cannot lock the data directory (the file system may not support locks); make sure no other broker uses it");
                return Ok(DirLock { _file: file });
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let by = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            return Err(format!(
                "data directory {} is in use by another broker{by}: two brokers on one directory would overwrite each other's log; stop it, or give this one its own --data-dir",
                dir.display()
            ));
        }
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()));
        if let Err(e) = written {
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        Ok(DirLock { _file: file })
    }
}

#[allow(unsafe_code)]
fn lock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; it changes no
    // memory of this process.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_until_the_first_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let e = DirLock::acquire(dir.path()).unwrap_err();
        assert!(e.contains("in use by another broker"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        DirLock::acquire(dir.path()).expect("free again");
    }
}
