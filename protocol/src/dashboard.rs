//! The request of the dashboard (`txmq dashboard`): a broker's counters
//! since it started, sampled every few seconds to draw rates. Its
//! `Request` variant is in `request.rs`.

use serde::{Deserialize, Serialize};

use crate::request::TxCounters;

/// Anyone signed in -> broker: its traffic, transaction and store counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetBrokerCounters {}

/// One topic's traffic on a broker since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicTraffic {
    /// The topic.
    pub topic: String,
    /// Messages stored.
    pub messages_in: u64,
    /// Messages handed to consumers.
    pub messages_out: u64,
}

/// A broker's counters: totals since it started, except `tx.pending` and
/// `store_bytes` (now). Rates come from the difference of two samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerCounters {
    /// The broker's name.
    pub broker_name: String,
    /// Messages stored (all topics).
    pub messages_in: u64,
    /// Body bytes stored.
    pub bytes_in: u64,
    /// Messages handed to consumers.
    pub messages_out: u64,
    /// Body bytes handed to consumers.
    pub bytes_out: u64,
    /// Transactions prepared, committed, rolled back, checked, parked;
    /// pending now.
    pub tx: TxCounters,
    /// Bytes of records the commit log holds now.
    pub store_bytes: u64,
    /// Per topic, sorted by name (topics that saw traffic since start).
    pub topics: Vec<TopicTraffic>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Call, Request, Response};

    #[test]
    fn counters_round_trip_through_messagepack() {
        let c = BrokerCounters {
            broker_name: "broker-a".into(),
            messages_in: 7,
            bytes_in: 70,
            tx: TxCounters {
                prepared: 3,
                pending: 1,
                ..TxCounters::default()
            },
            topics: vec![TopicTraffic {
                topic: "orders".into(),
                messages_in: 7,
                messages_out: 2,
            }],
            ..BrokerCounters::default()
        };
        let bytes = rmp_serde::to_vec(&Response::GetBrokerCounters(Box::new(c.clone())))
            .unwrap_or_default();
        let back: Result<Response, _> = rmp_serde::from_slice(&bytes);
        assert!(matches!(back, Ok(Response::GetBrokerCounters(b)) if *b == c));
        assert_eq!(
            GetBrokerCounters {}.into_request().kind(),
            "GetBrokerCounters"
        );
        assert!(matches!(
            GetBrokerCounters {}.into_request(),
            Request::GetBrokerCounters(_)
        ));
    }
}
