//! Per-caller limits of the Workload API (SECURITY.md §3.1 items 9-10): a cap on
//! concurrent connections per uid (enforced at accept, before any `/proc` work), a
//! token-bucket request rate per uid, the request size limit and the mapping of tonic's
//! decode-limit status to `ResourceExhausted`, and the process's open-file limit.
//!
//! It owns only counting and refusing; who the caller is comes from [`crate::peer`],
//! and the Workload API decides where each check runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tonic::codegen::http;

/// Largest Workload API request message accepted (64 KiB). Every real request (an
/// audience list, a JWT to validate) is far smaller; a larger one gets
/// `ResourceExhausted` before it is buffered.
pub const MAX_REQUEST_SIZE: usize = 64 * 1024;
/// Concurrent HTTP/2 streams (calls) per Workload API connection. Real clients keep a
/// handful open (an X.509 stream, a JWT bundle stream, a few unary calls); the cap, with
/// [`MAX_REQUEST_SIZE`] and the per-uid connection cap, bounds what one uid can make the
/// agent buffer (64 connections x 32 streams x 64 KiB). Further calls wait in the
/// client until one ends.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Default `max_connections_per_uid`.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 64;
/// Default `max_requests_per_second_per_uid`.
pub const DEFAULT_MAX_REQUESTS_PER_SECOND_PER_UID: u32 = 100;
/// Default `max_request_burst_per_uid`.
pub const DEFAULT_MAX_REQUEST_BURST_PER_UID: u32 = 200;

/// Above this many tracked uids the rate limiter forgets buckets that are full again
/// (a full bucket behaves exactly like no bucket).
const RATE_SWEEP_THRESHOLD: usize = 4096;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them (each update is a
    // single insert or remove), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts the open Workload API connections of each uid.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max: usize,
    open: Mutex<HashMap<u32, usize>>,
}

impl ConnectionLimiter {
    /// At most `max` concurrent connections per uid (0: no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one more connection of `uid`, or `None` when it already has the
    /// maximum. The permit gives its slot back when dropped.
    pub fn try_acquire(self: &Arc<Self>, uid: u32) -> Option<ConnectionPermit> {
        let mut open = lock(&self.open);
        let count = open.entry(uid).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ConnectionPermit {
            limiter: Arc::clone(self),
            uid,
        })
    }

    /// Open connections of `uid`.
    pub fn open_connections(&self, uid: u32) -> usize {
        lock(&self.open).get(&uid).copied().unwrap_or(0)
    }

    /// Open connections of every uid together.
    pub fn total(&self) -> usize {
        lock(&self.open).values().sum()
    }
}

/// One connection's slot in a [`ConnectionLimiter`].
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    uid: u32,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.limiter.open);
        if let Some(count) = open.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// A token bucket per uid: `rate` tokens a second, at most `burst` saved up; each
/// request takes one.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `rate` requests a second per uid with bursts of `burst` (`rate` 0: no limit).
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `uid`; false when its bucket is empty.
    pub fn check(&self, uid: u32) -> bool {
        self.check_at(uid, Instant::now())
    }

    fn check_at(&self, uid: u32, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= RATE_SWEEP_THRESHOLD && !buckets.contains_key(&uid) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
        }
        let bucket = buckets.entry(uid).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let tokens = refill(bucket, now, self.rate, self.burst);
        bucket.updated = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            true
        } else {
            bucket.tokens = tokens;
            false
        }
    }

    /// Uids currently tracked (tests).
    pub fn tracked(&self) -> usize {
        lock(&self.buckets).len()
    }
}

/// The tokens `bucket` holds at `now`.
fn refill(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// Rewrites a response whose gRPC status is `OutOfRange` to `ResourceExhausted`.
///
/// tonic answers a request over `max_decoding_message_size` with `OutOfRange`
/// ("decoded message length too large") before any handler runs, as a trailers-only
/// response (the status in the headers). The Workload API itself never answers
/// `OutOfRange`, so every such response is a size refusal, which SECURITY.md §3.1 item 9
/// wants reported as `ResourceExhausted`.
pub fn map_size_refusal<B>(mut response: http::Response<B>) -> http::Response<B> {
    const OUT_OF_RANGE: &[u8] = b"11";
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == OUT_OF_RANGE)
    {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// Raises the soft open-file limit to the hard limit (connections, pidfds and `/proc`
/// directories each hold a descriptor) and returns the new soft limit, or the current
/// one when it cannot be changed.
pub fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return Some(hard),
            Err(err) => {
                tracing::debug!(error = %err, soft, hard, "cannot raise the open-file limit");
            }
        }
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connection_permits_count_per_uid() {
        let limiter = ConnectionLimiter::new(2);
        let a = limiter.try_acquire(1).unwrap();
        let b = limiter.try_acquire(1).unwrap();
        assert!(limiter.try_acquire(1).is_none());
        let other = limiter.try_acquire(2).unwrap();
        assert_eq!(limiter.open_connections(1), 2);
        assert_eq!(limiter.total(), 3);
        drop(a);
        let c = limiter.try_acquire(1).unwrap();
        drop((b, c, other));
        assert_eq!(limiter.total(), 0);
        assert!(lock(&limiter.open).is_empty(), "no uid left behind");

        let unlimited = ConnectionLimiter::new(0);
        let permits: Vec<_> = (0..1000)
            .map(|_| unlimited.try_acquire(7).unwrap())
            .collect();
        assert_eq!(unlimited.open_connections(7), 1000);
        drop(permits);
        assert_eq!(unlimited.open_connections(7), 0);
    }

    #[test]
    fn token_bucket_refills_at_the_rate() {
        let limiter = RateLimiter::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(limiter.check_at(1, start));
        }
        assert!(!limiter.check_at(1, start), "burst spent");
        assert!(limiter.check_at(2, start), "another uid has its own bucket");
        // 10/s: one token every 100 ms.
        assert!(!limiter.check_at(1, start + Duration::from_millis(50)));
        assert!(limiter.check_at(1, start + Duration::from_millis(160)));
        assert!(!limiter.check_at(1, start + Duration::from_millis(170)));
        // Never more than the burst, however long the pause.
        let later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(limiter.check_at(1, later));
        }
        assert!(!limiter.check_at(1, later));
        // A clock that seems to go backwards adds nothing.
        assert!(!limiter.check_at(1, start));
    }

    #[test]
    fn rate_zero_is_unlimited_and_full_buckets_are_forgotten() {
        let unlimited = RateLimiter::new(0, 0);
        assert!((0..10_000).all(|_| unlimited.check(3)));
        assert_eq!(unlimited.tracked(), 0);

        let limiter = RateLimiter::new(1000, 1);
        let start = Instant::now();
        for uid in 0..u32::try_from(RATE_SWEEP_THRESHOLD).unwrap() {
            assert!(limiter.check_at(uid, start));
        }
        assert_eq!(limiter.tracked(), RATE_SWEEP_THRESHOLD);
        // A second later every bucket is full again: they are swept.
        assert!(limiter.check_at(u32::MAX, start + Duration::from_secs(1)));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn out_of_range_becomes_resource_exhausted() {
        let response = http::Response::builder()
            .header("grpc-status", "11")
            .body(())
            .unwrap();
        let mapped = map_size_refusal(response);
        assert_eq!(mapped.headers()["grpc-status"], "8");
        let ok = http::Response::builder()
            .header("grpc-status", "7")
            .body(())
            .unwrap();
        assert_eq!(map_size_refusal(ok).headers()["grpc-status"], "7");
        let plain = http::Response::builder().body(()).unwrap();
        assert!(
            map_size_refusal(plain)
                .headers()
                .get("grpc-status")
                .is_none()
        );
    }

    #[test]
    fn open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit};
        let raised = raise_open_file_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raised, soft);
        assert_eq!(soft, hard);
    }
}
