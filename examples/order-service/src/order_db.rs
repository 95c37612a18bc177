//! The order service's own database: the `orders` table, and the
//! `tx_log` table that says which txmq transaction each order was placed
//! under, written in the same SQLite transaction as the order.
//!
//! `tx_log` is what check-backs read. It is keyed by message id, not by
//! transaction id: a transaction id is a position in one broker's commit
//! log, unique only on that broker and only while its data directory
//! lives, while a message id is unique everywhere. The broker name and
//! transaction id are stored beside it and compared on every check.
//!
//! A row is either `committed` (the order was written under that
//! transaction) or `rolled_back` (a check-back found no order long after
//! the prepare and wrote this row to fence the local transaction off:
//! should that late transaction still try to commit, its insert of the
//! same message id fails, so an order can never appear after its message
//! was rolled back).

use std::path::Path;

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use txmq::MsgId;

use crate::error::{now_millis, Result};
use crate::order::Order;
use crate::sqlite::SqliteFile;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id      TEXT PRIMARY KEY,
    item          TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tx_log (
    msg_id       TEXT PRIMARY KEY,
    broker_name  TEXT NOT NULL,
    tx_id        INTEGER NOT NULL,
    order_id     TEXT NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('committed', 'rolled_back')),
    logged_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tx_log_by_tx ON tx_log (broker_name, tx_id);
CREATE TABLE IF NOT EXISTS order_seq (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    next INTEGER NOT NULL
);
";

/// What the local transaction of a txmq transaction came to, as `tx_log` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The order was written.
    Committed,
    /// A check-back fenced the transaction off; no order was written.
    RolledBack,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        match s {
            "committed" => Some(Outcome::Committed),
            "rolled_back" => Some(Outcome::RolledBack),
            _ => None,
        }
    }
}

/// Which txmq transaction a `tx_log` row is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxRef {
    /// The message's id.
    pub msg_id: MsgId,
    /// The broker holding the transaction.
    pub broker_name: String,
    /// The transaction id on that broker.
    pub tx_id: u64,
    /// The order the message is about (its key).
    pub order_id: String,
}

/// A row of `tx_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxLogRow {
    /// The transaction the row was written for.
    pub tx: TxRef,
    /// What became of the local transaction.
    pub outcome: Outcome,
}

impl TxLogRow {
    /// Whether the row was written for the transaction `tx_id` on `broker`.
    pub fn is_for(&self, broker: &str, tx_id: u64) -> bool {
        self.tx.broker_name == broker && self.tx.tx_id == tx_id
    }
}

/// What [`OrderDb::record_local_transaction`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The order and its `tx_log` row were committed together.
    Committed,
    /// `tx_log` already had a row for the message (a check-back rolled it
    /// back first); nothing was written.
    AlreadyLogged(TxLogRow),
}

/// Counts of the order service's database, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrderCounts {
    /// Rows of `orders`.
    pub orders: u64,
    /// Their total amount, in cents.
    pub amount_cents: i64,
    /// `tx_log` rows `committed`.
    pub logged_committed: u64,
    /// `tx_log` rows `rolled_back`.
    pub logged_rolled_back: u64,
}

/// The order service's database. Cloning is cheap; `place` and
/// `serve-checks` may open the same file from two processes.
#[derive(Debug, Clone)]
pub struct OrderDb {
    file: SqliteFile,
}

impl OrderDb {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    /// [`Error::CreateDir`](crate::Error::CreateDir) or [`Error::Sqlite`](crate::Error::Sqlite).
    pub fn open(path: impl AsRef<Path>) -> Result<OrderDb> {
        Ok(OrderDb {
            file: SqliteFile::open(path.as_ref(), SCHEMA)?,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Reserves the next `n` order numbers (durably, so two runs never
    /// place the same order id) and returns their sample orders.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn next_orders(&self, n: u64) -> Result<Vec<Order>> {
        let first: u64 = self
            .file
            .run("reserving order ids", move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute(
                    "INSERT INTO order_seq (id, next) VALUES (0, 1) ON CONFLICT (id) DO NOTHING",
                    [],
                )?;
                let first: u64 = tx.query_row("SELECT next FROM order_seq", [], |r| r.get(0))?;
                tx.execute(
                    "UPDATE order_seq SET next = next + ?1",
                    [i64::try_from(n).unwrap_or(i64::MAX)],
                )?;
                tx.commit()?;
                Ok(first)
            })
            .await?;
        Ok((first..first.saturating_add(n))
            .map(Order::sample)
            .collect())
    }

    /// The local transaction: inserts `order` into `orders` and a
    /// `committed` row for `tx` into `tx_log`, in ONE SQLite transaction,
    /// which has returned once SQLite committed it. When `tx_log` already
    /// has a row for the message (a check-back fenced it off), writes
    /// nothing and returns that row.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite), say for an order id that
    /// exists already; nothing was written then.
    pub async fn record_local_transaction(&self, tx: TxRef, order: Order) -> Result<Recorded> {
        let file = self.file.clone();
        let found = self
            .file
            .run("recording the local transaction", move |conn| {
                // IMMEDIATE takes the write lock now, so the look-up and the
                // inserts see no check-back's fence in between.
                let db = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if let Some(raw) = lookup_raw(&db, &tx.msg_id)? {
                    return Ok(Some(raw));
                }
                let now = now_millis();
                db.execute(
                    "INSERT INTO orders (order_id, item, amount_cents, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![order.order_id, order.item, order.amount_cents, now],
                )?;
                insert_log(&db, &tx, Outcome::Committed, now)?;
                db.commit()?;
                Ok(None)
            })
            .await?;
        match found {
            None => Ok(Recorded::Committed),
            Some(raw) => Ok(Recorded::AlreadyLogged(raw.parse(&file)?)),
        }
    }

    /// The `tx_log` row of message `msg_id`, if any.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite); [`Error::Corrupt`](crate::Error::Corrupt)
    /// for a row this example did not write.
    pub async fn lookup(&self, msg_id: MsgId) -> Result<Option<TxLogRow>> {
        let raw = self
            .file
            .run("looking up the transaction log", move |conn| {
                lookup_raw(conn, &msg_id)
            })
            .await?;
        raw.map(|r| r.parse(&self.file)).transpose()
    }

    /// Fences the local transaction of `tx` off: writes a `rolled_back`
    /// row for it unless `tx_log` has a row for the message already, and
    /// returns the row now in the table (the new one, or the one a local
    /// transaction committed just before).
    ///
    /// # Errors
    /// As [`OrderDb::lookup`].
    pub async fn fence_rollback(&self, tx: TxRef) -> Result<TxLogRow> {
        let fence = tx.clone();
        let existing = self
            .file
            .run("writing a rollback fence", move |conn| {
                let db = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if let Some(raw) = lookup_raw(&db, &fence.msg_id)? {
                    return Ok(Some(raw));
                }
                insert_log(&db, &fence, Outcome::RolledBack, now_millis())?;
                db.commit()?;
                Ok(None)
            })
            .await?;
        match existing {
            Some(raw) => raw.parse(&self.file),
            None => Ok(TxLogRow {
                tx,
                outcome: Outcome::RolledBack,
            }),
        }
    }

    /// The ids of all orders, sorted.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn order_ids(&self) -> Result<Vec<String>> {
        self.file
            .run("listing orders", |conn| {
                let mut st = conn.prepare("SELECT order_id FROM orders ORDER BY order_id")?;
                let ids = st.query_map([], |r| r.get(0))?;
                ids.collect()
            })
            .await
    }

    /// Row counts and the total amount.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn counts(&self) -> Result<OrderCounts> {
        self.file
            .run("counting orders", |conn| {
                let (orders, amount_cents) = conn.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(amount_cents), 0) FROM orders",
                    [],
                    |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)),
                )?;
                let logged = |outcome: Outcome| {
                    conn.query_row(
                        "SELECT COUNT(*) FROM tx_log WHERE outcome = ?1",
                        [outcome.as_str()],
                        |r| r.get::<_, u64>(0),
                    )
                };
                Ok(OrderCounts {
                    orders,
                    amount_cents,
                    logged_committed: logged(Outcome::Committed)?,
                    logged_rolled_back: logged(Outcome::RolledBack)?,
                })
            })
            .await
    }
}

/// A `tx_log` row as stored, before its text is checked.
#[derive(Debug)]
struct RawRow {
    msg_id: String,
    broker_name: String,
    tx_id: i64,
    order_id: String,
    outcome: String,
}

impl RawRow {
    fn parse(self, file: &SqliteFile) -> Result<TxLogRow> {
        let msg_id = MsgId::parse(&self.msg_id)
            .ok_or_else(|| file.corrupt(format!("message id {:?} in tx_log", self.msg_id)))?;
        let outcome = Outcome::parse(&self.outcome)
            .ok_or_else(|| file.corrupt(format!("outcome {:?} in tx_log", self.outcome)))?;
        let tx_id = u64::try_from(self.tx_id)
            .map_err(|_| file.corrupt(format!("transaction id {} in tx_log", self.tx_id)))?;
        Ok(TxLogRow {
            tx: TxRef {
                msg_id,
                broker_name: self.broker_name,
                tx_id,
                order_id: self.order_id,
            },
            outcome,
        })
    }
}

fn lookup_raw(conn: &rusqlite::Connection, msg_id: &MsgId) -> rusqlite::Result<Option<RawRow>> {
    conn.query_row(
        "SELECT msg_id, broker_name, tx_id, order_id, outcome FROM tx_log WHERE msg_id = ?1",
        [msg_id.to_string()],
        |r| {
            Ok(RawRow {
                msg_id: r.get(0)?,
                broker_name: r.get(1)?,
                tx_id: r.get(2)?,
                order_id: r.get(3)?,
                outcome: r.get(4)?,
            })
        },
    )
    .optional()
}

fn insert_log(
    conn: &rusqlite::Connection,
    tx: &TxRef,
    outcome: Outcome,
    now: i64,
) -> rusqlite::Result<()> {
    // rusqlite refuses (with an error, not a wrap) a u64 above i64::MAX;
    // transaction ids are log offsets, far below that.
    conn.execute(
        "INSERT INTO tx_log (msg_id, broker_name, tx_id, order_id, outcome, logged_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            tx.msg_id.to_string(),
            tx.broker_name,
            tx.tx_id,
            tx.order_id,
            outcome.as_str(),
            now
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(order: &Order, tx_id: u64) -> TxRef {
        TxRef {
            msg_id: MsgId::generate(),
            broker_name: "broker-a".into(),
            tx_id,
            order_id: order.order_id.clone(),
        }
    }

    fn open() -> (tempfile::TempDir, OrderDb) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let db = OrderDb::open(dir.path().join("data/orders.db"))
            .unwrap_or_else(|e| panic!("opens: {e}"));
        (dir, db)
    }

    #[tokio::test]
    async fn order_ids_are_never_handed_out_twice() -> Result<()> {
        let (dir, db) = open();
        let a = db.next_orders(2).await?;
        let b = OrderDb::open(dir.path().join("data/orders.db"))?
            .next_orders(1)
            .await?;
        let ids: Vec<&str> = a.iter().chain(&b).map(|o| o.order_id.as_str()).collect();
        assert_eq!(ids, ["order-0001", "order-0002", "order-0003"]);
        Ok(())
    }

    #[tokio::test]
    async fn the_order_and_its_log_row_are_written_together() -> Result<()> {
        let (_dir, db) = open();
        let order = Order::sample(1);
        let t = tx(&order, 42);
        assert_eq!(
            db.record_local_transaction(t.clone(), order.clone())
                .await?,
            Recorded::Committed
        );
        let row = db.lookup(t.msg_id).await?;
        assert_eq!(
            row,
            Some(TxLogRow {
                tx: t.clone(),
                outcome: Outcome::Committed
            })
        );
        // The same order id again fails as a whole: no second log row.
        let again = tx(&order, 43);
        assert!(db
            .record_local_transaction(again.clone(), order)
            .await
            .is_err());
        assert_eq!(db.lookup(again.msg_id).await?, None);
        let counts = db.counts().await?;
        assert_eq!((counts.orders, counts.logged_committed), (1, 1));
        Ok(())
    }

    #[tokio::test]
    async fn a_rollback_fence_keeps_a_late_local_transaction_out() -> Result<()> {
        let (_dir, db) = open();
        let order = Order::sample(5);
        let t = tx(&order, 7);
        let fenced = db.fence_rollback(t.clone()).await?;
        assert_eq!(fenced.outcome, Outcome::RolledBack);
        let late = db.record_local_transaction(t.clone(), order).await?;
        assert_eq!(late, Recorded::AlreadyLogged(fenced));
        assert_eq!(db.order_ids().await?, Vec::<String>::new());
        // Fencing a committed transaction changes nothing.
        let other = Order::sample(6);
        let t2 = tx(&other, 8);
        db.record_local_transaction(t2.clone(), other).await?;
        assert_eq!(db.fence_rollback(t2).await?.outcome, Outcome::Committed);
        Ok(())
    }
}
