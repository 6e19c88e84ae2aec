//! RFC 9728 Protected Resource Metadata: the document a protected resource publishes at its
//! well-known path, and the URL challenges send clients to for it.

use serde_json::{Map, Value};

use super::checks::split_url;
use super::{ConfigError, ResourceMetadata, WELL_KNOWN_PRM};
use crate::request_path::is_configurable;

/// What a resource's metadata document says besides the resource itself.
pub(super) struct MetadataContent<'a> {
    pub authorization_servers: &'a [String],
    pub scopes: &'a [String],
    pub name: Option<&'a str>,
    pub documentation: Option<&'a str>,
}

/// The metadata for `resource` (the URL at `field`, when set) and its URL for challenges.
pub(super) fn published_metadata(
    field: &str,
    resource: Option<&str>,
    content: &MetadataContent<'_>,
) -> Result<(Option<ResourceMetadata>, Option<String>), ConfigError> {
    let Some(resource) = resource else {
        return Ok((None, None));
    };
    let (origin, path) = split_url(field, resource)?;
    let well_known = format!("{WELL_KNOWN_PRM}{path}");
    if !is_configurable(&well_known) {
        return Err(ConfigError::new(
            field,
            "the URL's path must be in normal form (no `%` escapes, `;`, dot segments or `//`): \
             its metadata document is served at /.well-known/oauth-protected-resource<path>",
        ));
    }
    let url = format!("{origin}{well_known}");
    let metadata = ResourceMetadata {
        path: well_known,
        document: metadata_document(resource, content),
    };
    Ok((Some(metadata), Some(url)))
}

/// Rendered once at load: every request for it is served the same bytes.
fn metadata_document(resource: &str, content: &MetadataContent<'_>) -> String {
    let strings =
        |values: &[String]| Value::Array(values.iter().cloned().map(Value::String).collect());
    let mut doc = Map::new();
    doc.insert("resource".into(), Value::String(resource.to_string()));
    doc.insert(
        "authorization_servers".into(),
        strings(content.authorization_servers),
    );
    if !content.scopes.is_empty() {
        doc.insert("scopes_supported".into(), strings(content.scopes));
    }
    doc.insert(
        "bearer_methods_supported".into(),
        serde_json::json!(["header"]),
    );
    if let Some(n) = content.name {
        doc.insert("resource_name".into(), Value::String(n.to_string()));
    }
    if let Some(d) = content.documentation {
        doc.insert(
            "resource_documentation".into(),
            Value::String(d.to_string()),
        );
    }
    Value::Object(doc).to_string()
}
