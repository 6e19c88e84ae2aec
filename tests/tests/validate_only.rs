//! `mode: validate_only` through a real Envoy: tokens are checked exactly as in exchange mode
//! (signature, issuer, audience, time, scopes), nothing is exchanged, and the client's token is
//! removed before the upstream (or kept, with `forward_token`), like Envoy's `jwt_authn`.

use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::idp::MintRequest;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

async fn validate_only(extra: Value) -> Result<Stack> {
    let mut patch = json!({
        "mode": "validate_only",
        "exchange": null,
        "identity_headers": {"x-user-sub": "sub"},
    });
    gateway_tests::harness::merge_patch(&mut patch, &extra);
    Stack::start_with(StackOptions {
        plugin_patch: patch,
        ..StackOptions::default()
    })
    .await
}

/// `GET /healthz` (which the upstream answers without looking at credentials) with these
/// headers, on a fresh connection.
async fn get(stack: &Stack, headers: &[(&str, &str)]) -> Result<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut req = client.get(stack.envoy.url("/healthz"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Ok(req.send().await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_pass_without_an_exchange_and_without_the_token() -> Result {
    let stack = validate_only(json!({})).await?;
    let bearer = format!("Bearer {}", stack.user_token());
    // The first request verifies the token; the next ones take the verified-token cache.
    for _ in 0..3 {
        let status = get(
            &stack,
            &[("authorization", &bearer), ("x-user-sub", "mallory")],
        )
        .await?;
        assert_eq!(status, 200);
    }
    let seen = stack.upstream.seen_requests();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(
            r.header("authorization"),
            None,
            "the client's token is removed"
        );
        assert_eq!(
            r.header_values("x-user-sub"),
            vec!["user@example.com"],
            "identity comes from the verified claims, never from the client"
        );
    }
    assert_eq!(
        stack.idp.exchange_count(),
        0,
        "validate-only never exchanges"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_are_refused_as_in_exchange_mode() -> Result {
    let stack = validate_only(json!({})).await?;
    let good = stack.user_token();
    // Warm the cache with a good token first: a cached token must not vouch for another one.
    assert_eq!(
        get(&stack, &[("authorization", &format!("Bearer {good}"))]).await?,
        200
    );
    let cases = [
        ("no token", None, 401),
        (
            "wrong audience",
            Some(stack.mint(&MintRequest {
                aud: Some("someone-else".into()),
                ..MintRequest::default()
            })),
            401,
        ),
        (
            "expired",
            Some(stack.mint(&MintRequest {
                ttl_secs: -600,
                ..MintRequest::default()
            })),
            401,
        ),
        (
            "missing scope",
            Some(stack.mint(&MintRequest {
                scopes: vec!["other".into()],
                ..MintRequest::default()
            })),
            403,
        ),
        (
            "tampered signature",
            Some(format!("{}AA", &good[..good.len() - 2])),
            401,
        ),
    ];
    for (what, token, want) in cases {
        let headers: Vec<(&str, String)> = token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        // Twice: a refused token must stay refused (nothing about it is cached as good).
        for _ in 0..2 {
            assert_eq!(get(&stack, &headers).await?, want, "{what}");
        }
    }
    assert_eq!(
        stack.upstream.seen_requests().len(),
        1,
        "only the good request reached the upstream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_token_keeps_the_clients_token() -> Result {
    let stack = validate_only(json!({"forward_token": true})).await?;
    let token = stack.user_token();
    for _ in 0..2 {
        assert_eq!(
            get(&stack, &[("authorization", &format!("Bearer {token}"))]).await?,
            200
        );
    }
    for r in stack.upstream.seen_requests() {
        assert_eq!(r.bearer(), Some(token.as_str()));
    }
    assert_eq!(stack.idp.exchange_count(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_token_is_refused_once_it_expires() -> Result {
    // The verified-token cache answers repeated requests without reading the clock per request
    // (it checks expiry against a bound ahead of the real time): a token must still stop working
    // when it expires, with no clock skew allowed here.
    let stack = validate_only(json!({"clock_skew_seconds": 0})).await?;
    let token = stack.mint(&MintRequest {
        ttl_secs: 3,
        ..MintRequest::default()
    });
    let bearer = format!("Bearer {token}");
    let headers = [("authorization", bearer.as_str())];
    for _ in 0..4 {
        assert_eq!(get(&stack, &headers).await?, 200, "valid, then cached");
    }
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    for _ in 0..4 {
        assert_eq!(get(&stack, &headers).await?, 401, "expired while cached");
    }
    assert_eq!(stack.upstream.seen_requests().len(), 4);
    Ok(())
}
