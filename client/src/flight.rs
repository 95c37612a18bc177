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
/// What an attempt leaves for the callers after it.
#[derive(Debug)]
pub(crate) enum Remember<E> {
    /// Nothing new (it took what a caller before it got).
    Nothing,
    /// It failed so: callers that waited meanwhile fail so too.
    Failure(E),
    /// It succeeded: an earlier failure is shared no more.
    Success,
}

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
    /// did and no attempt succeeded since, and returns what to remember
    /// for the next callers beside its result.
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
        F: Future<Output = (T, Remember<E>)> + Send + 'static,
    {
        let flight = self.clone();
        tokio::spawn(async move {
            let _running = flight.running.lock().await;
            let recent = lock(&flight.failed)
                .as_ref()
                .filter(|(at, _)| *at >= since)
                .map(|(_, e)| e.clone());
            let (out, remember) = attempt(recent).await;
            match remember {
                Remember::Nothing => {}
                Remember::Failure(e) => *lock(&flight.failed) = Some((Instant::now(), e)),
                Remember::Success => *lock(&flight.failed) = None,
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
            ((), Remember::Failure("refused".to_string()))
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
                        return (Err(e), Remember::Nothing);
                    }
                    a.fetch_add(1, Ordering::SeqCst);
                    (Ok(()), Remember::Success)
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
            .run(Instant::now(), |failed| async move {
                (failed, Remember::Nothing)
            })
            .await
            .unwrap();
        assert_eq!(later, None);
        // A success forgets the failure, for callers that waited before it.
        let since = Instant::now();
        flight
            .run(since, |_| async move {
                ((), Remember::Failure("again".to_string()))
            })
            .await
            .unwrap();
        flight
            .run(Instant::now(), |_| async move { ((), Remember::Success) })
            .await
            .unwrap();
        let after = flight
            .run(since, |failed| async move { (failed, Remember::Nothing) })
            .await
            .unwrap();
        assert_eq!(after, None);
        drop(stalled);
    }
}
