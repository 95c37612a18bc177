//! Small append-only files of checked entries beside the log (the topic
//! deletions, the dead letters re-sent): each entry is
//!
//! ```text
//! 0  u32  total length of the entry, this field included
//! 4  u32  CRC32C of bytes 8..total
//! 8  ...  the body
//! ```
//!
//! A torn or damaged entry (a crash in the middle of an append) ends the
//! file's entries: it was never answered.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

const HEADER: usize = 8;

/// Appends one entry to `out`, its body written by `body`.
pub(crate) fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    body(out);
    let total = (out.len() - start) as u32;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&total.to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The bodies of the whole entries of `data`, each with where its entry
/// ends, up to the first torn or damaged one.
pub(crate) fn entries(data: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let head = data.get(pos..pos + HEADER)?;
        let total = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let entry = data.get(pos..pos + total).filter(|_| total >= HEADER)?;
        let body = &entry[HEADER..];
        if crc32c::crc32c(body) != crc {
            return None;
        }
        pos += total;
        Some((body, pos))
    })
}

/// The whole file at `path`; empty when there is none.
pub(crate) fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(data)
}

/// Opens `path` for appending, creating it (durably: its directory is
/// synced) when it is not there.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    let created = !path.exists();
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    if created {
        if let Some(dir) = path.parent() {
            super::commit_log::sync_dir(dir)?;
        }
    }
    Ok(f)
}

/// A little-endian u64 at `at` of `body`, if it is there.
pub(crate) fn u64_at(body: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
}

/// A string after its u16 length at `at`, ending the body exactly.
pub(crate) fn str_at(body: &[u8], at: usize) -> Option<&str> {
    let len = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
    if body.len() != at + 2 + len {
        return None;
    }
    std::str::from_utf8(&body[at + 2..]).ok()
}

/// Appends `s` after its u16 length.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}
