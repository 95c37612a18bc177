//! Replicated broker groups: a master and its slaves under one
//! `--broker-name`, holding the same commit log, byte for byte, at the same
//! positions.
//!
//! A slave (`slave.rs`) streams the master's log from its own end: it asks
//! with [`ReplicaFetch`] (a long poll, with its last record's position and
//! checksum, which the master checks against its own log), verifies every
//! record's checksum on arrival, appends the bytes at the master's positions
//! through the store's own writer, which derives consume queues, offsets,
//! transactions and delay levels from them as recovery does, and
//! acknowledges with [`ReplicaAck`] once they are stored per its flush mode.
//! The next fetch goes out before the previous batch is written (two batches
//! in flight).
//!
//! The master (this file) serves the fetches from the mapped log (never past
//! what its own flush mode made durable, so that a power cut cannot leave a
//! slave holding what the master lost), tracks each slave's acknowledged
//! position and whether it is in sync, and, under sync replication, holds
//! answers until `--min-insync-replicas` replicas (itself included) hold the
//! record ([`Replication::confirm`]).

pub(crate) mod controlled;
pub(crate) mod epochs;
mod slave;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;
use txmq_protocol::{
    BrokerRole, EpochEnd, EpochEndQuery, ErrorCode, ReplicaAck, ReplicaData, ReplicaFetch,
    ReplicaInfo, ReplicationInfo, Role, SendStatus, WireError,
};
use txmq_remoting::Connection;

pub(crate) use slave::run as run_slave;

use crate::config::{ReplicationConfig, ReplicationMode};
use crate::store::{LogReadError, RecordCheck};
use crate::BrokerInner;

/// The most a fetch may ask for at once (a frame must hold it).
const MAX_FETCH_BYTES: u32 = 4 << 20;
/// The longest a fetch may wait for data.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(5);
/// Under async replication, a fetch with less than this much data waits up
/// to [`LINGER`] for more: fewer, larger frames cost the slaves (and the
/// master) less per record, and nobody waits for them.
const LINGER_BELOW: usize = 256 << 10;
/// See [`LINGER_BELOW`].
const LINGER: Duration = Duration::from_millis(5);

/// What sync replication made of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// Enough replicas hold it (or nothing needs to wait).
    Yes,
    /// Too few replicas confirmed it in time.
    Timeout,
    /// Too few replicas are in sync to wait for.
    NotAvailable,
}

impl Confirmed {
    /// A status for an answer that carries one, given whether the write
    /// was durable on the master.
    pub(crate) fn status(self, durable: bool) -> SendStatus {
        match (durable, self) {
            (false, _) => SendStatus::FlushDiskTimeout,
            (true, Confirmed::Yes) => SendStatus::SendOk,
            (true, Confirmed::Timeout) => SendStatus::FlushSlaveTimeout,
            (true, Confirmed::NotAvailable) => SendStatus::SlaveNotAvailable,
        }
    }

    /// An error for an answer without a status (an offset commit).
    pub(crate) fn into_result(self, what: &str) -> Result<(), WireError> {
        match self {
            Confirmed::Yes => Ok(()),
            Confirmed::Timeout => Err(WireError::new(
                ErrorCode::FlushSlaveTimeout,
                format!("{what} is stored on the master, but too few slaves confirmed it in time"),
            )),
            Confirmed::NotAvailable => Err(WireError::new(
                ErrorCode::SlaveNotAvailable,
                format!("{what} is stored on the master only: too few slaves are in sync"),
            )),
        }
    }
}

/// One slave as the master sees it (per connection).
#[derive(Debug)]
struct Replica {
    addr: String,
    acked: u64,
    /// How far this connection was sent the log (or held it when it
    /// connected): an acknowledgement past it is refused.
    sent: u64,
    last_seen: Instant,
    /// The last moment it held everything the master had written then.
    caught_up_at: Option<Instant>,
    /// (when, the master's end then): reached by an ack, it moves `caught_up_at`.
    mark: Option<(Instant, u64)>,
}

/// What a slave knows of its replication (for `GetReplication`).
#[derive(Debug, Default, Clone)]
pub(crate) struct SlaveStatus {
    pub(crate) master_addr: Option<String>,
    pub(crate) master_end: Option<u64>,
    /// Why it stopped replicating.
    pub(crate) error: Option<String>,
}

/// The broker's part in its group.
pub(crate) struct Replication {
    pub(crate) config: ReplicationConfig,
    /// Master: its slaves, by connection id.
    replicas: Mutex<HashMap<u64, Replica>>,
    /// Master: whether a slave ever fetched from it in this run (one may
    /// then serve its groups while it is down).
    had_replicas: std::sync::atomic::AtomicBool,
    /// Master: the position held by enough slaves (never moves back).
    confirmed: watch::Sender<u64>,
    /// Slave: what it knows of its master.
    pub(crate) slave: Mutex<SlaveStatus>,
    /// Slave: offsets committed to it, kept until the master has them.
    pub(crate) kept_offsets: DashMap<(String, String, u32), u64>,
    /// Slave: the version of the master's topic table it holds.
    pub(crate) master_topics_version: AtomicU64,
    /// Master: what it shipped to its slaves.
    shipped: Shipped,
    /// Under a controller: this incarnation's part in it.
    pub(crate) control: Option<Controlled>,
}

/// An incarnation's part under a controller.
pub(crate) struct Controlled {
    /// What lives across incarnations: heartbeats, the epoch file.
    pub(crate) shared: Arc<controlled::Control>,
    /// A master: its epoch. A slave: the epoch of the master it follows
    /// (changes when the controller names another).
    pub(crate) epoch: AtomicU64,
    /// A slave: the master to follow and its epoch, as the controller says.
    pub(crate) master: Option<watch::Receiver<Option<(String, u64)>>>,
    /// A master: the in-sync set.
    isr: Mutex<Isr>,
    /// A master: refusing writes while it drains for a planned switch.
    pub(crate) draining: AtomicBool,
}

/// A master's in-sync set: as the controller holds it, and a change asked
/// for and not yet answered (both count while it is in flight).
#[derive(Debug, Default)]
struct Isr {
    current: BTreeSet<String>,
    proposed: Option<BTreeSet<String>>,
    /// Per replica address: the last moment it held everything the master
    /// had written then (kept across its reconnections).
    caught_up: HashMap<String, Instant>,
}

impl Isr {
    /// Who a write waits for: the current set and any proposed one.
    fn effective(&self) -> BTreeSet<String> {
        let mut all = self.current.clone();
        if let Some(p) = &self.proposed {
            all.extend(p.iter().cloned());
        }
        all
    }
}

/// Replication frames (non-empty fetch answers), records and bytes shipped.
#[derive(Default)]
struct Shipped {
    frames: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
}

impl Replication {
    pub(crate) fn new(config: ReplicationConfig) -> Replication {
        Replication {
            config,
            replicas: Mutex::new(HashMap::new()),
            had_replicas: std::sync::atomic::AtomicBool::new(false),
            confirmed: watch::channel(0).0,
            slave: Mutex::new(SlaveStatus::default()),
            kept_offsets: DashMap::new(),
            master_topics_version: AtomicU64::new(0),
            shipped: Shipped::default(),
            control: None,
        }
    }

    /// An incarnation under a controller: a master at `epoch` with the
    /// controller's in-sync set, or a slave following `master`.
    pub(crate) fn controlled(
        config: ReplicationConfig,
        shared: Arc<controlled::Control>,
        epoch: u64,
        in_sync: Vec<String>,
        master: Option<watch::Receiver<Option<(String, u64)>>>,
    ) -> Replication {
        let now = Instant::now();
        let isr = Isr {
            // Every member starts in sync: it was when the controller said so.
            caught_up: in_sync.iter().map(|a| (a.clone(), now)).collect(),
            current: in_sync.into_iter().collect(),
            proposed: None,
        };
        Replication {
            control: Some(Controlled {
                shared,
                epoch: AtomicU64::new(epoch),
                master,
                isr: Mutex::new(isr),
                draining: AtomicBool::new(false),
            }),
            ..Replication::new(config)
        }
    }

    pub(crate) fn is_slave(&self) -> bool {
        self.config.role == BrokerRole::Slave
    }

    /// The epoch this incarnation is master of, or follows (0: no controller).
    pub(crate) fn epoch(&self) -> u64 {
        self.control
            .as_ref()
            .map_or(0, |c| c.epoch.load(Ordering::Acquire))
    }

    fn isr(&self) -> Option<std::sync::MutexGuard<'_, Isr>> {
        self.control
            .as_ref()
            .map(|c| c.isr.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why this broker takes no writes now, if it does not: a slave; under
    /// a controller also a master that drains for a planned switch or has
    /// not heard back from the controller for a master expiry (it may have
    /// been replaced).
    pub(crate) fn write_refusal(&self, b: &BrokerInner) -> Option<WireError> {
        if self.is_slave() {
            return Some(self.not_master(b));
        }
        let c = self.control.as_ref()?;
        if c.draining.load(Ordering::Acquire) {
            return Some(WireError::new(
                ErrorCode::NotMaster,
                format!(
                    "broker {} is handing broker group '{}' over to another master (a planned switch); retry in a moment",
                    b.advertised_addr, b.config.broker_name
                ),
            ));
        }
        if !c.shared.lease_valid() {
            return Some(WireError::new(
                ErrorCode::NotMaster,
                format!(
                    "broker {} has not heard from the controller for a master expiry and takes no writes: another master of broker group '{}' may have been elected",
                    b.advertised_addr, b.config.broker_name
                ),
            ));
        }
        None
    }

    /// Whether a slave ever fetched from this master in this run.
    pub(crate) fn had_replicas(&self) -> bool {
        self.had_replicas.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn replicas(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Replica>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn slave_status(&self) -> std::sync::MutexGuard<'_, SlaveStatus> {
        self.slave.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The refusal a slave gives a write.
    pub(crate) fn not_master(&self, b: &BrokerInner) -> WireError {
        let master = self.slave_status().master_addr.clone();
        WireError::new(
            ErrorCode::NotMaster,
            match master {
                Some(addr) => format!(
                    "broker {} is a slave and takes no writes; the master of broker group '{}' is at {addr}",
                    b.advertised_addr, b.config.broker_name
                ),
                None => format!(
                    "broker {} is a slave and takes no writes; the master of broker group '{}' is not known to it now",
                    b.advertised_addr, b.config.broker_name
                ),
            },
        )
    }

    /// How far readers may read the log, and a watch that moves it: under
    /// sync replication with a controller, what every in-sync replica
    /// holds (on a slave: as its master last said); elsewhere no limit.
    pub(crate) fn read_limit(&self) -> (u64, Option<watch::Receiver<u64>>) {
        if self.control.is_none() || self.config.mode != ReplicationMode::Sync {
            return (u64::MAX, None);
        }
        if !self.is_slave() && self.isr().is_some_and(|i| i.effective().len() <= 1) {
            return (u64::MAX, None);
        }
        let rx = self.confirmed.subscribe();
        let limit = *rx.borrow();
        (limit, Some(rx))
    }

    /// A slave: its master says every in-sync replica holds the log up to `pos`.
    pub(crate) fn master_confirmed(&self, pos: u64) {
        self.confirmed.send_if_modified(|c| {
            let moved = pos > *c;
            *c = (*c).max(pos);
            moved
        });
    }

    /// Refuses a write on a slave.
    pub(crate) fn check_master(&self, b: &BrokerInner) -> Result<(), WireError> {
        if self.is_slave() {
            return Err(self.not_master(b));
        }
        Ok(())
    }

    /// Under sync replication, waits until enough replicas hold the log up
    /// to `end`; at once otherwise.
    pub(crate) async fn confirm(&self, end: u64) -> Confirmed {
        let c = &self.config;
        if self.is_slave() || c.mode == ReplicationMode::Async {
            return Confirmed::Yes;
        }
        // Under a controller, every member of the in-sync set must hold
        // the record (any of them may be elected next), and the set must
        // have at least min-insync members.
        if let Some(isr) = self.isr() {
            if isr.current.len() < c.min_insync_replicas as usize {
                return Confirmed::NotAvailable;
            }
            if isr.effective().len() <= 1 {
                return Confirmed::Yes;
            }
        } else {
            if c.min_insync_replicas <= 1 {
                return Confirmed::Yes;
            }
            let needed = (c.min_insync_replicas - 1) as usize;
            if *self.confirmed.borrow() < end && self.in_sync_count(Instant::now()) < needed {
                return Confirmed::NotAvailable;
            }
        }
        if *self.confirmed.borrow() >= end {
            return Confirmed::Yes;
        }
        let mut rx = self.confirmed.subscribe();
        let held = {
            // Boxed: every send's future holds this one's place otherwise,
            // under async replication too (see `handler::send_call`).
            let waited =
                Box::pin(tokio::time::timeout(c.timeout, rx.wait_for(|p| *p >= end))).await;
            matches!(waited, Ok(Ok(_)))
        };
        if held {
            Confirmed::Yes
        } else {
            Confirmed::Timeout
        }
    }

    fn is_in_sync(&self, r: &Replica, now: Instant) -> bool {
        r.caught_up_at
            .is_some_and(|t| now.saturating_duration_since(t) <= self.config.lag_max)
    }

    fn in_sync_count(&self, now: Instant) -> usize {
        self.replicas()
            .values()
            .filter(|r| self.is_in_sync(r, now))
            .count()
    }

    /// The position `min_insync_replicas - 1` slaves hold: the k-th largest
    /// ack; under a controller, the position every other member of the
    /// in-sync set holds.
    fn recompute_confirmed(&self, replicas: &HashMap<u64, Replica>) {
        if let Some(isr) = self.isr() {
            let me = &self.control.as_ref().map(|c| c.shared.addr.clone());
            let held = isr
                .effective()
                .iter()
                .filter(|a| Some(*a) != me.as_ref())
                .map(|a| {
                    replicas
                        .values()
                        .filter(|r| &r.addr == a)
                        .map(|r| r.acked)
                        .max()
                        .unwrap_or(0)
                })
                .min();
            if let Some(held) = held {
                self.confirmed.send_if_modified(|c| {
                    let moved = held > *c;
                    *c = (*c).max(held);
                    moved
                });
            }
            return;
        }
        let k = self.config.min_insync_replicas.saturating_sub(1) as usize;
        if k == 0 {
            return;
        }
        let mut acked: Vec<u64> = replicas.values().map(|r| r.acked).collect();
        if acked.len() < k {
            return;
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let held = acked[k - 1];
        self.confirmed.send_if_modified(|c| {
            let moved = held > *c;
            *c = (*c).max(held);
            moved
        });
    }

    /// A replica connection closed.
    pub(crate) fn connection_closed(&self, conn_id: u64) {
        if let Some(r) = self.replicas().remove(&conn_id) {
            tracing::info!(slave = %r.addr, acked = r.acked, "slave disconnected");
        }
    }

    /// Master: a slave holds the log up to `acked`.
    pub(crate) fn ack(&self, conn: &Connection, req: ReplicaAck) -> Result<(), WireError> {
        let mut replicas = self.replicas();
        let Some(r) = replicas.get_mut(&conn.id()) else {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "an acknowledgement before any fetch on this connection",
            ));
        };
        if req.acked > r.sent {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                format!(
                    "an acknowledgement of position {} from the slave at {}, which was sent the log only up to {}",
                    req.acked, r.addr, r.sent
                ),
            ));
        }
        let now = Instant::now();
        r.last_seen = now;
        r.acked = r.acked.max(req.acked);
        if let Some((at, end)) = r.mark {
            if r.acked >= end {
                r.caught_up_at = Some(at);
                r.mark = None;
                if let Some(mut isr) = self.isr() {
                    isr.caught_up.insert(r.addr.clone(), at);
                }
            }
        }
        self.recompute_confirmed(&replicas);
        Ok(())
    }

    /// What `GetReplication` answers.
    pub(crate) fn info(&self, b: &BrokerInner) -> ReplicationInfo {
        let now = Instant::now();
        let end = b.store.shippable_end();
        let mut replicas: Vec<ReplicaInfo> = self
            .replicas()
            .values()
            .map(|r| ReplicaInfo {
                addr: r.addr.clone(),
                acked: r.acked,
                // Records it lacks, not positions: after a crash the
                // master writes on in a fresh segment past a gap.
                lag_bytes: b.store.stored_between(r.acked, end),
                in_sync: match self.isr() {
                    Some(isr) => isr.current.contains(&r.addr),
                    None => self.is_in_sync(r, now),
                },
                last_seen_ms_ago: now.saturating_duration_since(r.last_seen).as_millis() as u64,
            })
            .collect();
        replicas.sort_by(|a, b| a.addr.cmp(&b.addr));
        let slave = self.slave_status().clone();
        ReplicationInfo {
            epoch: self.epoch(),
            broker_name: b.config.broker_name.clone(),
            role: self.config.role,
            addr: b.advertised_addr.clone(),
            log_end: b.store.log_end(),
            replication: self.config.mode.name().into(),
            min_insync_replicas: self.config.min_insync_replicas,
            master_addr: slave.master_addr,
            master_end: slave.master_end,
            error: slave.error,
            replicas,
            shipped_frames: self.shipped.frames.load(Ordering::Relaxed),
            shipped_records: self.shipped.records.load(Ordering::Relaxed),
            shipped_bytes: self.shipped.bytes.load(Ordering::Relaxed),
        }
    }
}

/// The master's topic-table version as slaves see it: unique per run.
pub(crate) fn topics_version(b: &BrokerInner) -> u64 {
    b.epoch
        .wrapping_mul(1_000_000)
        .wrapping_add(b.topics_version.load(Ordering::Acquire))
}

/// Master: serves a slave's fetch.
pub(crate) async fn fetch(
    b: &BrokerInner,
    conn: &Connection,
    req: ReplicaFetch,
) -> Result<ReplicaData, WireError> {
    let rep = &b.replication;
    rep.check_master(b)?;
    if let Some(c) = &rep.control {
        let mine = c.epoch.load(Ordering::Acquire);
        if req.epoch != mine {
            if req.epoch > mine {
                // A slave follows a newer master: this one was replaced.
                c.shared.fenced();
            }
            return Err(WireError::new(
                ErrorCode::StaleEpoch,
                format!(
                    "the slave at {} follows the master of epoch {} and this master's epoch is {mine}",
                    req.addr, req.epoch
                ),
            ));
        }
    }
    if conn.peer_hello().map(|h| h.role) != Some(Role::Replica) {
        return Err(WireError::new(
            ErrorCode::BadArgument,
            "replica fetches are served to connections that said hello as a replica",
        ));
    }
    if req.broker_name != b.config.broker_name {
        return Err(WireError::new(
            ErrorCode::BadArgument,
            format!(
                "this master serves broker group '{}'; the slave at {} belongs to '{}'",
                b.config.broker_name, req.addr, req.broker_name
            ),
        ));
    }
    let segment_size = b.store.config().segment_size;
    if req.segment_size != segment_size {
        return Err(WireError::new(
            ErrorCode::BadArgument,
            format!(
                "the slave's segment size is {} bytes and the master's {segment_size}: start the slave with --segment-size {segment_size}",
                req.segment_size
            ),
        ));
    }
    match req.last_record {
        Some(last) => match b.store.check_record(last, req.from) {
            RecordCheck::Same => {}
            RecordCheck::Gone => return Err(gone(b, &req)),
            RecordCheck::Differs => {
                tracing::error!(
                    slave = %req.addr,
                    from = req.from,
                    last_record = last.pos,
                    master_end = b.store.log_end(),
                    "a slave's log differs from this master's at its end"
                );
                return Err(WireError::new(
                    ErrorCode::ReplicaDiverged,
                    format!(
                        "the slave's log differs from the master's at its end (its record at {} ending at {}; the master's log ends at {}): \
                         it holds records the master does not (it was a master that wrote past what it replicated, or the master lost \
                         them). The slave stops replicating; move its data directory away to copy the master's log afresh",
                        last.pos,
                        req.from,
                        b.store.log_end()
                    ),
                ));
            }
        },
        None if req.from != 0 => {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                format!(
                    "a fetch from position {} must name the slave's last record there",
                    req.from
                ),
            ));
        }
        None => {}
    }
    let max_bytes = req.max_bytes.clamp(1, MAX_FETCH_BYTES) as usize;
    let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_FETCH_WAIT);
    let now = Instant::now();
    {
        let mut replicas = rep.replicas();
        let r = replicas.entry(conn.id()).or_insert_with(|| {
            tracing::info!(slave = %req.addr, from = req.from, "slave connected");
            rep.had_replicas
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Replica {
                addr: req.addr.clone(),
                acked: req.from,
                sent: req.from,
                last_seen: now,
                caught_up_at: None,
                mark: None,
            }
        });
        r.last_seen = now;
        // Its log was checked to agree with this one up to `from`.
        r.sent = r.sent.max(req.from);
        if rep.control.is_some() {
            rep.recompute_confirmed(&replicas);
        }
    }
    // A slave with an empty log copies from the start of retention.
    let from = if req.last_record.is_none() {
        req.from.max(b.store.log_min())
    } else {
        req.from
    };
    let mut limit = b.store.shippable_end();
    let mut read = b
        .store
        .read_log(from, max_bytes, limit)
        .map_err(|e| read_error(b, &req, e))?;
    if read.is_none() {
        // Nothing past `from`: a slave that holds `from` holds everything.
        caught_up(rep, conn.id(), req.from);
        if !wait.is_zero() {
            tokio::select! {
                l = b.store.wait_shippable(limit, wait) => limit = l,
                _ = b.shutdown.cancelled() => {}
            }
            read = b
                .store
                .read_log(from, max_bytes, limit)
                .map_err(|e| read_error(b, &req, e))?;
        }
    }
    let small = read
        .as_ref()
        .is_some_and(|(_, data, _)| data.len() < LINGER_BELOW.min(max_bytes));
    if small && rep.config.mode == ReplicationMode::Async {
        // A plain sleep: waiting on the log's end would wake this task at
        // every write.
        tokio::select! {
            () = tokio::time::sleep(LINGER) => {}
            _ = b.shutdown.cancelled() => {}
        }
        limit = b.store.shippable_end();
        read = b
            .store
            .read_log(from, max_bytes, limit)
            .map_err(|e| read_error(b, &req, e))?;
    }
    if let Some((_, data, records)) = &read {
        // Reached by an ack, this mark says the slave held what the master had now.
        if let Some(r) = rep.replicas().get_mut(&conn.id()) {
            r.mark.get_or_insert((Instant::now(), limit));
        }
        rep.shipped.frames.fetch_add(1, Ordering::Relaxed);
        rep.shipped.records.fetch_add(*records, Ordering::Relaxed);
        rep.shipped
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    let version = topics_version(b);
    let (pos, data) = read.map_or((from, bytes::Bytes::new()), |(p, d, _)| (p, d));
    if !data.is_empty() {
        if let Some(r) = rep.replicas().get_mut(&conn.id()) {
            r.sent = r.sent.max(pos + data.len() as u64);
        }
    }
    Ok(ReplicaData {
        epochs: rep
            .control
            .as_ref()
            .map(|c| c.shared.epochs().after(req.last_epoch))
            .unwrap_or_default(),
        confirmed: *rep.confirmed.borrow(),
        pos,
        data,
        master_end: limit,
        topics: (req.topics_version != version).then(|| (version, b.topics.all())),
    })
}

/// A slave fetching at the master's end holds everything once it holds `from`.
fn caught_up(rep: &Replication, conn_id: u64, from: u64) {
    let mut replicas = rep.replicas();
    if let Some(r) = replicas.get_mut(&conn_id) {
        if r.acked >= from {
            let now = Instant::now();
            r.caught_up_at = Some(now);
            r.mark = None;
            if let Some(mut isr) = rep.isr() {
                isr.caught_up.insert(r.addr.clone(), now);
            }
        }
    }
}

fn gone(b: &BrokerInner, req: &ReplicaFetch) -> WireError {
    WireError::new(
        ErrorCode::ReplicaPositionUnavailable,
        format!(
            "the slave's log ends at {}, but the master's log now starts at {} (retention deleted the rest): \
             move the slave's data directory away to copy the master's log from its start",
            req.from,
            b.store.log_min()
        ),
    )
}

fn read_error(b: &BrokerInner, req: &ReplicaFetch, e: LogReadError) -> WireError {
    match e {
        LogReadError::Gone { .. } => gone(b, req),
        LogReadError::Ahead { end } => WireError::new(
            ErrorCode::ReplicaDiverged,
            format!(
                "the slave asks for position {} but the master's log ends at {end}: the slave holds records the master does not",
                req.from
            ),
        ),
    }
}

/// Master: where its history of an epoch ends (see [`epochs::Epochs::end_of`]).
pub(crate) fn epoch_end(b: &BrokerInner, req: EpochEndQuery) -> Result<EpochEnd, WireError> {
    let rep = &b.replication;
    rep.check_master(b)?;
    let Some(c) = &rep.control else {
        return Err(WireError::new(
            ErrorCode::UnsupportedRequest,
            "this broker is not run by a controller and keeps no epochs",
        ));
    };
    if req.broker_name != b.config.broker_name {
        return Err(WireError::new(
            ErrorCode::BadArgument,
            format!(
                "this master serves broker group '{}', not '{}'",
                b.config.broker_name, req.broker_name
            ),
        ));
    }
    let (epoch, end) = c.shared.epochs().end_of(req.epoch, b.store.log_end());
    Ok(EpochEnd { epoch, end })
}

/// A controlled master's in-sync set upkeep: every 100 ms, drops members
/// that fell behind for longer than `--replica-lag-max` and adds replicas
/// that caught up, through the controller (the set changes only when it
/// agrees); drains for a planned switch when the controller asks.
pub(crate) async fn run_isr(b: Arc<BrokerInner>) {
    let Some(c) = &b.replication.control else {
        return;
    };
    let me = c.shared.addr.clone();
    let mut state = c.shared.state.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.changed() => {}
            _ = b.shutdown.cancelled() => return,
        }
        let epoch = c.epoch.load(Ordering::Acquire);
        let group = state.borrow_and_update().clone();
        if let Some(g) = group.filter(|g| g.epoch == epoch && g.master.as_deref() == Some(&me)) {
            if let Some(target) = g.draining {
                drain(&b, c, &target, epoch).await;
                continue;
            }
        }
        let proposal = {
            let rep = &b.replication;
            let now = Instant::now();
            let confirmed = *rep.confirmed.borrow();
            let acked: HashMap<String, u64> =
                rep.replicas().values().fold(HashMap::new(), |mut m, r| {
                    let e = m.entry(r.addr.clone()).or_insert(0);
                    *e = (*e).max(r.acked);
                    m
                });
            let mut isr = c.isr.lock().unwrap_or_else(|e| e.into_inner());
            if isr.proposed.is_some() {
                continue;
            }
            let lag_max = rep.config.lag_max;
            let fresh = |a: &String| {
                isr.caught_up
                    .get(a)
                    .is_some_and(|t| now.saturating_duration_since(*t) <= lag_max)
            };
            let mut desired: BTreeSet<String> = isr
                .current
                .iter()
                .filter(|a| **a == me || fresh(a))
                .cloned()
                .collect();
            desired.insert(me.clone());
            for (addr, ack) in &acked {
                if !desired.contains(addr) && fresh(addr) && *ack >= confirmed {
                    desired.insert(addr.clone());
                }
            }
            if desired == isr.current {
                continue;
            }
            isr.proposed = Some(desired.clone());
            desired
        };
        let answer = tokio::select! {
            a = c.shared.alter_in_sync(epoch, proposal.iter().cloned().collect()) => a,
            _ = b.shutdown.cancelled() => return,
        };
        let mut isr = c.isr.lock().unwrap_or_else(|e| e.into_inner());
        isr.proposed = None;
        match answer {
            Ok(g) if g.epoch == epoch => {
                let added: Vec<_> = g
                    .in_sync
                    .iter()
                    .filter(|a| !isr.current.contains(*a))
                    .cloned()
                    .collect();
                let removed: Vec<_> = isr
                    .current
                    .iter()
                    .filter(|a| !g.in_sync.contains(a))
                    .cloned()
                    .collect();
                tracing::info!(epoch, in_sync = ?g.in_sync, ?added, ?removed, "in-sync set changed");
                isr.current = g.in_sync.into_iter().collect();
                drop(isr);
                let replicas = b.replication.replicas();
                b.replication.recompute_confirmed(&replicas);
            }
            Ok(_) => c.shared.fenced(),
            Err(e) if e.code == ErrorCode::StaleEpoch => {
                tracing::warn!(epoch, error = %e, "the controller refused this master's in-sync change: it was replaced");
                c.shared.fenced();
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot change the in-sync set now; retrying");
            }
        }
    }
}

/// A planned switch: refuse writes, wait until the target holds the whole
/// log (at most the replication timeout), tell the controller.
async fn drain(b: &BrokerInner, c: &Controlled, target: &str, epoch: u64) {
    if !c.draining.swap(true, Ordering::AcqRel) {
        tracing::info!(%target, epoch, "draining for a planned switch");
    }
    let deadline = Instant::now() + b.replication.config.timeout;
    loop {
        let end = b.store.log_end();
        let held = b
            .replication
            .replicas()
            .values()
            .filter(|r| r.addr == target)
            .map(|r| r.acked)
            .max()
            .unwrap_or(0);
        if held >= end || Instant::now() >= deadline || b.shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Err(e) = c.shared.drained(epoch).await {
        tracing::warn!(error = %e, "cannot tell the controller the drain is done; it elects the target after its own wait");
    }
    // Stays draining: the controller's answer names the new master, and
    // this incarnation ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
}
