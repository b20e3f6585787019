//! A bounded soak: many concurrent clients mixing hits, misses and partner faults for a few
//! seconds on loopback. Every answer must be a correct record or a well-formed problem.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use skypostal_proxy::simulator::Fault;

use crate::helpers::{spawn_app_with, KEY};

const WORKERS: usize = 32;
const RUN_FOR: Duration = Duration::from_secs(3);
const MAX_REQUESTS_PER_WORKER: usize = 2_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Mixed traffic with faults: no 500, no malformed answer, memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_with_faults_gets_only_records_and_well_formed_problems() {
    let app = spawn_app_with(|s| {
        s.upstream.max_retries = 1;
        s.upstream.timeout = Duration::from_millis(200);
        s.upstream.deadline = Duration::from_millis(400);
        s.cache.max_entries = 500;
        s.upstream.max_rps = 100_000;
        s.upstream.max_concurrency = 64;
    })
    .await;
    let faults = [
        Fault::Slow { ms: 50 },
        Fault::Slow { ms: 1_000 },
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        Fault::Status {
            status: 504,
            retry_after: None,
        },
        Fault::Garbage,
        Fault::Reset,
        Fault::Oversized { bytes: 100_000 },
        Fault::SystemError,
        Fault::Ambiguous,
        Fault::Empty,
    ];
    for (i, fault) in faults.iter().enumerate() {
        app.sim
            .set_fault(Some(&format!("fault{i}@example.com")), fault.clone());
    }
    let rss_before = rss_kib();
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let started = Instant::now();

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let http = app.http.clone();
        let base = app.base.clone();
        let counts = counts.clone();
        workers.spawn(async move {
            for _ in 0..MAX_REQUESTS_PER_WORKER {
                if started.elapsed() > RUN_FOR {
                    break;
                }
                let (email, no_cache) = {
                    let mut rng = rand::rng();
                    let email = match rng.random_range(0..10) {
                        0..=4 => format!("hot{}@example.com", rng.random_range(0..20)),
                        5..=6 => format!("cold{}@example.com", rng.random_range(0..100_000)),
                        7 => format!("notfound{}@example.com", rng.random_range(0..50)),
                        _ => format!("fault{}@example.com", rng.random_range(0..10)),
                    };
                    (email, rng.random_bool(0.05))
                };
                let mut request = http
                    .get(format!(
                        "{base}/customers/{}/credentials",
                        email.replace('@', "%40")
                    ))
                    .header("x-api-key", KEY);
                if no_cache {
                    request = request.header("cache-control", "no-cache");
                }
                let response = request.send().await.expect("every request is answered");
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body: Value = response.json().await.expect("every body is JSON");
                let bucket = match status {
                    200 => {
                        assert_eq!(content_type, "application/json");
                        assert_eq!(body["customer_email"], email.as_str(), "{body}");
                        assert!(body["customer_key"].is_string(), "{body}");
                        0
                    }
                    404 | 502 | 503 | 504 => {
                        assert_eq!(content_type, "application/problem+json");
                        assert_eq!(body["status"], status, "{body}");
                        assert!(body["type"].is_string() && body["request_id"].is_string());
                        match status {
                            404 => 1,
                            502 => 2,
                            503 => 3,
                            _ => 4,
                        }
                    }
                    other => panic!("unexpected status {other}: {body}"),
                };
                counts[bucket].fetch_add(1, Ordering::Relaxed);
                counts[5].fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.expect("no worker failed an assertion");
    }
    let rss_growth_kib = rss_kib().saturating_sub(rss_before);

    let [ok, not_found, bad_gateway, unavailable, timeout, total] =
        counts.each_ref().map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "soak: {total} requests in {:?}: {ok} ok, {not_found} not found, {bad_gateway} 502, \
         {unavailable} 503, {timeout} 504; {} partner calls; RSS +{rss_growth_kib} KiB",
        started.elapsed(),
        app.sim.calls()
    );
    assert!(total > 500, "the soak ran: {total}");
    assert!(
        ok > 0 && not_found > 0 && bad_gateway > 0,
        "the mix was mixed"
    );
    assert!(
        rss_growth_kib < 100 * 1024,
        "memory stays bounded: +{rss_growth_kib} KiB"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
}
