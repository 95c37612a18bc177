//! `/dead-letters`: each consumer group's dead-letter count;
//! `/dead-letters/{group}`: its dead letters, paged; re-send one or all
//! behind a confirmation.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use futures_util::future::join_all;
use txmq::{dlq_topic, ResendDeadLetters};

use super::groups::{bad_group, group_client};
use super::html::{self, esc, url, Flash};
use super::{page_of, AppState, Ctx};

const PREFIX: &str = "%DLQ%";

/// `GET /dead-letters?page=N`.
pub async fn list(
    State(app): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let page = match page_of(&q) {
        Ok(p) => p,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Dead letters", &e),
    };
    let mut body = String::new();
    match admin.list_topics().await {
        Ok(topics) => {
            let groups: Vec<String> = topics
                .iter()
                .filter_map(|t| t.config.name.strip_prefix(PREFIX).map(str::to_string))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let shown = html::paged(&groups, page, app.page_size);
            // Counted for the groups on this page only.
            let dlqs: Vec<String> = shown.iter().map(|g| dlq_topic(g)).collect();
            let counts = join_all(dlqs.iter().map(|t| admin.topic_status_by_broker(t, None))).await;
            let rows: Vec<_> = shown
                .iter()
                .zip(counts)
                .map(|(g, status)| {
                    let count = match status {
                        // The brokers that answered; one that did not is
                        // named beside the count.
                        Ok(answers) => {
                            let mut count = 0u64;
                            let mut left_out = Vec::new();
                            for a in answers {
                                match a.result {
                                    Ok(s) => {
                                        count += s
                                            .queues
                                            .iter()
                                            .map(|q| q.max_offset.saturating_sub(q.min_offset))
                                            .sum::<u64>()
                                    }
                                    Err(e) if e.code() == Some(txmq::ErrorCode::UnknownTopic) => {}
                                    Err(e) => left_out.push(format!(
                                        "{}: {}",
                                        a.broker_name,
                                        if e.wire_error().is_some() {
                                            super::error_text(e)
                                        } else {
                                            "no answer".to_string()
                                        }
                                    )),
                                }
                            }
                            if left_out.is_empty() {
                                count.to_string()
                            } else {
                                format!(
                                    "{count} <span class=\"muted\">(without {})</span>",
                                    esc(&left_out.join("; "))
                                )
                            }
                        }
                        Err(e) => format!(
                            "<span class=\"muted\">{}</span>",
                            esc(&super::error_text(e))
                        ),
                    };
                    (
                        format!("data-group=\"{}\"", esc(g)),
                        vec![
                            format!("<a href=\"/dead-letters/{}\">{}</a>", url(g), esc(g)),
                            format!("<td class=\"num count\">{count}</td>"),
                        ],
                    )
                })
                .collect();
            body.push_str(&html::table(
                "id=\"dead-letters\"",
                &["Group", "Dead letters"],
                &rows,
            ));
            body.push_str(&html::pager(
                "/dead-letters",
                "",
                page,
                app.page_size,
                groups.len(),
            ));
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot list the topics: {}",
            super::error_text(e)
        ))),
    }
    html::page(&ctx, StatusCode::OK, "Dead letters", "nav-dlq", &body)
}

/// `GET /dead-letters/{group}?page=N`.
pub async fn show(
    State(app): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Path(group): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match group_client(&ctx, &group, "Dead letters") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let page = match page_of(&q) {
        Ok(p) => p,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Dead letters", &e),
    };
    let title = format!("Dead letters of {group}");
    let size = app.page_size;
    let mut body = String::new();
    let _ = write!(
        body,
        "<form id=\"resend\" method=\"get\" action=\"/dead-letters/{}/resend\"><input type=\"hidden\" name=\"all\" value=\"1\">\
<button type=\"submit\" id=\"resend-submit\">Re-send all not re-sent before…</button></form>",
        url(&group)
    );
    // One more than the page, to know whether a next page exists.
    let wanted = page.saturating_mul(size).saturating_add(1);
    match admin.browse_by_broker(&dlq_topic(&group), wanted).await {
        Ok(answers) => {
            // A broker that does not answer is named; the others' letters
            // are shown.
            let messages: Vec<_> = super::answered(answers, None, &mut body)
                .into_iter()
                .flatten()
                .collect();
            let total = messages.len();
            let rows: Vec<_> = html::paged(&messages, page, size)
                .iter()
                .map(|m| {
                    let msg = m.message();
                    let original = msg
                        .properties
                        .get(txmq::PROPERTY_REAL_TOPIC)
                        .cloned()
                        .unwrap_or_default();
                    let preview = super::messages::body_preview(&msg.body);
                    (
                        format!("data-msg-id=\"{}\"", msg.msg_id),
                        vec![
                            format!("<a href=\"/messages/{0}\">{0}</a>", msg.msg_id),
                            esc(&original),
                            esc(&preview),
                            format!(
                                "<a class=\"resend\" href=\"/dead-letters/{}/resend?msg_id={}\">re-send…</a>",
                                url(&group),
                                msg.msg_id
                            ),
                        ],
                    )
                })
                .collect();
            body.push_str(&html::table(
                "id=\"dead-letter-messages\"",
                &["Message id", "Original topic", "Body", ""],
                &rows,
            ));
            body.push_str(&html::pager(
                &format!("/dead-letters/{}", url(&group)),
                "",
                page,
                size,
                total,
            ));
        }
        Err(txmq::Error::NoRoute { .. }) => {
            body.push_str("<p class=\"muted\">This group has no dead letters.</p>")
        }
        Err(e) => body.push_str(&html::error_div(&super::error_text(e))),
    }
    html::page(&ctx, StatusCode::OK, &title, "nav-dlq", &body)
}

/// The resend a form or query asks for, or what is wrong with it.
fn request_of(group: &str, f: &HashMap<String, String>) -> Result<ResendDeadLetters, String> {
    let all = f.get("all").is_some_and(|v| v == "1");
    let msg_ids = match f.get("msg_id").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(id) => vec![crate::msg::parse_msg_id(id)?],
        None if all => Vec::new(),
        None => return Err("name a dead letter (msg_id) or all".into()),
    };
    Ok(ResendDeadLetters {
        group: group.to_string(),
        msg_ids,
        all,
        to: None,
        force: false,
    })
}

/// `GET /dead-letters/{group}/resend?msg_id=ID|all=1`.
pub async fn confirm(
    Extension(ctx): Extension<Ctx>,
    Path(group): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = bad_group(&ctx, &group, "Dead letters") {
        return r;
    }
    let request = match request_of(&group, &q) {
        Ok(r) => r,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Dead letters", &e),
    };
    let (text, fields): (String, Vec<(&str, String)>) = match request.msg_ids.first() {
        Some(id) => (
            format!("Re-send dead letter {id} of group {group} to its original topic, with its reconsume count reset: the group consumes it again."),
            vec![("msg_id", id.to_string())],
        ),
        None => (
            format!("Re-send every dead letter of group {group} not re-sent before to its original topic, with reconsume counts reset: the group consumes them again."),
            vec![("all", "1".into())],
        ),
    };
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    html::confirm(
        &ctx,
        &format!("Re-send dead letters of {group}?"),
        "nav-dlq",
        &text,
        &format!("/dead-letters/{}/resend", url(&group)),
        &fields,
        &format!("/dead-letters/{}", url(&group)),
    )
}

/// `POST /dead-letters/{group}/resend` with `msg_id` or `all=1`.
pub async fn resend(
    Extension(ctx): Extension<Ctx>,
    Path(group): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let admin = match group_client(&ctx, &group, "Dead letters") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/dead-letters/{}", url(&group));
    let request = match request_of(&group, &f) {
        Ok(r) => r,
        Err(e) => return ctx.redirect(&back, Flash::Failed(format!("Nothing re-sent: {e}."))),
    };
    let flash = match admin.resend_dead_letters(request, None).await {
        Ok(done) => {
            let resent: usize = done.iter().map(|d| d.resent.len()).sum();
            let already: usize = done.iter().map(|d| d.already.len()).sum();
            // A named letter is missing only when no broker has it (each
            // broker that does not names it as not found).
            let held = |id: &txmq::MsgId| {
                done.iter()
                    .any(|d| d.resent.iter().any(|r| r.msg_id == *id) || d.already.contains(id))
            };
            let missing: BTreeSet<txmq::MsgId> = done
                .iter()
                .flat_map(|d| d.not_found.iter().copied())
                .filter(|id| !held(id))
                .collect();
            let missing = missing.len();
            let left: Vec<String> = done
                .iter()
                .flat_map(|d| d.left.iter().map(|(id, why)| format!("{id}: {why}")))
                .collect();
            let left = if left.is_empty() {
                String::new()
            } else {
                format!(
                    " Left in place ({}; the console re-sends to a letter's own topic only: \
                     `txmq dlq resend {group} --msg-id ID --to TOPIC` re-sends one to a topic you name): {}.",
                    left.len(),
                    left.join("; ")
                )
            };
            if resent == 0 {
                Flash::Failed(format!(
                    "Nothing re-sent: {already} re-sent before, {missing} not found.{left}"
                ))
            } else {
                Flash::Done(format!(
                    "Re-sent {resent} dead letter(s) of {group} ({already} re-sent before, {missing} not found).{left}"
                ))
            }
        }
        Err(e) => Flash::Failed(format!("Nothing re-sent: {}", super::error_text(e))),
    };
    ctx.redirect(&back, flash)
}
