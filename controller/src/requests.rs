//! The controller's service: every request a member answers, dispatched
//! from one `match`, each handler below it.
//!
//! Only the Raft leader answers brokers (heartbeats, in-sync changes,
//! drained reports); another member answers `NOT_CONTROLLER_LEADER` with
//! the leader's address. `GetControllerInfo` is answered by any member
//! from its own view, and `ElectMaster` is forwarded to the leader, so an
//! admin may ask any member.
//!
//! Every request is first checked against the connection's user
//! (`permission`); without an ACL file everything is allowed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};
use txmq_protocol::{
    AlterInSync, BrokerGroupState, Call, ControllerHeartbeat, ElectMaster, ErrorCode,
    GetControllerInfo, Hello, HelloOk, MasterDrained, RaftReply, Request, Response, Role,
    WireError, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, Service};

use crate::controller::{refusal, Inner};
use crate::liveness::Seen;
use crate::security::{ClusterSecurity, Permission};
use crate::state::Command;

/// The longest a heartbeat answer is held.
const MAX_HOLD: Duration = Duration::from_secs(5);
/// How long `ElectMaster` waits for the election to be committed.
const ELECT_WAIT: Duration = Duration::from_secs(15);

pub(crate) struct ControllerService {
    pub(crate) inner: Arc<Inner>,
    pub(crate) security: ClusterSecurity,
}

/// Whether an `ElectMaster` came from another member that forwarded it:
/// such a request is not forwarded again (two members with stale views
/// could bounce it), and the admin permission was checked where it came in.
fn forwarded(conn: &Connection) -> bool {
    conn.peer_hello()
        .is_some_and(|h| h.role == Role::Controller)
}

/// The permission `request` needs from the connection's user. What
/// changes the controller's state (Raft traffic, brokers' reports) is for
/// cluster members; a planned switch is for admins; reading is for anyone
/// signed in.
fn permission(conn: &Connection, request: &Request) -> Permission {
    match request {
        Request::Raft(rpc) => Permission::Cluster(format!(
            "send Raft {:?} as controller member {}",
            rpc.kind, rpc.from
        )),
        Request::ControllerHeartbeat(r) => Permission::Cluster(format!(
            "heartbeat broker {} of group {} to the controller",
            r.addr, r.broker_name
        )),
        Request::AlterInSync(r) => Permission::Cluster(format!(
            "alter the in-sync set of broker group {}",
            r.broker_name
        )),
        Request::MasterDrained(r) => {
            Permission::Cluster(format!("report broker group {} drained", r.broker_name))
        }
        // A member's user is a cluster member, not an admin: the admin
        // permission was checked by the member the admin asked. A user
        // with `broker` can already send Raft traffic, so trusting it
        // here grants nothing more.
        Request::ElectMaster(r) if forwarded(conn) => Permission::Cluster(format!(
            "forward the election of a master of {}",
            r.broker_name
        )),
        Request::ElectMaster(r) => Permission::Admin(format!("elect master of {}", r.broker_name)),
        _ => Permission::Authenticated,
    }
}

impl Service for ControllerService {
    fn hello(&self, conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        debug!(peer = %conn.peer_addr(), role = ?hello.role, client_id = %hello.client_id, "hello");
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: format!("controller {} {}", self.inner.id, self.inner.local_addr),
            challenge: None,
        })
    }

    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        if let Err(e) = self
            .security
            .check(conn.user(), &permission(conn, &request))
        {
            return Box::pin(std::future::ready(Err(e)));
        }
        let inner = self.inner.clone();
        let conn = conn.clone();
        Box::pin(async move {
            match request {
                Request::Ping(_) => Ok(Response::Ping(txmq_protocol::Pong {})),
                Request::Raft(rpc) => crate::network::serve_rpc(&inner.raft, rpc)
                    .await
                    .map(|body| Response::Raft(RaftReply { body }))
                    .map_err(|m| WireError::new(ErrorCode::MalformedRequest, m)),
                Request::ControllerHeartbeat(req) => heartbeat(&inner, &conn, *req)
                    .await
                    .map(ControllerHeartbeat::response),
                Request::AlterInSync(req) => {
                    alter_in_sync(&inner, *req).await.map(AlterInSync::response)
                }
                Request::MasterDrained(req) => master_drained(&inner, req)
                    .await
                    .map(MasterDrained::response),
                Request::ElectMaster(req) => {
                    let res = if forwarded(&conn) {
                        match inner.leader_ready().await {
                            Ok(_) => elect_here(&inner, req).await,
                            Err(e) => Err(e),
                        }
                    } else {
                        elect_master(&inner, req).await
                    };
                    res.map(ElectMaster::response)
                }
                Request::GetControllerInfo(_) => Ok(GetControllerInfo::response(inner.info())),
                other => Err(WireError::new(
                    ErrorCode::UnsupportedRequest,
                    format!("{} requests are not served by a controller", other.kind()),
                )),
            }
        })
    }

    fn closed(&self, conn: &Connection) {
        if self.inner.live().connection_closed(conn.id()) {
            // A master may have just died: decide now, not at the next tick.
            self.inner.wake.notify_one();
        }
    }
}

fn bad(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadArgument, message)
}

fn unknown_group(name: &str) -> WireError {
    bad(format!("unknown broker group '{name}'"))
}

fn not_in_sync(message: String) -> WireError {
    WireError::new(ErrorCode::NotInSync, message)
}

/// A broker is alive: record it, add it to its group when new, and answer
/// with the group's state once it differs from what the broker knows (or
/// after the hold time).
async fn heartbeat(
    inner: &Arc<Inner>,
    conn: &Connection,
    req: ControllerHeartbeat,
) -> Result<BrokerGroupState, WireError> {
    let term = inner.leader_ready().await?;
    if req.broker_name.is_empty() || req.addr.is_empty() {
        return Err(bad(
            "a controller heartbeat needs a broker name and an address",
        ));
    }
    let now = Instant::now();
    {
        let mut live = inner.live();
        live.ensure_term(term, now);
        live.record(
            &req.broker_name,
            &req.addr,
            Seen {
                at: now,
                master_epoch: req.master_epoch,
                log_end: req.log_end,
                known_version: req.known_version,
                conn: conn.id(),
                open: true,
            },
        );
    }
    let known = inner
        .group(&req.broker_name)
        .is_some_and(|g| g.replicas.contains(&req.addr));
    if !known {
        let (outcome, _) = inner
            .propose(Command::AddReplica {
                group: req.broker_name.clone(),
                addr: req.addr.clone(),
            })
            .await?;
        refusal(outcome, &req.broker_name)?;
        info!(group = %req.broker_name, replica = %req.addr, "new replica");
    }
    inner.wake.notify_one();
    // Held no longer than half the expiry, so a broker that heartbeats again
    // right after each answer is never taken for dead.
    let hold = Duration::from_millis(req.wait_ms.into())
        .min(MAX_HOLD)
        .min(inner.config.master_expiry / 2);
    let deadline = now + hold;
    let mut rx = inner.shared.subscribe();
    loop {
        rx.borrow_and_update();
        let g = inner
            .group(&req.broker_name)
            .ok_or_else(|| unknown_group(&req.broker_name))?;
        if g.version != req.known_version
            || tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
        {
            return Ok(inner.group_state(&req.broker_name, &g));
        }
    }
}

/// The master changes its group's in-sync set.
async fn alter_in_sync(
    inner: &Arc<Inner>,
    req: AlterInSync,
) -> Result<BrokerGroupState, WireError> {
    inner.leader_ready().await?;
    if !req.in_sync.contains(&req.master) {
        return Err(bad(format!(
            "the in-sync set {:?} must contain the master '{}'",
            req.in_sync, req.master
        )));
    }
    let (outcome, _) = inner
        .propose(Command::AlterInSync {
            group: req.broker_name.clone(),
            master: req.master.clone(),
            epoch: req.epoch,
            in_sync: req.in_sync.iter().cloned().collect(),
        })
        .await?;
    refusal(outcome, &req.broker_name)?;
    let g = inner
        .group(&req.broker_name)
        .ok_or_else(|| unknown_group(&req.broker_name))?;
    debug!(group = %req.broker_name, in_sync = ?g.in_sync, "in-sync set changed");
    Ok(inner.group_state(&req.broker_name, &g))
}

/// The master drained for a planned switch: elect the target.
async fn master_drained(
    inner: &Arc<Inner>,
    req: MasterDrained,
) -> Result<BrokerGroupState, WireError> {
    inner.leader_ready().await?;
    let name = &req.broker_name;
    let g = inner.group(name).ok_or_else(|| unknown_group(name))?;
    if g.epoch != req.epoch || g.master.as_deref() != Some(req.master.as_str()) {
        return refusal(
            crate::types::Outcome::StaleEpoch {
                epoch: g.epoch,
                master: g.master.clone(),
            },
            name,
        )
        .map(|()| BrokerGroupState::default());
    }
    if let Some(target) = g.draining.clone() {
        let alive = inner
            .live()
            .alive(name, &target, Instant::now(), inner.config.master_expiry);
        let command = if alive && g.in_sync.contains(&target) {
            let mut in_sync = g.in_sync.clone();
            in_sync.remove(&req.master);
            in_sync.insert(target.clone());
            Command::Elect {
                group: name.clone(),
                expected_epoch: g.epoch,
                master: target.clone(),
                in_sync,
            }
        } else {
            Command::Drain {
                group: name.clone(),
                epoch: g.epoch,
                target: None,
            }
        };
        let (outcome, _) = inner.propose(command.clone()).await?;
        refusal(outcome, name)?;
        info!(group = %name, old_master = %req.master, ?command, "planned switch: master drained");
    }
    let g = inner.group(name).ok_or_else(|| unknown_group(name))?;
    Ok(inner.group_state(name, &g))
}

/// `ElectMaster` from an admin: handled by the leader, forwarded to it by
/// any other member.
pub(crate) async fn elect_master(
    inner: &Arc<Inner>,
    req: ElectMaster,
) -> Result<BrokerGroupState, WireError> {
    match inner.leader_ready().await {
        Ok(_) => elect_here(inner, req).await,
        Err(e) if e.code == ErrorCode::NotControllerLeader => {
            let (_, addr) = inner.leader_addr().await?;
            let unavailable = |e: txmq_remoting::Error| {
                WireError::new(
                    ErrorCode::ControllerUnavailable,
                    format!("cannot reach the controller leader at {addr}: {e}"),
                )
            };
            let conn = inner.peers.get(&addr).await.map_err(unavailable)?;
            match conn
                .call_with_timeout(req, ELECT_WAIT + Duration::from_secs(5))
                .await
            {
                Ok(state) => Ok(state),
                Err(txmq_remoting::Error::Remote(e)) => Err(e),
                Err(e) => Err(unavailable(e)),
            }
        }
        Err(e) => Err(e),
    }
}

/// A planned switch on the leader: drain the master if it is live (the
/// election task and `MasterDrained` finish it), else elect at once; then
/// wait for the new epoch.
async fn elect_here(inner: &Arc<Inner>, req: ElectMaster) -> Result<BrokerGroupState, WireError> {
    let name = &req.broker_name;
    let g = inner.group(name).ok_or_else(|| unknown_group(name))?;
    let now = Instant::now();
    let expiry = inner.config.master_expiry;
    let (target, master_live) = {
        let live = inner.live();
        let alive = |a: &String| live.alive(name, a, now, expiry);
        let target = match &req.replica {
            Some(r) => {
                if !g.replicas.contains(r) {
                    return Err(not_in_sync(format!(
                        "'{r}' is not a replica of broker group '{name}'"
                    )));
                }
                if g.master.as_ref() == Some(r) {
                    return Err(not_in_sync(format!(
                        "'{r}' is already the master of '{name}'"
                    )));
                }
                if !g.in_sync.contains(r) {
                    return Err(not_in_sync(format!(
                        "'{r}' is not in the in-sync set of '{name}' ({})",
                        g.in_sync.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                if !alive(r) {
                    return Err(not_in_sync(format!(
                        "'{r}' is not alive (no recent heartbeat)"
                    )));
                }
                r.clone()
            }
            None => live
                .best(
                    name,
                    g.in_sync
                        .iter()
                        .filter(|a| g.master.as_ref() != Some(*a) && alive(a)),
                )
                .ok_or_else(|| {
                    not_in_sync(format!(
                        "broker group '{name}' has no live in-sync replica other than its master"
                    ))
                })?,
        };
        (target, live.master_live(name, &g, now, expiry))
    };
    let mut rx = inner.shared.subscribe();
    let command = if master_live {
        Command::Drain {
            group: name.clone(),
            epoch: g.epoch,
            target: Some(target.clone()),
        }
    } else {
        let mut in_sync: BTreeSet<String> = g.in_sync.clone();
        if let Some(old) = &g.master {
            in_sync.remove(old);
        }
        in_sync.insert(target.clone());
        Command::Elect {
            group: name.clone(),
            expected_epoch: g.epoch,
            master: target.clone(),
            in_sync,
        }
    };
    info!(group = %name, target = %target, master_live, "planned switch requested");
    let (outcome, _) = inner.propose(command).await?;
    refusal(outcome, name)?;
    let deadline = Instant::now() + ELECT_WAIT;
    loop {
        rx.borrow_and_update();
        let now_g = inner.group(name).ok_or_else(|| unknown_group(name))?;
        if now_g.epoch > g.epoch {
            return Ok(inner.group_state(name, &now_g));
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(WireError::new(
                ErrorCode::Timeout,
                format!("the planned switch of '{name}' to '{target}' was not done within {ELECT_WAIT:?}"),
            ));
        }
    }
}
