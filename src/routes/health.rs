//! Liveness and readiness probes.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::json;

use crate::startup::AppState;

/// 200 while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process serves", content_type = "application/json")))]
pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// The Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics", content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let partner = state.cache.partner();
    let body = state
        .metrics
        .render(state.cache.entry_count(), partner.circuit_state());
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// 200 once serving, 503 while draining at shutdown, with the state of each component.
///
/// A partner refusing our credentials is reported here but keeps readiness at 200: a sidecar
/// that turns unready on a partner-side problem takes its whole pod out of service.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready, with the state of each component", content_type = "application/json"),
        (status = 503, description = "Draining at shutdown", content_type = "application/json"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let draining = state.readiness.is_draining();
    let health = state.cache.partner().health();
    let body = json!({
        "status": if draining { "draining" } else { "ready" },
        "components": {
            "config": "loaded",
            "listener": if draining { "draining" } else { "accepting" },
            "partner": {
                "credentials": if health.auth_failing() { "refused" } else { "ok" },
                "circuit": state.cache.partner().circuit_state(),
                "last_success_unix": health.last_success_unix(),
                "last_failure_unix": health.last_failure_unix(),
            },
            "cache": { "entries": state.cache.entry_count() },
            // Informational: the service answers from local state while it is down.
            "shared_tier": match state.cache.shared() {
                Some(shared) => json!({
                    "state": shared.state_label(),
                    "purges_subscribed": shared.is_subscribed(),
                }),
                None => json!({ "state": "disabled" }),
            },
        }
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}
