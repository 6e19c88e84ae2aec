//! Every way a request is refused, mapped in one place to its HTTP status, RFC 6750
//! `WWW-Authenticate` challenge and JSON body.
//!
//! Descriptions are fixed strings chosen here: nothing from the token, the IdP's answer or the
//! request is echoed back to the client.

use crate::config::ChallengeConfig;
use crate::exchange::ExchangeError;
use crate::token::ExtractError;
use crate::verify::TokenError;

/// Why the filter answers a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Extract(ExtractError),
    Token(TokenError),
    /// A valid token that lacks these scopes.
    InsufficientScope {
        missing: Vec<String>,
    },
    Exchange(ExchangeError),
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

enum Challenge {
    /// RFC 6750 §3: no error code when the client sent no credentials.
    Bare,
    Error {
        code: &'static str,
        description: &'static str,
    },
}

impl Denial {
    /// A short machine-readable reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Extract(ExtractError::Missing) => "missing_token",
            Self::Extract(_) => "invalid_request",
            Self::Token(_) => "invalid_token",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::Exchange(ExchangeError::SubjectRejected { .. }) => "exchange_subject_rejected",
            Self::Exchange(ExchangeError::TargetRefused { .. }) => "exchange_target_refused",
            Self::Exchange(ExchangeError::GatewayMisconfigured { .. }) => {
                "exchange_client_rejected"
            }
            Self::Exchange(ExchangeError::Unavailable { .. }) => "exchange_unavailable",
            Self::Exchange(ExchangeError::Timeout) => "exchange_timeout",
            Self::Exchange(ExchangeError::BadResponse { .. }) => "exchange_bad_response",
            Self::KeysUnavailable => "jwks_unavailable",
            Self::Internal => "internal_error",
        }
    }

    pub fn reply(&self, challenge: &ChallengeConfig, required_scopes: &[String]) -> Reply {
        let scope_list = required_scopes.join(" ");
        let (status, auth, code, description): (u32, Option<Challenge>, &str, &str) = match self {
            Self::Extract(ExtractError::Missing) => (
                401,
                Some(Challenge::Bare),
                "invalid_request",
                "a bearer access token is required",
            ),
            Self::Extract(e) => {
                let (code, description) = match e {
                    ExtractError::Duplicate => {
                        ("invalid_request", "more than one Authorization header")
                    }
                    ExtractError::EmptyBearer => {
                        ("invalid_request", "the Bearer credentials are empty")
                    }
                    ExtractError::TokenInQuery => (
                        "invalid_request",
                        "access tokens are accepted only in the Authorization header",
                    ),
                    ExtractError::MalformedToken => {
                        ("invalid_token", "the access token is malformed")
                    }
                    ExtractError::TooLarge => ("invalid_token", "the access token is too large"),
                    ExtractError::Missing => {
                        ("invalid_request", "a bearer access token is required")
                    }
                };
                let status = if code == "invalid_request" { 400 } else { 401 };
                (
                    status,
                    Some(Challenge::Error { code, description }),
                    code,
                    description,
                )
            }
            Self::Token(e) => {
                let d = e.description();
                (
                    401,
                    Some(Challenge::Error {
                        code: "invalid_token",
                        description: d,
                    }),
                    "invalid_token",
                    d,
                )
            }
            Self::InsufficientScope { .. } => {
                let d = "the access token lacks a required scope";
                (
                    403,
                    Some(Challenge::Error {
                        code: "insufficient_scope",
                        description: d,
                    }),
                    "insufficient_scope",
                    d,
                )
            }
            Self::Exchange(e) => match e {
                ExchangeError::SubjectRejected { .. } => {
                    let d = "the authorization server no longer accepts this access token";
                    (
                        401,
                        Some(Challenge::Error {
                            code: "invalid_token",
                            description: d,
                        }),
                        "invalid_token",
                        d,
                    )
                }
                ExchangeError::TargetRefused { .. } => {
                    let d = "the authorization server refused a token for the upstream service";
                    (
                        403,
                        Some(Challenge::Error {
                            code: "insufficient_scope",
                            description: d,
                        }),
                        "insufficient_scope",
                        d,
                    )
                }
                ExchangeError::GatewayMisconfigured { .. } => (
                    502,
                    None,
                    "server_error",
                    "the gateway could not authenticate to the authorization server",
                ),
                ExchangeError::Unavailable { .. } => (
                    503,
                    None,
                    "temporarily_unavailable",
                    "the authorization server is unavailable",
                ),
                ExchangeError::Timeout => (
                    504,
                    None,
                    "temporarily_unavailable",
                    "the authorization server did not answer in time",
                ),
                ExchangeError::BadResponse { .. } => (
                    502,
                    None,
                    "server_error",
                    "the authorization server gave an unusable answer",
                ),
            },
            Self::KeysUnavailable => (
                503,
                None,
                "temporarily_unavailable",
                "the issuer's signing keys are not available yet",
            ),
            Self::Internal => (500, None, "server_error", "internal error"),
        };

        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        if let Some(c) = auth {
            headers.push((
                "www-authenticate",
                challenge_header(challenge, c, &scope_list, self),
            ));
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
        let body = serde_json::json!({"error": code, "error_description": description}).to_string();
        Reply {
            status,
            headers,
            body,
        }
    }
}

fn challenge_header(
    cfg: &ChallengeConfig,
    challenge: Challenge,
    scope_list: &str,
    denial: &Denial,
) -> String {
    // Values are either fixed strings or validated config (no quotes or backslashes), so plain
    // quoting is safe.
    let mut params: Vec<String> = Vec::new();
    if let Some(realm) = &cfg.realm {
        params.push(format!("realm=\"{realm}\""));
    }
    if let Challenge::Error { code, description } = challenge {
        params.push(format!("error=\"{code}\""));
        params.push(format!("error_description=\"{description}\""));
    }
    // RFC 6750 §3: for insufficient_scope, `scope` names the scopes needed. MCP (2025-11-25)
    // also puts it on 401s so clients know what to request.
    let scope = match denial {
        Denial::InsufficientScope { missing } if !missing.is_empty() && scope_list.is_empty() => {
            missing.join(" ")
        }
        _ => scope_list.to_string(),
    };
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
}
