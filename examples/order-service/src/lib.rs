//! order-service: the txmq example of a transactional message done right.
//!
//! An order service writes each order to its own SQLite database and
//! announces it on the `orders` topic, and the two must agree: no order
//! without its message, no message without its order. A
//! [`TransactionProducer`](txmq::TransactionProducer) prepares the
//! message, [`OrderListener`] writes the order and a `tx_log` row in ONE
//! SQLite transaction, and the message is committed. When the service dies
//! between the prepare and the commit, the broker checks back with another
//! member of the producer group (`serve-checks`), whose [`OrderListener`]
//! finds the `tx_log` row and answers commit.
//!
//! On the other side a consumer applies each order to its own database
//! ([`AppliedDb`]), remembering the ids of the messages it applied in the
//! same SQLite transaction (with txmq's [`SqliteDedup`](txmq::SqliteDedup)), so a message delivered twice (txmq delivers at
//! least once) is skipped: the effect is exactly once.
//!
//! Start reading at [`listener`] (the two methods that matter), then
//! [`order_db`] (what the local transaction writes), [`applied_db`] and
//! [`consume`] (the idempotent consumer); `main.rs` is the command line,
//! and README.md walks through a crash.

#![warn(missing_docs)]

pub mod applied_db;
pub mod consume;
mod error;
pub mod listener;
pub mod order;
pub mod order_db;
pub mod place;
pub mod report;
mod sqlite;

pub use applied_db::{Applied, AppliedDb};
pub use consume::{apply_messages, consume_until_idle, ConsumeStats, Handled};
pub use error::{Error, Result};
pub use listener::{
    AfterLocalCommit, CheckAnswer, CheckReason, OrderListener, CRASH_EXIT_CODE,
    DEFAULT_ROLLBACK_AFTER,
};
pub use order::Order;
pub use order_db::{OrderDb, Outcome, TxLogRow, TxRef};
pub use place::place_order;
pub use report::Report;
