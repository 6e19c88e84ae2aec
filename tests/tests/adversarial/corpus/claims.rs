//! The claims of a validly signed token: time, audience, issuer and subject claims of the wrong
//! type or value, and scopes that are not the required one.

use serde_json::{json, Value};

use super::{Corpus, Seeds};
use crate::expect::Expect::*;
use crate::forge::Forge;

/// (claim, what is wrong, value) for [`malformed_claims`]; `Value::Null` removes the claim and
/// `"__null__"` sets it to JSON `null`.
fn claim_cases(f: &Forge<'_>, now: i64) -> Vec<(&'static str, &'static str, Value)> {
    let issuer = f.stack.idp.issuer("mcp");
    vec![
        ("exp", "missing", Value::Null),
        ("exp", "a string", json!((now + 3600).to_string())),
        ("exp", "a float", json!(now as f64 + 3600.5)),
        ("exp", "an integral float", json!((now + 3600) as f64)),
        ("exp", "negative", json!(-1)),
        ("exp", "zero", json!(0)),
        ("exp", "u64::MAX", json!(u64::MAX)),
        ("exp", "true", json!(true)),
        ("exp", "an array", json!([now + 3600])),
        ("exp", "an object", json!({"exp": now + 3600})),
        ("exp", "an hour ago", json!(now - 3600)),
        ("exp", "just beyond the skew", json!(now - 61)),
        ("nbf", "two minutes ahead", json!(now + 120)),
        ("nbf", "an hour ahead", json!(now + 3600)),
        ("nbf", "a string", json!(now.to_string())),
        ("nbf", "a float", json!(now as f64 - 0.5)),
        ("nbf", "negative", json!(-5)),
        ("nbf", "null", json!("__null__")),
        ("iat", "an hour ahead", json!(now + 3600)),
        ("iat", "a string", json!(now.to_string())),
        ("aud", "an empty array", json!([])),
        ("aud", "an array of numbers", json!([1, 2])),
        ("aud", "the audience plus a number", json!(["mcpserver", 1])),
        ("aud", "a superstring", json!("xmcpserverx")),
        ("aud", "a longer name", json!("mcpserver2")),
        ("aud", "a prefix", json!("mcpserve")),
        ("aud", "upper case", json!("MCPSERVER")),
        ("aud", "capitalised", json!("Mcpserver")),
        ("aud", "upper case in an array", json!(["MCPSERVER"])),
        ("aud", "a trailing space", json!("mcpserver ")),
        ("aud", "a leading space", json!(" mcpserver")),
        ("aud", "empty", json!("")),
        ("aud", "missing", Value::Null),
        ("aud", "an object", json!({"0": "mcpserver"})),
        ("aud", "the backend", json!("backend")),
        ("aud", "comma-joined", json!("mcpserver,backend")),
        ("aud", "space-joined", json!("backend mcpserver")),
        ("iss", "a trailing slash", json!(format!("{issuer}/"))),
        (
            "iss",
            "upper-case scheme and host",
            json!(issuer.replace("http://127.0.0.1", "HTTP://127.0.0.1")),
        ),
        (
            "iss",
            "an upper-case path",
            json!(issuer.replace("/oauth2/mcp", "/OAUTH2/MCP")),
        ),
        (
            "iss",
            "https instead of http",
            json!(issuer.replace("http://", "https://")),
        ),
        ("iss", "missing", Value::Null),
        ("iss", "empty", json!("")),
        (
            "iss",
            "the backend AS",
            json!(f.stack.idp.issuer("backend")),
        ),
        ("iss", "a query appended", json!(format!("{issuer}?x=1"))),
        ("iss", "a trailing space", json!(format!("{issuer} "))),
        ("iss", "a number", json!(1)),
        ("iss", "an array", json!([issuer])),
        ("sub", "missing", Value::Null),
        ("sub", "empty", json!("")),
        ("sub", "a number", json!(1)),
        ("sub", "an array", json!(["user@example.com"])),
        ("sub", "an object", json!({})),
        (
            "scp",
            "a string instead of an array",
            json!("mcp:tools:call"),
        ),
        ("scp", "an array of numbers", json!([1])),
        ("scp", "an object", json!({"0": "mcp:tools:call"})),
        ("scope", "a number", json!(5)),
    ]
}

/// Claims of the wrong type or value: 401 `invalid_token`.
pub fn malformed_claims(c: &mut Corpus, f: &Forge<'_>, seeds: &Seeds) {
    let now = seeds.now;
    let claim_cases = claim_cases(f, now);
    for (claim, what, value) in claim_cases {
        let token = if value == json!("__null__") {
            f.with_raw_claim(claim, "null")
        } else {
            f.with_claim(claim, value)
        };
        c.token(format!("{claim} {what}"), &token, InvalidToken);
    }
    c.token(
        "exp beyond i64",
        &f.with_raw_claim("exp", "99999999999999999999999"),
        InvalidToken,
    );
    c.token(
        "exp in exponent notation",
        &f.with_raw_claim("exp", &format!("{}e0", now + 3600)),
        InvalidToken,
    );
    c.token(
        "exp with a fraction of zero",
        &f.with_raw_claim("exp", &format!("{}.0", now + 3600)),
        InvalidToken,
    );
}

/// A valid token without the required scope: 403 `insufficient_scope`.
pub fn wrong_scopes(c: &mut Corpus, f: &Forge<'_>) {
    let scp = |list: Value| f.with_claim("scp", list);
    let scope_string = |s: &str| {
        let mut claims = f.good_claims();
        claims.remove("scp");
        claims.insert("scope".into(), json!(s));
        f.sign(&f.header(), &Value::Object(claims))
    };
    for (what, token) in [
        (
            "scp with the scope only as a prefix",
            scp(json!(["mcp:tools:call-all"])),
        ),
        ("scp with a shorter scope", scp(json!(["mcp:tools"]))),
        ("scp upper-cased", scp(json!(["MCP:TOOLS:CALL"]))),
        ("scp with a trailing space", scp(json!(["mcp:tools:call "]))),
        ("scp with a leading tab", scp(json!(["\tmcp:tools:call"]))),
        ("scp empty", scp(json!([]))),
        ("scp another scope", scp(json!(["mcp:tools:admin"]))),
        (
            "scp space-joined in one entry",
            scp(json!(["openid mcp:tools:call"])),
        ),
        (
            "scope string with the scope only as a prefix",
            scope_string("mcp:tools:call-all"),
        ),
        (
            "scope string tab-separated",
            scope_string("openid\tmcp:tools:call"),
        ),
        (
            "scope string tabs around the scope",
            scope_string("\tmcp:tools:call\t"),
        ),
        (
            "scope string spaces around a wrong scope",
            scope_string("   mcp:tools:admin   "),
        ),
        (
            "scope string repeated spaces and tabs",
            scope_string("openid  \t mcp:tools:admin\t\tmcp:tools:callx"),
        ),
        (
            "scope string comma-separated",
            scope_string("openid,mcp:tools:call"),
        ),
        ("scope string empty", scope_string("")),
        ("scp wrong, scope string right (scp wins)", {
            let mut claims = f.good_claims();
            claims.insert("scp".into(), json!(["openid"]));
            claims.insert("scope".into(), json!("mcp:tools:call"));
            f.sign(&f.header(), &Value::Object(claims))
        }),
        ("no scope claim at all", scp(Value::Null)),
    ] {
        c.token(what, &token, InsufficientScope);
    }
}
