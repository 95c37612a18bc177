//! The failover commands of the `txmq` command line (issue 14): `txmq
//! cluster` shows an epoch per replica and `txmq broker elect` / `txmq
//! controller` say clearly when no nameserver runs the controller (real
//! broker processes), and the same commands read the controller embedded
//! in three real nameserver processes and switch a group's master through
//! it (the brokers there are the controller tests' fake brokers, which
//! heartbeat the controller as a broker does).

mod common;
// The controller crate's test members and fake brokers, used as they are
// (its fake broker's heartbeat loop takes eight arguments).
#[allow(clippy::too_many_arguments)]
#[path = "../../controller/tests/common/mod.rs"]
mod ctl;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{start_broker, txmq};
use txmq_protocol::AlterInSync;
use txmq_tests::{free_port, json_lines, Cluster, NameserverProcess};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_controller_the_cluster_shows_epoch_0_and_elect_says_no_controller_runs() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let master = start_broker(&dir.path().join("m"), &ns, "broker-a", &[]).await;
    let _slave = start_broker(
        &dir.path().join("s"),
        &ns,
        "broker-a",
        &["--role", "slave", "--master-addr", &master.addr],
    )
    .await;

    // Both replicas, each with epoch 0 (no controller runs them).
    let mut rows = Vec::new();
    for _ in 0..100 {
        let o = txmq(&ns, &["cluster", "--output", "json"], None).await;
        rows = json_lines(&o.stdout);
        if rows.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["role"], "master");
    assert_eq!(rows[0]["addr"], master.addr.as_str());
    assert_eq!(rows[1]["role"], "slave");
    assert!(rows.iter().all(|r| r["epoch"] == 0), "{rows:?}");
    let o = txmq(&ns, &["cluster"], None).await;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header[..5],
        ["CLUSTER", "BROKER", "ROLE", "ADDR", "EPOCH"],
        "{out}"
    );

    for args in [&["broker", "elect", "broker-a"][..], &["controller"]] {
        let o = txmq(&ns, args, None).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("UNSUPPORTED_REQUEST")
                && err.contains("no nameserver runs the controller")
                && err.contains(&ns),
            "{args:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    cluster.shutdown().await;
}

/// Three nameserver processes embedding a 3-member controller: the
/// processes, their addresses, and the controller-listen addresses.
fn nameservers_with_controller(dir: &std::path::Path) -> (Vec<NameserverProcess>, Vec<String>) {
    let ctl: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers = ctl
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let nss = (0..3)
        .map(|i| {
            let data = dir.join(format!("ctl-{}", i + 1));
            NameserverProcess::start(
                &format!("127.0.0.1:{}", free_port()),
                &[
                    "--controller-id",
                    &(i + 1).to_string(),
                    "--controller-listen",
                    &ctl[i],
                    "--controller-peers",
                    &peers,
                    "--controller-data-dir",
                    &data.display().to_string(),
                ],
                &dir.join(format!("ns-{}.log", i + 1)),
            )
        })
        .collect();
    (nss, ctl)
}

/// The controller as `txmq controller --output json` through `ns` shows it,
/// once every member agrees on a leader.
async fn agreed_controller(ns: &str) -> serde_json::Value {
    for _ in 0..400 {
        let o = txmq(ns, &["controller", "--output", "json"], None).await;
        let v = json_lines(&o.stdout).pop();
        if let Some(v) = v.filter(|v| v["leader_id"].is_u64()) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no controller leader through {ns}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_the_controller_of_the_nameservers_and_switches_a_master_through_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (nss, ctl) = nameservers_with_controller(dir.path());
    let ns = nss
        .iter()
        .map(|n| n.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let v = agreed_controller(&ns).await;
    let leader_ctl = v["leader_addr"].as_str().unwrap_or_default().to_string();
    assert!(ctl.contains(&leader_ctl), "{v}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3), "{v}");

    let mut a = ctl::FakeBroker::start(ctl.clone(), "broker-a", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    a.answers_drain.store(true, Ordering::Relaxed);
    let mut b = ctl::FakeBroker::start(ctl.clone(), "broker-a", "b:1", 10);
    b.wait_state("b known", |s| s.replicas.iter().any(|r| r.addr == "b:1"))
        .await;
    let in_sync = |master: &str, epoch, in_sync: [&str; 2]| AlterInSync {
        broker_name: "broker-a".into(),
        master: master.into(),
        epoch,
        in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
    };
    ctl::ask(&leader_ctl, in_sync("a:1", 1, ["a:1", "b:1"]))
        .await
        .expect("b joins the in-sync set");

    let v = agreed_controller(&ns).await;
    let g = &v["groups"][0];
    assert_eq!(
        (
            g["broker_name"].as_str(),
            g["master"].as_str(),
            g["epoch"].as_u64()
        ),
        (Some("broker-a"), Some("a:1"), Some(1)),
        "{v}"
    );
    assert_eq!(g["in_sync"], serde_json::json!(["a:1", "b:1"]));
    // Asked through any nameserver, a follower's too, the answer is the
    // leader's: only it hears the brokers' heartbeats (a follower's view
    // showed every replica dead).
    for n in &nss {
        let v = agreed_controller(&n.addr).await;
        assert_eq!(v["from_leader"], true, "through {}: {v}", n.addr);
        assert_eq!(v["leader_addr"].as_str(), Some(leader_ctl.as_str()), "{v}");
        let alive: Vec<bool> = v["groups"][0]["replicas"]
            .as_array()
            .map(|r| r.iter().map(|r| r["alive"] == true).collect())
            .unwrap_or_default();
        assert_eq!(alive, [true, true], "through {}: {v}", n.addr);
    }
    let o = txmq(&ns, &["controller"], None).await;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.starts_with("controller: leader "), "{out}");
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .collect::<Vec<_>>()
            .starts_with(&["broker-a", "a:1", "1"])),
        "{out}"
    );

    // Refusals, with the controller's code and exit 1.
    for (args, code) in [
        (
            &["broker", "elect", "broker-a", "--replica", "c:1"][..],
            "NOT_IN_SYNC",
        ),
        (
            &["broker", "elect", "broker-a", "--replica", "a:1"],
            "NOT_IN_SYNC",
        ),
        (&["broker", "elect", "no-such-group"], "BAD_ARGUMENT"),
    ] {
        let o = txmq(&ns, args, None).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(code), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(a.current().epoch, 1, "a refused switch changes nothing");

    // The planned switch: a drains, b is elected with epoch 2.
    let o = txmq(
        &ns,
        &["broker", "elect", "broker-a", "--replica", "b:1"],
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "broker-a: master is now b:1 (epoch 2)\n"
    );
    let s = a.wait_state("a learns of b", |s| s.epoch == 2).await;
    assert_eq!(s.master.as_deref(), Some("b:1"));

    // And back, asked for JSON, without naming the replica.
    a.wait_state("a alive under b", |s| {
        s.replicas.iter().any(|r| r.addr == "a:1" && r.alive)
    })
    .await;
    b.answers_drain.store(true, Ordering::Relaxed);
    ctl::ask(&leader_ctl, in_sync("b:1", 2, ["b:1", "a:1"]))
        .await
        .expect("a joins the in-sync set of b");
    let o = txmq(
        &ns,
        &["broker", "elect", "broker-a", "--output", "json"],
        None,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json_lines(&o.stdout);
    assert_eq!(
        (
            v[0]["broker_name"].as_str(),
            v[0]["master"].as_str(),
            v[0]["epoch"].as_u64()
        ),
        (Some("broker-a"), Some("a:1"), Some(3)),
        "{v:?}"
    );
    assert!(v[0]["in_sync"].as_array().is_some(), "{v:?}");

    // A member that is down is shown so (the leader's view lists it as a
    // follower whatever its state).
    let mut nss = nss;
    nss[2].kill9();
    let v = agreed_controller(&nss[0].addr).await;
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let down = members
        .iter()
        .find(|m| m["addr"] == ctl[2].as_str())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(down["reachable"], false, "{v}");
    assert!(down["error"].is_string(), "{v}");
    assert_eq!(
        members.iter().filter(|m| m["reachable"] == true).count(),
        2,
        "{v}"
    );

    for x in [a, b] {
        x.kill().await;
    }
    drop(nss);
}
