//! `txmq group list|show|reset-offset` and `txmq dlq list`.
//!
//! The group commands ask every broker at once and answer with what the
//! brokers that respond know: a broker that is down, paused or refusing
//! is named (a warning on stderr; with `--output json`, a last line
//! `{"unreachable": [names], "errors": {name: error}}` for list and show,
//! an object with `error` per broker for reset-offset), and the command
//! exits 3 when some brokers answered and 1 when none did.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use serde_json::json;
use txmq::admin::{BrokerAnswer, GroupState};
use txmq::{dlq_topic, Admin, OffsetTarget};

use crate::args::GlobalArgs;
use crate::exit;
use crate::output::{error_text, received_json, received_text, OutputFormat, Printer};

/// `txmq group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List the consumer groups the brokers know (live members or committed offsets).
    List,
    /// Show a group: members, which member owns each queue, committed
    /// offset and lag per queue.
    Show {
        /// The group.
        #[arg(value_parser = crate::args::parse_group)]
        group: String,
    },
    /// Move a group's committed offsets of a topic (stop its consumers first).
    ResetOffset {
        /// The group.
        #[arg(value_parser = crate::args::parse_group)]
        group: String,
        /// The topic whose offsets move.
        #[arg(long, env = "TXMQ_TOPIC")]
        topic: String,
        /// `first` (the first stored message), `last` (after the last one),
        /// or a time: milliseconds since the Unix epoch, RFC 3339
        /// (`2026-11-21T10:00:00Z`) or a duration ago (`10m`); the first
        /// message stored at or after it.
        #[arg(long, value_name = "first|last|TIMESTAMP", value_parser = parse_target)]
        to: OffsetTarget,
    },
}

/// `txmq dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the messages in a group's dead-letter topic (`%DLQ%<group>`),
    /// without consuming them.
    List {
        /// The group.
        #[arg(value_parser = crate::args::parse_group)]
        group: String,
        /// Show at most this many (in all, across brokers).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Re-send dead letters of a group to their original topic (or --to
    /// another), with the reconsume count reset. Each one re-sent is
    /// recorded by its broker: --all again re-sends nothing new, and a
    /// --msg-id re-sent before is refused unless --force. Exits 1 when
    /// nothing was re-sent.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["msg_id", "all"])))]
    Resend {
        /// The group.
        #[arg(value_parser = crate::args::parse_group)]
        group: String,
        /// The dead letter to re-send (its message id; repeat for several).
        #[arg(long = "msg-id", value_name = "MSG_ID", value_parser = parse_msg_id)]
        msg_id: Vec<txmq::MsgId>,
        /// Every dead letter not re-sent before.
        #[arg(long)]
        all: bool,
        /// Send to this topic instead of each letter's original one.
        #[arg(long, value_name = "TOPIC")]
        to: Option<String>,
        /// Re-send a --msg-id even when it was re-sent before.
        #[arg(long, requires = "msg_id")]
        force: bool,
        /// Only on this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
    },
}

fn parse_msg_id(s: &str) -> Result<txmq::MsgId> {
    txmq::MsgId::parse(s).ok_or_else(|| anyhow!("{s:?} is not a message id (32 hex digits)"))
}

fn parse_target(s: &str) -> std::result::Result<OffsetTarget, String> {
    match s {
        "first" => Ok(OffsetTarget::First),
        "last" => Ok(OffsetTarget::Last),
        _ => crate::msg::parse_time(s)
            .map(OffsetTarget::Timestamp)
            .map_err(|e| format!("{e}; or first, or last")),
    }
}

/// Runs a group subcommand.
///
/// # Errors
/// When no nameserver or broker answers, or one refuses.
pub async fn run(global: &GlobalArgs, cmd: GroupCommand) -> Result<()> {
    let printer = Printer::stdout(global.output);
    let admin = Admin::with_config(global.client_config()?).await?;
    match cmd {
        GroupCommand::List => {
            let answers = admin.list_groups_by_broker(None).await?;
            let (lists, missing) = split(answers)?;
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
            missing.finish(&printer, lists.len(), "list the groups of")
        }
        GroupCommand::Show { group } => {
            let answers = admin.group_state_by_broker(&group, None).await?;
            let (states, missing) = split(answers)?;
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
                                "waiting_ms": q.waiting_ms,
                            })).collect::<Vec<_>>(),
                        }))?;
                    }
                }
                OutputFormat::Text => show_text(&printer, &group, &states)?,
            }
            if let Some(members) = differing_subscriptions(&states) {
                stderr!(
                    "warning: the members of group \"{group}\" subscribe differently ({}): they share the group's queues, so each is handed messages it did not subscribe to and skips them; give every member the same subscriptions, or use a group per subscription",
                    members.join("; ")
                );
            }
            if unknown_group(&states) {
                // A mistyped name looks like this too: say so.
                stderr!(
                    "note: no broker knows group \"{group}\": no member and no committed offset (`txmq group list` lists the groups)"
                );
            }
            missing.finish(&printer, states.len(), "show the group on")
        }
        GroupCommand::ResetOffset { group, topic, to } => {
            // Offsets are made for a group no broker knows (as RocketMQ's
            // reset does, for a group not started yet): a mistyped name
            // looks like that, so say so.
            let unknown = admin
                .group_state_by_broker(&group, None)
                .await
                .is_ok_and(|answers| {
                    split(answers).is_ok_and(|(states, _)| unknown_group(&states))
                });
            let answers = admin
                .reset_offsets_by_broker(&group, &topic, to, None)
                .await?;
            let mut rows = Vec::new();
            let mut objects = Vec::new();
            let (mut done, mut failed) = (Vec::new(), Vec::new());
            for a in answers {
                match a.result {
                    Ok(r) => {
                        done.push(a.broker_name);
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
                    Err(e) => {
                        let error = error_text(&e.into());
                        objects.push(json!({
                            "group": group,
                            "topic": topic,
                            "broker": a.broker_name,
                            "addr": a.addr,
                            "error": error,
                        }));
                        failed.push((a.broker_name, error));
                    }
                }
            }
            // No queue moved (all refused): no empty table above the error.
            if !rows.is_empty() || printer.format == OutputFormat::Json {
                printer.records(&["BROKER", "QUEUE", "OFFSET"], &rows, &objects)?;
            }
            if unknown && !done.is_empty() {
                stderr!(
                    "note: no broker knew group \"{group}\" (no member, no committed offset): its offsets were set now, for when it starts (`txmq group list` lists the groups)"
                );
            }
            if !done.is_empty() && !failed.is_empty() {
                for (broker, error) in &failed {
                    stderr!("error: offsets not reset on broker {broker}: {error}");
                }
                stderr!("offsets reset on broker(s) {}", done.join(", "));
            }
            match (failed.len(), done.len()) {
                (0, _) => Ok(()),
                (_, 0) => Err(exit::with_code(
                    exit::FAILURE,
                    format!(
                        "offsets not reset on any broker: {}",
                        failed
                            .iter()
                            .map(|(b, e)| format!("{b}: {e}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                )),
                (n, _) => Err(exit::with_code(
                    exit::PARTIAL,
                    format!(
                        "offsets reset on {} broker(s) but not on {n}: {}",
                        done.len(),
                        failed
                            .iter()
                            .map(|(b, _)| b.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
    }
}

/// The brokers that did not answer, with why.
pub(crate) struct Missing(pub(crate) Vec<(String, String, String)>);

impl Missing {
    /// Names the brokers that did not answer: a warning each on stderr
    /// and, in JSON, one last line; then the command's result: an exit
    /// code 3 when others answered (`answered`), 1 when none did.
    pub(crate) fn finish(&self, printer: &Printer, answered: usize, what: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        for (broker, addr, error) in &self.0 {
            stderr!("warning: cannot {what} broker {broker} ({addr}): {error}");
        }
        let names: Vec<&str> = self.0.iter().map(|m| m.0.as_str()).collect();
        if printer.format == OutputFormat::Json {
            let errors: serde_json::Map<String, serde_json::Value> = self
                .0
                .iter()
                .map(|(b, _, e)| (b.clone(), json!(e)))
                .collect();
            printer.json(&json!({"unreachable": names, "errors": errors}))?;
        }
        let (code, shown) = if answered > 0 {
            (exit::PARTIAL, "the answer above leaves them out")
        } else {
            (exit::FAILURE, "no broker answered")
        };
        Err(exit::with_code(
            code,
            format!(
                "{} broker(s) did not answer: {} ({shown})",
                names.len(),
                names.join(", ")
            ),
        ))
    }
}

/// Whether brokers answered and none of them knows the group: no
/// member, no committed offset.
fn unknown_group(states: &[GroupState]) -> bool {
    !states.is_empty()
        && states
            .iter()
            .all(|s| s.members.is_empty() && s.queues.is_empty())
}

/// The members of a clustering group that subscribe differently (each
/// with its subscriptions), when they do: they divide every queue of the
/// group's topics among them, so a member is handed messages of a topic
/// or tag it did not ask for, and skips them.
fn differing_subscriptions(states: &[GroupState]) -> Option<Vec<String>> {
    let mut seen = std::collections::BTreeMap::new();
    for m in states
        .iter()
        .flat_map(|s| &s.members)
        .filter(|m| !m.broadcast)
    {
        let mut subs: Vec<String> = m
            .subscriptions
            .iter()
            .filter(|s| !s.topic.starts_with(txmq::RETRY_TOPIC_PREFIX))
            .map(|s| {
                // `b || a` selects what `a||b` does.
                let tags = match txmq::parse_tag_expression(&s.expression) {
                    Ok(Some(mut tags)) => {
                        tags.sort();
                        tags.dedup();
                        tags.join(" || ")
                    }
                    Ok(None) => "*".to_string(),
                    Err(_) => s.expression.clone(),
                };
                format!("{} ({tags})", s.topic)
            })
            .collect();
        subs.sort();
        seen.insert(m.client_id.clone(), subs.join(", "));
    }
    let mut kinds: Vec<&String> = seen.values().collect();
    kinds.sort();
    kinds.dedup();
    (kinds.len() > 1).then(|| {
        seen.into_iter()
            .map(|(id, subs)| format!("{id}: {subs}"))
            .collect()
    })
}

/// The answers, and the brokers that did not give one.
///
/// # Errors
/// The first refusal when every broker refused (`ACCESS_DENIED`, say):
/// as it is, rather than as brokers that did not answer.
pub(crate) fn split<T>(mut answers: Vec<BrokerAnswer<T>>) -> Result<(Vec<T>, Missing)> {
    if !answers.is_empty() && answers.iter().all(|a| refused(&a.result)) {
        if let Err(e) = answers.swap_remove(0).result {
            return Err(e.into());
        }
    }
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    for a in answers {
        match a.result {
            Ok(v) => ok.push(v),
            Err(e) => missing.push((a.broker_name, a.addr, error_text(&e.into()))),
        }
    }
    Ok((ok, Missing(missing)))
}

/// Whether a broker answered with an error (it was reached).
fn refused<T>(result: &txmq::Result<T>) -> bool {
    result.as_ref().is_err_and(|e| e.wire_error().is_some())
}

/// `group show` as text: the members, then each queue's owner, committed
/// offset and lag.
fn show_text(printer: &Printer, group: &str, states: &[txmq::admin::GroupState]) -> Result<()> {
    let mut members = std::collections::BTreeMap::new();
    for s in states {
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
    for l in crate::output::table(&["MEMBER", "ADDR", "MODE", "SUBSCRIPTIONS"], &rows) {
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
                    owner_shown(q, "-"),
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
    if states
        .iter()
        .flat_map(|s| &s.queues)
        .any(|q| q.waiting_ms.is_some())
    {
        printer.line("")?;
        printer.line(WAITING_NOTE)?;
    }
    Ok(())
}

/// What a queue that waits for a lost reader means, under `group show`.
const WAITING_NOTE: &str = "a queue that \"waits\" has no owner now but may still be read by a member the broker lost track of (the broker restarted, or the member's connection closed): it goes to another member once that time is up (--consumer-expiry), unless its reader comes back for it first";

/// A queue's owner as `group show` and the console show it: the member,
/// or `none` and, while it waits for a reader the broker lost track of,
/// for how much longer.
pub(crate) fn owner_shown(q: &txmq::admin::GroupQueue, none: &str) -> String {
    match (&q.owner, q.waiting_ms) {
        (Some(owner), _) => owner.clone(),
        (None, Some(ms)) => format!("{none} (waits {}s)", ms.div_ceil(1000)),
        (None, None) => none.to_string(),
    }
}

/// Runs a dlq subcommand.
///
/// # Errors
/// When no nameserver or broker answers (exit code 3 when only some
/// brokers did: their letters are printed); a group with no dead letters
/// prints nothing.
pub async fn run_dlq(global: &GlobalArgs, cmd: DlqCommand) -> Result<()> {
    let printer = Printer::stdout(global.output);
    let admin = Admin::with_config(global.client_config()?).await?;
    let (group, limit) = match cmd {
        DlqCommand::List { group, limit } => (group, limit),
        DlqCommand::Resend {
            group,
            msg_id,
            all,
            to,
            force,
            broker,
        } => {
            let request = txmq::ResendDeadLetters {
                group,
                msg_ids: msg_id,
                all,
                to,
                force,
            };
            let done = resend(&admin, &printer, request, broker.as_deref()).await;
            admin.close().await.ok();
            return done;
        }
    };
    let limit = limit as usize;
    // One more than shown, to know whether there are more.
    let answers = match admin.browse_by_broker(&dlq_topic(&group), limit + 1).await {
        Ok(a) => a,
        // No dead-letter topic: none yet, unless no broker is there to say.
        Err(txmq::Error::NoRoute { .. }) if admin.cluster().await?.is_empty() => {
            return Err(anyhow::anyhow!(
                "no broker is registered with the nameservers: cannot tell whether group '{group}' has dead letters"
            ));
        }
        Err(txmq::Error::NoRoute { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let (read, missing) = split(answers)?;
    let answered = read.len();
    let mut messages: Vec<_> = read.into_iter().flatten().collect();
    let more = messages.len() > limit;
    messages.truncate(limit);
    if messages.is_empty() && missing.0.is_empty() {
        // As `group show` of an unknown group: an empty answer says why.
        stderr!(
            "note: group {group} has no dead letters ({} is empty or was never made)",
            dlq_topic(&group)
        );
    }
    for m in &messages {
        match printer.format {
            OutputFormat::Text => printer.line(&received_text(m))?,
            OutputFormat::Json => printer.json(&received_json(m))?,
        }
    }
    if more {
        stderr!("note: the first {limit} dead letters are shown (--limit, across brokers); there are more");
    }
    missing.finish(&printer, answered, "read the dead letters on")
}

/// `txmq dlq resend`: one line (object) per letter re-sent, then a summary.
async fn resend(
    admin: &Admin,
    printer: &Printer,
    request: txmq::ResendDeadLetters,
    broker: Option<&str>,
) -> Result<()> {
    let group = request.group.clone();
    let force = request.force;
    // What the brokers that answered re-sent is reported, whatever became
    // of the others (a letter re-sent unreported looked never re-sent, and
    // the hint to force it stored it twice).
    let mut answers = admin.resend_dead_letters_by_broker(request, broker).await?;
    if answers.iter().all(|a| a.result.is_err()) && !answers.is_empty() {
        // None answered: the first one's refusal or failure, as it is.
        if let Err(e) = answers.swap_remove(0).result {
            return Err(e.into());
        }
    }
    let (answers, missing) = split(answers)?;
    let mut resent = 0;
    let mut already = Vec::new();
    let mut not_found: Vec<txmq::MsgId> = Vec::new();
    let mut dead = 0;
    let mut left = 0;
    for a in &answers {
        dead += a.dead_letters;
        for r in &a.resent {
            resent += 1;
            match printer.format {
                OutputFormat::Text => printer.line(&format!(
                    "resent {} from {} on {} to {} q={} offset={}",
                    r.msg_id,
                    dlq_topic(&group),
                    a.broker_name,
                    r.topic,
                    r.queue,
                    r.queue_offset
                ))?,
                OutputFormat::Json => printer.json(&serde_json::json!({
                    "msg_id": r.msg_id.to_string(),
                    "broker": a.broker_name,
                    "topic": r.topic,
                    "queue": r.queue,
                    "queue_offset": r.queue_offset,
                }))?,
            }
        }
        already.extend(a.already.iter().copied());
        for (msg_id, why) in &a.left {
            left += 1;
            match printer.format {
                OutputFormat::Text => printer.line(&format!(
                    "left {msg_id} in {} on {}: {why}; re-send it with --msg-id {msg_id} --to TOPIC",
                    dlq_topic(&group),
                    a.broker_name
                ))?,
                OutputFormat::Json => printer.json(&serde_json::json!({
                    "msg_id": msg_id.to_string(),
                    "broker": a.broker_name,
                    "left": why,
                }))?,
            }
        }
    }
    // A named letter is missing only when no broker has it.
    for a in &answers {
        for id in &a.not_found {
            let elsewhere = answers
                .iter()
                .any(|o| o.resent.iter().any(|r| r.msg_id == *id) || o.already.contains(id));
            if !elsewhere && !not_found.contains(id) {
                not_found.push(*id);
            }
        }
    }
    let summary = format!(
        "{resent} dead letter{} of group {group} resent; {} resent before{}{}{}",
        if resent == 1 { "" } else { "s" },
        already.len(),
        if already.is_empty() || force {
            String::new()
        } else {
            " (skipped; --msg-id ID --force resends one again)".to_string()
        },
        if not_found.is_empty() {
            String::new()
        } else {
            format!(
                "; not in {}{}: {}",
                dlq_topic(&group),
                if missing.0.is_empty() {
                    ""
                } else {
                    " on the brokers that answered"
                },
                not_found
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if left == 0 {
            String::new()
        } else {
            format!("; {left} left in place (above)")
        }
    );
    if !answers.is_empty() {
        match printer.format {
            OutputFormat::Text => printer.line(&summary)?,
            OutputFormat::Json => printer.json(&serde_json::json!({
                "group": group,
                "resent": resent,
                "already_resent": already.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "not_found": not_found.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "left": left,
                "dead_letters": dead,
            }))?,
        }
    }
    missing.finish(printer, answers.len(), "resend the dead letters on")?;
    if dead == 0 {
        return Err(crate::exit::with_code(
            crate::exit::FAILURE,
            match broker {
                // Others may hold some: say where none is.
                Some(b) => format!(
                    "group {group} has no dead letters on broker {b} ({} is empty there): nothing to resend",
                    dlq_topic(&group)
                ),
                None => format!(
                    "group {group} has no dead letters ({} is empty): nothing to resend",
                    dlq_topic(&group)
                ),
            },
        ));
    }
    if resent == 0 {
        return Err(crate::exit::with_code(
            crate::exit::FAILURE,
            "nothing resent".to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq::admin::GroupState;
    use txmq_protocol::{MemberInfo, Subscription};

    fn member(id: &str, expression: &str) -> MemberInfo {
        MemberInfo {
            client_id: id.into(),
            addr: "127.0.0.1:1".into(),
            broadcast: false,
            subscriptions: vec![
                Subscription {
                    topic: "orders".into(),
                    expression: expression.into(),
                },
                Subscription {
                    topic: "%RETRY%g".into(),
                    expression: "*".into(),
                },
            ],
            last_heartbeat_ms_ago: 0,
        }
    }

    fn state(members: Vec<MemberInfo>) -> Vec<GroupState> {
        vec![GroupState {
            broker_name: "broker-a".into(),
            group: "g".into(),
            members,
            queues: vec![],
        }]
    }

    #[test]
    fn members_that_select_the_same_tags_subscribe_alike() {
        let same = state(vec![member("c1", "a||b"), member("c2", " b || a ")]);
        assert_eq!(differing_subscriptions(&same), None);
        let all = state(vec![member("c1", "*"), member("c2", "")]);
        assert_eq!(differing_subscriptions(&all), None);
        let differ = state(vec![member("c1", "a"), member("c2", "b")]);
        let d = differing_subscriptions(&differ).expect("they differ");
        assert_eq!(d, ["c1: orders (a)", "c2: orders (b)"]);
    }
}
