//! `txmq msg show|find|get`: find a message by id, by key, or by queue
//! offset, and say where it is, what became of it and who consumed it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Map, Value};
use txmq::admin::BrokerAnswer;
use txmq::{Admin, FoundMessage, FoundMessages, MsgId};

use crate::args::GlobalArgs;
use crate::exit;
use crate::output::{body_field, error_text, one_line, time_text, OutputFormat, Printer};

/// `txmq msg ...`
#[derive(Debug, Subcommand)]
pub enum MsgCommand {
    /// Show a message by its id, on whichever broker holds it: where it is
    /// stored, its key, tag, properties and body, its transaction state,
    /// and whether each consumer group of its topic consumed it (needs
    /// admin).
    Show {
        /// The message id: 32 hexadecimal digits, as `txmq send` prints it
        /// (or 01 and those digits, as a RocketMQ 5 client prints it).
        #[arg(value_parser = parse_msg_id)]
        msg_id: MsgId,
    },
    /// Find the messages of a topic with a key (newest first).
    Find {
        /// The topic.
        #[arg(long, env = "TXMQ_TOPIC")]
        topic: String,
        /// The key (one word: a message sent with the key "a b" is found
        /// by "a" and by "b").
        #[arg(long, value_parser = parse_key_word)]
        key: String,
        /// Only messages stored at or after this time: RFC 3339
        /// (2026-01-31T12:00:00Z), milliseconds since the Unix epoch, or
        /// a duration ago (10m).
        #[arg(long, value_parser = parse_time)]
        since: Option<u64>,
        /// Only messages stored at or before this time (as --since).
        #[arg(long, value_parser = parse_time)]
        until: Option<u64>,
        /// At most this many from each broker (1 to 1024).
        #[arg(long, default_value_t = txmq::admin::DEFAULT_FIND_MAX, value_parser = clap::value_parser!(u32).range(1..=1024))]
        max: u32,
    },
    /// Read messages of a queue from an offset, without a consumer group
    /// (nothing is committed).
    Get {
        /// The topic.
        #[arg(long, env = "TXMQ_TOPIC")]
        topic: String,
        /// The queue id.
        #[arg(long)]
        queue: u32,
        /// The first queue offset.
        #[arg(long)]
        offset: u64,
        /// How many messages (1 to 1024).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_GET_COUNT)))]
        count: u32,
    },
}

/// The most messages `msg get --count` reads (the broker's lookup
/// maximum, `LOOKUP_MAX` of the protocol); the dashboard's lookup by
/// offset takes as many.
pub(crate) const MAX_GET_COUNT: u32 = 1024;

/// A key to find: one word, as the index holds a message's keys.
fn parse_key_word(s: &str) -> Result<String, String> {
    // Words are separated by spaces only, as the broker indexes them (a
    // key with a tab in a word was found by nothing).
    if s.is_empty() || s.contains(' ') {
        return Err("a key to find is one non-empty word (a message's key may hold several, separated by spaces)".into());
    }
    Ok(s.to_string())
}

pub(crate) fn parse_msg_id(s: &str) -> Result<MsgId, String> {
    MsgId::parse(&s.to_ascii_uppercase())
        .ok_or_else(|| format!("'{s}' is not a message id (32 hexadecimal digits, or 01 and 32 digits from a RocketMQ client)"))
}

/// An RFC 3339 time, in UTC (`Z`) or with an offset (`+01:00`, `-05:00`).
fn rfc3339_with_offset(s: &str) -> Option<SystemTime> {
    // humantime reads UTC only (and may skip what follows a fraction):
    // read the local time as UTC, then move it by the offset (local = UTC
    // + offset).
    let Some((local, offset)) = s
        .len()
        .checked_sub(6)
        .and_then(|at| s.split_at_checked(at))
        .filter(|(_, o)| o.starts_with(['+', '-']))
    else {
        return humantime::parse_rfc3339_weak(s).ok();
    };
    let (sign, hh, mm) = match offset.as_bytes() {
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<u64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| u64::from((a - b'0') * 10 + (b - b'0')))
            };
            (*sign, two(*h1, *h2)?, two(*m1, *m2)?)
        }
        _ => return humantime::parse_rfc3339_weak(s).ok(),
    };
    if hh > 23 || mm > 59 || !local.contains('T') && !local.contains(' ') {
        return None;
    }
    let utc = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
    let shift = Duration::from_secs((hh * 60 + mm) * 60);
    if sign == b'+' {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    }
}

/// RFC 3339, ms since the epoch, or a duration ago; as ms since the epoch.
pub(crate) fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let at = match rfc3339_with_offset(s) {
        Some(t) => t,
        None => {
            let ago = humantime::parse_duration(s).map_err(|_| {
                format!(
                    "'{s}' is not a time: give RFC 3339 (2026-01-31T12:00:00Z), milliseconds since the Unix epoch, or a duration ago (10m)"
                )
            })?;
            SystemTime::now()
                .checked_sub(ago)
                .ok_or_else(|| format!("'{s}' ago is before the Unix epoch"))?
        }
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("'{s}' is before the Unix epoch"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("'{s}' is too far ahead"))
}

/// Runs a msg subcommand.
///
/// # Errors
/// Nothing found (exit 1), an unknown topic, an offset outside the queue,
/// brokers that could not be asked (exit 3 when others answered).
pub async fn run(global: &GlobalArgs, cmd: MsgCommand) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let printer = Printer::stdout(global.output);
    let result = match cmd {
        MsgCommand::Show { msg_id } => {
            let answers = admin.message_by_id(msg_id).await?;
            print_found(&printer, answers, true, || {
                format!("no message with id {msg_id}")
            })
        }
        MsgCommand::Find {
            topic,
            key,
            since,
            until,
            max,
        } => {
            if let (Some(s), Some(u)) = (since, until) {
                if s > u {
                    return Err(exit::usage(
                        "--since is after --until: the time range is empty",
                    ));
                }
            }
            let answers = admin
                .messages_by_key_max(&topic, &key, since, until, max)
                .await?;
            print_found(&printer, answers, false, || {
                let mut s = format!("no message of topic '{topic}' with key '{key}'");
                if since.is_some() || until.is_some() {
                    s.push_str(&format!(
                        " stored between {} and {}",
                        since.map_or("the start".into(), time_text),
                        until.map_or("now".into(), time_text)
                    ));
                }
                s
            })
        }
        MsgCommand::Get {
            topic,
            queue,
            offset,
            count,
        } => {
            let answers = admin.messages_at(&topic, queue, offset, count).await?;
            if answers.is_empty() {
                return Err(exit::with_code(
                    exit::FAILURE,
                    format!("topic '{topic}' has no queue {queue} on any broker"),
                ));
            }
            print_found(&printer, answers, false, || {
                format!("no message at offset {offset} of queue {queue} of '{topic}'")
            })
        }
    };
    admin.close().await.ok();
    result
}

/// Prints every message found; exit 1 when none was found (with the
/// brokers' refusals, if any), 3 when some brokers did not answer.
fn print_found(
    printer: &Printer,
    answers: Vec<BrokerAnswer<FoundMessages>>,
    detailed: bool,
    none: impl FnOnce() -> String,
) -> Result<()> {
    let mut found: Vec<(String, FoundMessage)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    // Brokers that answered (with messages or none), and those that did
    // not look: not asked at all, or refused the request (ACCESS_DENIED
    // for a user who may not look, a bad argument): neither says that the
    // message is not there.
    let (mut answered, mut unasked) = (0, 0);
    // Some of those refused the user (ACCESS_DENIED), or answered another
    // error (as opposed to not answering at all).
    let (mut refused, mut erred) = (false, false);
    // Brokers that hold nothing at that offset (a topic on several brokers
    // has its messages on some): an answer, shown only when nothing was.
    let mut out_of_range: Vec<String> = Vec::new();
    // Brokers without a message index: they cannot say (a note when the
    // message was found elsewhere).
    let mut no_index: Vec<String> = Vec::new();
    for a in answers {
        match a.result {
            Ok(r) => {
                answered += 1;
                found.extend(r.messages.into_iter().map(|m| (r.broker_name.clone(), m)));
            }
            Err(e) if e.code() == Some(txmq::ErrorCode::OffsetOutOfRange) => {
                answered += 1;
                out_of_range.push(format!("{}: {}", a.broker_name, error_text(&e.into())));
            }
            Err(e) if e.code() == Some(txmq::ErrorCode::UnsupportedRequest) => {
                no_index.push(format!("{}: {}", a.broker_name, error_text(&e.into())));
            }
            Err(e) => {
                unasked += 1;
                refused |= matches!(
                    e.code(),
                    Some(txmq::ErrorCode::AccessDenied | txmq::ErrorCode::AuthenticationFailed)
                );
                erred |= e.wire_error().is_some();
                failed.push(format!("{}: {}", a.broker_name, error_text(&e.into())));
            }
        }
    }
    // Could not say, as a broker that did not answer; but it did answer.
    let cannot_say = !no_index.is_empty();
    if found.is_empty() {
        unasked += no_index.len();
        failed.append(&mut no_index);
    }
    if found.is_empty() {
        if answered == 0 && unasked > 0 {
            // Nothing says the message is not there: say what failed.
            let (code, what) = match (cannot_say, refused, erred) {
                (true, ..) => (exit::PARTIAL, "could not say"),
                // A refusal is an error of the command's (exit 1).
                (false, true, _) => (exit::FAILURE, "refused"),
                (false, false, true) => (exit::FAILURE, "could not say"),
                (false, false, false) => (exit::FAILURE, "did not answer"),
            };
            return Err(exit::with_code(
                code,
                format!(
                    "could not look for it: {} broker(s) {what}: {}",
                    failed.len(),
                    failed.join("; ")
                ),
            ));
        }
        if answered > 0 && unasked > 0 {
            // Not on the brokers that answered; the others could not say.
            return Err(exit::with_code(
                exit::PARTIAL,
                format!(
                    "{} on the brokers that answered; {} broker(s) could not say: {}",
                    none(),
                    failed.len(),
                    failed.join("; ")
                ),
            ));
        }
        failed.extend(out_of_range);
        let text = match failed.is_empty() {
            true => none(),
            false => format!("{}; {}", none(), failed.join("; ")),
        };
        // A broker without an index leaves the answer open.
        let code = if cannot_say {
            exit::PARTIAL
        } else {
            exit::FAILURE
        };
        return Err(exit::with_code(code, text));
    }
    match (printer.format, detailed) {
        (OutputFormat::Json, _) => {
            for (broker, m) in &found {
                printer.json(&message_json(broker, m, detailed))?;
            }
        }
        (OutputFormat::Text, true) => {
            for (i, (broker, m)) in found.iter().enumerate() {
                if i > 0 {
                    printer.line("")?;
                }
                for line in detail_lines(broker, m) {
                    printer.line(&line)?;
                }
            }
        }
        (OutputFormat::Text, false) => {
            let rows: Vec<Vec<String>> = found.iter().map(|(b, m)| row(b, m)).collect();
            let header = [
                "BROKER", "QUEUE", "OFFSET", "STORED", "STATE", "MSG_ID", "KEY", "TAG", "BODY",
            ];
            for line in crate::output::table(&header, &rows) {
                printer.line(&line)?;
            }
        }
    }
    for n in &no_index {
        stderr!("note: not looked up on {n}");
    }
    if !failed.is_empty() {
        let what = if erred {
            "could not say"
        } else {
            "did not answer"
        };
        return Err(exit::with_code(
            exit::PARTIAL,
            format!("{} broker(s) {what}: {}", failed.len(), failed.join("; ")),
        ));
    }
    Ok(())
}

fn offset_text(m: &FoundMessage) -> String {
    m.queue_offset.map_or("-".into(), |o| o.to_string())
}

/// A body on one line: UTF-8 with control characters escaped, else base64
/// (`(base64) //4AYWJj`). The dashboard shows bodies the same way.
pub(crate) fn body_line(body: &[u8]) -> String {
    match body_field(body) {
        ("body", text) => one_line(&text),
        (_, b64) => format!("(base64) {b64}"),
    }
}

fn row(broker: &str, m: &FoundMessage) -> Vec<String> {
    let mut body = body_line(&m.message.body);
    if body.chars().count() > 40 {
        body = body.chars().take(37).collect::<String>() + "...";
    }
    vec![
        broker.to_string(),
        m.queue.to_string(),
        offset_text(m),
        time_text(m.store_timestamp),
        m.state.name().to_string(),
        m.message.msg_id.to_string(),
        m.message.key.as_deref().map_or("-".into(), one_line),
        m.message.tag.as_deref().map_or("-".into(), one_line),
        body,
    ]
}

fn detail_lines(broker: &str, m: &FoundMessage) -> Vec<String> {
    let mut out = vec![
        format!("msg_id:      {}", m.message.msg_id),
        format!("broker:      {broker}"),
        format!("topic:       {}", m.message.topic),
        format!("queue:       {}", m.queue),
        format!("offset:      {}", offset_text(m)),
        format!("log_offset:  {}", m.log_offset),
        format!(
            "stored:      {} ({} ms)",
            time_text(m.store_timestamp),
            m.store_timestamp
        ),
        format!("size:        {} bytes", m.size),
        format!(
            "key:         {}",
            m.message.key.as_deref().map_or("-".into(), one_line)
        ),
        format!(
            "tag:         {}",
            m.message.tag.as_deref().map_or("-".into(), one_line)
        ),
    ];
    let state = match m.tx_id {
        Some(tx) => format!("state:       {} (transaction {tx})", m.state.name()),
        None => format!("state:       {}", m.state.name()),
    };
    out.push(state);
    if m.message.properties.is_empty() {
        out.push("properties:  -".into());
    } else {
        let props: Vec<String> = m
            .message
            .properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push(format!("properties:  {}", props.join(", ")));
    }
    out.push(format!("body:        {}", body_line(&m.message.body)));
    if m.queue_offset.is_none() {
        out.push("consumed_by: - (not in a queue)".into());
    } else if m.groups.is_empty() {
        out.push("consumed_by: - (no consumer group has an offset on its topic)".into());
    } else {
        for (i, g) in m.groups.iter().enumerate() {
            let label = if i == 0 {
                "consumed_by:"
            } else {
                "            "
            };
            let committed = g.committed_offset.map_or("none".into(), |o| o.to_string());
            out.push(format!(
                "{label} {} {} (committed offset {committed})",
                g.group,
                if g.consumed { "yes" } else { "no" }
            ));
        }
    }
    out
}

fn message_json(broker: &str, m: &FoundMessage, detailed: bool) -> Value {
    let mut o = Map::new();
    o.insert("msg_id".into(), json!(m.message.msg_id.to_string()));
    o.insert("broker".into(), json!(broker));
    o.insert("topic".into(), json!(m.message.topic));
    o.insert("queue".into(), json!(m.queue));
    o.insert("queue_offset".into(), json!(m.queue_offset));
    o.insert("log_offset".into(), json!(m.log_offset));
    o.insert("store_timestamp".into(), json!(m.store_timestamp));
    o.insert("store_time".into(), json!(time_text(m.store_timestamp)));
    o.insert("born_timestamp".into(), json!(m.message.born_timestamp));
    o.insert("size".into(), json!(m.size));
    o.insert("key".into(), json!(m.message.key));
    let keys: Vec<&str> = m
        .message
        .key
        .as_deref()
        .map(|k| k.split(' ').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    o.insert("keys".into(), json!(keys));
    o.insert("tag".into(), json!(m.message.tag));
    o.insert("properties".into(), json!(m.message.properties));
    let (name, body) = body_field(&m.message.body);
    o.insert(name.into(), json!(body));
    o.insert("state".into(), json!(m.state.name()));
    o.insert("tx_id".into(), json!(m.tx_id));
    if detailed {
        let groups: Vec<Value> = m
            .groups
            .iter()
            .map(|g| {
                json!({
                    "group": g.group,
                    "committed_offset": g.committed_offset,
                    "consumed": g.consumed,
                })
            })
            .collect();
        o.insert("consumed_by".into(), Value::Array(groups));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_an_offset_are_the_instant_they_name() {
        let utc = parse_time("2026-12-06T14:00:00Z").unwrap();
        assert_eq!(parse_time("2026-12-06T15:00:00+01:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T09:00:00-05:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T14:00:00+00:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T19:30:00+05:30"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T15:00:00.250+01:00"), Ok(utc + 250));
        for bad in [
            "2026-12-06T15:00:00+25:00",
            "2026-12-06T15:00:00+1:00",
            "2026-12-06T15:00:00+01:60",
            "+01:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
