//! JWK Set parsing and key selection.
//!
//! Each key is bound to exactly one JWS algorithm when it is parsed (from its `alg`, or RS256 for
//! an RSA key that names none, as Okta's do), so a token can never choose how its signature is
//! checked: the key does. Malformed or unsupported keys are skipped, not fatal, so one bad entry
//! cannot take down a key set that still holds the key in use.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use crate::rsa_public::RsaVerifyingKey;

/// A key set larger than this is not a plausible JWKS; refuse to parse it.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsAlgorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
}

impl JwsAlgorithm {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES256" => Self::Es256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
            Self::Es256 => "ES256",
        }
    }
}

/// A public key from the issuer's JWKS, with the one algorithm it may verify.
#[derive(Clone, PartialEq)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub alg: JwsAlgorithm,
    pub key: PublicKeyMaterial,
}

/// The public key itself: RSA for RS*/PS*, P-256 for ES256.
#[derive(Clone, PartialEq)]
pub enum PublicKeyMaterial {
    Rsa(RsaVerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<VerifyingKey>,
    /// Why entries were skipped (`kid` or index, and the reason), for one log line per fetch.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    TooLarge(usize),
    NotJson(String),
    NoKeysMember,
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "JWKS document of {n} bytes exceeds {MAX_JWKS_BYTES}"),
            Self::NotJson(e) => write!(f, "JWKS document is not valid JSON: {e}"),
            Self::NoKeysMember => f.write_str("JWKS document has no `keys` array"),
        }
    }
}

/// Which key a token's header points at.
#[derive(Debug)]
pub enum KeySelection<'a> {
    Found(&'a VerifyingKey),
    /// The `kid` is not in this set: maybe the issuer rotated keys and we should refetch.
    UnknownKid,
    /// No `kid` and more than one key: ambiguous, rejected rather than trying every key.
    KidRequired,
    NoKeys,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    pub fn parse(doc: &[u8]) -> Result<KeySet, JwksError> {
        if doc.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge(doc.len()));
        }
        let raw: RawSet =
            serde_json::from_slice(doc).map_err(|e| JwksError::NotJson(e.to_string()))?;
        let entries = raw.keys.ok_or(JwksError::NoKeysMember)?;
        let mut set = KeySet::default();
        for (i, entry) in entries.into_iter().enumerate() {
            if set.keys.len() >= MAX_KEYS {
                set.skipped
                    .push(format!("keys beyond the first {MAX_KEYS} ignored"));
                break;
            }
            let label = entry
                .get("kid")
                .and_then(|k| k.as_str())
                .map(|k| format!("kid {}", sanitize(k)))
                .unwrap_or_else(|| format!("key #{i}"));
            match parse_key(entry) {
                Ok(key) => {
                    if key.kid.is_some() && set.keys.iter().any(|k| k.kid == key.kid) {
                        set.skipped.push(format!("{label}: duplicate kid"));
                    } else {
                        set.keys.push(key);
                    }
                }
                Err(reason) => set.skipped.push(format!("{label}: {reason}")),
            }
        }
        Ok(set)
    }

    pub fn select(&self, kid: Option<&str>) -> KeySelection<'_> {
        if self.keys.is_empty() {
            return KeySelection::NoKeys;
        }
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .map_or(KeySelection::UnknownKid, KeySelection::Found),
            None if self.keys.len() == 1 => KeySelection::Found(&self.keys[0]),
            None => KeySelection::KidRequired,
        }
    }
}

/// Key ids come from the network; keep log lines printable and short.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn parse_key(entry: serde_json::Value) -> Result<VerifyingKey, String> {
    let jwk: RawJwk = serde_json::from_value(entry).map_err(|e| format!("malformed JWK: {e}"))?;
    if let Some(u) = &jwk.key_use {
        if u != "sig" {
            return Err(format!("use {} is not \"sig\"", sanitize(u)));
        }
    }
    // RFC 7517 §4.3: a key whose operations exclude `verify` is not for checking signatures
    // (with `use` as well, both must agree, so each is checked on its own).
    if let Some(ops) = &jwk.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("key_ops does not include \"verify\"".to_string());
        }
    }
    if jwk.kty == "EC" {
        return parse_ec_key(jwk);
    }
    if jwk.kty != "RSA" {
        return Err(format!("unsupported kty {}", sanitize(&jwk.kty)));
    }
    let alg = match jwk.alg.as_deref() {
        None => JwsAlgorithm::Rs256,
        Some(name) => JwsAlgorithm::from_name(name)
            .filter(|a| *a != JwsAlgorithm::Es256)
            .ok_or_else(|| format!("unsupported alg {} for an RSA key", sanitize(name)))?,
    };
    let n = decode_uint("n", jwk.n.as_deref())?;
    let e = decode_uint("e", jwk.e.as_deref())?;
    // Size limits, odd modulus, 3 <= e <= 2^33 - 1, odd e: see `RsaVerifyingKey::from_components`.
    let key = RsaVerifyingKey::from_components(&n, &e).map_err(|err| err.to_string())?;
    Ok(VerifyingKey {
        kid: jwk.kid,
        alg,
        key: PublicKeyMaterial::Rsa(key),
    })
}

/// An EC JWK: only P-256, only ES256 (an `alg`, if given, must say so).
fn parse_ec_key(jwk: RawJwk) -> Result<VerifyingKey, String> {
    if jwk.crv.as_deref() != Some("P-256") {
        return Err(format!(
            "unsupported curve {}",
            sanitize(jwk.crv.as_deref().unwrap_or("(none)"))
        ));
    }
    if !matches!(jwk.alg.as_deref(), None | Some("ES256")) {
        return Err(format!(
            "unsupported alg {} for a P-256 key",
            sanitize(jwk.alg.as_deref().unwrap_or(""))
        ));
    }
    let coordinate = |name: &str, v: &Option<String>| -> Result<Vec<u8>, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(v.as_deref().ok_or_else(|| format!("missing `{name}`"))?)
            .map_err(|_| format!("`{name}` is not base64url"))?;
        if bytes.len() != 32 {
            return Err(format!("`{name}` is not 32 bytes"));
        }
        Ok(bytes)
    };
    let mut sec1 = vec![0x04];
    sec1.extend(coordinate("x", &jwk.x)?);
    sec1.extend(coordinate("y", &jwk.y)?);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| "the point is not on P-256".to_string())?;
    Ok(VerifyingKey {
        kid: jwk.kid,
        alg: JwsAlgorithm::Es256,
        key: PublicKeyMaterial::P256(key),
    })
}

fn decode_uint(name: &str, value: Option<&str>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("missing `{name}`"))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| format!("`{name}` is not base64url"))?;
    // Leading zero octets are not allowed by RFC 7518 but some issuers emit them; the value is the
    // same number either way.
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let trimmed = bytes[first..].to_vec();
    if trimmed.is_empty() {
        return Err(format!("`{name}` is zero"));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn test_n() -> String {
        crate::test_keys::k1_modulus()
    }

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": test_n(), "e": "AQAB"})
    }

    #[test]
    fn parses_okta_style_key_set() {
        let doc = json!({"keys": [rsa_jwk("k1"), rsa_jwk("k2")]}).to_string();
        let set = KeySet::parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 2);
        assert!(set.skipped.is_empty());
        assert!(
            matches!(set.select(Some("k2")), KeySelection::Found(k) if k.kid.as_deref() == Some("k2"))
        );
        assert!(matches!(set.select(Some("nope")), KeySelection::UnknownKid));
        assert!(matches!(set.select(None), KeySelection::KidRequired));
    }

    #[test]
    fn single_key_may_be_selected_without_kid() {
        let doc = json!({"keys": [rsa_jwk("only")]}).to_string();
        let set = KeySet::parse(doc.as_bytes()).unwrap();
        assert!(matches!(set.select(None), KeySelection::Found(_)));
    }

    #[test]
    fn p256_keys_are_bound_to_es256() {
        let set = KeySet::parse(
            json!({"keys": [crate::test_keys::es256_jwk("ec")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.keys[0].alg, JwsAlgorithm::Es256);
        let mut rs = crate::test_keys::es256_jwk("ec");
        rs["alg"] = json!("RS256");
        assert!(KeySet::parse(json!({"keys": [rs]}).to_string().as_bytes())
            .unwrap()
            .keys
            .is_empty());
    }

    #[test]
    fn key_without_alg_is_bound_to_rs256() {
        let mut k = rsa_jwk("k");
        k.as_object_mut().unwrap().remove("alg");
        let set = KeySet::parse(json!({"keys": [k]}).to_string().as_bytes()).unwrap();
        assert_eq!(set.keys[0].alg, JwsAlgorithm::Rs256);
    }

    #[test]
    fn malformed_keys_are_skipped_and_the_rest_kept() {
        let bad = vec![
            json!({"kty": "RSA", "kid": "no-n", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "bad-b64", "n": "***", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"}),
            json!({"kty": "EC", "kid": "off-curve", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])}),
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": test_n(), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "hs", "alg": "HS256", "n": test_n(), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "none", "alg": "none", "n": test_n(), "e": "AQAB"}),
            json!({"kty": 5}),
            json!("not an object"),
            json!({"kty": "RSA", "kid": "good", "n": test_n(), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "good", "n": test_n(), "e": "AQAB"}),
        ];
        let set = KeySet::parse(json!({ "keys": bad }).to_string().as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("good"));
        assert_eq!(set.skipped.len(), 12, "{:?}", set.skipped);
    }

    /// RFC 7517 §4.2–4.3: only keys whose `use`/`key_ops` allow verification are used (Entra
    /// ID publishes `use: sig`; others may publish `key_ops`).
    #[test]
    fn keys_whose_use_or_key_ops_exclude_verification_are_not_used() {
        let key = |kid: &str, extra: serde_json::Value| {
            let mut k = json!({"kty": "RSA", "kid": kid, "n": test_n(), "e": "AQAB"});
            for (name, v) in extra.as_object().into_iter().flatten() {
                k[name] = v.clone();
            }
            k
        };
        let keys = vec![
            key("sig", json!({"use": "sig"})),
            key("verify", json!({"key_ops": ["verify"]})),
            key("both", json!({"use": "sig", "key_ops": ["sign", "verify"]})),
            key("sign-only", json!({"key_ops": ["sign"]})),
            key("encrypt", json!({"key_ops": ["encrypt", "wrapKey"]})),
            key("no-ops", json!({"key_ops": []})),
            key("disagree", json!({"use": "sig", "key_ops": ["decrypt"]})),
            key("enc-verify", json!({"use": "enc", "key_ops": ["verify"]})),
            key("ops-string", json!({"key_ops": "verify"})),
            key("upper", json!({"key_ops": ["VERIFY"]})),
        ];
        let set = KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap();
        let used: Vec<_> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(used, ["sig", "verify", "both"], "{:?}", set.skipped);
        assert_eq!(set.skipped.len(), 7);
    }

    #[test]
    fn rejects_documents_that_are_not_key_sets() {
        assert!(matches!(KeySet::parse(b"nope"), Err(JwksError::NotJson(_))));
        assert!(matches!(KeySet::parse(b"{}"), Err(JwksError::NoKeysMember)));
        assert!(matches!(
            KeySet::parse(b"{\"keys\": 3}"),
            Err(JwksError::NotJson(_))
        ));
        let huge = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(matches!(KeySet::parse(&huge), Err(JwksError::TooLarge(_))));
    }

    #[test]
    fn sanitize_keeps_logs_printable() {
        assert_eq!(sanitize("a\nb\u{7}c"), "a?b?c");
        assert_eq!(sanitize(&"x".repeat(500)).len(), 64);
    }
}
