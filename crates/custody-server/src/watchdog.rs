//! How long a connection may take to deliver a request.
//!
//! A connection must deliver each whole request — headers and body — within
//! `request_read_timeout_ms` of being opened or of its previous answer; otherwise it is closed.
//! That one rule covers idle keep-alive connections, headers sent a byte at a time (slowloris) and
//! bodies sent a byte at a time, which hyper's header timeout did not (and hyper's timer cost an
//! allocation and two timer-wheel updates per request: 3.9 % of the server's CPU on Encrypt).
//!
//! Here a request costs two relaxed atomic stores: the request marks the connection as serving
//! once its body is read, and as waiting again, from the time of its answer, when it answers. The
//! connection's [`watchdog`] sleeps on one timer, re-armed only when it fires (about once per
//! timeout), and returns when the connection has waited longer than the timeout. Time spent
//! serving a request never counts: requests are bounded by their own work, not by this rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `waiting_since` while a request is being served.
const SERVING: u64 = u64::MAX;

/// What one connection is doing, shared by its requests and its watchdog.
#[derive(Debug)]
pub struct Progress {
    opened: Instant,
    /// Microseconds after `opened` at which the connection became ready for its next request
    /// (opened, or answered the previous one), or [`SERVING`].
    waiting_since: AtomicU64,
}

impl Progress {
    /// A connection that has just been opened: waiting for its first request.
    pub fn new() -> Self {
        Self { opened: Instant::now(), waiting_since: AtomicU64::new(0) }
    }

    /// The request's body is read: it is served now, however long that takes.
    pub fn serving(&self) {
        self.waiting_since.store(SERVING, Ordering::Relaxed);
    }

    /// The request was answered at `at`: the connection waits for the next one from then.
    pub fn answered(&self, at: std::time::Instant) {
        let since = Instant::from_std(at).saturating_duration_since(self.opened);
        self.waiting_since.store(since.as_micros().min(u128::from(SERVING - 1)) as u64, Ordering::Relaxed);
    }

    /// When the connection must have delivered its next request, or `None` while it serves one.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.waiting_since.load(Ordering::Relaxed) {
            SERVING => None,
            since => Some(self.opened + Duration::from_micros(since) + timeout),
        }
    }
}

/// Returns when the connection has waited longer than `timeout` for a request (never while it
/// serves one). Sleeps on one timer, moved forward when it fires early.
pub async fn watchdog(progress: &Progress, timeout: Duration) {
    let sleep = tokio::time::sleep_until(progress.deadline(timeout).unwrap_or_else(|| Instant::now() + timeout));
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        match progress.deadline(timeout) {
            Some(deadline) if deadline <= now => return,
            Some(deadline) => sleep.as_mut().reset(deadline),
            None => sleep.as_mut().reset(now + timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// Runs the watchdog until it fires or `limit` passes (in paused time); how long it ran.
    async fn fires_after(progress: &Progress, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        tokio::time::timeout(limit, watchdog(progress, TIMEOUT)).await.ok().map(|()| start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_timeout() {
        let p = Progress::new();
        assert_eq!(fires_after(&p, Duration::from_secs(60)).await, Some(TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn each_answer_gives_the_next_request_the_whole_timeout() {
        let p = Progress::new();
        let dog = watchdog(&p, TIMEOUT);
        tokio::pin!(dog);
        // A request every 20 s for two minutes: never closed.
        for _ in 0..6 {
            tokio::select! {
                () = dog.as_mut() => panic!("closed although it answered a request every 20 s"),
                () = tokio::time::sleep(Duration::from_secs(20)) => {}
            }
            p.serving();
            p.answered(Instant::now().into_std());
        }
        // Then nothing: closed 30 s after the last answer.
        let last = Instant::now();
        dog.await;
        assert_eq!(last.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_serving_a_request_does_not_count() {
        let p = Progress::new();
        tokio::time::sleep(Duration::from_secs(10)).await;
        p.serving();
        // Served for five minutes (a slow store, say): not closed.
        assert_eq!(fires_after(&p, Duration::from_secs(300)).await, None);
        p.answered(Instant::now().into_std());
        assert_eq!(fires_after(&p, Duration::from_secs(60)).await, Some(TIMEOUT));
    }
}
