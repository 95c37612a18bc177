//! Who a gRPC call comes from, and what it may do, under the broker's
//! `--acl-file` (without one every call is served, as on txmq's own port).
//!
//! A RocketMQ 5 client given an access key and secret signs each call: an
//! `authorization` header `MQv2-HMAC-SHA1 Credential=KEY,
//! SignedHeaders=x-mq-date-time, Signature=HEX`, the HMAC-SHA1 of the
//! call's `x-mq-date-time` header keyed by the secret. A client that
//! presents a certificate (mutual TLS) naming a user is that user without
//! a signature, as on txmq's own port. A call that signs in as no user is
//! answered `UNAUTHENTICATED`; an operation its user may not do,
//! `PERMISSION_DENIED` naming the user, the operation and the resource.
//! Both are logged. The permissions are those of txmq's own requests
//! (`handler/authorize.rs`); the producer group of a transactional send is
//! its topic, as in `send.rs`.
//!
//! The signature covers the date-time only, and nothing holds it to a
//! clock (the Python client sends local time marked as UTC): on a
//! plaintext port a captured header signs calls for as long as its key is
//! valid. Give the port TLS.

use tonic::{Request, Status};
use txmq_remoting::Op;

use super::incoming::Peer;
use super::{pb, Front};
use crate::handler::authorize::read_needs;
use crate::transaction::end_ops;

const ALGORITHM: &str = "MQv2-HMAC-SHA1";
const DATE_TIME: &str = "x-mq-date-time";
/// The longest topic or group name a permission is checked for (names are
/// at most 127 characters).
const MAX_NAME: usize = 255;

impl Front {
    /// The user call `r` comes from; `Ok(None)` without an ACL file.
    ///
    /// # Errors
    /// `UNAUTHENTICATED`, saying why (logged).
    pub(super) fn caller<T>(&self, r: &Request<T>) -> Result<Option<String>, Status> {
        let Some(acl) = &self.b.security.server.acl else {
            return Ok(None);
        };
        let acl = acl.current();
        let peer = r.extensions().get::<Peer>();
        let refused = |why: String| {
            let addr = peer.and_then(|p| p.addr).map(|a| a.to_string());
            let addr = addr.unwrap_or_default();
            // A connection's calls may all be refused, 128 at a time: the
            // first is logged at WARN, the others at DEBUG.
            if peer.is_none_or(Peer::first_refusal) {
                tracing::warn!(peer = %addr, "gRPC call refused: {why} (the connection's next refusals are logged at DEBUG)");
            } else {
                tracing::debug!(peer = %addr, "gRPC call refused: {why}");
            }
            Status::unauthenticated(format!("{why} (the broker's --acl-file is in force)"))
        };
        let Some(header) = r.metadata().get("authorization") else {
            return match peer.and_then(|p| p.cert_name.as_deref()) {
                Some(name) if acl.has_user(name) => Ok(Some(name.to_string())),
                _ => Err(refused(
                    "the call is not signed: give the client the access key and secret key of a user"
                        .into(),
                )),
            };
        };
        let header = header
            .to_str()
            .map_err(|_| refused("the authorization header is not text".into()))?;
        let (key, signature) = parse(header).map_err(refused)?;
        let date = r
            .metadata()
            .get(DATE_TIME)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refused(format!("the call has no {DATE_TIME} header to sign")))?;
        if acl.verify_rocketmq(key, date.as_bytes(), signature) {
            Ok(Some(key.to_string()))
        } else {
            Err(refused(format!(
                "authentication failed for access key '{}': unknown access key or wrong secret",
                txmq_remoting::shown_key(key)
            )))
        }
    }

    /// Checks `op` for `user` (every operation without an ACL file).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` naming the user, the operation and the resource
    /// (logged).
    pub(super) fn allow(&self, user: Option<&str>, op: Op<'_>) -> Result<(), Status> {
        if let Op::Pub(name) | Op::Sub(name) | Op::Group(name) | Op::Tx(name) = op {
            short(name)?;
        }
        self.refusal(self.b.security.server.check(user, op))
    }
}

impl Front {
    /// Reading `topic` as `group`: `sub` of both, as a pull on txmq's port.
    pub(super) fn allow_read(
        &self,
        user: Option<&str>,
        topic: &Option<pb::Resource>,
        group: Option<&Option<pb::Resource>>,
    ) -> Result<(), Status> {
        let name =
            |r: &Option<pb::Resource>| r.as_ref().map_or("", |r| r.name.as_str()).to_string();
        let (topic, group) = (name(topic), group.map(name));
        short(&topic)?;
        group.as_deref().map_or(Ok(()), short)?;
        self.refusal(read_needs(&topic, group.as_deref(), |op| {
            self.b.security.server.check(user, op)
        }))
    }

    /// Ending a transaction: `tx` of its producer group and `pub` on its
    /// topics, as the broker stored them (the request's topic, which is
    /// the group, for a transaction it does not know: refused as unknown
    /// anyway).
    pub(super) fn allow_end(
        &self,
        user: Option<&str>,
        r: &pb::EndTransactionRequest,
    ) -> Result<(), Status> {
        if !self.b.security.server.authenticates() {
            return Ok(());
        }
        let topic = r.topic.as_ref().map_or("", |t| t.name.as_str()).to_string();
        short(&topic)?;
        let tx_id = r.transaction_id.parse::<u64>().ok();
        let tx = &self.b.transactions;
        let (group, topics) = match tx_id {
            Some(id) => (tx.producer_group(id), tx.pending_topics(id)),
            None => (None, None),
        };
        let group = group.unwrap_or_else(|| topic.clone());
        let topics = topics.unwrap_or_else(|| vec![topic]);
        let checked =
            end_ops(&group, &topics).try_for_each(|op| self.b.security.server.check(user, op));
        self.refusal(checked)
    }

    fn refusal(&self, checked: Result<(), txmq_protocol::WireError>) -> Result<(), Status> {
        checked.map_err(|e| Status::permission_denied(e.message))
    }
}

/// Refuses a name too long to be one (names are checked for permissions
/// before the handlers check them), before a log line or an answer
/// carries it.
fn short(name: &str) -> Result<(), Status> {
    if name.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "a topic or group name of {} bytes; at most {MAX_NAME}",
            name.len()
        )));
    }
    Ok(())
}

/// The access key and the signature of an `authorization` header.
fn parse(header: &str) -> Result<(&str, &str), String> {
    let rest = header
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("the authorization header is not {ALGORITHM}"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v.trim()),
            Some(("SignedHeaders", v)) => signed = Some(v.trim()),
            Some(("Signature", v)) => signature = Some(v.trim()),
            _ => {}
        }
    }
    // Some clients add `//` and more to the key (Go's, C++'s).
    let key = credential
        .and_then(|c| c.split('/').next())
        .filter(|k| !k.is_empty())
        .ok_or("the authorization header names no Credential")?;
    if !signed.is_some_and(|s| s.split(';').any(|h| h.eq_ignore_ascii_case(DATE_TIME))) {
        return Err(format!("the signature does not cover {DATE_TIME}"));
    }
    let signature = signature.ok_or("the authorization header has no Signature")?;
    Ok((key, signature))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn the_clients_headers_are_read() {
        let java =
            "MQv2-HMAC-SHA1 Credential=alice, SignedHeaders=x-mq-date-time, Signature=D18A9C";
        assert_eq!(parse(java), Ok(("alice", "D18A9C")));
        let go = "MQv2-HMAC-SHA1 Credential=alice//Rocketmq, SignedHeaders=x-mq-date-time, Signature=d18a9c";
        assert_eq!(parse(go), Ok(("alice", "d18a9c")));
        for (bad, says) in [
            ("Basic YWxpY2U6c2VjcmV0", "is not MQv2-HMAC-SHA1"),
            (
                "MQv2-HMAC-SHA1 SignedHeaders=x-mq-date-time, Signature=d1",
                "no Credential",
            ),
            (
                "MQv2-HMAC-SHA1 Credential=//x, SignedHeaders=x-mq-date-time, Signature=d1",
                "no Credential",
            ),
            (
                "MQv2-HMAC-SHA1 Credential=alice, SignedHeaders=host, Signature=d1",
                "does not cover",
            ),
            (
                "MQv2-HMAC-SHA1 Credential=alice, SignedHeaders=x-mq-date-time",
                "no Signature",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
