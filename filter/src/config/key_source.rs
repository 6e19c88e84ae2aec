//! The `jwks` section: where the inbound issuer's signing keys come from, a JWK Set in the
//! document or one fetched from an Envoy cluster.

use std::time::Duration;

use serde_json::Value;

use super::checks::{require_header_value, require_non_empty, require_path, require_range};
use super::fields::join;
use super::{ConfigError, JwksConfig, KeySource, RemoteJwks};
use crate::jwks::KeySet;

impl JwksConfig {
    /// The section at `field` (`jwks`, `providers.okta.jwks`).
    pub(super) fn validate(mut self, field: &str) -> Result<KeySource, ConfigError> {
        match (self.inline.take(), self.cluster.take()) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                field,
                "set either `inline` or `cluster`/`path`, not both",
            )),
            (None, None) => Err(ConfigError::new(
                field,
                "set `inline` (a JWK Set) or `cluster` and `path` (where to fetch it)",
            )),
            (Some(inline), None) => {
                inline_keys(&join(field, "inline"), inline).map(KeySource::Inline)
            }
            (None, Some(cluster)) => self.remote(field, cluster).map(KeySource::Remote),
        }
    }

    fn remote(self, field: &str, cluster: String) -> Result<RemoteJwks, ConfigError> {
        let at = |name: &str| join(field, name);
        require_non_empty(&at("cluster"), &cluster)?;
        let path = self
            .path
            .ok_or_else(|| ConfigError::new(&at("path"), "is required with `cluster`"))?;
        require_path(&at("path"), &path)?;
        let authority = self.authority.unwrap_or_else(|| cluster.clone());
        require_non_empty(&at("authority"), &authority)?;
        require_header_value(&at("authority"), &authority)?;
        require_range(
            &at("refresh_interval_seconds"),
            self.refresh_interval_seconds,
            1,
            7 * 24 * 3600,
        )?;
        require_range(
            &at("min_refetch_interval_seconds"),
            self.min_refetch_interval_seconds,
            0,
            24 * 3600,
        )?;
        require_range(&at("timeout_ms"), self.timeout_ms, 1, 60_000)?;
        require_range(&at("max_wait_ms"), self.max_wait_ms, 0, 60_000)?;
        Ok(RemoteJwks {
            cluster,
            path,
            authority,
            refresh_interval: Duration::from_secs(self.refresh_interval_seconds),
            min_refetch_interval: Duration::from_secs(self.min_refetch_interval_seconds),
            timeout: Duration::from_millis(self.timeout_ms),
            max_wait: Duration::from_millis(self.max_wait_ms),
        })
    }
}

/// A set with no key the verifier can use would refuse every token: refused at load instead.
fn inline_keys(field: &str, inline: Value) -> Result<KeySet, ConfigError> {
    let doc = match inline {
        Value::String(s) => s.into_bytes(),
        other => serde_json::to_vec(&other).map_err(|e| ConfigError::new(field, e.to_string()))?,
    };
    let parsed = KeySet::parse(&doc).map_err(|e| ConfigError::new(field, e.to_string()))?;
    if parsed.keys.is_empty() {
        return Err(ConfigError::new(field, "holds no usable signing key"));
    }
    Ok(parsed)
}
