//! A slave's side of replication: find the master, stream its log from this
//! log's end, verify, append, acknowledge; hand the master the offsets
//! consumers committed here while it was away.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use txmq_protocol::{
    BrokerRole, CommitOffset, EpochEndQuery, EpochStart, ErrorCode, GetCluster, RecordRef,
    ReplicaAck, ReplicaData, ReplicaFetch, Role, TopicConfig,
};
use txmq_remoting::{Connection, ConnectionConfig, Error};

use crate::store::record::{self, Check};
use crate::BrokerInner;

/// How much a fetch asks for.
const FETCH_BYTES: u32 = 4 << 20;
/// How long a fetch waits at the master's end (well under the lag limit,
/// so that an idle slave stays in sync).
const FETCH_WAIT_MS: u32 = 250;
/// How often offsets kept here are handed to the master.
const FORWARD_EVERY: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How often a slave whose disk is below `--disk-free-limit` looks again
/// (the flusher looks at the disk every 250 ms).
const DISK_RECHECK: Duration = Duration::from_millis(250);

/// Why a session with the master ended.
enum Stop {
    /// Shutting down.
    Shutdown,
    /// Try again (connection lost, a bad batch, the master moved).
    Retry(String),
    /// Replicating cannot go on without an operator (a diverged log, a
    /// position the master no longer has, settings that do not match).
    Fatal(String),
    /// Under a controller: this log holds what the new master's history
    /// does not; it must be cut (by the next incarnation) first.
    Truncate { to: u64, epoch: u64 },
}

/// Where this log ends and its last whole record there: what the next
/// fetch starts from, and what the master checks.
#[derive(Clone, Copy)]
struct Tail {
    end: u64,
    last: Option<RecordRef>,
}

/// Replicates from the master until shutdown or until replication cannot
/// go on (then the slave keeps serving reads, and says why in
/// `GetReplication` and its log).
pub(crate) async fn run(b: Arc<BrokerInner>, nameservers: Vec<String>) {
    let mut tail = Tail {
        end: b.store.log_end(),
        last: b.store.opened_last_record(),
    };
    let mut retry = RETRY_MIN;
    let mut last_problem = String::new();
    loop {
        if b.shutdown.is_cancelled() {
            return;
        }
        let controlled = b
            .replication
            .control
            .as_ref()
            .and_then(|c| c.master.clone());
        let master = match (&controlled, &b.replication.config.master_addr) {
            (Some(rx), _) => {
                let mut rx = rx.clone();
                let target = rx.borrow_and_update().clone();
                match target {
                    Some((addr, epoch)) => {
                        if let Some(c) = &b.replication.control {
                            c.epoch.store(epoch, Ordering::Release);
                        }
                        Some(addr)
                    }
                    None => {
                        b.replication.slave_status().master_addr = None;
                        // No master now: wait until the controller names one.
                        tokio::select! {
                            changed = rx.changed() => if changed.is_err() { return },
                            _ = b.shutdown.cancelled() => return,
                        }
                        continue;
                    }
                }
            }
            (None, Some(addr)) => Some(addr.clone()),
            (None, None) => find_master(&b, &nameservers).await,
        };
        b.replication.slave_status().master_addr = master.clone();
        let outcome = match master {
            Some(master) => session(&b, &master, &mut tail).await,
            None => Err(Stop::Retry(format!(
                "no master of broker group '{}' is registered with the nameservers",
                b.config.broker_name
            ))),
        };
        match outcome {
            Ok(()) | Err(Stop::Shutdown) => return,
            Err(Stop::Truncate { to, epoch }) => {
                if let Some(c) = &b.replication.control {
                    tracing::warn!(
                        broker = %b.config.broker_name,
                        log_end = b.store.log_end(),
                        cut_to = to,
                        epoch,
                        "this log holds records the new master's history does not; cutting it there"
                    );
                    let _ = c
                        .shared
                        .events
                        .send(super::controlled::Event::Truncate { to, epoch });
                }
                return;
            }
            Err(Stop::Fatal(why)) => {
                tracing::error!(broker = %b.config.broker_name, error = %why, "replication stopped");
                b.replication.slave_status().error = Some(why);
                return;
            }
            Err(Stop::Retry(why)) => {
                if why != last_problem {
                    tracing::warn!(broker = %b.config.broker_name, error = %why, "replication interrupted; retrying");
                    last_problem = why;
                } else {
                    tracing::debug!(error = %why, "replication interrupted again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = b.shutdown.cancelled() => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
                // A session that got going starts the back-off over. Under
                // a controller there is none: a master it names is about to
                // serve, and the group's writes may wait for this slave.
                if tail.end != b.store.log_end() || b.replication.control.is_some() {
                    retry = RETRY_MIN;
                }
            }
        }
    }
}

/// The group's master, as the nameservers know it.
async fn find_master(b: &BrokerInner, nameservers: &[String]) -> Option<String> {
    for ns in nameservers {
        let Ok(conn) = crate::registration::connect(b, ns).await else {
            continue;
        };
        let cluster = conn.call(GetCluster {}).await;
        conn.close();
        if let Ok(cluster) = cluster {
            if let Some(m) = cluster.brokers.into_iter().find(|i| {
                i.broker_name == b.config.broker_name
                    && i.role == BrokerRole::Master
                    && i.addr != b.advertised_addr
            }) {
                return Some(m.addr);
            }
        }
    }
    None
}

fn fetch_request(b: &BrokerInner, tail: Tail) -> ReplicaFetch {
    let last_epoch = b
        .replication
        .control
        .as_ref()
        .map_or(0, |c| c.shared.epochs().last_epoch());
    ReplicaFetch {
        last_epoch,
        epoch: b.replication.epoch(),
        broker_name: b.config.broker_name.clone(),
        addr: b.advertised_addr.clone(),
        from: tail.end,
        last_record: tail.last,
        max_bytes: FETCH_BYTES,
        wait_ms: FETCH_WAIT_MS,
        segment_size: b.store.config().segment_size,
        topics_version: b.replication.master_topics_version.load(Ordering::Acquire),
    }
}

fn classify(master: &str, e: Error) -> Stop {
    match e.remote().map(|w| w.code) {
        Some(
            ErrorCode::ReplicaDiverged
            | ErrorCode::ReplicaPositionUnavailable
            | ErrorCode::BadArgument,
        ) => Stop::Fatal(format!("master {master} refused to replicate: {e}")),
        _ => Stop::Retry(format!("master {master}: {e}")),
    }
}

/// One connection to the master: fetch, verify, append, acknowledge, with
/// the next fetch in flight while a batch is written.
async fn session(b: &BrokerInner, master: &str, tail: &mut Tail) -> Result<(), Stop> {
    let hello = crate::registration::hello(b, Role::Replica);
    let config = b.security.outgoing(ConnectionConfig {
        max_frame_len: b.config.max_frame_size.max(FETCH_BYTES as usize * 2),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    });
    let conn = tokio::select! {
        c = Connection::connect(master, hello, None, config) => c.map_err(|e| classify(master, e))?,
        _ = b.shutdown.cancelled() => return Err(Stop::Shutdown),
    };
    // The master counts the first fetch's position as held: make it so
    // per this store's flush mode first.
    while b.store.shippable_end() < tail.end && !b.shutdown.is_cancelled() {
        let now = b.store.shippable_end();
        b.store.wait_shippable(now, Duration::from_secs(1)).await;
    }
    if let Some(c) = &b.replication.control {
        // Where this history and the master's part: cut there first.
        let last_epoch = c.shared.epochs().last_epoch();
        let theirs = tokio::select! {
            r = conn.call(EpochEndQuery {
                broker_name: b.config.broker_name.clone(),
                epoch: last_epoch,
            }) => r.map_err(|e| classify(master, e))?,
            _ = b.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        let (_, ours) = c.shared.epochs().end_of(theirs.epoch, tail.end);
        let agreed = ours.min(theirs.end);
        if agreed < tail.end {
            conn.close();
            return Err(Stop::Truncate {
                to: agreed,
                epoch: theirs.epoch,
            });
        }
        // Epochs past the shared one hold nothing of this log.
        if let Err(e) = c.shared.epochs().truncate(theirs.epoch, tail.end) {
            return Err(Stop::Retry(e));
        }
    }
    tracing::info!(%master, from = tail.end, epoch = b.replication.epoch(), "replicating from the master");
    let mut master_changed = b
        .replication
        .control
        .as_ref()
        .and_then(|c| c.master.clone());
    if let Some(rx) = master_changed.as_mut() {
        // Changes from here on end the session; one made already, too.
        let still = rx.borrow_and_update().as_ref().map(|(a, _)| a.as_str()) == Some(master);
        if !still {
            conn.close();
            return Err(Stop::Retry("the controller named another master".into()));
        }
    }
    let mut pending_epochs: Vec<EpochStart> = Vec::new();
    let segment_size = b.store.config().segment_size;
    let mut asked = *tail;
    let mut next = Box::pin(conn.call(fetch_request(b, asked)));
    let mut acks = FuturesUnordered::new();
    let mut forward = tokio::time::interval(FORWARD_EVERY);
    forward.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Kept offsets go to the master alongside fetching, never instead of
    // it: under sync replication the master answers a commit once a replica
    // acknowledges its record, and this slave may be the one it waits for.
    let mut forwarding: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    let started = std::time::Instant::now();
    let mut copied = 0u64;
    let mut caught_up = false;
    let result = loop {
        let data = tokio::select! {
            r = &mut next => r,
            Some(r) = acks.next() => {
                let r: Result<_, Error> = r;
                if let Err(e) = r {
                    break Err(classify(master, e));
                }
                continue;
            }
            _ = forward.tick(), if forwarding.is_none() => {
                forwarding = Some(Box::pin(forward_offsets(b, &conn)));
                continue;
            }
            () = async {
                if let Some(f) = forwarding.as_mut() {
                    f.await;
                }
            }, if forwarding.is_some() => {
                forwarding = None;
                continue;
            }
            _ = b.shutdown.cancelled() => break Err(Stop::Shutdown),
            Ok(()) = async {
                match master_changed.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                break Err(Stop::Retry("the controller named another master".into()));
            }
        };
        let data = match data {
            Ok(d) => d,
            Err(e) => break Err(classify(master, e)),
        };
        b.replication.slave_status().master_end = Some(data.master_end);
        b.replication.master_confirmed(data.confirmed);
        let newest = pending_epochs.last().map_or(0, |e| e.epoch).max(
            b.replication
                .control
                .as_ref()
                .map_or(0, |c| c.shared.epochs().last_epoch()),
        );
        pending_epochs.extend(data.epochs.iter().filter(|e| e.epoch > newest).copied());
        copied += data.data.len() as u64;
        if !caught_up
            && (data.data.is_empty() || data.pos + data.data.len() as u64 >= data.master_end)
        {
            caught_up = true;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                %master,
                copied_bytes = copied,
                elapsed = ?started.elapsed(),
                mb_per_s = format!("{:.0}", copied as f64 / 1e6 / secs.max(1e-9)),
                "caught up with the master"
            );
        }
        if let Some((version, topics)) = &data.topics {
            adopt_topics(b, topics);
            b.replication
                .master_topics_version
                .store(*version, Ordering::Release);
        }
        let batch = match verify(&data, asked.end, segment_size) {
            Ok(batch) => batch,
            Err(why) => {
                tracing::error!(%master, position = data.pos, error = %why, "the master sent a bad batch; nothing of it was written");
                break Err(Stop::Retry(format!(
                    "bad batch from master {master}: {why}"
                )));
            }
        };
        let Some((last, len)) = batch else {
            next = Box::pin(conn.call(fetch_request(b, asked)));
            continue;
        };
        // Ask for the next batch before writing this one.
        asked = Tail {
            end: data.pos + len,
            last: Some(last),
        };
        next = Box::pin(conn.call(fetch_request(b, asked)));
        if let Some(low) = b.store.disk_low() {
            // The room left is what the queues, the index and a restart
            // need: replication waits, and the master counts this slave
            // out of sync once it falls behind.
            tracing::warn!(%master, "{low}: replication paused until there is room");
            let stopped = loop {
                tokio::select! {
                    () = tokio::time::sleep(DISK_RECHECK) => {}
                    _ = b.shutdown.cancelled() => break Some(Stop::Shutdown),
                    Ok(()) = async {
                        match master_changed.as_mut() {
                            Some(rx) => rx.changed().await,
                            None => std::future::pending().await,
                        }
                    } => break Some(Stop::Retry("the controller named another master".into())),
                }
                if b.store.disk_low().is_none() {
                    tracing::info!(%master, "disk space freed: replication goes on");
                    break None;
                }
            };
            if let Some(stop) = stopped {
                break Err(stop);
            }
        }
        let appended = match b.store.append_replicated(data.pos, data.data).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%master, position = data.pos, error = %e, "cannot store replicated records");
                break Err(Stop::Retry(format!("cannot store replicated records: {e}")));
            }
        };
        *tail = asked;
        if let Some(c) = &b.replication.control {
            // The master's epochs this log now holds records of.
            let held: Vec<EpochStart> = pending_epochs
                .iter()
                .filter(|e| e.start < appended.end)
                .copied()
                .collect();
            if !held.is_empty() {
                pending_epochs.retain(|e| e.start >= appended.end);
                let mut epochs = c.shared.epochs();
                for e in held {
                    if let Err(why) = epochs.push(e) {
                        tracing::error!(error = %why, "cannot record the master's epoch");
                    }
                }
            }
        }
        if appended.durable {
            acks.push(conn.call(ReplicaAck {
                acked: appended.end,
            }));
        }
    };
    drop(next);
    drop(acks);
    drop(forwarding);
    conn.close();
    result
}

/// Checks a batch on arrival: it starts where asked (or at a later segment's
/// start), stays in one segment, and is whole records with good checksums.
/// Returns its last record and its length; `None` for an empty batch.
fn verify(
    data: &ReplicaData,
    from: u64,
    segment_size: u64,
) -> Result<Option<(RecordRef, u64)>, String> {
    if data.data.is_empty() {
        return Ok(None);
    }
    if data.pos != from && (data.pos < from || !data.pos.is_multiple_of(segment_size)) {
        return Err(format!(
            "data at position {} does not continue this log at {from}",
            data.pos
        ));
    }
    let len = data.data.len() as u64;
    if data.pos / segment_size != (data.pos + len - 1) / segment_size {
        return Err(format!(
            "{len} bytes at position {} cross a segment boundary",
            data.pos
        ));
    }
    let mut rel = 0usize;
    let mut last = None;
    while rel < data.data.len() {
        let at = data.pos + rel as u64;
        match record::check(&data.data[rel..]) {
            // A checksum over fields that do not fill the record (a master
            // that wrote it wrong) would be stored, then fail to apply.
            Check::Valid(n) if !record::well_formed(&data.data[rel..rel + n]) => {
                return Err(format!("the record at {at} does not decode"));
            }
            Check::Valid(n) => {
                let b = &data.data[rel + 4..rel + 8];
                last = Some(RecordRef {
                    pos: at,
                    crc: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                });
                rel += n;
            }
            Check::End => return Err(format!("zeros where a record should be, at {at}")),
            Check::Truncated => return Err(format!("the record at {at} is cut short")),
            Check::Corrupt => {
                return Err(format!(
                    "the record at {at} fails its checksum or has an impossible length"
                ))
            }
        }
    }
    Ok(last.map(|l| (l, len)))
}

/// Takes the master's topic table (queue counts, permissions); a topic the
/// master no longer has was deleted there (its queues go with the delete's
/// record in the log).
fn adopt_topics(b: &BrokerInner, topics: &[TopicConfig]) {
    let mut changed = false;
    for gone in b.topics.all() {
        if topics.iter().any(|t| t.name == gone.name) {
            continue;
        }
        match b.topics.remove(&gone.name) {
            Ok(old) => changed |= old.is_some(),
            Err(e) => {
                tracing::warn!(topic = %gone.name, error = %e.message, "cannot drop a topic the master deleted");
            }
        }
    }
    for t in topics {
        if b.topics.get(&t.name).as_ref() == Some(t) {
            continue;
        }
        let upserted = b.topics.upsert(&t.name, |_, _| Ok(t.clone()));
        match upserted {
            Ok((_, c)) => changed |= c,
            Err(e) => {
                tracing::warn!(topic = %t.name, error = %e.message, "cannot take the master's topic");
                continue;
            }
        }
        if let Err(e) = b.store.ensure_queues(&t.name, t.queues) {
            tracing::warn!(topic = %t.name, error = %e, "cannot make the master's topic's queues");
        }
    }
    if changed {
        b.topics_version.fetch_add(1, Ordering::AcqRel);
        b.topics_changed.notify_one();
    }
}

/// Hands the master the offsets consumers committed here while it was
/// away; the master takes them only forward.
async fn forward_offsets(b: &BrokerInner, conn: &Connection) {
    let kept: Vec<((String, String, u32), u64)> = b
        .replication
        .kept_offsets
        .iter()
        .map(|e| (e.key().clone(), *e.value()))
        .collect();
    for ((group, topic, queue), offset) in kept {
        let req = CommitOffset {
            group: group.clone(),
            topic: topic.clone(),
            queue,
            offset,
            owner: None,
            forward_only: true,
            topic_generation: None,
        };
        match conn.call(req).await {
            Ok(_) => {
                tracing::debug!(%group, %topic, queue, offset, "handed a kept offset to the master");
                // Kept until this log holds the master's record of it too:
                // dropped before, the slave's committed offset would show
                // the older replicated one until that record arrives.
                let held = b
                    .store
                    .committed_offset(&group, &topic, queue)
                    .is_some_and(|c| c >= offset);
                if held {
                    b.replication
                        .kept_offsets
                        .remove_if(&(group, topic, queue), |_, v| *v == offset);
                }
            }
            Err(e) => {
                tracing::debug!(%group, %topic, queue, offset, error = %e, "cannot hand a kept offset to the master yet");
            }
        }
    }
}
