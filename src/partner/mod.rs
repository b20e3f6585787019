//! The Skypostal partner client: the one place that holds and sends the partner secrets.
//!
//! [`SkypostalClient::lookup`] makes one customer-get-info lookup: the request body built by
//! serde with the credentials injected, a bounded number of concurrent calls, a per-attempt
//! timeout, retries with full-jitter exponential backoff for transient failures, the whole lookup
//! inside one deadline, the answer read up to a size cap and mapped by [`wire::map_answer`].

pub mod breaker;
pub mod wcf_date;
pub mod wire;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use crate::clock::Clock;
use crate::config::UpstreamSettings;
use crate::domain::{Credentials, CustomerEmail};
use crate::metrics::Metrics;
use crate::rate_limit::CallRate;
use crate::shared::{QuotaDecision, SharedTier};
use breaker::{Breaker, BreakerPolicy, Verdict};
pub use wire::PartnerErrorFields;

/// Shortest and longest wait before a retry (before jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long to back off when a 429/503 names no usable `Retry-After`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(5);

/// What the partner said about a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartnerAnswer {
    /// One customer record.
    Found(Credentials),
    /// The partner knows no such customer; `fields` holds its description when it gave one.
    NotFound {
        /// The partner's error fields, if the answer was a record rather than `[]`.
        fields: Option<PartnerErrorFields>,
    },
}

/// Why a lookup gave no answer. Cheap to clone: every waiter of a shared lookup gets a copy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PartnerError {
    /// The lookup's deadline passed before an answer came (504).
    #[error("the partner did not answer within the lookup's deadline")]
    Timeout,
    /// No partner call slot freed up within the deadline (503).
    #[error("no partner call slot within the deadline")]
    Saturated,
    /// The partner could not be reached, or closed the connection before answering (502).
    #[error("the partner could not be reached: {0}")]
    Transport(String),
    /// A non-2xx answer (502).
    #[error("the partner answered HTTP {status}")]
    Status {
        /// The partner's HTTP status.
        status: u16,
    },
    /// A 429 or 503: the partner asks us to slow down (503 to callers).
    #[error("the partner asked to back off (HTTP {status}) for {retry_after:?}")]
    Backoff {
        /// The partner's HTTP status.
        status: u16,
        /// How long to send nothing, capped.
        retry_after: Duration,
    },
    /// The circuit is open after repeated partner failures: no call was made (503).
    #[error("the circuit is open after repeated partner failures")]
    CircuitOpen {
        /// Until the next probe.
        retry_after: Duration,
    },
    /// The partner asked us to back off earlier and the time is not up: no call was made (503).
    #[error("backing off at the partner's request")]
    Throttled {
        /// Until the partner's back-off ends.
        retry_after: Duration,
    },
    /// A body that is not the documented JSON (502).
    #[error("the partner's answer is unreadable: {reason}")]
    Unreadable {
        /// What was wrong; never quotes the body.
        reason: String,
    },
    /// A body over `upstream.max_response_bytes` (502).
    #[error("the partner's answer is larger than {limit} bytes")]
    TooLarge {
        /// The configured cap.
        limit: usize,
    },
    /// More than one customer record for one e-mail (502).
    #[error("the partner answered {records} customer records for one e-mail")]
    Ambiguous {
        /// How many records came.
        records: usize,
    },
    /// The partner refused our credentials, `error_code` 13001 (502, logged at error level).
    #[error("the partner refused our credentials ({fields})")]
    AccessDenied {
        /// The partner's error fields.
        fields: PartnerErrorFields,
    },
    /// The partner reported a system error or an error on an otherwise successful record (502).
    #[error("the partner reported an error ({fields})")]
    Rejected {
        /// The partner's error fields.
        fields: PartnerErrorFields,
    },
}

impl PartnerError {
    /// The partner's HTTP status, when an answer came (for `Cache-Status: fwd-status`).
    pub fn fwd_status(&self) -> Option<u16> {
        match self {
            Self::Timeout
            | Self::Saturated
            | Self::Transport(_)
            | Self::CircuitOpen { .. }
            | Self::Throttled { .. } => None,
            Self::Status { status } | Self::Backoff { status, .. } => Some(*status),
            Self::Unreadable { .. }
            | Self::TooLarge { .. }
            | Self::Ambiguous { .. }
            | Self::AccessDenied { .. }
            | Self::Rejected { .. } => Some(200),
        }
    }

    /// The partner's error fields, when the answer carried them.
    pub fn fields(&self) -> Option<&PartnerErrorFields> {
        match self {
            Self::AccessDenied { fields } | Self::Rejected { fields } => Some(fields),
            _ => None,
        }
    }
}

impl fmt::Display for PartnerErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "error_code={} system_error={} description={:?} location={:?}",
            self.code.as_deref().unwrap_or("-"),
            self.system_error,
            self.description.as_deref().unwrap_or(""),
            self.location.as_deref().unwrap_or(""),
        )
    }
}

/// What operators need to see of the partner's health (`/readyz`, metrics).
#[derive(Debug, Default)]
pub struct PartnerHealth {
    last_success_ms: AtomicU64,
    last_auth_failure_ms: AtomicU64,
    last_failure_ms: AtomicU64,
}

impl PartnerHealth {
    fn record(&self, result: &Result<PartnerAnswer, PartnerError>) {
        let now = unix_now_ms();
        match result {
            Ok(_) => self.last_success_ms.store(now, Ordering::Relaxed),
            Err(PartnerError::AccessDenied { .. }) => {
                self.last_auth_failure_ms.store(now, Ordering::Relaxed);
                self.last_failure_ms.store(now, Ordering::Relaxed);
            }
            Err(
                PartnerError::Saturated
                | PartnerError::CircuitOpen { .. }
                | PartnerError::Throttled { .. },
            ) => {}
            Err(_) => self.last_failure_ms.store(now, Ordering::Relaxed),
        }
    }

    /// Whether the partner's last verdict on our credentials was a refusal.
    pub fn auth_failing(&self) -> bool {
        self.last_auth_failure_ms.load(Ordering::Relaxed)
            > self.last_success_ms.load(Ordering::Relaxed)
    }

    /// Unix seconds of the last successful lookup (0: none yet).
    pub fn last_success_unix(&self) -> u64 {
        self.last_success_ms.load(Ordering::Relaxed) / 1000
    }

    /// Unix seconds of the last failed lookup (0: none yet).
    pub fn last_failure_unix(&self) -> u64 {
        self.last_failure_ms.load(Ordering::Relaxed) / 1000
    }
}

/// Unix milliseconds: whole seconds could not order a refusal after a success in one second.
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The client of the partner API. Cheap to clone; build one at start-up.
#[derive(Clone)]
pub struct SkypostalClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    user_code: u64,
    /// Swapped on SIGHUP when the key file changes.
    app_key: std::sync::RwLock<SecretString>,
    timeout: Duration,
    deadline: Duration,
    max_retries: u32,
    max_response_bytes: usize,
    permits: Semaphore,
    call_rate: CallRate,
    /// The quota shared by all replicas, when there is a shared tier.
    global_quota: Option<SharedTier>,
    breaker: Breaker,
    retry_after_cap: Duration,
    health: PartnerHealth,
    metrics: Arc<Metrics>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// The HTTP client (TLS roots, resolver) could not be set up.
    #[error("the HTTP client could not be built: {0}")]
    Http(#[from] reqwest::Error),
    /// `upstream.base_url` + `upstream.path` is not a URL.
    #[error("upstream.base_url + upstream.path is not a URL: {0}")]
    Endpoint(String),
}

/// One attempt's failure, and whether another attempt may help.
struct AttemptError {
    error: PartnerError,
    retryable: bool,
}

impl AttemptError {
    fn retry(error: PartnerError) -> Self {
        Self {
            error,
            retryable: true,
        }
    }

    fn fatal(error: PartnerError) -> Self {
        Self {
            error,
            retryable: false,
        }
    }
}

impl SkypostalClient {
    /// Builds the client and its connection pool; `clock` times the circuit breaker. With
    /// `global_quota`, `upstream.max_rps` is also enforced across every replica sharing it.
    pub fn new(
        settings: &UpstreamSettings,
        clock: Clock,
        metrics: Arc<Metrics>,
        global_quota: Option<SharedTier>,
    ) -> Result<Self, ClientBuildError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A redirect would re-send the app key to wherever the partner points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("skypostal-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let endpoint = reqwest::Url::parse(&settings.endpoint())
            .map_err(|e| ClientBuildError::Endpoint(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                endpoint,
                user_code: settings.user_code,
                app_key: std::sync::RwLock::new(settings.app_key.clone()),
                timeout: settings.timeout,
                deadline: settings.deadline,
                max_retries: settings.max_retries,
                max_response_bytes: settings.max_response_bytes,
                permits: Semaphore::new(settings.max_concurrency),
                call_rate: CallRate::new(settings.max_rps),
                global_quota,
                breaker: Breaker::new(
                    BreakerPolicy {
                        consecutive_failures: settings.circuit_failures,
                        failure_ratio: settings.circuit_failure_ratio,
                        min_calls: settings.circuit_min_calls,
                        window: settings.circuit_window,
                        cooldown: settings.circuit_cooldown,
                    },
                    clock,
                ),
                retry_after_cap: settings.retry_after_cap,
                metrics,
                health: PartnerHealth::default(),
            }),
        })
    }

    /// The partner's health as seen through our lookups.
    pub fn health(&self) -> &PartnerHealth {
        &self.inner.health
    }

    /// Replaces the partner app key (key rotation); lookups already started keep the old one.
    pub fn set_app_key(&self, app_key: SecretString) {
        *self
            .inner
            .app_key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = app_key;
    }

    /// The circuit breaker's state: `closed`, `open` or `half-open`.
    pub fn circuit_state(&self) -> &'static str {
        self.inner.breaker.state_label()
    }

    /// Looks one customer up, within the configured deadline.
    pub async fn lookup(&self, email: &CustomerEmail) -> Result<PartnerAnswer, PartnerError> {
        let result = self
            .lookup_until(email, Instant::now() + self.inner.deadline)
            .await;
        self.inner.health.record(&result);
        if let Err(
            e @ (PartnerError::Saturated
            | PartnerError::CircuitOpen { .. }
            | PartnerError::Throttled { .. }),
        ) = &result
        {
            self.inner.metrics.partner_refused(e);
        }
        result
    }

    async fn lookup_until(
        &self,
        email: &CustomerEmail,
        deadline: Instant,
    ) -> Result<PartnerAnswer, PartnerError> {
        let inner = &*self.inner;
        let app_key = inner
            .app_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let body = Bytes::from(
            serde_json::to_vec(&wire::PartnerRequest {
                user_code: inner.user_code,
                // The only place the partner secret leaves its wrapper.
                app_key: app_key.expose_secret(),
                customer_email: email.as_str(),
            })
            .map_err(|e| PartnerError::Unreadable {
                reason: format!("request could not be encoded ({:?})", e.classify()),
            })?,
        );

        let mut retries = 0;
        loop {
            // Refused at once when no call could be made anyway, before waiting for a slot.
            if let Some(refusal) = inner.breaker.refusal() {
                return Err(refusal);
            }
            let outcome = {
                // A slot among the concurrent calls, then a start within the call rate; a lookup
                // that cannot have both before its deadline is refused as saturation.
                let _permit = match timeout_at(deadline, inner.permits.acquire()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => return Err(PartnerError::Saturated),
                };
                if !inner.call_rate.acquire(deadline).await {
                    return Err(PartnerError::Saturated);
                }
                // Redis unavailable leaves the local limit alone in charge.
                if let Some(quota) = &inner.global_quota {
                    if quota.acquire_call(deadline).await == QuotaDecision::Refused {
                        return Err(PartnerError::Saturated);
                    }
                }
                let ticket = inner.breaker.admit()?;
                let started = Instant::now();
                let attempt_deadline = deadline.min(started + inner.timeout);
                let outcome = timeout_at(attempt_deadline, self.attempt(body.clone(), email))
                    .await
                    .unwrap_or(Err(AttemptError::retry(PartnerError::Timeout)));
                let error = outcome.as_ref().err().map(|f| &f.error);
                inner.metrics.partner_call(error, started.elapsed());
                ticket.finish(Verdict::of(error));
                outcome
            };
            let failure = match outcome {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            if !failure.retryable || retries >= inner.max_retries {
                return Err(failure.error);
            }
            retries += 1;
            inner.metrics.partner_retry();
            let wait = full_jitter(retries);
            if Instant::now() + wait >= deadline {
                return Err(failure.error);
            }
            tracing::debug!(retry = retries, wait_ms = wait.as_millis() as u64, error = %failure.error, "retrying partner call");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        body: Bytes,
        email: &CustomerEmail,
    ) -> Result<PartnerAnswer, AttemptError> {
        let inner = &*self.inner;
        let mut response = inner
            .http
            .post(inner.endpoint.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
            .send()
            .await
            .map_err(|e| AttemptError::retry(PartnerError::Transport(describe(&e))))?;

        let status = response.status();
        if !status.is_success() {
            let code = status.as_u16();
            return Err(match code {
                429 | 503 => AttemptError::fatal(PartnerError::Backoff {
                    status: code,
                    retry_after: retry_after(
                        response.headers().get(RETRY_AFTER),
                        inner.retry_after_cap,
                    ),
                }),
                500 | 502 | 504 => AttemptError::retry(PartnerError::Status { status: code }),
                _ => AttemptError::fatal(PartnerError::Status { status: code }),
            });
        }

        let limit = inner.max_response_bytes;
        let too_large = || AttemptError::fatal(PartnerError::TooLarge { limit });
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        // The partner's Content-Length sizes the buffer only up to a modest bound.
        let expected = response.content_length().unwrap_or(1024).min(64 * 1024);
        let mut buf = Vec::with_capacity(expected as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| AttemptError::retry(PartnerError::Transport(describe(&e))))?
        {
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        wire::map_answer(&buf, email).map_err(AttemptError::fatal)
    }
}

/// A transport error in a few words, without the URL (which is ours, but long) or any body.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connect error"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "connection closed while reading the answer"
    } else if e.is_request() {
        "connection closed before the answer"
    } else {
        "transport error"
    };
    match std::error::Error::source(e) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.to_owned(),
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base · 2^(n-1))]`.
fn full_jitter(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let ms = rand::rng().random_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(ms)
}

/// `Retry-After` in seconds, defaulted and capped (an HTTP-date is treated as absent).
pub fn retry_after(value: Option<&HeaderValue>, cap: Duration) -> Duration {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(RETRY_AFTER_DEFAULT, Duration::from_secs)
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        for retry in 1..8 {
            let ceiling = BACKOFF_BASE * 2u32.pow(retry - 1);
            for _ in 0..50 {
                assert!(full_jitter(retry) <= ceiling.min(BACKOFF_CAP));
            }
        }
        assert!(full_jitter(40) <= BACKOFF_CAP);
    }

    #[test]
    fn retry_after_is_defaulted_and_capped() {
        let cap = Duration::from_secs(30);
        let parse = |v: &'static str| retry_after(Some(&HeaderValue::from_static(v)), cap);
        assert_eq!(retry_after(None, cap), RETRY_AFTER_DEFAULT);
        assert_eq!(parse("2"), Duration::from_secs(2));
        assert_eq!(parse("86400"), cap);
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), RETRY_AFTER_DEFAULT);
    }

    #[test]
    fn fwd_status_is_the_partner_status_when_an_answer_came() {
        assert_eq!(PartnerError::Timeout.fwd_status(), None);
        assert_eq!(PartnerError::Status { status: 500 }.fwd_status(), Some(500));
        assert_eq!(
            PartnerError::Ambiguous { records: 2 }.fwd_status(),
            Some(200)
        );
    }
}
