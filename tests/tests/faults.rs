//! The filter against a misbehaving IdP and a bad configuration, through a real Envoy: every fault
//! gets its documented answer, nothing unverified passes, and the filter serves again as soon as
//! the fault is gone. Also: secrets and tokens never reach Envoy's log (at the harness's `info`
//! level) and the subject token never reaches the upstream.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{
    demo_config, envoy_bin, filter_counter, filter_wasm, merge_patch, plugin_config,
    wasm_filter_config, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET, SECRET_ENV,
};
use gateway_tests::idp::{Endpoint, Fault, MintRequest};
use gateway_tests::mcp;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

const TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

async fn call(stack: &Stack, token: &str) -> Result<Answer> {
    call_url(stack.mcp_url(), token.to_string()).await
}

async fn call_url(url: String, token: String) -> Result<Answer> {
    let started = Instant::now();
    // `initialize` needs no MCP session: 200 from the upstream when the gateway lets it pass.
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "faults", "version": "1"}}});
    let resp = jsonrpc_post(&url, Some(&bearer(&token)), body.to_string())
        .send()
        .await?;
    Answer::read_refusal(resp, started).await
}

/// A fresh user token (every mint has its own `jti`, so no cache entry applies to it).
fn fresh(stack: &Stack, sub: &str) -> String {
    stack.mint(&MintRequest {
        sub: sub.into(),
        ..MintRequest::default()
    })
}

/// A genuine backend token, as the IdP would issue it in an exchange, for verbatim answers.
fn backend_token(stack: &Stack, sub: &str) -> String {
    stack.mint(&MintRequest {
        as_id: "backend".into(),
        sub: sub.into(),
        scopes: vec!["backend-api:read".into()],
        ..MintRequest::default()
    })
}

fn respond(status: u16, body: impl Into<String>) -> Fault {
    Fault::Respond {
        status,
        content_type: "application/json".into(),
        body: body.into(),
    }
}

/// A good client gets through (with a token never seen before).
async fn still_serving(stack: &Stack, label: &str) -> Result {
    let sub = format!("after-{}@example.com", label.replace(' ', "-"));
    let who = mcp::whoami(&stack.mcp_url(), &fresh(stack, &sub))
        .await
        .map_err(|e| anyhow::anyhow!("after {label}: {e:#}"))?;
    assert_eq!(who.sub, sub, "after {label}");
    Ok(())
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Envoy runs the filter in one Wasm VM on the main thread and one per worker, each fetching the
/// JWKS at start; the harness returns once the first has. Counting fetches needs both done.
async fn both_vms_have_keys(stack: &Stack) -> Result {
    wait_until("the JWKS in both Wasm VMs", Duration::from_secs(10), || {
        count(&stack.envoy.log(), "JWKS loaded") >= 2
    })
    .await
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_abandons_mid_exchange_is_forgotten() -> Result {
    // While a request waits for its exchange the gateway keeps its state. When the client goes
    // away, Envoy deletes the request's context and the gateway must drop that state (and count
    // it): the module exports no `on_log`, so this rests on the context's deletion.
    let stack = Stack::start().await?;
    stack
        .idp
        .set_fault(Endpoint::Token, Fault::Delay(Duration::from_millis(1500)));
    let token = fresh(&stack, "gone@example.com");
    let gave_up = tokio::time::timeout(Duration::from_millis(300), call(&stack, &token)).await;
    assert!(
        gave_up.is_err(),
        "the client left before the exchange answered"
    );
    let mut abandoned = 0;
    for _ in 0..50 {
        abandoned = filter_counter(&stack.envoy.filter_stats().await?, "requests.abandoned");
        if abandoned > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(abandoned, 1, "the abandoned request was forgotten");
    // The late exchange answer resumes nothing and lets nothing through; the filter serves on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(stack.upstream.seen_requests().is_empty());
    assert!(!stack.envoy.vm_trapped(), "{}", stack.envoy.log_tail(40));
    stack.idp.clear_faults();
    still_serving(&stack, "an abandoned request").await
}

// ---------------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_faults_get_their_documented_answers() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"exchange": {"timeout_ms": 500}}),
        ..StackOptions::default()
    })
    .await?;
    let ok_body = |extra: Value| {
        let mut b = json!({
            "access_token": backend_token(&stack, "user@example.com"),
            "token_type": "Bearer", "issued_token_type": TOKEN_TYPE, "expires_in": 3600,
            "scope": "backend-api:read",
        });
        merge_patch(&mut b, &extra);
        b.to_string()
    };
    let huge = {
        let mut b: Value = serde_json::from_str(&ok_body(json!({})))?;
        b["padding"] = json!("x".repeat(200 * 1024));
        b.to_string()
    };
    // (name, fault, status, error code)
    let scenarios: Vec<(&str, Fault, u16, &str)> = vec![
        (
            "connection reset",
            Fault::Reset,
            503,
            "temporarily_unavailable",
        ),
        (
            "HTTP 500",
            Fault::Status(500),
            503,
            "temporarily_unavailable",
        ),
        (
            "HTTP 503",
            Fault::Status(503),
            503,
            "temporarily_unavailable",
        ),
        (
            "HTTP 429",
            Fault::Status(429),
            503,
            "temporarily_unavailable",
        ),
        (
            "slower than the timeout",
            Fault::Delay(Duration::from_millis(1500)),
            504,
            "temporarily_unavailable",
        ),
        (
            "200 with a body that is not JSON",
            Fault::MalformedBody,
            502,
            "server_error",
        ),
        (
            "200 with HTML",
            Fault::Respond {
                status: 200,
                content_type: "text/html".into(),
                body: "<html><body>Sign in</body></html>".into(),
            },
            502,
            "server_error",
        ),
        (
            "200 without access_token",
            respond(200, ok_body(json!({"access_token": null}))),
            502,
            "server_error",
        ),
        (
            "200 with an empty access_token",
            respond(200, ok_body(json!({"access_token": ""}))),
            502,
            "server_error",
        ),
        (
            "token_type MAC",
            respond(200, ok_body(json!({"token_type": "MAC"}))),
            502,
            "server_error",
        ),
        (
            "no token_type",
            respond(200, ok_body(json!({"token_type": null}))),
            502,
            "server_error",
        ),
        (
            "200 with a 200 KiB body",
            respond(200, huge),
            502,
            "server_error",
        ),
        (
            "expires_in zero",
            respond(200, ok_body(json!({"expires_in": 0}))),
            502,
            "server_error",
        ),
        (
            "expires_in negative",
            respond(200, ok_body(json!({"expires_in": -60}))),
            502,
            "server_error",
        ),
        (
            "expires_in a string",
            respond(200, ok_body(json!({"expires_in": "3600"}))),
            502,
            "server_error",
        ),
        (
            "issued_token_type id_token",
            respond(
                200,
                ok_body(json!({"issued_token_type": "urn:ietf:params:oauth:token-type:id_token"})),
            ),
            502,
            "server_error",
        ),
        (
            "401 invalid_client",
            respond(401, r#"{"error":"invalid_client"}"#),
            502,
            "server_error",
        ),
        (
            "400 invalid_grant",
            respond(400, r#"{"error":"invalid_grant"}"#),
            401,
            "invalid_token",
        ),
        (
            "403 access_denied",
            respond(403, r#"{"error":"access_denied"}"#),
            403,
            "insufficient_scope",
        ),
        (
            "400 without an OAuth error",
            respond(400, "{}"),
            502,
            "server_error",
        ),
    ];
    let mut failures = Vec::new();
    for (name, fault, status, error) in scenarios {
        let token = fresh(&stack, "user@example.com");
        stack.idp.set_fault(Endpoint::Token, fault);
        let a = call(&stack, &token).await?;
        stack.idp.clear_faults();
        let mut why = Vec::new();
        if a.status != status {
            why.push(format!("status {} (body {})", a.status, a.body));
        }
        if a.error() != json!(error) {
            why.push(format!("error {} instead of {error}", a.error()));
        }
        let challenge = a.header("www-authenticate");
        match status {
            401 | 403 => {
                if !challenge.is_some_and(|c| c.contains(&format!("error=\"{error}\""))) {
                    why.push(format!("challenge {challenge:?}"));
                }
            }
            _ => {
                if challenge.is_some() {
                    why.push(format!(
                        "a {status} is not the client's fault: {challenge:?}"
                    ));
                }
            }
        }
        if status == 503 && a.header("retry-after").is_none() {
            why.push("503 without Retry-After".into());
        }
        if status == 504 && a.elapsed > Duration::from_millis(1400) {
            why.push(format!("waited {:?} for a 500 ms timeout", a.elapsed));
        }
        if !why.is_empty() {
            failures.push(format!("{name}: {}", why.join("; ")));
        }
        // The filter serves again once the IdP behaves.
        still_serving(&stack, name).await?;
    }
    assert!(failures.is_empty(), "\n  {}", failures.join("\n  "));
    let seen = stack.upstream.seen_requests();
    for r in &seen {
        assert!(
            r.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer ")),
            "every upstream request carried a backend token"
        );
    }
    assert!(!stack.envoy.vm_trapped(), "{}", stack.envoy.log_tail(30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_error_text_is_logged_not_echoed() -> Result {
    let stack = Stack::start().await?;
    let sentinel = "SENTINEL-123";
    stack.idp.set_fault(
        Endpoint::Token,
        respond(
            400,
            json!({"error": "invalid_grant", "error_description": sentinel}).to_string(),
        ),
    );
    let a = call(&stack, &stack.user_token()).await?;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.error(), json!("invalid_token"));
    assert!(!a.body.contains(sentinel), "echoed in the body: {}", a.body);
    for (name, value) in &a.headers {
        assert!(!value.contains(sentinel), "echoed in {name}: {value}");
    }
    // The operator sees what the IdP said.
    stack.wait_for_log(sentinel, Duration::from_secs(5)).await?;
    let log = stack.envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains(sentinel))
        .unwrap_or_default();
    assert!(line.contains("invalid_grant"), "{line}");
    stack.idp.clear_faults();
    still_serving(&stack, "the sentinel").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_missing_or_huge_still_works_and_is_capped_by_the_subject_token() -> Result {
    let stack = Stack::start().await?;

    // No expires_in: the token is used, and reused (a default lifetime applies).
    stack.idp.set_fault(
        Endpoint::Token,
        respond(
            200,
            json!({"access_token": backend_token(&stack, "user@example.com"),
                   "token_type": "Bearer", "issued_token_type": TOKEN_TYPE})
            .to_string(),
        ),
    );
    let token = stack.user_token();
    let before = stack.idp.exchange_count();
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &token).await?.sub,
        "user@example.com"
    );
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &token).await?.sub,
        "user@example.com"
    );
    assert_eq!(
        stack.idp.exchange_count() - before,
        1,
        "cached without expires_in"
    );

    // expires_in = i64::MAX: used, but never reused past the subject token's expiry. The subject
    // token lives 33 s and the cache keeps a 30 s margin: 3 s of reuse at most.
    stack.idp.set_fault(
        Endpoint::Token,
        respond(
            200,
            json!({"access_token": backend_token(&stack, "short@example.com"),
                   "token_type": "Bearer", "issued_token_type": TOKEN_TYPE,
                   "expires_in": i64::MAX})
            .to_string(),
        ),
    );
    let minted = Instant::now();
    let short = stack.mint(&MintRequest {
        sub: "short@example.com".into(),
        ttl_secs: 33,
        ..MintRequest::default()
    });
    let before = stack.idp.exchange_count();
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &short).await?.sub,
        "short@example.com"
    );
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &short).await?.sub,
        "short@example.com"
    );
    assert_eq!(
        stack.idp.exchange_count() - before,
        1,
        "reused within the window"
    );
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(minted.elapsed())).await;
    assert_eq!(call(&stack, &short).await?.status, 200);
    assert_eq!(
        stack.idp.exchange_count() - before,
        2,
        "a huge expires_in must not keep the token past the subject token's exp (minus margin)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JWKS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_failing_from_the_start_answers_503_and_never_passes() -> Result {
    // The fault must be in place before the filter's first fetch (on its first tick, ~0.5 s after
    // start). If a fetch slipped through first, start over.
    let mut attempt = 0;
    let stack = loop {
        attempt += 1;
        let stack = Stack::start_with(StackOptions {
            plugin_patch: json!({"jwks": {"max_wait_ms": 800}}),
            wait_for_keys: false,
            ..StackOptions::default()
        })
        .await?;
        stack
            .idp
            .set_fault(Endpoint::Keys("mcp".into()), Fault::Status(500));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !stack.envoy.log().contains("JWKS loaded") {
            break stack;
        }
        assert!(attempt < 4, "the first JWKS fetch always beat the fault");
    };
    let token = stack.user_token();
    let calls: Vec<_> = (0..5)
        .map(|_| call_url(stack.mcp_url(), token.clone()))
        .collect();
    for a in futures_join(calls).await {
        let a = a?;
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.error(), json!("temporarily_unavailable"));
        assert!(a.header("retry-after").is_some());
        assert!(a.header("www-authenticate").is_none());
        assert!(
            a.elapsed >= Duration::from_millis(700),
            "answered after {:?}: the request did not wait for keys",
            a.elapsed
        );
    }
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(stack.idp.exchange_count(), 0);
    assert!(stack.idp.keys_fetch_count("mcp") >= 1, "the filter did try");
    assert!(!stack.envoy.log().contains("JWKS loaded"));

    // The IdP recovers: the filter's retry loads the keys and the same token passes.
    stack.idp.clear_faults();
    stack
        .wait_for_log("JWKS loaded", Duration::from_secs(10))
        .await?;
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &token).await?.sub,
        "user@example.com"
    );
    Ok(())
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F>(futs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_refresh_failures_keep_the_last_good_keys() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"refresh_interval_seconds": 1}}),
        ..StackOptions::default()
    })
    .await?;
    both_vms_have_keys(&stack).await?;
    let keys = Endpoint::Keys("mcp".into());
    let faults: Vec<(&str, Fault)> = vec![
        ("HTTP 404", Fault::Status(404)),
        ("HTTP 500", Fault::Status(500)),
        ("connection reset", Fault::Reset),
        ("200 that is not JSON", Fault::MalformedBody),
        ("200 with an empty key set", respond(200, r#"{"keys":[]}"#)),
        ("200 without keys", respond(200, r#"{"issuer":"x"}"#)),
    ];
    // Envoy runs one Wasm VM on the main thread and one per worker (2 here), each with its own
    // key set and refresh timer: wait until both met the fault.
    for (name, fault) in faults {
        let fetches = stack.idp.keys_fetch_count("mcp");
        let kept = count(&stack.envoy.log(), "keeping the previous key set");
        stack.idp.set_fault(keys.clone(), fault);
        wait_until(
            &format!("refreshes during {name}"),
            Duration::from_secs(10),
            || {
                stack.idp.keys_fetch_count("mcp") >= fetches + 2
                    && count(&stack.envoy.log(), "keeping the previous key set") >= kept + 2
            },
        )
        .await?;
        still_serving(&stack, name).await?;
        stack.idp.clear_faults();
    }

    // A rotation published in a key set with broken entries around the new key: the broken ones
    // are skipped, the good one is used. (Without it, the new kid would be unknown.)
    let new_kid = stack.idp.rotate_key("mcp");
    let good = stack.idp.public_jwk("mcp");
    assert_eq!(good["kid"], json!(new_kid));
    let mut broken_same_kid = good.clone();
    broken_same_kid["n"] = json!("AQAB");
    let garbage = vec![
        json!({"kty": "RSA", "kid": "bad-base64", "n": "!!!", "e": "AQAB"}),
        broken_same_kid,
        json!({"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"}),
        json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
        json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": good["n"], "e": "AQAB"}),
        json!({"kty": "RSA", "kid": "hs", "alg": "HS256", "n": good["n"], "e": "AQAB"}),
        json!({"kty": "RSA", "kid": "no-n", "e": "AQAB"}),
        json!("not an object"),
        json!(42),
        Value::Null,
        json!({}),
    ];
    let mut entries = garbage.clone();
    entries.insert(5, good);
    let skipped = format!("JWKS: skipped {} key(s)", garbage.len());
    let loaded = count(&stack.envoy.log(), "JWKS loaded: 1 key(s)");
    stack.idp.set_fault(
        keys.clone(),
        respond(200, json!({ "keys": entries }).to_string()),
    );
    // Both VMs loaded it: the good key, with every broken entry skipped.
    wait_until(
        "the mixed key set in both VMs",
        Duration::from_secs(10),
        || {
            let log = stack.envoy.log();
            count(&log, "JWKS loaded: 1 key(s)") >= loaded + 2 && count(&log, &skipped) >= 2
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", stack.envoy.log_tail(20)))?;
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token())
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", stack.envoy.log_tail(30)))?;
    assert_eq!(who.sub, "user@example.com");
    assert!(!stack.envoy.vm_trapped());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_on_first_use() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"min_refetch_interval_seconds": 1}}),
        ..StackOptions::default()
    })
    .await?;
    both_vms_have_keys(&stack).await?;
    let old = stack.user_token();
    let fetches = stack.idp.keys_fetch_count("mcp");
    let new_kid = stack.idp.rotate_key("mcp");
    // The fetch at start counts against the minimum refetch interval.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = stack.user_token();
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD.decode(new.split('.').next().unwrap_or_default())?,
    )?;
    assert_eq!(header["kid"], json!(new_kid));
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &new).await?.sub,
        "user@example.com"
    );
    assert_eq!(
        stack.idp.keys_fetch_count("mcp"),
        fetches + 1,
        "one refetch for the unknown kid"
    );
    // The previous key is still published, so tokens signed before the rotation keep working,
    // and another token with the new kid needs no fetch.
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &old).await?.sub,
        "user@example.com"
    );
    assert_eq!(call(&stack, &stack.user_token()).await?.status, 200);
    assert_eq!(stack.idp.keys_fetch_count("mcp"), fetches + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_key_stops_vouching_for_tokens_verified_with_it() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"refresh_interval_seconds": 1, "min_refetch_interval_seconds": 1}}),
        ..StackOptions::default()
    })
    .await?;
    both_vms_have_keys(&stack).await?;
    let old = stack.user_token();
    // Verified once, then served from the worker's verified-token cache.
    assert_eq!(call(&stack, &old).await?.status, 200);
    assert_eq!(call(&stack, &old).await?.status, 200);

    stack.idp.rotate_key("mcp");
    stack.idp.retire_old_keys("mcp");
    let fetches = stack.idp.keys_fetch_count("mcp");
    wait_until(
        "a JWKS refresh in both VMs",
        Duration::from_secs(10),
        || stack.idp.keys_fetch_count("mcp") >= fetches + 2,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a = call(&stack, &old).await?;
    assert_eq!(a.status, 401, "a token whose key left the JWKS: {}", a.body);
    assert_eq!(call(&stack, &stack.user_token()).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_is_not_a_flood_of_fetches() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"min_refetch_interval_seconds": 30}}),
        ..StackOptions::default()
    })
    .await?;
    both_vms_have_keys(&stack).await?;
    let fetches = stack.idp.keys_fetch_count("mcp");
    let claims =
        URL_SAFE_NO_PAD.decode(stack.user_token().split('.').nth(1).unwrap_or_default())?;
    let tokens: Vec<String> = (0..50)
        .map(|i| {
            let header = json!({"kid": format!("made-up-{i}"), "alg": "RS256"}).to_string();
            stack
                .idp
                .sign_raw("mcp", header.as_bytes(), &claims)
                .expect("sign_raw")
        })
        .collect();
    // Half at once, half one after another.
    let mut answers = Vec::new();
    let concurrent: Vec<_> = tokens[..25]
        .iter()
        .map(|t| call_url(stack.mcp_url(), t.clone()))
        .collect();
    for a in futures_join(concurrent).await {
        answers.push(a?.status);
    }
    for t in &tokens[25..] {
        answers.push(call(&stack, t).await?.status);
    }
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    let grew = stack.idp.keys_fetch_count("mcp") - fetches;
    assert!(grew <= 2, "{grew} JWKS fetches for 50 unknown kids");
    assert!(stack.upstream.seen_requests().is_empty());
    still_serving(&stack, "the kid flood").await
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Runs `envoy --mode validate` on the demo bootstrap with the plugin configuration patched (or
/// replaced by `raw`); returns whether Envoy accepted it and everything it printed.
fn validate(
    dir: &Path,
    name: &str,
    patch: &Value,
    raw: Option<&str>,
    with_secret: bool,
) -> Result<(bool, String)> {
    let mut bootstrap = demo_config()?;
    let mut plugin = plugin_config(&mut bootstrap)?;
    if !patch.is_null() {
        merge_patch(&mut plugin, patch);
    }
    let wasm = filter_wasm()?;
    let filter = wasm_filter_config(&mut bootstrap)?;
    filter["configuration"]["value"] =
        Value::String(raw.map_or_else(|| plugin.to_string(), str::to_string));
    filter["vm_config"]["code"]["local"]["filename"] = Value::String(wasm.display().to_string());
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)?;
    let mut cmd = Command::new(envoy_bin()?);
    cmd.args([
        "--mode",
        "validate",
        "--disable-hot-restart",
        "-l",
        "info",
        "-c",
    ])
    .arg(&path)
    .env_remove(SECRET_ENV)
    .stdin(Stdio::null());
    if with_secret {
        cmd.env(SECRET_ENV, CLIENT_SECRET);
    }
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn invalid_plugin_configs_are_refused_at_load_naming_the_field() -> Result {
    let dir = std::env::temp_dir().join(format!("mcp-gw-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // Control: the demo configuration validates, and validation does run the plugin's
    // configuration (its log line proves it), so the refusals below come from the filter.
    let (ok, out) = validate(&dir, "good", &Value::Null, None, true)?;
    assert!(ok, "the demo config must validate:\n{out}");
    assert!(
        out.contains("configured:"),
        "validate mode did not configure the plugin:\n{out}"
    );

    // (case, patch, raw config, secret in Envoy's environment, text the refusal must contain)
    let cases: Vec<(&str, Value, Option<&str>, bool, &str)> = vec![
        (
            "unknown top-level field",
            json!({"audiance": ["mcpserver"]}),
            None,
            true,
            "audiance",
        ),
        (
            "unknown nested field",
            json!({"jwks": {"refresh_intervall_seconds": 5}}),
            None,
            true,
            "jwks.refresh_intervall_seconds",
        ),
        (
            "wrong type",
            json!({"exchange": {"timeout_ms": "soon"}}),
            None,
            true,
            "exchange.timeout_ms",
        ),
        (
            "wrong type (number as text)",
            json!({"clock_skew_seconds": "60"}),
            None,
            true,
            "clock_skew_seconds",
        ),
        (
            "missing required field",
            json!({"issuer": null}),
            None,
            true,
            "issuer",
        ),
        (
            "missing required section",
            json!({"jwks": null}),
            None,
            true,
            "jwks",
        ),
        (
            "empty audiences",
            json!({"audiences": []}),
            None,
            true,
            "audiences",
        ),
        (
            "bad JWKS path",
            json!({"jwks": {"path": "oauth2/mcp/v1/keys"}}),
            None,
            true,
            "jwks.path",
        ),
        (
            "bad token path",
            json!({"exchange": {"path": "http://idp/token"}}),
            None,
            true,
            "exchange.path",
        ),
        (
            "secret env var named but unset",
            json!({"exchange": {"client_secret_env": "NO_SUCH_SECRET_VAR"}}),
            None,
            true,
            "exchange.client_secret_env",
        ),
        (
            "secret env var missing from Envoy's environment",
            Value::Null,
            None,
            false,
            "exchange.client_secret_env",
        ),
        (
            "value out of range",
            json!({"max_token_bytes": 10}),
            None,
            true,
            "max_token_bytes",
        ),
        (
            "not JSON",
            Value::Null,
            Some("{\"issuer\": "),
            true,
            "invalid configuration",
        ),
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, patch, raw, secret, field))| {
            let dir = dir.clone();
            let raw = raw.map(str::to_string);
            std::thread::spawn(move || {
                let r = validate(&dir, &format!("case{i}"), &patch, raw.as_deref(), secret);
                (name, field, r)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for h in handles {
        let (name, field, r) = h.join().expect("validate thread");
        let (ok, out) = r?;
        if ok {
            failures.push(format!("{name}: Envoy accepted the config"));
        } else if !out.contains(field) {
            failures.push(format!(
                "{name}: the refusal does not name {field:?}:\n{out}"
            ));
        } else if out.contains(CLIENT_SECRET) {
            failures.push(format!("{name}: the client secret is in Envoy's output"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_reach_the_log_nor_the_subject_token_the_upstream() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"exchange": {"timeout_ms": 500}}),
        ..StackOptions::default()
    })
    .await?;
    let mut subjects = Vec::new();

    // Successful exchanges, through full MCP sessions.
    for sub in ["alice@example.com", "bob@example.com"] {
        let t = fresh(&stack, sub);
        assert_eq!(mcp::whoami(&stack.mcp_url(), &t).await?.sub, sub);
        subjects.push(t);
    }
    // Failed exchanges: refused subject, outage, timeout, garbage, refused client.
    let expired_within_skew = stack.mint(&MintRequest {
        ttl_secs: -30,
        ..MintRequest::default()
    });
    assert_eq!(call(&stack, &expired_within_skew).await?.status, 401);
    subjects.push(expired_within_skew);
    for (fault, status) in [
        (Fault::Status(500), 503),
        (Fault::Delay(Duration::from_millis(1200)), 504),
        (Fault::MalformedBody, 502),
        (
            respond(
                401,
                r#"{"error":"invalid_client","error_description":"bad secret"}"#,
            ),
            502,
        ),
    ] {
        let t = fresh(&stack, "carol@example.com");
        stack.idp.set_fault(Endpoint::Token, fault);
        assert_eq!(call(&stack, &t).await?.status, status);
        stack.idp.clear_faults();
        subjects.push(t);
    }
    // Rejected before any exchange.
    let expired = stack.mint(&MintRequest {
        ttl_secs: -3600,
        ..MintRequest::default()
    });
    assert_eq!(call(&stack, &expired).await?.status, 401);
    subjects.push(expired);

    // The exchanged tokens, as the upstream received them.
    let seen = stack.upstream.seen_requests();
    let exchanged: BTreeSet<String> = seen
        .iter()
        .filter_map(|r| r.bearer().map(str::to_string))
        .collect();
    assert_eq!(exchanged.len(), 2, "one backend token per successful user");

    let log = stack.envoy.log();
    assert!(count(&log, "exchanged token") >= 2, "successes are logged");
    assert!(
        count(&log, "token exchange for token") >= 4,
        "failures are logged"
    );
    let basic = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    for (what, secret) in [
        ("client secret", CLIENT_SECRET),
        ("Basic credentials", basic.as_str()),
    ] {
        assert!(!log.contains(secret), "{what} in Envoy's log");
        for r in &seen {
            for (name, value) in &r.headers {
                assert!(!value.contains(secret), "{what} upstream in {name}");
            }
        }
    }
    let parts = |t: &str| -> Vec<String> {
        let s: Vec<&str> = t.split('.').collect();
        vec![t.to_string(), s[1].to_string(), s[2].to_string()]
    };
    for t in &subjects {
        for p in parts(t) {
            assert!(
                !log.contains(&p),
                "a subject token (or part) in Envoy's log"
            );
            for r in &seen {
                for (name, value) in &r.headers {
                    assert!(!value.contains(&p), "a subject token upstream in {name}");
                }
                assert!(
                    !String::from_utf8_lossy(&r.body).contains(&p),
                    "a subject token in an upstream body"
                );
            }
        }
    }
    for t in &exchanged {
        for p in parts(t) {
            assert!(
                !log.contains(&p),
                "an exchanged token (or part) in Envoy's log"
            );
        }
    }
    Ok(())
}
