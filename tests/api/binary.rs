//! The built binary in a child process: signals, subcommands, environment configuration.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use skypostal_proxy::auth::key_sha256_hex;
use skypostal_proxy::simulator::{Fault, Simulator, PARTNER_PATH};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{eventually, spawn_app, APP_KEY, KEY, USER_CODE};

const BIN: &str = env!("CARGO_BIN_EXE_skypostal-proxy");

/// Writes a configuration file unique to this test process and call.
fn config_file(contents: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "skypostal-proxy-test-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, contents).expect("config file is written");
    path
}

/// A config for the binary: loopback port 0, JSON logs, one client, the simulator as partner.
pub fn binary_config(partner: SocketAddr, extra_server: &str) -> PathBuf {
    config_file(&config_text(partner, extra_server, KEY))
}

/// The text of [`binary_config`], with one client holding `key`.
fn config_text(partner: SocketAddr, extra_server: &str, key: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{extra_server}

[upstream]
base_url = "http://{partner}"
path = "{PARTNER_PATH}"

[log]
format = "json"
level = "info"

[[clients]]
name = "regular"
key_sha256 = "{}"
"#,
        key_sha256_hex(key)
    )
}

/// A child process of the binary, with everything it wrote to standard error so far.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

/// Starts `serve` and reads its JSON log until the listening address appears; keeps collecting
/// standard error afterwards.
pub async fn spawn_serve(config: &PathBuf, env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.expect("stderr is readable") {
            stderr.lock().unwrap().push_str(&format!("{line}\n"));
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(listen) = event["listen"].as_str() {
                return listen.parse::<SocketAddr>().expect("listen is an address");
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within 10 s");
    // Keep reading so the child never blocks on a full pipe.
    let sink = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    Served {
        child,
        addr,
        stderr,
    }
}

pub async fn start_simulator(app_key: &str) -> (Simulator, SocketAddr) {
    let sim = Simulator::new(USER_CODE, app_key);
    let addr = sim
        .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap();
    (sim, addr)
}

pub fn sigterm(child: &Child) {
    signal(child, "-TERM");
}

fn signal(child: &Child, which: &str) {
    let pid = child.id().expect("child is running");
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// SIGTERM: readiness turns 503 during the drain delay, the in-flight request finishes, exit 0.
#[tokio::test]
async fn sigterm_drains_and_lets_an_in_flight_request_finish() {
    let (sim, partner) = start_simulator(APP_KEY).await;
    sim.set_fault(Some("slow@example.com"), Fault::Slow { ms: 1_500 });
    let config = binary_config(partner, "drain_delay_s = 1\nshutdown_grace_s = 10");
    let Served {
        mut child, addr, ..
    } = spawn_serve(&config, &[]).await;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/customers/slow%40example.com/credentials");
    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get(url).header("x-api-key", KEY).send().await }
    });
    assert!(eventually(Duration::from_secs(5), || async { sim.calls() == 1 }).await);

    sigterm(&child);

    let draining = eventually(Duration::from_secs(2), || async {
        http.get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(draining, "readiness turns 503 while draining");
    let response = in_flight
        .await
        .unwrap()
        .expect("in-flight request is answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["customer_email"], "slow@example.com");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A request still running when the grace period ends is cut off, and the exit code says so.
#[tokio::test]
async fn sigterm_with_a_request_outliving_the_grace_period_exits_non_zero() {
    let (sim, partner) = start_simulator(APP_KEY).await;
    sim.set_fault(None, Fault::Slow { ms: 8_000 });
    let config = binary_config(partner, "shutdown_grace_s = 1");
    let Served {
        mut child, addr, ..
    } = spawn_serve(&config, &[]).await;
    let in_flight = tokio::spawn(
        reqwest::Client::new()
            .get(format!(
                "http://{addr}/customers/late%40example.com/credentials"
            ))
            .header("x-api-key", KEY)
            .send(),
    );
    assert!(eventually(Duration::from_secs(5), || async { sim.calls() == 1 }).await);

    sigterm(&child);

    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(in_flight.await.unwrap().is_err(), "the request was cut off");
}

/// Environment variables override the file; a string key keeps its leading zeros.
#[tokio::test]
async fn environment_overrides_keep_numeric_looking_secrets_as_strings() {
    let (sim, partner) = start_simulator("000123").await;
    let config = binary_config(partner, "");
    let Served {
        addr,
        child: _child,
        ..
    } = spawn_serve(
        &config,
        &[
            ("SKYPOSTAL_PROXY__UPSTREAM__APP_KEY", "000123"),
            ("SKYPOSTAL_PROXY__UPSTREAM__TIMEOUT_MS", "1500"),
        ],
    )
    .await;

    let response = reqwest::Client::new()
        .get(format!(
            "http://{addr}/customers/env%40example.com/credentials"
        ))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();

    assert_eq!(
        response.status(),
        200,
        "the partner accepted app_key 000123"
    );
    assert_eq!(
        sim.recorded()[0].body.as_ref().unwrap()["app_key"],
        "000123"
    );
}

/// `check-config` prints the effective configuration with every secret redacted.
#[tokio::test]
async fn check_config_prints_the_effective_config_redacted() {
    let config = binary_config(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)), "");

    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .env("SKYPOSTAL_PROXY__UPSTREAM__APP_KEY", "super-secret-app-key")
        .env("SKYPOSTAL_PROXY__CACHE__TTL_S", "42")
        .output()
        .await
        .unwrap();

    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(!stdout.contains("super-secret-app-key"), "{stdout}");
    assert!(stdout.contains("app_key = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("ttl_s = 42"), "{stdout}");
    assert!(stdout.contains(&key_sha256_hex(KEY)), "{stdout}");
}

/// An invalid value stops start-up with a message naming the key and a non-zero exit.
#[tokio::test]
async fn invalid_configuration_is_refused_naming_the_key() {
    let config = binary_config(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)), "");
    for (var, value, key) in [
        (
            "SKYPOSTAL_PROXY__UPSTREAM__TIMEOUT_MS",
            "0",
            "upstream.timeout_ms",
        ),
        (
            "SKYPOSTAL_PROXY__UPSTREAM__TIMEOUT_MS",
            "soon",
            "upstream.timeout_ms",
        ),
        (
            "SKYPOSTAL_PROXY__SERVER__LISTEN",
            "localhost",
            "server.listen",
        ),
        (
            "SKYPOSTAL_PROXY__UPSTREAM__ENVIRONMENT",
            "staging",
            "upstream.environment",
        ),
        (
            "SKYPOSTAL_PROXY__UPSTREAM__APP_KEY_FILE",
            "/nonexistent/key",
            "upstream.app_key_file",
        ),
    ] {
        let output = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env(var, value)
            .output()
            .await
            .unwrap();

        assert_eq!(output.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
    }
}

/// `demo` prints a key and a curl line that returns the documented record, offline.
#[tokio::test]
async fn demo_prints_a_working_curl_line() {
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("SKYPOSTAL_PROXY__SERVER__LISTEN", "127.0.0.1:0")
        .env_remove("SKYPOSTAL_PROXY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let curl = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line
                .trim_start()
                .starts_with("curl -s -H 'Authorization: Bearer ")
            {
                return line;
            }
        }
        panic!("no curl line");
    })
    .await
    .expect("the banner appears");

    let key = curl
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    let url = curl.rsplit(' ').next().unwrap();
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["customer_email"], "johndoe@email.com");
    assert_eq!(body["customer_box_id"], 811111);
}

/// `keygen` prints a 256-bit URL-safe key and the matching `[[clients]]` entry.
#[tokio::test]
async fn keygen_prints_a_key_and_its_client_entry() {
    let output = Command::new(BIN)
        .args(["keygen", "--name", "billing"])
        .output()
        .await
        .unwrap();

    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# key: "))
        .expect("a key line");
    assert!(key.len() >= 43, "{key}");
    assert!(stdout.contains("name = \"billing\""));
    assert!(stdout.contains(&format!("key_sha256 = \"{}\"", key_sha256_hex(key))));
}

/// `healthcheck` exits 0 against a serving instance and non-zero when nothing answers.
#[tokio::test]
async fn healthcheck_reflects_whether_the_service_answers() {
    let app = spawn_app().await;
    let closed = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap()
        .local_addr()
        .unwrap();

    let up = Command::new(BIN)
        .args(["healthcheck", "--url", &format!("{}/healthz", app.base)])
        .output()
        .await
        .unwrap();
    let down = Command::new(BIN)
        .args(["healthcheck", "--url", &format!("http://{closed}/healthz")])
        .output()
        .await
        .unwrap();

    assert!(up.status.success());
    assert!(!down.status.success());
}

/// `check-upstream` reports the mapped outcome; exit 0 when the partner accepts the credentials,
/// 3 when it refuses them; never prints the customer key or the raw e-mail.
#[tokio::test]
async fn check_upstream_reports_the_outcome_by_exit_code() {
    let (_sim, partner) = start_simulator(APP_KEY).await;
    let config = binary_config(partner, "");
    let run = |app_key: &'static str| {
        Command::new(BIN)
            .args(["check-upstream", "--email", "JohnDoe@email.com", "--config"])
            .arg(&config)
            .env("SKYPOSTAL_PROXY__UPSTREAM__APP_KEY", app_key)
            .output()
    };

    let good = run(APP_KEY).await.unwrap();
    let refused = run("wrong-app-key").await.unwrap();

    let stdout = String::from_utf8(good.stdout).unwrap();
    assert_eq!(good.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("outcome: found"), "{stdout}");
    assert!(stdout.contains("j***@email.com"), "{stdout}");
    assert!(
        !stdout.contains("johndoe@email.com") && !stdout.contains("YpbCNpzqxYqVWv"),
        "{stdout}"
    );
    let stdout = String::from_utf8(refused.stdout).unwrap();
    assert_eq!(refused.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("error_code=13001"), "{stdout}");
    assert!(!stdout.contains("wrong-app-key"), "{stdout}");
}

/// SIGHUP swaps in the file's new keys (the new one admitted, the removed one refused) without
/// failing an in-flight request; a broken file is refused and the keys in force stay.
#[tokio::test]
async fn sighup_rotates_keys_and_a_broken_file_keeps_the_old_ones() {
    const NEW_KEY: &str = "rotated-key-0123456789abcdef";
    let (sim, partner) = start_simulator(APP_KEY).await;
    sim.set_fault(Some("slow@example.com"), Fault::Slow { ms: 800 });
    let config = binary_config(partner, "");
    let Served {
        child,
        addr,
        stderr,
    } = spawn_serve(&config, &[]).await;
    let http = reqwest::Client::new();
    let get = |key: &'static str, email: &'static str| {
        http.get(format!("http://{addr}/customers/{email}/credentials"))
            .header("x-api-key", key)
            .send()
    };
    let in_flight = tokio::spawn(get(KEY, "slow%40example.com"));
    assert!(eventually(Duration::from_secs(5), || async { sim.calls() == 1 }).await);

    std::fs::write(&config, config_text(partner, "", NEW_KEY)).unwrap();
    signal(&child, "-HUP");

    let rotated = eventually(Duration::from_secs(5), || async {
        get(NEW_KEY, "a%40example.com")
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(rotated, "the new key is admitted");
    assert_eq!(get(KEY, "a%40example.com").await.unwrap().status(), 401);
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);

    std::fs::write(&config, "[[clients]]\nname = \"broken\"\n").unwrap();
    signal(&child, "-HUP");

    let refused = eventually(Duration::from_secs(5), || async {
        stderr.lock().unwrap().contains("new configuration refused")
    })
    .await;
    assert!(refused, "the broken file is refused with a log line");
    assert_eq!(get(NEW_KEY, "b%40example.com").await.unwrap().status(), 200);
    assert_eq!(get(KEY, "b%40example.com").await.unwrap().status(), 401);
}

/// SIGHUP re-reads `upstream.app_key_file`: a rotated partner key is used for the next lookups.
#[tokio::test]
async fn sighup_rereads_the_partner_app_key_file() {
    let (_sim, partner) = start_simulator(APP_KEY).await;
    let key_file = config_file("stale-partner-key\n");
    let config = binary_config(partner, "");
    let Served { child, addr, .. } = spawn_serve(
        &config,
        &[(
            "SKYPOSTAL_PROXY__UPSTREAM__APP_KEY_FILE",
            key_file.to_str().unwrap(),
        )],
    )
    .await;
    let http = reqwest::Client::new();
    let lookup = |n: u32| {
        http.get(format!(
            "http://{addr}/customers/key{n}%40example.com/credentials"
        ))
        .header("x-api-key", KEY)
        .send()
    };
    assert_eq!(
        lookup(0).await.unwrap().status(),
        502,
        "the partner refuses the old key"
    );

    std::fs::write(&key_file, format!("{APP_KEY}\n")).unwrap();
    signal(&child, "-HUP");

    let mut n = 0;
    let rotated = eventually(Duration::from_secs(5), || {
        n += 1;
        let response = lookup(n);
        async move { response.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    assert!(rotated, "the new partner key is used after SIGHUP");
}
