//! The request path the filter decides on, and the paths it refuses to decide on.
//!
//! Routes are chosen by path: a public route, a protected one, or `unmatched`. That decision is
//! only sound if the upstream acts on the same path. Servers resolve paths in different ways:
//! many resolve dot segments (`/healthz/../mcp` → `/mcp`), some decode percent-escapes twice,
//! turn `\` into `/`, merge `//`, strip `;params` from segments (servlet containers), trim
//! trailing dots (Windows), or route without regard to case (Express, ASP.NET). A filter that
//! matched `/healthz/../mcp` as the public `/healthz` would hand such a server its protected
//! `/mcp` without a token.
//!
//! So the filter accepts only paths whose meaning cannot change between it and the upstream, and
//! refuses the rest (400, nothing forwarded). An accepted path is percent-decoded into its normal
//! form, which routes are matched against ignoring ASCII case: a path that a case-insensitive
//! server would serve as `/mcp` is authenticated as `/mcp`. What goes upstream is the client's
//! `:path`, unchanged: every reading of an accepted path names the same resource.
//!
//! Refused (each is a `PathError`):
//! - anything but visible ASCII in the path (controls, NUL, spaces, bytes ≥ 0x80, also
//!   percent-encoded), and non-ASCII text in general: Unicode normalisation (`．` → `.`) is
//!   another way to change a path's meaning;
//! - a fragment (`#`), a raw backslash, a `;` (path parameters);
//! - an escape that decodes to a character with structure (`/`, `\`, `?`, `#`, `;`) or to `%`
//!   (double encoding: `%252e` is `%2e` after one decoding and `.` after two);
//! - a malformed escape (`%`, `%4`, `%zz`);
//! - an empty segment (`//`), and a segment that ends with a dot: the dot segments `.` and `..`
//!   (also as `%2e`), and `mcp.`, which Windows servers serve as `mcp`;
//! - a path that does not start with `/` (`*`, absolute forms), or is longer than
//!   `MAX_PATH_BYTES`.
//!
//! The query (after the first `?`) is not part of routing and is not checked here.

use std::borrow::Cow;

/// The longest path (without query) the filter decides on. MCP endpoints and metadata paths are
/// short; the bound keeps the work per request small whatever a client sends.
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Longer than `MAX_PATH_BYTES`.
    TooLong,
    /// Does not start with `/`.
    NotAbsolute,
    /// A `#`: fragments are never sent to a server.
    Fragment,
    /// A control character, space, NUL or non-ASCII byte, raw or percent-encoded.
    NotVisibleAscii,
    /// A raw `\`, which some servers read as `/`.
    Backslash,
    /// A `;`, which servlet containers strip from a segment together with what follows.
    PathParameter,
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// An escape for `/`, `\`, `?`, `#`, `;` or `%`, whose meaning depends on how often and
    /// where a server decodes.
    EncodedDelimiter,
    /// An empty segment (`//`), which some servers merge away.
    EmptySegment,
    /// A segment ending in `.`: the dot segments `.` and `..`, or a trailing dot.
    DotSegment,
}

impl PathError {
    /// For the audit record and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLong => "too_long",
            Self::NotAbsolute => "not_absolute",
            Self::Fragment => "fragment",
            Self::NotVisibleAscii => "not_visible_ascii",
            Self::Backslash => "backslash",
            Self::PathParameter => "path_parameter",
            Self::MalformedEscape => "malformed_escape",
            Self::EncodedDelimiter => "encoded_delimiter",
            Self::EmptySegment => "empty_segment",
            Self::DotSegment => "dot_segment",
        }
    }
}

/// The path part of a request's `:path` in normal form: percent-decoded, every segment checked.
/// Borrowed when the path has no escapes (the common case costs no allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath<'a>(Cow<'a, str>);

impl NormalPath<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads the path of a request's `:path` (query ignored) into its normal form, or says why the
/// filter cannot decide on it.
pub fn normalize(raw: &[u8]) -> Result<NormalPath<'_>, PathError> {
    // The fragment check covers the query too: a `#` is never part of a request target.
    if raw.contains(&b'#') {
        return Err(PathError::Fragment);
    }
    let path = match raw.iter().position(|b| *b == b'?') {
        Some(q) => &raw[..q],
        None => raw,
    };
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    for &b in path {
        check_literal(b)?;
    }
    let normal = if path.contains(&b'%') {
        Cow::Owned(decode(path)?)
    } else {
        // Every byte is visible ASCII (checked above).
        Cow::Borrowed(std::str::from_utf8(path).map_err(|_| PathError::NotVisibleAscii)?)
    };
    check_segments(&normal)?;
    Ok(NormalPath(normal))
}

/// A byte as it may appear unencoded in a path.
fn check_literal(b: u8) -> Result<(), PathError> {
    match b {
        b'\\' => Err(PathError::Backslash),
        b';' => Err(PathError::PathParameter),
        b'!'..=b'~' => Ok(()),
        _ => Err(PathError::NotVisibleAscii),
    }
}

/// A byte as it may appear percent-encoded: what it decodes to.
fn check_decoded(b: u8) -> Result<u8, PathError> {
    match b {
        b'/' | b'\\' | b'?' | b'#' | b';' | b'%' => Err(PathError::EncodedDelimiter),
        b'!'..=b'~' => Ok(b),
        _ => Err(PathError::NotVisibleAscii),
    }
}

fn decode(path: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let hex = path.get(i + 1..i + 3).ok_or(PathError::MalformedEscape)?;
            let (Some(hi), Some(lo)) = (hex_value(hex[0]), hex_value(hex[1])) else {
                return Err(PathError::MalformedEscape);
            };
            out.push(char::from(check_decoded(hi << 4 | lo)?));
            i += 3;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `path` starts with `/`. A trailing `/` ends the path with an empty segment, which is allowed
/// (`/mcp/`); any other empty segment is not.
fn check_segments(path: &str) -> Result<(), PathError> {
    let body = &path[1..];
    let body = body.strip_suffix('/').unwrap_or(body);
    if body.is_empty() {
        // `/` or `//`: the root, or a root with an empty segment.
        return if path.len() > 1 {
            Err(PathError::EmptySegment)
        } else {
            Ok(())
        };
    }
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err(PathError::EmptySegment);
        }
        if segment.ends_with('.') {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

/// Whether a route prefix covers a normal-form path: on segment boundaries (`/mcp` covers `/mcp`,
/// `/mcp/` and `/mcp/x`, not `/mcpx`), ignoring ASCII case (see the module comment).
pub fn prefix_covers(prefix: &str, path: &NormalPath<'_>) -> bool {
    let path = path.as_str().as_bytes();
    let prefix = prefix.trim_end_matches('/').as_bytes();
    if prefix.is_empty() {
        return true;
    }
    path.len() >= prefix.len()
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(path.get(prefix.len()), None | Some(b'/'))
}

/// Whether a configured path (a route prefix, a metadata path) is itself in normal form without
/// escapes, so that the filter can ever match it.
pub fn is_configurable(path: &str) -> bool {
    !path.contains('%')
        && normalize(path.as_bytes()).is_ok_and(|n| n.as_str() == path)
        && !path.contains('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match normalize(raw.as_bytes()) {
            Ok(n) => n.as_str().to_string(),
            Err(e) => panic!("{raw:?} refused: {e:?}"),
        }
    }

    fn err(raw: &[u8]) -> PathError {
        match normalize(raw) {
            Ok(n) => panic!("{:?} accepted as {:?}", String::from_utf8_lossy(raw), n),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_paths_are_their_own_normal_form_without_copying() {
        for p in [
            "/",
            "/mcp",
            "/mcp/",
            "/mcp/x",
            "/.well-known/oauth-protected-resource/mcp",
        ] {
            let n = normalize(p.as_bytes()).unwrap();
            assert!(matches!(n.0, Cow::Borrowed(_)), "{p}");
            assert_eq!(n.as_str(), p);
        }
    }

    #[test]
    fn the_query_is_not_routed_on() {
        assert_eq!(ok("/mcp?a=/../b&c=%2F"), "/mcp");
        assert_eq!(ok("/mcp?"), "/mcp");
        assert_eq!(err(b"/mcp?a=#b"), PathError::Fragment);
    }

    #[test]
    fn unreserved_escapes_decode() {
        assert_eq!(ok("/%6Dcp"), "/mcp");
        assert_eq!(ok("/%6dcp/%7Euser"), "/mcp/~user");
        assert_eq!(ok("/a%2eb"), "/a.b");
        assert_eq!(ok("/a%3Ab%40c"), "/a:b@c");
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for p in [
            "/.",
            "/..",
            "/./mcp",
            "/../mcp",
            "/healthz/../mcp",
            "/healthz/./x",
            "/mcp/..",
            "/%2e",
            "/%2E%2E",
            "/healthz/%2e%2e/mcp",
            "/healthz/.%2e/mcp",
            "/healthz/%2e./mcp",
            "/mcp.",
            "/mcp/x.",
            "/...",
            "/healthz/../mcp/",
        ] {
            assert_eq!(err(p.as_bytes()), PathError::DotSegment, "{p}");
        }
        assert_eq!(ok("/.well-known/x"), "/.well-known/x");
        assert_eq!(ok("/a.b/c"), "/a.b/c");
    }

    #[test]
    fn encoded_delimiters_and_double_encoding_are_refused() {
        for p in [
            "/healthz%2F..%2Fmcp",
            "/healthz%2f%2e%2e%2fmcp",
            "/healthz/..%2Fmcp",
            "/a%5Cb",
            "/a%5cb",
            "/mcp%3F",
            "/mcp%3fx",
            "/mcp%23",
            "/mcp%3B",
            "/%252e%252e/mcp",
            "/a%25",
        ] {
            assert_eq!(err(p.as_bytes()), PathError::EncodedDelimiter, "{p}");
        }
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for p in ["/%", "/a%4", "/a%zz", "/a%4g", "/%%32e"] {
            assert_eq!(err(p.as_bytes()), PathError::MalformedEscape, "{p}");
        }
    }

    #[test]
    fn raw_structure_characters_are_refused() {
        assert_eq!(err(b"/healthz\\..\\mcp"), PathError::Backslash);
        assert_eq!(err(b"/mcp\\"), PathError::Backslash);
        assert_eq!(err(b"/mcp;jsessionid=1"), PathError::PathParameter);
        assert_eq!(err(b"/healthz;/../mcp"), PathError::PathParameter);
        assert_eq!(err(b"/mcp#x"), PathError::Fragment);
        assert_eq!(err(b"//mcp"), PathError::EmptySegment);
        assert_eq!(err(b"/healthz//mcp"), PathError::EmptySegment);
        assert_eq!(err(b"//"), PathError::EmptySegment);
        assert_eq!(err(b"/mcp//"), PathError::EmptySegment);
        assert_eq!(err(b"/%2F"), PathError::EncodedDelimiter);
    }

    #[test]
    fn controls_spaces_and_non_ascii_are_refused_raw_and_encoded() {
        for p in [
            &b"/mcp\0"[..],
            b"/mc p",
            b"/mcp\t",
            b"/mcp\x7f",
            b"/caf\xc3\xa9",
            b"/mcp\r\n",
            b"/mcp%00",
            b"/mcp%20",
            b"/mcp%09",
            b"/mcp%7F",
            b"/caf%C3%A9",
            b"/%C0%AE%C0%AE/mcp",
            "/\u{FF0E}\u{FF0E}/mcp".as_bytes(),
        ] {
            assert_eq!(
                err(p),
                PathError::NotVisibleAscii,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn relative_and_overlong_paths_are_refused() {
        assert_eq!(err(b"*"), PathError::NotAbsolute);
        assert_eq!(err(b""), PathError::NotAbsolute);
        assert_eq!(err(b"mcp"), PathError::NotAbsolute);
        assert_eq!(err(b"http://x/mcp"), PathError::NotAbsolute);
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(err(long.as_bytes()), PathError::TooLong);
        let edge = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert_eq!(ok(&edge).len(), MAX_PATH_BYTES);
        // The bound is on the path; a long query is not the router's business.
        assert_eq!(
            ok(&format!("/mcp?{}", "q".repeat(2 * MAX_PATH_BYTES))),
            "/mcp"
        );
    }

    #[test]
    fn prefixes_cover_whole_segments_ignoring_case() {
        let covers =
            |prefix: &str, raw: &str| prefix_covers(prefix, &normalize(raw.as_bytes()).unwrap());
        assert!(covers("/mcp", "/mcp"));
        assert!(covers("/mcp", "/mcp/"));
        assert!(covers("/mcp", "/mcp/tools"));
        assert!(covers("/mcp/", "/mcp"));
        assert!(covers("/mcp", "/MCP"));
        assert!(covers("/mcp", "/%4Dcp/x"));
        assert!(!covers("/mcp", "/mcpx"));
        assert!(!covers("/mcp", "/mc"));
        assert!(!covers("/crm/mcp", "/crm"));
        assert!(covers("/", "/anything"));
    }

    #[test]
    fn configured_paths_must_be_plain_normal_forms() {
        for p in [
            "/",
            "/mcp",
            "/crm/mcp",
            "/mcp/",
            "/.well-known/oauth-protected-resource/mcp",
        ] {
            assert!(is_configurable(p), "{p}");
        }
        for p in [
            "mcp", "/a/../b", "/a//b", "/%6Dcp", "/a;b", "/a?b", "/a\\b", "/a.", "/a b",
        ] {
            assert!(!is_configurable(p), "{p}");
        }
    }
}
