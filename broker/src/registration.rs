//! Registration with the nameservers: at start, every heartbeat interval, at
//! once when the topic table changes, and at once when a nameserver
//! connection closes (the nameserver dropped this broker from its routes
//! when it saw the close, so waiting for the next heartbeat would leave
//! clients with `NO_ROUTE` for up to a whole interval); a goodbye at shutdown.
//!
//! A nameserver refuses the registration (`BROKER_NAME_TAKEN`) while another
//! live broker, at another address, holds this broker's name. When every
//! nameserver refuses the very first registration, the broker does not
//! start: [`Startup::NameTaken`] makes [`Broker::start`](crate::Broker::start)
//! fail, so two brokers started with the same (default) name fail loudly
//! instead of one silently serving nobody. A refusal after that (some
//! nameserver took the broker at start, or the conflict began later) is
//! logged as an error and retried, since the other broker may die and its
//! registration expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join_all, select_all};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::oneshot;
use tokio::time::Instant;
use txmq_protocol::{ErrorCode, Hello, RegisterBroker, Role, UnregisterBroker, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig};

use crate::BrokerInner;

/// How long a nameserver has to answer a connect or a registration.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The first retry after a failed round; it doubles up to [`RETRY_MAX`]
/// (or the heartbeat interval, if shorter).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A closed connection starts a round at once, but never sooner than this
/// after the previous round started: a nameserver that accepts and then
/// closes every connection must not spin the broker.
const MIN_ROUND_GAP: Duration = Duration::from_millis(100);

/// A refusal that goes on is logged as an error again this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the first registration round decided about starting.
#[derive(Debug)]
pub(crate) enum Startup {
    /// At least one nameserver took the broker, or one could not be asked
    /// (unreachable: it may take the broker later).
    Go,
    /// Every nameserver refused the broker's name; the detail has their answers.
    NameTaken(String),
}

/// Where this broker stands with one nameserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Registered,
    /// Another broker holds the name there.
    Refused,
    /// Not reachable, or it failed the registration for another reason.
    Failing,
}

/// One nameserver as the registration loop sees it.
#[derive(Default)]
struct Link {
    /// Kept while the nameserver answers (an accepted or a refused
    /// registration alike), so its close is noticed.
    conn: Option<Connection>,
    standing: Option<Standing>,
    refusal_logged: Option<Instant>,
}

/// The answer of one nameserver to one registration.
enum Outcome {
    Registered,
    Refused(String),
    Failed(String),
}

/// Collects the first round's outcomes into a [`Startup`] verdict, sent as
/// soon as it is known.
struct Verdict {
    tx: Option<oneshot::Sender<Startup>>,
    expected: usize,
    refusals: Vec<String>,
}

impl Verdict {
    fn observe(&mut self, ns: &str, outcome: &Outcome) {
        if self.tx.is_none() {
            return;
        }
        match outcome {
            Outcome::Refused(message) => {
                self.refusals.push(format!("nameserver {ns}: {message}"));
                if self.refusals.len() == self.expected {
                    let detail = self.refusals.join("; ");
                    self.send(Startup::NameTaken(detail));
                }
            }
            Outcome::Registered | Outcome::Failed(_) => self.send(Startup::Go),
        }
    }

    fn send(&mut self, startup: Startup) {
        if let Some(tx) = self.tx.take() {
            // Nobody waiting (the broker is going away) is fine.
            let _ = tx.send(startup);
        }
    }
}

/// Registers with `nameservers` until the broker shuts down; `startup` gets
/// the first round's verdict.
pub(crate) async fn run(
    b: Arc<BrokerInner>,
    mut nameservers: Vec<String>,
    startup: oneshot::Sender<Startup>,
) {
    // One link per nameserver, even if it was given twice.
    let mut seen = std::collections::HashSet::new();
    nameservers.retain(|ns| seen.insert(ns.clone()));
    let mut links: HashMap<String, Link> = nameservers
        .iter()
        .map(|ns| (ns.clone(), Link::default()))
        .collect();
    let mut verdict = Verdict {
        tx: Some(startup),
        expected: nameservers.len(),
        refusals: Vec::new(),
    };
    let retry_max = b.config.heartbeat_interval.min(RETRY_MAX);
    let mut retry = RETRY_FIRST.min(retry_max);
    // One registration per nameserver at a time, each going on across
    // rounds: a nameserver that does not answer (paused) holds up only its
    // own, for its timeout, not the next round's registrations with the
    // others (a topic created meanwhile waited for it).
    let mut in_flight = FuturesUnordered::new();
    let mut busy = std::collections::HashSet::new();
    'rounds: loop {
        let round_started = Instant::now();
        let version = b.topics_version.load(std::sync::atomic::Ordering::Acquire);
        let req = RegisterBroker {
            epoch: if b.replication.is_slave() {
                0
            } else {
                b.replication.epoch()
            },
            cluster: b.config.cluster.clone(),
            broker_name: b.config.broker_name.clone(),
            addr: b.advertised_addr.clone(),
            topics: b.topics.all(),
            role: b.config.replication.role,
        };
        let mut waiting = std::collections::HashSet::new();
        for ns in &nameservers {
            if !busy.insert(ns.clone()) {
                continue;
            }
            waiting.insert(ns.clone());
            let conn = links
                .get(ns)
                .and_then(|l| l.conn.clone())
                .filter(|c| !c.is_closed());
            in_flight.push(register(b.clone(), ns.clone(), conn, req.clone(), version));
        }
        // The first round is waited for until it decides whether the broker
        // starts; later ones end in the wait below, as they come.
        while verdict.tx.is_some() && !waiting.is_empty() {
            let Some(done) = in_flight.next().await else {
                break;
            };
            waiting.remove(&done.ns);
            settle(&b, &mut links, &mut verdict, &mut busy, done);
        }
        // Nothing to hear from (no nameserver at all): start anyway.
        verdict.send(Startup::Go);
        if nameservers.is_empty() {
            registered(&b, version);
        }
        // Retry a failing or refusing nameserver sooner than a heartbeat,
        // backing off while it stays so.
        let wait = if links
            .values()
            .all(|l| l.standing == Some(Standing::Registered))
        {
            retry = RETRY_FIRST.min(retry_max);
            b.config.heartbeat_interval
        } else {
            let wait = retry;
            retry = (retry * 2).min(retry_max);
            wait
        };
        let mut until = Instant::now() + wait;
        let closed = loop {
            // Only nameservers that answered have a connection to watch; a
            // failing one is retried by the timer, never in a busy loop.
            let watched: Vec<_> = links
                .iter()
                .filter_map(|(ns, l)| {
                    let (ns, c) = (ns.clone(), l.conn.clone()?);
                    Some(Box::pin(async move {
                        c.closed().await;
                        ns
                    }))
                })
                .collect();
            let any_closed = async move {
                if watched.is_empty() {
                    std::future::pending().await
                } else {
                    select_all(watched).await.0
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break None,
                _ = b.topics_changed.notified() => break None,
                ns = any_closed => break Some(ns),
                _ = b.shutdown.cancelled() => break 'rounds,
                // A registration ends meanwhile; one that failed is tried
                // again after the backoff, not the whole interval.
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let failed = !matches!(done.outcome, Outcome::Registered);
                    // The table changed while it was in flight (a round
                    // skipped this nameserver, busy): a new round now.
                    let stale = done.version
                        < b.topics_version.load(std::sync::atomic::Ordering::Acquire);
                    settle(&b, &mut links, &mut verdict, &mut busy, done);
                    if stale && !failed {
                        break None;
                    }
                    if failed {
                        until = until.min(Instant::now() + retry);
                    }
                }
            }
        };
        if let Some(ns) = closed {
            tracing::info!(nameserver = %ns, "connection to nameserver closed; registering again now");
            if let Some(link) = links.get_mut(&ns) {
                link.conn = None;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(round_started + MIN_ROUND_GAP) => {}
                _ = b.shutdown.cancelled() => break,
            }
        }
    }
    // Registrations still in flight end first (briefly), so that the
    // goodbye reaches the nameservers they were registering with.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(done) = in_flight.next().await {
            settle(&b, &mut links, &mut verdict, &mut busy, done);
        }
    })
    .await;
    drop(in_flight);
    let bye = UnregisterBroker {
        broker_name: b.config.broker_name.clone(),
        addr: b.advertised_addr.clone(),
    };
    // A goodbye only where the broker holds its name: elsewhere it is not
    // registered (a refused nameserver would refuse the goodbye too).
    join_all(links.into_values().filter_map(|l| {
        let conn = l.conn?;
        let registered = l.standing == Some(Standing::Registered);
        let bye = bye.clone();
        Some(async move {
            if registered {
                let _ = conn
                    .call_with_timeout(bye, Duration::from_millis(500))
                    .await;
            }
            conn.close();
        })
    }))
    .await;
}

/// [`register_once`], with the topic table version `req` carries.
async fn register(
    b: Arc<BrokerInner>,
    ns: String,
    conn: Option<Connection>,
    req: RegisterBroker,
    version: u64,
) -> Done {
    let (ns, conn, outcome) = register_once(b, ns, conn, req).await;
    Done {
        ns,
        conn,
        outcome,
        version,
    }
}

/// One registration's end: the nameserver, the connection to keep, the
/// outcome, and the topic table version it carried.
struct Done {
    ns: String,
    conn: Option<Connection>,
    outcome: Outcome,
    version: u64,
}

/// Records a registration's end: the link's standing, the start verdict,
/// and (when taken) that its topic table version is registered.
fn settle(
    b: &BrokerInner,
    links: &mut HashMap<String, Link>,
    verdict: &mut Verdict,
    busy: &mut std::collections::HashSet<String>,
    done: Done,
) {
    busy.remove(&done.ns);
    // Logged before the verdict goes out, so the refusal is in the log
    // before a broker that may not start says it is stopping.
    let link = links.entry(done.ns.clone()).or_default();
    record(b, &done.ns, link, done.conn, &done.outcome);
    verdict.observe(&done.ns, &done.outcome);
    // Creates waiting for this table version may answer once one
    // nameserver has it (clients ask the others on NO_ROUTE), or once
    // every nameserver answered or failed (an unreachable one is retried).
    if matches!(done.outcome, Outcome::Registered) || busy.is_empty() {
        registered(b, done.version);
    }
}

/// Lets creates waiting for topic table `version` (or older) answer.
fn registered(b: &BrokerInner, version: u64) {
    b.registered_version.send_if_modified(|v| {
        let grew = *v < version;
        *v = (*v).max(version);
        grew
    });
}

/// Registers over `conn` (or a new connection) with `ns`; the connection
/// to keep, if the nameserver answered.
async fn register_once(
    b: Arc<BrokerInner>,
    ns: String,
    conn: Option<Connection>,
    req: RegisterBroker,
) -> (String, Option<Connection>, Outcome) {
    let conn = match conn {
        Some(c) => c,
        None => match connect(&b, &ns).await {
            Ok(c) => c,
            Err(e) => return (ns, None, Outcome::Failed(e)),
        },
    };
    match conn.call_with_timeout(req, REQUEST_TIMEOUT).await {
        Ok(_) => (ns, Some(conn), Outcome::Registered),
        Err(e) => match e.remote() {
            Some(w) if w.code == ErrorCode::BrokerNameTaken => {
                let message = w.message.clone();
                (ns, Some(conn), Outcome::Refused(message))
            }
            _ => {
                // A fresh connection next time (this one timed out, closed
                // or answered nonsense).
                conn.close();
                (ns, None, Outcome::Failed(e.to_string()))
            }
        },
    }
}

/// Records `ns`'s answer in its link and logs a change of standing.
fn record(b: &BrokerInner, ns: &str, link: &mut Link, conn: Option<Connection>, outcome: &Outcome) {
    let was = link.standing;
    link.conn = conn;
    let name = &b.config.broker_name;
    match outcome {
        Outcome::Registered => {
            link.standing = Some(Standing::Registered);
            link.refusal_logged = None;
            match was {
                Some(Standing::Registered) => {}
                Some(Standing::Refused) => tracing::info!(
                    nameserver = %ns,
                    broker = %name,
                    "registered with nameserver: the broker that held the name is gone"
                ),
                _ => tracing::info!(nameserver = %ns, broker = %name, "registered with nameserver"),
            }
        }
        Outcome::Refused(message) => {
            link.standing = Some(Standing::Refused);
            let now = Instant::now();
            let log = was != Some(Standing::Refused)
                || link
                    .refusal_logged
                    .is_none_or(|at| now.saturating_duration_since(at) >= REFUSAL_LOG_EVERY);
            if log {
                link.refusal_logged = Some(now);
                tracing::error!(
                    nameserver = %ns,
                    broker = %name,
                    addr = %b.advertised_addr,
                    "nameserver refused this broker's registration, so its clients cannot \
                     reach this broker (retried about every second while the broker runs): \
                     {message}"
                );
            }
        }
        Outcome::Failed(e) => {
            link.standing = Some(Standing::Failing);
            if was != Some(Standing::Failing) {
                tracing::warn!(nameserver = %ns, error = %e, "cannot register with nameserver; will keep trying");
            }
        }
    }
}

/// The hello this broker says to a nameserver (`Role::Broker`) or to its
/// master (`Role::Replica`).
pub(crate) fn hello(b: &BrokerInner, role: Role) -> Hello {
    hello_from(&b.config, &b.advertised_addr, role)
}

/// The same, before the broker's tables exist.
pub(crate) fn hello_from(config: &crate::BrokerConfig, addr: &str, role: Role) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role,
        client_id: format!("{}@{addr}", config.broker_name),
        group: None,
    }
}

/// A connection to nameserver `ns`.
pub(crate) async fn connect(b: &BrokerInner, ns: &str) -> Result<Connection, String> {
    let hello = hello(b, Role::Broker);
    let config = b.security.outgoing(ConnectionConfig {
        request_timeout: REQUEST_TIMEOUT,
        ..Default::default()
    });
    Connection::connect(ns, hello, None, config)
        .await
        .map_err(|e| e.to_string())
}
