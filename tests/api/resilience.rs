//! Fault injection: retries, the circuit breaker, partner back-off, cancellation-safe single flight.

use std::time::Duration;

use serde_json::Value;
use skypostal_proxy::simulator::Fault;

use crate::helpers::{assert_problem, eventually, header, spawn_app, spawn_app_with, KEY};

fn status_fault(status: u16, retry_after: Option<u64>) -> Fault {
    Fault::Status {
        status,
        retry_after,
    }
}

/// A "not found" answer is final: no retry, unlike a 5xx.
#[tokio::test]
async fn a_not_found_answer_is_not_retried() {
    let app = spawn_app_with(|s| s.upstream.max_retries = 3).await;

    let response = app.get_credentials("notfound-x%40example.com").await;

    assert_eq!(response.status(), 404);
    assert_eq!(app.sim.calls(), 1);
}

/// A flapping partner opens the circuit (partner calls stop), and recovery closes it again.
#[tokio::test]
async fn a_failing_partner_opens_the_circuit_and_recovery_closes_it() {
    let app = spawn_app_with(|s| {
        s.upstream.max_retries = 0;
        s.upstream.circuit_failures = 3;
        s.upstream.circuit_cooldown = Duration::from_secs(5);
    })
    .await;
    app.sim.set_fault(None, status_fault(500, None));

    for i in 0..3 {
        let response = app.get_credentials(&format!("flap{i}%40example.com")).await;
        assert_eq!(response.status(), 502);
    }
    assert_eq!(app.sim.calls(), 3);
    for i in 3..10 {
        let response = app.get_credentials(&format!("flap{i}%40example.com")).await;
        let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
        assert!((1..=5).contains(&retry_after), "{retry_after}");
        assert_problem(response, 503, "upstream-circuit-open").await;
    }
    assert_eq!(
        app.sim.calls(),
        3,
        "no partner call while the circuit is open"
    );
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["components"]["partner"]["circuit"], "open");

    app.sim.recover();
    app.clock.advance(Duration::from_secs(5));
    let probe = app.get_credentials("flap-probe%40example.com").await;
    let after = app.get_credentials("flap-after%40example.com").await;

    assert_eq!(probe.status(), 200);
    assert_eq!(after.status(), 200);
    assert_eq!(app.sim.calls(), 5);
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["components"]["partner"]["circuit"], "closed");
}

/// With the circuit open, a warm entry is still served, marked stale.
#[tokio::test]
async fn an_open_circuit_serves_stale_answers() {
    let app = spawn_app_with(|s| {
        s.upstream.max_retries = 0;
        s.upstream.circuit_failures = 1;
    })
    .await;
    assert_eq!(
        app.get_credentials("warm%40example.com").await.status(),
        200
    );
    app.sim.set_fault(None, Fault::Reset);
    app.clock.advance(Duration::from_secs(301));
    // The first stale lookup fails at the partner and opens the circuit.
    let first = app.get_credentials("warm%40example.com").await;
    let calls = app.sim.calls();

    let second = app.get_credentials("warm%40example.com").await;

    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let status = header(&second, "cache-status");
    assert!(
        status.starts_with("skypostal-proxy; fwd=stale; ttl=-")
            && status.ends_with("detail=stale-if-error"),
        "{status}"
    );
    assert_eq!(app.sim.calls(), calls, "the open circuit made no call");
}

/// A 429 with `Retry-After: 2` stops partner calls for two seconds: warm entries are served stale,
/// cold ones get 503 `upstream-saturated`; after the two seconds calls resume.
#[tokio::test]
async fn a_partner_429_pauses_calls_for_its_retry_after() {
    let app = spawn_app().await;
    assert_eq!(
        app.get_credentials("warm%40example.com").await.status(),
        200
    );
    app.sim.set_fault(None, status_fault(429, Some(2)));
    app.clock.advance(Duration::from_secs(301));

    let stale = app.get_credentials("warm%40example.com").await;
    assert_eq!(app.sim.calls(), 2, "the 429 itself");
    let cold = app.get_credentials("cold%40example.com").await;
    let stale_again = app.get_credentials("warm%40example.com").await;

    assert_eq!(stale.status(), 200);
    let status = header(&stale, "cache-status");
    assert!(
        status.starts_with("skypostal-proxy; fwd=stale; fwd-status=429; ttl=-"),
        "{status}"
    );
    assert_eq!(stale_again.status(), 200);
    let retry_after: u64 = header(&cold, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_problem(cold, 503, "upstream-saturated").await;
    assert_eq!(app.sim.calls(), 2, "no call while backing off");

    app.sim.recover();
    app.clock.advance(Duration::from_secs(2));
    let resumed = app.get_credentials("cold%40example.com").await;

    assert_eq!(resumed.status(), 200);
    assert_eq!(app.sim.calls(), 3);
}

/// The caller that started a lookup disconnecting leaves the other waiters with one partner call.
#[tokio::test]
async fn a_disconnecting_leader_leaves_one_partner_call_for_the_others() {
    let app = spawn_app().await;
    app.sim
        .set_fault(Some("shared@example.com"), Fault::Slow { ms: 600 });
    let url = format!("{}/customers/shared%40example.com/credentials", app.base);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();

    let leader = tokio::spawn({
        let url = url.clone();
        async move { impatient.get(url).header("x-api-key", KEY).send().await }
    });
    assert!(eventually(Duration::from_secs(2), || async { app.sim.calls() == 1 }).await);
    let follower = app.get_credentials("shared%40example.com").await;

    assert!(leader.await.unwrap().is_err(), "the leader gave up");
    assert_eq!(follower.status(), 200);
    assert_eq!(
        header(&follower, "cache-status"),
        "skypostal-proxy; fwd=miss; collapsed"
    );
    let later = app.get_credentials("shared%40example.com").await;
    assert!(header(&later, "cache-status").contains("; hit;"));
    assert_eq!(app.sim.calls(), 1);
}

/// Even with nobody waiting any more, the lookup completes and fills the cache.
#[tokio::test]
async fn an_abandoned_lookup_still_fills_the_cache() {
    let app = spawn_app().await;
    app.sim
        .set_fault(Some("gone@example.com"), Fault::Slow { ms: 300 });
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();

    let gave_up = impatient
        .get(format!(
            "{}/customers/gone%40example.com/credentials",
            app.base
        ))
        .header("x-api-key", KEY)
        .send()
        .await;
    assert!(gave_up.is_err());
    let filled = eventually(Duration::from_secs(3), || async {
        app.get("/readyz").await.json::<Value>().await.unwrap()["components"]["cache"]["entries"]
            == 1
    })
    .await;

    assert!(filled, "the abandoned lookup stored its answer");
    let response = app.get_credentials("gone%40example.com").await;
    assert!(header(&response, "cache-status").contains("; hit;"));
    assert_eq!(app.sim.calls(), 1);
}
