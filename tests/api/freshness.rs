//! TTLs, `Cache-Control: no-cache`, stale answers. Time moves by the app's manual clock.

use std::time::Duration;

use skypostal_proxy::simulator::Fault;

use crate::helpers::{eventually, header, spawn_app, spawn_app_with, KEY};

/// Past the TTL an answer is looked up again.
#[tokio::test]
async fn an_expired_answer_is_looked_up_again() {
    let app = spawn_app_with(|s| s.cache.stale_if_error_s = 0).await;
    app.get_credentials("ttl%40example.com").await;

    app.clock.advance(Duration::from_secs(301));
    let response = app.get_credentials("ttl%40example.com").await;

    assert_eq!(
        header(&response, "cache-status"),
        "skypostal-proxy; fwd=miss; stored"
    );
    assert_eq!(app.sim.calls(), 2);
}

/// A negative answer expires after the negative TTL, not the positive one.
#[tokio::test]
async fn a_negative_answer_expires_after_the_negative_ttl() {
    let app = spawn_app().await;
    app.get_credentials("notfound-ttl%40example.com").await;

    app.clock.advance(Duration::from_secs(30));
    app.get_credentials("notfound-ttl%40example.com").await;
    assert_eq!(app.sim.calls(), 1);
    app.clock.advance(Duration::from_secs(31));
    app.get_credentials("notfound-ttl%40example.com").await;

    assert_eq!(app.sim.calls(), 2);
}

/// `Cache-Control: no-cache` forces a partner call and reports `fwd=request`.
#[tokio::test]
async fn no_cache_forces_a_fresh_lookup() {
    let app = spawn_app().await;
    app.get_credentials("fresh%40example.com").await;

    let response = app
        .get_credentials_with(
            "fresh%40example.com",
            &[("x-api-key", KEY), ("cache-control", "no-cache")],
        )
        .await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "cache-status"),
        "skypostal-proxy; fwd=request; stored"
    );
    assert_eq!(app.sim.calls(), 2);
}

/// With the partner failing, an expired answer inside `stale_if_error_s` is served, marked stale.
#[tokio::test]
async fn a_failing_partner_is_covered_by_a_stale_answer() {
    let app = spawn_app().await;
    let fresh = app
        .get_credentials("warm%40example.com")
        .await
        .bytes()
        .await
        .unwrap();
    app.sim.set_fault(
        None,
        Fault::Status {
            status: 502,
            retry_after: None,
        },
    );

    app.clock.advance(Duration::from_secs(310));
    let response = app.get_credentials("warm%40example.com").await;

    assert_eq!(response.status(), 200);
    let status = header(&response, "cache-status");
    assert!(
        status.starts_with("skypostal-proxy; fwd=stale; fwd-status=502; ttl=-10;")
            && status.ends_with("; detail=stale-if-error"),
        "{status}"
    );
    assert_eq!(response.bytes().await.unwrap(), fresh);
}

/// Past the stale-if-error window, a failing partner means an error.
#[tokio::test]
async fn past_the_stale_window_a_failure_is_an_error() {
    let app = spawn_app_with(|s| s.cache.stale_if_error_s = 60).await;
    app.get_credentials("old%40example.com").await;
    app.sim.set_fault(None, Fault::SystemError);

    app.clock.advance(Duration::from_secs(300 + 61));
    let response = app.get_credentials("old%40example.com").await;

    assert_eq!(response.status(), 502);
}

/// Inside `stale_while_revalidate_s` the stale answer comes at once and one refresh runs.
#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let app = spawn_app_with(|s| s.cache.stale_while_revalidate_s = 30).await;
    app.get_credentials("swr%40example.com").await;
    app.sim
        .set_fault(Some("swr@example.com"), Fault::Slow { ms: 200 });
    app.clock.advance(Duration::from_secs(305));

    let first = app.get_credentials("swr%40example.com").await;
    let second = app.get_credentials("swr%40example.com").await;

    for response in [&first, &second] {
        assert_eq!(response.status(), 200);
        let status = header(response, "cache-status");
        assert!(
            status.starts_with("skypostal-proxy; hit; ttl=-")
                && status.ends_with("detail=stale-while-revalidate"),
            "{status}"
        );
    }
    let refreshed = eventually(Duration::from_secs(5), || async {
        header(
            &app.get_credentials("swr%40example.com").await,
            "cache-status",
        )
        .contains("; hit; ttl=29")
    })
    .await;
    assert!(refreshed, "the refresh stored a fresh answer");
    assert_eq!(app.sim.calls(), 2, "exactly one refresh");
}
