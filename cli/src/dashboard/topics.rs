//! `/topics`: the topics (queues, permission, brokers, rate), paged and
//! filtered; create (or update) one; `/topics/{topic}`: its queues'
//! status and its route; delete behind a confirmation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use txmq::{PERM_READ, PERM_READ_WRITE, PERM_WRITE};

use super::html::{self, esc, url, Flash};
use super::{page_of, AppState, Ctx};
use crate::output::perm_name;

/// One topic over all its brokers.
struct Topic {
    queues: u32,
    perm: u8,
    brokers: Vec<String>,
}

/// `GET /topics?page=N&q=SUBSTRING`.
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
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Topics", &e),
    };
    let filter = q.get("q").map(|s| s.trim()).unwrap_or("");
    let mut body = String::new();
    let _ = write!(
        body,
        "<form id=\"create-topic\" class=\"inline\" method=\"post\" action=\"/topics\">{}\
<label>Topic <input name=\"topic\" required maxlength=\"127\" pattern=\"[A-Za-z0-9_.%\\-]+\"></label>\
<label>Queues <input name=\"queues\" type=\"number\" min=\"1\" max=\"1024\" value=\"4\"></label>\
<label>Permission <select name=\"perm\"><option value=\"rw\">read and write</option><option value=\"r\">read only</option><option value=\"w\">write only</option></select></label>\
<button type=\"submit\" id=\"create-topic-submit\">Create or update</button></form>\
<form id=\"filter-topics\" class=\"inline\" method=\"get\" action=\"/topics\">\
<label>Filter <input name=\"q\" value=\"{}\" placeholder=\"part of the name\"></label><button type=\"submit\">Filter</button></form>",
        ctx.csrf_input(),
        esc(filter)
    );
    match admin.list_topics().await {
        Ok(list) => {
            let mut topics: BTreeMap<String, Topic> = BTreeMap::new();
            for t in list {
                if !filter.is_empty() && !t.config.name.contains(filter) {
                    continue;
                }
                let e = topics.entry(t.config.name.clone()).or_insert(Topic {
                    queues: 0,
                    perm: t.config.perm,
                    brokers: Vec::new(),
                });
                e.queues += t.config.queues;
                e.perm |= t.config.perm;
                e.brokers.push(t.broker_name);
            }
            let all: Vec<(String, Topic)> = topics.into_iter().collect();
            let rows: Vec<_> = html::paged(&all, page, app.page_size)
                .iter()
                .map(|(name, t)| {
                    let rate = app
                        .sampler
                        .topic_rate(name)
                        .map(|r| format!("{r:.1}"))
                        .unwrap_or_else(|| "0.0".into());
                    (
                        format!("data-topic=\"{}\"", esc(name)),
                        vec![
                            format!("<a href=\"/topics/{}\">{}</a>", url(name), esc(name)),
                            format!("<td class=\"num\">{}</td>", t.queues),
                            perm_name(t.perm).into(),
                            esc(&t.brokers.join(", ")),
                            format!("<td class=\"num rate\">{rate}</td>"),
                        ],
                    )
                })
                .collect();
            body.push_str(&html::table(
                "id=\"topics\"",
                &["Topic", "Queues", "Permission", "Brokers", "Messages in/s"],
                &rows,
            ));
            let query = if filter.is_empty() {
                String::new()
            } else {
                format!("q={}", url(filter))
            };
            body.push_str(&html::pager(
                "/topics",
                &query,
                page,
                app.page_size,
                all.len(),
            ));
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot list the topics: {}",
            super::error_text(e)
        ))),
    }
    html::page(&ctx, StatusCode::OK, "Topics", "nav-topics", &body)
}

/// `POST /topics`: create (or update) a topic on every broker.
pub async fn create(
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let topic = f.get("topic").map(|s| s.trim()).unwrap_or("");
    if let Err(e) = txmq::validate_topic_name(topic) {
        return ctx.redirect("/topics", Flash::Failed(format!("Not created: {e}.")));
    }
    let queues_text = f.get("queues").map(|s| s.trim()).filter(|s| !s.is_empty());
    let queues = match queues_text.map(str::parse::<u32>) {
        None => 4,
        Some(Ok(n)) if (1..=1024).contains(&n) => n,
        _ => {
            let text = format!(
                "Not created: {:?} is not a queue count (1 to 1024).",
                queues_text.unwrap_or("")
            );
            return ctx.redirect("/topics", Flash::Failed(text));
        }
    };
    let perm = match f.get("perm").map(String::as_str).unwrap_or("rw") {
        "" | "rw" => PERM_READ_WRITE,
        "r" => PERM_READ,
        "w" => PERM_WRITE,
        other => {
            let text = format!("Not created: {other:?} is not a permission (rw, r or w).");
            return ctx.redirect("/topics", Flash::Failed(text));
        }
    };
    match admin.create_topic(topic, queues, perm, None).await {
        Ok(created) => {
            let brokers: Vec<_> = created.iter().map(|c| c.broker_name.as_str()).collect();
            let text = format!(
                "Topic {topic} has {queues} queues ({}) on {}.",
                perm_name(perm),
                brokers.join(", ")
            );
            ctx.redirect("/topics", Flash::Done(text))
        }
        Err(e) => ctx.redirect(
            "/topics",
            Flash::Failed(format!(
                "Topic {topic} not created: {}",
                super::error_text(e)
            )),
        ),
    }
}

/// `GET /topics/{topic}`.
pub async fn show(Extension(ctx): Extension<Ctx>, Path(topic): Path<String>) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(e) = txmq::validate_topic_name(&topic) {
        return html::error_page(
            &ctx,
            StatusCode::BAD_REQUEST,
            "Topic",
            &format!("Not a topic name: {e}."),
        );
    }
    let title = format!("Topic {topic}");
    let (status, route) = tokio::join!(
        admin.topic_status_by_broker(&topic, None),
        admin.route(&topic)
    );
    let mut body = String::new();
    // No broker has it: not found; a broker that does not answer is named
    // and the others' queues shown.
    let status = status.and_then(|mut answers| {
        let unknown = |a: &txmq::admin::BrokerAnswer<_>| {
            a.result
                .as_ref()
                .is_err_and(|e| e.code() == Some(txmq::ErrorCode::UnknownTopic))
        };
        if !answers.is_empty() && answers.iter().all(unknown) {
            answers.swap_remove(0).result?;
        }
        Ok(answers)
    });
    match status {
        Ok(answers) => {
            let status = super::answered(answers, Some(txmq::ErrorCode::UnknownTopic), &mut body);
            let mut rows = Vec::new();
            for s in &status {
                for q in &s.queues {
                    rows.push((
                        format!(
                            "data-broker=\"{}\" data-queue=\"{}\"",
                            esc(&s.broker_name),
                            q.queue
                        ),
                        vec![
                            esc(&s.broker_name),
                            format!("<td class=\"num\">{}</td>", q.queue),
                            format!("<td class=\"num min\">{}</td>", q.min_offset),
                            format!("<td class=\"num max\">{}</td>", q.max_offset),
                            q.last_store_ms
                                .map(|ms| esc(&crate::output::time_text(ms)))
                                .unwrap_or_else(|| "—".into()),
                        ],
                    ));
                }
            }
            body.push_str("<h2>Status</h2>");
            body.push_str(&html::table(
                "id=\"topic-status\"",
                &[
                    "Broker",
                    "Queue",
                    "Min offset",
                    "Max offset",
                    "Last store time",
                ],
                &rows,
            ));
        }
        Err(e) => {
            let not_found = e.code() == Some(txmq::ErrorCode::UnknownTopic);
            let text = super::error_text(e);
            if not_found {
                return html::error_page(
                    &ctx,
                    StatusCode::NOT_FOUND,
                    &title,
                    &format!("No broker has topic {topic}: {text}"),
                );
            }
            body.push_str(&html::error_div(&format!("Cannot get the status: {text}")));
        }
    }
    match route {
        Ok(route) => {
            let rows: Vec<_> = route
                .brokers
                .iter()
                .map(|b| {
                    (
                        format!("data-broker=\"{}\"", esc(&b.broker_name)),
                        vec![
                            esc(&b.broker_name),
                            esc(&b.addr),
                            format!("<td class=\"num\">{}</td>", b.queues),
                            perm_name(b.perm).into(),
                        ],
                    )
                })
                .collect();
            body.push_str("<h2>Route</h2>");
            body.push_str(&html::table(
                "id=\"topic-route\"",
                &["Broker", "Address", "Queues", "Permission"],
                &rows,
            ));
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot get the route: {}",
            super::error_text(e)
        ))),
    }
    let _ = write!(
        body,
        "<h2>Delete</h2><form id=\"delete-topic\" method=\"get\" action=\"/topics/{}/delete\">\
<button type=\"submit\" id=\"delete-topic-submit\" class=\"danger\">Delete this topic…</button></form>",
        url(&topic)
    );
    html::page(&ctx, StatusCode::OK, &title, "nav-topics", &body)
}

/// `GET /topics/{topic}/delete`: what deleting will do.
pub async fn confirm_delete(Extension(ctx): Extension<Ctx>, Path(topic): Path<String>) -> Response {
    if let Err(e) = txmq::validate_topic_name(&topic) {
        return html::error_page(
            &ctx,
            StatusCode::BAD_REQUEST,
            "Delete topic",
            &format!("Not a topic name: {e}."),
        );
    }
    let text = format!(
        "Delete topic {topic} on every broker that has it: its configuration, routes, stored queues and consumer group offsets. Its messages can no longer be consumed. A pending transaction with a message for it makes the brokers refuse."
    );
    html::confirm(
        &ctx,
        &format!("Delete topic {topic}?"),
        "nav-topics",
        &text,
        &format!("/topics/{}/delete", url(&topic)),
        &[],
        &format!("/topics/{}", url(&topic)),
    )
}

/// `POST /topics/{topic}/delete`.
pub async fn delete(Extension(ctx): Extension<Ctx>, Path(topic): Path<String>) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(e) = txmq::validate_topic_name(&topic) {
        return html::error_page(
            &ctx,
            StatusCode::BAD_REQUEST,
            "Delete topic",
            &format!("Not a topic name: {e}."),
        );
    }
    match admin.delete_topic(&topic, false, None).await {
        Ok(deleted) => {
            let brokers: Vec<_> = deleted.iter().map(|d| d.broker_name.as_str()).collect();
            let text = format!("Topic {topic} deleted on {}.", brokers.join(", "));
            ctx.redirect("/topics", Flash::Done(text))
        }
        Err(e) => {
            // The broker's text names the CLI's --force, which the console
            // does not offer: say what the console can do.
            let busy = if e.code() == Some(txmq::ErrorCode::Busy) {
                format!(
                    " The console deletes no topic with pending transactions: end them on the \
                     Transactions page, or run `txmq topic delete {topic} --force`."
                )
            } else {
                String::new()
            };
            ctx.redirect(
                "/topics",
                Flash::Failed(format!(
                    "Topic {topic} not deleted: {}{busy}",
                    super::error_text(e)
                )),
            )
        }
    }
}
