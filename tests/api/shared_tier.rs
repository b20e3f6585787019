//! The shared Redis tier: two instances sharing one real `redis-server` and one partner.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::Value;
use skypostal_proxy::config::Settings;
use skypostal_proxy::simulator::{Fault, Simulator};

use crate::helpers::{
    assert_problem, eventually, header, spawn_app_on, start_partner, test_settings_with, TestApp,
    ADMIN_KEY, APP_KEY, KEY,
};
use crate::redis_server::RedisServer;
use crate::tcp_proxy::StallingProxy;

const PREFIX: &str = "test-proxy:";
const STORED: &str = "skypostal-proxy; fwd=miss; stored";

/// A fresh random 256-bit key in a file of its own.
fn key_file() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "skypostal-proxy-test-keys-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let key: [u8; 32] = rand::random();
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key);
    std::fs::write(&path, format!("# newest first\n{text}\n")).expect("key file is written");
    path
}

/// Two instances sharing `redis` and one partner; `adjust` applies to both.
async fn spawn_pair(
    redis: &RedisServer,
    adjust: impl Fn(&mut Settings),
) -> (TestApp, TestApp, Simulator) {
    let (sim, partner) = start_partner().await;
    let keys = key_file();
    let a = spawn_instance(&sim, partner, &redis.url(), &keys, &adjust).await;
    let b = spawn_instance(&sim, partner, &redis.url(), &keys, &adjust).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }
    (a, b, sim)
}

/// A pair sharing `redis` and one partner, where A logs in as its own ACL user, `user`, with
/// every permission but `denied` (such as `-subscribe`), and B as the default user. The caller
/// waits for the states it expects.
async fn spawn_pair_as(
    redis: &RedisServer,
    user: &str,
    denied: &[&str],
) -> (TestApp, TestApp, Simulator) {
    let password = format!("{user}-pw");
    let secret = format!(">{password}");
    let mut acl = vec!["ACL", "SETUSER", user, "on", &secret, "~*", "&*", "+@all"];
    acl.extend_from_slice(denied);
    redis.command(&acl).await;
    let (sim, partner) = start_partner().await;
    let keys = key_file();
    let url = redis.url_as(user, &password);
    let a = spawn_instance(&sim, partner, &url, &keys, |_| {}).await;
    let b = spawn_instance(&sim, partner, &redis.url(), &keys, |_| {}).await;
    (a, b, sim)
}

/// One instance on Redis at `url`, sealing with the keys in `keys`.
async fn spawn_instance(
    sim: &Simulator,
    partner: SocketAddr,
    url: &str,
    keys: &Path,
    adjust: impl Fn(&mut Settings),
) -> TestApp {
    let layer = format!(
        r#"
[redis]
url = "{url}"
key_prefix = "{PREFIX}"
encryption_key_file = "{}"
# Generous: a loaded CI machine must not look like a Redis outage.
command_timeout_ms = 1000
recovery_interval_ms = 100
"#,
        keys.display()
    );
    let mut settings = test_settings_with(partner, &layer);
    adjust(&mut settings);
    spawn_app_on(sim.clone(), &settings).await
}

/// The `shared_tier` part of `/readyz` (which must stay 200).
async fn tier_state(app: &TestApp) -> Value {
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200, "readiness stays green");
    let body: Value = response.json().await.expect("readyz is JSON");
    body["components"]["shared_tier"].clone()
}

async fn wait_for_tier(app: &TestApp, state: &str, subscribed: bool) {
    let reached = eventually(Duration::from_secs(10), || async {
        let tier = tier_state(app).await;
        tier["state"] == state && tier["purges_subscribed"] == subscribed
    })
    .await;
    assert!(
        reached,
        "tier should reach {state}/{subscribed}: {}",
        tier_state(app).await
    );
}

/// The names of every cache entry in Redis.
async fn entry_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.connection().await;
    redis::cmd("KEYS")
        .arg(format!("{PREFIX}v1:*"))
        .query_async(&mut conn)
        .await
        .expect("keys")
}

/// A 200 and its `Cache-Status`.
async fn ok_status(app: &TestApp, email: &str) -> String {
    let response = app.get_credentials(email).await;
    assert_eq!(response.status(), 200, "{email}");
    header(&response, "cache-status")
}

/// A miss on A fills Redis; B answers from it without calling the partner, found or not found.
#[tokio::test]
async fn a_miss_on_one_instance_is_answered_from_redis_on_the_other() {
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |_| {}).await;

    let first = a.get_credentials("shared@example.com").await;
    assert_eq!(header(&first, "cache-status"), STORED);
    let from_a: Value = first.json().await.expect("json");

    let second = b.get_credentials("shared@example.com").await;
    assert_eq!(second.status(), 200);
    let status = header(&second, "cache-status");
    assert!(
        status.starts_with("skypostal-proxy-shared; hit; ttl=")
            && status.ends_with(", skypostal-proxy; fwd=miss; stored"),
        "{status}"
    );
    let from_b: Value = second.json().await.expect("json");
    assert_eq!(from_a, from_b, "the same record from either instance");
    assert_eq!(sim.calls(), 1, "one partner call for both instances");
    // B keeps it in memory now.
    assert!(ok_status(&b, "shared@example.com")
        .await
        .starts_with("skypostal-proxy; hit; ttl="));

    let unknown = a.get_credentials("notfound-shared@example.com").await;
    assert_problem(unknown, 404, "customer-not-found").await;
    let unknown_on_b = b.get_credentials("notfound-shared@example.com").await;
    assert!(header(&unknown_on_b, "cache-status").starts_with("skypostal-proxy-shared; hit"));
    assert_problem(unknown_on_b, 404, "customer-not-found").await;
    assert_eq!(sim.calls(), 2, "the negative answer is shared too");

    // The TTL in Redis is the cache's lifetime plus the stale window, not forever.
    let keys = entry_keys(&redis).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let mut conn = redis.connection().await;
    for key in keys {
        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        // Defaults: 300 s fresh (60 s for not found) + 3600 s stale-if-error.
        assert!(ttl_ms > 3_600_000 && ttl_ms <= 3_900_000, "{ttl_ms}");
    }
}

/// A purge on A removes the entry from Redis and from B's memory within a second.
#[tokio::test]
async fn a_purge_on_one_instance_reaches_the_other_within_a_second() {
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |_| {}).await;
    ok_status(&a, "purged@example.com").await;
    assert!(ok_status(&b, "purged@example.com")
        .await
        .starts_with("skypostal-proxy-shared; hit"));
    assert!(ok_status(&b, "purged@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));
    assert_eq!(sim.calls(), 1);

    let purged_at = Instant::now();
    assert_eq!(a.purge("purged@example.com", ADMIN_KEY).await.status(), 204);
    // B answers from its memory until the announcement lands, then looks the customer up again.
    let b_status = loop {
        let status = ok_status(&b, "purged@example.com").await;
        if !status.contains("hit") || purged_at.elapsed() > Duration::from_secs(2) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = purged_at.elapsed();
    assert_eq!(b_status, STORED, "not from Redis either: the entry is gone");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(sim.calls(), 2);
    // A hears its own announcement too, but counts only other replicas' purges.
    for (app, received) in [(&a, 0), (&b, 1)] {
        let metrics = metrics_text(app).await;
        let line = format!("skypostal_proxy_shared_tier_purges_received_total {received}\n");
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
}

/// `upstream.max_rps` holds across both instances under a burst of distinct cold e-mails.
#[tokio::test]
async fn the_partner_quota_holds_across_instances() {
    const RPS: u32 = 4;
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |s| {
        s.upstream.max_rps = RPS;
        s.upstream.deadline = Duration::from_millis(1_000);
    })
    .await;

    let started = Instant::now();
    // One lookup each first, so both have loaded the scripts before Redis's counters start.
    for app in [&a, &b] {
        ok_status(app, "warm-up@example.com").await;
    }
    redis.command(&["CONFIG", "RESETSTAT"]).await;
    let requests = (0..40).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { app.get_credentials(&format!("burst-{i}@example.com")).await }
    });
    let responses = futures_util::future::join_all(requests).await;
    let elapsed = started.elapsed().as_secs_f64();

    let mut ok = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_problem(response, 503, "upstream-saturated").await;
            }
            // A slot granted just before the deadline leaves the call too little time.
            504 => {
                assert_problem(response, 504, "upstream-timeout").await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let calls = sim.calls();
    assert!(calls >= ok, "every 200 came from a call: {calls} < {ok}");
    // One shared bucket: a burst of RPS, then RPS a second. Two separate ones would allow twice that.
    let allowed = f64::from(RPS) + f64::from(RPS) * elapsed + 1.0;
    assert!(
        (calls as f64) <= allowed,
        "{calls} partner calls in {elapsed:.2} s; the quota allows {allowed:.1}"
    );
    assert!(
        calls >= u64::from(RPS),
        "the burst itself is allowed: {calls}"
    );
    assert!(ok < 40, "the quota refused some lookups");

    // The script books each caller's slot: one script call per decision, no polling.
    let mut decisions = 0;
    let mut waited = 0;
    for app in [&a, &b] {
        let text = metrics_text(app).await;
        let decided = |outcome: &str| {
            let name =
                format!("skypostal_proxy_shared_quota_decisions_total{{outcome=\"{outcome}\"}}");
            counter(&text, &name)
        };
        decisions += decided("granted") + decided("waited") + decided("refused");
        waited += decided("waited");
    }
    let redis::Value::BulkString(stats) = redis.command(&["INFO", "commandstats"]).await else {
        panic!("INFO answers a string");
    };
    let stats = String::from_utf8_lossy(&stats);
    let script_calls: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let stores = entry_keys(&redis).await.len() as u64;
    assert!(
        script_calls <= decisions + stores,
        "{script_calls} script calls for {decisions} quota decisions and {stores} stores"
    );
    assert!(waited > 0, "lookups waited for booked slots");
}

/// Whether `app` stops answering `email` from memory within 5 s (a purge reached it).
async fn drops_from_memory(app: &TestApp, email: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        !ok_status(app, email)
            .await
            .starts_with("skypostal-proxy; hit")
    })
    .await
}

/// An instance's `/metrics` text.
async fn metrics_text(app: &TestApp) -> String {
    app.get("/metrics").await.text().await.expect("metrics")
}

/// The value of one counter line in a Prometheus exposition (0 if absent).
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Redis stopping mid-test: both instances keep answering from local state and the partner, then
/// use Redis again once it is back.
#[tokio::test]
async fn losing_redis_fails_no_request_and_both_instances_recover() {
    let mut redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |_| {}).await;
    ok_status(&a, "warm@example.com").await;
    ok_status(&b, "warm@example.com").await;
    assert_eq!(sim.calls(), 1);

    redis.stop().await;
    for round in 0..5 {
        for app in [&a, &b] {
            // Cached in memory, and cold (Redis errors, then is skipped: the partner answers).
            assert!(ok_status(app, "warm@example.com").await.contains("hit"));
            ok_status(app, &format!("cold-{round}@example.com")).await;
        }
    }
    for app in [&a, &b] {
        wait_for_tier(app, "down", false).await;
        assert_eq!(app.purge("warm@example.com", ADMIN_KEY).await.status(), 204);
    }
    let metrics = metrics_text(&a).await;
    assert!(
        metrics.contains("skypostal_proxy_shared_tier_up 0"),
        "{metrics}"
    );
    assert!(metrics.contains("skypostal_proxy_shared_tier_transitions_total{state=\"down\"} 1"));

    redis.restart().await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }
    let calls = sim.calls();
    assert_eq!(ok_status(&a, "after@example.com").await, STORED);
    assert!(ok_status(&b, "after@example.com")
        .await
        .starts_with("skypostal-proxy-shared; hit"));
    assert_eq!(sim.calls(), calls + 1, "B answered from Redis again");
    let metrics = metrics_text(&b).await;
    assert!(metrics.contains("skypostal_proxy_shared_tier_up 1"));
    assert!(metrics.contains("skypostal_proxy_shared_tier_transitions_total{state=\"up\"} 1"));
    // The restarted Redis lost the purge log: what it named cannot be known any more.
    for app in [&a, &b] {
        let metrics = metrics_text(app).await;
        let line = "skypostal_proxy_shared_tier_purge_catch_ups_total{outcome=\"distrusted\"} 1\n";
        assert!(metrics.contains(line), "{metrics}");
    }
}

/// Redis unreachable at start-up: the instance starts, serves, and picks Redis up when it comes.
#[tokio::test]
async fn an_instance_starts_without_redis_and_connects_when_it_appears() {
    let mut redis = RedisServer::start().await;
    redis.stop().await;
    let (sim, partner) = start_partner().await;
    let app = spawn_instance(&sim, partner, &redis.url(), &key_file(), |_| {}).await;
    assert_eq!(tier_state(&app).await["state"], "down");
    ok_status(&app, "early@example.com").await;

    redis.restart().await;
    wait_for_tier(&app, "up", true).await;
    ok_status(&app, "later@example.com").await;
    let mut conn = redis.connection().await;
    let stored: i64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .expect("dbsize");
    assert!(
        stored >= 1,
        "the lookup after recovery was written to Redis"
    );
}

/// After a run, nothing in Redis (keys, values, purge announcements) reads as an e-mail, a
/// customer key, the partner app key or a caller key.
#[tokio::test]
async fn nothing_in_redis_is_readable_as_an_email_or_a_secret() {
    let redis = RedisServer::start().await;
    let (a, b, _sim) = spawn_pair(&redis, |_| {}).await;

    // Every announcement on the purge channel, as an operator with SUBSCRIBE would see it.
    let mut pubsub = redis::Client::open(redis.url())
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub
        .subscribe(format!("{PREFIX}purge"))
        .await
        .expect("subscribe");
    let mut announcements = pubsub.into_on_message();

    let emails = [
        "John.Doe@Example.com",
        "alice+tag@example.org",
        "bobby.tables@example.net",
        "notfound-carol@example.com",
    ];
    let mut secrets: Vec<String> = vec![APP_KEY.to_owned(), KEY.to_owned(), ADMIN_KEY.to_owned()];
    for email in emails {
        let response = a.get_credentials(email).await;
        if response.status() == 200 {
            let body: Value = response.json().await.expect("json");
            let customer_key = body["customer_key"].as_str().expect("customer_key");
            secrets.push(customer_key.to_owned());
        }
        b.get_credentials(email).await;
    }
    assert_eq!(
        a.purge("bobby.tables@example.net", ADMIN_KEY)
            .await
            .status(),
        204
    );
    let announcement = tokio::time::timeout(Duration::from_secs(5), announcements.next())
        .await
        .expect("the purge is announced")
        .expect("a message");

    let mut conn = redis.connection().await;
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    for key in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("type");
        let value: Vec<u8> = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("get"),
            // The purge log: every field of every entry.
            "stream" => {
                let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .expect("xrange");
                assert!(!entries.is_empty(), "the purge is logged");
                entries
                    .into_iter()
                    .flat_map(|(_, fields)| fields)
                    .flatten()
                    .collect()
            }
            other => panic!("unexpected Redis type {other}"),
        };
        seen.push((without_digest(&String::from_utf8_lossy(key)), value));
    }
    // Three entries left after the purge: the sealed values must be there to be checked.
    let entries = seen
        .iter()
        .filter(|(k, _)| k == &format!("{PREFIX}v1:<digest>"))
        .count();
    assert_eq!(
        entries,
        3,
        "{:?}",
        seen.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    seen.push((
        "purge announcement".to_owned(),
        announcement.get_payload_bytes().to_vec(),
    ));

    let mut needles: Vec<String> = secrets;
    for email in emails {
        let lower = email.to_lowercase();
        let local = lower.split('@').next().unwrap_or_default().to_owned();
        needles.extend([email.to_owned(), lower, local]);
    }
    needles.extend(["customer_key", "customer_box_id", "customer_last_name"].map(str::to_owned));
    for (key, value) in &seen {
        for needle in &needles {
            let needle = needle.as_bytes();
            let found = |hay: &[u8]| {
                hay.windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle))
            };
            assert!(
                !found(key.as_bytes()) && !found(value),
                "{key:?} holds {:?} in clear",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

/// A key name with its digest (random by construction, where a short needle could turn up by
/// chance) replaced by `<digest>`, after checking it is one: 22 base64url characters.
fn without_digest(key: &str) -> String {
    for kind in ["v1:", "t:"] {
        if let Some((head, digest)) = key.split_once(kind) {
            let is_digest = digest.len() == 22
                && digest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            assert!(is_digest, "{key} names an entry by a digest");
            return format!("{head}{kind}<digest>");
        }
    }
    key.to_owned()
}

/// A purge made while Redis does not answer is replayed when it does: the entry is not served
/// from Redis afterwards, and the other instance drops its copy.
#[tokio::test]
async fn a_purge_during_an_outage_is_replayed_on_recovery() {
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |_| {}).await;
    ok_status(&a, "paused@example.com").await;
    ok_status(&b, "paused@example.com").await;
    assert_eq!(sim.calls(), 1);

    // Redis keeps its data but stops answering for longer than the command timeout.
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "1500", "ALL"])
        .query_async(&mut conn)
        .await
        .expect("client pause");
    assert_eq!(a.purge("paused@example.com", ADMIN_KEY).await.status(), 204);
    wait_for_tier(&a, "up", true).await;

    let gone = eventually(Duration::from_secs(5), || async {
        entry_keys(&redis).await.is_empty()
    })
    .await;
    assert!(gone, "the purge reached Redis after the outage");
    assert_eq!(ok_status(&a, "paused@example.com").await, STORED);
    let b_dropped = drops_from_memory(&b, "paused@example.com").await;
    assert!(b_dropped, "the replayed announcement reached B");
}

/// A lookup already running on A when B purges the customer cannot write the old answer back to
/// Redis, even though A never hears of the purge.
#[tokio::test]
async fn a_lookup_running_during_a_purge_elsewhere_does_not_write_it_back() {
    let redis = RedisServer::start().await;
    // A may not subscribe, so the purge announcement never stops its lookup.
    let (a, b, sim) = spawn_pair_as(&redis, "deaf", &["-subscribe"]).await;
    wait_for_tier(&a, "up", false).await;
    wait_for_tier(&b, "up", true).await;

    const EMAIL: &str = "race@example.com";
    sim.set_fault(Some(EMAIL), Fault::Slow { ms: 1_000 });
    let purge_while_a_waits = async {
        let reached = eventually(Duration::from_secs(5), || async { sim.calls() == 1 }).await;
        assert!(reached, "A's lookup reached the partner");
        assert_eq!(b.purge(EMAIL, ADMIN_KEY).await.status(), 204);
    };
    let (a_status, ()) = tokio::join!(ok_status(&a, EMAIL), purge_while_a_waits);
    assert_eq!(a_status, STORED);
    sim.recover();

    assert!(
        entry_keys(&redis).await.is_empty(),
        "A's answer was not written back"
    );
    // Refused by the tombstone, not merely deleted by a purge that happened to land after it.
    let metrics = metrics_text(&a).await;
    let refused = "skypostal_proxy_shared_tier_stores_total{outcome=\"tombstoned\"} 1\n";
    assert!(metrics.contains(refused), "{metrics}");
    assert_eq!(
        ok_status(&b, EMAIL).await,
        STORED,
        "B asks the partner again instead of serving what the purge removed"
    );
    assert_eq!(sim.calls(), 2);
}

/// A replica whose subscription was down while another purged catches up from the purge log
/// when it subscribes again; one whose log cannot vouch for what it missed distrusts its memory.
#[tokio::test]
async fn a_replica_that_missed_purges_catches_up_when_it_resubscribes() {
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair_as(&redis, "a", &[]).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }
    let deafen = || async {
        redis.command(&["ACL", "SETUSER", "a", "-subscribe"]).await;
        redis
            .command(&["CLIENT", "KILL", "USER", "a", "TYPE", "pubsub"])
            .await;
        wait_for_tier(&a, "up", false).await;
    };
    let hear_again = || async {
        redis.command(&["ACL", "SETUSER", "a", "+subscribe"]).await;
        wait_for_tier(&a, "up", true).await;
    };

    // Missed purges still in the log are applied.
    assert_eq!(ok_status(&a, "missed@example.com").await, STORED);
    assert!(ok_status(&a, "missed@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));
    deafen().await;
    assert_eq!(b.purge("missed@example.com", ADMIN_KEY).await.status(), 204);
    hear_again().await;
    assert_eq!(ok_status(&a, "missed@example.com").await, STORED);
    assert_eq!(sim.calls(), 2);

    // More purges than the log keeps: the ones missed cannot be told, so nothing in memory is
    // served as fresh any more; it remains a fallback should the partner fail.
    for email in ["kept@example.com", "fallback@example.com"] {
        assert!(ok_status(&a, email).await.contains("stored"));
        assert!(ok_status(&a, email)
            .await
            .starts_with("skypostal-proxy; hit"));
    }
    deafen().await;
    let mut conn = redis.connection().await;
    let mut pipe = redis::pipe();
    for _ in 0..10_001 {
        pipe.cmd("XADD")
            .arg(format!("{PREFIX}purge-log"))
            .arg("MAXLEN")
            .arg(10_000)
            .arg("*")
            .arg("d")
            .arg(&[0u8; 16][..])
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("log filled");
    hear_again().await;
    assert!(
        ok_status(&a, "kept@example.com")
            .await
            .starts_with("skypostal-proxy-shared; hit"),
        "memory is not trusted; Redis still has the entry"
    );
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(entry_keys(&redis).await)
        .query_async(&mut conn)
        .await
        .expect("del");
    sim.set_fault(
        Some("fallback@example.com"),
        Fault::Status {
            status: 500,
            retry_after: None,
        },
    );
    let fallback = ok_status(&a, "fallback@example.com").await;
    assert!(fallback.contains("detail=stale-if-error"), "{fallback}");
    sim.recover();

    // The log evicted (or lost in a restart) and started again by a later purge: the purge
    // made before is not in it, and A cannot take the new log for the old one.
    assert!(ok_status(&a, "evicted@example.com")
        .await
        .contains("stored"));
    assert!(ok_status(&a, "evicted@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));
    deafen().await;
    assert_eq!(
        b.purge("evicted@example.com", ADMIN_KEY).await.status(),
        204
    );
    redis.command(&["DEL", &format!("{PREFIX}purge-log")]).await;
    assert_eq!(b.purge("other@example.com", ADMIN_KEY).await.status(), 204);
    hear_again().await;
    assert_eq!(
        ok_status(&a, "evicted@example.com").await,
        STORED,
        "the purged answer is not served from memory"
    );
    let metrics = metrics_text(&a).await;
    for (outcome, count) in [("replayed", 1), ("distrusted", 2)] {
        let line = format!(
            "skypostal_proxy_shared_tier_purge_catch_ups_total{{outcome=\"{outcome}\"}} {count}\n"
        );
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
}

/// A login refused when connecting is not remembered: the instance connects on fresh
/// connections once the user exists.
#[tokio::test]
async fn a_refused_login_is_retried_on_fresh_connections() {
    let redis = RedisServer::start().await;
    let (sim, partner) = start_partner().await;
    let url = redis.url_as("late", "late-pw");
    let app = spawn_instance(&sim, partner, &url, &key_file(), |_| {}).await;
    assert_eq!(tier_state(&app).await["state"], "down");
    ok_status(&app, "before@example.com").await;

    redis
        .command(&[
            "ACL", "SETUSER", "late", "on", ">late-pw", "~*", "&*", "+@all",
        ])
        .await;
    wait_for_tier(&app, "up", true).await;
    assert_eq!(ok_status(&app, "after@example.com").await, STORED);
    assert_eq!(entry_keys(&redis).await.len(), 1, "written to Redis");
}

/// Redis going silent without closing the connections (no reset ever arrives): the instance
/// marks the tier down, keeps answering, and comes back up on fresh connections.
#[tokio::test]
async fn connections_that_go_silent_are_replaced() {
    let redis = RedisServer::start().await;
    let proxy = StallingProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    let (sim, partner) = start_partner().await;
    let keys = key_file();
    let url = format!("redis://{}", proxy.addr);
    let a = spawn_instance(&sim, partner, &url, &keys, |_| {}).await;
    let b = spawn_instance(&sim, partner, &redis.url(), &keys, |_| {}).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }

    proxy.stall_existing();
    // Redis does not answer: the lookup times out on it and asks the partner.
    assert_eq!(ok_status(&a, "silent@example.com").await, STORED);
    wait_for_tier(&a, "up", true).await;
    assert_eq!(ok_status(&a, "back@example.com").await, STORED);
    assert!(
        ok_status(&b, "back@example.com")
            .await
            .starts_with("skypostal-proxy-shared; hit"),
        "A writes to Redis again"
    );
    let metrics = metrics_text(&a).await;
    assert!(metrics.contains("skypostal_proxy_shared_tier_transitions_total{state=\"down\"} 1"));
    assert!(metrics.contains("skypostal_proxy_shared_tier_transitions_total{state=\"up\"} 1"));
    // The purge channel was replaced too: a purge on B reaches A's memory.
    assert!(ok_status(&a, "back@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));
    assert_eq!(b.purge("back@example.com", ADMIN_KEY).await.status(), 204);
    let dropped = drops_from_memory(&a, "back@example.com").await;
    assert!(dropped, "A hears purges again");
}

/// The README's ACL line is enough: a pair running as that user caches, shares, purges and
/// books quota without Redis refusing a single command.
#[tokio::test]
async fn the_documented_acl_is_enough() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README is readable");
    let line = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER skypostal-proxy "))
        .expect("the README gives an ACL line");
    let line = line
        .replace("skypostal-proxy:", PREFIX)
        .replace(">CHANGE-ME", ">acl-pw");
    let redis = RedisServer::start().await;
    redis
        .command(&line.split_whitespace().collect::<Vec<_>>())
        .await;
    let (sim, partner) = start_partner().await;
    let keys = key_file();
    let url = redis.url_as("skypostal-proxy", "acl-pw");
    let a = spawn_instance(&sim, partner, &url, &keys, |_| {}).await;
    let b = spawn_instance(&sim, partner, &url, &keys, |_| {}).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }

    assert_eq!(ok_status(&a, "acl@example.com").await, STORED);
    assert!(ok_status(&b, "acl@example.com")
        .await
        .starts_with("skypostal-proxy-shared; hit"));
    assert_eq!(a.purge("acl@example.com", ADMIN_KEY).await.status(), 204);
    let dropped = eventually(Duration::from_secs(5), || async {
        ok_status(&b, "acl@example.com").await == STORED
    })
    .await;
    assert!(dropped, "the purge reached B");
    for app in [&a, &b] {
        let metrics = metrics_text(app).await;
        assert!(
            !metrics.contains("shared_tier_errors_total{"),
            "Redis refused a command: {metrics}"
        );
        // A log that could not be read would make the instance distrust its memory instead.
        assert!(!metrics.contains("catch_ups_total{"), "{metrics}");
        assert!(
            metrics.contains("skypostal_proxy_shared_quota_decisions_total{outcome=\"granted\"}")
        );
    }
}

/// A replica cut off from Redis while another purges, then Redis restarts (losing the purge
/// log): the replica cannot know what it missed, so it serves nothing from memory as fresh.
#[tokio::test]
async fn a_replica_cut_off_while_redis_lost_its_purge_log_trusts_nothing() {
    let mut redis = RedisServer::start().await;
    let proxy = StallingProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    let (sim, partner) = start_partner().await;
    let keys = key_file();
    let url = format!("redis://{}", proxy.addr);
    let a = spawn_instance(&sim, partner, &url, &keys, |_| {}).await;
    let b = spawn_instance(&sim, partner, &redis.url(), &keys, |_| {}).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }
    assert_eq!(ok_status(&a, "cut-off@example.com").await, STORED);
    assert!(ok_status(&a, "cut-off@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));

    proxy.stall_all();
    // Its heartbeat and its channel's ping both notice: down, and unsubscribed.
    wait_for_tier(&a, "down", false).await;
    assert_eq!(
        b.purge("cut-off@example.com", ADMIN_KEY).await.status(),
        204
    );
    redis.stop().await;
    redis.restart().await;
    proxy.resume();
    wait_for_tier(&a, "up", true).await;

    assert_eq!(
        ok_status(&a, "cut-off@example.com").await,
        STORED,
        "the purged answer is not served from memory"
    );
    assert_eq!(sim.calls(), 2);
}

/// A replica that cannot read the purge log (here: no permission) still listens for purges,
/// and distrusts its memory once per gap in listening, not on every attempt.
#[tokio::test]
async fn a_replica_that_cannot_read_the_log_listens_and_distrusts_once() {
    let redis = RedisServer::start().await;
    let (a, b, _sim) = spawn_pair_as(&redis, "blind", &["-xrange", "-xrevrange"]).await;
    for app in [&a, &b] {
        wait_for_tier(app, "up", true).await;
    }
    // Nothing was cached before the first subscription: nothing to distrust.
    assert!(!metrics_text(&a).await.contains("catch_ups_total{"));

    assert_eq!(ok_status(&a, "blind@example.com").await, STORED);
    redis
        .command(&["CLIENT", "KILL", "USER", "blind", "TYPE", "pubsub"])
        .await;
    let distrusted =
        "skypostal_proxy_shared_tier_purge_catch_ups_total{outcome=\"distrusted\"} 1\n";
    let once = eventually(Duration::from_secs(10), || async {
        metrics_text(&a).await.contains(distrusted)
    })
    .await;
    assert!(once, "{}", metrics_text(&a).await);
    wait_for_tier(&a, "up", true).await;
    assert!(
        ok_status(&a, "blind@example.com")
            .await
            .starts_with("skypostal-proxy-shared; hit"),
        "memory is not trusted after the gap"
    );
    // Listening again: B's purge reaches A's memory.
    assert!(ok_status(&a, "blind@example.com")
        .await
        .starts_with("skypostal-proxy; hit"));
    assert_eq!(b.purge("blind@example.com", ADMIN_KEY).await.status(), 204);
    let dropped = eventually(Duration::from_secs(5), || async {
        ok_status(&a, "blind@example.com").await == STORED
    })
    .await;
    assert!(dropped, "A hears purges though it cannot read the log");
    assert!(metrics_text(&a).await.contains(distrusted), "still once");
}

/// A write that reaches Redis after the lookup's store window (here Redis is busy for longer,
/// as a stalled host or a long script would make it) does not land: a purge tombstone could
/// have expired meanwhile.
#[tokio::test]
async fn a_store_that_arrives_past_its_window_does_not_land() {
    let redis = RedisServer::start().await;
    let (sim, partner) = start_partner().await;
    // Store window: deadline + 2 command timeouts = 2.1 s.
    let a = spawn_instance(&sim, partner, &redis.url(), &key_file(), |s| {
        s.upstream.deadline = Duration::from_millis(1_500);
        if let Some(redis) = s.redis.as_mut() {
            redis.command_timeout = Duration::from_millis(300);
        }
    })
    .await;
    wait_for_tier(&a, "up", true).await;
    // Loads the store script and measures Redis's clock.
    assert_eq!(ok_status(&a, "warm@example.com").await, STORED);

    // Once the lookup is at the partner (for 1 s), Redis stops serving anyone for 3.5 s.
    sim.set_fault(Some("held@example.com"), Fault::Slow { ms: 1_000 });
    let patient = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .expect("redis connects");
    let busy = async {
        let called = eventually(Duration::from_secs(5), || async { sim.calls() == 2 }).await;
        assert!(called, "the lookup reached the partner");
        let script = "local function now() local t = redis.call('TIME') \
                      return t[1] * 1000000 + t[2] end \
                      local stop = now() + 3500000 while now() < stop do end return 1";
        let _: i64 = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .query_async(&mut conn)
            .await
            .expect("busy script");
    };
    let (status, ()) = tokio::join!(ok_status(&a, "held@example.com"), busy);
    assert_eq!(status, STORED);
    // The held store was waiting in Redis's input; it has run once a round trip is answered.
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("ping");

    assert_eq!(
        entry_keys(&redis).await.len(),
        1,
        "only the warm-up entry: the late store was refused on Redis's clock"
    );
}

/// A purge Redis refuses for a while (a fail-over makes it read-only) is kept and replayed
/// once Redis accepts writes again, not dropped.
#[tokio::test]
async fn a_purge_refused_during_a_fail_over_is_replayed() {
    let redis = RedisServer::start().await;
    let (a, b, sim) = spawn_pair(&redis, |_| {}).await;
    ok_status(&a, "failover@example.com").await;
    assert!(ok_status(&b, "failover@example.com")
        .await
        .starts_with("skypostal-proxy-shared; hit"));
    assert_eq!(sim.calls(), 1);

    // A replica of a primary that is not there: read-only, data kept.
    redis.command(&["REPLICAOF", "127.0.0.1", "1"]).await;
    assert_eq!(
        a.purge("failover@example.com", ADMIN_KEY).await.status(),
        204
    );
    // Refused when made, and again when replayed.
    let refused_twice = eventually(Duration::from_secs(5), || async {
        counter(
            &metrics_text(&a).await,
            "skypostal_proxy_shared_tier_errors_total{operation=\"purge\"}",
        ) >= 2
    })
    .await;
    assert!(refused_twice, "{}", metrics_text(&a).await);
    redis.command(&["REPLICAOF", "NO", "ONE"]).await;

    let gone = eventually(Duration::from_secs(5), || async {
        entry_keys(&redis).await.is_empty()
    })
    .await;
    assert!(gone, "the purge reached Redis once it took writes");
    let b_dropped = eventually(Duration::from_secs(5), || async {
        ok_status(&b, "failover@example.com").await == STORED
    })
    .await;
    assert!(b_dropped, "and B heard of it");
}
