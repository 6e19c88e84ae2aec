//! Hostile token-endpoint error bodies: the fields Entra ID adds to OAuth errors (`error_codes`,
//! `claims`, `suberror`) are read by the filter now, so each is given in every shape an IdP (or
//! whoever sits between) could send. Every answer must come from the answer table, never let the
//! request through, and carry a claims challenge only as base64 in a well-formed header.

use serde_json::{json, Value};

/// (name, status, body, expected status)
pub fn hostile_error_bodies() -> Vec<(String, u16, String, u16)> {
    let challenge = r#"{"access_token":{"capolids":{"essential":true,"values":["p1"]}}}"#;
    let mut cases: Vec<(String, u16, Value, u16)> = vec![
        (
            "claims with quotes, CR and LF".into(),
            400,
            json!({"error": "interaction_required", "claims": "\"}\r\nx-injected: 1\r\n\"{"}),
            401,
        ),
        (
            "claims a JSON object, not a string".into(),
            400,
            json!({"error": "interaction_required", "claims": {"access_token": {}}}),
            401,
        ),
        (
            "claims empty".into(),
            400,
            json!({"error": "interaction_required", "claims": ""}),
            401,
        ),
        (
            "claims 64 KiB".into(),
            400,
            json!({"error": "interaction_required", "claims": "a".repeat(60_000)}),
            401,
        ),
        (
            "claims with a genuine challenge".into(),
            400,
            json!({"error": "interaction_required", "claims": challenge}),
            401,
        ),
        (
            "consent_required with claims".into(),
            400,
            json!({"error": "consent_required", "claims": challenge}),
            401,
        ),
        (
            "error_codes a string".into(),
            400,
            json!({"error": "invalid_grant", "error_codes": "65001"}),
            401,
        ),
        (
            "error_codes with negative and huge numbers".into(),
            400,
            json!({"error": "invalid_grant", "error_codes": [-65001, 1e300, 65001.5]}),
            401,
        ),
        (
            "error_codes nested".into(),
            400,
            json!({"error": "invalid_grant", "error_codes": [[65001]]}),
            401,
        ),
        (
            "error_codes naming MFA on invalid_client".into(),
            401,
            json!({"error": "invalid_client", "error_codes": [50079], "claims": challenge}),
            502,
        ),
        ("error a number".into(), 400, json!({"error": 65001}), 502),
        (
            "error unknown with claims".into(),
            400,
            json!({"error": "please_pay", "claims": challenge}),
            502,
        ),
        (
            "suberror alone".into(),
            400,
            json!({"suberror": "consent_required"}),
            502,
        ),
        (
            "interaction_required on a 200".into(),
            200,
            json!({"error": "interaction_required", "claims": challenge}),
            502,
        ),
    ];
    // An error body that nests deeply beside the fields read: serde_json skips unread members
    // without recursing, so the body is read (and the VM does not trap).
    let deep = format!(
        "{{\"error\":\"interaction_required\",\"claims\":\"x\",\"pad\":{}1{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let mut out: Vec<(String, u16, String, u16)> = cases
        .drain(..)
        .map(|(name, status, body, expect)| (name, status, body.to_string(), expect))
        .collect();
    out.push(("nested 5000 deep".into(), 400, deep, 401));
    out.push((
        "duplicate error members".into(),
        400,
        r#"{"error":"invalid_client","error":"interaction_required"}"#.into(),
        502,
    ));
    out
}
