//! `/groups`: the consumer groups; `/groups/{group}`: members, mode,
//! subscriptions, owner and lag per queue; reset a topic's offsets (the
//! brokers refuse while the group has live consumers of it, as for the
//! CLI).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use std::sync::Arc;

use txmq::{Admin, OffsetTarget};

use super::html::{self, esc, url, Flash};
use super::{page_of, AppState, Ctx};

/// The visitor's client for a page about `group`, or the response to give
/// instead: the sign-in, or the 400 page (titled `title`) for a name no
/// group can have.
pub fn group_client(ctx: &Ctx, group: &str, title: &str) -> Result<Arc<Admin>, Response> {
    let admin = ctx.client()?;
    match bad_group(ctx, group, title) {
        Some(r) => Err(r),
        None => Ok(admin),
    }
}

/// The 400 page (titled `title`) for a name no group can have, if `group`
/// is one.
pub fn bad_group(ctx: &Ctx, group: &str, title: &str) -> Option<Response> {
    let e = group_check(group).err()?;
    Some(html::error_page(
        ctx,
        StatusCode::BAD_REQUEST,
        title,
        &format!("Not a group name: {e}."),
    ))
}

/// A group name as a URL may carry it: 1 to 255 printable characters.
fn group_check(group: &str) -> Result<(), String> {
    crate::args::parse_group(group)?;
    if let Some(c) = group.chars().find(|c| c.is_control()) {
        return Err(format!("a group name has no control characters ({c:?})"));
    }
    Ok(())
}

#[derive(Default)]
struct Group {
    members: u32,
    topics: BTreeSet<String>,
    brokers: Vec<String>,
}

/// `GET /groups?page=N`.
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
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Consumer groups", &e),
    };
    let mut body = String::new();
    match admin.list_groups_by_broker(None).await {
        Ok(answers) => {
            let lists = super::answered(answers, None, &mut body);
            let mut groups: BTreeMap<String, Group> = BTreeMap::new();
            for list in lists {
                for g in list.groups {
                    let e = groups.entry(g.group).or_default();
                    e.members += g.members;
                    e.topics.extend(g.topics);
                    e.brokers.push(list.broker_name.clone());
                }
            }
            let all: Vec<_> = groups.into_iter().collect();
            let rows: Vec<_> = html::paged(&all, page, app.page_size)
                .iter()
                .map(|(name, g)| {
                    (
                        format!("data-group=\"{}\"", esc(name)),
                        vec![
                            format!("<a href=\"/groups/{}\">{}</a>", url(name), esc(name)),
                            format!("<td class=\"num\">{}</td>", g.members),
                            esc(&g.topics.iter().cloned().collect::<Vec<_>>().join(", ")),
                            esc(&g.brokers.join(", ")),
                        ],
                    )
                })
                .collect();
            body.push_str(&html::table(
                "id=\"groups\"",
                &["Group", "Live members", "Topics", "Brokers"],
                &rows,
            ));
            body.push_str(&html::pager("/groups", "", page, app.page_size, all.len()));
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot list the groups: {}",
            super::error_text(e)
        ))),
    }
    html::page(&ctx, StatusCode::OK, "Consumer groups", "nav-groups", &body)
}

/// `GET /groups/{group}`.
pub async fn show(Extension(ctx): Extension<Ctx>, Path(group): Path<String>) -> Response {
    let admin = match group_client(&ctx, &group, "Consumer group") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let title = format!("Consumer group {group}");
    let mut body = String::new();
    match admin.group_state_by_broker(&group, None).await {
        Ok(answers) => {
            let states = super::answered(answers, None, &mut body);
            let mut members = Vec::new();
            let mut queues = Vec::new();
            let mut total: u64 = 0;
            let mut topics = BTreeSet::new();
            let mut broadcast = false;
            for s in &states {
                for m in &s.members {
                    broadcast |= m.broadcast;
                    let subs: Vec<String> = m
                        .subscriptions
                        .iter()
                        .map(|x| {
                            topics.insert(x.topic.clone());
                            format!("{} ({})", x.topic, x.expression)
                        })
                        .collect();
                    members.push((
                        format!("data-member=\"{}\"", esc(&m.client_id)),
                        vec![
                            esc(&m.client_id),
                            esc(&m.addr),
                            esc(&s.broker_name),
                            if m.broadcast {
                                "broadcasting"
                            } else {
                                "clustering"
                            }
                            .into(),
                            esc(&subs.join(", ")),
                            html::age(m.last_heartbeat_ms_ago),
                        ],
                    ));
                }
                for q in &s.queues {
                    total += q.lag;
                    topics.insert(q.topic.clone());
                    queues.push((
                        format!(
                            "data-broker=\"{}\" data-topic=\"{}\" data-queue=\"{}\"",
                            esc(&s.broker_name),
                            esc(&q.topic),
                            q.queue
                        ),
                        vec![
                            esc(&q.topic),
                            esc(&s.broker_name),
                            format!("<td class=\"num\">{}</td>", q.queue),
                            esc(&crate::group::owner_shown(q, "—")),
                            q.committed
                                .map(|c| c.to_string())
                                .unwrap_or_else(|| "—".into()),
                            format!("<td class=\"num\">{}</td>", q.max_offset),
                            format!("<td class=\"lag\">{}</td>", q.lag),
                        ],
                    ));
                }
            }
            let mode = if members.is_empty() {
                "no live members"
            } else if broadcast {
                "broadcasting"
            } else {
                "clustering"
            };
            let _ = write!(
                body,
                "<p>Mode: <span id=\"mode\">{mode}</span> · total lag <span id=\"total-lag\">{total}</span></p><h2>Members</h2>"
            );
            body.push_str(&html::table(
                "id=\"group-members\"",
                &[
                    "Client",
                    "Address",
                    "Broker",
                    "Mode",
                    "Subscriptions",
                    "Heartbeat age",
                ],
                &members,
            ));
            body.push_str("<h2>Queues</h2>");
            body.push_str(&html::table(
                "id=\"group-queues\"",
                &[
                    "Topic",
                    "Broker",
                    "Queue",
                    "Owner",
                    "Committed",
                    "Max offset",
                    "Lag",
                ],
                &queues,
            ));
            let options: String = topics
                .iter()
                .map(|t| format!("<option value=\"{0}\">{0}</option>", esc(t)))
                .collect();
            let _ = write!(
                body,
                "<h2>Reset offsets</h2><p class=\"muted\">The brokers refuse while the group has live consumers of the topic: stop them first.</p>\
<form id=\"reset-offset\" class=\"inline\" method=\"post\" action=\"/groups/{}/reset\">{}\
<label>Topic <input name=\"topic\" list=\"group-topics\" required></label><datalist id=\"group-topics\">{options}</datalist>\
<label>To <select name=\"to\"><option value=\"earliest\">earliest</option><option value=\"latest\">latest</option><option value=\"timestamp\">timestamp</option></select></label>\
<label>Timestamp <input name=\"timestamp\" placeholder=\"2026-01-31T12:00:00Z, ms, or 10m (ago)\"></label>\
<button type=\"submit\" id=\"reset-offset-submit\">Reset</button></form>",
                url(&group),
                ctx.csrf_input()
            );
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot get the group's state: {}",
            super::error_text(e)
        ))),
    }
    html::page(&ctx, StatusCode::OK, &title, "nav-groups", &body)
}

/// `POST /groups/{group}/reset`: `topic`, `to` (earliest, latest or
/// timestamp) and `timestamp`.
pub async fn reset(
    Extension(ctx): Extension<Ctx>,
    Path(group): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let admin = match group_client(&ctx, &group, "Reset offsets") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/groups/{}", url(&group));
    let topic = f.get("topic").map(|s| s.trim()).unwrap_or("");
    if let Err(e) = txmq::validate_topic_name(topic) {
        return ctx.redirect(&back, Flash::Failed(format!("Nothing reset: {e}.")));
    }
    let to = match f.get("to").map(String::as_str).unwrap_or("") {
        "earliest" => OffsetTarget::First,
        "latest" => OffsetTarget::Last,
        "timestamp" => {
            let at = f.get("timestamp").map(|s| s.trim()).unwrap_or("");
            match crate::msg::parse_time(at) {
                Ok(ms) => OffsetTarget::Timestamp(ms),
                Err(e) => {
                    return ctx.redirect(&back, Flash::Failed(format!("Nothing reset: {e}.")))
                }
            }
        }
        other => {
            let text = format!("Nothing reset: {other:?} is not earliest, latest or timestamp.");
            return ctx.redirect(&back, Flash::Failed(text));
        }
    };
    match admin.reset_offsets(&group, topic, to, None).await {
        Ok(done) => {
            let queues: usize = done.iter().map(|d| d.queues.len()).sum();
            let text =
                format!("Offsets of group {group} on topic {topic} reset: {queues} queues moved.");
            ctx.redirect(&back, Flash::Done(text))
        }
        Err(e) => ctx.redirect(
            &back,
            Flash::Failed(format!("Offsets not reset: {}", super::error_text(e))),
        ),
    }
}
