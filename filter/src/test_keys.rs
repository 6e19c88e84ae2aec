//! Deterministic RSA keys and a signer for unit tests (never compiled into the filter).

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, PrivateKey, Pss};
use sha2::{Digest, Sha256};

use crate::jwks::KeySet;

struct Keys {
    k1: PrivateKey,
    k2: PrivateKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = ChaCha8Rng::from_seed([7; 32]);
        Keys {
            k1: PrivateKey::new(&mut rng, 2048).unwrap(),
            k2: PrivateKey::new(&mut rng, 2048).unwrap(),
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn jwk(key: &PrivateKey, kid: &str, alg: &str) -> serde_json::Value {
    let public = key.to_public_key();
    serde_json::json!({
        "kty": "RSA", "kid": kid, "alg": alg, "use": "sig",
        "n": b64(&public.n().to_be_bytes()), "e": b64(&public.e().to_be_bytes()),
    })
}

/// k1 (RS256), k2 (RS256, a different key) and `pss` (k1's key bound to PS256).
pub fn jwks_json() -> String {
    let k = keys();
    serde_json::json!({"keys": [jwk(&k.k1, "k1", "RS256"), jwk(&k.k2, "k2", "RS256"), jwk(&k.k1, "pss", "PS256")]})
        .to_string()
}

pub fn key_set() -> KeySet {
    KeySet::parse(jwks_json().as_bytes()).unwrap()
}

/// Signs the exact header and payload text with k1 (RS256, PKCS#1 v1.5).
pub fn sign_raw(header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = keys()
        .k1
        .sign(
            Pkcs1v15Sign::new::<Sha256>(),
            &Sha256::digest(input.as_bytes()),
        )
        .unwrap();
    format!("{input}.{}", b64(&sig))
}

pub fn sign(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    sign_raw(&header.to_string(), &claims.to_string())
}

pub fn sign_pss(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut rng = ChaCha8Rng::from_seed([9; 32]);
    let sig = keys()
        .k1
        .sign_with_rng(
            &mut rng,
            Pss::<Sha256>::new(),
            &Sha256::digest(input.as_bytes()),
        )
        .unwrap();
    format!("{input}.{}", b64(&sig))
}

/// k1's modulus, base64url, for hand-built JWKs.
pub fn k1_modulus() -> String {
    b64(&keys().k1.to_public_key().n().to_be_bytes())
}

fn p256_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
}

/// The public JWK of a fixed P-256 key, bound to ES256.
pub fn es256_jwk(kid: &str) -> serde_json::Value {
    let point = p256_key().verifying_key().to_sec1_point(false);
    let bytes = point.as_bytes();
    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&bytes[1..33]), "y": b64(&bytes[33..65])})
}

/// Signs with that P-256 key (JWS r || s).
pub fn sign_es256(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    use p256::ecdsa::signature::Signer;
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig: p256::ecdsa::Signature = p256_key().sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}
