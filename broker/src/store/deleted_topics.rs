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
//!
//! The delete is also a `TopicDelete` record in the commit log, at the
//! position recorded here: replicas replay it (and record it here too), and
//! recovery drops what the topic's earlier records built when it meets it,
//! so this file only spares recovery dispatching what is deleted anyway.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use super::entry_log;

const FILE: &str = "deleted-topics.log";

/// Deleted topic -> the position below which its records are ignored.
pub(crate) type Deleted = HashMap<String, u64>;

fn encode(topic: &str, pos: u64) -> Vec<u8> {
    let mut out = Vec::new();
    entry_log::frame(&mut out, |b| {
        b.extend_from_slice(&pos.to_le_bytes());
        entry_log::put_str(b, topic);
    });
    out
}

fn decode_all(data: &[u8]) -> Deleted {
    let mut out = Deleted::new();
    for (body, _) in entry_log::entries(data) {
        let (Some(at), Some(topic)) = (entry_log::u64_at(body, 0), entry_log::str_at(body, 8))
        else {
            break;
        };
        let e = out.entry(topic.to_string()).or_insert(at);
        *e = (*e).max(at);
    }
    out
}

/// The deleted topics recorded in `dir`.
///
/// # Errors
/// An unreadable file.
pub(crate) fn load(dir: &Path) -> io::Result<Deleted> {
    Ok(decode_all(&entry_log::read(&dir.join(FILE))?))
}

/// Records `topic` deleted below `pos`; returns once it is fsynced.
///
/// # Errors
/// I/O errors.
pub(crate) fn append(dir: &Path, topic: &str, pos: u64) -> io::Result<()> {
    let mut f = entry_log::open_append(&dir.join(FILE))?;
    f.write_all(&encode(topic, pos))?;
    f.sync_data()
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
