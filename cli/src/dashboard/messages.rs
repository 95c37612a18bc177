//! `/messages`: find messages by id, by key (with a time range) or by
//! queue offset; `/messages/{id}`: one message's body (text, JSON
//! pretty-printed, or hex), properties and per-group consumption.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use txmq::{FoundMessage, FoundMessages};

use super::html::{self, esc, url};
use super::Ctx;

type Answers = Vec<txmq::admin::BrokerAnswer<FoundMessages>>;

/// How many messages a lookup by offset reads when the form leaves the
/// count out.
const DEFAULT_COUNT: u64 = 10;
/// The most a lookup by offset reads: what `txmq msg get --count` takes.
const MAX_COUNT: u64 = crate::msg::MAX_GET_COUNT as u64;

fn field<'a>(q: &'a HashMap<String, String>, name: &str) -> &'a str {
    q.get(name).map(|s| s.trim()).unwrap_or("")
}

fn forms(q: &HashMap<String, String>) -> String {
    let v = |name: &str| esc(field(q, name));
    // A field left empty shows the value it stands for.
    let or_default = |name: &str, default: u64| match field(q, name) {
        "" => default.to_string(),
        _ => v(name),
    };
    format!(
        "<form id=\"by-id\" class=\"inline\" method=\"get\" action=\"/messages\"><input type=\"hidden\" name=\"by\" value=\"id\">\
<label>Message id <input name=\"id\" value=\"{}\" size=\"34\" placeholder=\"32 hex digits\"></label><button type=\"submit\" id=\"by-id-submit\">Show</button></form>\
<form id=\"by-key\" class=\"inline\" method=\"get\" action=\"/messages\"><input type=\"hidden\" name=\"by\" value=\"key\">\
<label>Topic <input name=\"topic\" value=\"{}\"></label><label>Key <input name=\"key\" value=\"{}\"></label>\
<label>Since <input name=\"since\" value=\"{}\" placeholder=\"1h, RFC 3339 or ms\"></label><label>Until <input name=\"until\" value=\"{}\" placeholder=\"now\"></label>\
<button type=\"submit\" id=\"by-key-submit\">Find</button></form>\
<form id=\"by-offset\" class=\"inline\" method=\"get\" action=\"/messages\"><input type=\"hidden\" name=\"by\" value=\"offset\">\
<label>Topic <input name=\"topic\" value=\"{}\"></label><label>Queue <input name=\"queue\" type=\"number\" min=\"0\" value=\"{}\"></label>\
<label>Offset <input name=\"offset\" type=\"number\" min=\"0\" value=\"{}\"></label><label>Count <input name=\"count\" type=\"number\" min=\"1\" max=\"{MAX_COUNT}\" value=\"{}\"></label>\
<button type=\"submit\" id=\"by-offset-submit\">Get</button></form>",
        v("id"),
        if field(q, "by") == "key" { v("topic") } else { String::new() },
        v("key"),
        v("since"),
        v("until"),
        if field(q, "by") == "offset" { v("topic") } else { String::new() },
        or_default("queue", 0),
        or_default("offset", 0),
        or_default("count", DEFAULT_COUNT),
    )
}

/// The messages of the answers, with the brokers that failed.
fn collect(answers: Answers) -> (Vec<(String, FoundMessage)>, Vec<String>) {
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for a in answers {
        match a.result {
            Ok(f) => found.extend(f.messages.into_iter().map(|m| (f.broker_name.clone(), m))),
            Err(e) => failed.push(format!("{}: {}", a.broker_name, super::error_text(e))),
        }
    }
    (found, failed)
}

fn results(found: &[(String, FoundMessage)]) -> String {
    let rows: Vec<_> = found
        .iter()
        .map(|(broker, f)| {
            let m = &f.message;
            let preview = body_preview(&m.body);
            (
                format!("data-msg-id=\"{}\"", m.msg_id),
                vec![
                    format!("<a href=\"/messages/{0}\">{0}</a>", m.msg_id),
                    esc(&m.topic),
                    esc(broker),
                    format!("<td class=\"num\">{}</td>", f.queue),
                    f.queue_offset
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "—".into()),
                    esc(m.key.as_deref().unwrap_or("")),
                    esc(&crate::output::time_text(f.store_timestamp)),
                    f.state.name().into(),
                    esc(&preview),
                ],
            )
        })
        .collect();
    html::table(
        "id=\"messages\"",
        &[
            "Message id",
            "Topic",
            "Broker",
            "Queue",
            "Offset",
            "Key",
            "Stored",
            "State",
            "Body",
        ],
        &rows,
    )
}

/// `GET /messages`, with `by=id|key|offset` and its fields to search.
pub async fn search(
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut body = forms(&q);
    let bad = |ctx: &Ctx, body: &str, text: String| {
        let page = format!("{body}{}", html::error_div(&text));
        html::page(
            ctx,
            StatusCode::BAD_REQUEST,
            "Messages",
            "nav-messages",
            &page,
        )
    };
    let answers = match field(&q, "by") {
        "" => return html::page(&ctx, StatusCode::OK, "Messages", "nav-messages", &body),
        "id" => match crate::msg::parse_msg_id(field(&q, "id")) {
            Ok(id) => admin.message_by_id(id).await,
            Err(e) => return bad(&ctx, &body, e),
        },
        "key" => {
            let topic = field(&q, "topic");
            if let Err(e) = txmq::validate_topic_name(topic) {
                return bad(&ctx, &body, e.to_string());
            }
            let key = field(&q, "key");
            if key.is_empty() {
                return bad(&ctx, &body, "give the key to look for".into());
            }
            let time = |name: &str| match field(&q, name) {
                "" => Ok(None),
                s => crate::msg::parse_time(s).map(Some),
            };
            let (since, until) = match (time("since"), time("until")) {
                (Ok(s), Ok(u)) => (s, u),
                (Err(e), _) | (_, Err(e)) => return bad(&ctx, &body, e),
            };
            admin.messages_by_key(topic, key, since, until).await
        }
        "offset" => {
            let topic = field(&q, "topic");
            if let Err(e) = txmq::validate_topic_name(topic) {
                return bad(&ctx, &body, e.to_string());
            }
            // A field left empty (or out) takes the form's default.
            let number = |name: &str, default: u64| match field(&q, name) {
                "" => Ok(default),
                s => s
                    .parse::<u64>()
                    .map_err(|_| format!("{name} {s:?} is not a whole number")),
            };
            let (queue, offset, count) = match (
                number("queue", 0),
                number("offset", 0),
                number("count", DEFAULT_COUNT),
            ) {
                (Ok(queue), Ok(offset), Ok(count)) => (queue, offset, count),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return bad(&ctx, &body, e),
            };
            // Refused as `txmq msg get --count` refuses it, not cut to
            // fewer than asked for.
            if !(1..=MAX_COUNT).contains(&count) {
                return bad(
                    &ctx,
                    &body,
                    format!("count {count} is out of range: 1 to {MAX_COUNT}"),
                );
            }
            let (Ok(queue), Ok(count)) = (u32::try_from(queue), u32::try_from(count)) else {
                return bad(&ctx, &body, format!("queue {queue} is out of range"));
            };
            match admin.messages_at(topic, queue, offset, count).await {
                // No broker has the queue: say so, as `txmq msg get` does.
                Ok(answers) if answers.is_empty() => {
                    return bad(
                        &ctx,
                        &body,
                        format!("topic '{topic}' has no queue {queue} on any broker"),
                    )
                }
                other => other,
            }
        }
        other => {
            return bad(
                &ctx,
                &body,
                format!("{other:?} is not a lookup (id, key or offset)"),
            )
        }
    };
    match answers {
        Ok(answers) => {
            let (found, failed) = collect(answers);
            for f in &failed {
                body.push_str(&html::error_div(f));
            }
            let _ = write!(body, "<h2>Found {}</h2>", found.len());
            body.push_str(&results(&found));
        }
        Err(e) => body.push_str(&html::error_div(&super::error_text(e))),
    }
    html::page(&ctx, StatusCode::OK, "Messages", "nav-messages", &body)
}

/// How a body is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Text,
    Json,
    Hex,
}

/// A body in a cell of a list: on one line, as `txmq msg show` prints it
/// (UTF-8 with its control characters escaped, else `(base64) ...`), cut
/// to 80 characters.
pub(super) fn body_preview(body: &[u8]) -> String {
    crate::msg::body_line(body).chars().take(80).collect()
}

/// A body as text: UTF-8 as it is (lines and tabs kept; [`esc`] writes
/// its other control characters escaped), else as `txmq msg show` prints
/// a body that is no text (`(base64) ...`).
pub(super) fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => text.to_string(),
        Err(_) => crate::msg::body_line(body),
    }
}

/// The body as the view shows it; the default view is JSON for a JSON
/// body, text for other UTF-8, hex for the rest.
fn render_body(body: &[u8], view: Option<View>) -> (View, String) {
    let text = std::str::from_utf8(body).ok();
    let json = text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok());
    let view = view.unwrap_or(match (&json, text) {
        (Some(_), _) => View::Json,
        (None, Some(_)) => View::Text,
        (None, None) => View::Hex,
    });
    let shown = match view {
        View::Json => match &json {
            Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
            None => "(not JSON)".into(),
        },
        View::Text => body_text(body),
        View::Hex => {
            let mut out = String::with_capacity(body.len() * 3);
            for (i, chunk) in body.chunks(16).enumerate() {
                let _ = write!(out, "{:08x}  ", i * 16);
                for b in chunk {
                    let _ = write!(out, "{b:02x} ");
                }
                out.push('\n');
            }
            out
        }
    };
    (view, shown)
}

/// `GET /messages/{id}?view=text|json|hex`.
pub async fn show(
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let msg_id = match crate::msg::parse_msg_id(&id) {
        Ok(m) => m,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Message", &e),
    };
    let view = match field(&q, "view") {
        "" => None,
        "text" => Some(View::Text),
        "json" => Some(View::Json),
        "hex" => Some(View::Hex),
        other => {
            let text = format!("view {other:?} is not text, json or hex");
            return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Message", &text);
        }
    };
    let title = format!("Message {msg_id}");
    let (found, failed, answered, refused) = match admin.message_by_id(msg_id).await {
        Ok(a) => {
            let asked = a.len();
            let refused = a.iter().any(|b| {
                b.result
                    .as_ref()
                    .is_err_and(|e| e.code() == Some(txmq::ErrorCode::AccessDenied))
            });
            let (found, failed) = collect(a);
            let answered = asked - failed.len();
            (found, failed, answered, refused)
        }
        Err(e) => {
            return html::error_page(&ctx, StatusCode::BAD_GATEWAY, &title, &super::error_text(e))
        }
    };
    let mut body = String::new();
    for f in &failed {
        body.push_str(&html::error_div(f));
    }
    // The stored record of the message (a half message's commit record
    // comes later): the one with a queue offset if any, else the first.
    let Some((broker, f)) = found
        .iter()
        .find(|(_, f)| f.queue_offset.is_some())
        .or_else(|| found.first())
    else {
        // Not found is said only of the brokers that answered: one that
        // refused or did not answer may hold it (as `txmq msg show` says).
        let (status, text) = match (failed.len(), answered) {
            (0, _) => (
                StatusCode::NOT_FOUND,
                format!("No broker has message {msg_id}."),
            ),
            (n, 0) => (
                if refused {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::BAD_GATEWAY
                },
                format!(
                    "Could not look for message {msg_id}: {n} broker(s) refused the lookup or did not answer (above)."
                ),
            ),
            (n, _) => (
                StatusCode::NOT_FOUND,
                format!(
                    "No broker that answered has message {msg_id}; {n} broker(s) could not say (above)."
                ),
            ),
        };
        body.push_str(&html::error_div(&text));
        return html::page(&ctx, status, &title, "nav-messages", &body);
    };
    let m = &f.message;
    let _ = write!(
        body,
        "<table id=\"message\"><tr><th>Topic</th><td><a href=\"/topics/{}\">{}</a></td></tr>\
<tr><th>Broker</th><td>{}</td></tr><tr><th>Queue</th><td>{}</td></tr><tr><th>Offset</th><td>{}</td></tr>\
<tr><th>Key</th><td>{}</td></tr><tr><th>Tag</th><td>{}</td></tr><tr><th>Stored</th><td>{}</td></tr>\
<tr><th>Born</th><td>{}</td></tr><tr><th>State</th><td id=\"msg-state\">{}</td></tr>{}</table>",
        url(&m.topic),
        esc(&m.topic),
        esc(broker),
        f.queue,
        f.queue_offset.map(|o| o.to_string()).unwrap_or_else(|| "—".into()),
        esc(m.key.as_deref().unwrap_or("—")),
        esc(m.tag.as_deref().unwrap_or("—")),
        esc(&crate::output::time_text(f.store_timestamp)),
        esc(&crate::output::time_text(m.born_timestamp)),
        f.state.name(),
        f.tx_id
            .map(|t| format!("<tr><th>Transaction</th><td><a href=\"/transactions/{}/{t}\">{t}</a></td></tr>", url(broker)))
            .unwrap_or_default(),
    );
    let (view, shown) = render_body(&m.body, view);
    let link = |v: View, name: &str| {
        let class = if v == view { " class=\"active\"" } else { "" };
        format!("<a id=\"view-{name}\" href=\"/messages/{msg_id}?view={name}\"{class}>{name}</a>")
    };
    let _ = write!(
        body,
        "<h2>Body ({} bytes)</h2><p class=\"views\">{} {} {}</p><pre id=\"body\" data-view=\"{}\">{}</pre>",
        m.body.len(),
        link(View::Text, "text"),
        link(View::Json, "json"),
        link(View::Hex, "hex"),
        match view {
            View::Text => "text",
            View::Json => "json",
            View::Hex => "hex",
        },
        esc(&shown)
    );
    let props: Vec<_> = m
        .properties
        .iter()
        .map(|(k, v)| (format!("data-key=\"{}\"", esc(k)), vec![esc(k), esc(v)]))
        .collect();
    body.push_str("<h2>Properties</h2>");
    body.push_str(&html::table(
        "id=\"properties\"",
        &["Property", "Value"],
        &props,
    ));
    let groups: Vec<_> = f
        .groups
        .iter()
        .map(|g| {
            (
                format!(
                    "data-group=\"{}\" data-consumed=\"{}\"",
                    esc(&g.group),
                    g.consumed
                ),
                vec![
                    format!(
                        "<a href=\"/groups/{}\">{}</a>",
                        url(&g.group),
                        esc(&g.group)
                    ),
                    if g.consumed { "consumed" } else { "not yet" }.into(),
                    g.committed_offset
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "—".into()),
                ],
            )
        })
        .collect();
    body.push_str("<h2>Consumption</h2>");
    body.push_str(&html::table(
        "id=\"consumption\"",
        &["Group", "State", "Committed offset"],
        &groups,
    ));
    html::page(&ctx, StatusCode::OK, &title, "nav-messages", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_show_as_json_text_or_hex() {
        let (v, s) = render_body(br#"{"a":1}"#, None);
        assert_eq!(v, View::Json);
        assert!(s.contains("\"a\": 1"), "{s}");
        assert_eq!(render_body(b"hello", None), (View::Text, "hello".into()));
        let (v, s) = render_body(&[0xff, 0x00, 0x41], None);
        assert_eq!(v, View::Hex);
        assert!(s.starts_with("00000000  ff 00 41"), "{s}");
        assert_eq!(render_body(b"hello", Some(View::Hex)).0, View::Hex);
        // Not UTF-8: as `txmq msg show` prints it, not with U+FFFD and a
        // raw NUL.
        assert_eq!(
            render_body(b"\xff\xfe\x00abc\n", Some(View::Text)).1,
            "(base64) //4AYWJjCg=="
        );
        let (_, s) = render_body(b"a\x00b\tc\nd", Some(View::Text));
        assert_eq!(esc(&s), "a\\u{0}b\tc\nd");
        assert_eq!(body_preview(b"a\nb\x00"), "a\\nb\\u{0}");
        assert_eq!(body_preview(&[b'x'; 200]).len(), 80);
    }
}
