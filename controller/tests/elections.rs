//! The controller in-process: Raft members on 127.0.0.1 with fake brokers
//! heartbeating them; elections, fencing, planned switches, a controller
//! leader failover and a restart from the data directory.

mod common;

use std::time::Duration;

use common::*;
use txmq_protocol::{AlterInSync, ElectMaster, ErrorCode};

fn addrs(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.addr.clone()).collect()
}

/// Starts a broker and waits until the controller knows it.
async fn join(controllers: &[String], group: &str, addr: &str, log_end: u64) -> FakeBroker {
    let mut b = FakeBroker::start(controllers.to_vec(), group, addr, log_end);
    b.wait_state("the replica to be known", |s| {
        s.replicas.iter().any(|r| r.addr == addr)
    })
    .await;
    b
}

async fn alter(
    leader: &str,
    group: &str,
    master: &str,
    epoch: u64,
    in_sync: &[&str],
) -> Result<txmq_protocol::BrokerGroupState, txmq_protocol::WireError> {
    ask(
        leader,
        AlterInSync {
            broker_name: group.into(),
            master: master.into(),
            epoch,
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_is_replaced_from_the_in_sync_set_only() {
    init_log();
    let setup = Setup::new(3);
    let members = setup.start_all().await;
    let l = leader(&members).await;
    let ctl = addrs(&members);

    let mut a = FakeBroker::start(ctl.clone(), "broker-a", "a:1", 100);
    let s = a
        .wait_state("a elected", |s| s.master.as_deref() == Some("a:1"))
        .await;
    assert_eq!(s.epoch, 1);
    assert_eq!(s.in_sync, vec!["a:1".to_string()]);
    let b = join(&ctl, "broker-a", "b:1", 90).await;
    let c = join(&ctl, "broker-a", "c:1", 200).await;

    // The master takes b into the in-sync set (c, with the longer log, stays out).
    let s = alter(&members[l].addr, "broker-a", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();
    assert_eq!(s.in_sync, vec!["a:1".to_string(), "b:1".to_string()]);

    // The master's connection closes: b (in sync) is elected, never c.
    a.kill().await;
    let mut b = b;
    let s = b
        .wait_state("b elected", |s| s.master.as_deref() == Some("b:1"))
        .await;
    assert_eq!(s.epoch, 2);
    assert_eq!(s.in_sync, vec!["b:1".to_string()]);

    // The old master is fenced.
    let e = alter(&members[l].addr, "broker-a", "a:1", 1, &["a:1"])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleEpoch);
    assert!(
        e.message.contains("epoch 2") && e.message.contains("b:1"),
        "{e}"
    );

    // b dies too: c is alive but not in sync, so nobody is elected.
    b.kill().await;
    tokio::time::sleep(EXPIRY * 3).await;
    let s = c.current();
    assert_eq!((s.master.as_deref(), s.epoch), (Some("b:1"), 2), "{s:?}");
    let g = info(&members[l].addr).await.groups.remove(0);
    assert_eq!((g.master.as_deref(), g.epoch), (Some("b:1"), 2));
    assert!(g.replicas.iter().any(|r| r.addr == "c:1" && r.alive));
    assert!(g.replicas.iter().any(|r| r.addr == "b:1" && !r.alive));

    // A non-leader names the leader, for brokers...
    let follower = members.iter().position(|m| m.id != members[l].id).unwrap();
    let e = alter(&members[follower].addr, "broker-a", "b:1", 2, &["b:1"])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotControllerLeader);
    assert_eq!(e.message, members[l].addr);
    // ...but shows its own view of the groups to anyone.
    let fi = info(&members[follower].addr).await;
    assert_eq!(fi.leader_addr.as_deref(), Some(members[l].addr.as_str()));
    assert_eq!(fi.groups[0].epoch, 2);

    c.kill().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclean_election_elects_outside_the_in_sync_set() {
    init_log();
    let mut setup = Setup::new(1);
    setup.unclean = true;
    let members = setup.start_all().await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    let mut b = join(&ctl, "g", "b:1", 5).await;
    assert!(!b.current().in_sync.contains(&"b:1".to_string()));
    a.kill().await;
    let s = b
        .wait_state("b elected uncleanly", |s| {
            s.master.as_deref() == Some("b:1")
        })
        .await;
    assert_eq!((s.epoch, s.in_sync.clone()), (2, vec!["b:1".to_string()]));
    b.kill().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switch_drains_the_master_then_elects_the_target() {
    init_log();
    let mut setup = Setup::new(3);
    // Longer than ElectMaster waits: an answer proves the drain report elected.
    setup.drain_timeout = Duration::from_secs(60);
    let members = setup.start_all().await;
    let l = leader(&members).await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    a.answers_drain
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let b = join(&ctl, "g", "b:1", 10).await;
    let c = join(&ctl, "g", "c:1", 10).await;
    alter(&members[l].addr, "g", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();

    // Refusals: not in sync, unknown group, already master.
    let e = ask(
        &members[l].addr,
        ElectMaster {
            broker_name: "g".into(),
            replica: Some("c:1".into()),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInSync);
    assert!(e.message.contains("in-sync"), "{e}");
    let e = ask(
        &members[l].addr,
        ElectMaster {
            broker_name: "nope".into(),
            replica: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadArgument);
    let e = ask(
        &members[l].addr,
        ElectMaster {
            broker_name: "g".into(),
            replica: Some("a:1".into()),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInSync);

    // Asked of a follower, which forwards it to the leader.
    let follower = members.iter().position(|m| m.id != members[l].id).unwrap();
    let s = members[follower]
        .handle
        .elect_master(ElectMaster {
            broker_name: "g".into(),
            replica: Some("b:1".into()),
        })
        .await
        .unwrap();
    assert_eq!((s.master.as_deref(), s.epoch), (Some("b:1"), 2));
    assert_eq!(s.in_sync, vec!["b:1".to_string()]);
    assert_eq!(s.draining, None);
    let s = a.wait_state("a sees b", |s| s.epoch == 2).await;
    assert_eq!(s.master.as_deref(), Some("b:1"));

    for x in [a, b, c] {
        x.kill().await;
    }
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switch_elects_the_target_when_the_master_never_reports_drained() {
    init_log();
    let mut setup = Setup::new(1);
    setup.drain_timeout = Duration::from_millis(800);
    let members = setup.start_all().await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    let b = join(&ctl, "g", "b:1", 10).await;
    alter(&ctl[0], "g", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();
    let s = ask(
        &ctl[0],
        ElectMaster {
            broker_name: "g".into(),
            replica: None,
        },
    )
    .await
    .unwrap();
    assert_eq!((s.master.as_deref(), s.epoch), (Some("b:1"), 2));
    let s = a.wait_state("a learns", |s| s.epoch == 2).await;
    assert_eq!(s.master.as_deref(), Some("b:1"));
    a.kill().await;
    b.kill().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_controller_leader_keeps_every_group_and_its_master() {
    init_log();
    let setup = Setup::new(3);
    let mut members = setup.start_all().await;
    let l = leader(&members).await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    let b = join(&ctl, "g", "b:1", 10).await;
    alter(&members[l].addr, "g", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();
    let before = info(&members[l].addr).await.groups.remove(0);

    let old = members.remove(l);
    let old_id = old.id;
    let (_, old_dir) = old.stop().await;
    let nl = leader(&members).await;
    assert_ne!(members[nl].id, old_id);
    // The brokers find the new leader; nothing is re-elected.
    tokio::time::sleep(EXPIRY * 3).await;
    let after = info(&members[nl].addr).await.groups.remove(0);
    assert_eq!(
        (&after.master, after.epoch, &after.in_sync),
        (&before.master, before.epoch, &before.in_sync)
    );
    assert!(after.replicas.iter().all(|r| r.alive), "{after:?}");
    assert_eq!(a.current().epoch, 1);

    // The old leader comes back from its data dir and catches up.
    let back = setup.start(old_id, old_dir).await;
    members.push(back);
    wait_for(
        "the old member to catch up",
        Duration::from_secs(10),
        || {
            let i = members.last().unwrap().handle.info();
            (i.groups.len() == 1 && i.groups[0].epoch == 1 && i.leader_id.is_some()).then_some(())
        },
    )
    .await;

    a.kill().await;
    b.kill().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_recovers_the_state_from_its_data_dir() {
    init_log();
    let setup = Setup::new(1);
    let members = setup.start_all().await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    let b = join(&ctl, "g", "b:1", 10).await;
    alter(&ctl[0], "g", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();
    a.kill().await;
    let mut b = b;
    b.wait_state("b elected", |s| s.epoch == 2).await;
    b.kill().await;
    let term_before = members[0].handle.info().term;
    let member = members.into_iter().next().unwrap();
    let (id, dir) = member.stop().await;

    let again = setup.start(id, dir).await;
    let i = wait_for(
        "the restarted member to lead",
        Duration::from_secs(10),
        || {
            let i = again.handle.info();
            (i.leader_id == Some(id) && !i.groups.is_empty()).then_some(i)
        },
    )
    .await;
    assert!(
        i.term >= term_before,
        "the term never goes back: {} >= {}",
        i.term,
        term_before
    );
    let g = &i.groups[0];
    assert_eq!((g.master.as_deref(), g.epoch), (Some("b:1"), 2));
    assert_eq!(g.in_sync, vec!["b:1".to_string()]);
    assert_eq!(g.replicas.len(), 2);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_master_is_replaced_after_the_expiry_and_learns_it_on_return() {
    init_log();
    let setup = Setup::new(1);
    let members = setup.start_all().await;
    let ctl = addrs(&members);
    let mut a = FakeBroker::start(ctl.clone(), "g", "a:1", 10);
    a.wait_state("a elected", |s| s.epoch == 1).await;
    let mut b = join(&ctl, "g", "b:1", 10).await;
    alter(&ctl[0], "g", "a:1", 1, &["a:1", "b:1"])
        .await
        .unwrap();
    // a hangs with its connection open.
    a.paused.store(true, std::sync::atomic::Ordering::Relaxed);
    let s = b
        .wait_state("b elected", |s| s.master.as_deref() == Some("b:1"))
        .await;
    assert_eq!(s.epoch, 2);
    // a wakes up: its next heartbeat tells it the news.
    a.paused.store(false, std::sync::atomic::Ordering::Relaxed);
    let s = a.wait_state("a learns", |s| s.epoch == 2).await;
    assert_eq!(s.master.as_deref(), Some("b:1"));
    // b stays master (a is no candidate: b is live).
    tokio::time::sleep(EXPIRY * 2).await;
    assert_eq!(b.current().epoch, 2);
    a.kill().await;
    b.kill().await;
    for m in members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_changes_are_refused_as_unavailable() {
    init_log();
    let setup = Setup::new(3);
    let mut members = setup.start_all().await;
    let l = leader(&members).await;
    let lead = members.remove(l);
    for m in members {
        m.stop().await;
    }
    // A new replica needs a Raft commit, which two stopped members of
    // three make impossible: a bounded wait, then CONTROLLER_UNAVAILABLE
    // (or NOT_CONTROLLER_LEADER, should the leader have stepped down).
    let e = ask(
        &lead.addr,
        txmq_protocol::ControllerHeartbeat {
            cluster: "c".into(),
            broker_name: "g".into(),
            addr: "a:1".into(),
            master_epoch: 0,
            log_end: 0,
            known_version: 0,
            wait_ms: 0,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e.code,
            ErrorCode::ControllerUnavailable | ErrorCode::NotControllerLeader
        ),
        "{e}"
    );
    assert!(lead.handle.info().groups.is_empty());
    lead.stop().await;
}
