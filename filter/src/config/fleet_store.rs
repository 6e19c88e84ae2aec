//! `fleet_store`: the exchange cache shared by every Envoy of a fleet, on etcd (optional).
//!
//! Read here and checked in full: what reaches the filter is a [`FleetStorePolicy`] with the
//! derived keys, never the raw secret.

use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use super::checks::{require_header_value, require_non_empty, require_range};
use super::exchange_target::read_env;
use super::fields::{join, Fields};
use super::{ConfigError, Env};
use crate::fleet::seal::{StoreKeys, MIN_SECRET_BYTES};

/// The section as the operator writes it.
#[derive(Debug)]
pub struct FleetStoreConfig {
    path: String,
    cluster: String,
    authority: Option<String>,
    timeout_ms: u64,
    prefix: String,
    key_id: String,
    secret_env: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
}

/// What the filter uses.
pub struct FleetStorePolicy {
    pub cluster: String,
    pub authority: String,
    /// Each call to etcd; past it the store counts as failed for this request, which then
    /// exchanges directly.
    pub timeout: Duration,
    /// Prefix of every key, with the key id: `{prefix}{key_id}/`.
    pub key_prefix: String,
    pub keys: StoreKeys,
    pub credentials: Option<Rc<EtcdCredentials>>,
}

pub struct EtcdCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for FleetStorePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys or the password.
        f.debug_struct("FleetStorePolicy")
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

mod defaults {
    pub fn timeout_ms() -> u64 {
        // etcd answers a loopback read in ~0.5 ms (p99 ~2 ms) and a quorum write within a few
        // ms in one region: 250 ms is far above a healthy store and still below the cost of an
        // IdP exchange, which a failed lookup falls back to.
        250
    }
    pub fn prefix() -> String {
        "/mcp-token-exchange/".into()
    }
    pub fn key_id() -> String {
        "1".into()
    }
}

impl FleetStoreConfig {
    const FIELDS: &'static [&'static str] = &[
        "cluster",
        "authority",
        "timeout_ms",
        "prefix",
        "key_id",
        "secret_env",
        "username",
        "password_env",
    ];

    pub fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path.clone(), v, Self::FIELDS)?;
        Ok(Self {
            cluster: f.required("cluster")?,
            authority: f.optional("authority")?,
            timeout_ms: f.or_else("timeout_ms", defaults::timeout_ms)?,
            prefix: f.or_else("prefix", defaults::prefix)?,
            key_id: f.or_else("key_id", defaults::key_id)?,
            secret_env: f.optional("secret_env")?,
            username: f.optional("username")?,
            password_env: f.optional("password_env")?,
            path,
        })
    }

    pub fn validate(self, env: Env<'_>) -> Result<FleetStorePolicy, ConfigError> {
        let field = |name: &str| join(&self.path, name);
        require_non_empty(&field("cluster"), &self.cluster)?;
        let authority = self.authority.unwrap_or_else(|| self.cluster.clone());
        require_header_value(&field("authority"), &authority)?;
        require_range(&field("timeout_ms"), self.timeout_ms, 10, 5_000)?;
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(ConfigError::new(
                &field("prefix"),
                "must start and end with '/' (e.g. \"/mcp-token-exchange/\")",
            ));
        }
        require_printable(&field("prefix"), &self.prefix, 128)?;
        require_printable(&field("key_id"), &self.key_id, 64)?;
        if self.key_id.contains('/') {
            return Err(ConfigError::new(&field("key_id"), "must not contain '/'"));
        }
        let secret = read_env(&field("secret_env"), self.secret_env.as_deref(), env)?
            .ok_or_else(|| {
                ConfigError::new(
                &field("secret_env"),
                    "is required: the environment variable holding the store key (at least 32 bytes, e.g. `openssl rand -base64 32`)",
                )
            })?;
        let keys = StoreKeys::derive(&self.key_id, secret.as_bytes()).ok_or_else(|| {
            ConfigError::new(
                &field("secret_env"),
                format!(
                    "the store key is {} bytes; at least {MIN_SECRET_BYTES} are required (e.g. `openssl rand -base64 32`)",
                    secret.len()
                ),
            )
        })?;
        let credentials = match (self.username, self.password_env.as_deref()) {
            (None, None) => None,
            (Some(username), Some(_)) => {
                require_printable(&field("username"), &username, 128)?;
                let password = read_env(&field("password_env"), self.password_env.as_deref(), env)?
                    .unwrap_or_default();
                Some(Rc::new(EtcdCredentials { username, password }))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    &field("password_env"),
                    "is required with username",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    &field("username"),
                    "is required with password_env",
                ))
            }
        };
        Ok(FleetStorePolicy {
            cluster: self.cluster,
            authority,
            timeout: Duration::from_millis(self.timeout_ms),
            key_prefix: format!("{}{}/", self.prefix, self.key_id),
            keys,
            credentials,
        })
    }
}

fn require_printable(field: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    require_non_empty(field, value)?;
    if value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            format!("must be 1 to {max} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGhlLWZsZWV0LXN0b3JlLXRlc3Rz";

    fn env(name: &str) -> Option<String> {
        match name {
            "STORE_KEY" => Some(KEY.into()),
            "SHORT_KEY" => Some("too-short".into()),
            "ETCD_PASSWORD" => Some("pw".into()),
            _ => None,
        }
    }

    fn check(v: Value) -> Result<FleetStorePolicy, ConfigError> {
        FleetStoreConfig::read("fleet_store".into(), v)?.validate(&env)
    }

    fn base() -> Value {
        json!({"cluster": "etcd", "secret_env": "STORE_KEY"})
    }

    #[test]
    fn defaults() {
        let p = check(base()).unwrap();
        assert_eq!(p.authority, "etcd");
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(p.key_prefix, "/mcp-token-exchange/1/");
        assert!(p.credentials.is_none());
        assert!(!format!("{p:?}").contains(KEY));
    }

    #[test]
    fn bad_input_is_refused_with_the_field_named() {
        let cases: Vec<(&str, Value)> = vec![
            ("fleet_store.secret_env", json!({"cluster": "etcd"})),
            (
                "fleet_store.secret_env",
                json!({"cluster": "etcd", "secret_env": "SHORT_KEY"}),
            ),
            (
                "fleet_store.secret_env",
                json!({"cluster": "etcd", "secret_env": "UNSET"}),
            ),
            // A missing field is reported on its object, by name ("missing field `cluster`").
            ("fleet_store", json!({"secret_env": "STORE_KEY"})),
            (
                "fleet_store.cluster",
                json!({"cluster": "", "secret_env": "STORE_KEY"}),
            ),
            (
                "fleet_store.timeout_ms",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "timeout_ms": 0}),
            ),
            (
                "fleet_store.prefix",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "prefix": "cache"}),
            ),
            (
                "fleet_store.key_id",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "key_id": "a/b"}),
            ),
            (
                "fleet_store.password_env",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "username": "envoy"}),
            ),
            (
                "fleet_store.username",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "password_env": "ETCD_PASSWORD"}),
            ),
            (
                "fleet_store.bogus",
                json!({"cluster": "etcd", "secret_env": "STORE_KEY", "bogus": 1}),
            ),
        ];
        for (field, v) in cases {
            let e = check(v.clone())
                .err()
                .unwrap_or_else(|| panic!("{v} accepted"));
            assert_eq!(e.field, field, "{v}: {e}");
        }
        let short = check(json!({"cluster": "etcd", "secret_env": "SHORT_KEY"}))
            .err()
            .unwrap();
        assert!(short.to_string().contains("at least 32"), "{short}");
        assert!(!short.to_string().contains("too-short"), "{short}");
    }

    #[test]
    fn credentials_come_from_the_environment() {
        let mut v = base();
        v["username"] = json!("envoy");
        v["password_env"] = json!("ETCD_PASSWORD");
        let p = check(v).unwrap();
        let c = p.credentials.unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("envoy", "pw"));
    }
}
