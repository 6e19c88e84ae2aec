//! A real browser against the gateway: headless Chromium (Debian's `chromium`, driven by
//! playwright-core) loads a page from one loopback origin, `http://127.0.0.1:<page port>`, that
//! runs the MCP TypeScript SDK client (bundled by esbuild) against the gateway on another,
//! `http://127.0.0.1:<envoy port>`. Every cross-origin rule is the browser's own.
//!
//! From the origin on the gateway's CORS allowlist:
//! - without a token the SDK's connect fails with the gateway's 401 (a CORS failure would be a
//!   bare TypeError), and the SDK reads `resource_metadata` from `WWW-Authenticate` and fetches
//!   the protected resource metadata it names;
//! - with a token the SDK initializes (reading `Mcp-Session-Id`), lists tools, calls `whoami`
//!   (which reports the backend token the upstream received) and ends the session (DELETE);
//! - a bad token and a token without the scope are readable 401 and 403 answers;
//! - a request with a header the policy does not list, and one with `credentials: 'include'`
//!   (the gateway grants no credentials), are refused by the browser.
//!
//! From an origin not on the list, every request is refused by the browser and nothing it sent
//! reaches the upstream.
//!
//! Needs `make browser` (Chromium from Debian, `npm ci` in tests/browser; `make e2e` runs it).

use std::path::PathBuf;
use std::process::Command;

use gateway_tests::harness::{free_port, workspace_root, Stack, StackOptions};
use gateway_tests::idp::MintRequest;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

fn browser_dir() -> PathBuf {
    workspace_root().join("tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Runs tests/browser/run.mjs and returns what each page saw.
fn run_pages(params: &Value) -> Result<Value> {
    let dir = browser_dir();
    for needed in [
        dir.join("node_modules/playwright-core"),
        dir.join("node_modules/esbuild"),
        dir.join("node_modules/@modelcontextprotocol/sdk"),
        chromium(),
    ] {
        anyhow::ensure!(
            needed.exists(),
            "{} is missing: run `make browser` (installs Debian's chromium and tests/browser's \
             npm packages)",
            needed.display()
        );
    }
    let out = Command::new("node")
        .current_dir(&dir)
        .arg("run.mjs")
        .arg(params.to_string())
        .env("CHROMIUM", chromium())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "run.mjs failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(stdout.trim())?)
}

fn is_browser_refusal(v: &Value) -> bool {
    v["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("TypeError: Failed to fetch"))
        && v["code"].is_null()
}

/// Whether the page's console (where Chromium explains each CORS refusal) has `needle`.
fn console_says(page: &Value, needle: &str) -> bool {
    page["console"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|line| line.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_client_follows_the_challenge_and_calls_tools_through_the_gateway() -> Result {
    let (listed, unlisted) = (free_port()?, free_port()?);
    let listed_origin = format!("http://127.0.0.1:{listed}");
    let unlisted_origin = format!("http://127.0.0.1:{unlisted}");
    let stack = Stack::start_with(StackOptions {
        cors_origins: Some(vec![listed_origin.clone()]),
        plugin_patch: json!({"resource": "{gateway}/mcp"}),
        ..StackOptions::default()
    })
    .await?;
    let token = stack.user_token();
    let no_scope = stack.mint(&MintRequest {
        scopes: vec![],
        ..MintRequest::default()
    });
    let bad = format!("{}x", &token[..token.len() - 1]);
    let url = stack.mcp_url();

    let seen = run_pages(&json!({
        "url": url, "token": token, "badToken": bad, "noScopeToken": no_scope,
        "pages": [listed, unlisted],
    }))?;
    // Shown when an assertion below fails (the test harness captures it otherwise).
    eprintln!("{seen:#}");
    let pages = seen["pages"].as_array().expect("pages");
    assert_eq!(pages.len(), 2, "{seen}");
    let (ok, other) = (&pages[0], &pages[1]);
    assert_eq!(ok["origin"], listed_origin);
    assert_eq!(other["origin"], unlisted_origin);

    // Without a token: the 401 itself, and the challenge read through the SDK.
    let anon = &ok["withoutToken"];
    assert_eq!(anon["connect"]["code"], 401, "{anon}");
    assert_eq!(anon["status"], 401, "{anon}");
    let metadata_url = stack.envoy.url("/.well-known/oauth-protected-resource/mcp");
    assert_eq!(anon["resourceMetadataUrl"], metadata_url, "{anon}");
    assert_eq!(anon["scope"], "mcp:tools:call", "{anon}");
    assert_eq!(anon["metadata"]["resource"], url, "{anon}");
    assert_eq!(
        anon["metadata"]["authorization_servers"],
        json!([stack.idp.issuer("mcp")]),
        "{anon}"
    );

    // With a token: a whole session through the SDK, and the upstream saw the backend token.
    let session = &ok["withToken"];
    assert!(session["failure"].is_null(), "{session}");
    assert!(
        session["sessionId"].as_str().is_some_and(|s| !s.is_empty()),
        "the SDK read Mcp-Session-Id: {session}"
    );
    assert!(
        session["tools"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("whoami"))),
        "{session}"
    );
    let who = &session["whoami"];
    assert_eq!(who["sub"], "user@example.com", "{session}");
    assert_eq!(who["aud"], json!(["backend"]), "{session}");
    assert_eq!(who["scopes"], json!(["backend-api:read"]), "{session}");
    assert_eq!(session["terminated"], true, "{session}");

    assert_eq!(ok["plain"]["status"], 200, "{ok}");
    assert_eq!(ok["invalidToken"]["status"], 401, "{ok}");
    assert!(
        ok["invalidToken"]["wwwAuthenticate"]
            .as_str()
            .is_some_and(|c| c.contains("error=\"invalid_token\"")),
        "{ok}"
    );
    assert_eq!(ok["insufficientScope"]["status"], 403, "{ok}");
    assert!(
        ok["insufficientScope"]["wwwAuthenticate"]
            .as_str()
            .is_some_and(|c| c.contains("error=\"insufficient_scope\"")),
        "{ok}"
    );
    assert!(is_browser_refusal(&ok["unlistedHeader"]), "{ok}");
    assert!(is_browser_refusal(&ok["withCookies"]), "{ok}");
    // … refused for the CORS reasons, by the browser's own account.
    assert!(
        console_says(
            ok,
            "x-unlisted-header is not allowed by Access-Control-Allow-Headers"
        ),
        "{ok}"
    );
    assert!(
        console_says(ok, "'Access-Control-Allow-Credentials'"),
        "{ok}"
    );

    // The origin not on the list: the browser refuses everything.
    assert!(
        is_browser_refusal(&other["withoutToken"]["connect"]),
        "{other}"
    );
    assert!(other["withoutToken"]["status"].is_null(), "{other}");
    assert!(
        is_browser_refusal(&other["withToken"]["failure"]),
        "{other}"
    );
    for probe in [
        "invalidToken",
        "insufficientScope",
        "unlistedHeader",
        "withCookies",
        "plain",
    ] {
        assert!(is_browser_refusal(&other[probe]), "{probe}: {other}");
    }
    assert!(
        console_says(other, "No 'Access-Control-Allow-Origin' header is present"),
        "{other}"
    );

    // What reached the upstream: only the listed page's requests, each with a backend token
    // (never the user's), and no preflight.
    let upstream = stack.upstream.seen_requests();
    assert!(!upstream.is_empty());
    for r in &upstream {
        assert_ne!(r.method, "OPTIONS", "a preflight was forwarded: {r:?}");
        assert_eq!(r.header("origin"), Some(listed_origin.as_str()), "{r:?}");
        let backend = r.bearer().expect("a bearer token upstream");
        assert_ne!(backend, token, "the client's token reached the upstream");
    }
    assert!(upstream.iter().any(|r| r.method == "DELETE"));
    Ok(())
}
