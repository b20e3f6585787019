//! Test harness: the real application on an ephemeral port, talking HTTP to the partner simulator
//! on another one.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use skypostal_proxy::auth::key_sha256_hex;
use skypostal_proxy::cache::Clock;
use skypostal_proxy::config::Settings;
use skypostal_proxy::simulator::{Simulator, PARTNER_PATH};
use skypostal_proxy::startup::Application;
use tokio::sync::oneshot;

/// A regular client's key.
pub const KEY: &str = "test-key-regular-0123456789";
/// An admin client's key.
pub const ADMIN_KEY: &str = "test-key-admin-0123456789";
/// The partner credentials the simulator expects.
pub const USER_CODE: u64 = 396;
pub const APP_KEY: &str = "1656d700707ad9a77f737e5df3db088a";

/// A running application and its simulated partner.
pub struct TestApp {
    pub base: String,
    /// The admin listener's base URL, when one is configured.
    pub admin_base: Option<String>,
    pub sim: Simulator,
    pub clock: Clock,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), skypostal_proxy::startup::StartupError>>>,
}

/// The settings every test starts from: loopback, the simulator as partner, two clients.
pub fn test_settings(partner: SocketAddr) -> Settings {
    test_settings_with(partner, "")
}

/// [`test_settings`] with more TOML appended (whole sections only).
pub fn test_settings_with(partner: SocketAddr, extra: &str) -> Settings {
    let mut layer = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_s = 5

[upstream]
base_url = "http://{partner}"
path = "{PARTNER_PATH}"
timeout_ms = 2000
connect_timeout_ms = 500
max_retries = 2
# Tests that need the circuit breaker set it low themselves.
circuit_failures = 1000
circuit_min_calls = 100000

[rate_limit]
default_per_s = 100000
default_burst = 100000

[[clients]]
name = "regular"
key_sha256 = "{}"

[[clients]]
name = "admin"
key_sha256 = "{}"
admin = true
"#,
        key_sha256_hex(KEY),
        key_sha256_hex(ADMIN_KEY)
    );
    layer.push_str(extra);
    Settings::load(None, Some(&layer)).expect("test settings are valid")
}

/// Starts the simulator and the application with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the simulator and the application, letting the test adjust the settings first.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let (sim, sim_addr) = start_partner().await;
    let mut settings = test_settings(sim_addr);
    adjust(&mut settings);
    spawn_app_on(sim, &settings).await
}

/// Starts a partner simulator on an ephemeral port.
pub async fn start_partner() -> (Simulator, SocketAddr) {
    let sim = Simulator::new(USER_CODE, APP_KEY);
    let sim_addr = sim
        .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("simulator binds");
    (sim, sim_addr)
}

/// Starts the application with these settings, in front of an already running simulator
/// (several instances may share one).
pub async fn spawn_app_on(sim: Simulator, settings: &Settings) -> TestApp {
    let clock = Clock::manual();
    let app = Application::build_with_clock(settings, clock.clone())
        .await
        .expect("application builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let admin_base = app.admin_addr().map(|a| format!("http://{a}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        admin_base,
        sim,
        clock,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client builds"),
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    /// `GET /customers/{email}/credentials` with the regular key; `email` goes into the path as given.
    pub async fn get_credentials(&self, email: &str) -> reqwest::Response {
        self.get_credentials_with(email, &[("x-api-key", KEY)])
            .await
    }

    /// `GET /customers/{email}/credentials` with the given headers.
    pub async fn get_credentials_with(
        &self,
        email: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .get(format!("{}/customers/{email}/credentials", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request is answered")
    }

    /// `DELETE /customers/{email}/credentials` with the given key.
    pub async fn purge(&self, email: &str, key: &str) -> reqwest::Response {
        self.http
            .delete(format!("{}/customers/{email}/credentials", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request is answered")
    }

    /// `GET {path}` without credentials.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request is answered")
    }

    /// Stops the application and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("clean shutdown");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A response's header as text ("" when absent).
pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Asserts a problem+json answer of this status and type suffix, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        header(&response, "content-type"),
        "application/problem+json"
    );
    assert_eq!(header(&response, "cache-control"), "no-store");
    let request_id = header(&response, "x-request-id");
    let body: Value = response.json().await.expect("problem body is JSON");
    assert!(
        body["type"].as_str().is_some_and(|t| t.ends_with(kind)),
        "type {body}"
    );
    assert_eq!(body["status"], status);
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert_eq!(body["request_id"], request_id.as_str());
    body
}

/// Waits until `condition` holds, checking every 10 ms, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
