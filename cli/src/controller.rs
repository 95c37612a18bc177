//! `txmq controller` and `txmq broker elect`: the controller that elects
//! each broker group's master, as the nameservers that embed it answer.
//!
//! Both go through the nameservers (the `--nameserver` addresses), which
//! hand the request to their controller member; a nameserver started
//! without a controller is skipped, and when none runs one the command
//! says so and exits with 1.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use txmq::{Admin, BrokerGroupState, ControllerInfo};

use crate::args::GlobalArgs;
use crate::output::{table, OutputFormat, Printer};

/// `txmq broker ...`
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Planned switch of a broker group's master, for maintenance: the
    /// controller has the master drain, then elects the replica (an alive,
    /// in-sync one) with a new epoch. Clients retry onto the new master.
    Elect {
        /// The broker group (its --broker-name).
        broker_name: String,
        /// The replica to elect, by address; without it, any other live
        /// in-sync replica.
        #[arg(long, env = "TXMQ_REPLICA", value_name = "ADDR")]
        replica: Option<String>,
    },
}

/// Runs a broker subcommand.
///
/// # Errors
/// When no nameserver answers, none runs the controller
/// (`UNSUPPORTED_REQUEST`), or the controller refuses: `NOT_IN_SYNC` (the
/// replica is not alive and in sync), `BAD_ARGUMENT` (no such group).
pub async fn run_broker(global: &GlobalArgs, cmd: BrokerCommand) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let printer = Printer::stdout(global.output);
    match cmd {
        BrokerCommand::Elect {
            broker_name,
            replica,
        } => {
            let answer = admin.elect_master(&broker_name, replica.as_deref()).await;
            admin.close().await.ok();
            let state = answer.with_context(|| match &replica {
                Some(r) => format!("cannot elect {r} master of broker group {broker_name}"),
                None => format!("cannot elect a new master of broker group {broker_name}"),
            })?;
            match printer.format {
                OutputFormat::Text => printer.line(&elected_text(&state))?,
                OutputFormat::Json => printer.json(&group_json(&state))?,
            }
        }
    }
    Ok(())
}

/// Shows the controller: its members, the Raft leader and term, and each
/// broker group's master, epoch and in-sync set.
///
/// # Errors
/// When no nameserver answers, or none runs the controller.
pub async fn run_controller(global: &GlobalArgs) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let answer = admin.controller_info().await;
    let info = match answer {
        Ok(info) => info,
        Err(e) => {
            admin.close().await.ok();
            return Err(anyhow::Error::new(e).context("cannot ask the controller"));
        }
    };
    // Which members answer themselves: the leader lists every member.
    let unreachable: BTreeMap<u64, String> = admin
        .controller_members(&info)
        .await
        .into_iter()
        .filter_map(|(id, answer)| answer.err().map(|e| (id, txmq::error::chain(&e))))
        .collect();
    admin.close().await.ok();
    let printer = Printer::stdout(global.output);
    match printer.format {
        OutputFormat::Text => controller_text(&info, &unreachable)
            .iter()
            .try_for_each(|l| printer.line(l))?,
        OutputFormat::Json => printer.json(&controller_json(&info, &unreachable))?,
    }
    Ok(())
}

/// `broker-a: master is now 127.0.0.1:10912 (epoch 3)`.
fn elected_text(state: &BrokerGroupState) -> String {
    match &state.master {
        Some(master) => format!(
            "{}: master is now {master} (epoch {})",
            state.broker_name, state.epoch
        ),
        None => format!(
            "{}: no master now (epoch {}); the controller elects one once an in-sync replica is alive",
            state.broker_name, state.epoch
        ),
    }
}

/// A group's state as JSON: `broker_name`, `master`, `epoch`, `in_sync`,
/// and what else the controller knows of it.
fn group_json(state: &BrokerGroupState) -> Value {
    json!({
        "broker_name": state.broker_name,
        "master": state.master,
        "epoch": state.epoch,
        "in_sync": state.in_sync,
        "draining": state.draining,
        "replicas": state.replicas.iter().map(|r| json!({
            "addr": r.addr,
            "alive": r.alive,
            "last_heartbeat_ms_ago": (r.last_heartbeat_ms_ago != u64::MAX).then_some(r.last_heartbeat_ms_ago),
            "log_end": r.log_end,
        })).collect::<Vec<_>>(),
    })
}

/// The controller as text: a summary line, its members, then one row per
/// broker group.
fn controller_text(info: &ControllerInfo, unreachable: &BTreeMap<u64, String>) -> Vec<String> {
    let leader = match (info.leader_id, &info.leader_addr) {
        (Some(id), Some(addr)) => format!("leader {id} ({addr})"),
        (Some(id), None) => format!("leader {id}"),
        (None, _) => "no leader known".to_string(),
    };
    let mut lines = vec![format!(
        "controller: {leader}, term {}, as member {} sees it",
        info.term, info.id
    )];
    let members: Vec<Vec<String>> = info
        .members
        .iter()
        .map(|(id, addr)| {
            let role = if Some(*id) == info.leader_id {
                "leader"
            } else {
                "follower"
            };
            let reached = match unreachable.get(id) {
                Some(e) => format!("no: {e}"),
                None => "yes".to_string(),
            };
            vec![id.to_string(), addr.clone(), role.to_string(), reached]
        })
        .collect();
    lines.extend(table(&["MEMBER", "ADDR", "ROLE", "ANSWERS"], &members));
    lines.push(String::new());
    // Only the leader hears the brokers' heartbeats.
    let follower = info.leader_id != Some(info.id);
    let groups: Vec<Vec<String>> = info
        .groups
        .iter()
        .map(|g| {
            let alive = match follower {
                true => format!("?/{}", g.replicas.len()),
                false => format!(
                    "{}/{}",
                    g.replicas.iter().filter(|r| r.alive).count(),
                    g.replicas.len()
                ),
            };
            vec![
                g.broker_name.clone(),
                g.master.clone().unwrap_or_else(|| "-".into()),
                g.epoch.to_string(),
                if g.in_sync.is_empty() {
                    "-".to_string()
                } else {
                    g.in_sync.join(",")
                },
                alive,
                g.draining.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    lines.extend(table(
        &[
            "BROKER",
            "MASTER",
            "EPOCH",
            "IN SYNC",
            "ALIVE",
            "SWITCHING TO",
        ],
        &groups,
    ));
    if follower {
        let leader = match info.leader_id {
            Some(_) => "the leader could not be asked",
            None => "no leader is known",
        };
        lines.push(format!(
            "(member {} is not the leader and {leader}: only the leader hears the brokers' heartbeats, so which replicas are alive is not known here)",
            info.id
        ));
    }
    lines
}

/// The controller as one JSON object.
fn controller_json(info: &ControllerInfo, unreachable: &BTreeMap<u64, String>) -> Value {
    json!({
        "id": info.id,
        "leader_id": info.leader_id,
        "leader_addr": info.leader_addr,
        "term": info.term,
        "members": info.members.iter().map(|(id, addr)| json!({
            "id": id,
            "addr": addr,
            "leader": Some(*id) == info.leader_id,
            "reachable": !unreachable.contains_key(id),
            "error": unreachable.get(id),
        })).collect::<Vec<_>>(),
        "groups": info.groups.iter().map(group_json).collect::<Vec<_>>(),
        // A follower's `alive` says nothing: only the leader hears heartbeats.
        "from_leader": info.leader_id == Some(info.id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq::ControllerReplica;

    fn group() -> BrokerGroupState {
        BrokerGroupState {
            broker_name: "broker-a".into(),
            master: Some("127.0.0.1:10912".into()),
            epoch: 3,
            in_sync: vec!["127.0.0.1:10912".into(), "127.0.0.1:10911".into()],
            replicas: vec![
                ControllerReplica {
                    addr: "127.0.0.1:10911".into(),
                    alive: true,
                    last_heartbeat_ms_ago: 200,
                    log_end: 4096,
                },
                ControllerReplica {
                    addr: "127.0.0.1:10912".into(),
                    alive: true,
                    last_heartbeat_ms_ago: 100,
                    log_end: 4096,
                },
                ControllerReplica {
                    addr: "127.0.0.1:10913".into(),
                    alive: false,
                    last_heartbeat_ms_ago: u64::MAX,
                    log_end: 0,
                },
            ],
            version: 9,
            draining: None,
            master_expiry_ms: 5000,
        }
    }

    #[test]
    fn an_election_reads_as_the_new_master_and_epoch() {
        assert_eq!(
            elected_text(&group()),
            "broker-a: master is now 127.0.0.1:10912 (epoch 3)"
        );
        let mut none = group();
        none.master = None;
        assert!(elected_text(&none).starts_with("broker-a: no master now (epoch 3)"));
        let v = group_json(&group());
        assert_eq!(v["broker_name"], "broker-a");
        assert_eq!(v["master"], "127.0.0.1:10912");
        assert_eq!(v["epoch"], 3);
        assert_eq!(v["in_sync"], json!(["127.0.0.1:10912", "127.0.0.1:10911"]));
        assert_eq!(v["replicas"][2]["alive"], false);
        assert_eq!(v["replicas"][2]["last_heartbeat_ms_ago"], Value::Null);
        assert_eq!(v["replicas"][1]["last_heartbeat_ms_ago"], 100);
    }

    #[test]
    fn the_controller_shows_members_leader_term_and_groups() {
        let mut switching = group();
        switching.broker_name = "broker-b".into();
        switching.draining = Some("127.0.0.1:10911".into());
        switching.in_sync.clear();
        let mut info = ControllerInfo {
            id: 1,
            leader_id: Some(1),
            leader_addr: Some("127.0.0.1:9878".into()),
            term: 4,
            members: vec![(1, "127.0.0.1:9878".into()), (2, "127.0.0.1:9879".into())],
            groups: vec![group(), switching],
        };
        let none = BTreeMap::new();
        let down = BTreeMap::from([(2, "connection refused".to_string())]);
        assert_eq!(
            controller_text(&info, &down),
            [
                "controller: leader 1 (127.0.0.1:9878), term 4, as member 1 sees it",
                "MEMBER  ADDR            ROLE      ANSWERS",
                "1       127.0.0.1:9878  leader    yes",
                "2       127.0.0.1:9879  follower  no: connection refused",
                "",
                "BROKER    MASTER           EPOCH  IN SYNC                          ALIVE  SWITCHING TO",
                "broker-a  127.0.0.1:10912  3      127.0.0.1:10912,127.0.0.1:10911  2/3    -",
                "broker-b  127.0.0.1:10912  3      -                                2/3    127.0.0.1:10911",
            ]
        );
        let v = controller_json(&info, &down);
        assert_eq!(v["from_leader"], true);
        assert_eq!(v["members"][1]["reachable"], false);
        assert_eq!(v["members"][1]["error"], "connection refused");
        // A follower's view (its leader could not be asked): who is alive
        // is not known there.
        info.id = 2;
        let text = controller_text(&info, &none);
        assert!(text[6].contains(" ?/3 "), "{text:?}");
        assert!(
            text.last()
                .is_some_and(|l| l.contains("member 2 is not the leader")),
            "{text:?}"
        );
        assert_eq!(controller_json(&info, &none)["from_leader"], false);
        info.id = 1;
        let v = controller_json(&info, &none);
        assert_eq!(v["leader_id"], 1);
        assert_eq!(v["term"], 4);
        assert_eq!(
            v["members"][0],
            json!({"id": 1, "addr": "127.0.0.1:9878", "leader": true, "reachable": true, "error": null})
        );
        assert_eq!(v["groups"][1]["draining"], "127.0.0.1:10911");
        assert_eq!(v["groups"][0]["epoch"], 3);

        let leaderless = ControllerInfo {
            leader_id: None,
            leader_addr: None,
            ..info
        };
        assert!(controller_text(&leaderless, &none)[0]
            .starts_with("controller: no leader known, term 4"));
    }
}
