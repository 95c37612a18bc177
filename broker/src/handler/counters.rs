//! `GetBrokerCounters`: the numbers the dashboard samples. Read from what
//! the broker already keeps (the metrics' per-topic counters, the
//! transaction table's counters, the store's size); nothing is counted
//! twice.

use txmq_protocol::{BrokerCounters, TopicTraffic};

use crate::BrokerInner;

pub(super) fn get(b: &BrokerInner) -> BrokerCounters {
    let mut c = BrokerCounters {
        broker_name: b.config.broker_name.clone(),
        tx: b.transactions.counters(),
        store_bytes: b.store.disk_usage().1,
        ..BrokerCounters::default()
    };
    for (topic, messages_in, bytes_in, messages_out, bytes_out) in b.metrics.traffic() {
        c.messages_in += messages_in;
        c.bytes_in += bytes_in;
        c.messages_out += messages_out;
        c.bytes_out += bytes_out;
        c.topics.push(TopicTraffic {
            topic,
            messages_in,
            messages_out,
        });
    }
    c
}
