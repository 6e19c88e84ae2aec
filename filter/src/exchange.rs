//! RFC 8693 token exchange: the request the gateway sends to the token endpoint, and what it
//! makes of the answer. Plain Rust; the callout itself is done by the proxy-wasm glue.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use crate::config::{ClientAuth, ExchangeProfile, ExchangeTarget, TOKEN_TYPE_ACCESS_TOKEN};
use crate::jwks::sanitize;

pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 JWT bearer grant: Entra ID's on-behalf-of flow.
pub const GRANT_TYPE_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Token endpoint answers larger than this are not read (a token response is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// When the IdP says nothing about lifetime, reuse the token for at most this long.
const DEFAULT_LIFETIME_SECONDS: i64 = 300;

/// The HTTP request for one exchange. Headers include the pseudo-headers Envoy needs for a
/// callout. Holds the client secret and the subject token: never log it.
pub struct ExchangeRequest {
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// `application/x-www-form-urlencoded` serialisation (WHATWG URL standard): unreserved bytes as
/// is, space as `+`, everything else percent-encoded.
pub fn form_urlencode(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xF) as usize] as char);
            }
        }
    }
}

fn push_field(body: &mut String, name: &str, value: &str) {
    if !body.is_empty() {
        body.push('&');
    }
    body.push_str(name);
    body.push('=');
    form_urlencode(value, body);
}

/// RFC 8693 §2.1: the subject token and what the backend token is for.
fn token_exchange_fields(target: &ExchangeTarget, subject_token: &str, body: &mut String) {
    push_field(body, "grant_type", GRANT_TYPE_TOKEN_EXCHANGE);
    push_field(body, "subject_token", subject_token);
    push_field(body, "subject_token_type", &target.subject_token_type);
    if let Some(v) = &target.requested_token_type {
        push_field(body, "requested_token_type", v);
    }
    if let Some(v) = &target.audience {
        push_field(body, "audience", v);
    }
    if let Some(v) = &target.resource {
        push_field(body, "resource", v);
    }
    if let Some(v) = &target.scope {
        push_field(body, "scope", v);
    }
}

/// Entra ID's on-behalf-of request (v2 endpoint): the inbound token as the RFC 7523
/// `assertion`, the backend named by `scope` (required by the configuration).
fn on_behalf_of_fields(target: &ExchangeTarget, subject_token: &str, body: &mut String) {
    push_field(body, "grant_type", GRANT_TYPE_JWT_BEARER);
    push_field(body, "assertion", subject_token);
    push_field(body, "requested_token_use", "on_behalf_of");
    if let Some(v) = &target.scope {
        push_field(body, "scope", v);
    }
}

/// `Authorization: Basic` for a client id and secret. RFC 6749 §2.3.1: each is
/// form-urlencoded before they are joined and encoded.
pub fn basic_authorization(client_id: &str, secret: &str) -> String {
    let mut pair = String::new();
    form_urlencode(client_id, &mut pair);
    pair.push(':');
    form_urlencode(secret, &mut pair);
    format!("Basic {}", STANDARD.encode(pair))
}

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

impl ExchangeRequest {
    /// The token request for `subject_token`. `now` (Unix seconds) and `nonce` (unique per call)
    /// go into the client assertion and actor token, when the target uses them.
    pub fn build(
        target: &ExchangeTarget,
        subject_token: &str,
        now: i64,
        nonce: &str,
    ) -> Result<ExchangeRequest, String> {
        let mut body = String::with_capacity(subject_token.len() + 1024);
        match target.profile {
            ExchangeProfile::Rfc8693 => token_exchange_fields(target, subject_token, &mut body),
            ExchangeProfile::EntraObo => on_behalf_of_fields(target, subject_token, &mut body),
        }
        let key = || {
            target
                .client_key
                .as_deref()
                .ok_or_else(|| "no client key configured".to_string())
        };
        if target.actor_token {
            let actor = key()?.self_signed(
                &target.client_id,
                &target.assertion_audience,
                now,
                &format!("{nonce}-act"),
            )?;
            push_field(&mut body, "actor_token", &actor);
            push_field(&mut body, "actor_token_type", TOKEN_TYPE_JWT);
        }
        let mut headers = vec![
            (":method", "POST".to_string()),
            (":path", target.path.clone()),
            (":authority", target.authority.clone()),
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept", "application/json".to_string()),
        ];
        let secret = || {
            target
                .client_secret
                .as_ref()
                .map(|s| s.expose())
                .ok_or_else(|| "no client secret configured".to_string())
        };
        match target.client_auth {
            // RFC 6749 §2.3.1: id and secret are form-urlencoded before being joined and encoded.
            ClientAuth::ClientSecretBasic => {
                headers.push((
                    "authorization",
                    basic_authorization(&target.client_id, secret()?),
                ));
            }
            ClientAuth::ClientSecretPost => {
                push_field(&mut body, "client_id", &target.client_id);
                push_field(&mut body, "client_secret", secret()?);
            }
            // RFC 7523 §2.2: the assertion alone authenticates the client.
            ClientAuth::PrivateKeyJwt => {
                let assertion = key()?.self_signed(
                    &target.client_id,
                    &target.assertion_audience,
                    now,
                    &format!("{nonce}-ca"),
                )?;
                push_field(&mut body, "client_id", &target.client_id);
                push_field(&mut body, "client_assertion_type", CLIENT_ASSERTION_TYPE);
                push_field(&mut body, "client_assertion", &assertion);
            }
        }
        headers.push(("content-length", body.len().to_string()));
        Ok(ExchangeRequest {
            headers,
            body: body.into_bytes(),
        })
    }
}

/// A backend token obtained from the token endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Exchanged {
    pub access_token: String,
    /// Seconds the IdP says the token lives, if it said.
    pub expires_in: Option<i64>,
}

impl fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchanged")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why no backend token was obtained. Mapped to the client's answer in `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeError {
    /// The IdP refused the subject token itself (`invalid_grant`, `invalid_request`): the client
    /// should get a new token.
    SubjectRejected { code: String },
    /// The IdP will not issue the backend token for this user (`invalid_scope`, `invalid_target`,
    /// `access_denied`, `unauthorized_client`, `consent_required`).
    TargetRefused { code: String },
    /// The user (or an admin) must act at the IdP first: sign in again, pass MFA or Conditional
    /// Access, consent (`interaction_required`; Entra ID's AADSTS50076/50079 and
    /// `consent_required` with a claims challenge). `claims`: the IdP's claims challenge (a
    /// JSON text), for the client to take to the authorization endpoint.
    InteractionRequired {
        code: String,
        claims: Option<String>,
    },
    /// The gateway's own client registration is wrong (`invalid_client`,
    /// `unsupported_grant_type`): an operator problem.
    GatewayMisconfigured { code: String },
    /// The IdP is down, overloaded or unreachable.
    Unavailable {
        status: Option<u16>,
        retry_after: Option<u64>,
    },
    /// The callout did not complete in time.
    Timeout,
    /// The IdP answered something we cannot use.
    BadResponse { reason: &'static str },
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SubjectRejected { code } => {
                write!(f, "token endpoint refused the subject token ({code})")
            }
            Self::TargetRefused { code } => write!(f, "token endpoint refused the target ({code})"),
            Self::InteractionRequired { code, claims } => write!(
                f,
                "token endpoint requires user interaction ({code}{})",
                if claims.is_some() {
                    ", claims challenge"
                } else {
                    ""
                }
            ),
            Self::GatewayMisconfigured { code } => {
                write!(f, "token endpoint refused the gateway client ({code})")
            }
            Self::Unavailable {
                status: Some(s), ..
            } => write!(f, "token endpoint unavailable (HTTP {s})"),
            Self::Unavailable { status: None, .. } => {
                f.write_str("token endpoint unreachable (connection failed or reset)")
            }
            Self::Timeout => f.write_str("token endpoint timed out"),
            Self::BadResponse { reason } => write!(f, "unusable token endpoint answer: {reason}"),
        }
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    issued_token_type: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<serde_json::Value>,
    error_description: Option<serde_json::Value>,
    /// Entra ID: the AADSTS numbers behind `error`.
    #[serde(default)]
    error_codes: Option<serde_json::Value>,
    /// Entra ID: a claims challenge (JSON text) to relay to the client.
    #[serde(default)]
    claims: Option<serde_json::Value>,
}

/// Entra ID error numbers that change what an `invalid_grant` means (its error-code reference):
/// the assertion is fine, but an admin must consent (65001) or the user must pass MFA (50076,
/// 50079).
const AADSTS_CONSENT_REQUIRED: u64 = 65001;
const AADSTS_MFA_REQUIRED: [u64; 2] = [50076, 50079];
/// A claims challenge longer than this is not relayed (it goes into a header, base64-encoded).
const MAX_CLAIMS_CHALLENGE_BYTES: usize = 2048;

/// What the token endpoint said, for logs: the error code and description, sanitised.
pub fn describe_error_body(body: &[u8]) -> Option<String> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let code = parsed.error.as_ref()?.as_str()?;
    let desc = parsed
        .error_description
        .as_ref()
        .and_then(|d| d.as_str())
        .map(|d| format!(": {}", sanitize_line(d)))
        .unwrap_or_default();
    Some(format!("{}{desc}", sanitize(code)))
}

fn sanitize_line(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Interprets the callout's outcome. `status` is `None` when Envoy delivered no response
/// (connection failure, reset or timeout); the caller tells a timeout from the elapsed time.
pub fn parse_response(
    status: Option<u16>,
    body: &[u8],
    retry_after: Option<&[u8]>,
) -> Result<Exchanged, ExchangeError> {
    let Some(status) = status else {
        return Err(ExchangeError::Unavailable {
            status: None,
            retry_after: None,
        });
    };
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(ExchangeError::BadResponse {
            reason: "response too large",
        });
    }
    match status {
        200 => parse_success(body),
        // Envoy reports a callout that hit its timeout as a local 504 ("upstream request
        // timeout"); an IdP's own 504 means the same to the client.
        504 => Err(ExchangeError::Timeout),
        429 | 500..=599 => Err(ExchangeError::Unavailable {
            status: Some(status),
            retry_after: retry_after.and_then(parse_retry_after),
        }),
        400..=499 => Err(classify_error(status, body)),
        _ => Err(ExchangeError::BadResponse {
            reason: "unexpected HTTP status",
        }),
    }
}

fn parse_retry_after(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.min(300))
}

fn classify_error(status: u16, body: &[u8]) -> ExchangeError {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
        return ExchangeError::BadResponse {
            reason: "error response without an OAuth error code",
        };
    };
    let Some(code) = parsed.error.as_ref().and_then(|e| e.as_str()) else {
        return ExchangeError::BadResponse {
            reason: "error response without an OAuth error code",
        };
    };
    let code_owned = sanitize(code);
    let entra_codes: Vec<u64> = match &parsed.error_codes {
        Some(serde_json::Value::Array(codes)) => {
            codes.iter().filter_map(serde_json::Value::as_u64).collect()
        }
        _ => Vec::new(),
    };
    let claims = parsed
        .claims
        .as_ref()
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty() && c.len() <= MAX_CLAIMS_CHALLENGE_BYTES)
        .map(str::to_string);
    let interaction = |claims| ExchangeError::InteractionRequired {
        code: code_owned.clone(),
        claims,
    };
    match code {
        "interaction_required" => interaction(claims),
        "consent_required" if claims.is_some() => interaction(claims),
        "invalid_grant" if entra_codes.iter().any(|c| AADSTS_MFA_REQUIRED.contains(c)) => {
            interaction(claims)
        }
        "invalid_grant" if entra_codes.contains(&AADSTS_CONSENT_REQUIRED) => {
            ExchangeError::TargetRefused { code: code_owned }
        }
        "invalid_grant" | "invalid_request" => ExchangeError::SubjectRejected { code: code_owned },
        "invalid_scope"
        | "invalid_target"
        | "access_denied"
        | "unauthorized_client"
        | "consent_required" => ExchangeError::TargetRefused { code: code_owned },
        "invalid_client" | "unsupported_grant_type" => {
            ExchangeError::GatewayMisconfigured { code: code_owned }
        }
        "temporarily_unavailable" | "server_error" => ExchangeError::Unavailable {
            status: Some(status),
            retry_after: None,
        },
        _ => ExchangeError::BadResponse {
            reason: "unknown OAuth error code",
        },
    }
}

fn parse_success(body: &[u8]) -> Result<Exchanged, ExchangeError> {
    let bad = |reason| ExchangeError::BadResponse { reason };
    let parsed: SuccessBody =
        serde_json::from_slice(body).map_err(|_| bad("200 without a JSON object body"))?;
    let access_token = match parsed.access_token {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t,
        Some(_) => return Err(bad("access_token is not a non-empty string")),
        None => return Err(bad("no access_token")),
    };
    // The token goes into a header; anything outside visible ASCII would corrupt it.
    if access_token.len() > 16 * 1024 || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("access_token is not a usable header value"));
    }
    match parsed.token_type.as_ref().and_then(|t| t.as_str()) {
        Some(t) if t.eq_ignore_ascii_case("bearer") || t == "N_A" => {}
        _ => return Err(bad("token_type is not Bearer or N_A")),
    }
    // Some IdPs omit issued_token_type (RFC 8693 requires it); tolerate absence, not a mismatch.
    if let Some(t) = parsed.issued_token_type {
        match t.as_str() {
            Some(TOKEN_TYPE_ACCESS_TOKEN) | Some(TOKEN_TYPE_JWT) => {}
            _ => return Err(bad("issued_token_type is not an access token")),
        }
    }
    let expires_in = match parsed.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(s) if s > 0 => Some(s),
            _ => return Err(bad("expires_in is not a positive integer")),
        },
        Some(_) => return Err(bad("expires_in is not a number")),
    };
    Ok(Exchanged {
        access_token,
        expires_in,
    })
}

/// Until when (Unix seconds) an exchanged token may be reused: its lifetime, never past the
/// subject token's expiry (the user's session must not outlive their token through the cache),
/// minus a safety margin. `None`: do not cache.
pub fn reusable_until(
    exchanged: &Exchanged,
    subject_expires_at: i64,
    now: i64,
    margin: i64,
) -> Option<i64> {
    let lifetime = exchanged.expires_in.unwrap_or(DEFAULT_LIFETIME_SECONDS);
    let until = now
        .saturating_add(lifetime)
        .min(subject_expires_at)
        .saturating_sub(margin);
    (until > now).then_some(until)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    /// A target like the reference setup's (also for other modules' tests).
    pub(crate) fn target(auth: ClientAuth) -> ExchangeTarget {
        ExchangeTarget {
            profile: ExchangeProfile::Rfc8693,
            cluster: "okta".into(),
            path: "/oauth2/backend/v1/token".into(),
            authority: "idp.example.com".into(),
            client_id: "gw client".into(),
            client_secret: Some(Secret::new("p&ss:w=rd+".into())),
            client_key: None,
            assertion_audience: "https://idp.example.com/oauth2/backend/v1/token".into(),
            actor_token: false,
            client_auth: auth,
            audience: Some("backend".into()),
            scope: Some("backend-api:read backend-api:write".into()),
            resource: None,
            subject_token_type: TOKEN_TYPE_ACCESS_TOKEN.into(),
            requested_token_type: None,
            timeout: Duration::from_secs(5),
            cache_margin_seconds: 30,
            cache_max_entries: 100,
            identity: String::new(),
        }
        .with_identity()
    }

    pub(crate) fn form(body: &[u8]) -> Vec<(String, String)> {
        // Independent decoder: '+' is space, %XX is a byte.
        let decode = |s: &str| {
            let mut out = Vec::new();
            let b = s.as_bytes();
            let mut i = 0;
            while i < b.len() {
                match b[i] {
                    b'+' => out.push(b' '),
                    b'%' => {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 2;
                    }
                    c => out.push(c),
                }
                i += 1;
            }
            String::from_utf8(out).unwrap()
        };
        std::str::from_utf8(body)
            .unwrap()
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (decode(k), decode(v))
            })
            .collect()
    }

    fn header<'a>(r: &'a ExchangeRequest, name: &str) -> &'a str {
        &r.headers.iter().find(|(k, _)| *k == name).unwrap().1
    }

    #[test]
    fn basic_auth_request() {
        let r = ExchangeRequest::build(&target(ClientAuth::ClientSecretBasic), "a.b-c_d", 0, "n")
            .unwrap();
        assert_eq!(header(&r, ":method"), "POST");
        assert_eq!(header(&r, ":path"), "/oauth2/backend/v1/token");
        assert_eq!(
            header(&r, "content-type"),
            "application/x-www-form-urlencoded"
        );
        // "gw client" and "p&ss:w=rd+" form-encoded, then base64.
        let basic = header(&r, "authorization").strip_prefix("Basic ").unwrap();
        assert_eq!(
            String::from_utf8(STANDARD.decode(basic).unwrap()).unwrap(),
            "gw+client:p%26ss%3Aw%3Drd%2B"
        );
        assert_eq!(
            form(&r.body),
            vec![
                ("grant_type".into(), GRANT_TYPE_TOKEN_EXCHANGE.into()),
                ("subject_token".into(), "a.b-c_d".into()),
                ("subject_token_type".into(), TOKEN_TYPE_ACCESS_TOKEN.into()),
                ("audience".into(), "backend".into()),
                ("scope".into(), "backend-api:read backend-api:write".into()),
            ]
        );
        assert_eq!(header(&r, "content-length"), r.body.len().to_string());
    }

    #[test]
    fn post_auth_request_puts_credentials_in_body() {
        let r = ExchangeRequest::build(&target(ClientAuth::ClientSecretPost), "t", 0, "n").unwrap();
        assert!(r.headers.iter().all(|(k, _)| *k != "authorization"));
        let f = form(&r.body);
        assert!(f.contains(&("client_id".into(), "gw client".into())));
        assert!(f.contains(&("client_secret".into(), "p&ss:w=rd+".into())));
    }

    #[test]
    fn parses_okta_success() {
        let body = br#"{"token_type":"Bearer","expires_in":3600,"access_token":"eyJ.x.y","scope":"backend-api:read","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#;
        let e = parse_response(Some(200), body, None).unwrap();
        assert_eq!(e.access_token, "eyJ.x.y");
        assert_eq!(e.expires_in, Some(3600));
        assert!(!format!("{e:?}").contains("eyJ"));
    }

    #[test]
    fn tolerates_missing_issued_token_type_and_n_a() {
        assert!(parse_response(
            Some(200),
            br#"{"token_type":"N_A","access_token":"t","expires_in":5}"#,
            None
        )
        .is_ok());
        assert!(parse_response(
            Some(200),
            br#"{"token_type":"bearer","access_token":"t"}"#,
            None
        )
        .is_ok());
    }

    #[test]
    fn unusable_success_bodies() {
        for body in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"token_type":"Bearer"}"#,
            br#"{"token_type":"Bearer","access_token":""}"#,
            br#"{"token_type":"Bearer","access_token":5}"#,
            br#"{"token_type":"Bearer","access_token":"a b"}"#,
            br#"{"token_type":"Bearer","access_token":"a\nb"}"#,
            br#"{"token_type":"MAC","access_token":"t"}"#,
            br#"{"access_token":"t"}"#,
            br#"{"token_type":"Bearer","access_token":"t","issued_token_type":"urn:ietf:params:oauth:token-type:id_token"}"#,
            br#"{"token_type":"Bearer","access_token":"t","expires_in":0}"#,
            br#"{"token_type":"Bearer","access_token":"t","expires_in":-5}"#,
            br#"{"token_type":"Bearer","access_token":"t","expires_in":"3600"}"#,
            br#"{"token_type":"Bearer","access_token":"t","expires_in":1e400}"#,
        ] {
            let r = parse_response(Some(200), body, None);
            assert!(matches!(r, Err(ExchangeError::BadResponse { .. })), "{} -> {r:?}", String::from_utf8_lossy(body));
        }
        let huge = vec![b' '; MAX_RESPONSE_BYTES + 1];
        assert!(matches!(
            parse_response(Some(200), &huge, None),
            Err(ExchangeError::BadResponse { .. })
        ));
    }

    #[test]
    fn okta_error_table() {
        let err = |status, code: &str| {
            parse_response(
                Some(status),
                format!(r#"{{"error":"{code}","error_description":"x"}}"#).as_bytes(),
                None,
            )
            .unwrap_err()
        };
        assert!(matches!(
            err(400, "invalid_grant"),
            ExchangeError::SubjectRejected { .. }
        ));
        assert!(matches!(
            err(400, "invalid_request"),
            ExchangeError::SubjectRejected { .. }
        ));
        for code in [
            "invalid_scope",
            "invalid_target",
            "access_denied",
            "unauthorized_client",
            "consent_required",
        ] {
            assert!(
                matches!(err(400, code), ExchangeError::TargetRefused { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            err(403, "access_denied"),
            ExchangeError::TargetRefused { .. }
        ));
        assert!(matches!(
            err(401, "invalid_client"),
            ExchangeError::GatewayMisconfigured { .. }
        ));
        assert!(matches!(
            err(400, "unsupported_grant_type"),
            ExchangeError::GatewayMisconfigured { .. }
        ));
        assert!(matches!(
            err(400, "made_up"),
            ExchangeError::BadResponse { .. }
        ));
        assert!(matches!(
            parse_response(Some(400), b"<html>", None),
            Err(ExchangeError::BadResponse { .. })
        ));
    }

    #[test]
    fn outages() {
        assert_eq!(
            parse_response(None, b"", None),
            Err(ExchangeError::Unavailable {
                status: None,
                retry_after: None
            })
        );
        assert_eq!(
            parse_response(Some(503), b"down", Some(b"7")),
            Err(ExchangeError::Unavailable {
                status: Some(503),
                retry_after: Some(7)
            })
        );
        assert_eq!(
            parse_response(Some(429), b"", Some(b"99999")),
            Err(ExchangeError::Unavailable {
                status: Some(429),
                retry_after: Some(300)
            })
        );
        assert!(matches!(
            parse_response(Some(302), b"", None),
            Err(ExchangeError::BadResponse { .. })
        ));
    }

    #[test]
    fn error_descriptions_are_sanitised_for_logs() {
        let d =
            describe_error_body(br#"{"error":"invalid_grant","error_description":"line\nbreak"}"#)
                .unwrap();
        assert_eq!(d, "invalid_grant: line break");
        assert_eq!(describe_error_body(b"nope"), None);
    }

    #[test]
    fn reuse_window() {
        let ex = |s| Exchanged {
            access_token: "t".into(),
            expires_in: s,
        };
        let now = 1000;
        assert_eq!(
            reusable_until(&ex(Some(3600)), now + 7200, now, 30),
            Some(now + 3570)
        );
        // Never past the subject token's expiry.
        assert_eq!(
            reusable_until(&ex(Some(3600)), now + 600, now, 30),
            Some(now + 570)
        );
        assert_eq!(
            reusable_until(&ex(Some(i64::MAX)), now + 600, now, 30),
            Some(now + 570)
        );
        assert_eq!(
            reusable_until(&ex(None), now + 7200, now, 30),
            Some(now + 270)
        );
        assert_eq!(reusable_until(&ex(Some(20)), now + 7200, now, 30), None);
    }

    #[test]
    fn private_key_jwt_and_actor_token() {
        let mut t = target(ClientAuth::PrivateKeyJwt);
        t.client_secret = None;
        t.actor_token = true;
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k", "d": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"});
        t.client_key = Some(std::rc::Rc::new(
            crate::client_key::ClientKey::from_jwk(&jwk.to_string()).unwrap(),
        ));
        let r = ExchangeRequest::build(&t, "subj", 1000, "nonce1").unwrap();
        assert!(r.headers.iter().all(|(k, _)| *k != "authorization"));
        let f = form(&r.body);
        let field = |n: &str| {
            f.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(field("client_assertion_type"), CLIENT_ASSERTION_TYPE);
        assert_eq!(field("client_id"), "gw client");
        assert_eq!(
            field("actor_token_type"),
            "urn:ietf:params:oauth:token-type:jwt"
        );
        let claims = |jwt: &str| -> serde_json::Value {
            use base64::engine::general_purpose::URL_SAFE_NO_PAD;
            serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(jwt.split('.').nth(1).unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        let assertion = claims(&field("client_assertion"));
        let actor = claims(&field("actor_token"));
        assert_eq!(
            assertion["aud"],
            "https://idp.example.com/oauth2/backend/v1/token"
        );
        assert_eq!(assertion["sub"], "gw client");
        assert_ne!(assertion["jti"], actor["jti"], "each JWT has its own jti");
        assert!(!f.iter().any(|(k, _)| k == "client_secret"));
        // Without a key configured, nothing is sent.
        t.client_key = None;
        assert!(ExchangeRequest::build(&t, "subj", 1000, "n").is_err());
    }
}
