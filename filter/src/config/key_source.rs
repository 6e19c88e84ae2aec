//! The `jwks` section: where the inbound issuer's signing keys come from, a JWK Set in the
//! document or one fetched from an Envoy cluster.

use std::time::Duration;

use serde_json::Value;

use super::checks::{require_header_value, require_non_empty, require_path, require_range};
use super::{ConfigError, JwksConfig, KeySource, RemoteJwks};
use crate::jwks::KeySet;

impl JwksConfig {
    pub(super) fn validate(mut self) -> Result<KeySource, ConfigError> {
        match (self.inline.take(), self.cluster.take()) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "jwks",
                "set either `inline` or `cluster`/`path`, not both",
            )),
            (None, None) => Err(ConfigError::new(
                "jwks",
                "set `inline` (a JWK Set) or `cluster` and `path` (where to fetch it)",
            )),
            (Some(inline), None) => inline_keys(inline).map(KeySource::Inline),
            (None, Some(cluster)) => self.remote(cluster).map(KeySource::Remote),
        }
    }

    fn remote(self, cluster: String) -> Result<RemoteJwks, ConfigError> {
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
fn inline_keys(inline: Value) -> Result<KeySet, ConfigError> {
    let doc = match inline {
        Value::String(s) => s.into_bytes(),
        other => serde_json::to_vec(&other)
            .map_err(|e| ConfigError::new("jwks.inline", e.to_string()))?,
    };
    let parsed = KeySet::parse(&doc).map_err(|e| ConfigError::new("jwks.inline", e.to_string()))?;
    if parsed.keys.is_empty() {
        return Err(ConfigError::new(
            "jwks.inline",
            "holds no usable signing key",
        ));
    }
    Ok(parsed)
}
