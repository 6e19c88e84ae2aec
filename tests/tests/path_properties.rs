//! The filter's path decisions held against the most permissive server (`permissive_path`), on
//! generated paths: every path the filter accepts lands, at that server, under the route the
//! filter chose for it (or under none when the filter chose none). So a public or unmatched
//! decision can never be served by a protected handler, whatever the server does to the path.
//!
//! Native (no Envoy): the filter's own `request_path` and route matching, 2,000 cases.

use gateway_tests::permissive_path::{resolve, route_of};
use mcp_token_exchange::request_path::{normalize, prefix_covers};
use proptest::prelude::*;

/// Routes as a gateway might configure them, longest first: nested, protected, public.
const ROUTES: [&str; 4] = ["/crm/mcp", "/mcp", "/healthz", "/public"];

/// Pieces of paths that attacks are made of, and ordinary ones.
const PIECES: [&str; 46] = [
    "/",
    "/",
    "/",
    "mcp",
    "MCP",
    "Mcp",
    "healthz",
    "crm",
    "public",
    "x",
    "a.b",
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    ";x=1",
    "%3b",
    "%3B",
    "%25",
    "%252e",
    "%252f",
    "%6d",
    "%6D",
    "%63",
    "?",
    "?q=/../",
    "#",
    "%3f",
    "%00",
    " ",
    "%20",
    "//",
    "~",
    "%7e",
    "\u{00e9}",
    "%4D%43%50",
    "%2e.",
];

fn paths() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&PIECES[..]), 1..10).prop_map(|p| {
        let s = p.concat();
        if s.starts_with('/') {
            s
        } else {
            format!("/{s}")
        }
    })
}

/// The route the filter chooses, or `None` when it refuses the path.
fn filter_route(raw: &str) -> Option<Option<&'static str>> {
    let normal = normalize(raw.as_bytes()).ok()?;
    Some(ROUTES.iter().copied().find(|p| prefix_covers(p, &normal)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn accepted_paths_route_alike_at_the_filter_and_the_most_permissive_server(raw in paths()) {
        if let Some(route) = filter_route(&raw) {
            let at_server = route_of(&resolve(raw.as_bytes()), &ROUTES);
            prop_assert_eq!(route, at_server, "path {:?}", raw);
        }
    }
}

/// Both outcomes are reached, so the property is not vacuous; and the known bypasses of the
/// issue are refused.
#[test]
fn the_known_bypasses_are_refused_and_plain_paths_accepted() {
    for p in [
        "/mcp",
        "/%6Dcp",
        "/MCP/x",
        "/healthz",
        "/crm/mcp/a.b",
        "/public/x",
    ] {
        let route = filter_route(p).unwrap_or_else(|| panic!("{p} refused"));
        assert_eq!(route, route_of(&resolve(p.as_bytes()), &ROUTES), "{p}");
    }
    for p in [
        "/healthz/../mcp",
        "/healthz/%2e%2e/mcp",
        "/healthz/..%2Fmcp",
        "/healthz%2F..%2Fmcp",
        "/healthz;/../mcp",
        "/healthz\\..\\mcp",
        "/public/%252e%252e/mcp",
        "/mcp;jsessionid=x",
        "/mcp.",
        "/mcp%20",
        "/mcp%3F",
    ] {
        assert_eq!(filter_route(p), None, "{p} accepted");
    }
}
