//! Prometheus metrics (`GET /metrics`), with prometheus-client.
//!
//! Each [`Metrics`] owns its own registry, so several instances in one process (tests) never mix.
//! Labels are route templates, statuses, outcomes and client names from the configuration: never an
//! e-mail, a key or any other value a request brings. Handles for fixed label sets are resolved once
//! and kept, so the hot path does no lookup for them.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cache::CacheStatus;
use crate::partner::PartnerError;

type Labels = [(&'static str, &'static str); 3];
type RouteLabel = [(&'static str, &'static str); 1];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latency buckets: 50 µs to about 3.3 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// Partner call latency buckets: 1 ms to about 16 s.
fn partner_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Cache outcomes, one counter each.
struct CacheCounters {
    hit: Counter,
    negative_hit: Counter,
    miss: Counter,
    shared_hit: Counter,
    collapsed: Counter,
    forced: Counter,
    stale_while_revalidate: Counter,
    stale_if_error: Counter,
    failed: Counter,
}

/// Every metric of one service instance.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    request_duration: HistogramFamily<RouteLabel>,
    in_flight: Gauge,
    cache: CacheCounters,
    cache_entries: Gauge,
    partner_calls: Family<[(&'static str, &'static str); 1], Counter>,
    partner_duration: Histogram,
    partner_retries: Counter,
    partner_credentials_refused: Counter,
    circuit_state: Gauge,
    rate_limited: Family<[(&'static str, String); 1], Counter>,
    auth_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("skypostal_proxy");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request, by route template",
            request_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests being answered",
            in_flight.clone(),
        );

        let outcomes = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "cache_lookups",
            "Credential lookups by cache outcome",
            outcomes.clone(),
        );
        let outcome = |name: &'static str| outcomes.get_or_create(&[("outcome", name)]).clone();
        let cache = CacheCounters {
            hit: outcome("hit"),
            negative_hit: outcome("negative_hit"),
            miss: outcome("miss"),
            shared_hit: outcome("shared_hit"),
            collapsed: outcome("collapsed"),
            forced: outcome("forced"),
            stale_while_revalidate: outcome("stale_while_revalidate"),
            stale_if_error: outcome("stale_if_error"),
            failed: outcome("failed"),
        };
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Cached answers (found and not found)",
            cache_entries.clone(),
        );

        let partner_calls = Family::default();
        registry.register(
            "partner_calls",
            "Calls to the partner API by outcome",
            partner_calls.clone(),
        );
        let partner_duration = partner_histogram();
        registry.register(
            "partner_call_duration_seconds",
            "Duration of partner calls",
            partner_duration.clone(),
        );
        let partner_retries = Counter::default();
        registry.register(
            "partner_retries",
            "Partner calls repeated after a transient failure",
            partner_retries.clone(),
        );
        let partner_credentials_refused = Counter::default();
        registry.register(
            "partner_credentials_refused",
            "Partner answers refusing our user_code/app_key (error_code 13001)",
            partner_credentials_refused.clone(),
        );
        let circuit_state = Gauge::default();
        registry.register(
            "partner_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );

        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused by a client's rate limit, by client name",
            rate_limited.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "auth_failures",
            "Requests refused for a missing or unknown key",
            auth_failures.clone(),
        );

        Self {
            registry,
            requests,
            request_duration,
            in_flight,
            cache,
            cache_entries,
            partner_calls,
            partner_duration,
            partner_retries,
            partner_credentials_refused,
            circuit_state,
            rate_limited,
            auth_failures,
        }
    }

    /// A request started; the returned guard counts it in flight until dropped.
    pub fn request_started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// A request was answered.
    pub fn request_done(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&[
                ("route", route),
                ("method", method),
                ("status", status_label(status)),
            ])
            .inc();
        self.request_duration
            .get_or_create(&[("route", route)])
            .observe(took.as_secs_f64());
    }

    /// A lookup was answered this way.
    pub fn cache_outcome(&self, status: CacheStatus, found: bool) {
        let c = &self.cache;
        let counter = match status {
            CacheStatus::Hit { .. } if found => &c.hit,
            CacheStatus::Hit { .. } => &c.negative_hit,
            CacheStatus::Stored => &c.miss,
            CacheStatus::SharedHit { .. } => &c.shared_hit,
            CacheStatus::Collapsed => &c.collapsed,
            CacheStatus::Forced => &c.forced,
            CacheStatus::StaleWhileRevalidate { .. } => &c.stale_while_revalidate,
            CacheStatus::StaleIfError { .. } => &c.stale_if_error,
            CacheStatus::Failed { .. } => &c.failed,
        };
        counter.inc();
    }

    /// One partner call ended (`error` is `None` on an answer that was found or not found).
    pub fn partner_call(&self, error: Option<&PartnerError>, took: Duration) {
        let outcome = error.map_or("answered", partner_outcome);
        self.partner_calls
            .get_or_create(&[("outcome", outcome)])
            .inc();
        self.partner_duration.observe(took.as_secs_f64());
        if matches!(error, Some(PartnerError::AccessDenied { .. })) {
            self.partner_credentials_refused.inc();
        }
    }

    /// A partner call is being repeated.
    pub fn partner_retry(&self) {
        self.partner_retries.inc();
    }

    /// A lookup was refused before any call (circuit open, back-off, no slot).
    pub fn partner_refused(&self, error: &PartnerError) {
        self.partner_calls
            .get_or_create(&[("outcome", partner_outcome(error))])
            .inc();
    }

    /// A client's rate limit refused a request.
    pub fn rate_limited(&self, client: &str) {
        self.rate_limited
            .get_or_create(&[("client", client.to_owned())])
            .inc();
    }

    /// A request had no key or an unknown one.
    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    /// Renders the registry in the text exposition format, with the gauges read at scrape time.
    pub fn render(&self, cache_entries: u64, circuit: &str) -> String {
        self.cache_entries
            .set(i64::try_from(cache_entries).unwrap_or(i64::MAX));
        self.circuit_state.set(match circuit {
            "closed" => 0,
            "half-open" => 1,
            _ => 2,
        });
        let mut out = String::with_capacity(8 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Metrics {
    /// Registers the shared tier's metrics (only instances with `[redis]` have them) and returns
    /// their handles.
    pub fn register_shared_tier(&mut self) -> SharedTierMetrics {
        let r = &mut self.registry;
        let m = SharedTierMetrics::default();
        r.register(
            "shared_tier_up",
            "1 while Redis answers, 0 while the instance runs on local state alone",
            m.up.clone(),
        );
        r.register(
            "shared_tier_subscribed",
            "1 while the purge channel is subscribed",
            m.subscribed.clone(),
        );
        r.register(
            "shared_tier_transitions",
            "Changes of the shared tier's state, by the state entered",
            m.transitions.clone(),
        );
        r.register(
            "shared_tier_lookups",
            "Reads of the shared cache tier by outcome",
            m.lookups.clone(),
        );
        r.register(
            "shared_tier_errors",
            "Redis operations that failed or timed out, by operation",
            m.errors.clone(),
        );
        r.register(
            "shared_tier_purges_received",
            "Purges announced by other replicas and applied here",
            m.purges_received.clone(),
        );
        r.register(
            "shared_tier_stores",
            "Answers offered to Redis, by outcome",
            m.stores.clone(),
        );
        r.register(
            "shared_tier_purge_catch_ups",
            "Resubscriptions to the purge channel, by how missed purges were made up for",
            m.catch_ups.clone(),
        );
        r.register(
            "shared_quota_decisions",
            "Partner call slots asked of the global quota, by outcome",
            m.quota.clone(),
        );
        m
    }
}

type Outcome = [(&'static str, &'static str); 1];

/// The shared tier's metric handles; cheap to clone.
#[derive(Clone, Default)]
pub struct SharedTierMetrics {
    up: Gauge,
    subscribed: Gauge,
    transitions: Family<Outcome, Counter>,
    lookups: Family<Outcome, Counter>,
    errors: Family<Outcome, Counter>,
    purges_received: Counter,
    catch_ups: Family<Outcome, Counter>,
    stores: Family<Outcome, Counter>,
    quota: Family<Outcome, Counter>,
}

impl SharedTierMetrics {
    /// The tier went up (`true`) or down.
    pub fn transition(&self, up: bool) {
        self.up.set(up.into());
        let state = if up { "up" } else { "down" };
        self.transitions.get_or_create(&[("state", state)]).inc();
    }

    /// The tier's state at start-up, before any transition.
    pub fn set_up(&self, up: bool) {
        self.up.set(up.into());
    }

    /// The purge channel was (`true`) or stopped being subscribed.
    pub fn subscribed(&self, subscribed: bool) {
        self.subscribed.set(subscribed.into());
    }

    /// A shared-tier read ended: `hit`, `stale`, `miss`, `unreadable`, `error` or `skipped`.
    pub fn lookup(&self, outcome: &'static str) {
        self.lookups.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// A Redis operation failed or timed out.
    pub fn error(&self, operation: &'static str) {
        self.errors.get_or_create(&[("operation", operation)]).inc();
    }

    /// Another replica's purge was applied.
    pub fn purge_received(&self) {
        self.purges_received.inc();
    }

    /// A global quota decision: `granted`, `waited`, `refused` or `local` (Redis unavailable).
    pub fn quota(&self, outcome: &'static str) {
        self.quota.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// An answer offered to Redis: `written`, `tombstoned` (a purge since the lookup began) or
    /// `late` (the lookup outlived the purge tombstones' window).
    pub fn store(&self, outcome: &'static str) {
        self.stores.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// A resubscription caught up from the purge log (`replayed`) or had to stop trusting the
    /// in-memory cache (`distrusted`).
    pub fn catch_up(&self, outcome: &'static str) {
        self.catch_ups.get_or_create(&[("outcome", outcome)]).inc();
    }
}

/// Decrements the in-flight gauge when the request ends, however it ends.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => match other / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}

fn partner_outcome(error: &PartnerError) -> &'static str {
    match error {
        PartnerError::Timeout => "timeout",
        PartnerError::Saturated => "no_slot",
        PartnerError::Transport(_) => "transport_error",
        PartnerError::Status { .. } => "http_error",
        PartnerError::Backoff { .. } => "backoff_requested",
        PartnerError::CircuitOpen { .. } => "circuit_open",
        PartnerError::Throttled { .. } => "backing_off",
        PartnerError::Unreadable { .. } => "unreadable",
        PartnerError::TooLarge { .. } => "too_large",
        PartnerError::Ambiguous { .. } => "ambiguous",
        PartnerError::AccessDenied { .. } => "credentials_refused",
        PartnerError::Rejected { .. } => "partner_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_lists_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.request_done("/healthz", "GET", 200, Duration::from_millis(1));
        m.cache_outcome(CacheStatus::Stored, true);
        m.partner_call(None, Duration::from_millis(5));
        m.rate_limited("billing");
        let text = m.render(3, "open");
        for needle in [
            "skypostal_proxy_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 1",
            "skypostal_proxy_cache_lookups_total{outcome=\"miss\"} 1",
            "skypostal_proxy_cache_entries 3",
            "skypostal_proxy_partner_circuit_state 2",
            "skypostal_proxy_partner_calls_total{outcome=\"answered\"} 1",
            "skypostal_proxy_rate_limited_total{client=\"billing\"} 1",
            "skypostal_proxy_partner_call_duration_seconds_bucket",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
