//! The signature and the key that made it: `alg` attacks (none, HMAC keyed with the public key,
//! another algorithm over a real signature), `kid` values, keys from elsewhere (`jku`, `x5u`,
//! `jwk`, `x5c`) and `crit`/`enc` headers.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

use super::{Corpus, Seeds};
use crate::expect::Expect::*;
use crate::forge::{b64, pem, public_key_der, segments, Forge};

/// `alg` attacks.
pub fn algorithms(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let good = seeds.good.clone();
    let kid = seeds.kid.clone();
    let claims_seg = b64(Value::Object(f.good_claims()).to_string().as_bytes());
    let real_sig = segments(&good)[2].clone();
    for alg in ["none", "None", "NONE", "nOnE"] {
        for with_kid in [true, false] {
            let mut h = json!({"alg": alg});
            if with_kid {
                h["kid"] = json!(kid);
            }
            let h = b64(h.to_string().as_bytes());
            let k = if with_kid { "with kid" } else { "without kid" };
            c.token(
                format!("alg {alg}, {k}, empty signature"),
                &format!("{h}.{claims_seg}."),
                InvalidToken,
            );
            if alg == "none" {
                c.token(
                    format!("alg {alg}, {k}, a real signature of other bytes"),
                    &format!("{h}.{claims_seg}.{real_sig}"),
                    InvalidToken,
                );
            }
        }
    }
    let jwk = f.stack.idp.public_jwk("mcp");
    let (pkcs1, spki) = public_key_der(&jwk);
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        (
            "JWK n as text",
            jwk["n"].as_str().unwrap_or_default().as_bytes().to_vec(),
        ),
        (
            "JWK n decoded",
            URL_SAFE_NO_PAD
                .decode(jwk["n"].as_str().unwrap_or_default())
                .unwrap_or_default(),
        ),
        (
            "JWK e as text",
            jwk["e"].as_str().unwrap_or_default().as_bytes().to_vec(),
        ),
        ("JWK JSON", jwk.to_string().into_bytes()),
        ("PKCS#1 DER", pkcs1.clone()),
        ("SPKI DER", spki.clone()),
        ("PKCS#1 PEM", pem("RSA PUBLIC KEY", &pkcs1).into_bytes()),
        ("SPKI PEM", pem("PUBLIC KEY", &spki).into_bytes()),
        (
            "SPKI PEM without final newline",
            pem("PUBLIC KEY", &spki).trim_end().as_bytes().to_vec(),
        ),
    ];
    for alg in ["HS256", "HS384", "HS512"] {
        for (what, secret) in &secrets {
            c.token(
                format!("{alg} keyed with the public key ({what})"),
                &f.hmac_token(alg, secret),
                InvalidToken,
            );
        }
    }
    for alg in [
        "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256", "rs256",
        " RS256",
    ] {
        c.token(
            format!("alg {alg:?} over a real RS256 signature"),
            &f.with_alg_keeping_signature(json!(alg), true),
            InvalidToken,
        );
    }
    for (what, alg) in [
        ("missing", Value::Null),
        ("array", json!(["RS256"])),
        ("number", json!(256)),
        ("object", json!({"alg": "RS256"})),
    ] {
        c.token(
            format!("alg {what} over a real RS256 signature"),
            &f.with_alg_keeping_signature(alg, true),
            InvalidToken,
        );
    }
}

/// `kid` values that name no published key, or not unambiguously.
pub fn key_ids(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let kid = seeds.kid.clone();
    // The JWKS holds two keys (rotated before the corpus): a token must say which.
    c.token(
        "kid missing with two keys published",
        &f.with_header(&json!({"alg": "RS256"})),
        InvalidToken,
    );
    c.token(
        "kid null with two keys published",
        &f.with_header(&json!({"alg": "RS256", "kid": null})),
        InvalidToken,
    );
    let long_kid = "k".repeat(10 * 1024);
    let mid_kid = "k".repeat(4 * 1024);
    for (what, k) in [
        ("unknown", json!("no-such-key")),
        ("path traversal ../", json!("../../../../etc/passwd")),
        ("relative path", json!("../keys")),
        ("URL", json!("https://evil.example/keys")),
        ("percent-encoded traversal", json!("%2e%2e%2f%2e%2e%2f")),
        ("empty", json!("")),
        ("upper-cased real kid", json!(kid.to_uppercase())),
        ("real kid with trailing space", json!(format!("{kid} "))),
        ("real kid with NUL", json!(format!("{kid}\u{0}"))),
        ("real kid with newline", json!(format!("{kid}\nX"))),
        ("4 KiB long", json!(mid_kid)),
        ("10 KiB long", json!(long_kid)),
        ("number", json!(1)),
        ("zero", json!(0)),
        ("object", json!({"kid": kid})),
        ("array", json!([kid])),
        ("boolean", json!(true)),
        ("backend AS kid", json!(f.stack.idp.kid("backend"))),
    ] {
        c.token(
            format!("kid {what}"),
            &f.with_header(&json!({"alg": "RS256", "kid": k})),
            InvalidToken,
        );
    }
}

/// Keys from elsewhere, the token signed by a key NOT in the JWKS: nothing may be fetched or
/// trusted from the token's own header.
pub fn keys_from_elsewhere(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds, attacker_url: &str) {
    let kid = seeds.kid.clone();
    let (_, spki) = public_key_der(&f.stack.idp.public_jwk("mcp"));
    let backend_jwk = f.stack.idp.public_jwk("backend");
    let backend_kid = f.stack.idp.kid("backend");
    let claims = Value::Object(f.good_claims()).to_string();
    let foreign =
        |h: Value| f.sign_bytes_as("backend", h.to_string().as_bytes(), claims.as_bytes());
    for (what, h) in [
        (
            "jku to the attacker, real kid",
            json!({"alg": "RS256", "kid": kid, "jku": attacker_url}),
        ),
        (
            "jku to the attacker, attacker kid",
            json!({"alg": "RS256", "kid": backend_kid, "jku": attacker_url}),
        ),
        (
            "jku to the attacker, no kid",
            json!({"alg": "RS256", "jku": attacker_url}),
        ),
        (
            "jku to another AS's JWKS",
            json!({"alg": "RS256", "kid": backend_kid, "jku": f.stack.idp.jwks_uri("backend")}),
        ),
        (
            "x5u to the attacker",
            json!({"alg": "RS256", "kid": kid, "x5u": attacker_url}),
        ),
        (
            "embedded jwk, its kid",
            json!({"alg": "RS256", "kid": backend_kid, "jwk": backend_jwk}),
        ),
        (
            "embedded jwk, real kid",
            json!({"alg": "RS256", "kid": kid, "jwk": backend_jwk}),
        ),
        (
            "embedded jwk, no kid",
            json!({"alg": "RS256", "jwk": backend_jwk}),
        ),
        (
            "x5c chain",
            json!({"alg": "RS256", "kid": kid, "x5c": [STANDARD.encode(&spki)]}),
        ),
    ] {
        c.token(format!("foreign key: {what}"), &foreign(h), InvalidToken);
    }
}

/// `crit` extensions the filter does not understand, and a JWE's `enc` on a JWS.
pub fn crit_and_enc(c: &mut Corpus, f: &Forge<'_>) {
    for (what, extra) in [
        (
            "unknown crit extension",
            json!({"crit": ["x-unknown"], "x-unknown": 1}),
        ),
        ("crit naming a registered claim", json!({"crit": ["exp"]})),
        ("crit b64 false", json!({"crit": ["b64"], "b64": false})),
        ("empty crit", json!({"crit": []})),
        ("crit as a string", json!({"crit": "x-unknown"})),
        (
            "enc member (JWE header on a JWS)",
            json!({"enc": "A256GCM"}),
        ),
    ] {
        let mut h = f.header();
        for (k, v) in extra.as_object().into_iter().flatten() {
            h[k] = v.clone();
        }
        c.token(what, &f.with_header(&h), InvalidToken);
    }
}
