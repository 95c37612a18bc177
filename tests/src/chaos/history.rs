//! The recorded history of a chaos run: one [`Event`] per JSON line, in
//! the style of Jepsen and OpenMessaging Chaos. Every operation is an
//! `invoke` followed by `ok` (it happened), `fail` (it did not) or `info`
//! (unknown: a timeout or a lost connection); consumptions, check-back
//! answers and faults are events of their own.
//!
//! Each process appends to its own file, one `write` per line, so a
//! `kill -9` loses at most a half line (skipped when reading); the harness
//! merges the files by time into `history.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What an event says about its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The operation starts.
    Invoke,
    /// It took effect.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// Unknown whether it took effect, or a note.
    Info,
}

/// The operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A plain send with a sharding key (`Producer::send_ordered`).
    Send,
    /// A transactional send.
    Tx,
    /// A transactional producer stopped inside its local transaction (the
    /// harness kills it there).
    Hold,
    /// A check-back answered.
    Check,
    /// A consumer handled a message.
    Consume,
    /// The harness injected (`invoke`) or healed (`ok`) a fault.
    Fault,
    /// The harness's final look at the brokers' pending transactions.
    Pending,
    /// The harness's final look at a group: a message stored below the
    /// group's committed offset (so the group must have handled it, or
    /// dead-lettered it).
    Below,
    /// The harness's final look at a group: a message in its dead-letter topic.
    DeadLetter,
    /// The harness saw a broker group's master change (failover mode):
    /// `broker` is the group, `detail` the new master's address, `offset`
    /// its epoch.
    Master,
    /// The harness's final look at the topics: a message stored at a
    /// position (`broker`, `topic`, `queue`, `offset`), `id` its body;
    /// `fail` when a topic could not be read.
    Stored,
    /// Dedup mode's final look at the consumers' database: one row of the
    /// effects table (`id` the body, `msg_id` the key it was applied
    /// under); an `info` event marks that the table was read at all, a
    /// `fail` one that it could not be.
    Effect,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Microseconds since the Unix epoch (every process shares the clock).
    pub time_us: u64,
    /// The process (or harness part) that recorded it.
    pub process: String,
    /// invoke, ok, fail or info.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The operation.
    pub f: Op,
    /// The operation's identity: the message body for sends and
    /// consumptions, the fault's name for faults.
    pub id: String,
    /// The sharding key (sends, consumptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// A transaction's truth (`commit` or `rollback`): what its local
    /// transaction did, as a check-back finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
    /// What the local transaction answered (`commit`, `rollback`, `unknown`),
    /// or a check-back's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The transaction id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<u64>,
    /// The broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// The topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// The queue offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// A send's status (`SEND_OK`, `FLUSH_DISK_TIMEOUT`) or a transaction's
    /// end state (`committed`, `rolled_back`, `parked`, `prepared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// What went wrong, or what a fault did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The consumer group (consumptions and the final look at groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A transaction's prepare status when it was not `SEND_OK` (say
    /// `FLUSH_SLAVE_TIMEOUT`): the producer then rolled back without
    /// running its local transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<String>,
}

impl Event {
    /// An event with only the required fields set, stamped now.
    pub fn new(process: &str, kind: Kind, f: Op, id: impl Into<String>) -> Event {
        Event {
            time_us: now_us(),
            process: process.to_string(),
            kind,
            f,
            id: id.into(),
            key: None,
            msg_id: None,
            truth: None,
            answer: None,
            tx_id: None,
            broker: None,
            topic: None,
            queue: None,
            offset: None,
            status: None,
            detail: None,
            group: None,
            prepare: None,
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Appends events to a file, one unbuffered `write` per line, so a line is
/// in the page cache (and survives the process's `kill -9`) before the
/// operation it records goes on. A cheap `Clone` handle.
#[derive(Clone)]
pub struct Recorder {
    process: String,
    file: Arc<Mutex<File>>,
}

impl Recorder {
    /// Appends to `path` (created if missing) as `process`.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, process: &str) -> std::io::Result<Recorder> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Recorder {
            process: process.to_string(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// The process name events are recorded under.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// A new event of this process, stamped now.
    pub fn event(&self, kind: Kind, f: Op, id: impl Into<String>) -> Event {
        Event::new(&self.process, kind, f, id)
    }

    /// Writes `event` as one line. A failed write is reported on stderr:
    /// the history is then incomplete, which the checkers would misread, so
    /// the harness also looks at the processes' stderr.
    pub fn record(&self, event: &Event) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot encode a history event: {e}");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            eprintln!("cannot write the history: {e}");
        }
    }
}

/// Reads the events of a history file; a half-written last line (a killed
/// writer) is skipped, as is anything that does not parse.
pub fn read_events(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Reads every `*.jsonl` file in `dir` but `skip`, merged by time.
pub fn read_dir_events(dir: &Path, skip: &Path) -> Vec<Event> {
    let mut all = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p != skip && p.extension().is_some_and(|e| e == "jsonl") {
                all.extend(read_events(&p));
            }
        }
    }
    all.sort_by_key(|e| e.time_us);
    all
}

/// Writes `events` to `path` as JSON lines.
///
/// # Errors
/// The file cannot be written.
pub fn write_events(path: &Path, events: &[Event]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(File::create(path)?);
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
