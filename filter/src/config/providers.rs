//! The inbound token providers (`providers`, like `jwt_authn`'s): each an issuer with its keys,
//! audiences and claim rules. Without `providers`, the top-level `issuer`, `audiences` and `jwks`
//! are the one provider, named `default`, so single-issuer documents keep their meaning.

use serde_json::Value;

use super::checks::{require_audiences, require_header_value, require_non_empty};
use super::document::{FilterConfig, JwksConfig};
use super::fields::{join, list, object, strings, value, Fields};
use super::introspection::{Introspection, IntrospectionConfig};
use super::{ConfigError, Env, KeySource};

/// Most providers one configuration may have: a route's accepted providers are a bit set.
pub const MAX_PROVIDERS: usize = 32;

/// One issuer of inbound tokens: its keys, the audiences its tokens must carry (unless a route
/// sets its own), and how its claims are read.
#[derive(Debug, Clone)]
pub struct Provider {
    /// The key in `providers` (`default` for the top-level single-issuer fields).
    pub name: String,
    /// Exact `iss` of its tokens: what selects this provider.
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub claims: ClaimRules,
    /// RFC 7662 introspection of this provider's opaque tokens (at most one provider has it: an
    /// opaque token names no issuer).
    pub introspection: Option<Introspection>,
}

/// A claim that carries scopes, with the shapes its issuers write (see `claims`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeClaim {
    /// Okta: an array; Entra ID: a space-separated string.
    Scp,
    /// RFC 9068, Keycloak, Auth0: a space-separated string.
    Scope,
    /// Entra ID app roles: an array.
    Roles,
    /// Auth0 RBAC: an array.
    Permissions,
}

/// A claim that names the OAuth client the token was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdClaim {
    /// Okta.
    Cid,
    /// RFC 9068.
    ClientId,
    /// OIDC authorized party: Entra ID v2, Keycloak, Auth0.
    Azp,
    /// Entra ID v1.
    Appid,
}

/// A claim name in the configuration. Matched by hand rather than with `#[derive(Deserialize)]`:
/// serde's enum visitors cost the module kilobytes (see `fields`).
trait ClaimName: Sized + Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

impl ClaimName for ScopeClaim {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("scp", Self::Scp),
        ("scope", Self::Scope),
        ("roles", Self::Roles),
        ("permissions", Self::Permissions),
    ];
}

impl ClaimName for ClientIdClaim {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("cid", Self::Cid),
        ("client_id", Self::ClientId),
        ("azp", Self::Azp),
        ("appid", Self::Appid),
    ];
}

/// How one provider's tokens are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRules {
    /// The first listed claim present carries the token's scopes (Entra ID writes `scp` in
    /// delegated tokens and `roles` in app-only ones; Okta's `scp` wins over `scope` as before).
    pub scopes: Vec<ScopeClaim>,
    /// `scp` may also be Entra ID's space-separated string: only when the operator listed the
    /// scope claims (`claims.scopes`). Without them `scp` must be Okta's array, as it always had
    /// to be.
    pub scp_string: bool,
    /// The first listed claim present names the client.
    pub client_id: Vec<ClientIdClaim>,
    /// The JOSE header `typ` every token must have (lower case, without `application/`), e.g.
    /// `at+jwt` (RFC 9068 §2.1); `None`: not checked.
    pub typ: Option<String>,
}

impl Default for ClaimRules {
    /// Today's single-issuer reading: `scp` (array) else `scope`; the client from any of the four
    /// claims.
    fn default() -> Self {
        Self {
            scopes: vec![ScopeClaim::Scp, ScopeClaim::Scope],
            scp_string: false,
            client_id: vec![
                ClientIdClaim::Cid,
                ClientIdClaim::ClientId,
                ClientIdClaim::Azp,
                ClientIdClaim::Appid,
            ],
            typ: None,
        }
    }
}

/// The providers a route accepts, by index into [`Policy::providers`]: one bit test on the
/// cached path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderSet(u32);

impl ProviderSet {
    pub const NONE: Self = Self(0);

    /// The first `count` providers (at most [`MAX_PROVIDERS`]).
    pub fn all(count: usize) -> Self {
        Self((0..count.min(MAX_PROVIDERS)).fold(0, |bits, i| bits | 1 << i))
    }

    #[must_use]
    pub fn with(self, index: usize) -> Self {
        if index < MAX_PROVIDERS {
            Self(self.0 | 1 << index)
        } else {
            self
        }
    }

    pub fn contains(self, index: u8) -> bool {
        u32::from(index) < MAX_PROVIDERS as u32 && self.0 & (1 << index) != 0
    }

    pub fn indexes(self) -> impl Iterator<Item = usize> {
        (0..MAX_PROVIDERS).filter(move |i| self.0 & (1 << i) != 0)
    }
}

/// One entry of `providers` as written.
#[derive(Debug)]
pub struct ProviderConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksConfig,
    /// `claims`: which claims carry scopes and the client; absent: [`ClaimRules::default`].
    pub claims: ClaimRules,
    /// Required JOSE header `typ` (`at+jwt`).
    pub typ: Option<String>,
    pub introspection: Option<IntrospectionConfig>,
}

impl ProviderConfig {
    const FIELDS: &'static [&'static str] = &[
        "issuer",
        "audiences",
        "jwks",
        "claims",
        "typ",
        "introspection",
    ];
    const CLAIMS_FIELDS: &'static [&'static str] = &["scopes", "client_id"];

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
            claims: match f.take("claims") {
                Some((path, v)) => Self::read_claims(path, v)?,
                None => ClaimRules::default(),
            },
            typ: f.optional("typ")?,
            introspection: match f.take("introspection") {
                Some((path, v)) => Some(IntrospectionConfig::read(path, v)?),
                None => None,
            },
        })
    }

    /// `claims.scopes` and `claims.client_id`: lists of claim names the filter knows the shapes
    /// of; each absent list keeps its default.
    fn read_claims(path: String, v: Value) -> Result<ClaimRules, ConfigError> {
        let mut f = Fields::new(path, v, Self::CLAIMS_FIELDS)?;
        let defaults = ClaimRules::default();
        let scopes = claim_names(&mut f, "scopes")?;
        Ok(ClaimRules {
            scp_string: scopes.is_some(),
            scopes: scopes.unwrap_or(defaults.scopes),
            client_id: claim_names(&mut f, "client_id")?.unwrap_or(defaults.client_id),
            typ: None,
        })
    }
}

/// A non-empty list of claim names (`ScopeClaim`s or `ClientIdClaim`s); `None` when absent.
fn claim_names<T: ClaimName>(f: &mut Fields, name: &str) -> Result<Option<Vec<T>>, ConfigError> {
    let Some((path, v)) = f.take(name) else {
        return Ok(None);
    };
    let items = list(&path, v)?;
    if items.is_empty() {
        return Err(ConfigError::new(&path, "must name at least one claim"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("{path}[{i}]");
            let name: String = value(&field, v)?;
            T::NAMES
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, claim)| *claim)
                .ok_or_else(|| {
                    let known: Vec<&str> = T::NAMES.iter().map(|(n, _)| *n).collect();
                    ConfigError::new(
                        &field,
                        format!(
                            "is no claim the filter reads here (one of: {})",
                            known.join(", ")
                        ),
                    )
                })
        })
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
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
    pub(super) fn take_providers(&mut self, env: Env<'_>) -> Result<Vec<Provider>, ConfigError> {
        match self.providers.take() {
            Some(configs) => self.named_providers(configs, env),
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
        let config = ProviderConfig {
            issuer,
            audiences,
            jwks,
            claims: ClaimRules::default(),
            typ: None,
            introspection: None,
        };
        validate_provider("", "default".into(), config, &|_| None)
    }

    fn named_providers(
        &mut self,
        configs: Vec<(String, ProviderConfig)>,
        env: Env<'_>,
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
                "at most 32 providers are supported",
            ));
        }
        let mut providers: Vec<Provider> = Vec::with_capacity(configs.len());
        for (name, config) in configs {
            let field = join("providers", &name);
            require_non_empty(&field, &name)?;
            let provider = validate_provider(&field, name, config, env)?;
            if provider.introspection.is_some()
                && providers.iter().any(|p| p.introspection.is_some())
            {
                return Err(ConfigError::new(
                    &join(&field, "introspection"),
                    "another provider introspects already: an opaque token names no issuer, so one provider may",
                ));
            }
            // The token's `iss` picks its provider: two with one issuer make that ambiguous.
            if providers.iter().any(|p| p.issuer == provider.issuer) {
                return Err(ConfigError::new(
                    &join(&field, "issuer"),
                    "is another provider's issuer too: the token's iss must pick one provider",
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
    config: ProviderConfig,
    env: Env<'_>,
) -> Result<Provider, ConfigError> {
    let issuer_field = join(field, "issuer");
    require_non_empty(&issuer_field, &config.issuer)?;
    require_header_value(&issuer_field, &config.issuer)?;
    require_audiences(&join(field, "audiences"), &config.audiences)?;
    let keys = config.jwks.validate(&join(field, "jwks"))?;
    let mut claims = config.claims;
    claims.typ = match config.typ {
        Some(typ) => Some(media_type(&join(field, "typ"), &typ)?),
        None => None,
    };
    let introspection = match config.introspection {
        Some(i) => Some(i.validate(&join(field, "introspection"), env)?),
        None => None,
    };
    Ok(Provider {
        name,
        issuer: config.issuer,
        audiences: config.audiences,
        keys,
        claims,
        introspection,
    })
}

/// A `typ` as compared: lower case, without the `application/` prefix RFC 7515 §4.1.9 lets
/// senders leave out (`application/at+JWT` and `at+jwt` are one type).
pub(crate) fn media_type(field: &str, typ: &str) -> Result<String, ConfigError> {
    let lower = typ.to_ascii_lowercase();
    let short = lower.strip_prefix("application/").unwrap_or(&lower);
    if short.is_empty() || !short.bytes().all(|b| b.is_ascii_graphic()) || short.contains('/') {
        return Err(ConfigError::new(
            field,
            "must be a media type such as `at+jwt`",
        ));
    }
    Ok(short.to_string())
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
            return Err(ConfigError::new(
                &format!("{field}[{i}]"),
                "names no provider (a key of `providers`, or `default` without them)",
            ));
        };
        set = set.with(index);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::config::{parse_policy, ClientAuth, ConfigError, KeySource, Policy};
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
    fn claim_rules_and_typ_per_provider() {
        use crate::config::{ClaimRules, ClientIdClaim, ScopeClaim};
        let mut v = two();
        v["providers"]["entra"]["claims"] =
            json!({"scopes": ["scp", "roles"], "client_id": ["azp", "appid"]});
        v["providers"]["entra"]["typ"] = json!("Application/AT+JWT");
        let p = parse(&v).unwrap();
        let entra = p.providers.iter().find(|p| p.name == "entra").unwrap();
        assert_eq!(entra.claims.scopes, [ScopeClaim::Scp, ScopeClaim::Roles]);
        assert_eq!(
            entra.claims.client_id,
            [ClientIdClaim::Azp, ClientIdClaim::Appid]
        );
        assert_eq!(entra.claims.typ.as_deref(), Some("at+jwt"));
        let okta = p.providers.iter().find(|p| p.name == "okta").unwrap();
        assert_eq!(okta.claims, ClaimRules::default());

        let cases = [
            (
                "providers.okta.claims.scopes[1]",
                json!({"scopes": ["scp", "groups"]}),
            ),
            ("providers.okta.claims.scopes", json!({"scopes": []})),
            ("providers.okta.claims.scopes", json!({"scopes": "scp"})),
            (
                "providers.okta.claims.client_id[0]",
                json!({"client_id": ["sub"]}),
            ),
            ("providers.okta.claims.zz", json!({"zz": 1})),
            ("providers.okta.claims", json!(["scp"])),
        ];
        for (field, claims) in cases {
            let mut v = two();
            v["providers"]["okta"]["claims"] = claims;
            assert_eq!(parse(&v).expect_err(field).field, field);
        }
        for typ in [
            json!(""),
            json!("application/"),
            json!("at jwt"),
            json!("a/b/c"),
            json!(5),
        ] {
            let mut v = two();
            v["providers"]["okta"]["typ"] = typ.clone();
            assert_eq!(
                parse(&v).expect_err("typ").field,
                "providers.okta.typ",
                "{typ}"
            );
        }
    }

    /// Every build reads and keeps the section (it was a cargo feature, refused by the default
    /// module, while the size budget was 600 KiB).
    #[test]
    fn an_introspection_section_is_accepted_with_either_client_authentication() {
        for (auth, expected) in [
            ("client_secret_basic", ClientAuth::ClientSecretBasic),
            ("client_secret_post", ClientAuth::ClientSecretPost),
        ] {
            let mut v = two();
            v["providers"]["okta"]["introspection"] = json!({"cluster": "okta",
                "path": "/oauth2/mcp/v1/introspect", "authority": "idp.example",
                "client_id": "gw", "client_secret_env": "SECRET", "client_auth": auth,
                "timeout_ms": 750, "cache_max_seconds": 30});
            let p = parse(&v).expect(auth);
            let okta = p.providers.iter().find(|p| p.name == "okta").expect("okta");
            let i = okta.introspection.as_ref().expect("kept");
            assert_eq!(i.client_auth, expected);
            assert_eq!(
                (i.path.as_str(), i.authority.as_str()),
                ("/oauth2/mcp/v1/introspect", "idp.example")
            );
            assert_eq!((i.timeout.as_millis(), i.cache_max_seconds), (750, 30));
            let entra = p
                .providers
                .iter()
                .find(|p| p.name == "entra")
                .expect("entra");
            assert!(entra.introspection.is_none());
        }
    }

    #[test]
    fn introspection_needs_client_credentials_and_one_provider() {
        let intro = json!({"cluster": "okta", "path": "/oauth2/mcp/v1/introspect",
                           "client_id": "gw", "client_secret_env": "SECRET"});
        let mut v = two();
        v["providers"]["okta"]["introspection"] = intro.clone();
        let p = parse(&v).unwrap();
        let okta = p.providers.iter().find(|p| p.name == "okta").unwrap();
        let i = okta.introspection.as_ref().unwrap();
        assert_eq!((i.cache_max_seconds, i.authority.as_str()), (60, "okta"));
        assert_eq!(i.client_secret.expose(), "s3cret");
        let cases: Vec<(&str, Value)> = vec![
            (
                "providers.okta.introspection.client_id",
                json!({"client_id": null}),
            ),
            (
                "providers.okta.introspection.client_secret_env",
                json!({"client_secret_env": null}),
            ),
            (
                "providers.okta.introspection.client_secret_env",
                json!({"client_secret_env": "NOPE"}),
            ),
            (
                "providers.okta.introspection.client_auth",
                json!({"client_auth": "private_key_jwt"}),
            ),
            (
                "providers.okta.introspection.cache_max_seconds",
                json!({"cache_max_seconds": 0}),
            ),
            (
                "providers.okta.introspection.cache_max_seconds",
                json!({"cache_max_seconds": 86400}),
            ),
            (
                "providers.okta.introspection.path",
                json!({"path": "introspect"}),
            ),
            ("providers.okta.introspection.zz", json!({"zz": 1})),
        ];
        for (field, patch) in cases {
            let mut v = two();
            let mut section = intro.clone();
            for (k, val) in patch.as_object().into_iter().flatten() {
                if val.is_null() {
                    section.as_object_mut().map(|o| o.remove(k));
                } else {
                    section[k] = val.clone();
                }
            }
            v["providers"]["okta"]["introspection"] = section;
            assert_eq!(parse(&v).expect_err(field).field, field);
        }
        // An opaque token names no issuer: only one provider may introspect.
        let mut v = two();
        v["providers"]["okta"]["introspection"] = intro.clone();
        v["providers"]["entra"]["introspection"] = intro;
        assert_eq!(
            parse(&v).unwrap_err().field,
            "providers.okta.introspection",
            "okta comes after entra in name order"
        );
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
