//! The consumer's own database, a separate file from the order service's:
//! the orders it applied (`applied_orders`), running totals per item
//! (`item_totals`, the effect a duplicate would visibly double), and the
//! ids of the messages it applied (`applied_message_ids`, kept by txmq's
//! [`SqliteDedup`] for [`DEDUP_TTL`]).
//!
//! Applying a message writes all three in ONE SQLite transaction, and
//! starts by recording the message id with [`SqliteDedup::check_and_record`]:
//! when the id is there already, the message was applied before and
//! nothing else is written. So a message delivered twice (txmq delivers at
//! least once) has its effect once.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{params, TransactionBehavior};
use txmq::{MsgId, Seen, SqliteDedup};

use crate::error::{now_millis, Result};
use crate::order::Order;
use crate::sqlite::SqliteFile;

/// How long a message id is remembered: far longer than any redelivery
/// of this example's consumer can come (retries, a restart, an operator's
/// offset reset within the week). A replay from further back applies the
/// orders again, except that `applied_orders` still refuses a known order id.
pub const DEDUP_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The table of [`SqliteDedup`]'s records.
const DEDUP_TABLE: &str = "applied_message_ids";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS applied_orders (
    order_id      TEXT PRIMARY KEY,
    item          TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL,
    msg_id        TEXT NOT NULL,
    applied_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS item_totals (
    item         TEXT PRIMARY KEY,
    orders       INTEGER NOT NULL,
    amount_cents INTEGER NOT NULL
);
";

/// What [`AppliedDb::apply`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First time: the order was applied.
    Applied,
    /// The message id was applied before: nothing was written.
    Duplicate,
    /// A new message id for an order applied before under another message
    /// (someone placed the same order id twice): the message id is
    /// remembered, the order is not applied again.
    DuplicateOrder,
}

/// Counts of the consumer's database, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppliedCounts {
    /// Rows of `applied_orders`.
    pub orders: u64,
    /// Their total amount, in cents.
    pub amount_cents: i64,
    /// Message ids remembered (rows of `applied_message_ids`).
    pub messages: u64,
    /// The sum of `item_totals.orders`: orders counted into the totals.
    pub totals_orders: u64,
    /// The sum of `item_totals.amount_cents`.
    pub totals_amount_cents: i64,
}

/// The consumer's database. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct AppliedDb {
    file: SqliteFile,
    dedup: SqliteDedup,
}

impl AppliedDb {
    /// Opens (or creates) the database at `path`.
    /// Message ids older than [`DEDUP_TTL`] are forgotten here.
    ///
    /// # Errors
    /// [`Error::CreateDir`](crate::Error::CreateDir) or [`Error::Sqlite`](crate::Error::Sqlite).
    pub fn open(path: impl AsRef<Path>) -> Result<AppliedDb> {
        let file = SqliteFile::open(path.as_ref(), SCHEMA)?;
        let dedup = SqliteDedup::new(DEDUP_TABLE, DEDUP_TTL);
        file.run_here("creating the dedup table", |conn| {
            dedup.ensure_schema(conn)?;
            dedup.purge_expired(conn, SystemTime::now())
        })?;
        Ok(AppliedDb { file, dedup })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Applies `order`, carried by message `msg_id`, unless that message
    /// was applied before; returns once SQLite committed.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite); nothing was written then.
    pub async fn apply(&self, msg_id: MsgId, order: Order) -> Result<Applied> {
        let dedup = self.dedup.clone();
        self.file
            .run("applying an order", move |conn| {
                let db = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_millis();
                let msg = msg_id.to_string();
                if dedup.check_and_record(&db, msg_id, SystemTime::now())? == Seen::Duplicate {
                    // Dropping `db` rolls back (it wrote nothing anyway).
                    return Ok(Applied::Duplicate);
                }
                let new_order = db.execute(
                    "INSERT INTO applied_orders (order_id, item, amount_cents, msg_id, applied_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (order_id) DO NOTHING",
                    params![order.order_id, order.item, order.amount_cents, msg, now],
                )?;
                if new_order == 0 {
                    db.commit()?;
                    return Ok(Applied::DuplicateOrder);
                }
                db.execute(
                    "INSERT INTO item_totals (item, orders, amount_cents) VALUES (?1, 1, ?2)
                     ON CONFLICT (item) DO UPDATE SET
                         orders = orders + 1,
                         amount_cents = amount_cents + excluded.amount_cents",
                    params![order.item, order.amount_cents],
                )?;
                db.commit()?;
                Ok(Applied::Applied)
            })
            .await
    }

    /// The ids of all applied orders, sorted.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn order_ids(&self) -> Result<Vec<String>> {
        self.file
            .run("listing applied orders", |conn| {
                let mut st =
                    conn.prepare("SELECT order_id FROM applied_orders ORDER BY order_id")?;
                let ids = st.query_map([], |r| r.get(0))?;
                ids.collect()
            })
            .await
    }

    /// Row counts and totals.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn counts(&self) -> Result<AppliedCounts> {
        let dedup = self.dedup.clone();
        self.file
            .run("counting applied orders", move |conn| {
                let (orders, amount_cents) = conn.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(amount_cents), 0) FROM applied_orders",
                    [],
                    |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)),
                )?;
                let messages = dedup.len(conn)?;
                let (totals_orders, totals_amount_cents) = conn.query_row(
                    "SELECT COALESCE(SUM(orders), 0), COALESCE(SUM(amount_cents), 0) FROM item_totals",
                    [],
                    |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)),
                )?;
                Ok(AppliedCounts {
                    orders,
                    amount_cents,
                    messages,
                    totals_orders,
                    totals_amount_cents,
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_applied_twice_has_its_effect_once() -> Result<()> {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let db = AppliedDb::open(dir.path().join("applied.db"))?;
        let order = Order::sample(1);
        let msg = MsgId::generate();
        assert_eq!(db.apply(msg, order.clone()).await?, Applied::Applied);
        assert_eq!(db.apply(msg, order.clone()).await?, Applied::Duplicate);
        assert_eq!(
            db.apply(MsgId::generate(), order.clone()).await?,
            Applied::DuplicateOrder
        );
        let c = db.counts().await?;
        assert_eq!((c.orders, c.messages, c.totals_orders), (1, 2, 1));
        assert_eq!(c.amount_cents, order.amount_cents);
        assert_eq!(c.totals_amount_cents, order.amount_cents);
        assert_eq!(db.order_ids().await?, ["order-0001"]);
        Ok(())
    }
}
