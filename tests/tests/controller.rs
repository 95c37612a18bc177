//! The controller embedded in real `txmq-nameserver` processes: three
//! members elect a Raft leader, a `kill -9` of it is survived, and the
//! nameserver's flags are checked.

use std::time::{Duration, Instant};

use txmq_protocol::{
    ControllerInfo, ElectMaster, ErrorCode, GetControllerInfo, Hello, Role, PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig};
use txmq_tests::{binary, free_port, Cluster, NameserverProcess};

async fn connect(addr: &str) -> Option<Connection> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Admin,
        client_id: "controller-test".into(),
        group: None,
    };
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(2),
        ..ConnectionConfig::default()
    };
    Connection::connect(addr, hello, None, config).await.ok()
}

/// `GetControllerInfo` through a nameserver's own port.
async fn info(ns: &str) -> Option<ControllerInfo> {
    let conn = connect(ns).await?;
    let r = conn.call(GetControllerInfo {}).await.ok();
    conn.close();
    r
}

/// Waits until every nameserver in `nss` reports the same leader, other
/// than `not`; returns its id.
async fn agreed_leader(nss: &[&str], within: Duration, not: Option<u64>) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for ns in nss {
            leaders.push(info(ns).await.and_then(|i| i.leader_id));
        }
        if let Some(Some(l)) = leaders.first() {
            if Some(*l) != not && leaders.iter().all(|x| *x == Some(*l)) {
                return *l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed controller leader: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_leader_elects_another_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let ctl: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers = ctl
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nss: Vec<NameserverProcess> = (0..3)
        .map(|i| {
            let data = dir.path().join(format!("ctl-{}", i + 1));
            let id = (i + 1).to_string();
            NameserverProcess::start(
                &format!("127.0.0.1:{}", free_port()),
                &[
                    "--controller-id",
                    &id,
                    "--controller-listen",
                    &ctl[i],
                    "--controller-peers",
                    &peers,
                    "--controller-data-dir",
                    data.to_str().unwrap(),
                ],
                &dir.path().join(format!("ns-{}.log", i + 1)),
            )
        })
        .collect();
    let addrs: Vec<String> = nss.iter().map(|n| n.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = agreed_leader(&all, Duration::from_secs(20), None).await;
    let i = info(all[0]).await.unwrap();
    assert_eq!(i.members.len(), 3);
    assert_eq!(
        i.leader_addr.as_deref(),
        Some(ctl[first as usize - 1].as_str())
    );

    // An admin request through any nameserver reaches the controller
    // leader (forwarded by a follower): an unknown group is refused.
    let follower = (first as usize) % 3;
    let conn = connect(all[follower]).await.unwrap();
    let e = conn
        .call(ElectMaster {
            broker_name: "nope".into(),
            replica: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::BadArgument),
        "{e}"
    );
    conn.close();

    // kill -9 the leader: the other two elect one of themselves.
    let killed = Instant::now();
    nss[first as usize - 1].kill9();
    let rest: Vec<&str> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first as usize - 1)
        .map(|(_, a)| *a)
        .collect();
    let second = agreed_leader(&rest, Duration::from_secs(15), Some(first)).await;
    assert_ne!(second, first);
    eprintln!("new controller leader after {:?}", killed.elapsed());

    // The killed member comes back from its data dir and follows.
    nss[first as usize - 1].restart();
    assert_eq!(
        agreed_leader(&all, Duration::from_secs(15), None).await,
        second
    );
}

#[test]
fn controller_flags_come_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let run = |args: &[&str]| {
        std::process::Command::new(binary("txmq-nameserver"))
            .args(["--listen", &listen])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--controller-id", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing: --controller-listen, --controller-peers, --controller-data-dir"),
        "{err}"
    );

    let data = dir.path().join("d");
    let out = run(&[
        "--controller-id",
        "4",
        "--controller-listen",
        "127.0.0.1:0",
        "--controller-peers",
        "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3",
        "--controller-data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--controller-id 4 is not one of --controller-peers"),
        "{err}"
    );

    let out = run(&["--controller-peers", "1=nohost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST:PORT"));
}

#[tokio::test]
async fn a_nameserver_without_a_controller_says_so() {
    let c = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let conn = connect(&c.nameserver).await.unwrap();
    let e = conn.call(GetControllerInfo {}).await.unwrap_err();
    let w = e.remote().unwrap();
    assert_eq!(w.code, ErrorCode::UnsupportedRequest);
    assert!(w.message.contains("runs no controller"), "{w}");
    conn.close();
    c.shutdown().await;
}
