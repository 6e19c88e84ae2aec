//! The MCP-native gateway through a real Envoy: protected resource metadata and discovery,
//! several upstreams with their own backend audiences, per-tool scopes and downscoping, identity
//! headers, audit lines and Envoy stats.

use std::time::{Duration, Instant};

use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{ExtraUpstream, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{
    AuthServerConfig, Endpoint, ExchangePolicy, Fault, IdpConfig, MintRequest,
};
use gateway_tests::mcp;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

/// The reference IdP plus a `crm` authorization server (audience `crm`) that also trusts `mcp`.
fn idp_with_crm() -> IdpConfig {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.authorization_servers.push(AuthServerConfig {
        id: "crm".into(),
        audience: "crm".into(),
        scopes: vec!["crm:read".into()],
        trusted_servers: vec!["mcp".into()],
        exchange_policies: vec![ExchangePolicy {
            client_id: CLIENT_ID.into(),
            scopes: vec!["crm:read".into()],
        }],
    });
    idp
}

/// Two MCP routes on one listener: `/mcp` (backend) with per-tool policy, `/crm/mcp` (crm), plus
/// a public `/healthz`.
fn two_routes() -> StackOptions {
    StackOptions {
        idp: idp_with_crm(),
        extra_upstreams: vec![ExtraUpstream {
            prefix: "/crm/".into(),
            as_id: "crm".into(),
            audience: "crm".into(),
            required_scopes: vec!["crm:read".into()],
        }],
        plugin_patch: json!({
            "resource": null,
            "resource_name": "Demo MCP gateway",
            "identity_headers": {"x-mcp-user": "sub", "x-mcp-client-id": "client_id"},
            "routes": [
                {
                    "name": "backend",
                    "path_prefix": "/mcp",
                    "resource": "{gateway}/mcp",
                    "exchange": {"scope": "backend-api:read backend-api:write"},
                    "tools": {
                        "read_data": {"exchange_scope": "backend-api:read"},
                        "write_data": {"required_scopes": ["mcp:tools:admin"]}
                    }
                },
                {
                    "name": "crm",
                    "path_prefix": "/crm/mcp",
                    "resource": "{gateway}/crm/mcp",
                    "exchange": {"audience": "crm", "scope": "crm:read", "path": "/oauth2/crm/v1/token"}
                },
                {"path_prefix": "/healthz", "public": true}
            ]
        }),
        ..StackOptions::default()
    }
}

async fn post_jsonrpc(stack: &Stack, path: &str, token: &str, body: &str) -> Result<Answer> {
    let started = Instant::now();
    let resp = jsonrpc_post(&stack.envoy.url(path), Some(&bearer(token)), body)
        .send()
        .await?;
    Answer::read(resp, started).await
}

fn call_tool_body(tool: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_token_discovers_the_authorization_server() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let http = reqwest::Client::new();

    // 1. No token: the challenge points at this route's metadata.
    let resp = http
        .post(stack.envoy.url("/crm/mcp"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str()?.to_string();
    let metadata_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("resource_metadata in the challenge");
    assert_eq!(
        metadata_url,
        stack
            .envoy
            .url("/.well-known/oauth-protected-resource/crm/mcp")
    );

    // 2. The metadata, without authentication.
    let resp = http.get(metadata_url).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let doc: Value = resp.json().await?;
    assert_eq!(doc["resource"], stack.envoy.url("/crm/mcp"));
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    assert_eq!(doc["resource_name"], "Demo MCP gateway");
    let issuer = doc["authorization_servers"][0]
        .as_str()
        .expect("an authorization server");
    assert_eq!(issuer, stack.idp.issuer("mcp"));

    // 3. The authorization server's own metadata (RFC 8414), where a client finds its endpoints.
    let as_meta: Value = http
        .get(format!("{issuer}/.well-known/oauth-authorization-server"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(as_meta["issuer"], issuer);

    // Per-route documents, the bare well-known path, and a CORS preflight for browsers.
    let main: Value = http
        .get(stack.envoy.url("/.well-known/oauth-protected-resource/mcp"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(main["resource"], stack.envoy.url("/mcp"));
    assert_eq!(
        main["scopes_supported"],
        json!(["mcp:tools:call", "mcp:tools:admin"])
    );
    let bare = http
        .get(stack.envoy.url("/.well-known/oauth-protected-resource"))
        .send()
        .await?;
    assert_eq!(bare.status(), 200);
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            stack.envoy.url("/.well-known/oauth-protected-resource/mcp"),
        )
        .header("origin", "https://vscode.dev")
        .header("access-control-request-method", "GET")
        .send()
        .await?;
    // Answered by Envoy's CORS filter (envoy/demo.yaml lists vscode.dev) before the token
    // filter; tests/tests/cors.rs checks the policy itself.
    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://vscode.dev"
    );
    assert!(
        stack.upstream.seen_requests().is_empty(),
        "metadata is answered by the gateway"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upstreams_get_tokens_for_their_own_audiences() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let token = stack.user_token();
    let backend = mcp::whoami(&stack.envoy.url("/mcp"), &token).await?;
    assert_eq!(backend.aud, vec!["backend"]);
    assert_eq!(
        backend.scopes,
        vec!["backend-api:read", "backend-api:write"]
    );
    let crm = mcp::whoami(&stack.envoy.url("/crm/mcp"), &token).await?;
    assert_eq!(crm.aud, vec!["crm"]);
    assert_eq!(crm.scopes, vec!["crm:read"]);
    assert_eq!(crm.iss, stack.idp.issuer("crm"));
    assert_eq!(crm.sub, backend.sub);
    // Each upstream saw only its own requests.
    assert!(!stack.extra[0].seen_requests().is_empty());
    assert!(stack
        .upstream
        .seen_requests()
        .iter()
        .all(|r| r.path == "/mcp"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_need_their_scopes_and_get_narrower_tokens() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let user = stack.user_token();

    // write_data needs mcp:tools:admin, which this user lacks: 403 naming it, nothing upstream.
    let a = post_jsonrpc(&stack, "/mcp", &user, &call_tool_body("write_data")).await?;
    let body = a.json();
    assert_eq!(a.status, 403, "{body}");
    let challenge = a.challenge().unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"mcp:tools:call mcp:tools:admin\""),
        "{challenge}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("mcp:tools:admin"),
        "{body}"
    );
    // The same through the real MCP client.
    let err = mcp::call_tool(&stack.envoy.url("/mcp"), &user, "write_data", json!({}))
        .await
        .expect_err("write_data must be refused");
    assert_eq!(mcp::error_status(&err), Some(403), "{err:#}");
    assert!(!stack
        .upstream
        .seen_requests()
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body).contains("write_data")));

    // A batch is refused when any call in it needs a scope the user lacks.
    let batch = format!(
        "[{},{}]",
        call_tool_body("read_data"),
        call_tool_body("write_data")
    );
    assert_eq!(
        post_jsonrpc(&stack, "/mcp", &user, &batch).await?.status,
        403
    );

    // An admin may call it.
    let admin = stack.mint(&MintRequest {
        sub: "admin@example.com".into(),
        scopes: vec!["mcp:tools:call".into(), "mcp:tools:admin".into()],
        ..MintRequest::default()
    });
    let written = mcp::call_tool(&stack.envoy.url("/mcp"), &admin, "write_data", json!({})).await?;
    assert_eq!(written["sub"], "admin@example.com");

    // Without MCP 2026-07-28 headers the token is chosen before the body is seen (Envoy hands
    // a Wasm filter the body only after the headers go on): the route's token.
    let read = mcp::call_tool(&stack.envoy.url("/mcp"), &user, "read_data", json!({})).await?;
    assert_eq!(
        read["scopes"],
        json!(["backend-api:read", "backend-api:write"]),
        "{read}"
    );

    // Downscoping: with `Mcp-Method`/`Mcp-Name`, read_data gets a read-only backend token.
    stack.upstream.clear();
    let body = call_tool_body("read_data");
    let resp = reqwest::Client::new()
        .post(stack.envoy.url("/mcp"))
        .header("authorization", format!("Bearer {user}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "read_data")
        .body(body.clone())
        .send()
        .await?;
    let _ = resp.status();
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1, "the call reached the upstream");
    assert_eq!(seen[0].body, body.as_bytes());
    let backend = seen[0].bearer().expect("a backend token upstream");
    assert_eq!(jwt_claims(backend)["scp"], json!(["backend-api:read"]));
    assert_eq!(jwt_claims(backend)["aud"], "backend");

    // Headers that name one tool while the body calls another are refused.
    let resp = reqwest::Client::new()
        .post(stack.envoy.url("/mcp"))
        .header("authorization", format!("Bearer {user}"))
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "read_data")
        .body(call_tool_body("write_data"))
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await?;
    assert_eq!(err["error"]["code"], -32020);
    // The write call never reached the upstream complete.
    assert!(!stack
        .upstream
        .seen_requests()
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body).contains("write_data")));

    // An admin's write_data by header gets the route's token (no narrower scope configured).
    let who = mcp::whoami(&stack.envoy.url("/mcp"), &user).await?;
    assert_eq!(who.scopes, vec!["backend-api:read", "backend-api:write"]);
    Ok(())
}

fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_bodies_are_inspected_but_reach_the_upstream_unchanged() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let user = stack.user_token();

    let a = post_jsonrpc(&stack, "/mcp", &user, "{not json").await?;
    let body = a.json();
    assert_eq!(a.status, 400);
    assert!(a.challenge().is_none());
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["error"]["code"], -32700);
    let a = post_jsonrpc(
        &stack,
        "/mcp",
        &user,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
    )
    .await?;
    assert_eq!(
        (a.status, a.json()["error"]["code"].clone()),
        (400, json!(-32600))
    );
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{}"}}}}}}"#,
        "x".repeat(70 * 1024)
    );
    assert_eq!(post_jsonrpc(&stack, "/mcp", &user, &big).await?.status, 413);
    // The headers of these requests went upstream before their bodies were checked (see
    // on_request_body); the bodies never did, so the upstream recorded no complete request.
    assert!(stack.upstream.seen_requests().is_empty());

    // A tool call with an odd but valid body passes byte for byte (the upstream answers it; the
    // session error is the upstream's business, not the gateway's).
    let body = "{ \"jsonrpc\" : \"2.0\", \"id\" : 9, \"method\" : \"tools/call\", \"params\" : {\"name\":\"echo\",\"arguments\":{\"text\":\"h\\u00e9\"}} }";
    post_jsonrpc(&stack, "/mcp", &user, body).await?;
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body.as_bytes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_exchange_never_lets_the_body_run_ahead_of_the_token_swap() -> Result {
    let stack = Stack::start().await?;
    stack
        .idp
        .set_fault(Endpoint::Token, Fault::Delay(Duration::from_millis(600)));
    let token = stack.user_token();
    let body = call_tool_body("whoami");
    let status = post_jsonrpc(&stack, "/mcp", &token, &body).await?.status;
    assert_ne!(status, 401, "the upstream accepted what it got");
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body.as_bytes(), "the body arrived intact");
    assert_ne!(
        seen[0].bearer(),
        Some(token.as_str()),
        "the inbound token never reached the upstream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_come_from_the_token_not_the_client() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let token = stack.mint(&MintRequest {
        sub: "carol@example.com".into(),
        ..MintRequest::default()
    });
    let resp = reqwest::Client::new()
        .post(stack.envoy.url("/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-mcp-user", "root@evil.example")
        .header("x-mcp-client-id", "spoofed")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await?;
    let _ = resp.status();
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header_values("x-mcp-user"),
        vec!["carol@example.com"]
    );
    assert_eq!(seen[0].header_values("x-mcp-client-id"), vec!["mcp-client"]);

    // A public route: no authentication, and neither credentials nor claimed identity pass.
    let resp = reqwest::Client::new()
        .get(stack.envoy.url("/healthz"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-mcp-user", "root@evil.example")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let seen = stack.upstream.seen_requests();
    let health = seen.last().expect("healthz reached the upstream");
    assert_eq!(health.path, "/healthz");
    assert!(health.header("authorization").is_none());
    assert!(health.header("x-mcp-user").is_none());

    // A path no route describes is refused by the gateway.
    let resp = reqwest::Client::new()
        .get(stack.envoy.url("/admin"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(stack.upstream.seen_requests().len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_audited_and_counted() -> Result {
    let stack = Stack::start_with(two_routes()).await?;
    let user = stack.mint(&MintRequest {
        sub: "dave@example.com".into(),
        extra: serde_json::from_value(json!({"jti": "jti-dave-1"}))?,
        ..MintRequest::default()
    });
    mcp::call_tool(&stack.envoy.url("/mcp"), &user, "read_data", json!({})).await?;
    post_jsonrpc(&stack, "/mcp", &user, &call_tool_body("write_data")).await?;
    reqwest::Client::new()
        .post(stack.envoy.url("/mcp"))
        .body("{}")
        .send()
        .await?;

    // The records are in Envoy's log (the default sink), batched, one JSON object per line: the
    // MCP session's requests, the tool calls, the refusal.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut audits = stack.envoy.audit_records()?;
    while !audits.iter().any(|a| a["reason"] == "missing_token") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        audits = stack.envoy.audit_records()?;
    }
    let log = stack.envoy.log();
    assert!(stack.envoy.audit_batches() >= 1, "batches in Envoy's log");
    let access_log = std::fs::read_to_string(&stack.envoy.audit_log_path)?;
    assert!(
        access_log.trim().is_empty(),
        "the default hands no record to the access log: {access_log}"
    );
    let allowed = audits
        .iter()
        .find(|a| a["decision"] == "allow" && a["tool"] == "read_data")
        .expect("an audit line for the allowed read_data call");
    assert_eq!(allowed["sub"], "dave@example.com");
    assert_eq!(allowed["token"], "jti-dave-1");
    assert_eq!(allowed["route"], "backend");
    assert_eq!(
        allowed["target_scope"],
        "backend-api:read backend-api:write"
    );
    assert!(allowed["exchanged_token"]
        .as_str()
        .is_some_and(|f| f.len() == 8));
    assert!(matches!(
        allowed["cache"].as_str(),
        Some("hit" | "miss" | "coalesced")
    ));
    let denied = audits
        .iter()
        .find(|a| a["decision"] == "deny" && a["tool"] == "write_data")
        .expect("an audit line for the denied write_data call");
    assert_eq!(denied["reason"], "insufficient_scope");
    assert_eq!(denied["status"], 403);
    assert!(audits
        .iter()
        .any(|a| a["reason"] == "missing_token" && a["status"] == 401));
    assert!(!log.contains(&user), "no token in the log");

    // Counters in Envoy's stats. The filter hands its counts to Envoy on its 500 ms tick, so
    // wait for one to pass.
    let read_counter = gateway_tests::harness::filter_counter;
    let mut stats = String::new();
    for _ in 0..30 {
        stats = stack.envoy.filter_stats().await?;
        if read_counter(&stats, "requests.denied.missing_token") >= 1
            && read_counter(&stats, "requests.allowed") >= 3
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let counter = |name: &str| read_counter(&stats, name);
    assert!(counter("requests.allowed") >= 3, "{stats}");
    assert_eq!(counter("requests.denied.insufficient_scope"), 1, "{stats}");
    assert_eq!(counter("requests.denied.missing_token"), 1, "{stats}");
    assert_eq!(
        counter("exchanges.ok"),
        1,
        "one user, one target: one exchange; {stats}"
    );
    assert!(counter("cache.hits") >= 1, "{stats}");
    assert!(counter("jwks.fetch_ok") >= 1, "{stats}");
    let prometheus = reqwest::get(stack.envoy.admin_url("/stats/prometheus"))
        .await?
        .text()
        .await?;
    assert!(
        prometheus.contains("mcp_token_exchange"),
        "metrics are exported to Prometheus"
    );
    Ok(())
}

/// Under concurrent load on two workers, every request the filter decides — allowed on the
/// cached path, allowed after an exchange, refused without a token, refused with a forged one —
/// has exactly one record, each a JSON object with the documented fields and no token in it; the
/// metadata requests it serves have none. The default sink: in Envoy's log, batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_under_load_has_one_audit_record() -> Result {
    one_record_per_request_under_load(AuditSink::Default).await
}

/// The same through Envoy's access log (`"audit_log": "access_log"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_under_load_has_one_access_log_record() -> Result {
    one_record_per_request_under_load(AuditSink::AccessLog).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AuditSink {
    Default,
    AccessLog,
}

async fn one_record_per_request_under_load(sink: AuditSink) -> Result {
    const N: usize = 600;
    const IN_FLIGHT: usize = 32;
    let stack = Stack::start_with(StackOptions {
        concurrency: 2,
        plugin_patch: match sink {
            AuditSink::Default => Value::Null,
            AuditSink::AccessLog => json!({"audit_log": "access_log"}),
        },
        ..StackOptions::default()
    })
    .await?;
    let users: Vec<String> = (0..8)
        .map(|i| {
            stack.mint(&MintRequest {
                sub: format!("load-user-{i}@example.com"),
                ..MintRequest::default()
            })
        })
        .collect();
    let mut forged = users[0].clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");

    let client = reqwest::Client::new();
    let url = stack.mcp_url();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        // Three of four carry a token: a valid one (mostly the cached path; the first request
        // of each user exchanges), every fourth none, every eighth a forged one instead.
        let token = match i % 8 {
            0 | 4 => None,
            7 => Some(forged.clone()),
            k => Some(users[(i / 8 + k) % users.len()].clone()),
        };
        let (client, url, gate) = (client.clone(), url.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut req = client.get(&url);
            if let Some(t) = &token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let status = req.send().await?.status().as_u16();
            anyhow::Ok((token.is_some() && i % 8 != 7, status))
        }));
    }
    // Requests the filter decides nothing about (the metadata document it serves) have no
    // record (in the access log: an empty line, not a record and not a `-`).
    for _ in 0..10 {
        let status = client
            .get(stack.envoy.url("/.well-known/oauth-protected-resource/mcp"))
            .send()
            .await?
            .status();
        assert_eq!(status, 200);
    }
    let mut expected_allowed = 0;
    for task in tasks {
        let (valid, status) = task.await??;
        if valid {
            expected_allowed += 1;
            assert!(
                status != 401 && status != 403,
                "valid token refused: {status}"
            );
        } else {
            assert_eq!(status, 401);
        }
    }

    let records = stack
        .envoy
        .wait_for_audit_records(N, Duration::from_secs(10))
        .await?;
    // Nothing more arrives later either: one record per request, not "at least one".
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records_after = stack.envoy.audit_records()?;
    assert_eq!(records.len(), N, "one audit record per request");
    assert_eq!(records_after.len(), N, "one audit record per request");
    let access_log = std::fs::read_to_string(&stack.envoy.audit_log_path)?;
    let batches = stack.envoy.audit_batches();
    match sink {
        AuditSink::AccessLog => {
            assert_eq!(
                access_log.lines().filter(|l| l.is_empty()).count(),
                10,
                "the metadata requests: empty lines"
            );
            assert_eq!(batches, 0, "nothing batched to Envoy's log");
        }
        AuditSink::Default => {
            assert!(access_log.trim().is_empty(), "no record in the access log");
            // Batched: far fewer log calls than records (two workers, 64 records at most each).
            assert!(
                (N / 64..N / 4).contains(&batches),
                "{batches} batches for {N} records"
            );
        }
    }

    let allowed: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "allow")
        .collect();
    let denied: Vec<&Value> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(allowed.len(), expected_allowed);
    assert_eq!(denied.len(), N - expected_allowed);
    for r in &records {
        assert_eq!(r["audit"], "mcp_token_exchange", "{r}");
        assert!(
            r["time_ms"].as_u64().is_some_and(|t| t > 1_700_000_000_000),
            "{r}"
        );
        assert!(r["latency_ms"].is_u64(), "{r}");
        assert!(r["reason"].is_string(), "{r}");
        assert!(r["cache"].is_string(), "{r}");
    }
    for r in &allowed {
        assert_eq!(r["reason"], "exchanged", "{r}");
        assert!(
            r["sub"]
                .as_str()
                .is_some_and(|s| s.starts_with("load-user-")),
            "{r}"
        );
        assert!(r["token"].is_string(), "{r}");
        assert_eq!(r["target_audience"], "backend", "{r}");
        assert!(
            r["exchanged_token"].as_str().is_some_and(|f| f.len() == 8),
            "{r}"
        );
        assert!(
            matches!(r["cache"].as_str(), Some("hit" | "miss" | "coalesced")),
            "{r}"
        );
    }
    assert!(
        allowed.iter().filter(|r| r["cache"] == "hit").count() > expected_allowed / 2,
        "most allowed requests took the cached path"
    );
    for r in &denied {
        assert_eq!(r["status"], 401, "{r}");
        assert!(
            matches!(
                r["reason"].as_str(),
                Some("missing_token" | "invalid_token")
            ),
            "{r}"
        );
    }
    let text = match sink {
        AuditSink::AccessLog => access_log,
        AuditSink::Default => stack.envoy.log(),
    };
    assert!(
        !gateway_tests::harness::contains_jwt(&text),
        "no JWT (or part of one) in the audit log"
    );
    for token in users.iter().chain([&forged]) {
        assert!(
            !text.contains(&token[token.len() - 24..]),
            "no token in the audit log"
        );
    }
    assert!(!text.contains(CLIENT_SECRET));
    Ok(())
}

/// Records still in a batch when Envoy is stopped (SIGTERM) are written on the way out: the VM's
/// gateway writes what it holds when Envoy deletes it, so a clean shutdown loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_a_batch_are_written_when_envoy_stops() -> Result {
    const N: usize = 10;
    // The tick (500 ms) may write the batch before the signal lands; then this run proves
    // nothing about the shutdown, and it is tried again.
    for attempt in 1..=3 {
        let mut stack = Stack::start().await?;
        let user = stack.mint(&MintRequest {
            sub: format!("shutdown-{attempt}@example.com"),
            ..MintRequest::default()
        });
        let client = reqwest::Client::new();
        // Requests the filter lets through (the MCP server answers a bare GET as it likes).
        let allowed = |n: usize| {
            let (client, url, user) = (client.clone(), stack.mcp_url(), user.clone());
            async move {
                for _ in 0..n {
                    let resp = client.get(&url).bearer_auth(&user).send().await?;
                    assert!(!matches!(resp.status().as_u16(), 401 | 403 | 500..));
                }
                anyhow::Ok(())
            }
        };
        // One request, then wait for a tick: keys and the exchange are in, its record written.
        allowed(1).await?;
        stack
            .envoy
            .wait_for_audit_records(1, Duration::from_secs(5))
            .await?;
        let before = stack.envoy.audit_records()?.len();
        assert_eq!(before, 1);
        allowed(N).await?;
        let held = stack.envoy.audit_records()?.len() == before;
        stack.envoy.terminate()?;
        let records = stack.envoy.audit_records()?;
        assert_eq!(
            records.len(),
            1 + N,
            "every record written by the time Envoy exits"
        );
        assert!(records
            .iter()
            .all(|r| r["decision"] == "allow"
                && r["sub"] == format!("shutdown-{attempt}@example.com")));
        if held {
            let log = stack.envoy.log();
            let signal = log
                .find("caught ENVOY_SIGTERM")
                .expect("Envoy logged the signal");
            assert!(
                log[signal..].contains(": audit records:"),
                "the last batch was written after the signal"
            );
            return Ok(());
        }
    }
    anyhow::bail!("the tick wrote the batch before SIGTERM in every attempt")
}
