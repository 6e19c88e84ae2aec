//! The `identity_headers` section: request headers the filter sets from the verified token's
//! claims, so upstreams learn who is calling without parsing a token.

use std::collections::BTreeMap;

use super::fields::join;
use super::{ConfigError, IdentityClaim};

/// Header name → the claim copied into it, in the document's (sorted) order.
pub(super) fn identity_headers(
    headers: &BTreeMap<String, String>,
) -> Result<Vec<(String, IdentityClaim)>, ConfigError> {
    headers
        .iter()
        .map(|(header, claim)| {
            let field = join("identity_headers", header);
            require_identity_header(&field, header)?;
            Ok((header.clone(), parse_identity_claim(&field, claim)?))
        })
        .collect()
}

fn parse_identity_claim(field: &str, claim: &str) -> Result<IdentityClaim, ConfigError> {
    Ok(match claim {
        "sub" => IdentityClaim::Sub,
        "client_id" | "cid" => IdentityClaim::ClientId,
        "email" => IdentityClaim::Email,
        "jti" => IdentityClaim::Jti,
        "scope" | "scp" => IdentityClaim::Scope,
        "iss" => IdentityClaim::Iss,
        other => {
            return Err(ConfigError::new(
                field,
                format!("unknown claim {other:?}; one of sub, client_id, email, jti, scope, iss"),
            ))
        }
    })
}

/// Header names that must never be set from claims: they route or authenticate the request.
fn require_identity_header(field: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(ConfigError::new(field, "must be a lowercase header name"));
    }
    if matches!(
        name,
        "authorization"
            | "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "cookie"
            | "te"
            | "connection"
    ) || name.starts_with("x-envoy-")
        || name.starts_with("mcp-")
    {
        return Err(ConfigError::new(
            field,
            "is reserved and cannot carry identity",
        ));
    }
    Ok(())
}
