//! Every way a request is refused, mapped in one place to its HTTP status, RFC 6750
//! `WWW-Authenticate` challenge and JSON body.
//!
//! Descriptions are fixed strings chosen here (or scope names from the configuration): nothing
//! from the token, the IdP's answer or the request is echoed back to the client, except the
//! JSON-RPC `id` (a string or number, re-serialised) of a request refused for a header mismatch,
//! which JSON-RPC requires the error to carry.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::config::ChallengeConfig;
use crate::exchange::ExchangeError;
use crate::introspection::IntrospectionError;
use crate::mcp::BodyError;
use crate::request_path::PathError;
use crate::token::ExtractError;
use crate::verify::TokenError;

/// Why the filter answers a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Extract(ExtractError),
    Token(TokenError),
    /// A valid token issued for another resource than this route's.
    WrongAudience,
    /// A valid token that lacks these scopes.
    InsufficientScope {
        missing: Vec<String>,
    },
    /// A `tools/call` of a tool the route does not list (with `deny_unlisted_tools`).
    ToolNotAllowed,
    /// The MCP request body could not be inspected.
    McpBody(BodyError),
    /// No route matches the path and unmatched requests are denied.
    NoRoute,
    /// The request path is not one the filter can decide on safely (see `request_path`).
    Path(PathError),
    Exchange(ExchangeError),
    /// An opaque token's introspection (RFC 7662) gave no principal.
    Introspection(IntrospectionError),
    /// The issuer's keys could not be loaded in time.
    KeysUnavailable,
    /// A condition that should not happen (host call failed); fail closed.
    Internal,
}

/// A complete local response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The RFC 6750 challenge a denial carries, if any.
enum Challenge {
    /// No error code: the client sent no bearer credentials (RFC 6750 §3.1).
    Bare,
    /// `error="…"` with the same code and description as the body.
    WithError,
    /// Not an authentication problem: no `WWW-Authenticate`.
    None,
}

impl Denial {
    /// A short machine-readable reason, for logs, audit and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Extract(ExtractError::Missing) => "missing_token",
            Self::Extract(_) => "invalid_request",
            Self::Token(_) | Self::WrongAudience => "invalid_token",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::ToolNotAllowed => "tool_not_allowed",
            Self::McpBody(BodyError::HeaderMismatch { .. } | BodyError::HeaderInvalid) => {
                "mcp_header_mismatch"
            }
            Self::McpBody(_) => "invalid_mcp_request",
            Self::NoRoute => "no_route",
            Self::Path(_) => "invalid_path",
            Self::Exchange(ExchangeError::SubjectRejected { .. }) => "exchange_subject_rejected",
            Self::Exchange(ExchangeError::TargetRefused { .. }) => "exchange_target_refused",
            Self::Exchange(ExchangeError::InteractionRequired { .. }) => {
                "exchange_interaction_required"
            }
            Self::Exchange(ExchangeError::GatewayMisconfigured { .. }) => {
                "exchange_client_rejected"
            }
            Self::Exchange(ExchangeError::Unavailable { .. }) => "exchange_unavailable",
            Self::Exchange(ExchangeError::Timeout) => "exchange_timeout",
            Self::Exchange(ExchangeError::BadResponse { .. }) => "exchange_bad_response",
            Self::Introspection(IntrospectionError::Inactive | IntrospectionError::NoSubject) => {
                "invalid_token"
            }
            Self::Introspection(IntrospectionError::Unavailable | IntrospectionError::Timeout) => {
                "introspection_unavailable"
            }
            Self::Introspection(_) => "introspection_failed",
            Self::KeysUnavailable => "jwks_unavailable",
            Self::Internal => "internal_error",
        }
    }

    /// What exactly was wrong, where `reason` names a class: for the audit record, never the
    /// client.
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            Self::Path(e) => Some(e.as_str()),
            _ => None,
        }
    }

    /// The one table: status, challenge, OAuth error code, description.
    fn table(&self) -> (u32, Challenge, &'static str, String) {
        use Challenge::{Bare, None as NoChallenge, WithError};
        let fixed = |s: &str| s.to_string();
        match self {
            Self::Extract(ExtractError::Missing) => (
                401,
                Bare,
                "invalid_request",
                fixed("a bearer access token is required"),
            ),
            Self::Extract(ExtractError::Duplicate) => (
                400,
                WithError,
                "invalid_request",
                fixed("more than one Authorization header"),
            ),
            Self::Extract(ExtractError::EmptyBearer) => (
                400,
                WithError,
                "invalid_request",
                fixed("the Bearer credentials are empty"),
            ),
            Self::Extract(ExtractError::TokenInQuery) => (
                400,
                WithError,
                "invalid_request",
                fixed("access tokens are accepted only in the Authorization header"),
            ),
            Self::Extract(ExtractError::MalformedToken) => (
                401,
                WithError,
                "invalid_token",
                fixed("the access token is malformed"),
            ),
            Self::Extract(ExtractError::TooLarge) => (
                401,
                WithError,
                "invalid_token",
                fixed("the access token is too large"),
            ),
            Self::Token(e) => (401, WithError, "invalid_token", fixed(e.description())),
            Self::WrongAudience => (
                401,
                WithError,
                "invalid_token",
                fixed(TokenError::WrongAudience.description()),
            ),
            // Scope names come from the configuration (validated scope tokens), not the client.
            Self::InsufficientScope { missing } => (
                403,
                WithError,
                "insufficient_scope",
                format!(
                    "the access token lacks required scope(s): {}",
                    missing.join(" ")
                ),
            ),
            Self::ToolNotAllowed => (
                403,
                WithError,
                "insufficient_scope",
                fixed("this tool is not available through the gateway"),
            ),
            Self::McpBody(e) => (
                e.status(),
                NoChallenge,
                "invalid_request",
                fixed("malformed MCP request"),
            ),
            // Which rule the path broke goes to the audit record, not to the client.
            Self::Path(_) => (
                400,
                NoChallenge,
                "invalid_request",
                fixed("the request path is not in normal form"),
            ),
            Self::NoRoute => (
                404,
                NoChallenge,
                "not_found",
                fixed("no MCP route is configured for this path"),
            ),
            Self::Exchange(ExchangeError::SubjectRejected { .. }) => (
                401,
                WithError,
                "invalid_token",
                fixed("the authorization server no longer accepts this access token"),
            ),
            Self::Exchange(ExchangeError::TargetRefused { .. }) => (
                403,
                WithError,
                "insufficient_scope",
                fixed("the authorization server refused a token for the upstream service"),
            ),
            // The user's (or an admin's) to fix at the IdP, never the gateway's: a 401 sending the
            // client back to sign in, with the IdP's claims challenge when there is one
            // (Microsoft's `insufficient_claims` format, see `reply`).
            Self::Exchange(ExchangeError::InteractionRequired { claims, .. }) => (
                401,
                WithError,
                if claims.is_some() {
                    "insufficient_claims"
                } else {
                    "invalid_token"
                },
                fixed("the authorization server requires the user to sign in again"),
            ),
            Self::Exchange(ExchangeError::GatewayMisconfigured { .. }) => (
                502,
                NoChallenge,
                "server_error",
                fixed("the gateway could not authenticate to the authorization server"),
            ),
            Self::Exchange(ExchangeError::Unavailable { .. }) => (
                503,
                NoChallenge,
                "temporarily_unavailable",
                fixed("the authorization server is unavailable"),
            ),
            Self::Exchange(ExchangeError::Timeout) => (
                504,
                NoChallenge,
                "temporarily_unavailable",
                fixed("the authorization server did not answer in time"),
            ),
            Self::Exchange(ExchangeError::BadResponse { .. }) => (
                502,
                NoChallenge,
                "server_error",
                fixed("the authorization server gave an unusable answer"),
            ),
            Self::Introspection(IntrospectionError::Inactive) => (
                401,
                WithError,
                "invalid_token",
                fixed("the access token is not active"),
            ),
            Self::Introspection(IntrospectionError::NoSubject) => (
                401,
                WithError,
                "invalid_token",
                fixed(TokenError::MissingClaim("sub").description()),
            ),
            Self::Introspection(IntrospectionError::Unavailable) => (
                503,
                NoChallenge,
                "temporarily_unavailable",
                fixed("the authorization server is unavailable"),
            ),
            Self::Introspection(IntrospectionError::Timeout) => (
                504,
                NoChallenge,
                "temporarily_unavailable",
                fixed("the authorization server did not answer in time"),
            ),
            // The gateway's credentials, or an answer that is not RFC 7662: never a pass.
            Self::Introspection(IntrospectionError::ClientRejected)
            | Self::Introspection(IntrospectionError::BadResponse { .. }) => (
                502,
                NoChallenge,
                "server_error",
                fixed("the authorization server could not check the access token"),
            ),
            Self::KeysUnavailable => (
                503,
                NoChallenge,
                "temporarily_unavailable",
                fixed("the issuer's signing keys are not available yet"),
            ),
            Self::Internal => (500, NoChallenge, "server_error", fixed("internal error")),
        }
    }

    /// The response for this denial. `required_scopes`: every scope this request needs (route
    /// and tools), for the challenge's `scope` parameter.
    pub fn reply(&self, challenge: &ChallengeConfig, required_scopes: &[String]) -> Reply {
        let (status, kind, code, description) = self.table();
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        let body = match self {
            // A JSON-RPC error, so MCP clients can show it.
            Self::McpBody(e) => e.jsonrpc_body(),
            _ => serde_json::json!({"error": code, "error_description": description}).to_string(),
        };
        let error = match kind {
            Challenge::None => None,
            Challenge::Bare => Some(None),
            Challenge::WithError => Some(Some((code, description.as_str()))),
        };
        if let Some(error) = error {
            let mut value = challenge_header(challenge, error, &required_scopes.join(" "));
            if let Self::Exchange(ExchangeError::InteractionRequired {
                claims: Some(claims),
                ..
            }) = self
            {
                // Base64 as Microsoft's claims challenges carry it: the IdP's JSON text never
                // reaches the header as it is.
                value.push_str(&format!(", claims=\"{}\"", STANDARD.encode(claims)));
            }
            headers.push(("www-authenticate", value));
        }
        if status == 503 {
            let retry = match self {
                Self::Exchange(ExchangeError::Unavailable {
                    retry_after: Some(s),
                    ..
                }) => *s,
                _ => 5,
            };
            headers.push(("retry-after", retry.to_string()));
        }
        Reply {
            status,
            headers,
            body,
        }
    }
}

fn challenge_header(cfg: &ChallengeConfig, error: Option<(&str, &str)>, scope: &str) -> String {
    // Values are fixed strings or validated configuration (no quotes or backslashes), so plain
    // quoting is safe.
    let mut params: Vec<String> = Vec::new();
    if let Some(realm) = &cfg.realm {
        params.push(format!("realm=\"{realm}\""));
    }
    if let Some((code, description)) = error {
        params.push(format!("error=\"{code}\""));
        params.push(format!("error_description=\"{description}\""));
    }
    // RFC 6750 §3: `scope` names the scopes needed. MCP (2025-11-25) puts it on 401s too, so a
    // client knows what to ask for.
    if !scope.is_empty() {
        params.push(format!("scope=\"{scope}\""));
    }
    if let Some(url) = &cfg.resource_metadata_url {
        params.push(format!("resource_metadata=\"{url}\""));
    }
    if params.is_empty() {
        "Bearer".to_string()
    } else {
        format!("Bearer {}", params.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ChallengeConfig {
        ChallengeConfig {
            realm: Some("mcp".into()),
            resource_metadata_url: Some(
                "https://gw.example.com/.well-known/oauth-protected-resource/mcp".into(),
            ),
        }
    }

    fn scopes() -> Vec<String> {
        vec!["mcp:tools:call".into()]
    }

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn body(r: &Reply) -> serde_json::Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn missing_token_has_no_error_code() {
        let r = Denial::Extract(ExtractError::Missing).reply(&cfg(), &scopes());
        assert_eq!(r.status, 401);
        assert_eq!(
            header(&r, "www-authenticate").unwrap(),
            "Bearer realm=\"mcp\", scope=\"mcp:tools:call\", resource_metadata=\"https://gw.example.com/.well-known/oauth-protected-resource/mcp\""
        );
    }

    #[test]
    fn bare_challenge_without_config() {
        let r = Denial::Extract(ExtractError::Missing).reply(&ChallengeConfig::default(), &[]);
        assert_eq!(header(&r, "www-authenticate"), Some("Bearer"));
    }

    #[test]
    fn invalid_token_and_request() {
        let r = Denial::Token(TokenError::Expired).reply(&cfg(), &scopes());
        assert_eq!(r.status, 401);
        let h = header(&r, "www-authenticate").unwrap();
        assert!(h.contains("error=\"invalid_token\""), "{h}");
        assert!(
            h.contains("error_description=\"the access token expired\""),
            "{h}"
        );
        assert_eq!(body(&r)["error"], "invalid_token");

        let r = Denial::Extract(ExtractError::Duplicate).reply(&cfg(), &scopes());
        assert_eq!(r.status, 400);
        assert!(header(&r, "www-authenticate")
            .unwrap()
            .contains("error=\"invalid_request\""));
        let r = Denial::Extract(ExtractError::MalformedToken).reply(&cfg(), &scopes());
        assert_eq!(r.status, 401);
    }

    #[test]
    fn insufficient_scope_names_the_scopes() {
        let r = Denial::InsufficientScope {
            missing: vec!["mcp:tools:call".into()],
        }
        .reply(&cfg(), &scopes());
        assert!(body(&r)["error_description"]
            .as_str()
            .unwrap()
            .contains("mcp:tools:call"));
        assert_eq!(r.status, 403);
        let h = header(&r, "www-authenticate").unwrap();
        assert!(h.contains("error=\"insufficient_scope\""));
        assert!(h.contains("scope=\"mcp:tools:call\""));
    }

    #[test]
    fn exchange_failures_map_to_the_documented_statuses() {
        let status = |e: ExchangeError| Denial::Exchange(e).reply(&cfg(), &scopes());
        let r = status(ExchangeError::SubjectRejected {
            code: "invalid_grant".into(),
        });
        assert_eq!(r.status, 401);
        assert!(header(&r, "www-authenticate")
            .unwrap()
            .contains("invalid_token"));
        let r = status(ExchangeError::TargetRefused {
            code: "access_denied".into(),
        });
        assert_eq!(r.status, 403);
        assert!(header(&r, "www-authenticate")
            .unwrap()
            .contains("insufficient_scope"));
        assert_eq!(
            status(ExchangeError::GatewayMisconfigured {
                code: "invalid_client".into()
            })
            .status,
            502
        );
        let r = status(ExchangeError::Unavailable {
            status: Some(500),
            retry_after: None,
        });
        assert_eq!((r.status, header(&r, "retry-after")), (503, Some("5")));
        assert_eq!(header(&r, "www-authenticate"), None);
        let r = status(ExchangeError::Unavailable {
            status: Some(503),
            retry_after: Some(9),
        });
        assert_eq!(header(&r, "retry-after"), Some("9"));
        assert_eq!(status(ExchangeError::Timeout).status, 504);
        assert_eq!(
            status(ExchangeError::BadResponse { reason: "x" }).status,
            502
        );
        assert_eq!(Denial::KeysUnavailable.reply(&cfg(), &scopes()).status, 503);
    }

    #[test]
    fn idp_codes_are_never_echoed() {
        let r = Denial::Exchange(ExchangeError::TargetRefused {
            code: "secret-detail".into(),
        })
        .reply(&cfg(), &scopes());
        assert!(!r.body.contains("secret-detail"));
        assert!(!r.headers.iter().any(|(_, v)| v.contains("secret-detail")));
    }

    #[test]
    fn mcp_body_errors_are_jsonrpc_shaped_without_challenge() {
        let r = Denial::McpBody(BodyError::Parse).reply(&cfg(), &scopes());
        assert_eq!(r.status, 400);
        assert_eq!(body(&r)["error"]["code"], -32700);
        assert_eq!(header(&r, "www-authenticate"), None);
        assert_eq!(
            Denial::McpBody(BodyError::TooLarge)
                .reply(&cfg(), &scopes())
                .status,
            413
        );
        let r = Denial::NoRoute.reply(&cfg(), &scopes());
        assert_eq!((r.status, header(&r, "www-authenticate")), (404, None));
        // MCP 2026-07-28: a header mismatch is 400 with -32020 and the request's id.
        let d = Denial::McpBody(BodyError::HeaderMismatch {
            id: Some(serde_json::json!(42)),
        });
        let r = d.reply(&cfg(), &scopes());
        assert_eq!((r.status, header(&r, "www-authenticate")), (400, None));
        assert_eq!(body(&r)["error"]["code"], -32020);
        assert_eq!(body(&r)["id"], 42);
        assert_eq!(d.reason(), "mcp_header_mismatch");
        let d = Denial::McpBody(BodyError::HeaderInvalid);
        let r = d.reply(&cfg(), &scopes());
        assert_eq!(r.status, 400);
        assert_eq!(body(&r)["error"]["code"], -32020);
        assert_eq!(body(&r)["id"], serde_json::Value::Null);
        assert_eq!(d.reason(), "mcp_header_mismatch");
        let r = Denial::WrongAudience.reply(&cfg(), &scopes());
        assert!(header(&r, "www-authenticate")
            .unwrap()
            .contains("invalid_token"));
    }
}
