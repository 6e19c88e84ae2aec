//! MCP 2026-07-28's request headers (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`) through a real
//! Envoy with the filter, on a route with per-tool policy:
//!
//! - a real MCP client speaking 2026-07-28 (rmcp, `server/discover`, headers on every request)
//!   and a real one speaking 2025-11-25 (rmcp, `initialize`, no such headers) on the same route;
//! - a body that is not the call its headers announce: 400, JSON-RPC -32020 (HEADER_MISMATCH)
//!   with the request's `id` (null for a batch or a notification);
//! - `Mcp-Name` in its encoded form `=?base64?…?=`: decoded before matching and before the tool
//!   policy is looked up; an undecodable value is 400 with -32020;
//! - the MCP headers reach the upstream exactly as the client sent them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::idp::MintRequest;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, ProtocolVersion,
};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::{
    InsufficientScopeError, StreamableHttpClientTransportConfig,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient, ServiceExt};
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

/// A tool whose name is not ASCII, as in the issue: the 2026-07-28 client sends it encoded.
const TOKYO: &str = "weather/東京";

/// One MCP route with per-tool policy: read_data is downscoped to a read-only backend token,
/// write_data and `weather/東京` need `mcp:tools:admin`.
fn tool_policy() -> StackOptions {
    StackOptions {
        plugin_patch: json!({
            "resource": null,
            "routes": [{
                "name": "backend",
                "path_prefix": "/mcp",
                "resource": "{gateway}/mcp",
                "exchange": {"scope": "backend-api:read backend-api:write"},
                "tools": {
                    "read_data": {"exchange_scope": "backend-api:read"},
                    "write_data": {"required_scopes": ["mcp:tools:admin"]},
                    TOKYO: {"required_scopes": ["mcp:tools:admin"]}
                }
            }]
        }),
        ..StackOptions::default()
    }
}

fn encoded(value: &str) -> String {
    format!("=?base64?{}?=", STANDARD.encode(value))
}

fn call_body(id: Value, tool: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": {}}})
    .to_string()
}

/// POST to `/mcp` with the user's token and extra headers; the status and the JSON body.
async fn post(
    stack: &Stack,
    token: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .post(stack.envoy.url("/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let resp = request.body(body.to_string()).send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// A real rmcp client over Streamable HTTP: `server/discover` at 2026-07-28 (`modern`), or the
/// `initialize` handshake at 2025-11-25.
async fn connect(
    url: &str,
    token: &str,
    modern: bool,
) -> Result<RunningService<RoleClient, ClientConfig>> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()?;
    let transport = StreamableHttpClientTransport::with_client(
        http,
        StreamableHttpClientTransportConfig::with_uri(url.to_string()).auth_header(token),
    );
    let info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("mcp-headers-e2e", env!("CARGO_PKG_VERSION")),
    );
    let service = if modern {
        let lifecycle = ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        };
        info.serve_with_lifecycle(transport, lifecycle).await?
    } else {
        info.with_protocol_version(ProtocolVersion::V_2025_11_25)
            .serve(transport)
            .await?
    };
    Ok(service)
}

/// `tools/call` → the structured result.
async fn call(client: &RunningService<RoleClient, ClientConfig>, tool: &str) -> Result<Value> {
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_string()))
        .await?;
    anyhow::ensure!(result.is_error != Some(true), "{tool}: {result:?}");
    result
        .structured_content
        .ok_or_else(|| anyhow::anyhow!("{tool}: no structured content"))
}

/// Whether an error chain holds rmcp's answer to a 403 with an `insufficient_scope` challenge.
fn is_insufficient_scope(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<InsufficientScopeError>()
            .is_some_and(|s| s.www_authenticate_header.contains("insufficient_scope"))
    })
}

fn admin(stack: &Stack) -> String {
    stack.mint(&MintRequest {
        sub: "admin@example.com".into(),
        scopes: vec!["mcp:tools:call".into(), "mcp:tools:admin".into()],
        ..MintRequest::default()
    })
}

/// The tools/call requests the upstream received, with their `Mcp-Name` headers.
fn upstream_calls(stack: &Stack) -> Vec<(String, Vec<String>)> {
    stack
        .upstream
        .seen_requests()
        .iter()
        .filter(|r| r.jsonrpc_method().as_deref() == Some("tools/call"))
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let name = body["params"]["name"].as_str().unwrap_or("").to_string();
            let headers = r
                .header_values("mcp-name")
                .into_iter()
                .map(str::to_string)
                .collect();
            (name, headers)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2026_client_and_a_2025_client_share_a_route_with_tool_policy() -> Result {
    let stack = Stack::start_with(tool_policy()).await?;
    let url = stack.envoy.url("/mcp");
    let user = stack.user_token();

    // MCP 2026-07-28: server/discover, then every request carries Mcp-Method (and Mcp-Name).
    let modern = connect(&url, &user, true).await?;
    assert_eq!(
        modern.peer_info().map(|i| i.protocol_version.to_string()),
        Some("2026-07-28".to_string())
    );
    let tools = modern.list_all_tools().await?;
    assert!(tools.iter().any(|t| t.name == "read_data"));
    // The headers name the tool before the body arrives: read_data gets its narrower token.
    let read = call(&modern, "read_data").await?;
    assert_eq!(read["scopes"], json!(["backend-api:read"]), "{read}");
    let who = call(&modern, "whoami").await?;
    assert_eq!(
        who["scopes"],
        json!(["backend-api:read", "backend-api:write"])
    );
    let err = call(&modern, "write_data")
        .await
        .expect_err("write_data needs mcp:tools:admin");
    assert!(is_insufficient_scope(&err), "{err:#}");
    // The encoded name is decoded, and the tool policy is the one configured for it.
    let err = call(&modern, TOKYO)
        .await
        .expect_err("weather/東京 needs mcp:tools:admin");
    assert!(is_insufficient_scope(&err), "{err:#}");
    let seen = stack.upstream.seen_requests();
    let read_request = seen
        .iter()
        .find(|r| String::from_utf8_lossy(&r.body).contains("read_data"))
        .expect("the read_data call upstream");
    assert_eq!(read_request.header_values("mcp-method"), vec!["tools/call"]);
    assert_eq!(read_request.header_values("mcp-name"), vec!["read_data"]);
    assert_eq!(
        read_request.header_values("mcp-protocol-version"),
        vec!["2026-07-28"]
    );
    assert!(
        upstream_calls(&stack)
            .iter()
            .all(|(name, _)| name != "write_data" && name != TOKYO),
        "refused calls never reach the upstream"
    );
    let _ = modern.cancel().await;

    // An admin's 2026-07-28 client calls weather/東京: the gateway lets it through (the
    // upstream has no such tool and says so), with Mcp-Name encoded as the client sent it.
    stack.upstream.clear();
    let admin_client = connect(&url, &admin(&stack), true).await?;
    let outcome = admin_client
        .call_tool(CallToolRequestParams::new(TOKYO.to_string()))
        .await;
    assert!(
        !format!("{outcome:?}").contains("InsufficientScope"),
        "{outcome:?}"
    );
    assert_eq!(
        upstream_calls(&stack),
        vec![(TOKYO.to_string(), vec![encoded(TOKYO)])]
    );
    let _ = admin_client.cancel().await;

    // MCP 2025-11-25 on the same route: initialize, no Mcp-Method/Mcp-Name. The tool policy is
    // enforced on the body; the token is the route's (no downscoping without the headers).
    stack.upstream.clear();
    let legacy = connect(&url, &user, false).await?;
    assert_eq!(
        legacy.peer_info().map(|i| i.protocol_version.to_string()),
        Some("2025-11-25".to_string())
    );
    let read = call(&legacy, "read_data").await?;
    assert_eq!(
        read["scopes"],
        json!(["backend-api:read", "backend-api:write"]),
        "{read}"
    );
    let err = call(&legacy, "write_data")
        .await
        .expect_err("write_data needs mcp:tools:admin");
    assert!(is_insufficient_scope(&err), "{err:#}");
    let seen = stack.upstream.seen_requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|r| r.header("mcp-method").is_none()),
        "the 2025-11-25 client sends no Mcp-Method"
    );
    assert!(upstream_calls(&stack)
        .iter()
        .all(|(name, _)| name != "write_data"));
    let _ = legacy.cancel().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_the_announced_call_is_refused_with_32020() -> Result {
    let stack = Stack::start_with(tool_policy()).await?;
    let user = stack.user_token();
    let announce_read = [("mcp-method", "tools/call"), ("mcp-name", "read_data")];

    // Another tool in the body: 400, -32020, the body's id.
    let (status, body) = post(
        &stack,
        &user,
        &announce_read,
        &call_body(json!(17), "write_data"),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["error"]["code"], -32020, "{body}");
    assert_eq!(body["id"], 17, "{body}");
    let (status, body) = post(
        &stack,
        &user,
        &announce_read,
        &call_body(json!("req-9"), "echo"),
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].clone(), body["id"].clone()),
        (400, json!(-32020), json!("req-9"))
    );

    // Another method in the body.
    let (status, body) = post(
        &stack,
        &user,
        &[("mcp-method", "tools/list")],
        &call_body(json!(3), "read_data"),
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].clone(), body["id"].clone()),
        (400, json!(-32020), json!(3))
    );

    // A notification has no id: null.
    let (status, body) = post(
        &stack,
        &user,
        &announce_read,
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].clone(), body["id"].clone()),
        (400, json!(-32020), Value::Null)
    );

    // A batch is never the one announced call: null id.
    let batch = format!(
        "[{},{}]",
        call_body(json!(1), "read_data"),
        call_body(json!(2), "write_data")
    );
    let (status, body) = post(&stack, &user, &announce_read, &batch).await?;
    assert_eq!(
        (status, body["error"]["code"].clone(), body["id"].clone()),
        (400, json!(-32020), Value::Null)
    );

    // Encoded names are compared decoded: another city is a mismatch.
    let osaka = encoded("weather/大阪");
    let admin = admin(&stack);
    let (status, body) = post(
        &stack,
        &admin,
        &[("mcp-method", "tools/call"), ("mcp-name", &osaka)],
        &call_body(json!(4), TOKYO),
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].clone(), body["id"].clone()),
        (400, json!(-32020), json!(4))
    );

    // Undecodable: not base64, or base64 of bytes that are not UTF-8. 400, -32020, id null
    // (refused before the body is read).
    let not_utf8 = format!("=?base64?{}?=", STANDARD.encode([0xff, 0xfe, 0x41]));
    for bad in ["=?base64?***?=", "=?base64?d2VhdGhlcg?=", not_utf8.as_str()] {
        let (status, body) = post(
            &stack,
            &admin,
            &[("mcp-method", "tools/call"), ("mcp-name", bad)],
            &call_body(json!(5), "read_data"),
        )
        .await?;
        assert_eq!(
            (status, body["error"]["code"].clone(), body["id"].clone()),
            (400, json!(-32020), Value::Null),
            "{bad}: {body}"
        );
    }
    // Mcp-Name repeated: another hop could act on the value this gateway did not check.
    let (status, body) = post(
        &stack,
        &user,
        &[
            ("mcp-method", "tools/call"),
            ("mcp-name", "read_data"),
            ("mcp-name", "write_data"),
        ],
        &call_body(json!(6), "read_data"),
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!(-32020)),
        "{body}"
    );

    // None of these bodies reached the upstream.
    assert!(
        upstream_calls(&stack).is_empty(),
        "{:?}",
        upstream_calls(&stack)
    );

    // The encoded form of the body's own name passes, to the tool's policy (admin only).
    let tokyo = encoded(TOKYO);
    let announce_tokyo = [("mcp-method", "tools/call"), ("mcp-name", tokyo.as_str())];
    let (status, _) = post(&stack, &user, &announce_tokyo, &call_body(json!(7), TOKYO)).await?;
    assert_eq!(
        status, 403,
        "policy of weather/東京 applies to its encoded name"
    );
    let (status, body) = post(&stack, &admin, &announce_tokyo, &call_body(json!(8), TOKYO)).await?;
    // Past the gateway: whatever the upstream answers a raw request without a session, it is
    // not the gateway's -32020 or 403, and the upstream got the call.
    assert_ne!(status, 403, "{body}");
    assert_ne!(body["error"]["code"], -32020, "{body}");
    assert_eq!(
        upstream_calls(&stack),
        vec![(TOKYO.to_string(), vec![tokyo.clone()])]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_headers_reach_the_upstream_untouched() -> Result {
    let stack = Stack::start_with(tool_policy()).await?;
    let user = stack.user_token();
    let city = encoded("東京");
    let sent = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "read_data"),
        ("mcp-param-region", "eu-west1"),
        ("mcp-param-city", city.as_str()),
        ("mcp-param-x-unknown", "=?base64?not base64?="),
    ];
    post(&stack, &user, &sent, &call_body(json!(1), "read_data")).await?;
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1, "the call reached the upstream");
    for (name, value) in sent {
        assert_eq!(seen[0].header_values(name), vec![value], "{name}");
    }
    // An encoded Mcp-Name is decoded to be checked, never rewritten: the upstream gets the
    // encoded text, and Mcp-Param-* values are not decoded either.
    stack.upstream.clear();
    let encoded_name = encoded("read_data");
    let sent = [
        ("mcp-method", "tools/call"),
        ("mcp-name", encoded_name.as_str()),
        ("mcp-param-region", "=?base64?IHNwYWNlZCA=?="),
    ];
    post(&stack, &user, &sent, &call_body(json!(2), "read_data")).await?;
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    for (name, value) in sent {
        assert_eq!(seen[0].header_values(name), vec![value], "{name}");
    }
    Ok(())
}
