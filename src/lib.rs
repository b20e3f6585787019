//! skypostal-proxy: a sidecar that looks Skypostal customers' credentials up by e-mail.
//!
//! Internal services call `GET /customers/{email}/credentials`; the service injects the partner
//! secrets it alone holds into the partner's customer-get-info call, caches the answer, and
//! returns a clean JSON record.
//!
//! # Layout
//!
//! - [`cli`] — the subcommands (`serve`, `demo`, `mock-upstream`, `keygen`, `check-config`,
//!   `healthcheck`, `check-upstream`).
//! - [`config`] — layered configuration, validation, secret handling.
//! - [`startup`] — [`startup::Application`]: binds, serves, drains on shutdown.
//! - [`telemetry`] — log output.
//! - [`domain`] — [`domain::CustomerEmail`] and the [`domain::Credentials`] record.
//! - [`partner`] — the Skypostal client, its wire format and WCF dates.
//! - [`cache`] — the credentials cache: single flight, freshness, stale answers.
//! - [`shared`] — the optional Redis tier: shared cache entries, cluster-wide purges, the global
//!   partner quota, and the sealing that keeps e-mails and keys unreadable in Redis.
//! - [`clock`] — the injectable clock of freshness and circuit decisions.
//! - [`auth`] — callers' keys.
//! - [`rate_limit`] — per-client limits and their headers; the partner call rate.
//! - [`routes`] — the router, the middleware stack and the handlers.
//! - [`error`] — [`error::ApiError`] and problem+json.
//! - [`metrics`] — the Prometheus metrics.
//! - [`simulator`] — the partner simulator behind `demo`, `mock-upstream` and the tests.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod metrics;
pub mod partner;
pub mod rate_limit;
pub mod routes;
pub mod shared;
pub mod simulator;
pub mod startup;
pub mod telemetry;
