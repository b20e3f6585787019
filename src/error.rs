//! [`ApiError`]: every error answer of the service, as `application/problem+json` (RFC 9457).
//!
//! A handler returns an `ApiError`; its response carries a [`Problem`] extension and no body yet.
//! The edge middleware ([`crate::routes`]) renders the body with the request id and logs the
//! internal cause, so the cause never reaches the caller and every problem has its request id.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use crate::domain::EmailError;
use crate::partner::PartnerError;

/// Prefix of every problem `type`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:skypostal-proxy:problem:";

/// An error answer. Each variant's doc names its status and problem type.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid-email`.
    #[error("invalid e-mail: {0}")]
    InvalidEmail(EmailError),
    /// 400 `invalid-email`: the path segment is not valid percent-encoded UTF-8.
    #[error("the path segment is not valid percent-encoded UTF-8")]
    UndecodablePath,
    /// 401 `unauthorized`, with `WWW-Authenticate: Bearer`.
    #[error("missing or unknown API key")]
    Unauthorized,
    /// 403 `forbidden`.
    #[error("the client may not {0}")]
    Forbidden(&'static str),
    /// 404 `customer-not-found`.
    #[error("the partner knows no customer with that e-mail")]
    CustomerNotFound,
    /// 429 `rate-limited`, with `Retry-After`.
    #[error("rate limit spent")]
    RateLimited {
        /// Until one more request is allowed.
        retry_after: Duration,
    },
    /// 502, 503 or 504 by the partner error.
    #[error(transparent)]
    Partner(#[from] PartnerError),
    /// 404 `not-found`: an unknown route.
    #[error("no such route")]
    RouteNotFound,
    /// 405 `method-not-allowed`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413 `payload-too-large`: a request body over the limit (no route takes a body).
    #[error("request body too large")]
    PayloadTooLarge,
    /// 503 `request-timeout`: the request ran over `server.request_timeout_ms`.
    #[error("the request took longer than the server allows")]
    RequestTimeout,
    /// 500 `internal`: a bug; the panic message is logged, never answered.
    #[error("internal error")]
    Internal,
}

/// The problem document of an error, before the request id is added.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the type.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What happened, for this request, safe to show the caller.
    pub detail: String,
    /// The request's `x-request-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Internal cause for the log; never serialized.
    #[serde(skip)]
    pub cause: Option<String>,
}

impl Problem {
    /// Renders the body with the request id.
    pub fn render(mut self, request_id: &str) -> Vec<u8> {
        self.request_id = Some(request_id.to_owned());
        serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

impl ApiError {
    /// The status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidEmail(_) | Self::UndecodablePath => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::CustomerNotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Partner(e) => match e {
                PartnerError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                PartnerError::Saturated
                | PartnerError::Backoff { .. }
                | PartnerError::Throttled { .. }
                | PartnerError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The problem type's last segment and title.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::InvalidEmail(_) | Self::UndecodablePath => ("invalid-email", "Invalid e-mail"),
            Self::Unauthorized => ("unauthorized", "Unauthorized"),
            Self::Forbidden(_) => ("forbidden", "Forbidden"),
            Self::CustomerNotFound => ("customer-not-found", "Customer not found"),
            Self::RateLimited { .. } => ("rate-limited", "Rate limit exceeded"),
            Self::RouteNotFound => ("not-found", "Not found"),
            Self::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            Self::PayloadTooLarge => ("payload-too-large", "Payload too large"),
            Self::RequestTimeout => ("request-timeout", "Request timeout"),
            Self::Internal => ("internal", "Internal error"),
            Self::Partner(e) => match e {
                PartnerError::Timeout => ("upstream-timeout", "Partner timeout"),
                PartnerError::Saturated
                | PartnerError::Backoff { .. }
                | PartnerError::Throttled { .. } => ("upstream-saturated", "Partner saturated"),
                PartnerError::CircuitOpen { .. } => {
                    ("upstream-circuit-open", "Partner circuit open")
                }
                _ => ("upstream-error", "Partner error"),
            },
        }
    }

    /// What the caller is told. Partner descriptions and internal causes stay out.
    fn detail(&self) -> String {
        match self {
            Self::InvalidEmail(e) => format!("The e-mail in the path is not valid: {e}."),
            Self::UndecodablePath => {
                "The e-mail in the path is not valid percent-encoded UTF-8.".to_owned()
            }
            Self::Unauthorized => {
                "Send a valid key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`."
                    .to_owned()
            }
            Self::Forbidden(action) => format!("This client may not {action}."),
            Self::CustomerNotFound => "The partner knows no customer with this e-mail.".to_owned(),
            Self::RateLimited { retry_after } => format!(
                "This client's rate limit is spent; retry in {} s.",
                retry_after_secs(*retry_after)
            ),
            Self::RouteNotFound => "No such route.".to_owned(),
            Self::MethodNotAllowed => "This route does not accept this method.".to_owned(),
            Self::PayloadTooLarge => "No route of this service takes a request body.".to_owned(),
            Self::RequestTimeout => "The request took longer than the server allows.".to_owned(),
            Self::Internal => "The server failed while handling the request.".to_owned(),
            Self::Partner(e) => match e {
                PartnerError::Timeout => {
                    "The partner did not answer within the lookup's deadline.".to_owned()
                }
                PartnerError::Saturated => {
                    "Too many partner calls are in flight; retry shortly.".to_owned()
                }
                PartnerError::Backoff { .. } | PartnerError::Throttled { .. } => {
                    "The partner asked for fewer calls; retry after the given delay.".to_owned()
                }
                PartnerError::CircuitOpen { .. } => {
                    "The partner has been failing; calls are paused briefly to let it recover."
                        .to_owned()
                }
                PartnerError::Transport(_) => "The partner could not be reached.".to_owned(),
                PartnerError::Status { status } => {
                    format!("The partner answered HTTP {status}.")
                }
                PartnerError::Unreadable { .. } | PartnerError::TooLarge { .. } => {
                    "The partner's answer could not be read.".to_owned()
                }
                PartnerError::Ambiguous { .. } => {
                    "The partner answered more than one customer for this e-mail.".to_owned()
                }
                PartnerError::AccessDenied { .. } => {
                    "The partner refused this service's credentials.".to_owned()
                }
                PartnerError::Rejected { .. } => "The partner reported an error.".to_owned(),
            },
        }
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        let (suffix, title) = self.kind();
        let cause = match self {
            Self::Partner(e) => Some(e.to_string()),
            _ => None,
        };
        Problem {
            kind: format!("{PROBLEM_TYPE_PREFIX}{suffix}"),
            title,
            status: self.status().as_u16(),
            detail: self.detail(),
            request_id: None,
            cause,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status().into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited { retry_after }
            | Self::Partner(
                PartnerError::Backoff { retry_after, .. }
                | PartnerError::Throttled { retry_after }
                | PartnerError::CircuitOpen { retry_after },
            ) => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
            }
            Self::Partner(PartnerError::Saturated) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response.extensions_mut().insert(self.problem());
        response
    }
}

/// Whole seconds, rounded up, never 0.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partner::PartnerErrorFields;

    #[test]
    fn partner_errors_map_to_the_spec_statuses() {
        let cases = [
            (PartnerError::Timeout, 504, "upstream-timeout"),
            (PartnerError::Saturated, 503, "upstream-saturated"),
            (
                PartnerError::Backoff {
                    status: 429,
                    retry_after: Duration::from_secs(2),
                },
                503,
                "upstream-saturated",
            ),
            (PartnerError::Transport("x".into()), 502, "upstream-error"),
            (PartnerError::Status { status: 500 }, 502, "upstream-error"),
            (PartnerError::TooLarge { limit: 1 }, 502, "upstream-error"),
            (
                PartnerError::Ambiguous { records: 2 },
                502,
                "upstream-error",
            ),
            (
                PartnerError::AccessDenied {
                    fields: PartnerErrorFields::default(),
                },
                502,
                "upstream-error",
            ),
        ];
        for (error, status, kind) in cases {
            let problem = ApiError::Partner(error).problem();
            assert_eq!(problem.status, status);
            assert!(problem.kind.ends_with(kind), "{}", problem.kind);
        }
    }

    #[test]
    fn partner_descriptions_never_reach_the_detail() {
        let fields = PartnerErrorFields {
            description: Some("SECRET internal trace".into()),
            ..PartnerErrorFields::default()
        };
        let problem = ApiError::Partner(PartnerError::Rejected { fields }).problem();
        assert!(!problem.detail.contains("SECRET"));
        let body = String::from_utf8(problem.render("r1")).unwrap();
        assert!(!body.contains("SECRET"), "{body}");
        assert!(body.contains(r#""request_id":"r1""#), "{body}");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
