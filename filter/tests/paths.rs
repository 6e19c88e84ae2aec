//! Property tests of the request-path normaliser (`request_path`) on its own: normal forms are
//! fixed points, and arbitrary bytes never panic. That accepted paths route alike at the filter
//! and at the most permissive server is checked against a model of such a server in
//! `tests/tests/path_properties.rs` (the model also drives the e2e upstream there).
//!
//! `cargo test` runs 512 cases per property; `make fuzz` raises PROPTEST_CASES.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcp_token_exchange::request_path::normalize;
use proptest::prelude::*;

/// Pieces of paths that attacks are made of, and ordinary ones.
const PIECES: [&str; 44] = [
    "/", "/", "/", "mcp", "MCP", "Mcp", "healthz", "crm", "public", "x", "a.b", ".", "..", "...",
    "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "%5C", "\\", ";", ";x=1", "%3b", "%3B",
    "%25", "%252e", "%252f", "%6d", "%6D", "%63", "?", "?q=/../", "#", "%3f", "%00", " ", "%20",
    "//", "~", "%7e", "\u{00e9}",
];

fn pieces() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&PIECES[..]), 1..10).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn normal_forms_are_fixed_points(raw in pieces()) {
        if let Ok(normal) = normalize(raw.as_bytes()) {
            let again = normalize(normal.as_str().as_bytes()).unwrap();
            prop_assert_eq!(again.as_str(), normal.as_str());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_normal_forms_are_visible_ascii(
        raw in prop::collection::vec(any::<u8>(), 0..64)
    ) {
        if let Ok(normal) = normalize(&raw) {
            prop_assert!(normal.as_str().bytes().all(|b| (b'!'..=b'~').contains(&b)));
            prop_assert!(normal.as_str().starts_with('/'));
        }
    }
}

/// The generator reaches both outcomes, so the fixed-point property is not vacuous.
#[test]
fn the_pieces_make_accepted_and_refused_paths() {
    for p in ["/mcp", "/%6Dcp", "/MCP/x", "/a.b/~"] {
        assert!(normalize(p.as_bytes()).is_ok(), "{p}");
    }
    for p in ["/healthz/../mcp", "/%2e%2e", "/a;x=1", "/%252e", "mcp"] {
        assert!(normalize(p.as_bytes()).is_err(), "{p}");
    }
}
