//! The gateway's own signing key, for `private_key_jwt` client authentication (RFC 7523 client
//! assertions) and RFC 8693 actor tokens: short-lived JWTs in which the gateway names itself.
//!
//! The key comes as a private JWK (what Okta's admin console generates for an API Services app),
//! RSA (RS256) or EC P-256 (ES256), from an environment variable, never from the config.
//!
//! RSA keys need the `rsa-client-key` feature (`make wasm-full`): the `rsa` crate's bignum code
//! is ~240 KB, a third of the module, and the default module must stay under 600 KiB. Without
//! the feature an RSA key is refused at config load, saying which build signs with it.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
#[cfg(feature = "rsa-client-key")]
use rsa::{BoxedUint, Pkcs1v15Sign, PrivateKey};
use serde::Deserialize;
use serde_json::json;
#[cfg(feature = "rsa-client-key")]
use sha2::{Digest, Sha256};

/// How long a client assertion or actor token is valid. Okta allows at most an hour; a minute
/// covers clock skew and the request's flight.
pub const ASSERTION_LIFETIME_SECONDS: i64 = 60;

enum KeyMaterial {
    #[cfg(feature = "rsa-client-key")]
    Rsa(Box<PrivateKey>),
    P256(p256::ecdsa::SigningKey),
}

pub struct ClientKey {
    kid: Option<String>,
    key: KeyMaterial,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct PrivateJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[cfg(feature = "rsa-client-key")]
    #[serde(default)]
    n: Option<String>,
    #[cfg(feature = "rsa-client-key")]
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    d: Option<String>,
    #[cfg(feature = "rsa-client-key")]
    #[serde(default)]
    p: Option<String>,
    #[cfg(feature = "rsa-client-key")]
    #[serde(default)]
    q: Option<String>,
}

/// Why this build refuses an RSA client key, and what to use instead.
#[cfg(not(feature = "rsa-client-key"))]
pub const RSA_NEEDS_FULL_BUILD: &str = "is an RSA private key (RS256), which this build of the \
    filter cannot sign with: use an EC P-256 private JWK (ES256), or the module built with the \
    `rsa-client-key` feature (mcp_token_exchange_full.wasm, `make wasm-full`)";

/// The key types this build signs with, for the error on any other.
#[cfg(feature = "rsa-client-key")]
const SUPPORTED_KEYS: &str = "RSA or EC P-256";
#[cfg(not(feature = "rsa-client-key"))]
const SUPPORTED_KEYS: &str = "EC P-256 (RSA needs the `rsa-client-key` build)";

fn b64_field(name: &str, value: &Option<String>) -> Result<Vec<u8>, String> {
    let v = value
        .as_deref()
        .ok_or_else(|| format!("the private JWK has no `{name}`"))?;
    URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|_| format!("`{name}` of the private JWK is not base64url"))
}

impl ClientKey {
    /// Parses a private JWK. Errors never contain key material.
    pub fn from_jwk(text: &str) -> Result<ClientKey, String> {
        let jwk: PrivateJwk = serde_json::from_str(text)
            .map_err(|_| "the client key is not a JSON Web Key".to_string())?;
        let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            #[cfg(not(feature = "rsa-client-key"))]
            ("RSA", _) => return Err(RSA_NEEDS_FULL_BUILD.to_string()),
            #[cfg(feature = "rsa-client-key")]
            ("RSA", _) => {
                let n = b64_field("n", &jwk.n)?;
                let e = b64_field("e", &jwk.e)?;
                let d = b64_field("d", &jwk.d)?;
                let p = b64_field("p", &jwk.p)?;
                let q = b64_field("q", &jwk.q)?;
                if n.len() < 256 {
                    return Err("RSA client keys must be at least 2048 bits".into());
                }
                let bits = (n.len() * 8) as u32;
                let uint = |b: &[u8]| {
                    BoxedUint::from_be_slice(b, bits)
                        .map_err(|_| "RSA key component out of range".to_string())
                };
                let key = PrivateKey::from_components(
                    uint(&n)?,
                    uint(&e)?,
                    uint(&d)?,
                    vec![uint(&p)?, uint(&q)?],
                )
                .map_err(|_| "the RSA private key is inconsistent".to_string())?;
                KeyMaterial::Rsa(Box::new(key))
            }
            ("EC", Some("P-256")) => {
                let d = b64_field("d", &jwk.d)?;
                let key = p256::ecdsa::SigningKey::from_slice(&d)
                    .map_err(|_| "invalid P-256 private key".to_string())?;
                KeyMaterial::P256(key)
            }
            (kty, crv) => {
                return Err(format!(
                    "unsupported client key type {} {}; use {SUPPORTED_KEYS}",
                    crate::jwks::sanitize(kty),
                    crate::jwks::sanitize(crv.unwrap_or(""))
                ))
            }
        };
        Ok(ClientKey { kid: jwk.kid, key })
    }

    pub fn alg(&self) -> &'static str {
        match self.key {
            #[cfg(feature = "rsa-client-key")]
            KeyMaterial::Rsa(_) => "RS256",
            KeyMaterial::P256(_) => "ES256",
        }
    }

    /// A compact JWS of `claims`, signed with this key.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.key {
            #[cfg(feature = "rsa-client-key")]
            KeyMaterial::Rsa(key) => key
                .sign(
                    Pkcs1v15Sign::new::<Sha256>(),
                    &Sha256::digest(input.as_bytes()),
                )
                .map_err(|_| "RS256 signing failed".to_string())?,
            KeyMaterial::P256(key) => {
                let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
                sig.to_bytes().to_vec()
            }
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// A JWT in which the gateway (client `client_id`) speaks for itself to `audience`: the RFC
    /// 7523 client assertion and the RFC 8693 actor token share this shape.
    pub fn self_signed(
        &self,
        client_id: &str,
        audience: &str,
        now: i64,
        jti: &str,
    ) -> Result<String, String> {
        self.sign(&json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "jti": jti,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::ChaCha8Rng;
    use rand::SeedableRng;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    use rsa::PrivateKey;

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn decode(jwt: &str, part: usize) -> serde_json::Value {
        serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(jwt.split('.').nth(part).unwrap())
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn es256_assertions_verify_with_the_public_key() {
        let d = [7u8; 32];
        let jwk =
            json!({"kty": "EC", "crv": "P-256", "kid": "gw-1", "d": b64(&d), "x": "", "y": ""});
        let key = ClientKey::from_jwk(&jwk.to_string()).unwrap();
        let jwt = key
            .self_signed("gw", "https://idp/oauth2/b/v1/token", 1000, "j1")
            .unwrap();
        assert_eq!(decode(&jwt, 0)["alg"], "ES256");
        assert_eq!(decode(&jwt, 0)["kid"], "gw-1");
        let claims = decode(&jwt, 1);
        assert_eq!(claims["iss"], "gw");
        assert_eq!(claims["sub"], "gw");
        assert_eq!(claims["exp"], 1060);
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let verifying = p256::ecdsa::SigningKey::from_slice(&d)
            .unwrap()
            .verifying_key()
            .to_owned();
        let sig =
            p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        use p256::ecdsa::signature::Verifier;
        assert!(verifying.verify(input.as_bytes(), &sig).is_ok());
        assert!(!format!("{key:?}").contains(&b64(&d)));
    }

    /// A private JWK of a fixed-seed RSA-2048 key.
    fn rsa_jwk() -> (PrivateKey, String) {
        let mut rng = ChaCha8Rng::from_seed([3; 32]);
        let private = PrivateKey::new(&mut rng, 2048).unwrap();
        let primes = private.primes();
        let jwk = json!({
            "kty": "RSA", "n": b64(&private.n().to_be_bytes()), "e": b64(&private.e().to_be_bytes()),
            "d": b64(&private.d().to_be_bytes()), "p": b64(&primes[0].to_be_bytes()), "q": b64(&primes[1].to_be_bytes()),
        });
        (private, jwk.to_string())
    }

    #[cfg(not(feature = "rsa-client-key"))]
    #[test]
    fn rsa_keys_are_refused_naming_the_build_that_signs_with_them() {
        let (private, jwk) = rsa_jwk();
        let e = ClientKey::from_jwk(&jwk).unwrap_err();
        assert_eq!(e, RSA_NEEDS_FULL_BUILD);
        assert!(e.contains("rsa-client-key") && e.contains("P-256"), "{e}");
        assert!(!e.contains(&b64(&private.d().to_be_bytes())));
    }

    #[cfg(feature = "rsa-client-key")]
    #[test]
    fn rs256_assertions_verify_with_the_public_key() {
        use rsa::Pkcs1v15Sign;
        use sha2::{Digest, Sha256};
        let (private, jwk) = rsa_jwk();
        let key = ClientKey::from_jwk(&jwk).unwrap();
        let jwt = key.self_signed("gw", "aud", 5, "j").unwrap();
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let public = private.to_public_key();
        assert!(public
            .verify(
                Pkcs1v15Sign::new::<Sha256>(),
                &Sha256::digest(input.as_bytes()),
                &URL_SAFE_NO_PAD.decode(sig).unwrap()
            )
            .is_ok());
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for bad in [
            "not json".to_string(),
            json!({"kty": "oct", "k": "c2VjcmV0"}).to_string(),
            json!({"kty": "EC", "crv": "P-384", "d": "AAAA"}).to_string(),
            json!({"kty": "EC", "crv": "P-256", "d": b64(&[0u8; 32])}).to_string(),
            json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB", "p": "AQAB", "q": "AQAB"})
                .to_string(),
            json!({"kty": "EC", "crv": "P-256"}).to_string(),
        ] {
            let e = ClientKey::from_jwk(&bad).unwrap_err();
            assert!(!e.contains("c2VjcmV0"), "{e}");
        }
    }
}
