//! `/metrics`: present, moving with traffic, and free of e-mails and secrets.

use skypostal_proxy::simulator::Fault;

use crate::helpers::{spawn_app_with, ADMIN_KEY, APP_KEY, KEY};

/// Families move with traffic; no e-mail, key or secret appears anywhere in the exposition.
#[tokio::test]
async fn metrics_move_with_traffic_and_hold_no_email_or_secret() {
    let app = spawn_app_with(|s| {
        s.clients[0].rate_per_s = 1;
        s.clients[0].burst = 3;
    })
    .await;
    app.sim
        .set_fault(Some("broken@example.com"), Fault::SystemError);
    app.get_credentials("alice.secret%40example.com").await;
    app.get_credentials("alice.secret%40example.com").await;
    app.get_credentials("broken%40example.com").await;
    app.get_credentials("over.limit%40example.com").await;
    app.get_credentials_with("nobody%40example.com", &[("x-api-key", "not-a-key")])
        .await;
    app.get_credentials_with("notfound-bob%40example.com", &[("x-api-key", ADMIN_KEY)])
        .await;

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for needle in [
        "skypostal_proxy_http_requests_total{route=\"/customers/{email}/credentials\",method=\"GET\",status=\"200\"} 2",
        "skypostal_proxy_http_requests_total{route=\"/customers/{email}/credentials\",method=\"GET\",status=\"429\"} 1",
        "skypostal_proxy_http_request_duration_seconds_bucket{",
        "skypostal_proxy_cache_lookups_total{outcome=\"hit\"} 1",
        "skypostal_proxy_cache_lookups_total{outcome=\"miss\"} 2",
        "skypostal_proxy_cache_lookups_total{outcome=\"failed\"} 1",
        "skypostal_proxy_cache_entries 2",
        "skypostal_proxy_partner_calls_total{outcome=\"answered\"} 2",
        "skypostal_proxy_partner_calls_total{outcome=\"partner_error\"} 1",
        "skypostal_proxy_partner_call_duration_seconds_count 3",
        "skypostal_proxy_partner_circuit_state 0",
        "skypostal_proxy_rate_limited_total{client=\"regular\"} 1",
        "skypostal_proxy_auth_failures_total 1",
        "skypostal_proxy_http_requests_in_flight 1",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    for forbidden in [
        "@",
        "%40",
        "alice",
        "bob",
        APP_KEY,
        KEY,
        ADMIN_KEY,
        "not-a-key",
    ] {
        assert!(
            !text.contains(forbidden),
            "{forbidden:?} in metrics:\n{text}"
        );
    }
}

/// With an admin listener, `/metrics` moves there and leaves the main listener.
#[tokio::test]
async fn metrics_move_to_the_admin_listener_when_configured() {
    let app =
        spawn_app_with(|s| s.server.admin_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let admin = app.admin_base.clone().expect("admin listener");

    let on_main = app.get("/metrics").await;
    let on_admin = app
        .http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap();
    let ready = app
        .http
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .unwrap();

    assert_eq!(on_main.status(), 404);
    assert_eq!(on_admin.status(), 200);
    assert!(on_admin
        .text()
        .await
        .unwrap()
        .contains("skypostal_proxy_http_requests_total"));
    assert_eq!(ready.status(), 200);
}
