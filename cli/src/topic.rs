//! `txmq topic create|list|route`.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use txmq::{Admin, PERM_READ, PERM_READ_WRITE, PERM_WRITE};

use crate::args::GlobalArgs;
use crate::output::{perm_name, Printer};

/// `txmq topic ...`
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic (or update its queues and permission), on every broker
    /// or on one; an existing topic is updated where it is (--broker adds it
    /// to another broker).
    Create {
        /// The topic name: 1 to 127 characters of A-Z a-z 0-9 - _ . %
        topic: String,
        /// Number of queues on each broker (a new topic: 4; an existing
        /// one keeps its count unless given).
        #[arg(long, env = "TXMQ_QUEUES", value_parser = clap::value_parser!(u32).range(1..))]
        queues: Option<u32>,
        /// Create it only on this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
        /// Permission: read and write, read only, or write only (a new
        /// topic: rw; an existing one keeps its permission unless given).
        #[arg(long, env = "TXMQ_PERM", value_enum)]
        perm: Option<Perm>,
    },
    /// List every topic on every broker.
    List,
    /// Show which brokers serve a topic, with their queues.
    Route {
        /// The topic name.
        #[arg(value_parser = crate::args::parse_topic_name)]
        topic: String,
    },
    /// Delete a topic: its configuration and routes, its consume queues and
    /// the consumer groups' offsets of it (its log records age out with
    /// retention). Refused while a transaction with a half message for it
    /// is pending, unless --force.
    Delete {
        /// The topic name.
        #[arg(value_parser = crate::args::parse_topic_name)]
        topic: String,
        /// Delete even while transactions with half messages for it are pending.
        #[arg(long)]
        force: bool,
        /// Only on this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
    },
    /// Per queue of a topic: min and max offset and when its last message
    /// was stored.
    Status {
        /// The topic name.
        #[arg(value_parser = crate::args::parse_topic_name)]
        topic: String,
        /// Only this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
    },
}

/// A topic's permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Perm {
    /// Read and write.
    Rw,
    /// Read only: sends are refused.
    R,
    /// Write only: messages are kept, and consumers get none of its
    /// queues until it may be read again.
    W,
}

impl Perm {
    fn bits(self) -> u8 {
        match self {
            Perm::Rw => PERM_READ_WRITE,
            Perm::R => PERM_READ,
            Perm::W => PERM_WRITE,
        }
    }
}

/// Runs a topic subcommand.
///
/// # Errors
/// When no nameserver or broker answers, or one refuses.
pub async fn run(global: &GlobalArgs, cmd: TopicCommand) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let printer = Printer::stdout(global.output);
    match cmd {
        TopicCommand::Create {
            topic,
            queues,
            broker,
            perm,
        } => {
            // What is not given stays as it is where the topic exists.
            let created = admin
                .create_or_update_topic(&topic, queues, perm.map(Perm::bits), broker.as_deref())
                .await?;
            for c in &created {
                let updated = c.updated;
                match printer.format {
                    crate::output::OutputFormat::Text => printer.line(&format!(
                        "{} topic {} on {} ({}): {} queues, perm {}",
                        if updated { "updated" } else { "created" },
                        c.config.name,
                        c.broker_name,
                        c.addr,
                        c.config.queues,
                        perm_name(c.config.perm)
                    ))?,
                    crate::output::OutputFormat::Json => printer.json(&json!({
                        "topic": c.config.name,
                        "broker": c.broker_name,
                        "addr": c.addr,
                        "queues": c.config.queues,
                        "perm": perm_name(c.config.perm),
                        "updated": updated,
                    }))?,
                }
            }
            // An update leaves the brokers without the topic alone: say
            // which (a create that failed on one is finished with --broker).
            if broker.is_none() && created.iter().all(|c| c.updated) {
                let mut without: Vec<String> = admin
                    .cluster()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|b| b.broker_name)
                    .filter(|b| !created.iter().any(|c| c.broker_name == *b))
                    .collect();
                without.sort();
                without.dedup();
                if !without.is_empty() {
                    stderr!(
                        "note: topic {topic} is not on {} (updated where it is; `--broker NAME` adds it to another broker)",
                        without.join(", ")
                    );
                }
            }
        }
        TopicCommand::List => {
            let topics = admin.list_topics().await?;
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| {
                    vec![
                        t.config.name.clone(),
                        t.broker_name.clone(),
                        t.config.queues.to_string(),
                        perm_name(t.config.perm).to_string(),
                    ]
                })
                .collect();
            let objects: Vec<_> = topics
                .iter()
                .map(|t| {
                    json!({
                        "topic": t.config.name,
                        "broker": t.broker_name,
                        "queues": t.config.queues,
                        "perm": perm_name(t.config.perm),
                    })
                })
                .collect();
            printer.records(&["TOPIC", "BROKER", "QUEUES", "PERM"], &rows, &objects)?;
        }
        TopicCommand::Delete {
            topic,
            force,
            broker,
        } => {
            // Every broker is asked first: a refusal or a silent broker
            // deletes nothing anywhere.
            let answers = admin
                .delete_topic_by_broker(&topic, force, broker.as_deref())
                .await;
            let answers = match answers {
                Ok(a) => a,
                Err(e) => {
                    admin.close().await.ok();
                    // No broker has it: nothing to say about deleting.
                    if e.code() == Some(txmq::ErrorCode::UnknownTopic) {
                        return Err(e.into());
                    }
                    return Err(anyhow::Error::from(e)
                        .context(format!("topic {topic} deleted on no broker")));
                }
            };
            let (mut deleted, mut failed) = (Vec::new(), Vec::new());
            for a in answers {
                match a.result {
                    Ok(d) => deleted.push(d),
                    Err(e) => failed.push((a.broker_name, a.addr, e)),
                }
            }
            if deleted.is_empty() {
                admin.close().await.ok();
                // Each passed the check; one that timed out may have
                // deleted it all the same.
                let (_, _, e) = failed.into_iter().next().expect("a broker was asked");
                return Err(anyhow::Error::from(e)
                    .context(format!("topic {topic} not confirmed deleted on any broker")));
            }
            for d in &deleted {
                match printer.format {
                    crate::output::OutputFormat::Text => printer.line(&format!(
                        "deleted topic {} on {}: {} queues, {} group offsets removed",
                        d.topic, d.broker_name, d.queues, d.offsets_removed
                    ))?,
                    crate::output::OutputFormat::Json => printer.json(&json!({
                        "topic": d.topic,
                        "broker": d.broker_name,
                        "queues": d.queues,
                        "offsets_removed": d.offsets_removed,
                        "deleted_below": d.deleted_below,
                    }))?,
                }
            }
            // Failed between the check and the delete: name them.
            let names: Vec<String> = failed.iter().map(|(b, _, _)| b.clone()).collect();
            for (b, addr, e) in failed {
                let error = crate::output::error_text(&e.into());
                stderr!(
                    "warning: topic {topic} not confirmed deleted on broker {b} ({addr}): {error}"
                );
            }
            admin.close().await.ok();
            if !names.is_empty() {
                return Err(crate::exit::with_code(
                    crate::exit::PARTIAL,
                    format!(
                        "topic {topic} not confirmed deleted on {} broker(s): {}",
                        names.len(),
                        names.join(", ")
                    ),
                ));
            }
            return Ok(());
        }
        TopicCommand::Status { topic, broker } => {
            // The brokers that answer are shown; one that does not is named
            // (exit 3), as the group commands do.
            let answers = match admin
                .topic_status_by_broker(&topic, broker.as_deref())
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    admin.close().await.ok();
                    return Err(e.into());
                }
            };
            let (mut status, mut failed, mut unknown) = (Vec::new(), Vec::new(), None);
            for a in answers {
                match a.result {
                    Ok(s) => status.push(s),
                    Err(e) if e.code() == Some(txmq::ErrorCode::UnknownTopic) => {
                        unknown.get_or_insert(e);
                    }
                    Err(e) => failed.push((a.broker_name, a.addr, e)),
                }
            }
            if status.is_empty() {
                admin.close().await.ok();
                // No broker has it, or none that has it answered.
                return Err(match (failed.into_iter().next(), unknown) {
                    (Some((_, _, e)), _) | (None, Some(e)) => e.into(),
                    (None, None) => anyhow::anyhow!("no broker is registered with the nameservers"),
                });
            }
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            for s in &status {
                for q in &s.queues {
                    let last = q.last_store_ms.map(crate::output::time_text);
                    rows.push(vec![
                        s.broker_name.clone(),
                        q.queue.to_string(),
                        q.min_offset.to_string(),
                        q.max_offset.to_string(),
                        last.clone().unwrap_or_else(|| "-".into()),
                    ]);
                    objects.push(json!({
                        "topic": s.topic,
                        "broker": s.broker_name,
                        "queue": q.queue,
                        "min_offset": q.min_offset,
                        "max_offset": q.max_offset,
                        "last_store_ms": q.last_store_ms,
                        "last_store_time": last,
                    }));
                }
            }
            printer.records(
                &["BROKER", "QUEUE", "MIN OFFSET", "MAX OFFSET", "LAST STORED"],
                &rows,
                &objects,
            )?;
            let missing = crate::group::Missing(
                failed
                    .into_iter()
                    .map(|(b, addr, e)| (b, addr, crate::output::error_text(&e.into())))
                    .collect(),
            );
            let partly = missing.finish(&printer, status.len(), "get the status of the topic from");
            admin.close().await.ok();
            return partly;
        }
        TopicCommand::Route { topic } => {
            let route = admin.route(&topic).await?;
            let (rows, objects) = route_records(&route);
            printer.records(
                &["BROKER", "ADDR", "SLAVES", "QUEUES", "PERM"],
                &rows,
                &objects,
            )?;
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// A route's broker groups as table rows and JSON objects: the master's
/// address (`-` in text, `""` in JSON, when no master of the group is
/// live) and the live slaves.
fn route_records(route: &txmq::TopicRoute) -> (Vec<Vec<String>>, Vec<serde_json::Value>) {
    let rows = route
        .brokers
        .iter()
        .map(|b| {
            vec![
                b.broker_name.clone(),
                if b.addr.is_empty() {
                    "-".to_string()
                } else {
                    b.addr.clone()
                },
                if b.slaves.is_empty() {
                    "-".to_string()
                } else {
                    b.slaves.join(",")
                },
                b.queues.to_string(),
                perm_name(b.perm).to_string(),
            ]
        })
        .collect();
    let objects = route
        .brokers
        .iter()
        .map(|b| {
            json!({
                "topic": route.topic,
                "broker": b.broker_name,
                "addr": b.addr,
                "slaves": b.slaves,
                "queues": b.queues,
                "perm": perm_name(b.perm),
            })
        })
        .collect();
    (rows, objects)
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn a_route_shows_each_groups_master_and_slaves() {
        let route = txmq::TopicRoute {
            topic: "orders".into(),
            brokers: vec![
                txmq::BrokerQueues {
                    epoch: Default::default(),
                    broker_name: "broker-a".into(),
                    addr: "h:10911".into(),
                    slaves: vec!["h:10921".into(), "h:10931".into()],
                    queues: 4,
                    perm: txmq::PERM_READ_WRITE,
                },
                txmq::BrokerQueues {
                    epoch: Default::default(),
                    broker_name: "broker-b".into(),
                    addr: String::new(),
                    slaves: vec!["h:20921".into()],
                    queues: 4,
                    perm: txmq::PERM_READ_WRITE,
                },
            ],
        };
        let (rows, objects) = route_records(&route);
        assert_eq!(rows[0][1..3], ["h:10911", "h:10921,h:10931"]);
        assert_eq!(rows[1][1..3], ["-", "h:20921"]);
        assert_eq!(objects[1]["addr"], "");
        assert_eq!(objects[1]["slaves"], json!(["h:20921"]));
    }
}
