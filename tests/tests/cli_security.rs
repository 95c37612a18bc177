//! The `txmq` command line against a real nameserver and broker that run
//! with TLS and an ACL file, as the README's "Security" section sets them
//! up: each permission refused (exit 1, `ACCESS_DENIED`) and granted, a
//! wrong secret, a wrong CA and plaintext to a TLS port, the `TXMQ_*`
//! environment variables, and `bench produce` with TLS and a user.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use txmq_tests::pki::Pki;
use txmq_tests::{binary, free_port, json_lines, BrokerProcess, NameserverProcess};

/// The users of the tests: an operator, an application that publishes to
/// and consumes `orders` as `billing` and runs `orders-tx` transactions,
/// a reader that may read `orders` but as no group, and the cluster's own
/// user that the broker signs in to the nameserver with.
const ACL: &str = r#"
[[user]]
access_key = "ops"
secret_key = "ops-secret"
admin = true

[[user]]
access_key = "app"
secret_key = "app-secret"
topics = { "orders" = ["pub", "sub"] }
groups = { "billing" = ["sub"], "orders-tx" = ["tx"] }

[[user]]
access_key = "reader"
secret_key = "reader-secret"
topics = { "orders" = ["sub"] }

[[user]]
access_key = "broker"
secret_key = "cluster-secret"
broker = true
"#;

/// A user's access key and secret.
type User = (&'static str, &'static str);

const OPS: User = ("ops", "ops-secret");
const APP: User = ("app", "app-secret");
const READER: User = ("reader", "reader-secret");

/// The environment variables a test must not inherit from whoever runs it.
const SECURITY_ENV: [&str; 6] = [
    "TXMQ_NAMESERVER",
    "TXMQ_TLS_CA",
    "TXMQ_TLS_CERT",
    "TXMQ_TLS_KEY",
    "TXMQ_ACCESS_KEY",
    "TXMQ_SECRET_KEY",
];

/// A nameserver and a broker with TLS (one certificate for both, signed
/// by the test CA) and the ACL file; the broker signs in as `broker`.
struct Secured {
    pki: Pki,
    /// The nameserver's address (its own process, or the broker's).
    ns_addr: String,
    /// `None`: the broker runs the nameserver (`--standalone`).
    nameserver: Option<NameserverProcess>,
    broker: BrokerProcess,
    _dir: tempfile::TempDir,
}

impl Secured {
    fn start() -> Secured {
        Secured::start_as(false)
    }

    /// With `standalone`, one `txmq-broker --standalone` serves both.
    fn start_as(standalone: bool) -> Secured {
        let pki = Pki::new("txmq test CA");
        let server = pki.issue("localhost");
        let acl = pki.acl("acl.toml", ACL);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut tls = pki.server_flags(&server);
        tls.extend(["--acl-file".to_string(), path(&acl)]);
        let flags = |extra: &[&str]| -> Vec<String> {
            tls.iter()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect()
        };
        let ns_addr = format!("127.0.0.1:{}", free_port());
        let nameserver = (!standalone).then(|| {
            NameserverProcess::start(
                &ns_addr,
                &flags(&[]).iter().map(String::as_str).collect::<Vec<_>>(),
                &dir.path().join("nameserver.log"),
            )
        });
        let mut broker_flags = flags(&["--access-key", "broker", "--secret-key", "cluster-secret"]);
        if standalone {
            // Its connections on threads of their own, to show the TLS
            // handshake and the sign-in work there too.
            broker_flags.extend(
                [
                    "--standalone",
                    "--nameserver-listen",
                    &ns_addr,
                    "--network-threads",
                    "2",
                ]
                .map(str::to_string),
            );
        }
        let broker = BrokerProcess::start(
            &dir.path().join("broker"),
            &ns_addr,
            "broker-a",
            &broker_flags.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let secured = Secured {
            pki,
            ns_addr,
            nameserver,
            broker,
            _dir: dir,
        };
        secured.wait_for_broker();
        secured
    }

    /// Waits until the nameserver lists the broker (it registered over
    /// TLS, signed in as `broker`).
    fn wait_for_broker(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.txmq(Some(OPS), &["--output", "json", "cluster"]);
            if out.status.success()
                && json_lines(&out.stdout)
                    .iter()
                    .any(|b| b["broker"] == "broker-a")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the broker never registered: {}\nbroker log:\n{}\nnameserver log:\n{}",
                stderr(&out),
                self.broker.log_text(),
                self.nameserver
                    .as_ref()
                    .map(|n| n.log_text())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `txmq` with the CA, signed in as `user` with flags.
    fn txmq(&self, user: Option<User>, args: &[&str]) -> Output {
        let mut flags = vec!["--tls-ca".to_string(), path(&self.pki.ca())];
        if let Some((key, secret)) = user {
            flags.extend(["--access-key", key, "--secret-key", secret].map(str::to_string));
        }
        flags.extend(args.iter().map(|s| s.to_string()));
        run(&self.ns_addr, &flags, &[])
    }

    /// Creates `topic` as the operator and waits until it can be sent to.
    fn create_topic(&self, topic: &str) {
        ok(&self.txmq(Some(OPS), &["topic", "create", topic, "--queues", "2"]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .txmq(Some(OPS), &["topic", "route", topic])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "{topic} never got a route");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `txmq --nameserver NS ARGS` with only `env` of the security
/// variables set.
fn run(nameserver: &str, args: &[String], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(binary("txmq"));
    for var in SECURITY_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--nameserver")
        .arg(nameserver)
        .args(args)
        .stdin(Stdio::null());
    cmd.output().expect("txmq runs")
}

use txmq_tests::output::{ok, stderr, stdout};

/// Asserts exit 1 with `code` on stderr; returns stderr.
#[track_caller]
fn refused(o: &Output, code: &str) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit 1 expected\nstdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(err.contains(code), "stderr names {code}: {err}");
    err
}

#[test]
fn each_permission_is_refused_and_granted_through_the_cli() {
    let s = Secured::start();

    let err = refused(
        &s.txmq(Some(APP), &["topic", "create", "orders"]),
        "ACCESS_DENIED",
    );
    assert!(err.contains("app"), "the refusal names the user: {err}");
    s.create_topic("orders");

    let send = ["send", "orders", "--wait-for-broker", "10s", "--body"];
    let err = refused(
        &s.txmq(Some(READER), &[&send[..], &["from reader"]].concat()),
        "ACCESS_DENIED",
    );
    assert!(err.contains("orders"), "the refusal names the topic: {err}");
    ok(&s.txmq(Some(APP), &[&send[..], &["order 1"]].concat()));

    let consume = |user, count: &str| {
        s.txmq(
            Some(user),
            &[
                "--output",
                "json",
                "consume",
                "orders",
                "--group",
                "billing",
                "--count",
                count,
                "--idle-timeout",
                "10s",
            ],
        )
    };
    let err = refused(&consume(READER, "1"), "ACCESS_DENIED");
    assert!(
        err.contains("billing"),
        "the refusal names the group: {err}"
    );

    // A transaction left open by the application; only an admin ends it by hand.
    refused(
        &s.txmq(
            Some(READER),
            &[
                "tx",
                "send",
                "orders",
                "--group",
                "orders-tx",
                "--body",
                "x",
                "--local",
                "commit",
            ],
        ),
        "ACCESS_DENIED",
    );
    // Nor may it answer the group's check-backs: `tx listen` ends at the
    // refusal (it ran on, answering nothing, and exited 0).
    let started = Instant::now();
    let err = refused(
        &s.txmq(
            Some(READER),
            &[
                "tx",
                "listen",
                "--group",
                "orders-tx",
                "--check",
                "commit",
                "--duration",
                "60s",
            ],
        ),
        "ACCESS_DENIED",
    );
    assert!(err.contains("orders-tx"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
    let sent = ok(&s.txmq(
        Some(APP),
        &[
            "--output",
            "json",
            "tx",
            "send",
            "orders",
            "--group",
            "orders-tx",
            "--body",
            "order 2",
            "--local",
            "unknown",
        ],
    ));
    let tx_id = json_lines(sent.as_bytes())[0]["tx_id"]
        .as_u64()
        .expect("a tx_id")
        .to_string();
    refused(
        &s.txmq(Some(APP), &["tx", "resolve", &tx_id, "--commit"]),
        "ACCESS_DENIED",
    );
    ok(&s.txmq(Some(OPS), &["tx", "resolve", &tx_id, "--commit"]));

    let got = ok(&consume(APP, "2"));
    let mut bodies: Vec<String> = json_lines(got.as_bytes())
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["order 1", "order 2"]);
}

#[test]
fn a_wrong_secret_or_none_fails_authentication() {
    let s = Secured::start();
    let err = refused(
        &s.txmq(Some(("ops", "not the secret")), &["topic", "list"]),
        "AUTHENTICATION_FAILED",
    );
    assert!(
        !err.contains("not the secret"),
        "the secret is not shown: {err}"
    );
    refused(&s.txmq(None, &["topic", "list"]), "AUTHENTICATION_FAILED");

    let half = s.txmq(None, &["--access-key", "ops", "topic", "list"]);
    assert_eq!(
        half.status.code(),
        Some(2),
        "a key without its secret is a usage error"
    );
    // An empty secret is no secret: a usage error too, from the flag or
    // the environment, and nothing is sent (it was, and was answered
    // AUTHENTICATION_FAILED).
    let list = ["topic", "list"].map(str::to_string);
    let ca = ("TXMQ_TLS_CA", path(&s.pki.ca()));
    let flag = [
        "--tls-ca",
        &path(&s.pki.ca()),
        "--access-key",
        "ops",
        "--secret-key",
        "",
    ]
    .map(str::to_string);
    for empty in [
        run(&s.ns_addr, &[&flag[..], &list[..]].concat(), &[]),
        run(
            &s.ns_addr,
            &list,
            &[
                ca.clone(),
                ("TXMQ_ACCESS_KEY", "ops".into()),
                ("TXMQ_SECRET_KEY", String::new()),
            ],
        ),
    ] {
        let err = stderr(&empty);
        assert_eq!(empty.status.code(), Some(2), "{err}");
        assert!(err.contains("--access-key needs its --secret-key"), "{err}");
        assert!(!err.contains("AUTHENTICATION_FAILED"), "{err}");
    }
}

/// `txmq-broker --standalone` serves its nameserver with the broker's TLS
/// and ACL file: the CLI works through it with a user, and neither
/// plaintext nor a wrong secret gets a route. (This broker also serves its
/// connections on `--network-threads 2`.)
#[test]
fn a_standalone_broker_secures_its_nameserver_too() {
    let s = Secured::start_as(true);
    s.create_topic("orders");
    let send = ["send", "orders", "--wait-for-broker", "10s", "--body", "o1"];
    ok(&s.txmq(Some(APP), &send));
    let got = ok(&s.txmq(
        Some(APP),
        &[
            "--output",
            "json",
            "consume",
            "orders",
            "--group",
            "billing",
            "--count",
            "1",
            "--idle-timeout",
            "10s",
        ],
    ));
    assert_eq!(json_lines(got.as_bytes())[0]["body"], "o1");

    let plaintext = run(
        &s.ns_addr,
        &[
            "--access-key",
            "app",
            "--secret-key",
            "app-secret",
            "topic",
            "route",
            "orders",
        ]
        .map(str::to_string),
        &[],
    );
    assert!(
        !plaintext.status.success(),
        "plaintext to the standalone nameserver fails"
    );
    assert!(
        stderr(&plaintext).contains("give --tls-ca"),
        "{}",
        stderr(&plaintext)
    );
    refused(
        &s.txmq(Some(("app", "wrong")), &["topic", "route", "orders"]),
        "AUTHENTICATION_FAILED",
    );

    // A standalone broker with TLS needs the CA to reach its own nameserver.
    let bad = Command::new(binary("txmq-broker"))
        .args(["--standalone", "--nameserver-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(s.pki.dir().join("unused"))
        .arg("--tls-cert")
        .arg(s.pki.dir().join("localhost.pem"))
        .arg("--tls-key")
        .arg(s.pki.dir().join("localhost.key"))
        .stdin(Stdio::null())
        .output()
        .expect("txmq-broker runs");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--tls-ca"), "{}", stderr(&bad));
}

#[test]
fn tls_problems_are_named() {
    let s = Secured::start();
    let other = Pki::new("another CA");
    let wrong_ca = run(
        &s.ns_addr,
        &[
            "--tls-ca",
            &path(&other.ca()),
            "--access-key",
            "ops",
            "--secret-key",
            "ops-secret",
            "cluster",
        ]
        .map(str::to_string),
        &[],
    );
    assert!(!wrong_ca.status.success());
    let err = stderr(&wrong_ca);
    assert!(
        err.contains("certificate") && err.contains("not signed by the --tls-ca CA"),
        "the certificate problem is named: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let plaintext = run(
        &s.ns_addr,
        &[
            "--access-key",
            "ops",
            "--secret-key",
            "ops-secret",
            "cluster",
        ]
        .map(str::to_string),
        &[],
    );
    assert!(!plaintext.status.success(), "plaintext to a TLS port fails");
    let err = stderr(&plaintext);
    assert!(
        err.contains("give --tls-ca"),
        "the likely cause is named: {err}"
    );

    // TLS to a port without it: the client's error and the server's log
    // say what is likely wrong (a raw "tls handshake eof" and "frame of
    // 369295616 bytes" before).
    let dir = tempfile::tempdir().expect("temp dir");
    let plain_addr = format!("127.0.0.1:{}", free_port());
    let plain = NameserverProcess::start(&plain_addr, &[], &dir.path().join("plain.log"));
    let tls_cluster = |addr: &str| {
        let out = run(
            addr,
            &["--tls-ca", &path(&s.pki.ca()), "cluster"].map(str::to_string),
            &[],
        );
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };
    let err = tls_cluster(&plain_addr);
    assert!(err.contains("it may not use TLS"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !plain
        .log_text()
        .contains("a TLS handshake on a port without TLS")
    {
        assert!(Instant::now() < deadline, "{}", plain.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // A server that presents the CA's own certificate.
    let ca_addr = format!("127.0.0.1:{}", free_port());
    let ca_server = s.pki.ca_as_server();
    let _ca_ns = NameserverProcess::start(
        &ca_addr,
        &[
            "--tls-cert",
            &path(&ca_server.cert),
            "--tls-key",
            &path(&ca_server.key),
        ],
        &dir.path().join("ca.log"),
    );
    let err = tls_cluster(&ca_addr);
    assert!(
        err.contains("presents a CA's certificate as its own"),
        "{err}"
    );

    let missing = run(
        &s.ns_addr,
        &["--tls-ca", "/nonexistent/ca.pem", "cluster"].map(str::to_string),
        &[],
    );
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("/nonexistent/ca.pem"));
}

/// A name a client chooses (here a producer group) cannot add a line of
/// its own to a server's log: the access-denied WARN quoting it stays one
/// line. Control characters in an error the CLI prints are escaped too.
#[test]
fn names_clients_choose_cannot_forge_log_lines() {
    let s = Secured::start();
    s.create_topic("orders");
    let forged = "g\n2026-12-07T11:00:00.000000Z  INFO txmq_broker: FORGED";
    let err = refused(
        &s.txmq(
            Some(READER),
            &[
                "tx", "send", "orders", "--group", forged, "--body", "x", "--local", "commit",
            ],
        ),
        "ACCESS_DENIED",
    );
    assert!(
        !err.lines()
            .any(|l| l.starts_with("2026-12-07T11:00:00.000000Z")),
        "{err}"
    );
    assert!(err.contains(r"'g\n2026-12-07"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.broker.log_text().contains("access denied") {
        assert!(Instant::now() < deadline, "{}", s.broker.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.broker.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-07T11:00:00.000000Z")),
        "{log}"
    );
    assert!(log.contains(r"g\n2026-12-07T11:00:00.000000Z"), "{log}");
}

#[test]
fn environment_variables_work_like_the_flags() {
    let s = Secured::start();
    s.create_topic("orders");
    let env = |(key, secret): User| {
        vec![
            ("TXMQ_TLS_CA", path(&s.pki.ca())),
            ("TXMQ_ACCESS_KEY", key.to_string()),
            ("TXMQ_SECRET_KEY", secret.to_string()),
        ]
    };
    let send = ["send", "orders", "--body", "from env"].map(str::to_string);
    ok(&run(&s.ns_addr, &send, &env(APP)));
    refused(&run(&s.ns_addr, &send, &env(READER)), "ACCESS_DENIED");
    refused(
        &run(&s.ns_addr, &send, &env(("app", "wrong"))),
        "AUTHENTICATION_FAILED",
    );
}

#[test]
fn bench_produce_runs_with_tls_and_a_user() {
    let s = Secured::start();
    s.create_topic("orders");
    let out = ok(&s.txmq(
        Some(APP),
        &[
            "--output",
            "json",
            "bench",
            "produce",
            "orders",
            "--producers",
            "4",
            "--in-flight",
            "1",
            "--size",
            "128",
            "--count",
            "400",
        ],
    ));
    let report = &json_lines(out.as_bytes())[0];
    assert_eq!(report["messages"], 400, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(
        (&report["tls"], &report["auth"]),
        (&true.into(), &true.into())
    );
}

#[test]
fn message_lookups_need_sub_of_the_topic_or_admin_for_a_lookup_by_id() {
    let s = Secured::start();
    s.create_topic("orders");
    let sent = ok(&s.txmq(
        Some(APP),
        &[
            "--output",
            "json",
            "send",
            "orders",
            "--wait-for-broker",
            "10s",
            "--body",
            "o-1",
            "--key",
            "order-1",
        ],
    ));
    let sent = &json_lines(sent.as_bytes())[0];
    let id = sent["msg_id"].as_str().expect("msg_id").to_string();
    let (queue, offset) = (sent["queue"].to_string(), sent["queue_offset"].to_string());

    // find and get read bodies of the topic: sub of it (or admin).
    let find = ["msg", "find", "--topic", "orders", "--key", "order-1"];
    let get = [
        "msg", "get", "--topic", "orders", "--queue", &queue, "--offset", &offset,
    ];
    assert!(ok(&s.txmq(Some(READER), &find)).contains("o-1"));
    assert!(ok(&s.txmq(Some(READER), &get)).contains("o-1"));
    // The cluster's own user may not read topics.
    let member = Some(("broker", "cluster-secret"));
    let err = refused(&s.txmq(member, &find), "ACCESS_DENIED");
    assert!(err.contains("orders"), "{err}");
    refused(&s.txmq(member, &get), "ACCESS_DENIED");
    // An operator reads any topic (dead letters to re-send, say).
    assert!(ok(&s.txmq(Some(OPS), &find)).contains("o-1"));
    assert!(ok(&s.txmq(Some(OPS), &get)).contains("o-1"));
    // show may find any topic's message: admin only.
    let err = refused(&s.txmq(Some(APP), &["msg", "show", &id]), "ACCESS_DENIED");
    assert!(err.contains(&id), "the refusal names the lookup: {err}");
    // A refusal says that the broker did not look, not that the message
    // is not there (it said "no message with id ...").
    for err in [
        err,
        refused(&s.txmq(member, &find), "ACCESS_DENIED"),
        refused(&s.txmq(member, &get), "ACCESS_DENIED"),
    ] {
        assert!(
            err.contains("could not look for it: 1 broker(s) refused"),
            "{err}"
        );
        assert!(!err.contains("no message"), "{err}");
    }
    assert!(ok(&s.txmq(Some(OPS), &["msg", "show", &id])).contains("body:        o-1"));
}
