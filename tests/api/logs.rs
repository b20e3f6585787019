//! Logs never hold a raw e-mail, the partner app key, a caller key or a customer key.

use std::time::Duration;

use skypostal_proxy::simulator::Fault;

use crate::binary::{binary_config, sigterm, spawn_serve, start_simulator, Served};
use crate::helpers::{eventually, APP_KEY, KEY};
use crate::redis_server::RedisServer;

const CUSTOMER_KEY: &str = "YpbCNpzqxYqVWv+tzg4e4Ex6ALiT+DfKSYA3NY2dZcw=";

/// A realistic sequence at `log.level = trace` in JSON: the whole output is free of secrets and
/// raw addresses, and still says what happened (masked).
#[tokio::test]
async fn trace_logs_hold_no_raw_email_and_no_secret() {
    let (sim, partner) = start_simulator(APP_KEY).await;
    sim.set_fault(Some("victim.person@example.com"), Fault::SystemError);
    let config = binary_config(partner, "");
    let Served {
        child,
        addr,
        stderr,
    } = spawn_serve(&config, &[("SKYPOSTAL_PROXY__LOG__LEVEL", "trace")]).await;
    let http = reqwest::Client::new();
    let base = format!("http://{addr}/customers");
    let wrong_key = "wrong-caller-key-xyz-123";

    let sequence = [
        ("johndoe%40email.com", KEY, None),
        ("JohnDoe@email.com", KEY, None),
        ("johndoe%40email.com", KEY, Some("no-cache")),
        ("notfound-secret.person%40example.com", KEY, None),
        ("victim.person%40example.com", KEY, None),
        ("bad%20person%40example.com", KEY, None),
        ("johndoe%40email.com", wrong_key, None),
    ];
    for (email, key, cache_control) in sequence {
        let mut request = http
            .get(format!("{base}/{email}/credentials"))
            .bearer_auth(key);
        if let Some(cc) = cache_control {
            request = request.header("cache-control", cc);
        }
        request.send().await.expect("answered");
    }
    let purge = http
        .delete(format!("{base}/johndoe%40email.com/credentials"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 403);
    sigterm(&child);
    let mut child = child;
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    // The reader task may still be appending the last lines.
    let logs = {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let len = stderr.lock().unwrap().len();
            if len == last {
                break stderr.lock().unwrap().clone();
            }
            last = len;
        }
    };

    for forbidden in [
        "johndoe@email.com",
        "johndoe%40email.com",
        "JohnDoe@email.com",
        "notfound-secret.person@example.com",
        "notfound-secret.person%40example.com",
        "victim.person@example.com",
        "victim.person%40example.com",
        "bad person@example.com",
        "bad%20person%40example.com",
        APP_KEY,
        KEY,
        wrong_key,
        CUSTOMER_KEY,
    ] {
        assert!(
            !logs.contains(forbidden),
            "logs contain {forbidden:?}:\n{logs}"
        );
    }
    assert!(
        logs.contains("j***@email.com"),
        "masked e-mails are logged:\n{logs}"
    );
    assert!(logs.contains("n***@example.com"), "{logs}");
    assert!(logs.contains("\"request_id\""), "{logs}");
    assert!(logs.lines().count() > 20, "trace level logs plenty");
}

/// With the shared tier on and Redis lost and found again mid-run: the transitions are logged,
/// and nothing logged holds the Redis password, an e-mail or a secret.
#[tokio::test]
async fn shared_tier_logs_its_transitions_without_secrets() {
    const REDIS_PASSWORD: &str = "redis-password-never-logged-42";
    let mut redis = RedisServer::start_with_password(REDIS_PASSWORD).await;
    let (_sim, partner) = start_simulator(APP_KEY).await;
    let config = binary_config(partner, "");
    let keys = config.with_extension("keys");
    std::fs::write(&keys, "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=\n").unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[redis]\nurl = \"{}\"\nencryption_key_file = \"{}\"\nrecovery_interval_ms = 100\n",
        redis.url(),
        keys.display()
    ));
    std::fs::write(&config, text).unwrap();
    let Served {
        child,
        addr,
        stderr,
    } = spawn_serve(&config, &[("SKYPOSTAL_PROXY__LOG__LEVEL", "trace")]).await;
    let http = reqwest::Client::new();
    let get = |email: &'static str| {
        let request = http
            .get(format!("http://{addr}/customers/{email}/credentials"))
            .bearer_auth(KEY);
        async move { request.send().await.expect("answered").status() }
    };
    assert_eq!(get("johndoe%40email.com").await, 200);
    redis.stop().await;
    assert_eq!(get("lost.redis%40example.com").await, 200);
    let logged = |needle: &'static str| {
        let stderr = stderr.clone();
        async move { stderr.lock().unwrap().contains(needle) }
    };
    assert!(eventually(Duration::from_secs(5), || logged("shared tier down")).await);
    redis.restart().await;
    assert!(eventually(Duration::from_secs(10), || logged("shared tier up again")).await);
    assert_eq!(get("found.again%40example.com").await, 200);
    sigterm(&child);
    let mut child = child;
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    let logs = stderr.lock().unwrap().clone();
    for forbidden in [
        REDIS_PASSWORD,
        "johndoe@email.com",
        "lost.redis@example.com",
        "found.again@example.com",
        "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80",
        APP_KEY,
        KEY,
        CUSTOMER_KEY,
    ] {
        assert!(
            !logs.contains(forbidden),
            "logs contain {forbidden:?}:\n{logs}"
        );
    }
}
