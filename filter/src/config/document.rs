//! The configuration document as the operator writes it: one struct per JSON object, with the
//! documented defaults. Each is read field by field (see `fields` for why not
//! `#[derive(Deserialize)]`), so a wrong type or an unknown key is refused with its field's path
//! before any value is validated.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::fields::{list, value, Fields};
use super::providers::{read_providers, ProviderConfig};
use super::ConfigError;

/// The raw configuration document. Field docs live in the README's configuration reference.
/// Read by [`FilterConfig::read`].
#[derive(Debug)]
pub struct FilterConfig {
    /// With `audiences` and `jwks`: the one provider when `providers` is absent.
    pub issuer: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub required_scopes: Vec<String>,
    pub clock_skew_seconds: u64,
    pub max_token_bytes: usize,
    pub verified_cache_max_entries: usize,
    pub realm: Option<String>,
    pub resource_metadata_url: Option<String>,
    /// The public URL of the protected MCP endpoint (RFC 9728 `resource`) when there are no
    /// `routes`.
    pub resource: Option<String>,
    pub authorization_servers: Vec<String>,
    pub resource_name: Option<String>,
    pub resource_documentation: Option<String>,
    pub jwks: Option<JwksConfig>,
    /// Several inbound providers by name (excludes `issuer`, `audiences` and `jwks`).
    pub providers: Option<Vec<(String, ProviderConfig)>>,
    /// `exchange` (the default): swap the token by RFC 8693. `validate_only`: validate and
    /// forward without a backend token, like Envoy's `jwt_authn`.
    pub mode: Mode,
    /// `validate_only` mode: keep the client's `Authorization` header for the upstream instead
    /// of removing it (`jwt_authn`'s `forward`). Only for upstreams that are the token's own
    /// audience: MCP servers must not receive passed-through tokens.
    pub forward_token: bool,
    /// Parsed into [`ExchangeConfig`]; kept raw so routes can override single fields. Required
    /// in `exchange` mode, refused in `validate_only` mode.
    pub exchange: Option<Map<String, Value>>,
    pub routes: Vec<RouteConfig>,
    pub unmatched: Unmatched,
    /// Request header name → claim (`sub`, `client_id`, `email`, `jti`, `scope`, `iss`).
    pub identity_headers: BTreeMap<String, String>,
    pub audit_log: AuditLog,
    pub mcp: McpConfig,
    pub fleet_store: Option<super::fleet_store::FleetStoreConfig>,
}

/// One MCP upstream behind the listener.
#[derive(Debug)]
pub struct RouteConfig {
    pub name: Option<String>,
    pub path_prefix: String,
    /// Pass without authentication (the `Authorization` header is still removed).
    pub public: bool,
    pub audiences: Option<Vec<String>>,
    pub required_scopes: Option<Vec<String>>,
    /// Names of the providers whose tokens this route accepts; `None`: every provider.
    pub providers: Option<Vec<String>>,
    pub resource: Option<String>,
    pub resource_name: Option<String>,
    /// Fields that override the top-level `exchange` for this route.
    pub exchange: Option<Map<String, Value>>,
    pub tools: BTreeMap<String, ToolConfig>,
    pub deny_unlisted_tools: bool,
}

#[derive(Debug)]
pub struct ToolConfig {
    pub required_scopes: Vec<String>,
    /// A narrower `scope` to request for this tool's backend token.
    pub exchange_scope: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Exchange,
    ValidateOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// 404 from the filter: nothing reaches an upstream that no route describes.
    #[default]
    Deny,
    /// Pass without authentication (the `Authorization` header is removed).
    Pass,
}

/// Where the audit record of each decision goes (`audit_log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditLog {
    /// No audit record.
    Off,
    /// Gathered in the VM and written to Envoy's application log at `info`, up to
    /// [`BATCH_MAX_RECORDS`] records per log call: on the tick, when a batch fills, and when the
    /// VM stops. `true` means this.
    ///
    /// [`BATCH_MAX_RECORDS`]: crate::audit::BATCH_MAX_RECORDS
    #[default]
    EnvoyLogBatched,
    /// Handed to Envoy as filter state (`wasm.mcp_token_exchange.audit`) for its access log to
    /// write when the request ends, beside Envoy's own fields.
    AccessLog,
    /// A line in Envoy's application log at `info` per record, written on the worker thread.
    EnvoyLog,
}

impl AuditLog {
    /// `true` (= `"envoy_log_batched"`), `false`, `"envoy_log_batched"`, `"access_log"` or
    /// `"envoy_log"`.
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        match &v {
            Value::Bool(true) => Ok(Self::EnvoyLogBatched),
            Value::Bool(false) => Ok(Self::Off),
            Value::String(s) if s == "envoy_log_batched" => Ok(Self::EnvoyLogBatched),
            Value::String(s) if s == "access_log" => Ok(Self::AccessLog),
            Value::String(s) if s == "envoy_log" => Ok(Self::EnvoyLog),
            other => Err(ConfigError::new(
                path,
                format!(
                    "expected true, false, \"envoy_log_batched\", \"access_log\" or \"envoy_log\", found {other}"
                ),
            )),
        }
    }

    /// Whether a record is produced at all.
    pub fn is_on(self) -> bool {
        self != Self::Off
    }
}

#[derive(Debug)]
pub struct McpConfig {
    pub max_body_bytes: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: defaults::max_body_bytes(),
        }
    }
}

#[derive(Debug)]
pub struct JwksConfig {
    /// A JWK Set document (as a JSON object or a string holding one). Excludes `cluster`.
    pub inline: Option<serde_json::Value>,
    pub cluster: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub refresh_interval_seconds: u64,
    pub min_refetch_interval_seconds: u64,
    pub timeout_ms: u64,
    pub max_wait_ms: u64,
}

#[derive(Debug)]
pub struct ExchangeConfig {
    /// `rfc8693` (the default) or `entra_obo`.
    pub profile: Option<String>,
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    /// Name of the environment variable holding the gateway's private JWK (`private_key_jwt`,
    /// actor tokens).
    pub client_private_key_env: Option<String>,
    /// `aud` of client assertions and actor tokens; default `https://{authority}{path}`.
    pub client_assertion_audience: Option<String>,
    /// Send an RFC 8693 actor token naming the gateway (signed with the client key).
    pub actor_token: bool,
    pub client_auth: ClientAuth,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub subject_token_type: String,
    pub requested_token_type: Option<String>,
    pub timeout_ms: u64,
    pub cache_margin_seconds: u64,
    pub cache_max_entries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
    /// RFC 7523 client assertion signed with the gateway's key.
    PrivateKeyJwt,
}

impl FilterConfig {
    const FIELDS: &'static [&'static str] = &[
        "issuer",
        "audiences",
        "required_scopes",
        "clock_skew_seconds",
        "max_token_bytes",
        "verified_cache_max_entries",
        "realm",
        "resource_metadata_url",
        "resource",
        "authorization_servers",
        "resource_name",
        "resource_documentation",
        "jwks",
        "providers",
        "mode",
        "forward_token",
        "exchange",
        "routes",
        "unmatched",
        "identity_headers",
        "audit_log",
        "mcp",
        "fleet_store",
    ];

    /// The whole document (the top-level object).
    pub fn read(v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(String::new(), v, Self::FIELDS)?;
        Ok(Self {
            issuer: f.optional("issuer")?,
            audiences: f.optional_strings("audiences")?,
            required_scopes: f.strings("required_scopes")?,
            clock_skew_seconds: f.or_else("clock_skew_seconds", defaults::clock_skew_seconds)?,
            max_token_bytes: f.or_else("max_token_bytes", defaults::max_token_bytes)?,
            verified_cache_max_entries: f.or_else(
                "verified_cache_max_entries",
                defaults::verified_cache_max_entries,
            )?,
            realm: f.optional("realm")?,
            resource_metadata_url: f.optional("resource_metadata_url")?,
            resource: f.optional("resource")?,
            authorization_servers: f.strings("authorization_servers")?,
            resource_name: f.optional("resource_name")?,
            resource_documentation: f.optional("resource_documentation")?,
            jwks: match f.take("jwks") {
                Some((path, v)) => Some(JwksConfig::read(path, v)?),
                None => None,
            },
            providers: match f.take("providers") {
                Some((path, v)) => Some(read_providers(&path, v)?),
                None => None,
            },
            mode: f.or_default("mode")?,
            forward_token: f.or_default("forward_token")?,
            exchange: f.optional("exchange")?,
            routes: match f.take("routes") {
                Some((path, v)) => list(&path, v)?
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| RouteConfig::read(format!("{path}[{i}]"), v))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            },
            unmatched: f.or_default("unmatched")?,
            identity_headers: f.named("identity_headers", |path, v| value(&path, v))?,
            audit_log: match f.take("audit_log") {
                Some((path, v)) => AuditLog::read(&path, v)?,
                None => AuditLog::default(),
            },
            mcp: match f.take("mcp") {
                Some((path, v)) => McpConfig::read(path, v)?,
                None => McpConfig::default(),
            },
            fleet_store: match f.take("fleet_store") {
                Some((path, v)) => Some(super::fleet_store::FleetStoreConfig::read(path, v)?),
                None => None,
            },
        })
    }
}

impl RouteConfig {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "path_prefix",
        "public",
        "audiences",
        "required_scopes",
        "providers",
        "resource",
        "resource_name",
        "exchange",
        "tools",
        "deny_unlisted_tools",
    ];

    fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            name: f.optional("name")?,
            path_prefix: f.required("path_prefix")?,
            public: f.or_default("public")?,
            audiences: f.optional_strings("audiences")?,
            required_scopes: f.optional_strings("required_scopes")?,
            providers: f.optional_strings("providers")?,
            resource: f.optional("resource")?,
            resource_name: f.optional("resource_name")?,
            exchange: f.optional("exchange")?,
            tools: f.named("tools", ToolConfig::read)?,
            deny_unlisted_tools: f.or_default("deny_unlisted_tools")?,
        })
    }
}

impl ToolConfig {
    const FIELDS: &'static [&'static str] = &["required_scopes", "exchange_scope"];

    fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            required_scopes: f.strings("required_scopes")?,
            exchange_scope: f.optional("exchange_scope")?,
        })
    }
}

impl McpConfig {
    const FIELDS: &'static [&'static str] = &["max_body_bytes"];

    fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            max_body_bytes: f.or_else("max_body_bytes", defaults::max_body_bytes)?,
        })
    }
}

impl JwksConfig {
    pub(super) const FIELDS: &'static [&'static str] = &[
        "inline",
        "cluster",
        "path",
        "authority",
        "refresh_interval_seconds",
        "min_refetch_interval_seconds",
        "timeout_ms",
        "max_wait_ms",
    ];

    pub(super) fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            inline: f.optional("inline")?,
            cluster: f.optional("cluster")?,
            path: f.optional("path")?,
            authority: f.optional("authority")?,
            refresh_interval_seconds: f.or_else(
                "refresh_interval_seconds",
                defaults::jwks_refresh_interval_seconds,
            )?,
            min_refetch_interval_seconds: f.or_else(
                "min_refetch_interval_seconds",
                defaults::jwks_min_refetch_interval_seconds,
            )?,
            timeout_ms: f.or_else("timeout_ms", defaults::timeout_ms)?,
            max_wait_ms: f.or_else("max_wait_ms", defaults::jwks_max_wait_ms)?,
        })
    }
}

impl ExchangeConfig {
    const FIELDS: &'static [&'static str] = &[
        "profile",
        "cluster",
        "path",
        "authority",
        "client_id",
        "client_secret_env",
        "client_private_key_env",
        "client_assertion_audience",
        "actor_token",
        "client_auth",
        "audience",
        "scope",
        "resource",
        "subject_token_type",
        "requested_token_type",
        "timeout_ms",
        "cache_margin_seconds",
        "cache_max_entries",
    ];

    pub(super) fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            profile: f.optional("profile")?,
            cluster: f.required("cluster")?,
            path: f.required("path")?,
            authority: f.required("authority")?,
            client_id: f.required("client_id")?,
            client_secret_env: f.optional("client_secret_env")?,
            client_private_key_env: f.optional("client_private_key_env")?,
            client_assertion_audience: f.optional("client_assertion_audience")?,
            actor_token: f.or_default("actor_token")?,
            client_auth: f.or_default("client_auth")?,
            audience: f.optional("audience")?,
            scope: f.optional("scope")?,
            resource: f.optional("resource")?,
            subject_token_type: f.or_else("subject_token_type", defaults::subject_token_type)?,
            requested_token_type: f.optional("requested_token_type")?,
            timeout_ms: f.or_else("timeout_ms", defaults::timeout_ms)?,
            cache_margin_seconds: f
                .or_else("cache_margin_seconds", defaults::cache_margin_seconds)?,
            cache_max_entries: f.or_else("cache_max_entries", defaults::cache_max_entries)?,
        })
    }
}

mod defaults {
    pub fn max_body_bytes() -> usize {
        64 * 1024
    }
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
        crate::config::TOKEN_TYPE_ACCESS_TOKEN.to_string()
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
