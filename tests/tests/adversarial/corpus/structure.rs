//! The token's structure and its JSON: segments, base64url, header and payload that are not JSON
//! objects, repeated member names, deep nesting and size.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use gateway_tests::idp::{MintRequest, ScopeStyle};
use serde_json::{json, Value};

use super::{Corpus, Seeds};
use crate::expect::Expect::*;
use crate::forge::{b64, segments, Forge};

/// Every way of breaking a token's structure, applied to a validly signed token.
fn structural_mutations(token: &str, other: &str, kid: &str) -> Vec<(&'static str, String)> {
    let s = segments(token);
    let (h, p, sig) = (&s[0], &s[1], &s[2]);
    let sig_bytes = URL_SAFE_NO_PAD.decode(sig).expect("signature is base64url");
    let jwe_header = b64(json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid})
        .to_string()
        .as_bytes());
    let mid = p.len() / 2;
    let flip = |seg: &str, at: usize| -> String {
        let mut c: Vec<char> = seg.chars().collect();
        c[at] = if c[at] == 'A' { 'B' } else { 'A' };
        c.into_iter().collect()
    };
    let standard = STANDARD_NO_PAD.encode(&sig_bytes);
    assert_ne!(&standard, sig, "signature has no - or _ to re-encode");
    vec![
        ("two segments", format!("{h}.{p}")),
        ("one segment", h.clone()),
        ("four segments", format!("{h}.{p}.{sig}.{sig}")),
        ("four segments, last empty", format!("{h}.{p}.{sig}.")),
        ("six segments", format!("{h}.{p}.{sig}.{h}.{p}.{sig}")),
        (
            "JWE-shaped five segments",
            format!(
                "{jwe_header}.{}.{}.{p}.{}",
                b64(&[7; 256]),
                b64(&[1; 12]),
                b64(&[2; 16])
            ),
        ),
        (
            "five segments from the token",
            format!("{h}.{p}.{sig}.{p}.{sig}"),
        ),
        ("empty header segment", format!(".{p}.{sig}")),
        ("empty payload segment", format!("{h}..{sig}")),
        ("empty signature segment", format!("{h}.{p}.")),
        ("only dots", "..".into()),
        ("padding on the header", format!("{h}=.{p}.{sig}")),
        ("padding on the payload", format!("{h}.{p}==.{sig}")),
        (
            "base64url signature with padding",
            format!("{h}.{p}.{}", URL_SAFE.encode(&sig_bytes)),
        ),
        ("standard base64 signature", format!("{h}.{p}.{standard}")),
        (
            "standard base64 padded signature",
            format!("{h}.{p}.{}", STANDARD.encode(&sig_bytes)),
        ),
        (
            "space inside the payload",
            format!("{h}.{} {}.{sig}", &p[..mid], &p[mid..]),
        ),
        (
            "tab inside the payload",
            format!("{h}.{}\t{}.{sig}", &p[..mid], &p[mid..]),
        ),
        ("space before the signature", format!("{h}.{p}. {sig}")),
        ("comma inside", format!("{h},{p}.{sig}")),
        ("quoted token", format!("\"{token}\"")),
        ("trailing semicolon", format!("{token};")),
        ("token twice", format!("{token} {token}")),
        ("percent-encoded dots", format!("{h}%2E{p}%2E{sig}")),
        (
            "truncated signature",
            format!("{h}.{p}.{}", &sig[..sig.len() - 4]),
        ),
        (
            "signature of another token",
            format!("{h}.{p}.{}", segments(other)[2]),
        ),
        (
            "payload of another token",
            format!("{h}.{}.{sig}", segments(other)[1]),
        ),
        (
            "one payload character changed",
            format!("{h}.{}.{sig}", flip(p, mid)),
        ),
        (
            "one header character changed",
            format!("{}.{p}.{sig}", flip(h, 3)),
        ),
        (
            "one signature character changed",
            format!("{h}.{p}.{}", flip(sig, 100)),
        ),
        (
            "signature reversed",
            format!("{h}.{p}.{}", sig.chars().rev().collect::<String>()),
        ),
        ("token lower-cased", token.to_lowercase()),
        ("segments swapped", format!("{p}.{h}.{sig}")),
    ]
}

/// Every structural mutation of several validly signed base tokens.
pub fn broken_structure(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let good = seeds.good.clone();
    let kid = seeds.kid.clone();
    let bases = [
        ("Okta token", good.clone()),
        (
            "scope-string token",
            f.mint(MintRequest {
                scope_style: ScopeStyle::Scope,
                ..MintRequest::default()
            }),
        ),
        (
            "other user's token",
            f.mint(MintRequest {
                sub: "mallory@example.com".into(),
                ..MintRequest::default()
            }),
        ),
    ];
    let other = f.mint(MintRequest {
        sub: "admin@example.com".into(),
        ..MintRequest::default()
    });
    for (base, token) in &bases {
        for (mutation, mutated) in structural_mutations(token, &other, &kid) {
            // A comma cannot be told apart from two Authorization headers that Envoy joined
            // with ",": the filter answers it as a duplicate (400 invalid_request).
            let expect = if mutation == "comma inside" {
                InvalidRequest
            } else {
                InvalidToken
            };
            c.token(format!("{mutation} ({base})"), &mutated, expect);
        }
    }
}

/// Header or payload JSON that is not an object, or not JSON.
pub fn header_and_payload_not_json_objects(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let kid = seeds.kid.clone();
    let good_claims_text = &seeds.good_claims_text;
    for (what, header) in [
        ("array", b"[]".to_vec()),
        ("string", b"\"RS256\"".to_vec()),
        ("number", b"1".to_vec()),
        ("null", b"null".to_vec()),
        ("true", b"true".to_vec()),
        (
            "truncated JSON",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"").into_bytes(),
        ),
        ("empty", Vec::new()),
        (
            "non-UTF-8 bytes",
            b"{\"kid\":\"\xff\xfe\",\"alg\":\"RS256\"}".to_vec(),
        ),
        (
            "trailing garbage",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"}}x").into_bytes(),
        ),
        (
            "two objects",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"}}{{}}").into_bytes(),
        ),
    ] {
        c.token(
            format!("header JSON {what}"),
            &f.sign_bytes(&header, good_claims_text.as_bytes()),
            InvalidToken,
        );
    }
    let header_text = f.header().to_string();
    for (what, claims) in [
        ("array", b"[1]".to_vec()),
        ("string", b"\"claims\"".to_vec()),
        ("number", b"1".to_vec()),
        ("null", b"null".to_vec()),
        ("true", b"true".to_vec()),
        (
            "truncated JSON",
            good_claims_text.as_bytes()[..good_claims_text.len() - 1].to_vec(),
        ),
        ("empty", Vec::new()),
        (
            "non-UTF-8 bytes",
            good_claims_text
                .replacen("user@", "us\u{1}r@", 1)
                .into_bytes()
                .into_iter()
                .map(|b| if b == 1 { 0xff } else { b })
                .collect(),
        ),
        (
            "trailing garbage",
            format!("{good_claims_text}x").into_bytes(),
        ),
        (
            "two objects",
            format!("{good_claims_text}{{}}").into_bytes(),
        ),
    ] {
        c.token(
            format!("payload JSON {what}"),
            &f.sign_bytes(header_text.as_bytes(), &claims),
            InvalidToken,
        );
    }
}

/// Repeated member names in the claims and in the header: which one wins must not matter.
pub fn duplicate_names(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let kid = seeds.kid.clone();
    let now = seeds.now;
    let good_claims_text = &seeds.good_claims_text;
    let issuer = f.stack.idp.issuer("mcp");
    for (what, raw) in [
        (
            "sub (second wins would be admin)",
            r#""sub":"admin@example.com""#.to_string(),
        ),
        ("exp (expired first)", format!("\"exp\":{}", now - 3600)),
        (
            "exp (far future first)",
            format!("\"exp\":{}", now + 10 * 365 * 86400),
        ),
        (
            "iss (evil first)",
            r#""iss":"https://evil.example.com/oauth2/mcp""#.to_string(),
        ),
        ("iss (same value)", format!("\"iss\":\"{issuer}\"")),
        ("aud", r#""aud":"other""#.to_string()),
        ("scp", r#""scp":["mcp:tools:admin"]"#.to_string()),
    ] {
        c.token(
            format!("duplicate claim {what}"),
            &f.with_raw_members(&raw),
            InvalidToken,
        );
    }
    for (what, header) in [
        (
            "alg none then RS256",
            format!("{{\"alg\":\"none\",\"alg\":\"RS256\",\"kid\":\"{kid}\"}}"),
        ),
        (
            "alg RS256 then none",
            format!("{{\"alg\":\"RS256\",\"alg\":\"none\",\"kid\":\"{kid}\"}}"),
        ),
        (
            "kid twice",
            format!("{{\"alg\":\"RS256\",\"kid\":\"other\",\"kid\":\"{kid}\"}}"),
        ),
    ] {
        c.token(
            format!("duplicate header member {what}"),
            &f.sign_bytes(header.as_bytes(), good_claims_text.as_bytes()),
            InvalidToken,
        );
    }
}

/// Deep nesting and oversized tokens.
pub fn nesting_and_size(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let kid = seeds.kid.clone();
    let good_claims_text = &seeds.good_claims_text;
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    c.token(
        "2,500 nested arrays in a claim",
        &f.with_raw_members(&format!("\"deep\":{}", nested(2_500))),
        InvalidToken,
    );
    c.token(
        "1,000 nested objects in a claim",
        &f.with_raw_members(&format!(
            "\"deep\":{}1{}",
            "{\"a\":".repeat(1_000),
            "}".repeat(1_000)
        )),
        InvalidToken,
    );
    c.token(
        "10,000 nested arrays in a claim",
        &f.with_raw_members(&format!("\"deep\":{}", nested(10_000))),
        InvalidToken,
    );
    c.token(
        "2,500 nested arrays in the header",
        &f.sign_bytes(
            format!(
                "{{\"alg\":\"RS256\",\"kid\":\"{kid}\",\"deep\":{}}}",
                nested(2_500)
            )
            .as_bytes(),
            good_claims_text.as_bytes(),
        ),
        InvalidToken,
    );
    let mut big = f.good_claims();
    big.insert("pad".into(), json!("x".repeat(6_200)));
    let big = f.sign(&f.header(), &Value::Object(big));
    assert!(big.len() > 8 * 1024, "{}", big.len());
    c.token(
        format!("validly signed token of {} bytes (over 8 KiB)", big.len()),
        &big,
        InvalidToken,
    );
    c.token("20 KiB of base64url", &"A".repeat(20 * 1024), InvalidToken);
}
