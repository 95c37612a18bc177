//! Sessions: a random id in an HttpOnly, SameSite=Strict cookie; each
//! session holds its form token (every POST must carry it), a one-shot
//! flash for the page after an action, and, under an ACL, the client
//! built with the visitor's credentials, so that the brokers' ACL decides
//! what the visitor sees and may do. Also /login and /logout.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use ring::rand::{SecureRandom, SystemRandom};
use txmq::{Admin, Credentials};

use super::html::{self, esc, Flash};
use super::{App, AppState};

/// The session cookie's name.
const COOKIE: &str = "txmq_session";
/// A session unused this long is forgotten (and its client closed).
const IDLE: Duration = Duration::from_secs(8 * 3600);
/// At most this many sessions are kept; beyond, the oldest anonymous
/// ones are forgotten (a signed-in visitor is never signed out by it).
const MAX_SESSIONS: usize = 10_000;

/// One visitor.
pub struct Session {
    /// Random, 128 bits, hex.
    pub id: String,
    /// The form token, random, 128 bits, hex.
    pub csrf: String,
    /// The signed-in user's name and client.
    user: Mutex<Option<(String, Arc<Admin>)>>,
    flash: Mutex<Option<Flash>>,
    last_used: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// The flash to show on the next page, taken.
    pub fn take_flash(&self) -> Option<Flash> {
        lock(&self.flash).take()
    }

    /// Shows `flash` on the next page this session sees.
    pub fn flash(&self, flash: Flash) {
        *lock(&self.flash) = Some(flash);
    }

    fn close(&self) {
        if let Some((_, admin)) = lock(&self.user).take() {
            // Called from sync code (sign-out, expiry): the admin drains
            // its requests in flight on its own.
            tokio::spawn(async move { admin.close().await.ok() });
        }
    }
}

/// 16 random bytes from the system's CSPRNG, as hex.
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // Never seen on Linux (getrandom); a session must not get a guessable id.
        panic!("the system's random number generator failed");
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Compares two tokens in time that does not depend on where they differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Every live session, by id.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Arc<Session>>>,
    /// When idle sessions were last forgotten.
    pruned: Mutex<Option<Instant>>,
}

impl Sessions {
    /// The session `id`, if it is live.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let s = lock(&self.by_id).get(id).cloned()?;
        *lock(&s.last_used) = Instant::now();
        Some(s)
    }

    /// A new session; sessions idle for long are forgotten on the way.
    pub fn start(&self) -> Arc<Session> {
        let s = Arc::new(Session {
            id: random_hex(),
            csrf: random_hex(),
            user: Mutex::new(None),
            flash: Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
        });
        let mut by_id = lock(&self.by_id);
        // Idle sessions are looked for once a minute, not on every start.
        let mut pruned = lock(&self.pruned);
        if pruned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *pruned = Some(Instant::now());
            by_id.retain(|_, old| {
                let live = lock(&old.last_used).elapsed() < IDLE;
                if !live {
                    old.close();
                }
                live
            });
        }
        drop(pruned);
        if by_id.len() >= MAX_SESSIONS {
            // Visitors without a cookie (scripts, probes) each start one:
            // the oldest of those not signed in make room.
            let mut anonymous: Vec<(Instant, String)> = by_id
                .values()
                .filter(|old| lock(&old.user).is_none())
                .map(|old| (*lock(&old.last_used), old.id.clone()))
                .collect();
            anonymous.sort_unstable();
            let excess = by_id.len() + 1 - MAX_SESSIONS / 2;
            for (_, id) in anonymous.into_iter().take(excess) {
                by_id.remove(&id);
            }
        }
        by_id.insert(s.id.clone(), s.clone());
        s
    }

    /// Forgets session `id`, closing its user's client.
    pub fn end(&self, id: &str) {
        if let Some(s) = lock(&self.by_id).remove(id) {
            s.close();
        }
    }

    /// A signed-in user's client, any (the sampler uses it when the
    /// dashboard has no credentials of its own).
    pub fn any_client(&self) -> Option<Arc<Admin>> {
        lock(&self.by_id)
            .values()
            .find_map(|s| lock(&s.user).as_ref().map(|(_, a)| a.clone()))
    }

    /// Closes every signed-in user's client.
    pub fn close_all(&self) {
        for s in lock(&self.by_id).values() {
            s.close();
        }
    }
}

/// The session id of the request's cookie.
pub fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })
}

/// The `Set-Cookie` value for session `id`.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict")
}

/// What a handler knows of the request's visitor.
#[derive(Clone)]
pub struct Ctx {
    /// The visitor's session.
    pub session: Arc<Session>,
    /// The client to ask the cluster with: the signed-in user's, or the
    /// dashboard's own; `None` until a required sign-in.
    pub admin: Option<Arc<Admin>>,
    /// The signed-in user, if any.
    pub user: Option<String>,
}

impl Ctx {
    /// The context of `session`.
    pub fn new(app: &App, session: Arc<Session>) -> Ctx {
        let (user, admin) = match lock(&session.user).as_ref() {
            Some((user, admin)) => (Some(user.clone()), Some(admin.clone())),
            None => (None, app.global()),
        };
        Ctx {
            session,
            admin,
            user,
        }
    }

    /// The hidden input every POST form carries.
    pub fn csrf_input(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            esc(&self.session.csrf)
        )
    }

    /// The client; the guard lets no request without one reach a page.
    pub fn client(&self) -> Result<Arc<Admin>, Response> {
        self.admin
            .clone()
            .ok_or_else(|| Redirect::to("/login").into_response())
    }

    /// Redirects (303) to `to`, showing `flash` there.
    pub fn redirect(&self, to: &str, flash: Flash) -> Response {
        self.session.flash(flash);
        Redirect::to(to).into_response()
    }
}

fn login_form(ctx: &Ctx, status: StatusCode, error: Option<&str>, access_key: &str) -> Response {
    let mut body = String::new();
    if let Some(e) = error {
        body.push_str(&html::error_div(e));
    }
    let _ = write!(
        body,
        "<p>The cluster's ACL decides what you see and may change.</p>\
<form id=\"login-form\" method=\"post\" action=\"/login\">{}\
<label>Access key <input name=\"access_key\" value=\"{}\" autocomplete=\"username\" required></label>\
<label>Secret key <input name=\"secret_key\" type=\"password\" autocomplete=\"current-password\" required></label>\
<button type=\"submit\" id=\"login\">Sign in</button></form>",
        ctx.csrf_input(),
        esc(access_key)
    );
    html::page(ctx, status, "Sign in", "", &body)
}

/// `GET /login`.
pub async fn login_page(Extension(ctx): Extension<Ctx>) -> Response {
    login_form(&ctx, StatusCode::OK, None, "")
}

/// `POST /login`: builds a client with the credentials and checks them
/// with the nameservers before keeping it.
pub async fn login(
    State(app): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let access_key = form.get("access_key").map(|s| s.trim()).unwrap_or("");
    let secret_key = form.get("secret_key").map(String::as_str).unwrap_or("");
    if access_key.is_empty() || secret_key.is_empty() {
        return login_form(
            &ctx,
            StatusCode::BAD_REQUEST,
            Some("Give both the access key and the secret key."),
            access_key,
        );
    }
    let mut config = app.config.clone();
    config.credentials = Some(Credentials {
        access_key: access_key.to_string(),
        secret_key: secret_key.to_string(),
    });
    let checked = match Admin::with_config(config).await {
        Ok(admin) => match admin.cluster().await {
            Ok(_) => Ok(admin),
            Err(e) => {
                admin.close().await.ok();
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    match checked {
        Ok(admin) => {
            // A new session (id and form token) for the signed-in user: an
            // id known before the sign-in is worth nothing after it.
            app.sessions.end(&ctx.session.id);
            let session = app.sessions.start();
            *lock(&session.user) = Some((access_key.to_string(), Arc::new(admin)));
            session.flash(Flash::Done(format!("Signed in as {access_key}.")));
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = header::HeaderValue::from_str(&set_cookie(&session.id)) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            response
        }
        Err(e) => {
            let text = format!("Sign-in failed: {}", super::error_text(e));
            login_form(&ctx, StatusCode::UNAUTHORIZED, Some(&text), access_key)
        }
    }
}

/// `POST /logout`.
pub async fn logout(Extension(ctx): Extension<Ctx>) -> Response {
    ctx.session.close();
    ctx.redirect("/login", Flash::Done("Signed out.".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let a = random_hex();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex());
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &a[..31]));
        assert!(!same_token("", &a));
    }

    #[test]
    fn anonymous_sessions_are_bounded() {
        let sessions = Sessions::default();
        let first = sessions.start();
        for _ in 0..MAX_SESSIONS + 10 {
            sessions.start();
        }
        let kept = lock(&sessions.by_id).len();
        assert!(kept <= MAX_SESSIONS, "{kept}");
        assert!(sessions.get(&first.id).is_none(), "the oldest went first");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; txmq_session=abc; b=2"
                .parse()
                .unwrap_or_else(|_| panic!()),
        );
        assert_eq!(cookie_of(&h).as_deref(), Some("abc"));
        assert!(set_cookie("abc").contains("HttpOnly; SameSite=Strict"));
    }
}
