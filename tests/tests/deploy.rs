//! The deployment artifacts: every config under `envoy/` and the OCI image of the module.
//!
//! - Envoy bootstraps (`*.yaml` with `static_resources`) pass `envoy --mode validate`, which
//!   loads the real module and runs its `on_configure` on the plugin configuration; their Wasm
//!   filters and callout clusters are checked for what a deployment needs (fail closed, secret
//!   from the environment, TLS to a real IdP).
//! - Kubernetes manifests (everything else, multi-document YAML) are parsed and checked for the
//!   fields Istio and Envoy Gateway need. Their plugin configurations go through the filter's
//!   own parser, and then through `envoy --mode validate` inside a bootstrap built the way Istio
//!   and Envoy Gateway would build it (same cluster names, same TLS settings).
//! - The OCI image `oci-image` writes is checked independently of the code that built it:
//!   layout files, media types, every blob's digest against its name, the Wasm layer against the
//!   module, the tarball against the layout, and determinism.
//!
//! Needs `make wasm envoy` (like the rest of the e2e suite).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use gateway_tests::harness::{envoy_bin, filter_wasm, workspace_root};
use mcp_token_exchange::config::AuditLog;
use serde::Deserialize as _;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// envoy/README.md's introspection examples (kept apart: this file is long enough).
#[path = "deploy/introspection_examples.rs"]
mod introspection_examples;

/// Where every bootstrap in `envoy/` loads the module from (relative to the repository root, as
/// the Makefile builds it).
const WASM_REL: &str = "target/wasm32-wasip1/release/mcp_token_exchange.wasm";
const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const ROOT_ID: &str = "mcp_token_exchange";
/// The access-log format that writes the filter's audit record (the filter state it sets), and
/// the CEL filter that skips requests without one (README "Audit and metrics").
const AUDIT_FORMAT: &str = "%FILTER_STATE(wasm.mcp_token_exchange.audit:PLAIN)%\n";
const AUDIT_EXPRESSION: &str = "'wasm.mcp_token_exchange.audit' in filter_state";

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

fn envoy_dir() -> PathBuf {
    workspace_root().join("envoy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// Every YAML document under `envoy/`, as JSON values, by file.
fn all_documents() -> Vec<(PathBuf, Vec<Value>)> {
    let mut files = Vec::new();
    yaml_files(&envoy_dir(), &mut files);
    assert!(!files.is_empty(), "no YAML under envoy/");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read yaml");
            let mut docs = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
                if value.is_null() {
                    continue;
                }
                let json = serde_json::to_value(&value)
                    .unwrap_or_else(|e| panic!("{}: not JSON-like: {e}", path.display()));
                docs.push(json);
            }
            assert!(!docs.is_empty(), "{}: no documents", path.display());
            (path, docs)
        })
        .collect()
}

fn is_bootstrap(docs: &[Value]) -> bool {
    docs.len() == 1 && docs[0].get("static_resources").is_some()
}

fn rel(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn manifests() -> Vec<(String, Value)> {
    all_documents()
        .into_iter()
        .filter(|(_, docs)| !is_bootstrap(docs))
        .flat_map(|(path, docs)| {
            let name = rel(&path);
            docs.into_iter().map(move |d| (name.clone(), d))
        })
        .collect()
}

fn of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> Vec<&'a (String, Value)> {
    all.iter().filter(|(_, d)| d["kind"] == kind).collect()
}

fn str_at<'a>(v: &'a Value, pointer: &str, what: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: {pointer} is missing or not a string"))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcp-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

// ---------------------------------------------------------------------------------------------
// The filter configuration
// ---------------------------------------------------------------------------------------------

/// Parses a plugin configuration with the filter's own parser, the named secret variable set.
fn parse_plugin_config(config: &Value, what: &str) -> mcp_token_exchange::config::Policy {
    let secret_env = str_at(config, "/exchange/client_secret_env", what).to_string();
    let raw = serde_json::to_vec(config).expect("json");
    mcp_token_exchange::config::parse_policy(&raw, &|name: &str| {
        (name == secret_env).then(|| "a-secret".to_string())
    })
    .unwrap_or_else(|e| panic!("{what}: the filter refuses its configuration: {e}"))
}

/// The clusters a plugin configuration calls out to (JWKS unless inline, and the exchange).
fn callout_clusters(config: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(c) = config.pointer("/jwks/cluster").and_then(Value::as_str) {
        out.insert(c.to_string());
    }
    if let Some(c) = config.pointer("/exchange/cluster").and_then(Value::as_str) {
        out.insert(c.to_string());
    }
    if let Some(c) = config
        .pointer("/fleet_store/cluster")
        .and_then(Value::as_str)
    {
        out.insert(c.to_string());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// `envoy --mode validate -c config` in `cwd`, with every `env_keys` variable set. Validation
/// creates the Wasm filter, so the module's `on_configure` runs on the plugin configuration and a
/// refusal fails validation. Returns the output on success; panics with it otherwise. Deprecated
/// fields fail too: they stop working in a later Envoy.
fn envoy_validate(config: &Path, cwd: &Path, env_keys: &BTreeSet<String>, what: &str) -> String {
    let envoy = envoy_bin().expect("envoy (make envoy)");
    let mut cmd = Command::new(envoy);
    cmd.current_dir(cwd)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config);
    for key in env_keys {
        // 32 bytes or more: also stands for a fleet store key.
        cmd.env(key, "validate-only-secret-of-32-bytes-or-more");
    }
    let out = cmd.output().expect("run envoy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("OK"),
        "{what}: envoy --mode validate failed:\n{text}"
    );
    assert!(
        !text.contains("Deprecated field"),
        "{what}: uses a deprecated Envoy field:\n{text}"
    );
    text
}

/// Every Wasm HTTP filter (its `config`, the PluginConfig) anywhere in a bootstrap.
fn wasm_plugin_configs(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                if let Some(c) = map.get("config") {
                    out.push(c.clone());
                }
            }
            map.values().for_each(|x| wasm_plugin_configs(x, out));
        }
        Value::Array(list) => list.iter().for_each(|x| wasm_plugin_configs(x, out)),
        _ => {}
    }
}

fn static_clusters(bootstrap: &Value) -> BTreeMap<String, Value> {
    bootstrap
        .pointer("/static_resources/clusters")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|c| (c["name"].as_str().unwrap_or("").to_string(), c.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn cluster_address(cluster: &Value) -> (String, u64) {
    let addr = cluster
        .pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address")
        .expect("cluster has one socket address");
    (
        addr["address"].as_str().unwrap_or("").to_string(),
        addr["port_value"].as_u64().unwrap_or(0),
    )
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A cluster that reaches a real IdP must originate TLS with SNI, verify the chain against a
/// CA bundle, and check the host name.
fn assert_tls_to(cluster: &Value, host: &str, what: &str) {
    let ts = cluster
        .pointer("/transport_socket/typed_config")
        .unwrap_or_else(|| panic!("{what}: no TLS transport socket"));
    assert_eq!(ts["@type"], TLS_TYPE, "{what}");
    assert_eq!(ts["sni"], host, "{what}: sni");
    let vc = ts
        .pointer("/common_tls_context/validation_context")
        .unwrap_or_else(|| panic!("{what}: no validation_context (no certificate check)"));
    let ca = str_at(vc, "/trusted_ca/filename", what);
    assert!(ca.starts_with('/'), "{what}: trusted_ca {ca}");
    let sans = vc["match_typed_subject_alt_names"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no SAN check: any trusted certificate would do"));
    assert!(
        sans.iter()
            .any(|s| s["san_type"] == "DNS" && s.pointer("/matcher/exact") == Some(&json!(host))),
        "{what}: no DNS SAN matcher for {host}"
    );
}

/// A minimal bootstrap: one listener with the Wasm filter (as Istio / Envoy Gateway would
/// configure it: no vm_id, configuration as a JSON string) and the given clusters.
fn synthetic_bootstrap(
    plugin_config: &Value,
    host_env_keys: &BTreeSet<String>,
    clusters: Vec<Value>,
) -> Value {
    let wasm = filter_wasm().expect("filter module (make wasm)");
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "validate",
        "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [
            {"name": ROOT_ID, "typed_config": {
                "@type": WASM_FILTER_TYPE,
                "config": {
                    "name": ROOT_ID,
                    "root_id": ROOT_ID,
                    "failure_policy": "FAIL_CLOSED",
                    "vm_config": {
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": wasm}},
                        "environment_variables": {"host_env_keys": host_env_keys},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": plugin_config.to_string(),
                    },
                },
            }},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    });
    json!({
        "static_resources": {
            "listeners": [{
                "name": "validate",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        }
    })
}

fn validate_synthetic(bootstrap: &Value, env_keys: &BTreeSet<String>, name: &str, what: &str) {
    let dir = temp_dir(name);
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, serde_json::to_vec_pretty(bootstrap).expect("json")).expect("write");
    envoy_validate(&path, &dir, env_keys, what);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Envoy bootstraps
// ---------------------------------------------------------------------------------------------

/// The `typed_config` of every HTTP connection manager in a bootstrap's static listeners.
fn http_connection_managers(bootstrap: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for listener in bootstrap["static_resources"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for chain in listener["filter_chains"].as_array().into_iter().flatten() {
            for filter in chain["filters"].as_array().into_iter().flatten() {
                if filter["name"] == "envoy.filters.network.http_connection_manager" {
                    out.push(&filter["typed_config"]);
                }
            }
        }
    }
    out
}

/// Every HTTP connection manager of a shipped bootstrap normalises paths before the filter sees
/// them (the filter's own checks are the second line; see README "Threat model").
fn assert_paths_normalised(bootstrap: &Value, what: &str) {
    let managers = http_connection_managers(bootstrap);
    for hcm in &managers {
        assert_eq!(hcm["normalize_path"], true, "{what}: normalize_path");
        assert_eq!(hcm["merge_slashes"], true, "{what}: merge_slashes");
        let action = hcm["path_with_escaped_slashes_action"].as_str();
        assert!(
            matches!(action, Some("REJECT_REQUEST" | "UNESCAPE_AND_REDIRECT")),
            "{what}: path_with_escaped_slashes_action is {action:?}"
        );
    }
    assert!(!managers.is_empty(), "{what}: no http_connection_manager");
}

// ---------------------------------------------------------------------------------------------
// CORS for browser MCP clients (README "Browser clients (CORS)")
// ---------------------------------------------------------------------------------------------

const CORS_FILTER: &str = "envoy.filters.http.cors";
const CORS_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
const CORS_POLICY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
/// What a browser MCP client sends (so a preflight must allow it) …
const CORS_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "mcp-protocol-version",
    "mcp-session-id",
];
const CORS_METHODS: &[&str] = &["GET", "POST", "DELETE"];
/// … and what it reads from an answer (the challenge, the session).
const CORS_EXPOSED: &[&str] = &["www-authenticate", "mcp-session-id"];

/// A comma-separated header list (or a YAML list of names), lower-cased.
fn names(v: &Value) -> Vec<String> {
    let items: Vec<&str> = match v {
        Value::String(s) => s.split(',').collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(|x| x.trim().to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Origin matchers (Envoy's `StringMatcher`, Istio's `StringMatch`) that are all `{"exact": …}`
/// with a full origin: a prefix or regex would grant origins nobody listed.
fn assert_exact_matchers(matchers: &[Value], what: &str) {
    for m in matchers {
        let keys: Vec<&String> = m
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["exact"], "{what}: origins match exactly: {m}");
        assert_exact_origin(str_at(m, "/exact", what), what);
    }
}

/// The allowlist holds origins, each exactly one: scheme, host, optional port. No wildcard (which
/// with credentials a browser refuses, and without lets every site in), no `null` (sandboxed
/// frames and `file:` pages share it), no pattern.
fn assert_exact_origin(origin: &str, what: &str) {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("{what}: origin {origin:?} is not http(s)://host[:port]"));
    assert!(
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:[]".contains(&b)),
        "{what}: origin {origin:?} must be exactly one origin (no wildcard, path or pattern)"
    );
}

fn assert_cors_lists(
    methods: &Value,
    request_headers: &Value,
    exposed: &Value,
    credentials: &Value,
    what: &str,
) {
    let methods = names(methods);
    for m in CORS_METHODS {
        assert!(
            methods.contains(&m.to_ascii_lowercase()),
            "{what}: allowed methods lack {m}: {methods:?}"
        );
    }
    let allowed = names(request_headers);
    for h in CORS_REQUEST_HEADERS {
        assert!(
            allowed.iter().any(|x| x == h),
            "{what}: allowed headers lack {h}"
        );
    }
    assert!(
        !allowed.iter().any(|x| x == "*"),
        "{what}: allowed headers are listed, not `*`"
    );
    let exposed = names(exposed);
    for h in CORS_EXPOSED {
        assert!(exposed.iter().any(|x| x == h), "{what}: {h} is not exposed");
    }
    assert!(
        credentials.is_null() || credentials == &json!(false),
        "{what}: credentials are never granted (MCP clients send bearer tokens, not cookies)"
    );
}

/// Every HTTP connection manager with the token filter has Envoy's CORS filter ahead of it, and
/// every virtual host a CORS policy a browser MCP client can use.
fn assert_browser_cors(bootstrap: &Value, what: &str) {
    let mut managers = 0;
    for hcm in http_connection_managers(bootstrap) {
        let filters = hcm["http_filters"].as_array().cloned().unwrap_or_default();
        let Some(wasm) = filters
            .iter()
            .position(|f| f["typed_config"]["@type"] == WASM_FILTER_TYPE)
        else {
            continue;
        };
        managers += 1;
        let cors = filters
            .iter()
            .position(|f| f["name"] == CORS_FILTER)
            .unwrap_or_else(|| panic!("{what}: no {CORS_FILTER}"));
        assert!(
            cors < wasm,
            "{what}: {CORS_FILTER} must come before the token filter, or preflights get its 401"
        );
        assert_eq!(
            filters[cors]["typed_config"]["@type"], CORS_FILTER_TYPE,
            "{what}"
        );
        for vhost in hcm["route_config"]["virtual_hosts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let what = format!("{what}: virtual host {}", vhost["name"]);
            let policy = &vhost["typed_per_filter_config"][CORS_FILTER];
            assert_eq!(policy["@type"], CORS_POLICY_TYPE, "{what}: no CORS policy");
            let origins = policy["allow_origin_string_match"]
                .as_array()
                .filter(|o| !o.is_empty())
                .unwrap_or_else(|| panic!("{what}: no allowed origins"));
            assert_exact_matchers(origins, &what);
            assert!(
                origins.iter().any(|m| m["exact"] == "https://vscode.dev"),
                "{what}: the example allowlist names vscode.dev"
            );
            assert_cors_lists(
                &policy["allow_methods"],
                &policy["allow_headers"],
                &policy["expose_headers"],
                &policy["allow_credentials"],
                &what,
            );
            assert_eq!(
                policy["forward_not_matching_preflights"], false,
                "{what}: a preflight from another origin is answered by Envoy, not forwarded"
            );
            let vary = vhost["response_headers_to_add"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| {
                    h["header"]["key"].as_str().map(str::to_ascii_lowercase) == Some("vary".into())
                        && h["header"]["value"] == "Origin"
                });
            assert!(
                vary,
                "{what}: answers that differ by Origin say Vary: Origin"
            );
        }
    }
    assert!(
        managers > 0,
        "{what}: no http_connection_manager with the token filter"
    );
}

#[test]
fn every_envoy_bootstrap_validates() {
    let root = workspace_root();
    let mut seen = Vec::new();
    for (path, docs) in all_documents() {
        if !is_bootstrap(&docs) {
            continue;
        }
        let what = rel(&path);
        let bootstrap = &docs[0];
        let clusters = static_clusters(bootstrap);
        let mut plugins = Vec::new();
        wasm_plugin_configs(bootstrap, &mut plugins);
        if what.starts_with("envoy/fleet/front-") {
            // The tier in front of the gateways: no filter of ours, just Envoy.
            assert!(
                plugins.is_empty(),
                "{what}: the front tier runs no Wasm filter"
            );
            assert_paths_normalised(bootstrap, &what);
            envoy_validate(&path, &root, &BTreeSet::new(), &what);
            seen.push(what);
            continue;
        }
        assert!(!plugins.is_empty(), "{what}: no Wasm filter");
        let mut env_keys = BTreeSet::new();
        for plugin in &plugins {
            assert_eq!(
                str_at(plugin, "/vm_config/code/local/filename", &what),
                WASM_REL,
                "{what}: the module path (relative to the repository root, as `make wasm` builds it)"
            );
            assert_eq!(plugin["failure_policy"], "FAIL_CLOSED", "{what}");
            assert_eq!(plugin["root_id"], ROOT_ID, "{what}");
            let raw = str_at(plugin, "/configuration/value", &what);
            let config: Value = serde_json::from_str(raw)
                .unwrap_or_else(|e| panic!("{what}: configuration is not JSON: {e}"));
            parse_plugin_config(&config, &what);
            let secret_env = str_at(&config, "/exchange/client_secret_env", &what);
            let keys: Vec<&str> = plugin
                .pointer("/vm_config/environment_variables/host_env_keys")
                .and_then(Value::as_array)
                .map(|l| l.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert!(
                keys.contains(&secret_env),
                "{what}: host_env_keys must pass {secret_env} into the VM"
            );
            assert!(
                plugin
                    .pointer("/vm_config/environment_variables/key_values")
                    .is_none(),
                "{what}: no inline environment values (secrets come from the host)"
            );
            env_keys.extend(keys.iter().map(|k| k.to_string()));
            for name in callout_clusters(&config) {
                let cluster = clusters
                    .get(&name)
                    .unwrap_or_else(|| panic!("{what}: callout cluster {name:?} is not defined"));
                let (host, _) = cluster_address(cluster);
                if !is_loopback(&host) {
                    assert_tls_to(cluster, &host, &format!("{what}: cluster {name}"));
                    assert_eq!(
                        str_at(&config, "/exchange/authority", &what),
                        host,
                        "{what}: exchange.authority must be the IdP host"
                    );
                }
            }
        }

        assert_paths_normalised(bootstrap, &what);
        assert_browser_cors(bootstrap, &what);

        // The module path is relative: validate from the repository root as is, or (when the
        // module lives elsewhere, FILTER_WASM) a copy that points at it.
        if root.join(WASM_REL).exists() {
            envoy_validate(&path, &root, &env_keys, &what);
        } else {
            let wasm = filter_wasm().expect("filter module (make wasm)");
            let text = std::fs::read_to_string(&path)
                .expect("read")
                .replace(WASM_REL, &wasm.display().to_string());
            let dir = temp_dir("bootstrap");
            let copy = dir.join(path.file_name().expect("name"));
            std::fs::write(&copy, text).expect("write");
            envoy_validate(&copy, &dir, &env_keys, &what);
            let _ = std::fs::remove_dir_all(&dir);
        }
        seen.push(what);
    }
    for expected in [
        "envoy/demo.yaml",
        "envoy/okta.yaml",
        "envoy/fleet/front-ring-hash.yaml",
        "envoy/entra.yaml",
        "envoy/keycloak.yaml",
        "envoy/auth0.yaml",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} not validated: {seen:?}"
        );
    }
}

#[test]
fn okta_config_reaches_okta_over_tls() {
    let docs: Vec<Value> = all_documents()
        .into_iter()
        .find(|(p, _)| p.ends_with("okta.yaml") && p.parent() == Some(envoy_dir().as_path()))
        .map(|(_, d)| d)
        .expect("envoy/okta.yaml");
    let bootstrap = &docs[0];
    let mut plugins = Vec::new();
    wasm_plugin_configs(bootstrap, &mut plugins);
    let config: Value =
        serde_json::from_str(str_at(&plugins[0], "/configuration/value", "okta.yaml")).unwrap();
    let okta = &static_clusters(bootstrap)["okta"];
    let (host, port) = cluster_address(okta);
    assert_eq!(port, 443);
    assert!(host.ends_with(".okta.com"), "{host}");
    assert_tls_to(okta, &host, "okta.yaml okta cluster");
    // Okta's paths: keys of the MCP AS, token endpoint of the backend AS.
    let issuer = str_at(&config, "/issuer", "okta.yaml");
    assert!(
        issuer.starts_with(&format!("https://{host}/oauth2/")),
        "{issuer}"
    );
    let mcp_as = issuer.rsplit('/').next().unwrap();
    assert_eq!(config["jwks"]["path"], format!("/oauth2/{mcp_as}/v1/keys"));
    let token_path = str_at(&config, "/exchange/path", "okta.yaml");
    assert!(
        token_path.starts_with("/oauth2/") && token_path.ends_with("/v1/token"),
        "{token_path}"
    );
    assert_ne!(
        token_path,
        format!("/oauth2/{mcp_as}/v1/token"),
        "exchange at the backend AS"
    );
    assert_eq!(config["audiences"], json!(["mcpserver"]));
    assert_eq!(config["exchange"]["audience"], "backend");
    assert_eq!(config["exchange"]["scope"], "backend-api:read");
}

/// The deployment guide names configuration fields (`exchange.audience`, …): each must be one
/// the filter's parser knows, or readers get "unknown field" from Envoy.
#[test]
fn guide_names_only_existing_config_fields() {
    let guide = std::fs::read_to_string(envoy_dir().join("README.md")).expect("envoy/README.md");
    let docs: Vec<Value> = all_documents()
        .into_iter()
        .find(|(p, _)| p.ends_with("okta.yaml"))
        .map(|(_, d)| d)
        .expect("okta.yaml");
    let mut plugins = Vec::new();
    wasm_plugin_configs(&docs[0], &mut plugins);
    let base: Value =
        serde_json::from_str(str_at(&plugins[0], "/configuration/value", "okta.yaml")).unwrap();
    parse_plugin_config(&base, "okta.yaml");

    let mut names = BTreeSet::new();
    for prefix in ["`exchange.", "`jwks."] {
        for (i, _) in guide.match_indices(prefix) {
            let rest = &guide[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].trim_end_matches('.').to_string());
        }
    }
    for top in ["issuer", "audiences", "required_scopes", "resource"] {
        assert!(
            guide.contains(&format!("`{top}`")),
            "the guide should map `{top}`"
        );
        names.insert(top.to_string());
    }
    assert!(names.len() > 10, "{names:?}");
    for name in &names {
        let mut config = base.clone();
        let (section, field) = match name.split_once('.') {
            Some((s, f)) => (Some(s), f),
            None => (None, name.as_str()),
        };
        let slot = match section {
            Some(s) => &mut config[s],
            None => &mut config,
        };
        if slot.get(field).is_none() {
            slot[field] = json!("probe");
        }
        let raw = serde_json::to_vec(&config).unwrap();
        if let Err(e) = mcp_token_exchange::config::parse_policy(&raw, &|_| Some("s".into())) {
            assert!(
                !e.reason.contains("unknown field"),
                "the guide names `{name}`, which the filter does not know: {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------------------------

const KNOWN_KINDS: &[(&str, &str)] = &[
    ("WasmPlugin", "extensions.istio.io/"),
    ("Telemetry", "telemetry.istio.io/"),
    ("IstioOperator", "install.istio.io/"),
    ("ServiceEntry", "networking.istio.io/"),
    ("DestinationRule", "networking.istio.io/"),
    ("EnvoyExtensionPolicy", "gateway.envoyproxy.io/v1alpha1"),
    ("EnvoyPatchPolicy", "gateway.envoyproxy.io/v1alpha1"),
    ("EnvoyProxy", "gateway.envoyproxy.io/v1alpha1"),
    ("HTTPRouteFilter", "gateway.envoyproxy.io/v1alpha1"),
    ("ClientTrafficPolicy", "gateway.envoyproxy.io/v1alpha1"),
    ("Gateway", "gateway.networking.k8s.io/"),
    ("HTTPRoute", "gateway.networking.k8s.io/"),
    ("VirtualService", "networking.istio.io/"),
    ("SecurityPolicy", "gateway.envoyproxy.io/v1alpha1"),
];

#[test]
fn kubernetes_manifests_are_well_formed() {
    let all = manifests();
    assert!(!all.is_empty(), "no Kubernetes manifests under envoy/");
    let mut names = BTreeSet::new();
    for (file, doc) in &all {
        let kind = str_at(doc, "/kind", file);
        let api = str_at(doc, "/apiVersion", file);
        let name = str_at(doc, "/metadata/name", file);
        let ns = str_at(doc, "/metadata/namespace", file);
        let (_, group) = KNOWN_KINDS
            .iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or_else(|| panic!("{file}: unexpected kind {kind} (add its checks here)"));
        assert!(
            api.starts_with(group),
            "{file}: {kind} has apiVersion {api}"
        );
        assert!(doc["spec"].is_object(), "{file}: {kind}/{name} has no spec");
        assert!(
            names.insert((kind.to_string(), ns.to_string(), name.to_string())),
            "{file}: {kind} {ns}/{name} defined twice"
        );
    }
    for kind in [
        "WasmPlugin",
        "ServiceEntry",
        "DestinationRule",
        "EnvoyExtensionPolicy",
        "EnvoyPatchPolicy",
        "VirtualService",
        "SecurityPolicy",
    ] {
        assert!(!of_kind(&all, kind).is_empty(), "no {kind} under envoy/");
    }
    // Envoy Gateway's listeners refuse escaped slashes and merge `//` (README "Threat model").
    let paths = of_kind(&all, "ClientTrafficPolicy");
    assert_eq!(
        paths.len(),
        1,
        "one ClientTrafficPolicy for the MCP Gateway"
    );
    let (file, policy) = paths[0];
    assert_eq!(
        policy["spec"]["path"]["escapedSlashesAction"], "RejectRequest",
        "{file}"
    );
    assert_eq!(
        policy["spec"]["path"]["disableMergeSlashes"], false,
        "{file}"
    );
    assert_eq!(policy["spec"]["targetRefs"][0]["kind"], "Gateway", "{file}");
}

/// The HTTPRoute / VirtualService path prefixes of a route's matches.
fn route_prefixes(route: &Value, pointer: &str) -> Vec<String> {
    route["matches"]
        .as_array()
        .or_else(|| route["match"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.pointer(pointer).and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// Browser MCP clients through Istio and Envoy Gateway: the CORS resource that goes with each
/// plugin covers the MCP endpoint and the resource metadata, with the same rules as the
/// bootstraps (exact origins, the MCP headers allowed and exposed, no credentials).
#[test]
fn browser_cors_goes_with_every_plugin_manifest() {
    let all = manifests();
    const METADATA: &str = "/.well-known/oauth-protected-resource";

    // Istio: a VirtualService for the plugin's public host with a corsPolicy on the routes of
    // the MCP path and the metadata.
    let services = of_kind(&all, "VirtualService");
    for (file, wp) in of_kind(&all, "WasmPlugin") {
        let what = format!("{file}: WasmPlugin {}", wp["metadata"]["name"]);
        let resource = str_at(&wp["spec"], "/pluginConfig/resource", &what);
        let (host, path) = resource
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .unwrap_or_else(|| panic!("{what}: resource {resource}"));
        let path = format!("/{path}");
        let (vfile, vs) = services
            .iter()
            .find(|(_, v)| names(&v["spec"]["hosts"]).contains(&host.to_string()))
            .unwrap_or_else(|| panic!("{what}: no VirtualService for {host} (CORS)"));
        let routes = vs["spec"]["http"].as_array().cloned().unwrap_or_default();
        for wanted in [path.as_str(), METADATA] {
            let what = format!("{vfile}: VirtualService route for {wanted}");
            let route = routes
                .iter()
                .find(|r| {
                    route_prefixes(r, "/uri/prefix")
                        .iter()
                        .any(|p| wanted.starts_with(p.as_str()))
                })
                .unwrap_or_else(|| panic!("{what}: none"));
            let cors = &route["corsPolicy"];
            let origins = cors["allowOrigins"]
                .as_array()
                .filter(|o| !o.is_empty())
                .unwrap_or_else(|| panic!("{what}: no corsPolicy.allowOrigins"));
            assert_exact_matchers(origins, &what);
            assert_cors_lists(
                &cors["allowMethods"],
                &cors["allowHeaders"],
                &cors["exposeHeaders"],
                &cors["allowCredentials"],
                &what,
            );
            assert_eq!(cors["unmatchedPreflights"], "IGNORE", "{what}");
        }
    }

    // Envoy Gateway: a SecurityPolicy with `cors` on the route the filter is attached to and on
    // the metadata route.
    let security = of_kind(&all, "SecurityPolicy");
    let cors_for = |ns: &str, route: &str| {
        security.iter().find(|(_, p)| {
            p["metadata"]["namespace"] == ns
                && p["spec"]["cors"].is_object()
                && p["spec"]["targetRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["kind"] == "HTTPRoute" && t["name"] == route)
        })
    };
    let mut routes: Vec<(String, String)> = Vec::new();
    for (file, ep) in of_kind(&all, "EnvoyExtensionPolicy") {
        let ns = str_at(ep, "/metadata/namespace", file).to_string();
        for t in ep["spec"]["targetRefs"].as_array().into_iter().flatten() {
            routes.push((ns.clone(), str_at(t, "/name", file).to_string()));
        }
    }
    for (_, r) in of_kind(&all, "HTTPRoute") {
        let serves_metadata = r["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                route_prefixes(rule, "/path/value")
                    .iter()
                    .any(|p| p == METADATA)
            });
        if serves_metadata {
            let ns = str_at(r, "/metadata/namespace", "HTTPRoute").to_string();
            routes.push((ns, str_at(r, "/metadata/name", "HTTPRoute").to_string()));
        }
    }
    assert!(routes.len() >= 2, "{routes:?}");
    for (ns, route) in routes {
        let what = format!("HTTPRoute {ns}/{route}");
        let (file, policy) =
            cors_for(&ns, &route).unwrap_or_else(|| panic!("{what}: no SecurityPolicy with cors"));
        let what = format!("{file}: {what}");
        let cors = &policy["spec"]["cors"];
        let origins = cors["allowOrigins"]
            .as_array()
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| panic!("{what}: no cors.allowOrigins"));
        for o in origins {
            assert_exact_origin(o.as_str().unwrap_or_default(), &what);
        }
        assert_cors_lists(
            &cors["allowMethods"],
            &cors["allowHeaders"],
            &cors["exposeHeaders"],
            &cors["allowCredentials"],
            &what,
        );
    }
}

/// The Istio outbound cluster name for a ServiceEntry host and port.
fn istio_cluster(host: &str, port: u64) -> String {
    format!("outbound|{port}||{host}")
}

#[test]
fn istio_wasmplugin_is_complete_and_its_config_loads() {
    let all = manifests();
    let plugins = of_kind(&all, "WasmPlugin");
    let entries = of_kind(&all, "ServiceEntry");
    let rules = of_kind(&all, "DestinationRule");
    for (file, wp) in plugins {
        let what = format!("{file}: WasmPlugin {}", wp["metadata"]["name"]);
        let spec = &wp["spec"];
        assert_eq!(spec["phase"], "AUTHN", "{what}");
        assert_eq!(spec["failStrategy"], "FAIL_CLOSE", "{what}");
        let url = str_at(spec, "/url", &what);
        assert!(url.starts_with("oci://"), "{what}: url {url}");
        let sha = str_at(spec, "/sha256", &what);
        assert!(
            is_sha256_hex(sha),
            "{what}: sha256 must be 64 lowercase hex: {sha:?}"
        );
        if let Some(policy) = spec.get("imagePullPolicy") {
            assert!(
                policy == "IfNotPresent" || policy == "Always",
                "{what}: {policy}"
            );
        }
        assert_eq!(
            spec["pluginName"], ROOT_ID,
            "{what}: pluginName is the root id"
        );
        if spec.get("selector").is_some() {
            // On a sidecar, only inbound requests: the MCP server's own outbound calls must not
            // be asked for an MCP token.
            let modes: Vec<&str> = spec["match"]
                .as_array()
                .map(|m| m.iter().filter_map(|x| x["mode"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(modes, ["SERVER"], "{what}: match mode");
        }

        let config = &spec["pluginConfig"];
        parse_plugin_config(config, &what);
        let secret_env = str_at(config, "/exchange/client_secret_env", &what);
        let env = spec
            .pointer("/vmConfig/env")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{what}: no vmConfig.env"));
        let host_keys: BTreeSet<String> = env
            .iter()
            .filter(|e| e["valueFrom"] == "HOST")
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect();
        assert!(
            host_keys.contains(secret_env),
            "{what}: vmConfig.env must take {secret_env} from the HOST"
        );
        assert!(
            env.iter().all(|e| e.get("value").is_none()),
            "{what}: no inline env values (secrets come from the proxy's environment)"
        );

        // Callout clusters: the ones Istio generates for a ServiceEntry port, TLS originated
        // by a DestinationRule. Rebuild them as Istio would and validate the whole thing.
        let mut clusters = Vec::new();
        for name in callout_clusters(config) {
            let parts: Vec<&str> = name.split('|').collect();
            assert!(
                parts.len() == 4 && parts[0] == "outbound" && parts[2].is_empty(),
                "{what}: {name:?} is not an Istio outbound cluster name"
            );
            let port: u64 = parts[1].parse().expect("port");
            let host = parts[3];
            assert_eq!(istio_cluster(host, port), name);
            assert!(
                entries.iter().any(|(_, se)| {
                    se["spec"]["hosts"]
                        .as_array()
                        .is_some_and(|h| h.contains(&json!(host)))
                        && se["spec"]["ports"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().any(|p| p["number"] == port))
                        && se["spec"]["location"] == "MESH_EXTERNAL"
                }),
                "{what}: no MESH_EXTERNAL ServiceEntry for {host}:{port}"
            );
            for pointer in ["/jwks/authority", "/exchange/authority"] {
                if config.pointer(pointer).is_some() {
                    assert_eq!(str_at(config, pointer, &what), host, "{what}: {pointer}");
                }
            }
            let tls = rules
                .iter()
                .filter(|(_, dr)| dr["spec"]["host"] == host)
                .find_map(|(_, dr)| {
                    let tp = &dr["spec"]["trafficPolicy"];
                    tp["portLevelSettings"]
                        .as_array()
                        .and_then(|ps| {
                            ps.iter()
                                .find(|p| p["port"]["number"] == port)
                                .map(|p| p["tls"].clone())
                        })
                        .or_else(|| tp.get("tls").cloned())
                })
                .unwrap_or_else(|| panic!("{what}: no DestinationRule TLS for {host}:{port}"));
            assert_eq!(tls["mode"], "SIMPLE", "{what}: TLS origination");
            assert_eq!(tls["sni"], host, "{what}: sni");
            let sans = tls["subjectAltNames"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(sans.contains(&json!(host)), "{what}: subjectAltNames");
            let ca = str_at(&tls, "/caCertificates", &what);
            clusters.push(json!({
                "name": name,
                "type": "STRICT_DNS",
                "connect_timeout": "5s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": TLS_TYPE,
                    "sni": host,
                    "common_tls_context": {"validation_context": {
                        "trusted_ca": {"filename": ca},
                        "match_typed_subject_alt_names": sans.iter().map(|s| json!({
                            "san_type": "DNS", "matcher": {"exact": s}})).collect::<Vec<_>>(),
                    }},
                }},
            }));
        }
        assert!(!clusters.is_empty(), "{what}: no callout clusters");
        let bootstrap = synthetic_bootstrap(config, &host_keys, clusters);
        validate_synthetic(&bootstrap, &host_keys, "istio", &what);
    }
}

#[test]
fn envoy_gateway_policy_is_complete_and_its_config_loads() {
    let all = manifests();
    let policies = of_kind(&all, "EnvoyExtensionPolicy");
    let patches = of_kind(&all, "EnvoyPatchPolicy");
    let routes: BTreeSet<(String, String)> = of_kind(&all, "HTTPRoute")
        .iter()
        .map(|(_, r)| {
            (
                r["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                r["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let gateways: BTreeSet<(String, String)> = of_kind(&all, "Gateway")
        .iter()
        .map(|(_, g)| {
            (
                g["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                g["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();

    // Clusters added by EnvoyPatchPolicy (`op: add` with an empty path = a whole resource).
    let mut added: BTreeMap<String, Value> = BTreeMap::new();
    for (file, p) in &patches {
        let what = format!("{file}: EnvoyPatchPolicy {}", p["metadata"]["name"]);
        assert_eq!(p["spec"]["type"], "JSONPatch", "{what}");
        let target = &p["spec"]["targetRef"];
        assert_eq!(target["kind"], "Gateway", "{what}");
        let ns = str_at(p, "/metadata/namespace", &what).to_string();
        assert!(
            gateways.contains(&(ns, str_at(target, "/name", &what).to_string())),
            "{what}: targets a Gateway not defined here (same namespace)"
        );
        for patch in p["spec"]["jsonPatches"].as_array().expect("jsonPatches") {
            if patch["type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
                && patch["operation"]["op"] == "add"
                && patch["operation"]["path"] == ""
            {
                let cluster = patch["operation"]["value"].clone();
                let name = str_at(&cluster, "/name", &what).to_string();
                assert_eq!(patch["name"], name, "{what}");
                let (host, port) = cluster_address(&cluster);
                assert_eq!(port, 443, "{what}");
                assert_tls_to(&cluster, &host, &format!("{what}: cluster {name}"));
                added.insert(name, cluster);
            }
        }
    }

    // The secret reaches the Envoy container through EnvoyProxy.
    let proxy_env: BTreeSet<String> = of_kind(&all, "EnvoyProxy")
        .iter()
        .flat_map(|(_, p)| {
            p.pointer("/spec/provider/kubernetes/envoyDeployment/container/env")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter(|e| e.pointer("/valueFrom/secretKeyRef/name").is_some())
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();

    assert!(!policies.is_empty());
    for (file, policy) in policies {
        let what = format!(
            "{file}: EnvoyExtensionPolicy {}",
            policy["metadata"]["name"]
        );
        let ns = str_at(policy, "/metadata/namespace", &what).to_string();
        for target in policy["spec"]["targetRefs"].as_array().expect("targetRefs") {
            let name = str_at(target, "/name", &what).to_string();
            match target["kind"].as_str() {
                Some("HTTPRoute") => assert!(
                    routes.contains(&(ns.clone(), name.clone())),
                    "{what}: HTTPRoute {name} is not defined here"
                ),
                Some("Gateway") => assert!(gateways.contains(&(ns.clone(), name.clone()))),
                other => panic!("{what}: unexpected target kind {other:?}"),
            }
        }
        let wasm = policy["spec"]["wasm"].as_array().expect("spec.wasm");
        assert_eq!(wasm.len(), 1, "{what}");
        let w = &wasm[0];
        assert_eq!(w["rootID"], ROOT_ID, "{what}");
        assert_eq!(w["failOpen"], false, "{what}: must fail closed");
        assert_eq!(w["code"]["type"], "Image", "{what}");
        let url = str_at(w, "/code/image/url", &what);
        assert!(
            !url.contains("://"),
            "{what}: image url is registry/repo:tag, got {url}"
        );
        assert!(
            url.contains(':') || url.contains('@'),
            "{what}: pin a tag or digest: {url}"
        );
        let sha = str_at(w, "/code/image/sha256", &what);
        assert!(
            is_sha256_hex(sha),
            "{what}: sha256 must be 64 lowercase hex: {sha:?}"
        );
        let config = &w["config"];
        parse_plugin_config(config, &what);
        let secret_env = str_at(config, "/exchange/client_secret_env", &what);
        let host_keys: BTreeSet<String> = w["env"]["hostKeys"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            host_keys.contains(secret_env),
            "{what}: env.hostKeys must pass {secret_env}"
        );
        assert!(
            proxy_env.contains(secret_env),
            "{what}: no EnvoyProxy puts {secret_env} into the Envoy container from a Secret"
        );
        let mut clusters = Vec::new();
        for name in callout_clusters(config) {
            let cluster = added.get(&name).unwrap_or_else(|| {
                panic!("{what}: callout cluster {name:?} is not added by an EnvoyPatchPolicy")
            });
            let (host, _) = cluster_address(cluster);
            assert_eq!(config["exchange"]["authority"], host, "{what}: authority");
            clusters.push(cluster.clone());
        }
        let bootstrap = synthetic_bootstrap(config, &host_keys, clusters);
        validate_synthetic(&bootstrap, &host_keys, "envoy-gateway", &what);
    }
}

// ---------------------------------------------------------------------------------------------
// The OCI image
// ---------------------------------------------------------------------------------------------

struct Built {
    stdout: String,
    manifest_sha256: String,
    module_sha256: String,
}

fn run_oci_image(args: &[&str]) -> Built {
    let out = Command::new(env!("CARGO_BIN_EXE_oci-image"))
        .args(args)
        .output()
        .expect("run oci-image");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "oci-image failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {key} in:\n{stdout}"))
            .to_string()
    };
    Built {
        manifest_sha256: field("manifest-sha256:"),
        module_sha256: field("module-sha256:"),
        stdout,
    }
}

/// Every regular file under `dir`, by relative path.
fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn tar_files(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path().expect("path").display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read entry");
        out.insert(name, data);
    }
    out
}

/// A descriptor's blob, checked: the file exists, its digest is its name and its size is the
/// descriptor's.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, descriptor: &Value) -> &'a [u8] {
    let digest = str_at(descriptor, "/digest", "descriptor");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest} is not sha256"));
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("blob {digest} missing"));
    assert_eq!(descriptor["size"], bytes.len(), "size of {digest}");
    bytes
}

/// What Istio's (and Envoy Gateway's) image fetcher does with a manifest: the docker and
/// compat variants want a tar+gzip last layer; the oci variant wants exactly two layers, one of
/// them the raw module. Returns the module bytes it would load.
fn fetcher_would_load(manifest: &Value, files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let layers = manifest["layers"].as_array().expect("layers");
    let last = layers.last().expect("at least one layer");
    if last["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip" {
        let gz = blob(files, last);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut tar)
            .expect("gunzip");
        return tar_files(&tar)
            .into_iter()
            .find(|(name, _)| name.rsplit('/').next() == Some("plugin.wasm"))
            .map(|(_, data)| data)
            .expect("plugin.wasm in the layer");
    }
    assert_eq!(layers.len(), 2, "oci variant: number of layers must be 2");
    let wasm = layers
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm")
        .expect("a layer of type application/vnd.module.wasm.content.layer.v1+wasm");
    blob(files, wasm).to_vec()
}

/// Checks an image layout on disk (and its tarball) without the code that wrote it. Returns
/// the manifest.
fn check_layout(dir: &Path, tarball: &Path, tag: &str, built: &Built, wasm: &[u8]) -> Value {
    let files = files_under(dir);
    assert_eq!(
        serde_json::from_slice::<Value>(&files["oci-layout"]).expect("oci-layout json"),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    for (name, bytes) in &files {
        match name.strip_prefix("blobs/sha256/") {
            Some(hex) => assert_eq!(sha256_hex(bytes), hex, "blob {name}: digest != name"),
            None => assert!(
                name == "oci-layout" || name == "index.json",
                "stray file {name}"
            ),
        }
    }

    let index: Value = serde_json::from_slice(&files["index.json"]).expect("index.json");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1);
    let desc = &manifests[0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        desc["digest"],
        format!("sha256:{}", built.manifest_sha256),
        "index points at the printed manifest digest"
    );
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"],
        tag
    );
    let manifest: Value = serde_json::from_slice(blob(&files, desc)).expect("manifest json");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    blob(&files, &manifest["config"]);
    for layer in manifest["layers"].as_array().expect("layers") {
        blob(&files, layer);
    }

    assert!(is_sha256_hex(&built.manifest_sha256));
    assert_eq!(
        built.module_sha256,
        sha256_hex(wasm),
        "printed module digest"
    );
    assert_eq!(
        fetcher_would_load(&manifest, &files),
        wasm,
        "the module Envoy would run"
    );

    let tarred = tar_files(&std::fs::read(tarball).expect("tarball"));
    assert_eq!(
        tarred.keys().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>(),
        "tarball holds the layout"
    );
    assert!(tarred == files, "tarball bytes equal the layout's");
    manifest
}

#[test]
fn oci_image_layout_is_what_istio_accepts() {
    let wasm_path = filter_wasm().expect("filter module (make wasm)");
    let wasm = std::fs::read(&wasm_path).expect("read module");
    let dir = temp_dir("oci");
    let layout = dir.join("layout");
    let tarball = dir.join("image.oci.tar");
    let wasm_arg = wasm_path.display().to_string();
    let args = |out: &Path, tar: &Path| {
        vec![
            "--wasm".to_string(),
            wasm_arg.clone(),
            "--out".into(),
            out.display().to_string(),
            "--tar".into(),
            tar.display().to_string(),
            "--version".into(),
            "1.2.3".into(),
            "--revision".into(),
            "0123456789ab".into(),
        ]
    };
    let a = args(&layout, &tarball);
    let built = run_oci_image(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        built.stdout.contains("WasmPlugin.sha256"),
        "{}",
        built.stdout
    );
    let manifest = check_layout(&layout, &tarball, "1.2.3", &built, &wasm);

    // The oci variant: config blob of the Wasm config type, also the first of exactly two
    // layers; the second layer is the raw module.
    let files = files_under(&layout);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.module.wasm.config.v1+json"
    );
    let config: Value =
        serde_json::from_slice(blob(&files, &manifest["config"])).expect("config json");
    assert_eq!(config["type"], "envoy_proxy");
    assert_eq!(config["config"]["rootIds"], json!([ROOT_ID]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["digest"], manifest["config"]["digest"]);
    assert_eq!(layers[0]["mediaType"], manifest["config"]["mediaType"]);
    assert_eq!(
        layers[1]["mediaType"],
        "application/vnd.module.wasm.content.layer.v1+wasm"
    );
    assert_eq!(layers[1]["digest"], format!("sha256:{}", sha256_hex(&wasm)));
    assert_eq!(layers[1]["size"], wasm.len());
    let annotations = &manifest["annotations"];
    assert_eq!(annotations["org.opencontainers.image.version"], "1.2.3");
    assert_eq!(
        annotations["org.opencontainers.image.revision"],
        "0123456789ab"
    );

    // Deterministic: the same inputs give the same digest (so a rebuild can be checked against
    // a published WasmPlugin.sha256).
    let again = run_oci_image(
        &args(&dir.join("again"), &dir.join("again.tar"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(again.manifest_sha256, built.manifest_sha256);
    assert_eq!(
        std::fs::read(&tarball).unwrap(),
        std::fs::read(dir.join("again.tar")).unwrap()
    );

    // An existing non-empty output directory is refused, not mixed into.
    let out = Command::new(env!("CARGO_BIN_EXE_oci-image"))
        .args(a.iter().map(String::as_str))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn oci_image_compat_variant_holds_plugin_wasm() {
    let wasm_path = filter_wasm().expect("filter module (make wasm)");
    let wasm = std::fs::read(&wasm_path).expect("read module");
    let dir = temp_dir("oci-compat");
    let layout = dir.join("layout");
    let tarball = dir.join("image.tar");
    let built = run_oci_image(&[
        "--wasm",
        &wasm_path.display().to_string(),
        "--variant",
        "compat",
        "--out",
        &layout.display().to_string(),
        "--tar",
        &tarball.display().to_string(),
        "--tag",
        "v9",
    ]);
    let manifest = check_layout(&layout, &tarball, "v9", &built, &wasm);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"],
        "compat"
    );
    let files = files_under(&layout);
    let config: Value =
        serde_json::from_slice(blob(&files, &manifest["config"])).expect("config json");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(blob(&files, &layers[0]))
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([format!("sha256:{}", sha256_hex(&tar))])
    );
    assert_eq!(tar_files(&tar).keys().collect::<Vec<_>>(), ["plugin.wasm"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The module's exports
// ---------------------------------------------------------------------------------------------

fn leb_u32(bytes: &[u8], at: &mut usize) -> u32 {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("LEB128 value too long at byte {at}");
}

/// The names a Wasm binary exports (its export section, id 7).
fn export_names(wasm: &[u8]) -> BTreeSet<String> {
    assert_eq!(&wasm[..4], b"\0asm", "not a Wasm binary");
    let mut at = 8;
    let mut names = BTreeSet::new();
    while at < wasm.len() {
        let id = wasm[at];
        at += 1;
        let size = leb_u32(wasm, &mut at) as usize;
        let end = at + size;
        if id == 7 {
            let count = leb_u32(wasm, &mut at);
            for _ in 0..count {
                let len = leb_u32(wasm, &mut at) as usize;
                names.insert(String::from_utf8_lossy(&wasm[at..at + len]).into_owned());
                at += len + 1; // name, kind
                leb_u32(wasm, &mut at); // index
            }
        }
        at = end;
    }
    names
}

/// The SDK trait methods and the ABI export that Envoy calls for each.
const CALLBACKS: &[(&str, &str)] = &[
    ("on_vm_start", "proxy_on_vm_start"),
    ("on_configure", "proxy_on_configure"),
    ("on_tick", "proxy_on_tick"),
    ("on_queue_ready", "proxy_on_queue_ready"),
    ("on_http_call_response", "proxy_on_http_call_response"),
    ("on_grpc_call_response", "proxy_on_grpc_receive"),
    ("on_http_request_headers", "proxy_on_request_headers"),
    ("on_http_request_body", "proxy_on_request_body"),
    ("on_http_request_trailers", "proxy_on_request_trailers"),
    ("on_http_response_headers", "proxy_on_response_headers"),
    ("on_http_response_body", "proxy_on_response_body"),
    ("on_http_response_trailers", "proxy_on_response_trailers"),
    ("on_log", "proxy_on_log"),
    ("on_done", "proxy_on_done"),
    ("on_new_connection", "proxy_on_new_connection"),
    ("on_downstream_data", "proxy_on_downstream_data"),
    ("on_upstream_data", "proxy_on_upstream_data"),
];

#[test]
fn modules_export_exactly_the_callbacks_the_filter_handles() {
    // The Makefile removes the exports of callbacks the filter does not handle (Envoy then skips
    // them instead of calling into the VM per request). A callback the filter implements must
    // still be exported, or Envoy would silently never call it.
    // The proxy-wasm contexts: only they implement SDK callbacks (gateway.rs has methods of the
    // same names that the contexts call).
    let mut source = String::new();
    for file in ["filter/src/root.rs", "filter/src/http.rs"] {
        source += &std::fs::read_to_string(workspace_root().join(file)).expect("read source");
    }
    let full = gateway_tests::harness::full_filter_wasm().expect("full module (make wasm-full)");
    for module in [filter_wasm().expect("filter module (make wasm)"), full] {
        let exports = export_names(&std::fs::read(&module).expect("read module"));
        let what = module.display();
        for (method, export) in CALLBACKS {
            let handled = source.contains(&format!("fn {method}("));
            assert_eq!(
                exports.contains(*export),
                handled,
                "{what}: {export} exported = {}, but the filter {} `{method}`",
                exports.contains(*export),
                if handled {
                    "implements"
                } else {
                    "does not implement"
                }
            );
        }
        for always in [
            "proxy_on_context_create",
            "proxy_on_delete",
            "proxy_on_memory_allocate",
            "proxy_abi_version_0_2_1",
        ] {
            assert!(exports.contains(always), "{what}: {always} missing");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The audit access log
// ---------------------------------------------------------------------------------------------

/// Every HTTP connection manager's access logs.
fn access_logs(bootstrap: &Value) -> Vec<&Value> {
    http_connection_managers(bootstrap)
        .into_iter()
        .map(|hcm| &hcm["access_log"])
        .collect()
}

/// Where each shipped setup's audit records go. The bootstraps keep the default sink (Envoy's
/// log at `info`, batched; Envoy runs at `info` there) and configure no access log for the
/// records, which would write an empty line per request. Istio's sidecars and Envoy Gateway's
/// Envoys log at `warning`, which drops `info` lines: their plugin configurations choose
/// `access_log`, and the access log that writes it ships with them (Istio: provider +
/// Telemetry; Envoy Gateway: EnvoyProxy), both with the CEL filter; real Envoy accepts the
/// platforms' format and expression.
#[test]
fn every_setup_writes_its_audit_records() {
    let mut bootstraps = 0;
    for (path, docs) in all_documents() {
        // The front tier (envoy/fleet/front-*) runs no filter of ours: nothing to audit there.
        if !is_bootstrap(&docs) || rel(&path).starts_with("envoy/fleet/front-") {
            continue;
        }
        bootstraps += 1;
        let what = rel(&path);
        let mut plugins = Vec::new();
        wasm_plugin_configs(&docs[0], &mut plugins);
        for plugin in &plugins {
            let raw = str_at(plugin, "/configuration/value", &what);
            let config: Value = serde_json::from_str(raw).expect("plugin configuration");
            assert_eq!(
                parse_plugin_config(&config, &what).audit_log,
                AuditLog::EnvoyLogBatched,
                "{what}: the default sink"
            );
        }
        let logs = access_logs(&docs[0]);
        assert!(!logs.is_empty(), "{what}: no http_connection_manager");
        for logs in logs {
            let audit = logs.as_array().into_iter().flatten().find(|l| {
                l.pointer("/typed_config/log_format/text_format_source/inline_string")
                    == Some(&json!(AUDIT_FORMAT))
            });
            assert!(
                audit.is_none(),
                "{what}: an access log for records the default sink does not hand to it"
            );
        }
    }
    assert!(bootstraps >= 2);

    let all = manifests();
    let istio: Vec<&Value> = of_kind(&all, "WasmPlugin")
        .iter()
        .map(|(_, wp)| &wp["spec"]["pluginConfig"])
        .collect();
    let envoy_gateway: Vec<&Value> = of_kind(&all, "EnvoyExtensionPolicy")
        .iter()
        .flat_map(|(_, ep)| ep["spec"]["wasm"].as_array().into_iter().flatten())
        .map(|w| &w["config"])
        .collect();
    assert!(!istio.is_empty() && !envoy_gateway.is_empty());
    for config in istio.iter().chain(&envoy_gateway) {
        assert_eq!(
            parse_plugin_config(config, "a platform's plugin").audit_log,
            AuditLog::AccessLog,
            "the platforms log at warning: their records go to the access log"
        );
    }

    // Istio: a provider with the format, turned on by a Telemetry with the filter.
    let providers: Vec<&Value> = of_kind(&all, "IstioOperator")
        .iter()
        .flat_map(|(_, op)| {
            op.pointer("/spec/meshConfig/extensionProviders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(|p| p.pointer("/envoyFileAccessLog/logFormat/text") == Some(&json!(AUDIT_FORMAT)))
        .collect();
    assert_eq!(
        providers.len(),
        1,
        "one Istio provider writes the audit record"
    );
    let provider = str_at(providers[0], "/name", "Istio audit provider");
    let turned_on = of_kind(&all, "Telemetry").iter().any(|(_, t)| {
        t["spec"]["accessLogging"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| {
                a["filter"]["expression"] == AUDIT_EXPRESSION
                    && a["providers"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == provider))
            })
    });
    assert!(
        turned_on,
        "a Telemetry turns on {provider} with the CEL filter"
    );

    // Envoy Gateway: the EnvoyProxy's access log setting.
    let eg_settings: Vec<&Value> = of_kind(&all, "EnvoyProxy")
        .iter()
        .flat_map(|(_, p)| {
            p.pointer("/spec/telemetry/accessLog/settings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(|s| s["format"]["type"] == "Text" && s["format"]["text"] == AUDIT_FORMAT)
        .collect();
    assert_eq!(
        eg_settings.len(),
        1,
        "one EnvoyProxy access log writes the audit record"
    );
    assert_eq!(eg_settings[0]["matches"], json!([AUDIT_EXPRESSION]));
    assert_eq!(eg_settings[0]["sinks"][0]["type"], "File");

    // The strings the platforms hand to Envoy: a real Envoy accepts them (demo.yaml with its
    // audit access log rebuilt from them).
    let docs = all_documents()
        .into_iter()
        .find(|(p, _)| p.ends_with("demo.yaml"))
        .map(|(_, d)| d)
        .expect("demo.yaml");
    let mut bootstrap = docs[0].clone();
    let format = str_at(providers[0], "/envoyFileAccessLog/logFormat/text", "Istio");
    let expression = str_at(eg_settings[0], "/matches/0", "Envoy Gateway");
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["access_log"] = json!([{
        "name": "platform_audit",
        "filter": {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/null",
            "log_format": {"text_format_source": {"inline_string": format}},
        },
    }]);
    let wasm = filter_wasm().expect("filter module (make wasm)");
    let text = serde_json::to_string(&bootstrap)
        .expect("json")
        .replace(WASM_REL, &wasm.display().to_string());
    let dir = temp_dir("audit-log");
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, text).expect("write");
    let keys = BTreeSet::from(["TOKEN_EXCHANGE_CLIENT_SECRET".to_string()]);
    envoy_validate(&path, &dir, &keys, "the platforms' audit access log");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fleet store as envoy/README.md configures it ("A fleet of Envoys"): `fleet_store` in the
/// plugin configuration, an HTTP/1.1 cluster for etcd, the store key from the host's
/// environment. Added to `envoy/okta.yaml`, it passes `envoy --mode validate`.
#[test]
fn a_fleet_store_configuration_validates() {
    let (path, docs) = all_documents()
        .into_iter()
        .find(|(p, _)| p.ends_with("okta.yaml") && p.parent() == Some(envoy_dir().as_path()))
        .expect("envoy/okta.yaml");
    let what = format!("{} + fleet_store", rel(&path));
    let mut bootstrap = docs[0].clone();
    let filters = bootstrap
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .and_then(Value::as_array_mut)
        .expect("http_filters");
    let plugin = filters
        .iter_mut()
        .find(|f| f["name"] == ROOT_ID)
        .map(|f| &mut f["typed_config"]["config"])
        .expect("the filter");
    let mut config: Value =
        serde_json::from_str(str_at(plugin, "/configuration/value", &what)).expect("json");
    config["fleet_store"] = json!({"cluster": "etcd", "secret_env": "MCP_GATEWAY_STORE_KEY"});
    plugin["configuration"]["value"] = Value::String(config.to_string());
    plugin["vm_config"]["environment_variables"]["host_env_keys"]
        .as_array_mut()
        .expect("host_env_keys")
        .push(json!("MCP_GATEWAY_STORE_KEY"));
    let env_keys: BTreeSet<String> = plugin["vm_config"]["environment_variables"]["host_env_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .push(json!({
            "name": "etcd", "type": "STRICT_DNS", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "etcd", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "etcd.internal", "port_value": 2379}}}}]}]}
        }));
    let wasm = filter_wasm().expect("filter module (make wasm)");
    let text = serde_json::to_string(&bootstrap)
        .expect("json")
        .replace(WASM_REL, &wasm.display().to_string());
    let dir = temp_dir("fleet-store");
    let copy = dir.join("okta-fleet.json");
    std::fs::write(&copy, text).expect("write");
    envoy_validate(&copy, &dir, &env_keys, &what);
    let _ = std::fs::remove_dir_all(&dir);
}
