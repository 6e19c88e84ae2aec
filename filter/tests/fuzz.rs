//! Property-based fuzzing of the filter's host-independent code: everything a client, an IdP or
//! an operator can put bytes into.
//!
//! cargo-fuzz needs nightly; this is proptest on stable, so it runs in `cargo test` (256 cases per
//! property by default, a few seconds) and `make fuzz` runs it longer (`PROPTEST_CASES=50000`).
//!
//! Properties:
//! - nothing panics (a panic traps the Wasm VM, and a trapped VM fails every later request);
//! - `verify` accepts a mutated token only if it is byte-identical to the validly signed original,
//!   and a re-signed token only when an independent model of the policy says so;
//! - every parser's `Ok` satisfies the invariants the rest of the filter relies on.

// Helpers outside `#[test]` functions state expectations with unwrap/expect/panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use mcp_token_exchange::config;
use mcp_token_exchange::exchange::{self, ExchangeError};
use mcp_token_exchange::header_map::{self, SerializedHeaders};
use mcp_token_exchange::jwks::{KeySet, PublicKeyMaterial};
use mcp_token_exchange::mcp as jsonrpc;
use mcp_token_exchange::policy;
use mcp_token_exchange::rsa_public::{HashAlg, RsaVerifyingKey};
use mcp_token_exchange::token::{self, ExtractError};
use mcp_token_exchange::verify::{self, VerifyError};
use proptest::prelude::*;
use proptest::sample::Index;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, PrivateKey, Pss};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Keys, tokens and the policy under test
// ---------------------------------------------------------------------------------------------

const NOW: i64 = 1_800_000_000;
const ISSUER: &str = "https://idp.example.com/oauth2/mcp";
const AUDIENCE: &str = "mcpserver";
const SKEW: i64 = 60;

struct Keys {
    k1: PrivateKey,
    k2: PrivateKey,
}

/// Two RSA-2048 keys from a fixed seed (deterministic, no fixtures).
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = ChaCha8Rng::from_seed([42; 32]);
        Keys {
            k1: PrivateKey::new(&mut rng, 2048).expect("key k1"),
            k2: PrivateKey::new(&mut rng, 2048).expect("key k2"),
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn strip_zeros(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

fn modulus(key: &PrivateKey) -> Vec<u8> {
    strip_zeros(&key.to_public_key().n().to_be_bytes())
}

fn jwk(key: &PrivateKey, kid: &str, alg: &str) -> Value {
    let public = key.to_public_key();
    json!({
        "kty": "RSA", "kid": kid, "alg": alg, "use": "sig",
        "n": b64(&modulus(key)), "e": b64(&strip_zeros(&public.e().to_be_bytes())),
    })
}

/// k1 (RS256), k2 (RS256, another key) and `pss` (k1's key, bound to PS256).
fn jwks_doc() -> Value {
    let k = keys();
    json!({"keys": [jwk(&k.k1, "k1", "RS256"), jwk(&k.k2, "k2", "RS256"), jwk(&k.k1, "pss", "PS256")]})
}

fn key_set() -> &'static KeySet {
    static SET: OnceLock<KeySet> = OnceLock::new();
    SET.get_or_init(|| KeySet::parse(jwks_doc().to_string().as_bytes()).expect("test JWKS"))
}

/// The inbound policy, built through the real config parser so that every field gets its
/// documented default: issuer, 60 s skew, 8 KiB.
/// The base config's one provider (the policy itself holds `Rc`s, so it cannot be a static).
fn provider() -> &'static config::Provider {
    static P: OnceLock<config::Provider> = OnceLock::new();
    P.get_or_init(|| {
        let p =
            config::parse_policy(base_config().to_string().as_bytes(), &env).expect("base config");
        let inbound = &p.inbound;
        assert_eq!(
            (inbound.clock_skew_seconds, inbound.max_token_bytes),
            (SKEW, 8192)
        );
        p.providers[0].clone()
    })
}

/// RS256 (PKCS#1 v1.5) over the exact header and payload bytes.
fn sign_raw_with(key: &PrivateKey, header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = key
        .sign(
            Pkcs1v15Sign::new::<Sha256>(),
            &Sha256::digest(input.as_bytes()),
        )
        .expect("signing");
    format!("{input}.{}", b64(&sig))
}

fn sign_raw(header: &[u8], payload: &[u8]) -> String {
    sign_raw_with(&keys().k1, header, payload)
}

fn sign_pss(header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let mut rng = ChaCha8Rng::from_seed([9; 32]);
    let sig = keys()
        .k1
        .sign_with_rng(
            &mut rng,
            Pss::<Sha256>::new(),
            &Sha256::digest(input.as_bytes()),
        )
        .expect("PSS signing");
    format!("{input}.{}", b64(&sig))
}

fn good_claims() -> Value {
    json!({
        "ver": 1, "jti": "AT.abc", "iss": ISSUER, "aud": AUDIENCE, "iat": NOW - 10,
        "exp": NOW + 300, "cid": "mcp-client", "uid": "00u123", "scp": ["mcp:tools:call"],
        "sub": "user@example.com"
    })
}

fn good_header() -> Value {
    json!({"kid": "k1", "alg": "RS256"})
}

/// A validly signed token the policy accepts.
fn original() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| {
        sign_raw(
            good_header().to_string().as_bytes(),
            good_claims().to_string().as_bytes(),
        )
    })
}

/// Other validly signed tokens whose segments get spliced into the original.
fn donors() -> &'static [String] {
    static D: OnceLock<Vec<String>> = OnceLock::new();
    D.get_or_init(|| {
        let mut other_sub = good_claims();
        other_sub["sub"] = json!("admin@example.com");
        let mut expired = good_claims();
        expired["exp"] = json!(NOW - 3600);
        vec![
            sign_raw(
                good_header().to_string().as_bytes(),
                other_sub.to_string().as_bytes(),
            ),
            sign_raw(
                good_header().to_string().as_bytes(),
                expired.to_string().as_bytes(),
            ),
            sign_raw_with(
                &keys().k2,
                json!({"kid": "k2", "alg": "RS256"}).to_string().as_bytes(),
                good_claims().to_string().as_bytes(),
            ),
            sign_pss(
                json!({"kid": "pss", "alg": "PS256"}).to_string().as_bytes(),
                good_claims().to_string().as_bytes(),
            ),
        ]
    })
}

/// What the gateway checks of a token for the `/mcp` route before scopes: `verify` (structure,
/// signature, issuer, time) and then the route's audience.
fn run_verify(token: &str) -> Result<verify::Principal, VerifyError> {
    verify_with(token, key_set())
}

fn verify_with(token: &str, keys: &KeySet) -> Result<verify::Principal, VerifyError> {
    let claims = verify::decode_claims(token).map_err(VerifyError::Invalid)?;
    let p = verify::verify_decoded(token, claims, keys, provider(), SKEW, NOW)?;
    if policy::audience_allowed(&p, &[AUDIENCE.to_string()]) {
        Ok(p)
    } else {
        Err(VerifyError::Invalid(verify::TokenError::WrongAudience))
    }
}

/// Cases per property: proptest's default (256, or `PROPTEST_CASES`), divided for the costly
/// properties that sign with RSA on every case.
fn cfg(divisor: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    ProptestConfig {
        cases: (base.cases / divisor).max(16),
        // Keep the tree clean: a failure prints the minimal input; nothing is written to disk.
        failure_persistence: None,
        ..base
    }
}

// ---------------------------------------------------------------------------------------------
// Generic strategies
// ---------------------------------------------------------------------------------------------

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        ".{0,12}".prop_map(Value::from),
        interesting_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn interesting_string() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "",
        " ",
        "RS256",
        "rs256",
        "RS384",
        "PS256",
        "HS256",
        "ES256",
        "none",
        "None",
        "k1",
        "k2",
        "pss",
        "../k1",
        "k1\u{0}",
        ISSUER,
        "https://idp.example.com/oauth2/mcp/",
        AUDIENCE,
        "MCPSERVER",
        "mcp:tools:call",
        "mcp:tools:call-all",
        "user@example.com",
        "\u{202e}",
        "A256GCM",
        "b64",
    ])
    .prop_map(str::to_string)
}

fn token_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .collect::<Vec<_>>()
        ),
        2 => prop::sample::select(vec!['.', '=', '+', '/', ' ', '\t', '~', '%', '"', ',']),
        1 => any::<char>(),
    ]
}

// ---------------------------------------------------------------------------------------------
// verify: structural mutations of a validly signed token
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, char),
    Insert(Index, char),
    Delete(Index, usize),
    Truncate(Index),
    Append(String),
    Prepend(String),
    SwapSegments(Index, Index),
    DuplicateSegment(Index),
    DropSegment(Index),
    ReplaceSegment(Index, String),
    /// Re-encode a segment's bytes with another base64 alphabet or padding.
    Reencode(Index, u8),
    /// Replace the segment's last character (non-canonical trailing bits live there).
    Tail(Index, char),
    HeaderField(String, Value),
    ClaimField(String, Value),
    RemoveHeaderField(String),
    RemoveClaim(String),
    /// Put the same-position segment of another validly signed token in place.
    Splice(Index, Index),
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "alg", "kid", "typ", "crit", "enc", "jku", "jwk", "x5u", "x5c", "x5t", "b64", "cty",
            "zip",
        ])
        .prop_map(str::to_string),
        1 => "[a-z]{1,4}",
    ]
}

fn claim_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "iss", "aud", "sub", "exp", "nbf", "iat", "scp", "scope", "jti", "cid", "client_id",
        ])
        .prop_map(str::to_string),
        1 => "[a-z]{1,4}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<(Index, char)>().prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<Index>(), token_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<Index>(), token_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        prop::collection::vec(token_char(), 1..6)
            .prop_map(|v| Mutation::Append(v.into_iter().collect())),
        prop::collection::vec(token_char(), 1..6)
            .prop_map(|v| Mutation::Prepend(v.into_iter().collect())),
        any::<(Index, Index)>().prop_map(|(a, b)| Mutation::SwapSegments(a, b)),
        any::<Index>().prop_map(Mutation::DuplicateSegment),
        any::<Index>().prop_map(Mutation::DropSegment),
        (
            any::<Index>(),
            prop::collection::vec(token_char(), 0..40).prop_map(|v| v.into_iter().collect())
        )
            .prop_map(|(i, s)| Mutation::ReplaceSegment(i, s)),
        (any::<Index>(), 0u8..4).prop_map(|(i, e)| Mutation::Reencode(i, e)),
        (any::<Index>(), token_char()).prop_map(|(i, c)| Mutation::Tail(i, c)),
        (header_name(), arb_json()).prop_map(|(n, v)| Mutation::HeaderField(n, v)),
        (header_name(), interesting_string())
            .prop_map(|(n, v)| Mutation::HeaderField(n, Value::from(v))),
        (claim_name(), arb_json()).prop_map(|(n, v)| Mutation::ClaimField(n, v)),
        header_name().prop_map(Mutation::RemoveHeaderField),
        claim_name().prop_map(Mutation::RemoveClaim),
        any::<(Index, Index)>().prop_map(|(a, b)| Mutation::Splice(a, b)),
    ]
}

fn segments(t: &str) -> Vec<String> {
    t.split('.').map(str::to_string).collect()
}

/// Decodes segment `i` as a JSON object, changes it, and puts it back (signature untouched).
fn edit_json_segment(t: &str, i: usize, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut segs = segments(t);
    if segs.len() <= i {
        return t.to_string();
    }
    let Some(mut obj) = URL_SAFE_NO_PAD
        .decode(&segs[i])
        .ok()
        .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
    else {
        return t.to_string();
    };
    edit(&mut obj);
    segs[i] = b64(Value::Object(obj).to_string().as_bytes());
    segs.join(".")
}

/// Replaces the last character of segment `seg`.
fn replace_tail(t: &str, seg: usize, c: char) -> String {
    let mut segs = segments(t);
    if let Some(s) = segs.get_mut(seg) {
        let mut v: Vec<char> = s.chars().collect();
        if let Some(last) = v.last_mut() {
            *last = c;
        }
        *s = v.into_iter().collect();
    }
    segs.join(".")
}

fn apply(t: &str, m: &Mutation) -> String {
    let chars: Vec<char> = t.chars().collect();
    let mut segs = segments(t);
    match m {
        Mutation::Replace(i, c) if !chars.is_empty() => {
            let mut v = chars;
            let at = i.index(v.len());
            v[at] = *c;
            v.into_iter().collect()
        }
        Mutation::Insert(i, c) => {
            let mut v = chars;
            let at = i.index(v.len() + 1);
            v.insert(at, *c);
            v.into_iter().collect()
        }
        Mutation::Delete(i, n) if !chars.is_empty() => {
            let mut v = chars;
            let at = i.index(v.len());
            let end = (at + n).min(v.len());
            v.drain(at..end);
            v.into_iter().collect()
        }
        Mutation::Truncate(i) => chars[..i.index(chars.len() + 1)].iter().collect(),
        Mutation::Append(s) => format!("{t}{s}"),
        Mutation::Prepend(s) => format!("{s}{t}"),
        Mutation::SwapSegments(a, b) => {
            let (a, b) = (a.index(segs.len()), b.index(segs.len()));
            segs.swap(a, b);
            segs.join(".")
        }
        Mutation::DuplicateSegment(i) => {
            let at = i.index(segs.len());
            let s = segs[at].clone();
            segs.insert(at, s);
            segs.join(".")
        }
        Mutation::DropSegment(i) => {
            segs.remove(i.index(segs.len()));
            segs.join(".")
        }
        Mutation::ReplaceSegment(i, s) => {
            let at = i.index(segs.len());
            segs[at] = s.clone();
            segs.join(".")
        }
        Mutation::Reencode(i, engine) => {
            let at = i.index(segs.len());
            if let Ok(bytes) = URL_SAFE_NO_PAD.decode(&segs[at]) {
                segs[at] = match engine {
                    0 => STANDARD.encode(&bytes),
                    1 => STANDARD_NO_PAD.encode(&bytes),
                    2 => URL_SAFE.encode(&bytes),
                    _ => format!("{}=", URL_SAFE_NO_PAD.encode(&bytes)),
                };
            }
            segs.join(".")
        }
        Mutation::Tail(i, c) => replace_tail(t, i.index(segs.len()), *c),
        Mutation::HeaderField(n, v) => edit_json_segment(t, 0, |o| {
            o.insert(n.clone(), v.clone());
        }),
        Mutation::ClaimField(n, v) => edit_json_segment(t, 1, |o| {
            o.insert(n.clone(), v.clone());
        }),
        Mutation::RemoveHeaderField(n) => edit_json_segment(t, 0, |o| {
            o.remove(n);
        }),
        Mutation::RemoveClaim(n) => edit_json_segment(t, 1, |o| {
            o.remove(n);
        }),
        Mutation::Splice(d, i) => {
            let donor = segments(&donors()[d.index(donors().len())]);
            let at = i.index(segs.len().min(donor.len()));
            segs[at] = donor[at].clone();
            segs.join(".")
        }
        // Replace/Delete on an empty string: nothing to do.
        _ => t.to_string(),
    }
}

/// Whether `t` is byte-identical to one of the validly signed tokens (the original, or a donor
/// whose segments were all spliced back in).
fn is_genuine(t: &str) -> bool {
    t == original() || donors().iter().any(|d| d == t && run_verify(d).is_ok())
}

/// The verdict a mutated token must get: accepted only when it is byte-identical to a validly
/// signed token.
fn check_mutant(mutant: &str) -> Result<(), TestCaseError> {
    let verdict = run_verify(mutant);
    prop_assert_eq!(
        verdict.is_ok(),
        is_genuine(mutant),
        "mutated token {:?} -> {:?}",
        mutant,
        verdict
    );
    // The same token as a client sends it: extraction first, then verification.
    let header = format!("Bearer {mutant}");
    if let Ok(extracted) = token::extract_bearer(&[header.as_bytes()], b"/mcp", 8192) {
        let verdict = run_verify(extracted);
        prop_assert_eq!(
            verdict.is_ok(),
            is_genuine(extracted),
            "extracted {:?} -> {:?}",
            extracted,
            verdict
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(cfg(1))]

    #[test]
    fn mutated_tokens_are_never_accepted(muts in prop::collection::vec(mutation(), 1..4)) {
        let mut t = original().to_string();
        for m in &muts {
            t = apply(&t, m);
        }
        check_mutant(&t)?;
    }

    #[test]
    fn arbitrary_strings_never_verify(s in any::<String>()) {
        prop_assert!(run_verify(&s).is_err());
    }

    #[test]
    fn dotted_base64ish_strings_never_verify(
        parts in prop::collection::vec("[A-Za-z0-9_=+/-]{0,64}", 0..7)
    ) {
        prop_assert!(run_verify(&parts.join(".")).is_err());
    }

    /// Header and payload that are arbitrary JSON (objects or not), validly signed by k1: must
    /// never panic, and pass only with the exact header k1 needs plus policy-valid claims (those
    /// are checked by `resigned_claims_follow_the_policy`; here arbitrary JSON almost never is).
    #[test]
    fn signed_arbitrary_json_never_panics(h in arb_json(), c in arb_json()) {
        let token = sign_raw(h.to_string().as_bytes(), c.to_string().as_bytes());
        if let Ok(p) = run_verify(&token) {
            // Only possible with a header that selects k1 as RS256 and claims the model accepts.
            prop_assert_eq!(h.get("alg"), Some(&json!("RS256")));
            prop_assert_eq!(model_verdict(&c), Some(verdict_of(&p)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// verify: re-signed tokens against an independent model of the policy
// ---------------------------------------------------------------------------------------------

fn claim_value(name: &'static str) -> BoxedStrategy<Option<Value>> {
    let absent = Just(None::<Value>);
    let now = NOW;
    let specific: Vec<Value> = match name {
        "iss" => vec![
            json!(ISSUER),
            json!(format!("{ISSUER}/")),
            json!(ISSUER.to_uppercase()),
            json!(""),
            json!(1),
            json!([ISSUER]),
            Value::Null,
        ],
        "aud" => vec![
            json!(AUDIENCE),
            json!([AUDIENCE]),
            json!(["other", AUDIENCE]),
            json!([]),
            json!(["x"]),
            json!("MCPSERVER"),
            json!("xmcpserverx"),
            json!([AUDIENCE, 1]),
            json!([1, 2]),
            json!({"aud": AUDIENCE}),
            Value::Null,
        ],
        "sub" => vec![
            json!("alice"),
            json!(""),
            json!(7),
            json!(["alice"]),
            Value::Null,
        ],
        "exp" | "nbf" | "iat" => vec![
            json!(now + 300),
            json!(now - 59),
            json!(now - 60),
            json!(now - 61),
            json!(now + 59),
            json!(now + 60),
            json!(now + 61),
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1_800_000_300.0),
            json!("1800000300"),
            json!(u64::MAX),
            json!(i64::MAX),
            json!(true),
            Value::Null,
        ],
        "scp" => vec![
            json!(["mcp:tools:call"]),
            json!([]),
            json!("mcp:tools:call"),
            json!([1]),
            json!(["a", "b"]),
            Value::Null,
        ],
        "scope" => vec![
            json!("mcp:tools:call"),
            json!("openid  mcp:tools:call "),
            json!("a\tb"),
            json!(""),
            json!(["mcp:tools:call"]),
            Value::Null,
        ],
        _ => vec![json!("x"), json!(5), Value::Null],
    };
    prop_oneof![
        1 => absent,
        6 => prop::sample::select(specific).prop_map(Some),
        1 => arb_json().prop_map(Some),
        1 => (now - 200..now + 200).prop_map(|t| Some(json!(t))),
    ]
    .boxed()
}

/// What the policy says about these claims, computed without the filter's code: `None` for a
/// refusal, else what the principal must hold.
fn model_verdict(claims: &Value) -> Option<Verdict> {
    let obj = claims.as_object()?;
    let get = |n: &str| obj.get(n);
    // Optional string claims: absent or null is "none", another type is malformed.
    let opt_str = |n: &str| -> Result<Option<String>, ()> {
        match get(n) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(()),
        }
    };
    // NumericDate: a non-negative integer; present-but-anything-else (null included) is malformed.
    let date = |n: &str| -> Result<Option<i64>, ()> {
        match get(n) {
            None => Ok(None),
            Some(Value::Number(num)) => match num.as_i64() {
                Some(t) if t >= 0 => Ok(Some(t)),
                _ => Err(()),
            },
            Some(_) => Err(()),
        }
    };
    let iss = opt_str("iss").ok()?;
    let sub = opt_str("sub").ok()?;
    let scope = opt_str("scope").ok()?;
    opt_str("jti").ok()?;
    opt_str("cid").ok()?;
    opt_str("client_id").ok()?;
    opt_str("email").ok()?;
    let exp = date("exp").ok()?;
    let nbf = date("nbf").ok()?;
    let iat = date("iat").ok()?;
    let aud: Vec<String> = match get("aud") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()?,
        Some(_) => return None,
    };
    let scp: Option<Vec<String>> = match get("scp") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()?,
        ),
        Some(_) => return None,
    };
    if iss.as_deref() != Some(ISSUER) {
        return None;
    }
    let exp = exp?;
    if NOW - SKEW >= exp {
        return None;
    }
    if nbf.is_some_and(|n| NOW + SKEW < n) || iat.is_some_and(|i| NOW + SKEW < i) {
        return None;
    }
    if !aud.iter().any(|a| a == AUDIENCE) {
        return None;
    }
    let sub = sub.filter(|s| !s.is_empty())?;
    let scopes = match (scp, scope) {
        (Some(list), _) => list,
        (None, Some(s)) => s
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        (None, None) => vec![],
    };
    Some(Verdict {
        sub,
        exp,
        scopes,
        audiences: aud,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    sub: String,
    exp: i64,
    scopes: Vec<String>,
    audiences: Vec<String>,
}

fn verdict_of(p: &verify::Principal) -> Verdict {
    Verdict {
        sub: p.sub.clone(),
        exp: p.expires_at,
        scopes: p.scopes.clone(),
        audiences: p.audiences.clone(),
    }
}

fn header_variant() -> impl Strategy<Value = (Value, bool)> {
    // (header, whether a correct verifier may accept a k1 RS256 signature under it)
    let alg = prop::sample::select(vec![
        Some("RS256"),
        Some("rs256"),
        Some("RS384"),
        Some("PS256"),
        Some("HS256"),
        Some("none"),
        Some("ES256"),
        None,
    ]);
    let kid = prop::sample::select(vec![
        Some(json!("k1")),
        Some(json!("k2")),
        Some(json!("pss")),
        Some(json!("K1")),
        Some(json!("")),
        Some(json!(1)),
        Some(Value::Null),
        None,
    ]);
    let extra = prop::sample::select(vec![
        None,
        Some(("crit", json!(["exp"]))),
        Some(("crit", json!([]))),
        Some(("enc", json!("A256GCM"))),
        Some(("typ", json!("JWT"))),
        Some(("jku", json!("https://evil.example/keys"))),
    ]);
    (alg, kid, extra).prop_map(|(alg, kid, extra)| {
        let mut h = Map::new();
        if let Some(k) = &kid {
            h.insert("kid".into(), k.clone());
        }
        if let Some(a) = alg {
            h.insert("alg".into(), json!(a));
        }
        let mut harmless_extra = true;
        if let Some((name, value)) = extra {
            h.insert(name.into(), value);
            harmless_extra = matches!(name, "typ" | "jku");
        }
        let ok = alg == Some("RS256") && kid == Some(json!("k1")) && harmless_extra;
        (Value::Object(h), ok)
    })
}

proptest! {
    #![proptest_config(cfg(4))]

    #[test]
    fn resigned_claims_follow_the_policy(
        (header, header_ok) in header_variant(),
        iss in claim_value("iss"),
        aud in claim_value("aud"),
        sub in claim_value("sub"),
        exp in claim_value("exp"),
        nbf in claim_value("nbf"),
        iat in claim_value("iat"),
        scp in claim_value("scp"),
        scope in claim_value("scope"),
        jti in claim_value("jti"),
    ) {
        let mut claims = Map::new();
        for (name, value) in [
            ("iss", iss), ("aud", aud), ("sub", sub), ("exp", exp), ("nbf", nbf),
            ("iat", iat), ("scp", scp), ("scope", scope), ("jti", jti),
        ] {
            if let Some(v) = value {
                claims.insert(name.into(), v);
            }
        }
        let claims = Value::Object(claims);
        let token = sign_raw(header.to_string().as_bytes(), claims.to_string().as_bytes());
        let verdict = run_verify(&token);
        let expected = if header_ok { model_verdict(&claims) } else { None };
        match (&verdict, &expected) {
            (Ok(p), Some(v)) => prop_assert_eq!(&verdict_of(p), v),
            (Err(_), None) => {}
            _ => prop_assert!(
                false,
                "verify says {:?}, the model says {:?} for header {} claims {}",
                verdict, expected, header, claims
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// verify: deterministic edge cases the random search is unlikely to hit
// ---------------------------------------------------------------------------------------------

/// Base64url's last character carries unused bits; a lenient decoder maps several texts to the
/// same bytes. The signature is over the header/payload *text*, but the signature segment itself
/// is decoded: a non-canonical signature encoding would be a second accepted form of one token.
#[test]
fn every_other_last_character_of_every_segment_is_refused() {
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let t = original();
    for seg in 0..3 {
        for c in alphabet.chars() {
            let mutant = replace_tail(t, seg, c);
            let verdict = run_verify(&mutant);
            assert_eq!(
                verdict.is_ok(),
                mutant == t,
                "segment {seg}, last char {c:?}: {verdict:?}"
            );
        }
    }
}

#[test]
fn deeply_nested_json_is_refused_without_overflow() {
    for depth in [200, 2_500, 10_000, 100_000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let mut claims = good_claims().to_string();
        claims.insert_str(1, &format!("\"deep\":{nested},"));
        let token = sign_raw(good_header().to_string().as_bytes(), claims.as_bytes());
        let r = run_verify(&token);
        assert!(r.is_err(), "depth {depth} in the claims: {r:?}");
        let mut header = good_header().to_string();
        header.insert_str(1, &format!("\"deep\":{nested},"));
        let token = sign_raw(header.as_bytes(), good_claims().to_string().as_bytes());
        let r = run_verify(&token);
        assert!(r.is_err(), "depth {depth} in the header: {r:?}");
    }
}

#[test]
fn duplicate_names_are_refused() {
    let claims = good_claims().to_string();
    for dup in ["sub", "exp", "iss", "aud", "scp"] {
        let text = claims.replacen('{', &format!("{{\"{dup}\":\"x\","), 1);
        let token = sign_raw(good_header().to_string().as_bytes(), text.as_bytes());
        assert!(run_verify(&token).is_err(), "duplicate claim {dup}");
    }
    for header in [
        r#"{"kid":"k1","alg":"RS256","alg":"RS256"}"#,
        r#"{"kid":"k2","kid":"k1","alg":"RS256"}"#,
        r#"{"kid":"k1","alg":"none","alg":"RS256"}"#,
    ] {
        let token = sign_raw(header.as_bytes(), claims.as_bytes());
        assert!(
            run_verify(&token).is_err(),
            "duplicate header member: {header}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// extract_bearer
// ---------------------------------------------------------------------------------------------

fn is_b64token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)
}

/// Independent reading of "the query has an access_token parameter".
fn model_query_has_token(path: &[u8]) -> bool {
    let Some(q) = path.iter().position(|b| *b == b'?') else {
        return false;
    };
    let query = &path[q + 1..];
    let query = query.split(|b| *b == b'#').next().unwrap_or_default();
    query.split(|b| *b == b'&').any(|pair| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
        name == b"access_token" || name.eq_ignore_ascii_case(b"access%5ftoken")
    })
}

fn auth_header_value() -> impl Strategy<Value = Vec<u8>> {
    let scheme = prop::sample::select(vec![
        "Bearer", "bearer", "BEARER", "BeArEr", "Basic", "Bearerx", "", "DPoP", "Bear",
    ]);
    let sep = prop::sample::select(vec!["", " ", "  ", "\t", " \t", "      "]);
    let tok = prop_oneof![
        "[A-Za-z0-9._~+/=-]{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
        "[A-Za-z0-9._-]{1,20}[ ,;\"\t][A-Za-z0-9._-]{1,20}".prop_map(String::into_bytes),
    ];
    let trail = prop::sample::select(vec!["", " ", "\t", "  "]);
    prop_oneof![
        4 => (scheme, sep, tok, trail).prop_map(|(s, p, t, r)| {
            let mut v = Vec::new();
            v.extend_from_slice(s.as_bytes());
            v.extend_from_slice(p.as_bytes());
            v.extend_from_slice(&t);
            v.extend_from_slice(r.as_bytes());
            v
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn request_path() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"/mcp".to_vec()),
        "/mcp\\?[a-z_%&=#0-9]{0,30}".prop_map(String::into_bytes),
        "/mcp\\?(a=1&)?(access_token|ACCESS_TOKEN|access%5Ftoken|access%5ftoken|x_access_token)(=[a-z]*)?(#.*)?"
            .prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    #![proptest_config(cfg(1))]

    #[test]
    fn extract_bearer_only_returns_a_clean_token(
        values in prop::collection::vec(auth_header_value(), 0..3),
        path in request_path(),
        max in prop_oneof![Just(8192usize), 0usize..64],
    ) {
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let result = token::extract_bearer(&refs, &path, max);
        if model_query_has_token(&path) {
            prop_assert_eq!(result, Err(ExtractError::TokenInQuery));
        } else if values.len() > 1 {
            prop_assert_eq!(result, Err(ExtractError::Duplicate));
        } else if let Ok(t) = result {
            let value = &values[0];
            prop_assert!(!t.is_empty() && t.len() <= max, "{:?} (max {})", t, max);
            prop_assert!(t.bytes().all(is_b64token_byte), "{:?}", t);
            // The token is the value minus "Bearer" + 1*SP and surrounding OWS.
            let trimmed = String::from_utf8_lossy(value);
            let trimmed = trimmed.trim_matches(|c| c == ' ' || c == '\t');
            prop_assert!(trimmed.len() > 7, "{:?}", trimmed);
            prop_assert!(trimmed[..6].eq_ignore_ascii_case("bearer"), "{:?}", trimmed);
            prop_assert_eq!(&trimmed[6..7], " ");
            // (A tab after the first space is tolerated as OWS; the token itself never has one.)
            prop_assert_eq!(trimmed[7..].trim_start_matches([' ', '\t']), t);
        }
    }

    #[test]
    fn extract_bearer_survives_arbitrary_bytes(
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 0..4),
        path in prop::collection::vec(any::<u8>(), 0..100),
        max in any::<usize>(),
    ) {
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        if let Ok(t) = token::extract_bearer(&refs, &path, max) {
            prop_assert!(t.bytes().all(is_b64token_byte));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// KeySet::parse
// ---------------------------------------------------------------------------------------------

fn jwk_entry() -> impl Strategy<Value = Value> {
    let real_n = b64(&modulus(&keys().k1));
    let other_n = b64(&modulus(&keys().k2));
    let mut padded = vec![0u8, 0];
    padded.extend(modulus(&keys().k1));
    let padded_n = b64(&padded);
    let n = prop_oneof![
        prop::sample::select(vec![
            json!(real_n),
            json!(other_n),
            json!(padded_n),
            json!(""),
            json!("AQAB"),
            json!("***"),
            json!(format!("{real_n}=")),
            json!(7),
            Value::Null,
        ]),
        prop::collection::vec(any::<u8>(), 0..1100).prop_map(|b| json!(b64(&b))),
    ];
    let e = prop_oneof![
        prop::sample::select(vec![
            json!("AQAB"),
            json!(""),
            json!("AA"),
            json!("AQ"),
            json!("Aw"),
            json!("Ag"),
            json!("AAAAAAAAAAAAAQAB"),
            json!("_____________w"),
            json!(65537),
        ]),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(|b| json!(b64(&b))),
    ];
    let kty = prop::sample::select(vec![
        json!("RSA"),
        json!("EC"),
        json!("oct"),
        json!("rsa"),
        json!(1),
    ]);
    let kid = prop::sample::select(vec![
        Some(json!("k1")),
        Some(json!("k2")),
        Some(json!("x")),
        Some(json!(3)),
        Some(Value::Null),
        None,
    ]);
    let alg = prop::sample::select(vec![
        None,
        Some(json!("RS256")),
        Some(json!("PS512")),
        Some(json!("HS256")),
        Some(json!("none")),
        Some(json!(["RS256"])),
    ]);
    let use_ = prop::sample::select(vec![
        None,
        Some(json!("sig")),
        Some(json!("enc")),
        Some(json!(0)),
    ]);
    prop_oneof![
        8 => (kty, kid, alg, use_, n, e).prop_map(|(kty, kid, alg, use_, n, e)| {
            let mut o = Map::new();
            o.insert("kty".into(), kty);
            if let Some(k) = kid { o.insert("kid".into(), k); }
            if let Some(a) = alg { o.insert("alg".into(), a); }
            if let Some(u) = use_ { o.insert("use".into(), u); }
            o.insert("n".into(), n);
            o.insert("e".into(), e);
            Value::Object(o)
        }),
        1 => arb_json(),
    ]
}

proptest! {
    #![proptest_config(cfg(2))]

    #[test]
    fn keyset_parse_survives_arbitrary_bytes(doc in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = KeySet::parse(&doc);
    }

    #[test]
    fn keyset_parse_survives_arbitrary_json(doc in arb_json()) {
        let _ = KeySet::parse(doc.to_string().as_bytes());
    }

    /// Mixed good and bad entries: no panic, only sound keys kept, kids unique, and verifying the
    /// original token against the result never panics and succeeds only with k1's real key.
    #[test]
    fn keyset_keeps_only_sound_keys(entries in prop::collection::vec(jwk_entry(), 0..8)) {
        let doc = json!({"keys": entries}).to_string();
        let Ok(set) = KeySet::parse(doc.as_bytes()) else {
            return Ok(());
        };
        prop_assert!(set.keys.len() <= entries.len());
        let mut kids = std::collections::HashSet::new();
        for k in &set.keys {
            let PublicKeyMaterial::Rsa(rsa_key) = &k.key else {
                continue; // the generator makes RSA keys; a P-256 key is bound to ES256
            };
            let bits = rsa_key.modulus_be().len() * 8;
            prop_assert!((2041..=8192).contains(&bits), "{}-bit key kept", bits);
            if let Some(kid) = &k.kid {
                prop_assert!(kids.insert(kid.clone()), "duplicate kid {}", kid);
            }
        }
        if let Ok(p) = verify_with(original(), &set) {
            prop_assert_eq!(p.sub, "user@example.com");
            let real = modulus(&keys().k1);
            prop_assert!(set.keys.iter().any(|k| k.kid.as_deref().is_none_or(|kid| kid == "k1")
                && matches!(&k.key, PublicKeyMaterial::Rsa(r) if r.modulus_be() == real)));
        }
        // Every key, however odd, is safe to verify against.
        for t in donors() {
            let _ = verify_with(t, &set);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rsa_public: the hand-written RSA verifier on attacker bytes
// ---------------------------------------------------------------------------------------------

fn k1_verifier() -> &'static RsaVerifyingKey {
    let PublicKeyMaterial::Rsa(key) = &key_set().keys[0].key else {
        panic!("k1 is an RSA key");
    };
    key
}

fn hash_alg() -> impl Strategy<Value = HashAlg> {
    prop::sample::select(vec![HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512])
}

proptest! {
    #![proptest_config(cfg(4))]

    /// Arbitrary signature bytes, of any length or of exactly the modulus length (the ones that
    /// reach the exponentiation), never panic and never verify, with either padding.
    #[test]
    fn arbitrary_rsa_signatures_never_verify(
        sig in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            prop::collection::vec(any::<u8>(), 256),
            // Just below n: the largest values the exponentiation accepts.
            (any::<Index>(), any::<u8>()).prop_map(|(i, b)| {
                let mut s = modulus(&keys().k1);
                let at = i.index(s.len());
                s[at] = s[at].min(b);
                s[255] = s[255].saturating_sub(1);
                s
            }),
        ],
        alg in hash_alg(),
        digest in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let key = k1_verifier();
        prop_assert!(!key.verify_pkcs1v15(alg, &digest, &sig));
        prop_assert!(!key.verify_pss(alg, &digest, &sig));
    }

    /// A genuine RS256 signature with one bit flipped, or any prefix of it, fails.
    #[test]
    fn mutated_rsa_signatures_never_verify(bit in 0usize..2048, cut in 0usize..256) {
        let digest = Sha256::digest(b"payload");
        let sig = keys().k1.sign(Pkcs1v15Sign::new::<Sha256>(), &digest).expect("signing");
        let key = k1_verifier();
        prop_assert!(key.verify_pkcs1v15(HashAlg::Sha256, &digest, &sig));
        let mut flipped = sig.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!key.verify_pkcs1v15(HashAlg::Sha256, &digest, &flipped));
        prop_assert!(!key.verify_pkcs1v15(HashAlg::Sha256, &digest, &sig[..cut]));
    }
}

// ---------------------------------------------------------------------------------------------
// exchange::parse_response and friends
// ---------------------------------------------------------------------------------------------

fn token_response() -> impl Strategy<Value = Value> {
    let access_token = prop::sample::select(vec![
        Some(json!("eyJ.backend.token")),
        Some(json!("")),
        Some(json!("with space")),
        Some(json!("caf\u{e9}")),
        Some(json!("line\nbreak")),
        Some(json!("x".repeat(16 * 1024))),
        Some(json!("x".repeat(16 * 1024 + 1))),
        Some(json!(12)),
        Some(Value::Null),
        None,
    ]);
    let token_type = prop::sample::select(vec![
        Some(json!("Bearer")),
        Some(json!("bearer")),
        Some(json!("N_A")),
        Some(json!("n_a")),
        Some(json!("MAC")),
        Some(json!("DPoP")),
        Some(json!(1)),
        Some(Value::Null),
        None,
    ]);
    let expires_in = prop_oneof![
        prop::sample::select(vec![
            Some(json!(3600)),
            Some(json!(0)),
            Some(json!(-1)),
            Some(json!(1.5)),
            Some(json!("3600")),
            Some(json!(u64::MAX)),
            Some(json!(i64::MAX)),
            Some(Value::Null),
            None,
        ]),
        any::<i64>().prop_map(|n| Some(json!(n))),
    ];
    let issued = prop::sample::select(vec![
        None,
        Some(json!("urn:ietf:params:oauth:token-type:access_token")),
        Some(json!("urn:ietf:params:oauth:token-type:jwt")),
        Some(json!("urn:ietf:params:oauth:token-type:id_token")),
        Some(json!(5)),
        Some(Value::Null),
    ]);
    (access_token, token_type, expires_in, issued).prop_map(|(a, t, e, i)| {
        let mut o = Map::new();
        for (k, v) in [
            ("access_token", a),
            ("token_type", t),
            ("expires_in", e),
            ("issued_token_type", i),
        ] {
            if let Some(v) = v {
                o.insert(k.into(), v);
            }
        }
        Value::Object(o)
    })
}

/// What a 200 answer must give, computed independently: `Some(expires_in)` when usable.
fn model_success(body: &Value) -> Option<Option<i64>> {
    let o = body.as_object()?;
    let token = o.get("access_token")?.as_str()?;
    if token.is_empty() || token.len() > 16 * 1024 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let tt = o.get("token_type")?.as_str()?;
    if !(tt.eq_ignore_ascii_case("bearer") || tt == "N_A") {
        return None;
    }
    // Null reads as absent (serde's `Option`), and absent is tolerated (some IdPs omit it).
    match o.get("issued_token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(s))
            if s == "urn:ietf:params:oauth:token-type:access_token"
                || s == "urn:ietf:params:oauth:token-type:jwt" => {}
        Some(_) => return None,
    }
    match o.get("expires_in") {
        None | Some(Value::Null) => Some(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(s) if s > 0 => Some(Some(s)),
            _ => None,
        },
        Some(_) => None,
    }
}

proptest! {
    #![proptest_config(cfg(1))]

    #[test]
    fn parse_response_survives_anything(
        status in prop::option::of(any::<u16>()),
        body in prop::collection::vec(any::<u8>(), 0..300),
        retry_after in prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
    ) {
        match exchange::parse_response(status, &body, retry_after.as_deref()) {
            Ok(ex) => {
                prop_assert_eq!(status, Some(200));
                prop_assert!(!ex.access_token.is_empty());
                prop_assert!(ex.access_token.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(ex.expires_in.is_none_or(|s| s > 0));
            }
            Err(ExchangeError::Unavailable { retry_after: Some(s), .. }) => prop_assert!(s <= 300),
            Err(_) => {}
        }
        let _ = exchange::describe_error_body(&body);
    }

    #[test]
    fn parse_response_matches_the_model(body in token_response()) {
        let text = body.to_string();
        let got = exchange::parse_response(Some(200), text.as_bytes(), None);
        match (model_success(&body), got) {
            (Some(expires_in), Ok(ex)) => {
                prop_assert_eq!(ex.expires_in, expires_in);
                prop_assert_eq!(Some(ex.access_token.as_str()), body["access_token"].as_str());
            }
            (None, Err(ExchangeError::BadResponse { .. })) => {}
            (model, got) => prop_assert!(false, "model {:?}, filter {:?} for {}", model, got, text),
        }
    }

    #[test]
    fn oversized_and_error_bodies_are_contained(
        status in 400u16..600,
        code in prop_oneof![
            prop::sample::select(vec![
                "invalid_grant", "invalid_request", "invalid_scope", "invalid_target",
                "access_denied", "invalid_client", "server_error", "temporarily_unavailable",
            ]).prop_map(str::to_string),
            ".{0,20}",
        ],
        description in ".{0,300}",
        pad in 0usize..3,
    ) {
        let body = json!({"error": code, "error_description": description}).to_string();
        let body = match pad {
            0 => body,
            1 => format!("{body}{}", " ".repeat(exchange::MAX_RESPONSE_BYTES)),
            _ => format!("{}{body}", " ".repeat(exchange::MAX_RESPONSE_BYTES)),
        };
        let r = exchange::parse_response(Some(status), body.as_bytes(), None);
        prop_assert!(r.is_err());
        if body.len() > exchange::MAX_RESPONSE_BYTES {
            prop_assert_eq!(r, Err(ExchangeError::BadResponse { reason: "response too large" }));
        }
        if let Some(d) = exchange::describe_error_body(body.as_bytes()) {
            prop_assert!(!d.chars().any(char::is_control), "{:?}", d);
        }
    }

    #[test]
    fn reusable_until_never_outlives_the_subject_token(
        lifetime in prop::option::of(any::<i64>()),
        subject_exp in any::<i64>(),
        now in any::<i64>(),
        margin in 0i64..=3600,
    ) {
        let ex = exchange::Exchanged { access_token: "t".into(), expires_in: lifetime };
        if let Some(until) = exchange::reusable_until(&ex, subject_exp, now, margin) {
            prop_assert!(until > now);
            prop_assert!(until <= subject_exp.saturating_sub(margin));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config::parse_policy
// ---------------------------------------------------------------------------------------------

fn base_config() -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "required_scopes": ["mcp:tools:call"],
        "realm": "mcp",
        "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys", "authority": "idp.example.com"},
        "exchange": {
            "cluster": "okta", "path": "/oauth2/backend/v1/token", "authority": "idp.example.com",
            "client_id": "gw", "client_secret_env": "SECRET",
            "audience": "backend", "scope": "backend-api:read"
        }
    })
}

fn env(name: &str) -> Option<String> {
    match name {
        "SECRET" => Some("s3cret".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

const CONFIG_FIELDS: &[&str] = &[
    "issuer",
    "audiences",
    "required_scopes",
    "clock_skew_seconds",
    "max_token_bytes",
    "realm",
    "resource_metadata_url",
    "jwks",
    "jwks.inline",
    "jwks.cluster",
    "jwks.path",
    "jwks.authority",
    "jwks.refresh_interval_seconds",
    "jwks.min_refetch_interval_seconds",
    "jwks.timeout_ms",
    "jwks.max_wait_ms",
    "exchange",
    "exchange.cluster",
    "exchange.path",
    "exchange.authority",
    "exchange.client_id",
    "exchange.client_secret_env",
    "exchange.client_auth",
    "exchange.audience",
    "exchange.scope",
    "exchange.resource",
    "exchange.subject_token_type",
    "exchange.requested_token_type",
    "exchange.timeout_ms",
    "exchange.cache_margin_seconds",
    "exchange.cache_max_entries",
    "resource",
    "authorization_servers",
    "routes",
    "unmatched",
    "identity_headers",
    "audit_log",
    "mcp",
    "mcp.max_body_bytes",
];

#[derive(Debug, Clone)]
enum ConfigEdit {
    Set(&'static str, Value),
    Remove(&'static str),
    Unknown(&'static str, String),
}

fn config_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => arb_json(),
        2 => prop::sample::select(vec![
            json!(""), json!(" "), json!("/"), json!("no-slash"), json!("/a b"), json!("a\"b"),
            json!("a\\b"), json!("\u{7}"), json!(0), json!(1), json!(-1), json!(255), json!(256),
            json!(600), json!(601), json!(65536), json!(65537), json!(60_000), json!(60_001),
            json!(u64::MAX), json!([]), json!([""]), json!(["a b"]), json!(["ok"]),
            json!("client_secret_post"), json!("private_key_jwt"), json!("SECRET"),
            json!("EMPTY"), json!("UNSET"), json!({"keys": []}), json!("{\"keys\": []}"),
            jwks_doc(), json!(jwks_doc().to_string()),
        ]),
    ]
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    let field = prop::sample::select(CONFIG_FIELDS.to_vec());
    prop_oneof![
        4 => (field.clone(), config_value()).prop_map(|(f, v)| ConfigEdit::Set(f, v)),
        2 => field.prop_map(ConfigEdit::Remove),
        1 => (prop::sample::select(vec!["", "jwks", "exchange"]), "[a-z_]{1,10}")
            .prop_map(|(at, name)| ConfigEdit::Unknown(at, name)),
    ]
}

fn apply_edit(config: &mut Value, edit: &ConfigEdit) {
    let (path, last) = match edit {
        ConfigEdit::Set(f, _) | ConfigEdit::Remove(f) => match f.rsplit_once('.') {
            Some((p, l)) => (p, l.to_string()),
            None => ("", f.to_string()),
        },
        ConfigEdit::Unknown(at, name) => (*at, format!("zz_{name}")),
    };
    let parent = if path.is_empty() {
        Some(config)
    } else {
        config.get_mut(path)
    };
    let Some(Value::Object(parent)) = parent else {
        return;
    };
    match edit {
        ConfigEdit::Set(_, v) => {
            parent.insert(last, v.clone());
        }
        ConfigEdit::Remove(_) => {
            parent.remove(&last);
        }
        ConfigEdit::Unknown(..) => {
            parent.insert(last, json!(1));
        }
    }
}

fn check_keys(keys: &config::KeySource) -> Result<(), TestCaseError> {
    match keys {
        config::KeySource::Inline(set) => prop_assert!(!set.keys.is_empty()),
        config::KeySource::Remote(r) => {
            prop_assert!(r.path.starts_with('/'));
            prop_assert!(r.refresh_interval.as_secs() >= 1);
            prop_assert!(r.timeout.as_millis() >= 1);
        }
    }
    Ok(())
}

/// Everything a parsed policy promises the rest of the filter.
fn check_policy(p: &config::Policy) -> Result<(), TestCaseError> {
    prop_assert!(!p.providers.is_empty());
    for provider in &p.providers {
        prop_assert!(!provider.issuer.trim().is_empty());
        prop_assert!(!provider.audiences.is_empty());
        prop_assert!(provider.audiences.iter().all(|a| !a.trim().is_empty()));
        check_keys(&provider.keys)?;
    }
    prop_assert!((0..=600).contains(&p.inbound.clock_skew_seconds));
    prop_assert!((256..=64 * 1024).contains(&p.inbound.max_token_bytes));
    prop_assert!(!p.routes.is_empty());
    for r in &p.routes {
        prop_assert!(r.path_prefix.starts_with('/'), "{:?}", r.path_prefix);
        if let (false, Some(audiences)) = (r.public, &r.audiences) {
            prop_assert!(!audiences.is_empty());
            prop_assert!(audiences.iter().all(|a| !a.trim().is_empty()));
        }
        for v in [&r.challenge.realm, &r.challenge.resource_metadata_url]
            .into_iter()
            .flatten()
        {
            prop_assert!(!v.contains('"') && !v.contains('\\') && !v.chars().any(char::is_control));
        }
        let Some(x) = r.target.as_deref() else {
            return Err(TestCaseError::fail(
                "exchange mode gives every route a target",
            ));
        };
        prop_assert!(x.path.starts_with('/') && !x.path.chars().any(char::is_whitespace));
        // A secret, when the client authenticates with one, is never empty.
        prop_assert!(x
            .client_secret
            .as_ref()
            .is_none_or(|s| !s.expose().is_empty()));
        prop_assert!(x.audience.is_some() || x.resource.is_some());
        let ms = x.timeout.as_millis();
        prop_assert!((1..=60_000).contains(&ms));
    }
    // The secret never shows in Debug output.
    let debug = format!("{p:?}");
    prop_assert!(!debug.contains("s3cret"), "{}", debug);
    Ok(())
}

proptest! {
    #![proptest_config(cfg(1))]

    #[test]
    fn parse_policy_survives_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(p) = config::parse_policy(&raw, &env) {
            check_policy(&p)?;
        }
    }

    #[test]
    fn parse_policy_survives_arbitrary_json(doc in arb_json()) {
        if let Ok(p) = config::parse_policy(doc.to_string().as_bytes(), &env) {
            check_policy(&p)?;
        }
    }

    #[test]
    fn mutated_configs_are_valid_or_name_a_field(edits in prop::collection::vec(config_edit(), 1..4)) {
        let mut doc = base_config();
        for e in &edits {
            apply_edit(&mut doc, e);
        }
        match config::parse_policy(doc.to_string().as_bytes(), &env) {
            Ok(p) => {
                check_policy(&p)?;
                prop_assert!(
                    !edits.iter().any(|e| matches!(e, ConfigEdit::Unknown(..))),
                    "an unknown field was accepted: {}", doc
                );
            }
            Err(e) => {
                let shown = e.to_string();
                if !e.field.is_empty() {
                    prop_assert!(shown.contains(&e.field), "{}", shown);
                }
                prop_assert!(!shown.contains("s3cret"), "{}", shown);
            }
        }
    }

    /// The exchange request carries the subject token intact, whatever it holds.
    #[test]
    fn exchange_request_round_trips_the_subject_token(subject in any::<String>(), post in any::<bool>()) {
        let mut doc = base_config();
        if post {
            doc["exchange"]["client_auth"] = json!("client_secret_post");
        }
        let policy = config::parse_policy(doc.to_string().as_bytes(), &env).expect("base config");
        let req = exchange::ExchangeRequest::build(policy.routes[0].target.as_deref().expect("exchange mode"), &subject, NOW, "n1")
            .expect("a secret-authenticated request builds");
        let body = String::from_utf8(req.body.clone()).expect("form bodies are ASCII");
        prop_assert!(body.is_ascii());
        let fields = form_decode(&body);
        let got: Vec<_> = fields.iter().filter(|(k, _)| k == "subject_token").collect();
        prop_assert_eq!(got.len(), 1);
        prop_assert_eq!(&got[0].1, &subject);
        prop_assert_eq!(
            req.headers.iter().find(|(k, _)| *k == "content-length").map(|(_, v)| v.clone()),
            Some(req.body.len().to_string())
        );
    }
}

/// An independent `application/x-www-form-urlencoded` decoder.
fn form_decode(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s.get(i + 1..i + 3).expect("two hex digits after %");
                    out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).expect("UTF-8 after decoding")
    };
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// MCP request inspection (JSON-RPC bodies and MCP 2026-07-28 headers)
// ---------------------------------------------------------------------------------------------

fn jsonrpc_message() -> impl Strategy<Value = Value> {
    let method = prop_oneof![
        prop::sample::select(vec!["tools/call", "tools/list", "initialize", "ping", ""])
            .prop_map(Value::from),
        arb_json(),
    ];
    let name = prop_oneof![
        prop::sample::select(vec!["whoami", "echo", "", " "]).prop_map(Value::from),
        arb_json(),
    ];
    (method, prop::option::of(name), prop::option::of(arb_json())).prop_map(|(m, n, id)| {
        let mut o = Map::new();
        o.insert("jsonrpc".into(), json!("2.0"));
        o.insert("method".into(), m);
        if let Some(id) = id {
            o.insert("id".into(), id);
        }
        if let Some(n) = n {
            o.insert("params".into(), json!({ "name": n, "arguments": {} }));
        }
        Value::Object(o)
    })
}

proptest! {
    #![proptest_config(cfg(1))]

    #[test]
    fn jsonrpc_bodies_never_panic(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        arb_json().prop_map(|v| v.to_string().into_bytes()),
        jsonrpc_message().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(jsonrpc_message(), 0..4).prop_map(|v| Value::Array(v).to_string().into_bytes()),
    ]) {
        if let Ok(body) = jsonrpc::calls_in_body(&body) {
            for c in body.calls {
                // A tools/call is always attributed to a tool: per-tool policy cannot be dodged.
                prop_assert!(c.method != "tools/call" || c.tool().is_some(), "{:?}", c);
            }
        }
    }

    #[test]
    fn mcp_method_headers_never_panic(
        method in prop::option::of(prop_oneof![
            Just(b"tools/call".to_vec()),
            prop::collection::vec(any::<u8>(), 0..20),
        ]),
        name in prop::option::of(prop::collection::vec(any::<u8>(), 0..20)),
    ) {
        let methods: Vec<&[u8]> = method.as_deref().into_iter().collect();
        let names: Vec<&[u8]> = name.as_deref().into_iter().collect();
        if let Ok(Some(c)) = jsonrpc::call_from_headers(&methods, &names) {
            prop_assert!(!c.method.is_empty());
            // A decoded value is what an encoding of it would carry: re-encoding round-trips.
            if let Some(n) = &c.name {
                let encoded = format!("=?base64?{}?=", STANDARD.encode(n));
                let decoded = jsonrpc::decode_header_value(encoded.as_bytes());
                prop_assert_eq!(decoded.as_deref(), Some(n.as_str()));
            }
        }
    }
}

// --- the serialised header map the host hands over -------------------------------------------

proptest! {
    /// Whatever the bytes, reading them as a header map never panics or reads past the end.
    #[test]
    fn header_map_reader_survives_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let map = SerializedHeaders::new(bytes.clone());
        let n = map.iter().count();
        prop_assert!(n <= bytes.len() / 8 + 1);
        let _ = map.get("authorization");
        let _ = map.values(":path").count();
    }

    /// A well-formed map reads back exactly what was serialised, in order, values byte for byte.
    #[test]
    fn header_map_round_trips(
        pairs in proptest::collection::vec(
            ("[a-z:-]{1,12}", proptest::collection::vec(any::<u8>(), 0..40)),
            0..12,
        )
    ) {
        let borrowed: Vec<(&str, &[u8])> =
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let map = SerializedHeaders::new(header_map::serialize(&borrowed));
        let read: Vec<(Vec<u8>, Vec<u8>)> =
            map.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> =
            pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.clone())).collect();
        prop_assert_eq!(read, want);
        for (name, value) in &pairs {
            let first = pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
            prop_assert_eq!(map.get(name), first);
            let all: Vec<&[u8]> = map.values(name).collect();
            prop_assert!(all.contains(&value.as_slice()));
        }
    }
}
