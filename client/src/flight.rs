//! One attempt at a time at a slow path (opening a connection, fetching a
//! route), shared by the callers that wait for it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Runs one attempt at a time, each on a task of its own. On a task, an
/// attempt goes on whatever its caller does: a caller suspended in a
/// `select!` (or dropped) holding a lock across its attempt would hold up
/// every other caller. The last failure is kept with its time, so callers
/// that waited while an attempt failed fail with it instead of each trying
/// again in turn (against a silent peer, one timeout each).
#[derive(Debug)]
pub(crate) struct SingleFlight<E> {
    running: tokio::sync::Mutex<()>,
    failed: Mutex<Option<(Instant, E)>>,
}

impl<E> Default for SingleFlight<E> {
    fn default() -> Self {
        SingleFlight {
            running: tokio::sync::Mutex::new(()),
            failed: Mutex::new(None),
        }
    }
}

impl<E: Clone + Send + 'static> SingleFlight<E> {
    /// Runs `attempt` once no other attempt runs, on a task of its own, and
    /// returns its result. `attempt` is given the failure of an attempt
    /// that ended after `since` (when its caller started waiting), if one
    /// did, and returns the failure to keep for the next callers, if any,
    /// beside its result.
    ///
    /// # Errors
    /// The task's [`tokio::task::JoinError`] when the attempt panicked.
    pub(crate) async fn run<T, A, F>(
        self: &Arc<Self>,
        since: Instant,
        attempt: A,
    ) -> Result<T, tokio::task::JoinError>
    where
        T: Send + 'static,
        A: FnOnce(Option<E>) -> F + Send + 'static,
        F: Future<Output = (T, Option<E>)> + Send + 'static,
    {
        let flight = self.clone();
        tokio::spawn(async move {
            let _running = flight.running.lock().await;
            let recent = lock(&flight.failed)
                .as_ref()
                .filter(|(at, _)| *at >= since)
                .map(|(_, e)| e.clone());
            let (out, failure) = attempt(recent).await;
            if let Some(e) = failure {
                *lock(&flight.failed) = Some((Instant::now(), e));
            }
            out
        })
        .await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_share_a_failure_and_a_suspended_caller_holds_no_one_up() {
        let flight: Arc<SingleFlight<String>> = Arc::default();
        let attempts = Arc::new(AtomicUsize::new(0));
        let since = Instant::now();
        // An attempt started and then never polled again by its caller.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let a = attempts.clone();
        let mut stalled = Box::pin(flight.run(since, move |_| async move {
            a.fetch_add(1, Ordering::SeqCst);
            let _ = released.await;
            ((), Some("refused".to_string()))
        }));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut stalled)
                .await
                .is_err()
        );
        // Waiters that started before it failed take its failure.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let a = attempts.clone();
                flight.run(since, move |failed| async move {
                    if let Some(e) = failed {
                        return (Err(e), None);
                    }
                    a.fetch_add(1, Ordering::SeqCst);
                    (Ok(()), None)
                })
            })
            .collect();
        release.send(()).unwrap();
        for w in futures_util::future::join_all(waiters).await {
            assert_eq!(w.unwrap(), Err("refused".to_string()));
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        // A caller that starts later tries again.
        let later = flight
            .run(Instant::now(), |failed| async move { (failed, None) })
            .await
            .unwrap();
        assert_eq!(later, None);
        drop(stalled);
    }
}
