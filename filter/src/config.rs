//! Plugin configuration: the JSON document in the Wasm plugin's `configuration`, validated once in
//! `on_configure` into an immutable [`Policy`] that every request shares.
//!
//! Unknown fields and invalid values are refused with an error naming the field, so Envoy rejects
//! the config instead of running half-configured.
//!
//! This file holds the validated types the filter uses; `document` the raw document as written;
//! `validate` the order in which the sections are checked, each section in its own file.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;

mod checks;
mod document;
mod exchange_target;
mod fields;
mod fleet_store;
mod identity_headers;
mod introspection;
mod key_source;
mod providers;
mod resource_metadata;
mod routes;
mod validate;

use crate::client_key::ClientKey;
use crate::jwks::KeySet;
use crate::request_path::{prefix_covers, NormalPath};
pub(crate) use fields::UniqueKeys;
pub use fleet_store::{EtcdCredentials, FleetStorePolicy};

pub use document::{
    AuditLog, ClientAuth, ExchangeConfig, FilterConfig, JwksConfig, McpConfig, Mode, RouteConfig,
    ToolConfig, Unmatched,
};
pub use introspection::Introspection;
pub use providers::{ClaimRules, ClientIdClaim, Provider, ProviderSet, ScopeClaim, MAX_PROVIDERS};

pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A configuration problem, naming the field (as a dotted path) that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid configuration: {}", self.reason)
        } else {
            write!(
                f,
                "invalid configuration: `{}`: {}",
                self.field, self.reason
            )
        }
    }
}

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the inbound issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Inline(KeySet),
    Remote(RemoteJwks),
}

#[derive(Debug, Clone)]
pub struct RemoteJwks {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_interval: Duration,
    pub min_refetch_interval: Duration,
    pub timeout: Duration,
    pub max_wait: Duration,
}

/// How inbound tokens are judged (route- and provider-independent parts).
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    pub clock_skew_seconds: i64,
    pub max_token_bytes: usize,
    pub verified_cache_max_entries: usize,
}

/// Which grant obtains the backend token (`exchange.profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExchangeProfile {
    /// RFC 8693 token exchange (Okta, Keycloak ≥ 26.2, Auth0 custom token exchange).
    #[default]
    Rfc8693,
    /// Microsoft Entra ID on-behalf-of: RFC 7523 JWT bearer grant with
    /// `requested_token_use=on_behalf_of` and a `scope` such as `api://backend/.default`.
    EntraObo,
}

/// Where and how the backend token is obtained.
#[derive(Debug, Clone)]
pub struct ExchangeTarget {
    pub profile: ExchangeProfile,
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub client_id: String,
    /// Present for the `client_secret_*` methods.
    pub client_secret: Option<Secret>,
    /// Present for `private_key_jwt` and actor tokens.
    pub client_key: Option<Rc<ClientKey>>,
    pub assertion_audience: String,
    pub actor_token: bool,
    pub client_auth: ClientAuth,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub subject_token_type: String,
    pub requested_token_type: Option<String>,
    pub timeout: Duration,
    pub cache_margin_seconds: i64,
    pub cache_max_entries: usize,
    /// `identity()` of the fields above, computed once (it is part of every cache key).
    pub identity: String,
}

impl ExchangeTarget {
    /// Computes `identity` after the fields are set or changed.
    pub fn with_identity(mut self) -> Self {
        self.identity = self.cache_identity();
        self
    }

    /// A stable description of what is asked for, so the exchange cache never hands a token
    /// obtained for one target to a request for another.
    pub fn cache_identity(&self) -> String {
        format!(
            "{:?}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.profile,
            self.cluster,
            self.authority,
            self.path,
            self.client_id,
            self.audience.as_deref().unwrap_or(""),
            self.scope.as_deref().unwrap_or(""),
            self.resource.as_deref().unwrap_or(""),
            self.requested_token_type.as_deref().unwrap_or(""),
        )
    }
}

/// What challenges say, besides the error.
#[derive(Debug, Clone, Default)]
pub struct ChallengeConfig {
    pub realm: Option<String>,
    pub resource_metadata_url: Option<String>,
}

/// Extra requirements and a narrower exchange for one MCP tool.
#[derive(Debug, Clone)]
pub struct ToolPolicy {
    pub required_scopes: Vec<String>,
    pub target: Option<Rc<ExchangeTarget>>,
}

/// An RFC 9728 Protected Resource Metadata document and where it is served.
#[derive(Debug, Clone)]
pub struct ResourceMetadata {
    /// `/.well-known/oauth-protected-resource` + the resource's path.
    pub path: String,
    /// The JSON document, rendered once.
    pub document: String,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub path_prefix: String,
    pub public: bool,
    /// The route's own `audiences`; `None`: each provider's (see [`Policy::accepted_audiences`]).
    pub audiences: Option<Vec<String>>,
    /// The providers whose tokens the route accepts.
    pub providers: ProviderSet,
    pub required_scopes: Vec<String>,
    /// `None` in `validate_only` mode.
    pub target: Option<Rc<ExchangeTarget>>,
    pub challenge: ChallengeConfig,
    pub metadata: Option<ResourceMetadata>,
    pub tools: HashMap<String, ToolPolicy>,
    pub deny_unlisted_tools: bool,
}

impl Route {
    /// Whether requests on this route need their JSON-RPC body read (per-tool policy).
    pub fn inspects_tools(&self) -> bool {
        !self.tools.is_empty() || self.deny_unlisted_tools
    }
}

/// A claim copied into a request header for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityClaim {
    Sub,
    ClientId,
    Email,
    Jti,
    Scope,
    Iss,
}

#[derive(Debug, Clone)]
pub struct McpPolicy {
    pub max_body_bytes: usize,
}

/// The validated, immutable configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub inbound: InboundPolicy,
    /// At least one, at most [`MAX_PROVIDERS`], issuers distinct.
    pub providers: Vec<Provider>,
    /// Longest prefix first.
    pub routes: Vec<Route>,
    pub unmatched: Unmatched,
    pub identity_headers: Vec<(String, IdentityClaim)>,
    pub audit_log: AuditLog,
    /// `validate_only` mode with `forward_token`: the client's token goes upstream unchanged.
    pub forward_token: bool,
    pub mcp: McpPolicy,
    /// Slots of the shared exchange cache (top-level `exchange.cache_max_entries`).
    pub exchange_cache_slots: usize,
    /// Metadata served at the bare `/.well-known/oauth-protected-resource`.
    pub default_metadata: Option<ResourceMetadata>,
    /// The exchange cache shared by the fleet (etcd), behind this Envoy's own caches.
    pub fleet_store: Option<Rc<FleetStorePolicy>>,
}

impl Policy {
    /// The provider whose issuer is exactly `iss` (a handful at most: a scan beats hashing).
    pub fn provider_for_issuer(&self, iss: &str) -> Option<u8> {
        let index = self.providers.iter().position(|p| p.issuer == iss)?;
        u8::try_from(index).ok()
    }

    /// The audiences a token of `provider` needs on `route`: the route's own, else the
    /// provider's.
    pub fn accepted_audiences<'a>(&'a self, route: &'a Route, provider: u8) -> &'a [String] {
        match &route.audiences {
            Some(own) => own,
            None => self
                .providers
                .get(usize::from(provider))
                .map_or(&[], |p| &p.audiences),
        }
    }

    /// The index of the route for a request path in normal form, longest prefix first.
    pub fn route_index(&self, path: &NormalPath<'_>) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| prefix_covers(&r.path_prefix, path))
    }

    /// The Protected Resource Metadata document served at `path`, if any.
    pub fn metadata_for(&self, path: &NormalPath<'_>) -> Option<&ResourceMetadata> {
        let path = path.as_str();
        if path == WELL_KNOWN_PRM {
            return self.default_metadata.as_ref();
        }
        self.routes
            .iter()
            .filter_map(|r| r.metadata.as_ref())
            .find(|m| m.path == path)
    }

    /// Every route's exchange target, for metrics and logs.
    pub fn default_route(&self) -> Option<&Route> {
        self.routes.last()
    }
}

pub const WELL_KNOWN_PRM: &str = "/.well-known/oauth-protected-resource";

/// Resolves an environment variable by name (WASI's `std::env::var` in the filter; a map in
/// tests).
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses and validates a configuration document. `env` resolves environment variables (WASI's
/// `std::env::var` in the filter; a map in tests).
pub fn parse_policy(
    raw: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, ConfigError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "",
            "the plugin configuration is empty; a JSON object is required",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let UniqueKeys(doc) = UniqueKeys::deserialize(&mut deserializer)
        .map_err(|e| ConfigError::new("", e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| ConfigError::new("", format!("trailing data after the JSON object: {e}")))?;
    FilterConfig::read(doc)?.validate(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_path::normalize;
    use serde_json::json;

    fn np(path: &str) -> NormalPath<'_> {
        normalize(path.as_bytes()).unwrap()
    }

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cret".to_string())
    }

    fn base() -> serde_json::Value {
        json!({
            "issuer": "https://idp.example.com/oauth2/mcp",
            "audiences": ["mcpserver"],
            "required_scopes": ["mcp:tools:call"],
            "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys", "authority": "idp.example.com"},
            "exchange": {
                "cluster": "okta", "path": "/oauth2/backend/v1/token", "authority": "idp.example.com",
                "client_id": "gw", "client_secret_env": "SECRET",
                "audience": "backend", "scope": "backend-api:read"
            }
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Policy, ConfigError> {
        parse_policy(v.to_string().as_bytes(), &env)
    }

    #[test]
    fn validate_only_mode_takes_no_exchange_and_refuses_exchange_settings() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("exchange");
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "exchange");
        assert!(e.reason.contains("validate_only"), "{e}");

        v["mode"] = json!("validate_only");
        let p = parse(&v).unwrap();
        assert!(p.routes.iter().all(|r| r.target.is_none()));
        assert!(!p.forward_token, "the client's token is removed by default");
        assert_eq!(p.exchange_cache_slots, 0);
        v["forward_token"] = json!(true);
        assert!(parse(&v).unwrap().forward_token);

        let mut both = base();
        both["mode"] = json!("validate_only");
        assert_eq!(parse(&both).unwrap_err().field, "exchange");

        let mut forward_in_exchange_mode = base();
        forward_in_exchange_mode["forward_token"] = json!(true);
        assert_eq!(
            parse(&forward_in_exchange_mode).unwrap_err().field,
            "forward_token"
        );

        let mut route_override = v.clone();
        route_override["routes"] = json!([{"path_prefix": "/mcp", "exchange": {"scope": "x"}}]);
        assert_eq!(
            parse(&route_override).unwrap_err().field,
            "routes[0].exchange"
        );
        let mut tool_scope = v.clone();
        tool_scope["routes"] = json!([{"path_prefix": "/mcp",
            "tools": {"read": {"exchange_scope": "backend-api:read"}}}]);
        assert_eq!(
            parse(&tool_scope).unwrap_err().field,
            "routes[0].tools.read.exchange_scope"
        );
        let mut tools_ok = v.clone();
        tools_ok["routes"] = json!([{"path_prefix": "/mcp",
            "tools": {"write": {"required_scopes": ["mcp:write"]}}}]);
        assert!(parse(&tools_ok).is_ok(), "tool scopes still apply");

        let mut unknown = v.clone();
        unknown["mode"] = json!("passthrough");
        assert_eq!(parse(&unknown).unwrap_err().field, "mode");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let p = parse(&base()).unwrap();
        assert_eq!(p.inbound.clock_skew_seconds, 60);
        assert_eq!(p.inbound.max_token_bytes, 8192);
        assert_eq!(
            p.routes[0].target.as_ref().unwrap().client_auth,
            ClientAuth::ClientSecretBasic
        );
        assert_eq!(
            p.routes[0].target.as_ref().unwrap().subject_token_type,
            TOKEN_TYPE_ACCESS_TOKEN
        );
        assert_eq!(
            p.routes[0].target.as_ref().unwrap().timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            p.routes[0].target.as_ref().unwrap().cache_margin_seconds,
            30
        );
        assert_eq!(
            p.routes[0]
                .target
                .as_ref()
                .unwrap()
                .client_secret
                .as_ref()
                .unwrap()
                .expose(),
            "s3cret"
        );
        match &p.providers[0].keys {
            KeySource::Remote(r) => {
                assert_eq!(r.refresh_interval, Duration::from_secs(600));
                assert_eq!(r.authority, "idp.example.com");
            }
            KeySource::Inline(_) => panic!("expected remote keys"),
        }
    }

    #[test]
    fn secret_is_redacted_in_debug_output() {
        let p = parse(&base()).unwrap();
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn audit_log_is_batched_to_envoys_log_by_default_and_keeps_its_booleans() {
        assert_eq!(parse(&base()).unwrap().audit_log, AuditLog::EnvoyLogBatched);
        for (value, sink) in [
            (json!(true), AuditLog::EnvoyLogBatched),
            (json!("envoy_log_batched"), AuditLog::EnvoyLogBatched),
            (json!(false), AuditLog::Off),
            (json!("access_log"), AuditLog::AccessLog),
            (json!("envoy_log"), AuditLog::EnvoyLog),
        ] {
            let mut v = base();
            v["audit_log"] = value.clone();
            assert_eq!(parse(&v).unwrap().audit_log, sink, "{value}");
        }
        for bad in [
            json!("stdout"),
            json!(1),
            json!(null),
            json!(["access_log"]),
        ] {
            let mut v = base();
            v["audit_log"] = bad.clone();
            let e = parse(&v).unwrap_err();
            assert_eq!(e.field, "audit_log", "{bad}: {e}");
            assert!(e.reason.contains("envoy_log"), "{e}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let mut v = base();
        v["exchange"]["audiance"] = json!("backend");
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "exchange.audiance");
        assert!(e.reason.contains("audiance"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let mut v = base();
        v["exchange"]["timeout_ms"] = json!("soon");
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "exchange.timeout_ms", "{e}");
    }

    #[test]
    fn errors_inside_lists_and_maps_name_the_element() {
        let route = |tools: serde_json::Value| json!([{"path_prefix": "/a", "tools": tools}]);
        let cases = [
            ("audiences[1]", "audiences", json!(["a", 5])),
            ("jwks", "jwks", json!("okta")),
            (
                "jwks.zz",
                "jwks",
                json!({"cluster": "okta", "path": "/k", "zz": 1}),
            ),
            ("mcp.max_body_bytes", "mcp", json!({"max_body_bytes": null})),
            (
                "identity_headers.x-a",
                "identity_headers",
                json!({"x-a": 5}),
            ),
            ("routes", "routes", json!({})),
            ("routes[0]", "routes", json!([{}])),
            (
                "routes[0].tools.t.required_scopes[1]",
                "routes",
                route(json!({"t": {"required_scopes": ["a", 5]}})),
            ),
            (
                "routes[0].tools.t.zz",
                "routes",
                route(json!({"t": {"zz": 1}})),
            ),
        ];
        for (field, key, value) in cases {
            let mut v = base();
            v[key] = value;
            let e = parse(&v).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("issuer");
        let e = parse(&v).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("", "missing field `issuer`")
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let doc = base().to_string();
        let open = &doc[..doc.len() - 1];
        for extra in [
            r#""issuer": "https://other""#,
            r#""routes": [{"path_prefix": "/a", "path_prefix": "/b"}]"#,
            r#""routes": [{"path_prefix": "/a", "exchange": {"scope": "a", "scope": "b"}}]"#,
            r#""identity_headers": {"x-user": "sub", "x-user": "email"}"#,
        ] {
            let raw = format!("{open}, {extra}}}");
            let e = parse_policy(raw.as_bytes(), &env).expect_err(extra);
            assert!(e.reason.contains("duplicate field"), "{e}");
        }
    }

    #[test]
    fn invalid_values_are_refused_with_their_field() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("issuer", Box::new(|v| v["issuer"] = json!(" "))),
            ("audiences", Box::new(|v| v["audiences"] = json!([]))),
            ("audiences[0]", Box::new(|v| v["audiences"] = json!([""]))),
            (
                "required_scopes[0]",
                Box::new(|v| v["required_scopes"] = json!(["a b"])),
            ),
            (
                "clock_skew_seconds",
                Box::new(|v| v["clock_skew_seconds"] = json!(100000)),
            ),
            (
                "max_token_bytes",
                Box::new(|v| v["max_token_bytes"] = json!(10)),
            ),
            ("realm", Box::new(|v| v["realm"] = json!("a\"b"))),
            ("jwks", Box::new(|v| v["jwks"] = json!({}))),
            ("jwks.path", Box::new(|v| v["jwks"]["path"] = json!("keys"))),
            (
                "jwks.timeout_ms",
                Box::new(|v| v["jwks"]["timeout_ms"] = json!(0)),
            ),
            (
                "exchange.path",
                Box::new(|v| v["exchange"]["path"] = json!("http://x/token")),
            ),
            (
                "exchange.client_id",
                Box::new(|v| v["exchange"]["client_id"] = json!("")),
            ),
            (
                "exchange.client_secret_env",
                Box::new(|v| v["exchange"]["client_secret_env"] = json!("MISSING")),
            ),
            (
                "exchange.scope",
                Box::new(|v| v["exchange"]["scope"] = json!("a  b")),
            ),
            (
                "exchange.client_auth",
                Box::new(|v| v["exchange"]["client_auth"] = json!("private_key")),
            ),
            (
                "exchange.audience",
                Box::new(|v| {
                    v["exchange"].as_object_mut().unwrap().remove("audience");
                }),
            ),
            (
                "exchange.timeout_ms",
                Box::new(|v| v["exchange"]["timeout_ms"] = json!(-1)),
            ),
        ];
        for (field, mutate) in cases {
            let mut v = base();
            mutate(&mut v);
            let e = parse(&v).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn empty_and_non_object_configs_are_refused() {
        assert!(parse_policy(b"", &env).is_err());
        assert!(parse_policy(b"  ", &env).is_err());
        assert!(parse_policy(b"[]", &env).is_err());
        assert!(parse_policy(b"{} {}", &env).is_err());
        assert!(parse_policy(b"\xff", &env).is_err());
    }

    #[test]
    fn inline_and_cluster_are_exclusive() {
        let mut v = base();
        v["jwks"]["inline"] = json!({"keys": []});
        assert_eq!(parse(&v).unwrap_err().field, "jwks");
    }

    #[test]
    fn inline_without_usable_keys_is_refused() {
        let v = {
            let mut v = base();
            v["jwks"] = json!({"inline": {"keys": [{"kty": "oct", "k": "AAAA"}]}});
            v
        };
        assert_eq!(parse(&v).unwrap_err().field, "jwks.inline");
    }

    #[test]
    fn cache_identity_differs_per_target() {
        let a = parse(&base()).unwrap().routes[0].target.clone().unwrap();
        let mut v = base();
        v["exchange"]["scope"] = json!("backend-api:write");
        let b = parse(&v).unwrap().routes[0].target.clone().unwrap();
        assert_ne!(a.cache_identity(), b.cache_identity());
    }

    fn with_routes() -> serde_json::Value {
        let mut v = base();
        v["authorization_servers"] = json!(["https://idp.example.com/oauth2/mcp"]);
        v["routes"] = json!([
            {"name": "crm", "path_prefix": "/crm/mcp", "resource": "https://gw.example.com/crm/mcp",
             "exchange": {"audience": "crm"},
             "tools": {"read_data": {"exchange_scope": "backend-api:read"},
                       "write_data": {"required_scopes": ["mcp:tools:write"]}}},
            {"path_prefix": "/mcp", "resource": "https://gw.example.com/mcp", "resource_name": "Main"},
            {"path_prefix": "/health", "public": true}
        ]);
        v
    }

    #[test]
    fn routes_match_longest_prefix_on_segment_boundaries() {
        let p = parse(&with_routes()).unwrap();
        let name = |path: &str| p.route_index(&np(path)).map(|i| p.routes[i].name.clone());
        assert_eq!(name("/crm/mcp").as_deref(), Some("crm"));
        assert_eq!(name("/crm/mcp/x").as_deref(), Some("crm"));
        assert_eq!(name("/mcp").as_deref(), Some("/mcp"));
        assert_eq!(name("/mcpx"), None);
        assert_eq!(name("/other"), None);
        assert!(p.routes[p.route_index(&np("/health")).unwrap()].public);
    }

    #[test]
    fn route_exchange_overrides_merge_over_the_default() {
        let p = parse(&with_routes()).unwrap();
        let crm = &p.routes[p.route_index(&np("/crm/mcp")).unwrap()];
        assert_eq!(
            crm.target.as_ref().unwrap().audience.as_deref(),
            Some("crm")
        );
        assert_eq!(crm.target.as_ref().unwrap().client_id, "gw");
        assert_eq!(
            crm.target.as_ref().unwrap().scope.as_deref(),
            Some("backend-api:read")
        );
        let read = crm.tools["read_data"].target.as_ref().unwrap();
        assert_eq!(read.scope.as_deref(), Some("backend-api:read"));
        assert_ne!(
            read.cache_identity(),
            crm.tools["write_data"]
                .target
                .as_ref()
                .map_or(String::new(), |t| t.cache_identity())
        );
        assert!(crm.inspects_tools());
    }

    #[test]
    fn protected_resource_metadata_per_route() {
        let p = parse(&with_routes()).unwrap();
        let m = p
            .metadata_for(&np("/.well-known/oauth-protected-resource/crm/mcp"))
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&m.document).unwrap();
        assert_eq!(doc["resource"], "https://gw.example.com/crm/mcp");
        assert_eq!(
            doc["authorization_servers"],
            json!(["https://idp.example.com/oauth2/mcp"])
        );
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
        assert_eq!(
            doc["scopes_supported"],
            json!(["mcp:tools:call", "mcp:tools:write"])
        );
        let crm = &p.routes[p.route_index(&np("/crm/mcp")).unwrap()];
        assert_eq!(
            crm.challenge.resource_metadata_url.as_deref(),
            Some("https://gw.example.com/.well-known/oauth-protected-resource/crm/mcp")
        );
        // The bare well-known path serves the first route's document.
        assert!(p
            .metadata_for(&np("/.well-known/oauth-protected-resource"))
            .is_some());
        let main: serde_json::Value = serde_json::from_str(
            &p.metadata_for(&np("/.well-known/oauth-protected-resource/mcp"))
                .unwrap()
                .document,
        )
        .unwrap();
        assert_eq!(main["resource_name"], "Main");
        assert!(p
            .metadata_for(&np("/.well-known/oauth-protected-resource/nope"))
            .is_none());
    }

    #[test]
    fn single_route_metadata_defaults_to_the_issuer() {
        let mut v = base();
        v["resource"] = json!("https://gw.example.com/mcp");
        let p = parse(&v).unwrap();
        let doc: serde_json::Value = serde_json::from_str(
            &p.metadata_for(&np("/.well-known/oauth-protected-resource/mcp"))
                .unwrap()
                .document,
        )
        .unwrap();
        assert_eq!(
            doc["authorization_servers"],
            json!(["https://idp.example.com/oauth2/mcp"])
        );
        assert_eq!(
            p.routes[0].challenge.resource_metadata_url.as_deref(),
            Some("https://gw.example.com/.well-known/oauth-protected-resource/mcp")
        );
    }

    #[test]
    fn route_errors_name_the_route_field() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("routes[0].path_prefix", json!([{"path_prefix": "mcp"}])),
            (
                "routes[1].path_prefix",
                json!([{"path_prefix": "/a"}, {"path_prefix": "/a"}]),
            ),
            (
                "routes[0].exchange.scope",
                json!([{"path_prefix": "/a", "exchange": {"scope": "a  b"}}]),
            ),
            (
                "routes[0].exchange.audiance",
                json!([{"path_prefix": "/a", "exchange": {"audiance": "x"}}]),
            ),
            (
                "routes[0].resource",
                json!([{"path_prefix": "/a", "resource": "ftp://x/a"}]),
            ),
            (
                "routes[0].tools.t.exchange_scope",
                json!([{"path_prefix": "/a", "tools": {"t": {"exchange_scope": ""}}}]),
            ),
            (
                "routes[0].required_scopes[0]",
                json!([{"path_prefix": "/a", "required_scopes": ["a b"]}]),
            ),
            (
                "routes[0].audiences",
                json!([{"path_prefix": "/a", "audiences": []}]),
            ),
            // Prefixes the filter could never match a request's normal form against.
            ("routes[0].path_prefix", json!([{"path_prefix": "/a/../b"}])),
            ("routes[0].path_prefix", json!([{"path_prefix": "/%6Dcp"}])),
            ("routes[0].path_prefix", json!([{"path_prefix": "/a//b"}])),
            ("routes[0].path_prefix", json!([{"path_prefix": "/a;b"}])),
            ("routes[0].path_prefix", json!([{"path_prefix": "/mcp."}])),
            // Routes match ignoring case: these two would be one route.
            (
                "routes[1].path_prefix",
                json!([{"path_prefix": "/mcp"}, {"path_prefix": "/MCP/"}]),
            ),
            (
                "routes[0].resource",
                json!([{"path_prefix": "/a", "resource": "https://x/a/../b"}]),
            ),
        ];
        for (field, routes) in cases {
            let mut v = base();
            v["routes"] = routes;
            let e = parse(&v).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn identity_headers_are_validated() {
        let mut v = base();
        v["identity_headers"] = json!({"x-user": "sub", "x-client": "cid", "x-mail": "email"});
        let p = parse(&v).unwrap();
        assert_eq!(p.identity_headers.len(), 3);
        for (header, claim, field) in [
            ("authorization", "sub", "identity_headers.authorization"),
            ("X-User", "sub", "identity_headers.X-User"),
            ("x-user", "password", "identity_headers.x-user"),
            (
                "x-envoy-original-path",
                "sub",
                "identity_headers.x-envoy-original-path",
            ),
        ] {
            let mut v = base();
            v["identity_headers"] = json!({ header: claim });
            assert_eq!(parse(&v).unwrap_err().field, field);
        }
    }

    /// An RSA private JWK is accepted only by the build that can sign with it, and refused at
    /// config load by the default build, naming the field and the build to use.
    #[test]
    fn rsa_client_keys_need_the_rsa_client_key_build() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        use rand::SeedableRng;
        use rsa::traits::{PrivateKeyParts, PublicKeyParts};
        let mut rng = rand::rngs::ChaCha8Rng::from_seed([3; 32]);
        let key = rsa::PrivateKey::new(&mut rng, 2048).unwrap();
        let b64 = |n: &rsa::BoxedUint| URL_SAFE_NO_PAD.encode(n.to_be_bytes());
        let jwk = json!({"kty": "RSA", "n": b64(key.n()), "e": b64(key.e()), "d": b64(key.d()),
            "p": b64(&key.primes()[0]), "q": b64(&key.primes()[1])})
        .to_string();
        let env = move |name: &str| (name == "KEY").then(|| jwk.clone());
        let mut v = base();
        v["exchange"]["client_auth"] = json!("private_key_jwt");
        v["exchange"]["client_secret_env"] = json!(null);
        v["exchange"]["client_private_key_env"] = json!("KEY");
        let parsed = parse_policy(v.to_string().as_bytes(), &env);
        #[cfg(feature = "rsa-client-key")]
        {
            let p = parsed.unwrap();
            let t = p.routes[0].target.as_deref().unwrap();
            assert_eq!(t.client_key.as_ref().unwrap().alg(), "RS256");
        }
        #[cfg(not(feature = "rsa-client-key"))]
        {
            let e = parsed.unwrap_err();
            assert_eq!(e.field, "exchange.client_private_key_env");
            let shown = e.to_string();
            assert!(
                shown.contains("rsa-client-key") && shown.contains("P-256"),
                "{shown}"
            );
        }
    }

    #[test]
    fn private_key_jwt_needs_a_usable_key() {
        let jwk = json!({"kty": "EC", "crv": "P-256", "d": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"}).to_string();
        let env = move |name: &str| match name {
            "KEY" => Some(jwk.clone()),
            "BAD" => Some("{}".to_string()),
            _ => None,
        };
        let mut v = base();
        v["exchange"]["client_auth"] = json!("private_key_jwt");
        v["exchange"]
            .as_object_mut()
            .unwrap()
            .remove("client_secret_env");
        v["exchange"]["client_private_key_env"] = json!("KEY");
        v["exchange"]["actor_token"] = json!(true);
        let p = parse_policy(v.to_string().as_bytes(), &env).unwrap();
        let t = p.routes[0].target.as_deref().unwrap();
        assert_eq!(t.client_auth, ClientAuth::PrivateKeyJwt);
        assert!(t.client_secret.is_none());
        assert_eq!(
            t.assertion_audience,
            "https://idp.example.com/oauth2/backend/v1/token"
        );
        assert!(t.actor_token);

        v["exchange"]["client_private_key_env"] = json!("BAD");
        let e = parse_policy(v.to_string().as_bytes(), &env).unwrap_err();
        assert_eq!(e.field, "exchange.client_private_key_env");
        v["exchange"]
            .as_object_mut()
            .unwrap()
            .remove("client_private_key_env");
        let e = parse_policy(v.to_string().as_bytes(), &env).unwrap_err();
        assert_eq!(e.field, "exchange.client_private_key_env");
        // Secret methods still need their secret.
        let mut v = base();
        v["exchange"]
            .as_object_mut()
            .unwrap()
            .remove("client_secret_env");
        assert_eq!(parse(&v).unwrap_err().field, "exchange.client_secret_env");
    }
}
