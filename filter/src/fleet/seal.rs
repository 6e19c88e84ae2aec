//! What the fleet store holds, and why it is safe to hold there.
//!
//! etcd is shared by every replica and readable by whoever operates it, so it never sees a token:
//! - an entry's **name** is an HMAC of the exchange cache key (itself a hash of the client's token
//!   and the target) under the store key, so the store cannot be used to confirm a guessed token;
//! - an entry's **value** (the backend token and until when it may be reused) is sealed with
//!   AES-256-GCM under a key derived from the same store key; the entry's full name is the
//!   associated data, so a value copied under another name does not open.
//!
//! Both keys come from one secret (the operator's, from an environment variable) and carry its
//! key id, which is part of every name: a new key id starts a new keyspace, and an entry sealed
//! under another key is a miss, never garbage forwarded.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit as _, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cache::Digest32;

/// The store secret must carry at least 256 bits, AES-256's key size.
pub const MIN_SECRET_BYTES: usize = 32;
/// AES-GCM's standard nonce: random per value (at most a few million values per key, far below
/// the 2^32 at which random 96-bit nonces become a concern).
const NONCE_LEN: usize = 12;
/// Version of the sealed layout, first byte of every value.
const FORMAT: u8 = 1;
/// Domain separation of the two keys derived from the secret.
const NAMING_LABEL: &[u8] = b"mcp-token-exchange fleet store: entry names v1";
const SEALING_LABEL: &[u8] = b"mcp-token-exchange fleet store: entry values v1";

/// Why a stored value was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than its own header says.
    Truncated,
    /// Not a layout this filter writes.
    UnknownFormat,
    /// Sealed under another key id (the key was rotated).
    OtherKey,
    /// Does not authenticate: changed, cut, sealed under another key with the same id, or moved
    /// from another entry.
    Forged,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenError::Truncated => "truncated",
            OpenError::UnknownFormat => "not a sealed entry",
            OpenError::OtherKey => "sealed under another key id",
            OpenError::Forged => "failed authentication",
        })
    }
}

/// A value opened: the backend token and until when it may be reused (Unix seconds).
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub until: i64,
    pub token: String,
}

/// The keys of one store secret.
pub struct StoreKeys {
    key_id: String,
    naming: Hmac<Sha256>,
    sealing: Aes256Gcm,
}

impl StoreKeys {
    /// `None` when the secret is shorter than [`MIN_SECRET_BYTES`] (configuration refuses it).
    pub fn derive(key_id: &str, secret: &[u8]) -> Option<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return None;
        }
        let derive = |label: &[u8]| -> Option<[u8; 32]> {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
            mac.update(label);
            Some(mac.finalize().into_bytes().into())
        };
        let naming = Hmac::<Sha256>::new_from_slice(&derive(NAMING_LABEL)?).ok()?;
        let sealing = Aes256Gcm::new_from_slice(&derive(SEALING_LABEL)?).ok()?;
        Some(Self {
            key_id: key_id.to_string(),
            naming,
            sealing,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The entry's name for an exchange cache key: its HMAC, base64url.
    pub fn entry_name(&self, key: &Digest32) -> String {
        let mut mac = self.naming.clone();
        mac.update(key);
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Seals `token` for the entry named `name` (its full etcd key).
    pub fn seal(&self, name: &[u8], until: i64, token: &str, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let header = self.header();
        let mut plaintext = Vec::with_capacity(8 + token.len());
        plaintext.extend_from_slice(&until.to_be_bytes());
        plaintext.extend_from_slice(token.as_bytes());
        let aad = associated_data(&header, name);
        let mut sealed = header;
        sealed.extend_from_slice(&nonce);
        let nonce = Nonce::from(nonce);
        // Encryption fails only for inputs of gigabytes; a backend token is never one.
        let ciphertext = self
            .sealing
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Opens a value read from the entry named `name`.
    pub fn open(&self, name: &[u8], sealed: &[u8]) -> Result<Opened, OpenError> {
        let (&format, rest) = sealed.split_first().ok_or(OpenError::Truncated)?;
        if format != FORMAT {
            return Err(OpenError::UnknownFormat);
        }
        let (&id_len, rest) = rest.split_first().ok_or(OpenError::Truncated)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN {
            return Err(OpenError::Truncated);
        }
        let (key_id, rest) = rest.split_at(id_len);
        if key_id != self.key_id.as_bytes() {
            return Err(OpenError::OtherKey);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError::Truncated)?;
        let aad = associated_data(&self.header(), name);
        let plaintext = self
            .sealing
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::Forged)?;
        if plaintext.len() < 8 {
            return Err(OpenError::Forged);
        }
        let (until, token) = plaintext.split_at(8);
        let until = i64::from_be_bytes(until.try_into().map_err(|_| OpenError::Forged)?);
        let token = String::from_utf8(token.to_vec()).map_err(|_| OpenError::Forged)?;
        Ok(Opened { until, token })
    }

    fn header(&self) -> Vec<u8> {
        let id = self.key_id.as_bytes();
        let mut header = Vec::with_capacity(2 + id.len() + NONCE_LEN);
        header.push(FORMAT);
        // Configuration limits key ids to 64 bytes.
        header.push(id.len().min(255) as u8);
        header.extend_from_slice(&id[..id.len().min(255)]);
        header
    }
}

fn associated_data(header: &[u8], name: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name);
    aad
}

/// A fresh nonce from the host's random source; `None` if the host has none (then nothing is
/// written: a fixed nonce would break AES-GCM).
pub fn random_nonce() -> Option<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).ok()?;
    Some(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn keys(id: &str, secret: &[u8]) -> StoreKeys {
        StoreKeys::derive(id, secret).unwrap()
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(StoreKeys::derive("k1", &SECRET[..31]).is_none());
        assert!(StoreKeys::derive("k1", SECRET).is_some());
    }

    #[test]
    fn a_sealed_value_opens_under_its_own_name_only() {
        let k = keys("k1", SECRET);
        let sealed = k.seal(b"/mcp/k1/v/abc", 1_900_000_000, "eyJbackend", [7; 12]);
        assert_eq!(
            k.open(b"/mcp/k1/v/abc", &sealed),
            Ok(Opened {
                until: 1_900_000_000,
                token: "eyJbackend".into()
            })
        );
        assert_eq!(
            k.open(b"/mcp/k1/v/abd", &sealed),
            Err(OpenError::Forged),
            "moved to another entry"
        );
    }

    #[test]
    fn the_token_is_not_in_the_sealed_bytes() {
        let k = keys("k1", SECRET);
        let token = "eyJhbGciOiJSUzI1NiJ9.payload.signature";
        let sealed = k.seal(b"n", 1, token, [1; 12]);
        let hay = String::from_utf8_lossy(&sealed);
        assert!(!hay.contains("eyJ"));
        assert!(!sealed
            .windows(8)
            .any(|w| token.as_bytes().windows(8).any(|t| t == w)));
    }

    #[test]
    fn every_corruption_is_refused() {
        let k = keys("k1", SECRET);
        let sealed = k.seal(b"n", 5, "tok", [3; 12]);
        for cut in 0..sealed.len() {
            assert!(k.open(b"n", &sealed[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(k.open(b"n", &bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn another_key_or_key_id_is_a_miss() {
        let sealed = keys("k1", SECRET).seal(b"n", 5, "tok", [3; 12]);
        assert_eq!(
            keys("k2", SECRET).open(b"n", &sealed),
            Err(OpenError::OtherKey)
        );
        let other = keys("k1", b"another secret of thirty-two bytes!!");
        assert_eq!(other.open(b"n", &sealed), Err(OpenError::Forged));
    }

    #[test]
    fn names_are_keyed_and_stable() {
        let (a, b) = (
            keys("k1", SECRET),
            keys("k1", b"another secret of thirty-two bytes!!"),
        );
        let key = [9u8; 32];
        assert_eq!(a.entry_name(&key), a.entry_name(&key));
        assert_ne!(a.entry_name(&key), b.entry_name(&key));
        assert_ne!(a.entry_name(&key), a.entry_name(&[8u8; 32]));
        assert_eq!(a.entry_name(&key).len(), 43);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(random_nonce(), random_nonce());
    }
}
