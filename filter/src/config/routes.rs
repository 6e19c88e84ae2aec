//! The `routes` section: one upstream per path prefix, each with its audiences, scopes, exchange,
//! metadata and per-tool policy. Without `routes`, one route covers every path.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use super::checks::{
    require_audiences, require_non_empty, require_route_path, require_scope_list, require_scopes,
};
use super::exchange_target::{route_exchange, DefaultExchange};
use super::fields::join;
use super::providers::route_providers;
use super::resource_metadata::{published_metadata, MetadataContent};
use super::{
    ChallengeConfig, ConfigError, Env, ExchangeTarget, Provider, ProviderSet, ResourceMetadata,
    Route, RouteConfig, ToolConfig, ToolPolicy,
};

/// What every route takes from the top level of the document unless it sets its own.
pub(super) struct RouteDefaults<'a> {
    /// Every provider: a route accepts all of them unless it names some.
    pub providers: &'a [Provider],
    pub required_scopes: Vec<String>,
    pub realm: Option<String>,
    /// As the document lists them; none: the issuers of the providers a route accepts.
    pub authorization_servers: Vec<String>,
    pub resource_name: Option<String>,
    pub resource_documentation: Option<String>,
    /// `None` in `validate_only` mode.
    pub exchange: Option<DefaultExchange>,
}

/// The validated routes, longest prefix first, and the metadata served at the bare well-known
/// path (the first route's in the document that has any).
pub(super) struct Routes {
    pub routes: Vec<Route>,
    pub default_metadata: Option<ResourceMetadata>,
}

/// Without `routes`: one route for every path, described by the top-level fields.
pub(super) fn single_route(
    resource: Option<&str>,
    resource_metadata_url: Option<String>,
    defaults: &RouteDefaults<'_>,
) -> Result<Routes, ConfigError> {
    let providers = ProviderSet::all(defaults.providers.len());
    let authorization_servers = defaults.authorization_servers(providers);
    let content = MetadataContent {
        authorization_servers: &authorization_servers,
        scopes: &defaults.required_scopes,
        name: defaults.resource_name.as_deref(),
        documentation: defaults.resource_documentation.as_deref(),
    };
    let (metadata, derived_url) = published_metadata("resource", resource, &content)?;
    let route = Route {
        name: "default".into(),
        path_prefix: "/".into(),
        public: false,
        audiences: None,
        providers,
        required_scopes: defaults.required_scopes.clone(),
        target: defaults.exchange.as_ref().map(|e| Rc::clone(&e.target)),
        challenge: ChallengeConfig {
            realm: defaults.realm.clone(),
            resource_metadata_url: resource_metadata_url.or(derived_url),
        },
        metadata: metadata.clone(),
        tools: HashMap::new(),
        deny_unlisted_tools: false,
    };
    Ok(Routes {
        routes: vec![route],
        default_metadata: metadata,
    })
}

pub(super) fn configured_routes(
    configs: Vec<RouteConfig>,
    defaults: &RouteDefaults<'_>,
    env: Env<'_>,
) -> Result<Routes, ConfigError> {
    let mut routes: Vec<Route> = Vec::new();
    let mut default_metadata = None;
    for (i, config) in configs.into_iter().enumerate() {
        let route = validate_route(&format!("routes[{i}]"), config, &routes, defaults, env)?;
        if default_metadata.is_none() {
            default_metadata = route.metadata.clone();
        }
        routes.push(route);
    }
    // A request takes the first route whose prefix covers its path, so the longest goes first.
    routes.sort_by_key(|r| Reverse(r.path_prefix.trim_end_matches('/').len()));
    Ok(Routes {
        routes,
        default_metadata,
    })
}

/// One route at `field` (`routes[0]`); `earlier` are the routes before it in the document.
fn validate_route(
    field: &str,
    config: RouteConfig,
    earlier: &[Route],
    defaults: &RouteDefaults<'_>,
    env: Env<'_>,
) -> Result<Route, ConfigError> {
    let at = |name: &str| join(field, name);
    require_unique_prefix(&at("path_prefix"), &config.path_prefix, earlier)?;
    if let Some(audiences) = &config.audiences {
        require_audiences(&at("audiences"), audiences)?;
    }
    let providers = route_providers(&at("providers"), config.providers, defaults.providers)?;
    let required_scopes = config
        .required_scopes
        .unwrap_or_else(|| defaults.required_scopes.clone());
    require_scopes(&at("required_scopes"), &required_scopes)?;
    let target = route_exchange(
        &at("exchange"),
        config.exchange,
        defaults.exchange.as_ref(),
        env,
    )?;
    let advertised_scopes = advertised_scopes(&required_scopes, &config.tools);
    let tools = validate_tools(&at("tools"), config.tools, target.as_ref())?;
    let authorization_servers = defaults.authorization_servers(providers);
    let content = MetadataContent {
        authorization_servers: &authorization_servers,
        scopes: &advertised_scopes,
        name: config
            .resource_name
            .as_deref()
            .or(defaults.resource_name.as_deref()),
        documentation: defaults.resource_documentation.as_deref(),
    };
    let (metadata, metadata_url) =
        published_metadata(&at("resource"), config.resource.as_deref(), &content)?;
    Ok(Route {
        name: config.name.unwrap_or_else(|| config.path_prefix.clone()),
        path_prefix: config.path_prefix,
        public: config.public,
        audiences: config.audiences,
        providers,
        required_scopes,
        target,
        challenge: ChallengeConfig {
            realm: defaults.realm.clone(),
            resource_metadata_url: metadata_url,
        },
        metadata,
        tools,
        deny_unlisted_tools: config.deny_unlisted_tools,
    })
}

impl RouteDefaults<'_> {
    /// RFC 9728 `authorization_servers` of a route accepting `providers`.
    fn authorization_servers(&self, providers: ProviderSet) -> Vec<String> {
        if !self.authorization_servers.is_empty() {
            return self.authorization_servers.clone();
        }
        providers
            .indexes()
            .filter_map(|i| self.providers.get(i))
            .map(|p| p.issuer.clone())
            .collect()
    }
}

fn require_unique_prefix(field: &str, prefix: &str, earlier: &[Route]) -> Result<(), ConfigError> {
    require_route_path(field, prefix)?;
    // Routes match ignoring case, so `/MCP` and `/mcp` would be one route.
    let same = |a: &str, b: &str| {
        a.trim_end_matches('/')
            .eq_ignore_ascii_case(b.trim_end_matches('/'))
    };
    if earlier.iter().any(|r| same(&r.path_prefix, prefix)) {
        return Err(ConfigError::new(field, "duplicates another route's prefix"));
    }
    Ok(())
}

/// The scopes a route's metadata advertises: the route's own, then each tool's not yet listed.
fn advertised_scopes(required: &[String], tools: &BTreeMap<String, ToolConfig>) -> Vec<String> {
    let mut all = required.to_vec();
    for scope in tools.values().flat_map(|t| &t.required_scopes) {
        if !all.contains(scope) {
            all.push(scope.clone());
        }
    }
    all
}

/// The `tools` of a route at `field`, checked in the document's (sorted) order.
fn validate_tools(
    field: &str,
    tools: BTreeMap<String, ToolConfig>,
    route_target: Option<&Rc<ExchangeTarget>>,
) -> Result<HashMap<String, ToolPolicy>, ConfigError> {
    tools
        .into_iter()
        .map(|(name, config)| {
            let tool_field = join(field, &name);
            require_non_empty(&tool_field, &name)?;
            let scopes_field = join(&tool_field, "required_scopes");
            require_scopes(&scopes_field, &config.required_scopes)?;
            let target = tool_target(
                &join(&tool_field, "exchange_scope"),
                config.exchange_scope,
                route_target,
            )?;
            let policy = ToolPolicy {
                required_scopes: config.required_scopes,
                target,
            };
            Ok((name, policy))
        })
        .collect()
}

/// A tool's `exchange_scope`: the route's target asking for a narrower scope. Its own cache
/// identity keeps its tokens apart from the route's.
fn tool_target(
    field: &str,
    exchange_scope: Option<String>,
    route_target: Option<&Rc<ExchangeTarget>>,
) -> Result<Option<Rc<ExchangeTarget>>, ConfigError> {
    match (exchange_scope, route_target) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(ConfigError::new(
            field,
            "must not be set with `mode: validate_only`",
        )),
        (Some(scope), Some(target)) => {
            require_scope_list(field, &scope)?;
            let mut narrowed = ExchangeTarget::clone(target);
            narrowed.scope = Some(scope);
            Ok(Some(Rc::new(narrowed.with_identity())))
        }
    }
}
