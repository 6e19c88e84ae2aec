//! Path confusion through a real Envoy: a public route must never be a way into a protected one.
//!
//! The filter is configured with a protected `/mcp` (token, exchange, tool policy), a public
//! `/healthz` and `unmatched: pass`. Behind Envoy sits the permissive upstream
//! (`permissive_path`), which resolves every path the way the most forgiving servers do (dot
//! segments, repeated decoding, `\`, `;params`, `//`, trailing dots, case). A corpus of path
//! tricks is sent without a token and with one. The invariant: every request either reaches the
//! upstream's protected handler with the exchanged backend token, or reaches an unprotected one,
//! or is refused — never the protected handler without the backend token.
//!
//! It runs twice: with Envoy's own normalisation removed (the filter's checks alone, defence in
//! depth) and with the normalisation every shipped config sets.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gateway_tests::harness::{filter_counter, Stack, StackOptions};
use gateway_tests::permissive_path::{route_of, PermissiveUpstream, Seen};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Result<T = ()> = anyhow::Result<T>;

/// The upstream's protected handler and its public one, as the permissive server routes them.
const PROTECTED: &str = "/mcp";
const UPSTREAM_ROUTES: [&str; 2] = ["/mcp", "/healthz"];
/// The filter's fixed description for a refused path.
const NOT_NORMAL: &str = "the request path is not in normal form";

/// Tricks that map a public or unmatched-looking path onto `/mcp` at a permissive server; the
/// filter must refuse each of these itself when Envoy passes the path unchanged.
const BYPASSES: &[&str] = &[
    "/healthz/../mcp",
    "/healthz/./../mcp",
    "/healthz/%2e%2e/mcp",
    "/healthz/%2E%2E/mcp",
    "/healthz/.%2e/mcp",
    "/healthz/..%2Fmcp",
    "/healthz%2F..%2Fmcp",
    "/healthz%2f%2e%2e%2fmcp",
    "/healthz/%252e%252e/mcp",
    "/healthz%252F..%252Fmcp",
    "/healthz;/../mcp",
    "/healthz/..;/mcp",
    "/mcp;jsessionid=1",
    "/mcp;",
    "/mcp.",
    "/mcp%2e",
    "/mcp%20",
    "/mcp%09",
    "/mcp%00",
    "/mcp%3F",
    "/mcp%23",
    "/mcp%5C",
    "/healthz/..%5Cmcp",
    "/other/../mcp",
    "/x/%2e%2e/%2e%2e/mcp",
    "//mcp",
    "/healthz//../mcp",
    "/%2Fmcp",
    "/mcp%C0%AE",
    "/healthz/%C0%AE%C0%AE/mcp",
];

/// Paths the filter accepts: each is routed as the permissive server routes it.
const ACCEPTED: &[&str] = &[
    "/mcp",
    "/mcp/",
    "/MCP",
    "/Mcp/sub",
    "/%6Dcp",
    "/%6d%63%70",
    "/healthz",
    "/HEALTHZ",
    "/healthz/live",
    "/other",
    "/mcp?x=/../healthz",
    "/healthz?next=/mcp",
];

/// Raw bytes Envoy's HTTP/1 parser may refuse before the filter: whoever refuses them, they must
/// not reach the protected handler without a token.
const RAW_ODDITIES: &[&str] = &["/healthz\\..\\mcp", "/mcp#frag", "/healthz/..\\mcp"];

struct RawAnswer {
    status: u16,
    text: String,
}

/// One HTTP/1.1 request with the target exactly as given (HTTP client libraries normalise it).
async fn send(port: u16, target: &str, bearer: Option<&str>) -> Result<RawAnswer> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let auth = bearer.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!(
        "POST {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         accept: application/json, text/event-stream\r\n{auth}content-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(request.as_bytes()).await?;
    let raw = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(RawAnswer { status, text })
}

/// Reads one response: the head, then `content-length` bytes (Envoy delays closing a connection
/// until the client does, so waiting for EOF would cost a second per request).
async fn read_response(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if let Some(length) = length {
                if raw.len() >= end + 4 + length {
                    return Ok(raw);
                }
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

fn jwt_claims(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// What every request the upstream saw must satisfy.
fn check_seen(seen: &[Seen], user_token: &str) {
    for s in seen {
        let bearer = s
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        assert_ne!(
            bearer,
            Some(user_token),
            "the client's token reached the upstream at {:?}",
            s.target
        );
        if route_of(&s.resolved, &UPSTREAM_ROUTES) == Some(PROTECTED) {
            let claims = bearer.map(jwt_claims).unwrap_or(Value::Null);
            assert_eq!(
                claims["aud"],
                json!("backend"),
                "{:?} reached the protected handler (as {}) without the backend token: {:?}",
                s.target,
                s.resolved,
                s.authorization
            );
        }
    }
}

async fn stack(envoy_path_normalisation: bool, upstream: &PermissiveUpstream) -> Result<Stack> {
    Stack::start_with(StackOptions {
        upstream_port: Some(upstream.port()),
        envoy_path_normalisation,
        plugin_patch: json!({
            "resource": null,
            "unmatched": "pass",
            "routes": [
                {"path_prefix": "/mcp", "resource": "{gateway}/mcp",
                 "tools": {"whoami": {"required_scopes": ["mcp:tools:call"]}}},
                {"path_prefix": "/healthz", "public": true}
            ]
        }),
        ..StackOptions::default()
    })
    .await
}

/// Sends the whole corpus without and with a token; returns (target, answer without token).
async fn run_corpus(stack: &Stack, token: &str) -> Result<Vec<(&'static str, RawAnswer)>> {
    let mut answers = Vec::new();
    for target in BYPASSES.iter().chain(ACCEPTED).chain(RAW_ODDITIES) {
        let anonymous = send(stack.envoy.port, target, None).await?;
        send(stack.envoy.port, target, Some(token)).await?;
        answers.push((*target, anonymous));
    }
    let long = format!("/healthz/{}", "a".repeat(5000));
    let long_answer = send(stack.envoy.port, &long, None).await?;
    assert_eq!(long_answer.status, 400, "{}", long_answer.text);
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_alone_refuses_every_path_whose_meaning_could_change() -> Result {
    let upstream = PermissiveUpstream::start().await?;
    let stack = stack(false, &upstream).await?;
    let token = stack.user_token();
    let answers = run_corpus(&stack, &token).await?;
    check_seen(&upstream.seen(), &token);

    for (target, a) in &answers {
        if BYPASSES.contains(target) {
            assert_eq!(a.status, 400, "{target}: {}", a.text);
            assert!(a.text.contains(NOT_NORMAL), "{target}: {}", a.text);
            assert!(
                a.text.contains(r#""error":"invalid_request""#),
                "{}",
                a.text
            );
        }
    }
    // Accepted paths are decided as the server routes them: /mcp in any spelling needs a token.
    for (target, a) in &answers {
        let protected = route_of(
            &gateway_tests::permissive_path::resolve(target.as_bytes()),
            &UPSTREAM_ROUTES,
        ) == Some(PROTECTED);
        if ACCEPTED.contains(target) {
            let expected = if protected { 401 } else { 200 };
            assert_eq!(a.status, expected, "{target}: {}", a.text);
        }
    }
    // With a token, every spelling of /mcp arrived with the backend token (checked above) and
    // at least these did arrive.
    let seen = upstream.seen();
    for target in ["/MCP", "/%6Dcp", "/mcp/"] {
        assert!(
            seen.iter().any(|s| s.target == target
                && s.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Bearer "))),
            "{target} with a token did not reach the upstream"
        );
    }

    // The audit record (Envoy's log) and the counter carry the reason.
    let refusal = |detail: &'static str| {
        move |r: &Value| r["reason"] == "invalid_path" && r["detail"] == detail
    };
    // The filter writes its batch of records on its tick: wait for both records, not just one.
    let both = |records: &[Value]| {
        records.iter().any(refusal("dot_segment"))
            && records.iter().any(refusal("encoded_delimiter"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut records = stack.envoy.audit_records()?;
    while !both(&records) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        records = stack.envoy.audit_records()?;
    }
    assert!(records.iter().any(refusal("dot_segment")), "{records:?}");
    assert!(
        records.iter().any(refusal("encoded_delimiter")),
        "{records:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = stack.envoy.filter_stats().await?;
    let refused = filter_counter(&stats, "requests.denied.invalid_path");
    // Each bypass twice (with and without a token) and the overlong path, at least.
    assert!(
        refused > 2 * BYPASSES.len() as u64,
        "requests.denied.invalid_path = {refused}"
    );
    assert!(!stack.envoy.vm_trapped());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shipped_envoy_normalisation_no_path_reaches_the_protected_handler_unauthenticated(
) -> Result {
    let upstream = PermissiveUpstream::start().await?;
    let stack = stack(true, &upstream).await?;
    let token = stack.user_token();
    let answers = run_corpus(&stack, &token).await?;
    check_seen(&upstream.seen(), &token);
    // Envoy resolved `/healthz/../mcp` to `/mcp` before the filter saw it: now a protected
    // request, answered with a challenge instead of a path refusal.
    let dot = answers
        .iter()
        .find(|(t, _)| *t == "/healthz/../mcp")
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow::anyhow!("corpus lost its first case"))?;
    assert_eq!(dot.status, 401, "{}", dot.text);
    // Escaped slashes are refused by Envoy itself (REJECT_REQUEST).
    let escaped = answers
        .iter()
        .find(|(t, _)| *t == "/healthz%2F..%2Fmcp")
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow::anyhow!("corpus lost a case"))?;
    assert_eq!(escaped.status, 400, "{}", escaped.text);
    assert!(!stack.envoy.vm_trapped());
    Ok(())
}
