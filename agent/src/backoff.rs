//! Retry timing of the agent's node API callers (the `Sync` stream, agent SVID renewal,
//! the SVID manager, templated identities): exponential backoff with jitter, and how far
//! a "reachable again" wake-up ([`crate::node::ServerConnection::reachable_again`]) may
//! shorten a wait.
//!
//! A wake-up says that some call reached a server after calls could reach none: a retry
//! waiting out its backoff may go early, so that the end of an outage is noticed at
//! once rather than up to [`MAX_BACKOFF`] later. But a wake-up
//!
//! - never moves a retry sooner than [`WAKE_FLOOR`] after the attempt that failed, and
//! - is ignored by a caller whose previous retry was itself woken early and failed
//!   again: that caller waits its next backoff step in full (the step after that may
//!   be woken again).
//!
//! So in a partial outage, where one call fails on every server (say `Sync` answers
//! `Unavailable` everywhere) while others succeed and keep announcing "reachable
//! again", the failing caller retries at most twice per backoff step, not at the rate
//! of the calls that succeed.

use std::time::Duration;

use tokio::time::Instant;

use crate::manager::jitter_fraction;

/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A wake-up never moves a retry sooner than this after the attempt that failed.
pub(crate) const WAKE_FLOOR: Duration = Duration::from_millis(500);

/// `delay` with jitter: between half of it and all of it, so that a fleet does not
/// retry in lockstep.
pub(crate) fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + 0.5 * jitter_fraction())
}

/// Whether a wake-up may shorten the wait for the retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Yes.
    Allowed,
    /// It did: if this retry fails too, the next wait is not shortened.
    Used,
    /// No: the previous retry was woken early and failed, or the last answer was a
    /// refusal.
    Ignored,
}

/// The retry state of one caller (or of one entry for the SVID manager).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The current backoff step; zero while nothing fails.
    delay: Duration,
    /// When the last failed attempt ended.
    failed_at: Instant,
    /// When to retry.
    retry_at: Instant,
    wake: Wake,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Nothing failed yet.
    pub(crate) fn new() -> Self {
        let now = Instant::now();
        Self {
            delay: Duration::ZERO,
            failed_at: now,
            retry_at: now,
            wake: Wake::Allowed,
        }
    }

    /// Whether the last attempt failed (a retry is pending).
    pub(crate) fn is_failing(&self) -> bool {
        !self.delay.is_zero()
    }

    /// Whether a wake-up may still shorten the pending retry's wait.
    pub(crate) fn is_wakeable(&self) -> bool {
        self.is_failing() && self.wake == Wake::Allowed
    }

    /// When to retry (meaningful while [`Backoff::is_failing`]).
    pub(crate) fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// The attempt succeeded: the next failure starts again from [`MIN_BACKOFF`].
    pub(crate) fn succeeded(&mut self) {
        *self = Self::new();
    }

    /// The attempt that just ended failed: the retry waits for the next backoff step
    /// (doubled, from [`MIN_BACKOFF`] to [`MAX_BACKOFF`]), with jitter. Returns the wait.
    pub(crate) fn failed(&mut self) -> Duration {
        self.failed_at(Instant::now())
    }

    fn failed_at(&mut self, now: Instant) -> Duration {
        let delay = (self.delay * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        self.schedule(delay, now)
    }

    /// The attempt that just ended was refused: the retry waits about `delay`, and no
    /// wake-up shortens it (reaching a server changes nothing to a refusal). Returns the
    /// wait.
    pub(crate) fn refused(&mut self, delay: Duration) -> Duration {
        let wait = self.schedule(delay.max(MIN_BACKOFF), Instant::now());
        self.wake = Wake::Ignored;
        wait
    }

    fn schedule(&mut self, delay: Duration, now: Instant) -> Duration {
        let wait = jittered(delay);
        self.delay = delay;
        self.failed_at = now;
        self.retry_at = now + wait;
        // A retry that was woken early and failed again: this wait goes in full.
        self.wake = match self.wake {
            Wake::Used => Wake::Ignored,
            Wake::Allowed | Wake::Ignored => Wake::Allowed,
        };
        wait
    }

    /// A call reached a server after none could: moves the retry earlier, to
    /// [`WAKE_FLOOR`] after the failure at the soonest, unless this wait may not be
    /// shortened. Returns whether the retry moved.
    pub(crate) fn woken(&mut self) -> bool {
        self.woken_at(Instant::now())
    }

    fn woken_at(&mut self, now: Instant) -> bool {
        if !self.is_wakeable() {
            return false;
        }
        let earliest = (self.failed_at + WAKE_FLOOR).max(now);
        if earliest >= self.retry_at {
            return false;
        }
        self.retry_at = earliest;
        self.wake = Wake::Used;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backoff that failed `times` times in a row at `now`.
    fn failed_times(times: usize, now: Instant) -> Backoff {
        let mut backoff = Backoff::new();
        for _ in 0..times {
            backoff.failed_at(now);
        }
        backoff
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let now = Instant::now();
        let mut backoff = Backoff::new();
        assert!(!backoff.is_failing());
        let mut step = MIN_BACKOFF;
        for _ in 0..10 {
            let wait = backoff.failed_at(now);
            assert!(backoff.is_failing());
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for a step of {step:?}"
            );
            assert_eq!(backoff.retry_at(), now + wait);
            step = (step * 2).min(MAX_BACKOFF);
        }
        assert_eq!(backoff.delay, MAX_BACKOFF);
        backoff.succeeded();
        assert!(!backoff.is_failing());
        assert!(!backoff.woken_at(now), "nothing to wake");
        let wait = backoff.failed_at(now);
        assert!(wait <= MIN_BACKOFF, "starts over: {wait:?}");
    }

    #[test]
    fn a_wake_up_shortens_a_wait_down_to_the_floor_only() {
        let t0 = Instant::now();
        // At once after the failure: the retry moves to the floor, not to now.
        let mut backoff = failed_times(5, t0);
        assert!(backoff.woken_at(t0));
        assert_eq!(backoff.retry_at(), t0 + WAKE_FLOOR);
        // Later than the floor: now.
        let mut backoff = failed_times(5, t0);
        let later = t0 + Duration::from_secs(2);
        assert!(backoff.woken_at(later));
        assert_eq!(backoff.retry_at(), later);
        // A wait no longer than the floor is left alone (and the wake-up is not spent).
        let mut backoff = failed_times(1, t0);
        let scheduled = backoff.retry_at();
        assert!(!backoff.woken_at(t0));
        assert_eq!(backoff.retry_at(), scheduled);
        assert!(backoff.is_wakeable());
    }

    /// The partial outage of the review: this caller fails on every server while other
    /// calls succeed and announce "reachable again" all the time.
    #[test]
    fn a_caller_whose_woken_retry_fails_waits_its_next_step_in_full() {
        let t0 = Instant::now();
        let mut backoff = failed_times(6, t0);
        // Woken: retries early, fails again.
        assert!(backoff.woken_at(t0));
        let t1 = backoff.retry_at();
        let full = backoff.failed_at(t1);
        let scheduled = backoff.retry_at();
        assert!(full >= MAX_BACKOFF / 2, "{full:?}");
        // Every wake-up during this wait is ignored.
        let mut now = t1;
        while now < scheduled {
            assert!(!backoff.woken_at(now));
            now += Duration::from_millis(10);
        }
        assert_eq!(backoff.retry_at(), scheduled, "waits {full:?} in full");
        // After the full wait fails too, the next wait may be woken again.
        backoff.failed_at(scheduled);
        assert!(backoff.woken_at(scheduled));

        // Attempts over ten minutes of wake-ups every 10 ms: at most two per backoff
        // step, where waking every retry at once made 60 000.
        let mut backoff = Backoff::new();
        let mut now = t0;
        let end = t0 + Duration::from_secs(600);
        let mut attempts = 0u32;
        while now < end {
            attempts += 1;
            backoff.failed_at(now);
            while now < backoff.retry_at() {
                now += Duration::from_millis(10);
                backoff.woken_at(now);
            }
        }
        // Plain backoff: 600 s / 22.5 s on average (30 s with jitter), plus the first
        // steps; here at most twice that.
        assert!(attempts <= 2 * (600 / 15) + 10, "{attempts} attempts");
        assert!(attempts >= 600 / 30, "{attempts} attempts");
    }

    #[test]
    fn a_refusal_is_never_woken() {
        let t0 = Instant::now();
        let mut backoff = Backoff::new();
        let wait = backoff.refused(MAX_BACKOFF);
        assert!(wait >= MAX_BACKOFF / 2);
        assert!(backoff.is_failing());
        assert!(!backoff.is_wakeable());
        assert!(!backoff.woken_at(t0 + Duration::from_secs(5)));
        // The failure after it may be woken again, and goes on from the refusal's step.
        let wait = backoff.failed_at(t0);
        assert!(wait >= MAX_BACKOFF / 2, "{wait:?}");
        assert!(backoff.is_wakeable());
    }
}
