//! The HTTP surface: [`router`] assembles the routes and the middleware stack.
//!
//! Routing comes first: `Router::layer` wraps each matched route (and the fallbacks), so the layers
//! below know the route template (`MatchedPath`) and never need the raw path, which holds an e-mail.
//! Unknown routes and wrong methods answer problem+json through the fallbacks, inside the layers.
//! Then, outermost first (a request flows top to bottom, its response bottom to top):
//!
//! 1. `edge` — assigns the request id first, so everything after it (including the problem
//!    bodies of errors raised by inner layers) can carry it; opens the request's span (debug level,
//!    free when filtered out); refuses a declared body over 16 KiB (no route takes one); bounds the
//!    request with `server.request_timeout_ms`; renders every [`Problem`](crate::error::Problem) as
//!    `application/problem+json`; adds `x-request-id` and `Cache-Control: no-store` to every
//!    response; counts and logs the outcome. One layer for all of this, because each separate layer
//!    costs on every request.
//! 2. `CatchPanicLayer` — inside `edge`, so a panic becomes a problem+json 500 with the request id
//!    and without the panic message.
//! 3. `admit` (customer routes only, as a route layer, so probes stay open to the orchestrator) —
//!    authentication first, then the client's rate limit: the limit is keyed by the authenticated
//!    client, and an unauthenticated flood cannot spend a real client's quota. Cache hits count too:
//!    the limit is the caller's quota, not the partner's.

mod credentials;
mod health;
mod layers;
mod openapi;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::HeaderName;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::startup::AppState;

pub use crate::telemetry::RequestId;
pub use credentials::CACHE_STATUS;
pub use layers::{AdmitLayer, EdgeLayer};
pub use openapi::ApiDoc;

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the application's router and middleware stack (order documented in the module docs).
///
/// `/metrics` is served here when `with_metrics` (no admin listener), else on the admin router.
pub fn router(state: AppState, request_timeout: Duration, with_metrics: bool) -> Router {
    let customers = Router::new()
        .route(
            "/customers/{email}/credentials",
            get(credentials::get_credentials).delete(credentials::purge_credentials),
        )
        .route_layer(AdmitLayer::new(
            Arc::clone(&state.clients),
            Arc::clone(&state.metrics),
        ));
    let mut router = Router::new().merge(customers).merge(probes());
    if with_metrics {
        router = router.route("/metrics", get(health::metrics));
    }
    let metrics = Arc::clone(&state.metrics);
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(EdgeLayer::new(request_timeout, metrics))
}

/// The probe routes, also served on the admin listener.
pub fn probes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::openapi_json))
}

/// Router for the optional admin listener: probes and metrics, same edge behaviour.
pub fn admin_router(state: AppState, request_timeout: Duration) -> Router {
    let metrics = Arc::clone(&state.metrics);
    probes()
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(EdgeLayer::new(request_timeout, metrics))
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
