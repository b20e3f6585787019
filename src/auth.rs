//! Callers and their keys: the configured [`Client`]s, key extraction and `keygen`.
//!
//! Only SHA-256 digests of keys are configured. A presented key is hashed and looked up by its
//! digest, so what a lookup's timing could reveal is a prefix of a hash of the attacker's own
//! guess, never anything about a configured key.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{to_hex, Settings};
use crate::error::ApiError;
use crate::rate_limit::ClientLimiter;

/// Name of the header that carries a key as an alternative to `Authorization: Bearer`.
pub const X_API_KEY: &str = "x-api-key";

/// An authenticated caller, handed to handlers as a request extension.
#[derive(Debug)]
pub struct Client {
    /// Name from `[[clients]]`, for logs and metrics.
    pub name: Arc<str>,
    /// May purge cached answers.
    pub admin: bool,
    /// This client's rate limit.
    pub limiter: ClientLimiter,
}

impl Client {
    /// A client with its own limiter.
    pub fn new(name: &str, admin: bool, rate_per_s: u32, burst: u32) -> Self {
        Self {
            name: name.into(),
            admin,
            limiter: ClientLimiter::new(rate_per_s, burst),
        }
    }
}

/// The configured callers, by key digest.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    by_digest: HashMap<[u8; 32], Arc<Client>>,
    /// Who a request without a key is, when `auth.allow_anonymous` is on.
    anonymous: Option<Arc<Client>>,
}

impl ClientRegistry {
    /// Builds the registry from validated settings.
    pub fn from_settings(settings: &Settings) -> Self {
        let by_digest = settings
            .clients
            .iter()
            .map(|c| {
                let client = Client::new(&c.name, c.admin, c.rate_per_s, c.burst);
                (c.key_sha256, Arc::new(client))
            })
            .collect();
        // Anonymous callers share one client, and so one limit.
        let anonymous = settings.auth.allow_anonymous.then(|| {
            Arc::new(Client::new(
                "anonymous",
                false,
                settings.rate_limit.default_per_s,
                settings.rate_limit.default_burst,
            ))
        });
        Self {
            by_digest,
            anonymous,
        }
    }

    /// The caller a request's headers identify. A presented key must be valid even when anonymous
    /// callers are allowed: a wrong key is a misconfiguration the caller should hear about.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Client>, ApiError> {
        match presented_key(headers) {
            Some(key) => self
                .by_digest
                .get(&digest(key))
                .cloned()
                .ok_or(ApiError::Unauthorized),
            None => self.anonymous.clone().ok_or(ApiError::Unauthorized),
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>` first, then `X-Api-Key`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value.as_bytes();
        if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
            let key = value[7..].trim_ascii();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers
        .get(X_API_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// A new caller key: 256 random bits, URL-safe base64 without padding (43 characters).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The lowercase hex SHA-256 of a raw key, as `[[clients]] key_sha256` wants it.
pub fn key_sha256_hex(key: &str) -> String {
    to_hex(&digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn registry(anonymous: bool) -> ClientRegistry {
        let client = Arc::new(Client::new("svc", false, 1, 1));
        ClientRegistry {
            by_digest: HashMap::from([(digest(b"good-key"), client.clone())]),
            anonymous: anonymous.then_some(client),
        }
    }

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn bearer_and_x_api_key_are_both_accepted() {
        let r = registry(false);
        assert!(r
            .authenticate(&headers("authorization", "Bearer good-key"))
            .is_ok());
        assert!(r
            .authenticate(&headers("authorization", "bearer  good-key "))
            .is_ok());
        assert!(r.authenticate(&headers("x-api-key", "good-key")).is_ok());
    }

    #[test]
    fn missing_wrong_or_malformed_keys_are_refused() {
        let r = registry(false);
        for h in [
            HeaderMap::new(),
            headers("x-api-key", "bad-key"),
            headers("authorization", "Basic good-key"),
            headers("authorization", "Bearer "),
        ] {
            assert!(matches!(r.authenticate(&h), Err(ApiError::Unauthorized)));
        }
    }

    #[test]
    fn anonymous_callers_need_no_key_but_a_wrong_key_still_fails() {
        let r = registry(true);
        assert!(r.authenticate(&HeaderMap::new()).is_ok());
        assert!(r.authenticate(&headers("x-api-key", "bad-key")).is_err());
    }

    #[test]
    fn generated_keys_are_long_url_safe_and_distinct() {
        let (a, b) = (generate_key(), generate_key());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(key_sha256_hex("abc").len(), 64);
    }
}
