//! Helpers shared by the integration test files (each includes this module
//! with `mod common;`): starting a broker process and waiting for what the
//! nameserver then says, running the `txmq` CLI, a random pause for kills,
//! and reading a broker's commit log from outside.

// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use txmq_tests::{txmq_cli, wait_for_broker, BrokerProcess};

/// Starts a `txmq-broker` process named `name` on `data` and waits until
/// the nameserver knows it.
pub async fn start_broker(data: &Path, ns: &str, name: &str, extra: &[&str]) -> BrokerProcess {
    let broker = tokio::task::block_in_place(|| BrokerProcess::start(data, ns, name, extra));
    wait_for_broker(ns, name).await;
    broker
}

/// Creates `topic` with `queues` queues on the cluster's one broker,
/// `broker-a`, and waits until the nameserver routes it there.
pub async fn create_topic(ns: &str, topic: &str, queues: u32) {
    let admin = txmq::Admin::connect([ns]).await.expect("admin connects");
    admin
        .create_topic(topic, queues, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap_or_else(|e| panic!("create {topic}: {e}"));
    admin.close().await.unwrap();
    wait_for_route(ns, topic, &["broker-a"]).await;
}

/// Waits (up to 10 s) until the nameserver routes `topic` to exactly
/// `brokers`. Creating a topic returns before the broker's re-registration
/// reaches the nameserver (see `cli.rs`,
/// `a_created_topic_is_routable_as_soon_as_create_returns`), and a restarted
/// broker registers again.
pub async fn wait_for_route(ns: &str, topic: &str, brokers: &[&str]) {
    let admin = txmq::Admin::connect([ns]).await.expect("admin connects");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(route) = admin.route(topic).await {
            let names: Vec<&str> = route
                .brokers
                .iter()
                .map(|b| b.broker_name.as_str())
                .collect();
            if names == brokers {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{topic} never routed to {brokers:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admin.close().await.unwrap();
}

/// Waits (up to 10 s) until the nameserver routes `topic` with permission
/// `perm` on every broker: a topic's permission changed by `topic create`
/// reaches the nameserver with the broker's next registration.
pub async fn wait_for_perm(ns: &str, topic: &str, perm: u8) {
    let admin = txmq::Admin::connect([ns]).await.expect("admin connects");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(route) = admin.route(topic).await {
            if !route.brokers.is_empty() && route.brokers.iter().all(|b| b.perm == perm) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{topic} never routed with permission {perm}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admin.close().await.unwrap();
}

/// Runs `txmq --nameserver NS ARGS` off the runtime's worker threads (the
/// in-process cluster needs them meanwhile).
pub async fn txmq(ns: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let ns = ns.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        txmq_cli(&ns, &args, stdin.as_deref())
    })
    .await
    .expect("txmq runs")
}

/// A message's body as text.
pub fn body_text(m: &txmq::ReceivedMessage) -> String {
    String::from_utf8(m.body().to_vec()).expect("UTF-8 body")
}

/// A pseudo-random duration in `[lo, hi)`, from the clock and the pid (the
/// tests do not need a random-number crate for one draw per kill).
pub fn jitter(lo: Duration, hi: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64: spreads the clock's low bits over the whole word.
    let mut x = nanos ^ u64::from(std::process::id()).rotate_left(32);
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let span = (hi - lo).as_millis().max(1) as u64;
    lo + Duration::from_millis(x % span)
}

/// The segment files of the commit log in `data`, oldest first (their
/// names are their 20-digit start positions).
pub fn segments(data: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data.join("commitlog"))
        .expect("commitlog dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 20 && n.parse::<u64>().is_ok())
        })
        .collect();
    segments.sort();
    segments
}

/// Where each record of `segment` starts (walking the length prefixes from
/// the segment's start up to a zero length), and where the last one ends.
/// Segments are sparse files of a fixed size, so the file size says nothing.
pub fn record_starts(segment: &Path) -> Vec<u64> {
    let bytes = std::fs::read(segment).expect("read segment");
    let mut starts = vec![0u64];
    let mut pos = 0usize;
    while pos + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        assert!(
            pos + len <= bytes.len(),
            "record at {pos} runs past the segment"
        );
        pos += len;
        starts.push(pos as u64);
    }
    starts
}

/// The pending and parked transactions of every broker.
pub async fn pending(admin: &txmq::Admin) -> Vec<txmq::TxInfo> {
    admin
        .list_transactions(None)
        .await
        .expect("list transactions")
        .into_iter()
        .flat_map(|l| l.transactions)
        .collect()
}

/// Polls the transaction list (every 20 ms, up to `limit`) until `done`
/// holds for it; returns that list.
pub async fn wait_for_list(
    admin: &txmq::Admin,
    limit: Duration,
    what: &str,
    done: impl Fn(&[txmq::TxInfo]) -> bool,
) -> Vec<txmq::TxInfo> {
    let deadline = Instant::now() + limit;
    loop {
        let list = pending(admin).await;
        if done(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; transactions now: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection to the broker at `addr` that says hello as `role` (a
/// test's raw requests: pulls from a slave, replication state, bad input).
///
/// # Errors
/// The connection's.
pub async fn try_connect_as(
    addr: &str,
    role: txmq_protocol::Role,
) -> Result<txmq_remoting::Connection, txmq_remoting::Error> {
    let config = txmq_remoting::ConnectionConfig {
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    txmq_remoting::Connection::connect(addr, hello(role), None, config).await
}

/// A test's hello as `role`.
pub fn hello(role: txmq_protocol::Role) -> txmq_protocol::Hello {
    txmq_protocol::Hello {
        version: txmq_protocol::PROTOCOL_VERSION,
        role,
        client_id: "txmq-tests".into(),
        group: None,
    }
}

/// [`try_connect_as`], panicking when the broker cannot be reached.
pub async fn connect_as(addr: &str, role: txmq_protocol::Role) -> txmq_remoting::Connection {
    try_connect_as(addr, role)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A broker's replication state (`GetReplication`), over a connection of its own.
pub async fn replication(addr: &str) -> txmq_protocol::ReplicationInfo {
    let conn = connect_as(addr, txmq_protocol::Role::Admin).await;
    let info = conn
        .call(txmq_protocol::GetReplication {})
        .await
        .unwrap_or_else(|e| panic!("GetReplication at {addr}: {e}"));
    conn.close();
    info
}

/// Every message of queues `0..queues` of `topic` stored at `addr` (a
/// master or a slave), queue by queue in offset order, with plain pulls.
pub async fn pull_all(addr: &str, topic: &str, queues: u32) -> Vec<txmq_protocol::StoredMessage> {
    let conn = connect_as(addr, txmq_protocol::Role::Consumer).await;
    let mut all = Vec::new();
    for queue in 0..queues {
        all.extend(pull_range(&conn, topic, queue, 0, u64::MAX).await);
    }
    conn.close();
    all
}

/// The messages of one queue from `from` up to `to` or the queue's end.
pub async fn pull_range(
    conn: &txmq_remoting::Connection,
    topic: &str,
    queue: u32,
    from: u64,
    to: u64,
) -> Vec<txmq_protocol::StoredMessage> {
    let mut got = Vec::new();
    let mut offset = from;
    while offset < to {
        let r = conn
            .call(txmq_protocol::PullRequest {
                topic: topic.into(),
                queue,
                offset,
                max_messages: 256,
                max_wait_ms: 0,
                tag_filter: Vec::new(),
                owner: None,
                epoch: 0,
                after: None,
                browse: false,
            })
            .await
            .unwrap_or_else(|e| panic!("pull {topic}/{queue}@{offset}: {e}"));
        got.extend(r.messages.into_iter().filter(|m| m.queue_offset < to));
        if r.next_offset <= offset || r.next_offset >= r.max_offset {
            break;
        }
        offset = r.next_offset;
    }
    got
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
