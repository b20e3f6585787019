//! [`Sealer`]: what makes the shared tier safe to hand to a Redis operator.
//!
//! - Keys in Redis are an HMAC-SHA-256 of the normalized e-mail, cut to 128 bits: the address
//!   cannot be read back, and without the key it cannot be confirmed by guessing either.
//! - Values are sealed with XChaCha20-Poly1305 under a random 192-bit nonce (random nonces of that
//!   size never repeat in practice), with the Redis key as associated data, so a value moved to
//!   another e-mail's key fails to open instead of answering for the wrong customer.
//! - Both keys of each configured secret are derived from it with HKDF-SHA-256 under distinct labels.
//!   Rotation: the first secret seals and names new entries; every secret still opens and finds
//!   entries written under it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::EncryptionKeys;

/// Format byte of a sealed value, so a later format can be told apart.
const VERSION: u8 = 1;
const NONCE: usize = 24;

/// Seals and opens shared-tier values, and names their keys. Built once at start-up.
pub struct Sealer {
    keys: Box<[KeyPair]>,
}

struct KeyPair {
    /// Keyed with the derived index key; cloned per use, so the key schedule runs once.
    index: Hmac<Sha256>,
    aead: XChaCha20Poly1305,
}

impl Sealer {
    /// Derives the index and sealing keys of every configured secret, newest first.
    pub fn new(secrets: &EncryptionKeys) -> Self {
        let keys = secrets
            .keys()
            .iter()
            .map(|secret| {
                let hk = Hkdf::<Sha256>::new(None, secret);
                let mut index = [0u8; 32];
                let mut seal = [0u8; 32];
                // 32 bytes is far below HKDF's limit of 255 blocks: these cannot fail.
                let _ = hk.expand(b"skypostal-proxy shared tier: key index v1", &mut index);
                let _ = hk.expand(b"skypostal-proxy shared tier: value seal v1", &mut seal);
                KeyPair {
                    index: <Hmac<Sha256> as Mac>::new_from_slice(&index)
                        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
                    aead: XChaCha20Poly1305::new(&seal.into()),
                }
            })
            .collect();
        Self { keys }
    }

    /// How many secrets are configured (at least one).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a sealer has at least one secret.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The 128-bit index of a normalized e-mail under secret `i` (0 is the newest).
    pub fn digest(&self, i: usize, email: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        if let Some(pair) = self.keys.get(i) {
            let mut mac = pair.index.clone();
            mac.update(email.as_bytes());
            out.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        }
        out
    }

    /// Seals `plaintext` with the newest secret, bound to `aad` (the Redis key).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let pair = self.keys.first()?;
        let nonce: [u8; NONCE] = rand::random();
        let sealed = pair
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Opens a value sealed under secret `i` for `aad`; `None` if it was altered, moved from
    /// another key, sealed under another secret, or is not a sealed value at all.
    pub fn open(&self, i: usize, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let pair = self.keys.get(i)?;
        let (&version, rest) = sealed.split_first()?;
        if version != VERSION || rest.len() < NONCE {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE);
        pair.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .ok()
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer([{} keys redacted])", self.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(lines: &str) -> Sealer {
        Sealer::new(&EncryptionKeys::parse(lines).expect("keys"))
    }

    const OLD: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const NEW: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";

    #[test]
    fn a_sealed_value_opens_only_under_its_key_and_associated_data() {
        let s = sealer(NEW);
        let sealed = s.seal(b"p:v1:abc", b"{\"customer_key\":\"k\"}").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"customer_key"));
        assert_eq!(
            s.open(0, b"p:v1:abc", &sealed).as_deref(),
            Some(&b"{\"customer_key\":\"k\"}"[..])
        );
        assert_eq!(
            s.open(0, b"p:v1:abd", &sealed),
            None,
            "moved to another key"
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(s.open(0, b"p:v1:abc", &altered), None, "altered");
        assert_eq!(s.open(0, b"p:v1:abc", &sealed[..10]), None, "truncated");
        assert_eq!(s.open(0, b"p:v1:abc", b""), None);
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let s = sealer(NEW);
        assert_ne!(s.seal(b"k", b"same"), s.seal(b"k", b"same"));
    }

    #[test]
    fn rotation_keeps_old_entries_readable_and_seals_with_the_newest_key() {
        let before = sealer(OLD);
        let after = sealer(&format!("# rotated\n{NEW}\n\n{OLD}\n"));
        assert_eq!(after.len(), 2);
        let email = "someone@example.com";
        assert_eq!(before.digest(0, email), after.digest(1, email));
        assert_ne!(after.digest(0, email), after.digest(1, email));

        let old_value = before.seal(b"k", b"old").unwrap();
        assert_eq!(
            after.open(1, b"k", &old_value).as_deref(),
            Some(&b"old"[..])
        );
        assert_eq!(after.open(0, b"k", &old_value), None);
        let new_value = after.seal(b"k", b"new").unwrap();
        assert_eq!(before.open(0, b"k", &new_value), None);
    }

    #[test]
    fn key_files_are_checked_line_by_line() {
        assert!(EncryptionKeys::parse("").is_err());
        assert!(EncryptionKeys::parse("# only a comment\n").is_err());
        assert!(EncryptionKeys::parse("not base64!").is_err());
        let short = EncryptionKeys::parse("AAAA").unwrap_err();
        assert!(short.contains("3 bytes"), "{short}");
        assert!(EncryptionKeys::parse(&format!("{NEW}\n{NEW}")).is_err());
        // Padded standard base64, as `openssl rand -base64 32` prints it.
        let padded = EncryptionKeys::parse("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=").unwrap();
        assert_eq!(padded.keys().len(), 1);
        assert_eq!(format!("{padded:?}"), "EncryptionKeys([1 redacted])");
    }
}
