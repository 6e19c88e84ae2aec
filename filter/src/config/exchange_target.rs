//! The `exchange` section and a route's `exchange` overrides: where and how the backend token is
//! obtained, with the client credentials taken from the VM's environment.

use std::rc::Rc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::checks::{
    require_header_value, require_non_empty, require_path, require_quotable, require_range,
    require_scope_list,
};
use super::fields::join;
use super::{
    ClientAuth, ConfigError, Env, ExchangeConfig, ExchangeProfile, ExchangeTarget, Secret,
};
use crate::client_key::ClientKey;

/// The top-level `exchange`: its validated target, and the raw object that route overrides are
/// merged over (a route may change single fields, and the merge is validated as a whole).
pub(super) struct DefaultExchange {
    pub raw: Map<String, Value>,
    pub target: Rc<ExchangeTarget>,
}

pub(super) fn default_exchange(
    raw: Map<String, Value>,
    env: Env<'_>,
) -> Result<DefaultExchange, ConfigError> {
    let target = Rc::new(parse_exchange("exchange", raw.clone(), env)?);
    Ok(DefaultExchange { raw, target })
}

/// A route's target: the default one, or the default with the route's `exchange` fields merged
/// over it. `default` is `None` in `validate_only` mode, where a route may not ask for one.
pub(super) fn route_exchange(
    field: &str,
    overrides: Option<Map<String, Value>>,
    default: Option<&DefaultExchange>,
    env: Env<'_>,
) -> Result<Option<Rc<ExchangeTarget>>, ConfigError> {
    match (overrides, default) {
        (None, default) => Ok(default.map(|d| Rc::clone(&d.target))),
        (Some(_), None) => Err(ConfigError::new(
            field,
            "must not be set with `mode: validate_only`",
        )),
        (Some(overrides), Some(default)) => {
            let mut merged = default.raw.clone();
            merged.extend(overrides);
            Ok(Some(Rc::new(parse_exchange(field, merged, env)?)))
        }
    }
}

fn parse_exchange(
    field: &str,
    raw: Map<String, Value>,
    env: Env<'_>,
) -> Result<ExchangeTarget, ConfigError> {
    ExchangeConfig::read(field.to_string(), Value::Object(raw))?.validate(field, env)
}

/// What the gateway authenticates to the token endpoint with.
struct ClientCredentials {
    /// For the `client_secret_*` methods.
    secret: Option<Secret>,
    /// For `private_key_jwt` and actor tokens.
    key: Option<Rc<ClientKey>>,
}

impl ExchangeConfig {
    /// `prefix` is where this object sits in the document (`exchange`, `routes[0].exchange`).
    fn validate(self, prefix: &str, env: Env<'_>) -> Result<ExchangeTarget, ConfigError> {
        let profile = self.profile(prefix)?;
        self.check_endpoint(prefix)?;
        let credentials = self.client_credentials(prefix, env)?;
        let assertion_audience = self
            .client_assertion_audience
            .clone()
            .unwrap_or_else(|| format!("https://{}{}", self.authority, self.path));
        require_quotable(
            &join(prefix, "client_assertion_audience"),
            &assertion_audience,
        )?;
        match profile {
            ExchangeProfile::Rfc8693 => self.check_requested_token(prefix)?,
            ExchangeProfile::EntraObo => self.check_on_behalf_of(prefix)?,
        }
        self.check_limits(prefix)?;
        Ok(self.into_target(profile, credentials, assertion_audience))
    }

    fn profile(&self, prefix: &str) -> Result<ExchangeProfile, ConfigError> {
        match self.profile.as_deref() {
            None | Some("rfc8693") => Ok(ExchangeProfile::Rfc8693),
            Some("entra_obo") => Ok(ExchangeProfile::EntraObo),
            Some(_) => Err(ConfigError::new(
                &join(prefix, "profile"),
                "expected `rfc8693` or `entra_obo`",
            )),
        }
    }

    /// Entra ID's on-behalf-of request names the backend only by `scope`
    /// (`api://backend/.default`); the RFC 8693 fields have no place in it, and sending them
    /// would only hide a misconfiguration.
    fn check_on_behalf_of(&self, prefix: &str) -> Result<(), ConfigError> {
        let scope_field = join(prefix, "scope");
        let Some(scope) = &self.scope else {
            return Err(ConfigError::new(
                &scope_field,
                "is required with `profile: entra_obo` (e.g. `api://backend/.default`)",
            ));
        };
        require_scope_list(&scope_field, scope)?;
        for (name, set) in [
            ("audience", self.audience.is_some()),
            ("resource", self.resource.is_some()),
            ("requested_token_type", self.requested_token_type.is_some()),
            ("actor_token", self.actor_token),
        ] {
            if set {
                return Err(ConfigError::new(
                    &join(prefix, name),
                    "is not part of Entra ID's on-behalf-of request (`profile: entra_obo`); the backend is named by `scope`",
                ));
            }
        }
        Ok(())
    }

    /// The token endpoint and the gateway's client id, which go into request headers.
    fn check_endpoint(&self, prefix: &str) -> Result<(), ConfigError> {
        require_non_empty(&join(prefix, "cluster"), &self.cluster)?;
        require_path(&join(prefix, "path"), &self.path)?;
        let authority = join(prefix, "authority");
        require_non_empty(&authority, &self.authority)?;
        require_header_value(&authority, &self.authority)?;
        let client_id = join(prefix, "client_id");
        require_non_empty(&client_id, &self.client_id)?;
        require_header_value(&client_id, &self.client_id)
    }

    /// Reads the secret and the key the client authentication method and actor tokens need, so
    /// a missing one is a config error rather than a failure on every request.
    fn client_credentials(
        &self,
        prefix: &str,
        env: Env<'_>,
    ) -> Result<ClientCredentials, ConfigError> {
        let secret_field = join(prefix, "client_secret_env");
        let key_field = join(prefix, "client_private_key_env");
        let secret =
            read_env(&secret_field, self.client_secret_env.as_deref(), env)?.map(Secret::new);
        let key = match read_env(&key_field, self.client_private_key_env.as_deref(), env)? {
            Some(jwk) => Some(Rc::new(
                ClientKey::from_jwk(&jwk).map_err(|e| ConfigError::new(&key_field, e))?,
            )),
            None => None,
        };
        match self.client_auth {
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost if secret.is_none() => {
                return Err(ConfigError::new(
                    &secret_field,
                    "is required for client_secret_basic and client_secret_post",
                ))
            }
            ClientAuth::PrivateKeyJwt if key.is_none() => {
                return Err(ConfigError::new(
                    &key_field,
                    "is required for private_key_jwt",
                ))
            }
            _ => {}
        }
        if self.actor_token && key.is_none() {
            return Err(ConfigError::new(
                &key_field,
                "is required to sign actor tokens (`actor_token: true`)",
            ));
        }
        Ok(ClientCredentials { secret, key })
    }

    /// What the backend token is asked for.
    fn check_requested_token(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.audience.is_none() && self.resource.is_none() {
            return Err(ConfigError::new(
                &join(prefix, "audience"),
                "set `audience` or `resource`: the token endpoint must know which backend the token is for",
            ));
        }
        for (name, value) in [
            ("audience", &self.audience),
            ("resource", &self.resource),
            ("requested_token_type", &self.requested_token_type),
        ] {
            if let Some(v) = value {
                require_non_empty(&join(prefix, name), v)?;
            }
        }
        if let Some(scope) = &self.scope {
            require_scope_list(&join(prefix, "scope"), scope)?;
        }
        require_non_empty(
            &join(prefix, "subject_token_type"),
            &self.subject_token_type,
        )
    }

    fn check_limits(&self, prefix: &str) -> Result<(), ConfigError> {
        require_range(&join(prefix, "timeout_ms"), self.timeout_ms, 1, 60_000)?;
        require_range(
            &join(prefix, "cache_margin_seconds"),
            self.cache_margin_seconds,
            0,
            3600,
        )?;
        require_range(
            &join(prefix, "cache_max_entries"),
            self.cache_max_entries as u64,
            0,
            1_000_000,
        )
    }

    fn into_target(
        self,
        profile: ExchangeProfile,
        credentials: ClientCredentials,
        assertion_audience: String,
    ) -> ExchangeTarget {
        ExchangeTarget {
            profile,
            cluster: self.cluster,
            path: self.path,
            authority: self.authority,
            client_id: self.client_id,
            client_secret: credentials.secret,
            client_key: credentials.key,
            assertion_audience,
            actor_token: self.actor_token,
            client_auth: self.client_auth,
            audience: self.audience,
            scope: self.scope,
            resource: self.resource,
            subject_token_type: self.subject_token_type,
            requested_token_type: self.requested_token_type,
            timeout: Duration::from_millis(self.timeout_ms),
            cache_margin_seconds: self.cache_margin_seconds as i64,
            cache_max_entries: self.cache_max_entries,
            identity: String::new(),
        }
        .with_identity()
    }
}

/// The value of the environment variable named at `field`. Secrets live in the VM's environment
/// so that they never appear in the plugin configuration.
pub(super) fn read_env(
    field: &str,
    name: Option<&str>,
    env: Env<'_>,
) -> Result<Option<String>, ConfigError> {
    let Some(name) = name else { return Ok(None) };
    require_non_empty(field, name)?;
    match env(name) {
        Some(v) if !v.is_empty() => Ok(Some(v)),
        _ => Err(ConfigError::new(
            field,
            format!(
                "environment variable {name} is unset or empty in the Wasm VM (pass it with vm_config.environment_variables)"
            ),
        )),
    }
}
