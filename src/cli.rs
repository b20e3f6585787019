//! The command line: `serve` (the default), `demo`, `mock-upstream`, `keygen`, `check-config`,
//! `healthcheck`, `check-upstream`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::{generate_key, key_sha256_hex};
use crate::config::{
    parse_sha256_hex, ClientSettings, Settings, GENERIC_TEST_APP_KEY, GENERIC_TEST_USER_CODE,
};
use crate::simulator::{Simulator, DOCUMENTED_EMAIL, PARTNER_PATH};
use crate::startup::{shutdown_signal, Application};
use crate::telemetry;

/// Exit code for a configuration that was refused.
const EXIT_CONFIG: u8 = 2;

/// Looks Skypostal customers' credentials up by e-mail, holding the partner secrets.
#[derive(Debug, Parser)]
#[command(name = "skypostal-proxy", version, about)]
pub struct Cli {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(
        long,
        global = true,
        env = "SKYPOSTAL_PROXY_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Run the service against a built-in partner simulator, offline, with a printed demo key.
    Demo,
    /// Run the partner simulator alone.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        /// Partner user_code the simulator accepts.
        #[arg(long, default_value_t = GENERIC_TEST_USER_CODE)]
        user_code: u64,
        /// Partner app_key the simulator accepts.
        #[arg(long, env = "SKYPOSTAL_MOCK_APP_KEY", default_value = GENERIC_TEST_APP_KEY, hide_default_value = true)]
        app_key: String,
    },
    /// Print a new caller key and its `[[clients]]` entry.
    Keygen {
        /// The client's name.
        #[arg(long)]
        name: String,
        /// Allow the client to purge cached answers.
        #[arg(long)]
        admin: bool,
    },
    /// Validate the configuration and print it, secrets redacted.
    CheckConfig,
    /// Make one real partner lookup with the configured credentials and print the outcome.
    ///
    /// Exit 0 when the partner answered and accepted the credentials (found or not found),
    /// 3 when it refused them, 1 on any other failure, 2 on invalid configuration.
    CheckUpstream {
        /// The customer e-mail to look up.
        #[arg(long)]
        email: String,
    },
    /// Exit 0 if the running service answers `/healthz` (for container health checks).
    Healthcheck {
        /// URL to probe instead of the configured listener's `/healthz`.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let file = cli.config.clone();
            with_settings(cli.config, None, |s| runtime(serve(s, file)))
        }
        Command::Demo => {
            let demo_key = generate_key();
            let layer = demo_layer(&demo_key);
            with_settings(cli.config, Some(&layer), |s| runtime(demo(s, demo_key)))
        }
        Command::MockUpstream {
            listen,
            user_code,
            app_key,
        } => runtime(mock_upstream(listen, user_code, app_key)),
        Command::Keygen { name, admin } => keygen(&name, admin),
        Command::CheckUpstream { email } => {
            with_settings(cli.config, None, |s| runtime(check_upstream(s, email)))
        }
        Command::CheckConfig => with_settings(cli.config, None, |s| {
            print!("{}", s.to_redacted_toml());
            eprintln!("configuration is valid");
            ExitCode::SUCCESS
        }),
        Command::Healthcheck { url: Some(url) } => runtime(healthcheck(url)),
        Command::Healthcheck { url: None } => with_settings(cli.config, None, |s| {
            runtime(healthcheck(format!(
                "http://{}/healthz",
                probe_addr(s.server.listen)
            )))
        }),
    }
}

fn with_settings(
    file: Option<PathBuf>,
    extra: Option<&str>,
    run: impl FnOnce(Settings) -> ExitCode,
) -> ExitCode {
    match Settings::load(file.as_deref(), extra) {
        Ok(settings) => run(settings),
        Err(e) => {
            eprintln!("skypostal-proxy: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// A multi-thread runtime, or a current-thread one when the process may use a single CPU
/// (affinity or cgroup quota): a work-stealing scheduler with one worker only adds overhead.
fn runtime(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let single_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if single_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("skypostal-proxy: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings, file: Option<PathBuf>) -> ExitCode {
    telemetry::init(&settings.log);
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("skypostal-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        listen = %app.local_addr(),
        admin_listen = ?app.admin_addr(),
        environment = ?settings.upstream.environment,
        partner = %settings.upstream.base_url,
        clients = settings.clients.len(),
        "skypostal-proxy is serving"
    );
    reload_on_sighup(app.state().clone(), file);
    finish(app.run_until_stopped(shutdown_signal()).await)
}

/// On SIGHUP, re-reads the configuration and swaps in its callers and partner app key. A file
/// that does not validate is refused with a log line, and the previous set stays in force.
fn reload_on_sighup(state: crate::startup::AppState, file: Option<PathBuf>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: key rotation needs a restart");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading callers and the partner app key");
            match Settings::load(file.as_deref(), None) {
                Ok(settings) => state.reload(&settings),
                Err(e) => tracing::error!(
                    error = %e,
                    "new configuration refused: the previous callers and app key stay in force"
                ),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (state, file);
}

fn finish(result: Result<(), crate::startup::StartupError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

// === demo ===

/// The demo's defaults, above the built-in ones and below the user's file and environment:
/// a loopback listener and one admin client holding the printed key.
fn demo_layer(key: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n\
         [[clients]]\nname = \"demo\"\nkey_sha256 = \"{}\"\nadmin = true\n",
        key_sha256_hex(key)
    )
}

async fn demo(mut settings: Settings, key: String) -> ExitCode {
    telemetry::init(&settings.log);
    let simulator = Simulator::new(GENERIC_TEST_USER_CODE, GENERIC_TEST_APP_KEY);
    let sim_addr = match simulator
        .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
    {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("skypostal-proxy: cannot start the partner simulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The demo never reaches the real partner, whatever the configuration says.
    let upstream = &mut settings.upstream;
    upstream.base_url = format!("http://{sim_addr}");
    upstream.path = PARTNER_PATH.to_owned();
    upstream.user_code = GENERIC_TEST_USER_CODE;
    upstream.app_key = GENERIC_TEST_APP_KEY.to_owned().into();
    upstream.app_key_file = None;
    // A configuration file may have replaced the clients: the printed key must still work.
    if let Some(digest) = parse_sha256_hex(&key_sha256_hex(&key)) {
        if !settings.clients.iter().any(|c| c.key_sha256 == digest) {
            settings.clients.push(ClientSettings {
                name: "demo".to_owned(),
                key_sha256: digest,
                rate_per_s: settings.rate_limit.default_per_s,
                burst: settings.rate_limit.default_burst,
                admin: true,
            });
        }
    }

    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("skypostal-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = format!("http://{}", probe_addr(app.local_addr()));
    let email = DOCUMENTED_EMAIL.replace('@', "%40");
    println!(
        "skypostal-proxy demo: serving on {base}, partner simulator on http://{sim_addr} (offline)\n\
         demo key (admin, valid until this process stops): {key}\n\n\
         Try it:\n  \
         curl -s -H 'Authorization: Bearer {key}' {base}/customers/{email}/credentials\n  \
         curl -s -i -H 'X-Api-Key: {key}' {base}/customers/notfound@example.com/credentials\n\n\
         Stop with Ctrl-C."
    );
    finish(app.run_until_stopped(shutdown_signal()).await)
}

async fn mock_upstream(listen: SocketAddr, user_code: u64, app_key: String) -> ExitCode {
    telemetry::init(&crate::config::LogSettings {
        format: crate::config::LogFormat::Pretty,
        level: "info".to_owned(),
    });
    let simulator = Simulator::new(user_code, app_key);
    match simulator.spawn(listen).await {
        Ok(addr) => {
            println!("partner simulator listening on http://{addr}{PARTNER_PATH}");
            shutdown_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("skypostal-proxy: cannot listen on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

// === check-upstream ===

/// Exit code of `check-upstream` when the partner refuses our credentials.
const EXIT_CREDENTIALS_REFUSED: u8 = 3;

async fn check_upstream(settings: Settings, email: String) -> ExitCode {
    use crate::domain::CustomerEmail;
    use crate::partner::{PartnerAnswer, PartnerError, SkypostalClient};

    let email = match CustomerEmail::parse(&email) {
        Ok(email) => email,
        Err(e) => {
            eprintln!("check-upstream: --email: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let upstream = &settings.upstream;
    println!(
        "partner: {} ({:?}), user_code {}, app_key from {}",
        upstream.endpoint(),
        upstream.environment,
        upstream.user_code,
        upstream
            .app_key_file
            .as_ref()
            .map_or("upstream.app_key".to_owned(), |p| p.display().to_string())
    );
    println!("looking up {email} (deadline {:?})", upstream.deadline);
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let client = match SkypostalClient::new(upstream, crate::clock::Clock::system(), metrics, None)
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("check-upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let outcome = client.lookup(&email).await;
    let elapsed = started.elapsed();
    match outcome {
        Ok(PartnerAnswer::Found(c)) => {
            println!(
                "outcome: found (customer_box_id {}, customer_key [redacted]) in {elapsed:?}\n\
                 credentials and connectivity are good",
                c.customer_box_id
            );
            ExitCode::SUCCESS
        }
        Ok(PartnerAnswer::NotFound { fields }) => {
            println!("outcome: customer not found in {elapsed:?}");
            if let Some(fields) = fields {
                println!("partner error fields: {fields}");
            }
            println!("credentials and connectivity are good (the partner answered)");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("outcome: {error} (after {elapsed:?})");
            if let Some(fields) = error.fields() {
                println!("partner error fields: {fields}");
            }
            if matches!(error, PartnerError::AccessDenied { .. }) {
                println!("the partner refused upstream.user_code / upstream.app_key");
                ExitCode::from(EXIT_CREDENTIALS_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

// === keygen, healthcheck ===

fn keygen(name: &str, admin: bool) -> ExitCode {
    let key = generate_key();
    println!(
        "# Give this key to the client \"{name}\"; it is shown only once and is not stored anywhere.\n\
         # key: {key}\n\n\
         [[clients]]\nname = \"{name}\"\nkey_sha256 = \"{}\"{}",
        key_sha256_hex(&key),
        if admin { "\nadmin = true" } else { "" }
    );
    ExitCode::SUCCESS
}

/// Where a local probe reaches a listener: an unspecified address is reached on loopback.
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}

async fn healthcheck(url: String) -> ExitCode {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("healthcheck: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}
