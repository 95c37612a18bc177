//! End-to-end tests of the order service against a real in-process
//! nameserver and broker (ephemeral ports, short transaction timeouts):
//! orders placed are applied exactly once, a redelivered message is
//! skipped, and a crash between prepare and commit (or before the local
//! commit) is finished by check-back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_service::{
    apply_messages, consume_until_idle, place_order, AfterLocalCommit, AppliedDb, CheckAnswer,
    CheckReason, ConsumeStats, Order, OrderDb, OrderListener, Outcome, Report,
};
use tokio_util::sync::CancellationToken;
use txmq::{
    Admin, BoxError, CheckRequest, ConsumeFrom, Message, PullConsumer, ReceivedMessage,
    TransactionListener, TransactionProducer, TransactionState, TxContext, TxEnd, TxState,
    PERM_READ_WRITE,
};
use txmq_broker::{Broker, BrokerConfig};
use txmq_nameserver::{Nameserver, NameserverConfig};

const TOPIC: &str = "orders";
const PRODUCERS: &str = "order-producers";
const CONSUMERS: &str = "order-consumers";
/// The broker's transaction timeout in these tests: first check-back after this.
const TX_TIMEOUT: Duration = Duration::from_millis(800);

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A nameserver, one broker, and the two databases, all in a temp dir.
struct Env {
    nameserver: String,
    ns_stop: CancellationToken,
    broker: Broker,
    orders: OrderDb,
    applied: AppliedDb,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Result<Env, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ns = Nameserver::bind(NameserverConfig {
            listen: "127.0.0.1:0".into(),
            broker_expiry: Duration::from_secs(30),
            controller: None,
        })
        .await?;
        let nameserver = ns.local_addr().to_string();
        let ns_stop = CancellationToken::new();
        tokio::spawn(ns.run(ns_stop.clone()));

        let mut cfg = BrokerConfig::new(dir.path().join("broker"));
        cfg.listen = "127.0.0.1:0".into();
        cfg.nameservers = vec![nameserver.clone()];
        cfg.heartbeat_interval = Duration::from_millis(200);
        cfg.segment_size = 8 << 20;
        cfg.max_message_size = 1 << 20;
        cfg.transactions.timeout = TX_TIMEOUT;
        cfg.transactions.check_interval = Duration::from_millis(200);
        cfg.transactions.check_timeout = Duration::from_secs(2);
        let broker = Broker::start(cfg).await?;

        let admin = Admin::connect([nameserver.clone()]).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !admin
            .cluster()
            .await?
            .iter()
            .any(|b| b.broker_name == "broker-a")
        {
            assert!(Instant::now() < deadline, "the broker never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        admin.create_topic(TOPIC, 4, PERM_READ_WRITE, None).await?;
        admin.close().await.unwrap();

        Ok(Env {
            nameserver,
            ns_stop,
            broker,
            orders: OrderDb::open(dir.path().join("data/orders.db"))?,
            applied: AppliedDb::open(dir.path().join("data/applied.db"))?,
            _dir: dir,
        })
    }

    async fn producer<L: TransactionListener>(
        &self,
        listener: L,
    ) -> Result<TransactionProducer<L>, txmq::Error> {
        TransactionProducer::builder()
            .nameserver(&self.nameserver)
            .group(PRODUCERS)
            .listener(listener)
            .start()
            .await
    }

    async fn consumer(&self, group: &str) -> Result<PullConsumer, txmq::Error> {
        PullConsumer::builder()
            .nameserver(&self.nameserver)
            .group(group)
            .topic(TOPIC)
            .from(ConsumeFrom::First)
            .max_wait(Duration::from_millis(200))
            .build()
            .await
    }

    /// Runs the `consume` command's loop with a fresh consumer of `group`
    /// until 1.5 s pass without a message, then shuts it down (commits).
    async fn consume(&self, group: &str) -> Result<ConsumeStats, Box<dyn std::error::Error>> {
        let mut consumer = self.consumer(group).await?;
        let stats = consume_until_idle(
            &mut consumer,
            &self.applied,
            Some(Duration::from_millis(1500)),
            std::future::pending(),
            |_, _| {},
        )
        .await?;
        consumer.shutdown().await?;
        Ok(stats)
    }

    /// The transactions the broker still holds prepared (or parked).
    async fn pending(&self) -> Result<Vec<(u64, TxState)>, txmq::Error> {
        let admin = Admin::connect([self.nameserver.clone()]).await?;
        let lists = admin.list_transactions(None).await?;
        admin.close().await.unwrap();
        Ok(lists
            .iter()
            .flat_map(|l| l.transactions.iter().map(|t| (t.tx_id, t.state)))
            .collect())
    }

    async fn report(&self) -> Result<Report, order_service::Error> {
        Report::build(&self.orders, &self.applied).await
    }

    async fn stop(self) {
        self.broker.shutdown().await;
        self.ns_stop.cancel();
    }
}

/// Places `n` new orders with `producer`, expecting each committed.
async fn place(
    env: &Env,
    producer: &TransactionProducer<OrderListener>,
    n: u64,
) -> Result<Vec<Order>, Box<dyn std::error::Error>> {
    let orders = env.orders.next_orders(n).await?;
    for order in &orders {
        let outcome = place_order(producer, TOPIC, order).await?;
        assert_eq!(outcome.state, TransactionState::Commit);
        assert!(outcome.committed(), "{:?}", outcome.end);
    }
    Ok(orders)
}

/// Polls until `n` messages arrived (or 15 s passed); commits nothing.
async fn poll_exactly(
    consumer: &mut PullConsumer,
    n: usize,
) -> Result<Vec<ReceivedMessage>, txmq::Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(consumer.poll(Duration::from_millis(200)).await?);
    }
    Ok(got)
}

/// A check observer that keeps every answer.
fn recorder() -> (
    Arc<Mutex<Vec<CheckAnswer>>>,
    impl Fn(&CheckAnswer) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    (seen, move |a: &CheckAnswer| {
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(a.clone())
    })
}

fn answers(seen: &Mutex<Vec<CheckAnswer>>) -> Vec<CheckAnswer> {
    seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_orders_are_applied_exactly_once() -> TestResult {
    let env = Env::start().await?;
    let producer = env.producer(OrderListener::new(env.orders.clone())).await?;
    let orders = place(&env, &producer, 6).await?;
    producer.close().await.unwrap();

    let stats = env.consume(CONSUMERS).await?;
    assert_eq!((stats.applied, stats.skipped, stats.invalid), (6, 0, 0));

    let report = env.report().await?;
    assert!(report.exactly_once(), "{report}");
    let ids: Vec<String> = orders.iter().map(|o| o.order_id.clone()).collect();
    assert_eq!(env.applied.order_ids().await?, ids);
    assert_eq!(report.placed.logged_committed, 6);
    assert_eq!(report.applied.messages, 6);

    // The group committed its offsets: a second run gets nothing.
    assert_eq!(env.consume(CONSUMERS).await?.delivered(), 0);
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_is_skipped_the_second_time() -> TestResult {
    let env = Env::start().await?;
    let producer = env.producer(OrderListener::new(env.orders.clone())).await?;
    place(&env, &producer, 4).await?;
    producer.close().await.unwrap();

    // A consumer applies all four, then dies before committing its offsets.
    let mut first = env.consumer(CONSUMERS).await?;
    let delivered = poll_exactly(&mut first, 4).await?;
    assert_eq!(delivered.len(), 4);
    let mut stats = ConsumeStats::default();
    apply_messages(&env.applied, &delivered, &mut stats, |_, _| {}).await?;
    assert_eq!(stats.applied, 4);
    drop(first);

    // The group gets the same four messages again, and skips every one.
    let again = env.consume(CONSUMERS).await?;
    assert_eq!((again.applied, again.skipped), (0, 4));

    let report = env.report().await?;
    assert!(report.exactly_once(), "{report}");
    assert_eq!(report.applied.orders, 4);
    assert_eq!(report.applied.totals_orders, 4, "item totals counted once");
    assert_eq!(report.applied.amount_cents, report.placed.amount_cents);
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_prepare_and_commit_is_finished_by_check_back() -> TestResult {
    let env = Env::start().await?;
    // The service commits two orders, then "crashes" on the third: the
    // order and its tx_log row are in SQLite, the broker never hears commit.
    let crashing = OrderListener::new(env.orders.clone());
    let producer = env.producer(crashing).await?;
    place(&env, &producer, 2).await?;
    producer
        .listener()
        .set_after_local_commit(AfterLocalCommit::LeaveUnended);
    let third = env.orders.next_orders(1).await?.remove(0);
    let outcome = place_order(&producer, TOPIC, &third).await?;
    assert_eq!(outcome.state, TransactionState::Unknown);
    assert!(matches!(outcome.end, TxEnd::NotSent), "{:?}", outcome.end);
    producer.close().await.unwrap();
    drop(producer);

    // With no member of the group alive, the message stays prepared and
    // invisible, past the transaction timeout.
    let early = env.consume(CONSUMERS).await?;
    assert_eq!(early.applied, 2);
    assert!(
        env.pending()
            .await?
            .contains(&(outcome.tx_id, TxState::Prepared)),
        "the third order's transaction is still prepared"
    );
    let report = env.report().await?;
    assert_eq!(report.missing, std::slice::from_ref(&third.order_id));
    assert!(!report.exactly_once());

    // `serve-checks`: another member of the group answers from tx_log.
    let (seen, observer) = recorder();
    let checker = env
        .producer(OrderListener::new(env.orders.clone()).on_check(observer))
        .await?;
    let mut consumer = env.consumer(CONSUMERS).await?;
    let late = poll_exactly(&mut consumer, 1).await?;
    assert_eq!(late.len(), 1, "the check-back committed the third order");
    assert_eq!(late[0].msg_id(), outcome.msg_id);
    let mut stats = ConsumeStats::default();
    apply_messages(&env.applied, &late, &mut stats, |_, _| {}).await?;
    consumer.shutdown().await?;
    checker.close().await.unwrap();

    let answered = answers(&seen);
    assert!(
        answered.iter().any(|a| a.tx_id == outcome.tx_id
            && a.state == TransactionState::Commit
            && a.reason == CheckReason::Logged(Outcome::Committed)
            && a.order_id.as_deref() == Some(third.order_id.as_str())),
        "serve-checks answered commit from tx_log: {answered:?}"
    );
    assert!(env.pending().await?.is_empty());

    // Nothing more arrives, and each order was applied once.
    assert_eq!(env.consume(CONSUMERS).await?.delivered(), 0);
    let report = env.report().await?;
    assert!(report.exactly_once(), "{report}");
    assert_eq!(report.applied.orders, 3);
    env.stop().await;
    Ok(())
}

/// Prepares, but dies before its local transaction commits: writes nothing.
struct DiesBeforeLocalCommit;

impl TransactionListener for DiesBeforeLocalCommit {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_local_commit_is_rolled_back_by_check_back() -> TestResult {
    let env = Env::start().await?;
    let producer = env.producer(DiesBeforeLocalCommit).await?;
    let order = env.orders.next_orders(1).await?.remove(0);
    let outcome = producer
        .send_in_transaction(order.to_message(TOPIC))
        .await?;
    assert_eq!(outcome.state, TransactionState::Unknown);
    producer.close().await.unwrap();
    drop(producer);

    // No tx_log row: Unknown while young, then a fence and Rollback.
    let (seen, observer) = recorder();
    let checker = env
        .producer(
            OrderListener::new(env.orders.clone())
                .rollback_after(TX_TIMEOUT * 2)
                .on_check(observer),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answers(&seen)
        .iter()
        .any(|a| a.state == TransactionState::Rollback)
    {
        assert!(
            Instant::now() < deadline,
            "no rollback: {:?}",
            answers(&seen)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    checker.close().await.unwrap();
    let answered = answers(&seen);
    assert!(matches!(
        answered.last().map(|a| &a.reason),
        Some(CheckReason::Fenced { .. })
    ));

    // The fence is in tx_log, the order never appears anywhere.
    let row = env.orders.lookup(outcome.msg_id).await?;
    assert_eq!(row.map(|r| r.outcome), Some(Outcome::RolledBack));
    assert_eq!(env.consume(CONSUMERS).await?.delivered(), 0);
    let report = env.report().await?;
    assert!(report.exactly_once(), "{report}");
    assert_eq!(
        (report.placed.orders, report.placed.logged_rolled_back),
        (0, 1)
    );
    env.stop().await;
    Ok(())
}
