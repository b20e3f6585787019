//! Log output: `log.format` (`pretty` or `json`) and `log.level`, which `RUST_LOG` overrides.
//!
//! Logs go to standard error, so standard output stays for what a command prints (`keygen`,
//! `check-config`, the `demo` banner). What goes into a log line is the caller's business: e-mails
//! through [`crate::domain::CustomerEmail`]'s masking `Display`, secrets never (their types redact).

use std::io::IsTerminal;

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. A second call (tests) leaves the first one in place.
pub fn init(settings: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::builder().parse(v).ok())
        .unwrap_or_else(|| {
            EnvFilter::builder()
                .parse(&settings.level)
                .unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(FmtSpan::NONE);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).try_init(),
    };
}

/// A request's id: the caller's `x-request-id` when it is valid, or one generated here.
///
/// Generated ids stay two integers until something needs the text, so tagging a request costs
/// no allocation; they render as `<process prefix>-<counter>` in hex.
#[derive(Clone, Debug)]
pub enum RequestId {
    /// Made here.
    Generated {
        /// Random per process, so ids from restarted replicas do not collide in log searches.
        prefix: u32,
        /// Per-process counter.
        n: u64,
    },
    /// The caller's, validated.
    Incoming(http::HeaderValue),
}

impl RequestId {
    /// The id as an `x-request-id` header value.
    pub fn header_value(&self) -> http::HeaderValue {
        match self {
            Self::Incoming(v) => v.clone(),
            Self::Generated { .. } => http::HeaderValue::try_from(self.to_string())
                .unwrap_or(http::HeaderValue::from_static("unknown")),
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Generated { prefix, n } => write!(f, "{prefix:08x}-{n:x}"),
            // Incoming ids are validated to visible ASCII before they are accepted.
            Self::Incoming(v) => f.write_str(v.to_str().unwrap_or("")),
        }
    }
}
