//! The transaction producer and the admin's transaction calls against an
//! in-memory fake nameserver and fake brokers, over real connections. It
//! checks the client's own logic: a connection to every broker that
//! carries check-backs, the three local results, retries, placement of
//! multi-topic transactions, reconnects, and resolving by hand. The
//! end-to-end tests against the real broker live in `tests/`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use txmq::{
    Admin, BoxError, CheckRequest, Error, ErrorCode, Message, TransactionListener,
    TransactionProducer, TransactionState, TxAction, TxContext, TxEnd, TxState, PERM_READ_WRITE,
};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, Call, CheckTransaction, ClusterInfo, EndTransaction, Ended,
    HalfMessage, Hello, HelloOk, Prepared, Request, Response, Role, SendStatus, ShowTransaction,
    TopicRoute, TransactionList, TxCounters, TxDetail, TxInfo, TxSource, WireError,
    PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- fakes

struct FakeTx {
    group: String,
    messages: Vec<HalfMessage>,
    first_check_delay_ms: Option<u64>,
    state: TxState,
}

#[derive(Default)]
struct FakeBroker {
    name: String,
    addr: String,
    /// Topic -> queue count.
    topics: BTreeMap<String, u32>,
    txs: Mutex<BTreeMap<u64, FakeTx>>,
    next_tx: AtomicU64,
    /// Connections that said hello as a transaction producer, with their group.
    producers: Mutex<Vec<(String, Connection)>>,
    /// Prepares to refuse with STORE_UNAVAILABLE (message ids noted).
    fail_prepares: AtomicU32,
    refused_prepares: Mutex<Vec<txmq::MsgId>>,
    /// Ends, as received.
    ends: Mutex<Vec<EndTransaction>>,
}

impl FakeBroker {
    fn add_tx(&self, group: &str, body: &str, state: TxState) -> u64 {
        let id = self.next_tx.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.txs).insert(
            id,
            FakeTx {
                group: group.into(),
                messages: vec![HalfMessage {
                    queue: 0,
                    message: txmq::WireMessage::new("orders", body.to_string()),
                }],
                first_check_delay_ms: None,
                state,
            },
        );
        id
    }

    fn state(&self, tx_id: u64) -> Option<TxState> {
        lock(&self.txs).get(&tx_id).map(|t| t.state)
    }

    /// Live check-back connections of `group`.
    fn live(&self, group: &str) -> Vec<Connection> {
        lock(&self.producers)
            .iter()
            .filter(|(g, c)| g == group && !c.is_closed())
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Checks back on the first live member of the transaction's group.
    async fn check_back(&self, tx_id: u64) -> TestResult<TransactionState> {
        let (group, messages) = {
            let txs = lock(&self.txs);
            let tx = txs.get(&tx_id).ok_or("no such transaction")?;
            let messages: Vec<txmq::WireMessage> =
                tx.messages.iter().map(|h| h.message.clone()).collect();
            (tx.group.clone(), messages)
        };
        let conn = self
            .live(&group)
            .into_iter()
            .next()
            .ok_or("no live producer of the group")?;
        let answer = conn
            .call(CheckTransaction {
                tx_id,
                broker_name: self.name.clone(),
                producer_group: group,
                messages,
                checks: 0,
                timeout_ms: 0,
            })
            .await?;
        Ok(answer.resolution)
    }

    fn prepare(&self, p: txmq_protocol::PrepareTransaction) -> Result<Prepared, WireError> {
        for h in &p.messages {
            let queues = self.topics.get(&h.message.topic).copied().unwrap_or(0);
            if h.queue >= queues {
                return Err(WireError::new(ErrorCode::UnknownQueue, "no such queue"));
            }
        }
        if self
            .fail_prepares
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            lock(&self.refused_prepares).extend(p.messages.iter().map(|h| h.message.msg_id));
            // A refusal that stores nothing: the prepare may go elsewhere.
            // (A STORE_UNAVAILABLE may come after the write, and keeps a
            // prepare on its broker group.)
            return Err(WireError::new(ErrorCode::Busy, "injected refusal"));
        }
        let tx_id = self.next_tx.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.txs).insert(
            tx_id,
            FakeTx {
                group: p.producer_group,
                messages: p.messages,
                first_check_delay_ms: p.first_check_delay_ms,
                state: TxState::Prepared,
            },
        );
        Ok(Prepared {
            duplicate: false,
            tx_id,
            status: SendStatus::SendOk,
        })
    }

    fn end(&self, e: EndTransaction) -> Result<Ended, WireError> {
        lock(&self.ends).push(e.clone());
        let mut txs = lock(&self.txs);
        let tx = txs.get_mut(&e.tx_id).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownTransaction,
                format!("unknown transaction {}", e.tx_id),
            )
        })?;
        let ended = |state, already| Ended::new(state, already, SendStatus::SendOk);
        match (tx.state, e.action) {
            (TxState::Parked, _) if e.source == TxSource::Producer => Err(WireError::new(
                ErrorCode::TransactionParked,
                "parked; only an operator may end it",
            )),
            (TxState::Prepared | TxState::Parked, TxAction::Commit) => {
                tx.state = TxState::Committed;
                Ok(ended(TxState::Committed, false))
            }
            (TxState::Prepared | TxState::Parked, TxAction::Rollback) => {
                tx.state = TxState::RolledBack;
                Ok(ended(TxState::RolledBack, false))
            }
            (TxState::Committed, TxAction::Commit) => Ok(ended(TxState::Committed, true)),
            (TxState::RolledBack, TxAction::Rollback) => Ok(ended(TxState::RolledBack, true)),
            (TxState::Committed, TxAction::Rollback) => Err(WireError::new(
                ErrorCode::TransactionCommitted,
                "already committed",
            )),
            (TxState::RolledBack, TxAction::Commit) => Err(WireError::new(
                ErrorCode::TransactionRolledBack,
                "already rolled back",
            )),
        }
    }

    fn show(&self, tx_id: u64) -> Result<TxDetail, WireError> {
        let txs = lock(&self.txs);
        let t = txs.get(&tx_id).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownTransaction,
                format!("no transaction {tx_id}"),
            )
        })?;
        Ok(TxDetail {
            broker_name: self.name.clone(),
            tx_id,
            state: t.state,
            producer_group: Some(t.group.clone()),
            prepared_at_ms: None,
            age_ms: None,
            checks: 0,
            next_check_at_ms: None,
            messages: Vec::new(),
            history: Vec::new(),
            ended: None,
        })
    }

    fn list(&self) -> TransactionList {
        let txs = lock(&self.txs);
        let transactions: Vec<TxInfo> = txs
            .iter()
            .filter(|(_, t)| matches!(t.state, TxState::Prepared | TxState::Parked))
            .map(|(&tx_id, t)| TxInfo {
                tx_id,
                msg_ids: t.messages.iter().map(|h| h.message.msg_id).collect(),
                topics: t.messages.iter().map(|h| h.message.topic.clone()).collect(),
                producer_group: t.group.clone(),
                age_ms: 1,
                checks: 0,
                last_check: None,
                last_error: None,
                state: t.state,
            })
            .collect();
        TransactionList {
            broker_name: self.name.clone(),
            matching: transactions.len() as u64,
            counters: TxCounters {
                prepared: txs.len() as u64,
                pending: transactions.len() as u64,
                ..TxCounters::default()
            },
            transactions,
        }
    }
}

struct BrokerService(Arc<FakeBroker>);

impl Service for BrokerService {
    fn hello(&self, conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        if hello.role == Role::TransactionProducer {
            let group = hello.group.clone().unwrap_or_default();
            lock(&self.0.producers).push((group, conn.clone()));
        }
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: self.0.name.clone(),
            challenge: None,
        })
    }

    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let b = &self.0;
        let answer = match request {
            Request::PrepareTransaction(p) => b.prepare(*p).map(Response::PrepareTransaction),
            Request::EndTransaction(e) => b.end(e).map(Response::EndTransaction),
            Request::ListTransactions(_) => Ok(Response::ListTransactions(Box::new(b.list()))),
            Request::ShowTransaction(r) => b.show(r.tx_id).map(ShowTransaction::response),
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        };
        Box::pin(std::future::ready(answer))
    }
}

struct NsService(Vec<Arc<FakeBroker>>);

impl Service for NsService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let answer = match request {
            Request::GetCluster(_) => Ok(Response::GetCluster(ClusterInfo {
                brokers: self
                    .0
                    .iter()
                    .map(|b| BrokerInfo {
                        epoch: Default::default(),
                        cluster: "c".into(),
                        broker_name: b.name.clone(),
                        addr: b.addr.clone(),
                        last_heartbeat_ms_ago: 1,
                        topic_count: b.topics.len() as u32,
                        role: Default::default(),
                    })
                    .collect(),
            })),
            Request::GetRoute(r) => {
                let brokers: Vec<BrokerQueues> = self
                    .0
                    .iter()
                    .filter_map(|b| {
                        b.topics.get(&r.topic).map(|&queues| BrokerQueues {
                            epoch: Default::default(),
                            broker_name: b.name.clone(),
                            addr: b.addr.clone(),
                            slaves: Vec::new(),
                            queues,
                            perm: PERM_READ_WRITE,
                        })
                    })
                    .collect();
                if brokers.is_empty() {
                    Err(WireError::new(ErrorCode::NoRoute, "no route"))
                } else {
                    Ok(Response::GetRoute(TopicRoute {
                        topic: r.topic,
                        brokers,
                    }))
                }
            }
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        };
        Box::pin(std::future::ready(answer))
    }
}

struct Cluster {
    nameserver: String,
    brokers: Vec<Arc<FakeBroker>>,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cluster {
    /// Brokers named by `spec`, each with its (topic, queues).
    async fn start(spec: &[(&str, &[(&str, u32)])]) -> TestResult<Cluster> {
        let stop = CancellationToken::new();
        let mut brokers = Vec::new();
        for (name, topics) in spec {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let broker = Arc::new(FakeBroker {
                name: name.to_string(),
                addr: listener.local_addr()?.to_string(),
                topics: topics.iter().map(|(t, q)| (t.to_string(), *q)).collect(),
                ..FakeBroker::default()
            });
            tokio::spawn(txmq_remoting::server::serve(
                listener,
                Arc::new(BrokerService(broker.clone())),
                ConnectionConfig::default(),
                stop.clone(),
            ));
            brokers.push(broker);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let nameserver = listener.local_addr()?.to_string();
        tokio::spawn(txmq_remoting::server::serve(
            listener,
            Arc::new(NsService(brokers.clone())),
            ConnectionConfig::default(),
            stop.clone(),
        ));
        Ok(Cluster {
            nameserver,
            brokers,
            stop,
        })
    }

    fn broker(&self, name: &str) -> TestResult<&Arc<FakeBroker>> {
        Ok(self
            .brokers
            .iter()
            .find(|b| b.name == name)
            .ok_or("no such broker")?)
    }
}

/// Decides by the message body: "commit", "rollback", "unknown", else fails.
#[derive(Default)]
struct ByBody {
    executed: Mutex<Vec<(u64, String, usize)>>,
    checked: AtomicU32,
}

fn decide(body: &[u8]) -> Result<TransactionState, BoxError> {
    match body {
        b"commit" => Ok(TransactionState::Commit),
        b"rollback" => Ok(TransactionState::Rollback),
        b"unknown" => Ok(TransactionState::Unknown),
        _ => Err("local database unavailable".into()),
    }
}

impl TransactionListener for ByBody {
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        lock(&self.executed).push((
            ctx.tx_id(),
            ctx.broker_name().to_string(),
            ctx.messages().len(),
        ));
        decide(msg.body())
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        self.checked.fetch_add(1, Ordering::SeqCst);
        decide(req.message().body())
    }
}

async fn producer(c: &Cluster, group: &str) -> TestResult<TransactionProducer<ByBody>> {
    Ok(TransactionProducer::builder()
        .nameserver(&c.nameserver)
        .group(group)
        .listener(ByBody::default())
        .broker_refresh_interval(Duration::from_millis(200))
        .start()
        .await?)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn every_broker_can_check_back_even_one_never_sent_to() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 2)]), ("b", &[])]).await?;
    let p = producer(&c, "pg").await?;
    assert_eq!(p.connected_brokers(), ["a", "b"]);
    for b in &c.brokers {
        assert_eq!(b.live("pg").len(), 1, "one connection to {}", b.name);
    }

    // Broker b holds transactions this producer never prepared.
    let b = c.broker("b")?;
    let commit = b.add_tx("pg", "commit", TxState::Prepared);
    let rollback = b.add_tx("pg", "rollback", TxState::Prepared);
    let failing = b.add_tx("pg", "boom", TxState::Prepared);
    assert_eq!(b.check_back(commit).await?, TransactionState::Commit);
    assert_eq!(b.check_back(rollback).await?, TransactionState::Rollback);
    assert_eq!(b.check_back(failing).await?, TransactionState::Unknown);
    assert_eq!(p.listener().checked.load(Ordering::SeqCst), 3);

    // Sends reuse the same connections: still one per broker.
    p.send_in_transaction(Message::new("orders", "commit"))
        .await?;
    assert_eq!(lock(&c.broker("a")?.producers).len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_local_result_commits_rolls_back_or_leaves_it_to_check_backs() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 2)])]).await?;
    let p = TransactionProducer::builder()
        .nameserver(&c.nameserver)
        .group("pg")
        .listener(ByBody::default())
        .first_check_delay(Some(Duration::from_millis(1500)))
        .start()
        .await?;
    let a = c.broker("a")?;

    let id = txmq::MsgId::generate();
    let m = Message::new("orders", "commit")
        .with_key("order-1")
        .with_msg_id(id);
    let o = p.send_in_transaction(m).await?;
    assert_eq!(o.state, TransactionState::Commit);
    assert_eq!(o.msg_id, id, "the message keeps its id");
    assert_eq!(o.msg_ids, [id]);
    assert_eq!(o.broker_name, "a");
    assert_eq!(o.ended().map(|e| e.state), Some(TxState::Committed));
    assert_eq!(a.state(o.tx_id), Some(TxState::Committed));
    assert_eq!(
        lock(&a.txs)
            .get(&o.tx_id)
            .and_then(|t| t.first_check_delay_ms),
        Some(1500)
    );

    let o = p
        .send_in_transaction(Message::new("orders", "rollback"))
        .await?;
    assert_eq!(o.ended().map(|e| e.state), Some(TxState::RolledBack));
    assert_eq!(a.state(o.tx_id), Some(TxState::RolledBack));

    let ends_before = lock(&a.ends).len();
    for body in ["unknown", "execute fails"] {
        let o = p.send_in_transaction(Message::new("orders", body)).await?;
        assert_eq!(o.state, TransactionState::Unknown, "{body}");
        assert!(matches!(o.end, TxEnd::NotSent), "{:?}", o.end);
        assert_eq!(a.state(o.tx_id), Some(TxState::Prepared));
    }
    assert_eq!(
        lock(&a.ends).len(),
        ends_before,
        "nothing ended for unknown"
    );
    assert!(lock(&a.ends).iter().all(|e| e.source == TxSource::Producer));
    assert_eq!(lock(&p.listener().executed).len(), 4);
    Ok(())
}

#[tokio::test]
async fn a_refused_end_is_an_outcome_that_names_the_transaction() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 1)])]).await?;
    let a = c.broker("a")?;
    for (meanwhile, code) in [
        (TxState::RolledBack, ErrorCode::TransactionRolledBack),
        (TxState::Parked, ErrorCode::TransactionParked),
    ] {
        let p = TransactionProducer::builder()
            .nameserver(&c.nameserver)
            .group("pg")
            .listener(ChangedMeanwhile {
                broker: a.clone(),
                state: meanwhile,
            })
            .start()
            .await?;
        // The local transaction ran: the send is Ok, whatever the end.
        let outcome = p
            .send_in_transaction(Message::new("orders", "commit"))
            .await?;
        assert_eq!(outcome.state, TransactionState::Commit);
        assert!(!outcome.committed() && !outcome.pending());
        let TxEnd::Refused(e) = outcome.end else {
            panic!(
                "a commit after {meanwhile:?} is refused, not {:?}",
                outcome.end
            )
        };
        let Error::EndTransaction {
            tx_id,
            ref broker,
            action,
            ..
        } = e
        else {
            panic!("an end error, not {e:?}")
        };
        assert_eq!(tx_id, outcome.tx_id);
        assert_eq!((broker.as_str(), action), ("a", TxAction::Commit));
        assert_eq!(a.state(tx_id), Some(meanwhile));
        assert_eq!(e.code(), Some(code));
        assert!(!e.is_retriable());
        assert_eq!(
            e.to_string(),
            format!("cannot commit transaction {tx_id} on broker a")
        );
        p.close().await.unwrap();
    }
    Ok(())
}

/// Changes the transaction's state on the broker behind the producer's back
/// (as a check-back or the parking would), then says commit.
struct ChangedMeanwhile {
    broker: Arc<FakeBroker>,
    state: TxState,
}

impl TransactionListener for ChangedMeanwhile {
    async fn execute(&self, _msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        if let Some(t) = lock(&self.broker.txs).get_mut(&ctx.tx_id()) {
            t.state = self.state;
        }
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _req: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }
}

#[tokio::test]
async fn a_failed_prepare_moves_to_another_broker_with_the_same_message_id() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 1)]), ("b", &[("orders", 1)])]).await?;
    let a = c.broker("a")?;
    a.fail_prepares.store(100, Ordering::SeqCst);
    let p = producer(&c, "pg").await?;
    for _ in 0..4 {
        let id = txmq::MsgId::generate();
        let m = Message::new("orders", "commit").with_msg_id(id);
        let o = p.send_in_transaction(m).await?;
        assert_eq!(o.broker_name, "b");
        assert_eq!(o.msg_id, id);
    }
    let b = c.broker("b")?;
    let stored: Vec<txmq::MsgId> = lock(&b.txs)
        .values()
        .map(|t| t.messages[0].message.msg_id)
        .collect();
    let refused = lock(&a.refused_prepares).clone();
    assert!(!refused.is_empty(), "some prepares went to a first");
    assert!(refused.iter().all(|id| stored.contains(id)));
    Ok(())
}

#[tokio::test]
async fn several_topics_go_to_one_broker_that_serves_them_all() -> TestResult {
    let c = Cluster::start(&[
        ("a", &[("orders", 2)]),
        ("b", &[("orders", 2), ("audit", 3)]),
        ("c", &[("audit", 1)]),
    ])
    .await?;
    let p = producer(&c, "pg").await?;
    for _ in 0..4 {
        let batch = vec![
            Message::new("orders", "commit"),
            Message::new("audit", "a1"),
            Message::new("orders", "o2").with_msg_id(txmq::MsgId::generate()),
        ];
        // Ids assigned at send are in the outcome; a fixed one is kept.
        let fixed = batch[2].msg_id();
        let o = p.send_messages_in_transaction(batch).await?;
        assert_eq!(o.broker_name, "b");
        assert_eq!(o.msg_ids.len(), 3);
        assert_eq!(o.msg_ids.get(2).copied(), fixed);
        assert_ne!(o.msg_ids[0], o.msg_ids[1]);
        assert_eq!(o.ended().map(|e| e.state), Some(TxState::Committed));
        let b = c.broker("b")?;
        let txs = lock(&b.txs);
        let Some(tx) = txs.get(&o.tx_id) else {
            panic!("prepared on b")
        };
        let placed: Vec<(&str, u32)> = tx
            .messages
            .iter()
            .map(|h| (h.message.topic.as_str(), h.queue))
            .collect();
        assert_eq!(placed.len(), 3);
        assert_eq!(placed[0].1, placed[2].1, "one topic, one queue");
        assert!(placed[0].1 < 2 && placed[1].1 < 3);
    }
    assert_eq!(lock(&p.listener().executed).last().map(|e| e.2), Some(3));

    let disjoint = Cluster::start(&[("x", &[("t1", 1)]), ("y", &[("t2", 1)])]).await?;
    let p = producer(&disjoint, "pg").await?;
    let none = p
        .send_messages_in_transaction(vec![Message::new("t1", "x"), Message::new("t2", "y")])
        .await;
    assert!(matches!(none, Err(Error::NoCommonBroker { .. })));
    Ok(())
}

#[tokio::test]
async fn lost_connections_come_back_and_another_member_answers_for_a_closed_one() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 1)])]).await?;
    let a = c.broker("a")?;
    let first = producer(&c, "pg").await?;
    let o = first
        .send_in_transaction(Message::new("orders", "unknown"))
        .await?;
    first.close().await.unwrap();
    eventually("the closed producer's connection is gone", || {
        a.live("pg").is_empty()
    })
    .await?;
    assert!(matches!(
        first
            .send_in_transaction(Message::new("orders", "commit"))
            .await,
        Err(Error::Closed(_))
    ));

    // Another member of the group; its connection is cut (a broker restart, say).
    let second = producer(&c, "pg").await?;
    for (_, conn) in lock(&a.producers).iter() {
        conn.close();
    }
    eventually("the producer reconnected", || a.live("pg").len() == 1).await?;
    // The body of the unknown transaction is "unknown": ask about a fresh one instead.
    let tx = a.add_tx("pg", "commit", TxState::Prepared);
    assert_eq!(a.check_back(tx).await?, TransactionState::Commit);
    assert_eq!(a.check_back(o.tx_id).await?, TransactionState::Unknown);
    assert_eq!(second.listener().checked.load(Ordering::SeqCst), 2);
    assert_eq!(first.listener().checked.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn admin_lists_and_resolves_transactions_by_hand() -> TestResult {
    let c = Cluster::start(&[("a", &[("orders", 1)]), ("b", &[("orders", 1)])]).await?;
    let (a, b) = (c.broker("a")?, c.broker("b")?);
    // Both brokers have a transaction 1; only a has a parked transaction 2.
    let one_a = a.add_tx("pg", "x", TxState::Prepared);
    let one_b = b.add_tx("pg", "y", TxState::Prepared);
    assert_eq!(one_a, one_b);
    let two = a.add_tx("pg", "z", TxState::Parked);
    let admin = Admin::connect([c.nameserver.as_str()]).await?;

    let lists = admin.list_transactions(None).await?;
    let names: Vec<&str> = lists.iter().map(|l| l.broker_name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(lists[0].transactions.len(), 2);
    assert_eq!(admin.list_transactions(Some("b")).await?.len(), 1);

    let ambiguous = admin
        .resolve_transaction(one_a, TxAction::Commit, None)
        .await;
    assert!(
        matches!(&ambiguous, Err(Error::AmbiguousTransaction { brokers, .. }) if brokers == &["a", "b"])
    );
    assert_eq!(a.state(one_a), Some(TxState::Prepared), "nothing was ended");
    assert_eq!(b.state(one_b), Some(TxState::Prepared));

    let (broker, ended) = admin
        .resolve_transaction(one_b, TxAction::Rollback, Some("b"))
        .await?;
    assert_eq!((broker.as_str(), ended.state), ("b", TxState::RolledBack));
    assert_eq!(
        lock(&b.ends).last().map(|e| e.source),
        Some(TxSource::Operator)
    );

    // A parked transaction, found on the one broker that lists it.
    let (broker, ended) = admin
        .resolve_transaction(two, TxAction::Commit, None)
        .await?;
    assert_eq!(
        (broker.as_str(), ended.state, ended.already),
        ("a", TxState::Committed, false)
    );

    // Ended transactions: asking again changes nothing.
    let again = admin
        .resolve_transaction(two, TxAction::Commit, None)
        .await?;
    assert_eq!((again.0.as_str(), again.1.already), ("a", true));
    let refused = admin
        .resolve_transaction(two, TxAction::Rollback, None)
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::TransactionCommitted)
    );

    let unknown = admin.resolve_transaction(99, TxAction::Commit, None).await;
    assert!(matches!(
        unknown,
        Err(Error::UnknownTransaction { tx_id: 99, .. })
    ));
    let unknown_on_b = admin
        .resolve_transaction(99, TxAction::Commit, Some("b"))
        .await;
    assert_eq!(
        unknown_on_b.err().and_then(|e| e.code()),
        Some(ErrorCode::UnknownTransaction)
    );
    assert!(matches!(
        admin
            .resolve_transaction(1, TxAction::Commit, Some("zz"))
            .await,
        Err(Error::UnknownBroker { .. })
    ));
    Ok(())
}
