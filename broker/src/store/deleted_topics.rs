//! Topics deleted by an operator (`txmq topic delete`), each with the log
//! position before which its records no longer count.
//!
//! Recovery rebuilds consume queues and consumer offsets by replaying the
//! log, which still holds the deleted topic's records until retention
//! drops them; without this record it would bring the topic back. So a
//! delete appends an entry here (fsynced before it is answered), and
//! recovery ignores messages and offset commits of the topic below that
//! position (a topic made again under the same name starts anew from it).
//!
//! `deleted-topics.log` in the data dir, entries appended:
//!
//! ```text
//! 0   u32  total length of the entry, this field included
//! 4   u32  CRC32C of bytes 8..total
//! 8   u64  the log position: records of the topic below it are deleted
//! 16  u16  topic length, topic bytes
//! ```
//!
//! A damaged tail (a torn append) ends the list: that delete was never
//! answered. A topic deleted twice keeps the higher position.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

const FILE: &str = "deleted-topics.log";
const FIXED: usize = 18;

/// Deleted topic -> the position below which its records are ignored.
pub(crate) type Deleted = HashMap<String, u64>;

fn encode(topic: &str, pos: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED + topic.len());
    out.extend_from_slice(&((FIXED + topic.len()) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&pos.to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    let crc = crc32c::crc32c(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_all(data: &[u8]) -> Deleted {
    let mut out = Deleted::new();
    let mut pos = 0;
    while let Some(head) = data.get(pos..pos + FIXED) {
        let total = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(entry) = data.get(pos..pos + total).filter(|_| total >= FIXED) else {
            break;
        };
        let tlen = u16::from_le_bytes([entry[16], entry[17]]) as usize;
        if crc32c::crc32c(&entry[8..]) != crc || FIXED + tlen != total {
            break;
        }
        let Ok(topic) = std::str::from_utf8(&entry[FIXED..]) else {
            break;
        };
        let mut p = [0u8; 8];
        p.copy_from_slice(&entry[8..16]);
        let at = u64::from_le_bytes(p);
        let e = out.entry(topic.to_string()).or_insert(at);
        *e = (*e).max(at);
        pos += total;
    }
    out
}

/// The deleted topics recorded in `dir`.
///
/// # Errors
/// An unreadable file.
pub(crate) fn load(dir: &Path) -> io::Result<Deleted> {
    let mut data = Vec::new();
    match File::open(dir.join(FILE)) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(decode_all(&data))
}

/// Records `topic` deleted below `pos`; returns once it is fsynced.
///
/// # Errors
/// I/O errors.
pub(crate) fn append(dir: &Path, topic: &str, pos: u64) -> io::Result<()> {
    let path = dir.join(FILE);
    let created = !path.exists();
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    f.write_all(&encode(topic, pos))?;
    f.sync_data()?;
    if created {
        super::commit_log::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_the_higher_position_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("load").is_empty());
        append(dir.path(), "orders", 100).expect("append");
        append(dir.path(), "audit", 7).expect("append");
        append(dir.path(), "orders", 300).expect("append");
        let d = load(dir.path()).expect("load");
        assert_eq!(d.get("orders"), Some(&300));
        assert_eq!(d.get("audit"), Some(&7));
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_the_list() {
        let mut data = encode("a", 1);
        let first = data.len();
        data.extend(encode("bb", 2));
        for cut in 0..data.len() {
            let d = decode_all(&data[..cut]);
            assert_eq!(d.len(), usize::from(cut >= first), "cut at {cut}");
        }
        data[first + 9] ^= 0x40;
        assert_eq!(decode_all(&data).len(), 1);
    }
}
