//! `txmq dashboard`: a web console for the cluster, served by axum.
//!
//! The dashboard is a client of the cluster, as the other commands are: it
//! asks the nameservers and brokers through [`txmq::Admin`] on each page
//! view, and keeps only two things itself: the sessions (with each one's
//! form token and, under an ACL, the signed-in user's client) and the
//! [`sampler`]'s ring buffer of rates (one task, every 2 s).
//!
//! Pages are written on the server ([`html`]); one small script redraws
//! the charts from `GET /api/overview`. Start reading at [`router`]; each
//! page area has its file.

// Helpers return a whole page as their error: it is the handler's early
// return, built once per request, never a hot path.
#![allow(clippy::result_large_err)]

mod dead_letters;
mod groups;
mod html;
mod messages;
mod overview;
mod sampler;
mod session;
mod topics;
mod transactions;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use txmq::{Admin, ClientConfig};

use crate::args::GlobalArgs;
pub use session::Ctx;
use session::{Session, Sessions};

/// Flags of `txmq dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Address to serve the dashboard on. Loopback by default: the pages
    /// can change the cluster, so another address is logged as a warning.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Ask each visitor for an access key and secret (/login) and act
    /// with those credentials. Without it, the dashboard asks for them
    /// only when it has none (no --access-key) and the cluster demands
    /// them.
    #[arg(long)]
    pub login: bool,
    /// Rows on one page of a long list.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: u16,
}

/// What every handler shares.
pub struct App {
    /// Client settings of the global flags; a login replaces the
    /// credentials.
    config: ClientConfig,
    /// The dashboard's own client (of the global flags), as far as it has
    /// one.
    own: std::sync::Mutex<Own>,
    sessions: Sessions,
    sampler: sampler::Sampler,
    page_size: usize,
}

/// The dashboard's own client.
enum Own {
    /// Visitors sign in (`--login`, or the cluster demands it).
    Login,
    /// No nameserver answered yet: why the last try failed. The sampler
    /// tries again on each tick, and pages say so meanwhile.
    Waiting(String),
    Ready(Arc<Admin>),
}

impl App {
    fn own(&self) -> std::sync::MutexGuard<'_, Own> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dashboard's own client, when it has one and may use it.
    fn global(&self) -> Option<Arc<Admin>> {
        match &*self.own() {
            Own::Ready(admin) => Some(admin.clone()),
            Own::Login | Own::Waiting(_) => None,
        }
    }

    /// Why the dashboard has no client yet, while it waits for a nameserver.
    fn waiting(&self) -> Option<String> {
        match &*self.own() {
            Own::Waiting(why) => Some(why.clone()),
            Own::Login | Own::Ready(_) => None,
        }
    }

    /// Tries again to reach the nameservers, when the dashboard waits for
    /// them.
    async fn reconnect(&self) {
        if self.waiting().is_some() {
            if let Ok(own) = connect(&self.config).await {
                *self.own() = own;
            }
        }
    }
}

/// The dashboard's own client for `config`: an error only for settings no
/// retry mends.
async fn connect(config: &ClientConfig) -> Result<Own> {
    match Admin::with_config(config.clone()).await {
        Ok(a) => {
            tracing::info!("connected to the nameservers");
            Ok(Own::Ready(Arc::new(a)))
        }
        Err(e) if config.credentials.is_none() && needs_login(&e) => {
            tracing::info!("the cluster demands authentication: visitors sign in at /login");
            Ok(Own::Login)
        }
        Err(e) if worth_waiting(&e) => Ok(Own::Waiting(error_text(e))),
        Err(e) => Err(e).context("cannot reach the nameservers"),
    }
}

/// Whether trying again later may reach the nameservers: nothing listened
/// (the system refused the connection), or the connection timed out or
/// closed. Not a refusal or a TLS failure, which only the settings mend.
fn worth_waiting(e: &txmq::Error) -> bool {
    use txmq::RemotingError as R;
    match e {
        txmq::Error::Remoting(R::Connect { message, .. }) => {
            message.contains("(os error") || message == "timed out"
        }
        txmq::Error::Remoting(R::Timeout { .. } | R::Closed { .. }) => true,
        _ => false,
    }
}

type AppState = Arc<App>;

/// Serves the dashboard until Ctrl-C or SIGTERM. Nameservers that cannot
/// be reached yet are tried again every few seconds, and pages say so
/// meanwhile.
///
/// # Errors
/// The listen address cannot be bound; bad security flags.
pub async fn run(global: &GlobalArgs, args: DashboardArgs) -> Result<()> {
    let config = global.client_config()?;
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "the dashboard listens on a non-loopback address: anyone who reaches it can change the cluster (use --login with an ACL, and TLS in front)");
    }
    let own = if args.login {
        Own::Login
    } else {
        connect(&config).await?
    };
    if let Own::Waiting(why) = &own {
        tracing::warn!(
            "cannot reach the nameservers yet ({why}): trying again every {} s, pages say so meanwhile",
            SAMPLE_EVERY.as_secs()
        );
    }
    let app = Arc::new(App {
        config,
        own: std::sync::Mutex::new(own),
        sessions: Sessions::default(),
        sampler: sampler::Sampler::default(),
        page_size: usize::from(args.page_size),
    });
    let sampling = tokio::spawn(sampler::run(app.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    println!("dashboard listening on http://{bound}");
    let served = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(crate::signal::interrupted())
        .await;
    sampling.abort();
    if let Some(a) = app.global() {
        a.close().await.ok();
    }
    app.sessions.close_all();
    served.context("the dashboard's server failed")
}

/// True for a refusal that signing in would cure.
fn needs_login(e: &txmq::Error) -> bool {
    matches!(
        e.code(),
        Some(txmq::ErrorCode::AuthenticationFailed | txmq::ErrorCode::AccessDenied)
    ) || e.to_string().contains("AUTHENTICATION_FAILED")
}

/// Every route of the dashboard.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/api/overview", get(overview::api))
        .route("/topics", get(topics::list).post(topics::create))
        .route("/topics/{topic}", get(topics::show))
        .route(
            "/topics/{topic}/delete",
            get(topics::confirm_delete).post(topics::delete),
        )
        .route("/groups", get(groups::list))
        .route("/groups/{group}", get(groups::show))
        .route("/groups/{group}/reset", post(groups::reset))
        .route("/transactions", get(transactions::list))
        .route("/transactions/{broker}/{id}", get(transactions::show))
        .route(
            "/transactions/{broker}/{id}/confirm",
            get(transactions::confirm).post(transactions::resolve),
        )
        .route("/messages", get(messages::search))
        .route("/messages/{id}", get(messages::show))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/{group}", get(dead_letters::show))
        .route(
            "/dead-letters/{group}/resend",
            get(dead_letters::confirm).post(dead_letters::resend),
        )
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/assets/dashboard.css", get(css))
        .route("/assets/dashboard.js", get(js))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/dashboard.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/dashboard.js"),
    )
        .into_response()
}

async fn not_found(axum::Extension(ctx): axum::Extension<Ctx>, req: Request) -> Response {
    let text = format!("There is no page at {}.", req.uri().path());
    html::error_page(&ctx, StatusCode::NOT_FOUND, "Not found", &text)
}

/// Form bodies larger than this are refused (the largest form is a
/// handful of short fields).
const MAX_FORM: usize = 64 * 1024;

/// Runs before every handler: finds or starts the visitor's session,
/// refuses a POST that is not a form of this dashboard (its token, and the
/// `Origin` header when the browser sends one), sends visitors who must
/// sign in to /login, and hands the handler its [`Ctx`].
async fn guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let cookie = session::cookie_of(req.headers());
    let (session, fresh) = match cookie.and_then(|id| app.sessions.get(&id)) {
        Some(s) => (s, false),
        None => (app.sessions.start(), true),
    };
    let ctx = Ctx::new(&app, session.clone());
    let path = req.uri().path().to_string();
    let mut req = req;
    if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let forged = |why: &str| {
            let text = format!("Refused: the form was not from this dashboard ({why}). Nothing was changed; reload the page and try again.");
            html::error_page(&ctx, StatusCode::FORBIDDEN, "Forbidden", &text)
        };
        if let Some(origin) = parts.headers.get(header::ORIGIN) {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            let same = match (origin.to_str().ok(), host) {
                (Some(o), Some(h)) => o == format!("http://{h}") || o == format!("https://{h}"),
                _ => false,
            };
            if !same {
                return with_cookie(forged("it came from another site"), &session, fresh);
            }
        }
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            return with_cookie(forged("the form could not be read"), &session, fresh);
        };
        let fields: HashMap<String, String> = serde_urlencoded_pairs(&bytes).into_iter().collect();
        let token_ok = fields
            .get("csrf")
            .is_some_and(|t| session::same_token(t, &session.csrf));
        if !token_ok {
            return with_cookie(
                forged("its form token is missing or wrong"),
                &session,
                fresh,
            );
        }
        req = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    let public = path == "/login" || path.starts_with("/assets/");
    if ctx.admin.is_none() && !public {
        let response = match app.waiting() {
            // A script reading the API gets JSON, not a page.
            Some(why) if path.starts_with("/api/") => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({
                    "error": format!("the dashboard cannot reach the nameservers yet: {why}"),
                })),
            )
                .into_response(),
            Some(why) => html::error_page(
                &ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                "Nameservers not reachable",
                &format!(
                    "The dashboard cannot reach the nameservers yet: {why}. It tries again every {} s; reload this page in a moment.",
                    SAMPLE_EVERY.as_secs()
                ),
            ),
            None => Redirect::to("/login").into_response(),
        };
        return with_cookie(response, &session, fresh);
    }
    req.extensions_mut().insert(ctx);
    let mut response = next.run(req).await;
    // Pages hold tokens and cluster data: never cached, never framed.
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    with_cookie(response, &session, fresh)
}

/// `response` with the session cookie set, when the session is new.
fn with_cookie(mut response: Response, session: &Session, fresh: bool) -> Response {
    if fresh {
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&session.id)) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

/// The fields of an `application/x-www-form-urlencoded` body (none when
/// it is not one: the token check then refuses it).
fn serde_urlencoded_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(bytes).unwrap_or_default()
}

/// Page number of `?page=` (from 1), or a message for a bad one.
fn page_of(q: &HashMap<String, String>) -> Result<usize, String> {
    match q.get("page").map(String::as_str) {
        None | Some("") => Ok(1),
        Some(p) => match p.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("page {p:?} is not a page number (1, 2, ...)")),
        },
    }
}

/// How long the sampler waits between two samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The answers of the brokers that gave one, in order; each broker that did
/// not (or refused) is named in a warning on the page, as the command line
/// names it on stderr, so that one broker down does not blank the page.
/// An answer with the error `skip` (the broker has no such topic) is
/// neither.
fn answered<T>(
    answers: Vec<txmq::admin::BrokerAnswer<T>>,
    skip: Option<txmq::ErrorCode>,
    body: &mut String,
) -> Vec<T> {
    let mut out = Vec::new();
    for a in answers {
        match a.result {
            Ok(v) => out.push(v),
            Err(e) if skip.is_some() && e.code() == skip => {}
            Err(e) => body.push_str(&html::error_div(&format!(
                "Broker {} ({}) is left out: {}",
                a.broker_name,
                a.addr,
                error_text(e)
            ))),
        }
    }
    out
}

/// A cluster error as the page shows it: what failed and why, with the
/// wire code; an ACL refusal reads "not permitted".
fn error_text(e: txmq::Error) -> String {
    let denied = e.code() == Some(txmq::ErrorCode::AccessDenied);
    let text = crate::output::error_text(&anyhow::Error::new(e));
    if denied {
        format!("not permitted: {text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq::RemotingError as R;

    #[test]
    fn only_an_unreachable_nameserver_is_waited_for() {
        let connect = |message: &str| {
            txmq::Error::Remoting(R::Connect {
                addr: "127.0.0.1:9876".into(),
                message: message.into(),
            })
        };
        assert!(worth_waiting(&connect("Connection refused (os error 111)")));
        assert!(worth_waiting(&connect("timed out")));
        assert!(worth_waiting(&txmq::Error::Remoting(R::Timeout {
            kind: "Hello",
            peer: "127.0.0.1:9876".into(),
            after: Duration::from_secs(3),
        })));
        // Settings no retry mends: a certificate, a refusal.
        assert!(!worth_waiting(&connect(
            "invalid peer certificate: UnknownIssuer"
        )));
        assert!(!worth_waiting(&txmq::Error::Remoting(R::Remote(
            txmq::WireError::new(txmq::ErrorCode::AuthenticationFailed, "bad signature")
        ))));
    }
}
