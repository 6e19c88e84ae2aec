//! The document → [`Policy`]: each section is checked by its own function. Only the first error
//! reaches the operator, so the sections run in a fixed order: providers (issuers, audiences, keys), inbound token rules, published
//! fields, `mcp`, `identity_headers`, `mode` and `exchange`, then the routes.

use serde_json::{Map, Value};

use super::checks::{require_quotable, require_range, require_scopes, split_url};
use super::exchange_target::{default_exchange, DefaultExchange};
use super::identity_headers::identity_headers;
use super::routes::{configured_routes, single_route, RouteDefaults, Routes};
use super::{
    ConfigError, Env, FilterConfig, InboundPolicy, McpConfig, McpPolicy, Mode, Policy, RouteConfig,
};

impl FilterConfig {
    pub(super) fn validate(mut self, env: Env<'_>) -> Result<Policy, ConfigError> {
        let providers = self.take_providers(env)?;
        let inbound = self.inbound_policy()?;
        self.check_published_fields()?;
        let mcp = self.mcp.validate()?;
        let identity_headers = identity_headers(&self.identity_headers)?;
        let exchange = exchange_for_mode(self.mode, self.exchange, self.forward_token, env)?;
        let exchange_cache_slots = exchange.as_ref().map_or(0, |e| e.target.cache_max_entries);
        let fleet_store = match self.fleet_store {
            Some(_) if exchange.is_none() => {
                return Err(ConfigError::new(
                    "fleet_store",
                    "shares exchanged tokens, so it needs mode \"exchange\"",
                ))
            }
            Some(f) => Some(std::rc::Rc::new(f.validate(env)?)),
            None => None,
        };
        let defaults = RouteDefaults {
            providers: &providers,
            required_scopes: self.required_scopes,
            realm: self.realm,
            authorization_servers: self.authorization_servers,
            resource_name: self.resource_name,
            resource_documentation: self.resource_documentation,
            exchange,
        };
        let Routes {
            routes,
            default_metadata,
        } = routes(
            self.routes,
            self.resource,
            self.resource_metadata_url,
            &defaults,
            env,
        )?;
        Ok(Policy {
            inbound,
            providers,
            routes,
            unmatched: self.unmatched,
            identity_headers,
            audit_log: self.audit_log,
            forward_token: self.forward_token,
            mcp,
            exchange_cache_slots,
            default_metadata,
            fleet_store,
        })
    }

    /// `required_scopes` is checked with the inbound rules: it is the default every route
    /// starts from.
    fn inbound_policy(&self) -> Result<InboundPolicy, ConfigError> {
        require_scopes("required_scopes", &self.required_scopes)?;
        require_range("clock_skew_seconds", self.clock_skew_seconds, 0, 600)?;
        require_range(
            "max_token_bytes",
            self.max_token_bytes as u64,
            256,
            64 * 1024,
        )?;
        require_range(
            "verified_cache_max_entries",
            self.verified_cache_max_entries as u64,
            0,
            1_000_000,
        )?;
        Ok(InboundPolicy {
            clock_skew_seconds: self.clock_skew_seconds as i64,
            max_token_bytes: self.max_token_bytes,
            verified_cache_max_entries: self.verified_cache_max_entries,
        })
    }

    /// Top-level values that challenges quote and metadata documents carry.
    fn check_published_fields(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("realm", &self.realm),
            ("resource_metadata_url", &self.resource_metadata_url),
            ("resource_name", &self.resource_name),
            ("resource_documentation", &self.resource_documentation),
        ] {
            if let Some(v) = value {
                require_quotable(field, v)?;
            }
        }
        for (i, a) in self.authorization_servers.iter().enumerate() {
            split_url(&format!("authorization_servers[{i}]"), a)?;
        }
        Ok(())
    }
}

impl McpConfig {
    fn validate(&self) -> Result<McpPolicy, ConfigError> {
        require_range(
            "mcp.max_body_bytes",
            self.max_body_bytes as u64,
            1024,
            16 * 1024 * 1024,
        )?;
        Ok(McpPolicy {
            max_body_bytes: self.max_body_bytes,
        })
    }
}

/// `exchange` is required in exchange mode and refused in `validate_only` mode, the only mode
/// where `forward_token` applies. `None` in `validate_only` mode.
fn exchange_for_mode(
    mode: Mode,
    exchange: Option<Map<String, Value>>,
    forward_token: bool,
    env: Env<'_>,
) -> Result<Option<DefaultExchange>, ConfigError> {
    match (mode, &exchange) {
        (Mode::Exchange, None) => {
            return Err(ConfigError::new(
                "exchange",
                "is required (or set `mode: validate_only` to validate without exchanging)",
            ))
        }
        (Mode::ValidateOnly, Some(_)) => {
            return Err(ConfigError::new(
                "exchange",
                "must not be set with `mode: validate_only`",
            ))
        }
        _ => {}
    }
    if forward_token && mode != Mode::ValidateOnly {
        return Err(ConfigError::new(
            "forward_token",
            "only applies to `mode: validate_only`; in exchange mode the client's token never goes upstream",
        ));
    }
    exchange.map(|raw| default_exchange(raw, env)).transpose()
}

/// `routes`, or without them one route for every path from the top-level `resource`.
fn routes(
    configs: Vec<RouteConfig>,
    resource: Option<String>,
    resource_metadata_url: Option<String>,
    defaults: &RouteDefaults<'_>,
    env: Env<'_>,
) -> Result<Routes, ConfigError> {
    if configs.is_empty() {
        return single_route(resource.as_deref(), resource_metadata_url, defaults);
    }
    if resource.is_some() {
        return Err(ConfigError::new(
            "resource",
            "with `routes`, set `resource` on each route instead",
        ));
    }
    configured_routes(configs, defaults, env)
}
