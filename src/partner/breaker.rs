//! The circuit breaker in front of partner calls, which also holds the partner's back-off requests.
//!
//! - Closed: calls go through. It opens after `circuit_failures` consecutive failures, or when at
//!   least `circuit_min_calls` calls in the current `circuit_window_s` failed at
//!   `circuit_failure_ratio` or more.
//! - Open: calls are refused at once for `circuit_cooldown_s`, then one probe call is let through
//!   (half-open). The probe's success closes the circuit; its failure opens it again.
//! - A partner 429 or 503 opens it for the partner's `Retry-After` (capped): no call is sent until
//!   then, and refusals in that time say "saturated" rather than "circuit open".
//!
//! Time comes from the injectable [`Clock`], so tests move it instead of sleeping.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::PartnerError;
use crate::clock::Clock;

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// Failure ratio over the window that opens the circuit…
    pub failure_ratio: f64,
    /// …once the window holds at least this many calls.
    pub min_calls: u32,
    /// Length of the counting window.
    pub window: Duration,
    /// How long the circuit stays open before a probe.
    pub cooldown: Duration,
}

/// What a call's outcome means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The partner answered usefully (found or not found).
    Success,
    /// The partner failed.
    Failure,
    /// The partner asked us to back off for this long.
    BackOff(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Closed,
    Open { until: Instant, throttled: bool },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct State {
    mode: Mode,
    consecutive: u32,
    window_start: Instant,
    window_calls: u32,
    window_failures: u32,
}

/// The breaker. Only misses pass through it, so a mutex is cheap enough.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    clock: Clock,
    state: Mutex<State>,
}

/// Permission for one call. Dropped without [`Ticket::finish`] (the call was cancelled), it counts
/// as a failure, so a lost probe can never leave the circuit half-open for good.
#[must_use]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
    finished: bool,
}

impl Ticket<'_> {
    /// Records the call's outcome.
    pub fn finish(mut self, verdict: Verdict) {
        self.finished = true;
        self.breaker.record(self.probe, verdict);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.record(self.probe, Verdict::Failure);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy, clock: Clock) -> Self {
        let now = clock.now();
        Self {
            policy,
            clock,
            state: Mutex::new(State {
                mode: Mode::Closed,
                consecutive: 0,
                window_start: now,
                window_calls: 0,
                window_failures: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a call through, or refuses it with how long to wait.
    pub fn admit(&self) -> Result<Ticket<'_>, PartnerError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let probe = match state.mode {
            Mode::Closed => false,
            // A back-off that has run out needs no probe: the partner said when to come back.
            Mode::Open {
                until,
                throttled: true,
            } if now >= until => {
                state.mode = Mode::Closed;
                false
            }
            Mode::Open { until, throttled } if now < until => {
                let retry_after = until - now;
                return Err(if throttled {
                    PartnerError::Throttled { retry_after }
                } else {
                    PartnerError::CircuitOpen { retry_after }
                });
            }
            Mode::Open { .. } | Mode::HalfOpen { probing: false } => {
                state.mode = Mode::HalfOpen { probing: true };
                tracing::info!("circuit half-open: sending one probe call to the partner");
                true
            }
            Mode::HalfOpen { probing: true } => {
                return Err(PartnerError::CircuitOpen {
                    retry_after: Duration::from_secs(1),
                })
            }
        };
        Ok(Ticket {
            breaker: self,
            probe,
            finished: false,
        })
    }

    /// The refusal [`Breaker::admit`] would give now, without taking a probe: lets a lookup
    /// skip its waits for a call slot when no call could be made anyway.
    pub fn refusal(&self) -> Option<PartnerError> {
        let now = self.clock.now();
        match self.lock().mode {
            Mode::Open { until, throttled } if now < until => {
                let retry_after = until - now;
                Some(if throttled {
                    PartnerError::Throttled { retry_after }
                } else {
                    PartnerError::CircuitOpen { retry_after }
                })
            }
            Mode::HalfOpen { probing: true } => Some(PartnerError::CircuitOpen {
                retry_after: Duration::from_secs(1),
            }),
            _ => None,
        }
    }

    fn record(&self, probe: bool, verdict: Verdict) {
        let now = self.clock.now();
        let policy = &self.policy;
        let mut state = self.lock();
        if now.saturating_duration_since(state.window_start) >= policy.window {
            state.window_start = now;
            state.window_calls = 0;
            state.window_failures = 0;
        }
        state.window_calls += 1;
        match verdict {
            Verdict::Success => {
                state.consecutive = 0;
                // Only the probe decides a half-open circuit; late answers of calls admitted
                // before it opened do not.
                if probe {
                    tracing::info!("circuit closed: the partner answered the probe");
                    state.mode = Mode::Closed;
                    state.window_start = now;
                    state.window_calls = 0;
                    state.window_failures = 0;
                }
            }
            Verdict::BackOff(wait) => {
                state.window_failures += 1;
                tracing::warn!(
                    retry_after_ms = wait.as_millis() as u64,
                    "the partner asked to back off: no calls until then"
                );
                let until = later(now, wait);
                state.mode = match state.mode {
                    // A longer pause already in force stays.
                    Mode::Open {
                        until: current,
                        throttled,
                    } if current > until => Mode::Open {
                        until: current,
                        throttled,
                    },
                    _ => Mode::Open {
                        until,
                        throttled: true,
                    },
                };
            }
            Verdict::Failure => {
                state.consecutive += 1;
                state.window_failures += 1;
                let ratio_tripped = state.window_calls >= policy.min_calls
                    && f64::from(state.window_failures)
                        >= policy.failure_ratio * f64::from(state.window_calls);
                let open = probe
                    || (state.mode == Mode::Closed
                        && (state.consecutive >= policy.consecutive_failures || ratio_tripped));
                if open {
                    tracing::warn!(
                        consecutive_failures = state.consecutive,
                        window_calls = state.window_calls,
                        window_failures = state.window_failures,
                        cooldown_s = policy.cooldown.as_secs(),
                        "circuit open: partner calls paused"
                    );
                    state.mode = Mode::Open {
                        until: later(now, policy.cooldown),
                        throttled: false,
                    };
                }
            }
        }
    }

    /// `closed`, `open` or `half-open`, for readiness and metrics (a back-off that has run out
    /// reads as closed: the next call goes through).
    pub fn state_label(&self) -> &'static str {
        let now = self.clock.now();
        match self.lock().mode {
            Mode::Closed => "closed",
            Mode::Open { until, .. } if now < until => "open",
            Mode::Open {
                throttled: true, ..
            } => "closed",
            Mode::Open { .. } | Mode::HalfOpen { .. } => "half-open",
        }
    }
}

/// `now + wait`, saturating far in the future instead of overflowing.
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

impl Verdict {
    /// How the breaker reads a call's error (`None`: the call succeeded).
    pub fn of(error: Option<&PartnerError>) -> Self {
        match error {
            None => Self::Success,
            Some(PartnerError::Backoff { retry_after, .. }) => Self::BackOff(*retry_after),
            Some(_) => Self::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (Breaker, Clock) {
        let clock = Clock::manual();
        let policy = BreakerPolicy {
            consecutive_failures: 3,
            failure_ratio: 0.5,
            min_calls: 10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(5),
        };
        (Breaker::new(policy, clock.clone()), clock)
    }

    fn call(b: &Breaker, verdict: Verdict) -> Result<(), PartnerError> {
        b.admit().map(|t| t.finish(verdict))
    }

    #[test]
    fn consecutive_failures_open_then_a_probe_closes() {
        let (b, clock) = breaker();
        for _ in 0..3 {
            call(&b, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state_label(), "open");
        assert!(matches!(b.admit(), Err(PartnerError::CircuitOpen { .. })));

        clock.advance(Duration::from_secs(5));
        let probe = b.admit().expect("one probe after the cool-down");
        assert!(
            matches!(b.admit(), Err(PartnerError::CircuitOpen { .. })),
            "only one probe"
        );
        probe.finish(Verdict::Success);
        assert_eq!(b.state_label(), "closed");
        call(&b, Verdict::Success).unwrap();
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let (b, clock) = breaker();
        for _ in 0..3 {
            call(&b, Verdict::Failure).unwrap();
        }
        clock.advance(Duration::from_secs(5));
        call(&b, Verdict::Failure).unwrap();
        assert_eq!(b.state_label(), "open");
    }

    #[test]
    fn a_dropped_probe_counts_as_a_failure() {
        let (b, clock) = breaker();
        for _ in 0..3 {
            call(&b, Verdict::Failure).unwrap();
        }
        clock.advance(Duration::from_secs(5));
        drop(b.admit().unwrap());
        assert_eq!(b.state_label(), "open");
    }

    #[test]
    fn a_failure_ratio_over_the_window_opens() {
        let (b, _) = breaker();
        for i in 0..10 {
            let verdict = if i % 2 == 1 {
                Verdict::Failure
            } else {
                Verdict::Success
            };
            call(&b, verdict).unwrap();
        }
        assert_eq!(b.state_label(), "open");
    }

    #[test]
    fn partner_back_off_refuses_as_throttled_until_retry_after() {
        let (b, clock) = breaker();
        call(&b, Verdict::BackOff(Duration::from_secs(2))).unwrap();
        match b.admit() {
            Err(PartnerError::Throttled { retry_after }) => {
                assert!(retry_after <= Duration::from_secs(2));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.state_label(), "closed");
        let first = b.admit().expect("no probe after a back-off");
        let second = b.admit().expect("calls flow at once after a back-off");
        first.finish(Verdict::Success);
        second.finish(Verdict::Success);
    }

    #[test]
    fn only_the_probe_closes_a_half_open_circuit() {
        let (b, clock) = breaker();
        let late = b.admit().unwrap();
        for _ in 0..3 {
            call(&b, Verdict::Failure).unwrap();
        }
        clock.advance(Duration::from_secs(5));
        let probe = b.admit().unwrap();
        late.finish(Verdict::Success);
        assert_eq!(
            b.state_label(),
            "half-open",
            "a late answer does not decide"
        );
        probe.finish(Verdict::Success);
        assert_eq!(b.state_label(), "closed");
        assert!(b.refusal().is_none());
    }
}
