//! Cache correctness through a real Envoy with two workers: an exchanged token is reused by every
//! worker, concurrent misses for one token cost one IdP call, failures are shared briefly, and
//! expired entries are not served.

use std::time::{Duration, Instant};

use gateway_tests::client::{bearer, jsonrpc_post};
use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::harness::{CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{Endpoint, Fault, IdpConfig, MintRequest};
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

/// One request on a fresh connection, so Envoy spreads requests over its workers.
async fn call(stack: &Stack, token: &str) -> Result<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let resp = client
        .get(stack.envoy.url("/healthz"))
        .header("authorization", bearer(token))
        .header("connection", "close")
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

/// `n` concurrent requests with `token`, each on its own connection; their statuses.
async fn burst(stack: &Stack, token: &str, n: usize) -> Result<Vec<u16>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = stack.envoy.url("/healthz");
        let token = token.to_string();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()?;
            let resp = client
                .get(url)
                .header("authorization", bearer(&token))
                .send()
                .await?;
            anyhow::Ok(resp.status().as_u16())
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await??);
    }
    Ok(statuses)
}

/// An MCP `initialize` on a fresh connection: the upstream checks the token on `/mcp`.
async fn initialize(stack: &Stack, token: &str) -> Result<u16> {
    let resp = jsonrpc_post(
        &stack.mcp_url(),
        Some(&bearer(token)),
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"caching-test","version":"1"}}}"#,
    )
    .header("connection", "close")
    .send()
    .await?;
    Ok(resp.status().as_u16())
}

async fn two_workers(patch: serde_json::Value, idp: IdpConfig) -> Result<Stack> {
    Stack::start_with(StackOptions {
        concurrency: 2,
        plugin_patch: patch,
        idp,
        ..StackOptions::default()
    })
    .await
}

fn idp() -> IdpConfig {
    IdpConfig::reference(CLIENT_ID, CLIENT_SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_exchange_serves_every_worker() -> Result {
    let stack = two_workers(json!({}), idp()).await?;
    let token = stack.user_token();
    for i in 0..40 {
        assert_eq!(call(&stack, &token).await?, 200, "request {i}");
    }
    assert_eq!(
        stack.idp.exchange_count(),
        1,
        "40 requests over 2 workers, one exchange"
    );
    // Both workers did serve requests (otherwise this test proves nothing about sharing).
    let seen = stack.upstream.seen_requests().len();
    assert_eq!(seen, 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_one_token_cost_one_exchange() -> Result {
    let stack = two_workers(json!({}), idp()).await?;
    // A slow token endpoint, so that the whole burst arrives while the first exchange is in
    // flight; several bursts, each with a fresh token (fresh lease slots, both workers racing).
    stack
        .idp
        .set_fault(Endpoint::Token, Fault::Delay(Duration::from_millis(150)));
    for round in 0..4u64 {
        let before = stack.idp.exchange_count();
        let token = stack.mint(&MintRequest {
            sub: format!("burst-{round}"),
            ..MintRequest::default()
        });
        for status in burst(&stack, &token, 64).await? {
            assert_eq!(status, 200);
        }
        assert_eq!(
            stack.idp.exchange_count() - before,
            1,
            "burst {round}: 64 concurrent requests, one exchange"
        );
    }
    assert_eq!(stack.upstream.seen_requests().len(), 4 * 64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_exchange_is_not_retried_by_every_waiting_request() -> Result {
    let stack = two_workers(json!({}), idp()).await?;
    stack.idp.set_fault(
        Endpoint::Token,
        Fault::Respond {
            status: 400,
            content_type: "application/json".into(),
            body: r#"{"error":"invalid_grant","error_description":"slow no"}"#.into(),
        },
    );
    let token = stack.user_token();
    for status in burst(&stack, &token, 16).await? {
        assert_eq!(
            status, 401,
            "invalid_grant → 401 invalid_token for every waiter"
        );
    }
    assert!(
        stack.idp.exchange_count() <= 2,
        "got {} exchanges",
        stack.idp.exchange_count()
    );
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_tokens_expire_with_the_subject_token() -> Result {
    // Subject token lives 33 s, margin 30 s: the exchanged token may be reused for ~3 s only.
    let stack = two_workers(json!({"exchange": {"cache_margin_seconds": 30}}), idp()).await?;
    let token = stack.mint(&MintRequest {
        ttl_secs: 33,
        ..MintRequest::default()
    });
    assert_eq!(call(&stack, &token).await?, 200);
    assert_eq!(call(&stack, &token).await?, 200);
    assert_eq!(stack.idp.exchange_count(), 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(call(&stack, &token).await?, 200);
    assert_eq!(
        stack.idp.exchange_count(),
        2,
        "expired cache entry was not served"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_targets_never_share_a_cached_token() -> Result {
    // The same user token through two gateways configured for different scopes: each exchange
    // is its own (the cache key includes the target).
    let read = two_workers(json!({}), idp()).await?;
    let token = read.user_token();
    assert_eq!(call(&read, &token).await?, 200);
    let who = gateway_tests::mcp::whoami(&read.mcp_url(), &token).await?;
    assert_eq!(who.scopes, vec!["backend-api:read"]);
    let write = two_workers(
        json!({"exchange": {"scope": "backend-api:read backend-api:write"}}),
        idp(),
    )
    .await?;
    let token = write.user_token();
    let who = gateway_tests::mcp::whoami(&write.mcp_url(), &token).await?;
    assert_eq!(who.scopes, vec!["backend-api:read", "backend-api:write"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabled_cache_exchanges_every_time() -> Result {
    let stack = two_workers(json!({"exchange": {"cache_max_entries": 0}}), idp()).await?;
    let token = stack.user_token();
    for _ in 0..3 {
        assert_eq!(call(&stack, &token).await?, 200);
    }
    assert_eq!(stack.idp.exchange_count(), 3);
    Ok(())
}

/// Ten requests with `token` on fresh connections, spread over both workers so each keeps the
/// backend token in its own front cache; one exchange. Returns the backend token.
async fn backend_on_both_workers(stack: &Stack, token: &str) -> Result<String> {
    for _ in 0..10 {
        assert_eq!(initialize(stack, token).await?, 200);
    }
    assert_eq!(stack.idp.exchange_count(), 1);
    Ok(stack
        .upstream
        .seen_requests()
        .last()
        .and_then(|r| r.bearer().map(str::to_string))
        .expect("the upstream saw a backend token"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_token_the_upstream_rejects_is_dropped_by_every_worker() -> Result {
    let stack = two_workers(json!({}), idp()).await?;
    let token = stack.user_token();
    let backend = backend_on_both_workers(&stack, &token).await?;

    // The backend revokes that token; the next request gets the upstream's 401. It comes more
    // than the status-check interval (100 ms) after the requests above, so whichever worker
    // serves it reads that 401 (within the interval the cached path reads one answer per token).
    tokio::time::sleep(Duration::from_millis(150)).await;
    stack.upstream.reject_token(&backend);
    assert_eq!(initialize(&stack, &token).await?, 401);
    // The worker that saw the 401 dropped it from the shared store; the other worker learns
    // that on its tick (500 ms) and drops its own copy.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..10 {
        assert_eq!(
            initialize(&stack, &token).await?,
            200,
            "request {i} after the invalidation used a rejected token"
        );
    }
    assert_eq!(
        stack.idp.exchange_count(),
        2,
        "one new exchange serves both workers again"
    );
    let last = stack.upstream.seen_requests();
    assert_ne!(last.last().and_then(|r| r.bearer()), Some(backend.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_steady_traffic_a_rejected_backend_token_is_dropped_within_the_check_interval(
) -> Result {
    let stack = two_workers(json!({}), idp()).await?;
    let token = stack.user_token();
    let backend = backend_on_both_workers(&stack, &token).await?;
    // Requests keep coming while the backend rejects that token for good: the cached path reads
    // one answer per token per 100 ms and worker, so 401s stop soon after they start (the
    // second worker learns of the drop on its 500 ms tick, or reads a 401 itself first).
    stack.upstream.reject_token(&backend);
    let started = Instant::now();
    let (mut rejected, mut accepted_in_a_row) = (0, 0);
    // Until both workers have let go of it: ten answers in a row that are not 401.
    while accepted_in_a_row < 10 {
        match initialize(&stack, &token).await? {
            200 => accepted_in_a_row += 1,
            401 => {
                rejected += 1;
                accepted_in_a_row = 0;
            }
            other => panic!("unexpected status {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still 401 after {rejected} requests over {:?}",
            started.elapsed()
        );
    }
    assert!(rejected >= 1, "the rejection was seen");
    let seen = stack.upstream.seen_requests();
    assert_ne!(seen.last().and_then(|r| r.bearer()), Some(backend.as_str()));
    // One new exchange, or two: a worker that reads its 401 for the old token after the other
    // worker stored the new one drops the entry under that exchange key too (a drop is by key,
    // not by token), and exchanges once more. Never more: a fourth exchange would mean a new
    // token was dropped although the upstream accepted it.
    let exchanges = stack.idp.exchange_count();
    assert!((2..=3).contains(&exchanges), "{exchanges} exchanges");
    Ok(())
}
