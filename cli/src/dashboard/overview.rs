//! `/`: the brokers (role, address, epoch, heartbeat age, store size,
//! replication lag) and two charts of rates; `GET /api/overview` feeds the
//! charts' live refresh from the [`super::sampler`].

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::future::join_all;
use serde_json::{json, Value};
use txmq::{Admin, BrokerInfo, BrokerRole, ReplicationInfo};

use super::html::{self, esc};
use super::sampler::{Point, Snapshot};
use super::{AppState, Ctx};

/// One broker row.
struct Row {
    info: BrokerInfo,
    store_bytes: Option<u64>,
    /// Bytes behind (a slave) or the largest lag of its slaves (a master).
    lag: Result<Option<u64>, String>,
}

fn lag_of(r: &ReplicationInfo) -> Option<u64> {
    match r.role {
        BrokerRole::Slave => r.master_end.map(|end| end.saturating_sub(r.log_end)),
        BrokerRole::Master => r.replicas.iter().map(|x| x.lag_bytes).max(),
    }
}

async fn rows(admin: &Admin, snap: &Snapshot) -> Result<Vec<Row>, String> {
    let brokers = admin.cluster().await.map_err(super::error_text)?;
    let lags = join_all(
        brokers
            .iter()
            .map(|b| admin.replication(&b.broker_name, &b.addr)),
    )
    .await;
    Ok(brokers
        .into_iter()
        .zip(lags)
        .map(|(info, lag)| Row {
            // Counters are kept per broker name: the master's.
            store_bytes: (info.role == BrokerRole::Master)
                .then(|| snap.brokers.get(&info.broker_name).map(|c| c.store_bytes))
                .flatten(),
            lag: lag.map(|r| lag_of(&r)).map_err(super::error_text),
            info,
        })
        .collect())
}

fn role_name(r: BrokerRole) -> &'static str {
    match r {
        BrokerRole::Master => "master",
        BrokerRole::Slave => "slave",
    }
}

/// The attributes of the charts' newest point.
fn last_attrs(p: &Point) -> (String, String) {
    (
        format!("data-last-in=\"{:.2}\" data-last-out=\"{:.2}\"", p.msg_in, p.msg_out),
        format!(
            "data-last-prepared=\"{:.2}\" data-last-committed=\"{:.2}\" data-last-rolled-back=\"{:.2}\" data-last-parked=\"{:.2}\"",
            p.prepared, p.committed, p.rolled_back, p.parked
        ),
    )
}

/// `GET /`.
pub async fn page(State(app): State<AppState>, Extension(ctx): Extension<Ctx>) -> Response {
    let admin = match ctx.client() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let snap = app.sampler.snapshot();
    let mut body = String::new();
    match rows(&admin, &snap).await {
        Ok(rows) => {
            // A broker that did not answer is named, as on the other pages
            // (its row shows what the nameservers last heard).
            for r in &rows {
                if let Err(e) = &r.lag {
                    body.push_str(&html::error_div(&format!(
                        "Broker {} ({}) did not answer: {e}",
                        r.info.broker_name, r.info.addr
                    )));
                }
            }
            let rows: Vec<_> = rows
                .iter()
                .map(|r| {
                    let b = &r.info;
                    (
                        format!("data-broker=\"{}\"", esc(&b.broker_name)),
                        vec![
                            esc(&b.broker_name),
                            role_name(b.role).into(),
                            esc(&b.addr),
                            b.epoch.to_string(),
                            html::age(b.last_heartbeat_ms_ago),
                            r.store_bytes.map(html::bytes).unwrap_or_else(|| "—".into()),
                            match &r.lag {
                                Ok(Some(l)) => html::bytes(*l),
                                Ok(None) => "—".into(),
                                Err(e) => format!(
                                    "<span class=\"muted\" title=\"{}\">unknown</span>",
                                    esc(e)
                                ),
                            },
                        ],
                    )
                })
                .collect();
            body.push_str("<h2>Brokers</h2>");
            body.push_str(&html::table(
                "id=\"brokers\"",
                &[
                    "Name",
                    "Role",
                    "Address",
                    "Epoch",
                    "Heartbeat age",
                    "Store size",
                    "Replication lag",
                ],
                &rows,
            ));
        }
        Err(e) => body.push_str(&html::error_div(&format!("Cannot list the brokers: {e}"))),
    }
    if let Some(e) = &snap.error {
        let _ = write!(
            body,
            "<p class=\"muted\" id=\"sample-error\">{}</p>",
            esc(e)
        );
    }
    let last = snap.points.last().cloned().unwrap_or_default();
    let (msg_attrs, tx_attrs) = last_attrs(&last);
    let _ = write!(
        body,
        "<div class=\"charts\" data-api=\"/api/overview\">\
<figure><figcaption>Messages per second: <span class=\"legend in\">in</span> <span class=\"legend out\">out</span></figcaption>\
<svg id=\"chart-messages\" viewBox=\"0 0 600 200\" preserveAspectRatio=\"none\" {msg_attrs}></svg></figure>\
<figure><figcaption>Transactions per second: <span class=\"legend prepared\">prepared</span> <span class=\"legend committed\">committed</span> <span class=\"legend rolled-back\">rolled back</span> <span class=\"legend parked\">parked</span> · pending now <span id=\"pending-now\">{}</span></figcaption>\
<svg id=\"chart-transactions\" viewBox=\"0 0 600 200\" preserveAspectRatio=\"none\" {tx_attrs}></svg></figure></div>",
        last.pending
    );
    html::page(&ctx, StatusCode::OK, "Overview", "nav-overview", &body)
}

/// `GET /api/overview`: `{"brokers":[..], "rates":{"in","out"},
/// "series":[..]}` (series oldest first, at most ten minutes). Read from
/// the sampler only: a chart that refreshes asks no broker anything.
pub async fn api(State(app): State<AppState>) -> Response {
    let snap = app.sampler.snapshot();
    let mut brokers: Vec<_> = snap.brokers.values().collect();
    brokers.sort_by(|a, b| a.broker_name.cmp(&b.broker_name));
    let brokers: Vec<Value> = brokers
        .into_iter()
        .map(|c| {
            json!({
                "name": c.broker_name,
                "store_bytes": c.store_bytes,
                "messages_in": c.messages_in,
                "messages_out": c.messages_out,
                "pending": c.tx.pending,
            })
        })
        .collect();
    let last = snap.points.last().cloned().unwrap_or_default();
    Json(json!({
        "brokers": brokers,
        "rates": { "in": last.msg_in, "out": last.msg_out },
        "pending": last.pending,
        "series": snap.points,
        "error": snap.error,
    }))
    .into_response()
}
