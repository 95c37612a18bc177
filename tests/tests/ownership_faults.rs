//! Queue ownership under faults: after a broker restart or a cut
//! connection, no queue is handled by two members of a group at once
//! (concurrent and orderly push consumers), every message is still
//! consumed, a long poll does not answer with messages once its queue
//! moved, and, driven through the wire protocol, what the broker assigns
//! and refuses meanwhile.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_topic, start_broker, wait_for_route};
use txmq::{handler_fn, ConsumeResult, ErrorCode, Message, PushConsumer, ReceivedMessage};
use txmq_protocol::{
    CommitOffset, Heartbeat, HeartbeatOk, Hello, PullRequest, QueueOwner, QueueRef, Role,
    Subscription, PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig};
use txmq_tests::proxy::Proxy;
use txmq_tests::Cluster;

const GROUP: &str = "owners";

/// What the members' handlers did: who is inside a handler of each queue
/// right now, every time two members were inside handlers of one queue at
/// once, which members handled each stored message to the end, and the
/// bodies handled (a send retried after a cut may store a body twice).
#[derive(Default)]
struct Probe {
    /// (topic, queue) -> member -> handlers running.
    inside: HashMap<(String, u32), HashMap<String, usize>>,
    overlaps: Vec<String>,
    /// (queue, offset) -> the members that handled it.
    handled: BTreeMap<(u32, u64), BTreeSet<String>>,
    bodies: BTreeSet<String>,
}

type Shared = Arc<Mutex<Probe>>;

/// Leaves the queue's handler count when the handler ends, also when the
/// worker drops the handler's future half-way.
struct Inside {
    probe: Shared,
    queue: (String, u32),
    member: String,
}

impl Drop for Inside {
    fn drop(&mut self) {
        let mut p = self.probe.lock().unwrap();
        if let Some(n) = p
            .inside
            .get_mut(&self.queue)
            .and_then(|m| m.get_mut(&self.member))
        {
            *n -= 1;
        }
    }
}

fn enter(probe: &Shared, m: &ReceivedMessage, member: &str) -> Inside {
    // The queue it was read from: a retry's is its group's retry topic's.
    let queue = (m.queue_topic().to_string(), m.queue());
    let mut p = probe.lock().unwrap();
    let here = p.inside.entry(queue.clone()).or_default();
    let others: Vec<String> = here
        .iter()
        .filter(|(id, n)| *id != member && **n > 0)
        .map(|(id, _)| id.clone())
        .collect();
    *here.entry(member.to_string()).or_default() += 1;
    if !others.is_empty() {
        let what = format!(
            "queue {} of '{}': {member} handles offset {} while {others:?} handle the queue too",
            queue.1,
            queue.0,
            m.queue_offset()
        );
        p.overlaps.push(what);
    }
    Inside {
        probe: probe.clone(),
        queue,
        member: member.to_string(),
    }
}

/// A member of [`GROUP`] on `topic` whose handler takes `work` per message.
async fn member(
    ns: &str,
    name: &str,
    topic: &str,
    orderly: bool,
    work: Duration,
    probe: &Shared,
) -> PushConsumer {
    let probe = probe.clone();
    let me = name.to_string();
    PushConsumer::builder()
        .nameserver(ns)
        .group(GROUP)
        .client_id(name)
        .subscribe(topic, "*")
        .orderly(orderly)
        .concurrency(256)
        .rebalance_interval(Duration::from_millis(300))
        // Long enough that a member keeps handling what it pulled for a
        // while after the fault, as a real one with a backlog does.
        .commit_interval(Duration::from_secs(1))
        .max_wait(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(300))
        .request_timeout(Duration::from_secs(2))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let inside = enter(&probe, m, &me);
            let body = String::from_utf8_lossy(m.body()).into_owned();
            let at = (m.queue(), m.queue_offset());
            async move {
                tokio::time::sleep(work).await;
                let member = inside.member.clone();
                let mut p = inside.probe.lock().unwrap();
                p.handled.entry(at).or_default().insert(member);
                p.bodies.insert(body);
                drop(p);
                drop(inside);
                ConsumeResult::Success
            }
        }))
        .await
        .expect("consumer starts")
}

/// How the scenario runs: how long a handler takes, how many messages
/// are sent, and how far apart.
///
/// Orderly: handlers slower than messages arrive on a queue, so each
/// member has a backlog when the fault hits. Concurrently: handlers long
/// enough that each member has some in flight through the fault (far from
/// its concurrency, so a member taking a queue over starts on it at once),
/// and messages sparse enough that a member's long poll of a queue is not
/// answered at once (it would then learn it lost the queue at once).
struct Pace {
    work: Duration,
    total: u32,
    every: Duration,
}

fn pace(orderly: bool) -> Pace {
    pace_of(orderly, false)
}

/// The pace of the cut scenario. Concurrently: short handlers and dense
/// messages; a cut member reconnects while its long polls are answered
/// at once, and the first member to heartbeat again starts on the other's
/// queues while that one still has handlers in flight.
fn pace_of(orderly: bool, cut: bool) -> Pace {
    if cut && !orderly {
        return Pace {
            work: Duration::from_millis(30),
            total: 500,
            every: Duration::from_millis(5),
        };
    }
    if orderly {
        Pace {
            work: Duration::from_millis(60),
            total: 500,
            every: Duration::from_millis(5),
        }
    } else {
        Pace {
            work: Duration::from_secs(1),
            total: 150,
            every: Duration::from_millis(40),
        }
    }
}

/// Sends `total` messages to `topic`, one every `every`, each until it is
/// acknowledged (the broker may be restarting): a steady stream, so that
/// neither member is saturated and each has handlers in flight when the
/// fault hits.
fn steady(
    producer: txmq::Producer,
    topic: &str,
    total: u32,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_string();
    tokio::spawn(async move {
        for i in 0..total {
            while producer
                .send(Message::new(&topic, format!("m{i}")))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(every).await;
        }
        producer.close().await.unwrap();
    })
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a good part of the stream was handled and both members
/// are inside handlers: the fault then hits members busy with their queues.
async fn both_busy(probe: &Shared, total: u32) {
    wait_until("both members handling", Duration::from_secs(20), || {
        let p = probe.lock().unwrap();
        let busy: BTreeSet<&String> = p
            .inside
            .values()
            .flat_map(|m| m.iter().filter(|(_, n)| **n > 0).map(|(id, _)| id))
            .collect();
        busy.len() == 2 && p.bodies.len() as u32 >= total / 5
    })
    .await;
}

/// Both members go on; every message arrives, no queue was ever handled
/// by both at once, and no stored message was handled by both (neither
/// lost its place: nothing is repeated).
async fn check(probe: &Shared, total: u32, what: &str) {
    wait_until(
        &format!("every message consumed ({what})"),
        Duration::from_secs(60),
        || probe.lock().unwrap().bodies.len() == total as usize,
    )
    .await;
    let p = probe.lock().unwrap();
    let twice: Vec<(&(u32, u64), &BTreeSet<String>)> =
        p.handled.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(
        p.overlaps.is_empty() && twice.is_empty(),
        "{what}: {} times two members handled one queue at once, e.g. {:?}; \
         {} messages handled by both members, e.g. {:?}",
        p.overlaps.len(),
        &p.overlaps[..p.overlaps.len().min(3)],
        twice.len(),
        &twice[..twice.len().min(3)]
    );
}

async fn restart_scenario(orderly: bool) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--consumer-expiry", "3s"]).await;
    let topic = if orderly { "restart-o" } else { "restart-c" };
    create_topic(&ns, topic, 4).await;
    let probe = Shared::default();
    let pace = pace(orderly);
    let a = member(&ns, "member-a", topic, orderly, pace.work, &probe).await;
    let b = member(&ns, "member-b", topic, orderly, pace.work, &probe).await;
    let sending = steady(cluster.producer().await, topic, pace.total, pace.every);
    both_busy(&probe, pace.total).await;
    // kill -9 and start again, twice, while both members handle messages.
    for _ in 0..2 {
        tokio::task::block_in_place(|| broker.restart());
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    sending.await.expect("sender");
    check(
        &probe,
        pace.total,
        if orderly {
            "orderly, broker restart"
        } else {
            "concurrent, broker restart"
        },
    )
    .await;
    a.shutdown().await.expect("final commits");
    b.shutdown().await.expect("final commits");
    cluster.shutdown().await;
}

/// A broker restart empties its owner table while both members go on
/// handling what they pulled: the first member to heartbeat again must
/// not take the other's queues meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_no_queue_is_handled_by_two_members() {
    restart_scenario(false).await;
}

/// The same for orderly consumers: one queue is never handled in two
/// places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_no_ordered_queue_is_handled_in_two_places() {
    restart_scenario(true).await;
}

async fn cut_scenario(orderly: bool) {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let proxy = Proxy::bind().await.expect("proxy binds");
    let via = proxy.addr().to_string();
    let addr = cluster
        .add_broker("broker-a", |c| {
            c.advertise_addr = Some(via.clone());
            c.consumer_expiry = Duration::from_secs(3);
        })
        .await;
    let addr = addr.to_string();
    proxy.set_target(&addr);
    let ns = cluster.nameserver.clone();
    let topic = if orderly { "cut-o" } else { "cut-c" };
    create_topic(&ns, topic, 4).await;
    let probe = Shared::default();
    let pace = pace_of(orderly, true);
    let a = member(&ns, "member-a", topic, orderly, pace.work, &probe).await;
    let b = member(&ns, "member-b", topic, orderly, pace.work, &probe).await;
    let sending = steady(cluster.producer().await, topic, pace.total, pace.every);
    both_busy(&probe, pace.total).await;
    // Which member heartbeats first after a cut, and how far ahead, is
    // up to timing: cut a few times.
    for _ in 0..4 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    sending.await.expect("sender");
    check(
        &probe,
        pace.total,
        if orderly {
            "orderly, connections cut"
        } else {
            "concurrent, connections cut"
        },
    )
    .await;
    a.shutdown().await.expect("final commits");
    b.shutdown().await.expect("final commits");
    cluster.shutdown().await;
}

/// Cutting the members' connections makes the broker forget them: the
/// first to heartbeat again must not take the other's queues while the
/// other still handles them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_connection_cut_no_queue_is_handled_by_two_members() {
    cut_scenario(false).await;
}

/// The same for orderly consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_connection_cut_no_ordered_queue_is_handled_in_two_places() {
    cut_scenario(true).await;
}

// ---- The broker's side, driven through the wire protocol ----

async fn connect(addr: &str, id: &str) -> Connection {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Consumer,
        client_id: id.into(),
        group: Some(GROUP.into()),
    };
    Connection::connect(addr, hello, None, ConnectionConfig::default())
        .await
        .expect("connects")
}

/// A heartbeat of member `id` holding `held` queues of `topic`; returns
/// the queues assigned.
async fn beat(conn: &Connection, id: &str, topic: &str, held: &[u32]) -> Vec<u32> {
    let ok: HeartbeatOk = conn
        .call(Heartbeat {
            group: GROUP.into(),
            client_id: id.into(),
            subscriptions: vec![Subscription {
                topic: topic.into(),
                expression: "*".into(),
            }],
            broadcast: false,
            held: held
                .iter()
                .map(|&queue| QueueRef {
                    topic: topic.into(),
                    queue,
                })
                .collect(),
        })
        .await
        .expect("heartbeat");
    let mut queues: Vec<u32> = ok.assigned.into_iter().map(|q| q.queue).collect();
    queues.sort_unstable();
    queues
}

fn pull(id: &str, topic: &str, queue: u32, offset: u64, wait: Duration) -> PullRequest {
    PullRequest {
        topic: topic.into(),
        queue,
        offset,
        max_messages: 32,
        max_wait_ms: wait.as_millis() as u64,
        tag_filter: Vec::new(),
        owner: Some(QueueOwner {
            group: GROUP.into(),
            client_id: id.into(),
        }),
        epoch: 0,
        after: None,
        browse: false,
    }
}

fn code(e: &txmq_remoting::Error) -> Option<ErrorCode> {
    e.remote().map(|w| w.code)
}

/// After a restart the broker does not know who reads what: for one
/// consumer expiry, a queue the group has read here goes only to a member
/// that says it holds it; a member that has not heartbeated since is
/// refused owner-tagged pulls (retriably, not as "not owner"); once the
/// expiry has passed, the rest is assigned as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_queues_wait_one_expiry_for_the_members_that_hold_them() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--consumer-expiry", "2s"]).await;
    create_topic(&ns, "held", 2).await;
    let conn = connect(&broker.addr, "a").await;
    assert_eq!(beat(&conn, "a", "held", &[]).await, [0, 1]);
    for queue in 0..2 {
        conn.call(CommitOffset {
            group: GROUP.into(),
            topic: "held".into(),
            queue,
            offset: 0,
            owner: Some(QueueOwner {
                group: GROUP.into(),
                client_id: "a".into(),
            }),
            forward_only: false,
            topic_generation: None,
        })
        .await
        .expect("the owner commits");
    }
    conn.close();

    // Taken before the restart: the broker's grace starts when it does,
    // some time before `restart` returns, so a clock started after it
    // could see the queue given away a little before 2 s on it.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| broker.restart());
    wait_for_route(&ns, "held", &["broker-a"]).await;
    // Before any member heartbeats, `group show` says the queues wait.
    let waiting = group_show_waiting(&ns).await;
    assert!(
        waiting.len() == 2
            && waiting
                .iter()
                .all(|(_, owner, ms)| owner.is_none() && ms.is_some()),
        "{waiting:?}"
    );
    // "b" heartbeats first: "a" may still be handling both queues.
    let b = connect(&broker.addr, "b").await;
    assert_eq!(
        beat(&b, "b", "held", &[]).await,
        Vec::<u32>::new(),
        "a member that holds nothing gets no queue another may still read"
    );
    // `group show` says the queues wait for their reader, and how long.
    let waiting = group_show_waiting(&ns).await;
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    for (queue, owner, ms) in &waiting {
        assert_eq!(owner, &None, "queue {queue}");
        assert!(
            ms.is_some_and(|ms| ms > 0 && ms <= 2_000),
            "queue {queue} waits at most the expiry: {ms:?}"
        );
    }
    let text = common::txmq(&ns, &["group", "show", GROUP], None).await;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("- (waits ") && text.contains("--consumer-expiry"),
        "{text}"
    );
    // "a" pulls before it heartbeats: refused, and not as "not owner"
    // (which would make it give up the queue it still reads).
    let a = connect(&broker.addr, "a").await;
    let e = a
        .call(pull("a", "held", 0, 0, Duration::ZERO))
        .await
        .expect_err("an owner-tagged pull before any heartbeat");
    assert_eq!(code(&e), Some(ErrorCode::HeartbeatRequired), "{e}");
    // "a" heartbeats, still reading queue 0 (it gave queue 1 up meanwhile).
    assert_eq!(beat(&a, "a", "held", &[0]).await, [0]);
    a.call(pull("a", "held", 0, 0, Duration::ZERO))
        .await
        .expect("the holder pulls");
    assert_eq!(
        beat(&b, "b", "held", &[]).await,
        Vec::<u32>::new(),
        "queue 1 waits for its holder until one expiry after the start"
    );
    let waiting = group_show_waiting(&ns).await;
    assert_eq!(waiting[0].1.as_deref(), Some("a"), "{waiting:?}");
    assert_eq!(waiting[0].2, None, "an owned queue does not wait");
    assert!(waiting[1].2.is_some(), "{waiting:?}");
    // After the expiry, queue 1 is assigned as usual.
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "queue 1 never assigned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        beat(&a, "a", "held", &[0]).await;
        got = beat(&b, "b", "held", &[]).await;
    }
    assert!(
        restarted.elapsed() >= Duration::from_secs(2),
        "queue 1 was given away within the expiry"
    );
    assert_eq!(got, [1]);
    a.close();
    b.close();
    cluster.shutdown().await;
}

/// Each queue of `group show GROUP --output json`: its number, owner and
/// `waiting_ms`, by queue.
async fn group_show_waiting(ns: &str) -> Vec<(u64, Option<String>, Option<u64>)> {
    let out = common::txmq(ns, &["--output", "json", "group", "show", GROUP], None).await;
    assert!(out.status.success(), "{out:?}");
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let mut queues: Vec<_> = state["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| {
            (
                q["queue"].as_u64().expect("queue"),
                q["owner"].as_str().map(str::to_string),
                q["waiting_ms"].as_u64(),
            )
        })
        .collect();
    queues.sort();
    queues
}

/// A member whose connection closed may still be handling its queues: they
/// wait one consumer expiry for it. If it comes back and says it holds
/// them it keeps them; what it does not hold, or all of it when it does
/// not come back, goes to the others after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_members_queues_wait_one_expiry_for_it() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster
        .add_broker("broker-a", |c| c.consumer_expiry = Duration::from_secs(2))
        .await
        .to_string();
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "blip", 2).await;
    let a1 = connect(&addr, "a").await;
    assert_eq!(beat(&a1, "a", "blip", &[]).await, [0, 1]);
    let b = connect(&addr, "b").await;
    assert_eq!(
        beat(&b, "b", "blip", &[]).await,
        Vec::<u32>::new(),
        "a holds both"
    );

    // a's connection blips.
    a1.close();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        beat(&b, "b", "blip", &[]).await,
        Vec::<u32>::new(),
        "a may still handle its queues"
    );
    let a2 = connect(&addr, "a").await;
    let e = a2
        .call(pull("a", "blip", 0, 0, Duration::ZERO))
        .await
        .expect_err("an owner-tagged pull before a heartbeat on the new connection");
    assert_eq!(code(&e), Some(ErrorCode::HeartbeatRequired), "{e}");
    // a comes back holding both; with b a member now, queue 1 is b's
    // share: a keeps reading it until it lets go.
    assert_eq!(beat(&a2, "a", "blip", &[0, 1]).await, [0]);
    a2.call(pull("a", "blip", 1, 0, Duration::ZERO))
        .await
        .expect("a still reads queue 1 until it lets go");
    assert_eq!(beat(&b, "b", "blip", &[]).await, Vec::<u32>::new());
    assert_eq!(beat(&a2, "a", "blip", &[0]).await, [0]);
    assert_eq!(beat(&b, "b", "blip", &[]).await, [1], "a let go of queue 1");

    // a's connection closes for good: its queue 0 waits one expiry, then
    // goes to b.
    a2.close();
    let closed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(beat(&b, "b", "blip", &[1]).await, [1]);
    let mut got = vec![1];
    while got == [1] {
        assert!(
            closed.elapsed() < Duration::from_secs(15),
            "queue 0 never moved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = beat(&b, "b", "blip", &[1]).await;
    }
    assert!(
        closed.elapsed() >= Duration::from_secs(2),
        "queue 0 moved within the expiry"
    );
    assert_eq!(got, [0, 1]);
    b.close();
    cluster.shutdown().await;
}

/// A long poll that began while its member owned the queue does not answer
/// with messages after the queue moved to another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_does_not_return_messages_after_its_queue_moved() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster
        .add_broker("broker-a", |c| {
            c.consumer_expiry = Duration::from_millis(800)
        })
        .await
        .to_string();
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "poll", 1).await;
    let a = connect(&addr, "a").await;
    assert_eq!(beat(&a, "a", "poll", &[]).await, [0]);
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move {
            a.call_with_timeout(
                pull("a", "poll", 0, 0, Duration::from_secs(20)),
                Duration::from_secs(25),
            )
            .await
        })
    };
    // "a" stops heartbeating (its heartbeats are stuck, say) and expires;
    // "b" gets the queue.
    let b = connect(&addr, "b").await;
    let started = Instant::now();
    while beat(&b, "b", "poll", &[]).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!waiting.is_finished(), "the long poll is still waiting");
    let producer = cluster.producer().await;
    producer
        .send(Message::new("poll", "for b"))
        .await
        .expect("sent");
    let answer = waiting.await.expect("pull task");
    match answer {
        Ok(r) => panic!(
            "the long poll answered {} messages to a member that lost the queue",
            r.messages.len()
        ),
        Err(e) => assert_eq!(code(&e), Some(ErrorCode::QueueNotOwned), "{e}"),
    }
    let r = b
        .call(pull("b", "poll", 0, 0, Duration::from_secs(1)))
        .await
        .expect("the new owner pulls");
    assert_eq!(r.messages.len(), 1);
    producer.close().await.unwrap();
    a.close();
    b.close();
    cluster.shutdown().await;
}
