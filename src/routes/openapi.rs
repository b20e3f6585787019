//! The OpenAPI 3.1 document of the public API, generated from the handlers' annotations
//! (utoipa) and served at `/openapi.json`.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{credentials, health};
use crate::domain::Credentials;
use crate::error::Problem;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "skypostal-proxy",
        description = "Looks Skypostal customers' credentials up by e-mail, holding the partner secrets."
    ),
    paths(
        credentials::get_credentials,
        credentials::purge_credentials,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
    ),
    components(schemas(Credentials, Problem)),
    modifiers(&SecuritySchemes),
    tags((name = "credentials", description = "Customer credentials"), (name = "operations", description = "Probes, metrics, this document"))
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
