//! [`MemoryDedup`]: the keys applied within the TTL, in this process's
//! memory.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{DedupKey, Deduped};

/// An in-memory deduplicator: runs an effect at most once per key within
/// a TTL. Cloning is cheap and clones share the records; it is safe to use
/// from many tasks at once.
///
/// # Guarantee
/// For one key, [`MemoryDedup::apply`] runs the effect until one run
/// succeeds; after that, every call within the TTL of the success returns
/// [`Deduped::Duplicate`] without running it. Concurrent calls with the
/// same key do not run the effect side by side: the later ones wait for
/// the running one, then return `Duplicate` if it succeeded, or take their
/// own turn if it failed (or was cancelled). A failed effect records
/// nothing, so a redelivery applies it again.
///
/// Records live in memory only: a restarted process applies everything
/// again. Use the SQLite store (feature `sqlite`) when the effect is in a
/// database.
///
/// # Expiry
/// Lazily: each call to [`MemoryDedup::apply`] first drops the records
/// older than the TTL (oldest first, cheap), so memory holds about the
/// keys applied within the last TTL. [`MemoryDedup::purge_expired`] does
/// the same on demand, for a dedup that sits idle. Time is tokio's clock
/// ([`tokio::time::Instant`]), monotonic and pausable in tests.
///
/// ```no_run
/// # async fn demo(consumer: &mut txmq::PullConsumer) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use txmq::{Deduped, MemoryDedup};
///
/// let dedup = MemoryDedup::new(Duration::from_secs(3600));
/// for m in consumer.poll(Duration::from_secs(1)).await? {
///     // The key is the msg id; `dedup.apply("order-42", ...)` for a business key.
///     let done = dedup
///         .apply(&m, async {
///             println!("applying {}", m.msg_id());
///             Ok::<_, std::io::Error>(())
///         })
///         .await?;
///     if done.is_duplicate() {
///         println!("{} was applied before", m.msg_id());
///     }
/// }
/// consumer.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryDedup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<DedupKey, Entry>,
    /// Applied keys in the order recorded, so the expired ones are found
    /// from the front. A key applied again after expiring is in here twice;
    /// only the entry whose time matches the map's is the live one.
    recorded: VecDeque<(Instant, DedupKey)>,
}

#[derive(Debug)]
enum Entry {
    /// Applied at this time.
    Applied(Instant),
    /// An effect for this key is running; its end wakes this.
    InFlight(Arc<Notify>),
}

impl State {
    /// Drops the records older than `ttl`; returns how many.
    fn purge(&mut self, now: Instant, ttl: Duration) -> usize {
        let mut purged = 0;
        while let Some((at, _)) = self.recorded.front() {
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            let Some((at, key)) = self.recorded.pop_front() else {
                break;
            };
            if matches!(self.entries.get(&key), Some(Entry::Applied(t)) if *t == at) {
                self.entries.remove(&key);
                purged += 1;
            }
        }
        purged
    }
}

impl MemoryDedup {
    /// A deduplicator whose records expire `ttl` after the effect succeeded.
    pub fn new(ttl: Duration) -> MemoryDedup {
        MemoryDedup {
            inner: Arc::new(Inner {
                ttl,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The TTL of a record.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the
        // map is still consistent (every change is one insert or remove).
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `effect` unless `key` was applied within the TTL, and records
    /// `key` once it succeeded. `effect` is not polled at all for a
    /// duplicate. See the type's guarantee for concurrent calls.
    ///
    /// Cancel safe: dropping the returned future while the effect runs
    /// records nothing and lets a waiting call take its turn.
    ///
    /// # Errors
    /// The effect's error; `key` is not recorded then.
    pub async fn apply<T, E, F>(&self, key: impl Into<DedupKey>, effect: F) -> Result<Deduped<T>, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let key = key.into();
        let claim = loop {
            let turn = {
                let mut st = self.lock();
                let now = Instant::now();
                st.purge(now, self.inner.ttl);
                match st.entries.get(&key) {
                    Some(Entry::Applied(_)) => return Ok(Deduped::Duplicate),
                    // Created under the lock: it sees the end of that run
                    // even if the run ends before this task awaits it.
                    Some(Entry::InFlight(running)) => running.clone().notified_owned(),
                    None => {
                        let notify = Arc::new(Notify::new());
                        st.entries
                            .insert(key.clone(), Entry::InFlight(notify.clone()));
                        break Claim {
                            dedup: self,
                            key,
                            notify,
                            recorded: false,
                        };
                    }
                }
            };
            turn.await;
        };
        let value = effect.await?;
        claim.record();
        Ok(Deduped::Applied(value))
    }

    /// Whether `key` is recorded (applied within the TTL).
    pub fn contains(&self, key: impl Into<DedupKey>) -> bool {
        let key = key.into();
        let mut st = self.lock();
        st.purge(Instant::now(), self.inner.ttl);
        matches!(st.entries.get(&key), Some(Entry::Applied(_)))
    }

    /// Drops the records older than the TTL now; returns how many.
    pub fn purge_expired(&self) -> usize {
        self.lock().purge(Instant::now(), self.inner.ttl)
    }

    /// The number of keys recorded (expired ones not yet purged included)
    /// or being applied.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when [`MemoryDedup::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A running effect's hold on its key. Recording turns it into a record;
/// dropping it unrecorded (the effect failed or was cancelled) frees the
/// key. Either way the waiting calls are woken.
struct Claim<'a> {
    dedup: &'a MemoryDedup,
    key: DedupKey,
    notify: Arc<Notify>,
    recorded: bool,
}

impl Claim<'_> {
    fn record(mut self) {
        let now = Instant::now();
        let mut st = self.dedup.lock();
        st.entries.insert(self.key.clone(), Entry::Applied(now));
        st.recorded.push_back((now, self.key.clone()));
        drop(st);
        self.recorded = true;
        self.notify.notify_waiters();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let mut st = self.dedup.lock();
        if matches!(st.entries.get(&self.key), Some(Entry::InFlight(n)) if Arc::ptr_eq(n, &self.notify))
        {
            st.entries.remove(&self.key);
        }
        drop(st);
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn counting(runs: &Arc<AtomicU32>) -> impl Future<Output = Result<u32, String>> {
        let runs = runs.clone();
        async move { Ok(runs.fetch_add(1, Ordering::SeqCst) + 1) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_applied_once_and_then_a_duplicate() {
        let dedup = MemoryDedup::new(TTL);
        let runs = Arc::new(AtomicU32::new(0));
        assert_eq!(
            dedup.apply("a", counting(&runs)).await,
            Ok(Deduped::Applied(1))
        );
        assert_eq!(
            dedup.apply("a", counting(&runs)).await,
            Ok(Deduped::Duplicate)
        );
        assert_eq!(
            dedup.apply("b", counting(&runs)).await,
            Ok(Deduped::Applied(2))
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the duplicate never ran");
        assert!(dedup.contains("a") && dedup.clone().contains("b"));
        assert_eq!(dedup.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_expires_after_the_ttl_and_is_purged() {
        let dedup = MemoryDedup::new(TTL);
        let runs = Arc::new(AtomicU32::new(0));
        dedup.apply("old", counting(&runs)).await.unwrap();
        tokio::time::advance(TTL / 2).await;
        dedup.apply("young", counting(&runs)).await.unwrap();
        tokio::time::advance(TTL / 2 - Duration::from_millis(1)).await;
        assert_eq!(
            dedup.apply("old", counting(&runs)).await,
            Ok(Deduped::Duplicate)
        );

        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(dedup.purge_expired(), 1, "only the old record expired");
        assert_eq!(dedup.len(), 1);
        assert!(!dedup.contains("old") && dedup.contains("young"));
        assert_eq!(
            dedup.apply("old", counting(&runs)).await,
            Ok(Deduped::Applied(3))
        );

        // The re-applied key lives a full TTL from its second application,
        // though its first record is still queued for purging.
        tokio::time::advance(TTL / 2).await;
        assert!(dedup.contains("old") && !dedup.contains("young"));
        tokio::time::advance(TTL / 2).await;
        assert_eq!(dedup.purge_expired(), 1);
        assert!(dedup.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_effect_is_not_recorded_and_is_applied_again() {
        let dedup = MemoryDedup::new(TTL);
        let failed: Result<Deduped<()>, &str> = dedup.apply("k", async { Err("disk full") }).await;
        assert_eq!(failed, Err("disk full"));
        assert!(!dedup.contains("k") && dedup.is_empty());
        assert_eq!(
            dedup.apply("k", async { Ok::<_, &str>(7) }).await,
            Ok(Deduped::Applied(7))
        );
        assert_eq!(
            dedup.apply("k", async { Ok::<_, &str>(8) }).await,
            Ok(Deduped::Duplicate)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_effect_is_not_recorded() {
        let dedup = MemoryDedup::new(TTL);
        let slow = dedup.apply("k", async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, ()>(())
        });
        assert!(tokio::time::timeout(Duration::from_secs(1), slow)
            .await
            .is_err());
        assert!(dedup.is_empty(), "the claim was released");
        assert_eq!(
            dedup.apply("k", async { Ok::<_, ()>(1) }).await,
            Ok(Deduped::Applied(1))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_with_one_key_apply_it_once() {
        let dedup = MemoryDedup::new(TTL);
        let runs = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let dedup = dedup.clone();
                let runs = runs.clone();
                tokio::spawn(async move {
                    dedup
                        .apply("same", async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Long enough for the others to arrive meanwhile.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, ()>(())
                        })
                        .await
                })
            })
            .collect();
        let mut applied = 0;
        for t in tasks {
            if t.await.unwrap() == Ok(Deduped::Applied(())) {
                applied += 1;
            }
        }
        assert_eq!((applied, runs.load(Ordering::SeqCst)), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_caller_applies_when_the_running_effect_fails() {
        let dedup = MemoryDedup::new(TTL);
        let first = tokio::spawn({
            let dedup = dedup.clone();
            async move {
                dedup
                    .apply("k", async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Err::<u32, _>("failed")
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(dedup.len(), 1, "the first call holds the key");
        let second = dedup.apply("k", async { Ok::<_, &str>(2) }).await;
        assert_eq!(first.await.unwrap(), Err("failed"));
        assert_eq!(second, Ok(Deduped::Applied(2)));
        assert!(dedup.contains("k"));
    }
}
