//! Callers' keys and the admin purge.

use crate::helpers::{assert_problem, header, spawn_app, ADMIN_KEY, KEY};

/// No key: 401 with `WWW-Authenticate: Bearer`, and no partner call.
#[tokio::test]
async fn a_request_without_a_key_is_401() {
    let app = spawn_app().await;

    let response = app.get_credentials_with("john%40example.com", &[]).await;

    assert_eq!(header(&response, "www-authenticate"), "Bearer");
    assert!(header(&response, "cache-status").is_empty());
    assert_problem(response, 401, "unauthorized").await;
    assert_eq!(app.sim.calls(), 0);
}

/// An unknown key: 401, and the key is not echoed.
#[tokio::test]
async fn an_unknown_key_is_401() {
    let app = spawn_app().await;

    let response = app
        .get_credentials_with(
            "john%40example.com",
            &[("authorization", "Bearer wrong-key-123")],
        )
        .await;

    let body = assert_problem(response, 401, "unauthorized").await;
    assert!(!body.to_string().contains("wrong-key-123"));
}

/// Both `Authorization: Bearer` and `X-Api-Key` are accepted.
#[tokio::test]
async fn bearer_and_x_api_key_both_authenticate() {
    let app = spawn_app().await;
    let bearer = format!("Bearer {KEY}");

    let by_bearer = app
        .get_credentials_with("john%40example.com", &[("authorization", &bearer)])
        .await;
    let by_header = app
        .get_credentials_with("john%40example.com", &[("x-api-key", KEY)])
        .await;

    assert_eq!(by_bearer.status(), 200);
    assert_eq!(by_header.status(), 200);
}

/// An admin purge drops the cached answer: the next lookup calls the partner again.
#[tokio::test]
async fn an_admin_purge_forces_a_fresh_partner_call() {
    let app = spawn_app().await;
    app.get_credentials("john%40example.com").await;
    assert_eq!(app.sim.calls(), 1);

    let purge = app.purge("John%40Example.com", ADMIN_KEY).await;
    let after = app.get_credentials("john%40example.com").await;

    assert_eq!(purge.status(), 204);
    assert_eq!(
        header(&after, "cache-status"),
        "skypostal-proxy; fwd=miss; stored"
    );
    assert_eq!(app.sim.calls(), 2);
}

/// A purge by a non-admin client is 403 and leaves the cache alone.
#[tokio::test]
async fn a_purge_by_a_regular_client_is_403() {
    let app = spawn_app().await;
    app.get_credentials("john%40example.com").await;

    let purge = app.purge("john%40example.com", KEY).await;

    assert_problem(purge, 403, "forbidden").await;
    let after = app.get_credentials("john%40example.com").await;
    assert!(header(&after, "cache-status").contains("; hit;"));
    assert_eq!(app.sim.calls(), 1);
}

/// A non-admin purge is 403 whatever the path holds, even an invalid address.
#[tokio::test]
async fn a_purge_by_a_regular_client_is_403_even_for_an_invalid_address() {
    let app = spawn_app().await;

    let purge = app.purge("not-an-address", KEY).await;

    assert_problem(purge, 403, "forbidden").await;
}
