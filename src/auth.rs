//! Callers and their keys: the configured [`Client`]s, key extraction and `keygen`.
//!
//! Only SHA-256 digests of keys are configured. A presented key is hashed and looked up by its
//! digest, so what a lookup's timing could reveal is a prefix of a hash of the attacker's own
//! guess, never anything about a configured key.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

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
    /// Sustained requests per second.
    pub rate_per_s: u32,
    /// Burst size.
    pub burst: u32,
    /// This client's rate limit.
    pub limiter: ClientLimiter,
}

impl Client {
    /// A client with its own limiter.
    pub fn new(name: &str, admin: bool, rate_per_s: u32, burst: u32) -> Self {
        Self {
            name: name.into(),
            admin,
            rate_per_s,
            burst,
            limiter: ClientLimiter::new(rate_per_s, burst),
        }
    }

    fn same_terms(&self, admin: bool, rate_per_s: u32, burst: u32) -> bool {
        self.admin == admin && self.rate_per_s == rate_per_s && self.burst == burst
    }
}

/// One generation of the configured callers, by key digest.
#[derive(Debug, Default)]
struct ClientSet {
    by_digest: HashMap<[u8; 32], Arc<Client>>,
    /// Who a request without a key is, when `auth.allow_anonymous` is on.
    anonymous: Option<Arc<Client>>,
}

/// The configured callers. [`ClientRegistry::reload`] swaps in a new set atomically: a request
/// sees the old set or the new one, never a mix.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    current: RwLock<Arc<ClientSet>>,
}

impl ClientRegistry {
    /// Builds the registry from validated settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            current: RwLock::new(Arc::new(ClientSet::build(settings, &ClientSet::default()))),
        }
    }

    /// Replaces the callers with those of `settings` (key rotation). A client whose name and
    /// terms are unchanged keeps its rate-limit state, whatever its key. Returns the client count.
    pub fn reload(&self, settings: &Settings) -> usize {
        let next = {
            let current = self.read();
            Arc::new(ClientSet::build(settings, &current))
        };
        let count = next.by_digest.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        count
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Arc<ClientSet>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The caller a request's headers identify. A presented key must be valid even when anonymous
    /// callers are allowed: a wrong key is a misconfiguration the caller should hear about.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Client>, ApiError> {
        let set = self.read();
        match presented_key(headers)? {
            Some(key) => set
                .by_digest
                .get(&digest(key))
                .cloned()
                .ok_or(ApiError::Unauthorized),
            None => set.anonymous.clone().ok_or(ApiError::Unauthorized),
        }
    }
}

impl ClientSet {
    fn build(settings: &Settings, previous: &ClientSet) -> Self {
        let keep = |name: &str, admin: bool, rate: u32, burst: u32| {
            previous
                .by_digest
                .values()
                .chain(&previous.anonymous)
                .find(|c| &*c.name == name && c.same_terms(admin, rate, burst))
                .cloned()
                .unwrap_or_else(|| Arc::new(Client::new(name, admin, rate, burst)))
        };
        let by_digest = settings
            .clients
            .iter()
            .map(|c| (c.key_sha256, keep(&c.name, c.admin, c.rate_per_s, c.burst)))
            .collect();
        // Anonymous callers share one client, and so one limit.
        let anonymous = settings.auth.allow_anonymous.then(|| {
            keep(
                "anonymous",
                false,
                settings.rate_limit.default_per_s,
                settings.rate_limit.default_burst,
            )
        });
        Self {
            by_digest,
            anonymous,
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>`, else `X-Api-Key`.
///
/// An `Authorization` header that is not a usable bearer key is an error even when `X-Api-Key`
/// holds a good one: a request with contradictory credentials is refused, not guessed at.
fn presented_key(headers: &HeaderMap) -> Result<Option<&[u8]>, ApiError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value.as_bytes();
        let key = match value.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
            _ => &[],
        };
        return if key.is_empty() {
            Err(ApiError::Unauthorized)
        } else {
            Ok(Some(key))
        };
    }
    Ok(headers
        .get(X_API_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty()))
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
            current: RwLock::new(Arc::new(ClientSet {
                by_digest: HashMap::from([(digest(b"good-key"), client.clone())]),
                anonymous: anonymous.then_some(client),
            })),
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
    fn a_bad_authorization_header_is_refused_even_with_a_good_x_api_key() {
        let r = registry(false);
        let mut h = headers("x-api-key", "good-key");
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        assert!(r.authenticate(&h).is_err());
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
