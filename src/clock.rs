//! [`Clock`]: the time source of freshness and circuit-breaker decisions, which tests move forward
//! instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A monotonic time source; a manual one can also be moved forward.
#[derive(Clone, Debug)]
pub struct Clock {
    /// Added to the real monotonic clock; only a manual clock has one.
    skew: Option<Arc<AtomicU64>>,
    /// Where [`Clock::now_ms`] counts from.
    origin: Instant,
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
        }
    }

    /// A clock that follows real time and can also be moved forward with [`Clock::advance`].
    pub fn manual() -> Self {
        Self {
            skew: Some(Arc::new(AtomicU64::new(0))),
            origin: Instant::now(),
        }
    }

    /// Milliseconds since this clock (or the clock it was cloned from) was made.
    pub fn now_ms(&self) -> u64 {
        let ms = self
            .now()
            .saturating_duration_since(self.origin)
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
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
