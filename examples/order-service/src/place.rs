//! Placing an order: one transactional send, whose local transaction
//! ([`OrderListener::execute`](crate::OrderListener)) writes the order.

use txmq::{TransactionProducer, TxOutcome};

use crate::listener::OrderListener;
use crate::order::Order;
use crate::Result;

/// Places `order`: prepares its message on `topic`, writes the order and
/// its `tx_log` row in one SQLite transaction, and commits the message as
/// the listener decides. Returns what became of the transaction.
///
/// # Errors
/// [`Error::Txmq`](crate::Error::Txmq) when the prepare failed (nothing
/// was written) or the broker refused the end (the order is written; the
/// broker checks back and learns the answer from `tx_log`).
pub async fn place_order(
    producer: &TransactionProducer<OrderListener>,
    topic: &str,
    order: &Order,
) -> Result<TxOutcome> {
    Ok(producer
        .send_in_transaction(order.to_message(topic))
        .await?)
}
