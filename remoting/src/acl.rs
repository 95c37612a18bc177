//! Users and their permissions: the ACL file (`--acl-file`, TOML) that
//! brokers and nameservers load, watch and check every request against.
//!
//! ```toml
//! [[user]]
//! access_key = "orders-app"
//! secret_key = "a long random secret"
//! topics = { "orders.*" = ["pub", "sub"], "audit" = ["pub"] }
//! groups = { "billing" = ["sub"], "orders-tx" = ["tx"] }
//!
//! [[user]]
//! access_key = "ops"
//! secret_key = "another secret"
//! admin = true
//!
//! [[user]]
//! access_key = "broker"      # brokers and nameservers sign in as this
//! secret_key = "cluster secret"
//! broker = true
//! ```
//!
//! Permissions: per topic `pub` (send, prepare, end its transactions)
//! and `sub` (pull); per group `sub` (consume as that consumer group,
//! commit its offsets) and `tx` (say hello as that producer group's
//! transactional producer and answer its check-backs); `admin` (topic
//! create and update, `tx resolve`, offset resets, dead-letter resends,
//! broker registration) and `broker` (a cluster member: register at
//! nameservers, replicate, talk to the controller). Names may end or
//! contain `*`, which matches any run of characters (`orders.*`, `*`).
//! What no rule grants is denied. A user whose certificate (mutual TLS)
//! has the access key as its common name needs no secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use txmq_protocol::{ErrorCode, WireError};

/// An operation a request asks for, on the resource it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Send to a topic (also prepare and end transactions on it).
    Pub(&'a str),
    /// Read a topic.
    Sub(&'a str),
    /// Consume as a consumer group (pull its queues, commit its offsets).
    Group(&'a str),
    /// Act as a producer group's transactional producer.
    Tx(&'a str),
    /// An administrative action, described for the refusal (`"delete topic
    /// orders"`).
    Admin(&'a str),
    /// What only a cluster member (a user with `broker`) or an admin may do
    /// (`"register broker broker-a"`).
    Cluster(&'a str),
    /// Anything an authenticated user may do (read routes and metadata).
    Authenticated,
}

impl std::fmt::Display for Op<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Pub(t) => write!(f, "pub to topic '{t}'"),
            Op::Sub(t) => write!(f, "sub to topic '{t}'"),
            Op::Group(g) => write!(f, "sub as consumer group '{g}'"),
            Op::Tx(g) => write!(f, "tx as producer group '{g}'"),
            Op::Admin(what) => write!(f, "{what} (needs admin)"),
            Op::Cluster(what) => write!(f, "{what} (needs broker or admin)"),
            Op::Authenticated => write!(f, "use this server"),
        }
    }
}

/// A problem with the ACL file.
#[derive(Debug, thiserror::Error)]
#[error("ACL file {path}: {message}")]
pub struct AclError {
    path: String,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    user: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    access_key: String,
    #[serde(default)]
    secret_key: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    broker: bool,
    #[serde(default)]
    topics: HashMap<String, Vec<String>>,
    #[serde(default)]
    groups: HashMap<String, Vec<String>>,
}

const PUB: u8 = 1;
const SUB: u8 = 2;
const TX: u8 = 4;

#[derive(Debug, Default)]
struct User {
    secret: Option<String>,
    admin: bool,
    broker: bool,
    topics: Vec<(String, u8)>,
    groups: Vec<(String, u8)>,
}

/// The users of one version of the ACL file.
#[derive(Debug, Default)]
pub struct Acl {
    users: HashMap<String, User>,
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn granted(rules: &[(String, u8)], name: &str, perm: u8) -> bool {
    rules
        .iter()
        .any(|(pattern, perms)| perms & perm != 0 && matches(pattern, name))
}

impl Acl {
    /// Parses an ACL file's text.
    ///
    /// # Errors
    /// Bad TOML, an unknown field or permission, a user twice, or no user
    /// at all.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let file: File = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut users = HashMap::new();
        for entry in file.user {
            let perms = |what: &str, list: &[String], allowed: &[(&str, u8)]| {
                list.iter().try_fold(0u8, |acc, p| {
                    allowed
                        .iter()
                        .find(|(n, _)| n == p)
                        .map(|(_, bit)| acc | bit)
                        .ok_or_else(|| {
                            format!(
                                "user '{}': unknown {what} permission '{p}' (known: {})",
                                entry.access_key,
                                allowed
                                    .iter()
                                    .map(|(n, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                })
            };
            let mut topics = Vec::new();
            for (name, list) in &entry.topics {
                topics.push((
                    name.clone(),
                    perms("topic", list, &[("pub", PUB), ("sub", SUB)])?,
                ));
            }
            let mut groups = Vec::new();
            for (name, list) in &entry.groups {
                groups.push((
                    name.clone(),
                    perms("group", list, &[("sub", SUB), ("tx", TX)])?,
                ));
            }
            if entry.access_key.is_empty() {
                return Err("a user has an empty access_key".into());
            }
            if entry.secret_key.as_deref() == Some("") {
                return Err(format!(
                    "user '{}': secret_key is empty (leave it out for a user who signs in \
                     with a client certificate only)",
                    entry.access_key
                ));
            }
            let user = User {
                secret: entry.secret_key.clone(),
                admin: entry.admin,
                broker: entry.broker,
                topics,
                groups,
            };
            if users.insert(entry.access_key.clone(), user).is_some() {
                return Err(format!("user '{}' is listed twice", entry.access_key));
            }
        }
        // No user locks everyone out, the cluster's own brokers too: a
        // file emptied or cut short while it is rewritten (`cat >`, an
        // editor, a deployment tool) parses, and must not replace the
        // version in force.
        if users.is_empty() {
            return Err(
                "no users: it would refuse every connection, the brokers' own too (a file \
                 emptied or cut short while being rewritten?); list at least one [[user]]"
                    .into(),
            );
        }
        Ok(Acl { users })
    }

    /// Whether `access_key` is a user.
    pub fn has_user(&self, access_key: &str) -> bool {
        self.users.contains_key(access_key)
    }

    /// Whether `user` may do `op`.
    pub fn allows(&self, user: &str, op: Op<'_>) -> bool {
        let Some(u) = self.users.get(user) else {
            return false;
        };
        match op {
            Op::Pub(topic) => granted(&u.topics, topic, PUB),
            Op::Sub(topic) => granted(&u.topics, topic, SUB),
            Op::Group(group) => granted(&u.groups, group, SUB),
            Op::Tx(group) => granted(&u.groups, group, TX),
            Op::Admin(_) => u.admin,
            Op::Cluster(_) => u.broker || u.admin,
            Op::Authenticated => true,
        }
    }

    /// Checks `signature` for `access_key` over `challenge`.
    pub(crate) fn verify(&self, access_key: &str, challenge: &[u8], signature: &[u8]) -> bool {
        let Some(secret) = self.users.get(access_key).and_then(|u| u.secret.as_deref()) else {
            return false;
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        ring::hmac::verify(&key, &signed_text(challenge, access_key), signature).is_ok()
    }

    /// Checks the signature a RocketMQ 5 client sends with each call:
    /// HMAC-SHA1, keyed by `access_key`'s secret, of `text` (the call's
    /// `x-mq-date-time`), in hex of either case.
    pub fn verify_rocketmq(&self, access_key: &str, text: &[u8], signature_hex: &str) -> bool {
        let secret = self.users.get(access_key).and_then(|u| u.secret.as_deref());
        let signature = from_hex(signature_hex).unwrap_or_default();
        // An unknown key takes the time of a known one: the answer's time
        // does not tell which keys exist.
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            secret.unwrap_or("(no such user)").as_bytes(),
        );
        let verified = ring::hmac::verify(&key, text, &signature).is_ok();
        verified && secret.is_some()
    }
}

/// The bytes of a hex string (either case); `None` if it is not one.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn signed_text(challenge: &[u8], access_key: &str) -> Vec<u8> {
    let mut text = Vec::with_capacity(16 + challenge.len() + access_key.len());
    text.extend_from_slice(b"txmq-auth-v1\0");
    text.extend_from_slice(challenge);
    text.extend_from_slice(access_key.as_bytes());
    text
}

/// The signature a client sends for a hello's `challenge`: HMAC-SHA256,
/// keyed by the user's secret, of the challenge and the access key.
pub fn auth_signature(secret: &str, challenge: &[u8], access_key: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, &signed_text(challenge, access_key))
        .as_ref()
        .to_vec()
}

/// A fresh random challenge.
pub(crate) fn challenge() -> Vec<u8> {
    let mut bytes = vec![0u8; 32];
    random_fill(&mut bytes);
    bytes
}

/// Fills `bytes` from the system's cryptographically secure random source.
pub fn random_fill(bytes: &mut [u8]) {
    // The system's random source failing is not something to serve through.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes)
        .expect("the system's random source works");
}

/// A user's credentials, for the connections a process opens.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key (the user's name).
    pub access_key: String,
    /// The secret, which never travels.
    pub secret_key: String,
}

impl Credentials {
    /// The credentials of a process's `--access-key` and `--secret-key`
    /// (or `TXMQ_ACCESS_KEY` and `TXMQ_SECRET_KEY`): both or neither; an
    /// empty one counts as not given (an empty secret is no secret).
    ///
    /// # Errors
    /// The usage error's text when only one of the two is given.
    pub fn from_flags(
        access_key: Option<&str>,
        secret_key: Option<&str>,
    ) -> Result<Option<Credentials>, &'static str> {
        fn given(key: Option<&str>) -> Option<&str> {
            key.filter(|k| !k.is_empty())
        }
        match (given(access_key), given(secret_key)) {
            (Some(access_key), Some(secret_key)) => Ok(Some(Credentials {
                access_key: access_key.to_string(),
                secret_key: secret_key.to_string(),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err("--access-key needs its --secret-key (or TXMQ_SECRET_KEY), not empty")
            }
            (None, Some(_)) => {
                Err("--secret-key needs its --access-key (or TXMQ_ACCESS_KEY), not empty")
            }
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// An access key as logs and answers show it: cut to its first 64
/// characters, so that a key of 100,000 makes no line that long.
pub fn shown_key(key: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 64;
    match key.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}... ({} bytes)", &key[..at], key.len()).into(),
        None => key.into(),
    }
}

/// A TOML error on one line, where it is (line and column) and what is
/// wrong: the toml crate's own text draws the line with a caret below it,
/// which a reload's WARN would spread over several log lines.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML parse error at line {line}, column {column}: {what}")
        }
        None => format!("TOML parse error: {what}"),
    }
}

/// The ACL file in force: loaded at start, reloaded when the file changes
/// or on SIGHUP ([`AclStore::watch`]). A reload that fails keeps the
/// version in force. Requests are checked against the version current
/// when they arrive, so a user removed from the file loses access at its
/// next request, while connections that stay permitted go on.
#[derive(Debug)]
pub struct AclStore {
    path: PathBuf,
    current: RwLock<Arc<Acl>>,
    stamp: Mutex<Option<u64>>,
}

/// What the file holds, hashed: an edit is seen even when it keeps the
/// file's size and modification time (two writes within the file system's
/// clock tick). The file is small and read once per poll.
fn stamp_of(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The file as read once: its stamp (`None` when it cannot be read) and
/// what it holds, so that the version loaded is the version stamped.
struct Read {
    stamp: Option<u64>,
    acl: Result<Acl, AclError>,
}

impl Read {
    fn from(path: &Path) -> Read {
        let err = |message: String| AclError {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Err(e) => Read {
                stamp: None,
                acl: Err(err(e.to_string())),
            },
            Ok(bytes) => Read {
                stamp: Some(stamp_of(&bytes)),
                acl: String::from_utf8(bytes)
                    .map_err(|_| err("the file is not UTF-8 text".into()))
                    .and_then(|text| Acl::parse(&text).map_err(err)),
            },
        }
    }
}

impl AclStore {
    /// Loads the ACL file at `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid ACL file.
    pub fn load(path: &Path) -> Result<Arc<AclStore>, AclError> {
        let read = Read::from(path);
        let acl = read.acl?;
        info!(path = %path.display(), users = acl.users.len(), "ACL file loaded");
        Ok(Arc::new(AclStore {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(acl)),
            stamp: Mutex::new(read.stamp),
        }))
    }

    /// The version in force.
    pub fn current(&self) -> Arc<Acl> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again; on error keeps the version in force.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid ACL file.
    pub fn reload(&self) -> Result<(), AclError> {
        self.apply(Read::from(&self.path))
    }

    /// Reads the file and takes it if it changed since it was last read
    /// (one read per poll).
    fn reload_if_changed(&self) -> Result<(), AclError> {
        let read = Read::from(&self.path);
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == read.stamp {
            return Ok(());
        }
        self.apply(read)
    }

    /// Takes what was read as the version in force; a file that cannot be
    /// read or parsed keeps the version in force, and its stamp is kept so
    /// that the same mistake is reported once.
    fn apply(&self, read: Read) -> Result<(), AclError> {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = read.stamp;
        let acl = read.acl?;
        info!(path = %self.path.display(), users = acl.users.len(), "ACL file reloaded");
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acl);
        Ok(())
    }

    /// Checks `op` for the connection's `user`; the refusal names the
    /// user, the operation and the resource, and is logged.
    ///
    /// # Errors
    /// `ACCESS_DENIED`.
    pub fn check(&self, user: Option<&str>, op: Op<'_>) -> Result<(), WireError> {
        let allowed = match user {
            Some(u) => self
                .current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .allows(u, op),
            None => false,
        };
        if allowed {
            return Ok(());
        }
        let user = user.unwrap_or("(not authenticated)");
        warn!(%user, operation = %op, "access denied");
        Err(WireError::new(
            ErrorCode::AccessDenied,
            format!("user '{user}' may not {op}"),
        ))
    }

    /// Reloads the file when it changes (checked every `interval`) or on
    /// SIGHUP, until `shutdown`.
    pub fn watch(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let store = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hup = async {
                    match hangup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup = std::future::pending::<()>();
                let forced = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => false,
                    _ = hup => true,
                };
                let reloaded = if forced {
                    store.reload()
                } else {
                    store.reload_if_changed()
                };
                if let Err(e) = reloaded {
                    warn!(error = %e, "ACL file not reloaded; the version in force stays");
                }
            }
        });
    }
}

/// What a server adds to its connections: TLS and the ACL file.
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    /// TLS on every accepted connection.
    pub tls: Option<crate::tls::TlsServer>,
    /// The ACL file: every connection authenticates in its hello.
    pub acl: Option<Arc<AclStore>>,
}

impl ServerSecurity {
    /// The security a server's flags ask for: TLS when `tls` has a cert
    /// and key (`--tls-cert`, `--tls-key`; `--tls-ca` and
    /// `client_auth` for client certificates), and the ACL file at
    /// `acl_file`. Nothing set: plaintext, no authentication.
    ///
    /// # Errors
    /// A TLS file or the ACL file that cannot be used, named.
    pub fn load(
        tls: &crate::tls::TlsFiles,
        client_auth: bool,
        acl_file: Option<&Path>,
    ) -> Result<ServerSecurity, String> {
        let serves_tls = tls.cert.is_some() || tls.key.is_some();
        if client_auth && !serves_tls {
            return Err("--tls-client-auth needs --tls-cert and --tls-key".into());
        }
        Ok(ServerSecurity {
            tls: match serves_tls {
                true => Some(
                    crate::tls::TlsServer::from_files(tls, client_auth)
                        .map_err(|e| e.to_string())?,
                ),
                false => None,
            },
            acl: match acl_file {
                Some(path) => Some(AclStore::load(path).map_err(|e| e.to_string())?),
                None => None,
            },
        })
    }

    /// Starts reloading the ACL file on change or SIGHUP (once a second
    /// at most), until `shutdown`.
    pub fn watch(&self, shutdown: CancellationToken) {
        if let Some(acl) = &self.acl {
            acl.watch(Duration::from_secs(1), shutdown);
        }
    }

    /// Logs the warning of a server that listens on `addr`, beyond
    /// loopback, without authentication.
    pub fn warn_if_open(&self, addr: &std::net::SocketAddr, what: &str) {
        if self.acl.is_none() && !addr.ip().is_loopback() {
            warn!(
                %addr,
                "{what} listens beyond loopback without authentication: anyone who can reach it \
                 can do anything (give --acl-file, and --tls-cert/--tls-key)"
            );
        }
    }

    /// Checks `op` for `user`; everything is allowed without an ACL file.
    ///
    /// # Errors
    /// `ACCESS_DENIED`.
    pub fn check(&self, user: Option<&str>, op: Op<'_>) -> Result<(), WireError> {
        match &self.acl {
            Some(acl) => acl.check(user, op),
            None => Ok(()),
        }
    }

    /// Whether an ACL file is in force.
    pub fn authenticates(&self) -> bool {
        self.acl.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_runs_of_characters() {
        assert!(matches("orders.*", "orders.eu"));
        assert!(matches("orders.*", "orders."));
        assert!(!matches("orders.*", "orders"));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "a-x-b-y-c"));
        assert!(!matches("a*b*c", "a-x-c"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exact2"));
        assert!(matches("*.audit", "eu.audit"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn permissions_are_granted_by_rules_and_denied_by_default() {
        let acl = Acl::parse(
            r#"
            [[user]]
            access_key = "app"
            secret_key = "s"
            topics = { "orders.*" = ["pub"], "audit" = ["pub", "sub"] }
            groups = { "billing" = ["sub"], "tx-*" = ["tx"] }

            [[user]]
            access_key = "ops"
            admin = true
            "#,
        )
        .unwrap();
        assert!(acl.allows("app", Op::Pub("orders.eu")));
        assert!(!acl.allows("app", Op::Sub("orders.eu")));
        assert!(acl.allows("app", Op::Sub("audit")));
        assert!(acl.allows("app", Op::Group("billing")));
        assert!(!acl.allows("app", Op::Tx("billing")));
        assert!(acl.allows("app", Op::Tx("tx-orders")));
        assert!(!acl.allows("app", Op::Admin("create topic x")));
        assert!(!acl.allows("app", Op::Cluster("register broker b")));
        assert!(acl.allows("ops", Op::Admin("create topic x")));
        assert!(acl.allows("ops", Op::Cluster("register broker b")));
        assert!(!acl.allows("ops", Op::Pub("orders.eu")));
        assert!(!acl.allows("nobody", Op::Authenticated));
    }

    /// RocketMQ 5 clients sign the call's date-time with HMAC-SHA1 of the
    /// secret, in hex (Java, Python and Go lower case, Node.js upper).
    #[test]
    fn rocketmq_signatures_are_checked_against_the_users_secret() {
        let acl = Acl::parse(
            "[[user]]\naccess_key = \"alice\"\nsecret_key = \"alice-secret\"\n\
             [[user]]\naccess_key = \"certified\"\n",
        )
        .unwrap();
        let date = b"20231227T194619Z";
        let good = "3533152c5885fb3ad21bdf2c95e081103655f184";
        assert!(acl.verify_rocketmq("alice", date, good));
        assert!(acl.verify_rocketmq("alice", date, &good.to_uppercase()));
        assert!(!acl.verify_rocketmq("alice", b"20231227T194620Z", good));
        assert!(!acl.verify_rocketmq("bob", date, good));
        assert!(!acl.verify_rocketmq("certified", date, good), "no secret");
        for bad in ["", "353", "zz33152c5885fb3ad21bdf2c95e081103655f184", "é5"] {
            assert!(!acl.verify_rocketmq("alice", date, bad), "{bad}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e =
            Acl::parse("[[user]]\naccess_key = \"a\"\ntopics = { t = [\"write\"] }\n").unwrap_err();
        assert!(e.contains("unknown topic permission 'write'"), "{e}");
        let e =
            Acl::parse("[[user]]\naccess_key = \"a\"\n[[user]]\naccess_key = \"a\"\n").unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = Acl::parse("[[user]]\naccess_key = \"a\"\nadmn = true\n").unwrap_err();
        assert!(e.contains("admn"), "{e}");
        // A secret left empty (a template not filled in, say) is no secret.
        let e = Acl::parse("[[user]]\naccess_key = \"a\"\nsecret_key = \"\"\nadmin = true\n")
            .unwrap_err();
        assert!(e.contains("user 'a': secret_key is empty"), "{e}");
        // A file emptied (or cut short) while it is rewritten parses as
        // no user at all, which would lock everyone out.
        for text in ["", "  \n\t\n", "# users come later\n"] {
            let e = Acl::parse(text).unwrap_err();
            assert!(e.starts_with("no users"), "{text:?}: {e}");
        }
        // Not TOML: one line, saying where and what.
        let e = Acl::parse("[[user]]\naccess_key = \"a\"\nsecret_key = \n").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with("TOML parse error at line 3, column 14: ")
                && e.contains("invalid string"),
            "{e}"
        );
    }

    #[test]
    fn signatures_verify_only_with_the_secret_and_challenge() {
        let acl = Acl::parse("[[user]]\naccess_key = \"a\"\nsecret_key = \"s\"\n").unwrap();
        let c = challenge();
        assert!(acl.verify("a", &c, &auth_signature("s", &c, "a")));
        assert!(!acl.verify("a", &c, &auth_signature("wrong", &c, "a")));
        assert!(!acl.verify("a", &challenge(), &auth_signature("s", &c, "a")));
        assert!(!acl.verify("b", &c, &auth_signature("s", &c, "b")));
    }
}
