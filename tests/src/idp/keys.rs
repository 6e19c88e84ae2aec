//! RSA signing keys, JWKs and compact JWS (RS256) for the IdP.

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::Rng as _;
use rsa::sha2::Sha256;
use rsa::traits::PublicKeyParts as _;
use rsa::{PrivateKey, PublicKey};
use serde_json::{json, Value};

/// Modulus size of every key the IdP generates (Okta's authorization servers use RSA-2048).
pub(crate) const KEY_BITS: usize = 2048;

/// One RS256 signing key of an authorization server.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    private: PrivateKey,
    public: PublicKey,
    jwk: Value,
}

impl SigningKey {
    /// Generates a fresh RSA-2048 key with a random `kid`. CPU-bound: call from a blocking task
    /// when on a runtime that must stay responsive.
    pub(crate) fn generate() -> anyhow::Result<Self> {
        let private =
            PrivateKey::new(&mut rand::rng(), KEY_BITS).context("generating an RSA key")?;
        let public = private.to_public_key();
        // Okta's kids are 43 base64url characters (a 256-bit value); look alike.
        let kid = random_b64(32);
        let jwk = json!({
            "kty": "RSA",
            "alg": "RS256",
            "kid": kid,
            "use": "sig",
            "e": b64(&public.e_bytes()),
            "n": b64(&public.n_bytes()),
        });
        Ok(Self {
            kid,
            private,
            public,
            jwk,
        })
    }

    /// The public half as a JWK (`kty`, `alg`, `kid`, `use`, `e`, `n`).
    pub(crate) fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256 over `input`.
    pub(crate) fn sign(&self, input: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.private
            .pkcs1v15_sign::<Sha256>(input)
            .context("RS256 signing")
    }

    /// Checks an RS256 signature made by this key.
    pub(crate) fn verify(&self, input: &[u8], signature: &[u8]) -> bool {
        self.public
            .pkcs1v15_verify::<Sha256>(input, signature)
            .is_ok()
    }

    /// A compact JWS over the exact `header_json` and `claims_json` bytes.
    pub(crate) fn sign_compact(
        &self,
        header_json: &[u8],
        claims_json: &[u8],
    ) -> anyhow::Result<String> {
        let signing_input = format!("{}.{}", b64(header_json), b64(claims_json));
        let signature = self.sign(signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", b64(&signature)))
    }

    /// A compact JWS of `claims` with Okta's header: `{"kid":"…","alg":"RS256"}` (no `typ`).
    pub(crate) fn sign_claims(
        &self,
        claims: &serde_json::Map<String, Value>,
    ) -> anyhow::Result<String> {
        // Built by hand to keep Okta's member order (kid first).
        let header = format!(
            "{{\"kid\":{},\"alg\":\"RS256\"}}",
            serde_json::to_string(&self.kid)?
        );
        let claims = serde_json::to_vec(claims)?;
        self.sign_compact(header.as_bytes(), &claims)
    }
}

/// base64url without padding.
pub(crate) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding (the JWS form); tolerates trailing `=`.
pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

/// `n` random bytes, base64url-encoded.
pub(crate) fn random_b64(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    b64(&bytes)
}

/// A compact JWS split into its parts, nothing verified yet.
pub(crate) struct ParsedJws {
    pub(crate) header: serde_json::Map<String, Value>,
    pub(crate) claims: serde_json::Map<String, Value>,
    pub(crate) signing_input: String,
    pub(crate) signature: Vec<u8>,
}

/// Splits and decodes a compact JWS. `None` for anything that is not three base64url parts with
/// JSON-object header and payload.
pub(crate) fn parse_jws(token: &str) -> Option<ParsedJws> {
    let mut parts = token.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header = match serde_json::from_slice::<Value>(&b64_decode(h)?).ok()? {
        Value::Object(map) => map,
        _ => return None,
    };
    let claims = match serde_json::from_slice::<Value>(&b64_decode(c)?).ok()? {
        Value::Object(map) => map,
        _ => return None,
    };
    let signature = b64_decode(s)?;
    Some(ParsedJws {
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature,
    })
}
