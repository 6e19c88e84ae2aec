//! How the credentials arrive: no `Authorization` or another scheme, the token somewhere else,
//! malformed requests (repeated `Authorization`, `Bearer` without a token, `access_token` in the
//! query), and header bytes an HTTP client library would refuse to send.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{bearer_header, Corpus, Seeds};
use crate::expect::Expect::*;
use crate::forge::segments;

/// No credentials the filter takes: no header, another scheme or a mangled `Bearer`, or the token
/// in another header: 401 with a challenge that carries no error code.
pub fn no_credentials_and_other_schemes(c: &mut Corpus, seeds: &Seeds) {
    let good = seeds.good.clone();
    c.add("no Authorization header", vec![], NoCredentials);
    let basic = STANDARD.encode("user:pass");
    for (name, value) in [
        ("Basic scheme", format!("Basic {basic}")),
        ("Basic scheme carrying the JWT", format!("Basic {good}")),
        (
            "Digest scheme",
            "Digest username=\"u\", realm=\"mcp\", nonce=\"n\"".to_string(),
        ),
        ("DPoP scheme with the JWT", format!("DPoP {good}")),
        ("Token scheme with the JWT", format!("Token {good}")),
        ("MAC scheme", format!("MAC {good}")),
        ("Negotiate scheme", "Negotiate YIIBhwYGKwYBBQUC".to_string()),
        ("Bearer glued to the token", format!("Bearer{good}")),
        ("Bearer with a tab separator", format!("Bearer\t{good}")),
        ("Bearer- prefix", format!("Bearer-{good}")),
        ("Bear (truncated scheme)", format!("Bear {good}")),
        ("token without any scheme", good.clone()),
    ] {
        c.add(
            name,
            vec![("Authorization".into(), value.into_bytes())],
            NoCredentials,
        );
    }
    for (name, header) in [
        ("token only in X-Access-Token", "X-Access-Token"),
        ("token only in Proxy-Authorization", "Proxy-Authorization"),
        (
            "token only in X-Forwarded-Access-Token",
            "X-Forwarded-Access-Token",
        ),
    ] {
        let v = if header == "Proxy-Authorization" {
            format!("Bearer {good}")
        } else {
            good.clone()
        };
        c.add(name, vec![(header.into(), v.into_bytes())], NoCredentials);
    }
    c.add(
        "token only in a cookie",
        vec![("Cookie".into(), format!("access_token={good}").into_bytes())],
        NoCredentials,
    );
}

/// Malformed requests: 400 `invalid_request`.
pub fn malformed_requests(c: &mut Corpus, seeds: &Seeds) {
    let good = seeds.good.clone();
    let basic = STANDARD.encode("user:pass");
    let auth = |v: &str| ("Authorization".to_string(), v.as_bytes().to_vec());
    c.add(
        "two identical Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Bearer and Basic Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Basic {basic}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Basic then Bearer Authorization headers",
        vec![
            auth(&format!("Basic {basic}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Authorization headers differing in case",
        vec![
            (
                "authorization".into(),
                format!("Bearer {good}").into_bytes(),
            ),
            ("AUTHORIZATION".into(), b"Bearer smuggled".to_vec()),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "three Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add("Bearer with no token", vec![auth("Bearer")], InvalidRequest);
    c.add(
        "Bearer with trailing spaces only",
        vec![auth("Bearer    ")],
        InvalidRequest,
    );
    c.add(
        "lower-case bearer with no token",
        vec![auth("bearer")],
        InvalidRequest,
    );
    let q = |token: &str| format!("/mcp?access_token={token}");
    c.add_at(
        "access_token in the query only",
        &q(&good),
        vec![],
        InvalidRequest,
    );
    c.add_at(
        "access_token in the query and a good header",
        &q(&good),
        bearer_header(&good),
        InvalidRequest,
    );
    c.add_at(
        "access_token after another query parameter",
        &format!("/mcp?session=1&access_token={good}"),
        bearer_header(&good),
        InvalidRequest,
    );
    c.add_at(
        "percent-encoded access_token name",
        &format!("/mcp?access%5Ftoken={good}"),
        bearer_header(&good),
        InvalidRequest,
    );
    c.add_at(
        "empty access_token parameter",
        "/mcp?access_token=",
        bearer_header(&good),
        InvalidRequest,
    );
    c.add_at(
        "bare access_token parameter",
        "/mcp?access_token",
        bearer_header(&good),
        InvalidRequest,
    );
}

/// Bytes an HTTP client library would refuse to send.
pub fn bytes_a_client_library_would_refuse(c: &mut Corpus, seeds: &Seeds) {
    let good = seeds.good.clone();
    let s = segments(&good);
    for (what, value) in [
        (
            "non-UTF-8 bytes inside the token",
            [
                format!("Bearer {}.", s[0]).as_bytes(),
                b"\xff\xfe",
                format!(".{}", s[2]).as_bytes(),
            ]
            .concat(),
        ),
        (
            "a Latin-1 byte inside the token",
            [
                format!("Bearer {}", &good[..40]).as_bytes(),
                b"\xe9",
                &good.as_bytes()[40..],
            ]
            .concat(),
        ),
        (
            "UTF-8 non-ASCII inside the token",
            format!("Bearer {}\u{e9}{}", &good[..40], &good[40..]).into_bytes(),
        ),
    ] {
        c.add(what, vec![("Authorization".into(), value)], InvalidToken);
    }
    // A control byte in place of one token character (inserting it would not do: Envoy drops a
    // bare CR, and the genuine token would arrive).
    for (what, byte) in [
        ("a vertical tab", 0x0b),
        ("a NUL", 0),
        ("a bare CR", b'\r'),
        ("an escape", 0x1b),
    ] {
        let mut value = format!("Bearer {good}").into_bytes();
        value[50] = byte;
        c.add(
            format!("{what} in place of a token character"),
            vec![("Authorization".into(), value)],
            EnvoyOrInvalidToken,
        );
    }
}
