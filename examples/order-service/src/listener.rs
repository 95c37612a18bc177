//! [`OrderListener`]: the order service's [`TransactionListener`].
//!
//! `execute` writes the order and its `tx_log` row in one SQLite
//! transaction and commits the message. `check` answers the broker from
//! `tx_log` alone, so any process of the producer group that can open the
//! database answers for every order, including those of a process that
//! crashed between prepare and commit:
//!
//! | `tx_log` row for the message | answer |
//! |---|---|
//! | `committed`, for this broker and transaction | Commit |
//! | `rolled_back` (a fence), for this transaction | Rollback |
//! | for another transaction (a prepare that was retried: the broker holds two halves of one message, and the local transaction ran for the other) | Rollback |
//! | none, message younger than `rollback_after` | Unknown: `execute` may still be running; the broker asks again |
//! | none, message older than `rollback_after` | Rollback, after writing a `rolled_back` fence row |
//!
//! The fence makes the rollback safe even if the local transaction was
//! only slow, not dead: the fence and the local transaction both insert
//! the message's row under SQLite's write lock, so exactly one of them
//! wins, and a local transaction that comes too late writes no order.
//! The age is measured from the message's `born_timestamp` (the producer's
//! clock; the processes of one group are expected to share a clock).

use std::sync::Mutex;
use std::time::Duration;

use txmq::{
    BoxError, CheckRequest, Message, MsgId, TransactionListener, TransactionState, TxContext,
};

use crate::order::Order;
use crate::order_db::{OrderDb, Outcome, Recorded, TxLogRow, TxRef};

/// How long after a prepare `check` keeps answering Unknown for a message
/// with no `tx_log` row before it rolls it back (60 s). Long enough for any
/// `execute` that is still alive to finish; the fence keeps a slower one
/// out in any case.
pub const DEFAULT_ROLLBACK_AFTER: Duration = Duration::from_secs(60);

/// The process exit code of [`AfterLocalCommit::Exit`] in the binary.
pub const CRASH_EXIT_CODE: i32 = 3;

/// What `execute` does once the local transaction has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLocalCommit {
    /// Answer Commit: the producer commits the message at once (the normal case).
    Commit,
    /// Answer Unknown: the producer leaves the transaction prepared and the
    /// broker checks back after its transaction timeout. Tests use it to
    /// stand for a crash without ending the test process.
    LeaveUnended,
    /// Print a note to stderr and exit the process with this code at once,
    /// before the producer tells the broker anything: a crash between
    /// prepare and commit, for the demo.
    Exit(i32),
}

/// Why [`OrderListener::check`] answered as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckReason {
    /// `tx_log` has a row for this very transaction.
    Logged(Outcome),
    /// `tx_log` has the message under another transaction: this one is a
    /// stray half of a retried prepare.
    OtherTransaction {
        /// The broker of the logged transaction.
        broker_name: String,
        /// Its id.
        tx_id: u64,
    },
    /// No row yet, and the message is younger than `rollback_after`.
    NotYetLogged {
        /// The message's age.
        age: Duration,
    },
    /// No row, and the message is older than `rollback_after`: a
    /// `rolled_back` fence row was written.
    Fenced {
        /// The message's age.
        age: Duration,
    },
    /// The database could not be read; the check counts as Unknown.
    Failed(String),
}

impl std::fmt::Display for CheckReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckReason::Logged(Outcome::Committed) => {
                write!(f, "order found in tx_log (committed)")
            }
            CheckReason::Logged(Outcome::RolledBack) => {
                write!(f, "tx_log says rolled back")
            }
            CheckReason::OtherTransaction { broker_name, tx_id } => write!(
                f,
                "tx_log has the message under tx {tx_id} on {broker_name}: a stray prepare"
            ),
            CheckReason::NotYetLogged { age } => write!(
                f,
                "not in tx_log, prepared {} ago: the local transaction may still run",
                humanize(*age)
            ),
            CheckReason::Fenced { age } => write!(
                f,
                "not in tx_log {} after the prepare: fenced off",
                humanize(*age)
            ),
            CheckReason::Failed(e) => write!(f, "cannot read tx_log: {e}"),
        }
    }
}

/// One check-back answered, as [`OrderListener::on_check`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckAnswer {
    /// The transaction id.
    pub tx_id: u64,
    /// The broker that asked.
    pub broker_name: String,
    /// The (first) message of the transaction.
    pub msg_id: MsgId,
    /// Its key: the order id.
    pub order_id: Option<String>,
    /// How many checks the broker sent for it before this one.
    pub checks: u32,
    /// The answer.
    pub state: TransactionState,
    /// Why.
    pub reason: CheckReason,
}

type CheckObserver = Box<dyn Fn(&CheckAnswer) + Send + Sync>;

/// The order service's listener: see the [module docs](self).
pub struct OrderListener {
    db: OrderDb,
    rollback_after: Duration,
    after_local_commit: Mutex<AfterLocalCommit>,
    on_check: Option<CheckObserver>,
}

impl std::fmt::Debug for OrderListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderListener")
            .field("db", &self.db.path())
            .field("rollback_after", &self.rollback_after)
            .field("after_local_commit", &self.after_local_commit())
            .field("on_check", &self.on_check.is_some())
            .finish()
    }
}

impl OrderListener {
    /// A listener on `db` that commits after the local transaction and
    /// rolls back unlogged messages after [`DEFAULT_ROLLBACK_AFTER`].
    pub fn new(db: OrderDb) -> OrderListener {
        OrderListener {
            db,
            rollback_after: DEFAULT_ROLLBACK_AFTER,
            after_local_commit: Mutex::new(AfterLocalCommit::Commit),
            on_check: None,
        }
    }

    /// How long after a prepare a message with no `tx_log` row is rolled back.
    pub fn rollback_after(mut self, age: Duration) -> OrderListener {
        self.rollback_after = age;
        self
    }

    /// Calls `f` for every check-back answered (to print it, say).
    pub fn on_check(mut self, f: impl Fn(&CheckAnswer) + Send + Sync + 'static) -> OrderListener {
        self.on_check = Some(Box::new(f));
        self
    }

    /// What `execute` does after the local transaction from now on.
    pub fn set_after_local_commit(&self, after: AfterLocalCommit) {
        *self
            .after_local_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = after;
    }

    /// What `execute` does after the local transaction.
    pub fn after_local_commit(&self) -> AfterLocalCommit {
        *self
            .after_local_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The database.
    pub fn db(&self) -> &OrderDb {
        &self.db
    }

    async fn answer(&self, req: &CheckRequest) -> crate::Result<(TransactionState, CheckReason)> {
        let msg = req.message();
        if let Some(row) = self.db.lookup(req.msg_id()).await? {
            return Ok(decide(&row, req.broker_name(), req.tx_id()));
        }
        let age = age_of(msg);
        if age < self.rollback_after {
            return Ok((TransactionState::Unknown, CheckReason::NotYetLogged { age }));
        }
        let fence = TxRef {
            msg_id: req.msg_id(),
            broker_name: req.broker_name().to_string(),
            tx_id: req.tx_id(),
            order_id: msg.key().unwrap_or_default().to_string(),
        };
        let row = self.db.fence_rollback(fence).await?;
        if row.outcome == Outcome::RolledBack && row.is_for(req.broker_name(), req.tx_id()) {
            return Ok((TransactionState::Rollback, CheckReason::Fenced { age }));
        }
        // The local transaction committed between the look-up and the fence.
        Ok(decide(&row, req.broker_name(), req.tx_id()))
    }
}

impl TransactionListener for OrderListener {
    /// Writes the order and its `tx_log` row in one SQLite transaction,
    /// then does what [`OrderListener::after_local_commit`] says.
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        let order = match Order::from_body(msg.body()) {
            Ok(order) => order,
            Err(e) => {
                // Nothing to write, so nothing to announce.
                tracing::warn!(msg_id = %ctx.msg_id(), error = %e, "not an order; rolling back");
                return Ok(TransactionState::Rollback);
            }
        };
        let order_id = order.order_id.clone();
        let tx = TxRef {
            msg_id: ctx.msg_id(),
            broker_name: ctx.broker_name().to_string(),
            tx_id: ctx.tx_id(),
            order_id: order.order_id.clone(),
        };
        match self.db.record_local_transaction(tx, order).await? {
            Recorded::Committed => {}
            Recorded::AlreadyLogged(row) => {
                let (state, reason) = decide(&row, ctx.broker_name(), ctx.tx_id());
                tracing::warn!(%order_id, tx_id = ctx.tx_id(), %reason, "a check-back decided first");
                return Ok(state);
            }
        }
        match self.after_local_commit() {
            AfterLocalCommit::Commit => Ok(TransactionState::Commit),
            AfterLocalCommit::LeaveUnended => Ok(TransactionState::Unknown),
            AfterLocalCommit::Exit(code) => {
                eprintln!(
                    "CRASH {order_id}: local transaction committed (tx {} on {}, msg_id={}), \
                     exiting before the broker hears COMMIT",
                    ctx.tx_id(),
                    ctx.broker_name(),
                    ctx.msg_id()
                );
                std::process::exit(code)
            }
        }
    }

    /// Answers from `tx_log`: see the [module docs](self).
    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        let result = self.answer(req).await;
        let (state, reason) = match &result {
            Ok((state, reason)) => (*state, reason.clone()),
            Err(e) => (
                TransactionState::Unknown,
                CheckReason::Failed(e.to_string()),
            ),
        };
        if let Some(f) = &self.on_check {
            f(&CheckAnswer {
                tx_id: req.tx_id(),
                broker_name: req.broker_name().to_string(),
                msg_id: req.msg_id(),
                order_id: req.message().key().map(str::to_string),
                checks: req.checks(),
                state,
                reason,
            });
        }
        Ok(result?.0)
    }
}

/// The answer a `tx_log` row gives for transaction `tx_id` on `broker`.
fn decide(row: &TxLogRow, broker: &str, tx_id: u64) -> (TransactionState, CheckReason) {
    if !row.is_for(broker, tx_id) {
        let reason = CheckReason::OtherTransaction {
            broker_name: row.tx.broker_name.clone(),
            tx_id: row.tx.tx_id,
        };
        return (TransactionState::Rollback, reason);
    }
    let state = match row.outcome {
        Outcome::Committed => TransactionState::Commit,
        Outcome::RolledBack => TransactionState::Rollback,
    };
    (state, CheckReason::Logged(row.outcome))
}

/// How long ago `msg` was created, by this process's clock.
fn age_of(msg: &Message) -> Duration {
    let now = crate::error::now_millis();
    let born = i64::try_from(msg.born_timestamp()).unwrap_or(i64::MAX);
    Duration::from_millis(u64::try_from(now.saturating_sub(born)).unwrap_or(0))
}

/// `age` to tenths of a second, as humans read it.
fn humanize(age: Duration) -> String {
    format!("{:.1}s", age.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn open() -> (tempfile::TempDir, OrderDb) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let db = OrderDb::open(dir.path().join("orders.db")).unwrap_or_else(|e| panic!("{e}"));
        (dir, db)
    }

    fn check_of(msg: &Message, broker: &str, tx_id: u64) -> CheckRequest {
        CheckRequest::new(tx_id, broker, "pg", vec![msg.clone()], 0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn check(l: &OrderListener, req: &CheckRequest) -> TransactionState {
        txmq::transaction::state_of(l.check(req).await)
    }

    #[tokio::test]
    async fn execute_commits_after_writing_and_check_finds_it() -> crate::Result<()> {
        let (_dir, db) = open();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let l = OrderListener::new(db.clone()).on_check(move |a| {
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(a.clone());
        });
        let msg = Order::sample(1)
            .to_message("orders")
            .with_msg_id(txmq::MsgId::generate());
        let ctx = TxContext::new(10, "broker-a", "pg", vec![msg.clone()]);
        let state = txmq::transaction::state_of(l.execute(&msg, &ctx).await);
        assert_eq!(state, TransactionState::Commit);
        assert_eq!(db.order_ids().await?, ["order-0001"]);
        assert_eq!(
            check(&l, &check_of(&msg, "broker-a", 10)).await,
            TransactionState::Commit
        );
        // A stray half of the same message (a retried prepare) is rolled back.
        assert_eq!(
            check(&l, &check_of(&msg, "broker-a", 99)).await,
            TransactionState::Rollback
        );
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].reason, CheckReason::Logged(Outcome::Committed));
        assert_eq!(seen[0].order_id.as_deref(), Some("order-0001"));
        assert!(matches!(
            seen[1].reason,
            CheckReason::OtherTransaction { tx_id: 10, .. }
        ));
        Ok(())
    }

    #[tokio::test]
    async fn leave_unended_writes_the_order_but_answers_unknown() -> crate::Result<()> {
        let (_dir, db) = open();
        let l = OrderListener::new(db.clone());
        l.set_after_local_commit(AfterLocalCommit::LeaveUnended);
        let msg = Order::sample(2)
            .to_message("orders")
            .with_msg_id(txmq::MsgId::generate());
        let ctx = TxContext::new(11, "broker-a", "pg", vec![msg.clone()]);
        let state = txmq::transaction::state_of(l.execute(&msg, &ctx).await);
        assert_eq!(state, TransactionState::Unknown);
        assert_eq!(db.order_ids().await?, ["order-0002"]);
        Ok(())
    }

    #[tokio::test]
    async fn an_unlogged_message_is_unknown_while_young_then_fenced_and_rolled_back(
    ) -> crate::Result<()> {
        let (_dir, db) = open();
        let l = OrderListener::new(db.clone()).rollback_after(Duration::from_secs(60));
        let young = Order::sample(3)
            .to_message("orders")
            .with_msg_id(txmq::MsgId::generate());
        assert_eq!(
            check(&l, &check_of(&young, "broker-a", 12)).await,
            TransactionState::Unknown
        );
        // A message sent two minutes ago, as the broker hands it back.
        let order = Order::sample(4);
        let mut sent = txmq::WireMessage::new("orders", order.to_message("orders").body().clone())
            .with_key(order.order_id.clone());
        sent.born_timestamp = sent.born_timestamp.saturating_sub(120_000);
        let old = Message::from(sent);
        assert_eq!(
            check(&l, &check_of(&old, "broker-a", 13)).await,
            TransactionState::Rollback
        );
        // The local transaction, had it been only slow, now writes nothing.
        let ctx = TxContext::new(13, "broker-a", "pg", vec![old.clone()]);
        let late = txmq::transaction::state_of(l.execute(&old, &ctx).await);
        assert_eq!(late, TransactionState::Rollback);
        assert!(db.order_ids().await?.is_empty());
        // And the broker asking again gets the same answer.
        assert_eq!(
            check(&l, &check_of(&old, "broker-a", 13)).await,
            TransactionState::Rollback
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_message_that_is_not_an_order_is_rolled_back() {
        let (_dir, db) = open();
        let l = OrderListener::new(db);
        let msg = Message::new("orders", "hello");
        let ctx = TxContext::new(1, "broker-a", "pg", vec![msg.clone()]);
        let state = txmq::transaction::state_of(l.execute(&msg, &ctx).await);
        assert_eq!(state, TransactionState::Rollback);
    }
}
