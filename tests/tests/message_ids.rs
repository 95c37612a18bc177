//! Message ids as a user meets them (issue 21), against a real broker
//! process:
//!
//! - a message cloned and sent twice is two messages: stored twice, under
//!   two ids, both consumed;
//! - a message given an id with `with_msg_id` and sent in two transactions
//!   is stored once: the second is refused with `DUPLICATE_MSG_ID` and runs
//!   no local transaction;
//! - an id assigned at send is the one the receipt (or the transaction's
//!   outcome), the listener and the consumer see.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{body_text, create_topic, start_broker};
use txmq::{
    BoxError, CheckRequest, ErrorCode, Message, MsgId, TransactionListener, TransactionProducer,
    TransactionState, TxContext, TxState,
};
use txmq_tests::{consume_all, BrokerProcess, Cluster};

/// A nameserver in this process and one broker process, `broker-a`.
async fn cluster(topic: &str) -> (Cluster, BrokerProcess, tempfile::TempDir) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let tmp = tempfile::tempdir().unwrap();
    let broker = start_broker(
        &tmp.path().join("broker-a"),
        &cluster.nameserver,
        "broker-a",
        &[],
    )
    .await;
    create_topic(&cluster.nameserver, topic, 2).await;
    (cluster, broker, tmp)
}

/// Commits every transaction, noting the ids `execute` was handed.
#[derive(Default)]
struct Commits {
    executed: Mutex<Vec<(MsgId, Option<MsgId>)>>,
}

impl TransactionListener for Commits {
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        self.executed
            .lock()
            .unwrap()
            .push((ctx.msg_id(), msg.msg_id()));
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

async fn tx_producer(
    ns: &str,
    group: &str,
    listener: Arc<Commits>,
) -> TransactionProducer<Commits> {
    TransactionProducer::builder()
        .nameserver(ns)
        .group(group)
        .listener_arc(listener)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_sent_again_is_a_second_message_with_its_own_id() {
    const TOPIC: &str = "clones";
    let (cluster, _broker, _tmp) = cluster(TOPIC).await;
    let producer = cluster.producer().await;
    let original = Message::new(TOPIC, "twice").with_key("k");
    let copy = original.clone();
    let first = producer.send(original).await.unwrap();
    let second = producer.send(copy).await.unwrap();
    assert_ne!(first.msg_id, second.msg_id, "two sends, two ids");
    assert!(!first.duplicate && !second.duplicate);

    let got = consume_all(&cluster.nameserver, "cg", TOPIC, 2, Duration::from_secs(2)).await;
    let ids: HashSet<MsgId> = got.iter().map(|m| m.msg_id()).collect();
    assert_eq!(got.len(), 2, "both stored and consumed");
    assert_eq!(ids, HashSet::from([first.msg_id, second.msg_id]));
    assert!(got
        .iter()
        .all(|m| body_text(m) == "twice" && m.key() == Some("k")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_id_sent_in_two_transactions_is_stored_once() {
    const TOPIC: &str = "fixed-id";
    let (cluster, _broker, _tmp) = cluster(TOPIC).await;
    let listener = Arc::new(Commits::default());
    let producer = tx_producer(&cluster.nameserver, "pg-fixed", listener.clone()).await;
    // The local-message-table pattern: the id is chosen (and could be
    // stored) before the send.
    let id = MsgId::generate();
    let message = Message::new(TOPIC, "once").with_msg_id(id);
    let first = producer.send_in_transaction(message.clone()).await.unwrap();
    assert_eq!(first.msg_id, id);
    assert_eq!(first.ended().map(|e| e.state), Some(TxState::Committed));
    let again = producer.send_in_transaction(message).await;
    let code = again.as_ref().err().and_then(|e| e.code());
    // Refused as the same message: pending, or already committed.
    assert!(
        matches!(
            code,
            Some(ErrorCode::DuplicateMsgId | ErrorCode::TransactionCommitted)
        ),
        "{again:?}"
    );
    assert_eq!(
        listener.executed.lock().unwrap().len(),
        1,
        "one local transaction"
    );

    let got = consume_all(&cluster.nameserver, "cg", TOPIC, 2, Duration::from_secs(2)).await;
    let ids: Vec<MsgId> = got.iter().map(|m| m.msg_id()).collect();
    assert_eq!(ids, [id], "stored once, under the id given");
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_assigned_at_send_is_the_one_reported_and_consumed() {
    const TOPIC: &str = "assigned";
    let (cluster, _broker, _tmp) = cluster(TOPIC).await;
    let producer = cluster.producer().await;
    let message = Message::new(TOPIC, "plain");
    assert_eq!(message.msg_id(), None, "no id before the send");
    let receipt = producer.send(message).await.unwrap();

    let listener = Arc::new(Commits::default());
    let tx = tx_producer(&cluster.nameserver, "pg-assigned", listener.clone()).await;
    let outcome = tx
        .send_in_transaction(Message::new(TOPIC, "tx"))
        .await
        .unwrap();
    assert_eq!(outcome.msg_ids, [outcome.msg_id]);
    assert_eq!(
        listener.executed.lock().unwrap().as_slice(),
        [(outcome.msg_id, Some(outcome.msg_id))],
        "the listener is handed the id the outcome reports"
    );

    let got = consume_all(&cluster.nameserver, "cg", TOPIC, 2, Duration::from_secs(2)).await;
    let by_body: Vec<(String, MsgId)> = got.iter().map(|m| (body_text(m), m.msg_id())).collect();
    assert_eq!(by_body.len(), 2, "{by_body:?}");
    assert!(
        by_body.contains(&("plain".to_string(), receipt.msg_id)),
        "{by_body:?}"
    );
    assert!(
        by_body.contains(&("tx".to_string(), outcome.msg_id)),
        "{by_body:?}"
    );
    tx.close().await.unwrap();
}
