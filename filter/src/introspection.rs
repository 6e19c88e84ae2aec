//! RFC 7662 token introspection of opaque inbound tokens: the request the gateway sends, and
//! what it makes of the answer. Plain Rust; the callout is dispatched by the gateway from the
//! root context, since one answer serves every request with the token.

use serde::Deserialize;
use serde_json::Value;

use crate::config::{ClientAuth, Introspection, Provider, UniqueKeys};
use crate::exchange::{basic_authorization, form_urlencode};
use crate::verify::Principal;

/// Introspection answers larger than this are not read (one is a few hundred bytes).
pub const MAX_INTROSPECTION_BYTES: usize = 16 * 1024;

/// Why an introspection gave no principal. Mapped to the client's answer in `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntrospectionError {
    /// `active: false`: expired, revoked, unknown, or not for this caller (§2.2 gives no reason).
    Inactive,
    /// Active, but without the `sub` the gateway acts for.
    NoSubject,
    /// The endpoint refused the gateway's credentials (§2.3: 401).
    ClientRejected,
    /// Unreachable, reset, 5xx or 429.
    Unavailable,
    /// No answer in time.
    Timeout,
    /// Not JSON, no boolean `active`, wrongly typed members, another issuer's token.
    BadResponse { reason: &'static str },
}

impl IntrospectionError {
    /// For logs (a fixed text: a `Display` implementation costs the module more).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Inactive => "the token is not active",
            Self::NoSubject => "the active token has no sub",
            Self::ClientRejected => "the endpoint refused the gateway's credentials",
            Self::Unavailable => "the endpoint is unavailable",
            Self::Timeout => "the endpoint did not answer in time",
            Self::BadResponse { reason } => reason,
        }
    }
}

/// The HTTP request for one introspection (§2.1). Holds the token and the secret: never log it.
pub struct IntrospectionRequest {
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl IntrospectionRequest {
    pub fn build(endpoint: &Introspection, token: &str) -> Self {
        let mut body = String::with_capacity(token.len() + 128);
        body.push_str("token=");
        form_urlencode(token, &mut body);
        body.push_str("&token_type_hint=access_token");
        let mut headers = vec![
            (":method", "POST".to_string()),
            (":path", endpoint.path.clone()),
            (":authority", endpoint.authority.clone()),
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept", "application/json".to_string()),
        ];
        let secret = endpoint.client_secret.expose();
        if endpoint.client_auth == ClientAuth::ClientSecretPost {
            body.push_str("&client_id=");
            form_urlencode(&endpoint.client_id, &mut body);
            body.push_str("&client_secret=");
            form_urlencode(secret, &mut body);
        } else {
            headers.push((
                "authorization",
                basic_authorization(&endpoint.client_id, secret),
            ));
        }
        headers.push(("content-length", body.len().to_string()));
        Self {
            headers,
            body: body.into_bytes(),
        }
    }
}

/// The principal an introspection answer describes, valid until `min(exp, now + the
/// provider's cache maximum)` (its `expires_at` bounds every reuse of it).
pub fn parse_answer(
    status: Option<u16>,
    body: &[u8],
    provider: &Provider,
    now: i64,
) -> Result<Principal, IntrospectionError> {
    let bad = |reason| IntrospectionError::BadResponse { reason };
    match status {
        Some(200) => {}
        Some(401 | 403) => return Err(IntrospectionError::ClientRejected),
        Some(504) => return Err(IntrospectionError::Timeout),
        Some(429 | 500..=599) | None => return Err(IntrospectionError::Unavailable),
        Some(_) => return Err(bad("unexpected HTTP status")),
    }
    if body.len() > MAX_INTROSPECTION_BYTES {
        return Err(bad("answer too large"));
    }
    // Read as a JSON value refusing duplicate members (the configuration's reader, so no
    // second parser in the module): `{"active": false, "active": true}` is no answer.
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let answer = match UniqueKeys::deserialize(&mut deserializer) {
        Ok(UniqueKeys(Value::Object(members))) if deserializer.end().is_ok() => members,
        _ => return Err(bad("not a JSON object of distinct members")),
    };
    let string = |name: &str| -> Result<Option<String>, IntrospectionError> {
        match answer.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad("a member is not a string")),
        }
    };
    match answer.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Err(IntrospectionError::Inactive),
        Some(_) => return Err(bad("`active` is not a boolean")),
        None => return Err(bad("no `active` member")),
    }
    if string("iss")?.is_some_and(|iss| iss != provider.issuer) {
        return Err(bad("the token is another issuer's"));
    }
    let cap = provider
        .introspection
        .as_ref()
        .map_or(0, |i| i.cache_max_seconds);
    let expires_at = match answer.get("exp") {
        None | Some(Value::Null) => now.saturating_add(cap),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(exp) if exp <= now => return Err(IntrospectionError::Inactive),
            Some(exp) => exp.min(now.saturating_add(cap)),
            None => return Err(bad("`exp` is not an integer")),
        },
        Some(_) => return Err(bad("`exp` is not a number")),
    };
    let sub = string("sub")?
        .filter(|s| !s.is_empty())
        .ok_or(IntrospectionError::NoSubject)?;
    let audiences = match answer.get("aud") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(bad("`aud` holds a non-string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`aud` is not a string or an array")),
    };
    let scope = string("scope")?;
    let mut scopes: Vec<String> = Vec::new();
    for s in scope.as_deref().unwrap_or("").split(' ') {
        if !s.is_empty() && !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_string());
        }
    }
    Ok(Principal {
        provider: 0,
        sub,
        audiences,
        scopes,
        expires_at,
        jti: string("jti")?,
        client_id: string("client_id")?,
        email: None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    use super::*;
    use crate::config::{ClaimRules, KeySource, Secret};
    use crate::jwks::KeySet;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://idp.example.com/oauth2/mcp";

    fn endpoint(auth: ClientAuth) -> Introspection {
        Introspection {
            cluster: "okta".into(),
            path: "/oauth2/mcp/v1/introspect".into(),
            authority: "idp.example.com".into(),
            client_id: "gw client".into(),
            client_auth: auth,
            client_secret: Secret::new("s&cret".into()),
            timeout: Duration::from_secs(5),
            cache_max_seconds: 60,
        }
    }

    fn provider() -> Provider {
        Provider {
            name: "okta".into(),
            issuer: ISS.into(),
            audiences: vec!["mcpserver".into()],
            keys: KeySource::Inline(KeySet::default()),
            claims: ClaimRules::default(),
            introspection: Some(endpoint(ClientAuth::ClientSecretBasic)),
        }
    }

    fn parse(status: u16, body: &serde_json::Value) -> Result<Principal, IntrospectionError> {
        parse_answer(Some(status), body.to_string().as_bytes(), &provider(), NOW)
    }

    #[test]
    fn the_request_is_a_form_with_the_token_and_the_gateways_credentials() {
        let basic = IntrospectionRequest::build(&endpoint(ClientAuth::ClientSecretBasic), "a b+c");
        assert_eq!(
            String::from_utf8_lossy(&basic.body),
            "token=a+b%2Bc&token_type_hint=access_token"
        );
        let auth = basic.headers.iter().find(|(k, _)| *k == "authorization");
        assert_eq!(
            auth.map(|(_, v)| v.as_str()),
            Some(format!("Basic {}", STANDARD.encode("gw+client:s%26cret")).as_str())
        );
        let post = IntrospectionRequest::build(&endpoint(ClientAuth::ClientSecretPost), "t");
        let body = String::from_utf8_lossy(&post.body).into_owned();
        assert!(
            body.ends_with("&client_id=gw+client&client_secret=s%26cret"),
            "{body}"
        );
        assert!(post.headers.iter().all(|(k, _)| *k != "authorization"));
    }

    #[test]
    fn an_active_answer_is_a_principal_valid_at_most_the_configured_maximum() {
        let p = parse(
            200,
            &json!({"active": true, "scope": "mcp:tools:call openid", "client_id": "vscode",
                    "sub": "ann", "aud": ["mcpserver"], "exp": NOW + 3600, "iss": ISS,
                    "token_type": "Bearer", "username": "ann"}),
        )
        .unwrap();
        assert_eq!(p.sub, "ann");
        assert_eq!(p.scopes, ["mcp:tools:call", "openid"]);
        assert_eq!(p.client_id.as_deref(), Some("vscode"));
        assert_eq!(p.audiences, ["mcpserver"]);
        assert_eq!(p.expires_at, NOW + 60, "capped by cache_max_seconds");
        let soon = parse(200, &json!({"active": true, "sub": "a", "exp": NOW + 10})).unwrap();
        assert_eq!(soon.expires_at, NOW + 10, "never past exp");
        let no_exp = parse(200, &json!({"active": true, "sub": "a", "aud": "x"})).unwrap();
        assert_eq!(no_exp.expires_at, NOW + 60);
        assert_eq!(no_exp.audiences, ["x"]);
    }

    #[test]
    fn anything_but_a_well_formed_active_answer_is_refused() {
        use IntrospectionError::*;
        assert_eq!(parse(200, &json!({"active": false})), Err(Inactive));
        assert_eq!(
            parse(200, &json!({"active": true, "sub": "a", "exp": NOW})),
            Err(Inactive),
            "expired by its own exp"
        );
        assert_eq!(parse(200, &json!({"active": true})), Err(NoSubject));
        for body in [
            json!({}),
            json!({"active": "true"}),
            json!({"active": 1}),
            json!({"active": null}),
            json!([true]),
            json!({"active": true, "sub": "a", "aud": 5}),
            json!({"active": true, "sub": "a", "aud": ["x", 1]}),
            json!({"active": true, "sub": "a", "scope": ["a"]}),
            json!({"active": true, "sub": "a", "exp": "soon"}),
            json!({"active": true, "sub": "a", "iss": "https://other"}),
        ] {
            assert!(
                matches!(parse(200, &body), Err(BadResponse { .. })),
                "{body}"
            );
        }
        let p = provider();
        assert!(matches!(
            parse_answer(Some(200), b"<html>", &p, NOW),
            Err(BadResponse { .. })
        ));
        assert!(matches!(
            parse_answer(Some(200), br#"{"active":true,"active":false}"#, &p, NOW),
            Err(BadResponse { .. })
        ));
        assert_eq!(parse_answer(Some(401), b"", &p, NOW), Err(ClientRejected));
        assert_eq!(parse_answer(Some(503), b"", &p, NOW), Err(Unavailable));
        assert_eq!(parse_answer(None, b"", &p, NOW), Err(Unavailable));
        assert_eq!(parse_answer(Some(504), b"", &p, NOW), Err(Timeout));
        let huge = vec![b' '; MAX_INTROSPECTION_BYTES + 1];
        assert!(matches!(
            parse_answer(Some(200), &huge, &p, NOW),
            Err(BadResponse { .. })
        ));
    }
}
