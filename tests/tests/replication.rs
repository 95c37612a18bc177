//! Replicated broker groups end to end, with real `txmq-broker` processes: a
//! master and its slaves under one `--broker-name`. What a user relies on:
//! every write the master acknowledged under sync replication survives a
//! `kill -9` of the master on each slave, exactly once, with the slaves'
//! commit logs byte-identical to the master's; a restarted slave catches up;
//! a stopped slave drops out of sync and the master stops saying SEND_OK
//! once too few replicas remain; consumers carry on from a slave while the
//! master is down and their offsets reach the master when it returns; and a
//! slave whose log differs from its master's stops with an error instead of
//! copying on top of it.
//!
//! Slaves are checked with raw requests at their own address (Pull,
//! QueryOffset, CommitOffset, ListTransactions, GetReplication), so that
//! what a slave holds is seen as it is; producers, and one consumer that
//! carries on from a slave, use the client.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{jitter, segments, start_broker};
use txmq::{
    BoxError, CheckRequest, Message, Producer, SendStatus, TransactionListener,
    TransactionProducer, TransactionState, TxContext, TxEnd, TxState,
};
use txmq_protocol::{
    Call, CommitOffset, CreateTopic, GetGroupState, ListTransactions, MsgId, QueryOffset,
    ReplicationInfo, Role, SendRequest, StoredMessage, TransactionList, PERM_READ_WRITE,
};
use txmq_tests::{BrokerProcess, Cluster};

const GROUP_NAME: &str = "broker-a";

/// Flags every master of these tests gets: sync replication needing one
/// slave besides itself, short lag and timeout limits, and no check-backs
/// while a test runs (a transaction left unknown stays pending).
const MASTER: &[&str] = &[
    "--replication",
    "sync",
    "--min-insync-replicas",
    "2",
    "--replication-timeout",
    "1s",
    "--replica-lag-max",
    "500ms",
    "--transaction-timeout",
    "60s",
];

/// A master and its slaves on one in-process nameserver, each broker with
/// its own data directory under one temp dir. Processes die on drop (a
/// stopped one is continued first).
struct Group {
    ns: String,
    _cluster: Cluster,
    tmp: tempfile::TempDir,
    master: BrokerProcess,
    slaves: Vec<BrokerProcess>,
}

impl Group {
    /// A master with `master_flags`, `topic` created on it with `queues`
    /// queues, and `slaves` slaves that are in sync before this returns.
    async fn start(master_flags: &[&str], slaves: usize, topic: &str, queues: u32) -> Group {
        let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
        let ns = cluster.nameserver.clone();
        let tmp = tempfile::tempdir().expect("temp dir");
        let master = start_broker(&tmp.path().join("master"), &ns, GROUP_NAME, master_flags).await;
        create_topic(&master.addr, topic, queues).await;
        let mut group = Group {
            ns,
            _cluster: cluster,
            tmp,
            master,
            slaves: Vec::new(),
        };
        for i in 0..slaves {
            group.add_slave(&format!("slave{i}")).await;
        }
        let want: Vec<String> = group.slaves.iter().map(|s| s.addr.clone()).collect();
        wait_replication(
            &group.master.addr,
            Duration::from_secs(15),
            "slaves in sync",
            |r| {
                want.iter()
                    .all(|a| replica(r, a).is_some_and(|x| x.in_sync))
            },
        )
        .await;
        group
    }

    /// Starts a slave of the master on `tmp/label`.
    async fn add_slave(&mut self, label: &str) {
        let data = self.tmp.path().join(label);
        let slave = start_broker(
            &data,
            &self.ns,
            GROUP_NAME,
            &["--role", "slave", "--master-addr", &self.master.addr],
        )
        .await;
        self.slaves.push(slave);
    }

    async fn producer(&self) -> Producer {
        Producer::builder()
            .nameserver(&self.ns)
            .send_timeout(Duration::from_secs(3))
            .retries(1)
            .build()
            .await
            .expect("producer builds")
    }
}

/// Waits (up to 15 s) until the nameserver routes `topic` to the group's
/// master at `addr` (a restarted master registers again).
async fn wait_for_master(ns: &str, topic: &str, addr: &str) {
    let admin = txmq::Admin::connect([ns]).await.expect("admin connects");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(route) = admin.route(topic).await {
            if route.brokers.iter().any(|b| b.addr == addr) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{topic} never routed to the master at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.close().await.unwrap();
}

/// One request to the broker at `addr` over a connection of its own.
async fn call<C: Call>(addr: &str, request: C) -> Result<C::Reply, txmq_remoting::Error> {
    let conn = common::try_connect_as(addr, Role::Admin).await?;
    let reply = conn.call(request).await;
    conn.close();
    reply
}

async fn create_topic(addr: &str, topic: &str, queues: u32) {
    call(
        addr,
        CreateTopic {
            topic: topic.into(),
            queues,
            perm: PERM_READ_WRITE,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create {topic} at {addr}: {e}"));
}

fn replica<'a>(r: &'a ReplicationInfo, addr: &str) -> Option<&'a txmq_protocol::ReplicaInfo> {
    r.replicas.iter().find(|x| x.addr == addr)
}

/// Polls `GetReplication` at `addr` (every 50 ms, up to `limit`) until
/// `done` holds; returns that answer.
async fn wait_replication(
    addr: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&ReplicationInfo) -> bool,
) -> ReplicationInfo {
    let deadline = Instant::now() + limit;
    loop {
        let r = common::replication(addr).await;
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} at {addr}; replication now: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `body` to queue `queue` of `topic` at the broker at `addr`; the
/// status it answered.
async fn send_raw(addr: &str, topic: &str, queue: u32, body: &str) -> SendStatus {
    call(
        addr,
        SendRequest {
            producer: None,
            queue,
            messages: vec![txmq::WireMessage::new(topic, body.to_string())],
        },
    )
    .await
    .unwrap_or_else(|e| panic!("send to {addr}: {e}"))
    .status
}

async fn list_transactions(addr: &str) -> TransactionList {
    call(addr, ListTransactions::default())
        .await
        .unwrap_or_else(|e| panic!("ListTransactions at {addr}: {e}"))
}

async fn committed_offset(addr: &str, group: &str, topic: &str, queue: u32) -> Option<u64> {
    call(
        addr,
        QueryOffset {
            group: group.into(),
            topic: topic.into(),
            queue,
            stored_since_ms: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("QueryOffset at {addr}: {e}"))
    .committed
}

async fn commit_offset(addr: &str, group: &str, topic: &str, queue: u32, offset: u64) {
    call(
        addr,
        CommitOffset {
            group: group.into(),
            topic: topic.into(),
            queue,
            offset,
            owner: None,
            forward_only: false,
            topic_generation: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("CommitOffset {topic}/{queue}={offset} at {addr}: {e}"));
}

fn body(m: &StoredMessage) -> String {
    String::from_utf8(m.message.body.to_vec()).expect("UTF-8 body")
}

/// The bytes of the commit log under `data` from position 0 up to `end`
/// (segments are named by their start position and are files of a fixed
/// size; the part of a segment past its last record is zeros).
fn log_prefix(data: &Path, end: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for segment in segments(data) {
        let start: u64 = segment
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("segment named by its position");
        if start >= end {
            break;
        }
        assert_eq!(
            start,
            out.len() as u64,
            "{}: segments do not follow each other",
            data.display()
        );
        let bytes = std::fs::read(&segment).expect("read segment");
        let take = ((end - start) as usize).min(bytes.len());
        out.extend_from_slice(&bytes[..take]);
    }
    assert_eq!(
        out.len() as u64,
        end,
        "{}: the log holds less than {end} bytes",
        data.display()
    );
    out
}

/// Asserts that the logs under `a` and `b` hold the same bytes up to `end`.
fn assert_same_log(a: &Path, b: &Path, end: u64) {
    let (x, y) = (log_prefix(a, end), log_prefix(b, end));
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "the logs of {} and {} differ at position {at} (compared up to {end})",
            a.display(),
            b.display()
        );
    }
}

/// Commits the local transaction of bodies ending in an even number and
/// leaves the others unknown (also when checked back): those stay pending.
struct EvenCommits;

fn decide(body: &[u8]) -> TransactionState {
    let n: u64 = std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    if n.is_multiple_of(2) {
        TransactionState::Commit
    } else {
        TransactionState::Unknown
    }
}

impl TransactionListener for EvenCommits {
    async fn execute(&self, msg: &Message, _ctx: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(decide(msg.body()))
    }

    async fn check(&self, _req: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }
}

/// What the writers of `every_acknowledged_write_survives...` were told.
#[derive(Default)]
struct Acked {
    /// Plain sends answered SEND_OK: body -> msg id.
    sent: HashMap<String, MsgId>,
    /// Transactions whose commit was answered SEND_OK: body -> tx id.
    committed: HashMap<String, u64>,
    /// Transactions prepared with SEND_OK and left unknown: body -> tx id.
    pending: HashMap<String, u64>,
}

/// Flags of a master needing `replicas` replicas (itself included).
fn master_needing(replicas: &str) -> Vec<&str> {
    let mut flags = MASTER.to_vec();
    let at = flags
        .iter()
        .position(|f| *f == "--min-insync-replicas")
        .expect("MASTER sets it");
    flags[at + 1] = replicas;
    flags
}

/// Every copy in the group holds every write acknowledged SEND_OK: each
/// slave, since the master waited for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_master_kill_on_each_slave() {
    kill_the_master_under_writes(3).await;
}

/// With `--min-insync-replicas 2` a SEND_OK waits for one slave of the two:
/// every acknowledged write is on at least one slave, and never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_master_kill_on_some_slave_with_min_insync_2() {
    kill_the_master_under_writes(2).await;
}

/// Plain and transactional writers against a master with two slaves and
/// `--min-insync-replicas min_insync`, the master killed at a random
/// moment; then every write acknowledged SEND_OK is checked on the slaves:
/// on `min_insync - 1` of them at least, exactly once (a committed
/// transaction's message readable, an unended one pending and invisible),
/// and the slaves' logs are byte for byte the master's.
async fn kill_the_master_under_writes(min_insync: u32) {
    const TOPIC: &str = "rep-kill";
    const QUEUES: u32 = 4;
    let needed = min_insync.to_string();
    let mut group = Group::start(&master_needing(&needed), 2, TOPIC, QUEUES).await;
    let producer = group.producer().await;
    let tx_producer = TransactionProducer::builder()
        .nameserver(&group.ns)
        .group("pg-rep")
        .listener(EvenCommits)
        .send_timeout(Duration::from_secs(3))
        .start()
        .await
        .expect("transaction producer starts");

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..3 {
        let (p, stop) = (producer.clone(), stop.clone());
        writers.spawn(async move {
            let mut acked = Acked::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("plain-w{w}-{n}");
                n += 1;
                match p.send(Message::new(TOPIC, body.clone())).await {
                    Ok(r) if r.status == SendStatus::SendOk => {
                        acked.sent.insert(body, r.msg_id);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        });
    }
    for w in 0..2 {
        let (p, stop) = (tx_producer.clone(), stop.clone());
        writers.spawn(async move {
            let mut acked = Acked::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("tx-w{w}-{n}");
                n += 1;
                match p
                    .send_in_transaction(Message::new(TOPIC, body.clone()))
                    .await
                {
                    Ok(o) => match &o.end {
                        TxEnd::Ended(e)
                            if e.state == TxState::Committed && e.status == SendStatus::SendOk =>
                        {
                            acked.committed.insert(body, o.tx_id);
                        }
                        TxEnd::NotSent if o.prepare_status == SendStatus::SendOk => {
                            acked.pending.insert(body, o.tx_id);
                        }
                        _ => {}
                    },
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        });
    }

    tokio::time::sleep(jitter(
        Duration::from_millis(500),
        Duration::from_millis(2000),
    ))
    .await;
    tokio::task::block_in_place(|| group.master.kill9());
    stop.store(true, Ordering::Relaxed);
    let mut acked = Acked::default();
    let joined = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(a) = writers.join_next().await {
            let a = a.expect("writer task");
            acked.sent.extend(a.sent);
            acked.committed.extend(a.committed);
            acked.pending.extend(a.pending);
        }
    })
    .await;
    assert!(joined.is_ok(), "writers did not give up on the dead master");
    producer.close().await.unwrap();
    tx_producer.close().await.unwrap();
    assert!(
        !acked.sent.is_empty() && !acked.committed.is_empty() && !acked.pending.is_empty(),
        "the master died before every kind of write was acknowledged: {} sent, {} committed, {} pending",
        acked.sent.len(),
        acked.committed.len(),
        acked.pending.len()
    );

    eprintln!(
        "acknowledged before the kill: {} sends, {} commits, {} pending transactions",
        acked.sent.len(),
        acked.committed.len(),
        acked.pending.len()
    );
    // How many slaves hold each acknowledged write.
    let mut held: HashMap<String, usize> = HashMap::new();
    let mut pending_on: HashMap<u64, usize> = HashMap::new();
    let mut ends = Vec::new();
    for slave in &group.slaves {
        let info = common::replication(&slave.addr).await;
        assert_eq!(info.error, None, "slave {} stopped replicating", slave.addr);
        ends.push(info.log_end);
        let stored = common::pull_all(&slave.addr, TOPIC, QUEUES).await;
        let mut seen: HashMap<String, (usize, MsgId)> = HashMap::new();
        for m in &stored {
            let e = seen.entry(body(m)).or_insert((0, m.message.msg_id));
            e.0 += 1;
        }
        let dup = seen.iter().find(|(_, (n, _))| *n > 1);
        assert!(
            dup.is_none(),
            "slave {}: a message twice: {dup:?}",
            slave.addr
        );
        for (b, id) in &acked.sent {
            if let Some((_, got)) = seen.get(b) {
                assert_eq!(got, id, "slave {}: {b} has another id", slave.addr);
                *held.entry(b.clone()).or_default() += 1;
            }
        }
        for b in acked.committed.keys() {
            if seen.contains_key(b) {
                *held.entry(b.clone()).or_default() += 1;
            }
        }
        for b in acked.pending.keys() {
            assert!(
                !seen.contains_key(b),
                "slave {}: unended transaction {b} is visible",
                slave.addr
            );
        }

        let list = list_transactions(&slave.addr).await;
        let listed: HashMap<u64, TxState> = list
            .transactions
            .iter()
            .map(|t| (t.tx_id, t.state))
            .collect();
        for tx in acked.pending.values() {
            if listed.get(tx) == Some(&TxState::Prepared) {
                *pending_on.entry(*tx).or_default() += 1;
            }
        }
        for (b, tx) in &acked.committed {
            assert!(
                !(seen.contains_key(b) && listed.contains_key(tx)),
                "slave {}: committed transaction {tx} ({b}) is visible and still listed",
                slave.addr
            );
        }
    }
    let want = (min_insync - 1) as usize;
    for b in acked.sent.keys().chain(acked.committed.keys()) {
        let n = held.get(b).copied().unwrap_or(0);
        assert!(
            n >= want,
            "acknowledged {b} is on {n} slaves; {want} must hold it"
        );
    }
    for (b, tx) in &acked.pending {
        let n = pending_on.get(tx).copied().unwrap_or(0);
        assert!(
            n >= want,
            "prepared transaction {tx} ({b}) is pending on {n} slaves; {want} must hold it"
        );
    }

    // Byte for byte: each slave's log is the master's up to the slave's
    // end (the master's pages outlive its process), so the slaves agree up
    // to the shorter end.
    for (slave, end) in group.slaves.iter().zip(&ends) {
        assert!(*end > 0, "slave {} holds nothing", slave.addr);
        assert_same_log(&group.master.data_dir, &slave.data_dir, *end);
    }
    let shorter = ends.iter().copied().min().unwrap_or(0);
    assert_same_log(
        &group.slaves[0].data_dir,
        &group.slaves[1].data_dir,
        shorter,
    );

    // The master comes back on its data; both slaves copy what they missed
    // and it answers SEND_OK again.
    tokio::task::block_in_place(|| group.master.restart());
    // Until the slaves are back, a send is SLAVE_NOT_AVAILABLE.
    wait_replication(
        &group.master.addr,
        Duration::from_secs(15),
        "both slaves back with the restarted master",
        |r| r.replicas.len() == 2 && r.replicas.iter().all(|x| x.in_sync),
    )
    .await;
    // The lag is the records the slaves lack (at most the few the master
    // wrote unacknowledged before it was killed), not the positions up to
    // the fresh segment the master writes on in (a whole segment's lag).
    let r = wait_replication(
        &group.master.addr,
        Duration::from_secs(15),
        "both slaves back with the restarted master",
        |r| r.replicas.len() == 2,
    )
    .await;
    assert!(r.log_end >= 8 << 20, "a fresh segment: {r:?}");
    assert!(
        r.replicas.iter().all(|x| x.lag_bytes < 1 << 20),
        "records, not positions: {r:?}"
    );
    wait_for_master(&group.ns, TOPIC, &group.master.addr).await;
    let producer = group.producer().await;
    let r = producer
        .send(Message::new(TOPIC, "after the restart"))
        .await
        .expect("send to the restarted master");
    assert_eq!(r.status, SendStatus::SendOk, "after the master's restart");
    let master = wait_replication(
        &group.master.addr,
        Duration::from_secs(15),
        "both slaves at the restarted master's end",
        |r| r.replicas.len() == 2 && r.replicas.iter().all(|x| x.in_sync && x.lag_bytes == 0),
    )
    .await;
    for slave in &group.slaves {
        assert_eq!(
            common::replication(&slave.addr).await.log_end,
            master.log_end
        );
        assert_same_log(&group.master.data_dir, &slave.data_dir, master.log_end);
    }
    producer.close().await.unwrap();
}

/// Sends to `topic` until `stop`, counting the statuses; returns the
/// bodies answered SEND_OK.
fn steady_load(
    producer: Producer,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(HashSet<String>, usize)> {
    tokio::spawn(async move {
        let mut ok = HashSet::new();
        let mut other = 0;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let body = format!("load-{n}");
            n += 1;
            match producer.send(Message::new(topic, body.clone())).await {
                Ok(r) if r.status == SendStatus::SendOk => {
                    ok.insert(body);
                }
                _ => other += 1,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (ok, other)
    })
}

/// A slave killed under steady load and started again copies what it
/// missed, is in sync again while the load goes on, and then holds the
/// master's log byte for byte and the same queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_slave_catches_up_and_is_back_in_sync() {
    const TOPIC: &str = "rep-restart";
    const QUEUES: u32 = 2;
    const GROUP: &str = "cg-restart";
    let mut group = Group::start(MASTER, 2, TOPIC, QUEUES).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(group.producer().await, TOPIC, stop.clone());
    // Transactions (half of them left pending) and a group's offset
    // commits go on too: the slave derives those from the log as well.
    let tx_producer = TransactionProducer::builder()
        .nameserver(&group.ns)
        .group("pg-restart")
        .listener(EvenCommits)
        .start()
        .await
        .expect("transaction producer starts");
    let side_load = {
        let (p, stop, master) = (tx_producer.clone(), stop.clone(), group.master.addr.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = p
                    .send_in_transaction(Message::new(TOPIC, format!("tx-{n}")))
                    .await;
                let q = (n % u64::from(QUEUES)) as u32;
                let conn = common::try_connect_as(&master, Role::Admin)
                    .await
                    .expect("connect master");
                let end = conn
                    .call(QueryOffset {
                        group: GROUP.into(),
                        topic: TOPIC.into(),
                        queue: q,
                        stored_since_ms: None,
                    })
                    .await
                    .map(|o| o.max_offset)
                    .unwrap_or(0);
                let _ = conn
                    .call(CommitOffset {
                        group: GROUP.into(),
                        topic: TOPIC.into(),
                        queue: q,
                        offset: end / 2,
                        owner: None,
                        forward_only: false,
                        topic_generation: None,
                    })
                    .await;
                conn.close();
                n += 1;
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| group.slaves[0].kill9());
    let before_kill = common::replication(&group.master.addr).await.log_end;
    // The master keeps writing while the slave is away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::replication(&group.master.addr).await.log_end < before_kill + 20_000 {
        assert!(Instant::now() < deadline, "the master took no writes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slave_addr = group.slaves[0].addr.clone();
    tokio::task::block_in_place(|| group.slaves[0].restart());
    wait_replication(
        &group.master.addr,
        Duration::from_secs(15),
        "the restarted slave in sync under load",
        |r| replica(r, &slave_addr).is_some_and(|x| x.in_sync),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, _) = load.await.expect("load task");
    side_load.await.expect("transaction and offset load");
    tx_producer.close().await.unwrap();
    assert!(!ok.is_empty(), "no send was acknowledged");

    let master = wait_replication(
        &group.master.addr,
        Duration::from_secs(10),
        "every slave at lag 0",
        |r| r.replicas.len() == 2 && r.replicas.iter().all(|x| x.in_sync && x.lag_bytes == 0),
    )
    .await;
    let slave = &group.slaves[0];
    let info = common::replication(&slave.addr).await;
    assert_eq!(
        info.log_end, master.log_end,
        "the slave's log ends elsewhere"
    );
    assert_same_log(&group.master.data_dir, &slave.data_dir, master.log_end);

    let on_master = common::pull_all(&group.master.addr, TOPIC, QUEUES).await;
    let on_slave = common::pull_all(&slave.addr, TOPIC, QUEUES).await;
    let ids = |v: &[StoredMessage]| -> Vec<(u32, u64, MsgId)> {
        v.iter()
            .map(|m| (m.queue, m.queue_offset, m.message.msg_id))
            .collect()
    };
    assert_eq!(ids(&on_slave), ids(&on_master), "the slave's queues differ");
    let bodies: HashSet<String> = on_slave.iter().map(body).collect();
    let missing: Vec<&String> = ok.iter().filter(|b| !bodies.contains(*b)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged sends missing on the slave: {missing:?}"
    );

    // The same pending transactions and the same group offsets.
    let pending = |l: TransactionList| -> (Vec<(u64, TxState)>, u64) {
        let mut v: Vec<(u64, TxState)> =
            l.transactions.iter().map(|t| (t.tx_id, t.state)).collect();
        v.sort_by_key(|(id, _)| *id);
        (v, l.counters.pending)
    };
    let on_master = pending(list_transactions(&group.master.addr).await);
    assert!(!on_master.0.is_empty(), "no transaction was left pending");
    assert_eq!(
        pending(list_transactions(&slave.addr).await),
        on_master,
        "the restarted slave's pending transactions"
    );
    for q in 0..QUEUES {
        let at_master = committed_offset(&group.master.addr, GROUP, TOPIC, q).await;
        assert!(at_master.is_some(), "queue {q}: no offset was committed");
        assert_eq!(
            committed_offset(&slave.addr, GROUP, TOPIC, q).await,
            at_master,
            "queue {q}: the restarted slave's committed offset"
        );
    }
}

/// SIGSTOP and wait until every thread of the process is stopped: the
/// kernel wakes one thread to take the signal, and on a busy machine the
/// others run on (receive, append, acknowledge) until it gets a CPU.
fn stop(p: &BrokerProcess) {
    p.signal("STOP");
    let stopped = |pid: u32| -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(Result::ok).all(|t| {
            // "tid (name) S ...": the state follows the name's parenthesis.
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped(p.pid()) {
        assert!(Instant::now() < deadline, "{} did not stop", p.addr);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends one message to `topic`; the status, or the error as text.
async fn send_status(producer: &Producer, topic: &str, n: u64) -> Result<SendStatus, String> {
    producer
        .send(Message::new(topic, format!("m-{n}")))
        .await
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

/// One stopped slave drops out of sync and sends stay SEND_OK (the other
/// slave makes two replicas); with both stopped no send is SEND_OK; once
/// continued, both are back in sync and SEND_OK returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_slave_drops_out_of_sync_and_the_master_keeps_answering() {
    const TOPIC: &str = "rep-stop";
    let group = Group::start(MASTER, 2, TOPIC, 2).await;
    let producer = group.producer().await;
    let (s0, s1) = (&group.slaves[0], &group.slaves[1]);
    let mut n = 0u64;

    stop(s0);
    // Sends go on with SEND_OK all along: the other slave makes two replicas.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = send_status(&producer, TOPIC, n).await;
        n += 1;
        assert_eq!(status, Ok(SendStatus::SendOk), "with one slave stopped");
        let r = common::replication(&group.master.addr).await;
        if replica(&r, &s0.addr).is_some_and(|x| !x.in_sync) {
            assert!(
                replica(&r, &s1.addr).is_some_and(|x| x.in_sync),
                "the running slave is out of sync: {r:#?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped slave stays in sync: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        assert_eq!(
            send_status(&producer, TOPIC, n).await,
            Ok(SendStatus::SendOk),
            "with one slave out of sync"
        );
        n += 1;
    }

    stop(s1);
    // Never SEND_OK now: first the wait for the second slave times out,
    // then (past the lag limit) no slave is in sync at all.
    let mut statuses = Vec::new();
    while statuses.last() != Some(&Ok(SendStatus::SlaveNotAvailable)) {
        let status = send_status(&producer, TOPIC, n).await;
        n += 1;
        if !matches!(
            status,
            Ok(SendStatus::FlushSlaveTimeout | SendStatus::SlaveNotAvailable)
        ) {
            let r = common::replication(&group.master.addr).await;
            panic!(
                "with both slaves stopped a send was answered {status:?} (so far {statuses:?}); the master says {r:#?}"
            );
        }
        statuses.push(status);
        assert!(
            statuses.len() < 10,
            "never SLAVE_NOT_AVAILABLE: {statuses:?}"
        );
    }
    let r = common::replication(&group.master.addr).await;
    assert!(r.replicas.iter().all(|x| !x.in_sync), "{r:#?}");

    s0.signal("CONT");
    s1.signal("CONT");
    wait_replication(
        &group.master.addr,
        Duration::from_secs(10),
        "both slaves back in sync",
        |r| {
            [&s0.addr, &s1.addr]
                .iter()
                .all(|a| replica(r, a).is_some_and(|x| x.in_sync))
        },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            send_status(&producer, TOPIC, n).await,
            Ok(SendStatus::SendOk),
            "with both slaves back"
        );
        n += 1;
    }
}

/// A group commits part of each queue at the master; the master dies; the
/// rest is read and committed at the slave from where the group stood; the
/// master comes back on its data and takes the slave's offsets, never
/// showing one lower, while the slave never shows one lower either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_from_a_slave_while_the_master_is_down_skips_nothing_and_never_moves_back() {
    const TOPIC: &str = "rep-consume";
    const QUEUES: u32 = 2;
    const GROUP: &str = "cg-rep";
    const PER_QUEUE: u64 = 20;
    let mut group = Group::start(MASTER, 1, TOPIC, QUEUES).await;
    let producer = group.producer().await;
    for q in 0..QUEUES {
        for i in 0..PER_QUEUE {
            let r = producer
                .send_to_queue(Message::new(TOPIC, format!("q{q}-{i}")), GROUP_NAME, q)
                .await
                .expect("send");
            assert_eq!(r.status, SendStatus::SendOk);
        }
    }
    producer.close().await.unwrap();

    // The group consumes part of each queue at the master and commits there.
    let master = common::try_connect_as(&group.master.addr, Role::Admin)
        .await
        .expect("connect master");
    let mut consumed: Vec<String> = Vec::new();
    let first_part = [7u64, 12];
    for q in 0..QUEUES {
        let got = common::pull_range(&master, TOPIC, q, 0, first_part[q as usize]).await;
        consumed.extend(got.iter().map(body));
        commit_offset(&group.master.addr, GROUP, TOPIC, q, first_part[q as usize]).await;
    }
    master.close();
    let slave_addr = group.slaves[0].addr.clone();
    let master_end = common::replication(&group.master.addr).await.log_end;
    wait_replication(
        &slave_addr,
        Duration::from_secs(10),
        "the slave caught up",
        |r| r.log_end == master_end,
    )
    .await;

    tokio::task::block_in_place(|| group.master.kill9());

    // The rest from the slave, from where the group left off, committing
    // at the slave in two steps.
    let slave = common::try_connect_as(&slave_addr, Role::Admin)
        .await
        .expect("connect slave");
    let mut highest = first_part;
    for q in 0..QUEUES {
        let qi = q as usize;
        let start = committed_offset(&slave_addr, GROUP, TOPIC, q).await;
        assert_eq!(
            start,
            Some(first_part[qi]),
            "queue {q}: the slave does not start where the group committed at the master"
        );
        let middle = (first_part[qi] + PER_QUEUE) / 2;
        for to in [middle, PER_QUEUE] {
            let from = highest[qi];
            let got = common::pull_range(&slave, TOPIC, q, from, to).await;
            assert_eq!(
                got.len() as u64,
                to - from,
                "queue {q}: read {from}..{to} at the slave"
            );
            consumed.extend(got.iter().map(body));
            commit_offset(&slave_addr, GROUP, TOPIC, q, to).await;
            let now = committed_offset(&slave_addr, GROUP, TOPIC, q).await;
            assert_eq!(now, Some(to), "queue {q}: the slave's committed offset");
            highest[qi] = to;
        }
    }
    slave.close();
    // `txmq group show` at the slave counts them too (it showed the
    // offsets the master had handed over, and a lag the group had read).
    let state = call(
        &slave_addr,
        GetGroupState {
            group: GROUP.into(),
        },
    )
    .await
    .expect("group state at the slave");
    for q in 0..QUEUES {
        let shown = state
            .queues
            .iter()
            .find(|g| g.topic == TOPIC && g.queue == q)
            .unwrap_or_else(|| panic!("queue {q} in the group's state: {state:?}"));
        assert_eq!(shown.committed, Some(PER_QUEUE), "queue {q}: {shown:?}");
        assert_eq!(shown.lag, 0, "queue {q}: {shown:?}");
    }
    let mut expected: Vec<String> = (0..QUEUES)
        .flat_map(|q| (0..PER_QUEUE).map(move |i| format!("q{q}-{i}")))
        .collect();
    expected.sort();
    let mut sorted = consumed.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "consumed with a gap or twice");

    // The master comes back on its data: it never shows an offset below
    // what it had, and takes what was committed at the slave.
    tokio::task::block_in_place(|| group.master.restart());
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(15);
    for q in 0..QUEUES {
        let qi = q as usize;
        loop {
            let at_slave = committed_offset(&slave_addr, GROUP, TOPIC, q).await;
            assert_eq!(
                at_slave,
                Some(highest[qi]),
                "queue {q}: the slave's committed offset moved back while the master took it"
            );
            let at_master = committed_offset(&group.master.addr, GROUP, TOPIC, q).await;
            assert!(
                at_master.is_some_and(|o| o >= first_part[qi]),
                "queue {q}: the master's offset went back to {at_master:?} (was {})",
                first_part[qi]
            );
            if at_master == Some(highest[qi]) {
                break;
            }
            assert!(
                at_master.is_some_and(|o| o <= highest[qi]),
                "queue {q}: the master's offset {at_master:?} is past what was committed"
            );
            assert!(
                Instant::now() < deadline,
                "queue {q}: the master's offset stays at {at_master:?}, the slave's is {}",
                highest[qi]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Handing the offsets over does not hold up replication: the master's
    // writes are confirmed by the slave meanwhile.
    for i in 0..3 {
        let status = send_raw(&group.master.addr, TOPIC, 0, &format!("later-{i}")).await;
        assert_eq!(
            status,
            SendStatus::SendOk,
            "a send while the slave hands over its offsets ({:?} after the restart)",
            restarted.elapsed()
        );
    }
    // And the slave never moved back either, while it copies the master's
    // records of them.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for q in 0..QUEUES {
            assert_eq!(
                committed_offset(&slave_addr, GROUP, TOPIC, q).await,
                Some(highest[q as usize]),
                "queue {q}: the slave's committed offset moved back after the master took it"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The master's log differs at the slave's last record (the master wrote
/// more, and other, records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_whose_log_differs_stops_with_an_error() {
    slave_of_another_history(10, 20).await;
}

/// The slave holds more than its master has written at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_holding_more_than_its_master_stops_with_an_error() {
    slave_of_another_history(40, 2).await;
}

/// A broker's data written as a master alone (`own` messages), then started
/// as the slave of another master of the group (`others` longer messages):
/// it stops replicating with an error that names the divergence, copies
/// nothing more, and still serves its own messages.
async fn slave_of_another_history(own_messages: usize, others: usize) {
    const TOPIC: &str = "rep-diverge";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().expect("temp dir");
    let producer = || async {
        Producer::builder()
            .nameserver(&ns)
            .build()
            .await
            .expect("producer builds")
    };

    // D: a master alone, with messages of its own.
    let d_dir = tmp.path().join("d");
    let mut d = start_broker(&d_dir, &ns, GROUP_NAME, &[]).await;
    create_topic(&d.addr, TOPIC, 1).await;
    let to_d = producer().await;
    let mut own = Vec::new();
    for i in 0..own_messages {
        let body = format!("d-{i}");
        let r = to_d
            .send(Message::new(TOPIC, body.clone()))
            .await
            .expect("send to D");
        assert_eq!(r.status, SendStatus::SendOk);
        own.push(body);
    }
    to_d.close().await.unwrap();
    tokio::task::block_in_place(|| d.stop());

    // M: another master of the same group, with other (longer) messages.
    let m = start_broker(&tmp.path().join("m"), &ns, GROUP_NAME, &[]).await;
    create_topic(&m.addr, TOPIC, 1).await;
    common::wait_for_route(&ns, TOPIC, &[GROUP_NAME]).await;
    let to_m = producer().await;
    for i in 0..others {
        to_m.send(Message::new(TOPIC, format!("m-{i}-{}", "x".repeat(100))))
            .await
            .expect("send to M");
    }

    // D's data as a slave of M.
    let d = start_broker(
        &d_dir,
        &ns,
        GROUP_NAME,
        &["--role", "slave", "--master-addr", &m.addr],
    )
    .await;
    let info = wait_replication(&d.addr, Duration::from_secs(10), "the slave's error", |r| {
        r.error.is_some()
    })
    .await;
    let error = info.error.clone().unwrap_or_default();
    assert!(
        error.contains("REPLICA_DIVERGED"),
        "the error does not name the divergence: {error}"
    );
    let log = d.log_text();
    let stopped = log
        .lines()
        .find(|l| l.contains("replication stopped"))
        .unwrap_or_else(|| panic!("the slave's log does not say it stopped:\n{log}"));
    assert!(
        stopped.contains("REPLICA_DIVERGED"),
        "the slave's log does not name the divergence: {stopped}"
    );
    eprintln!("{stopped}");
    let end = info.log_end;

    // M takes more writes; D copies none of them.
    for i in 0..20 {
        to_m.send(Message::new(TOPIC, format!("m2-{i}")))
            .await
            .expect("send to M");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = common::replication(&d.addr).await;
    assert_eq!(later.log_end, end, "the diverged slave's log moved");
    assert_eq!(later.error, info.error);

    // It still serves its own data.
    let stored: Vec<String> = common::pull_all(&d.addr, TOPIC, 1)
        .await
        .iter()
        .map(body)
        .collect();
    assert_eq!(
        stored, own,
        "the diverged slave does not serve its own messages"
    );
    to_m.close().await.unwrap();
}

/// Polls `consumer` until `want` messages arrived in all or `limit` passed.
async fn poll_until(
    consumer: &mut txmq::PullConsumer,
    got: &mut Vec<txmq::ReceivedMessage>,
    want: usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while got.len() < want && Instant::now() < deadline {
        let batch = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        got.extend(batch);
    }
}

/// The same as the raw version above, with the client's `PullConsumer`: it
/// carries on from the slave when the master dies (its position kept, no
/// message skipped or read twice), its commit goes to the slave, the master
/// takes it when it returns, and the consumer then reads new messages from
/// the master without going back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_consumer_carries_on_from_the_slave_and_its_commits_reach_the_returning_master() {
    const TOPIC: &str = "rep-consumer";
    const QUEUES: u32 = 2;
    const GROUP: &str = "cg-client";
    const FIRST: usize = 30;
    const TOTAL: usize = 60;
    let mut group = Group::start(MASTER, 1, TOPIC, QUEUES).await;
    let producer = group.producer().await;
    for i in 0..TOTAL {
        let r = producer
            .send(Message::new(TOPIC, format!("c-{i}")))
            .await
            .expect("send");
        assert_eq!(r.status, SendStatus::SendOk);
    }
    let mut consumer = txmq::PullConsumer::builder()
        .nameserver(&group.ns)
        .group(GROUP)
        .topic(TOPIC)
        .batch_size(4)
        .buffered_batches(1)
        .max_poll_messages(4)
        .max_wait(Duration::from_millis(200))
        .route_refresh_interval(Duration::from_millis(200))
        .request_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect("consumer builds");
    let mut got = Vec::new();
    poll_until(&mut consumer, &mut got, FIRST, Duration::from_secs(10)).await;
    consumer.commit().await.expect("commit at the master");
    let mut at_master = [0u64; QUEUES as usize];
    for m in &got {
        let q = m.queue() as usize;
        at_master[q] = at_master[q].max(m.queue_offset() + 1);
    }
    let slave_addr = group.slaves[0].addr.clone();
    let end = common::replication(&group.master.addr).await.log_end;
    wait_replication(
        &slave_addr,
        Duration::from_secs(10),
        "the slave caught up",
        |r| r.log_end == end,
    )
    .await;

    tokio::task::block_in_place(|| group.master.kill9());
    poll_until(&mut consumer, &mut got, TOTAL, Duration::from_secs(20)).await;
    consumer.commit().await.expect("commit at the slave");

    let mut bodies: Vec<String> = got.iter().map(common::body_text).collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..TOTAL).map(|i| format!("c-{i}")).collect();
    expected.sort();
    assert_eq!(
        bodies, expected,
        "a message skipped or read twice across the switch"
    );
    // Per queue, offsets only go forward, one by one.
    for q in 0..QUEUES {
        let offsets: Vec<u64> = got
            .iter()
            .filter(|m| m.queue() == q)
            .map(|m| m.queue_offset())
            .collect();
        let want: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, want, "queue {q} read out of order");
    }
    let per_queue: Vec<u64> = (0..QUEUES)
        .map(|q| got.iter().filter(|m| m.queue() == q).count() as u64)
        .collect();
    for q in 0..QUEUES {
        assert_eq!(
            committed_offset(&slave_addr, GROUP, TOPIC, q).await,
            Some(per_queue[q as usize]),
            "queue {q}: the consumer's commit at the slave"
        );
    }

    tokio::task::block_in_place(|| group.master.restart());
    let deadline = Instant::now() + Duration::from_secs(15);
    for q in 0..QUEUES {
        let qi = q as usize;
        loop {
            let now = committed_offset(&group.master.addr, GROUP, TOPIC, q).await;
            assert!(
                now.is_some_and(|o| o >= at_master[qi]),
                "queue {q}: the master's offset went back to {now:?} (was {})",
                at_master[qi]
            );
            if now == Some(per_queue[qi]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue {q}: the master's offset stays at {now:?}, the slave's is {}",
                per_queue[qi]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // New messages reach the consumer from the master; nothing old again.
    for i in 0..6 {
        producer
            .send(Message::new(TOPIC, format!("after-{i}")))
            .await
            .expect("send to the returned master");
    }
    let mut later = Vec::new();
    poll_until(&mut consumer, &mut later, 6, Duration::from_secs(20)).await;
    let mut later: Vec<String> = later.iter().map(common::body_text).collect();
    later.sort();
    let want: Vec<String> = (0..6).map(|i| format!("after-{i}")).collect();
    assert_eq!(later, want, "after the master returned");
    consumer.shutdown().await.expect("consumer commits");
    producer.close().await.unwrap();
}

/// A topic deleted on the master is deleted on its slaves too: the delete
/// is a record in the replicated log (and the master's topic table, which
/// slaves mirror, loses it). So a slave that takes over after the master
/// is killed does not bring the topic back, nor its consumer offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_on_the_master_stays_deleted_when_a_slave_takes_over() {
    let mut group = Group::start(MASTER, 1, "typo", 2).await;
    let master = group.master.addr.clone();
    let slave = group.slaves[0].addr.clone();
    create_topic(&master, "kept", 1).await;
    for q in 0..2 {
        assert_eq!(send_raw(&master, "typo", q, "t").await, SendStatus::SendOk);
    }
    assert_eq!(send_raw(&master, "kept", 0, "k").await, SendStatus::SendOk);
    commit_offset(&master, "readers", "typo", 0, 1).await;
    commit_offset(&master, "readers", "kept", 0, 1).await;
    wait_for_master(&group.ns, "typo", &master).await;

    let out = common::txmq(&group.ns, &["topic", "delete", "typo"], None).await;
    assert!(
        out.status.success(),
        "topic delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = common::replication(&master).await.log_end;
    wait_replication(
        &master,
        Duration::from_secs(10),
        "the slave holds the delete",
        |r| replica(r, &slave).is_some_and(|x| x.acked >= end),
    )
    .await;

    // The master dies; the slave's data directory starts as the master.
    group.master.kill9();
    group.slaves[0].kill9();
    let data = group.tmp.path().join("slave0");
    let promoted = start_broker(&data, &group.ns, GROUP_NAME, &[]).await;
    wait_for_master(&group.ns, "kept", &promoted.addr).await;
    let listed = common::txmq(&group.ns, &["topic", "list"], None).await;
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.contains("kept"), "{listed}");
    assert!(
        !listed.contains("typo"),
        "the deleted topic is back: {listed}"
    );
    let status = common::txmq(&group.ns, &["topic", "status", "typo"], None).await;
    assert_eq!(
        status.status.code(),
        Some(1),
        "topic status of a deleted topic"
    );
    let gone = call(
        &promoted.addr,
        QueryOffset {
            group: "readers".into(),
            topic: "typo".into(),
            queue: 0,
            stored_since_ms: None,
        },
    )
    .await;
    assert!(
        gone.as_ref()
            .is_err_and(|e| e.to_string().contains("UNKNOWN_TOPIC")),
        "{gone:?}"
    );
    assert_eq!(
        committed_offset(&promoted.addr, "readers", "kept", 0).await,
        Some(1)
    );
    let kept = common::pull_all(&promoted.addr, "kept", 1).await;
    assert_eq!(kept.iter().map(body).collect::<Vec<_>>(), vec!["k"]);
    // Made again under the same name, it starts empty: the old messages
    // and offsets are gone from the slave's store, not only from its table.
    create_topic(&promoted.addr, "typo", 2).await;
    let again = common::pull_all(&promoted.addr, "typo", 2).await;
    assert!(again.is_empty(), "old messages are back: {again:?}");
    assert_eq!(
        committed_offset(&promoted.addr, "readers", "typo", 0).await,
        None
    );
    drop(promoted);
}

/// `dlq resend` under sync replication answers like a send: only once the
/// in-sync slave holds the copies. With the only slave stopped it fails,
/// saying the letters are already recorded as resent (so a second `--all`
/// resends nothing new), instead of reporting a resend a failover could lose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_resend_waits_for_the_in_sync_slave() {
    let group = Group::start(MASTER, 1, "bills", 1).await;
    let producer = group.producer().await;
    for i in 0..3 {
        let status = send_status(&producer, "bills", i).await;
        assert_eq!(status, Ok(SendStatus::SendOk));
    }
    producer.close().await.unwrap();
    let ns = group.ns.clone();
    tokio::task::spawn_blocking(move || {
        txmq_tests::make_dead_letters(&ns, "bills", "billing", 3);
    })
    .await
    .expect("dead letters made");

    stop(&group.slaves[0]);
    let out = common::txmq(&group.ns, &["dlq", "resend", "billing", "--all"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("recorded as resent"), "{stderr}");
    group.slaves[0].signal("CONT");
    let again = common::txmq(&group.ns, &["dlq", "resend", "billing", "--all"], None).await;
    let stdout = String::from_utf8_lossy(&again.stdout).into_owned();
    assert_eq!(again.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("3 resent before"), "{stdout}");
}
