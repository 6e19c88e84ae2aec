//! JWTs a client signs with its own key: RFC 7523 client assertions (`private_key_jwt`) and
//! RFC 8693 actor tokens.
//!
//! The IdP side ([`ClientKeys`], [`check_client_jwt`]) verifies RS256 (RSA ≥ 2048 bits) and
//! ES256 (P-256) signatures against the public keys registered for the client
//! ([`super::ClientConfig::jwks`]) and checks the claims the way Okta documents them for
//! `private_key_jwt`: `iss` = `sub` = client id, `aud` = the token endpoint URL (the AS issuer is
//! accepted too), `exp` required and at most one hour ahead, `jti` required and never reused.
//!
//! The client side ([`ClientSigningKey`]) is what tests use to play the gateway: generate a key,
//! register its public JWK Set with the IdP, sign assertions.

use anyhow::{anyhow, bail, Context as _};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use rand::Rng as _;
use rsa::sha2::Sha256;
use rsa::traits::PublicKeyParts as _;
use rsa::{BoxedUint, PrivateKey, PublicKey};
use serde_json::{json, Map, Value};

use super::keys::{b64, b64_decode, parse_jws, random_b64};

/// `client_assertion_type` of RFC 7523 §2.2.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The token type of a JWT (RFC 8693 §3): the only `actor_token_type` the IdP accepts.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Okta refuses client assertions whose `exp` is more than one hour ahead.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 3600;
/// Tolerance for `iat`/`nbf` slightly in the future (clocks of client and IdP differ).
const CLOCK_SKEW_SECS: i64 = 60;

/// The signature algorithms a client key may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKeyAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA-2048.
    Rs256,
    /// ECDSA P-256 with SHA-256; JWS signature is `r || s` (64 bytes).
    Es256,
}

impl ClientKeyAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKeyAlg::Rs256 => "RS256",
            ClientKeyAlg::Es256 => "ES256",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verifying (the IdP)
// ---------------------------------------------------------------------------------------------

enum PublicClientKey {
    Rsa(Box<PublicKey>),
    P256(p256::ecdsa::VerifyingKey),
}

struct RegisteredKey {
    kid: Option<String>,
    alg: ClientKeyAlg,
    key: PublicClientKey,
}

/// The parsed public keys of one client.
pub(crate) struct ClientKeys {
    keys: Vec<RegisteredKey>,
}

impl ClientKeys {
    /// Parses a JWK Set (`{"keys": [...]}`; a single JWK object is accepted too). Every key must
    /// be usable: an RSA key (`n`, `e`, ≥ 2048 bits) or an EC P-256 key (`crv`, `x`, `y`); keys
    /// marked `"use": "enc"` are refused. A private part (`d`) is refused: register public keys.
    pub(crate) fn parse(jwks: &Value) -> anyhow::Result<Self> {
        let list: Vec<&Value> = match jwks.get("keys") {
            Some(Value::Array(keys)) => keys.iter().collect(),
            Some(_) => bail!("`keys` is not an array"),
            None if jwks.get("kty").is_some() => vec![jwks],
            None => bail!("not a JWK Set: no `keys`"),
        };
        if list.is_empty() {
            bail!("the JWK Set holds no key");
        }
        let mut keys = Vec::new();
        for (i, jwk) in list.into_iter().enumerate() {
            keys.push(parse_public_jwk(jwk).with_context(|| format!("keys[{i}]"))?);
        }
        Ok(Self { keys })
    }

    /// Checks a compact JWS signed by one of these keys (RS256 or ES256 only; `none` and HMAC
    /// never). The header's `kid`, when present, must name a registered key; without `kid`
    /// every key of the header's algorithm is tried. Returns the claims.
    fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        let jws = parse_jws(token).ok_or("not a compact JWS with JSON header and claims")?;
        let alg = match jws.header.get("alg").and_then(Value::as_str) {
            Some("RS256") => ClientKeyAlg::Rs256,
            Some("ES256") => ClientKeyAlg::Es256,
            Some(other) => return Err(format!("algorithm {other:?} is not accepted")),
            None => return Err("no `alg` in the header".into()),
        };
        if jws.header.contains_key("crit") {
            return Err("`crit` header parameters are not supported".into());
        }
        let kid = match jws.header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err("`kid` is not a string".into()),
        };
        let candidates: Vec<&RegisteredKey> = self
            .keys
            .iter()
            .filter(|k| k.alg == alg)
            .filter(|k| match kid {
                Some(kid) => k.kid.as_deref() == Some(kid),
                None => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(match kid {
                Some(kid) => format!("no registered {} key with kid {kid:?}", alg.as_str()),
                None => format!("no registered {} key", alg.as_str()),
            });
        }
        let input = jws.signing_input.as_bytes();
        let valid = candidates.iter().any(|k| match &k.key {
            PublicClientKey::Rsa(key) => {
                key.pkcs1v15_verify::<Sha256>(input, &jws.signature).is_ok()
            }
            PublicClientKey::P256(key) => p256::ecdsa::Signature::from_slice(&jws.signature)
                .is_ok_and(|sig| key.verify(input, &sig).is_ok()),
        });
        if !valid {
            return Err("the signature does not verify with the registered key".into());
        }
        Ok(jws.claims)
    }
}

fn jwk_bytes(jwk: &Value, member: &str) -> anyhow::Result<Vec<u8>> {
    let text = jwk
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("`{member}` is missing or not a string"))?;
    b64_decode(text).ok_or_else(|| anyhow!("`{member}` is not base64url"))
}

fn parse_public_jwk(jwk: &Value) -> anyhow::Result<RegisteredKey> {
    if jwk.get("d").is_some() {
        bail!("holds a private key (`d`): register the public key only");
    }
    if jwk.get("use").and_then(Value::as_str) == Some("enc") {
        bail!("is an encryption key (`use`: `enc`)");
    }
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => bail!("`kid` is not a string"),
    };
    let declared = jwk.get("alg").and_then(Value::as_str);
    let (alg, key) = match jwk.get("kty").and_then(Value::as_str) {
        Some("RSA") => {
            let n = jwk_bytes(jwk, "n")?;
            let e = jwk_bytes(jwk, "e")?;
            let key = PublicKey::new(
                BoxedUint::from_be_slice_vartime(&n),
                BoxedUint::from_be_slice_vartime(&e),
            )
            .context("invalid RSA public key")?;
            if key.size() < 256 {
                bail!("RSA keys must be at least 2048 bits");
            }
            (ClientKeyAlg::Rs256, PublicClientKey::Rsa(Box::new(key)))
        }
        Some("EC") => {
            if jwk.get("crv").and_then(Value::as_str) != Some("P-256") {
                bail!("only EC keys on P-256 are supported");
            }
            let x = jwk_bytes(jwk, "x")?;
            let y = jwk_bytes(jwk, "y")?;
            if x.len() != 32 || y.len() != 32 {
                bail!("P-256 coordinates must be 32 bytes each");
            }
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(0x04);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                .map_err(|_| anyhow!("the point is not on P-256"))?;
            (ClientKeyAlg::Es256, PublicClientKey::P256(key))
        }
        Some(other) => bail!("unsupported key type {other:?}"),
        None => bail!("`kty` is missing"),
    };
    if let Some(declared) = declared {
        if declared != alg.as_str() {
            bail!(
                "`alg` {declared:?} does not fit the key (expected {})",
                alg.as_str()
            );
        }
    }
    Ok(RegisteredKey { kid, alg, key })
}

/// What a client-signed JWT must satisfy besides its signature.
pub(crate) struct JwtRules<'a> {
    pub(crate) client_id: &'a str,
    /// Accepted `aud` values (one of them must be in the claim).
    pub(crate) audiences: &'a [String],
    pub(crate) now: i64,
    /// `exp - now` may not exceed this.
    pub(crate) max_lifetime_secs: Option<i64>,
    pub(crate) require_jti: bool,
}

/// The checked claims of a client-signed JWT.
pub(crate) struct ClientJwt {
    pub(crate) jti: Option<String>,
    pub(crate) exp: i64,
}

/// Verifies a JWT the client signed with its registered key against `rules`. The error is a
/// description for logs and `error_description` (never the token).
pub(crate) fn check_client_jwt(
    keys: &ClientKeys,
    token: &str,
    rules: &JwtRules<'_>,
) -> Result<ClientJwt, String> {
    let claims = keys.verify(token)?;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(rules.client_id) {
        return Err("`iss` must be the client id".into());
    }
    if text("sub") != Some(rules.client_id) {
        return Err("`sub` must be the client id".into());
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => rules.audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| rules.audiences.iter().any(|x| x == a)),
        _ => false,
    };
    if !aud_ok {
        return Err("`aud` must be the token endpoint URL".into());
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or("`exp` is required (a number)")?;
    if exp <= rules.now {
        return Err("the JWT is expired".into());
    }
    if let Some(max) = rules.max_lifetime_secs {
        if exp - rules.now > max {
            return Err(format!("`exp` may be at most {max} seconds in the future"));
        }
    }
    for name in ["iat", "nbf"] {
        if let Some(v) = claims.get(name) {
            match v.as_i64() {
                Some(t) if t <= rules.now + CLOCK_SKEW_SECS => {}
                Some(_) => return Err(format!("`{name}` is in the future")),
                None => return Err(format!("`{name}` is not a number")),
            }
        }
    }
    let jti = match claims.get("jti") {
        Some(Value::String(j)) if !j.is_empty() => Some(j.clone()),
        None if !rules.require_jti => None,
        _ => return Err("`jti` is required (a non-empty string)".into()),
    };
    Ok(ClientJwt { jti, exp })
}

// ---------------------------------------------------------------------------------------------
// Signing (tests playing the gateway)
// ---------------------------------------------------------------------------------------------

enum PrivateClientKey {
    Rsa(Box<PrivateKey>),
    P256(p256::ecdsa::SigningKey),
}

/// A client's own key pair, for `private_key_jwt` assertions and actor tokens in tests.
pub struct ClientSigningKey {
    alg: ClientKeyAlg,
    kid: String,
    key: PrivateClientKey,
}

impl ClientSigningKey {
    /// A fresh key (RSA-2048 for RS256, P-256 for ES256) with a random `kid`. RSA generation is
    /// CPU-bound (tens to hundreds of milliseconds).
    pub fn generate(alg: ClientKeyAlg) -> anyhow::Result<Self> {
        let key = match alg {
            ClientKeyAlg::Rs256 => PrivateClientKey::Rsa(Box::new(
                PrivateKey::new(&mut rand::rng(), super::keys::KEY_BITS)
                    .context("generating an RSA key")?,
            )),
            ClientKeyAlg::Es256 => {
                // A random scalar; from_slice refuses 0 and values ≥ n (astronomically rare).
                let mut tries = 0;
                loop {
                    let mut bytes = [0u8; 32];
                    rand::rng().fill_bytes(&mut bytes);
                    if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&bytes) {
                        break PrivateClientKey::P256(k);
                    }
                    tries += 1;
                    if tries > 16 {
                        bail!("could not generate a P-256 key");
                    }
                }
            }
        };
        Ok(Self {
            alg,
            kid: random_b64(16),
            key,
        })
    }

    pub fn alg(&self) -> ClientKeyAlg {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`kty`, `kid`, `alg`, `use`: `sig`, and `n`/`e` or `crv`/`x`/`y`).
    pub fn public_jwk(&self) -> Value {
        match &self.key {
            PrivateClientKey::Rsa(k) => {
                let public = k.to_public_key();
                json!({
                    "kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                    "n": b64(&public.n_bytes()), "e": b64(&public.e_bytes()),
                })
            }
            PrivateClientKey::P256(k) => {
                let point = k.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "kid": self.kid, "alg": "ES256", "use": "sig", "crv": "P-256",
                    "x": b64(point.x().map(|x| x.as_slice()).unwrap_or_default()),
                    "y": b64(point.y().map(|y| y.as_slice()).unwrap_or_default()),
                })
            }
        }
    }

    /// `{"keys": [public JWK]}`: what [`super::ClientConfig::jwks`] takes.
    pub fn public_jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk()] })
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the usual format for a key
    /// handed to a process through its environment.
    pub fn private_key_pem(&self) -> anyhow::Result<String> {
        let der = match &self.key {
            PrivateClientKey::Rsa(k) => {
                use rsa::pkcs8::EncodePrivateKey as _;
                k.to_pkcs8_der()
                    .map_err(|e| anyhow!("PKCS#8 encoding: {e}"))?
                    .as_bytes()
                    .to_vec()
            }
            PrivateClientKey::P256(k) => {
                use p256::pkcs8::EncodePrivateKey as _;
                k.to_pkcs8_der()
                    .map_err(|e| anyhow!("PKCS#8 encoding: {e}"))?
                    .as_bytes()
                    .to_vec()
            }
        };
        Ok(pem("PRIVATE KEY", &der))
    }

    /// The private key as a JWK (the public members plus `d`, and for RSA `p`, `q`).
    pub fn private_jwk(&self) -> Value {
        let mut jwk = self.public_jwk();
        match &self.key {
            PrivateClientKey::Rsa(k) => {
                use rsa::traits::PrivateKeyParts as _;
                jwk["d"] = b64(&k.d().to_be_bytes_trimmed_vartime()).into();
                let primes = k.primes();
                if primes.len() == 2 {
                    jwk["p"] = b64(&primes[0].to_be_bytes_trimmed_vartime()).into();
                    jwk["q"] = b64(&primes[1].to_be_bytes_trimmed_vartime()).into();
                }
            }
            PrivateClientKey::P256(k) => {
                jwk["d"] = b64(k.to_bytes().as_slice()).into();
            }
        }
        jwk
    }

    /// A compact JWS over exactly these header and claims bytes.
    pub fn sign_raw(&self, header_json: &[u8], claims_json: &[u8]) -> anyhow::Result<String> {
        let input = format!("{}.{}", b64(header_json), b64(claims_json));
        let signature = match &self.key {
            PrivateClientKey::Rsa(k) => k
                .pkcs1v15_sign::<Sha256>(input.as_bytes())
                .context("RS256 signing")?,
            PrivateClientKey::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(input.as_bytes());
                sig.to_bytes().to_vec()
            }
        };
        Ok(format!("{input}.{}", b64(&signature)))
    }

    /// A compact JWS of `claims` with header `{"alg", "kid", "typ": "JWT"}`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({ "alg": self.alg.as_str(), "kid": self.kid, "typ": "JWT" });
        self.sign_raw(&serde_json::to_vec(&header)?, &serde_json::to_vec(claims)?)
    }

    /// An RFC 7523 client assertion for `client_id` at `audience` (the token endpoint URL),
    /// valid for `ttl_secs`, with a fresh `jti`.
    pub fn client_assertion(
        &self,
        client_id: &str,
        audience: &str,
        ttl_secs: i64,
    ) -> anyhow::Result<String> {
        self.sign(&client_jwt_claims(client_id, audience, ttl_secs))
    }
}

/// The claims of a client assertion or actor token: `iss` = `sub` = `client_id`, `aud`, `iat`,
/// `exp` = now + `ttl_secs`, a random `jti`.
pub fn client_jwt_claims(client_id: &str, audience: &str, ttl_secs: i64) -> Value {
    let now = super::now_secs();
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now.saturating_add(ttl_secs),
        "jti": random_b64(16),
    })
}

/// RFC 7468 textual encoding.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
