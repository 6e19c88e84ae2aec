//! The walkthrough users come from, end to end: a real MCP client → Envoy + the filter → Apollo
//! MCP Server (validating the backend token itself: `auth.servers` = the backend authorization
//! server, `audiences: [backend]`, `scopes: [backend-api:read]`) → a GraphQL API on Apollo Server
//! that verifies the same token again with `@okta/jwt-verifier`.
//!
//! The Apollo parts are installed by `make apollo` (`make test-apollo` installs them, sets
//! `APOLLO_E2E=1` and runs this file). Without that variable, a machine lacking them skips the
//! chain test with a message; with it, a missing or failing part fails the test, naming the part
//! and its log.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::apollo::{
    self, fingerprint, log_dir, ApolloMcpServer, Backend, Parts, Tap, REQUIRED_ENV,
};
use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::idp::MintRequest;
use gateway_tests::mcp::{error_status, McpSession};
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

const USER: &str = "walkthrough-user@example.com";

/// The parts, or `None` (skip) when they are missing and `APOLLO_E2E` is unset.
fn parts_or_skip(test: &str) -> Result<Option<Parts>> {
    match Parts::locate() {
        Ok(parts) => Ok(Some(parts)),
        Err(e) if std::env::var_os(REQUIRED_ENV).is_none() => {
            // Straight to stderr, not through the test harness's capture: a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: the Apollo walkthrough parts are not installed ({e:#}). \
                 `make test-apollo` installs them and runs this test ({REQUIRED_ENV}=1 makes a \
                 missing part a failure)."
            );
            Ok(None)
        }
        Err(e) => Err(e.context(format!(
            "{REQUIRED_ENV} is set but the Apollo parts are not usable"
        ))),
    }
}

/// The GraphQL `data` of an Apollo MCP Server tool result (structured or text content).
fn graphql_data(result: &Value) -> Value {
    let doc = match result {
        Value::String(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        other => other.clone(),
    };
    doc.get("data").cloned().unwrap_or(doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apollo_walkthrough_chain_through_envoy() -> Result {
    let Some(parts) = parts_or_skip("apollo_walkthrough_chain_through_envoy")? else {
        return Ok(());
    };
    let logs = log_dir("chain")?;

    // Envoy sends upstream to the tap, the tap to Apollo MCP Server: the tap keeps every byte
    // Envoy sent. Apollo's port is chosen first, so the tap (and Envoy) can be set up before it.
    let apollo_port = gateway_tests::harness::free_port()?;
    let tap = Tap::start(SocketAddr::from(([127, 0, 0, 1], apollo_port))).await?;
    let stack = Stack::start_with(StackOptions {
        upstream_port: Some(tap.port),
        ..StackOptions::default()
    })
    .await?;
    let issuer = stack.idp.issuer("backend");
    let backend = Backend::start(&parts, &issuer, &logs).await?;
    let server = ApolloMcpServer::start(
        &parts,
        apollo_port,
        &issuer,
        &backend.url(),
        &stack.mcp_url(),
        &logs,
    )
    .await?;

    let client_token = stack.mint(&MintRequest {
        sub: USER.into(),
        ..MintRequest::default()
    });
    let client_fp = fingerprint(&client_token);

    // 1. Apollo MCP Server itself refuses the client's token: it wants aud=backend.
    let direct = McpSession::connect(&server.mcp_url(), &client_token).await;
    let err = direct.err().ok_or_else(|| {
        anyhow::anyhow!("Apollo MCP Server accepted the client's token (aud=mcpserver) directly")
    })?;
    assert_eq!(error_status(&err), Some(401), "{err:#}");
    assert!(
        format!("{err:#}").contains("resource_metadata="),
        "Apollo MCP Server's 401 should point at its RFC 9728 metadata: {err:#}"
    );

    // 2. The same client token through Envoy: tools listed, and each call reaches the backend.
    let session = McpSession::connect(&stack.mcp_url(), &client_token).await?;
    let mut tools = session.tools().await?;
    tools.sort();
    assert_eq!(tools, ["GetProduct", "ListProducts", "WhoAmI"]);

    let catalogue: Value = serde_json::from_str(&std::fs::read_to_string(
        parts.backend_dir.join("data.json"),
    )?)?;
    let listed = graphql_data(&session.call("ListProducts", Value::Null).await?);
    assert_eq!(listed["products"], catalogue["products"], "{listed}");
    let one = graphql_data(&session.call("GetProduct", json!({"id": "p-2"})).await?);
    assert_eq!(one["product"], catalogue["products"][1], "{one}");
    let me = graphql_data(&session.call("WhoAmI", Value::Null).await?)["me"].clone();
    session.close().await;

    // 3. What the GraphQL API's verifier accepted: the same user, aud=backend, backend-api:read,
    //    from the backend authorization server, and never the client's token.
    assert_eq!(me["sub"], USER, "{me}");
    assert_eq!(me["aud"], "backend", "{me}");
    assert_eq!(me["scopes"], json!(["backend-api:read"]), "{me}");
    assert_eq!(me["issuer"], issuer, "{me}");
    let backend_fp = me["tokenFingerprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(backend_fp, client_fp, "the backend got the client's token");

    let seen = backend.seen()?;
    assert_eq!(
        seen.len(),
        3,
        "one GraphQL request per tool call: {seen:#?}"
    );
    for record in &seen {
        assert_eq!(record["accepted"], true, "{record}");
        assert_eq!(record["sub"], USER, "{record}");
        assert_eq!(record["aud"], "backend", "{record}");
        assert_eq!(record["scp"], json!(["backend-api:read"]), "{record}");
        assert_eq!(record["fingerprint"], backend_fp.as_str(), "{record}");
    }

    // 4. Envoy → Apollo MCP Server: only the exchanged token crossed, never the client's.
    assert!(
        !tap.saw(&client_token),
        "the client's token reached Apollo MCP Server"
    );
    let sent = tap.bearer_fingerprints();
    assert!(!sent.is_empty(), "no Authorization header crossed the tap");
    assert!(
        sent.iter().all(|fp| *fp == backend_fp),
        "Envoy sent other tokens than the one the backend verified ({backend_fp}): {sent:?}"
    );
    assert!(!sent.contains(&client_fp));

    // 5. One exchange, at the backend authorization server, for this client's token.
    let exchanges = stack.idp.exchanges();
    assert_eq!(exchanges.len(), 1, "{exchanges:#?}");
    assert_eq!(exchanges[0].field("audience"), Some("backend"));
    assert_eq!(exchanges[0].field("scope"), Some("backend-api:read"));
    assert_eq!(
        exchanges[0].field("subject_token").map(fingerprint),
        Some(client_fp.clone())
    );

    // 6. Apollo MCP Server found the IdP's metadata the way it finds Okta's: after the RFC 8414
    //    and OIDC path-insertion URLs, at <server>/.well-known/openid-configuration.
    let discovered = apollo::log_lines(&server.process.log(), "metadata discovered");
    assert!(
        discovered
            .iter()
            .any(|l| l.contains(&format!("{issuer}/.well-known/openid-configuration"))),
        "Apollo MCP Server's log: {discovered:?}"
    );

    // 7. The backend's verifier is real: the client's token, sent to it directly, is refused
    //    (wrong issuer's key and aud=mcpserver).
    let refused = reqwest::Client::new()
        .post(backend.url())
        .bearer_auth(&client_token)
        .json(&json!({"query": "{ me { sub } }"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    assert_eq!(refused.status(), 401);
    let last = backend.seen()?.pop().unwrap_or_default();
    assert_eq!(last["accepted"], false, "{last}");
    assert_eq!(last["fingerprint"], client_fp.as_str(), "{last}");
    Ok(())
}

/// A part that cannot start fails with a message naming it and its log (here: a binary that is
/// not there). Needs none of the Apollo parts installed.
#[tokio::test]
async fn a_missing_apollo_mcp_server_binary_is_named_with_its_log() -> Result {
    let logs = log_dir("missing-binary")?;
    let parts = Parts {
        mcp_server_bin: logs.join("no-such-apollo-mcp-server"),
        node: "node".into(),
        backend_dir: apollo::apollo_dir().join("backend"),
    };
    let err = match ApolloMcpServer::start(
        &parts,
        gateway_tests::harness::free_port()?,
        "http://127.0.0.1:9/oauth2/backend",
        "http://127.0.0.1:9/",
        "http://127.0.0.1:9/mcp",
        &logs,
    )
    .await
    {
        Ok(_) => anyhow::bail!("a missing binary started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("Apollo MCP Server"), "{err}");
    assert!(err.contains("no-such-apollo-mcp-server"), "{err}");
    let log = logs.join("apollo-mcp-server.log");
    assert!(err.contains(&format!("log: {}", log.display())), "{err}");
    assert!(log.exists());

    // `Parts::check` says the same before anything starts.
    let missing = match parts.check() {
        Ok(_) => anyhow::bail!("a missing binary passed the check"),
        Err(e) => format!("{e:#}"),
    };
    assert!(missing.contains("Apollo MCP Server binary"), "{missing}");
    assert!(missing.contains("make apollo"), "{missing}");
    Ok(())
}

/// A part that starts and exits (Apollo MCP Server with an authorization server URL that is not
/// a URL) is named with its exit status and log.
#[tokio::test]
async fn an_apollo_mcp_server_that_exits_at_start_is_named_with_its_log() -> Result {
    let Some(parts) =
        parts_or_skip("an_apollo_mcp_server_that_exits_at_start_is_named_with_its_log")?
    else {
        return Ok(());
    };
    let logs = log_dir("exits")?;
    let err = match ApolloMcpServer::start(
        &parts,
        gateway_tests::harness::free_port()?,
        "not a url",
        "http://127.0.0.1:9/",
        "http://127.0.0.1:9/mcp",
        &logs,
    )
    .await
    {
        Ok(_) => anyhow::bail!("Apollo MCP Server started with `servers: [not a url]`"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("Apollo MCP Server"), "{err}");
    assert!(err.contains("exited during start"), "{err}");
    assert!(err.contains("apollo-mcp-server.log"), "{err}");
    assert!(
        err.contains("invalid auth server URL"),
        "the log's last lines: {err}"
    );
    Ok(())
}

/// The GraphQL backend refuses an http issuer that is not on loopback (Okta's verifier's own https
/// check, relaxed only for this machine's test IdP), and that failure names it and its log.
#[tokio::test]
async fn a_backend_with_a_non_loopback_http_issuer_is_named_with_its_log() -> Result {
    let Some(parts) =
        parts_or_skip("a_backend_with_a_non_loopback_http_issuer_is_named_with_its_log")?
    else {
        return Ok(());
    };
    let logs = log_dir("backend-issuer")?;
    let err = match Backend::start(&parts, "http://idp.example.com/oauth2/backend", &logs).await {
        Ok(_) => anyhow::bail!("the backend accepted an http issuer off loopback"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("the GraphQL backend"), "{err}");
    assert!(err.contains("exited during start"), "{err}");
    assert!(err.contains("backend.log"), "{err}");
    assert!(err.contains("must start with https"), "{err}");
    Ok(())
}
