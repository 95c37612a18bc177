//! The work in flight on a client handle, so that closing it can wait for
//! that work to finish before the connections go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::{Error, Result};

/// How long closing a producer or an admin waits for its calls in flight
/// by default.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts the calls in flight on one handle (and its clones), and refuses
/// new ones once it is closing.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    in_flight: TaskTracker,
    closing: AtomicBool,
}

impl Drain {
    /// Counts a call until the token is dropped; `what` names the handle in
    /// the error once it is closing.
    ///
    /// # Errors
    /// [`Error::Closed`] once [`Drain::close`] was called.
    pub(crate) fn enter(&self, what: &'static str) -> Result<TaskTrackerToken> {
        // Counted first, then checked: a close that started meanwhile
        // either sees this call in its wait or is seen here.
        let token = self.in_flight.token();
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::Closed(what));
        }
        Ok(token)
    }

    /// Whether [`Drain::close`] was called.
    #[cfg(test)]
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Refuses new calls and waits up to `within` for those in flight.
    ///
    /// # Errors
    /// [`Error::Unfinished`] with how many were still running then.
    pub(crate) async fn close(&self, what: &'static str, within: Duration) -> Result<()> {
        self.closing.store(true, Ordering::SeqCst);
        self.in_flight.close();
        if tokio::time::timeout(within, self.in_flight.wait())
            .await
            .is_ok()
        {
            return Ok(());
        }
        Err(Error::Unfinished {
            what,
            in_flight: self.in_flight.len(),
            after: within,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_waits_for_calls_in_flight_and_refuses_new_ones() {
        let drain = std::sync::Arc::new(Drain::default());
        let token = drain.enter("the thing").unwrap();
        let closing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.close("the thing", Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        while !drain.is_closing() {
            tokio::task::yield_now().await;
        }
        assert!(matches!(drain.enter("the thing"), Err(Error::Closed(_))));
        assert!(!closing.is_finished());
        drop(token);
        closing.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn close_reports_what_did_not_finish_in_time() {
        let drain = Drain::default();
        let _stuck = drain.enter("the thing").unwrap();
        let e = drain
            .close("the thing", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unfinished { in_flight: 1, .. }), "{e}");
    }
}
