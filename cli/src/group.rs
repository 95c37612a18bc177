//! `txmq group list|show|reset-offset` and `txmq dlq list`.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use serde_json::json;
use txmq::{dlq_topic, Admin, OffsetTarget};

use crate::args::GlobalArgs;
use crate::output::{received_json, received_text, OutputFormat, Printer};

/// `txmq group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List the consumer groups the brokers know (live members or committed offsets).
    List,
    /// Show a group: members, which member owns each queue, committed
    /// offset and lag per queue.
    Show {
        /// The group.
        group: String,
    },
    /// Move a group's committed offsets of a topic (stop its consumers first).
    ResetOffset {
        /// The group.
        group: String,
        /// The topic whose offsets move.
        #[arg(long, env = "TXMQ_TOPIC")]
        topic: String,
        /// `first` (the first stored message), `last` (after the last one),
        /// or a time: milliseconds since the Unix epoch, or RFC 3339
        /// (`2026-11-21T10:00:00Z`); the first message stored at or after it.
        #[arg(long, value_name = "first|last|TIMESTAMP")]
        to: String,
    },
}

/// `txmq dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the messages in a group's dead-letter topic (`%DLQ%<group>`),
    /// without consuming them.
    List {
        /// The group.
        group: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn parse_target(s: &str) -> Result<OffsetTarget> {
    match s {
        "first" => Ok(OffsetTarget::First),
        "last" => Ok(OffsetTarget::Last),
        _ => {
            if let Ok(ms) = s.parse::<u64>() {
                return Ok(OffsetTarget::Timestamp(ms));
            }
            let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
                anyhow!("--to {s:?} is not first, last, milliseconds since the epoch, or an RFC 3339 time")
            })?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| anyhow!("--to {s:?} is before 1970"))?
                .as_millis();
            Ok(OffsetTarget::Timestamp(u64::try_from(ms)?))
        }
    }
}

/// Runs a group subcommand.
///
/// # Errors
/// When no nameserver or broker answers, or one refuses.
pub async fn run(global: &GlobalArgs, cmd: GroupCommand) -> Result<()> {
    let printer = Printer::stdout(global.output);
    let target = match &cmd {
        GroupCommand::ResetOffset { to, .. } => Some(parse_target(to)?),
        _ => None,
    };
    let admin = Admin::with_config(global.client_config()).await?;
    match cmd {
        GroupCommand::List => {
            let lists = admin.list_groups(None).await?;
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for list in &lists {
                for g in &list.groups {
                    rows.push(vec![
                        g.group.clone(),
                        list.broker_name.clone(),
                        g.members.to_string(),
                        g.topics.join(","),
                    ]);
                    objects.push(json!({
                        "group": g.group,
                        "broker": list.broker_name,
                        "members": g.members,
                        "topics": g.topics,
                    }));
                }
            }
            printer.records(&["GROUP", "BROKER", "MEMBERS", "TOPICS"], &rows, &objects)?;
        }
        GroupCommand::Show { group } => {
            let states = admin.group_state(&group, None).await?;
            match printer.format {
                OutputFormat::Json => {
                    for s in &states {
                        printer.json(&json!({
                            "group": s.group,
                            "broker": s.broker_name,
                            "members": s.members.iter().map(|m| json!({
                                "client_id": m.client_id,
                                "addr": m.addr,
                                "broadcast": m.broadcast,
                                "subscriptions": m.subscriptions.iter().map(|s| json!({"topic": s.topic, "expression": s.expression})).collect::<Vec<_>>(),
                                "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
                            })).collect::<Vec<_>>(),
                            "queues": s.queues.iter().map(|q| json!({
                                "topic": q.topic,
                                "queue": q.queue,
                                "owner": q.owner,
                                "committed": q.committed,
                                "max_offset": q.max_offset,
                                "lag": q.lag,
                            })).collect::<Vec<_>>(),
                        }))?;
                    }
                }
                OutputFormat::Text => {
                    let mut members = std::collections::BTreeMap::new();
                    for s in &states {
                        for m in &s.members {
                            let subs: Vec<String> = m
                                .subscriptions
                                .iter()
                                .map(|s| format!("{} ({})", s.topic, s.expression))
                                .collect();
                            members.insert(
                                m.client_id.clone(),
                                vec![
                                    m.client_id.clone(),
                                    m.addr.clone(),
                                    if m.broadcast {
                                        "broadcast"
                                    } else {
                                        "clustering"
                                    }
                                    .into(),
                                    subs.join(", "),
                                ],
                            );
                        }
                    }
                    printer.line(&format!("group {group}: {} member(s)", members.len()))?;
                    let rows: Vec<Vec<String>> = members.into_values().collect();
                    for l in
                        crate::output::table(&["MEMBER", "ADDR", "MODE", "SUBSCRIPTIONS"], &rows)
                    {
                        printer.line(&l)?;
                    }
                    printer.line("")?;
                    let rows: Vec<Vec<String>> = states
                        .iter()
                        .flat_map(|s| {
                            s.queues.iter().map(|q| {
                                vec![
                                    q.topic.clone(),
                                    s.broker_name.clone(),
                                    q.queue.to_string(),
                                    q.owner.clone().unwrap_or_else(|| "-".into()),
                                    q.committed.map_or_else(|| "-".into(), |c| c.to_string()),
                                    q.max_offset.to_string(),
                                    q.lag.to_string(),
                                ]
                            })
                        })
                        .collect();
                    for l in crate::output::table(
                        &[
                            "TOPIC",
                            "BROKER",
                            "QUEUE",
                            "OWNER",
                            "COMMITTED",
                            "MAX",
                            "LAG",
                        ],
                        &rows,
                    ) {
                        printer.line(&l)?;
                    }
                }
            }
        }
        GroupCommand::ResetOffset { group, topic, .. } => {
            let to = target.expect("parsed above");
            let resets = admin.reset_offsets(&group, &topic, to, None).await?;
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for r in &resets {
                for (queue, offset) in &r.queues {
                    rows.push(vec![
                        r.broker_name.clone(),
                        queue.to_string(),
                        offset.to_string(),
                    ]);
                    objects.push(json!({
                        "group": group,
                        "topic": topic,
                        "broker": r.broker_name,
                        "queue": queue,
                        "offset": offset,
                    }));
                }
            }
            printer.records(&["BROKER", "QUEUE", "OFFSET"], &rows, &objects)?;
        }
    }
    Ok(())
}

/// Runs a dlq subcommand.
///
/// # Errors
/// When no nameserver or broker answers; a group with no dead letters
/// prints nothing.
pub async fn run_dlq(global: &GlobalArgs, cmd: DlqCommand) -> Result<()> {
    let printer = Printer::stdout(global.output);
    let admin = Admin::with_config(global.client_config()).await?;
    let DlqCommand::List { group, limit } = cmd;
    let messages = match admin.browse(&dlq_topic(&group), limit).await {
        Ok(m) => m,
        Err(txmq::Error::NoRoute { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    for m in &messages {
        match printer.format {
            OutputFormat::Text => printer.line(&received_text(m))?,
            OutputFormat::Json => printer.json(&received_json(m))?,
        }
    }
    Ok(())
}
