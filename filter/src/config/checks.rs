//! Checks on single values that several sections of the document share. Each refuses the value
//! with the field's path, so the error points at what the operator has to fix.

use super::ConfigError;
use crate::request_path::is_configurable;

pub(super) fn require_non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

pub(super) fn require_path(field: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::new(
            field,
            "must be an absolute request path starting with '/' and without whitespace",
        ));
    }
    Ok(())
}

/// A route prefix: a path the filter can match a request's normal form against (see
/// `request_path`), so a prefix with escapes, dot segments or `//` is refused rather than never
/// matching.
pub(super) fn require_route_path(field: &str, value: &str) -> Result<(), ConfigError> {
    require_path(field, value)?;
    if !is_configurable(value) {
        return Err(ConfigError::new(
            field,
            "must be a path in normal form: visible ASCII without `%` escapes, `;`, `?`, `#`, \\, \
             empty segments or segments ending in `.`",
        ));
    }
    Ok(())
}

pub(super) fn require_header_value(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.chars().any(|c| c.is_control()) {
        return Err(ConfigError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub(super) fn require_range(
    field: &str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A scope token per RFC 6749 §3.3: printable ASCII except space, `"` and `\`.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

pub(super) fn require_scopes(field: &str, scopes: &[String]) -> Result<(), ConfigError> {
    for (i, scope) in scopes.iter().enumerate() {
        if !is_scope_token(scope) {
            return Err(ConfigError::new(
                &format!("{field}[{i}]"),
                "must be a single scope token (no spaces, quotes or backslashes)",
            ));
        }
    }
    Ok(())
}

/// A `scope` request parameter: scope tokens separated by single spaces (RFC 6749 §3.3), so the
/// token endpoint sees exactly the scopes configured.
pub(super) fn require_scope_list(field: &str, scope: &str) -> Result<(), ConfigError> {
    if scope.split(' ').any(|s| !is_scope_token(s)) {
        return Err(ConfigError::new(
            field,
            "must be scope tokens separated by single spaces",
        ));
    }
    Ok(())
}

pub(super) fn require_audiences(field: &str, audiences: &[String]) -> Result<(), ConfigError> {
    if audiences.is_empty() {
        return Err(ConfigError::new(field, "must list at least one audience"));
    }
    for (i, aud) in audiences.iter().enumerate() {
        require_non_empty(&format!("{field}[{i}]"), aud)?;
    }
    Ok(())
}

/// Values that end up inside a quoted `WWW-Authenticate` parameter or a JSON document.
pub(super) fn require_quotable(field: &str, v: &str) -> Result<(), ConfigError> {
    require_non_empty(field, v)?;
    if v.contains('"') || v.contains('\\') || v.chars().any(|c| c.is_control()) {
        return Err(ConfigError::new(
            field,
            "must not contain quotes, backslashes or control characters (it is sent in WWW-Authenticate)",
        ));
    }
    Ok(())
}

/// `https://host[:port]/path` → (`https://host[:port]`, `/path`).
pub(super) fn split_url(field: &str, url: &str) -> Result<(String, String), ConfigError> {
    require_quotable(field, url)?;
    let rest = url
        .strip_prefix("https://")
        .map(|r| ("https://", r))
        .or_else(|| url.strip_prefix("http://").map(|r| ("http://", r)));
    let Some((scheme, rest)) = rest else {
        return Err(ConfigError::new(field, "must be an absolute http(s) URL"));
    };
    if rest.contains(['?', '#']) {
        return Err(ConfigError::new(field, "must not have a query or fragment"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(ConfigError::new(field, "must name a host"));
    }
    Ok((
        format!("{scheme}{authority}"),
        path.trim_end_matches('/').to_string(),
    ))
}
