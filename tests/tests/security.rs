//! The broker's security end to end, against real `txmq-broker` and
//! `txmq-nameserver` processes and through the `txmq` client: every
//! permission of the ACL file refused and granted (ACCESS_DENIED names the
//! user, the operation and the resource, and the connection goes on
//! serving), the operator source of an end that only an admin may claim,
//! a wrong secret, a user removed from the file (SIGHUP, or the file
//! changing) losing access at its next request, check-backs only to
//! producers still allowed, the transaction flow under TLS with an ACL
//! file, and TLS failures: a wrong CA, plaintext to the TLS port, mutual
//! TLS without a client certificate.
//!
//! The nameserver has no TLS flags yet, so where clients speak TLS they
//! reach it through [`TlsFront`], an in-process TLS front that relays each
//! connection to the real nameserver process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use txmq::{
    Admin, BoxError, CheckRequest, ClientConfig, ErrorCode, Message, Producer, PullConsumer,
    TlsClient, TlsFiles, TransactionListener, TransactionProducer, TransactionState, TxAction,
    TxContext, PERM_READ_WRITE,
};
use txmq_protocol::{
    CommitOffset, EndTransaction, GetMessages, HalfMessage, Heartbeat, Hello, HelloOk, LeaveGroup,
    OffsetTarget, PrepareTransaction, PullRequest, QueryOffset, QueueOwner, Request,
    ResendDeadLetters, Response, Role, SendBack, StoredMessage, Subscription, TxOffset, TxSource,
    WireError, PROPERTY_REAL_TOPIC, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{
    Connection, ConnectionConfig, Credentials, ServerSecurity, Service, TlsServer,
};
use txmq_tests::pki::Pki;
use txmq_tests::{free_port, BrokerProcess, NameserverProcess};

const BROKER: &str = "broker-a";
const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const TX_GROUP: &str = "orders-tx";

/// alice produces and consumes `orders` (and is its transactional
/// producer); bob may only publish to `audit`; carol reads `orders`
/// without any consumer group; dave publishes to `orders` but is no
/// transactional producer; ops is an admin; the broker signs in as broker.
const ACL: &str = r#"
[[user]]
access_key = "alice"
secret_key = "alice-secret"
topics = { "orders" = ["pub", "sub"] }
groups = { "billing" = ["sub"], "orders-tx" = ["tx"] }

[[user]]
access_key = "bob"
secret_key = "bob-secret"
topics = { "audit" = ["pub"] }

[[user]]
access_key = "carol"
secret_key = "carol-secret"
topics = { "orders" = ["sub", "pub"] }

[[user]]
access_key = "dave"
secret_key = "dave-secret"
topics = { "orders" = ["pub"] }
groups = { "orders-tx" = ["sub"] }

[[user]]
access_key = "mallory"
secret_key = "mallory-secret"
topics = { "audit" = ["pub"] }
groups = { "mg" = ["sub"], "mallory-tx" = ["tx"] }

[[user]]
access_key = "ops"
secret_key = "ops-secret"
admin = true

[[user]]
access_key = "broker"
secret_key = "broker-secret"
broker = true
"#;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// How a [`Site`] runs its broker.
#[derive(Default)]
struct Setup<'a> {
    /// The broker serves TLS (clients, and the nameserver front, too).
    tls: bool,
    /// Mutual TLS: clients must show a certificate.
    client_auth: bool,
    /// More broker flags.
    extra: &'a [&'a str],
}

/// A nameserver process, a broker process with the ACL file [`ACL`], and
/// the CA of their certificates.
struct Site {
    pki: Pki,
    _nameserver: NameserverProcess,
    /// Where clients find the nameserver (its TLS front under TLS).
    ns: String,
    broker: BrokerProcess,
    acl: PathBuf,
    /// What clients verify servers with, under TLS.
    tls: Option<TlsClient>,
    /// Clients must show a certificate.
    client_auth: bool,
    _front: Option<TlsFront>,
    _dir: tempfile::TempDir,
}

impl Site {
    async fn start(setup: Setup<'_>) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new("txmq test CA");
        let acl = pki.acl("acl.toml", ACL);
        let ns_addr = format!("127.0.0.1:{}", free_port());
        let nameserver = tokio::task::block_in_place(|| {
            NameserverProcess::start(&ns_addr, &[], &dir.path().join("nameserver.log"))
        });
        let server = pki.issue("127.0.0.1");
        let (front, ns) = match setup.tls {
            true => {
                let front = TlsFront::start(&ns_addr, &pki.issue("front")).await;
                let addr = front.addr.clone();
                (Some(front), addr)
            }
            false => (None, ns_addr),
        };
        let mut flags: Vec<String> = vec![
            "--acl-file".into(),
            path(&acl),
            "--access-key".into(),
            "broker".into(),
            "--secret-key".into(),
            "broker-secret".into(),
            "--auto-create-topics".into(),
            "false".into(),
        ];
        if setup.tls {
            flags.extend([
                "--tls-cert".into(),
                path(&server.cert),
                "--tls-key".into(),
                path(&server.key),
                "--tls-ca".into(),
                path(&pki.ca()),
            ]);
        }
        if setup.client_auth {
            flags.push("--tls-client-auth".into());
        }
        flags.extend(setup.extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let data = dir.path().join("broker");
        let broker =
            tokio::task::block_in_place(|| BrokerProcess::start(&data, &ns, BROKER, &flags));
        let tls = setup.tls.then(|| tls_client(&pki, None));
        let site = Site {
            pki,
            _nameserver: nameserver,
            ns,
            broker,
            acl,
            tls,
            client_auth: setup.client_auth,
            _front: front,
            _dir: dir,
        };
        site.wait_registered().await;
        site
    }

    /// Client settings signing in as `user` (its secret is `user-secret`;
    /// under mutual TLS, its certificate names it).
    fn config(&self, user: &str) -> ClientConfig {
        let mut config = self.anonymous();
        config.credentials = Some(credentials(user));
        if self.client_auth {
            config.tls = Some(tls_client(&self.pki, Some(&self.pki.issue(user))));
        }
        config
    }

    /// Client settings without credentials.
    fn anonymous(&self) -> ClientConfig {
        let mut config = ClientConfig::with_nameservers([self.ns.as_str()]);
        config.tls = self.tls.clone();
        config.request_timeout = Duration::from_secs(5);
        config
    }

    async fn admin(&self, user: &str) -> Admin {
        Admin::with_config(self.config(user))
            .await
            .unwrap_or_else(|e| panic!("admin as {user} connects: {e}"))
    }

    async fn producer(&self, user: &str) -> Producer {
        Producer::builder()
            .config(self.config(user))
            .build()
            .await
            .unwrap_or_else(|e| panic!("producer as {user} builds: {e}"))
    }

    /// A raw connection to the broker as `user`, for requests the client
    /// does not send one by one.
    async fn connect(&self, user: &str, role: Role, group: Option<&str>) -> Connection {
        let config = ConnectionConfig {
            tls: self.tls.clone(),
            credentials: Some(credentials(user)),
            ..ConnectionConfig::default()
        };
        Connection::connect(&self.broker.addr, hello(role, group), None, config)
            .await
            .unwrap_or_else(|e| panic!("{user} connects to the broker: {e}"))
    }

    /// Waits (up to 5 s) until `user`'s secret is refused, by a new
    /// producer's send (AUTHENTICATION_FAILED): the ACL file changed it.
    async fn wait_until_refused(&self, user: &str, why_not: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let sent = match Producer::builder().config(self.config(user)).build().await {
                Ok(p) => p.send(Message::new(TOPIC, "old secret")).await.map(drop),
                Err(e) => Err(e),
            };
            match sent {
                Err(e) if e.code() == Some(ErrorCode::AuthenticationFailed) => return,
                other => assert!(
                    Instant::now() < deadline,
                    "{why_not}: {other:?}\n{}",
                    self.broker.log_text()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates [`TOPIC`] as ops and waits until the nameserver routes it.
    async fn create_topic(&self, topic: &str) {
        let admin = self.admin("ops").await;
        admin
            .create_topic(topic, 2, PERM_READ_WRITE, None)
            .await
            .unwrap_or_else(|e| panic!("ops creates {topic}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while admin.route(topic).await.is_err() {
            assert!(Instant::now() < deadline, "{topic} never routed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        admin.close().await.unwrap();
    }

    async fn wait_registered(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(admin) = Admin::with_config(self.anonymous()).await {
                let known = admin.cluster().await.unwrap_or_default();
                admin.close().await.unwrap();
                if known.iter().any(|b| b.broker_name == BROKER) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the broker never registered; its log:\n{}",
                self.broker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the ACL file without `user`.
    /// Gives `users` (none of whom has a group rule yet) `tx` of
    /// [`TX_GROUP`] in the ACL file, and has the broker read it (a start of
    /// theirs is refused until it has).
    fn grant_tx(&self, users: &[&str]) {
        let text = std::fs::read_to_string(&self.acl).expect("read ACL file");
        let granted: Vec<String> = text
            .split("[[user]]")
            .map(|u| {
                if users
                    .iter()
                    .any(|n| u.contains(&format!("access_key = \"{n}\"")))
                {
                    assert!(!u.contains("groups"), "{u}");
                    format!(
                        "{}\ngroups = {{ \"{TX_GROUP}\" = [\"tx\"] }}\n\n",
                        u.trim_end()
                    )
                } else {
                    u.to_string()
                }
            })
            .collect();
        std::fs::write(&self.acl, granted.join("[[user]]")).expect("write ACL file");
        self.broker.signal("HUP");
    }

    fn remove_user(&self, user: &str) {
        let text = std::fs::read_to_string(&self.acl).expect("read ACL file");
        let kept: Vec<&str> = text
            .split("[[user]]")
            .filter(|u| !u.contains(&format!("access_key = \"{user}\"")))
            .collect();
        std::fs::write(&self.acl, kept.join("[[user]]")).expect("write ACL file");
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn credentials(user: &str) -> Credentials {
    Credentials {
        access_key: user.into(),
        secret_key: format!("{user}-secret"),
    }
}

fn hello(role: Role, group: Option<&str>) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role,
        client_id: format!("security-test-{}", free_port()),
        group: group.map(str::to_string),
    }
}

/// TLS verifying servers with `pki`'s CA, showing `cert` when given.
fn tls_client(pki: &Pki, cert: Option<&txmq_tests::pki::Issued>) -> TlsClient {
    TlsClient::from_files(&TlsFiles {
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        ca: Some(pki.ca()),
    })
    .expect("client TLS files load")
}

/// Asserts `result` is ACCESS_DENIED naming `user` and `what` (the
/// operation and its resource, as the refusal words it).
fn assert_denied<T: std::fmt::Debug>(result: Result<T, impl ToWire>, user: &str, what: &str) {
    let error = result.expect_err("refused");
    let wire = error
        .wire()
        .unwrap_or_else(|| panic!("not a broker's refusal: {}", error.text()));
    assert_eq!(wire.code, ErrorCode::AccessDenied, "{wire}");
    assert!(
        wire.message.contains(&format!("'{user}'")) && wire.message.contains(what),
        "the refusal names neither user '{user}' nor '{what}': {wire}"
    );
}

/// The wire error under a client or a connection error.
trait ToWire {
    fn wire(&self) -> Option<WireError>;
    fn text(&self) -> String;
}

impl ToWire for txmq::Error {
    fn wire(&self) -> Option<WireError> {
        self.wire_error().cloned()
    }
    fn text(&self) -> String {
        self.to_string()
    }
}

impl ToWire for txmq_remoting::Error {
    fn wire(&self) -> Option<WireError> {
        self.remote().cloned()
    }
    fn text(&self) -> String {
        self.to_string()
    }
}

fn pull(topic: &str, group: Option<&str>) -> PullRequest {
    PullRequest {
        topic: topic.into(),
        queue: 0,
        offset: 0,
        max_messages: 16,
        max_wait_ms: 0,
        tag_filter: Vec::new(),
        owner: group.map(|g| QueueOwner {
            group: g.into(),
            client_id: "member".into(),
        }),
        epoch: 0,
        after: None,
        browse: false,
    }
}

/// Polls `topic` as `group` (signed in as `user`) until a message with
/// `body` arrives (10 s at most).
async fn receive(site: &Site, user: &str, group: &str, topic: &str, body: &str) {
    let mut consumer = PullConsumer::builder()
        .config(site.config(user))
        .group(group)
        .topic(topic)
        .build()
        .await
        .expect("consumer builds");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let batch = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        if batch.iter().any(|m| m.body().as_ref() == body.as_bytes()) {
            break;
        }
        assert!(Instant::now() < deadline, "'{body}' never arrived");
    }
    consumer.shutdown().await.expect("consumer commits");
}

/// A transaction listener whose local transactions end as `execute`
/// says and whose check-backs answer `check`, counting them.
struct Listener {
    execute: TransactionState,
    check: TransactionState,
    checks: AtomicU32,
}

impl Listener {
    fn new(execute: TransactionState, check: TransactionState) -> Arc<Listener> {
        Arc::new(Listener {
            execute,
            check,
            checks: AtomicU32::new(0),
        })
    }
}

impl TransactionListener for Listener {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(self.execute)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        Ok(self.check)
    }
}

async fn tx_producer(
    site: &Site,
    user: &str,
    listener: &Arc<Listener>,
) -> txmq::Result<TransactionProducer<Listener>> {
    TransactionProducer::builder()
        .config(site.config(user))
        .group(TX_GROUP)
        .listener_arc(listener.clone())
        .start()
        .await
}

// ---------------------------------------------------------------------------
// A TLS front for the nameserver
// ---------------------------------------------------------------------------

/// Serves TLS on a port of its own and relays each connection, request by
/// request, over a plaintext connection of its own to a nameserver: a
/// TLS nameserver for the tests, until the nameserver has TLS flags.
struct TlsFront {
    addr: String,
    stop: CancellationToken,
}

impl TlsFront {
    async fn start(upstream: &str, cert: &txmq_tests::pki::Issued) -> TlsFront {
        let tls = TlsServer::from_files(
            &TlsFiles {
                cert: Some(cert.cert.clone()),
                key: Some(cert.key.clone()),
                ca: None,
            },
            false,
        )
        .expect("front TLS files load");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("front binds");
        let addr = listener.local_addr().expect("front address").to_string();
        let stop = CancellationToken::new();
        let relay = Arc::new(Relay {
            upstream: upstream.to_string(),
            links: Mutex::default(),
        });
        tokio::spawn(txmq_remoting::server::serve_with(
            listener,
            relay,
            ConnectionConfig::default(),
            ServerSecurity {
                tls: Some(tls),
                acl: None,
            },
            stop.clone(),
        ));
        TlsFront { addr, stop }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Each client connection's own connection to the nameserver (so that a
/// broker's registration lives and dies with its connection, as there).
type Link = Arc<tokio::sync::OnceCell<Connection>>;

struct Relay {
    upstream: String,
    links: Mutex<HashMap<u64, Link>>,
}

impl Relay {
    fn link(&self, conn: &Connection) -> Link {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.entry(conn.id()).or_default().clone()
    }
}

impl Service for Relay {
    fn hello(&self, _: &Connection, _: &Hello) -> Result<HelloOk, WireError> {
        Ok(HelloOk::new(PROTOCOL_VERSION, "tls-front"))
    }

    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let link = self.link(conn);
        let upstream = self.upstream.clone();
        let hello = conn.peer_hello().cloned();
        Box::pin(async move {
            let internal = |e: txmq_remoting::Error| match e.remote() {
                Some(w) => w.clone(),
                None => WireError::new(ErrorCode::Internal, format!("relay: {e}")),
            };
            let hello = hello.unwrap_or_else(hello_of_relay);
            let to = link
                .get_or_try_init(|| {
                    Connection::connect(&upstream, hello, None, ConnectionConfig::default())
                })
                .await
                .map_err(internal)?;
            to.request(request, Duration::from_secs(10))
                .await
                .map_err(internal)
        })
    }

    fn closed(&self, conn: &Connection) {
        let link = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn.id());
        if let Some(to) = link.as_ref().and_then(|l| l.get()) {
            to.close();
        }
    }
}

fn hello_of_relay() -> Hello {
    hello(Role::Admin, None)
}

// ---------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------

/// Topic creation, offset resets and transaction lists need `admin`; a
/// refused user's connection goes on serving what it may do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administration_needs_admin() {
    let site = Site::start(Setup::default()).await;
    let alice = site.admin("alice").await;
    assert_denied(
        alice.create_topic(TOPIC, 2, PERM_READ_WRITE, None).await,
        "alice",
        "create topic orders",
    );
    assert!(
        alice.list_topics().await.is_ok(),
        "the refused connection still serves"
    );
    site.create_topic(TOPIC).await;
    assert_denied(
        alice
            .reset_offsets(GROUP, TOPIC, OffsetTarget::First, None)
            .await,
        "alice",
        "reset the offsets of group billing on topic orders",
    );
    assert_denied(
        alice.list_transactions(None).await,
        "alice",
        "list transactions",
    );
    let ops = site.admin("ops").await;
    ops.reset_offsets(GROUP, TOPIC, OffsetTarget::First, None)
        .await
        .expect("ops resets offsets");
    ops.list_transactions(None)
        .await
        .expect("ops lists transactions");
    assert!(
        site.broker.log_text().contains("access denied"),
        "refusals are logged"
    );
}

/// Sending needs `pub` on every topic of the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_needs_pub_on_the_topic() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let bob = site.producer("bob").await;
    assert_denied(
        bob.send(Message::new(TOPIC, "from bob")).await,
        "bob",
        "pub to topic 'orders'",
    );
    let alice = site.producer("alice").await;
    alice
        .send(Message::new(TOPIC, "from alice"))
        .await
        .expect("alice sends");
    receive(&site, "alice", GROUP, TOPIC, "from alice").await;
}

/// Reading needs `sub` on the topic, and as a group member `sub` on the
/// group too (the group's own retry topic needs only the group); offsets
/// and heartbeats need the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_needs_sub_on_the_topic_and_the_group() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    site.producer("alice")
        .await
        .send(Message::new(TOPIC, "to read"))
        .await
        .expect("alice sends");

    let bob = site.connect("bob", Role::Consumer, None).await;
    assert_denied(
        bob.call(pull(TOPIC, None)).await,
        "bob",
        "sub to topic 'orders'",
    );
    let carol = site.connect("carol", Role::Consumer, None).await;
    carol
        .call(pull(TOPIC, None))
        .await
        .expect("carol reads the topic without a group");
    assert_denied(
        carol.call(pull(TOPIC, Some(GROUP))).await,
        "carol",
        "sub as consumer group 'billing'",
    );
    assert_denied(
        carol
            .call(QueryOffset {
                group: GROUP.into(),
                topic: TOPIC.into(),
                queue: 0,
                stored_since_ms: None,
            })
            .await,
        "carol",
        "consumer group 'billing'",
    );
    let beat = |topic: &str| Heartbeat {
        group: GROUP.into(),
        client_id: "member".into(),
        subscriptions: vec![Subscription {
            topic: topic.into(),
            expression: "*".into(),
        }],
        broadcast: false,
        held: Vec::new(),
    };
    assert_denied(
        carol.call(beat(TOPIC)).await,
        "carol",
        "consumer group 'billing'",
    );
    let alice = site.connect("alice", Role::Consumer, None).await;
    assert_denied(
        alice.call(beat("audit")).await,
        "alice",
        "sub to topic 'audit'",
    );
    alice.call(beat(TOPIC)).await.expect("alice heartbeats");
    alice
        .call(pull(TOPIC, Some(GROUP)))
        .await
        .expect("alice pulls as a member of billing");
    assert_denied(
        carol
            .call(LeaveGroup {
                group: GROUP.into(),
                client_id: "member".into(),
            })
            .await,
        "carol",
        "consumer group 'billing'",
    );
    let retry = alice
        .call(pull("%RETRY%billing", Some(GROUP)))
        .await
        .expect_err("no retry topic yet");
    assert_eq!(
        retry.remote().map(|w| w.code),
        Some(ErrorCode::UnknownTopic),
        "the group's own retry topic needs only the group: {retry}"
    );
    alice
        .call(LeaveGroup {
            group: GROUP.into(),
            client_id: "member".into(),
        })
        .await
        .expect("alice's member leaves");
    receive(&site, "alice", GROUP, TOPIC, "to read").await;
}

/// Handing a message back copies the record it names into the group's
/// retry topic, where the group reads it: the record's topic must be one
/// the user may read (a group's permission alone read any topic's bodies),
/// and a consumer's own copy of a message, which may go back to the topic
/// it names (its retry, an operator's re-send of its dead letter), needs
/// `pub` there. A transaction's consumer offsets need their group, as a
/// commit does. An operator reads a group's dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handing_back_and_transaction_offsets_need_what_they_touch() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    site.producer("alice")
        .await
        .send(Message::new(TOPIC, "confidential"))
        .await
        .expect("alice sends");
    let carol = site.connect("carol", Role::Consumer, None).await;
    let mut stored: Option<StoredMessage> = None;
    for queue in 0..2 {
        let pulled = carol
            .call(PullRequest {
                queue,
                ..pull(TOPIC, None)
            })
            .await
            .expect("carol reads orders");
        stored = stored.or(pulled.messages.into_iter().next());
    }
    let stored = stored.expect("the message is stored");
    let back = |group: &str, message: Option<StoredMessage>| SendBack {
        group: group.into(),
        log_offset: stored.log_offset,
        delay_ms: Some(0),
        max_reconsume_times: 16,
        dead_letter: false,
        msg_id: Some(stored.message.msg_id),
        message: message.map(Box::new),
    };

    let mallory = site.connect("mallory", Role::Consumer, None).await;
    assert_denied(
        mallory.call(back("mg", None)).await,
        "mallory",
        "sub to topic 'orders'",
    );
    // A copy naming orders as its origin, as if from mg's retry topic.
    let mut forged = stored.clone();
    forged.message.topic = "%RETRY%mg".into();
    forged.message.body = "forged".into();
    forged
        .message
        .properties
        .insert(PROPERTY_REAL_TOPIC.into(), TOPIC.into());
    // Taken (the group may hand back what it read), marked as the
    // consumer's word: its dead letter goes back only where an operator
    // names.
    mallory
        .call(SendBack {
            dead_letter: true,
            ..back("mg", Some(forged))
        })
        .await
        .expect("a copy is handed back into mg's own dead letters");
    // Straight to the dead letters, from where ops re-sends to orders.
    assert_denied(
        mallory
            .call(SendBack {
                dead_letter: true,
                ..back("mg", None)
            })
            .await,
        "mallory",
        "sub to topic 'orders'",
    );
    let alice = site.connect("alice", Role::Consumer, None).await;
    let sent_back = alice
        .call(SendBack {
            dead_letter: true,
            ..back(GROUP, None)
        })
        .await
        .expect("alice hands back what billing reads");
    assert_eq!(sent_back.topic, "%DLQ%billing");
    let ops = site.connect("ops", Role::Admin, None).await;
    let letters = ops
        .call(GetMessages {
            topic: "%DLQ%billing".into(),
            queue: 0,
            offset: 0,
            count: 16,
        })
        .await
        .expect("ops reads billing's dead letters");
    assert_eq!(letters.messages.len(), 1, "{letters:?}");
    let resend = |all: bool, to: Option<&str>| ResendDeadLetters {
        group: "mg".into(),
        msg_ids: if all {
            Vec::new()
        } else {
            vec![stored.message.msg_id]
        },
        all,
        to: to.map(str::to_string),
        force: false,
    };
    let left = ops.call(resend(true, None)).await.expect("ops re-sends");
    assert!(left.resent.is_empty(), "{left:?}");
    assert!(
        left.left
            .iter()
            .any(|(_, why)| why.contains("reported by a consumer")),
        "{left:?}"
    );
    let refused = ops.call(resend(false, None)).await.expect_err("no --to");
    assert!(
        refused.to_string().contains("reported by a consumer"),
        "{refused}"
    );
    let resent = ops
        .call(resend(false, Some(TOPIC)))
        .await
        .expect("re-sent where ops names");
    assert_eq!(resent.resent.len(), 1, "{resent:?}");

    // mallory's transaction may not move billing's offset.
    let tx = site
        .connect("mallory", Role::TransactionProducer, Some("mallory-tx"))
        .await;
    let prepare = |group: &str| PrepareTransaction {
        producer_group: "mallory-tx".into(),
        messages: vec![HalfMessage {
            queue: 0,
            message: txmq::WireMessage::new("audit", "output"),
        }],
        first_check_delay_ms: None,
        attempt: None,
        producer: None,
        offsets: vec![TxOffset {
            group: group.into(),
            topic: TOPIC.into(),
            queue: stored.queue,
            offset: 1,
            expected: None,
        }],
    };
    site.create_topic("audit").await;
    assert_denied(
        tx.call(prepare(GROUP)).await,
        "mallory",
        "consumer group 'billing'",
    );
    assert!(
        site.admin("ops")
            .await
            .group_state_by_broker(GROUP, None)
            .await
            .expect("group state")
            .into_iter()
            .all(|a| a
                .result
                .expect("answer")
                .queues
                .iter()
                .all(|q| q.committed.is_none())),
        "billing's offsets did not move"
    );
}

/// A transactional producer needs `tx` of its group (its hello is
/// refused otherwise: it would receive the group's half messages in
/// check-backs); prepares need `pub` too; ending by hand, the operator
/// source, needs `admin` whoever claims it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_need_tx_and_resolving_needs_admin() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let unknown = Listener::new(TransactionState::Unknown, TransactionState::Unknown);

    let refused = match tx_producer(&site, "dave", &unknown).await {
        Err(e) => e,
        Ok(dave) => dave
            .send_in_transaction(Message::new(TOPIC, "from dave"))
            .await
            .expect_err("dave is no transactional producer of orders-tx"),
    };
    assert_eq!(
        refused.code(),
        Some(ErrorCode::AccessDenied),
        "dave's transactional producer: {refused}"
    );
    let message = refused.wire_error().map(|w| w.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("'dave'") && m.contains("tx as producer group 'orders-tx'")),
        "{message:?}"
    );

    let alice = tx_producer(&site, "alice", &unknown)
        .await
        .expect("alice's transactional producer starts");
    let pending = alice
        .send_in_transaction(Message::new(TOPIC, "resolved by ops"))
        .await
        .expect("alice prepares");
    assert_eq!(pending.state, TransactionState::Unknown);

    // alice may end her transactions as their producer, not as an operator.
    let admin = site.admin("alice").await;
    assert_denied(
        admin
            .resolve_transaction(pending.tx_id, TxAction::Commit, Some(BROKER))
            .await,
        "alice",
        &format!("resolve transaction {}", pending.tx_id),
    );
    let raw = site
        .connect("alice", Role::TransactionProducer, Some(TX_GROUP))
        .await;
    let end = |source| EndTransaction {
        tx_id: pending.tx_id,
        action: TxAction::Commit,
        source,
        msg_id: None,
        producer: None,
    };
    assert_denied(
        raw.call(end(TxSource::Operator)).await,
        "alice",
        "resolve transaction",
    );
    assert!(
        admin.list_topics().await.is_ok(),
        "the refused connection still serves"
    );
    // dave publishes to orders but may not end orders-tx's transactions.
    let dave = site.connect("dave", Role::Producer, None).await;
    assert_denied(
        dave.call(end(TxSource::Producer)).await,
        "dave",
        "tx as producer group 'orders-tx'",
    );
    // ops resolves it by hand; the message becomes visible.
    site.admin("ops")
        .await
        .resolve_transaction(pending.tx_id, TxAction::Commit, Some(BROKER))
        .await
        .expect("ops resolves the transaction");
    receive(&site, "alice", GROUP, TOPIC, "resolved by ops").await;

    // alice's own end, as the producer, goes through.
    let committing = Listener::new(TransactionState::Commit, TransactionState::Commit);
    let alice = tx_producer(&site, "alice", &committing)
        .await
        .expect("alice's transactional producer starts");
    let done = alice
        .send_in_transaction(Message::new(TOPIC, "committed by alice"))
        .await
        .expect("alice commits");
    assert_eq!(done.state, TransactionState::Commit);
    receive(&site, "alice", GROUP, TOPIC, "committed by alice").await;
}

/// A wrong secret is AUTHENTICATION_FAILED; so is no secret at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_authentication() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let mut config = site.anonymous();
    config.credentials = Some(Credentials {
        access_key: "alice".into(),
        secret_key: "not alice's secret".into(),
    });
    let producer = Producer::builder()
        .config(config)
        .build()
        .await
        .expect("the producer builds (the nameserver has no ACL file)");
    let e = producer
        .send(Message::new(TOPIC, "never stored"))
        .await
        .expect_err("a wrong secret");
    assert_eq!(e.code(), Some(ErrorCode::AuthenticationFailed), "{e}");
    let anonymous = Producer::builder()
        .config(site.anonymous())
        .build()
        .await
        .expect("the producer builds");
    let e = anonymous
        .send(Message::new(TOPIC, "never stored"))
        .await
        .expect_err("no credentials");
    assert_eq!(e.code(), Some(ErrorCode::AuthenticationFailed), "{e}");
    // An access key is logged escaped: it cannot forge a log line.
    let config = ConnectionConfig {
        credentials: Some(Credentials {
            access_key: "evil\nFORGED broker registered".into(),
            secret_key: "x".into(),
        }),
        ..ConnectionConfig::default()
    };
    Connection::connect(&site.broker.addr, hello(Role::Producer, None), None, config)
        .await
        .expect_err("an unknown user");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !site.broker.log_text().contains(r"evil\nFORGED") {
        assert!(Instant::now() < deadline, "{}", site.broker.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !site
            .broker
            .log_text()
            .lines()
            .any(|l| l.starts_with("FORGED")),
        "{}",
        site.broker.log_text()
    );
    // A key of 100,000 characters is shown cut, in the log and the answer.
    let long = "k".repeat(100_000);
    let config = ConnectionConfig {
        credentials: Some(Credentials {
            access_key: long.clone(),
            secret_key: "x".into(),
        }),
        ..ConnectionConfig::default()
    };
    let e = Connection::connect(&site.broker.addr, hello(Role::Producer, None), None, config)
        .await
        .expect_err("an unknown user");
    assert!(
        e.to_string().len() < 1000 && e.to_string().contains("(100000 bytes)"),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !site.broker.log_text().contains("(100000 bytes)") {
        assert!(Instant::now() < deadline, "the cut key is not logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !site.broker.log_text().contains(&long[..1000]),
        "the whole key was logged"
    );
}

/// A user removed from the ACL file loses access at its next request,
/// after SIGHUP and also when the file just changes, while another user's
/// connection goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_removed_from_the_acl_file_loses_access_at_its_next_request() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let alice = site.producer("alice").await;
    let carol = site.producer("carol").await;
    let dave = site.producer("dave").await;
    for p in [&alice, &carol, &dave] {
        p.send(Message::new(TOPIC, "before")).await.expect("sent");
    }

    // SIGHUP: read at once. (The file's change would be seen within a
    // second anyway; the signal is what an operator sends to be sure.)
    site.remove_user("carol");
    site.broker.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match carol.send(Message::new(TOPIC, "after")).await {
            Err(e) if e.code() == Some(ErrorCode::AccessDenied) => break,
            other => assert!(
                Instant::now() < deadline,
                "carol was not removed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice
        .send(Message::new(TOPIC, "alice goes on"))
        .await
        .expect("alice's connection keeps working");

    // The file changing is enough.
    site.remove_user("dave");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match dave.send(Message::new(TOPIC, "after")).await {
            Err(e) if e.code() == Some(ErrorCode::AccessDenied) => break,
            other => assert!(Instant::now() < deadline, "dave was not removed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alice
        .send(Message::new(TOPIC, "alice still goes on"))
        .await
        .expect("alice's connection keeps working");
    assert!(site.broker.log_text().contains("ACL file reloaded"));
}

/// A `txmq consume` whose user is removed from the ACL file while it runs
/// ends with the refusal, exit 1, and says that what it printed since its
/// last commit comes again (its commits are refused too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_whose_user_is_removed_says_what_it_printed_comes_again() {
    use std::io::BufRead;
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let dave = site.producer("dave").await;
    dave.send(Message::new(TOPIC, "before"))
        .await
        .expect("sent");
    let mut consume = std::process::Command::new(txmq_tests::binary("txmq"))
        .args(["--nameserver", &site.ns, "--access-key", "alice"])
        .args([
            "--secret-key",
            "alice-secret",
            "consume",
            TOPIC,
            "--group",
            GROUP,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("txmq consume starts");
    let mut lines = std::io::BufReader::new(consume.stdout.take().expect("stdout")).lines();
    let first = tokio::task::block_in_place(|| lines.next())
        .expect("a line")
        .expect("read");
    assert!(first.contains("before"), "{first}");

    site.remove_user("alice");
    site.broker.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = consume.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "consume went on after its user was removed"
        );
        dave.send(Message::new(TOPIC, "after")).await.expect("sent");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut consume.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("ACCESS_DENIED")
            && err
                .contains("the messages it printed since its last commit will be delivered again"),
        "{err}"
    );
}

/// An ACL file emptied (as `cat > acl.toml` or an editor leaves it for a
/// moment) is not reloaded: it parsed as no user at all and locked
/// everyone out. The version in force stays, and says why at WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_file_without_users_is_not_reloaded_and_the_users_go_on() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let alice = site.producer("alice").await;
    alice
        .send(Message::new(TOPIC, "before"))
        .await
        .expect("sent");

    let refusals = |site: &Site| {
        site.broker
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("not reloaded") && l.contains("no users"))
            .count()
    };
    // Emptied, then SIGHUP; whitespace only, seen by the poll.
    for (text, hup) in [("", true), ("  \n\t\n", false)] {
        let before = refusals(&site);
        std::fs::write(&site.acl, text).expect("write ACL file");
        if hup {
            site.broker.signal("HUP");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while refusals(&site) == before {
            assert!(
                Instant::now() < deadline,
                "{text:?} was not refused:\n{}",
                site.broker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        !site.broker.log_text().contains("users=0"),
        "{}",
        site.broker.log_text()
    );

    // A file that is not TOML: refused in one WARN line that says where.
    std::fs::write(&site.acl, "[[user]]\naccess_key = \"x\"\nsecret_key = \n")
        .expect("write ACL file");
    site.broker.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let warning = loop {
        let log = site.broker.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("TOML parse error"))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "broken TOML not refused:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(warning.contains("line 3, column 14"), "{warning}");
    assert!(
        !site.broker.log_text().contains("secret_key = \n"),
        "the TOML diagram spread the WARN over several lines:\n{}",
        site.broker.log_text()
    );

    // The users in force go on, on their connections and on new ones.
    alice
        .send(Message::new(TOPIC, "after"))
        .await
        .expect("alice's connection keeps working");
    site.producer("carol")
        .await
        .send(Message::new(TOPIC, "new connection"))
        .await
        .expect("carol signs in on a new connection");
    site.create_topic("audit").await;

    // A file with users is read again as before.
    std::fs::write(&site.acl, ACL.replace("carol-secret", "rotated")).expect("write ACL file");
    site.broker.signal("HUP");
    site.wait_until_refused("carol", "the good file was not reloaded")
        .await;
}

/// An edit that keeps the ACL file's size and modification time (two
/// writes within the file system's clock tick) is seen by the poll: it
/// compared the size and time only, and kept the old version until a
/// SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_edit_that_keeps_the_files_size_and_time_is_reloaded() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    site.producer("carol")
        .await
        .send(Message::new(TOPIC, "before"))
        .await
        .expect("sent");
    let modified = std::fs::metadata(&site.acl).unwrap().modified().unwrap();
    let rotated = ACL.replace("carol-secret", "carol-rotate");
    assert_eq!(rotated.len(), ACL.len());
    std::fs::write(&site.acl, rotated).expect("write ACL file");
    std::fs::File::options()
        .write(true)
        .open(&site.acl)
        .and_then(|f| f.set_modified(modified))
        .expect("set the file's time back");
    site.wait_until_refused("carol", "the edit was not seen")
        .await;
}

/// Check-backs go only to connections whose user still has `tx` of the
/// group: once alice is removed from the file her producer gets no more,
/// and the transaction is checked on carol's connection instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_go_only_to_producers_still_allowed_tx() {
    let site = checked_site().await;
    // carol becomes a second transactional producer of orders-tx.
    site.grant_tx(&["carol"]);

    let alice_listener = Listener::new(TransactionState::Unknown, TransactionState::Unknown);
    let alice = tx_producer(&site, "alice", &alice_listener)
        .await
        .expect("alice's transactional producer starts");
    let pending = alice
        .send_in_transaction(Message::new(TOPIC, "checked back"))
        .await
        .expect("alice prepares");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alice_listener.checks.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "alice was never checked back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    site.remove_user("alice");
    site.broker.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_removal = alice_listener.checks.load(Ordering::SeqCst);
    let carol_listener = Listener::new(TransactionState::Commit, TransactionState::Commit);
    let _carol = until_started(&site, "carol", &carol_listener).await;
    let ops = site.admin("ops").await;
    until_ended(&ops, pending.tx_id, "through carol's check-back").await;
    assert!(carol_listener.checks.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        alice_listener.checks.load(Ordering::SeqCst),
        after_removal,
        "alice kept getting check-backs after she was removed"
    );
    alice.close().await.unwrap();
}

/// A check-back's answer may end the transaction, which needs `pub` on its
/// topic: a producer of the group whose user may not publish there gets
/// none (it committed a message to a topic it may not send to), and the
/// transaction waits for one that may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_go_only_to_producers_that_may_publish_the_topic() {
    let site = checked_site().await;
    // bob (pub on audit only) and carol (pub on orders) become producers
    // of orders-tx.
    site.grant_tx(&["bob", "carol"]);

    // alice prepares and goes away with the outcome unknown.
    let alice_listener = Listener::new(TransactionState::Unknown, TransactionState::Unknown);
    let alice = tx_producer(&site, "alice", &alice_listener)
        .await
        .expect("alice's transactional producer starts");
    let pending = alice
        .send_in_transaction(Message::new(TOPIC, "checked back"))
        .await
        .expect("alice prepares");
    alice.close().await.expect("alice closes");

    let bob_listener = Listener::new(TransactionState::Commit, TransactionState::Commit);
    // Refused until the broker has read the file again.
    let _bob = until_started(&site, "bob", &bob_listener).await;
    // A check falls due while bob is connected: it is not sent, and the
    // transaction says why.
    let ops = site.admin("ops").await;
    let why = "are connected, but none whose user may end it (tx of the group and pub on orders)";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = ops.list_transactions(None).await.expect("ops lists");
        let error = listed
            .iter()
            .flat_map(|l| l.transactions.iter())
            .find(|t| t.tx_id == pending.tx_id)
            .expect("still pending")
            .last_error
            .clone()
            .unwrap_or_default();
        if error.contains(why) {
            break;
        }
        assert!(Instant::now() < deadline, "no check fell due: {error}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        bob_listener.checks.load(Ordering::SeqCst),
        0,
        "bob was checked"
    );
    // Nor may bob end it himself: an end needs pub on the topic too.
    let raw = site
        .connect("bob", Role::TransactionProducer, Some(TX_GROUP))
        .await;
    let end = EndTransaction {
        tx_id: pending.tx_id,
        action: TxAction::Commit,
        source: TxSource::Producer,
        msg_id: None,
        producer: None,
    };
    assert_denied(raw.call(end).await, "bob", "pub to topic 'orders'");

    let carol_listener = Listener::new(TransactionState::Commit, TransactionState::Commit);
    let _carol = until_started(&site, "carol", &carol_listener).await;
    until_ended(&ops, pending.tx_id, "through carol's check-back").await;
    assert!(carol_listener.checks.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        bob_listener.checks.load(Ordering::SeqCst),
        0,
        "bob was checked"
    );
}

/// A site whose transactions are checked back quickly (every 100 ms, 300
/// ms after their prepare, never parked), with [`TOPIC`] made.
async fn checked_site() -> Site {
    let site = Site::start(Setup {
        extra: &[
            "--transaction-timeout",
            "300ms",
            "--transaction-check-interval",
            "100ms",
            "--transaction-check-max",
            "1000",
        ],
        ..Setup::default()
    })
    .await;
    site.create_topic(TOPIC).await;
    site
}

/// Waits until transaction `tx_id` is no longer pending (ended `how`).
async fn until_ended(ops: &Admin, tx_id: u64, how: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lists = ops.list_transactions(None).await.expect("ops lists");
        if lists
            .iter()
            .all(|l| l.transactions.iter().all(|t| t.tx_id != tx_id))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "transaction {tx_id} never ended {how}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `user`'s transactional producer of [`TX_GROUP`], started once the
/// broker has read an ACL file that allows it (refused until then).
async fn until_started(
    site: &Site,
    user: &str,
    listener: &Arc<Listener>,
) -> TransactionProducer<Listener> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tx_producer(site, user, listener).await {
            Ok(p) => return p,
            Err(e) if e.code() == Some(ErrorCode::AccessDenied) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{user}'s transactional producer starts: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// Prepare, local transaction, commit, and a check-back answered, all over
/// TLS with an ACL file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transaction_flow_works_with_tls_and_an_acl_file() {
    let site = Site::start(Setup {
        tls: true,
        extra: &[
            "--transaction-timeout",
            "300ms",
            "--transaction-check-interval",
            "100ms",
        ],
        ..Setup::default()
    })
    .await;
    site.create_topic(TOPIC).await;
    let committing = Listener::new(TransactionState::Commit, TransactionState::Commit);
    let producer = tx_producer(&site, "alice", &committing)
        .await
        .expect("alice's transactional producer starts");
    let done = producer
        .send_in_transaction(Message::new(TOPIC, "committed at once"))
        .await
        .expect("alice commits");
    assert_eq!(done.state, TransactionState::Commit);
    producer.close().await.unwrap();

    let checked = Listener::new(TransactionState::Unknown, TransactionState::Commit);
    let producer = tx_producer(&site, "alice", &checked)
        .await
        .expect("alice's transactional producer starts");
    let pending = producer
        .send_in_transaction(Message::new(TOPIC, "committed when checked"))
        .await
        .expect("alice prepares");
    assert_eq!(pending.state, TransactionState::Unknown);
    receive(&site, "alice", GROUP, TOPIC, "committed at once").await;
    receive(&site, "alice", GROUP, TOPIC, "committed when checked").await;
    assert!(checked.checks.load(Ordering::SeqCst) >= 1);
}

/// A client that trusts another CA fails with a message naming the
/// certificate problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_ca_fails_naming_the_certificate_problem() {
    let site = Site::start(Setup {
        tls: true,
        ..Setup::default()
    })
    .await;
    let other = Pki::new("another CA");
    let config = ConnectionConfig {
        tls: Some(tls_client(&other, None)),
        credentials: Some(credentials("alice")),
        ..ConnectionConfig::default()
    };
    let e = Connection::connect(&site.broker.addr, hello(Role::Producer, None), None, config)
        .await
        .expect_err("the broker's certificate is not trusted");
    let text = e.to_string();
    assert!(
        text.contains("certificate") && text.to_lowercase().contains("issuer"),
        "the error does not name the certificate problem: {text}"
    );
    let mut config = site.config("alice");
    config.tls = Some(tls_client(&other, None));
    let Err(e) = Admin::with_config(config).await else {
        panic!("the client trusts servers of another CA");
    };
    assert!(e.to_string().contains("certificate"), "{e}");
}

/// Plaintext to the TLS port is closed (and logged) while TLS clients go
/// on being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_tls_port_is_refused_and_tls_clients_are_served() {
    let site = Site::start(Setup {
        tls: true,
        ..Setup::default()
    })
    .await;
    site.create_topic(TOPIC).await;
    let plain = ConnectionConfig {
        credentials: Some(credentials("alice")),
        ..ConnectionConfig::default()
    };
    let e = Connection::connect(&site.broker.addr, hello(Role::Producer, None), None, plain)
        .await
        .expect_err("plaintext is refused");
    assert!(e.remote().is_none(), "closed, not answered: {e}");
    let producer = site.producer("alice").await;
    producer
        .send(Message::new(TOPIC, "over TLS"))
        .await
        .expect("a TLS client is served");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !site.broker.log_text().contains("plaintext") {
        assert!(Instant::now() < deadline, "the refusal was not logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Under mutual TLS a client without a certificate is refused; one whose
/// certificate names a user is that user, without a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_that_names_the_user() {
    let site = Site::start(Setup {
        tls: true,
        client_auth: true,
        ..Setup::default()
    })
    .await;
    site.create_topic(TOPIC).await;
    let no_cert = ConnectionConfig {
        tls: site.tls.clone(),
        credentials: Some(credentials("alice")),
        ..ConnectionConfig::default()
    };
    let refused_no_cert = refused_text(&site, no_cert).await;
    // Why, not just a closed connection: the server's TLS alert.
    assert!(
        refused_no_cert.contains("CertificateRequired"),
        "{refused_no_cert}"
    );
    let as_cert = |name: &str| {
        let mut config = site.config(name);
        config.credentials = None;
        config
    };
    let alice = Producer::builder()
        .config(as_cert("alice"))
        .build()
        .await
        .expect("alice's producer builds");
    alice
        .send(Message::new(TOPIC, "signed by certificate"))
        .await
        .expect("alice's certificate signs her in");
    let bob = Producer::builder()
        .config(as_cert("bob"))
        .build()
        .await
        .expect("bob's producer builds");
    assert_denied(
        bob.send(Message::new(TOPIC, "from bob")).await,
        "bob",
        "pub to topic 'orders'",
    );
    // A certificate of the CA that names no user: the refusal says so
    // (it asked for keys only, as if no certificate had been given).
    let stranger = ConnectionConfig {
        tls: Some(tls_client(&site.pki, Some(&site.pki.issue("stranger")))),
        ..ConnectionConfig::default()
    };
    let text = refused_text(&site, stranger).await;
    assert!(
        text.contains("AUTHENTICATION_FAILED")
            && text.contains("certificate names 'stranger'")
            && text.contains("(it has --tls-ca)"),
        "{text}"
    );
    // And the broker says so in its log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !site
        .broker
        .log_text()
        .contains("the client certificate names no user")
    {
        assert!(Instant::now() < deadline, "{}", site.broker.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A client without a certificate is told to give one.
    assert!(
        refused_no_cert.contains("give --tls-cert and --tls-key"),
        "{refused_no_cert}"
    );
    // A client certificate the server refuses is named as the client's
    // (the alert used to read as the server's certificate expiring).
    let other_ca = Pki::new("another CA");
    for (cert, says) in [
        (
            site.pki.issue_with("alice", true),
            "the server refused this client's certificate (--tls-cert): it has expired",
        ),
        (
            other_ca.issue("alice"),
            "the server refused this client's certificate (--tls-cert): it is not signed by a CA the server trusts",
        ),
    ] {
        let config = ConnectionConfig {
            tls: Some(tls_client(&site.pki, Some(&cert))),
            ..ConnectionConfig::default()
        };
        let text = refused_text(&site, config).await;
        assert!(text.contains(says), "{text}");
    }
}

/// Why a producer connection to the site's broker made with `config` is
/// refused.
async fn refused_text(site: &Site, config: ConnectionConfig) -> String {
    Connection::connect(&site.broker.addr, hello(Role::Producer, None), None, config)
        .await
        .expect_err("refused")
        .to_string()
}

/// A certificate, key or ACL file the broker (or the nameserver) cannot
/// use stops it at start with an error naming the file: a bad setting,
/// exit 2, before anything starts (it was exit 1, after the runtime
/// started and the data directory was created).
#[test]
fn unusable_security_files_stop_the_broker_with_a_clear_error() {
    let pki = Pki::new("txmq test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.pem");
    let bad_acl = pki.acl(
        "bad.toml",
        "[[user]]\naccess_key = \"x\"\ntopics = { \"t\" = [\"fly\"] }\n",
    );
    let server = pki.issue("127.0.0.1");
    let data = path(&dir.path().join("data"));
    let run = |flags: &[&str]| {
        let out = std::process::Command::new(txmq_tests::binary("txmq-broker"))
            .args(["--listen", "127.0.0.1:0", "--data-dir", &data])
            .args(flags)
            .output()
            .expect("run txmq-broker");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(!err.contains("runtime started"), "{flags:?}: {err}");
        assert!(
            !dir.path().join("data").exists(),
            "{flags:?}: nothing was started"
        );
        err
    };
    let err = run(&[
        "--tls-cert",
        &path(&missing),
        "--tls-key",
        &path(&server.key),
    ]);
    assert!(err.contains("missing.pem"), "{err}");
    let err = run(&["--tls-cert", &path(&server.cert)]);
    assert!(err.contains("--tls-key"), "{err}");
    let other = pki.issue("other");
    let err = run(&[
        "--tls-cert",
        &path(&server.cert),
        "--tls-key",
        &path(&other.key),
    ]);
    assert!(err.contains("security settings"), "{err}");
    let err = run(&["--acl-file", &path(&dir.path().join("nonexistent.toml"))]);
    assert!(err.contains("nonexistent.toml"), "{err}");
    let err = run(&["--acl-file", &path(&bad_acl)]);
    assert!(err.contains("bad.toml") && err.contains("fly"), "{err}");
    let err = run(&["--access-key", "broker"]);
    assert!(err.contains("--secret-key"), "{err}");
    // An empty secret is no secret.
    let err = run(&["--access-key", "broker", "--secret-key", ""]);
    assert!(err.contains("--access-key needs its --secret-key"), "{err}");
    let empty_secret = pki.acl(
        "empty.toml",
        "[[user]]\naccess_key = \"x\"\nsecret_key = \"\"\nadmin = true\n",
    );
    let err = run(&["--acl-file", &path(&empty_secret)]);
    assert!(err.contains("user 'x': secret_key is empty"), "{err}");
    let no_users = pki.acl("empty-acl.toml", "\n");
    let err = run(&["--acl-file", &path(&no_users)]);
    assert!(
        err.contains("empty-acl.toml") && err.contains("no users"),
        "{err}"
    );

    // Settings that cannot work together: usage errors, exit 2.
    let usage = |flags: &[&str]| {
        let out = std::process::Command::new(txmq_tests::binary("txmq-broker"))
            .args(["--listen", "127.0.0.1:0", "--data-dir", &data])
            .args(["--nameserver", "127.0.0.1:1"])
            .args(flags)
            .output()
            .expect("run txmq-broker");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = usage(&["--tls-client-auth"]);
    assert!(
        err.contains("--tls-client-auth needs --tls-cert and --tls-key"),
        "{err}"
    );
    // A standalone broker signs in to its own nameserver: without
    // credentials only a client certificate, read under mutual TLS, can.
    let good = pki.acl("good.toml", ACL);
    let mut flags = vec!["--standalone".to_string(), "--acl-file".into(), path(&good)];
    flags.extend(pki.server_flags(&server));
    let err = usage(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("--standalone with --acl-file needs --access-key and --secret-key"),
        "{err}"
    );
    // The nameserver's settings likewise.
    let out = std::process::Command::new(txmq_tests::binary("txmq-nameserver"))
        .args(["--listen", "127.0.0.1:0", "--access-key", "broker"])
        .args(["--secret-key", ""])
        .output()
        .expect("run txmq-nameserver");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--access-key needs its --secret-key"), "{err}");
    let not_toml = pki.acl("not-toml.toml", "this is = = not TOML\n");
    for (acl, says) in [(&not_toml, "not-toml.toml"), (&no_users, "no users")] {
        let out = std::process::Command::new(txmq_tests::binary("txmq-nameserver"))
            .args(["--listen", "127.0.0.1:0", "--acl-file", &path(acl)])
            .output()
            .expect("run txmq-nameserver");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    let out = std::process::Command::new(txmq_tests::binary("txmq-nameserver"))
        .args(["--listen", "127.0.0.1:0", "--tls-client-auth"])
        .output()
        .expect("run txmq-nameserver");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-client-auth needs --tls-cert and --tls-key"),
        "{err}"
    );
}

/// A clustering group's offset commit must name its owner, a member of
/// that group: otherwise anyone could move a member's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clustering_groups_offset_commit_must_name_its_owner() {
    let site = Site::start(Setup::default()).await;
    site.create_topic(TOPIC).await;
    let alice = site.connect("alice", Role::Consumer, Some(GROUP)).await;
    alice
        .call(Heartbeat {
            group: GROUP.into(),
            client_id: "member".into(),
            subscriptions: vec![Subscription {
                topic: TOPIC.into(),
                expression: "*".into(),
            }],
            broadcast: false,
            held: Vec::new(),
        })
        .await
        .expect("alice heartbeats");
    let commit = |owner: Option<(&str, &str)>| CommitOffset {
        group: GROUP.into(),
        topic: TOPIC.into(),
        queue: 0,
        offset: 0,
        owner: owner.map(|(group, client_id)| QueueOwner {
            group: group.into(),
            client_id: client_id.into(),
        }),
        forward_only: false,
        topic_generation: None,
    };
    let e = alice.call(commit(None)).await.expect_err("no owner named");
    let w = e.remote().expect("refused");
    assert_eq!(w.code, ErrorCode::BadArgument, "{w}");
    assert!(w.message.contains("must name its owner"), "{w}");
    let e = alice
        .call(commit(Some(("another", "member"))))
        .await
        .expect_err("an owner of another group");
    assert_eq!(e.remote().map(|w| w.code), Some(ErrorCode::BadArgument));
    alice
        .call(commit(Some((GROUP, "member"))))
        .await
        .expect("the owner commits");
    // Forward-only commits are a slave's: a cluster member's.
    let mut forward = commit(None);
    forward.forward_only = true;
    assert_denied(
        alice.call(forward.clone()).await,
        "alice",
        "forward a kept offset",
    );
    // The brokers' user hands them on for any group, with no group's
    // permission of its own (refused, a slave's reads were delivered again
    // by the master).
    let slave = site.connect("broker", Role::Replica, None).await;
    slave
        .call(forward)
        .await
        .expect("a cluster member forwards a kept offset");
}
