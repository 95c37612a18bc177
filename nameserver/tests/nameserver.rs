//! The nameserver as brokers and clients see it: a real server on
//! 127.0.0.1:0, driven over real connections.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use txmq_nameserver::{Error, Nameserver, NameserverConfig};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    BrokerQueues, BrokerRole, ErrorCode, Frame, FrameCodec, GetCluster, GetRoute, Hello,
    ListTopics, Message, Ping, RegisterBroker, Request, Response, Role, SendRequest, TopicConfig,
    TopicRoute, UnregisterBroker, PERM_READ, PERM_READ_WRITE, PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig};

struct Running {
    addr: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(expiry: Duration) -> Running {
    let ns = Nameserver::bind(NameserverConfig {
        listen: "127.0.0.1:0".into(),
        broker_expiry: expiry,
        controller: None,
    })
    .await
    .unwrap();
    let addr = ns.local_addr().to_string();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(ns.run(shutdown.clone()));
    Running {
        addr,
        shutdown,
        task,
    }
}

/// A nameserver with `expiry`, a connection to it as a broker and one as an
/// admin. Keep the [`Running`] bound (`_ns`, not `_`): dropping it stops the
/// nameserver.
async fn start_with_clients(expiry: Duration) -> (Running, Connection, Connection) {
    let ns = start(expiry).await;
    let broker = connect(&ns.addr, Role::Broker).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    (ns, broker, admin)
}

fn hello(role: Role, client_id: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role,
        client_id: client_id.into(),
        group: None,
    }
}

async fn connect(addr: &str, role: Role) -> Connection {
    let hello = hello(role, &format!("test-{role:?}"));
    Connection::connect(addr, hello, None, ConnectionConfig::default())
        .await
        .unwrap()
}

fn topic(name: &str, queues: u32) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        queues,
        perm: PERM_READ_WRITE,
    }
}

async fn register(conn: &Connection, cluster: &str, broker: &str, topics: Vec<TopicConfig>) {
    conn.call(RegisterBroker {
        epoch: Default::default(),
        role: Default::default(),
        cluster: cluster.into(),
        broker_name: broker.into(),
        addr: addr_of(broker),
        topics,
    })
    .await
    .unwrap();
}

fn addr_of(broker: &str) -> String {
    format!("{broker}.example:10911")
}

/// `topic`'s route, which must exist.
async fn full_route(admin: &Connection, topic: &str) -> TopicRoute {
    admin
        .call(GetRoute {
            topic: topic.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("route of {topic}: {e}"))
}

/// What [`route`] answers when exactly `brokers` serve the topic.
fn served_by(brokers: &[&str]) -> Result<Vec<String>, ErrorCode> {
    Ok(brokers.iter().map(|b| b.to_string()).collect())
}

/// The names of the brokers in `topic`'s route, or the error code.
async fn route(admin: &Connection, topic: &str) -> Result<Vec<String>, ErrorCode> {
    match admin
        .call(GetRoute {
            topic: topic.into(),
        })
        .await
    {
        Ok(r) => {
            assert_eq!(r.topic, topic);
            Ok(r.brokers.into_iter().map(|b| b.broker_name).collect())
        }
        Err(e) => Err(e.remote().map(|w| w.code).unwrap_or(ErrorCode::Unknown)),
    }
}

/// Polls `check` every 20 ms until it is true; panics after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Re-registers `broker` every 100 ms until the returned token is cancelled.
fn keep_heartbeating(
    conn: Connection,
    broker: &'static str,
    topics: Vec<TopicConfig>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            register(&conn, "c1", broker, topics.clone()).await;
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    stop
}

#[tokio::test]
async fn a_registered_broker_is_in_the_route_with_its_address_and_queues() {
    let (_ns, broker, admin) = start_with_clients(Duration::from_secs(30)).await;
    register(
        &broker,
        "c1",
        "broker-a",
        vec![
            topic("orders", 8),
            TopicConfig {
                name: "audit".into(),
                queues: 2,
                perm: PERM_READ,
            },
        ],
    )
    .await;

    let r = full_route(&admin, "orders").await;
    assert_eq!(r.topic, "orders");
    assert_eq!(
        r.brokers,
        vec![BrokerQueues {
            epoch: Default::default(),
            slaves: Vec::new(),
            broker_name: "broker-a".into(),
            addr: addr_of("broker-a"),
            queues: 8,
            perm: PERM_READ_WRITE,
        }]
    );
    let audit = full_route(&admin, "audit").await;
    assert_eq!(audit.brokers[0].queues, 2);
    assert_eq!(audit.brokers[0].perm, PERM_READ);
}

#[tokio::test]
async fn an_unknown_topic_has_no_route_and_the_message_names_it() {
    let (_ns, broker, admin) = start_with_clients(Duration::from_secs(30)).await;
    register(&broker, "c1", "broker-a", vec![topic("orders", 4)]).await;

    let err = admin
        .call(GetRoute {
            topic: "missing".into(),
        })
        .await
        .unwrap_err();
    let wire = err
        .remote()
        .expect("a wire error, not a dropped connection");
    assert_eq!(wire.code, ErrorCode::NoRoute);
    assert!(wire.message.contains("'missing'"), "{}", wire.message);
    assert!(wire.message.contains("no live broker"), "{}", wire.message);
    // The connection stays usable after an error answer.
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));
}

#[tokio::test]
async fn heartbeats_keep_a_broker_alive_past_the_expiry() {
    let expiry = Duration::from_millis(600);
    let (_ns, broker, admin) = start_with_clients(expiry).await;
    let stop = keep_heartbeating(broker, "broker-a", vec![topic("orders", 4)]);
    eventually(Duration::from_secs(2), "broker registered", || async {
        route(&admin, "orders").await.is_ok()
    })
    .await;

    // Three expiries long, the route must never lose the broker.
    let until = Instant::now() + expiry * 3;
    while Instant::now() < until {
        assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn a_silent_broker_expires_from_routes_cluster_and_topics() {
    let expiry = Duration::from_millis(300);
    // The connection stays open: only the missing heartbeat can drop it.
    let (_ns, broker, admin) = start_with_clients(expiry).await;
    let registered_at = Instant::now();
    register(&broker, "c1", "broker-a", vec![topic("orders", 4)]).await;
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));

    eventually(Duration::from_secs(3), "silent broker dropped", || async {
        route(&admin, "orders").await == Err(ErrorCode::NoRoute)
    })
    .await;
    assert!(
        registered_at.elapsed() >= expiry,
        "dropped after {:?}, before the expiry of {expiry:?}",
        registered_at.elapsed()
    );
    assert!(admin.call(GetCluster {}).await.unwrap().brokers.is_empty());
    assert!(admin.call(ListTopics {}).await.unwrap().topics.is_empty());
    assert!(
        !broker.is_closed(),
        "expiry must not depend on the connection"
    );

    // A heartbeat after expiry registers it again.
    register(&broker, "c1", "broker-a", vec![topic("orders", 4)]).await;
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));
}

#[tokio::test]
async fn closing_the_broker_connection_drops_it_at_once() {
    // An expiry far longer than the test: only the close can drop the broker.
    let (_ns, broker, admin) = start_with_clients(Duration::from_secs(60)).await;
    register(&broker, "c1", "broker-a", vec![topic("orders", 4)]).await;
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));

    broker.close();
    eventually(Duration::from_secs(2), "closed broker dropped", || async {
        route(&admin, "orders").await == Err(ErrorCode::NoRoute)
    })
    .await;
    assert!(admin.call(GetCluster {}).await.unwrap().brokers.is_empty());
}

#[tokio::test]
async fn a_reconnected_broker_survives_the_close_of_its_old_connection() {
    let (ns, old, admin) = start_with_clients(Duration::from_secs(60)).await;
    register(&old, "c1", "broker-a", vec![topic("orders", 4)]).await;
    let new = connect(&ns.addr, Role::Broker).await;
    register(&new, "c1", "broker-a", vec![topic("orders", 4)]).await;

    old.close();
    // Closing an admin connection must not drop anything either.
    let other_admin = connect(&ns.addr, Role::Admin).await;
    other_admin.close();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-a"]));

    new.close();
    eventually(
        Duration::from_secs(2),
        "broker dropped with its new connection",
        || async { route(&admin, "orders").await == Err(ErrorCode::NoRoute) },
    )
    .await;
}

#[tokio::test]
async fn two_brokers_serve_one_topic_until_one_expires() {
    let ns = start(Duration::from_millis(400)).await;
    let a = connect(&ns.addr, Role::Broker).await;
    let b = connect(&ns.addr, Role::Broker).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    // Registered in reverse order: the route is sorted by name regardless.
    register(&b, "c1", "broker-b", vec![topic("orders", 2)]).await;
    let stop = keep_heartbeating(a, "broker-a", vec![topic("orders", 4)]);
    eventually(
        Duration::from_secs(2),
        "both brokers in the route",
        || async { route(&admin, "orders").await == served_by(&["broker-a", "broker-b"]) },
    )
    .await;
    let r = full_route(&admin, "orders").await;
    let queues: Vec<(String, u32)> = r.brokers.into_iter().map(|q| (q.addr, q.queues)).collect();
    assert_eq!(
        queues,
        vec![(addr_of("broker-a"), 4), (addr_of("broker-b"), 2)]
    );

    // broker-b falls silent; broker-a keeps heartbeating.
    eventually(Duration::from_secs(3), "broker-b expired", || async {
        route(&admin, "orders").await == served_by(&["broker-a"])
    })
    .await;
    let cluster = admin.call(GetCluster {}).await.unwrap();
    let names: Vec<&str> = cluster
        .brokers
        .iter()
        .map(|b| b.broker_name.as_str())
        .collect();
    assert_eq!(names, vec!["broker-a"]);
    assert!(!b.is_closed());
    stop.cancel();
}

#[tokio::test]
async fn cluster_and_topic_listings_are_complete_and_sorted() {
    let ns = start(Duration::from_secs(30)).await;
    let b1 = connect(&ns.addr, Role::Broker).await;
    let b2 = connect(&ns.addr, Role::Broker).await;
    let b3 = connect(&ns.addr, Role::Broker).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    register(
        &b1,
        "west",
        "broker-a",
        vec![topic("orders", 4), topic("audit", 1)],
    )
    .await;
    register(&b2, "east", "broker-z", vec![topic("orders", 2)]).await;
    register(&b3, "east", "broker-m", vec![]).await;

    let cluster = admin.call(GetCluster {}).await.unwrap();
    let got: Vec<(String, String, String, u32)> = cluster
        .brokers
        .iter()
        .map(|b| {
            (
                b.cluster.clone(),
                b.broker_name.clone(),
                b.addr.clone(),
                b.topic_count,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("east".into(), "broker-m".into(), addr_of("broker-m"), 0),
            ("east".into(), "broker-z".into(), addr_of("broker-z"), 1),
            ("west".into(), "broker-a".into(), addr_of("broker-a"), 2),
        ]
    );
    for b in &cluster.brokers {
        assert!(b.last_heartbeat_ms_ago < 5_000, "{b:?}");
    }

    let topics = admin.call(ListTopics {}).await.unwrap();
    let got: Vec<(String, String, u32)> = topics
        .topics
        .into_iter()
        .map(|t| (t.config.name, t.broker_name, t.config.queues))
        .collect();
    assert_eq!(
        got,
        vec![
            ("audit".into(), "broker-a".into(), 1),
            ("orders".into(), "broker-a".into(), 4),
            ("orders".into(), "broker-z".into(), 2),
        ]
    );
}

#[tokio::test]
async fn reregistration_replaces_the_topic_table() {
    let (_ns, broker, admin) = start_with_clients(Duration::from_secs(30)).await;
    register(
        &broker,
        "c1",
        "broker-a",
        vec![topic("old", 4), topic("kept", 4)],
    )
    .await;
    register(
        &broker,
        "c1",
        "broker-a",
        vec![topic("kept", 16), topic("new", 1)],
    )
    .await;

    assert_eq!(route(&admin, "old").await, Err(ErrorCode::NoRoute));
    assert_eq!(route(&admin, "new").await, served_by(&["broker-a"]));
    let kept = full_route(&admin, "kept").await;
    assert_eq!(kept.brokers[0].queues, 16);
    assert_eq!(admin.call(GetCluster {}).await.unwrap().brokers.len(), 1);
}

#[tokio::test]
async fn unregister_drops_the_broker() {
    let ns = start(Duration::from_secs(30)).await;
    let a = connect(&ns.addr, Role::Broker).await;
    let b = connect(&ns.addr, Role::Broker).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    register(&a, "c1", "broker-a", vec![topic("orders", 4)]).await;
    register(&b, "c1", "broker-b", vec![topic("orders", 4)]).await;

    a.call(UnregisterBroker {
        broker_name: "broker-a".into(),
        addr: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(route(&admin, "orders").await, served_by(&["broker-b"]));
    // Saying goodbye twice is not an error.
    a.call(UnregisterBroker {
        broker_name: "broker-a".into(),
        addr: String::new(),
    })
    .await
    .unwrap();
}

/// Registers `broker` at `addr` over `conn`; the nameserver's answer.
async fn register_at(
    conn: &Connection,
    broker: &str,
    addr: &str,
) -> Result<(), txmq_remoting::Error> {
    conn.call(RegisterBroker {
        epoch: Default::default(),
        role: Default::default(),
        cluster: "c1".into(),
        broker_name: broker.into(),
        addr: addr.into(),
        topics: vec![topic("orders", 4)],
    })
    .await
    .map(|_| ())
}

/// The address `topic`'s route names for its only broker.
async fn route_addr(admin: &Connection, topic: &str) -> String {
    let r = full_route(admin, topic).await;
    assert_eq!(r.brokers.len(), 1, "{r:?}");
    r.brokers[0].addr.clone()
}

#[tokio::test]
async fn a_second_broker_under_a_live_name_is_refused_and_routes_keep_the_first() {
    let (ns, first, admin) = start_with_clients(Duration::from_secs(60)).await;
    register_at(&first, "broker-a", "10.0.0.1:10911")
        .await
        .unwrap();

    // Two brokers started without --broker-name: the second one is refused,
    // every time it tries, and names both addresses and the way out.
    let second = connect(&ns.addr, Role::Broker).await;
    for _ in 0..3 {
        let err = register_at(&second, "broker-a", "10.0.0.2:10911")
            .await
            .unwrap_err();
        let wire = err
            .remote()
            .expect("a wire error, not a dropped connection");
        assert_eq!(wire.code, ErrorCode::BrokerNameTaken);
        for part in [
            "10.0.0.1:10911",
            "10.0.0.2:10911",
            "'broker-a'",
            "--broker-name",
        ] {
            assert!(wire.message.contains(part), "{part} in {}", wire.message);
        }
        // The first broker's heartbeats go on being accepted meanwhile.
        register_at(&first, "broker-a", "10.0.0.1:10911")
            .await
            .unwrap();
        assert_eq!(route_addr(&admin, "orders").await, "10.0.0.1:10911");
    }
    let cluster = admin.call(GetCluster {}).await.unwrap();
    assert_eq!(cluster.brokers.len(), 1);
    assert_eq!(cluster.brokers[0].addr, "10.0.0.1:10911");

    // Once the first one is gone, the name is free for the second.
    first.close();
    eventually(Duration::from_secs(2), "first broker dropped", || async {
        route(&admin, "orders").await == Err(ErrorCode::NoRoute)
    })
    .await;
    register_at(&second, "broker-a", "10.0.0.2:10911")
        .await
        .unwrap();
    assert_eq!(route_addr(&admin, "orders").await, "10.0.0.2:10911");
}

#[tokio::test]
async fn a_refused_broker_takes_the_name_once_the_holder_expires() {
    let expiry = Duration::from_millis(400);
    let (ns, first, admin) = start_with_clients(expiry).await;
    register_at(&first, "broker-a", "10.0.0.1:10911")
        .await
        .unwrap();
    let second = connect(&ns.addr, Role::Broker).await;
    assert!(register_at(&second, "broker-a", "10.0.0.2:10911")
        .await
        .is_err());
    // The first one falls silent with its connection open; the second keeps trying.
    eventually(
        Duration::from_secs(3),
        "second broker registered",
        || async {
            register_at(&second, "broker-a", "10.0.0.2:10911")
                .await
                .is_ok()
        },
    )
    .await;
    assert_eq!(route_addr(&admin, "orders").await, "10.0.0.2:10911");
    // Now the first one is the contender.
    assert!(register_at(&first, "broker-a", "10.0.0.1:10911")
        .await
        .is_err());
    assert_eq!(route_addr(&admin, "orders").await, "10.0.0.2:10911");
}

#[tokio::test]
async fn an_unregister_or_close_from_another_broker_leaves_the_holder() {
    let (ns, first, admin) = start_with_clients(Duration::from_secs(60)).await;
    register_at(&first, "broker-a", "10.0.0.1:10911")
        .await
        .unwrap();
    let second = connect(&ns.addr, Role::Broker).await;
    assert!(register_at(&second, "broker-a", "10.0.0.2:10911")
        .await
        .is_err());

    // The refused broker's goodbye, by its own address or none, removes nothing.
    for addr in ["10.0.0.2:10911", ""] {
        let err = second
            .call(UnregisterBroker {
                broker_name: "broker-a".into(),
                addr: addr.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.remote().map(|w| w.code),
            Some(ErrorCode::BrokerNameTaken),
            "{err}"
        );
        assert!(err.to_string().contains("10.0.0.1:10911"), "{err}");
        assert_eq!(route_addr(&admin, "orders").await, "10.0.0.1:10911");
    }
    // Nor does its connection closing.
    second.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(route_addr(&admin, "orders").await, "10.0.0.1:10911");

    // The holder's address from another connection removes nothing either:
    // anyone can send an address.
    let other = connect(&ns.addr, Role::Broker).await;
    let err = other
        .call(UnregisterBroker {
            broker_name: "broker-a".into(),
            addr: "10.0.0.1:10911".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|w| w.code),
        Some(ErrorCode::BrokerNameTaken),
        "{err}"
    );
    assert_eq!(route_addr(&admin, "orders").await, "10.0.0.1:10911");
    // The holder's own goodbye, by its address, over its connection.
    first
        .call(UnregisterBroker {
            broker_name: "broker-a".into(),
            addr: "10.0.0.1:10911".into(),
        })
        .await
        .unwrap();
    assert_eq!(route(&admin, "orders").await, Err(ErrorCode::NoRoute));
    assert!(!first.is_closed());
}

/// Registers `broker` at `addr` as `role` over `conn`, serving "orders" with 4 queues.
async fn register_as(
    conn: &Connection,
    role: BrokerRole,
    broker: &str,
    addr: &str,
) -> Result<(), txmq_remoting::Error> {
    conn.call(RegisterBroker {
        epoch: Default::default(),
        role,
        cluster: "c1".into(),
        broker_name: broker.into(),
        addr: addr.into(),
        topics: vec![topic("orders", 4)],
    })
    .await
    .map(|_| ())
}

/// Every broker the nameserver lists, as (name, role, addr).
async fn cluster_members(admin: &Connection) -> Vec<(String, BrokerRole, String)> {
    admin
        .call(GetCluster {})
        .await
        .unwrap()
        .brokers
        .into_iter()
        .map(|b| (b.broker_name, b.role, b.addr))
        .collect()
}

#[tokio::test]
async fn a_master_and_its_slaves_are_one_group_and_the_slaves_outlive_the_master() {
    // An expiry far longer than the test: only the close can drop the master.
    let (ns, master, admin) = start_with_clients(Duration::from_secs(60)).await;
    let slave1 = connect(&ns.addr, Role::Broker).await;
    let slave2 = connect(&ns.addr, Role::Broker).await;
    let (m, s1, s2) = ("10.0.0.1:10911", "10.0.0.2:10911", "10.0.0.3:10911");
    register_as(&master, BrokerRole::Master, "broker-a", m)
        .await
        .unwrap();
    // Registered in reverse address order: answers sort them.
    register_as(&slave2, BrokerRole::Slave, "broker-a", s2)
        .await
        .unwrap();
    register_as(&slave1, BrokerRole::Slave, "broker-a", s1)
        .await
        .unwrap();
    // A second master under the live master's name is still refused.
    let intruder = connect(&ns.addr, Role::Broker).await;
    let err = register_as(&intruder, BrokerRole::Master, "broker-a", "10.0.0.9:10911")
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|w| w.code),
        Some(ErrorCode::BrokerNameTaken),
        "{err}"
    );

    let group = |addr: &str| BrokerQueues {
        epoch: Default::default(),
        broker_name: "broker-a".into(),
        addr: addr.into(),
        slaves: vec![s1.into(), s2.into()],
        queues: 4,
        perm: PERM_READ_WRITE,
    };
    assert_eq!(full_route(&admin, "orders").await.brokers, vec![group(m)]);
    let member = |role, addr: &str| ("broker-a".to_string(), role, addr.to_string());
    assert_eq!(
        cluster_members(&admin).await,
        vec![
            member(BrokerRole::Master, m),
            member(BrokerRole::Slave, s1),
            member(BrokerRole::Slave, s2),
        ]
    );
    let topics = admin.call(ListTopics {}).await.unwrap().topics;
    assert_eq!(topics.len(), 1, "{topics:?}");
    assert_eq!(topics[0].broker_name, "broker-a");

    // The master's connection closes: the group stays, readable from its
    // slaves, with no master address.
    master.close();
    eventually(Duration::from_secs(2), "master dropped", || async {
        full_route(&admin, "orders").await.brokers[0]
            .addr
            .is_empty()
    })
    .await;
    assert_eq!(full_route(&admin, "orders").await.brokers, vec![group("")]);
    assert_eq!(
        cluster_members(&admin).await,
        vec![member(BrokerRole::Slave, s1), member(BrokerRole::Slave, s2)]
    );

    // The master comes back: its address is in the route again.
    let back = connect(&ns.addr, Role::Broker).await;
    register_as(&back, BrokerRole::Master, "broker-a", m)
        .await
        .unwrap();
    assert_eq!(full_route(&admin, "orders").await.brokers, vec![group(m)]);
}

#[tokio::test]
async fn a_registration_without_a_name_is_refused() {
    let ns = start(Duration::from_secs(30)).await;
    let broker = connect(&ns.addr, Role::Broker).await;
    let err = broker
        .call(RegisterBroker {
            epoch: Default::default(),
            role: Default::default(),
            cluster: "c1".into(),
            broker_name: String::new(),
            addr: "x:1".into(),
            topics: vec![topic("orders", 4)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.remote().map(|w| w.code), Some(ErrorCode::BadArgument));
    assert!(broker.call(GetCluster {}).await.unwrap().brokers.is_empty());
}

#[tokio::test]
async fn ping_is_answered_and_broker_requests_are_unsupported() {
    let ns = start(Duration::from_secs(30)).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    admin.call(Ping {}).await.unwrap();

    let err = admin
        .call(SendRequest {
            producer: None,
            queue: 0,
            messages: vec![Message::new("orders", "hi")],
        })
        .await
        .unwrap_err();
    let wire = err.remote().expect("a wire error");
    assert_eq!(wire.code, ErrorCode::UnsupportedRequest);
    assert!(wire.message.contains("Send"), "{}", wire.message);
    admin.call(Ping {}).await.unwrap();
}

#[tokio::test]
async fn hello_is_answered_with_the_nameserver_address() {
    let ns = start(Duration::from_secs(30)).await;
    let mut stream = tokio::net::TcpStream::connect(&ns.addr).await.unwrap();
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let hello = hello(Role::Admin, "raw");
    codec
        .encode(&Frame::Request(7, Request::Hello(hello)), &mut buf)
        .unwrap();
    stream.write_all(&buf).await.unwrap();
    buf.clear();
    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(f) = codec.decode(&mut buf).unwrap() {
                return f;
            }
            assert!(
                stream.read_buf(&mut buf).await.unwrap() > 0,
                "connection closed"
            );
        }
    })
    .await
    .unwrap();
    match frame {
        Decoded::Frame(Frame::Response(7, Ok(Response::Hello(ok)))) => {
            assert_eq!(ok.version, PROTOCOL_VERSION);
            assert_eq!(ok.server, format!("nameserver {}", ns.addr));
        }
        other => panic!("unexpected answer to hello: {other:?}"),
    }
}

#[tokio::test]
async fn a_taken_port_is_a_clear_bind_error() {
    let ns = start(Duration::from_secs(30)).await;
    let err = Nameserver::bind(NameserverConfig {
        listen: ns.addr.clone(),
        ..NameserverConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Bind { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot listen on {}: ", ns.addr)),
        "{text}"
    );
    assert!(text.to_lowercase().contains("in use"), "{text}");
}

#[tokio::test]
async fn shutdown_stops_serving_and_closes_connections() {
    let mut ns = start(Duration::from_secs(30)).await;
    let admin = connect(&ns.addr, Role::Admin).await;
    ns.shutdown.cancel();
    let task = std::mem::replace(&mut ns.task, tokio::spawn(async {}));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), admin.closed())
        .await
        .unwrap();
    let late = Connection::connect(
        &ns.addr,
        hello(Role::Admin, "late"),
        None,
        ConnectionConfig::default(),
    )
    .await;
    assert!(
        late.is_err(),
        "a stopped nameserver must not accept connections"
    );
}

/// Registers `broker` at `addr` as the master of epoch `epoch` over `conn`.
async fn register_elected(
    conn: &Connection,
    broker: &str,
    addr: &str,
    epoch: u64,
) -> Result<(), txmq_remoting::Error> {
    conn.call(RegisterBroker {
        epoch,
        role: BrokerRole::Master,
        cluster: "c1".into(),
        broker_name: broker.into(),
        addr: addr.into(),
        topics: vec![topic("orders", 4)],
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn the_master_elected_last_is_routed_to_and_a_fenced_one_is_refused_until_it_demotes() {
    let (ns, old, admin) = start_with_clients(Duration::from_secs(60)).await;
    let new = connect(&ns.addr, Role::Broker).await;
    let (a, b) = ("10.0.0.1:10911", "10.0.0.2:10911");
    register_elected(&old, "broker-a", a, 1).await.unwrap();
    register_as(&new, BrokerRole::Slave, "broker-a", b)
        .await
        .unwrap();
    let entry = full_route(&admin, "orders").await.brokers;
    assert_eq!((entry[0].addr.as_str(), entry[0].epoch), (a, 1));
    assert_eq!(entry[0].slaves, vec![b.to_string()]);

    // The controller elected b (epoch 2); a has not learned it yet.
    register_elected(&new, "broker-a", b, 2).await.unwrap();
    let entry = full_route(&admin, "orders").await.brokers;
    assert_eq!((entry[0].addr.as_str(), entry[0].epoch), (b, 2));
    assert!(entry[0].slaves.is_empty(), "{entry:?}");
    let err = register_elected(&old, "broker-a", a, 1).await.unwrap_err();
    let wire = err.remote().cloned().unwrap();
    assert_eq!(wire.code, ErrorCode::BrokerNameTaken);
    assert!(
        wire.message
            .contains("the group's master is at 10.0.0.2:10911 with epoch 2"),
        "{}",
        wire.message
    );
    let listed: Vec<(BrokerRole, String, u64)> = admin
        .call(GetCluster {})
        .await
        .unwrap()
        .brokers
        .into_iter()
        .map(|b| (b.role, b.addr, b.epoch))
        .collect();
    assert_eq!(listed, vec![(BrokerRole::Master, b.to_string(), 2)]);

    // Demoted, a follows b as a slave.
    register_as(&old, BrokerRole::Slave, "broker-a", a)
        .await
        .unwrap();
    let entry = full_route(&admin, "orders").await.brokers;
    assert_eq!((entry[0].addr.as_str(), entry[0].epoch), (b, 2));
    assert_eq!(entry[0].slaves, vec![a.to_string()]);
}
