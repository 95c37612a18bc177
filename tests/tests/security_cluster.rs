//! Security of the cluster side, against real `txmq-nameserver` processes:
//! who may register and unregister brokers, route lookups that need a
//! signed-in user, admin-only master elections, TLS on the nameserver's
//! port, and controller members that elect a leader over TLS with an ACL
//! file while refusing Raft traffic from users that are not members.
//!
//! Brokers are played by raw connections that send `RegisterBroker` and
//! `UnregisterBroker` the way a broker does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use txmq::{Admin, ClientConfig, TlsClient, TlsFiles};
use txmq_protocol::{
    ControllerInfo, ElectMaster, ErrorCode, GetControllerInfo, GetRoute, Hello, Ping, RaftRpc,
    RaftRpcKind, RegisterBroker, Role, TopicConfig, UnregisterBroker, PERM_READ_WRITE,
    PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig, Credentials};
use txmq_tests::pki::Pki;
use txmq_tests::{binary, free_port, NameserverProcess};

/// A user per role: an application, a cluster member and an operator.
const ACL: &str = r#"
[[user]]
access_key = "app"
secret_key = "app-secret"
topics = { "*" = ["pub", "sub"] }
groups = { "*" = ["sub", "tx"] }

[[user]]
access_key = "broker"
secret_key = "broker-secret"
broker = true

[[user]]
access_key = "ops"
secret_key = "ops-secret"
admin = true
"#;

/// The secret of each user of [`ACL`].
fn secret(user: &str) -> String {
    format!("{user}-secret")
}

fn local_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Who connects, and how.
#[derive(Clone, Default)]
struct As {
    user: Option<&'static str>,
    tls: Option<TlsClient>,
    role: Option<Role>,
}

impl As {
    fn user(user: &'static str) -> As {
        As {
            user: Some(user),
            ..As::default()
        }
    }

    fn tls(mut self, tls: &TlsClient) -> As {
        self.tls = Some(tls.clone());
        self
    }

    fn role(mut self, role: Role) -> As {
        self.role = Some(role);
        self
    }
}

/// A raw connection to `addr`, signed in as `who` says.
async fn connect(addr: &str, who: &As) -> Result<Connection, txmq_remoting::Error> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: who.role.unwrap_or(Role::Admin),
        client_id: format!("security-test-{}", who.user.unwrap_or("anonymous")),
        group: None,
    };
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(3),
        tls: who.tls.clone(),
        credentials: who.user.map(|u| Credentials {
            access_key: u.into(),
            secret_key: secret(u),
        }),
        ..ConnectionConfig::default()
    };
    Connection::connect(addr, hello, None, config).await
}

/// A broker's registration of `broker` at `addr`, serving topic "orders".
fn registration(broker: &str, addr: &str) -> RegisterBroker {
    RegisterBroker {
        epoch: 0,
        role: Default::default(),
        cluster: "c1".into(),
        broker_name: broker.into(),
        addr: addr.into(),
        topics: vec![TopicConfig {
            name: "orders".into(),
            queues: 4,
            perm: PERM_READ_WRITE,
        }],
    }
}

/// The addresses of the brokers serving "orders", or the refusal's code.
async fn orders_route(conn: &Connection) -> Result<Vec<String>, Option<ErrorCode>> {
    match conn
        .call(GetRoute {
            topic: "orders".into(),
        })
        .await
    {
        Ok(r) => Ok(r.brokers.into_iter().map(|b| b.addr).collect()),
        Err(e) => Err(e.remote().map(|w| w.code)),
    }
}

fn code(e: &txmq_remoting::Error) -> Option<ErrorCode> {
    e.remote().map(|w| w.code)
}

fn tls_client(pki: &Pki) -> TlsClient {
    TlsClient::from_files(&TlsFiles {
        ca: Some(pki.ca()),
        ..TlsFiles::default()
    })
    .expect("TLS client")
}

fn nameserver(dir: &Path, name: &str, extra: &[&str]) -> NameserverProcess {
    NameserverProcess::start(&local_addr(), extra, &dir.join(format!("{name}.log")))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_cluster_members_register_and_only_the_registering_connection_unregisters() {
    let pki = Pki::new("security-test-ca");
    let acl = pki.acl("acl.toml", ACL);
    let ns = nameserver(pki.dir(), "ns", &["--acl-file", path(&acl)]);
    let ops = connect(&ns.addr, &As::user("ops"))
        .await
        .expect("ops signs in");

    // An application user may not register a broker.
    let app = connect(&ns.addr, &As::user("app").role(Role::Broker))
        .await
        .expect("app signs in");
    let e = app
        .call(registration("broker-a", "10.0.0.1:10911"))
        .await
        .expect_err("an application user's registration is refused");
    assert_eq!(code(&e), Some(ErrorCode::AccessDenied), "{e}");
    let message = e.to_string();
    for part in ["app", "register broker broker-a", "broker or admin"] {
        assert!(message.contains(part), "{message}");
    }
    assert_eq!(orders_route(&ops).await, Err(Some(ErrorCode::NoRoute)));
    // The refused connection stays open and may still read routes.
    assert_eq!(orders_route(&app).await, Err(Some(ErrorCode::NoRoute)));
    assert!(ns.log_text().contains("access denied"), "{}", ns.log_text());

    // A cluster member's registration is taken.
    let first = connect(&ns.addr, &As::user("broker").role(Role::Broker))
        .await
        .expect("broker signs in");
    first
        .call(registration("broker-a", "10.0.0.1:10911"))
        .await
        .expect("a cluster member registers");
    assert_eq!(
        orders_route(&ops).await,
        Ok(vec!["10.0.0.1:10911".to_string()])
    );

    // Another connection of the same user cannot unregister it, by address or not.
    let second = connect(&ns.addr, &As::user("broker").role(Role::Broker))
        .await
        .expect("broker signs in again");
    for addr in ["10.0.0.1:10911", ""] {
        let e = second
            .call(UnregisterBroker {
                broker_name: "broker-a".into(),
                addr: addr.into(),
            })
            .await
            .expect_err("an unregister from another connection is refused");
        assert_eq!(code(&e), Some(ErrorCode::AccessDenied), "{e}");
        assert!(e.to_string().contains("user 'broker'"), "{e}");
        assert_eq!(
            orders_route(&ops).await,
            Ok(vec!["10.0.0.1:10911".to_string()])
        );
    }

    // The registering connection's goodbye works.
    first
        .call(UnregisterBroker {
            broker_name: "broker-a".into(),
            addr: "10.0.0.1:10911".into(),
        })
        .await
        .expect("the registering connection unregisters");
    assert_eq!(orders_route(&ops).await, Err(Some(ErrorCode::NoRoute)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_lookup_needs_a_signed_in_user() {
    let pki = Pki::new("security-test-ca");
    let acl = pki.acl("acl.toml", ACL);
    let ns = nameserver(pki.dir(), "ns", &["--acl-file", path(&acl)]);

    let without = Admin::connect([ns.addr.as_str()])
        .await
        .expect_err("a client without credentials is refused");
    assert_eq!(
        without.code(),
        Some(ErrorCode::AuthenticationFailed),
        "{without}"
    );

    let mut wrong = ClientConfig::with_nameservers([ns.addr.as_str()]);
    wrong.credentials = Some(Credentials {
        access_key: "app".into(),
        secret_key: "not the secret".into(),
    });
    let e = Admin::with_config(wrong)
        .await
        .expect_err("a wrong secret is refused");
    assert_eq!(e.code(), Some(ErrorCode::AuthenticationFailed), "{e}");

    let mut right = ClientConfig::with_nameservers([ns.addr.as_str()]);
    right.credentials = Some(Credentials {
        access_key: "app".into(),
        secret_key: secret("app"),
    });
    let admin = Admin::with_config(right).await.expect("app signs in");
    let e = admin
        .route("orders")
        .await
        .expect_err("no broker serves it");
    assert!(matches!(e, txmq::Error::NoRoute { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_nameserver_refuses_plaintext_and_servers_of_an_unknown_ca() {
    let pki = Pki::new("security-test-ca");
    let server = pki.issue("nameserver");
    let ns = nameserver(
        pki.dir(),
        "ns",
        &[
            "--tls-cert",
            path(&server.cert),
            "--tls-key",
            path(&server.key),
        ],
    );

    let plain = connect(&ns.addr, &As::default()).await;
    let e = plain.expect_err("a plaintext client is served");
    // The likely cause is named, for every plaintext client (a slave, a
    // broker registering, an application), not only the CLI.
    assert!(
        matches!(e, txmq_remoting::Error::Connect { .. })
            && e.to_string().contains("give --tls-ca"),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.log_text().contains("plaintext (not TLS) connection") {
        assert!(Instant::now() < deadline, "{}", ns.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let tls = connect(&ns.addr, &As::default().tls(&tls_client(&pki)))
        .await
        .expect("a TLS client trusting the CA connects");
    assert_eq!(orders_route(&tls).await, Err(Some(ErrorCode::NoRoute)));
    tls.call(Ping {}).await.expect("pong");

    let other = Pki::new("another-ca");
    let e = connect(&ns.addr, &As::default().tls(&tls_client(&other)))
        .await
        .expect_err("a client trusting another CA is refused");
    let message = e.to_string();
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
}

/// A file the nameserver cannot use is a bad setting: exit 2, as the
/// broker's settings.
#[test]
fn unusable_security_files_stop_the_nameserver_at_start() {
    let pki = Pki::new("security-test-ca");
    let listen = local_addr();
    let run = |args: &[&str]| {
        std::process::Command::new(binary("txmq-nameserver"))
            .args(["--listen", &listen])
            .args(args)
            .output()
            .expect("runs")
    };
    let missing = pki.dir().join("missing.toml");
    let out = run(&["--acl-file", path(&missing)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(path(&missing)), "{err}");

    let bad = pki.acl(
        "bad.toml",
        "[[user]]\naccess_key = \"x\"\nadmin = \"yes\"\n",
    );
    let out = run(&["--acl-file", path(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(path(&bad)), "{err}");

    let cert = pki.issue("nameserver").cert;
    let out = run(&["--tls-cert", path(&cert)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key"), "{err}");

    let out = run(&["--access-key", "broker"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-key"));
}

/// Three nameservers with embedded controller members, TLS and the ACL
/// file on, the members signing in to each other as `member`.
struct Members {
    nss: Vec<NameserverProcess>,
    controllers: Vec<String>,
}

fn start_members(pki: &Pki, acl: &Path, member: &str) -> Members {
    let server = pki.issue("member");
    let controllers: Vec<String> = (0..3).map(|_| local_addr()).collect();
    let peers = controllers
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let secret = secret(member);
    let nss = (0..3)
        .map(|i| {
            let data: PathBuf = pki.dir().join(format!("ctl-{}", i + 1));
            let id = (i + 1).to_string();
            nameserver(
                pki.dir(),
                &format!("ns-{}", i + 1),
                &[
                    "--controller-id",
                    &id,
                    "--controller-listen",
                    &controllers[i],
                    "--controller-peers",
                    &peers,
                    "--controller-data-dir",
                    path(&data),
                    "--tls-cert",
                    path(&server.cert),
                    "--tls-key",
                    path(&server.key),
                    "--tls-ca",
                    path(&pki.ca()),
                    "--acl-file",
                    path(acl),
                    "--access-key",
                    member,
                    "--secret-key",
                    &secret,
                ],
            )
        })
        .collect();
    Members { nss, controllers }
}

/// `GetControllerInfo` through a nameserver's own port.
async fn info(ns: &str, who: &As) -> Option<ControllerInfo> {
    let conn = connect(ns, who).await.ok()?;
    let r = conn.call(GetControllerInfo {}).await.ok();
    conn.close();
    r
}

/// The leader every member agrees on, waiting up to `within`.
async fn agreed_leader(m: &Members, who: &As, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for ns in &m.nss {
            leaders.push(info(&ns.addr, who).await.and_then(|i| i.leader_id));
        }
        if let Some(Some(l)) = leaders.first() {
            if leaders.iter().all(|x| *x == Some(*l)) {
                return Some(*l);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Raft message no member would send: refused before it is decoded, or
/// answered `MALFORMED_REQUEST` once let through.
fn stray_vote() -> RaftRpc {
    RaftRpc {
        kind: RaftRpcKind::Vote,
        from: 9,
        body: bytes::Bytes::from_static(b"not a vote"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_members_elect_over_tls_with_an_acl_and_refuse_raft_from_non_members() {
    let pki = Pki::new("security-test-ca");
    let acl = pki.acl("acl.toml", ACL);
    let m = start_members(&pki, &acl, "broker");
    let tls = tls_client(&pki);
    let app = As::user("app").tls(&tls);
    let leader = agreed_leader(&m, &app, Duration::from_secs(20))
        .await
        .expect("the members elect a leader");
    let i = info(&m.nss[0].addr, &app).await.expect("info");
    assert_eq!(i.members.len(), 3);
    assert_eq!(
        i.leader_addr.as_deref(),
        Some(m.controllers[leader as usize - 1].as_str())
    );

    // Raft traffic from a user that is not a cluster member is refused,
    // and its connection stays open.
    let ctl = &m.controllers[0];
    let stranger = connect(ctl, &app.clone().role(Role::Controller))
        .await
        .expect("app signs in to the controller port");
    let e = stranger.call(stray_vote()).await.expect_err("refused");
    assert_eq!(code(&e), Some(ErrorCode::AccessDenied), "{e}");
    assert!(e.to_string().contains("user 'app'"), "{e}");
    stranger.call(Ping {}).await.expect("still open");
    // A member's user gets through to Raft (which cannot decode it).
    let member = connect(ctl, &As::user("broker").tls(&tls).role(Role::Controller))
        .await
        .expect("a member signs in");
    let e = member.call(stray_vote()).await.expect_err("undecodable");
    assert_eq!(code(&e), Some(ErrorCode::MalformedRequest), "{e}");

    // A planned switch needs an admin, at the nameserver port and at the
    // controller's; an admin's reaches the leader even through a follower
    // (which forwards it as a member): the group is unknown there.
    let follower = (leader as usize) % 3;
    let elect = || ElectMaster {
        broker_name: "nope".into(),
        replica: None,
    };
    for addr in [&m.nss[follower].addr, &m.controllers[follower]] {
        let conn = connect(addr, &As::user("broker").tls(&tls)).await.unwrap();
        let e = conn.call(elect()).await.expect_err("refused");
        assert_eq!(code(&e), Some(ErrorCode::AccessDenied), "{e}");
        assert!(e.to_string().contains("elect master of nope"), "{e}");
        let ops = connect(addr, &As::user("ops").tls(&tls)).await.unwrap();
        let e = ops.call(elect()).await.expect_err("unknown group");
        assert_eq!(code(&e), Some(ErrorCode::BadArgument), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_members_signed_in_without_the_broker_role_elect_no_leader() {
    let pki = Pki::new("security-test-ca");
    let acl = pki.acl("acl.toml", ACL);
    let m = start_members(&pki, &acl, "app");
    let who = As::user("ops").tls(&tls_client(&pki));
    assert_eq!(
        agreed_leader(&m, &who, Duration::from_secs(3)).await,
        None,
        "members whose Raft traffic is refused must not elect a leader"
    );
    let refused = |log: String| {
        log.lines()
            .any(|l| l.contains("access denied") && l.contains("send Raft"))
    };
    assert!(
        m.nss.iter().any(|ns| refused(ns.log_text())),
        "{}",
        m.nss[0].log_text()
    );
}
