//! Transactional messages: [`TransactionProducer`] with the application's
//! [`TransactionListener`].
//!
//! A transactional send has three steps. The producer *prepares* the
//! message: the broker stores it as a half message that no consumer sees
//! and answers with a transaction id. The producer then runs the local
//! transaction ([`TransactionListener::execute`]) and *ends* the
//! transaction as it decided: commit (the message becomes visible) or
//! rollback (it is dropped). When the local transaction cannot decide yet
//! ([`TransactionState::Unknown`], or an error), or the producer dies
//! before ending it, the broker *checks back* once the transaction is older
//! than its transaction timeout: it asks a live producer of the same group,
//! over that producer's own connection, and
//! [`TransactionListener::check`] answers. After too many checks without
//! an answer the broker parks the transaction for an operator
//! ([`Admin::resolve_transaction`](crate::Admin::resolve_transaction)).
//!
//! Read [`listener`] for the application's side, [`producer`] for the
//! sending side; inside, `broker_links` keeps the connections check-backs
//! arrive on, `check_service` answers them, and `placement` picks the
//! broker and queues of a transaction.

mod broker_links;
mod check_service;
pub mod listener;
pub mod offsets;
mod placement;
pub mod producer;

pub use listener::{
    state_of, BoxError, BoxListener, CheckRequest, DynTransactionListener, ListenerFuture,
    TransactionListener, TransactionState, TxContext,
};
pub use offsets::ConsumedOffset;
pub use producer::{
    TransactionProducer, TransactionProducerBuilder, TxEnd, TxOutcome,
    DEFAULT_BROKER_REFRESH_INTERVAL, DEFAULT_CHECK_TIMEOUT,
};
