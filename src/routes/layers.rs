//! The two middleware layers of our own: [`EdgeLayer`] and [`AdmitLayer`].
//!
//! Both are plain tower services with concrete futures rather than `axum::middleware::from_fn`:
//! `from_fn` clones the inner service and boxes a future on every request, which on the cache-hit
//! path costs about as much as the rest of our code together.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method};
use pin_project_lite::pin_project;
use tokio::time::Timeout;
use tower::{Layer, Service};
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span};

use super::{RequestId, CACHE_STATUS, X_REQUEST_ID};
use crate::auth::{Client, ClientRegistry};
use crate::error::{ApiError, Problem};
use crate::metrics::{InFlight, Metrics};
use crate::rate_limit::{RATELIMIT, RATELIMIT_POLICY};

/// Largest request body accepted; no route takes one.
const MAX_REQUEST_BODY: u64 = 16 * 1024;

// === edge ===

/// The outermost layer: request id, request span, body refusal, request timeout, problem+json
/// rendering, `x-request-id` and `Cache-Control: no-store` on every answer, the request log line.
#[derive(Clone)]
pub struct EdgeLayer {
    shared: Arc<EdgeShared>,
}

struct EdgeShared {
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Random per process, so ids from restarted replicas do not collide in log searches.
    id_prefix: u32,
    next_id: AtomicU64,
}

impl EdgeLayer {
    /// An edge bounding each request by `request_timeout`, counting requests in `metrics`.
    pub fn new(request_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            shared: Arc::new(EdgeShared {
                request_timeout,
                metrics,
                id_prefix: rand::random(),
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

impl EdgeShared {
    fn request_id(&self, incoming: Option<&HeaderValue>) -> RequestId {
        match incoming.filter(|v| valid_request_id(v.as_bytes())) {
            Some(v) => RequestId::Incoming(v.clone()),
            None => RequestId::Generated {
                prefix: self.id_prefix,
                n: self.next_id.fetch_add(1, Ordering::Relaxed),
            },
        }
    }
}

/// The route template as a metric label: known templates only, never a raw path.
fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    match matched.map(MatchedPath::as_str) {
        Some("/customers/{email}/credentials") => "/customers/{email}/credentials",
        Some("/healthz") => "/healthz",
        Some("/readyz") => "/readyz",
        Some("/metrics") => "/metrics",
        Some("/openapi.json") => "/openapi.json",
        Some(_) => "other",
        None => "unmatched",
    }
}

/// An incoming id is kept only if it is short and plain: it goes into logs and headers.
pub(super) fn valid_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`EdgeLayer`] makes.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<EdgeShared>,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let request_id = self.shared.request_id(request.headers().get(X_REQUEST_ID));
        // Debug level: free when filtered out, and then the events carry the id themselves.
        let span = tracing::debug_span!(
            "request",
            request_id = %request_id,
            method = %request.method(),
            route = request.extensions().get::<MatchedPath>().map_or("-", MatchedPath::as_str),
        );
        let too_large = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_REQUEST_BODY);
        let method = request.method().clone();
        let route = route_label(request.extensions().get::<MatchedPath>());
        let in_flight = self.shared.metrics.request_started();
        let (inner, ready) = if too_large {
            (None, Some(ApiError::PayloadTooLarge.into_response()))
        } else {
            request.extensions_mut().insert(request_id.clone());
            let call = tokio::time::timeout(self.shared.request_timeout, self.inner.call(request));
            (Some(call.instrument(span.clone())), None)
        };
        EdgeFuture {
            inner,
            ready,
            finish: Some(Finish {
                request_id,
                started,
                method,
                route,
                span,
                metrics: self.shared.metrics.clone(),
                _in_flight: in_flight,
            }),
        }
    }
}

pin_project! {
    /// The response future of [`Edge`].
    pub struct EdgeFuture<F> {
        #[pin]
        inner: Option<Instrumented<Timeout<F>>>,
        ready: Option<Response>,
        finish: Option<Finish>,
    }
}

/// What the edge needs once the response is there.
struct Finish {
    request_id: RequestId,
    started: Instant,
    method: Method,
    route: &'static str,
    span: Span,
    metrics: Arc<Metrics>,
    _in_flight: InFlight,
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.inner.as_pin_mut() {
            Some(inner) => match ready!(inner.poll(cx)) {
                Ok(Ok(response)) => response,
                Ok(Err(infallible)) => match infallible {},
                Err(_elapsed) => ApiError::RequestTimeout.into_response(),
            },
            None => this
                .ready
                .take()
                .unwrap_or_else(|| ApiError::Internal.into_response()),
        };
        Poll::Ready(Ok(match this.finish.take() {
            Some(finish) => finish.apply(response),
            None => response,
        }))
    }
}

impl Finish {
    fn apply(self, mut response: Response) -> Response {
        let status = response.status();
        let request_id = self.request_id.header_value();
        let id = request_id.to_str().unwrap_or("");
        if let Some(problem) = response.extensions_mut().remove::<Problem>() {
            if let Some(cause) = &problem.cause {
                if status.is_server_error() {
                    tracing::warn!(
                        request_id = id,
                        status = status.as_u16(),
                        cause,
                        "request failed"
                    );
                }
            }
            let body = problem.render(id);
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            headers.insert(CONTENT_LENGTH, body.len().into());
            *response.body_mut() = Body::from(body);
        }
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let method = match self.method {
            Method::GET => "GET",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::POST => "POST",
            _ => "other",
        };
        self.metrics
            .request_done(self.route, method, status.as_u16(), self.started.elapsed());

        self.span.in_scope(|| {
            tracing::debug!(
                method = %self.method,
                status = status.as_u16(),
                latency_us = self.started.elapsed().as_micros() as u64,
                client = response.extensions().get::<Arc<Client>>().map_or("-", |c| &*c.name),
                cache = response.headers().get(CACHE_STATUS).and_then(|v| v.to_str().ok()).unwrap_or("-"),
                "request"
            );
        });
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }
}

// === admission ===

/// Authentication, then the client's rate limit; adds the rate-limit headers to every answer.
#[derive(Clone)]
pub struct AdmitLayer {
    clients: Arc<ClientRegistry>,
    metrics: Arc<Metrics>,
}

impl AdmitLayer {
    /// Admission against these clients, refusals counted in `metrics`.
    pub fn new(clients: Arc<ClientRegistry>, metrics: Arc<Metrics>) -> Self {
        Self { clients, metrics }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            clients: self.clients.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`AdmitLayer`] makes.
#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    clients: Arc<ClientRegistry>,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request> for Admit<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AdmitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let client = match self.clients.authenticate(request.headers()) {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!("request refused: missing or unknown key");
                self.metrics.auth_failure();
                return AdmitFuture {
                    inner: None,
                    ready: Some(e.into_response()),
                    decorate: None,
                };
            }
        };
        match client.limiter.check() {
            Ok(ratelimit) => {
                request.extensions_mut().insert(client.clone());
                AdmitFuture {
                    inner: Some(self.inner.call(request)),
                    ready: None,
                    decorate: Some((client, ratelimit)),
                }
            }
            Err(limited) => {
                tracing::debug!(client = %client.name, "request refused: rate limit spent");
                self.metrics.rate_limited(&client.name);
                let response = ApiError::RateLimited {
                    retry_after: limited.retry_after,
                }
                .into_response();
                AdmitFuture {
                    inner: None,
                    ready: Some(response),
                    decorate: Some((client, limited.header)),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`Admit`].
    pub struct AdmitFuture<F> {
        #[pin]
        inner: Option<F>,
        ready: Option<Response>,
        decorate: Option<(Arc<Client>, HeaderValue)>,
    }
}

impl<F> Future for AdmitFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.as_pin_mut() {
            Some(inner) => match ready!(inner.poll(cx)) {
                Ok(response) => response,
                Err(infallible) => match infallible {},
            },
            None => this
                .ready
                .take()
                .unwrap_or_else(|| ApiError::Internal.into_response()),
        };
        if let Some((client, ratelimit)) = this.decorate.take() {
            let headers = response.headers_mut();
            headers.insert(RATELIMIT_POLICY, client.limiter.policy().clone());
            headers.insert(RATELIMIT, ratelimit);
            // Only the edge's debug line reads it; an extension insert allocates.
            if tracing::enabled!(tracing::Level::DEBUG) {
                response.extensions_mut().insert(client);
            }
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_request_ids_are_validated() {
        assert!(valid_request_id(b"abc-123_x.y:z"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(!valid_request_id(b"new\nline"));
    }

    #[test]
    fn generated_request_ids_are_unique() {
        let layer = EdgeLayer::new(Duration::from_secs(1), Arc::new(Metrics::new()));
        let a = layer.shared.request_id(None).header_value();
        let b = layer
            .shared
            .request_id(Some(&HeaderValue::from_static("bad id")))
            .header_value();
        assert_ne!(a, b);
        assert_eq!(a.len(), 10);
        let kept = layer
            .shared
            .request_id(Some(&HeaderValue::from_static("given-1")));
        assert_eq!(kept.to_string(), "given-1");
    }
}
