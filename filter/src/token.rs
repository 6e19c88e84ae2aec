//! Where the inbound token comes from: exactly one `Authorization: Bearer <token>` header
//! (RFC 6750 §2.1). Query-string and form-body tokens are refused (the MCP authorization spec
//! allows only the header), and so is any request that tries more than one method.

/// Why no usable bearer token was found. Each maps to an RFC 6750 answer in `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtractError {
    /// No `Authorization` header, or one with another scheme (`Basic …`): the client has not
    /// tried bearer authentication, so the challenge carries no error code.
    Missing,
    /// More than one `Authorization` header.
    Duplicate,
    /// `Bearer` with nothing after it, or an empty value.
    EmptyBearer,
    /// An `access_token` query parameter: not an accepted method (MCP: header only).
    TokenInQuery,
    /// The token has characters outside RFC 6750's `b64token`, or is not UTF-8.
    MalformedToken,
    /// Longer than `max_token_bytes`.
    TooLarge,
}

/// Finds the bearer token among the request's `Authorization` header values.
///
/// `values` are the raw bytes of every `Authorization` header, in order; `path` is the request
/// target (for the query-string check).
pub fn extract_bearer<'a>(
    values: &[&'a [u8]],
    path: &[u8],
    max_token_bytes: usize,
) -> Result<&'a str, ExtractError> {
    if query_has_access_token(path) {
        return Err(ExtractError::TokenInQuery);
    }
    let value = match values {
        [] => return Err(ExtractError::Missing),
        [one] => *one,
        _ => return Err(ExtractError::Duplicate),
    };
    let value = trim_ows(value);
    if let Some(token) = well_formed_bearer(value, max_token_bytes) {
        return Ok(token);
    }
    if is_combined_bearer(value) {
        return Err(ExtractError::Duplicate);
    }
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i..]),
        None => (value, &value[value.len()..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(ExtractError::Missing);
    }
    // RFC 6750: credentials = "Bearer" 1*SP b64token
    let token = trim_ows(rest);
    if token.is_empty() {
        return Err(ExtractError::EmptyBearer);
    }
    if token.len() > max_token_bytes {
        return Err(ExtractError::TooLarge);
    }
    if rest.first() != Some(&b' ') || !token.iter().all(|b| is_b64token_byte(*b)) {
        return Err(ExtractError::MalformedToken);
    }
    // b64token bytes are ASCII, so this cannot fail; no panic path either way.
    std::str::from_utf8(token).map_err(|_| ExtractError::MalformedToken)
}

/// The credential of a `Bearer` authorization value, unchecked: for matching against tokens
/// that already passed [`extract_bearer`]. Anything it does not match goes through that.
pub fn bearer_credential(value: &[u8]) -> Option<&[u8]> {
    value
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| value.get(7..))
        .map(trim_ows)
}

/// The common case in one pass: `Bearer` (any case), spaces, a b64token within the size limit.
/// Such a value has no comma, so it is not a joined duplicate either; anything else takes the
/// checks below, which name the problem.
fn well_formed_bearer(value: &[u8], max_token_bytes: usize) -> Option<&str> {
    let rest = value
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| value.get(7..))?;
    let token = trim_ows(rest);
    if token.is_empty()
        || token.len() > max_token_bytes
        || !token.iter().all(|b| B64TOKEN[usize::from(*b)])
    {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// [`is_b64token_byte`] as a table: the hot path checks every byte of every token.
static B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = is_b64token_byte(i as u8);
        i += 1;
    }
    table
};

/// Envoy joins repeated request headers into one value separated by commas, so two
/// `Authorization` headers arrive as `Bearer a,Bearer b` (or `Basic x, Bearer y`). A bearer
/// token never contains a comma, so a comma in a Bearer credential, or a Bearer credential after
/// a comma, means more than one credential was sent. (A lone `Digest …` header has commas of its
/// own and is simply not bearer authentication.)
fn is_combined_bearer(value: &[u8]) -> bool {
    let starts_bearer = |v: &[u8]| {
        v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"bearer ") || v.eq_ignore_ascii_case(b"bearer")
    };
    if starts_bearer(value) && value.contains(&b',') {
        return true;
    }
    value
        .split(|b| *b == b',')
        .skip(1)
        .any(|part| starts_bearer(trim_ows(part)))
}

/// b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
/// `+`, `/` and `=` are allowed by the grammar; a JWT never contains them, and the verifier
/// rejects them as malformed base64url.
const fn is_b64token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Whether the query string carries an `access_token` (RFC 6750 §2.3), which is refused.
pub fn query_has_access_token(path: &[u8]) -> bool {
    let Some(q) = path.iter().position(|b| *b == b'?') else {
        return false;
    };
    let query = &path[q + 1..];
    let query = match query.iter().position(|b| *b == b'#') {
        Some(h) => &query[..h],
        None => query,
    };
    query.split(|b| *b == b'&').any(|pair| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        name == b"access_token" || name.eq_ignore_ascii_case(b"access%5ftoken")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn one(v: &str) -> Result<&str, ExtractError> {
        extract_bearer(&[v.as_bytes()], b"/mcp", MAX)
    }

    #[test]
    fn accepts_bearer_any_case() {
        assert_eq!(one("Bearer a.b.c"), Ok("a.b.c"));
        assert_eq!(one("bearer a.b.c"), Ok("a.b.c"));
        assert_eq!(one("BEARER a.b.c"), Ok("a.b.c"));
        // 1*SP is allowed by the grammar, and surrounding OWS is not part of the value.
        assert_eq!(one("Bearer   a.b.c "), Ok("a.b.c"));
    }

    #[test]
    fn missing_or_other_scheme_is_missing() {
        assert_eq!(extract_bearer(&[], b"/", MAX), Err(ExtractError::Missing));
        assert_eq!(one("Basic dXNlcjpwYXNz"), Err(ExtractError::Missing));
        assert_eq!(one("Bearera.b.c"), Err(ExtractError::Missing));
        assert_eq!(one("DPoP a.b.c"), Err(ExtractError::Missing));
        assert_eq!(one("Bearer\ta.b.c"), Err(ExtractError::Missing));
    }

    #[test]
    fn empty_bearer() {
        assert_eq!(one("Bearer"), Err(ExtractError::EmptyBearer));
        assert_eq!(one("Bearer    "), Err(ExtractError::EmptyBearer));
        assert_eq!(one(""), Err(ExtractError::Missing));
    }

    #[test]
    fn malformed_tokens() {
        for v in [
            "Bearer a.b c",
            "Bearer \"a.b.c\"",
            "Bearer a\tb",
            "Bearer a.b.c;",
        ] {
            assert_eq!(one(v), Err(ExtractError::MalformedToken), "{v:?}");
        }
        assert_eq!(
            extract_bearer(&[b"Bearer a.\xff.c"], b"/", MAX),
            Err(ExtractError::MalformedToken)
        );
    }

    #[test]
    fn headers_envoy_joined_with_commas_are_duplicates() {
        for v in [
            "Bearer a.b.c,Bearer a.b.c",
            "Bearer a.b.c, Bearer x",
            "Basic dXNlcjpw, Bearer a.b.c",
            "bearer a,b",
            "Bearer ,",
        ] {
            assert_eq!(one(v), Err(ExtractError::Duplicate), "{v:?}");
        }
        // One Digest header has commas of its own: not bearer, not a duplicate.
        assert_eq!(
            one("Digest username=\"u\", realm=\"r\""),
            Err(ExtractError::Missing)
        );
    }

    #[test]
    fn duplicates_and_size() {
        assert_eq!(
            extract_bearer(&[b"Bearer a", b"Bearer a"], b"/", MAX),
            Err(ExtractError::Duplicate)
        );
        let big = format!("Bearer {}", "a".repeat(MAX + 1));
        assert_eq!(one(&big), Err(ExtractError::TooLarge));
        let ok = format!("Bearer {}", "a".repeat(MAX));
        assert!(one(&ok).is_ok());
    }

    #[test]
    fn query_tokens_are_refused() {
        for p in [
            "/mcp?access_token=x",
            "/mcp?a=1&access_token",
            "/mcp?access%5Ftoken=x",
        ] {
            assert_eq!(
                extract_bearer(&[b"Bearer a.b.c"], p.as_bytes(), MAX),
                Err(ExtractError::TokenInQuery),
                "{p}"
            );
        }
        assert!(extract_bearer(&[b"Bearer a.b.c"], b"/mcp?x_access_token=1", MAX).is_ok());
        assert!(extract_bearer(&[b"Bearer a.b.c"], b"/mcp#access_token", MAX).is_ok());
    }
}
