//! Opaque inbound tokens checked by RFC 7662 introspection, through a real Envoy (issue 12,
//! item 4): the test IdP's `POST /oauth2/mcp/v1/introspect` (Okta's shape) answers for tokens
//! it issued as opaque ones; the filter introspects once per token (coalesced, cached until
//! `min(exp, cache_max_seconds)`), then exchanges the opaque token at the `backend` AS like a
//! JWT. Every answer the IdP can give maps to the README's table: inactive → 401, bad answer or
//! refused credentials → 502, unavailable → 503 + `Retry-After`, too slow → 504, never a pass.
//!
//! Envoy runs one worker here (the harness default): the introspection cache is per worker, so
//! "one introspection" is per worker.

use std::time::{Duration, Instant};

use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{free_port, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{Endpoint, Fault, IdpConfig, KeycloakConfig, MintRequest};
use gateway_tests::mcp::{self, UpstreamConfig};
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

/// The environment variable holding the secret the gateway introspects with (the exchange's,
/// unless a test sets another through `extra_env`).
const SECRET_ENV: &str = "TOKEN_EXCHANGE_CLIENT_SECRET";

/// The demo's single provider as `providers.okta`, introspecting opaque tokens at AS `mcp`.
fn introspecting(introspection: Value) -> StackOptions {
    let mut section = json!({
        "cluster": "okta",
        "path": "/oauth2/mcp/v1/introspect",
        "client_id": CLIENT_ID,
        "client_secret_env": SECRET_ENV,
    });
    if !introspection.is_null() {
        gateway_tests::harness::merge_patch(&mut section, &introspection);
    }
    StackOptions {
        idp: IdpConfig::reference(CLIENT_ID, CLIENT_SECRET),
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null,
            "providers": {"okta": {
                "issuer": "{idp}/oauth2/mcp",
                "audiences": ["mcpserver"],
                "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys"},
                "introspection": section,
            }},
        }),
        ..StackOptions::default()
    }
}

async fn start(introspection: Value) -> Result<Stack> {
    Stack::start_with(introspecting(introspection)).await
}

fn opaque(stack: &Stack, req: MintRequest) -> String {
    match stack.idp.mint_opaque(&req) {
        Ok(t) => t,
        Err(e) => panic!("minting an opaque token failed: {e:#}"),
    }
}

fn user_opaque(stack: &Stack) -> String {
    opaque(
        stack,
        MintRequest {
            sub: "olga@example.com".into(),
            ..MintRequest::default()
        },
    )
}

/// One `initialize` (it needs no MCP session): the upstream's 200 when the gateway lets it pass.
async fn call(stack: &Stack, token: &str) -> Result<Answer> {
    let started = Instant::now();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "introspection", "version": "1"}}});
    let resp = jsonrpc_post(&stack.mcp_url(), Some(&bearer(token)), body.to_string())
        .send()
        .await?;
    Answer::read_refusal(resp, started).await
}

fn assert_refused(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
}

fn assert_challenge(a: &Answer, error: &str, what: &str) {
    let challenge = a.challenge().unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(&format!("error=\"{error}\"")),
        "{what}: {challenge:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_token_is_introspected_once_then_exchanged_and_never_sent_upstream() -> Result {
    let stack = start(Value::Null).await?;
    let token = user_opaque(&stack);
    let who = mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(who.sub, "olga@example.com", "the answer's sub");
    assert_eq!(
        who.aud,
        vec!["backend"],
        "a backend token reached the upstream"
    );
    assert_eq!(who.iss, stack.idp.issuer("backend"));

    let seen = stack.upstream.seen_requests();
    assert!(seen.len() >= 3, "initialize, tools/list, tools/call");
    for r in &seen {
        let sent = r.bearer().unwrap_or_default();
        assert_ne!(sent, token, "the opaque token went upstream");
        assert_eq!(sent.split('.').count(), 3, "a JWT: {sent}");
    }
    // The exchange's subject token is the opaque token itself.
    let exchange = stack.idp.last_exchange().expect("an exchange");
    assert_eq!(exchange.field("subject_token"), Some(token.as_str()));

    // Every request of the session, and the next one, used the one answer.
    assert_eq!(call(&stack, &token).await?.status, 200);
    assert_eq!(stack.idp.introspection_count(), 1, "one introspection");
    let sent = stack.idp.introspections();
    assert_eq!(sent[0].client_auth, "client_secret_basic");
    assert_eq!(sent[0].client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(sent[0].field("token"), Some(token.as_str()));
    assert_eq!(sent[0].field("token_type_hint"), Some("access_token"));

    // A JWT of the same provider on the same listener is verified by its keys, not introspected.
    let jwt = stack.user_token();
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &jwt).await?.sub,
        "user@example.com"
    );
    assert_eq!(
        stack.idp.introspection_count(),
        1,
        "no introspection for a JWT"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_new_token_share_one_introspection() -> Result {
    let stack = start(Value::Null).await?;
    // A slow endpoint, so every request arrives while the one introspection is in flight.
    stack.idp.set_fault(
        Endpoint::Introspect,
        Fault::Delay(Duration::from_millis(600)),
    );
    let token = user_opaque(&stack);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (url, token) = (stack.mcp_url(), token.clone());
            tokio::spawn(async move {
                let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "introspection", "version": "1"}}});
                let started = Instant::now();
                let resp = jsonrpc_post(&url, Some(&bearer(&token)), body.to_string())
                    .send()
                    .await?;
                Answer::read_refusal(resp, started).await
            })
        })
        .collect();
    for c in calls {
        let a = c.await??;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.elapsed >= Duration::from_millis(500),
            "it waited for the answer"
        );
    }
    assert_eq!(stack.idp.introspection_count(), 1, "coalesced");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_tokens_are_401_invalid_token_and_a_revocation_counts_within_the_maximum() -> Result
{
    let stack = start(json!({"cache_max_seconds": 1})).await?;
    let revoked = user_opaque(&stack);
    assert!(stack.idp.revoke(&revoked));
    let expired = opaque(
        &stack,
        MintRequest {
            ttl_secs: -60,
            ..MintRequest::default()
        },
    );
    for (what, token) in [
        ("revoked", revoked.as_str()),
        ("expired", &expired),
        ("unknown", "never-issued-by-the-idp"),
    ] {
        let a = call(&stack, token).await?;
        assert_refused(&a, 401, what);
        assert_challenge(&a, "invalid_token", what);
        assert!(a.body.contains("not active"), "{what}: {}", a.body);
    }
    assert_eq!(stack.idp.introspection_count(), 3, "each one introspected");
    // An active answer without `sub` names nobody to act for.
    let nobody = opaque(
        &stack,
        MintRequest {
            extra: json!({"sub": null})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            ..MintRequest::default()
        },
    );
    let a = call(&stack, &nobody).await?;
    assert_refused(&a, 401, "no sub");
    assert_challenge(&a, "invalid_token", "no sub");
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(stack.idp.exchange_count(), 0);

    // Revoked after its answer was cached: accepted at most cache_max_seconds (1 s) longer.
    let token = user_opaque(&stack);
    assert_eq!(call(&stack, &token).await?.status, 200);
    assert!(stack.idp.revoke(&token));
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let a = call(&stack, &token).await?;
    assert_refused(&a, 401, "revoked, the cached answer past its maximum");
    assert!(a.body.contains("not active"), "{}", a.body);
    assert_challenge(&a, "invalid_token", "revoked later");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answers_scope_is_the_policys_scope() -> Result {
    let stack = start(Value::Null).await?;
    let narrow = opaque(
        &stack,
        MintRequest {
            scopes: vec!["openid".into()],
            ..MintRequest::default()
        },
    );
    let a = call(&stack, &narrow).await?;
    assert_refused(&a, 403, "no mcp:tools:call in scope");
    assert_challenge(&a, "insufficient_scope", "scope");
    assert!(a.challenge().unwrap_or_default().contains("mcp:tools:call"));
    // Another audience is refused like a JWT's.
    let elsewhere = opaque(
        &stack,
        MintRequest {
            aud: Some("someone-else".into()),
            ..MintRequest::default()
        },
    );
    let a = call(&stack, &elsewhere).await?;
    assert_refused(&a, 401, "aud not this resource");
    assert_challenge(&a, "invalid_token", "aud");
    assert!(
        a.body.contains("not intended for this resource"),
        "{}",
        a.body
    );
    assert_eq!(stack.idp.introspection_count(), 2, "both were introspected");
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

/// Answers no gateway may read as a pass: a body that is not JSON, or no boolean `active`, is
/// the README's 502 with the upstream untouched. (The wider hostile corpus of answers, with
/// their 401/403/502 rows, is tests/tests/adversarial/introspection_answers.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_json_or_lack_active_are_502_never_a_pass() -> Result {
    let stack = start(Value::Null).await?;
    let respond = |body: &str| Fault::Respond {
        status: 200,
        content_type: "application/json".into(),
        body: body.into(),
    };
    let hostile: Vec<(&str, Fault)> = vec![
        ("not JSON", Fault::MalformedBody),
        ("HTML", respond("<html><body>Sign in</body></html>")),
        ("empty body", respond("")),
        (
            "no active",
            respond(r#"{"sub":"olga@example.com","scope":"mcp:tools:call"}"#),
        ),
        (
            "active a string",
            respond(r#"{"active":"true","sub":"olga@example.com"}"#),
        ),
        (
            "active null",
            respond(r#"{"active":null,"sub":"olga@example.com"}"#),
        ),
    ];
    let cases = hostile.len() as u64;
    for (what, fault) in hostile {
        stack.idp.set_fault(Endpoint::Introspect, fault);
        // A new token each time: nothing cached from a previous case.
        let a = call(&stack, &user_opaque(&stack)).await?;
        assert_refused(&a, 502, what);
        assert!(a.challenge().is_none(), "{what}: not the client's fault");
    }
    assert!(stack.upstream.seen_requests().is_empty(), "never a pass");
    assert_eq!(stack.idp.exchange_count(), 0);
    assert_eq!(
        stack.idp.introspection_count(),
        cases,
        "each answer was asked for"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_endpoint_is_503_with_retry_after_and_a_slow_one_504() -> Result {
    let stack = start(json!({"timeout_ms": 500})).await?;
    let token = user_opaque(&stack);
    for (what, fault) in [
        ("503", Fault::Status(503)),
        ("500", Fault::Status(500)),
        ("429", Fault::Status(429)),
        ("connection reset", Fault::Reset),
    ] {
        stack.idp.set_fault(Endpoint::Introspect, fault);
        let a = call(&stack, &token).await?;
        assert_refused(&a, 503, what);
        assert!(a.header("retry-after").is_some(), "{what}: Retry-After");
    }
    stack.idp.set_fault(
        Endpoint::Introspect,
        Fault::Delay(Duration::from_millis(1_500)),
    );
    let a = call(&stack, &token).await?;
    assert_refused(&a, 504, "slower than timeout_ms");
    assert!(stack.upstream.seen_requests().is_empty(), "never a pass");

    // A failure is not cached: the same token passes once the endpoint recovers.
    stack.idp.clear_faults();
    assert_eq!(call(&stack, &token).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unreachable_endpoint_is_503() -> Result {
    let mut opts = introspecting(json!({"cluster": "nowhere"}));
    opts.extra_clusters = vec![("nowhere".into(), free_port()?)];
    let stack = Stack::start_with(opts).await?;
    let a = call(&stack, &user_opaque(&stack)).await?;
    assert_refused(&a, 503, "nothing listens");
    assert!(a.header("retry-after").is_some());
    // JWTs do not depend on the introspection endpoint.
    assert_eq!(call(&stack, &stack.user_token()).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_endpoint_refuses_are_502_and_post_credentials_work() -> Result {
    let mut opts = introspecting(json!({"client_secret_env": "INTROSPECTION_SECRET"}));
    opts.extra_env = vec![("INTROSPECTION_SECRET".into(), "not-the-secret".into())];
    let stack = Stack::start_with(opts).await?;
    let token = user_opaque(&stack);
    let a = call(&stack, &token).await?;
    assert_refused(&a, 502, "the IdP's 401 invalid_client");
    assert!(a.challenge().is_none(), "not the client's fault");
    assert_eq!(
        stack.idp.introspections()[0].client_auth,
        "client_secret_basic"
    );
    assert!(stack.upstream.seen_requests().is_empty());

    let stack = start(json!({"client_auth": "client_secret_post"})).await?;
    let token = user_opaque(&stack);
    assert_eq!(call(&stack, &token).await?.status, 200);
    let sent = &stack.idp.introspections()[0];
    assert_eq!(sent.client_auth, "client_secret_post");
    assert_eq!(sent.field("client_id"), Some(CLIENT_ID));
    Ok(())
}

const REALM_PATH: &str = "/realms/mcp/protocol/openid-connect";

/// The Keycloak profile: realm `mcp` is the provider, introspecting at Keycloak's path
/// (`…/token/introspect`) and exchanging by standard token exchange for `backend-api`, as in
/// tests/tests/keycloak.rs.
fn keycloak_introspecting(upstream_port: u16) -> StackOptions {
    let mut realm = KeycloakConfig::default();
    realm.clients[0].secret = CLIENT_SECRET.into();
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.keycloak = Some(realm);
    StackOptions {
        idp,
        upstream_port: Some(upstream_port),
        wait_for_keys: false,
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null, "resource": null,
            "providers": {"keycloak": {
                "issuer": "{idp}/realms/mcp",
                "audiences": ["mcp-gateway"],
                "jwks": {"cluster": "okta", "path": format!("{REALM_PATH}/certs")},
                "claims": {"scopes": ["scope"], "client_id": ["azp"]},
                "introspection": {
                    "cluster": "okta", "path": format!("{REALM_PATH}/token/introspect"),
                    "client_id": "mcp-gateway", "client_secret_env": SECRET_ENV,
                },
            }},
            "exchange": {
                "path": format!("{REALM_PATH}/token"), "client_id": "mcp-gateway",
                "audience": "backend-api", "scope": "backend:read"
            },
        }),
        ..StackOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keycloak_realms_opaque_token_is_introspected_at_keycloaks_path_and_exchanged() -> Result
{
    let port = free_port()?;
    let stack = Stack::start_with(keycloak_introspecting(port)).await?;
    let upstream = mcp::start_upstream(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        UpstreamConfig {
            issuer: stack.idp.keycloak_issuer(),
            jwks_url: format!("{}{REALM_PATH}/certs", stack.idp.base_url()),
            audience: "backend-api".into(),
            required_scopes: vec!["backend:read".into()],
        },
    )
    .await?;
    // Keycloak's answer carries members the gateway does not read (nested ones too).
    let extra = json!({"realm_access": {"roles": ["user"]}, "allowed-origins": ["*"],
                       "sid": "s-1", "email_verified": true});
    let extra = extra.as_object().cloned().unwrap_or_default();
    let aud = ["mcp-gateway", "account"];
    let token = stack
        .idp
        .mint_keycloak_opaque("alice", &aud, "openid mcp:tools:call", &extra);
    let who = mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(who.sub, "alice");
    assert_eq!(who.aud, vec!["backend-api"]);
    assert_eq!(who.iss, stack.idp.keycloak_issuer());
    assert_eq!(stack.idp.introspection_count(), 1);
    let sent = &stack.idp.introspections()[0];
    assert_eq!(sent.client_auth, "client_secret_basic");
    assert_eq!(sent.field("token"), Some(token.as_str()));
    assert!(upstream
        .seen_requests()
        .iter()
        .all(|r| r.bearer() != Some(token.as_str())));

    // The realm's JWTs are verified by its keys, beside it.
    let jwt = stack
        .idp
        .mint_keycloak("alice", &aud, "openid mcp:tools:call", &extra)?;
    assert_eq!(mcp::whoami(&stack.mcp_url(), &jwt).await?.sub, "alice");
    assert_eq!(stack.idp.introspection_count(), 1);

    // Revoked (never seen before): Keycloak's {"active": false}.
    let revoked = stack
        .idp
        .mint_keycloak_opaque("alice", &aud, "openid mcp:tools:call", &extra);
    assert!(stack.idp.revoke(&revoked));
    let a = call(&stack, &revoked).await?;
    assert_refused(&a, 401, "revoked at Keycloak");
    assert_challenge(&a, "invalid_token", "revoked at Keycloak");
    assert!(a.body.contains("not active"), "{}", a.body);
    // Not for this gateway's audience.
    let elsewhere =
        stack
            .idp
            .mint_keycloak_opaque("alice", &["account"], "openid mcp:tools:call", &extra);
    assert_refused(
        &call(&stack, &elsewhere).await?,
        401,
        "aud without mcp-gateway",
    );
    assert_eq!(stack.idp.introspection_count(), 3);
    Ok(())
}
