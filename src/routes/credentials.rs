//! `GET` and `DELETE /customers/{email}/credentials`.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::auth::Client;
use crate::cache::CachedAnswer;
use crate::domain::{Credentials, CustomerEmail};
use crate::error::{ApiError, Problem};
use crate::routes::RequestId;
use crate::startup::AppState;

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The `{email}` path segment, decoded, normalized and validated.
pub struct EmailParam(pub CustomerEmail);

impl<S: Send + Sync> FromRequestParts<S> for EmailParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::UndecodablePath)?;
        CustomerEmail::parse(&raw)
            .map(EmailParam)
            .map_err(ApiError::InvalidEmail)
    }
}

/// Looks a customer's credentials up, from the cache or the partner.
#[utoipa::path(
    get,
    path = "/customers/{email}/credentials",
    tag = "credentials",
    params(
        ("email" = String, Path, description = "The customer's e-mail address (percent-encoded or not); trimmed and lowercased", example = "johndoe@email.com", max_length = 254, min_length = 3),
        ("Cache-Control" = Option<String>, Header, description = "`no-cache` forces a fresh (still shared) partner lookup"),
    ),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The customer's credentials", body = Credentials, content_type = "application/json",
            headers(
                ("Cache-Status" = String, description = "How the cache answered (RFC 9211)"),
                ("RateLimit" = String, description = "Remaining requests of this client"),
                ("RateLimit-Policy" = String, description = "This client's limit"),
                ("x-request-id" = String, description = "The request's id"),
            )),
        (status = 400, description = "The path segment is not a valid e-mail", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No key or an unknown key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The partner knows no such customer", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit is spent (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The partner failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The partner is protected: saturated or circuit open (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The partner did not answer within the deadline", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_credentials(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    EmailParam(email): EmailParam,
    FreshLookup(force): FreshLookup,
) -> Response {
    let lookup = state.cache.get(&email, force, &request_id).await;
    let answer = lookup.result.map(|entry| entry.answer());
    let found = matches!(answer, Ok(CachedAnswer::Found(_)));
    state.metrics.cache_outcome(lookup.status, found);
    let mut response = match answer {
        Ok(CachedAnswer::Found(body)) => (
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response(),
        Ok(CachedAnswer::NotFound) => ApiError::CustomerNotFound.into_response(),
        Err(error) => ApiError::Partner(error).into_response(),
    };
    response
        .headers_mut()
        .insert(CACHE_STATUS, state.cache.status_header(lookup.status));
    response
}

/// Drops the cached answer for an e-mail (admin clients only).
#[utoipa::path(
    delete,
    path = "/customers/{email}/credentials",
    tag = "credentials",
    params(("email" = String, Path, description = "The customer's e-mail address", example = "johndoe@email.com", max_length = 254, min_length = 3)),
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 204, description = "The cached answer, if any, is gone (from every replica, with the shared tier)"),
        (status = 400, description = "The path segment is not a valid e-mail", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No key or an unknown key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client is not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit is spent (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn purge_credentials(
    State(state): State<AppState>,
    // Before the e-mail: a non-admin client is refused whatever the path holds.
    AdminClient(client): AdminClient,
    Extension(request_id): Extension<RequestId>,
    EmailParam(email): EmailParam,
) -> Result<StatusCode, ApiError> {
    if state.cache.purge(&email).await {
        tracing::info!(%request_id, client = %client.name, %email, "purged cached answer");
    } else {
        // The shared tier is down: other replicas keep their copy until it expires.
        tracing::warn!(%request_id, client = %client.name, %email, "purged cached answer on this replica only: the shared tier is unavailable");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The authenticated client, refused with 403 unless it is an admin.
pub struct AdminClient(pub Arc<Client>);

impl<S: Send + Sync> FromRequestParts<S> for AdminClient {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let client = parts
            .extensions
            .get::<Arc<Client>>()
            .cloned()
            .ok_or(ApiError::Unauthorized)?;
        if !client.admin {
            let request_id = parts.extensions.get::<RequestId>();
            tracing::warn!(request_id = ?request_id.map(ToString::to_string), client = %client.name, "purge refused: not an admin client");
            return Err(ApiError::Forbidden("purge cached answers"));
        }
        Ok(Self(client))
    }
}

/// Whether the caller sent `Cache-Control: no-cache` (read in place: a `HeaderMap` extractor
/// would copy every header).
pub struct FreshLookup(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for FreshLookup {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(wants_fresh(&parts.headers)))
    }
}

/// Whether the caller sent `Cache-Control: no-cache`.
fn wants_fresh(headers: &HeaderMap) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| {
            let name = directive.trim().split('=').next().unwrap_or("");
            name.eq_ignore_ascii_case("no-cache")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cache_is_found_among_other_directives() {
        let mut h = HeaderMap::new();
        assert!(!wants_fresh(&h));
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert!(wants_fresh(&h));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(!wants_fresh(&h));
    }
}
