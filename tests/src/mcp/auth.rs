//! The upstream's own resource-server check of the bearer token.
//!
//! This is deliberately independent of the filter's code: it is what a real MCP server (or the
//! GraphQL API behind it) does with the token it receives, so a request that passes here proves
//! that the gateway forwarded a genuine backend token.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::server::Shared;
use super::UpstreamConfig;

/// Realm announced in every challenge of the upstream.
const REALM: &str = "mcp-upstream";

/// The claims of a token that passed every check, as handed to the tools through the request
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedToken {
    pub sub: String,
    pub aud: Vec<String>,
    pub scopes: Vec<String>,
    pub iss: String,
    pub client_id: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No bearer credentials at all (401, challenge without `error`).
    Missing,
    /// Malformed request, e.g. two `Authorization` headers (400 `invalid_request`).
    InvalidRequest(String),
    /// Bad token (401 `invalid_token`).
    InvalidToken(String),
    /// Valid token without every required scope (403 `insufficient_scope`).
    InsufficientScope { required: Vec<String> },
    /// The keys could not be fetched at all (503).
    KeysUnavailable(String),
}

/// Keeps only characters that may appear in a quoted-string of a challenge and in a log line.
fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
        .take(200)
        .collect()
}

impl AuthFailure {
    pub(crate) fn into_response(self) -> Response {
        let (status, challenge, error, description) = match &self {
            AuthFailure::Missing => (
                StatusCode::UNAUTHORIZED,
                format!("Bearer realm=\"{REALM}\""),
                None,
                "missing bearer token".to_string(),
            ),
            AuthFailure::InvalidRequest(why) => (
                StatusCode::BAD_REQUEST,
                format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_request\", error_description=\"{}\"",
                    sanitize(why)
                ),
                Some("invalid_request"),
                why.clone(),
            ),
            AuthFailure::InvalidToken(why) => (
                StatusCode::UNAUTHORIZED,
                format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                    sanitize(why)
                ),
                Some("invalid_token"),
                why.clone(),
            ),
            AuthFailure::InsufficientScope { required } => {
                let scope = sanitize(&required.join(" "));
                (
                    StatusCode::FORBIDDEN,
                    format!(
                        "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\", error_description=\"token lacks a required scope\""
                    ),
                    Some("insufficient_scope"),
                    format!("token lacks a required scope (needs {scope})"),
                )
            }
            AuthFailure::KeysUnavailable(why) => {
                let body = serde_json::json!({
                    "error": "temporarily_unavailable",
                    "error_description": format!("cannot fetch signing keys: {why}"),
                });
                let mut response = Response::new(Body::from(body.to_string()));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return response;
            }
        };
        let mut body = Map::new();
        if let Some(error) = error {
            body.insert("error".into(), Value::from(error));
        }
        body.insert("error_description".into(), Value::from(description));
        let mut response = Response::new(Body::from(Value::Object(body).to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            headers.insert(WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Validates tokens against the backend authorization server's JWKS.
pub(crate) struct Verifier {
    config: UpstreamConfig,
    http: reqwest::Client,
    /// Last JWKS fetched; fetched lazily on first use and again on an unknown `kid`.
    keys: tokio::sync::Mutex<Option<JwkSet>>,
    /// Subjects whose otherwise valid tokens are refused (simulated revocation).
    rejected: Mutex<HashSet<String>>,
    rejected_tokens: Mutex<HashSet<String>>,
}

impl Verifier {
    pub(crate) fn new(config: UpstreamConfig) -> anyhow::Result<Self> {
        // jsonwebtoken 11 needs a process-wide crypto provider; pick the pure-Rust one. If some
        // other part of the process installed one first, that one is used, which is fine.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            config,
            http,
            keys: tokio::sync::Mutex::new(None),
            rejected: Mutex::new(HashSet::new()),
            rejected_tokens: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn reject_subject(&self, sub: &str) {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sub.to_string());
    }

    /// From now on, this exact token gets 401 `invalid_token` (others of its subject do not).
    pub(crate) fn reject_token(&self, token: &str) {
        self.rejected_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string());
    }

    pub(crate) fn clear_rejections(&self) {
        self.rejected_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn is_rejected(&self, sub: &str) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(sub)
    }

    async fn fetch_keys(&self) -> Result<JwkSet, String> {
        let response = self
            .http
            .get(&self.config.jwks_url)
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.config.jwks_url))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {}: HTTP {status}", self.config.jwks_url));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("GET {}: {e}", self.config.jwks_url))?;
        serde_json::from_slice::<JwkSet>(&bytes)
            .map_err(|e| format!("GET {}: not a JWKS: {e}", self.config.jwks_url))
    }

    /// Finds the key for `kid` (any RSA key when the token names none), fetching the JWKS if
    /// nothing is cached yet and refetching once when the `kid` is unknown.
    async fn key_for(&self, kid: Option<&str>) -> Result<Vec<Jwk>, AuthFailure> {
        let mut cached = self.keys.lock().await;
        let mut fetched_now = false;
        if cached.is_none() {
            let set = self
                .fetch_keys()
                .await
                .map_err(AuthFailure::KeysUnavailable)?;
            *cached = Some(set);
            fetched_now = true;
        }
        let pick = |set: &JwkSet| -> Vec<Jwk> {
            set.keys
                .iter()
                .filter(|k| match kid {
                    Some(kid) => k.common.key_id.as_deref() == Some(kid),
                    None => true,
                })
                .cloned()
                .collect()
        };
        let found = cached.as_ref().map(pick).unwrap_or_default();
        if !found.is_empty() || fetched_now {
            return Ok(found);
        }
        // Unknown kid: the AS may have rotated its keys.
        match self.fetch_keys().await {
            Ok(set) => {
                let found = pick(&set);
                *cached = Some(set);
                Ok(found)
            }
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Runs every check of a resource server on the request's headers.
    pub(crate) async fn verify_headers(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<VerifiedToken, AuthFailure> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(AuthFailure::Missing);
        };
        if values.next().is_some() {
            return Err(AuthFailure::InvalidRequest(
                "more than one Authorization header".into(),
            ));
        }
        let Ok(value) = value.to_str() else {
            return Err(AuthFailure::InvalidRequest(
                "Authorization header is not ASCII".into(),
            ));
        };
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            // Other schemes carry no bearer credentials (RFC 6750 §3.1: no error code).
            return Err(AuthFailure::Missing);
        }
        let token = rest.trim();
        if token.is_empty() {
            return Err(AuthFailure::InvalidToken("empty bearer token".into()));
        }
        self.verify_token(token).await
    }

    pub(crate) async fn verify_token(&self, token: &str) -> Result<VerifiedToken, AuthFailure> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthFailure::InvalidToken(format!("malformed token: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthFailure::InvalidToken(format!(
                "unsupported alg {:?}",
                header.alg
            )));
        }
        let candidates = self.key_for(header.kid.as_deref()).await?;
        if candidates.is_empty() {
            return Err(AuthFailure::InvalidToken(match header.kid {
                Some(kid) => format!("unknown kid {kid}"),
                None => "no signing key".into(),
            }));
        }

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 0;
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        let mut last_error = AuthFailure::InvalidToken("no usable signing key".into());
        let mut claims = None;
        for jwk in &candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last_error = AuthFailure::InvalidToken(describe(e.kind())),
            }
        }
        let Some(claims) = claims else {
            return Err(last_error);
        };

        let verified = VerifiedToken {
            sub: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            aud: strings(claims.get("aud")),
            scopes: scopes(&claims),
            iss: claims
                .get("iss")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            client_id: claims
                .get("cid")
                .or_else(|| claims.get("client_id"))
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        if verified.sub.is_empty() {
            return Err(AuthFailure::InvalidToken("sub is not a string".into()));
        }
        let token_rejected = self
            .rejected_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(token);
        if token_rejected || self.is_rejected(&verified.sub) {
            return Err(AuthFailure::InvalidToken("token revoked".into()));
        }
        let missing = self
            .config
            .required_scopes
            .iter()
            .any(|s| !verified.scopes.contains(s));
        if missing {
            return Err(AuthFailure::InsufficientScope {
                required: self.config.required_scopes.clone(),
            });
        }
        Ok(verified)
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not yet valid".into(),
        ErrorKind::InvalidAudience => "audience mismatch".into(),
        ErrorKind::InvalidIssuer => "issuer mismatch".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm mismatch".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        other => format!("invalid token: {other:?}"),
    }
}

/// A claim that is a string or an array of strings, as a list.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// Scopes from `scp` (Okta: array) and `scope` (space-separated), in order, without duplicates.
fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in ["scp", "scope"] {
        let found = match claims.get(name) {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            other => strings(other),
        };
        for scope in found {
            if !out.contains(&scope) {
                out.push(scope);
            }
        }
    }
    out
}

/// axum middleware in front of `/mcp`: refuses the request or hands the verified token on in the
/// request extensions (rmcp then exposes them to tools through `http::request::Parts`).
pub(crate) async fn require_token(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    match shared.verifier.verify_headers(request.headers()).await {
        Ok(token) => {
            request.extensions_mut().insert(token);
            next.run(request).await
        }
        Err(failure) => failure.into_response(),
    }
}
