//! Configuration: the layered sources, the typed [`Settings`], validation and secret handling.
//!
//! Layers, lowest first: the compiled-in `config/default.toml`, an optional extra layer (the
//! `demo` subcommand's loopback defaults), the file given with `--config` (or
//! `SKYPOSTAL_PROXY_CONFIG`), then `SKYPOSTAL_PROXY__SECTION__KEY` environment variables.
//!
//! Environment values are never guessed into numbers (`try_parsing` stays off): serde parses the
//! keys that are numbers, and a string key such as `upstream.app_key` keeps its leading zeros.
//!
//! Validation turns the raw document into [`Settings`], in which every value has been checked;
//! an invalid value stops start-up with a [`ConfigError`] naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The compiled-in defaults.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SKYPOSTAL_PROXY";

/// The partner's public generic test credentials (Skypostal documentation). Fine for `test`,
/// refused for `prod`.
pub const GENERIC_TEST_USER_CODE: u64 = 396;
/// See [`GENERIC_TEST_USER_CODE`].
pub const GENERIC_TEST_APP_KEY: &str = "1656d700707ad9a77f737e5df3db088a";

const TEST_BASE_URL: &str = "https://api-box-test.skypostal.com";
const PROD_BASE_URL: &str = "https://api-box.skypostal.com";

/// Why the configuration was refused. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or parsed (bad TOML, wrong type, unknown key).
    #[error("configuration could not be loaded: {0}")]
    Load(String),
    /// A value was read but is not acceptable.
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid {
        /// The dotted key, e.g. `upstream.timeout_ms`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

// === raw document ===

/// The configuration document as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: RawServer,
    upstream: RawUpstream,
    cache: CacheSettings,
    auth: AuthSettings,
    rate_limit: RateLimitSettings,
    #[serde(default)]
    clients: Vec<RawClient>,
    log: LogSettings,
    redis: Option<RawRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    admin_listen: Option<String>,
    shutdown_grace_s: u64,
    drain_delay_s: u64,
    request_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    environment: String,
    base_url: Option<String>,
    path: String,
    user_code: u64,
    app_key: Option<SecretString>,
    app_key_file: Option<PathBuf>,
    connect_timeout_ms: u64,
    timeout_ms: u64,
    deadline_ms: Option<u64>,
    max_retries: u32,
    max_concurrency: usize,
    max_rps: u32,
    max_response_bytes: usize,
    retry_after_cap_s: u64,
    circuit_failures: u32,
    circuit_failure_ratio: f64,
    circuit_min_calls: u32,
    circuit_window_s: u64,
    circuit_cooldown_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<SecretString>,
    #[serde(default)]
    tls: bool,
    #[serde(default = "default_key_prefix")]
    key_prefix: String,
    encryption_key_file: Option<PathBuf>,
    #[serde(default = "default_redis_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_redis_command_timeout_ms")]
    command_timeout_ms: u64,
    #[serde(default = "default_redis_pool_size")]
    pool_size: usize,
    #[serde(default = "default_redis_recovery_interval_ms")]
    recovery_interval_ms: u64,
}

fn default_key_prefix() -> String {
    "skypostal-proxy:".to_owned()
}
fn default_redis_connect_timeout_ms() -> u64 {
    500
}
fn default_redis_command_timeout_ms() -> u64 {
    100
}
fn default_redis_pool_size() -> usize {
    2
}
fn default_redis_recovery_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    key_sha256: String,
    rate_per_s: Option<u32>,
    burst: Option<u32>,
    #[serde(default)]
    admin: bool,
}

// === validated settings ===

/// The validated configuration of one service instance.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Listeners and shutdown.
    pub server: ServerSettings,
    /// The Skypostal partner API.
    pub upstream: UpstreamSettings,
    /// The in-memory credentials cache.
    pub cache: CacheSettings,
    /// Caller authentication policy.
    pub auth: AuthSettings,
    /// Per-client rate limit defaults.
    pub rate_limit: RateLimitSettings,
    /// The callers allowed to use the service.
    pub clients: Vec<ClientSettings>,
    /// Log output.
    pub log: LogSettings,
    /// The shared Redis tier, when configured.
    pub redis: Option<RedisSettings>,
}

/// `[redis]`: the optional cache tier and partner quota shared by all replicas.
#[derive(Debug, Clone, Serialize)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL; may hold a password, so it is a secret.
    #[serde(serialize_with = "redacted_url")]
    pub url: SecretString,
    /// Whether the connection uses TLS (`rediss://`).
    pub tls: bool,
    /// Prefix of every key and channel this service uses.
    pub key_prefix: String,
    /// Where the encryption keys were read from.
    pub encryption_key_file: PathBuf,
    /// The keys that seal values, newest first.
    #[serde(skip)]
    pub encryption_keys: EncryptionKeys,
    /// Bound on establishing a connection.
    #[serde(serialize_with = "as_millis")]
    pub connect_timeout: Duration,
    /// Bound on one command, round trip.
    #[serde(serialize_with = "as_millis")]
    pub command_timeout: Duration,
    /// Multiplexed connections commands are spread over.
    pub pool_size: usize,
    /// How often a tier found unreachable is tried again.
    #[serde(serialize_with = "as_millis")]
    pub recovery_interval: Duration,
}

/// The 256-bit keys that seal values in Redis, newest first. `Debug` shows only how many.
#[derive(Clone, Default)]
pub struct EncryptionKeys(std::sync::Arc<[[u8; 32]]>);

impl EncryptionKeys {
    /// The keys, newest first.
    pub fn keys(&self) -> &[[u8; 32]] {
        &self.0
    }

    /// Parses a key file: one base64 key (standard or URL-safe alphabet, padded or not) of
    /// 32 bytes per line, newest first; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use base64::Engine as _;

        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let unpadded = line.trim_end_matches('=');
            let bytes = URL_SAFE_NO_PAD
                .decode(unpadded)
                .or_else(|_| STANDARD_NO_PAD.decode(unpadded))
                .map_err(|_| format!("line {} is not base64", n + 1))?;
            let key: [u8; 32] = bytes
                .try_into()
                .map_err(|b: Vec<u8>| format!("line {} holds {} bytes, not 32", n + 1, b.len()))?;
            if keys.contains(&key) {
                return Err(format!("line {} repeats an earlier key", n + 1));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("holds no key".to_owned());
        }
        Ok(Self(keys.into()))
    }
}

impl std::fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptionKeys([{} redacted])", self.0.len())
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    /// Address of the main listener.
    pub listen: SocketAddr,
    /// Optional second listener for probes and metrics.
    pub admin_listen: Option<SocketAddr>,
    /// How long in-flight requests may run after the listener closed at shutdown.
    #[serde(serialize_with = "as_secs")]
    pub shutdown_grace: Duration,
    /// How long readiness reports 503 before the listener closes at shutdown.
    #[serde(serialize_with = "as_secs")]
    pub drain_delay: Duration,
    /// Upper bound on one inbound request.
    #[serde(serialize_with = "as_millis")]
    pub request_timeout: Duration,
}

/// Which Skypostal deployment the partner calls go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// `https://api-box-test.skypostal.com`
    Test,
    /// `https://api-box.skypostal.com`
    Prod,
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSettings {
    /// The partner deployment.
    pub environment: Environment,
    /// Scheme and authority of the partner API, without a trailing slash.
    pub base_url: String,
    /// Path of the customer-get-info operation.
    pub path: String,
    /// Partner `user_code`.
    pub user_code: u64,
    /// Partner `app_key` (from `app_key_file` when given).
    #[serde(serialize_with = "redacted")]
    pub app_key: SecretString,
    /// Where the app key was read from, if a file.
    pub app_key_file: Option<PathBuf>,
    /// Bound on establishing a connection.
    #[serde(serialize_with = "as_millis")]
    pub connect_timeout: Duration,
    /// Bound on one attempt, send to last byte.
    #[serde(serialize_with = "as_millis")]
    pub timeout: Duration,
    /// Bound on one lookup: all attempts and backoffs.
    #[serde(serialize_with = "as_millis")]
    pub deadline: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Partner calls in flight at once.
    pub max_concurrency: usize,
    /// Partner calls started per second.
    pub max_rps: u32,
    /// Largest partner answer read.
    pub max_response_bytes: usize,
    /// Longest partner `Retry-After` honoured.
    #[serde(serialize_with = "as_secs")]
    pub retry_after_cap: Duration,
    /// Consecutive failed calls that open the circuit.
    pub circuit_failures: u32,
    /// Share of failed calls in the window that opens the circuit.
    pub circuit_failure_ratio: f64,
    /// Calls the window must hold before the ratio counts.
    pub circuit_min_calls: u32,
    /// Length of the failure-counting window.
    #[serde(serialize_with = "as_secs")]
    pub circuit_window: Duration,
    /// How long the circuit stays open before one probe call.
    #[serde(serialize_with = "as_secs")]
    pub circuit_cooldown: Duration,
}

impl UpstreamSettings {
    /// The full URL of the customer-get-info operation.
    pub fn endpoint(&self) -> String {
        format!("{}{}", self.base_url, self.path)
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Lifetime of a found customer.
    pub ttl_s: u64,
    /// Lifetime of a "no such customer" answer.
    pub negative_ttl_s: u64,
    /// How long past expiry an answer is still served when the partner fails.
    pub stale_if_error_s: u64,
    /// How long past expiry an answer is served at once while one refresh runs.
    pub stale_while_revalidate_s: u64,
    /// Bound on cached e-mails.
    pub max_entries: u64,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Serve callers without a key (only on a loopback listener).
    pub allow_anonymous: bool,
}

/// `[rate_limit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Requests per second a client may make unless it sets `rate_per_s`.
    pub default_per_s: u32,
    /// Burst a client may make unless it sets `burst`.
    pub default_burst: u32,
}

/// One `[[clients]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSettings {
    /// Name used in logs and metrics.
    pub name: String,
    /// SHA-256 of the client's raw key.
    #[serde(serialize_with = "hex_digest")]
    pub key_sha256: [u8; 32],
    /// Sustained requests per second.
    pub rate_per_s: u32,
    /// Burst size.
    pub burst: u32,
    /// May purge cached answers.
    pub admin: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// Default filter directive; `RUST_LOG` wins when set.
    pub level: String,
}

// === loading ===

impl Settings {
    /// Loads the layers (defaults, `extra_layer`, `file`, environment) and validates them.
    pub fn load(file: Option<&Path>, extra_layer: Option<&str>) -> Result<Self, ConfigError> {
        use config::{Config, Environment as Env, File, FileFormat};

        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(extra) = extra_layer {
            builder = builder.add_source(File::from_str(extra, FileFormat::Toml));
        }
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("names {}, which is not a readable file", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let raw: RawSettings = builder
            .add_source(
                Env::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        raw.validate()
    }

    /// The effective configuration as TOML, every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl RawSettings {
    fn validate(self) -> Result<Settings, ConfigError> {
        let server = self.server.validate()?;
        let upstream = self.upstream.validate()?;
        if server.request_timeout <= upstream.deadline {
            return Err(ConfigError::invalid(
                "server.request_timeout_ms",
                format!(
                    "must be longer than upstream.deadline_ms ({} ms), or a slow partner would cut \
                     requests off before a stale answer or a 504 could be given",
                    upstream.deadline.as_millis()
                ),
            ));
        }
        validate_cache(&self.cache)?;
        positive(
            "rate_limit.default_per_s",
            self.rate_limit.default_per_s.into(),
        )?;
        positive(
            "rate_limit.default_burst",
            self.rate_limit.default_burst.into(),
        )?;
        LogFilter::parse("log.level", &self.log.level)?;

        let mut clients = Vec::with_capacity(self.clients.len());
        for (i, raw) in self.clients.into_iter().enumerate() {
            clients.push(raw.validate(i, &self.rate_limit)?);
        }
        for (i, c) in clients.iter().enumerate() {
            if clients[..i].iter().any(|o| o.name == c.name) {
                return Err(ConfigError::invalid(
                    format!("clients[{i}].name"),
                    format!("repeats the name {:?}", c.name),
                ));
            }
            if clients[..i].iter().any(|o| o.key_sha256 == c.key_sha256) {
                return Err(ConfigError::invalid(
                    format!("clients[{i}].key_sha256"),
                    "repeats the hash of another client: each client needs its own key",
                ));
            }
        }
        if self.auth.allow_anonymous && !server.listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "auth.allow_anonymous",
                format!(
                    "is only allowed when server.listen is a loopback address, not {}",
                    server.listen
                ),
            ));
        }
        if clients.is_empty() && !self.auth.allow_anonymous {
            return Err(ConfigError::invalid(
                "clients",
                "is empty: add a [[clients]] entry (`skypostal-proxy keygen --name NAME` makes one), \
                 or set auth.allow_anonymous = true on a loopback listener",
            ));
        }

        let redis = self.redis.map(RawRedis::validate).transpose()?;
        if let Some(redis) = &redis {
            // A miss may read Redis, ask the global quota and write Redis around the partner call.
            let budget = upstream.deadline + redis.command_timeout * 3;
            if server.request_timeout <= budget {
                return Err(ConfigError::invalid(
                    "server.request_timeout_ms",
                    format!(
                        "must be longer than upstream.deadline_ms plus three redis.command_timeout_ms \
                         ({} ms)",
                        budget.as_millis()
                    ),
                ));
            }
        }

        Ok(Settings {
            server,
            upstream,
            cache: self.cache,
            auth: self.auth,
            rate_limit: self.rate_limit,
            clients,
            log: self.log,
            redis,
        })
    }
}

impl RawServer {
    fn validate(self) -> Result<ServerSettings, ConfigError> {
        let listen = socket_addr("server.listen", &self.listen)?;
        let admin_listen = self
            .admin_listen
            .as_deref()
            .map(|a| socket_addr("server.admin_listen", a))
            .transpose()?;
        if admin_listen.is_some_and(|a| a == listen && a.port() != 0) {
            return Err(ConfigError::invalid(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }
        positive("server.request_timeout_ms", self.request_timeout_ms)?;
        Ok(ServerSettings {
            listen,
            admin_listen,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            drain_delay: Duration::from_secs(self.drain_delay_s),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        })
    }
}

impl RawUpstream {
    fn validate(self) -> Result<UpstreamSettings, ConfigError> {
        let environment = match self.environment.as_str() {
            "test" => Environment::Test,
            "prod" => Environment::Prod,
            other => {
                return Err(ConfigError::invalid(
                    "upstream.environment",
                    format!("must be \"test\" or \"prod\", not {other:?}"),
                ))
            }
        };
        let base_url = match self.base_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => url.trim_end_matches('/').to_owned(),
            _ => match environment {
                Environment::Test => TEST_BASE_URL.to_owned(),
                Environment::Prod => PROD_BASE_URL.to_owned(),
            },
        };
        match reqwest::Url::parse(&base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => {
                return Err(ConfigError::invalid(
                    "upstream.base_url",
                    format!("must be an http(s) URL, not {base_url:?}"),
                ))
            }
        }
        if !self.path.starts_with('/') {
            return Err(ConfigError::invalid("upstream.path", "must start with `/`"));
        }

        let app_key = match &self.app_key_file {
            Some(path) => read_secret_file("upstream.app_key_file", path)?,
            None => self.app_key.ok_or_else(|| {
                ConfigError::invalid("upstream.app_key", "is required (or upstream.app_key_file)")
            })?,
        };
        if app_key.expose_secret().trim().is_empty() {
            return Err(ConfigError::invalid("upstream.app_key", "is empty"));
        }
        if environment == Environment::Prod
            && (self.user_code == GENERIC_TEST_USER_CODE
                || app_key.expose_secret() == GENERIC_TEST_APP_KEY)
        {
            return Err(ConfigError::invalid(
                "upstream.user_code",
                "holds the public generic test credentials, which are refused with \
                 upstream.environment = \"prod\": set upstream.user_code and upstream.app_key_file",
            ));
        }

        positive("upstream.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("upstream.timeout_ms", self.timeout_ms)?;
        let deadline_ms = self
            .deadline_ms
            .unwrap_or(self.timeout_ms.saturating_mul(2));
        positive("upstream.deadline_ms", deadline_ms)?;
        positive("upstream.max_concurrency", self.max_concurrency as u64)?;
        positive("upstream.max_rps", self.max_rps.into())?;
        if self.max_response_bytes < 64 {
            return Err(ConfigError::invalid(
                "upstream.max_response_bytes",
                "must be at least 64",
            ));
        }
        if self.max_retries > 10 {
            return Err(ConfigError::invalid(
                "upstream.max_retries",
                "must be at most 10",
            ));
        }
        positive("upstream.retry_after_cap_s", self.retry_after_cap_s)?;
        positive("upstream.circuit_failures", self.circuit_failures.into())?;
        positive("upstream.circuit_min_calls", self.circuit_min_calls.into())?;
        positive("upstream.circuit_window_s", self.circuit_window_s)?;
        positive("upstream.circuit_cooldown_s", self.circuit_cooldown_s)?;
        // Upper bounds keep every sum with `Instant` far from overflow and every buffer sane.
        for (key, value, max) in [
            ("upstream.retry_after_cap_s", self.retry_after_cap_s, 3600),
            ("upstream.circuit_cooldown_s", self.circuit_cooldown_s, 3600),
            ("upstream.circuit_window_s", self.circuit_window_s, 86_400),
            (
                "upstream.connect_timeout_ms",
                self.connect_timeout_ms,
                600_000,
            ),
            ("upstream.timeout_ms", self.timeout_ms, 600_000),
            ("upstream.deadline_ms", deadline_ms, 600_000),
            (
                "upstream.max_concurrency",
                self.max_concurrency as u64,
                100_000,
            ),
            (
                "upstream.max_response_bytes",
                self.max_response_bytes as u64,
                16 << 20,
            ),
        ] {
            at_most(key, value, max)?;
        }
        if !(self.circuit_failure_ratio > 0.0 && self.circuit_failure_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "upstream.circuit_failure_ratio",
                "must be greater than 0 and at most 1",
            ));
        }

        Ok(UpstreamSettings {
            environment,
            base_url,
            path: self.path,
            user_code: self.user_code,
            app_key,
            app_key_file: self.app_key_file,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            deadline: Duration::from_millis(deadline_ms),
            max_retries: self.max_retries,
            max_concurrency: self.max_concurrency,
            max_rps: self.max_rps,
            max_response_bytes: self.max_response_bytes,
            retry_after_cap: Duration::from_secs(self.retry_after_cap_s),
            circuit_failures: self.circuit_failures,
            circuit_failure_ratio: self.circuit_failure_ratio,
            circuit_min_calls: self.circuit_min_calls,
            circuit_window: Duration::from_secs(self.circuit_window_s),
            circuit_cooldown: Duration::from_secs(self.circuit_cooldown_s),
        })
    }
}

impl RawRedis {
    fn validate(self) -> Result<RedisSettings, ConfigError> {
        let url = self
            .url
            .ok_or_else(|| ConfigError::invalid("redis.url", "is required in [redis]"))?;
        let mut parsed = reqwest::Url::parse(url.expose_secret().trim()).map_err(|_| {
            ConfigError::invalid("redis.url", "must be a redis:// or rediss:// URL")
        })?;
        let tls = match (parsed.scheme(), self.tls) {
            ("rediss", _) => true,
            ("redis", false) => false,
            ("redis", true) => {
                // `tls = true` upgrades a plain URL rather than contradicting it.
                let _ = parsed.set_scheme("rediss");
                true
            }
            _ => {
                return Err(ConfigError::invalid(
                    "redis.url",
                    "must be a redis:// or rediss:// URL",
                ))
            }
        };
        if !parsed.has_host() {
            return Err(ConfigError::invalid("redis.url", "must name a host"));
        }
        let url = SecretString::from(String::from(parsed));
        redis::Client::open(url.expose_secret()).map_err(|e| {
            ConfigError::invalid("redis.url", format!("is refused ({:?})", e.kind()))
        })?;

        let prefix = self.key_prefix;
        if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                "redis.key_prefix",
                "must be 1 to 64 printable ASCII characters without spaces",
            ));
        }
        let path = self.encryption_key_file.ok_or_else(|| {
            ConfigError::invalid(
                "redis.encryption_key_file",
                "is required in [redis]: values are sealed before they reach Redis",
            )
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::invalid(
                "redis.encryption_key_file",
                format!("cannot be read ({}): {e}", path.display()),
            )
        })?;
        let encryption_keys = EncryptionKeys::parse(&text).map_err(|reason| {
            ConfigError::invalid(
                "redis.encryption_key_file",
                format!("({}) {reason}", path.display()),
            )
        })?;

        positive("redis.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("redis.command_timeout_ms", self.command_timeout_ms)?;
        positive("redis.pool_size", self.pool_size as u64)?;
        positive("redis.recovery_interval_ms", self.recovery_interval_ms)?;
        for (key, value, max) in [
            ("redis.connect_timeout_ms", self.connect_timeout_ms, 60_000),
            ("redis.command_timeout_ms", self.command_timeout_ms, 10_000),
            ("redis.pool_size", self.pool_size as u64, 64),
            (
                "redis.recovery_interval_ms",
                self.recovery_interval_ms,
                60_000,
            ),
        ] {
            at_most(key, value, max)?;
        }
        Ok(RedisSettings {
            url,
            tls,
            key_prefix: prefix,
            encryption_key_file: path,
            encryption_keys,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            command_timeout: Duration::from_millis(self.command_timeout_ms),
            pool_size: self.pool_size,
            recovery_interval: Duration::from_millis(self.recovery_interval_ms),
        })
    }
}

impl RawClient {
    fn validate(
        self,
        i: usize,
        defaults: &RateLimitSettings,
    ) -> Result<ClientSettings, ConfigError> {
        let name = self.name.trim().to_owned();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::invalid(
                format!("clients[{i}].name"),
                "must be non-empty and use only ASCII letters, digits, `-`, `_` and `.`",
            ));
        }
        let key_sha256 = parse_sha256_hex(&self.key_sha256).ok_or_else(|| {
            ConfigError::invalid(
                format!("clients[{i}].key_sha256"),
                "must be 64 lowercase hex digits (the SHA-256 of the raw key)",
            )
        })?;
        let rate_per_s = self.rate_per_s.unwrap_or(defaults.default_per_s);
        let burst = self.burst.unwrap_or(defaults.default_burst);
        positive(&format!("clients[{i}].rate_per_s"), rate_per_s.into())?;
        positive(&format!("clients[{i}].burst"), burst.into())?;
        Ok(ClientSettings {
            name,
            key_sha256,
            rate_per_s,
            burst,
            admin: self.admin,
        })
    }
}

fn validate_cache(cache: &CacheSettings) -> Result<(), ConfigError> {
    positive("cache.ttl_s", cache.ttl_s)?;
    positive("cache.max_entries", cache.max_entries)?;
    // A year bounds every window: it keeps `Instant` arithmetic far from overflow.
    const YEAR_S: u64 = 366 * 24 * 3600;
    for (key, v) in [
        ("cache.ttl_s", cache.ttl_s),
        ("cache.negative_ttl_s", cache.negative_ttl_s),
        ("cache.stale_if_error_s", cache.stale_if_error_s),
        (
            "cache.stale_while_revalidate_s",
            cache.stale_while_revalidate_s,
        ),
    ] {
        if v > YEAR_S {
            return Err(ConfigError::invalid(key, "must be at most one year"));
        }
    }
    Ok(())
}

/// Validates a tracing filter directive, so a typo is refused at start-up, not ignored.
struct LogFilter;

impl LogFilter {
    fn parse(key: &str, value: &str) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::builder()
            .parse(value)
            .map(drop)
            .map_err(|e| ConfigError::invalid(key, format!("is not a valid filter ({e})")))
    }
}

fn at_most(key: &str, v: u64, max: u64) -> Result<(), ConfigError> {
    if v > max {
        Err(ConfigError::invalid(key, format!("must be at most {max}")))
    } else {
        Ok(())
    }
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn socket_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("must be IP:PORT (e.g. 127.0.0.1:8080), not {v:?}"),
        )
    })
}

fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(key, format!("cannot be read ({}): {e}", path.display()))
    })?;
    // Secret files usually end in a newline; the secret itself never does.
    Ok(SecretString::from(
        text.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

/// Parses 64 lowercase hex digits into a SHA-256 digest.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of a digest.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn redacted<S: Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("[redacted]")
}

/// A URL with its password (if any) replaced, so `check-config` can show where it points.
fn redacted_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    match reqwest::Url::parse(url.expose_secret()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("redacted"));
            }
            s.serialize_str(parsed.as_str())
        }
        Err(_) => s.serialize_str("[redacted]"),
    }
}

fn hex_digest<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(d))
}

fn as_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn as_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_accepts_only_64_lowercase_hex_digits() {
        let ok = "a".repeat(64);
        assert_eq!(parse_sha256_hex(&ok), Some([0xaa; 32]));
        assert_eq!(parse_sha256_hex(&"A".repeat(64)), None);
        assert_eq!(parse_sha256_hex(&"a".repeat(63)), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
        assert_eq!(to_hex(&[0xaa; 32]), ok);
    }

    #[test]
    fn defaults_alone_are_refused_because_no_client_is_configured() {
        let err = Settings::load(None, None).unwrap_err().to_string();
        assert!(err.contains("`clients`"), "{err}");
    }

    #[test]
    fn anonymous_on_loopback_is_accepted_and_derives_the_deadline() {
        let s = Settings::load(
            None,
            Some("[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n"),
        )
        .unwrap();
        assert_eq!(s.upstream.deadline, s.upstream.timeout * 2);
        assert_eq!(s.upstream.base_url, TEST_BASE_URL);
    }

    #[test]
    fn anonymous_on_a_public_listener_is_refused() {
        let err = Settings::load(None, Some("[auth]\nallow_anonymous = true\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.allow_anonymous"), "{err}");
    }

    #[test]
    fn prod_with_generic_credentials_is_refused() {
        let err = Settings::load(
            None,
            Some(
                "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n\
                 [upstream]\nenvironment = \"prod\"\n",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream.user_code"), "{err}");
    }

    #[test]
    fn a_request_timeout_shorter_than_the_partner_deadline_is_refused() {
        let err = Settings::load(
            None,
            Some(
                "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_ms = 5000\n\
                 [auth]\nallow_anonymous = true\n",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.request_timeout_ms"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Settings::load(
            None,
            Some("[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\ntimout_ms = 3\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("timout_ms"), "{err}");
    }

    #[test]
    fn redacted_toml_hides_the_app_key() {
        let s = Settings::load(
            None,
            Some("[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n"),
        )
        .unwrap();
        let out = s.to_redacted_toml();
        assert!(!out.contains(GENERIC_TEST_APP_KEY), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
        assert!(!format!("{s:?}").contains(GENERIC_TEST_APP_KEY));
    }

    /// Loads an anonymous loopback configuration with this `[redis]` section body.
    fn with_redis(body: &str) -> Result<Settings, ConfigError> {
        Settings::load(
            None,
            Some(&format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n[redis]\n{body}"
            )),
        )
    }

    fn key_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "skypostal-proxy-unit-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_redis_section_needs_a_url_and_a_key_file() {
        let err = with_redis("key_prefix = \"p:\"\n").unwrap_err().to_string();
        assert!(err.contains("`redis.url`"), "{err}");
        let err = with_redis("url = \"redis://127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis.encryption_key_file`"), "{err}");
        let err = with_redis("url = \"https://127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis.url`"), "{err}");
    }

    #[test]
    fn a_bad_key_file_is_refused_without_quoting_it() {
        let path = key_file("bad", "c2VjcmV0LWJ1dC1zaG9ydA\n");
        let err = with_redis(&format!(
            "url = \"redis://127.0.0.1\"\nencryption_key_file = \"{}\"\n",
            path.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`redis.encryption_key_file`"), "{err}");
        assert!(err.contains("not 32"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }

    #[test]
    fn tls_upgrades_the_url_and_the_password_is_redacted() {
        let path = key_file("good", &format!("{}\n", "A".repeat(43)));
        let s = with_redis(&format!(
            "url = \"redis://:hunter2@cache.internal:6380/1\"\ntls = true\n\
             encryption_key_file = \"{}\"\npool_size = 4\n",
            path.display()
        ))
        .unwrap();
        let redis = s.redis.as_ref().unwrap();
        assert!(redis.tls);
        assert!(redis.url.expose_secret().starts_with("rediss://"));
        assert_eq!(redis.pool_size, 4);
        assert_eq!(redis.encryption_keys.keys().len(), 1);
        let shown = s.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("rediss://:redacted@cache.internal:6380/1"),
            "{shown}"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        let err = with_redis(&format!(
            "url = \"redis://127.0.0.1\"\nencryption_key_file = \"{}\"\npool_size = 0\n",
            path.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`redis.pool_size`"), "{err}");
    }
}
