//! The checkers, run over a finished history, as OpenMessaging Chaos
//! defines them (plus the transactional ones):
//!
//! - **lost**: a send acknowledged `SEND_OK` (the brokers flush
//!   synchronously; a replicated group's master also waits for its in-sync
//!   replicas) that no consumer ever handled. A send answered with another
//!   status (`FLUSH_DISK_TIMEOUT`, `FLUSH_SLAVE_TIMEOUT`,
//!   `SLAVE_NOT_AVAILABLE`: stored on the master only, which a failover may
//!   cut) is not acknowledged.
//! - **stored-twice**: exact, from the harness's final look at every queue
//!   of the workload's topics from offset 0: a message (by msg id) stored
//!   at more than one position. Producers are idempotent, so a retried
//!   send or prepare is never stored again; a failed look is a violation.
//! - **duplicate**: a message handled without having been sent, or handled
//!   again other than as consumer-side redelivery: a repeat is allowed only
//!   from the same stored position and only when a fault's window (from
//!   its start to its end plus a grace period) overlaps the time between
//!   the message's first handling and the repeat, since at-least-once
//!   delivery repeats only what a failure interrupted. A repeat from
//!   another position is allowed only when the final look no longer finds
//!   the message at one of the two (a failover cut that copy; the retry
//!   stored the only one left).
//! - **applied-once** (dedup mode only): the consumers applied effects
//!   through `SqliteDedup`; the effects table holds exactly one row per
//!   acknowledged send and per committed transaction that must be
//!   visible, never two rows for one msg id, and none for a message never
//!   sent or rolled back.
//! - **order**: per sharding key, the acknowledged sends are first handled
//!   in the order they were sent (sends of one key are sequential, each
//!   after the previous one was answered). Repeats are the duplicate
//!   checker's business; only first handlings count here. And they were
//!   all stored in one queue: each key's topic lives on one broker group,
//!   so a key in two queues is a reordering the consumers may have been
//!   lucky enough not to show.
//! - **tx-committed-invisible**: a transaction that was committed (the
//!   broker acknowledged the commit, or it was prepared for sure and its
//!   truth, which every check-back answers, is commit) but never handled.
//!   A transaction still parked at the end is not counted (an operator
//!   would resolve it) but reported; nor is one whose prepare was answered
//!   with a status other than `SEND_OK` (the producer then rolls back
//!   without running its local transaction, while a check-back, should the
//!   rollback be lost, answers the truth: either end is right).
//! - **tx-rolled-back-visible**: a transaction whose truth is rollback
//!   (so its local transaction, its end and every check-back said so) that a
//!   consumer handled.
//! - **tx-visible-twice**: a transaction's message stored at two positions.
//! - **tx-pending**: a transaction still prepared after the end of the run
//!   plus the check timeout: it must be resolved or parked by then.
//! - **diverged**: two different messages at one stored position (broker
//!   group, topic, queue, offset), among those handed to consumers of any
//!   group and those the final look found below the groups' offsets: a
//!   consumer was handed a record that a failover later cut from the log
//!   (written by a master that was then replaced, never acknowledged), and
//!   another record took its place, which the consumer may then skip.
//! - **unhandled**: a message stored below a group's final committed offset
//!   (in a subscribed topic or the group's retry topic) that the group
//!   neither handled nor dead-lettered: the group stands past a message it
//!   skipped. Checked for every group, the retrying one's too (the checkers
//!   above look at the orderly group only).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use super::history::{Event, Kind, Op};
use super::RETRY_GROUP;

/// One checker's result.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The checker.
    pub name: &'static str,
    /// Whether the history passed it.
    pub ok: bool,
    /// Violations found.
    pub violations: usize,
    /// What was checked, in a few words with the figures.
    pub summary: String,
    /// Up to five violating operations, for a first look.
    pub examples: Vec<String>,
}

/// Counts of the history's operations.
#[derive(Debug, Clone, Default)]
pub struct OpCounts {
    /// Plain sends: invoked, ok, fail, info.
    pub sends: [usize; 4],
    /// Transactional sends: invoked, ok, fail, info.
    pub txs: [usize; 4],
    /// Messages handled by consumers (repeats included).
    pub consumed: usize,
    /// Check-backs answered.
    pub checks: usize,
    /// Transactional producers killed between prepare and end.
    pub holds: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Changes of a broker group's master the harness saw (failover mode).
    pub failovers: usize,
}

impl OpCounts {
    /// Sends and transactions invoked.
    pub fn ops(&self) -> usize {
        self.sends[0] + self.txs[0]
    }
}

/// Counts the operations of `events`.
pub fn count(events: &[Event]) -> OpCounts {
    let mut c = OpCounts::default();
    let mut epochs: HashMap<String, u64> = HashMap::new();
    let slot = |k: Kind| match k {
        Kind::Invoke => 0,
        Kind::Ok => 1,
        Kind::Fail => 2,
        Kind::Info => 3,
    };
    for e in events {
        match e.f {
            Op::Send => c.sends[slot(e.kind)] += 1,
            Op::Tx => c.txs[slot(e.kind)] += 1,
            Op::Consume => c.consumed += 1,
            Op::Check => c.checks += 1,
            Op::Hold => c.holds += 1,
            Op::Master => {
                // Every election raises the epoch: count them all, even
                // two between the harness's looks.
                let group = e.broker.clone().unwrap_or_default();
                let epoch = e.offset.unwrap_or_default();
                if let Some(before) = epochs.insert(group, epoch) {
                    c.failovers += epoch.saturating_sub(before) as usize;
                }
            }
            Op::Fault if e.kind == Kind::Invoke => {
                let kind = e.id.split('#').next().unwrap_or(&e.id).to_string();
                *c.faults.entry(kind).or_default() += 1;
            }
            _ => {}
        }
    }
    c
}

/// Runs every checker over `events` (sorted by time). `grace_us` extends
/// each fault's window past its end.
pub fn check(events: &[Event], grace_us: u64) -> Vec<Verdict> {
    let h = Indexed::new(events, grace_us);
    let mut verdicts = vec![
        h.lost(),
        h.stored_twice(),
        h.duplicate(),
        h.order(),
        h.tx_committed_invisible(),
        h.tx_rolled_back_visible(),
        h.tx_visible_twice(),
        h.tx_pending(),
        h.unhandled(),
        h.diverged(),
    ];
    if h.effects_read.is_some() {
        verdicts.push(h.applied_once());
    }
    verdicts
}

/// A handling: when, and at which stored position.
#[derive(Debug, Clone)]
struct Handling {
    time_us: u64,
    position: (String, String, u32, u64),
    process: String,
}

struct Indexed<'a> {
    /// Invocations of sends and transactions, by id.
    invoked: HashMap<&'a str, &'a Event>,
    /// Completions (ok, fail, info) of sends and transactions, by id.
    completed: HashMap<&'a str, &'a Event>,
    /// Handlings per id, in time order.
    handled: HashMap<&'a str, Vec<Handling>>,
    /// Consume events in time order.
    consumes: Vec<&'a Event>,
    /// Transactions held (killed between prepare and end), by id.
    held: HashMap<&'a str, &'a Event>,
    /// The final pending list (msg id -> state).
    pending: HashMap<&'a str, &'a str>,
    /// Fault windows (start, end + grace), in microseconds.
    windows: Vec<(u64, u64)>,
    /// (group, id) of every message a group handled (a retry asked is
    /// not a handling), every group's.
    handled_by: HashSet<(&'a str, &'a str)>,
    /// (group, id) of every message in a group's dead-letter topic.
    dead: HashSet<(&'a str, &'a str)>,
    /// The final look at the groups: messages below their committed offsets.
    below: Vec<&'a Event>,
    /// Every message seen at a stored position (of a topic, not a retry
    /// topic): handed to a consumer of any group (a retried one's first
    /// delivery only: later ones come from the retry topic), or found
    /// there by the final look; in time order.
    placed: Vec<(Position, &'a str, String)>,
    /// The final look at the topics: positions per msg id, with the body.
    stored: HashMap<&'a str, Vec<(Position, &'a str)>>,
    /// (position, body) of every message the final look found.
    stored_at: HashSet<(Position, &'a str)>,
    /// Topics the final look could not read.
    stored_failed: Vec<&'a Event>,
    /// Dedup mode: rows of the effects table per msg id.
    effects: HashMap<&'a str, Vec<&'a Event>>,
    /// Dedup mode: whether the effects table was read (`None`: not dedup mode).
    effects_read: Option<bool>,
    /// Dedup mode: deliveries the dedup table found applied already.
    absorbed: usize,
}

/// (broker group, topic, queue, offset).
type Position = (String, String, u32, u64);

/// Where `e` (a consumption or a final look) says its message is stored,
/// when it says so and it is a topic's own position.
fn position_of(e: &Event) -> Option<Position> {
    let topic = e.topic.clone()?;
    if topic.starts_with('%') {
        return None;
    }
    Some((e.broker.clone()?, topic, e.queue?, e.offset?))
}

fn example(e: &Event) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| e.id.clone())
}

fn verdict(name: &'static str, violations: Vec<String>, summary: String) -> Verdict {
    Verdict {
        name,
        ok: violations.is_empty(),
        violations: violations.len(),
        summary,
        examples: violations.into_iter().take(5).collect(),
    }
}

impl<'a> Indexed<'a> {
    fn new(events: &'a [Event], grace_us: u64) -> Indexed<'a> {
        let mut h = Indexed {
            invoked: HashMap::new(),
            completed: HashMap::new(),
            handled: HashMap::new(),
            consumes: Vec::new(),
            held: HashMap::new(),
            pending: HashMap::new(),
            windows: Vec::new(),
            handled_by: HashSet::new(),
            dead: HashSet::new(),
            below: Vec::new(),
            placed: Vec::new(),
            stored: HashMap::new(),
            stored_at: HashSet::new(),
            stored_failed: Vec::new(),
            effects: HashMap::new(),
            effects_read: None,
            absorbed: 0,
        };
        let mut open_faults: HashMap<&str, u64> = HashMap::new();
        let end_of_run = events.last().map_or(0, |e| e.time_us);
        for e in events {
            match (e.f, e.kind) {
                (Op::Send | Op::Tx, Kind::Invoke) => {
                    h.invoked.insert(&e.id, e);
                }
                (Op::Send | Op::Tx, _) => {
                    h.completed.insert(&e.id, e);
                }
                (Op::Consume, kind) => {
                    let group = e.group.as_deref().unwrap_or_default();
                    if group != RETRY_GROUP || e.detail.is_none() {
                        if let Some(at) = position_of(e) {
                            h.placed
                                .push((at, &e.id, format!("handed to {}", e.process)));
                        }
                    }
                    if kind == Kind::Ok {
                        h.handled_by.insert((group, &e.id));
                    }
                    if group == RETRY_GROUP {
                        continue;
                    }
                    h.consumes.push(e);
                    h.handled.entry(&e.id).or_default().push(Handling {
                        time_us: e.time_us,
                        position: (
                            e.broker.clone().unwrap_or_default(),
                            e.topic.clone().unwrap_or_default(),
                            e.queue.unwrap_or_default(),
                            e.offset.unwrap_or_default(),
                        ),
                        process: e.process.clone(),
                    });
                }
                (Op::Hold, _) => {
                    h.held.insert(&e.id, e);
                }
                (Op::Below, _) => {
                    if e.kind == Kind::Ok {
                        if let Some(at) = position_of(e) {
                            h.placed.push((at, &e.id, "stored there at the end".into()));
                        }
                    }
                    h.below.push(e);
                }
                (Op::Stored, Kind::Ok) => {
                    if let (Some(at), Some(msg_id)) = (position_of(e), e.msg_id.as_deref()) {
                        h.stored_at.insert((at.clone(), &e.id));
                        h.stored.entry(msg_id).or_default().push((at, &e.id));
                    }
                }
                (Op::Stored, _) => h.stored_failed.push(e),
                (Op::Effect, Kind::Ok) => {
                    if let Some(msg_id) = e.msg_id.as_deref() {
                        h.effects.entry(msg_id).or_default().push(e);
                    }
                }
                (Op::Effect, Kind::Info) if e.id == "effects-read" => {
                    h.effects_read = Some(true);
                }
                (Op::Effect, Kind::Info) if e.id == "absorbed" => h.absorbed += 1,
                (Op::Effect, Kind::Fail) => {
                    h.effects_read = Some(false);
                }
                (Op::DeadLetter, _) => {
                    h.dead
                        .insert((e.group.as_deref().unwrap_or_default(), &e.id));
                }
                (Op::Pending, _) => {
                    if let (Some(msg_id), Some(status)) = (&e.msg_id, &e.status) {
                        h.pending.insert(msg_id, status);
                    }
                }
                (Op::Fault, Kind::Invoke) => {
                    open_faults.insert(&e.id, e.time_us);
                }
                (Op::Fault, _) => {
                    if let Some(start) = open_faults.remove(e.id.as_str()) {
                        h.windows.push((start, e.time_us + grace_us));
                    }
                }
                _ => {}
            }
        }
        // A fault never healed lasts to the end.
        h.windows.extend(
            open_faults
                .values()
                .map(|&start| (start, end_of_run + grace_us)),
        );
        h
    }

    fn in_window(&self, from_us: u64, to_us: u64) -> bool {
        self.windows
            .iter()
            .any(|&(start, end)| start <= to_us && end >= from_us)
    }

    fn is_tx(&self, id: &str) -> bool {
        self.invoked.get(id).is_some_and(|e| e.f == Op::Tx)
    }

    fn unhandled(&self) -> Verdict {
        let mut violations = Vec::new();
        let mut checked = 0;
        let mut dead = 0;
        let mut groups = BTreeMap::new();
        for e in &self.below {
            let group = e.group.as_deref().unwrap_or_default();
            if e.kind != Kind::Ok {
                // The harness could not look: nothing is known.
                violations.push(format!("not checked: {}", example(e)));
                continue;
            }
            checked += 1;
            *groups.entry(group).or_insert(0) += 1;
            if self.handled_by.contains(&(group, e.id.as_str())) {
                continue;
            }
            if self.dead.contains(&(group, e.id.as_str())) {
                dead += 1;
                continue;
            }
            violations.push(format!(
                "{group} committed past {} at {:?}/{:?}/{:?}@{:?} without handling or dead-lettering it",
                e.id, e.broker, e.topic, e.queue, e.offset
            ));
        }
        let per_group: Vec<String> = groups.iter().map(|(g, n)| format!("{g} {n}")).collect();
        let summary = format!(
            "{} of {checked} messages below the groups' committed offsets ({}) neither handled nor dead-lettered; {dead} dead-lettered",
            violations.len(),
            per_group.join(", ")
        );
        verdict("unhandled", violations, summary)
    }

    fn lost(&self) -> Verdict {
        let mut acked = 0;
        let mut not_acked: BTreeMap<&str, usize> = BTreeMap::new();
        let mut lost = Vec::new();
        for (id, e) in &self.completed {
            if e.f != Op::Send || e.kind != Kind::Ok {
                continue;
            }
            if e.status.as_deref() != Some("SEND_OK") {
                *not_acked
                    .entry(e.status.as_deref().unwrap_or("no status"))
                    .or_default() += 1;
                continue;
            }
            acked += 1;
            if !self.handled.contains_key(id) {
                lost.push(example(e));
            }
        }
        lost.sort();
        let not_acked: Vec<String> = not_acked.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let summary = format!(
            "{} of {acked} sends acknowledged SEND_OK never consumed (not counted: {})",
            lost.len(),
            if not_acked.is_empty() {
                "none".to_string()
            } else {
                not_acked.join(", ")
            }
        );
        verdict("lost", lost, summary)
    }

    fn stored_twice(&self) -> Verdict {
        let mut violations: Vec<String> = self
            .stored_failed
            .iter()
            .map(|e| format!("not checked: {}", example(e)))
            .collect();
        for (msg_id, at) in &self.stored {
            let positions: HashSet<&Position> = at.iter().map(|(p, _)| p).collect();
            if positions.len() > 1 {
                let mut list: Vec<String> = positions.iter().map(|p| format!("{p:?}")).collect();
                list.sort();
                violations.push(format!(
                    "{msg_id} ({}) stored at {}",
                    at[0].1,
                    list.join(", ")
                ));
            }
        }
        violations.sort();
        let summary = format!(
            "{} of {} stored messages (by msg id, every queue from offset 0) stored more than once; {} topics not read",
            violations.len() - self.stored_failed.len(),
            self.stored.len(),
            self.stored_failed.len()
        );
        verdict("stored-twice", violations, summary)
    }

    fn duplicate(&self) -> Verdict {
        let mut violations = Vec::new();
        let mut unsent = 0;
        let mut allowed = 0;
        let mut cut = 0;
        let mut repeated_ids = 0;
        for e in &self.consumes {
            if !self.invoked.contains_key(e.id.as_str()) {
                unsent += 1;
                violations.push(format!("consumed but never sent: {}", example(e)));
            }
        }
        for (id, handlings) in &self.handled {
            if handlings.len() < 2 {
                continue;
            }
            repeated_ids += 1;
            let first = &handlings[0];
            for h in &handlings[1..] {
                if h.position != first.position {
                    // Another copy: allowed only when one of the two was
                    // cut by a failover (the final look finds nothing of
                    // it there), so one copy is stored.
                    let gone = |p: &Position| !self.stored_at.contains(&(p.clone(), *id));
                    let gone =
                        !self.stored.is_empty() && (gone(&first.position) || gone(&h.position));
                    if gone {
                        cut += 1;
                    } else {
                        violations.push(format!(
                            "{id} handled at {:?} by {}, then from another stored copy at {:?} by {}",
                            first.position, first.process, h.position, h.process
                        ));
                    }
                } else if self.in_window(first.time_us, h.time_us) {
                    allowed += 1;
                } else {
                    violations.push(format!(
                        "{id} handled again at {} by {} ({:?}) with no fault since its first handling at {}",
                        h.time_us, h.process, h.position, first.time_us
                    ));
                }
            }
        }
        let summary = format!(
            "{unsent} consumed without being sent, {} repeats not from consumer-side redelivery; {allowed} redeliveries of {repeated_ids} messages within the at-least-once window, {cut} of a copy a failover cut",
            violations.len() - unsent
        );
        verdict("duplicate", violations, summary)
    }

    fn applied_once(&self) -> Verdict {
        let mut violations = Vec::new();
        if self.effects_read == Some(false) {
            violations.push("the effects table could not be read".to_string());
        }
        let rows = |e: &Event| {
            e.msg_id
                .as_deref()
                .and_then(|m| self.effects.get(m))
                .map_or(0, Vec::len)
        };
        let mut must = 0;
        for (id, done) in &self.completed {
            let acked = done.f == Op::Send
                && done.kind == Kind::Ok
                && done.status.as_deref() == Some("SEND_OK");
            if !acked {
                continue;
            }
            must += 1;
            if let Some(inv) = self.invoked.get(id) {
                if rows(inv) == 0 {
                    violations.push(format!("acknowledged but never applied: {}", example(inv)));
                }
            }
        }
        let (visible, _, _) = self.must_be_visible();
        for e in &visible {
            must += 1;
            if rows(e) == 0 {
                violations.push(format!("committed but never applied: {}", example(e)));
            }
        }
        let mut total = 0;
        for (msg_id, list) in &self.effects {
            total += list.len();
            if list.len() > 1 {
                let by: Vec<&str> = list.iter().filter_map(|e| e.detail.as_deref()).collect();
                violations.push(format!(
                    "{msg_id} ({}) applied {} times ({})",
                    list[0].id,
                    list.len(),
                    by.join(", ")
                ));
            }
            let e = list[0];
            match self.invoked.get(e.id.as_str()) {
                None => violations.push(format!("applied but never sent: {}", example(e))),
                Some(inv) if inv.truth.as_deref() == Some("rollback") => {
                    violations.push(format!("applied but rolled back: {}", example(e)))
                }
                Some(_) => {}
            }
        }
        violations.sort();
        let summary = format!(
            "{} violations among {total} effects for {} msg ids and {must} acknowledged sends and committed transactions; {} redeliveries absorbed by the dedup table",
            violations.len(),
            self.effects.len(),
            self.absorbed
        );
        verdict("applied-once", violations, summary)
    }

    fn order(&self) -> Verdict {
        // Per key: acknowledged sends in send order, and the queues they
        // were stored in (one: each key's topic lives on one broker group,
        // so its queue never changes).
        let mut sends: HashMap<&str, Vec<&Event>> = HashMap::new();
        let mut queues: HashMap<&str, BTreeMap<(&str, u32), usize>> = HashMap::new();
        for e in self.invoked.values() {
            if e.f != Op::Send {
                continue;
            }
            let Some(done) = self.completed.get(e.id.as_str()) else {
                continue;
            };
            if let (Kind::Ok, Some(key)) = (done.kind, e.key.as_deref()) {
                sends.entry(key).or_default().push(e);
                if let (Some(broker), Some(queue)) = (done.broker.as_deref(), done.queue) {
                    *queues
                        .entry(key)
                        .or_default()
                        .entry((broker, queue))
                        .or_default() += 1;
                }
            }
        }
        let mut rank: HashMap<&str, (&str, usize)> = HashMap::new();
        for (key, list) in sends.iter_mut() {
            list.sort_by_key(|e| e.time_us);
            for (i, e) in list.iter().enumerate() {
                rank.insert(&e.id, (key, i));
            }
        }
        let mut highest: HashMap<&str, (usize, &str)> = HashMap::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut violations = Vec::new();
        let mut checked = 0;
        for e in &self.consumes {
            let Some(&(key, i)) = rank.get(e.id.as_str()) else {
                continue;
            };
            if !seen.insert(&e.id) {
                continue;
            }
            checked += 1;
            match highest.get(key) {
                Some(&(top, top_id)) if top > i => violations.push(format!(
                    "key {key}: {} first consumed after {top_id}, which was sent later",
                    e.id
                )),
                _ => {
                    highest.insert(key, (i, &e.id));
                }
            }
        }
        // Caught even when the consumers happened to read them in order.
        let mut moved: Vec<String> = queues
            .iter()
            .filter(|(_, q)| q.len() > 1)
            .map(|(key, q)| {
                let at: Vec<String> = q
                    .iter()
                    .map(|((broker, queue), n)| format!("{n} in {broker} queue {queue}"))
                    .collect();
                format!(
                    "key {key}: acknowledged sends in {} queues ({})",
                    q.len(),
                    at.join(", ")
                )
            })
            .collect();
        moved.sort();
        let keys_moved = moved.len();
        let summary = format!(
            "{} out-of-order first consumptions among {checked} acknowledged sends over {} keys; {keys_moved} keys stored in more than one queue",
            violations.len(),
            sends.len()
        );
        violations.extend(moved);
        verdict("order", violations, summary)
    }

    /// Transactions that must be visible: the commit was acknowledged, or
    /// the prepare certainly happened and the truth is commit, and the
    /// transaction is not parked.
    fn must_be_visible(&self) -> (Vec<&'a Event>, usize, usize) {
        let mut out = Vec::new();
        let mut parked = 0;
        let mut unsure = 0;
        for e in self.invoked.values() {
            if e.f != Op::Tx {
                continue;
            }
            let done = self.completed.get(e.id.as_str());
            if done.is_some_and(|c| c.prepare.is_some()) {
                // Rolled back by the producer unrun; its check-backs say
                // commit: either end is right.
                unsure += 1;
                continue;
            }
            let committed_ack = done.is_some_and(|c| c.status.as_deref() == Some("committed"));
            let prepared =
                done.is_some_and(|c| c.tx_id.is_some()) || self.held.contains_key(e.id.as_str());
            let truth_commit = e.truth.as_deref() == Some("commit");
            if !(committed_ack || prepared && truth_commit) {
                continue;
            }
            let is_parked = e
                .msg_id
                .as_deref()
                .and_then(|m| self.pending.get(m))
                .is_some_and(|s| *s == "parked");
            if is_parked && !committed_ack {
                parked += 1;
                continue;
            }
            out.push(*e);
        }
        (out, parked, unsure)
    }

    fn tx_committed_invisible(&self) -> Verdict {
        let (must, parked, unsure) = self.must_be_visible();
        let mut lost: Vec<String> = must
            .iter()
            .filter(|e| !self.handled.contains_key(e.id.as_str()))
            .map(|e| example(e))
            .collect();
        lost.sort();
        let summary = format!(
            "{} of {} committed transactions never consumed ({parked} parked and {unsure} with a prepare not SEND_OK, not counted)",
            lost.len(),
            must.len()
        );
        verdict("tx-committed-invisible", lost, summary)
    }

    fn tx_rolled_back_visible(&self) -> Verdict {
        let mut rollbacks = 0;
        let mut visible = Vec::new();
        for e in self.invoked.values() {
            if e.f != Op::Tx || e.truth.as_deref() != Some("rollback") {
                continue;
            }
            rollbacks += 1;
            if self.handled.contains_key(e.id.as_str()) {
                visible.push(example(e));
            }
        }
        let summary = format!(
            "{} of {rollbacks} rolled-back transactions consumed",
            visible.len()
        );
        verdict("tx-rolled-back-visible", visible, summary)
    }

    fn tx_visible_twice(&self) -> Verdict {
        let mut twice = Vec::new();
        let mut visible = 0;
        for (id, handlings) in &self.handled {
            if !self.is_tx(id) {
                continue;
            }
            visible += 1;
            let positions: HashSet<_> = handlings.iter().map(|h| &h.position).collect();
            if positions.len() > 1 {
                let mut p = String::new();
                for pos in &positions {
                    let _ = write!(p, " {pos:?}");
                }
                twice.push(format!("{id} stored at{p}"));
            }
        }
        let summary = format!(
            "{} of {visible} visible transactions stored more than once",
            twice.len()
        );
        verdict("tx-visible-twice", twice, summary)
    }

    fn diverged(&self) -> Verdict {
        let mut at: HashMap<&Position, (&str, &str)> = HashMap::new();
        let mut violations = Vec::new();
        for (position, id, what) in &self.placed {
            match at.get(position) {
                Some((other, first)) if *other != *id => {
                    violations.push(format!("{position:?}: {other} {first}, then {id} {what}"))
                }
                Some(_) => {}
                None => {
                    at.insert(position, (id, what));
                }
            }
        }
        let summary = format!(
            "{} stored positions that held two different messages, among {} handed out or looked at",
            violations.len(),
            at.len()
        );
        verdict("diverged", violations, summary)
    }

    fn tx_pending(&self) -> Verdict {
        let mut still = Vec::new();
        let mut parked = 0;
        for (msg_id, state) in &self.pending {
            match *state {
                "parked" => parked += 1,
                other => still.push(format!("{msg_id} still {other}")),
            }
        }
        still.sort();
        let summary = format!(
            "{} transactions still prepared after the run plus the check timeout; {parked} parked",
            still.len()
        );
        verdict("tx-pending", still, summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, kind: Kind, f: Op, id: &str) -> Event {
        let mut e = Event::new("p", kind, f, id);
        e.time_us = t;
        e
    }

    fn send(out: &mut Vec<Event>, t: u64, id: &str, key: &str, kind: Kind) {
        let mut i = ev(t, Kind::Invoke, Op::Send, id);
        i.key = Some(key.into());
        out.push(i);
        let mut o = ev(t + 1, kind, Op::Send, id);
        o.status = Some("SEND_OK".into());
        out.push(o);
    }

    fn consume(out: &mut Vec<Event>, t: u64, id: &str, offset: u64) {
        let mut c = ev(t, Kind::Ok, Op::Consume, id);
        c.broker = Some("b".into());
        c.topic = Some("t".into());
        c.queue = Some(0);
        c.offset = Some(offset);
        out.push(c);
    }

    fn failed(v: &[Verdict]) -> Vec<(&'static str, usize)> {
        v.iter()
            .filter(|v| !v.ok)
            .map(|v| (v.name, v.violations))
            .collect()
    }

    #[test]
    fn a_clean_history_passes_and_each_violation_is_caught() {
        let mut h = Vec::new();
        send(&mut h, 10, "k:1", "k", Kind::Ok);
        send(&mut h, 20, "k:2", "k", Kind::Ok);
        send(&mut h, 30, "k:3", "k", Kind::Info);
        consume(&mut h, 40, "k:1", 0);
        consume(&mut h, 41, "k:2", 1);
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));

        // Lost, out of order, a repeat with no fault, and a stranger.
        let mut bad = Vec::new();
        send(&mut bad, 10, "k:1", "k", Kind::Ok);
        send(&mut bad, 20, "k:2", "k", Kind::Ok);
        send(&mut bad, 30, "k:3", "k", Kind::Ok);
        consume(&mut bad, 40, "k:2", 1);
        consume(&mut bad, 41, "k:1", 0);
        consume(&mut bad, 42, "k:1", 0);
        consume(&mut bad, 43, "x", 5);
        assert_eq!(
            failed(&check(&bad, 0)),
            [("lost", 1), ("duplicate", 2), ("order", 1)]
        );

        // The same repeat inside a fault's window is allowed.
        let mut f = ev(41, Kind::Invoke, Op::Fault, "kill-consumer#1");
        bad.push(f.clone());
        f.kind = Kind::Ok;
        f.time_us = 41;
        bad.push(f);
        bad.sort_by_key(|e| e.time_us);
        assert_eq!(
            failed(&check(&bad, 0)),
            [("lost", 1), ("duplicate", 1), ("order", 1)]
        );
    }

    /// A key whose acknowledged sends were stored in two queues fails the
    /// order checker, even when they were read in order.
    #[test]
    fn a_key_stored_in_two_queues_is_out_of_order() {
        let mut h = Vec::new();
        send(&mut h, 10, "k:1", "k", Kind::Ok);
        send(&mut h, 20, "k:2", "k", Kind::Ok);
        consume(&mut h, 40, "k:1", 0);
        consume(&mut h, 41, "k:2", 1);
        let stored = |h: &mut Vec<Event>, id: &str, queue: u32| {
            let e = h
                .iter_mut()
                .find(|e| e.id == id && e.kind == Kind::Ok && e.f == Op::Send)
                .expect("sent");
            e.broker = Some("b".into());
            e.queue = Some(queue);
        };
        stored(&mut h, "k:1", 0);
        stored(&mut h, "k:2", 0);
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));
        stored(&mut h, "k:2", 3);
        let verdicts = check(&h, 0);
        assert_eq!(failed(&verdicts), [("order", 1)]);
        let order = verdicts.iter().find(|v| v.name == "order").unwrap();
        assert!(
            order.examples[0].contains("1 in b queue 0, 1 in b queue 3"),
            "{order:?}"
        );
    }

    /// The retrying group's handlings are not held to the order and
    /// duplicate checkers; a message below a group's committed offset must
    /// have been handled (a retry asked does not count) or dead-lettered.
    #[test]
    fn messages_below_committed_offsets_must_be_handled_or_dead_lettered() {
        let below = |h: &mut Vec<Event>, t: u64, group: &str, id: &str| {
            let mut b = ev(t, Kind::Ok, Op::Below, id);
            b.group = Some(group.into());
            h.push(b);
        };
        let handle = |h: &mut Vec<Event>, t: u64, group: &str, id: &str, kind: Kind| {
            let mut c = ev(t, kind, Op::Consume, id);
            c.group = Some(group.into());
            h.push(c);
        };
        let mut h = Vec::new();
        send(&mut h, 10, "k:1", "k", Kind::Ok);
        send(&mut h, 20, "k:2", "k", Kind::Ok);
        handle(&mut h, 30, "cg", "k:1", Kind::Ok);
        handle(&mut h, 31, "cg", "k:2", Kind::Ok);
        // The retrier: k:2 twice, and in the other order, is fine there.
        handle(&mut h, 32, RETRY_GROUP, "k:2", Kind::Ok);
        handle(&mut h, 33, RETRY_GROUP, "k:2", Kind::Ok);
        handle(&mut h, 34, RETRY_GROUP, "k:1", Kind::Info);
        let mut dead = ev(40, Kind::Ok, Op::DeadLetter, "k:1");
        dead.group = Some(RETRY_GROUP.into());
        h.push(dead);
        below(&mut h, 41, "cg", "k:1");
        below(&mut h, 42, "cg", "k:2");
        below(&mut h, 43, RETRY_GROUP, "k:1");
        below(&mut h, 44, RETRY_GROUP, "k:2");
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));

        // Only asked to retry, not dead-lettered: skipped.
        h.retain(|e| e.f != Op::DeadLetter);
        // And a look that failed.
        let mut blind = ev(45, Kind::Fail, Op::Below, "chaos-a");
        blind.group = Some("cg".into());
        h.push(blind);
        assert_eq!(failed(&check(&h, 0)), [("unhandled", 2)]);
    }

    /// A failover may cut a record a consumer already had: another record
    /// then takes its position, which the `diverged` checker catches. A
    /// send answered other than `SEND_OK` is not acknowledged, and a
    /// transaction whose prepare was not `SEND_OK` may end either way.
    #[test]
    fn failover_histories_are_judged_by_what_was_acknowledged() {
        let mut h = Vec::new();
        send(&mut h, 10, "k:1", "k", Kind::Ok);
        let mut i = ev(20, Kind::Invoke, Op::Send, "k:2");
        i.key = Some("k".into());
        h.push(i);
        let mut o = ev(21, Kind::Ok, Op::Send, "k:2");
        o.status = Some("FLUSH_SLAVE_TIMEOUT".into());
        h.push(o);
        consume(&mut h, 30, "k:1", 0);
        let mut t = ev(40, Kind::Invoke, Op::Tx, "t");
        t.truth = Some("commit".into());
        t.msg_id = Some("Mt".into());
        h.push(t);
        let mut t = ev(41, Kind::Ok, Op::Tx, "t");
        t.tx_id = Some(7);
        t.status = Some("rolled_back".into());
        t.prepare = Some("FLUSH_SLAVE_TIMEOUT".into());
        h.push(t);
        for (at, epoch) in [(5, 1), (50, 2), (60, 4)] {
            let mut m = ev(at, Kind::Info, Op::Master, "broker-a");
            m.broker = Some("broker-a".into());
            m.offset = Some(epoch);
            h.push(m);
        }
        h.sort_by_key(|e| e.time_us);
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));
        assert_eq!(count(&h).failovers, 3);

        // k:2 was read at offset 1 before a failover cut it; k:3 took its
        // place, and the final look finds it there (the group went on past it).
        let mut cut = h.clone();
        consume(&mut cut, 31, "k:2", 1);
        send(&mut cut, 70, "k:3", "k", Kind::Ok);
        let mut below = ev(90, Kind::Ok, Op::Below, "k:3");
        below.broker = Some("b".into());
        below.topic = Some("t".into());
        below.queue = Some(0);
        below.offset = Some(1);
        cut.push(below);
        cut.sort_by_key(|e| e.time_us);
        assert_eq!(
            failed(&check(&cut, 0)),
            [("lost", 1), ("unhandled", 1), ("diverged", 1)]
        );
        // Or a consumer is handed k:3 there too.
        consume(&mut h, 31, "k:2", 1);
        send(&mut h, 70, "k:3", "k", Kind::Ok);
        consume(&mut h, 80, "k:3", 1);
        h.sort_by_key(|e| e.time_us);
        assert_eq!(failed(&check(&h, 0)), [("diverged", 1)]);
    }

    #[test]
    fn transactions_are_checked_against_their_truth() {
        let mut h = Vec::new();
        let tx = |h: &mut Vec<Event>, t: u64, id: &str, truth: &str, status: &str| {
            let mut i = ev(t, Kind::Invoke, Op::Tx, id);
            i.truth = Some(truth.into());
            i.msg_id = Some(format!("M{id}"));
            h.push(i);
            let mut o = ev(t + 1, Kind::Ok, Op::Tx, id);
            o.tx_id = Some(t);
            o.status = Some(status.into());
            h.push(o);
        };
        tx(&mut h, 10, "c", "commit", "committed");
        tx(&mut h, 20, "u", "commit", "prepared");
        tx(&mut h, 30, "r", "rollback", "rolled_back");
        tx(&mut h, 40, "p", "commit", "prepared");
        consume(&mut h, 50, "c", 0);
        consume(&mut h, 51, "u", 1);
        let mut parked = ev(60, Kind::Info, Op::Pending, "p");
        parked.msg_id = Some("Mp".into());
        parked.status = Some("parked".into());
        h.push(parked);
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));

        consume(&mut h, 52, "r", 2);
        consume(&mut h, 53, "c", 7);
        let mut pending = ev(61, Kind::Info, Op::Pending, "x");
        pending.msg_id = Some("Mx".into());
        pending.status = Some("prepared".into());
        h.push(pending);
        h.retain(|e| !(e.f == Op::Consume && e.id == "u"));
        h.sort_by_key(|e| e.time_us);
        assert_eq!(
            failed(&check(&h, 0)),
            [
                ("duplicate", 1),
                ("tx-committed-invisible", 1),
                ("tx-rolled-back-visible", 1),
                ("tx-visible-twice", 1),
                ("tx-pending", 1)
            ]
        );
    }

    fn stored(out: &mut Vec<Event>, t: u64, id: &str, offset: u64) {
        let mut e = ev(t, Kind::Ok, Op::Stored, id);
        e.broker = Some("b".into());
        e.topic = Some("t".into());
        e.queue = Some(0);
        e.offset = Some(offset);
        e.msg_id = Some(format!("M{id}"));
        out.push(e);
    }

    /// The exact checkers: a message stored at two positions fails
    /// `stored-twice`, and handling both copies fails `duplicate` even
    /// inside a fault's window; a repeat of one stored copy within the
    /// window is redelivery, and a copy a failover cut (the final look
    /// no longer finds it there) may precede the stored one.
    #[test]
    fn a_message_stored_twice_is_caught_and_only_redelivery_repeats() {
        let mut h = Vec::new();
        send(&mut h, 10, "k:1", "k", Kind::Ok);
        send(&mut h, 20, "k:2", "k", Kind::Ok);
        let mut f = ev(25, Kind::Invoke, Op::Fault, "kill-consumer#1");
        h.push(f.clone());
        f.kind = Kind::Ok;
        f.time_us = 60;
        h.push(f);
        consume(&mut h, 30, "k:1", 0);
        consume(&mut h, 31, "k:2", 1);
        // Redelivered after the kill: the same stored copy.
        consume(&mut h, 40, "k:2", 1);
        // k:1 was also handed out at 2 by a master a failover replaced,
        // and cut: the final look finds it only at 0.
        consume(&mut h, 41, "k:1", 2);
        stored(&mut h, 90, "k:1", 0);
        stored(&mut h, 91, "k:2", 1);
        h.sort_by_key(|e| e.time_us);
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));

        // A retry stored k:2 again at 3, and a consumer handled that copy.
        let mut twice = h.clone();
        stored(&mut twice, 92, "k:2", 3);
        consume(&mut twice, 50, "k:2", 3);
        twice.sort_by_key(|e| e.time_us);
        assert_eq!(
            failed(&check(&twice, 0)),
            [("stored-twice", 1), ("duplicate", 1)]
        );

        // A look that failed is no pass.
        let mut blind = h.clone();
        blind.push(ev(93, Kind::Fail, Op::Stored, "t"));
        assert_eq!(failed(&check(&blind, 0)), [("stored-twice", 1)]);
    }

    /// Dedup mode: each acknowledged send and committed transaction has
    /// exactly one row in the effects table.
    #[test]
    fn dedup_mode_holds_each_acknowledged_message_to_one_effect() {
        let effect = |h: &mut Vec<Event>, t: u64, id: &str| {
            let mut e = ev(t, Kind::Ok, Op::Effect, id);
            e.msg_id = Some(format!("M{id}"));
            h.push(e);
        };
        let mut h = Vec::new();
        for (t, id) in [(10, "k:1"), (20, "k:2")] {
            send(&mut h, t, id, "k", Kind::Ok);
            let invoke = h.len() - 2;
            h[invoke].msg_id = Some(format!("M{id}"));
        }
        consume(&mut h, 30, "k:1", 0);
        consume(&mut h, 31, "k:2", 1);
        // No effects read: not dedup mode, no verdict.
        assert!(check(&h, 0).iter().all(|v| v.name != "applied-once"));
        h.push(ev(90, Kind::Info, Op::Effect, "effects-read"));
        effect(&mut h, 91, "k:1");
        effect(&mut h, 92, "k:2");
        assert!(failed(&check(&h, 0)).is_empty(), "{:?}", check(&h, 0));

        // Applied twice, and one never applied.
        let mut bad = h.clone();
        bad.retain(|e| !(e.f == Op::Effect && e.id == "k:2"));
        effect(&mut bad, 93, "k:1");
        effect(&mut bad, 94, "x");
        assert_eq!(failed(&check(&bad, 0)), [("applied-once", 3)]);

        // The table could not be read.
        let mut unread = h.clone();
        unread.push(ev(95, Kind::Fail, Op::Effect, "effects-read"));
        assert_eq!(failed(&check(&unread, 0)), [("applied-once", 1)]);
    }
}
