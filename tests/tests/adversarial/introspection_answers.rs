//! Hostile RFC 7662 introspection answers: what an introspection endpoint (or whoever sits
//! between it and the gateway) could send for an opaque token. None may let the request
//! through; each gets its row of the README's answer table: 401 `invalid_token` when the answer
//! says the token is no good (inactive, expired by its own `exp`, no `sub`, not for this
//! audience), 403 when its scope is short, 502 when it is no RFC 7662 answer at all.

use serde_json::json;

/// (name, HTTP status, body, expected status)
pub fn hostile_answers(issuer: &str, now: u64) -> Vec<(String, u16, String, u16)> {
    let later = now + 600;
    // An answer the gateway would accept, with one member replaced (`null`: removed).
    let good = |name: &str, value: serde_json::Value| {
        let mut a = json!({"active": true, "sub": "mallory@example.com",
                           "scope": "mcp:tools:call", "aud": "mcpserver", "exp": later,
                           "iss": issuer, "client_id": "mcp-client", "token_type": "Bearer"});
        if value.is_null() {
            a.as_object_mut().map(|o| o.remove(name));
        } else {
            a[name] = value;
        }
        a.to_string()
    };
    let nested = format!(
        r#"{{"active":true,"sub":"mallory@example.com","n":{}{}}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    let long = format!(
        r#"{{"active":true,"sub":"mallory@example.com","pad":"{}"}}"#,
        "a".repeat(17 * 1024)
    );
    let cases: Vec<(&str, u16, String, u16)> = vec![
        // Not an answer at all.
        ("null", 200, "null".into(), 502),
        ("true", 200, "true".into(), 502),
        ("a string", 200, r#""active""#.into(), 502),
        (
            "byte-order mark first",
            200,
            format!("\u{feff}{}", good("x", json!(1))),
            502,
        ),
        ("deeply nested member", 200, nested, 502),
        ("over 16 KiB", 200, long, 502),
        (
            "two objects",
            200,
            format!("{}{}", good("x", json!(1)), good("x", json!(1))),
            502,
        ),
        // `active` missing, mistyped, or said twice.
        (
            "Active capitalised",
            200,
            good("active", json!(null)).replacen("{", r#"{"Active":true,"#, 1),
            502,
        ),
        ("active \"false\"", 200, good("active", json!("false")), 502),
        ("active 1", 200, good("active", json!(1)), 502),
        (
            "active an object",
            200,
            good("active", json!({"value": true})),
            502,
        ),
        (
            "active false then true",
            200,
            good("active", json!(null)).replacen("{", r#"{"active":false,"active":true,"#, 1),
            502,
        ),
        (
            "sub twice",
            200,
            good("x", json!(1)).replacen("{", r#"{"sub":"admin","#, 1),
            502,
        ),
        // Mistyped members of an active answer.
        ("sub a number", 200, good("sub", json!(5)), 502),
        (
            "aud an object",
            200,
            good("aud", json!({"mcpserver": true})),
            502,
        ),
        (
            "aud with a number",
            200,
            good("aud", json!(["mcpserver", 7])),
            502,
        ),
        (
            "scope an array",
            200,
            good("scope", json!(["mcp:tools:call"])),
            502,
        ),
        (
            "exp a float",
            200,
            good("exp", json!(later as f64 + 0.5)),
            502,
        ),
        ("exp beyond i64", 200, good("exp", json!(u64::MAX)), 502),
        (
            "exp a string",
            200,
            good("exp", json!(later.to_string())),
            502,
        ),
        (
            "client_id a list",
            200,
            good("client_id", json!(["a"])),
            502,
        ),
        // Another issuer's token, however close.
        (
            "iss another host",
            200,
            good("iss", json!("https://evil.example/oauth2/mcp")),
            502,
        ),
        (
            "iss with a trailing slash",
            200,
            good("iss", json!(format!("{issuer}/"))),
            502,
        ),
        (
            "iss upper-cased",
            200,
            good("iss", json!(issuer.to_uppercase())),
            502,
        ),
        // Well-formed, and says no.
        (
            "active false with claims",
            200,
            good("active", json!(false)),
            401,
        ),
        ("exp now", 200, good("exp", json!(now)), 401),
        ("exp negative", 200, good("exp", json!(-1)), 401),
        ("no sub", 200, good("sub", json!(null)), 401),
        ("sub empty", 200, good("sub", json!("")), 401),
        ("aud empty", 200, good("aud", json!([])), 401),
        (
            "aud another resource",
            200,
            good("aud", json!("backend")),
            401,
        ),
        (
            "scope with a tab, not a space",
            200,
            good("scope", json!("mcp:tools:call\tadmin")),
            403,
        ),
        ("scope empty", 200, good("scope", json!("")), 403),
        // Statuses that carry no answer, whatever the body says.
        ("201 with an active body", 201, good("x", json!(1)), 502),
        ("302", 302, good("x", json!(1)), 502),
        (
            "400 invalid_request",
            400,
            r#"{"error":"invalid_request"}"#.into(),
            502,
        ),
        ("401 with an active body", 401, good("x", json!(1)), 502),
        ("403", 403, r#"{"error":"access_denied"}"#.into(), 502),
        ("404", 404, r#"{"errorCode":"E0000022"}"#.into(), 502),
    ];
    cases
        .into_iter()
        .map(|(name, status, body, expect)| (name.to_string(), status, body, expect))
        .collect()
}
