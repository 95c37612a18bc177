//! Refusals the client library only logs: a consumer's heartbeats and
//! pulls are retried in the background, and a failure there is a warning,
//! not an error anyone receives. For a command that is right for a broker
//! that restarts, and wrong for `ACCESS_DENIED` or `AUTHENTICATION_FAILED`,
//! which no retry cures: a user without the group's `sub` would wait for
//! messages that never come and exit 0. This tracing layer notices such a
//! refusal in any logged `error` field, so that the command can end with
//! it (exit 1).

use std::sync::OnceLock;

use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The wire codes of refusals that retrying cannot cure.
const FINAL_CODES: [&str; 2] = ["ACCESS_DENIED", "AUTHENTICATION_FAILED"];

static FIRST: OnceLock<String> = OnceLock::new();
static NOTICED: Notify = Notify::const_new();

/// The layer that watches logged errors for a final refusal.
pub struct RefusalLayer;

impl<S: Subscriber> Layer<S> for RefusalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut error = ErrorField(None);
        event.record(&mut error);
        let Some(text) = error.0 else { return };
        if FINAL_CODES.iter().any(|code| text.contains(code)) && FIRST.set(text).is_ok() {
            NOTICED.notify_waiters();
        }
    }
}

/// The text of an event's `error` field.
struct ErrorField(Option<String>);

impl Visit for ErrorField {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "error" {
            self.0 = Some(format!("{value:?}"));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "error" {
            self.0 = Some(value.to_string());
        }
    }
}

/// The first final refusal logged so far.
pub fn noticed() -> Option<String> {
    FIRST.get().cloned()
}

/// Waits until a final refusal was logged; returns its text. Cancel safe.
pub async fn refused() -> String {
    loop {
        let noticed = NOTICED.notified();
        if let Some(text) = FIRST.get() {
            return text.clone();
        }
        noticed.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[tokio::test]
    async fn a_logged_access_refusal_is_noticed_and_other_errors_are_not() {
        let subscriber = tracing_subscriber::registry().with(RefusalLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(error = %"connection to x closed", "heartbeat failed");
            assert!(FIRST.get().is_none());
            tracing::warn!(error = %"ACCESS_DENIED (55): user 'r' may not sub", "heartbeat failed");
        });
        let text = tokio::time::timeout(std::time::Duration::from_secs(1), refused()).await;
        assert_eq!(
            text.ok().as_deref(),
            Some("ACCESS_DENIED (55): user 'r' may not sub")
        );
    }
}
