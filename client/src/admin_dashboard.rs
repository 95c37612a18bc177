//! [`Admin`] operations of the dashboard (`txmq dashboard`).

use txmq_protocol::{BrokerCounters, GetBrokerCounters};

use super::{Admin, BrokerAnswer};
use crate::Result;

impl Admin {
    /// Every broker's counters ([`BrokerCounters`]), one answer per broker
    /// the nameservers know, each with its own result: a broker that does
    /// not answer leaves the others' numbers usable.
    ///
    /// # Errors
    /// [`crate::Error::NoBroker`] when the nameservers know none; a
    /// nameserver's failure.
    pub async fn broker_counters(&self) -> Result<Vec<BrokerAnswer<BrokerCounters>>> {
        let targets = self.targets(None).await?;
        Ok(self.ask_each(targets, GetBrokerCounters {}).await)
    }
}
