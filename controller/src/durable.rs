//! The on-disk framing every controller file uses, and atomic file writes.
//!
//! A record is `[len: u32 BE][crc32c of payload: u32 BE][payload]`; the
//! payload is MessagePack. A reader stops at the first record that is cut
//! short or whose checksum does not match: that is a torn tail (a crash in
//! the middle of a write), and everything before it is intact.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Bytes of a record's header.
pub(crate) const HEADER: usize = 8;

/// Frames `payload` as one record.
pub(crate) fn frame(payload: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits `buf` into the payloads of its intact records; returns them and
/// the length of the intact prefix (where a torn or corrupt tail starts).
pub(crate) fn unframe(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= HEADER {
        let len = u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
        let start = pos + HEADER;
        let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else {
            break;
        };
        let payload = &buf[start..end];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        records.push(payload);
        pos = end;
    }
    (records, pos)
}

/// Replaces `dir/name` with one record holding `payload`, atomically:
/// returns once the new content is fsynced and the rename is durable
/// (temp file, fsync, rename, fsync of the directory).
pub(crate) fn write_atomic(dir: &Path, name: &str, payload: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&frame(payload)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Reads a file written by [`write_atomic`]: `None` when it does not
/// exist; an error when it exists but is damaged (an atomic write never
/// leaves it torn, so damage is not a crash artefact).
pub(crate) fn read_atomic(dir: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let buf = match std::fs::read(dir.join(name)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (records, end) = unframe(&buf);
    match records.first() {
        Some(r) if end == buf.len() && records.len() == 1 => Ok(Some(r.to_vec())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is damaged (checksum or length)",
                dir.join(name).display()
            ),
        )),
    }
}

/// Makes a rename or a file creation in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new().read(true).open(dir)?.sync_all()
}

/// MessagePack with field names, so that adding a field stays readable.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The inverse of [`encode`].
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_truncation_keeps_the_intact_records() {
        let mut buf = frame(b"one").unwrap();
        let first = buf.len();
        buf.extend(frame(b"two!").unwrap());
        for cut in 0..buf.len() {
            let (records, end) = unframe(&buf[..cut]);
            if cut < first {
                assert!(records.is_empty());
                assert_eq!(end, 0);
            } else {
                assert_eq!(records, vec![&b"one"[..]]);
                assert_eq!(end, first);
            }
        }
        assert_eq!(unframe(&buf).0.len(), 2);
    }

    #[test]
    fn a_flipped_byte_ends_the_intact_prefix() {
        let mut buf = frame(b"one").unwrap();
        let first = buf.len();
        buf.extend(frame(b"two").unwrap());
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(unframe(&buf), (vec![&b"one"[..]], first));
    }

    #[test]
    fn atomic_files_round_trip_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_atomic(dir.path(), "x").unwrap(), None);
        write_atomic(dir.path(), "x", b"hello").unwrap();
        write_atomic(dir.path(), "x", b"again").unwrap();
        assert_eq!(read_atomic(dir.path(), "x").unwrap().unwrap(), b"again");
        let p = dir.path().join("x");
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(read_atomic(dir.path(), "x").is_err());
    }
}
