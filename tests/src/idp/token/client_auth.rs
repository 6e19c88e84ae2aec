//! Who is asking at the token endpoint: HTTP Basic (`client_secret_basic`), the secret in the
//! form (`client_secret_post`), or a `private_key_jwt` client assertion; exactly one of them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;

use super::{client_jwt_audiences, Client, OAuthError};
use crate::idp::client_jwt::{check_client_jwt, JwtRules, MAX_ASSERTION_LIFETIME_SECS};
use crate::idp::keys::parse_jws;
use crate::idp::{now_secs, AsState, RecordedExchange, State, CLIENT_ASSERTION_TYPE};

/// `private_key_jwt` (RFC 7523 §2.2): the client is whoever signed `assertion` with a key
/// registered for it.
fn authenticate_with_assertion<'f>(
    state: &State,
    server: &AsState,
    assertion: &str,
    param: &impl Fn(&str) -> Option<&'f str>,
    record: &mut RecordedExchange,
) -> Result<Client, OAuthError> {
    let body_id = param("client_id");
    record.client_id = body_id.map(str::to_string);
    if param("client_secret").is_some() {
        return Err(OAuthError::invalid_request(
            "Cannot supply multiple client credentials. Use one of the following: credentials \
             in the Authorization header, credentials in the post body, or a client_assertion \
             in the post body.",
        ));
    }
    match param("client_assertion_type") {
        Some(CLIENT_ASSERTION_TYPE) => {}
        None | Some("") => {
            return Err(OAuthError::invalid_request(
                "The 'client_assertion_type' parameter is required with a 'client_assertion'.",
            ))
        }
        Some(_) => {
            return Err(OAuthError::invalid_request(format!(
                "The 'client_assertion_type' is invalid; it must be {CLIENT_ASSERTION_TYPE}."
            )))
        }
    }
    // The client is named by `client_id` in the body if present, else by the assertion's `sub`
    // (checked against the signature below either way).
    let claimed = match body_id {
        Some(id) => Some(id.to_string()),
        None => parse_jws(assertion).and_then(|j| {
            j.claims
                .get("sub")
                .and_then(Value::as_str)
                .map(str::to_string)
        }),
    };
    let Some(client_id) = claimed.filter(|id| !id.is_empty()) else {
        return Err(OAuthError::invalid_client(
            "The client_assertion is invalid: no client is named.",
            false,
        ));
    };
    record.client_id = Some(client_id.clone());
    let Some(client) = state
        .config
        .clients
        .iter()
        .find(|c| c.client_id == client_id)
    else {
        return Err(OAuthError::invalid_client(
            "Invalid value for 'client_id' parameter.",
            false,
        ));
    };
    let Some(keys) = state.client_keys.get(&client.client_id) else {
        return Err(OAuthError::invalid_client(
            "Client authentication with a client_assertion is not enabled for this client.",
            false,
        ));
    };
    let audiences = client_jwt_audiences(server);
    let checked = check_client_jwt(
        keys,
        assertion,
        &JwtRules {
            client_id: &client.client_id,
            audiences: &audiences,
            now: now_secs(),
            max_lifetime_secs: Some(MAX_ASSERTION_LIFETIME_SECS),
            require_jti: true,
        },
    )
    .map_err(|why| {
        OAuthError::invalid_client(format!("The client_assertion is invalid: {why}."), false)
    })?;
    let jti = checked.jti.unwrap_or_default();
    if !state.claim_assertion_id(&client.client_id, &jti, checked.exp) {
        return Err(OAuthError::invalid_client(
            "The client_assertion is invalid: its jti has already been used.",
            false,
        ));
    }
    Ok(Client {
        client_id: client.client_id.clone(),
        token_exchange_enabled: client.token_exchange_enabled,
    })
}

pub(super) fn authenticate_client<'f>(
    state: &State,
    server: &AsState,
    authorization: Option<&str>,
    param: &impl Fn(&str) -> Option<&'f str>,
    record: &mut RecordedExchange,
) -> Result<Client, OAuthError> {
    let basic = authorization.and_then(|h| {
        let (scheme, rest) = h.trim_start().split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then(|| rest.trim())
    });
    let body_id = param("client_id");
    let body_secret = param("client_secret");

    let (client_id, secret, basic_used) = if let Some(credentials) = basic {
        record.client_auth = "client_secret_basic".into();
        if body_secret.is_some() || param("client_assertion").is_some() {
            return Err(OAuthError::invalid_request(
                "Cannot supply multiple client credentials. Use one of the following: credentials \
                 in the Authorization header, credentials in the post body, or a client_assertion \
                 in the post body.",
            ));
        }
        let Some((id, secret)) = decode_basic(credentials) else {
            return Err(OAuthError::invalid_client(
                "The client credentials in the Authorization header are malformed.",
                true,
            ));
        };
        record.client_id = Some(id.clone());
        if body_id.is_some_and(|b| b != id) {
            return Err(OAuthError::invalid_request(
                "The 'client_id' in the body does not match the Authorization header.",
            ));
        }
        (id, secret, true)
    } else if let Some(assertion) = param("client_assertion") {
        record.client_auth = "private_key_jwt".into();
        return authenticate_with_assertion(state, server, assertion, param, record);
    } else if let Some(secret) = body_secret {
        record.client_auth = "client_secret_post".into();
        record.client_id = body_id.map(str::to_string);
        let Some(id) = body_id else {
            return Err(OAuthError::invalid_client(
                "No client credentials found.",
                false,
            ));
        };
        (id.to_string(), secret.to_string(), false)
    } else {
        record.client_id = body_id.map(str::to_string);
        return Err(OAuthError::invalid_client(
            if body_id.is_some() {
                "Client authentication failed: this confidential client must present its secret."
            } else {
                "No client credentials found."
            },
            false,
        ));
    };

    let Some(client) = state
        .config
        .clients
        .iter()
        .find(|c| c.client_id == client_id)
    else {
        return Err(OAuthError::invalid_client(
            "Invalid value for 'client_id' parameter.",
            basic_used,
        ));
    };
    if client.client_secret.is_empty() {
        return Err(OAuthError::invalid_client(
            "The client does not authenticate with a client secret.",
            basic_used,
        ));
    }
    if !constant_time_eq(client.client_secret.as_bytes(), secret.as_bytes()) {
        return Err(OAuthError::invalid_client(
            "The client secret supplied for a confidential client is invalid.",
            basic_used,
        ));
    }
    Ok(Client {
        client_id: client.client_id.clone(),
        token_exchange_enabled: client.token_exchange_enabled,
    })
}

/// `base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn decode_basic(credentials: &str) -> Option<(String, String)> {
    let raw = STANDARD
        .decode(credentials)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(credentials))
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let id = form_decode(id)?;
    if id.is_empty() {
        return None;
    }
    Some((id, form_decode(secret)?))
}

/// application/x-www-form-urlencoded decoding of one value: `+` is a space, `%XX` a byte.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod unit {
    use super::{decode_basic, form_decode};
    use base64::Engine as _;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let header = base64::engine::general_purpose::STANDARD.encode("my%3Aid:s%2Bec+ret%25");
        assert_eq!(
            decode_basic(&header),
            Some(("my:id".to_string(), "s+ec ret%".to_string()))
        );
        assert_eq!(decode_basic("!!!"), None);
        let no_colon = base64::engine::general_purpose::STANDARD.encode("abc");
        assert_eq!(decode_basic(&no_colon), None);
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
        assert_eq!(form_decode("%+1"), None);
        assert_eq!(form_decode("%e2%82%ac"), Some("€".into()));
    }
}
