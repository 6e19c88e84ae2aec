//! Inbound JWT verification: structure, signature (algorithm bound to the key), then claims.
//!
//! `jwt-compact` parses the compact form and runs the signature check through its `Algorithm`
//! trait, implemented here over our own public-key RSA (`rsa_public`, several times faster in
//! Wasm than the `rsa` crates) and `p256`. Claims are decoded with a strict struct of our own so
//! that duplicate claim names and wrongly typed registered claims are rejected, not coerced.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_compact::{Algorithm, AlgorithmSignature, UntrustedToken};
use p256::ecdsa::signature::Verifier as _;
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::claims::InboundClaims;
use crate::config::Provider;
use crate::jwks::{JwsAlgorithm, KeySelection, KeySet, PublicKeyMaterial};
use crate::rsa_public::HashAlg;

/// Why a token was refused. Every variant maps to `401 invalid_token`; the descriptions are
/// generic on purpose (they go to the client) and never echo token contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Encrypted,
    UnsupportedHeader,
    KidRequired,
    UnknownKey,
    AlgorithmNotAllowed,
    BadSignature,
    MalformedClaims,
    MissingClaim(&'static str),
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    /// The header `typ` is not the one the provider requires (RFC 8725 §3.11 explicit typing).
    WrongType,
}

impl TokenError {
    pub fn description(&self) -> &'static str {
        match self {
            Self::Malformed => "the access token is malformed",
            Self::Encrypted => "encrypted tokens are not accepted",
            Self::UnsupportedHeader => "the token header uses an unsupported critical extension",
            Self::KidRequired => "the token header must name its key (kid)",
            Self::UnknownKey => "the token is signed with an unknown key",
            Self::AlgorithmNotAllowed => "the token's algorithm is not allowed for its key",
            Self::BadSignature => "the token signature is invalid",
            Self::MalformedClaims => "the token claims are malformed",
            Self::MissingClaim("exp") => "the token has no expiry (exp)",
            Self::MissingClaim(_) => "the token lacks a required claim",
            Self::Expired => "the access token expired",
            Self::NotYetValid => "the access token is not valid yet",
            Self::IssuedInFuture => "the access token was issued in the future",
            Self::WrongIssuer => "the access token was issued by an untrusted issuer",
            Self::WrongAudience => "the access token is not intended for this resource",
            Self::WrongType => "the token is not an access token of the expected type",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// The outcome of verification when it did not produce a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    Invalid(TokenError),
    /// The token names a key we do not have; the caller may refetch the JWKS and retry once.
    UnknownKid,
    /// No key set has been loaded yet.
    NoKeys,
}

/// Who the verified token speaks for. Built only by [`verify`]; what it may do is decided by
/// `policy` (audience per route, scopes per route and tool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Index of the provider that issued the token (in `Policy::providers`): which routes accept
    /// it and which audiences it needs. Set by the caller that selected the provider.
    pub provider: u8,
    pub sub: String,
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
    pub expires_at: i64,
    pub jti: Option<String>,
    pub client_id: Option<String>,
    pub email: Option<String>,
}

/// Header members beyond the ones `jwt-compact` models.
#[derive(Debug, Clone, Default, Deserialize)]
struct ExtraHeader {
    #[serde(default)]
    crit: Option<serde_json::Value>,
    #[serde(default)]
    enc: Option<serde_json::Value>,
}

/// RSA signature bytes as they appear in the token.
pub struct RawSignature(Vec<u8>);

impl AlgorithmSignature for RawSignature {
    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        Ok(Self(slice.to_vec()))
    }
    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0)
    }
}

/// Verification-only algorithms for `jwt-compact`, bound to the key's algorithm. Signing is
/// impossible by construction.
pub struct KeyVerifier(pub JwsAlgorithm);

impl Algorithm for KeyVerifier {
    type SigningKey = Infallible;
    type VerifyingKey = PublicKeyMaterial;
    type Signature = RawSignature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.0.name())
    }

    fn sign(&self, signing_key: &Infallible, _message: &[u8]) -> RawSignature {
        match *signing_key {}
    }

    fn verify_signature(
        &self,
        sig: &RawSignature,
        key: &PublicKeyMaterial,
        message: &[u8],
    ) -> bool {
        let sig = &sig.0;
        let key = match (key, self.0) {
            (PublicKeyMaterial::P256(key), JwsAlgorithm::Es256) => {
                // JWS ES256 signatures are r || s, 64 bytes (RFC 7518 §3.4), not DER.
                return p256::ecdsa::Signature::from_slice(sig)
                    .is_ok_and(|s| key.verify(message, &s).is_ok());
            }
            (PublicKeyMaterial::Rsa(key), _) => key,
            (PublicKeyMaterial::P256(_), _) => return false,
        };
        match self.0 {
            JwsAlgorithm::Es256 => false,
            JwsAlgorithm::Rs256 => {
                key.verify_pkcs1v15(HashAlg::Sha256, &Sha256::digest(message), sig)
            }
            JwsAlgorithm::Rs384 => {
                key.verify_pkcs1v15(HashAlg::Sha384, &Sha384::digest(message), sig)
            }
            JwsAlgorithm::Rs512 => {
                key.verify_pkcs1v15(HashAlg::Sha512, &Sha512::digest(message), sig)
            }
            JwsAlgorithm::Ps256 => key.verify_pss(HashAlg::Sha256, &Sha256::digest(message), sig),
            JwsAlgorithm::Ps384 => key.verify_pss(HashAlg::Sha384, &Sha384::digest(message), sig),
            JwsAlgorithm::Ps512 => key.verify_pss(HashAlg::Sha512, &Sha512::digest(message), sig),
        }
    }
}

/// Deepest array/object nesting accepted in the claims. serde_json skips claims we do not model
/// without a depth limit (iteratively, so no stack overflow), but no real access token nests
/// this deep: such a token is refused rather than parsed.
const MAX_CLAIMS_NESTING: usize = 32;

/// Whether the JSON text `bytes` nests arrays and objects at most `max` deep (brackets inside
/// strings do not count). Malformed text is left to the parser.
fn nesting_within(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Whether a header `typ` is `expected` (lower case, no `application/`): media types compare
/// ignoring case, and RFC 7515 §4.1.9 lets the `application/` prefix be left out.
fn typ_matches(typ: Option<&str>, expected: &str) -> bool {
    let Some(typ) = typ else {
        return false;
    };
    let short = match typ.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
        _ => typ,
    };
    short.eq_ignore_ascii_case(expected)
}

/// The payload segment of a compact JWS, decoded, with its nesting bounded.
fn payload_bytes(token: &str) -> Result<Vec<u8>, TokenError> {
    let mut segments = token.split('.');
    let payload = segments.nth(1).ok_or(TokenError::Malformed)?;
    match segments.count() {
        1 => {}
        // Five segments: a JWE (RFC 7516 §9).
        3 => return Err(TokenError::Encrypted),
        _ => return Err(TokenError::Malformed),
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    if !nesting_within(&bytes, MAX_CLAIMS_NESTING) {
        return Err(TokenError::MalformedClaims);
    }
    Ok(bytes)
}

/// The token's claims, decoded with the strict schema but not yet verified: only their `iss`
/// may be looked at (see [`UnverifiedClaims::issuer`]) until [`verify_decoded`] checks the
/// signature over them.
pub struct UnverifiedClaims(InboundClaims);

impl UnverifiedClaims {
    /// Selects which provider's keys and rules verify the token (as `jwt_authn` does), before
    /// any key is looked at, so a token from an unknown issuer costs no key work and no JWKS
    /// fetch.
    pub fn issuer(&self) -> Option<&str> {
        self.0.issuer()
    }
}

/// Decodes the claims of `token` once, before anything is verified. Duplicate and mistyped
/// claims are refused here, whatever the signature.
pub fn decode_claims(token: &str) -> Result<UnverifiedClaims, TokenError> {
    let bytes = payload_bytes(token)?;
    serde_json::from_slice(&bytes)
        .map(UnverifiedClaims)
        .map_err(|_| TokenError::MalformedClaims)
}

/// [`decode_claims`] then [`verify_decoded`].
#[cfg(test)]
pub fn verify(
    token: &str,
    keys: &KeySet,
    provider: &Provider,
    skew: i64,
    now: i64,
) -> Result<Principal, VerifyError> {
    let claims = decode_claims(token).map_err(VerifyError::Invalid)?;
    verify_decoded(token, claims, keys, provider, skew, now)
}

/// Verifies `token`, whose `claims` were decoded by [`decode_claims`], against `keys` and the
/// rules of the provider that issued it at time `now` (Unix seconds), with `skew` seconds of
/// tolerance: structure, signature, issuer and time. Audience and scopes depend on the route and
/// are checked by `policy`: a valid token with too few scopes is a 403, not a 401.
pub fn verify_decoded(
    token: &str,
    claims: UnverifiedClaims,
    keys: &KeySet,
    provider: &Provider,
    skew: i64,
    now: i64,
) -> Result<Principal, VerifyError> {
    let invalid = VerifyError::Invalid;
    let segments = token.split('.').count();
    if segments == 5 {
        return Err(invalid(TokenError::Encrypted));
    }
    if segments != 3 {
        return Err(invalid(TokenError::Malformed));
    }
    let untrusted: UntrustedToken<'_, ExtraHeader> =
        UntrustedToken::try_from(token).map_err(|_| invalid(TokenError::Malformed))?;
    let extra = &untrusted.header().other_fields;
    if extra.enc.is_some() {
        return Err(invalid(TokenError::Encrypted));
    }
    // RFC 7515 §4.1.11: a recipient that does not understand a critical extension must reject.
    if extra.crit.is_some() {
        return Err(invalid(TokenError::UnsupportedHeader));
    }
    if let Some(expected) = &provider.claims.typ {
        if !typ_matches(untrusted.header().token_type.as_deref(), expected) {
            return Err(invalid(TokenError::WrongType));
        }
    }
    let key = match keys.select(untrusted.header().key_id.as_deref()) {
        KeySelection::Found(key) => key,
        KeySelection::UnknownKid => return Err(VerifyError::UnknownKid),
        KeySelection::KidRequired => return Err(invalid(TokenError::KidRequired)),
        KeySelection::NoKeys => return Err(VerifyError::NoKeys),
    };
    if untrusted.algorithm() != key.alg.name() {
        return Err(invalid(TokenError::AlgorithmNotAllowed));
    }
    // The signature is checked directly rather than through `jwt-compact`'s validator, which
    // would also deserialize the claims into its own lenient struct: the claims were decoded
    // once, with the strict schema. The signed data is everything before the last dot
    // (RFC 7515 §5.2), exactly the bytes `UntrustedToken` parsed the header and claims from.
    let (signed_data, _) = token
        .rsplit_once('.')
        .ok_or(invalid(TokenError::Malformed))?;
    let signature = RawSignature(untrusted.signature_bytes().to_vec());
    if !KeyVerifier(key.alg).verify_signature(&signature, &key.key, signed_data.as_bytes()) {
        return Err(invalid(TokenError::BadSignature));
    }

    // The signature covers the exact payload bytes `claims` were decoded from.
    claims.0.principal(provider, skew, now).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys::{self, sign, sign_pss};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    const SKEW: i64 = 60;

    fn provider() -> Provider {
        Provider {
            name: "okta".into(),
            issuer: "https://idp.example.com/oauth2/mcp".into(),
            audiences: vec!["mcpserver".into()],
            keys: crate::config::KeySource::Inline(test_keys::key_set()),
            claims: crate::config::ClaimRules::default(),
            introspection: None,
        }
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": "https://idp.example.com/oauth2/mcp", "aud": "mcpserver",
            "sub": "user@example.com", "scp": ["mcp:tools:call"], "exp": NOW + 300,
            "iat": NOW - 10, "jti": "abc", "cid": "vscode"
        })
    }

    fn header(kid: &str) -> serde_json::Value {
        json!({"alg": "RS256", "kid": kid})
    }

    fn check(h: serde_json::Value, c: serde_json::Value) -> Result<Principal, VerifyError> {
        let token = sign(&h, &c);
        verify(&token, &test_keys::key_set(), &provider(), SKEW, NOW)
    }

    fn invalid(e: TokenError) -> Result<Principal, VerifyError> {
        Err(VerifyError::Invalid(e))
    }

    fn issuer_of(token: &str) -> Result<String, TokenError> {
        let claims = decode_claims(token)?;
        claims
            .issuer()
            .map(str::to_string)
            .ok_or(TokenError::MissingClaim("iss"))
    }

    #[test]
    fn the_issuer_is_read_before_anything_is_verified_and_strictly() {
        let signed = sign(&header("k1"), &claims());
        assert_eq!(
            issuer_of(&signed).as_deref(),
            Ok("https://idp.example.com/oauth2/mcp")
        );
        let unsigned = |payload: &str| format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(payload));
        assert_eq!(
            issuer_of(&unsigned(r#"{"iss":"a","iss":"b"}"#)),
            Err(TokenError::MalformedClaims)
        );
        assert_eq!(
            issuer_of(&unsigned(r#"{"iss":["a"]}"#)),
            Err(TokenError::MalformedClaims)
        );
        assert_eq!(
            issuer_of(&unsigned(r#"{"sub":"a"}"#)),
            Err(TokenError::MissingClaim("iss"))
        );
        let deep = format!(r#"{{"iss":"a","x":{}{}}}"#, "[".repeat(40), "]".repeat(40));
        assert_eq!(
            issuer_of(&unsigned(&deep)),
            Err(TokenError::MalformedClaims)
        );
        assert_eq!(issuer_of("a.b.c.d.e"), Err(TokenError::Encrypted));
        assert_eq!(issuer_of("a.b"), Err(TokenError::Malformed));
        assert_eq!(issuer_of("e30.!!!.x"), Err(TokenError::Malformed));
    }

    #[test]
    fn a_provider_that_requires_typ_refuses_other_types() {
        let mut rfc9068 = provider();
        rfc9068.claims.typ = Some("at+jwt".into());
        let with_typ = |typ: serde_json::Value| {
            let mut h = header("k1");
            h["typ"] = typ;
            verify(
                &sign(&h, &claims()),
                &test_keys::key_set(),
                &rfc9068,
                SKEW,
                NOW,
            )
        };
        for good in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+Jwt",
        ] {
            assert!(with_typ(json!(good)).is_ok(), "{good}");
        }
        for bad in [
            json!("JWT"),
            json!("at+jwt "),
            json!("application/jwt"),
            json!(null),
        ] {
            assert_eq!(
                with_typ(bad.clone()),
                invalid(TokenError::WrongType),
                "{bad}"
            );
        }
        assert_eq!(
            verify(
                &sign(&header("k1"), &claims()),
                &test_keys::key_set(),
                &rfc9068,
                SKEW,
                NOW
            ),
            invalid(TokenError::WrongType),
            "no typ at all"
        );
        // Without the rule, any typ is fine (Okta and Entra ID send `JWT` or none).
        let mut h = header("k1");
        h["typ"] = json!("JWT");
        assert!(verify(
            &sign(&h, &claims()),
            &test_keys::key_set(),
            &provider(),
            SKEW,
            NOW
        )
        .is_ok());
    }

    #[test]
    fn accepts_okta_token() {
        let p = check(header("k1"), claims()).unwrap();
        assert_eq!(p.sub, "user@example.com");
        assert_eq!(p.scopes, vec!["mcp:tools:call"]);
        assert_eq!(p.client_id.as_deref(), Some("vscode"));
        assert_eq!(p.expires_at, NOW + 300);
    }

    #[test]
    fn accepts_space_separated_scope_and_audience_array() {
        let mut c = claims();
        c.as_object_mut().unwrap().remove("scp");
        c["scope"] = json!("openid  mcp:tools:call");
        c["aud"] = json!(["other", "mcpserver"]);
        let p = check(header("k1"), c).unwrap();
        assert_eq!(p.scopes, vec!["openid", "mcp:tools:call"]);
    }

    #[test]
    fn rejects_tampered_signature_and_wrong_key() {
        let token = sign(&header("k1"), &claims());
        let mut tampered = token.clone();
        tampered.push('A');
        assert_eq!(
            verify(&tampered, &test_keys::key_set(), &provider(), SKEW, NOW).unwrap_err(),
            VerifyError::Invalid(TokenError::BadSignature)
        );
        // Signed by k1's private key but claims k2 (a different key).
        assert_eq!(
            check(header("k2"), claims()),
            invalid(TokenError::BadSignature)
        );
    }

    #[test]
    fn algorithm_is_chosen_by_the_key_not_the_token() {
        for alg in ["none", "HS256", "RS384", "PS256", "ES256"] {
            let h = json!({"alg": alg, "kid": "k1"});
            assert_eq!(
                check(h, claims()),
                invalid(TokenError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
        // PS256-bound key verifies PSS signatures.
        let token = sign_pss(&json!({"alg": "PS256", "kid": "pss"}), &claims());
        assert!(verify(&token, &test_keys::key_set(), &provider(), SKEW, NOW).is_ok());
    }

    #[test]
    fn kid_rules() {
        assert_eq!(
            check(json!({"alg": "RS256"}), claims()),
            invalid(TokenError::KidRequired)
        );
        assert_eq!(
            check(header("rotated"), claims()),
            Err(VerifyError::UnknownKid)
        );
        assert_eq!(
            check(json!({"alg": "RS256", "kid": 7}), claims()),
            invalid(TokenError::Malformed)
        );
        assert_eq!(
            verify(
                &sign(&header("k1"), &claims()),
                &KeySet::default(),
                &provider(),
                SKEW,
                NOW
            ),
            Err(VerifyError::NoKeys)
        );
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        assert!(nesting_within(br#"{"a":[1,{"b":[]}]}"#, 4));
        assert!(!nesting_within(br#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(nesting_within(br#"{"a":"[[[[[[[[[[[[[","b":"\"[[[["}"#, 1));
        assert!(!nesting_within(&[b'['; 40], 32));
        assert!(
            nesting_within(&[b']'; 40], 0),
            "unbalanced text is the parser's problem"
        );
    }

    #[test]
    fn crit_and_encrypted_headers_are_refused() {
        let h = json!({"alg": "RS256", "kid": "k1", "crit": ["exp"], "exp": 1});
        assert_eq!(check(h, claims()), invalid(TokenError::UnsupportedHeader));
        assert_eq!(
            verify("a.b.c.d.e", &test_keys::key_set(), &provider(), SKEW, NOW),
            invalid(TokenError::Encrypted)
        );
    }

    #[test]
    fn time_claims_with_skew() {
        let at = |field: &str, v: serde_json::Value| {
            let mut c = claims();
            c[field] = v;
            check(header("k1"), c)
        };
        assert!(at("exp", json!(NOW - 59)).is_ok(), "within skew");
        assert_eq!(at("exp", json!(NOW - 60)), invalid(TokenError::Expired));
        assert!(at("nbf", json!(NOW + 60)).is_ok());
        assert_eq!(at("nbf", json!(NOW + 61)), invalid(TokenError::NotYetValid));
        assert_eq!(
            at("iat", json!(NOW + 61)),
            invalid(TokenError::IssuedInFuture)
        );
        for bad in [
            json!("9999999999"),
            json!(1.5),
            json!(-1),
            json!(u64::MAX),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(
                at("exp", bad.clone()),
                invalid(TokenError::MalformedClaims),
                "{bad}"
            );
        }
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            check(header("k1"), c),
            invalid(TokenError::MissingClaim("exp"))
        );
    }

    #[test]
    fn issuer_and_audience_must_match_exactly() {
        let with = |field: &str, v: serde_json::Value| {
            let mut c = claims();
            c[field] = v;
            check(header("k1"), c)
        };
        for iss in [
            "https://idp.example.com/oauth2/mcp/",
            "https://IDP.example.com/oauth2/mcp",
            "",
        ] {
            assert_eq!(
                with("iss", json!(iss)),
                invalid(TokenError::WrongIssuer),
                "{iss}"
            );
        }
        // Audience values are carried as given; `policy` matches them per route.
        assert_eq!(
            with("aud", json!(["a", "b"])).unwrap().audiences,
            vec!["a", "b"]
        );
        assert!(with("aud", json!([])).unwrap().audiences.is_empty());
        assert_eq!(
            with("aud", json!([1, 2])),
            invalid(TokenError::MalformedClaims)
        );
    }

    #[test]
    fn duplicate_and_mistyped_claims_are_refused() {
        let c = claims()
            .to_string()
            .replacen('{', "{\"exp\": 9999999999,", 1);
        let token = test_keys::sign_raw(&header("k1").to_string(), &c);
        assert_eq!(
            verify(&token, &test_keys::key_set(), &provider(), SKEW, NOW),
            invalid(TokenError::MalformedClaims)
        );
        let mut c = claims();
        c["scp"] = json!(["mcp:tools:call", 7]);
        assert_eq!(check(header("k1"), c), invalid(TokenError::MalformedClaims));
        assert_eq!(
            verify(
                &test_keys::sign_raw(&header("k1").to_string(), "[1]"),
                &test_keys::key_set(),
                &provider(),
                SKEW,
                NOW
            ),
            invalid(TokenError::MalformedClaims)
        );
    }

    #[test]
    fn structural_garbage_is_malformed() {
        let good = sign(&header("k1"), &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let cases = vec![
            String::new(),
            "a".into(),
            "a.b".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.x"),
            format!("{}..{}", parts[0], parts[2]),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", parts[0].replace('e', "+"), parts[1], parts[2]),
            format!("{} .{}.{}", parts[0], parts[1], parts[2]),
        ];
        for t in cases {
            let r = verify(&t, &test_keys::key_set(), &provider(), SKEW, NOW);
            assert!(matches!(r, Err(VerifyError::Invalid(_))), "{t:?} -> {r:?}");
        }
    }

    #[test]
    fn es256_keys_verify_es256_tokens_only() {
        let mut doc: serde_json::Value = serde_json::from_str(&test_keys::jwks_json()).unwrap();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(test_keys::es256_jwk("ec"));
        let keys = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        let token = test_keys::sign_es256(&json!({"alg": "ES256", "kid": "ec"}), &claims());
        assert!(verify(&token, &keys, &provider(), SKEW, NOW).is_ok());
        // Tampered claims fail; an RSA-signed token naming the EC key fails; ES256 on an RSA key fails.
        let other =
            test_keys::sign_es256(&json!({"alg": "ES256", "kid": "ec"}), &json!({"iss": "x"}));
        let forged = format!(
            "{}.{}",
            token
                .rsplit_once('.')
                .unwrap()
                .0
                .rsplit_once('.')
                .unwrap()
                .0,
            other.split('.').skip(1).collect::<Vec<_>>().join(".")
        );
        assert!(verify(&forged, &keys, &provider(), SKEW, NOW).is_err());
        assert_eq!(
            verify(
                &sign(&json!({"alg": "RS256", "kid": "ec"}), &claims()),
                &keys,
                &provider(),
                SKEW,
                NOW
            ),
            invalid(TokenError::AlgorithmNotAllowed)
        );
        let es_on_rsa = test_keys::sign_es256(&json!({"alg": "ES256", "kid": "k1"}), &claims());
        assert_eq!(
            verify(&es_on_rsa, &keys, &provider(), SKEW, NOW),
            invalid(TokenError::AlgorithmNotAllowed)
        );
    }
}
