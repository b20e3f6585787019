//! Per-client rate limits (GCRA, by `governor`) and their headers
//! (draft-ietf-httpapi-ratelimit-headers-09):
//!
//! - `RateLimit-Policy: "client";q=<burst>;w=<seconds to refill the burst>`
//! - `RateLimit: "client";r=<remaining>;t=<seconds until one more request is allowed>`
//!
//! Clients are known at start-up, so each gets its own direct limiter: no keyed map to grow.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue};

use crate::error::retry_after_secs;

/// The `RateLimit-Policy` header.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One client's limiter and its fixed policy header.
pub struct ClientLimiter {
    limiter: Limiter,
    clock: DefaultClock,
    policy: HeaderValue,
    /// Seconds until one more request is allowed once the burst is spent.
    refill_one_s: u64,
}

/// A refused request: when to retry, and the `RateLimit` header to send.
#[derive(Debug, Clone)]
pub struct Limited {
    /// Until one more request is allowed.
    pub retry_after: Duration,
    /// `RateLimit` with `r=0`.
    pub header: HeaderValue,
}

impl ClientLimiter {
    /// A limiter allowing `rate_per_s` sustained and `burst` at once (zeros count as one).
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(rate_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate).allow_burst(burst);
        let clock = DefaultClock::default();
        let refill_all_s = u64::from(burst.get()).div_ceil(u64::from(rate.get()));
        let policy = HeaderValue::from_str(&format!("\"client\";q={burst};w={refill_all_s}"))
            .unwrap_or(HeaderValue::from_static("\"client\""));
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
            policy,
            refill_one_s: retry_after_secs(quota.replenish_interval()),
        }
    }

    /// The `RateLimit-Policy` value.
    pub fn policy(&self) -> &HeaderValue {
        &self.policy
    }

    /// Takes one request from the quota: the `RateLimit` value, or the refusal.
    pub fn check(&self) -> Result<HeaderValue, Limited> {
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let t = if remaining > 0 { 0 } else { self.refill_one_s };
                Ok(ratelimit_header(remaining, t))
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                Err(Limited {
                    retry_after,
                    header: ratelimit_header(0, retry_after_secs(retry_after)),
                })
            }
        }
    }
}

impl fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientLimiter")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn ratelimit_header(remaining: u32, t: u64) -> HeaderValue {
    // From the `String` itself: `from_str` would copy it once more.
    HeaderValue::try_from(format!("\"client\";r={remaining};t={t}"))
        .unwrap_or(HeaderValue::from_static("\"client\""))
}

/// A limiter on partner calls started per second, waited on (not refused) up to a deadline.
pub struct CallRate {
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    clock: DefaultClock,
}

impl CallRate {
    /// At most `per_s` calls a second, with a burst of the same size.
    pub fn new(per_s: u32) -> Self {
        let per_s = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
        let clock = DefaultClock::default();
        Self {
            limiter: RateLimiter::direct_with_clock(Quota::per_second(per_s), clock.clone()),
            clock,
        }
    }

    /// Waits for the next call slot; `false` if it would come after `deadline`.
    pub async fn acquire(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let wait = match self.limiter.check() {
                Ok(()) => return true,
                Err(not_until) => not_until.wait_time_from(self.clock.now()),
            };
            if tokio::time::Instant::now() + wait > deadline {
                return false;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_spent_then_refused_with_a_whole_second_retry_after() {
        let limiter = ClientLimiter::new(1, 2);
        assert_eq!(limiter.policy(), "\"client\";q=2;w=2");
        assert_eq!(limiter.check().unwrap(), "\"client\";r=1;t=0");
        assert_eq!(limiter.check().unwrap(), "\"client\";r=0;t=1");
        let limited = limiter.check().unwrap_err();
        assert!(limited.retry_after > Duration::ZERO);
        assert!(limited.retry_after <= Duration::from_secs(1));
        assert_eq!(limited.header, "\"client\";r=0;t=1");
    }

    #[test]
    fn refill_time_rounds_up() {
        assert_eq!(ClientLimiter::new(3, 10).policy(), "\"client\";q=10;w=4");
    }
}
