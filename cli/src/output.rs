//! How results are printed: readable text lines and tables, or one JSON
//! object per line for scripts.
//!
//! Every line is flushed as soon as it is written, so a reader of the
//! output (a script, a pipe) sees each acknowledgement or message the
//! moment it happens.

use std::io::Write;

use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use txmq::{Message, MsgId, ReceivedMessage, SendReceipt, WireMessage, PERM_READ, PERM_WRITE};

/// The `--output` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Readable lines and aligned tables.
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes lines to stdout, flushing each.
pub struct Printer {
    pub format: OutputFormat,
    out: std::io::Stdout,
}

impl Printer {
    /// A printer to stdout in `format`.
    pub fn stdout(format: OutputFormat) -> Printer {
        Printer {
            format,
            out: std::io::stdout(),
        }
    }

    /// Writes one line and flushes it.
    ///
    /// # Errors
    /// When stdout cannot be written (a closed pipe, say).
    pub fn line(&self, line: &str) -> std::io::Result<()> {
        let mut out = self.out.lock();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    }

    /// Writes one JSON object as a line.
    ///
    /// # Errors
    /// As [`Printer::line`].
    pub fn json(&self, value: &Value) -> std::io::Result<()> {
        self.line(&value.to_string())
    }

    /// Writes rows as a table with a header, columns aligned (text), or
    /// each object of `json` as a line (json).
    ///
    /// # Errors
    /// As [`Printer::line`].
    pub fn records(
        &self,
        header: &[&str],
        rows: &[Vec<String>],
        json: &[Value],
    ) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Text => table(header, rows).iter().try_for_each(|l| self.line(l)),
            OutputFormat::Json => json.iter().try_for_each(|v| self.json(v)),
        }
    }
}

/// Lines of a table whose columns are padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let format_row = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        line.trim_end().to_string()
    };
    let mut lines = vec![format_row(&mut header.iter().copied())];
    lines.extend(
        rows.iter()
            .map(|r| format_row(&mut r.iter().map(String::as_str))),
    );
    lines
}

/// An error with its causes, `outer: inner: innermost`, leaving out a
/// cause whose text the previous one already shows (a wire error is both
/// shown and kept as the source by the remoting layer). A client-side
/// error that stands for a wire code (no route, a bad argument) shows the
/// code too, as a broker's refusal would.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || previous.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        if let Some(code) = client_side_code(cause) {
            out.push_str(&format!("{} ({}): ", code.name(), code as u16));
        }
        out.push_str(&text);
        previous = text;
    }
    printable(&out)
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): a
/// message may quote what a client or a server chose (an access key, a
/// certificate's name), which must not break the line or drive the
/// terminal.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The code of a client error that carries no wire error showing it.
fn client_side_code(cause: &(dyn std::error::Error + 'static)) -> Option<txmq::ErrorCode> {
    let e = cause.downcast_ref::<txmq::Error>()?;
    if e.wire_error().is_some() {
        return None;
    }
    e.code()
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds. Past
/// the last instant RFC 3339 can write (year 9999), the milliseconds
/// themselves: a time given or stored that far ahead must not end a
/// command.
pub fn time_text(ms: u64) -> String {
    /// 9999-12-31T23:59:59.999Z.
    const LAST: u64 = 253_402_300_799_999;
    if ms > LAST {
        return format!("{ms} ms after the Unix epoch (past year 9999)");
    }
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Permission bits as `rw`, `r`, `w` or `-`.
pub fn perm_name(perm: u8) -> &'static str {
    match (perm & PERM_READ != 0, perm & PERM_WRITE != 0) {
        (true, true) => "rw",
        (true, false) => "r",
        (false, true) => "w",
        (false, false) => "-",
    }
}

/// A body as JSON: `("body", text)` when it is UTF-8, else
/// `("body_base64", standard base64)`.
pub fn body_field(body: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(body) {
        Ok(text) => ("body", text.to_string()),
        Err(_) => (
            "body_base64",
            base64::engine::general_purpose::STANDARD.encode(body),
        ),
    }
}

/// `text` with its control characters escaped (`\n`, `\t`, `\u{1b}`), so
/// that what a producer put in a key, a tag or a body keeps a message on
/// one line of text output.
pub fn one_line(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s
}

/// A body for a text line: UTF-8 with control characters escaped (so a
/// message stays on one line), or `body_base64=...`.
fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => format!("body={}", one_line(text)),
        Err(_) => {
            let (name, value) = body_field(body);
            format!("{name}={value}")
        }
    }
}

/// The fields printed of a message, whether one to send or one received.
struct Shown<'a> {
    msg_id: Option<MsgId>,
    topic: &'a str,
    key: Option<&'a str>,
    tag: Option<&'a str>,
    body: &'a [u8],
    properties: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a Message> for Shown<'a> {
    fn from(m: &'a Message) -> Shown<'a> {
        Shown {
            msg_id: m.msg_id(),
            topic: m.topic(),
            key: m.key(),
            tag: m.tag(),
            body: m.body(),
            properties: m.properties(),
        }
    }
}

impl<'a> From<&'a WireMessage> for Shown<'a> {
    fn from(m: &'a WireMessage) -> Shown<'a> {
        Shown {
            msg_id: Some(m.msg_id),
            topic: &m.topic,
            key: m.key.as_deref(),
            tag: m.tag.as_deref(),
            body: &m.body,
            properties: &m.properties,
        }
    }
}

fn key_tag_text<'a>(message: impl Into<Shown<'a>>) -> String {
    let message = message.into();
    let mut s = String::new();
    if let Some(key) = message.key {
        s.push_str(&format!(" key={}", one_line(key)));
    }
    if let Some(tag) = message.tag {
        s.push_str(&format!(" tag={}", one_line(tag)));
    }
    s
}

fn message_fields<'a>(message: impl Into<Shown<'a>>) -> Map<String, Value> {
    let message = message.into();
    let mut m = Map::new();
    m.insert(
        "msg_id".into(),
        json!(message.msg_id.map(|id| id.to_string())),
    );
    m.insert("topic".into(), json!(message.topic));
    m.insert("key".into(), json!(message.key));
    m.insert("tag".into(), json!(message.tag));
    let (name, body) = body_field(message.body);
    m.insert(name.into(), json!(body));
    if !message.properties.is_empty() {
        m.insert("properties".into(), json!(message.properties));
    }
    m
}

/// A sent message's queue offset: none for a delayed message, whose place
/// in its queue is known only once it is delivered (the broker's answer
/// holds its place in the delay index instead).
fn sent_offset(receipt: &SendReceipt, message: &Message) -> Option<u64> {
    let delayed = message.property(txmq::PROPERTY_DELIVER_AT).is_some();
    (!delayed).then_some(receipt.queue_offset)
}

/// A sent message's acknowledgement as a JSON object.
pub fn sent_json(receipt: &SendReceipt, message: &Message) -> Value {
    let mut m = message_fields(message);
    m.insert("msg_id".into(), json!(receipt.msg_id.to_string()));
    m.insert("status".into(), json!(receipt.status.name()));
    m.insert("broker".into(), json!(receipt.broker_name));
    m.insert("queue".into(), json!(receipt.queue));
    m.insert("queue_offset".into(), json!(sent_offset(receipt, message)));
    Value::Object(m)
}

/// A sent message's acknowledgement as a text line.
pub fn sent_text(receipt: &SendReceipt, message: &Message) -> String {
    format!(
        "{} {} broker={} q={} offset={} msg_id={}{}",
        receipt.status.name(),
        receipt.topic,
        receipt.broker_name,
        receipt.queue,
        sent_offset(receipt, message).map_or("-".into(), |o| o.to_string()),
        receipt.msg_id,
        key_tag_text(message),
    )
}

/// A message whose send has an unknown outcome (the request was written
/// but its answer never came: a timeout, a connection closed) as a JSON
/// object: status `UNKNOWN`, the broker it went to, and the error.
pub fn unknown_json(message: &Message, broker: Option<&str>, error: &str) -> Value {
    let mut m = message_fields(message);
    m.insert("status".into(), json!(UNKNOWN));
    m.insert("broker".into(), json!(broker));
    m.insert("error".into(), json!(error));
    Value::Object(m)
}

/// A message whose send has an unknown outcome as a text line.
pub fn unknown_text(message: &Message, broker: Option<&str>) -> String {
    format!(
        "{UNKNOWN} {} broker={} msg_id={}{} (outcome unknown: it may have been stored)",
        message.topic(),
        broker.unwrap_or("?"),
        // The CLI fixes every message's id before sending it.
        message
            .msg_id()
            .map(|id| id.to_string())
            .unwrap_or_default(),
        key_tag_text(message),
    )
}

/// The status of a send whose outcome is unknown.
pub const UNKNOWN: &str = "UNKNOWN";

/// A received message as a JSON object.
pub fn received_json(m: &ReceivedMessage) -> Value {
    let mut o = message_fields(m.message());
    o.insert("topic".into(), json!(m.topic()));
    if m.queue_topic() != m.topic() {
        o.insert("queue_topic".into(), json!(m.queue_topic()));
    }
    o.insert("broker".into(), json!(m.broker_name));
    o.insert("queue".into(), json!(m.queue()));
    o.insert("queue_offset".into(), json!(m.queue_offset()));
    o.insert("store_timestamp".into(), json!(m.store_timestamp()));
    o.insert("born_timestamp".into(), json!(m.message().born_timestamp));
    o.insert("reconsume_times".into(), json!(m.reconsume_times()));
    Value::Object(o)
}

/// A received message as a text line.
/// A retry's queue and offset are those of its group's retry topic, named
/// after them (`queue_topic=%RETRY%GROUP`).
pub fn received_text(m: &ReceivedMessage) -> String {
    let queue_topic = match m.queue_topic() {
        t if t == m.topic() => String::new(),
        t => format!(" queue_topic={t}"),
    };
    format!(
        "{} broker={} q={} offset={}{queue_topic} msg_id={}{} {}",
        m.topic(),
        m.broker_name,
        m.queue(),
        m.queue_offset(),
        m.msg_id(),
        key_tag_text(m.message()),
        body_text(m.body()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq::{SendStatus, StoredMessage};

    fn received(body: &'static [u8]) -> ReceivedMessage {
        ReceivedMessage::new(
            "broker-a",
            StoredMessage {
                message: WireMessage::new("orders", body)
                    .with_key("k1")
                    .with_tag("t1"),
                queue: 1,
                queue_offset: 7,
                log_offset: 100,
                store_timestamp: 1_700_000_000_000,
            },
        )
    }

    #[test]
    fn bodies_are_text_when_utf8_and_base64_otherwise() {
        assert_eq!(body_field(b"hello"), ("body", "hello".to_string()));
        assert_eq!(
            body_field(&[0xff, 0x00, 0x80]),
            ("body_base64", "/wCA".to_string())
        );
        assert_eq!(body_field(b""), ("body", String::new()));
    }

    #[test]
    fn a_retry_names_its_original_topic_and_the_retry_queue_it_was_read_from() {
        let retry = |topic: &str| {
            let mut m = received(b"again");
            m.stored.message.topic = topic.into();
            m.stored
                .message
                .properties
                .insert(txmq::PROPERTY_REAL_TOPIC.into(), "orders".into());
            m
        };
        let m = retry("%RETRY%billing");
        let v = received_json(&m);
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["queue_topic"], "%RETRY%billing");
        let line = received_text(&m);
        assert!(
            line.starts_with(
                "orders broker=broker-a q=1 offset=7 queue_topic=%RETRY%billing msg_id="
            ),
            "{line}"
        );
        // A dead letter read from its topic is shown where it is.
        let m = retry("%DLQ%billing");
        let v = received_json(&m);
        assert_eq!(v["topic"], "%DLQ%billing");
        assert!(v.get("queue_topic").is_none(), "{v}");
        assert!(received_text(&m).starts_with("%DLQ%billing broker=broker-a q=1 offset=7 msg_id="));
        // Not a retry: as before.
        let v = received_json(&received(b"x"));
        assert!(v.get("queue_topic").is_none(), "{v}");
    }

    #[test]
    fn a_received_message_is_one_json_object_with_every_field() {
        let m = received(b"hello");
        let v = received_json(&m);
        assert_eq!(v["msg_id"], json!(m.msg_id().to_string()));
        assert_eq!(v["msg_id"].as_str().map(str::len), Some(32));
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["broker"], "broker-a");
        assert_eq!(v["queue"], 1);
        assert_eq!(v["queue_offset"], 7);
        assert_eq!(v["key"], "k1");
        assert_eq!(v["tag"], "t1");
        assert_eq!(v["body"], "hello");
        assert_eq!(v["store_timestamp"], 1_700_000_000_000u64);
        assert!(v.get("body_base64").is_none());
        assert!(!v.to_string().contains('\n'));

        let binary = received_json(&received(&[0xc3, 0x28]));
        assert_eq!(binary["body_base64"], "wyg=");
        assert!(binary.get("body").is_none());
    }

    #[test]
    fn a_received_message_is_one_text_line() {
        let m = received(b"two\nlines");
        let line = received_text(&m);
        assert_eq!(
            line,
            format!(
                "orders broker=broker-a q=1 offset=7 msg_id={} key=k1 tag=t1 body=two\\nlines",
                m.msg_id()
            )
        );
        let plain = received(b"caf\xc3\xa9");
        assert!(received_text(&plain).ends_with("body=café"));
        assert!(received_text(&received(&[0xff])).ends_with("body_base64=/w=="));
        // A key or tag with control characters stays on the line too.
        let id = MsgId::generate();
        let odd = Message::new("orders", "x")
            .with_key("a\nb")
            .with_tag("t\tu")
            .with_msg_id(id);
        let receipt = SendReceipt::new(id, "orders", "broker-a", 0, 3, SendStatus::SendOk);
        let line = sent_text(&receipt, &odd);
        assert!(line.ends_with(" key=a\\nb tag=t\\tu"), "{line}");
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn a_sent_message_shows_status_and_position() {
        let id = MsgId::generate();
        let message = Message::new("orders", "hi").with_msg_id(id);
        let receipt =
            SendReceipt::new(id, "orders", "broker-a", 1, 7, SendStatus::FlushDiskTimeout);
        let v = sent_json(&receipt, &message);
        assert_eq!(v["status"], "FLUSH_DISK_TIMEOUT");
        assert_eq!(v["queue_offset"], 7);
        assert_eq!(v["body"], "hi");
        assert_eq!(v["key"], Value::Null);
        assert_eq!(
            sent_text(&receipt, &message.clone().with_key("k")),
            format!(
                "FLUSH_DISK_TIMEOUT orders broker=broker-a q=1 offset=7 msg_id={} key=k",
                id
            )
        );
    }

    #[test]
    fn replication_statuses_are_shown_like_flush_disk_timeout() {
        let id = MsgId::generate();
        let message = Message::new("orders", "hi").with_msg_id(id);
        for (status, name) in [
            (SendStatus::FlushSlaveTimeout, "FLUSH_SLAVE_TIMEOUT"),
            (SendStatus::SlaveNotAvailable, "SLAVE_NOT_AVAILABLE"),
        ] {
            let receipt = SendReceipt::new(id, "orders", "broker-a", 0, 3, status);
            assert_eq!(sent_json(&receipt, &message)["status"], name);
            assert_eq!(
                sent_text(&receipt, &message),
                format!("{name} orders broker=broker-a q=0 offset=3 msg_id={}", id)
            );
        }
    }

    #[test]
    fn an_unknown_outcome_says_so_and_names_the_broker() {
        let id = MsgId::generate();
        let message = Message::new("orders", "hi").with_tag("t").with_msg_id(id);
        let v = unknown_json(&message, Some("broker-a"), "timed out");
        assert_eq!(v["status"], "UNKNOWN");
        assert_eq!(v["broker"], "broker-a");
        assert_eq!(v["error"], "timed out");
        assert_eq!(v["msg_id"], json!(id.to_string()));
        assert_eq!(v["body"], "hi");
        assert_eq!(
            unknown_text(&message, None),
            format!(
                "UNKNOWN orders broker=? msg_id={} tag=t (outcome unknown: it may have been stored)",
                id
            )
        );
    }

    #[test]
    fn error_causes_are_shown_once() {
        let wire = txmq::WireError::new(txmq::ErrorCode::UnknownTopic, "topic 'x' does not exist");
        let e = txmq::Error::Broker {
            broker: "broker-a".into(),
            addr: "h:1".into(),
            source: txmq_remoting_error(wire),
        };
        let text = error_text(&anyhow::Error::from(e).context("sending"));
        assert_eq!(
            text,
            "sending: broker broker-a (h:1): UNKNOWN_TOPIC (6): topic 'x' does not exist"
        );
    }

    #[test]
    fn client_side_errors_show_their_code() {
        let e = txmq::Error::NoRoute {
            topic: "ghost".into(),
        };
        assert_eq!(
            error_text(&anyhow::Error::from(e)),
            "NO_ROUTE (12): no route for topic \"ghost\": no broker serves it"
        );
        let e = txmq::Error::BadArgument("topic name is empty".into());
        assert_eq!(
            error_text(&anyhow::Error::from(e).context("sending")),
            "sending: BAD_ARGUMENT (5): bad argument: topic name is empty"
        );
        let e = txmq::Error::NoBroker;
        assert_eq!(
            error_text(&anyhow::Error::from(e)),
            "no broker is registered with the nameservers"
        );
    }

    fn txmq_remoting_error(wire: txmq::WireError) -> txmq::RemotingError {
        txmq::RemotingError::Remote(wire)
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec![
                "a".to_string(),
                "127.0.0.1:10911".to_string(),
                "4".to_string(),
            ],
            vec!["broker-b".to_string(), "h:1".to_string(), "16".to_string()],
        ];
        let lines = table(&["NAME", "ADDR", "QUEUES"], &rows);
        assert_eq!(
            lines,
            [
                "NAME      ADDR             QUEUES",
                "a         127.0.0.1:10911  4",
                "broker-b  h:1              16",
            ]
        );
        assert_eq!(perm_name(6), "rw");
        assert_eq!(perm_name(4), "r");
        assert_eq!(perm_name(2), "w");
        assert_eq!(perm_name(0), "-");
    }

    #[test]
    fn control_characters_in_an_error_are_escaped() {
        let text = error_text(&anyhow::anyhow!(
            "authentication failed for access key 'evil\nFORGED \u{1b}[31mred'"
        ));
        assert_eq!(
            text,
            r"authentication failed for access key 'evil\nFORGED \u{1b}[31mred'"
        );
    }
}
