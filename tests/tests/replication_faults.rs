//! The replication stream under bad input and power cuts.
//!
//! - A master given bad replica input (undecodable frames, a fetch cut off
//!   mid-frame, a malformed fetch, fetches past its end, from below its log
//!   start, off a record boundary, naming a record it does not have, with
//!   the wrong segment size or broker group, without a replica hello, an
//!   acknowledgement before any fetch or past what it was sent) answers each
//!   with a clear error or closes that connection only, while its real
//!   slave keeps replicating and producers keep getting `SEND_OK`.
//! - A slave given bad batches by a fake master (a flipped byte, a truncated
//!   record, garbage, data that does not continue its log, records with
//!   good checksums that do not decode) stores nothing of them, says so in
//!   its log, keeps serving, and stores the good batch (real records copied
//!   from a real master) that follows; given undecodable frames, it
//!   reconnects. A record for an impossible queue it keeps (as recovery
//!   does: the logs stay the same) without serving it.
//! - Power cuts ([`LazyFs`]) on a master under `--flush sync` and on a slave
//!   under `--flush sync`: nothing acknowledged is lost, the slave goes on
//!   replicating without diverging, and both logs end up byte-identical.
//!
//! The tests take a lock so that they run one at a time: each one is a
//! group of processes, and two at once overload a small machine.

mod common;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use txmq::{Message, SendStatus};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    CreateTopic, Done, ErrorCode, Frame, FrameCodec, Ping, RecordRef, ReplicaAck, ReplicaData,
    ReplicaFetch, Request, Response, Role, StoredMessage, TopicConfig, WireError, PERM_READ_WRITE,
    PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::{wait_for_broker, BrokerProcess, Cluster};

use common::{record_starts, segments};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a slave logs for a bad batch from its master.
const BAD_BATCH: &str = "the master sent a bad batch; nothing of it was written";

/// The harness's segment size (`BrokerProcess::start` passes 8 MiB).
const SEGMENT_SIZE: u64 = 8 << 20;
const GROUP: &str = "broker-a";

/// Creates `topic` (one queue) on the master and waits until it is routed.
async fn create_topic(ns: &str, master: &str, topic: &str) {
    let conn = common::connect_as(master, Role::Admin).await;
    conn.call(CreateTopic {
        topic: topic.into(),
        queues: 1,
        perm: PERM_READ_WRITE,
    })
    .await
    .unwrap_or_else(|e| panic!("create {topic}: {e}"));
    conn.close();
    common::wait_for_route(ns, topic, &[GROUP]).await;
}

fn body_set(messages: &[StoredMessage]) -> HashSet<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
        .collect()
}

/// A plain producer: the tests rewrite bytes of its message records,
/// which must be the log's first (an idempotent one starts the log with
/// its producer id's record).
async fn producer(ns: &str) -> txmq::Producer {
    txmq::Producer::builder()
        .nameserver(ns)
        .idempotence(false)
        .send_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("producer builds")
}

/// Sends `n` messages `{prefix}-{i}`, each of which must be `SEND_OK`.
async fn send_ok(p: &txmq::Producer, topic: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0..n {
        let body = format!("{prefix}-{i}");
        let r = p
            .send(Message::new(topic, body.clone()))
            .await
            .unwrap_or_else(|e| panic!("send {body}: {e}"));
        assert_eq!(r.status, SendStatus::SendOk, "send {body}");
        sent.push(body);
    }
    sent
}

/// The first `len` bytes of a broker's log (its first segment).
fn log_prefix(data: &Path, len: u64) -> Vec<u8> {
    let bytes = std::fs::read(data.join("commitlog").join(format!("{:020}", 0)))
        .expect("read the first segment");
    bytes[..len as usize].to_vec()
}

/// Asserts that two brokers' logs hold the same segments with the same
/// records, byte for byte (a log may continue in a new segment after a
/// crash, so each segment is compared up to its last record).
fn assert_same_log(master: &Path, slave: &Path) {
    let names = |d: &Path| -> Vec<String> {
        segments(d)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(master), names(slave), "the same segments");
    for (m, s) in segments(master).iter().zip(segments(slave).iter()) {
        let m_end = *record_starts(m).last().unwrap() as usize;
        let s_end = *record_starts(s).last().unwrap() as usize;
        assert_eq!(
            m_end,
            s_end,
            "{}: records end at the same place",
            m.display()
        );
        let (mb, sb) = (std::fs::read(m).unwrap(), std::fs::read(s).unwrap());
        assert!(
            mb[..m_end] == sb[..s_end],
            "{}: the same bytes",
            m.display()
        );
    }
}

/// Waits until the slave holds the master's whole log, without an error.
async fn wait_caught_up(master: &str, slave: &str, limit: Duration) -> u64 {
    let end = std::cell::Cell::new(0);
    common::wait_until("the slave holds the master's log", limit, || async {
        let m = common::replication(master).await;
        let s = common::replication(slave).await;
        assert_eq!(s.error, None, "the slave stopped replicating");
        end.set(m.log_end);
        s.log_end == m.log_end && m.log_end > 0
    })
    .await;
    end.get()
}

/// Waits until the master counts its slave in sync (sends under sync
/// replication then get `SEND_OK`).
async fn wait_in_sync(master: &str) {
    common::wait_until(
        "the master has a slave in sync",
        Duration::from_secs(20),
        || async {
            common::replication(master)
                .await
                .replicas
                .iter()
                .any(|r| r.in_sync)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// Raw frames

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(frame, &mut buf)
        .expect("frame encodes");
    buf.to_vec()
}

/// `body` behind a correct 4-byte big-endian length prefix.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A raw TCP connection that speaks the framing by hand.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connected and greeted as a replica.
    async fn replica(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        raw.write(&encode(&Frame::Request(
            1,
            Request::Hello(common::hello(Role::Replica)),
        )))
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(Decoded::Frame(f)) = FrameCodec::default().decode(&mut raw.buf).unwrap() {
                assert!(
                    matches!(f, Frame::Response(1, Ok(Response::Hello(_)))),
                    "hello answered: {f:?}"
                );
                return raw;
            }
            let n = tokio::time::timeout_at(deadline, raw.stream.read_buf(&mut raw.buf))
                .await
                .expect("hello answered in time")
                .expect("read");
            assert!(n > 0, "closed before answering the hello");
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads until the peer closes (panics after 5 s); returns what it sent.
    async fn frames_until_closed(mut self) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("the bad connection is closed within 5 s");
            match n {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        let mut frames = Vec::new();
        while let Some(Decoded::Frame(f)) = FrameCodec::default()
            .decode(&mut self.buf)
            .expect("valid frames")
        {
            frames.push(f);
        }
        frames
    }
}

// ---------------------------------------------------------------------------
// 1. Bad input at a real master

/// A fetch as a slave of this group at position `from` would send it.
fn fetch(from: u64, last_record: Option<RecordRef>) -> ReplicaFetch {
    ReplicaFetch {
        last_epoch: Default::default(),
        epoch: Default::default(),
        broker_name: GROUP.into(),
        addr: "127.0.0.1:1".into(),
        from,
        last_record,
        max_bytes: 1 << 20,
        wait_ms: 0,
        segment_size: SEGMENT_SIZE,
        topics_version: 0,
    }
}

/// Sends `req` on a fresh replica connection; returns the refusal.
async fn refused(master: &str, req: ReplicaFetch) -> WireError {
    let conn = common::connect_as(master, Role::Replica).await;
    let r = conn.call(req.clone()).await;
    conn.close();
    match r {
        Ok(data) => panic!(
            "{req:?} was served: {} bytes at {}",
            data.data.len(),
            data.pos
        ),
        Err(e) => e
            .remote()
            .unwrap_or_else(|| panic!("{req:?}: not an error answer: {e}"))
            .clone(),
    }
}

fn assert_error(e: &WireError, code: ErrorCode, says: &[&str]) {
    assert_eq!(e.code, code, "{e}");
    for s in says {
        assert!(e.message.contains(s), "{e} does not say {s:?}");
    }
}

/// A record of the master's log: its position, stored CRC and length.
fn a_record_of(data: &Path) -> (u64, u32, u64) {
    // The last whole segment (not the active one) has stable records.
    let segs = segments(data);
    let seg = &segs[segs.len() - 1];
    let start: u64 = seg
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("segment name");
    let starts = record_starts(seg);
    assert!(starts.len() >= 3, "the segment holds records");
    let bytes = std::fs::read(seg).expect("read segment");
    let rel = starts[1] as usize;
    let len = u32::from_le_bytes(bytes[rel..rel + 4].try_into().unwrap()) as u64;
    let crc = u32::from_le_bytes(bytes[rel + 4..rel + 8].try_into().unwrap());
    (start + rel as u64, crc, len)
}

/// A master with a real slave is sent every kind of bad replica input; each
/// gets its error (or a close), and the slave and producers never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_refuses_bad_replica_input_and_keeps_replicating() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let master_dir = tmp.path().join("master");
    // Retention takes the first segment once the log rolled past it.
    let master = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &master_dir,
            &ns,
            GROUP,
            &[
                "--replication",
                "sync",
                "--min-insync-replicas",
                "2",
                "--retention",
                "2s",
            ],
        )
    });
    wait_for_broker(&ns, GROUP).await;
    let slave = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("slave"),
            &ns,
            GROUP,
            &["--role", "slave", "--master-addr", &master.addr],
        )
    });
    create_topic(&ns, &master.addr, "rf").await;
    wait_in_sync(&master.addr).await;
    let p = producer(&ns).await;
    // 10 MB rolls the 8 MiB first segment; retention then deletes it.
    let filler = vec![b'x'; 100_000];
    for _ in 0..100 {
        let r = p.send(Message::new("rf", filler.clone())).await.unwrap();
        assert_eq!(r.status, SendStatus::SendOk);
    }
    let mut before = send_ok(&p, "rf", "before", 10).await;
    let first = master_dir.join("commitlog").join(format!("{:020}", 0));
    common::wait_until(
        "retention deletes the first segment",
        Duration::from_secs(20),
        || async { !first.exists() },
    )
    .await;
    let info = common::replication(&master.addr).await;
    let end = info.log_end;
    let (pos, crc, len) = a_record_of(&master_dir);

    // Control: the right record, at its end, is served.
    let conn = common::connect_as(&master.addr, Role::Replica).await;
    let served = conn
        .call(fetch(pos + len, Some(RecordRef { pos, crc })))
        .await
        .expect("a fetch that matches the master's log is served");
    conn.close();
    assert_eq!(served.pos, pos + len);
    assert!(!served.data.is_empty());

    // Undecodable bytes after the hello: the connection closes.
    let mut raw = Raw::replica(&master.addr).await;
    raw.write(&framed(b"\xc1\xc1 not messagepack at all")).await;
    raw.frames_until_closed().await;

    // A fetch cut off mid-frame by the peer closing: nothing is answered.
    let whole = encode(&Frame::Request(
        2,
        Request::ReplicaFetch(Box::new(fetch(0, None))),
    ));
    let mut raw = Raw::replica(&master.addr).await;
    raw.write(&whole[..whole.len() / 2]).await;
    raw.stream.shutdown().await.expect("half-close");
    assert!(raw.frames_until_closed().await.is_empty());

    // A fetch whose fields have the wrong types: refused as malformed.
    let mut raw = Raw::replica(&master.addr).await;
    let body =
        rmp_serde::to_vec(&json!({"Request": [7, {"ReplicaFetch": {"from": "zero"}}]})).unwrap();
    raw.write(&framed(&body)).await;
    let frames = raw.frames_until_closed().await;
    match &frames[..] {
        [Frame::Response(7, Err(e))] => assert_eq!(e.code, ErrorCode::MalformedRequest, "{e}"),
        other => panic!("expected a MALFORMED_REQUEST answer to request 7, got {other:?}"),
    }

    // Past the master's end.
    let e = refused(
        &master.addr,
        fetch(end + 4096, Some(RecordRef { pos, crc })),
    )
    .await;
    assert_error(
        &e,
        ErrorCode::ReplicaDiverged,
        &["differs", &(end + 4096).to_string()],
    );
    let e = refused(&master.addr, fetch(end + 4096, None)).await;
    assert_error(
        &e,
        ErrorCode::BadArgument,
        &["last record", &(end + 4096).to_string()],
    );

    // A last record whose checksum is not the master's.
    let e = refused(
        &master.addr,
        fetch(pos + len, Some(RecordRef { pos, crc: crc ^ 1 })),
    )
    .await;
    assert_error(
        &e,
        ErrorCode::ReplicaDiverged,
        &["differs", &pos.to_string()],
    );

    // Not at a record boundary (the right record, a wrong end).
    let e = refused(&master.addr, fetch(pos + 3, Some(RecordRef { pos, crc }))).await;
    assert_error(&e, ErrorCode::ReplicaDiverged, &["differs"]);

    // Below the master's log start (its first segment is gone): a slave
    // whose log ends there is refused; an empty one copies from the start.
    let min = SEGMENT_SIZE;
    let e = refused(
        &master.addr,
        fetch(200, Some(RecordRef { pos: 100, crc: 7 })),
    )
    .await;
    assert_error(
        &e,
        ErrorCode::ReplicaPositionUnavailable,
        &["starts at", &min.to_string()],
    );
    let conn = common::connect_as(&master.addr, Role::Replica).await;
    let served = conn
        .call(fetch(0, None))
        .await
        .expect("an empty slave is served");
    conn.close();
    assert_eq!(served.pos, min, "from the start of the master's log");
    assert!(!served.data.is_empty());

    // Settings that do not match.
    let mut wrong = fetch(pos + len, Some(RecordRef { pos, crc }));
    wrong.segment_size = 1 << 20;
    let e = refused(&master.addr, wrong).await;
    assert_error(
        &e,
        ErrorCode::BadArgument,
        &["segment size", "--segment-size 8388608"],
    );
    let mut wrong = fetch(pos + len, Some(RecordRef { pos, crc }));
    wrong.broker_name = "broker-b".into();
    let e = refused(&master.addr, wrong).await;
    assert_error(&e, ErrorCode::BadArgument, &["'broker-a'", "'broker-b'"]);

    // A fetch on a connection that did not say hello as a replica.
    let conn = common::connect_as(&master.addr, Role::Admin).await;
    let e = conn.call(fetch(0, None)).await.expect_err("refused");
    conn.close();
    assert_error(
        e.remote().expect("an error answer"),
        ErrorCode::BadArgument,
        &["replica"],
    );

    // An acknowledgement before any fetch.
    let conn = common::connect_as(&master.addr, Role::Replica).await;
    let e = conn
        .call(ReplicaAck { acked: end })
        .await
        .expect_err("refused");
    conn.close();
    assert_error(
        e.remote().expect("an error answer"),
        ErrorCode::BadArgument,
        &["before any fetch"],
    );

    // Meanwhile the real slave replicates and sends are acknowledged by it.
    before.extend(send_ok(&p, "rf", "after", 10).await);
    let end = wait_caught_up(&master.addr, &slave.addr, Duration::from_secs(10)).await;
    let on_slave = body_set(&common::pull_all(&slave.addr, "rf", 1).await);
    for b in &before {
        assert!(on_slave.contains(b), "{b} is on the slave");
    }
    let m = common::replication(&master.addr).await;
    assert!(m.log_end >= end);
    let addrs: Vec<&str> = m.replicas.iter().map(|r| r.addr.as_str()).collect();
    assert_eq!(
        addrs,
        vec![slave.addr.as_str()],
        "only the real slave is a replica"
    );
    assert!(m.replicas[0].in_sync, "{m:?}");
    assert!(common::replication(&slave.addr).await.error.is_none());
    p.close().await.unwrap();
    drop(slave);
    drop(master);
    cluster.shutdown().await;
}

/// A replica that acknowledges more than it was sent is refused: otherwise
/// one bogus acknowledgement would count as a copy of every later write,
/// and sync replication would answer `SEND_OK` with no slave holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cannot_acknowledge_what_it_was_never_sent() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let master = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("master"),
            &ns,
            GROUP,
            &[
                "--replication",
                "sync",
                "--min-insync-replicas",
                "2",
                "--replication-timeout",
                "1s",
            ],
        )
    });
    wait_for_broker(&ns, GROUP).await;
    let slave = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("slave"),
            &ns,
            GROUP,
            &["--role", "slave", "--master-addr", &master.addr],
        )
    });
    create_topic(&ns, &master.addr, "rf").await;
    wait_in_sync(&master.addr).await;
    let p = producer(&ns).await;
    send_ok(&p, "rf", "before", 5).await;

    // A replica fetches the log from its start, then acknowledges far past
    // anything it was sent (and past the master's end).
    let conn = common::connect_as(&master.addr, Role::Replica).await;
    let data = conn.call(fetch(0, None)).await.expect("served");
    let bogus = data.master_end + (1 << 40);
    let acked = conn.call(ReplicaAck { acked: bogus }).await;
    conn.close();
    let e = acked.expect_err("an acknowledgement past what was sent is refused");
    assert_error(
        e.remote().expect("an error answer"),
        ErrorCode::BadArgument,
        &[&bogus.to_string()],
    );

    // With the only real slave stopped, a send is not SEND_OK.
    slave.signal("STOP");
    let r = p
        .send(Message::new("rf", "while the slave is stopped"))
        .await
        .expect("answered");
    slave.signal("CONT");
    assert_ne!(
        r.status,
        SendStatus::SendOk,
        "no slave holds it, yet it was acknowledged as replicated"
    );
    p.close().await.unwrap();
    drop(slave);
    drop(master);
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. Bad input at a real slave, from a fake master

/// A master that answers fetches from a script: each fetch takes the next
/// scripted answer; with none left, an empty batch after a short wait.
#[derive(Default)]
struct FakeMaster {
    script: Mutex<VecDeque<ReplicaData>>,
    /// (from, last record) of every fetch.
    fetches: Mutex<Vec<(u64, Option<RecordRef>)>>,
    /// The topic table sent with every answer.
    topics: Mutex<Option<(u64, Vec<TopicConfig>)>>,
}

struct FakeService(Arc<FakeMaster>);

impl Service for FakeService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            match request {
                Request::ReplicaFetch(f) => {
                    fake.fetches.lock().unwrap().push((f.from, f.last_record));
                    let scripted = fake.script.lock().unwrap().pop_front();
                    let topics = fake.topics.lock().unwrap().clone();
                    let mut answer = match scripted {
                        Some(a) => a,
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            ReplicaData {
                                epochs: Default::default(),
                                confirmed: Default::default(),
                                pos: f.from,
                                data: Bytes::new(),
                                master_end: f.from,
                                topics: None,
                            }
                        }
                    };
                    answer.topics = topics;
                    Ok(Response::ReplicaFetch(Box::new(answer)))
                }
                Request::ReplicaAck(_) => Ok(Response::ReplicaAck(Done {})),
                Request::Ping(_) => Ok(Response::Ping(txmq_protocol::Pong {})),
                other => Err(WireError::new(
                    ErrorCode::UnsupportedRequest,
                    format!("the fake master does not serve {}", other.kind()),
                )),
            }
        })
    }
}

/// The count of `needle` in the slave's log.
fn count(slave: &BrokerProcess, needle: &str) -> usize {
    slave.log_text().matches(needle).count()
}

/// A slave of a [`FakeMaster`], and real records for the fake to serve.
struct FakeGroup {
    /// The whole log of a real master that stored `sent` in topic `rf`,
    /// as one batch from position 0.
    good: ReplicaData,
    sent: Vec<String>,
    fake: Arc<FakeMaster>,
    fake_addr: String,
    stop: CancellationToken,
    slave: BrokerProcess,
    slave_dir: std::path::PathBuf,
}

impl Drop for FakeGroup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeGroup {
    /// Runs a real master briefly to copy its records (fetched as a slave
    /// would; they must equal its segment file's bytes), then starts the
    /// fake master and a slave of it, in `dir`.
    async fn start(ns: &str, dir: &Path) -> FakeGroup {
        let real_dir = dir.join("real");
        let mut real =
            tokio::task::block_in_place(|| BrokerProcess::start(&real_dir, ns, GROUP, &[]));
        wait_for_broker(ns, GROUP).await;
        create_topic(ns, &real.addr, "rf").await;
        let p = producer(ns).await;
        let sent = send_ok(&p, "rf", "good", 10).await;
        p.close().await.unwrap();
        let conn = common::connect_as(&real.addr, Role::Replica).await;
        let good = conn
            .call(fetch(0, None))
            .await
            .expect("fetch from the real master");
        conn.close();
        tokio::task::block_in_place(|| real.stop());
        assert_eq!(good.pos, 0);
        assert_eq!(
            good.data.len() as u64,
            good.master_end,
            "one batch holds the whole log"
        );
        assert_eq!(
            *record_starts(&segments(&real_dir)[0]).last().unwrap(),
            good.master_end,
            "the real master's log ends there"
        );
        assert!(
            log_prefix(&real_dir, good.master_end) == good.data,
            "the batch is the real master's log, byte for byte"
        );
        assert!(
            good.topics.is_some(),
            "the topic table comes with the first fetch"
        );

        let fake = Arc::new(FakeMaster::default());
        *fake.topics.lock().unwrap() = good.topics.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake_addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        tokio::spawn(txmq_remoting::server::serve(
            listener,
            Arc::new(FakeService(fake.clone())),
            ConnectionConfig::default(),
            stop.clone(),
        ));
        let slave_dir = dir.join("slave");
        let slave = tokio::task::block_in_place(|| {
            BrokerProcess::start(
                &slave_dir,
                ns,
                GROUP,
                &["--role", "slave", "--master-addr", &fake_addr],
            )
        });
        FakeGroup {
            good,
            sent,
            fake,
            fake_addr,
            stop,
            slave,
            slave_dir,
        }
    }

    /// Serves `data` at `pos` to the slave's next fetch.
    fn serve(&self, pos: u64, data: Vec<u8>) {
        self.fake.script.lock().unwrap().push_back(ReplicaData {
            epochs: Default::default(),
            confirmed: Default::default(),
            pos,
            master_end: pos + data.len() as u64,
            data: Bytes::from(data),
            topics: None,
        });
    }

    /// Serves the good batch and waits until the slave stores it and
    /// serves its messages.
    async fn store_good_batch(&self) {
        self.serve(0, self.good.data.to_vec());
        let good_len = self.good.data.len() as u64;
        common::wait_until(
            "the slave stores the good batch",
            Duration::from_secs(10),
            || async { common::replication(&self.slave.addr).await.log_end == good_len },
        )
        .await;
        let pulled = common::pull_all(&self.slave.addr, "rf", 1).await;
        let bodies: Vec<String> = pulled
            .iter()
            .map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
            .collect();
        assert_eq!(
            bodies, self.sent,
            "the slave serves the good batch's messages"
        );
        assert!(
            log_prefix(&self.slave_dir, good_len) == self.good.data,
            "stored byte for byte"
        );
    }
}

/// The first record of `data` with `change` applied and its checksum made
/// right again.
fn rewritten_first_record(data: &[u8], change: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let mut rec = data[..len].to_vec();
    change(&mut rec);
    let crc = crc32c(&rec[8..len]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    rec
}

/// A slave whose master sends bad batches writes nothing of them, says so,
/// keeps serving, and stores the good batch that comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_stores_nothing_of_a_bad_batch_and_keeps_serving() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let g = FakeGroup::start(&ns, tmp.path()).await;
    let (good, slave) = (&g.good, &g.slave);
    common::wait_until("the slave fetches", Duration::from_secs(10), || async {
        !g.fake.fetches.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        g.fake.fetches.lock().unwrap()[0],
        (0, None),
        "an empty slave fetches from 0"
    );

    // The first record's body (past its length and CRC) with one byte flipped.
    let mut flipped = good.data.to_vec();
    flipped[20] ^= 0x40;
    // The last record cut short.
    let truncated = good.data[..good.data.len() - 7].to_vec();
    // Garbage behind a plausible length.
    let mut garbage: Vec<u8> = (0..1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    garbage[..4].copy_from_slice(&200u32.to_le_bytes());
    let bad = [
        ("a flipped byte", 0, flipped, "fails its checksum"),
        ("a truncated record", 0, truncated, "is cut short"),
        ("garbage", 0, garbage, "fails its checksum"),
        (
            "data that does not continue the log",
            12_345,
            good.data.to_vec(),
            "does not continue this log at 0",
        ),
    ];
    for (i, (what, pos, data, says)) in bad.into_iter().enumerate() {
        g.serve(pos, data);
        common::wait_until(
            &format!("the slave logs {what}"),
            Duration::from_secs(10),
            || async { count(slave, BAD_BATCH) > i },
        )
        .await;
        let line = slave
            .log_text()
            .lines()
            .filter(|l| l.contains(BAD_BATCH))
            .nth(i)
            .unwrap_or_default()
            .to_string();
        assert!(
            line.contains(says),
            "{what}: the log line says {says:?}: {line}"
        );
        // Nothing stored, nothing given up, still serving.
        let info = common::replication(&slave.addr).await;
        assert_eq!(info.log_end, 0, "{what}: nothing of the batch is stored");
        assert_eq!(
            info.error, None,
            "{what}: a bad batch is retried, not fatal"
        );
        assert_eq!(info.master_addr.as_deref(), Some(g.fake_addr.as_str()));
        let conn = common::connect_as(&slave.addr, Role::Admin).await;
        conn.call(Ping {}).await.expect("the slave answers a ping");
        conn.close();
        assert!(
            common::pull_all(&slave.addr, "rf", 1).await.is_empty(),
            "{what}: nothing to pull"
        );
    }
    assert_eq!(count(slave, BAD_BATCH), 4, "one error line per bad batch");
    // The slave asked again from 0 after each (it holds nothing).
    assert!(g
        .fake
        .fetches
        .lock()
        .unwrap()
        .iter()
        .all(|f| *f == (0, None)));
    let first = g.slave_dir.join("commitlog").join(format!("{:020}", 0));
    if first.exists() {
        let bytes = std::fs::read(&first).unwrap();
        assert!(
            bytes.iter().all(|b| *b == 0),
            "no byte of a bad batch is in the segment"
        );
    }

    // The good batch is stored and served, and nothing else.
    g.store_good_batch().await;
    let good_len = good.data.len() as u64;
    let segment = std::fs::read(&first).unwrap();
    assert!(
        segment[good_len as usize..].iter().all(|b| *b == 0),
        "nothing but the good batch is in the segment"
    );
    // It goes on from the good batch's end, naming its last record.
    common::wait_until(
        "the slave fetches past the good batch",
        Duration::from_secs(10),
        || async {
            g.fake
                .fetches
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(from, last)| *from == good_len && last.is_some())
        },
    )
    .await;
    assert_eq!(common::replication(&slave.addr).await.error, None);
    drop(g);
    cluster.shutdown().await;
}

/// CRC32C (Castagnoli), bit by bit: enough for a test's few records.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Serves `bad`, a batch with good checksums that the slave must not store
/// either; asserts that it says why (`says`) and stores nothing, then that
/// the good batch is stored.
async fn refuses_then_stores_the_good_batch(g: &FakeGroup, bad: Vec<u8>, says: &str) {
    g.serve(0, bad);
    // It says so: a bad batch, or records it could not apply.
    common::wait_until(
        "the slave says what it made of the batch",
        Duration::from_secs(10),
        || async {
            let log = g.slave.log_text();
            log.contains(BAD_BATCH) || log.contains("cannot store replicated records")
        },
    )
    .await;
    let info = common::replication(&g.slave.addr).await;
    assert_eq!(
        info.log_end,
        0,
        "nothing of the batch is stored: {}",
        g.slave.log_text()
    );
    assert_eq!(info.error, None);
    let line = g
        .slave
        .log_text()
        .lines()
        .find(|l| l.contains(BAD_BATCH) || l.contains("cannot store replicated records"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains(says), "{line}");
    g.store_good_batch().await;
}

/// A batch whose records carry good checksums but do not decode (a field
/// length running past the record): the slave must not store it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_stores_nothing_of_a_batch_whose_records_do_not_decode() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let g = FakeGroup::start(&ns, tmp.path()).await;
    // The first record, its topic length (at byte 64) made to run past its end.
    let bad = rewritten_first_record(&g.good.data, |rec| {
        rec[64..66].copy_from_slice(&0x7fffu16.to_le_bytes());
    });
    refuses_then_stores_the_good_batch(&g, bad, "the record at 0 does not decode").await;
    drop(g);
    cluster.shutdown().await;
}

/// A batch whose first record opens a transaction group of two that the
/// next record does not continue: the slave must not store it either (good
/// checksums and records that decode are not enough: stored, its replay
/// would fail and poison the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_stores_nothing_of_a_batch_that_breaks_a_transaction_group() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let g = FakeGroup::start(&ns, tmp.path()).await;
    // The first message (flags at byte 10) made the first of a group of
    // two, then the other nine messages, which do not continue it.
    let first_len = u32::from_le_bytes(g.good.data[..4].try_into().unwrap()) as usize;
    let mut bad = rewritten_first_record(&g.good.data, |rec| {
        rec[10..12].copy_from_slice(&2u16.to_le_bytes());
    });
    bad.extend_from_slice(&g.good.data[first_len..]);
    refuses_then_stores_the_good_batch(&g, bad, "group").await;
    drop(g);
    cluster.shutdown().await;
}

/// A record (good checksum) for queue 4294967295, as a master's log could
/// hold it: the slave keeps it, as recovery does (the logs stay the same,
/// byte for byte), serves nothing of it (no overflow, no four billion
/// queues), and goes on replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_keeps_but_does_not_serve_a_record_for_an_impossible_queue() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let g = FakeGroup::start(&ns, tmp.path()).await;
    // The queue id is at byte 12.
    let bad = rewritten_first_record(&g.good.data, |rec| {
        rec[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    let first_len = bad.len();
    g.serve(0, bad.clone());
    common::wait_until(
        "the slave stores the record",
        Duration::from_secs(10),
        || async { common::replication(&g.slave.addr).await.log_end == first_len as u64 },
    )
    .await;
    // The rest of the real log follows it.
    g.serve(first_len as u64, g.good.data[first_len..].to_vec());
    let good_len = g.good.data.len() as u64;
    common::wait_until(
        "the slave stores the rest",
        Duration::from_secs(10),
        || async { common::replication(&g.slave.addr).await.log_end == good_len },
    )
    .await;
    let info = common::replication(&g.slave.addr).await;
    assert_eq!(info.error, None);
    let bodies: Vec<String> = common::pull_all(&g.slave.addr, "rf", 1)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
        .collect();
    assert_eq!(bodies, g.sent[1..], "every message but the impossible one");
    let mut want = bad;
    want.extend_from_slice(&g.good.data[first_len..]);
    assert!(
        log_prefix(&g.slave_dir, good_len) == want,
        "the slave's log is the master's, byte for byte"
    );
    let log = g.slave.log_text();
    assert!(log.contains("impossible queue"), "{log}");
    let conn = common::connect_as(&g.slave.addr, Role::Admin).await;
    conn.call(Ping {}).await.expect("the slave answers a ping");
    conn.close();
    drop(g);
    cluster.shutdown().await;
}

/// A master that answers the hello, then each fetch with bytes that are
/// not a frame the slave can decode (connection `n` even: garbage in a
/// well-framed body; odd: a frame with the fetch's id whose body is not the
/// answer's type).
async fn garbage_master(listener: TcpListener, connections: Arc<Mutex<usize>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let n = {
            let mut c = connections.lock().unwrap();
            *c += 1;
            *c
        };
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut codec = FrameCodec::default();
            loop {
                let frame = loop {
                    if let Ok(Some(Decoded::Frame(f))) = codec.decode(&mut buf) {
                        break f;
                    }
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                };
                let answer = match frame {
                    Frame::Request(id, Request::Hello(_)) => encode(&Frame::Response(
                        id,
                        Ok(Response::Hello(txmq_protocol::HelloOk {
                            version: PROTOCOL_VERSION,
                            server: GROUP.into(),
                            challenge: None,
                        })),
                    )),
                    Frame::Request(_, Request::ReplicaFetch(_)) if n % 2 == 0 => {
                        framed(b"\xc1\xc1\xc1 not a frame")
                    }
                    Frame::Request(id, Request::ReplicaFetch(_)) => {
                        let body = rmp_serde::to_vec(
                            &json!({"Response": [id, {"Ok": {"ReplicaFetch": {"pos": "zero"}}}]}),
                        )
                        .unwrap();
                        framed(&body)
                    }
                    _ => continue,
                };
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A master that speaks garbage on the wire: the slave drops the
/// connection, stores nothing, keeps serving, and tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_survives_a_master_that_sends_undecodable_frames() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(Mutex::new(0));
    let fake = tokio::spawn(garbage_master(listener, connections.clone()));
    let slave = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("slave"),
            &ns,
            GROUP,
            &["--role", "slave", "--master-addr", &fake_addr],
        )
    });
    common::wait_until(
        "the slave reconnected after both kinds of garbage",
        Duration::from_secs(15),
        || async { *connections.lock().unwrap() >= 3 },
    )
    .await;
    let info = common::replication(&slave.addr).await;
    assert_eq!(info.log_end, 0, "nothing stored");
    assert_eq!(
        info.error, None,
        "garbage on the wire is retried, not fatal"
    );
    let conn = common::connect_as(&slave.addr, Role::Admin).await;
    conn.call(Ping {}).await.expect("the slave answers a ping");
    conn.close();
    assert!(
        slave
            .log_text()
            .contains("replication interrupted; retrying"),
        "{}",
        slave.log_text()
    );
    let log = slave.log_text();
    assert!(log.contains("bad frame; closing connection"), "{log}");
    assert!(log.contains("malformed response"), "{log}");
    drop(slave);
    fake.abort();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Power cuts

/// Sends `{prefix}-{i}` until `stop`, concurrently with the test; returns
/// the bodies answered `SEND_OK`.
fn load(
    p: txmq::Producer,
    topic: &'static str,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut ok = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let body = format!("{prefix}-{i}");
            i += 1;
            if let Ok(r) = p.send(Message::new(topic, body.clone())).await {
                if r.status == SendStatus::SendOk {
                    ok.push(body);
                }
            }
        }
        p.close().await.unwrap();
        ok
    })
}

/// Four producers sending `{prefix}{a..d}-{i}` for `run`, then `cut`
/// (while they go on sending), then stop; returns the bodies answered
/// `SEND_OK`.
async fn under_load(ns: &str, prefix: &str, run: Duration, cut: impl FnOnce()) -> Vec<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for p in ["a", "b", "c", "d"] {
        loads.push(load(
            producer(ns).await,
            "pc",
            format!("{prefix}{p}"),
            stop.clone(),
        ));
    }
    tokio::time::sleep(run).await;
    tokio::task::block_in_place(cut);
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for l in loads {
        acked.extend(l.await.unwrap());
    }
    assert!(
        acked.len() > 20,
        "the load got going: {} SEND_OK",
        acked.len()
    );
    acked
}

/// Sends until one send is `SEND_OK` (the group may need a moment to be in
/// sync again after a restart); returns its body.
async fn send_until_ok(p: &txmq::Producer, topic: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match p.send(Message::new(topic, body.to_string())).await {
            Ok(r) if r.status == SendStatus::SendOk => return,
            other => assert!(Instant::now() < deadline, "{body} never SEND_OK: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_holds(place: &str, got: &HashSet<String>, wanted: &[String]) {
    let lost: Vec<&String> = wanted.iter().filter(|b| !got.contains(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} SEND_OK messages missing on {place}, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// A power cut on a master under `--flush sync --replication sync`: every
/// `SEND_OK` message survives on it, and its slave (never ahead of what the
/// master fsynced) goes on replicating without diverging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_on_the_master_loses_nothing_and_the_slave_goes_on() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let master_dir = tmp.path().join("master");
    std::fs::create_dir_all(&master_dir).unwrap();
    let fs = LazyFs::mount(&master_dir).expect("mount the lazy filesystem");
    let mut master = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &master_dir,
            &ns,
            GROUP,
            &[
                "--flush",
                "sync",
                "--replication",
                "sync",
                "--min-insync-replicas",
                "2",
                "--replication-timeout",
                "1s",
            ],
        )
    });
    wait_for_broker(&ns, GROUP).await;
    let slave_dir = tmp.path().join("slave");
    let slave = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &slave_dir,
            &ns,
            GROUP,
            &["--role", "slave", "--master-addr", &master.addr],
        )
    });
    create_topic(&ns, &master.addr, "pc").await;
    wait_in_sync(&master.addr).await;

    // Cut the power three times under load: each time every SEND_OK
    // message is on the master after recovery, and the slave goes on
    // replicating without diverging.
    let mut acked = Vec::new();
    for round in 0..3u64 {
        acked.extend(
            under_load(
                &ns,
                &format!("r{round}"),
                Duration::from_millis(1000),
                || {
                    master.kill9();
                    let report = fs.power_cut(Some(round)).expect("power cut");
                    eprintln!("round {round}: power cut: {report:?}");
                },
            )
            .await,
        );
        tokio::task::block_in_place(|| master.restart());
        let on_master = body_set(&common::pull_all(&master.addr, "pc", 1).await);
        assert_holds("the master after the power cut", &on_master, &acked);

        // New sends are SEND_OK: the slave is back in sync.
        let p = producer(&ns).await;
        let after = format!("after-cut-{round}");
        send_until_ok(&p, "pc", &after).await;
        acked.push(after);
        acked.extend(send_ok(&p, "pc", &format!("later-{round}"), 5).await);
        p.close().await.unwrap();
        wait_caught_up(&master.addr, &slave.addr, Duration::from_secs(20)).await;
        let s = common::replication(&slave.addr).await;
        assert_eq!(s.error, None, "the slave did not diverge");
        assert!(
            !slave.log_text().contains("replication stopped"),
            "{}",
            slave.log_text()
        );
        let on_slave = body_set(&common::pull_all(&slave.addr, "pc", 1).await);
        assert_holds("the slave", &on_slave, &acked);
        assert_same_log(&master_dir, &slave_dir);
    }
    drop(slave);
    drop(master);
    drop(fs);
    cluster.shutdown().await;
}

/// A power cut on a slave under `--flush sync`: it recovers at least what it
/// acknowledged, resumes from its end, catches up, and holds every `SEND_OK`
/// message, its log byte-identical to the master's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_on_a_slave_keeps_what_it_acknowledged() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let master_dir = tmp.path().join("master");
    let slave_dir = tmp.path().join("slave");
    std::fs::create_dir_all(&slave_dir).unwrap();
    let fs = LazyFs::mount(&slave_dir).expect("mount the lazy filesystem");
    let master = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &master_dir,
            &ns,
            GROUP,
            &[
                "--replication",
                "sync",
                "--min-insync-replicas",
                "2",
                "--replication-timeout",
                "1s",
            ],
        )
    });
    wait_for_broker(&ns, GROUP).await;
    let mut slave = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &slave_dir,
            &ns,
            GROUP,
            &[
                "--role",
                "slave",
                "--master-addr",
                &master.addr,
                "--flush",
                "sync",
            ],
        )
    });
    create_topic(&ns, &master.addr, "pc").await;
    wait_in_sync(&master.addr).await;

    // What the slave acknowledged (fsynced) just before the cut.
    let mut acked_before = 0;
    let acked = under_load(&ns, "b", Duration::from_millis(1500), || {
        let info = tokio::runtime::Handle::current().block_on(common::replication(&master.addr));
        acked_before = info
            .replicas
            .iter()
            .find(|r| r.addr == slave.addr)
            .unwrap_or_else(|| panic!("the master lists its slave: {info:?}"))
            .acked;
        slave.kill9();
        let report = fs.power_cut(Some(29)).expect("power cut");
        eprintln!("power cut: {report:?}");
    })
    .await;
    eprintln!("{} SEND_OK before and during the cut", acked.len());

    // With the master paused, the restarted slave shows what it recovered:
    // at least what it had acknowledged.
    master.signal("STOP");
    tokio::task::block_in_place(|| slave.restart());
    let recovered = common::replication(&slave.addr).await.log_end;
    master.signal("CONT");
    assert!(
        recovered >= acked_before,
        "the slave recovered its log to {recovered}, below the {acked_before} it acknowledged"
    );

    let end = wait_caught_up(&master.addr, &slave.addr, Duration::from_secs(20)).await;
    assert!(end >= recovered);
    // It resumed from its own end (not from the start).
    let resumed = format!(
        "replicating from the master master={} from={recovered}",
        master.addr
    );
    assert!(slave.log_text().contains(&resumed), "{}", slave.log_text());
    let s = common::replication(&slave.addr).await;
    assert_eq!(s.error, None, "the slave did not diverge");
    let on_slave = body_set(&common::pull_all(&slave.addr, "pc", 1).await);
    assert_holds("the slave after its power cut", &on_slave, &acked);
    assert_same_log(&master_dir, &slave_dir);
    // And it acknowledges new writes again.
    let p = producer(&ns).await;
    send_until_ok(&p, "pc", "after-the-cut").await;
    p.close().await.unwrap();
    drop(slave);
    drop(master);
    drop(fs);
    cluster.shutdown().await;
}
