//! CORS for browser MCP clients, through a real Envoy running `envoy/demo.yaml`'s CORS filter
//! and policy (allowlist `https://vscode.dev`, `http://localhost:6274`) ahead of the token filter.
//!
//! What a browser needs, checked on the wire: a preflight is answered without a token for a
//! listed origin and reaches neither the token filter nor the upstream; every answer to a listed
//! origin — the token filter's own refusals (401, 403, 400, 413, 502, 503) as much as the
//! upstream's — carries `Access-Control-Allow-Origin` for that origin, exposes `WWW-Authenticate`
//! and `Mcp-Session-Id`, and says `Vary: Origin`; nothing grants credentials; and an origin not on
//! the list (another site, `null`, `*`, a look-alike) gets no grant at all and forwards nothing.
//! `browser.rs` shows a real browser acting on these answers.

use std::time::Instant;

use gateway_tests::client::{bearer, jsonrpc_post, Answer, TOOLS_LIST};
use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::idp::{Endpoint, Fault, MintRequest};
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

const VSCODE: &str = "https://vscode.dev";
const INSPECTOR: &str = "http://localhost:6274";
/// Origins a browser could send that are not on the list, and values no browser sends.
const NOT_LISTED: &[&str] = &[
    "https://evil.example",
    "null",
    "*",
    "http://vscode.dev",
    "https://vscode.dev.evil.example",
    "https://evil.example/https://vscode.dev",
    "http://localhost:6275",
];

/// A request the token filter refuses, and how.
struct Refusal<'a> {
    what: &'a str,
    /// The `Authorization` values sent.
    authorization: Vec<String>,
    body: &'a str,
    status: u16,
    /// The `error` of the `WWW-Authenticate` challenge.
    error: Option<&'a str>,
}

/// One route with per-tool policy (bodies inspected, so oversized ones get 413).
fn tool_route() -> StackOptions {
    StackOptions {
        plugin_patch: json!({
            "resource": null,
            "routes": [{
                "name": "backend",
                "path_prefix": "/mcp",
                "resource": "{gateway}/mcp",
                "tools": {"write_data": {"required_scopes": ["mcp:tools:admin"]}}
            }]
        }),
        ..StackOptions::default()
    }
}

async fn preflight(stack: &Stack, path: &str, origin: &str, headers: &str) -> Result<Answer> {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, stack.envoy.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", headers)
        .send()
        .await?;
    Answer::read(resp, started).await
}

/// A POST of `body` from `origin`, with these `Authorization` values.
async fn post(stack: &Stack, origin: &str, authorization: &[&str], body: &str) -> Result<Answer> {
    let started = Instant::now();
    let mut req = jsonrpc_post(&stack.mcp_url(), None, body.to_string()).header("origin", origin);
    for a in authorization {
        req = req.header("authorization", *a);
    }
    Answer::read(req.send().await?, started).await
}

/// The comma-separated list in header `name`, lower-cased.
fn list(a: &Answer, name: &str) -> Vec<String> {
    a.headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The grant a browser needs to read this answer from `origin` and follow its challenge.
fn assert_readable_by(a: &Answer, origin: &str, what: &str) {
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some(origin),
        "{what}: {a:?}"
    );
    let exposed = list(a, "access-control-expose-headers");
    for header in ["www-authenticate", "mcp-session-id", "mcp-protocol-version"] {
        assert!(
            exposed.iter().any(|h| h == header),
            "{what}: {header} not exposed: {a:?}"
        );
    }
    assert!(
        list(a, "vary").iter().any(|v| v == "origin"),
        "{what}: no Vary: Origin: {a:?}"
    );
    assert_eq!(a.header("access-control-allow-credentials"), None, "{what}");
}

fn assert_no_grant(a: &Answer, what: &str) {
    for header in [
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-expose-headers",
    ] {
        assert_eq!(a.header(header), None, "{what}: {header}: {a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_from_listed_origins_are_answered_without_a_token() -> Result {
    let stack = Stack::start().await?;
    let asked = "authorization, content-type, mcp-protocol-version, mcp-session-id";
    for origin in [VSCODE, INSPECTOR] {
        for path in ["/mcp", "/.well-known/oauth-protected-resource/mcp"] {
            let a = preflight(&stack, path, origin, asked).await?;
            let what = format!("preflight {path} from {origin}");
            assert_eq!(a.status, 200, "{what}: {a:?}");
            assert_eq!(
                a.header("access-control-allow-origin"),
                Some(origin),
                "{what}"
            );
            let methods = list(&a, "access-control-allow-methods");
            for m in ["post", "get", "delete"] {
                assert!(methods.iter().any(|x| x == m), "{what}: {methods:?}");
            }
            let allowed = list(&a, "access-control-allow-headers");
            for h in asked.split(", ") {
                assert!(allowed.iter().any(|x| x == h), "{what}: {h} in {allowed:?}");
            }
            assert!(a.header("access-control-max-age").is_some(), "{what}");
            assert_eq!(a.header("access-control-allow-credentials"), None, "{what}");
            assert!(
                a.challenge().is_none(),
                "{what}: not the token filter's answer"
            );
        }
    }
    assert!(
        stack.upstream.seen_requests().is_empty(),
        "a preflight is never forwarded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_get_no_grant_and_nothing_is_forwarded() -> Result {
    let stack = Stack::start().await?;
    let token = stack.user_token();
    for origin in NOT_LISTED {
        let a = preflight(&stack, "/mcp", origin, "authorization, content-type").await?;
        let what = format!("preflight from {origin:?}");
        assert_eq!(
            a.status, 200,
            "{what}: answered by Envoy's CORS filter: {a:?}"
        );
        assert_no_grant(&a, &what);
        assert!(
            a.challenge().is_none(),
            "{what}: never reached the token filter"
        );

        // The request itself (a browser would not send it; curl would): answered as any
        // request without CORS, so a browser could not read it.
        let a = post(&stack, origin, &[], TOOLS_LIST).await?;
        assert_eq!(a.status, 401, "{origin}: {a:?}");
        assert_no_grant(&a, &format!("POST without token from {origin:?}"));
        let a = post(&stack, origin, &[&bearer(&token)], TOOLS_LIST).await?;
        assert_no_grant(&a, &format!("POST with token from {origin:?}"));
    }
    // Only the authenticated POSTs reached the upstream, never a preflight or a request
    // without a token.
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), NOT_LISTED.len(), "{seen:?}");
    assert!(seen
        .iter()
        .all(|r| r.method == "POST" && r.bearer().is_some()));

    // A listed origin asking for a header the policy does not list: the grant does not name it,
    // so the browser refuses (browser.rs).
    let a = preflight(&stack, "/mcp", VSCODE, "authorization, x-unlisted-header").await?;
    assert_eq!(a.header("access-control-allow-origin"), Some(VSCODE));
    let allowed = list(&a, "access-control-allow-headers");
    assert!(
        !allowed.iter().any(|h| h == "x-unlisted-header" || h == "*"),
        "{allowed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_filters_refusals_carry_cors_for_listed_origins() -> Result {
    let stack = Stack::start_with(tool_route()).await?;
    let token = |sub: &str, scopes: &[&str]| {
        stack.mint(&MintRequest {
            sub: sub.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..MintRequest::default()
        })
    };
    let user = token("user@example.com", &["mcp:tools:call"]);
    let write = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "write_data", "arguments": {}}})
    .to_string();
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "echo", "arguments": {"text": "x".repeat(70 * 1024)}}})
    .to_string();
    let no_scope = token("noscope@example.com", &[]);
    let bad = format!("{}x", &user[..user.len() - 1]);

    let case = |what, authorization: Vec<String>, body, status, error| Refusal {
        what,
        authorization,
        body,
        status,
        error,
    };
    let cases = [
        case("no token", vec![], TOOLS_LIST, 401, None),
        case(
            "bad token",
            vec![bearer(&bad)],
            TOOLS_LIST,
            401,
            Some("invalid_token"),
        ),
        case(
            "no scope",
            vec![bearer(&no_scope)],
            TOOLS_LIST,
            403,
            Some("insufficient_scope"),
        ),
        case(
            "tool scope",
            vec![bearer(&user)],
            &write,
            403,
            Some("insufficient_scope"),
        ),
        case(
            "two credentials",
            vec![bearer(&user), bearer(&user)],
            TOOLS_LIST,
            400,
            Some("invalid_request"),
        ),
        case("body too large", vec![bearer(&user)], &big, 413, None),
    ];
    for origin in [VSCODE, INSPECTOR] {
        for Refusal {
            what,
            authorization,
            body,
            status,
            error,
        } in &cases
        {
            let auth: Vec<&str> = authorization.iter().map(String::as_str).collect();
            let a = post(&stack, origin, &auth, body).await?;
            let what = format!("{what} from {origin}");
            assert_eq!(a.status, *status, "{what}: {a:?}");
            if let Some(error) = error {
                let challenge = a.challenge().unwrap_or_default();
                assert!(
                    challenge.contains(&format!("error=\"{error}\"")),
                    "{what}: {challenge}"
                );
            }
            if *status == 401 {
                assert!(
                    a.challenge()
                        .unwrap_or_default()
                        .contains("resource_metadata=\""),
                    "{what}: the challenge a browser client follows"
                );
            }
            assert_readable_by(&a, origin, &what);
        }
    }
    // The token endpoint failing: 503 (+ Retry-After, exposed) and 502, each with a new token
    // so no cached exchange answers.
    for (i, (fault, status)) in [(Fault::Status(503), 503), (Fault::MalformedBody, 502)]
        .into_iter()
        .enumerate()
    {
        stack.idp.set_fault(Endpoint::Token, fault);
        let fresh = token(&format!("idp-fault-{i}@example.com"), &["mcp:tools:call"]);
        let a = post(&stack, VSCODE, &[&bearer(&fresh)], TOOLS_LIST).await?;
        assert_eq!(a.status, status, "{a:?}");
        assert_readable_by(&a, VSCODE, &format!("IdP fault → {status}"));
        if status == 503 {
            assert!(a.header("retry-after").is_some());
            assert!(list(&a, "access-control-expose-headers")
                .iter()
                .any(|h| h == "retry-after"));
        }
        stack.idp.clear_faults();
    }
    // The same refusal to an origin not on the list: no grant.
    let a = post(&stack, "https://evil.example", &[], TOOLS_LIST).await?;
    assert_eq!(a.status, 401);
    assert_no_grant(&a, "401 to an unlisted origin");
    assert!(
        list(&a, "vary").iter().any(|v| v == "origin"),
        "Vary: Origin whatever the origin (the answer differs by it)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_answers_carry_cors_for_listed_origins() -> Result {
    let stack = Stack::start().await?;
    let token = stack.user_token();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "cors-test", "version": "0"}}})
    .to_string();
    let a = post(&stack, VSCODE, &[&bearer(&token)], &initialize).await?;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.header("mcp-session-id").is_some(), "{a:?}");
    assert_readable_by(&a, VSCODE, "upstream initialize");
    // The upstream got the backend token, and the client's Origin as sent.
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("origin"), Some(VSCODE));
    assert_ne!(seen[0].bearer(), Some(token.as_str()));
    Ok(())
}
