//! Per-user byte-rate quotas (Kafka's `producer_byte_rate` and `consumer_byte_rate`), enforced
//! by each node on the bytes it takes in or serves, so one tenant cannot take a node's whole
//! capacity.
//!
//! Each (user, direction) has a bucket that fills at the quota's rate up to one second's worth
//! and is charged the bytes of each request; a charge may take it below zero (a request larger
//! than the burst is not refused), and a request that finds it below zero waits until it is
//! back at zero ([`Quotas::owed`]). Over any long run a user gets its rate, with one request's
//! burst. How a wait is served: a produce over gRPC waits before it is written (at most
//! [`HOLD_MAX`]; beyond that it is refused as `throttled` with the time to wait, and nothing was
//! written); a fetch waits before it reads; Kafka clients get their answer with
//! `throttle_time_ms` and are not read from meanwhile (KIP-219), or get it late (older
//! versions). Time comes from `tokio::time`, so the simulator runs it on simulated time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;
use tokio::time::Instant;

/// How long a request is held back before it is refused as `throttled` (gRPC produce) or
/// answered anyway (fetch); below clients' usual request timeouts.
pub const HOLD_MAX: Duration = Duration::from_secs(5);
/// The longest `throttle_time_ms` a Kafka client is given at once.
pub const THROTTLE_MAX: Duration = Duration::from_secs(10);
/// The user name whose quotas apply to every user without quotas of its own (Kafka's
/// `<default>` entity).
pub const DEFAULT_USER: &str = "*";

/// A user's quotas; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserQuota {
    pub producer_byte_rate: Option<u64>,
    pub consumer_byte_rate: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Produce,
    Fetch,
}

impl UserQuota {
    pub fn rate(&self, d: Direction) -> Option<u64> {
        match d {
            Direction::Produce => self.producer_byte_rate,
            Direction::Fetch => self.consumer_byte_rate,
        }
    }
}

struct Bucket {
    /// Bytes that may pass now; below zero, what is owed.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64) {
        let burst = rate;
        self.tokens = (self.tokens + rate * now.duration_since(self.at).as_secs_f64()).min(burst);
        self.at = now;
    }

    fn owed(&self, rate: f64) -> Duration {
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / rate) }
    }
}

/// The buckets of one node, by user and direction.
#[derive(Default)]
pub struct Quotas {
    buckets: Mutex<BTreeMap<(String, Direction), Bucket>>,
}

impl Quotas {
    fn with<T>(&self, user: &str, d: Direction, rate: u64, f: impl FnOnce(&mut Bucket, f64) -> T) -> T {
        let now = Instant::now();
        let rate = rate.max(1) as f64;
        let mut buckets = self.buckets.lock().expect("quota lock poisoned");
        let b = buckets.entry((user.to_owned(), d)).or_insert(Bucket { tokens: rate, at: now });
        b.refill(now, rate);
        f(b, rate)
    }

    /// How long `user` must wait before its next request in direction `d` may pass.
    pub fn owed(&self, user: &str, d: Direction, quota: Option<UserQuota>) -> Duration {
        let Some(rate) = quota.and_then(|q| q.rate(d)) else { return Duration::ZERO };
        self.with(user, d, rate, |b, rate| b.owed(rate))
    }

    /// Admits a request of `bytes` if nothing is owed, charging it: `Ok`, or `Err(wait)` with
    /// how long until it would be admitted. Check and charge are one step, so requests in
    /// flight at once cannot all pass on the same credit.
    pub fn admit(
        &self,
        user: &str,
        d: Direction,
        bytes: u64,
        quota: Option<UserQuota>,
    ) -> Result<(), Duration> {
        let Some(rate) = quota.and_then(|q| q.rate(d)) else { return Ok(()) };
        self.with(user, d, rate, |b, rate| {
            let owed = b.owed(rate);
            if owed.is_zero() {
                b.tokens -= bytes as f64;
                Ok(())
            } else {
                Err(owed)
            }
        })
    }

    /// Charges `bytes` already served and returns what is owed afterwards.
    pub fn charge(&self, user: &str, d: Direction, bytes: u64, quota: Option<UserQuota>) -> Duration {
        let Some(rate) = quota.and_then(|q| q.rate(d)) else { return Duration::ZERO };
        self.with(user, d, rate, |b, rate| {
            b.tokens -= bytes as f64;
            b.owed(rate)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Option<UserQuota> =
        Some(UserQuota { producer_byte_rate: Some(1_000_000), consumer_byte_rate: None });

    /// A client with `in_flight` requests of `size` bytes that retries as soon as it is told.
    async fn run(q: &Quotas, user: &str, size: u64, secs: u64) -> f64 {
        let start = Instant::now();
        let mut bytes = 0u64;
        while Instant::now().duration_since(start) < Duration::from_secs(secs) {
            match q.admit(user, Direction::Produce, size, Q) {
                Ok(()) => bytes += size,
                Err(wait) => tokio::time::advance(wait).await,
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        bytes as f64 / Instant::now().duration_since(start).as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_gets_its_rate_whatever_its_request_size() {
        let q = Quotas::default();
        for (user, size) in [("small", 10_000), ("large", 8_000_000), ("medium", 300_000)] {
            let rate = run(&q, user, size, 60).await;
            // One request's burst over a minute: 8 MB is 13% of 60 MB.
            assert!((950_000.0..1_150_000.0).contains(&rate), "{user}: {rate} B/s");
        }
        assert_eq!(q.admit("carol", Direction::Produce, 1 << 30, None), Ok(()), "no quota");
        assert_eq!(q.admit("small", Direction::Fetch, 1 << 30, Q), Ok(()), "no fetch quota");
    }

    #[tokio::test(start_paused = true)]
    async fn charges_after_the_fact_are_owed_and_repaid_at_the_rate() {
        let q = Quotas::default();
        let owed = q.charge("dave", Direction::Produce, 3_000_000, Q);
        assert_eq!(owed, Duration::from_secs(2), "3 MB against 1 MB of burst at 1 MB/s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(q.owed("dave", Direction::Produce, Q), Duration::from_secs(1));
        assert!(q.admit("dave", Direction::Produce, 1, Q).is_err(), "nothing passes while owed");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(q.admit("dave", Direction::Produce, 1, Q), Ok(()));
    }
}
