//! The RFC 6750 answers a refused request may get, and the check that an answer is the expected one.

use gateway_tests::client::Answer;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// 400, `error="invalid_request"`.
    InvalidRequest,
    /// 401, a challenge without `error` (no credentials, or another scheme).
    NoCredentials,
    /// 401, `error="invalid_token"`.
    InvalidToken,
    /// 403, `error="insufficient_scope"`, `scope="mcp:tools:call"`.
    InsufficientScope,
    /// More than one `Authorization` header: 400 `invalid_request` (RFC 6750). Envoy joins
    /// repeated headers into one value with `,` before the filter sees them; the filter
    /// recognises a joined Bearer credential.
    DuplicateAuthorization,
    /// Control bytes in a header value: Envoy's HTTP/1 codec refuses some itself (400 before any
    /// filter runs) and silently drops others (a bare CR), so the filter sees a damaged token and
    /// answers 401 `invalid_token`. Either way: refused.
    EnvoyOrInvalidToken,
}

pub fn check(a: &Answer, expect: Expect) -> std::result::Result<(), String> {
    if expect == Expect::EnvoyOrInvalidToken {
        if a.status == 400 && a.header("www-authenticate").is_none() && a.body == "Bad Request" {
            return Ok(());
        }
        return check(a, Expect::InvalidToken)
            .map_err(|e| format!("neither Envoy's own 400 nor the filter's 401: {e}"));
    }
    if expect == Expect::DuplicateAuthorization {
        return check(a, Expect::InvalidRequest);
    }
    let (status, error) = match expect {
        Expect::DuplicateAuthorization | Expect::EnvoyOrInvalidToken => unreachable!(),
        Expect::InvalidRequest => (400, Some("invalid_request")),
        Expect::NoCredentials => (401, None),
        Expect::InvalidToken => (401, Some("invalid_token")),
        Expect::InsufficientScope => (403, Some("insufficient_scope")),
    };
    if a.status != status {
        return Err(format!(
            "expected {status}, got {} (body {})",
            a.status, a.body
        ));
    }
    let challenge = a
        .header("www-authenticate")
        .ok_or_else(|| format!("{status} without WWW-Authenticate (body {})", a.body))?;
    if !challenge.starts_with("Bearer") || !challenge.contains("realm=\"mcp\"") {
        return Err(format!("unexpected challenge {challenge:?}"));
    }
    let body: Value =
        serde_json::from_str(&a.body).map_err(|e| format!("body {:?}: {e}", a.body))?;
    match error {
        Some(e) => {
            if !challenge.contains(&format!("error=\"{e}\"")) {
                return Err(format!("challenge {challenge:?} lacks error=\"{e}\""));
            }
            if body["error"] != e {
                return Err(format!("body error {} instead of {e}", body["error"]));
            }
        }
        None => {
            if challenge.contains("error=") {
                return Err(format!(
                    "no-credentials challenge carries an error: {challenge:?}"
                ));
            }
        }
    }
    if expect == Expect::InsufficientScope && !challenge.contains("scope=\"mcp:tools:call\"") {
        return Err(format!("403 does not name the scope: {challenge:?}"));
    }
    Ok(())
}
