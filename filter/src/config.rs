//! Plugin configuration: the JSON document in the Wasm plugin's `configuration`, validated once in
//! `on_configure` into an immutable [`Policy`] that every request shares.
//!
//! Unknown fields and invalid values are refused with an error naming the field, so Envoy rejects
//! the config instead of running half-configured.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::jwks::KeySet;

pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The raw configuration document. Field docs live in the README's configuration reference.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    #[serde(default = "defaults::clock_skew_seconds")]
    pub clock_skew_seconds: u64,
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
    #[serde(default = "defaults::verified_cache_max_entries")]
    pub verified_cache_max_entries: usize,
    #[serde(default)]
    pub realm: Option<String>,
    #[serde(default)]
    pub resource_metadata_url: Option<String>,
    pub jwks: JwksConfig,
    pub exchange: ExchangeConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// A JWK Set document (as a JSON object or a string holding one). Excludes `cluster`.
    #[serde(default)]
    pub inline: Option<serde_json::Value>,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "defaults::jwks_refresh_interval_seconds")]
    pub refresh_interval_seconds: u64,
    #[serde(default = "defaults::jwks_min_refetch_interval_seconds")]
    pub min_refetch_interval_seconds: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::jwks_max_wait_ms")]
    pub max_wait_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub client_id: String,
    pub client_secret_env: String,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default = "defaults::subject_token_type")]
    pub subject_token_type: String,
    #[serde(default)]
    pub requested_token_type: Option<String>,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::cache_margin_seconds")]
    pub cache_margin_seconds: u64,
    #[serde(default = "defaults::cache_max_entries")]
    pub cache_max_entries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

mod defaults {
    pub fn clock_skew_seconds() -> u64 {
        60
    }
    pub fn max_token_bytes() -> usize {
        8 * 1024
    }
    pub fn jwks_refresh_interval_seconds() -> u64 {
        600
    }
    pub fn jwks_min_refetch_interval_seconds() -> u64 {
        30
    }
    pub fn timeout_ms() -> u64 {
        5_000
    }
    pub fn jwks_max_wait_ms() -> u64 {
        5_000
    }
    pub fn subject_token_type() -> String {
        super::TOKEN_TYPE_ACCESS_TOKEN.to_string()
    }
    pub fn cache_margin_seconds() -> u64 {
        30
    }
    pub fn cache_max_entries() -> usize {
        10_000
    }
    pub fn verified_cache_max_entries() -> usize {
        10_000
    }
}

/// A configuration problem, naming the field (as a dotted path) that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid configuration: {}", self.reason)
        } else {
            write!(
                f,
                "invalid configuration: `{}`: {}",
                self.field, self.reason
            )
        }
    }
}

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the inbound issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Inline(KeySet),
    Remote(RemoteJwks),
}

#[derive(Debug, Clone)]
pub struct RemoteJwks {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_interval: Duration,
    pub min_refetch_interval: Duration,
    pub timeout: Duration,
    pub max_wait: Duration,
}

/// How inbound tokens are judged.
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub required_scopes: Vec<String>,
    pub clock_skew_seconds: i64,
    pub max_token_bytes: usize,
    pub verified_cache_max_entries: usize,
}

/// Where and how the backend token is obtained.
#[derive(Debug, Clone)]
pub struct ExchangeTarget {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub client_auth: ClientAuth,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub subject_token_type: String,
    pub requested_token_type: Option<String>,
    pub timeout: Duration,
    pub cache_margin_seconds: i64,
    pub cache_max_entries: usize,
}

impl ExchangeTarget {
    /// A stable description of what is asked for, so the exchange cache never hands a token
    /// obtained for one target to a request for another.
    pub fn cache_identity(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.cluster,
            self.authority,
            self.path,
            self.client_id,
            self.audience.as_deref().unwrap_or(""),
            self.scope.as_deref().unwrap_or(""),
            self.resource.as_deref().unwrap_or(""),
            self.requested_token_type.as_deref().unwrap_or(""),
        )
    }
}

/// What challenges say, besides the error.
#[derive(Debug, Clone, Default)]
pub struct ChallengeConfig {
    pub realm: Option<String>,
    pub resource_metadata_url: Option<String>,
}

/// The validated, immutable configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub inbound: InboundPolicy,
    pub keys: KeySource,
    pub exchange: ExchangeTarget,
    pub challenge: ChallengeConfig,
}

/// Parses and validates a configuration document. `env` resolves environment variables (WASI's
/// `std::env::var` in the filter; a map in tests).
pub fn parse_policy(
    raw: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, ConfigError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "",
            "the plugin configuration is empty; a JSON object is required",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let config: FilterConfig =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            ConfigError::new(&field, e.inner().to_string())
        })?;
    deserializer
        .end()
        .map_err(|e| ConfigError::new("", format!("trailing data after the JSON object: {e}")))?;
    config.validate(env)
}

fn require_non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

fn require_path(field: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::new(
            field,
            "must be an absolute request path starting with '/' and without whitespace",
        ));
    }
    Ok(())
}

fn require_header_value(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.chars().any(|c| c.is_control()) {
        return Err(ConfigError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn require_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A scope token per RFC 6749 §3.3: printable ASCII except space, `"` and `\`.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

impl FilterConfig {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Policy, ConfigError> {
        require_non_empty("issuer", &self.issuer)?;
        require_header_value("issuer", &self.issuer)?;
        if self.audiences.is_empty() {
            return Err(ConfigError::new(
                "audiences",
                "must list at least one audience",
            ));
        }
        for (i, aud) in self.audiences.iter().enumerate() {
            require_non_empty(&format!("audiences[{i}]"), aud)?;
        }
        for (i, scope) in self.required_scopes.iter().enumerate() {
            if !is_scope_token(scope) {
                return Err(ConfigError::new(
                    &format!("required_scopes[{i}]"),
                    "must be a single scope token (no spaces, quotes or backslashes)",
                ));
            }
        }
        require_range("clock_skew_seconds", self.clock_skew_seconds, 0, 600)?;
        require_range(
            "max_token_bytes",
            self.max_token_bytes as u64,
            256,
            64 * 1024,
        )?;
        for (field, value) in [
            ("realm", &self.realm),
            ("resource_metadata_url", &self.resource_metadata_url),
        ] {
            if let Some(v) = value {
                require_non_empty(field, v)?;
                if v.contains('"') || v.contains('\\') || v.chars().any(|c| c.is_control()) {
                    return Err(ConfigError::new(
                        field,
                        "must not contain quotes, backslashes or control characters (it is sent in WWW-Authenticate)",
                    ));
                }
            }
        }

        let keys = self.jwks.validate()?;
        let exchange = self.exchange.validate(env)?;

        Ok(Policy {
            inbound: InboundPolicy {
                issuer: self.issuer,
                audiences: self.audiences,
                required_scopes: self.required_scopes,
                clock_skew_seconds: self.clock_skew_seconds as i64,
                max_token_bytes: self.max_token_bytes,
                verified_cache_max_entries: self.verified_cache_max_entries,
            },
            keys,
            exchange,
            challenge: ChallengeConfig {
                realm: self.realm,
                resource_metadata_url: self.resource_metadata_url,
            },
        })
    }
}

impl JwksConfig {
    fn validate(self) -> Result<KeySource, ConfigError> {
        match (self.inline, self.cluster) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "jwks",
                "set either `inline` or `cluster`/`path`, not both",
            )),
            (None, None) => Err(ConfigError::new(
                "jwks",
                "set `inline` (a JWK Set) or `cluster` and `path` (where to fetch it)",
            )),
            (Some(inline), None) => {
                let doc = match inline {
                    serde_json::Value::String(s) => s.into_bytes(),
                    other => serde_json::to_vec(&other)
                        .map_err(|e| ConfigError::new("jwks.inline", e.to_string()))?,
                };
                let parsed = KeySet::parse(&doc)
                    .map_err(|e| ConfigError::new("jwks.inline", e.to_string()))?;
                if parsed.keys.is_empty() {
                    return Err(ConfigError::new(
                        "jwks.inline",
                        "holds no usable signing key",
                    ));
                }
                Ok(KeySource::Inline(parsed))
            }
            (None, Some(cluster)) => {
                require_non_empty("jwks.cluster", &cluster)?;
                let path = self
                    .path
                    .ok_or_else(|| ConfigError::new("jwks.path", "is required with `cluster`"))?;
                require_path("jwks.path", &path)?;
                let authority = self.authority.unwrap_or_else(|| cluster.clone());
                require_non_empty("jwks.authority", &authority)?;
                require_header_value("jwks.authority", &authority)?;
                require_range(
                    "jwks.refresh_interval_seconds",
                    self.refresh_interval_seconds,
                    1,
                    7 * 24 * 3600,
                )?;
                require_range(
                    "jwks.min_refetch_interval_seconds",
                    self.min_refetch_interval_seconds,
                    0,
                    24 * 3600,
                )?;
                require_range("jwks.timeout_ms", self.timeout_ms, 1, 60_000)?;
                require_range("jwks.max_wait_ms", self.max_wait_ms, 0, 60_000)?;
                Ok(KeySource::Remote(RemoteJwks {
                    cluster,
                    path,
                    authority,
                    refresh_interval: Duration::from_secs(self.refresh_interval_seconds),
                    min_refetch_interval: Duration::from_secs(self.min_refetch_interval_seconds),
                    timeout: Duration::from_millis(self.timeout_ms),
                    max_wait: Duration::from_millis(self.max_wait_ms),
                }))
            }
        }
    }
}

impl ExchangeConfig {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<ExchangeTarget, ConfigError> {
        require_non_empty("exchange.cluster", &self.cluster)?;
        require_path("exchange.path", &self.path)?;
        require_non_empty("exchange.authority", &self.authority)?;
        require_header_value("exchange.authority", &self.authority)?;
        require_non_empty("exchange.client_id", &self.client_id)?;
        require_header_value("exchange.client_id", &self.client_id)?;
        require_non_empty("exchange.client_secret_env", &self.client_secret_env)?;
        let secret = match env(&self.client_secret_env) {
            Some(v) if !v.is_empty() => Secret::new(v),
            _ => {
                return Err(ConfigError::new(
                    "exchange.client_secret_env",
                    format!(
                        "environment variable {} is unset or empty in the Wasm VM (pass it with vm_config.environment_variables)",
                        self.client_secret_env
                    ),
                ))
            }
        };
        if self.audience.is_none() && self.resource.is_none() {
            return Err(ConfigError::new(
                "exchange.audience",
                "set `audience` or `resource`: the token endpoint must know which backend the token is for",
            ));
        }
        for (field, value) in [
            ("exchange.audience", &self.audience),
            ("exchange.resource", &self.resource),
            ("exchange.requested_token_type", &self.requested_token_type),
        ] {
            if let Some(v) = value {
                require_non_empty(field, v)?;
            }
        }
        if let Some(scope) = &self.scope {
            if scope.split(' ').any(|s| !is_scope_token(s)) {
                return Err(ConfigError::new(
                    "exchange.scope",
                    "must be scope tokens separated by single spaces",
                ));
            }
        }
        require_non_empty("exchange.subject_token_type", &self.subject_token_type)?;
        require_range("exchange.timeout_ms", self.timeout_ms, 1, 60_000)?;
        require_range(
            "exchange.cache_margin_seconds",
            self.cache_margin_seconds,
            0,
            3600,
        )?;
        require_range(
            "exchange.cache_max_entries",
            self.cache_max_entries as u64,
            0,
            1_000_000,
        )?;
        Ok(ExchangeTarget {
            cluster: self.cluster,
            path: self.path,
            authority: self.authority,
            client_id: self.client_id,
            client_secret: secret,
            client_auth: self.client_auth,
            audience: self.audience,
            scope: self.scope,
            resource: self.resource,
            subject_token_type: self.subject_token_type,
            requested_token_type: self.requested_token_type,
            timeout: Duration::from_millis(self.timeout_ms),
            cache_margin_seconds: self.cache_margin_seconds as i64,
            cache_max_entries: self.cache_max_entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cret".to_string())
    }

    fn base() -> serde_json::Value {
        json!({
            "issuer": "https://idp.example.com/oauth2/mcp",
            "audiences": ["mcpserver"],
            "required_scopes": ["mcp:tools:call"],
            "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys", "authority": "idp.example.com"},
            "exchange": {
                "cluster": "okta", "path": "/oauth2/backend/v1/token", "authority": "idp.example.com",
                "client_id": "gw", "client_secret_env": "SECRET",
                "audience": "backend", "scope": "backend-api:read"
            }
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Policy, ConfigError> {
        parse_policy(v.to_string().as_bytes(), &env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let p = parse(&base()).unwrap();
        assert_eq!(p.inbound.clock_skew_seconds, 60);
        assert_eq!(p.inbound.max_token_bytes, 8192);
        assert_eq!(p.exchange.client_auth, ClientAuth::ClientSecretBasic);
        assert_eq!(p.exchange.subject_token_type, TOKEN_TYPE_ACCESS_TOKEN);
        assert_eq!(p.exchange.timeout, Duration::from_secs(5));
        assert_eq!(p.exchange.cache_margin_seconds, 30);
        assert_eq!(p.exchange.client_secret.expose(), "s3cret");
        match p.keys {
            KeySource::Remote(r) => {
                assert_eq!(r.refresh_interval, Duration::from_secs(600));
                assert_eq!(r.authority, "idp.example.com");
            }
            KeySource::Inline(_) => panic!("expected remote keys"),
        }
    }

    #[test]
    fn secret_is_redacted_in_debug_output() {
        let p = parse(&base()).unwrap();
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn unknown_field_is_named() {
        let mut v = base();
        v["exchange"]["audiance"] = json!("backend");
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "exchange.audiance");
        assert!(e.reason.contains("audiance"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let mut v = base();
        v["exchange"]["timeout_ms"] = json!("soon");
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "exchange.timeout_ms", "{e}");
    }

    #[test]
    fn invalid_values_are_refused_with_their_field() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("issuer", Box::new(|v| v["issuer"] = json!(" "))),
            ("audiences", Box::new(|v| v["audiences"] = json!([]))),
            ("audiences[0]", Box::new(|v| v["audiences"] = json!([""]))),
            (
                "required_scopes[0]",
                Box::new(|v| v["required_scopes"] = json!(["a b"])),
            ),
            (
                "clock_skew_seconds",
                Box::new(|v| v["clock_skew_seconds"] = json!(100000)),
            ),
            (
                "max_token_bytes",
                Box::new(|v| v["max_token_bytes"] = json!(10)),
            ),
            ("realm", Box::new(|v| v["realm"] = json!("a\"b"))),
            ("jwks", Box::new(|v| v["jwks"] = json!({}))),
            ("jwks.path", Box::new(|v| v["jwks"]["path"] = json!("keys"))),
            (
                "jwks.timeout_ms",
                Box::new(|v| v["jwks"]["timeout_ms"] = json!(0)),
            ),
            (
                "exchange.path",
                Box::new(|v| v["exchange"]["path"] = json!("http://x/token")),
            ),
            (
                "exchange.client_id",
                Box::new(|v| v["exchange"]["client_id"] = json!("")),
            ),
            (
                "exchange.client_secret_env",
                Box::new(|v| v["exchange"]["client_secret_env"] = json!("MISSING")),
            ),
            (
                "exchange.scope",
                Box::new(|v| v["exchange"]["scope"] = json!("a  b")),
            ),
            (
                "exchange.client_auth",
                Box::new(|v| v["exchange"]["client_auth"] = json!("private_key")),
            ),
            (
                "exchange.audience",
                Box::new(|v| {
                    v["exchange"].as_object_mut().unwrap().remove("audience");
                }),
            ),
            (
                "exchange.timeout_ms",
                Box::new(|v| v["exchange"]["timeout_ms"] = json!(-1)),
            ),
        ];
        for (field, mutate) in cases {
            let mut v = base();
            mutate(&mut v);
            let e = parse(&v).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn empty_and_non_object_configs_are_refused() {
        assert!(parse_policy(b"", &env).is_err());
        assert!(parse_policy(b"  ", &env).is_err());
        assert!(parse_policy(b"[]", &env).is_err());
        assert!(parse_policy(b"{} {}", &env).is_err());
        assert!(parse_policy(b"\xff", &env).is_err());
    }

    #[test]
    fn inline_and_cluster_are_exclusive() {
        let mut v = base();
        v["jwks"]["inline"] = json!({"keys": []});
        assert_eq!(parse(&v).unwrap_err().field, "jwks");
    }

    #[test]
    fn inline_without_usable_keys_is_refused() {
        let v = {
            let mut v = base();
            v["jwks"] = json!({"inline": {"keys": [{"kty": "oct", "k": "AAAA"}]}});
            v
        };
        assert_eq!(parse(&v).unwrap_err().field, "jwks.inline");
    }

    #[test]
    fn cache_identity_differs_per_target() {
        let a = parse(&base()).unwrap().exchange;
        let mut v = base();
        v["exchange"]["scope"] = json!("backend-api:write");
        let b = parse(&v).unwrap().exchange;
        assert_ne!(a.cache_identity(), b.cache_identity());
    }
}
