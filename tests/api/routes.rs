//! Probes, unknown routes, wrong methods, request ids.

use crate::helpers::{assert_problem, header, spawn_app, KEY};

/// `/healthz` and `/readyz` answer 200 without a key.
#[tokio::test]
async fn probes_answer_without_a_key() {
    let app = spawn_app().await;

    let health = app.get("/healthz").await;
    let ready = app.get("/readyz").await;

    assert_eq!(health.status(), 200);
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["components"]["config"], "loaded");
    app.stop().await;
}

/// An unknown route is a problem+json 404.
#[tokio::test]
async fn an_unknown_route_is_a_problem_404() {
    let app = spawn_app().await;

    let response = app.get("/nope").await;

    assert_problem(response, 404, "not-found").await;
}

/// A wrong method on a known route is a problem+json 405 with `Allow`.
#[tokio::test]
async fn a_wrong_method_is_a_problem_405_with_allow() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(format!("{}/customers/a%40b.c/credentials", app.base))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();

    let allow = header(&response, "allow");
    assert!(allow.contains("GET") && allow.contains("DELETE"), "{allow}");
    assert_problem(response, 405, "method-not-allowed").await;
}

/// A valid incoming `x-request-id` is echoed; a missing or invalid one is replaced.
#[tokio::test]
async fn request_ids_are_kept_when_valid_and_generated_otherwise() {
    let app = spawn_app().await;

    let kept = app
        .get_credentials_with(
            "a%40b.c",
            &[("x-api-key", KEY), ("x-request-id", "trace-42")],
        )
        .await;
    let replaced = app
        .get_credentials_with(
            "a%40b.c",
            &[("x-api-key", KEY), ("x-request-id", "bad id!")],
        )
        .await;
    let first = app.get("/healthz").await;
    let second = app.get("/healthz").await;

    assert_eq!(header(&kept, "x-request-id"), "trace-42");
    let generated = header(&replaced, "x-request-id");
    assert!(!generated.is_empty() && generated != "bad id!");
    assert_ne!(
        header(&first, "x-request-id"),
        header(&second, "x-request-id")
    );
}

/// `/openapi.json` is an OpenAPI 3.1 document whose every operation exists on the router and
/// documents every status SPEC section 2 gives it.
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let app = spawn_app().await;

    let response = app.get("/openapi.json").await;

    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = response.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let schemes = &doc["components"]["securitySchemes"];
    assert!(schemes["bearer"].is_object() && schemes["api_key"].is_object());
    let credentials = &doc["paths"]["/customers/{email}/credentials"];
    for status in ["200", "400", "401", "404", "429", "502", "503", "504"] {
        assert!(
            credentials["get"]["responses"][status].is_object(),
            "GET {status}"
        );
    }
    for status in ["204", "401", "403"] {
        assert!(
            credentials["delete"]["responses"][status].is_object(),
            "DELETE {status}"
        );
    }
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    assert_eq!(
        documented,
        [
            "/customers/{email}/credentials",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz"
        ]
    );
    for (path, operations) in paths {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{email}", "doc%40example.com")
        );
        for method in operations.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = app
                .http
                .request(method.clone(), &url)
                .header("x-api-key", crate::helpers::ADMIN_KEY)
                .send()
                .await
                .unwrap();
            assert!(
                ![404, 405].contains(&answer.status().as_u16()),
                "{method} {path} is documented but answers {}",
                answer.status()
            );
        }
    }
}
