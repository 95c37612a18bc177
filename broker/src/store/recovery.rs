//! Recovery: rebuild everything derived from the commit log.
//!
//! Replays the log from the checkpoint's position, verifying every record's
//! checksum. The first record that is torn or corrupt ends the log: the
//! rest of its segment is zeroed and later segments are deleted, so new
//! appends continue right after the last intact record. Replayed records
//! rewrite their consume-queue entries (idempotently: each record carries
//! its queue offset) and consumer offsets; consume-queue entries that point
//! past the recovered end are dropped.

use std::collections::HashMap;
use std::sync::Arc;

use txmq_protocol::tag_hash;

use super::checkpoint::{Checkpoint, OffsetTable};
use super::commit_log::CommitLog;
use super::consume_queue::{ConsumeQueue, Entry, ENTRY_LEN};
use super::record::{self, Check, RecordKind};
use super::{ensure_queues, StoreConfig, StoreError};

pub(crate) struct Recovered {
    pub log: CommitLog,
    pub queues: HashMap<String, Vec<Arc<ConsumeQueue>>>,
    pub offsets: OffsetTable,
    pub end: u64,
}

pub(crate) fn recover(
    config: &StoreConfig,
    topics: &[(String, u32)],
) -> Result<Recovered, StoreError> {
    let started = std::time::Instant::now();
    let log_dir = config.dir.join("commitlog");
    let log = CommitLog::open(&log_dir, config.segment_size).map_err(|e| {
        StoreError::io(
            format!("cannot open commit log in {}", log_dir.display()),
            &e,
        )
    })?;
    let mut queues = HashMap::new();
    for (topic, count) in topics {
        ensure_queues(config, &mut queues, topic, *count)?;
    }
    let cq_root = config.dir.join("consumequeue");
    for (topic, count) in existing_queues(&cq_root) {
        ensure_queues(config, &mut queues, &topic, count)?;
    }
    let checkpoint =
        Checkpoint::load(&config.dir).map_err(|e| StoreError::io("cannot read checkpoint", &e))?;
    let first = log.segments().first().map_or(0, |s| s.start);
    let (mut offsets, checkpointed) = match checkpoint {
        Some(cp) => (cp.offsets, cp.position.max(first)),
        None => (OffsetTable::new(), first),
    };
    // Verify the whole segment the checkpoint points into, not just what
    // follows it: a tail damaged after the checkpoint was written (a torn
    // last record, a file cut short by hand) must be found and cut too.
    let start = log
        .segment_for(checkpointed)
        .map_or(checkpointed, |s| s.start.min(checkpointed));
    let mut batcher = Batcher::default();
    let (end, cut) = replay(&log, start, |rec_bytes, log_offset| {
        let Some(rec) = record::decode(rec_bytes, false) else {
            return Ok(());
        };
        match rec.kind {
            RecordKind::Message => {
                let topic = rec.message.topic.clone();
                if queues
                    .get(&topic)
                    .is_none_or(|q: &Vec<Arc<ConsumeQueue>>| q.len() <= rec.queue as usize)
                {
                    ensure_queues(config, &mut queues, &topic, rec.queue + 1)?;
                }
                let cq = queues[&topic][rec.queue as usize].clone();
                let entry = Entry {
                    log_offset,
                    size: rec_bytes.len() as u32,
                    tag_hash: tag_hash(rec.message.tag.as_deref()),
                };
                batcher.add(&cq, rec.queue_offset, entry)?;
            }
            RecordKind::OffsetCommit => {
                let group = rec.message.key.unwrap_or_default();
                offsets.insert((group, rec.message.topic, rec.queue), rec.queue_offset);
            }
        }
        Ok(())
    })?;
    batcher.flush()?;
    let replayed = end - start;
    if let Some(pos) = cut {
        tracing::warn!(
            position = pos,
            "commit log has a torn or corrupt tail; cutting it"
        );
        log.cut(pos)
            .map_err(|e| StoreError::io("cannot cut the torn tail of the commit log", &e))?;
    }
    let log_min = log.min_offset();
    for cq in queues.values().flatten() {
        cq.recover(log_min, end).map_err(|e| {
            StoreError::io(
                format!("cannot recover consume queue {}/{}", cq.topic, cq.queue),
                &e,
            )
        })?;
    }
    tracing::info!(
        end,
        replayed_bytes = replayed,
        queues = queues.values().map(Vec::len).sum::<usize>(),
        elapsed = ?started.elapsed(),
        "store recovered"
    );
    Ok(Recovered {
        log,
        queues,
        offsets,
        end,
    })
}

/// Calls `visit` for every intact record from `start`; returns the end of
/// the intact log and, when a torn or corrupt record was found, where to cut.
fn replay(
    log: &CommitLog,
    start: u64,
    mut visit: impl FnMut(&bytes::Bytes, u64) -> Result<(), StoreError>,
) -> Result<(u64, Option<u64>), StoreError> {
    let segments = log.segments();
    let mut pos = start;
    for seg in segments.iter().filter(|s| s.end() > start) {
        pos = pos.max(seg.start);
        let mut rel = (pos - seg.start) as usize;
        loop {
            if rel >= seg.map.len() {
                break;
            }
            match record::check(&seg.map[rel..]) {
                Check::Valid(len) => {
                    visit(&seg.map.slice(rel..rel + len), seg.start + rel as u64)?;
                    rel += len;
                }
                Check::End => break,
                Check::Truncated | Check::Corrupt => {
                    return Ok((seg.start + rel as u64, Some(seg.start + rel as u64)))
                }
            }
        }
        pos = seg.start + rel as u64;
    }
    Ok((pos, None))
}

/// Queues found on disk: topic -> number of queues (highest id + 1).
fn existing_queues(root: &std::path::Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(topics) = std::fs::read_dir(root) else {
        return out;
    };
    for t in topics.flatten() {
        let Some(topic) = t.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(qs) = std::fs::read_dir(t.path()) else {
            continue;
        };
        let max = qs
            .flatten()
            .filter_map(|q| q.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .max();
        if let Some(max) = max {
            out.push((topic, max + 1));
        }
    }
    out
}

/// Groups replayed entries per queue so that a long replay writes each
/// queue's entries in large contiguous writes.
#[derive(Default)]
struct Batcher {
    open: Vec<(Arc<ConsumeQueue>, u64, Vec<u8>)>,
}

impl Batcher {
    fn add(&mut self, cq: &Arc<ConsumeQueue>, offset: u64, entry: Entry) -> Result<(), StoreError> {
        let idx = match self.open.iter().position(|(q, _, _)| Arc::ptr_eq(q, cq)) {
            Some(i) => i,
            None => {
                self.open
                    .push((cq.clone(), offset, Vec::with_capacity(64 * 1024)));
                self.open.len() - 1
            }
        };
        let (q, first, buf) = &mut self.open[idx];
        let expected = *first + (buf.len() / ENTRY_LEN) as u64;
        if offset != expected || buf.len() >= 64 * 1024 {
            write(q, *first, buf)?;
            buf.clear();
            *first = offset;
        }
        let at = buf.len();
        buf.resize(at + ENTRY_LEN, 0);
        entry.encode(&mut buf[at..]);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        for (q, first, buf) in self.open.drain(..) {
            write(&q, first, &buf)?;
        }
        Ok(())
    }
}

fn write(q: &ConsumeQueue, first: u64, buf: &[u8]) -> Result<(), StoreError> {
    if buf.is_empty() {
        return Ok(());
    }
    q.write(first, buf).map_err(|e| {
        StoreError::io(
            format!("cannot rebuild consume queue {}/{}", q.topic, q.queue),
            &e,
        )
    })
}
