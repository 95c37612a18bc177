//! Waiting until a request's intended send time, to the microsecond.
//!
//! Tokio's timer counts in whole milliseconds: a request due in 200 µs
//! would go out up to a millisecond late, and under open loop that lateness
//! is counted in its latency (coordinated-omission correction). On Linux a
//! precise [`Pacer`] (`--precise-pacing`) waits on a timerfd registered
//! with the runtime's reactor, so the wake-up comes when the kernel timer
//! fires, not at the next tick; that is a wake-up per request, which on a
//! small machine takes CPU from the broker, hence not the default.
//! Elsewhere, or when no timerfd can be made, it falls back to tokio's timer
//! (as do unit tests, which run on tokio's paused clock).

use tokio::time::Instant;

/// Waits until instants, as precisely as the platform allows.
pub struct Pacer {
    #[cfg(all(target_os = "linux", not(test)))]
    timer: Option<tokio::io::unix::AsyncFd<linux::Timer>>,
}

impl Pacer {
    /// A pacer, precise or on tokio's timer; must be created inside the
    /// tokio runtime.
    pub fn new(precise: bool) -> Pacer {
        #[cfg(not(all(target_os = "linux", not(test))))]
        let _ = precise;
        Pacer {
            #[cfg(all(target_os = "linux", not(test)))]
            timer: precise
                .then(linux::Timer::new)
                .flatten()
                .and_then(linux::register)
                .or_else(|| {
                    tracing::debug!("no timerfd; pacing with tokio's millisecond timer");
                    None
                }),
        }
    }

    /// Returns at `due` or soon after (never before).
    pub async fn sleep_until(&mut self, due: Instant) {
        #[cfg(all(target_os = "linux", not(test)))]
        if let Some(timer) = &self.timer {
            loop {
                let now = Instant::now();
                if now >= due {
                    return;
                }
                if !timer.get_ref().arm(due - now) {
                    break;
                }
                match timer.readable().await {
                    Ok(mut guard) => {
                        // Consumes the expiry; a stale readiness (the timer
                        // fired while nobody waited) reads nothing.
                        timer.get_ref().consume();
                        guard.clear_ready();
                    }
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(all(target_os = "linux", not(test)))]
mod linux {
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::time::Duration;

    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

    /// A non-blocking one-shot timerfd on the monotonic clock.
    pub struct Timer(TimerFd);

    impl Timer {
        pub fn new() -> Option<Timer> {
            TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )
            .ok()
            .map(Timer)
        }

        /// Fires once, `after` from now; false when the kernel refuses.
        pub fn arm(&self, after: Duration) -> bool {
            // A zero value would disarm the timer instead.
            let after = after.max(Duration::from_nanos(1));
            self.0
                .set(
                    Expiration::OneShot(TimeSpec::from(after)),
                    TimerSetTimeFlags::empty(),
                )
                .is_ok()
        }

        /// Reads the expiry count, if any (non-blocking).
        pub fn consume(&self) {
            let _ = self.0.wait();
        }
    }

    /// Registers the timer with the runtime's reactor.
    // `AsyncFd::new` is deprecated for types whose raw fd may change or
    // close while registered; a `Timer` owns its timerfd until it is
    // dropped, after the registration (the safe constructor's
    // replacement is `unsafe`, which this workspace denies).
    #[allow(deprecated)]
    pub fn register(timer: Timer) -> Option<tokio::io::unix::AsyncFd<Timer>> {
        tokio::io::unix::AsyncFd::new(timer).ok()
    }

    impl AsRawFd for Timer {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }
}
