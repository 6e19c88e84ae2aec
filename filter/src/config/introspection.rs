//! A provider's `introspection` section: where and how opaque tokens are checked (RFC 7662).
//! The endpoint must authenticate the caller (§2.1), so client credentials are required.

use std::time::Duration;

use serde_json::Value;

use super::checks::{require_header_value, require_non_empty, require_path, require_range};
use super::exchange_target::read_env;
use super::fields::join;
use super::fields::Fields;
use super::{ClientAuth, ConfigError, Env, Secret};

/// A validated introspection endpoint.
#[derive(Debug, Clone)]
pub struct Introspection {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub client_id: String,
    /// `client_secret_basic` or `client_secret_post`.
    pub client_auth: ClientAuth,
    pub client_secret: Secret,
    pub timeout: Duration,
    /// An answer is reused until the token's `exp`, never longer than this: a revoked token
    /// stays accepted at most this long (RFC 7662 §4).
    pub cache_max_seconds: i64,
}

/// `introspection` as written.
#[derive(Debug)]
pub struct IntrospectionConfig {
    cluster: String,
    path: String,
    authority: Option<String>,
    client_id: Option<String>,
    client_auth: ClientAuth,
    client_secret_env: Option<String>,
    timeout_ms: u64,
    cache_max_seconds: u64,
}

impl IntrospectionConfig {
    const FIELDS: &'static [&'static str] = &[
        "cluster",
        "path",
        "authority",
        "client_id",
        "client_auth",
        "client_secret_env",
        "timeout_ms",
        "cache_max_seconds",
    ];

    pub(super) fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            cluster: f.required("cluster")?,
            path: f.required("path")?,
            authority: f.optional("authority")?,
            client_id: f.optional("client_id")?,
            client_auth: f.or_default("client_auth")?,
            client_secret_env: f.optional("client_secret_env")?,
            timeout_ms: f.or_else("timeout_ms", || 5_000)?,
            cache_max_seconds: f.or_else("cache_max_seconds", || 60)?,
        })
    }

    /// The section at `field` (`providers.okta.introspection`).
    pub(super) fn validate(self, field: &str, env: Env<'_>) -> Result<Introspection, ConfigError> {
        let at = |name: &str| join(field, name);
        require_non_empty(&at("cluster"), &self.cluster)?;
        require_path(&at("path"), &self.path)?;
        let authority = self.authority.unwrap_or_else(|| self.cluster.clone());
        require_header_value(&at("authority"), &authority)?;
        let no_credentials = |name: &str| {
            ConfigError::new(
                &at(name),
                "is required: the introspection endpoint must authenticate the gateway (RFC 7662 §2.1)",
            )
        };
        let client_id = self.client_id.ok_or_else(|| no_credentials("client_id"))?;
        require_non_empty(&at("client_id"), &client_id)?;
        require_header_value(&at("client_id"), &client_id)?;
        if self.client_auth == ClientAuth::PrivateKeyJwt {
            return Err(ConfigError::new(
                &at("client_auth"),
                "expected `client_secret_basic` or `client_secret_post`",
            ));
        }
        let secret_field = at("client_secret_env");
        let secret = read_env(&secret_field, self.client_secret_env.as_deref(), env)?
            .map(Secret::new)
            .ok_or_else(|| no_credentials("client_secret_env"))?;
        require_range(&at("timeout_ms"), self.timeout_ms, 1, 60_000)?;
        require_range(&at("cache_max_seconds"), self.cache_max_seconds, 1, 3600)?;
        Ok(Introspection {
            cluster: self.cluster,
            path: self.path,
            authority,
            client_id,
            client_auth: self.client_auth,
            client_secret: secret,
            timeout: Duration::from_millis(self.timeout_ms),
            cache_max_seconds: self.cache_max_seconds as i64,
        })
    }
}
