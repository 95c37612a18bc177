//! The user's side of a transaction: [`TransactionListener`] runs the local
//! transaction and answers check-backs; [`TxContext`] and [`CheckRequest`]
//! say which transaction is meant.

use std::future::Future;
use std::pin::Pin;

use txmq_protocol::{CheckTransaction, MsgId};

use crate::{Error, Message, Result};

/// What a local transaction or a check-back decided: [`Commit`](TransactionState::Commit),
/// [`Rollback`](TransactionState::Rollback) or [`Unknown`](TransactionState::Unknown)
/// ("not decided yet; ask again later").
pub use txmq_protocol::TxResolution as TransactionState;

/// The error a [`TransactionListener`] may fail with. A failure counts as
/// [`TransactionState::Unknown`]: the transaction stays prepared and the
/// broker checks back later.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The application's part of a transactional send.
///
/// [`execute`](TransactionListener::execute) runs the local transaction (a
/// database write, say) once the half message is stored; its answer commits
/// or rolls back the message. [`check`](TransactionListener::check) answers
/// the broker when it never heard that answer (the producer crashed, the
/// answer was [`Unknown`](TransactionState::Unknown), the end was lost): it
/// must find out what became of the local transaction, typically by looking
/// up the business key of [`CheckRequest::message`] in the database.
///
/// Both may fail; an error counts as [`TransactionState::Unknown`]. A
/// panic in `check` counts as `Unknown` too (it runs on the producer's
/// own task); a panic in `execute` unwinds into the caller of the send, as
/// any panic in its own code would, and the transaction stays prepared for
/// check-backs. A check-back may arrive on any producer of the group, not
/// only the one that prepared the transaction, and possibly while
/// `execute` still runs.
///
/// Implement it with plain `async fn`s:
///
/// ```
/// use txmq::{BoxError, CheckRequest, Message, TransactionListener, TransactionState, TxContext};
///
/// struct Orders;
///
/// impl TransactionListener for Orders {
///     async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
///         // Write the order, with ctx.tx_id() or msg.key(), in one local transaction.
///         let _ = (msg, ctx);
///         Ok(TransactionState::Commit)
///     }
///
///     async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
///         // Look the order up by req.message().key().
///         let _ = req;
///         Ok(TransactionState::Unknown)
///     }
/// }
/// ```
pub trait TransactionListener: Send + Sync + 'static {
    /// Runs the local transaction for a freshly prepared message. `msg` is
    /// the (first) message of the transaction; `ctx` has all of them and the
    /// transaction id.
    ///
    /// # Errors
    /// Any error; it counts as [`TransactionState::Unknown`].
    fn execute(
        &self,
        msg: &Message,
        ctx: &TxContext,
    ) -> impl Future<Output = Result<TransactionState, BoxError>> + Send;

    /// Answers a check-back: what became of the local transaction of `req`?
    ///
    /// # Errors
    /// Any error; it counts as [`TransactionState::Unknown`].
    fn check(
        &self,
        req: &CheckRequest,
    ) -> impl Future<Output = Result<TransactionState, BoxError>> + Send;
}

/// The future of a [`DynTransactionListener`] method.
pub type ListenerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TransactionState, BoxError>> + Send + 'a>>;

/// The object-safe form of [`TransactionListener`], whose `async fn`s
/// cannot be called through `dyn`: the same two methods, returning boxed
/// futures. Every [`TransactionListener`] is one, so write listeners with
/// `async fn` as usual; this trait is what [`BoxListener`] holds.
pub trait DynTransactionListener: Send + Sync + 'static {
    /// [`TransactionListener::execute`], boxed.
    fn execute_boxed<'a>(&'a self, msg: &'a Message, ctx: &'a TxContext) -> ListenerFuture<'a>;

    /// [`TransactionListener::check`], boxed.
    fn check_boxed<'a>(&'a self, req: &'a CheckRequest) -> ListenerFuture<'a>;
}

impl<L: TransactionListener> DynTransactionListener for L {
    fn execute_boxed<'a>(&'a self, msg: &'a Message, ctx: &'a TxContext) -> ListenerFuture<'a> {
        Box::pin(self.execute(msg, ctx))
    }

    fn check_boxed<'a>(&'a self, req: &'a CheckRequest) -> ListenerFuture<'a> {
        Box::pin(self.check(req))
    }
}

/// A [`TransactionListener`] chosen at run time: any listener behind a
/// trait object, so one [`TransactionProducer<BoxListener>`](crate::TransactionProducer)
/// type serves them all (a configuration picks the listener, a test swaps
/// in a fake). Each call costs one allocation for its boxed future.
///
/// ```no_run
/// use txmq::{BoxError, BoxListener, CheckRequest, Message, TransactionListener, TransactionProducer, TransactionState, TxContext};
///
/// struct Orders;
/// struct DryRun;
///
/// impl TransactionListener for Orders {
///     async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
///         Ok(TransactionState::Commit)
///     }
///     async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
///         Ok(TransactionState::Unknown)
///     }
/// }
///
/// impl TransactionListener for DryRun {
///     async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
///         Ok(TransactionState::Rollback)
///     }
///     async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
///         Ok(TransactionState::Rollback)
///     }
/// }
///
/// # async fn demo(dry_run: bool) -> txmq::Result<()> {
/// let listener = if dry_run { BoxListener::new(DryRun) } else { BoxListener::new(Orders) };
/// let producer: TransactionProducer<BoxListener> = TransactionProducer::builder()
///     .nameserver("127.0.0.1:9876")
///     .group("order-producers")
///     .listener(listener)
///     .start()
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct BoxListener(Box<dyn DynTransactionListener>);

impl BoxListener {
    /// `listener` behind a trait object.
    pub fn new(listener: impl TransactionListener) -> BoxListener {
        BoxListener(Box::new(listener))
    }
}

impl From<Box<dyn DynTransactionListener>> for BoxListener {
    fn from(listener: Box<dyn DynTransactionListener>) -> BoxListener {
        BoxListener(listener)
    }
}

impl std::fmt::Debug for BoxListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxListener")
    }
}

impl TransactionListener for BoxListener {
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        self.0.execute_boxed(msg, ctx).await
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        self.0.check_boxed(req).await
    }
}

/// The transaction [`TransactionListener::execute`] runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxContext {
    tx_id: u64,
    broker_name: String,
    producer_group: String,
    messages: Vec<Message>,
}

impl TxContext {
    /// A context (for testing a listener; the producer makes the real ones).
    /// A message not sent yet is given an id and a birth time (now), as
    /// sent messages have them.
    pub fn new(
        tx_id: u64,
        broker_name: impl Into<String>,
        producer_group: impl Into<String>,
        messages: Vec<Message>,
    ) -> TxContext {
        TxContext {
            tx_id,
            broker_name: broker_name.into(),
            producer_group: producer_group.into(),
            messages: messages.into_iter().map(Message::into_sent).collect(),
        }
    }

    /// The transaction id, unique on [`TxContext::broker_name`].
    pub fn tx_id(&self) -> u64 {
        self.tx_id
    }

    /// The broker that holds the half messages.
    pub fn broker_name(&self) -> &str {
        &self.broker_name
    }

    /// The producer group.
    pub fn producer_group(&self) -> &str {
        &self.producer_group
    }

    /// The id of the first message (the one
    /// [`TransactionListener::execute`] is given), as it was sent: assigned
    /// at the send unless fixed with [`Message::with_msg_id`]. The id to
    /// record in the local transaction, for [`CheckRequest::msg_id`] to
    /// find.
    pub fn msg_id(&self) -> MsgId {
        // `new` gives every message an id; the default is never seen.
        self.messages
            .first()
            .and_then(Message::msg_id)
            .unwrap_or_default()
    }

    /// Every message of the transaction, in the order given, each with the
    /// id it was sent with.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }
}

/// A broker's question: what became of this transaction?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    tx_id: u64,
    broker_name: String,
    producer_group: String,
    /// Never empty.
    messages: Vec<Message>,
    checks: u32,
}

impl CheckRequest {
    /// A check request (for testing a listener; the producer makes the real
    /// ones from the broker's requests). A message not sent yet is given an
    /// id and a birth time (now), as the broker's messages all have them.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when `messages` is empty.
    pub fn new(
        tx_id: u64,
        broker_name: impl Into<String>,
        producer_group: impl Into<String>,
        messages: Vec<Message>,
        checks: u32,
    ) -> Result<CheckRequest> {
        if messages.is_empty() {
            return Err(Error::BadArgument(format!(
                "check of transaction {tx_id} names no message"
            )));
        }
        let messages = messages.into_iter().map(Message::into_sent).collect();
        Ok(CheckRequest {
            tx_id,
            broker_name: broker_name.into(),
            producer_group: producer_group.into(),
            messages,
            checks,
        })
    }

    /// The transaction id, unique on [`CheckRequest::broker_name`].
    pub fn tx_id(&self) -> u64 {
        self.tx_id
    }

    /// The broker asking (it holds the half messages).
    pub fn broker_name(&self) -> &str {
        &self.broker_name
    }

    /// The producer group the transaction was prepared by.
    pub fn producer_group(&self) -> &str {
        &self.producer_group
    }

    /// The first (often the only) message of the transaction.
    pub fn message(&self) -> &Message {
        // `new` refuses an empty list, so there is always a first.
        &self.messages[0]
    }

    /// The id of [`CheckRequest::message`].
    pub fn msg_id(&self) -> MsgId {
        // `new` gives every message an id; the default is never seen.
        self.message().msg_id().unwrap_or_default()
    }

    /// Every message of the transaction, in the order prepared; never empty.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// How many checks the broker sent for this transaction before this one.
    pub fn checks(&self) -> u32 {
        self.checks
    }
}

impl TryFrom<CheckTransaction> for CheckRequest {
    type Error = Error;

    fn try_from(c: CheckTransaction) -> Result<CheckRequest> {
        CheckRequest::new(
            c.tx_id,
            c.broker_name,
            c.producer_group,
            c.messages.into_iter().map(Message::from_wire).collect(),
            c.checks,
        )
    }
}

/// The state a listener's result stands for: an error is
/// [`TransactionState::Unknown`].
pub fn state_of(result: Result<TransactionState, BoxError>) -> TransactionState {
    result.unwrap_or(TransactionState::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener written with plain `async fn`s, holding a lock guard
    /// nowhere across an await, must satisfy the trait's `Send` bounds.
    struct Fixed {
        local: TransactionState,
        fail_checks: bool,
    }

    impl TransactionListener for Fixed {
        async fn execute(
            &self,
            msg: &Message,
            ctx: &TxContext,
        ) -> Result<TransactionState, BoxError> {
            tokio::task::yield_now().await;
            assert_eq!(
                ctx.messages().first().map(|m| m.msg_id()),
                Some(msg.msg_id())
            );
            assert_eq!(Some(ctx.msg_id()), msg.msg_id());
            Ok(self.local)
        }

        async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
            if self.fail_checks {
                return Err(format!("no record of order {:?}", req.message().key()).into());
            }
            Ok(TransactionState::Commit)
        }
    }

    fn spawnable<L: TransactionListener>(l: std::sync::Arc<L>, req: CheckRequest) {
        // Compiles only if the check future is Send + 'static once owned.
        drop(tokio::spawn(async move { l.check(&req).await.is_ok() }));
    }

    #[tokio::test]
    async fn an_async_fn_listener_implements_the_trait_and_errors_count_as_unknown() {
        let m = Message::new("orders", "o-1")
            .with_key("o-1")
            .with_msg_id(MsgId::generate());
        let ctx = TxContext::new(7, "broker-a", "pg", vec![m.clone()]);
        let ok = Fixed {
            local: TransactionState::Rollback,
            fail_checks: true,
        };
        assert_eq!(
            state_of(ok.execute(&m, &ctx).await),
            TransactionState::Rollback
        );
        let req = CheckRequest::new(7, "broker-a", "pg", vec![m.clone()], 2);
        let Ok(req) = req else {
            panic!("a request with a message is valid")
        };
        assert_eq!(state_of(ok.check(&req).await), TransactionState::Unknown);
        assert_eq!(req.message().msg_id(), m.msg_id());
        assert_eq!(Some(req.msg_id()), m.msg_id());
        assert_eq!(req.checks(), 2);
        assert_eq!((req.tx_id(), req.broker_name()), (7, "broker-a"));
        spawnable(std::sync::Arc::new(ok), req);
    }

    #[tokio::test]
    async fn listeners_of_different_types_answer_through_box_listener() {
        let m = Message::new("orders", "o-1").with_msg_id(MsgId::generate());
        let ctx = TxContext::new(7, "broker-a", "pg", vec![m.clone()]);
        let Ok(req) = CheckRequest::new(7, "broker-a", "pg", vec![m.clone()], 0) else {
            panic!("a request with a message is valid")
        };
        let commits = Fixed {
            local: TransactionState::Commit,
            fail_checks: false,
        };
        let rolls_back = Fixed {
            local: TransactionState::Rollback,
            fail_checks: true,
        };
        let as_object: Box<dyn DynTransactionListener> = Box::new(rolls_back);
        let listeners = [BoxListener::new(commits), BoxListener::from(as_object)];
        let mut answers = Vec::new();
        for l in &listeners {
            answers.push((
                state_of(l.execute(&m, &ctx).await),
                state_of(l.check(&req).await),
            ));
        }
        assert_eq!(
            answers,
            [
                (TransactionState::Commit, TransactionState::Commit),
                (TransactionState::Rollback, TransactionState::Unknown),
            ]
        );
        // A BoxListener is a listener like any other: spawnable checks.
        let Some(first) = listeners.into_iter().next() else {
            panic!("two listeners")
        };
        spawnable(std::sync::Arc::new(first), req);
    }

    #[test]
    fn a_check_request_always_has_a_first_message() {
        assert!(matches!(
            CheckRequest::new(1, "b", "g", Vec::new(), 0),
            Err(Error::BadArgument(_))
        ));
        let Ok(none_yet) = CheckRequest::new(1, "b", "g", vec![Message::new("t", "1")], 0) else {
            panic!("a request with a message is valid")
        };
        assert_eq!(none_yet.message().msg_id(), Some(none_yet.msg_id()));
        let wire = CheckTransaction {
            tx_id: 3,
            broker_name: "b".into(),
            producer_group: "g".into(),
            messages: vec![
                txmq_protocol::Message::new("t", "1"),
                txmq_protocol::Message::new("u", "2"),
            ],
            checks: 0,
            timeout_ms: 0,
        };
        let wire_id = wire.messages[0].msg_id;
        let Ok(req) = CheckRequest::try_from(wire) else {
            panic!("converts")
        };
        assert_eq!(req.message().topic(), "t");
        assert_eq!(req.message().msg_id(), Some(wire_id));
        assert_eq!(req.messages().len(), 2);
        assert_eq!(req.producer_group(), "g");
    }
}
