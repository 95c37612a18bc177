//! Consumer-side deduplication: apply a message's effect at most once per
//! key, so that at-least-once delivery becomes an effect that happens once.
//!
//! txmq delivers every message at least once: a consumer that dies after
//! applying a message but before its group's offset is committed, a
//! rebalance, a retry after a handler error or an operator's offset reset
//! all deliver a message again. A handler that must not repeat its effect
//! (charge a card, count an order) remembers the keys it applied, for a
//! while, and skips a key it has seen.
//!
//! - The **key** is the message's msg id by default ([`DedupKey`] converts
//!   from a [`MsgId`] or a [`ReceivedMessage`]), which covers every
//!   redelivery by the broker. A **business key** (an order id, say) also
//!   covers a producer that sent the same thing twice under different msg
//!   ids. Use one kind of key per store.
//! - Records **expire** after a TTL: a key applied longer ago than the TTL
//!   counts as fresh again. The TTL must exceed the longest time after its
//!   first delivery that a message can come again: the retry back-offs
//!   times the maximum reconsume times, the rebalance and offset-commit
//!   intervals, and any offset reset an operator may do. A replay from an
//!   offset older than the TTL applies those messages again.
//! - A **failed effect is not recorded**: the next delivery applies it again.
//!
//! Two stores:
//!
//! - [`MemoryDedup`]: in the process's memory, for effects that live there
//!   too (a cache, a counter) or that are idempotent downstream anyway. It
//!   forgets everything when the process exits.
//! - `SqliteDedup` (cargo feature `sqlite`): a table in the caller's SQLite
//!   database, whose check-and-record runs inside the caller's own
//!   transaction, so that the business write and the dedup record commit,
//!   or roll back, together. That is the one that gives an effect exactly
//!   once across crashes: with the record in another store, a crash between
//!   the two writes either loses the effect (record first) or repeats it
//!   (effect first).
//!
//! They do not share a trait on purpose: the memory store runs an async
//! effect, the SQLite store a synchronous one on the caller's transaction,
//! and the transaction is the point.

mod memory;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt;

pub use memory::MemoryDedup;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteDedup;

use crate::ReceivedMessage;
use txmq_protocol::MsgId;

/// What a deduplicator remembers: a message's msg id (the default, from a
/// [`MsgId`] or a [`ReceivedMessage`]) or a business key chosen by the user
/// (from a string).
///
/// ```
/// use txmq::{DedupKey, MsgId};
///
/// let id = MsgId::generate();
/// assert_eq!(DedupKey::from(id).as_str(), id.to_string());
/// assert_eq!(DedupKey::from("order-42").as_str(), "order-42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(String);

impl DedupKey {
    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<MsgId> for DedupKey {
    fn from(id: MsgId) -> DedupKey {
        DedupKey(id.to_string())
    }
}

impl From<&ReceivedMessage> for DedupKey {
    /// The message's msg id.
    fn from(m: &ReceivedMessage) -> DedupKey {
        DedupKey::from(m.msg_id())
    }
}

impl From<&str> for DedupKey {
    fn from(key: &str) -> DedupKey {
        DedupKey(key.to_string())
    }
}

impl From<String> for DedupKey {
    fn from(key: String) -> DedupKey {
        DedupKey(key)
    }
}

impl From<&String> for DedupKey {
    fn from(key: &String) -> DedupKey {
        DedupKey(key.clone())
    }
}

/// Whether a key was seen before, as a check-and-record answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen within the TTL: it is recorded now, apply the effect.
    Fresh,
    /// Recorded within the TTL: the effect was applied, skip it.
    Duplicate,
}

/// What an `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deduped<T> {
    /// The key was fresh: the effect ran, succeeded and returned this; the
    /// key is recorded.
    Applied(T),
    /// The key was applied before (within the TTL): the effect did not run.
    Duplicate,
}

impl<T> Deduped<T> {
    /// True for [`Deduped::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Deduped::Duplicate)
    }

    /// The effect's value, when it ran.
    pub fn applied(self) -> Option<T> {
        match self {
            Deduped::Applied(v) => Some(v),
            Deduped::Duplicate => None,
        }
    }
}
