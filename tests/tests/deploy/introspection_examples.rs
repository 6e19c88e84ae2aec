//! envoy/README.md's "Opaque tokens" examples: each `providers` block (behind an HTML-comment
//! marker naming its file) in place of that file's providers must pass the filter's parser, keep
//! the IdP's introspection path, and pass `envoy --mode validate` with the default module.

use std::collections::BTreeSet;

use gateway_tests::harness::filter_wasm;
use serde_json::Value;

use super::{
    all_documents, envoy_dir, envoy_validate, parse_plugin_config, rel, static_clusters, str_at,
    temp_dir, ROOT_ID, WASM_REL,
};

/// The `providers` blocks after `<!-- introspection example: <file> -->` in envoy/README.md
/// ("Opaque tokens"), by file name.
fn introspection_examples() -> Vec<(String, Value)> {
    let guide = std::fs::read_to_string(envoy_dir().join("README.md")).expect("envoy/README.md");
    let marker = "<!-- introspection example: ";
    guide
        .match_indices(marker)
        .map(|(i, _)| {
            let rest = &guide[i + marker.len()..];
            let file = rest.split(" -->").next().expect("marker end").to_string();
            let block = rest
                .split("```json\n")
                .nth(1)
                .and_then(|b| b.split("\n```").next())
                .unwrap_or_else(|| panic!("no JSON block after the {file} marker"));
            let value: Value = serde_json::from_str(block)
                .unwrap_or_else(|e| panic!("the {file} example is not JSON: {e}"));
            (file, value)
        })
        .collect()
}

/// envoy/README.md's introspection examples (Okta, Keycloak), each in place of its file's
/// `providers`: the filter's parser accepts them, their paths are the IdP's introspection
/// endpoints, and `envoy --mode validate` loads the default module with them.
#[test]
fn the_guides_introspection_examples_validate() {
    let examples = introspection_examples();
    let files: Vec<&str> = examples.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(files, ["okta.yaml", "keycloak.yaml"]);
    for (file, example) in &examples {
        let (path, docs) = all_documents()
            .into_iter()
            .find(|(p, _)| p.ends_with(file) && p.parent() == Some(envoy_dir().as_path()))
            .unwrap_or_else(|| panic!("envoy/{file}"));
        let what = format!("{} + the guide's introspection example", rel(&path));
        let mut bootstrap = docs[0].clone();
        let plugin = bootstrap
            .pointer_mut(
                "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
            )
            .and_then(Value::as_array_mut)
            .and_then(|f| f.iter_mut().find(|f| f["name"] == ROOT_ID))
            .map(|f| &mut f["typed_config"]["config"])
            .expect("the filter");
        let mut config: Value =
            serde_json::from_str(str_at(plugin, "/configuration/value", &what)).expect("json");
        for top in ["issuer", "audiences", "jwks"] {
            config.as_object_mut().map(|o| o.remove(top));
        }
        config["providers"] = example["providers"].clone();
        let (name, provider) = example["providers"]
            .as_object()
            .and_then(|p| p.iter().next())
            .expect("one provider");
        let policy = parse_plugin_config(&config, &what);
        let parsed = policy
            .providers
            .iter()
            .find(|p| &p.name == name)
            .expect("the provider");
        let intro = parsed.introspection.as_ref().expect("introspection kept");
        let issuer = str_at(provider, "/issuer", &what);
        let issuer_path = issuer.splitn(4, '/').nth(3).unwrap_or_default();
        let expected = match file.as_str() {
            "okta.yaml" => format!("/{issuer_path}/v1/introspect"),
            _ => format!("/{issuer_path}/protocol/openid-connect/token/introspect"),
        };
        assert_eq!(intro.path, expected, "{what}: the IdP's introspection path");
        assert!(
            static_clusters(&bootstrap).contains_key(&intro.cluster),
            "{what}: cluster {} is defined",
            intro.cluster
        );
        plugin_set_config(&mut bootstrap, &config);
        let wasm = filter_wasm().expect("filter module (make wasm)");
        let text = serde_json::to_string(&bootstrap)
            .expect("json")
            .replace(WASM_REL, &wasm.display().to_string());
        let dir = temp_dir("introspection-example");
        let copy = dir.join("bootstrap.json");
        std::fs::write(&copy, text).expect("write");
        let keys = BTreeSet::from(["TOKEN_EXCHANGE_CLIENT_SECRET".to_string()]);
        envoy_validate(&copy, &dir, &keys, &what);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Puts `config` as the filter's plugin configuration in `bootstrap`.
fn plugin_set_config(bootstrap: &mut Value, config: &Value) {
    let plugin = bootstrap
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .and_then(Value::as_array_mut)
        .and_then(|f| f.iter_mut().find(|f| f["name"] == ROOT_ID))
        .map(|f| &mut f["typed_config"]["config"])
        .expect("the filter");
    plugin["configuration"]["value"] = Value::String(config.to_string());
}
