//! The client-side request limiter of reference-scheduler.md §4.9.
//!
//! It starts at 8 concurrent requests. A 503 halves the limit (rounding up, never below 1) and
//! holds new requests back for one second; further 503s inside that quiet second do not halve it
//! again. Each 2xx or 3xx answer grows the limit by max(1, 10%), capped at twice the number of
//! requests in flight. Every 503 records its time, for the dispatcher's `Last503()`.
//!
//! Invariant: `current <= limit` whenever a request is admitted, and every admitted request
//! releases its slot exactly once (the permit's `Drop`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

/// The initial number of concurrent requests.
pub const INITIAL_LIMIT: usize = 8;
/// How long a 503 holds new requests back.
pub const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    limit: usize,
    current: usize,
    quiet_until: Option<Instant>,
    last_503: Option<SystemTime>,
}

/// A per-host concurrency limiter.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    notify: Notify,
}

/// One admitted request; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.limiter.state.lock() {
            s.current = s.current.saturating_sub(1);
        }
        self.limiter.notify.notify_waiters();
    }
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::new(INITIAL_LIMIT)
    }
}

impl Limiter {
    /// A limiter admitting `limit` requests at once (at least 1).
    pub fn new(limit: usize) -> Limiter {
        Limiter {
            state: Mutex::new(State {
                limit: limit.max(1),
                current: 0,
                quiet_until: None,
                last_503: None,
            }),
            notify: Notify::new(),
        }
    }

    /// Waits for a slot.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let quiet_until = {
                let Ok(mut s) = self.state.lock() else {
                    // A poisoned lock means a panic elsewhere; admit rather than hang.
                    return Permit { limiter: self };
                };
                let now = Instant::now();
                match s.quiet_until {
                    Some(t) if t > now => Some(t),
                    _ => {
                        if s.current < s.limit {
                            s.current += 1;
                            return Permit { limiter: self };
                        }
                        None
                    }
                }
            };
            match quiet_until {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => notified.await,
            }
        }
    }

    /// Records the outcome of a request that holds a permit: its HTTP status, or `None` when
    /// there was no response.
    pub fn report(&self, status: Option<u16>) {
        let Ok(mut s) = self.state.lock() else { return };
        match status {
            Some(503) => {
                s.last_503 = Some(SystemTime::now());
                let now = Instant::now();
                if s.quiet_until.is_none_or(|t| t <= now) {
                    s.limit = s.limit.div_ceil(2).max(1);
                    s.quiet_until = Some(now + QUIET);
                }
            }
            Some(code) if (200..400).contains(&code) => {
                let grown = s.limit + (s.limit / 10).max(1);
                s.limit = grown.min((s.current * 2).max(1)).max(1);
                drop(s);
                self.notify.notify_waiters();
            }
            _ => {}
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit).unwrap_or(1)
    }

    /// When the last 503 arrived.
    pub fn last_503(&self) -> Option<SystemTime> {
        self.state.lock().ok().and_then(|s| s.last_503)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_503_halves_once_per_quiet_second_and_success_grows_up_to_twice_in_flight() {
        let l = Limiter::new(8);
        let p = l.acquire().await;
        l.report(Some(503));
        assert_eq!(l.limit(), 4);
        assert!(l.last_503().is_some());
        l.report(Some(503));
        assert_eq!(
            l.limit(),
            4,
            "a second 503 inside the quiet second does not halve again"
        );
        drop(p);
        // New requests wait out the quiet second.
        // (A lower bound only: sleeping never ends early.)
        let before = Instant::now();
        let p = l.acquire().await;
        assert!(before.elapsed() >= QUIET - Duration::from_millis(5));
        l.report(Some(503));
        assert_eq!(l.limit(), 2);
        drop(p);
        let p1 = l.acquire().await;
        let p2 = l.acquire().await;
        // Two in flight: growth is capped at 4.
        for _ in 0..10 {
            l.report(Some(200));
        }
        assert_eq!(l.limit(), 4);
        drop((p1, p2));
        l.report(Some(404));
        assert_eq!(l.limit(), 4, "other statuses change nothing");
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_wait_for_a_slot() {
        let l = std::sync::Arc::new(Limiter::new(1));
        let first = l.acquire().await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _p = l2.acquire().await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the second request waits");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("admitted after the first finished")
            .expect("task");
    }
}
