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
