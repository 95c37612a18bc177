//! What each request needs of its connection's user, checked against the
//! ACL file before the request is handled (`--acl-file`; without one
//! everything is allowed, as before).
//!
//! Nothing that decides authority is read from the request: an end of a
//! transaction that claims the operator source needs `admin`, and any
//! other end needs `tx` of the producer group the broker stored with the
//! transaction, not one the request names.

use std::borrow::Cow;

use txmq_protocol::{
    retry_topic, EndTransaction, Hello, PullRequest, Request, Role, TxSource, WireError,
};
use txmq_remoting::{Connection, Op};

use crate::BrokerInner;

/// The kind of an [`Op`], apart from the resource it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pub,
    Sub,
    Group,
    Tx,
    Admin,
    Cluster,
    Authenticated,
}

/// What [`retry_topic`] puts before a group's name.
const RETRY_PREFIX: &str = "%RETRY%";

/// One operation a request needs: its kind and the resource (a topic, a
/// group, or the description of an admin or cluster action).
type Need<'r> = (Kind, Cow<'r, str>);

impl Kind {
    fn op(self, resource: &str) -> Op<'_> {
        match self {
            Kind::Pub => Op::Pub(resource),
            Kind::Sub => Op::Sub(resource),
            Kind::Group => Op::Group(resource),
            Kind::Tx => Op::Tx(resource),
            Kind::Admin => Op::Admin(resource),
            Kind::Cluster => Op::Cluster(resource),
            Kind::Authenticated => Op::Authenticated,
        }
    }
}

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
    for (kind, resource) in needs(b, conn, request) {
        b.security.check(conn, kind.op(&resource))?;
    }
    Ok(())
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

/// What `request` needs: every operation, each on the resource it names.
fn needs<'r>(b: &BrokerInner, conn: &Connection, request: &'r Request) -> Vec<Need<'r>> {
    let borrowed = |kind, name: &'r str| (kind, Cow::Borrowed(name));
    let owned = |kind, text: String| (kind, Cow::Owned(text));
    match request {
        Request::Send(r) => {
            let mut topics: Vec<&str> = r.messages.iter().map(|m| m.topic.as_str()).collect();
            topics.sort_unstable();
            topics.dedup();
            topics.into_iter().map(|t| borrowed(Kind::Pub, t)).collect()
        }
        Request::Pull(r) => pull_needs(r),
        Request::QueryOffset(r) => vec![borrowed(Kind::Group, &r.group)],
        Request::CommitOffset(r) => {
            let mut needs = vec![borrowed(Kind::Group, &r.group)];
            if r.forward_only {
                // Only a slave hands its master the offsets it kept: a
                // forward-only commit skips the owner fence.
                needs.push(owned(
                    Kind::Cluster,
                    format!("forward a kept offset of group {}", r.group),
                ));
            }
            needs
        }
        Request::Heartbeat(r) => {
            let retry = retry_topic(&r.group);
            let mut needs = vec![borrowed(Kind::Group, &r.group)];
            needs.extend(
                r.subscriptions
                    .iter()
                    .filter(|s| s.topic != retry)
                    .map(|s| borrowed(Kind::Sub, &s.topic)),
            );
            needs
        }
        Request::LeaveGroup(r) => vec![borrowed(Kind::Group, &r.group)],
        Request::SendBack(r) => vec![borrowed(Kind::Group, &r.group)],
        Request::PrepareTransaction(r) => {
            let mut needs: Vec<Need<'r>> = r
                .messages
                .iter()
                .map(|h| borrowed(Kind::Pub, &h.message.topic))
                .collect();
            needs.push(borrowed(Kind::Tx, &r.producer_group));
            needs
        }
        Request::EndTransaction(r) => vec![end_needs(b, conn, r)],
        Request::CreateTopic(r) => vec![owned(Kind::Admin, format!("create topic {}", r.topic))],
        Request::ResetOffset(r) => vec![owned(
            Kind::Admin,
            format!(
                "reset the offsets of group {} on topic {}",
                r.group, r.topic
            ),
        )],
        Request::ListTransactions(_) => vec![borrowed(Kind::Admin, "list transactions")],
        Request::ReplicaFetch(_) | Request::ReplicaAck(_) | Request::EpochEnd(_) => {
            vec![owned(
                Kind::Cluster,
                format!("replicate the log of broker {}", b.config.broker_name),
            )]
        }
        // Read-only metadata, pings, producer ids; and requests a broker
        // does not serve (refused as unsupported once signed in).
        _ => vec![borrowed(Kind::Authenticated, "")],
    }
}

/// A pull reads a topic as a consumer group: `sub` of the topic and of
/// the group; the group's own retry topic needs only the group.
fn pull_needs(r: &PullRequest) -> Vec<Need<'_>> {
    let group = r.owner.as_ref().map(|o| o.group.as_str());
    let retry_of = r.topic.strip_prefix(RETRY_PREFIX);
    match (group, retry_of) {
        (Some(g), Some(of)) if g == of => vec![(Kind::Group, Cow::Borrowed(g))],
        (None, Some(of)) => vec![(Kind::Group, Cow::Borrowed(of))],
        (Some(g), _) => vec![
            (Kind::Sub, Cow::Borrowed(r.topic.as_str())),
            (Kind::Group, Cow::Borrowed(g)),
        ],
        (None, None) => vec![(Kind::Sub, Cow::Borrowed(r.topic.as_str()))],
    }
}

/// An end claiming the operator source needs `admin`; any other end is
/// the producer's and needs `tx` of the transaction's producer group as
/// the broker stored it (the connection's own group when the broker does
/// not know the transaction: the end is refused as unknown anyway).
fn end_needs<'r>(b: &BrokerInner, conn: &Connection, r: &EndTransaction) -> Need<'r> {
    match r.source {
        TxSource::Operator => (
            Kind::Admin,
            Cow::Owned(format!("resolve transaction {}", r.tx_id)),
        ),
        TxSource::Producer => {
            let group = b
                .transactions
                .producer_group(r.tx_id)
                .or_else(|| conn.peer_hello().and_then(|h| h.group.clone()));
            (Kind::Tx, Cow::Owned(group.unwrap_or_default()))
        }
    }
}
