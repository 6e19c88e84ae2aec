//! The gateway flow end to end, through a real Envoy loading the built filter: validate →
//! exchange → rewrite, and each documented answer when something is wrong.

use std::time::{Duration, Instant};

use gateway_tests::client::{bearer, jsonrpc_post, Answer, TOOLS_LIST};
use gateway_tests::harness::{Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{Endpoint, Fault, MintRequest, ScopeStyle};
use gateway_tests::mcp;
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

async fn post_mcp(stack: &Stack, authorization: Option<&str>) -> Result<Answer> {
    let started = Instant::now();
    let resp = jsonrpc_post(&stack.mcp_url(), authorization, TOOLS_LIST)
        .send()
        .await?;
    Answer::read(resp, started).await
}

async fn with_bearer(stack: &Stack, token: &str) -> Result<Answer> {
    post_mcp(stack, Some(&bearer(token))).await
}

fn assert_challenge(a: &Answer, status: u16, error: Option<&str>) {
    assert_eq!(a.status, status, "body: {}", a.body);
    let c = a
        .challenge()
        .unwrap_or_else(|| panic!("no WWW-Authenticate on {status}"));
    assert!(c.starts_with("Bearer"), "{c}");
    assert!(c.contains("realm=\"mcp\""), "{c}");
    match error {
        Some(e) => {
            assert!(c.contains(&format!("error=\"{e}\"")), "{c}");
            assert_eq!(a.json()["error"], e, "{}", a.body);
        }
        None => assert!(
            !c.contains("error="),
            "a request without credentials gets no error code: {c}"
        ),
    }
    assert!(a.json()["error_description"].is_string(), "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_mcp_client_sees_the_exchanged_token_of_the_same_user() -> Result {
    let stack = Stack::start().await?;
    let inbound = stack.mint(&MintRequest {
        sub: "alice@example.com".into(),
        ..MintRequest::default()
    });

    let who = mcp::whoami(&stack.mcp_url(), &inbound).await?;
    assert_eq!(who.sub, "alice@example.com");
    assert_eq!(who.aud, vec!["backend"]);
    assert_eq!(who.scopes, vec!["backend-api:read"]);
    assert_eq!(who.iss, stack.idp.issuer("backend"));
    assert_eq!(who.client_id.as_deref(), Some(CLIENT_ID));
    assert!(who.tools.iter().any(|t| t == "whoami"), "{:?}", who.tools);

    // The upstream never saw the inbound token, in any header; every request it got carried a
    // backend token.
    let seen = stack.upstream.seen_requests();
    assert!(
        seen.len() >= 3,
        "initialize, tools/list and tools/call reach the upstream"
    );
    for r in &seen {
        for (name, value) in &r.headers {
            assert!(
                !value.contains(&inbound),
                "inbound token leaked upstream in {name}"
            );
        }
        let auth: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .collect();
        assert_eq!(auth.len(), 1, "exactly one Authorization upstream");
        assert!(auth[0].1.starts_with("Bearer "), "{}", auth[0].1);
    }

    // The exchange was a proper RFC 8693 request, client authenticated with HTTP Basic.
    let ex = stack.idp.last_exchange().expect("an exchange happened");
    assert_eq!(ex.client_auth, "client_secret_basic");
    assert_eq!(ex.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(
        ex.field("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(ex.field("subject_token"), Some(inbound.as_str()));
    assert_eq!(
        ex.field("subject_token_type"),
        Some("urn:ietf:params:oauth:token-type:access_token")
    );
    assert_eq!(ex.field("audience"), Some("backend"));
    assert_eq!(ex.field("scope"), Some("backend-api:read"));
    // One exchange served the whole MCP session (cache).
    assert_eq!(stack.idp.exchange_count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_post_and_scope_string_tokens() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"exchange": {"client_auth": "client_secret_post"}}),
        ..StackOptions::default()
    })
    .await?;
    let token = stack.mint(&MintRequest {
        scope_style: ScopeStyle::Scope,
        scopes: vec!["openid".into(), "mcp:tools:call".into()],
        ..MintRequest::default()
    });
    let who = mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(who.sub, "user@example.com");
    let ex = stack.idp.last_exchange().expect("an exchange happened");
    assert_eq!(ex.client_auth, "client_secret_post");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_before_the_exchange() -> Result {
    let stack = Stack::start().await?;

    let a = post_mcp(&stack, None).await?;
    assert_challenge(&a, 401, None);
    let c = a.challenge().unwrap_or_default();
    assert!(c.contains("scope=\"mcp:tools:call\""), "{c}");

    let expired = stack.mint(&MintRequest {
        ttl_secs: -3600,
        ..MintRequest::default()
    });
    assert_challenge(
        &with_bearer(&stack, &expired).await?,
        401,
        Some("invalid_token"),
    );

    // Right shape, signed by another authorization server's key.
    let foreign = stack.mint(&MintRequest {
        as_id: "backend".into(),
        aud: Some("mcpserver".into()),
        ..MintRequest::default()
    });
    assert_challenge(
        &with_bearer(&stack, &foreign).await?,
        401,
        Some("invalid_token"),
    );

    // Tampered payload: signature no longer matches.
    let good = stack.user_token();
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert_challenge(
        &with_bearer(&stack, &parts.join(".")).await?,
        401,
        Some("invalid_token"),
    );

    // Correct key, wrong issuer claim.
    let wrong_iss = stack.mint(&MintRequest {
        extra: serde_json::from_value(json!({"iss": "https://evil.example.com/oauth2/mcp"}))?,
        ..MintRequest::default()
    });
    assert_challenge(
        &with_bearer(&stack, &wrong_iss).await?,
        401,
        Some("invalid_token"),
    );

    let wrong_aud = stack.mint(&MintRequest {
        aud: Some("backend".into()),
        ..MintRequest::default()
    });
    assert_challenge(
        &with_bearer(&stack, &wrong_aud).await?,
        401,
        Some("invalid_token"),
    );

    let no_scope = stack.mint(&MintRequest {
        scopes: vec!["mcp:tools:admin".into()],
        ..MintRequest::default()
    });
    let a = with_bearer(&stack, &no_scope).await?;
    assert_challenge(&a, 403, Some("insufficient_scope"));
    assert!(a
        .challenge()
        .unwrap_or_default()
        .contains("scope=\"mcp:tools:call\""));

    let a = post_mcp(&stack, Some("Basic Z2F0ZXdheTpzZWNyZXQ=")).await?;
    assert_challenge(&a, 401, None);

    assert!(
        stack.upstream.seen_requests().is_empty(),
        "no rejected request reached the upstream"
    );
    assert_eq!(
        stack.idp.exchange_count(),
        0,
        "nothing was exchanged for a rejected token"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_refusing_the_subject_token_is_invalid_token() -> Result {
    let stack = Stack::start().await?;
    // Expired 30 s ago: within the gateway's 60 s clock skew, but the IdP refuses it
    // (invalid_grant), as Okta does for an expired subject token.
    let token = stack.mint(&MintRequest {
        ttl_secs: -30,
        ..MintRequest::default()
    });
    let a = with_bearer(&stack, &token).await?;
    assert_challenge(&a, 401, Some("invalid_token"));
    assert_eq!(stack.idp.exchange_count(), 1);
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_refusing_the_target_is_forbidden() -> Result {
    // backend-api:admin exists on the backend AS, but no policy grants it to the gateway.
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"exchange": {"scope": "backend-api:admin"}}),
        ..StackOptions::default()
    })
    .await?;
    let a = with_bearer(&stack, &stack.user_token()).await?;
    assert_challenge(&a, 403, Some("insufficient_scope"));
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_with_a_wrong_client_secret_is_a_bad_gateway() -> Result {
    let stack = Stack::start_with(StackOptions {
        secret: "not-the-secret".into(),
        ..StackOptions::default()
    })
    .await?;
    let a = with_bearer(&stack, &stack.user_token()).await?;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.json()["error"], "server_error");
    assert!(
        a.challenge().is_none(),
        "not the client's fault: no challenge"
    );
    // The IdP's refusal is logged for the operator, the secret is not.
    stack
        .wait_for_log("invalid_client", Duration::from_secs(5))
        .await?;
    assert!(!stack.envoy.log().contains("not-the-secret"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_outage_and_timeout() -> Result {
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"exchange": {"timeout_ms": 700}}),
        ..StackOptions::default()
    })
    .await?;
    // A fresh token per case: a failed exchange's outcome is shared for a second with requests
    // for the same token (so a burst of waiters does not hammer a failing IdP).
    let fresh = |n: &str| {
        stack.mint(&MintRequest {
            sub: format!("user-{n}"),
            ..MintRequest::default()
        })
    };

    stack.idp.set_fault(Endpoint::Token, Fault::Status(503));
    let a = with_bearer(&stack, &fresh("503")).await?;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.header("retry-after").is_some(), "503 carries Retry-After");
    assert_eq!(a.json()["error"], "temporarily_unavailable");

    stack.idp.set_fault(Endpoint::Token, Fault::Status(500));
    assert_eq!(with_bearer(&stack, &fresh("500")).await?.status, 503);

    stack.idp.set_fault(Endpoint::Token, Fault::Reset);
    let a = with_bearer(&stack, &fresh("reset")).await?;
    assert_eq!(a.status, 503, "{}", a.body);

    stack
        .idp
        .set_fault(Endpoint::Token, Fault::Delay(Duration::from_secs(3)));
    let a = with_bearer(&stack, &fresh("slow")).await?;
    assert_eq!(a.status, 504, "{}", a.body);

    stack.idp.set_fault(Endpoint::Token, Fault::MalformedBody);
    assert_eq!(with_bearer(&stack, &fresh("malformed")).await?.status, 502);

    // Nothing was let through while the IdP misbehaved, and the filter still serves.
    assert!(stack.upstream.seen_requests().is_empty());
    stack.idp.clear_faults();
    let who = mcp::whoami(&stack.mcp_url(), &fresh("after")).await?;
    assert_eq!(who.sub, "user-after");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanged_tokens_are_cached_per_subject_token() -> Result {
    let stack = Stack::start().await?;
    let alice = stack.mint(&MintRequest {
        sub: "alice".into(),
        ..MintRequest::default()
    });
    let bob = stack.mint(&MintRequest {
        sub: "bob".into(),
        ..MintRequest::default()
    });
    for _ in 0..3 {
        assert_eq!(mcp::whoami(&stack.mcp_url(), &alice).await?.sub, "alice");
        assert_eq!(mcp::whoami(&stack.mcp_url(), &bob).await?.sub, "bob");
    }
    assert_eq!(stack.idp.exchange_count(), 2, "one exchange per user token");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rejecting_an_exchanged_token_drops_it_from_the_cache() -> Result {
    let stack = Stack::start().await?;
    let token = stack.user_token();
    mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(stack.idp.exchange_count(), 1);

    // More than the status-check interval (100 ms) after the session's requests, so this
    // request's answer is read (within it the cached path reads one answer per token).
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    stack.upstream.reject_subject("user@example.com");
    let a = with_bearer(&stack, &token).await?;
    assert_eq!(a.status, 401, "the upstream's own 401 passes through");
    stack.upstream.clear();

    mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(
        stack.idp.exchange_count(),
        2,
        "the rejected backend token was not reused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_the_first_key_set_instead_of_passing() -> Result {
    let mut opts = StackOptions {
        wait_for_keys: false,
        ..StackOptions::default()
    };
    opts.plugin_patch = json!({"jwks": {"max_wait_ms": 5000}});
    let stack = Stack::start_with(opts).await?;
    stack.idp.set_fault(
        Endpoint::Keys("mcp".into()),
        Fault::Delay(Duration::from_millis(1500)),
    );
    // Whatever the timing of the first fetch, this request either waits for keys or is served
    // with them; it is never let through unverified.
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    Ok(())
}

const UNREACHABLE_ISSUER: &str = "https://unreachable.example/oauth2/mcp";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_jwks_answers_503_and_never_passes() -> Result {
    let stack = Stack::start_with(StackOptions {
        idp_unreachable: true,
        plugin_patch: json!({"issuer": UNREACHABLE_ISSUER, "jwks": {"max_wait_ms": 1000}}),
        ..StackOptions::default()
    })
    .await?;
    // The token names the configured issuer, or it would be refused for its issuer (401) before
    // any key is needed.
    let mut extra = serde_json::Map::new();
    extra.insert("iss".into(), json!(UNREACHABLE_ISSUER));
    let token = stack.mint(&MintRequest {
        extra,
        ..MintRequest::default()
    });
    let a = with_bearer(&stack, &token).await?;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.header("retry-after").is_some());
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_and_tokens_never_reach_the_log() -> Result {
    let stack = Stack::start().await?;
    let token = stack.user_token();
    mcp::whoami(&stack.mcp_url(), &token).await?;
    stack.idp.set_fault(Endpoint::Token, Fault::Status(500));
    let other = stack.mint(&MintRequest {
        sub: "eve".into(),
        ..MintRequest::default()
    });
    with_bearer(&stack, &other).await?;
    let log = stack.envoy.log();
    assert!(
        log.contains("exchanged token"),
        "the exchange is logged (by fingerprint)"
    );
    assert!(!log.contains(CLIENT_SECRET), "client secret in Envoy log");
    for t in [&token, &other] {
        let signature = t.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(signature), "a token appears in Envoy's log");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_are_verified_in_envoy() -> Result {
    use gateway_tests::idp::{ClientKeyAlg, ClientSigningKey};
    // An issuer that signs ES256 (its key inline in the config). The test IdP only issues RS256,
    // so it refuses the exchange: reaching it at all shows the filter accepted the signature.
    let issuer_key = ClientSigningKey::generate(ClientKeyAlg::Es256)?;
    let stack = Stack::start_with(StackOptions {
        wait_for_keys: false,
        plugin_patch: json!({"jwks": {"cluster": null, "path": null, "authority": null,
                                      "inline": {"keys": [issuer_key.public_jwk()]}}}),
        ..StackOptions::default()
    })
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let claims = json!({"iss": stack.idp.issuer("mcp"), "aud": "mcpserver", "sub": "ec-user",
                        "scp": ["mcp:tools:call"], "iat": now, "exp": now + 300});
    let token = issuer_key.sign(&claims)?;
    let a = with_bearer(&stack, &token).await?;
    assert_eq!(
        stack.idp.exchange_count(),
        1,
        "the ES256 token passed verification: {}",
        a.body
    );
    assert_challenge(&a, 401, Some("invalid_token"));

    // The same claims signed by another P-256 key, and a tampered signature: refused before any
    // exchange.
    let other = ClientSigningKey::generate(ClientKeyAlg::Es256)?;
    let forged = format!(
        "{}.{}",
        token
            .rsplit_once('.')
            .map(|(head, _)| head)
            .unwrap_or_default(),
        other.sign(&claims)?.rsplit('.').next().unwrap_or_default()
    );
    assert_challenge(
        &with_bearer(&stack, &forged).await?,
        401,
        Some("invalid_token"),
    );
    assert_eq!(stack.idp.exchange_count(), 1);
    Ok(())
}
