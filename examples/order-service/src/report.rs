//! Comparing what the order service placed with what the consumer applied.

use std::collections::BTreeSet;
use std::fmt;

use crate::applied_db::{AppliedCounts, AppliedDb};
use crate::order_db::{OrderCounts, OrderDb};
use crate::Result;

/// Orders placed versus orders applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The order service's database.
    pub placed: OrderCounts,
    /// The consumer's database.
    pub applied: AppliedCounts,
    /// Orders placed but not applied (yet): their message is not
    /// committed yet, or not consumed yet.
    pub missing: Vec<String>,
    /// Orders applied that were never placed (there should be none).
    pub unexpected: Vec<String>,
}

impl Report {
    /// Reads both databases.
    ///
    /// # Errors
    /// [`Error::Sqlite`](crate::Error::Sqlite).
    pub async fn build(orders: &OrderDb, applied: &AppliedDb) -> Result<Report> {
        let placed_ids: BTreeSet<String> = orders.order_ids().await?.into_iter().collect();
        let applied_ids: BTreeSet<String> = applied.order_ids().await?.into_iter().collect();
        Ok(Report {
            placed: orders.counts().await?,
            applied: applied.counts().await?,
            missing: placed_ids.difference(&applied_ids).cloned().collect(),
            unexpected: applied_ids.difference(&placed_ids).cloned().collect(),
        })
    }

    /// Whether every order placed was applied exactly once: the same
    /// orders on both sides, the same total amount, and the per-item
    /// totals counting each order once.
    pub fn exactly_once(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.applied.orders == self.placed.orders
            && self.applied.totals_orders == self.applied.orders
            && self.applied.amount_cents == self.placed.amount_cents
            && self.applied.totals_amount_cents == self.placed.amount_cents
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.placed;
        let a = &self.applied;
        writeln!(
            f,
            "placed:  {} orders, {} (tx_log: {} committed, {} rolled back)",
            p.orders,
            money(p.amount_cents),
            p.logged_committed,
            p.logged_rolled_back
        )?;
        writeln!(
            f,
            "applied: {} orders, {} (item totals: {} orders, {}; {} distinct messages applied)",
            a.orders,
            money(a.amount_cents),
            a.totals_orders,
            money(a.totals_amount_cents),
            a.messages
        )?;
        if !self.missing.is_empty() {
            writeln!(f, "not applied (yet): {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            writeln!(
                f,
                "applied but never placed: {}",
                self.unexpected.join(", ")
            )?;
        }
        if self.exactly_once() {
            write!(f, "OK: every placed order was applied exactly once")
        } else {
            write!(f, "MISMATCH: placed and applied orders differ")
        }
    }
}

/// Cents as `$12.34`.
pub fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}${}.{:02}", c / 100, c % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_like_money() {
        assert_eq!(money(0), "$0.00");
        assert_eq!(money(12_345), "$123.45");
        assert_eq!(money(-5), "-$0.05");
    }
}
