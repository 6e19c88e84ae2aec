//! The inbound token providers (`providers`, like `jwt_authn`'s): each an issuer with its keys,
//! audiences and claim rules. Without `providers`, the top-level `issuer`, `audiences` and `jwks`
//! are the one provider, named `default`, so single-issuer documents keep their meaning.

use serde_json::Value;

use super::checks::{require_audiences, require_header_value, require_non_empty};
use super::document::{FilterConfig, JwksConfig};
use super::fields::{join, object, strings, Fields};
use super::{ConfigError, Provider, ProviderSet, MAX_PROVIDERS};

/// One entry of `providers` as written.
#[derive(Debug)]
pub struct ProviderConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksConfig,
}

impl ProviderConfig {
    const FIELDS: &'static [&'static str] = &["issuer", "audiences", "jwks"];

    fn read(path: String, v: Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(path, v, Self::FIELDS)?;
        Ok(Self {
            issuer: f.required("issuer")?,
            audiences: {
                let (path, v) = f.take_required("audiences")?;
                strings(&path, v)?
            },
            jwks: {
                let (path, v) = f.take_required("jwks")?;
                JwksConfig::read(path, v)?
            },
        })
    }
}

/// `providers` as written: name → provider, sorted by name (the order of `Policy::providers`,
/// whose indexes routes' provider sets hold).
pub(super) fn read_providers(
    path: &str,
    v: Value,
) -> Result<Vec<(String, ProviderConfig)>, ConfigError> {
    object(path, v)?
        .into_iter()
        .map(|(name, v)| {
            let provider = ProviderConfig::read(join(path, &name), v)?;
            Ok((name, provider))
        })
        .collect()
}

impl FilterConfig {
    /// The validated providers: `providers`, or the top-level single-issuer fields as one.
    /// Consumes the fields it validates (`jwks`, `providers`).
    pub(super) fn take_providers(&mut self) -> Result<Vec<Provider>, ConfigError> {
        match self.providers.take() {
            Some(configs) => self.named_providers(configs),
            None => self.top_level_provider().map(|p| vec![p]),
        }
    }

    fn top_level_provider(&mut self) -> Result<Provider, ConfigError> {
        let Some(issuer) = self.issuer.take() else {
            return Err(ConfigError::new("", "missing field `issuer`"));
        };
        let Some(audiences) = self.audiences.take() else {
            return Err(ConfigError::new("", "missing field `audiences`"));
        };
        let Some(jwks) = self.jwks.take() else {
            return Err(ConfigError::new("", "missing field `jwks`"));
        };
        validate_provider("", "default".into(), issuer, audiences, jwks)
    }

    fn named_providers(
        &mut self,
        configs: Vec<(String, ProviderConfig)>,
    ) -> Result<Vec<Provider>, ConfigError> {
        // With `providers`, the top-level single-issuer fields would be a second, unnamed
        // provider: which one applies would be a guess.
        for (field, set) in [
            ("issuer", self.issuer.is_some()),
            ("audiences", self.audiences.is_some()),
            ("jwks", self.jwks.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(
                    field,
                    "must not be set with `providers`; set it in each provider",
                ));
            }
        }
        if configs.is_empty() {
            return Err(ConfigError::new(
                "providers",
                "must name at least one provider",
            ));
        }
        if configs.len() > MAX_PROVIDERS {
            return Err(ConfigError::new(
                "providers",
                format!("at most {MAX_PROVIDERS} providers are supported"),
            ));
        }
        let mut providers: Vec<Provider> = Vec::with_capacity(configs.len());
        for (name, config) in configs {
            let field = join("providers", &name);
            require_non_empty(&field, &name)?;
            let provider =
                validate_provider(&field, name, config.issuer, config.audiences, config.jwks)?;
            // The token's `iss` picks its provider: two with one issuer make that ambiguous.
            if let Some(other) = providers.iter().find(|p| p.issuer == provider.issuer) {
                return Err(ConfigError::new(
                    &join(&field, "issuer"),
                    format!("is also the issuer of provider `{}`", other.name),
                ));
            }
            providers.push(provider);
        }
        Ok(providers)
    }
}

/// One provider at `field` (`providers.okta`, or `` for the top-level fields).
fn validate_provider(
    field: &str,
    name: String,
    issuer: String,
    audiences: Vec<String>,
    jwks: JwksConfig,
) -> Result<Provider, ConfigError> {
    let issuer_field = join(field, "issuer");
    require_non_empty(&issuer_field, &issuer)?;
    require_header_value(&issuer_field, &issuer)?;
    require_audiences(&join(field, "audiences"), &audiences)?;
    let keys = jwks.validate(&join(field, "jwks"))?;
    Ok(Provider {
        name,
        issuer,
        audiences,
        keys,
    })
}

/// A route's `providers` (names) as the set of provider indexes it accepts; absent: all.
pub(super) fn route_providers(
    field: &str,
    names: Option<Vec<String>>,
    providers: &[Provider],
) -> Result<ProviderSet, ConfigError> {
    let Some(names) = names else {
        return Ok(ProviderSet::all(providers.len()));
    };
    if names.is_empty() {
        return Err(ConfigError::new(
            field,
            "must name at least one provider (leave it out to accept every provider)",
        ));
    }
    let mut set = ProviderSet::NONE;
    for (i, name) in names.iter().enumerate() {
        let Some(index) = providers.iter().position(|p| &p.name == name) else {
            let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
            return Err(ConfigError::new(
                &format!("{field}[{i}]"),
                format!("names no provider (known: {})", known.join(", ")),
            ));
        };
        set = set.with(index);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::config::{parse_policy, ConfigError, KeySource, Policy};
    use crate::request_path::normalize;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cret".to_string())
    }

    fn parse(v: &Value) -> Result<Policy, ConfigError> {
        parse_policy(v.to_string().as_bytes(), &env)
    }

    fn two() -> Value {
        json!({
            "providers": {
                "okta": {"issuer": "https://okta.example.com/oauth2/mcp", "audiences": ["mcpserver"],
                         "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys"}},
                "entra": {"issuer": "https://login.microsoftonline.com/t/v2.0",
                          "audiences": ["api://mcp"],
                          "jwks": {"cluster": "entra", "path": "/t/discovery/v2.0/keys"}}
            },
            "exchange": {"cluster": "okta", "path": "/oauth2/backend/v1/token",
                         "authority": "okta.example.com", "client_id": "gw",
                         "client_secret_env": "SECRET", "audience": "backend"},
            "routes": [
                {"path_prefix": "/mcp", "providers": ["okta"], "resource": "https://gw/mcp"},
                {"path_prefix": "/any", "resource": "https://gw/any"}
            ]
        })
    }

    #[test]
    fn the_single_issuer_document_is_one_provider_named_default() {
        let v = json!({
            "issuer": "https://okta.example.com/oauth2/mcp", "audiences": ["mcpserver"],
            "jwks": {"cluster": "okta", "path": "/k"}, "mode": "validate_only"
        });
        let p = parse(&v).unwrap();
        assert_eq!(p.providers.len(), 1);
        assert_eq!(p.providers[0].name, "default");
        assert_eq!(p.providers[0].audiences, vec!["mcpserver"]);
        assert!(p.routes[0].providers.contains(0));
        assert!(p.routes[0].audiences.is_none(), "the provider's apply");
        assert_eq!(
            p.accepted_audiences(&p.routes[0], 0),
            ["mcpserver".to_string()]
        );
        assert_eq!(
            p.provider_for_issuer("https://okta.example.com/oauth2/mcp"),
            Some(0)
        );
        assert_eq!(
            p.provider_for_issuer("https://okta.example.com/oauth2/mcp/"),
            None
        );
    }

    #[test]
    fn routes_accept_the_providers_they_name_or_all() {
        let p = parse(&two()).unwrap();
        let entra = p
            .provider_for_issuer("https://login.microsoftonline.com/t/v2.0")
            .unwrap();
        let okta = p
            .provider_for_issuer("https://okta.example.com/oauth2/mcp")
            .unwrap();
        assert_ne!(okta, entra);
        let route =
            |path: &str| &p.routes[p.route_index(&normalize(path.as_bytes()).unwrap()).unwrap()];
        assert!(route("/mcp").providers.contains(okta));
        assert!(!route("/mcp").providers.contains(entra));
        assert!(route("/any").providers.contains(okta) && route("/any").providers.contains(entra));
        match &p.providers[usize::from(entra)].keys {
            KeySource::Remote(r) => assert_eq!(r.path, "/t/discovery/v2.0/keys"),
            KeySource::Inline(_) => panic!("remote keys expected"),
        }
    }

    #[test]
    fn metadata_lists_the_issuers_of_the_routes_providers() {
        let p = parse(&two()).unwrap();
        let servers = |path: &str| -> Value {
            let m = p
                .metadata_for(&normalize(path.as_bytes()).unwrap())
                .unwrap();
            serde_json::from_str::<Value>(&m.document).unwrap()["authorization_servers"].clone()
        };
        assert_eq!(
            servers("/.well-known/oauth-protected-resource/mcp"),
            json!(["https://okta.example.com/oauth2/mcp"])
        );
        let any = servers("/.well-known/oauth-protected-resource/any");
        assert_eq!(any.as_array().map(Vec::len), Some(2), "{any}");
    }

    #[test]
    fn bad_provider_configurations_name_their_field() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            // Providers are checked in name order: `okta`'s issuer is the second.
            (
                "providers.okta.issuer",
                Box::new(|v| {
                    v["providers"]["entra"]["issuer"] = json!("https://okta.example.com/oauth2/mcp")
                }),
            ),
            (
                "routes[0].providers[1]",
                Box::new(|v| v["routes"][0]["providers"] = json!(["okta", "auth0"])),
            ),
            (
                "routes[0].providers",
                Box::new(|v| v["routes"][0]["providers"] = json!([])),
            ),
            ("issuer", Box::new(|v| v["issuer"] = json!("https://x"))),
            ("audiences", Box::new(|v| v["audiences"] = json!(["x"]))),
            (
                "jwks",
                Box::new(|v| v["jwks"] = json!({"cluster": "c", "path": "/k"})),
            ),
            ("providers", Box::new(|v| v["providers"] = json!({}))),
            ("providers", Box::new(|v| v["providers"] = json!(["okta"]))),
            (
                "providers.okta.audiences",
                Box::new(|v| v["providers"]["okta"]["audiences"] = json!([])),
            ),
            (
                "providers.okta.jwks.path",
                Box::new(|v| v["providers"]["okta"]["jwks"]["path"] = json!("keys")),
            ),
            (
                "providers.okta.jwks.inline",
                Box::new(|v| {
                    v["providers"]["okta"]["jwks"] = json!({"inline": {"keys": []}});
                }),
            ),
            (
                "providers.okta.issuer",
                Box::new(|v| v["providers"]["okta"]["issuer"] = json!("")),
            ),
            (
                "providers.okta.isuer",
                Box::new(|v| v["providers"]["okta"]["isuer"] = json!("x")),
            ),
            (
                "providers.",
                Box::new(|v| {
                    v["providers"][""] = json!({"issuer": "https://z", "audiences": ["z"],
                                                "jwks": {"cluster": "c", "path": "/k"}});
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut v = two();
            mutate(&mut v);
            let e = parse(&v).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn at_most_max_providers() {
        let mut v = two();
        let many: serde_json::Map<String, Value> = (0..=crate::config::MAX_PROVIDERS)
            .map(|i| {
                (
                    format!("p{i}"),
                    json!({"issuer": format!("https://idp{i}"), "audiences": ["a"],
                           "jwks": {"cluster": "c", "path": "/k"}}),
                )
            })
            .collect();
        v["providers"] = Value::Object(many);
        v["routes"][0]["providers"] = json!(["p0"]);
        assert_eq!(parse(&v).unwrap_err().field, "providers");
    }
}
