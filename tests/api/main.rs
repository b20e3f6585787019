//! Integration tests: one binary, the real application over HTTP against the partner simulator.

mod auth;
mod binary;
mod credentials;
mod freshness;
mod helpers;
mod limits;
mod logs;
mod metrics;
mod partner_failures;
mod redis_server;
mod resilience;
mod routes;
mod shared_tier;
mod soak;
mod tcp_proxy;
