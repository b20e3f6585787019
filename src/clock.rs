//! [`Clock`]: the time source of freshness and circuit-breaker decisions, which tests move forward
//! instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic time source; a manual one can also be moved forward.
#[derive(Clone, Debug)]
pub struct Clock {
    /// Added to the real monotonic clock; only a manual clock has one.
    skew: Option<Arc<AtomicU64>>,
    /// Where [`Clock::now_ms`] counts from.
    origin: Instant,
    /// Unix milliseconds at `origin`.
    origin_unix_ms: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The real monotonic clock.
    pub fn system() -> Self {
        Self {
            skew: None,
            origin: Instant::now(),
            origin_unix_ms: unix_now_ms(),
        }
    }

    /// A clock that follows real time and can also be moved forward with [`Clock::advance`].
    pub fn manual() -> Self {
        Self {
            skew: Some(Arc::new(AtomicU64::new(0))),
            origin: Instant::now(),
            origin_unix_ms: unix_now_ms(),
        }
    }

    /// Unix milliseconds: the wall clock read once when the clock was made, moved on by the
    /// monotonic clock since. Never goes back, and agrees across processes as well as their wall
    /// clocks do, which is what entries shared between replicas need.
    pub fn now_ms(&self) -> u64 {
        let ms = self
            .now()
            .saturating_duration_since(self.origin)
            .as_millis();
        self.origin_unix_ms
            .saturating_add(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(skew) = &self.skew {
            skew.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }

    /// Now.
    pub fn now(&self) -> Instant {
        let now = Instant::now();
        match &self.skew {
            Some(skew) => now + Duration::from_millis(skew.load(Ordering::SeqCst)),
            None => now,
        }
    }
}

/// The wall clock since the Unix epoch (zero if it reads before 1970).
pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The wall clock in Unix milliseconds.
fn unix_now_ms() -> u64 {
    u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX)
}
