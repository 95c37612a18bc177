//! `/transactions`: pending and parked transactions of every broker,
//! oldest first, paged, with the counters; `/transactions/{broker}/{id}`:
//! one transaction's half messages, properties and check history, and
//! commit, roll back or re-check, each behind a confirmation that says
//! what will happen.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use txmq::{TxAction, TxDetail, TxInfo, TxState};

use super::html::{self, esc, url, Flash};
use super::{page_of, AppState, Ctx};

/// A broker name as a URL may carry it.
fn broker_check(broker: &str) -> Result<(), String> {
    if broker.is_empty() || broker.len() > 255 || broker.chars().any(char::is_control) {
        return Err(format!("{broker:?} is not a broker name"));
    }
    Ok(())
}

/// The broker and transaction id of a URL, or a 400 page.
fn ids(ctx: &Ctx, broker: &str, id: &str) -> Result<u64, Response> {
    let bad = |text: String| html::error_page(ctx, StatusCode::BAD_REQUEST, "Transaction", &text);
    broker_check(broker).map_err(bad)?;
    id.parse::<u64>().map_err(|_| {
        bad(format!(
            "{id:?} is not a transaction id (a whole number, as listed under Transactions)."
        ))
    })
}

fn state_name(s: TxState) -> &'static str {
    match s {
        TxState::Prepared => "pending",
        other => other.name(),
    }
}

/// `GET /transactions?state=pending|parked&sort=age|-age&page=N`.
pub async fn list(
    State(app): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let bad = |text: String| html::error_page(&ctx, StatusCode::BAD_REQUEST, "Transactions", &text);
    let page = match page_of(&q) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let wanted = match q.get("state").map(String::as_str).unwrap_or("") {
        "" | "all" => None,
        "pending" => Some(TxState::Prepared),
        "parked" => Some(TxState::Parked),
        other => return bad(format!("state {other:?} is not pending, parked or all")),
    };
    let newest_first = match q.get("sort").map(String::as_str).unwrap_or("age") {
        "age" => false,
        "-age" => true,
        other => return bad(format!("sort {other:?} is not age (oldest first) or -age")),
    };
    let mut body = String::new();
    if let Some(p) = app.sampler.last_point() {
        let _ = write!(
            body,
            "<p id=\"tx-rates\" class=\"muted\">Per second now: prepared {:.1}, committed {:.1}, rolled back {:.1}, parked {:.1}</p>",
            p.prepared, p.committed, p.rolled_back, p.parked
        );
    }
    match admin
        // Filtered by the brokers, before each cuts its list at 1,000: a
        // parked one behind many pending ones is listed.
        .list_transactions_by_broker(
            txmq::ListTransactions {
                state: wanted,
                ..txmq::ListTransactions::default()
            },
            None,
        )
        .await
    {
        Ok(answers) => {
            let lists = super::answered(answers, None, &mut body);
            let mut counters = txmq::TxCounters::default();
            let mut all: Vec<(&str, &TxInfo)> = Vec::new();
            for l in &lists {
                let c = &l.counters;
                counters.prepared += c.prepared;
                counters.committed += c.committed;
                counters.rolled_back += c.rolled_back;
                counters.checks_sent += c.checks_sent;
                counters.parked += c.parked;
                counters.pending += c.pending;
                for t in &l.transactions {
                    if wanted.is_none_or(|w| t.state == w) {
                        all.push((l.broker_name.as_str(), t));
                    }
                }
            }
            let _ = write!(
                body,
                "<table id=\"tx-counters\"><tr><th>Pending now</th><th>Prepared</th><th>Committed</th><th>Rolled back</th><th>Checks sent</th><th>Parked</th></tr>\
<tr><td class=\"num\" id=\"count-pending\">{}</td><td class=\"num\" id=\"count-prepared\">{}</td><td class=\"num\" id=\"count-committed\">{}</td><td class=\"num\" id=\"count-rolled-back\">{}</td><td class=\"num\" id=\"count-checks\">{}</td><td class=\"num\" id=\"count-parked\">{}</td></tr></table>\
<p class=\"muted\">Counts since each broker started.</p>",
                counters.pending,
                counters.prepared,
                counters.committed,
                counters.rolled_back,
                counters.checks_sent,
                counters.parked
            );
            // A broker lists its oldest 1,000 only: say so, or the list and
            // the counter above it would disagree without a word.
            for l in &lists {
                let listed = l.transactions.len() as u64;
                // What the broker's filters kept in all (0 when none
                // matched: the pending counter in its place named parked
                // transactions a state filter had left out).
                let matching = l.matching;
                if listed < matching {
                    let _ = write!(
                        body,
                        "<p class=\"muted tx-truncated\" data-broker=\"{}\">Broker {} lists its oldest {listed} of {} transactions shown here; the newer ones appear as these end. Sorting applies to those listed.</p>",
                        esc(&l.broker_name),
                        esc(&l.broker_name),
                        matching
                    );
                }
            }
            // Oldest first; the age alone orders ids of different brokers.
            all.sort_by(|a, b| b.1.age_ms.cmp(&a.1.age_ms).then(a.0.cmp(b.0)));
            if newest_first {
                all.reverse();
            }
            let state_q = q.get("state").map(String::as_str).unwrap_or("");
            let _ = write!(
                body,
                "<form id=\"filter-transactions\" class=\"inline\" method=\"get\" action=\"/transactions\">\
<label>State <select name=\"state\"><option value=\"all\">all</option><option value=\"pending\"{}>pending</option><option value=\"parked\"{}>parked</option></select></label>\
<label>Order <select name=\"sort\"><option value=\"age\">oldest first</option><option value=\"-age\"{}>newest first</option></select></label>\
<button type=\"submit\">Show</button></form>",
                if state_q == "pending" { " selected" } else { "" },
                if state_q == "parked" { " selected" } else { "" },
                if newest_first { " selected" } else { "" },
            );
            let rows: Vec<_> = html::paged(&all, page, app.page_size)
                .iter()
                .map(|(broker, t)| {
                    let link = format!("/transactions/{}/{}", url(broker), t.tx_id);
                    (
                        format!(
                            "data-tx-id=\"{}\" data-broker=\"{}\" data-state=\"{}\"",
                            t.tx_id,
                            esc(broker),
                            state_name(t.state)
                        ),
                        vec![
                            format!("<a href=\"{link}\">{}</a>", t.tx_id),
                            esc(broker),
                            esc(&t.producer_group),
                            state_name(t.state).into(),
                            format!(
                                "<td class=\"num age\" data-age-ms=\"{}\">{}</td>",
                                t.age_ms,
                                html::age(t.age_ms)
                            ),
                            esc(&t.topics.join(", ")),
                            esc(&t
                                .msg_ids
                                .iter()
                                .map(|m| m.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")),
                        ],
                    )
                })
                .collect();
            body.push_str(&html::table(
                "id=\"transactions\"",
                &[
                    "Id",
                    "Broker",
                    "Producer group",
                    "State",
                    "Age",
                    "Topic",
                    "Message id",
                ],
                &rows,
            ));
            let mut query = Vec::new();
            if let Some(s) = q.get("state") {
                query.push(format!("state={}", url(s)));
            }
            if newest_first {
                query.push("sort=-age".into());
            }
            body.push_str(&html::pager(
                "/transactions",
                &query.join("&"),
                page,
                app.page_size,
                all.len(),
            ));
        }
        Err(e) => body.push_str(&html::error_div(&format!(
            "Cannot list the transactions: {}",
            super::error_text(e)
        ))),
    }
    html::page(
        &ctx,
        StatusCode::OK,
        "Transactions",
        "nav-transactions",
        &body,
    )
}

/// The transaction `id` on `broker`, or the error text.
async fn detail(admin: &txmq::Admin, broker: &str, id: u64) -> Result<TxDetail, (bool, String)> {
    match admin.show_transaction(id, Some(broker)).await {
        Ok(found) => found.into_iter().next().ok_or((
            true,
            format!("broker {broker} does not know transaction {id}"),
        )),
        Err(e) => {
            let unknown = matches!(
                e.code(),
                Some(txmq::ErrorCode::UnknownTransaction | txmq::ErrorCode::UnknownTopic)
            ) || matches!(e, txmq::Error::UnknownBroker { .. });
            Err((unknown, super::error_text(e)))
        }
    }
}

/// `GET /transactions/{broker}/{id}`.
pub async fn show(
    Extension(ctx): Extension<Ctx>,
    Path((broker, id)): Path<(String, String)>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = match ids(&ctx, &broker, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let title = format!("Transaction {id} on {broker}");
    let d = match detail(&admin, &broker, id).await {
        Ok(d) => d,
        Err((unknown, text)) => {
            let status = if unknown {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            return html::error_page(&ctx, status, &title, &text);
        }
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<table id=\"transaction\"><tr><th>State</th><td id=\"tx-state\">{}</td></tr>\
<tr><th>Producer group</th><td>{}</td></tr><tr><th>Age</th><td>{}</td></tr>\
<tr><th>Checks</th><td>{}</td></tr><tr><th>Next check</th><td>{}</td></tr>",
        state_name(d.state),
        esc(d.producer_group.as_deref().unwrap_or("—")),
        d.age_ms.map(html::age).unwrap_or_else(|| "—".into()),
        d.checks,
        d.next_check_at_ms
            .map(|ms| esc(&crate::output::time_text(ms)))
            .unwrap_or_else(|| "—".into()),
    );
    if let Some(end) = &d.ended {
        let _ = write!(
            body,
            "<tr><th>Ended by</th><td id=\"tx-ended-by\">{}{}</td></tr>",
            end.by.name(),
            end.at_ms
                .map(|ms| format!(" at {}", esc(&crate::output::time_text(ms))))
                .unwrap_or_default()
        );
    }
    body.push_str("</table>");
    let open = matches!(d.state, TxState::Prepared | TxState::Parked);
    if open {
        let base = format!("/transactions/{}/{id}/confirm", url(&broker));
        let _ = write!(
            body,
            "<p class=\"actions\"><a id=\"commit\" class=\"button\" href=\"{base}?action=commit\">Commit…</a> \
<a id=\"rollback\" class=\"button danger\" href=\"{base}?action=rollback\">Roll back…</a> \
<a id=\"recheck\" class=\"button\" href=\"{base}?action=recheck\">Check back now…</a></p>"
        );
    } else {
        body.push_str("<p class=\"muted\">This transaction has ended: nothing to resolve.</p>");
    }
    body.push_str("<h2>Half messages</h2>");
    for (i, m) in d.messages.iter().enumerate() {
        let msg = &m.message;
        let _ = write!(
            body,
            "<section class=\"half-message\" data-msg-id=\"{id_s}\"><h3>Message <a href=\"/messages/{id_s}\">{id_s}</a></h3>\
<p>Topic <span class=\"topic\">{}</span>, queue {}, key {}, tag {}</p><pre class=\"body\" id=\"body-{i}\">{}</pre>",
            esc(&msg.topic),
            m.queue,
            esc(msg.key.as_deref().unwrap_or("—")),
            esc(msg.tag.as_deref().unwrap_or("—")),
            esc(&super::messages::body_text(&msg.body)),
            id_s = msg.msg_id,
        );
        let rows: Vec<_> = msg
            .properties
            .iter()
            .map(|(k, v)| (format!("data-key=\"{}\"", esc(k)), vec![esc(k), esc(v)]))
            .collect();
        body.push_str(&html::table(
            &format!("class=\"properties\" id=\"properties-{i}\""),
            &["Property", "Value"],
            &rows,
        ));
        body.push_str("</section>");
    }
    let rows: Vec<_> = d
        .history
        .iter()
        .map(|c| {
            (
                String::new(),
                vec![
                    esc(&crate::output::time_text(c.at_ms)),
                    if c.sent { "yes" } else { "no" }.into(),
                    c.answer.map(|a| a.name()).unwrap_or("—").into(),
                    esc(c.error.as_deref().unwrap_or("")),
                    c.times.to_string(),
                ],
            )
        })
        .collect();
    body.push_str("<h2>Check history</h2>");
    body.push_str(&html::table(
        "id=\"check-history\"",
        &["When", "Sent", "Answer", "Error", "Times"],
        &rows,
    ));
    html::page(&ctx, StatusCode::OK, &title, "nav-transactions", &body)
}

fn action_of(q: &HashMap<String, String>) -> Result<&'static str, String> {
    match q.get("action").map(String::as_str).unwrap_or("") {
        "commit" => Ok("commit"),
        "rollback" => Ok("rollback"),
        "recheck" => Ok("recheck"),
        other => Err(format!("{other:?} is not commit, rollback or recheck")),
    }
}

/// `GET /transactions/{broker}/{id}/confirm?action=commit|rollback|recheck`.
pub async fn confirm(
    Extension(ctx): Extension<Ctx>,
    Path((broker, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = match ids(&ctx, &broker, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let action = match action_of(&q) {
        Ok(a) => a,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Transaction", &e),
    };
    let title = format!("Transaction {id} on {broker}");
    let d = match detail(&admin, &broker, id).await {
        Ok(d) => d,
        Err((unknown, text)) => {
            let status = if unknown {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            return html::error_page(&ctx, status, &title, &text);
        }
    };
    let mut topics: Vec<&str> = d
        .messages
        .iter()
        .map(|m| m.message.topic.as_str())
        .collect();
    topics.dedup();
    let topics = if topics.is_empty() {
        "its topic".to_string()
    } else {
        format!("topic {}", topics.join(", "))
    };
    let text = match action {
        "commit" => format!("Commit transaction {id} on {broker}: its message(s) to {topics} become visible to consumers."),
        "rollback" => format!("Roll back transaction {id} on {broker}: its message(s) to {topics} are dropped and never delivered."),
        _ => format!("Check back transaction {id} on {broker} now: the broker asks a producer of group {} for its outcome, with a fresh allowance of checks (a parked transaction is un-parked).", d.producer_group.as_deref().unwrap_or("?")),
    };
    html::confirm(
        &ctx,
        &format!("{title}: confirm"),
        "nav-transactions",
        &text,
        &format!("/transactions/{}/{id}/confirm", url(&broker)),
        &[("action", action)],
        &format!("/transactions/{}/{id}", url(&broker)),
    )
}

/// `POST /transactions/{broker}/{id}/confirm` with `action`.
pub async fn resolve(
    Extension(ctx): Extension<Ctx>,
    Path((broker, id)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = match ids(&ctx, &broker, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let action = match action_of(&f) {
        Ok(a) => a,
        Err(e) => return html::error_page(&ctx, StatusCode::BAD_REQUEST, "Transaction", &e),
    };
    let back = format!("/transactions/{}/{id}", url(&broker));
    let flash = match action {
        "recheck" => match admin.recheck_transaction(id, Some(&broker)).await {
            Ok(r) => Flash::Done(format!(
                "Transaction {id} on {} is being checked back now (it was {}).",
                r.broker_name,
                state_name(r.previous)
            )),
            Err(e) => Flash::Failed(format!(
                "Transaction {id} not re-checked: {}",
                super::error_text(e)
            )),
        },
        _ => {
            let tx_action = if action == "commit" {
                TxAction::Commit
            } else {
                TxAction::Rollback
            };
            match admin
                .resolve_transaction(id, tx_action, Some(&broker))
                .await
            {
                Ok((name, ended)) if ended.already => {
                    let code = if ended.state == TxState::Committed {
                        "TRANSACTION_COMMITTED"
                    } else {
                        "TRANSACTION_ROLLED_BACK"
                    };
                    Flash::Failed(format!(
                        "{code}: transaction {id} on {name} had already ended ({}); nothing was changed.",
                        ended.state.name()
                    ))
                }
                Ok((name, ended)) => Flash::Done(format!(
                    "Transaction {id} on {name}: {}.",
                    if ended.state == TxState::Committed {
                        "committed, its messages are visible to consumers"
                    } else {
                        "rolled back, its messages are dropped"
                    }
                )),
                Err(e) => Flash::Failed(format!(
                    "Transaction {id} not {}: {}; nothing was changed.",
                    if action == "commit" {
                        "committed"
                    } else {
                        "rolled back"
                    },
                    super::error_text(e)
                )),
            }
        }
    };
    ctx.redirect(&back, flash)
}
