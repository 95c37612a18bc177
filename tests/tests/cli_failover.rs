//! The failover commands of the `txmq` command line with real processes
//! (issue 14): `txmq cluster` shows an epoch per replica, and `txmq broker
//! elect` / `txmq controller` say clearly when no nameserver runs the
//! controller. The same commands against fake controllers, with elections,
//! are tested in `cli/tests/fake_controller.rs`.

mod common;

use std::time::Duration;

use common::{start_broker, txmq};
use txmq_tests::{json_lines, Cluster};

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
