//! Edits of Envoy's bootstrap (`envoy/demo.yaml` as JSON) for a test stack: ports, clusters,
//! routes, the plugin's configuration, the audit access log, CORS and path normalisation. The
//! suite changes only these, so it tests the configuration `make run` uses.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use crate::harness::{workspace_root, ConfigDelivery};

pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Loads `envoy/demo.yaml` as JSON.
pub fn demo_config() -> anyhow::Result<Value> {
    let path = workspace_root().join("envoy/demo.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The wasm filter's `config` object inside a bootstrap.
pub fn wasm_filter_config(bootstrap: &mut Value) -> anyhow::Result<&mut Value> {
    bootstrap
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .and_then(Value::as_array_mut)
        .and_then(|filters| {
            filters
                .iter_mut()
                .find(|f| f["name"] == "mcp_token_exchange")
        })
        .map(|f| &mut f["typed_config"]["config"])
        .ok_or_else(|| anyhow!("envoy/demo.yaml has no mcp_token_exchange filter"))
}

/// The plugin's JSON configuration inside a bootstrap.
pub fn plugin_config(bootstrap: &mut Value) -> anyhow::Result<Value> {
    let raw = wasm_filter_config(bootstrap)?["configuration"]["value"]
        .as_str()
        .ok_or_else(|| anyhow!("plugin configuration is not a string"))?
        .to_string();
    serde_json::from_str(&raw).context("plugin configuration is not JSON")
}

/// The access log of envoy/README.md that writes the filter's audit record (`"audit_log":
/// "access_log"`), into `path`. The shipped bootstraps use the default sink, Envoy's log.
pub(crate) fn add_audit_access_log(bootstrap: &mut Value, path: &Path) -> anyhow::Result<()> {
    let hcm = bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("envoy/demo.yaml has no http_connection_manager"))?;
    let logs = hcm
        .entry("access_log")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| anyhow!("access_log is not a list"))?;
    logs.push(serde_json::json!({
        "name": "mcp_token_exchange_audit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.display().to_string(),
            "log_format": {
                "text_format_source": {
                    "inline_string": "%FILTER_STATE(wasm.mcp_token_exchange.audit:PLAIN)%\n"
                },
                "omit_empty_values": true
            }
        }
    }));
    Ok(())
}

pub(crate) fn set_cluster_port(
    bootstrap: &mut Value,
    cluster: &str,
    port: u16,
) -> anyhow::Result<()> {
    let clusters = bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("no clusters"))?;
    let c = clusters
        .iter_mut()
        .find(|c| c["name"] == cluster)
        .ok_or_else(|| anyhow!("no cluster {cluster}"))?;
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"]["port_value"] = port.into();
    Ok(())
}

/// Rewrites `127.0.0.1:9400` (the demo IdP) to the test IdP's port in every string.
pub(crate) fn retarget_idp(value: &mut Value, port: u16) {
    replace_in_strings(value, "127.0.0.1:9400", &format!("127.0.0.1:{port}"));
}

pub(crate) fn replace_in_strings(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(s) => *s = s.replace(from, to),
        Value::Array(a) => a.iter_mut().for_each(|v| replace_in_strings(v, from, to)),
        Value::Object(o) => o.values_mut().for_each(|v| replace_in_strings(v, from, to)),
        _ => {}
    }
}

/// A STATIC cluster `name` at a loopback port (HTTP/1.1: etcd's JSON API refuses plain h2c).
pub fn add_static_cluster(bootstrap: &mut Value, name: &str, port: u16) -> anyhow::Result<()> {
    bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("no clusters"))?
        .push(serde_json::json!({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
        }));
    Ok(())
}

/// One cluster and one route (before the catch-all) per extra upstream.
pub(crate) fn add_extra_routes(
    bootstrap: &mut Value,
    extra: &[(String, u16)],
) -> anyhow::Result<()> {
    for (i, (prefix, port)) in extra.iter().enumerate() {
        let name = format!("mcp_extra_{i}");
        let clusters = bootstrap
            .pointer_mut("/static_resources/clusters")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| anyhow!("no clusters"))?;
        clusters.push(serde_json::json!({
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
        }));
        let routes = bootstrap
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| anyhow!("no routes"))?;
        routes.insert(
            0,
            serde_json::json!({"match": {"prefix": prefix}, "route": {"cluster": name, "prefix_rewrite": "/", "timeout": "0s"}}),
        );
    }
    Ok(())
}

/// The name of Envoy's CORS filter, which is also the key of its per-route policy.
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// The CORS policy (`envoy.extensions.filters.http.cors.v3.CorsPolicy`) of the demo's virtual
/// host.
pub fn cors_policy(bootstrap: &mut Value) -> anyhow::Result<&mut Value> {
    bootstrap
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/typed_per_filter_config",
        )
        .and_then(|per_filter| per_filter.get_mut(CORS_FILTER))
        .ok_or_else(|| anyhow!("envoy/demo.yaml has no CORS policy on its virtual host"))
}

/// The HCM fields with which Envoy normalises paths before any filter sees them.
pub const ENVOY_PATH_NORMALISATION: [&str; 3] = [
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
];

pub(crate) fn remove_path_normalisation(bootstrap: &mut Value) -> anyhow::Result<()> {
    let hcm = bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("no http_connection_manager"))?;
    for field in ENVOY_PATH_NORMALISATION {
        if hcm.remove(field).is_none() {
            bail!("envoy/demo.yaml does not set {field}");
        }
    }
    Ok(())
}

/// The file Envoy watches for the plugin configuration, and the resource around it.
pub(crate) struct DynamicConfig {
    pub(crate) delivery: ConfigDelivery,
    /// The watched file: an xDS `DiscoveryResponse` (JSON) with one resource.
    pub(crate) path: PathBuf,
    /// The resource with the plugin configuration left as it was at start: the listener (LDS)
    /// or the filter's `TypedExtensionConfig` (ECDS).
    pub(crate) resource: Value,
    /// The plugin configuration in force (last written), as JSON.
    pub(crate) plugin: Value,
    /// `{gateway}` and `{idp}` in a pushed patch stand for these.
    pub(crate) gateway_url: String,
    pub(crate) idp_url: String,
    pub(crate) version: u64,
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const EXTENSION_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The name under which the filter is discovered (ECDS resource name = the filter's name).
const FILTER_NAME: &str = "mcp_token_exchange";

impl DynamicConfig {
    /// The `DiscoveryResponse` carrying `plugin` as the filter's configuration.
    fn render(&self, plugin: &Value) -> anyhow::Result<Value> {
        let mut resource = self.resource.clone();
        let (wasm, type_url) = match self.delivery {
            ConfigDelivery::Lds => (
                resource
                    .pointer_mut("/filter_chains/0/filters/0/typed_config/http_filters")
                    .and_then(Value::as_array_mut)
                    .and_then(|f| f.iter_mut().find(|f| f["name"] == FILTER_NAME))
                    .map(|f| &mut f["typed_config"]["config"])
                    .ok_or_else(|| anyhow!("the listener has no {FILTER_NAME} filter"))?,
                LISTENER_TYPE,
            ),
            ConfigDelivery::Ecds => (
                &mut resource["typed_config"]["config"],
                EXTENSION_CONFIG_TYPE,
            ),
            ConfigDelivery::Static => bail!("a static configuration is not rewritten"),
        };
        wasm["configuration"]["value"] = Value::String(plugin.to_string());
        resource["@type"] = Value::String(type_url.into());
        Ok(serde_json::json!({
            "version_info": self.version.to_string(),
            "resources": [resource],
        }))
    }

    /// Writes the file next to its final place, then renames it there: Envoy reloads a watched
    /// path when a file is moved onto it (an in-place write is not seen, and a half-written file
    /// must never be read).
    pub(crate) fn write(&mut self, plugin: &Value) -> anyhow::Result<()> {
        self.version += 1;
        let doc = self.render(plugin)?;
        let tmp = self.path.with_extension(format!("tmp{}", self.version));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(&tmp, &self.path)?;
        self.plugin = plugin.clone();
        Ok(())
    }
}

/// Moves the listener (LDS) or the filter's configuration (ECDS) out of the bootstrap into the
/// watched file `path`, and points the bootstrap at it.
pub(crate) fn make_dynamic(
    bootstrap: &mut Value,
    delivery: ConfigDelivery,
    path: &Path,
) -> anyhow::Result<Value> {
    let path_source = serde_json::json!({
        "path_config_source": {"path": path.display().to_string()},
        "resource_api_version": "V3",
    });
    match delivery {
        ConfigDelivery::Static => bail!("nothing to make dynamic"),
        ConfigDelivery::Lds => {
            let listeners = bootstrap
                .pointer_mut("/static_resources/listeners")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| anyhow!("no listeners"))?;
            let listener = listeners.remove(0);
            if !listeners.is_empty() {
                bail!("envoy/demo.yaml has more than one listener");
            }
            if let Some(o) = bootstrap["static_resources"].as_object_mut() {
                o.remove("listeners");
            }
            bootstrap["dynamic_resources"] = serde_json::json!({ "lds_config": path_source });
            bootstrap["node"] = serde_json::json!({"id": "mcp-gw-e2e", "cluster": "mcp-gw-e2e"});
            Ok(listener)
        }
        ConfigDelivery::Ecds => {
            let filters = bootstrap
                .pointer_mut(
                    "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
                )
                .and_then(Value::as_array_mut)
                .ok_or_else(|| anyhow!("no http_filters"))?;
            let filter = filters
                .iter_mut()
                .find(|f| f["name"] == FILTER_NAME)
                .ok_or_else(|| anyhow!("no {FILTER_NAME} filter"))?;
            let typed_config = filter["typed_config"].take();
            *filter = serde_json::json!({
                "name": FILTER_NAME,
                "config_discovery": {
                    "config_source": path_source,
                    "type_urls": [WASM_FILTER_TYPE],
                },
            });
            bootstrap["node"] = serde_json::json!({"id": "mcp-gw-e2e", "cluster": "mcp-gw-e2e"});
            Ok(serde_json::json!({ "name": FILTER_NAME, "typed_config": typed_config }))
        }
    }
}
