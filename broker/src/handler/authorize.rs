//! What each request needs of its connection's user, checked against the
//! ACL file before the request is handled (`--acl-file`; without one
//! everything is allowed, as before).
//!
//! Nothing that decides authority is read from the request: an end of a
//! transaction that claims the operator source needs `admin`, and any
//! other end needs `tx` of the producer group the broker stored with the
//! transaction, not one the request names.

use txmq_protocol::{
    retry_topic, EndTransaction, Hello, PullRequest, Request, Role, TxSource, WireError,
};
use txmq_remoting::{Connection, Op};

use crate::BrokerInner;

/// Checks everything `request` needs of `conn`'s user.
///
/// # Errors
/// `ACCESS_DENIED` for the first operation refused, naming the user, the
/// operation and the resource (logged).
pub(super) fn authorize(
    b: &BrokerInner,
    conn: &Connection,
    request: &Request,
) -> Result<(), WireError> {
    if !b.security.authenticates() {
        return Ok(());
    }
    needs(b, conn, request, |op| b.security.check(conn, op))
}

/// Checks what a hello's role asks for: a transactional producer of
/// group G needs `tx` of G (it receives G's half messages in
/// check-backs); a broker, replica or controller needs to be a cluster
/// member.
///
/// # Errors
/// `ACCESS_DENIED`.
pub(super) fn authorize_hello(
    b: &BrokerInner,
    conn: &Connection,
    hello: &Hello,
) -> Result<(), WireError> {
    match hello.role {
        Role::TransactionProducer => {
            let group = hello.group.as_deref().unwrap_or_default();
            b.security.check(conn, Op::Tx(group))
        }
        Role::Replica | Role::Broker | Role::Controller => {
            let what = format!(
                "connect to broker {} as a cluster member",
                b.config.broker_name
            );
            b.security.check(conn, Op::Cluster(&what))
        }
        Role::Producer | Role::Consumer | Role::Admin => Ok(()),
    }
}

/// Hands `check` every operation `request` needs, each on the resource it
/// names, and stops at the first refusal. Sends and pulls, the hot path,
/// allocate nothing.
fn needs(
    b: &BrokerInner,
    conn: &Connection,
    request: &Request,
    mut check: impl FnMut(Op<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    match request {
        Request::Send(r) => {
            // Each topic once (a batch is nearly always of one topic).
            for (i, m) in r.messages.iter().enumerate() {
                if !r.messages[..i].iter().any(|p| p.topic == m.topic) {
                    check(Op::Pub(&m.topic))?;
                }
            }
            Ok(())
        }
        Request::Pull(r) if r.browse && r.owner.is_none() => sub_or_admin(&r.topic, "read", check),
        Request::Pull(r) => pull_needs(r, check),
        Request::QueryOffset(r) => check(Op::Group(&r.group)),
        // Only a slave hands its master the offsets it kept: a forward-only
        // commit skips the owner fence, and comes from a cluster member
        // (signed in as the brokers' user, which need not be any group's).
        Request::CommitOffset(r) if r.forward_only => check(Op::Cluster(&format!(
            "forward a kept offset of group {}",
            r.group
        ))),
        Request::CommitOffset(r) => check(Op::Group(&r.group)),
        Request::Heartbeat(r) => {
            check(Op::Group(&r.group))?;
            let retry = retry_topic(&r.group);
            for s in r.subscriptions.iter().filter(|s| s.topic != retry) {
                check(Op::Sub(&s.topic))?;
            }
            Ok(())
        }
        Request::LeaveGroup(r) => check(Op::Group(&r.group)),
        // The record it names is checked too, once read (`send_back_needs`).
        Request::SendBack(r) => check(Op::Group(&r.group)),
        Request::PrepareTransaction(r) => {
            for h in &r.messages {
                check(Op::Pub(&h.message.topic))?;
            }
            // Offsets committed with the transaction: as a commit of each.
            for (i, o) in r.offsets.iter().enumerate() {
                if !r.offsets[..i].iter().any(|p| p.group == o.group) {
                    check(Op::Group(&o.group))?;
                }
            }
            check(Op::Tx(&r.producer_group))
        }
        Request::EndTransaction(r) => end_needs(b, conn, r, check),
        Request::CreateTopic(r) => check(Op::Admin(&format!("create topic {}", r.topic))),
        Request::ResetOffset(r) => check(Op::Admin(&format!(
            "reset the offsets of group {} on topic {}",
            r.group, r.topic
        ))),
        Request::ListTransactions(_) => check(Op::Admin("list transactions")),
        // Half message bodies of any topic: admin.
        Request::ShowTransaction(r) => check(Op::Admin(&format!("show transaction {}", r.tx_id))),
        Request::RecheckTransaction(r) => {
            check(Op::Admin(&format!("recheck transaction {}", r.tx_id)))
        }
        Request::ResendDeadLetters(r) => check(Op::Admin(&format!(
            "re-send dead letters of group {}",
            r.group
        ))),
        Request::DeleteTopic(r) => check(Op::Admin(&format!("delete topic {}", r.topic))),
        // Queue bounds and store times, no bodies: what a subscriber of
        // the topic may see, and an operator (the subscriber's refusal is
        // the one reported).
        Request::GetTopicStatus(r) => sub_or_admin(&r.topic, "see the status of", check),
        Request::ReplicaFetch(_) | Request::ReplicaAck(_) | Request::EpochEnd(_) => {
            check(Op::Cluster(&format!(
                "replicate the log of broker {}",
                b.config.broker_name
            )))
        }
        // Reading message bodies of a topic: a subscriber's, and an
        // operator's (who may look any message up by id, and re-sends dead
        // letters: `txmq dlq list` shows them); the subscriber's refusal
        // is the one reported.
        Request::FindMessages(r) => sub_or_admin(&r.topic, "read", check),
        Request::GetMessages(r) => sub_or_admin(&r.topic, "read", check),
        Request::LookupMessage(r) => check(Op::Admin(&format!("look up message {}", r.msg_id))),
        // Read-only metadata, pings, producer ids; and requests a broker
        // does not serve (refused as unsupported once signed in).
        // Traffic totals, no names of users or bodies: any signed-in user
        // (the dashboard's overview).
        Request::GetBrokerCounters(_) => check(Op::Authenticated),
        _ => check(Op::Authenticated),
    }
}

/// `sub` of `topic`, or `admin` (to `what` the topic); the subscriber's
/// refusal is the one reported. Checks `admin` only when `sub` is refused.
fn sub_or_admin(
    topic: &str,
    what: &str,
    mut check: impl FnMut(Op<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    check(Op::Sub(topic))
        .or_else(|refused| check(Op::Admin(&format!("{what} topic {topic}"))).map_err(|_| refused))
}

/// A pull reads a topic as a consumer group: `sub` of the topic and of
/// the group; the group's own retry topic needs only the group.
fn pull_needs(
    r: &PullRequest,
    check: impl FnMut(Op<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    read_needs(&r.topic, r.owner.as_ref().map(|o| o.group.as_str()), check)
}

/// Reading `topic` (as `group` when named).
pub(crate) fn read_needs(
    topic: &str,
    group: Option<&str>,
    mut check: impl FnMut(Op<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let retry_of = topic.strip_prefix(txmq_protocol::RETRY_TOPIC_PREFIX);
    match (group, retry_of) {
        (Some(g), Some(of)) if g == of => check(Op::Group(g)),
        (None, Some(of)) => check(Op::Group(of)),
        (Some(g), _) => {
            check(Op::Sub(topic))?;
            check(Op::Group(g))
        }
        (None, None) => check(Op::Sub(topic)),
    }
}

/// What a handed-back message needs, known once the broker has it: its
/// record is copied into the group's retry topic, where the group reads
/// it, so its topic must be one the group's user may read (as a pull of
/// it). (A consumer's own copy of a message whose record is gone is marked
/// as such, [`txmq_protocol::PROPERTY_REPORTED_ORIGIN`]: its dead letter
/// goes back only where an operator names.) `conn` is `None` for the
/// broker's own hand-backs (a pop's dead letters).
///
/// # Errors
/// `ACCESS_DENIED`.
pub(crate) fn send_back_needs(
    b: &BrokerInner,
    conn: Option<&Connection>,
    group: &str,
    topic: &str,
) -> Result<(), WireError> {
    let Some(conn) = conn.filter(|_| b.security.authenticates()) else {
        return Ok(());
    };
    read_needs(topic, Some(group), |op| b.security.check(conn, op))
}

/// An end claiming the operator source needs `admin`; any other end is
/// the producer's and needs `tx` of the transaction's producer group as
/// the broker stored it (the connection's own group when the broker does
/// not know the transaction: the end is refused as unknown anyway), and
/// `pub` on the topics of its messages, as a check-back's answer does
/// ([`crate::transaction::end_ops`]).
fn end_needs(
    b: &BrokerInner,
    conn: &Connection,
    r: &EndTransaction,
    mut check: impl FnMut(Op<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    match r.source {
        TxSource::Operator => check(Op::Admin(&format!("resolve transaction {}", r.tx_id))),
        TxSource::Producer => {
            let group = b
                .transactions
                .producer_group(r.tx_id)
                .or_else(|| conn.peer_hello().and_then(|h| h.group.clone()))
                .unwrap_or_default();
            let topics = b.transactions.pending_topics(r.tx_id).unwrap_or_default();
            let needs = crate::transaction::end_ops(&group, &topics).try_for_each(&mut check);
            needs
        }
    }
}
