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
/// Once the order is written the answer is an outcome, never an error,
/// also when the broker refused the end or its answer was lost
/// ([`TxOutcome::end`]): the broker then checks back and learns the answer
/// from `tx_log`. Placing the order again would write it twice.
///
/// # Errors
/// [`Error::Txmq`](crate::Error::Txmq) when the prepare failed: nothing
/// was written.
pub async fn place_order(
    producer: &TransactionProducer<OrderListener>,
    topic: &str,
    order: &Order,
) -> Result<TxOutcome> {
    Ok(producer
        .send_in_transaction(order.to_message(topic))
        .await?)
}
