//! Integration tests: one binary, the real application over HTTP against the partner simulator.

mod auth;
mod binary;
mod credentials;
mod freshness;
mod helpers;
mod partner_failures;
mod routes;
