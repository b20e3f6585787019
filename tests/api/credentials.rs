//! The credentials lookup: body, upstream request, cache, single flight, not found, validation.

use std::time::Duration;

use serde_json::{json, Value};
use skypostal_proxy::simulator::Fault;

use crate::helpers::{assert_problem, eventually, header, spawn_app, ADMIN_KEY, APP_KEY};

/// The documented partner record comes back normalized, exactly as SPEC section 2 shows it.
#[tokio::test]
async fn documented_customer_returns_the_exact_normalized_body() {
    let app = spawn_app().await;

    let response = app.get_credentials("johndoe%40email.com").await;

    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    assert_eq!(header(&response, "cache-control"), "no-store");
    assert!(!header(&response, "x-request-id").is_empty());
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "customer_email": "johndoe@email.com",
            "customer_key": "YpbCNpzqxYqVWv+tzg4e4Ex6ALiT+DfKSYA3NY2dZcw=",
            "customer_box_id": 811111,
            "customer_first_name": "John",
            "customer_last_name": "Doe",
            "activation_date": "2019-02-21T09:56:50-05:00",
            "enrolment_date": "2019-02-21T09:56:48-05:00",
            "is_active": true,
            "is_business": false,
            "is_enable": true,
            "is_vip": false
        })
    );
}

/// One POST reaches the partner: JSON, `user_code` a number, credentials injected, e-mail lowercased.
#[tokio::test]
async fn the_partner_gets_one_post_with_injected_credentials_and_the_lowercased_email() {
    let app = spawn_app().await;

    let response = app.get_credentials("%20John.Doe%40Example.COM%20").await;

    assert_eq!(response.status(), 200);
    let calls = app.sim.recorded();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.path,
        "/wcf-services/service-customer.svc/partner/customer-get-info"
    );
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        call.body.as_ref().unwrap(),
        &json!({"user_code": 396, "app_key": APP_KEY, "customer_email": "john.doe@example.com"})
    );
}

/// Quotes and backslashes in an address stay inside one JSON string toward the partner.
#[tokio::test]
async fn an_email_with_quotes_and_backslashes_never_breaks_the_upstream_json() {
    let app = spawn_app().await;

    // "a\"b\\c",x"@example.com, percent-encoded
    let response = app
        .get_credentials("%22a%5C%22b%5C%5Cc%22%2C%22x%22%40example.com")
        .await;

    assert_eq!(response.status(), 200);
    let calls = app.sim.recorded();
    assert_eq!(calls.len(), 1);
    let body = calls[0].body.as_ref().expect("the partner got valid JSON");
    assert_eq!(body["customer_email"], r#""a\"b\\c","x"@example.com"#);
    assert_eq!(
        body.as_object().unwrap().len(),
        3,
        "no injected keys: {body}"
    );
    let returned: Value = response.json().await.unwrap();
    assert_eq!(returned["customer_email"], r#""a\"b\\c","x"@example.com"#);
}

/// A second request is a cache hit: no second partner call, `Cache-Status: hit`.
#[tokio::test]
async fn a_repeated_lookup_is_a_hit_without_a_partner_call() {
    let app = spawn_app().await;

    let first = app.get_credentials("jane@example.com").await;
    let second = app.get_credentials("JANE%40example.com").await;

    assert_eq!(
        header(&first, "cache-status"),
        "skypostal-proxy; fwd=miss; stored"
    );
    assert_eq!(second.status(), 200);
    let status = header(&second, "cache-status");
    assert!(status.starts_with("skypostal-proxy; hit; ttl="), "{status}");
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    assert!((298..=300).contains(&ttl), "{status}");
    assert_eq!(first.bytes().await.unwrap(), second.bytes().await.unwrap());
    assert_eq!(app.sim.calls(), 1);
}

/// 50 concurrent cold requests for one e-mail make exactly one partner call.
#[tokio::test]
async fn concurrent_misses_for_one_email_call_the_partner_once() {
    let app = spawn_app().await;
    app.sim
        .set_fault(Some("crowd@example.com"), Fault::Slow { ms: 300 });

    let requests = (0..50).map(|_| app.get_credentials("crowd@example.com"));
    let responses = futures_util::future::join_all(requests).await;

    let mut stored = 0;
    for response in responses {
        assert_eq!(response.status(), 200);
        match header(&response, "cache-status").as_str() {
            "skypostal-proxy; fwd=miss; stored" => stored += 1,
            "skypostal-proxy; fwd=miss; collapsed" => {}
            other => assert!(other.contains("; hit;"), "{other}"),
        }
    }
    assert_eq!(stored, 1);
    assert_eq!(app.sim.calls(), 1);
}

/// A request made after a purge starts its own lookup rather than joining one that began before
/// the purge (whose answer may be what the purge was for).
#[tokio::test]
async fn requests_after_a_purge_do_not_join_a_lookup_begun_before_it() {
    const EMAIL: &str = "moving@example.com";
    let app = spawn_app().await;
    app.sim.set_fault(Some(EMAIL), Fault::Slow { ms: 1_000 });

    let before = app.get_credentials(EMAIL);
    let after = async {
        let reached = eventually(Duration::from_secs(5), || async { app.sim.calls() == 1 }).await;
        assert!(reached, "the first lookup reached the partner");
        assert_eq!(app.purge(EMAIL, ADMIN_KEY).await.status(), 204);
        app.get_credentials(EMAIL).await
    };
    let (before, after) = tokio::join!(before, after);

    assert_eq!(
        header(&before, "cache-status"),
        "skypostal-proxy; fwd=miss; stored"
    );
    assert_eq!(
        header(&after, "cache-status"),
        "skypostal-proxy; fwd=miss; stored",
        "a lookup of its own, not collapsed into the older one"
    );
    assert_eq!(app.sim.calls(), 2);
}

/// An unknown customer is a 404 problem, cached for the negative TTL.
#[tokio::test]
async fn an_unknown_customer_is_404_and_negatively_cached() {
    let app = spawn_app().await;

    let first = app.get_credentials("notfound-1@example.com").await;
    let first_status = header(&first, "cache-status");
    assert_problem(first, 404, "customer-not-found").await;
    let second = app.get_credentials("notfound-1@example.com").await;
    let second_status = header(&second, "cache-status");
    assert_problem(second, 404, "customer-not-found").await;

    assert_eq!(first_status, "skypostal-proxy; fwd=miss; stored");
    assert!(
        second_status.starts_with("skypostal-proxy; hit; ttl="),
        "{second_status}"
    );
    let ttl: u64 = second_status.rsplit('=').next().unwrap().parse().unwrap();
    assert!(ttl <= 60, "negative TTL applies: {second_status}");
    assert_eq!(app.sim.calls(), 1);
}

/// An empty array from the partner is also "not found".
#[tokio::test]
async fn an_empty_partner_answer_is_404() {
    let app = spawn_app().await;
    app.sim.set_fault(Some("ghost@example.com"), Fault::Empty);

    let response = app.get_credentials("ghost@example.com").await;

    assert_problem(response, 404, "customer-not-found").await;
}

/// Invalid addresses are refused with 400 and never reach the partner.
#[tokio::test]
async fn invalid_emails_are_rejected_without_a_partner_call() {
    let app = spawn_app().await;
    let long = format!("{}%40example.com", "a".repeat(250));
    let cases = [
        "no-at-sign.example.com",
        "%40example.com",
        "john%40",
        "jo%20hn%40example.com",
        "john%0A%40example.com",
        "john%00%40example.com",
        "%20%20",
        long.as_str(),
        "%FF%FE%40example.com",
    ];

    for case in cases {
        let response = app.get_credentials(case).await;
        assert!(header(&response, "cache-status").is_empty(), "{case}");
        assert_problem(response, 400, "invalid-email").await;
    }
    assert_eq!(app.sim.calls(), 0);
}

/// Non-ASCII letters are lowercased and accepted.
#[tokio::test]
async fn non_ascii_addresses_are_lowercased() {
    let app = spawn_app().await;

    let response = app.get_credentials("%C3%89lodie%40Exemple.fr").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["customer_email"], "élodie@exemple.fr");
    assert_eq!(
        app.sim.recorded()[0].body.as_ref().unwrap()["customer_email"],
        "élodie@exemple.fr"
    );
}
