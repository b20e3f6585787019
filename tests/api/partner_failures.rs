//! Every way the partner can fail, and what callers get (SPEC section 3).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use skypostal_proxy::simulator::Fault;

use crate::helpers::{assert_problem, header, spawn_app, spawn_app_with};

/// Sets `fault` for one address, asks for it twice, and checks both answers are the same
/// problem (a failure is never cached) with the expected `Cache-Status`.
async fn assert_partner_failure(fault: Fault, status: u16, kind: &str, cache_status: &str) -> u64 {
    let app = spawn_app().await;
    app.sim.set_fault(Some("victim@example.com"), fault.clone());

    for _ in 0..2 {
        let response = app.get_credentials("victim@example.com").await;
        assert_eq!(header(&response, "cache-status"), cache_status, "{fault:?}");
        let body = assert_problem(response, status, kind).await;
        let text = body.to_string();
        assert!(!text.contains("1656d700707ad9a77f737e5df3db088a"), "{text}");
        assert!(
            !text.contains("victim@"),
            "the partner's description is not echoed: {text}"
        );
    }
    app.sim.calls()
}

/// `system_error: true` is a 502, not cached.
#[tokio::test]
async fn a_partner_system_error_is_502() {
    let calls = assert_partner_failure(
        Fault::SystemError,
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=200",
    )
    .await;
    assert_eq!(calls, 2, "not cached, not retried");
}

/// `error_code` 13001 (our credentials refused) is a 502, visible in `/readyz`, which stays 200.
#[tokio::test]
async fn refused_partner_credentials_are_502_and_reported_by_readyz() {
    let app = spawn_app().await;
    app.sim.set_fault(None, Fault::AccessDenied);

    let response = app.get_credentials("anyone@example.com").await;
    assert_problem(response, 502, "upstream-error").await;

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["components"]["partner"]["credentials"], "refused");

    app.sim.recover();
    assert_eq!(
        app.get_credentials("anyone@example.com").await.status(),
        200
    );
    let body: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["components"]["partner"]["credentials"], "ok");
}

/// Wrong partner credentials (the simulator's own check) map the same way.
#[tokio::test]
async fn wrong_partner_credentials_are_502() {
    let app = spawn_app_with(|s| s.upstream.app_key = "not-the-key".to_owned().into()).await;

    let response = app.get_credentials("anyone@example.com").await;

    assert_problem(response, 502, "upstream-error").await;
}

/// `error_code` 12001 (partner unavailable) is a 502.
#[tokio::test]
async fn a_partner_service_unavailable_code_is_502() {
    assert_partner_failure(
        Fault::Unavailable,
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=200",
    )
    .await;
}

/// Two customer records for one e-mail are ambiguous: 502.
#[tokio::test]
async fn more_than_one_customer_record_is_502() {
    assert_partner_failure(
        Fault::Ambiguous,
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=200",
    )
    .await;
}

/// A body that is not the documented JSON is a 502.
#[tokio::test]
async fn an_unreadable_answer_is_502() {
    assert_partner_failure(
        Fault::Garbage,
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=200",
    )
    .await;
}

/// A body over `upstream.max_response_bytes` is a 502.
#[tokio::test]
async fn an_oversized_answer_is_502() {
    assert_partner_failure(
        Fault::Oversized { bytes: 200_000 },
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=200",
    )
    .await;
}

/// A non-2xx status that is not transient is a 502 without retries.
#[tokio::test]
async fn a_4xx_from_the_partner_is_502_without_retries() {
    let calls = assert_partner_failure(
        Fault::Status {
            status: 400,
            retry_after: None,
        },
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=400",
    )
    .await;
    assert_eq!(calls, 2);
}

/// A 500 is retried `max_retries` times, then answered 502.
#[tokio::test]
async fn a_500_is_retried_then_502() {
    let calls = assert_partner_failure(
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss; fwd-status=500",
    )
    .await;
    assert_eq!(calls, 6, "two lookups of three attempts each");
}

/// A connection dropped mid-answer is retried, then a 502 without `fwd-status`.
#[tokio::test]
async fn a_reset_connection_is_retried_then_502() {
    let calls = assert_partner_failure(
        Fault::Reset,
        502,
        "upstream-error",
        "skypostal-proxy; fwd=miss",
    )
    .await;
    assert_eq!(calls, 6);
}

/// A 429 is a request to back off: 503 upstream-saturated with `Retry-After`, no retry.
#[tokio::test]
async fn a_429_from_the_partner_is_503_with_retry_after() {
    let app = spawn_app().await;
    app.sim.set_fault(
        None,
        Fault::Status {
            status: 429,
            retry_after: Some(2),
        },
    );

    let response = app.get_credentials("busy@example.com").await;

    assert_eq!(header(&response, "retry-after"), "2");
    assert_eq!(
        header(&response, "cache-status"),
        "skypostal-proxy; fwd=miss; fwd-status=429"
    );
    assert_problem(response, 503, "upstream-saturated").await;
    assert_eq!(app.sim.calls(), 1);
}

/// An unreachable partner is a 502 after the retries, well within the deadline.
#[tokio::test]
async fn an_unreachable_partner_is_502() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app_with(|s| s.upstream.base_url = format!("http://{closed}")).await;

    let response = app.get_credentials("anyone@example.com").await;

    assert_eq!(
        header(&response, "cache-status"),
        "skypostal-proxy; fwd=miss"
    );
    assert_problem(response, 502, "upstream-error").await;
}

/// A partner slower than the deadline gets a 504 at the deadline, not later.
#[tokio::test]
async fn a_slow_partner_is_504_at_the_deadline() {
    let app = spawn_app_with(|s| {
        s.upstream.timeout = Duration::from_millis(300);
        s.upstream.deadline = Duration::from_millis(500);
    })
    .await;
    app.sim.set_fault(None, Fault::Slow { ms: 5_000 });

    let started = Instant::now();
    let response = app.get_credentials("slow@example.com").await;
    let elapsed = started.elapsed();

    assert_problem(response, 504, "upstream-timeout").await;
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
}
