//! Per-client rate limits and the partner protection (concurrency and call-rate caps).

use std::time::Duration;

use skypostal_proxy::simulator::Fault;

use crate::helpers::{assert_problem, header, spawn_app_with, ADMIN_KEY, KEY};

/// A client past its burst gets 429 with `Retry-After`; another client is unaffected.
#[tokio::test]
async fn a_client_over_its_limit_gets_429_while_another_is_unaffected() {
    let app = spawn_app_with(|s| {
        s.clients[0].rate_per_s = 1;
        s.clients[0].burst = 2;
    })
    .await;

    let first = app.get_credentials("a%40example.com").await;
    let second = app.get_credentials("a%40example.com").await;
    let third = app.get_credentials("a%40example.com").await;
    let other = app
        .get_credentials_with("a%40example.com", &[("x-api-key", ADMIN_KEY)])
        .await;

    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "ratelimit-policy"), "\"client\";q=2;w=2");
    assert_eq!(header(&first, "ratelimit"), "\"client\";r=1;t=0");
    assert_eq!(
        second.status(),
        200,
        "cache hits count, but within the burst"
    );
    assert_eq!(header(&second, "ratelimit"), "\"client\";r=0;t=1");
    assert_eq!(header(&third, "retry-after"), "1");
    assert_eq!(header(&third, "ratelimit"), "\"client\";r=0;t=1");
    assert!(
        header(&third, "cache-status").is_empty(),
        "a 429 never touches the cache"
    );
    assert_problem(third, 429, "rate-limited").await;
    assert_eq!(other.status(), 200);
    assert!(header(&other, "ratelimit").starts_with("\"client\";r="));
    assert_eq!(app.sim.calls(), 1);
}

/// A burst of distinct cold e-mails never has more partner calls in flight than the cap.
#[tokio::test]
async fn the_partner_concurrency_cap_holds_under_a_burst_of_cold_emails() {
    let app = spawn_app_with(|s| s.upstream.max_concurrency = 4).await;
    app.sim.set_fault(None, Fault::Slow { ms: 100 });

    let emails: Vec<String> = (0..20).map(|i| format!("cold{i}%40example.com")).collect();
    let responses =
        futures_util::future::join_all(emails.iter().map(|e| app.get_credentials(e))).await;

    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(app.sim.calls(), 20);
    assert!(app.sim.max_in_flight() <= 4, "{}", app.sim.max_in_flight());
    assert!(app.sim.max_in_flight() >= 2, "calls did overlap");
}

/// A miss that cannot start a partner call within its deadline gets 503 `upstream-saturated`.
#[tokio::test]
async fn a_miss_without_a_partner_call_slot_in_time_is_503_saturated() {
    let app = spawn_app_with(|s| {
        s.upstream.max_rps = 1;
        s.upstream.deadline = Duration::from_millis(300);
    })
    .await;
    assert_eq!(
        app.get_credentials("first%40example.com").await.status(),
        200
    );

    let response = app.get_credentials("second%40example.com").await;

    assert_eq!(header(&response, "retry-after"), "1");
    assert_eq!(
        header(&response, "cache-status"),
        "skypostal-proxy; fwd=miss"
    );
    assert_problem(response, 503, "upstream-saturated").await;
    assert_eq!(
        app.sim.calls(),
        1,
        "the second lookup never reached the partner"
    );
}

/// The partner call rate is capped: lookups past it within their deadline are refused.
#[tokio::test]
async fn the_partner_call_rate_is_capped() {
    let app = spawn_app_with(|s| {
        s.upstream.max_rps = 5;
        s.upstream.deadline = Duration::from_millis(300);
    })
    .await;

    let emails: Vec<String> = (0..12).map(|i| format!("rate{i}%40example.com")).collect();
    let responses =
        futures_util::future::join_all(emails.iter().map(|e| app.get_credentials(e))).await;

    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let saturated = responses.iter().filter(|r| r.status() == 503).count();
    assert_eq!(ok + saturated, 12);
    assert!((5..=7).contains(&ok), "{ok} calls within 300 ms at 5/s");
    assert_eq!(app.sim.calls() as usize, ok);
}

/// With `auth.allow_anonymous` on a loopback listener, no key is needed; a wrong key still fails.
#[tokio::test]
async fn anonymous_callers_are_served_when_allowed() {
    let app = spawn_app_with(|s| {
        s.auth.allow_anonymous = true;
        s.clients.clear();
    })
    .await;

    let anonymous = app.get_credentials_with("a%40example.com", &[]).await;
    let wrong = app
        .get_credentials_with("a%40example.com", &[("x-api-key", "nope")])
        .await;

    assert_eq!(anonymous.status(), 200);
    assert_problem(wrong, 401, "unauthorized").await;
}

/// A request body is refused up front (no route takes one).
#[tokio::test]
async fn a_large_request_body_is_413() {
    let app = spawn_app_with(|_| {}).await;

    let response = app
        .http
        .get(format!(
            "{}/customers/a%40example.com/credentials",
            app.base
        ))
        .header("x-api-key", KEY)
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap();

    assert_problem(response, 413, "payload-too-large").await;
    assert_eq!(app.sim.calls(), 0);
}
