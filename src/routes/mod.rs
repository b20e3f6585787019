//! The HTTP surface: [`router`] assembles the routes and the middleware stack.
//!
//! Layer order, outermost first (a request flows top to bottom, its response bottom to top):
//!
//! 1. `edge` — assigns the request id first, so everything after it (including the problem
//!    bodies of errors raised by inner layers) can carry it; opens the request's span (debug level,
//!    free when filtered out); refuses request bodies (no route takes one); bounds the request with
//!    `server.request_timeout_ms`; renders every [`Problem`] as `application/problem+json`; adds
//!    `x-request-id` and `Cache-Control: no-store` to every response; logs the outcome.
//!    One layer for all of this, because each separate layer costs on every request.
//! 2. `CatchPanicLayer` — inside `edge`, so a panic becomes a problem+json 500 with the request id
//!    and without the panic message.
//! 3. routing — unknown routes and wrong methods answer problem+json through the fallbacks; the
//!    route template is known from here on, so logs never need the raw path (which holds an e-mail).
//! 4. `admit` (customer routes only, as a route layer, so probes stay open to the orchestrator) —
//!    authentication first, then the client's rate limit: the limit is keyed by the authenticated
//!    client, and an unauthenticated flood cannot spend a real client's quota. Cache hits count too:
//!    the limit is the caller's quota, not the partner's.

mod credentials;
mod health;

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue};
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::auth::{Client, ClientRegistry};
use crate::error::{ApiError, Problem};
use crate::rate_limit::{RATELIMIT, RATELIMIT_POLICY};
use crate::startup::AppState;

pub use credentials::CACHE_STATUS;

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Largest request body accepted; no route takes one.
const MAX_REQUEST_BODY: u64 = 16 * 1024;

/// The request id of the current request, as a request extension.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

/// Builds the application's router and middleware stack (order documented in the module docs).
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let customers = Router::new()
        .route(
            "/customers/{email}/credentials",
            get(credentials::get_credentials).delete(credentials::purge_credentials),
        )
        .route_layer(middleware::from_fn_with_state(state.clients.clone(), admit));
    let edge = Arc::new(Edge::new(request_timeout));
    Router::new()
        .merge(customers)
        .merge(probes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(edge, edge_layer))
}

/// The probe routes, also served on the admin listener.
pub fn probes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
}

/// Router for the optional admin listener: probes only, same edge behaviour.
pub fn admin_router(state: AppState, request_timeout: Duration) -> Router {
    let edge = Arc::new(Edge::new(request_timeout));
    probes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(edge, edge_layer))
}

// === edge ===

/// Per-listener state of the edge middleware.
struct Edge {
    request_timeout: Duration,
    /// Random per process, so ids from restarted replicas do not collide in log searches.
    id_prefix: String,
    next_id: AtomicU64,
}

impl Edge {
    fn new(request_timeout: Duration) -> Self {
        Self {
            request_timeout,
            id_prefix: format!("{:08x}", rand::random::<u32>()),
            next_id: AtomicU64::new(1),
        }
    }

    fn request_id(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        if let Some(v) = incoming.filter(|v| valid_request_id(v.as_bytes())) {
            return v.clone();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.id_prefix))
            .unwrap_or(HeaderValue::from_static("unknown"))
    }
}

/// An incoming id is kept only if it is short and plain: it goes into logs and headers.
fn valid_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

async fn edge_layer(State(edge): State<Arc<Edge>>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = edge.request_id(request.headers().get(X_REQUEST_ID));
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let id = request_id.to_str().unwrap_or("");
    let span = tracing::debug_span!(
        "request",
        request_id = id,
        method = %method,
        route = route.as_ref().map_or("-", MatchedPath::as_str),
    );

    let body_too_large = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_REQUEST_BODY);
    let mut response = if body_too_large {
        ApiError::PayloadTooLarge.into_response()
    } else {
        let run = tokio::time::timeout(edge.request_timeout, next.run(request));
        match run.instrument(span.clone()).await {
            Ok(response) => response,
            Err(_) => ApiError::RequestTimeout.into_response(),
        }
    };

    let status = response.status();
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
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));

    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            client = response
                .extensions()
                .get::<Arc<Client>>()
                .map_or("-", |c| &*c.name),
            cache = response
                .headers()
                .get(CACHE_STATUS)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            "request"
        );
    });
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

// === admission: authentication, then the client's rate limit ===

async fn admit(
    State(clients): State<Arc<ClientRegistry>>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = match clients.authenticate(request.headers()) {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!("request refused: missing or unknown key");
            return e.into_response();
        }
    };
    let (mut response, ratelimit) = match client.limiter.check() {
        Ok(ratelimit) => {
            request.extensions_mut().insert(client.clone());
            (next.run(request).await, ratelimit)
        }
        Err(limited) => {
            tracing::debug!(client = %client.name, "request refused: rate limit spent");
            let response = ApiError::RateLimited {
                retry_after: limited.retry_after,
            }
            .into_response();
            (response, limited.header)
        }
    };
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY, client.limiter.policy().clone());
    headers.insert(RATELIMIT, ratelimit);
    // For the edge's log line.
    response.extensions_mut().insert(client);
    response
}

// === fallbacks ===

async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %message, "handler panicked");
    ApiError::Internal.into_response()
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
        let edge = Edge::new(Duration::from_secs(1));
        let a = edge.request_id(None);
        let b = edge.request_id(Some(&HeaderValue::from_static("bad id")));
        assert_ne!(a, b);
        let kept = edge.request_id(Some(&HeaderValue::from_static("given-1")));
        assert_eq!(kept, "given-1");
    }
}
