//! Several inbound providers on one listener, through a real Envoy: two authorization servers of
//! the test IdP, each the issuer of one provider, each accepted on its own route; the token's
//! `iss` picks the provider before any key work.

use std::time::{Duration, Instant};

use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{ExtraUpstream, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{AuthServerConfig, IdpConfig, MintRequest};
use gateway_tests::mcp;
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

/// The reference IdP plus a `partner` authorization server (audience `partner-mcp`) whose tokens
/// the `backend` AS also accepts as subject tokens.
fn idp_with_partner() -> IdpConfig {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.authorization_servers.push(AuthServerConfig {
        id: "partner".into(),
        audience: "partner-mcp".into(),
        scopes: vec!["mcp:tools:call".into()],
        trusted_servers: vec![],
        exchange_policies: vec![],
    });
    if let Some(backend) = idp.server_mut("backend") {
        backend.trusted_servers.push("partner".into());
    }
    idp
}

/// Provider `okta` (AS `mcp`) on `/mcp`, provider `partner` (AS `partner`) on `/partner/mcp`,
/// both exchanging at the `backend` AS.
fn two_providers() -> StackOptions {
    let provider = |as_id: &str, audience: &str| {
        json!({
            "issuer": format!("{{idp}}/oauth2/{as_id}"),
            "audiences": [audience],
            "jwks": {"cluster": "okta", "path": format!("/oauth2/{as_id}/v1/keys")}
        })
    };
    StackOptions {
        idp: idp_with_partner(),
        extra_upstreams: vec![ExtraUpstream {
            prefix: "/partner/".into(),
            as_id: "backend".into(),
            audience: "backend".into(),
            required_scopes: vec!["backend-api:read".into()],
        }],
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null, "resource": null,
            "providers": {
                "okta": provider("mcp", "mcpserver"),
                "partner": provider("partner", "partner-mcp")
            },
            "routes": [
                {"name": "okta", "path_prefix": "/mcp", "providers": ["okta"]},
                {"name": "partner", "path_prefix": "/partner/mcp", "providers": ["partner"]}
            ]
        }),
        ..StackOptions::default()
    }
}

fn partner_token(stack: &Stack, sub: &str) -> String {
    stack.mint(&MintRequest {
        as_id: "partner".into(),
        sub: sub.into(),
        ..MintRequest::default()
    })
}

async fn post(stack: &Stack, path: &str, token: &str) -> Result<Answer> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let resp = jsonrpc_post(&stack.envoy.url(path), Some(&bearer(token)), body)
        .send()
        .await?;
    Answer::read(resp, Instant::now()).await
}

fn assert_invalid_token(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 401, "{what}: {}", answer.body);
    let challenge = answer.challenge().unwrap_or_default();
    assert!(
        challenge.contains("error=\"invalid_token\""),
        "{what}: {challenge}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_accepts_two_issuers_on_their_own_routes() -> Result {
    let stack = Stack::start_with(two_providers()).await?;
    let okta = stack.user_token();
    let on_mcp = mcp::whoami(&stack.envoy.url("/mcp"), &okta).await?;
    assert_eq!(on_mcp.aud, vec!["backend"]);
    assert_eq!(on_mcp.sub, "user@example.com");

    let partner = partner_token(&stack, "pat@partner.example");
    let on_partner = mcp::whoami(&stack.envoy.url("/partner/mcp"), &partner).await?;
    assert_eq!(on_partner.aud, vec!["backend"]);
    assert_eq!(on_partner.sub, "pat@partner.example");
    assert_eq!(on_partner.iss, stack.idp.issuer("backend"));
    assert!(stack.idp.keys_fetch_count("partner") >= 1);
    assert!(stack.idp.keys_fetch_count("mcp") >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_other_or_unknown_issuers_are_refused_without_key_work() -> Result {
    let stack = Stack::start_with(two_providers()).await?;
    // Both key sets are in use before the refusals are counted.
    let partner = partner_token(&stack, "pat@partner.example");
    mcp::whoami(&stack.envoy.url("/partner/mcp"), &partner).await?;
    let okta = stack.user_token();
    mcp::whoami(&stack.envoy.url("/mcp"), &okta).await?;
    let fetches = |s: &Stack| {
        (
            s.idp.keys_fetch_count("mcp"),
            s.idp.keys_fetch_count("partner"),
        )
    };
    let (fetches_before, exchanges_before) = (fetches(&stack), stack.idp.exchange_count());

    let wrong_route = post(&stack, "/mcp", &partner).await?;
    assert_invalid_token(&wrong_route, "partner token on okta's route");
    assert_invalid_token(
        &post(&stack, "/partner/mcp", &okta).await?,
        "okta token on partner's route",
    );
    // `backend` is an issuer the IdP has but no provider names, with a kid no provider holds.
    let unknown = stack.mint(&MintRequest {
        as_id: "backend".into(),
        aud: Some("mcpserver".into()),
        ..MintRequest::default()
    });
    let started = Instant::now();
    assert_invalid_token(&post(&stack, "/mcp", &unknown).await?, "unknown issuer");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not after waiting for keys"
    );
    assert_eq!(fetches(&stack), fetches_before, "no JWKS fetch");
    assert_eq!(stack.idp.exchange_count(), exchanges_before, "no exchange");
    Ok(())
}

/// Provider `partner` reads its tokens the Entra ID way (`scp` a space-separated string, app
/// `roles`, client in `azp`) and requires `typ: at+jwt`; `okta` keeps the defaults.
fn partner_with_entra_claims() -> StackOptions {
    let mut opts = two_providers();
    opts.plugin_patch["providers"]["partner"]["claims"] =
        json!({"scopes": ["scp", "roles"], "client_id": ["azp", "appid"]});
    opts.plugin_patch["providers"]["partner"]["typ"] = json!("at+jwt");
    opts.plugin_patch["identity_headers"] = json!({"x-mcp-client-id": "client_id"});
    opts
}

/// A `partner` token shaped like Entra ID's, signed by the IdP with header `typ`.
fn entra_shaped(stack: &Stack, typ: &str, claims: serde_json::Value) -> Result<String> {
    let minted = partner_token(stack, "erin@partner.example");
    let payload = minted.split('.').nth(1).unwrap_or_default();
    use base64::Engine as _;
    let mut c: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    if let Some(o) = c.as_object_mut() {
        o.remove("scp");
        o.remove("cid");
    }
    for (k, v) in claims.as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    let header = json!({"alg": "RS256", "kid": stack.idp.kid("partner"), "typ": typ});
    stack.idp.sign_raw(
        "partner",
        header.to_string().as_bytes(),
        c.to_string().as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_reads_claims_in_its_issuers_shape() -> Result {
    let stack = Stack::start_with(partner_with_entra_claims()).await?;
    let delegated = entra_shaped(
        &stack,
        "at+jwt",
        json!({"scp": "User.Read mcp:tools:call", "azp": "entra-client"}),
    )?;
    let who = mcp::whoami(&stack.envoy.url("/partner/mcp"), &delegated).await?;
    assert_eq!(who.sub, "erin@partner.example");
    let seen = stack.extra[0].seen_requests();
    let last = seen.last().expect("the partner upstream was called");
    assert_eq!(last.header("x-mcp-client-id"), Some("entra-client"));

    let app_only = entra_shaped(
        &stack,
        "application/at+jwt",
        json!({"roles": ["mcp:tools:call"]}),
    )?;
    mcp::whoami(&stack.envoy.url("/partner/mcp"), &app_only).await?;

    let without_scope = entra_shaped(&stack, "at+jwt", json!({"scp": "User.Read"}))?;
    let a = post(&stack, "/partner/mcp", &without_scope).await?;
    assert_eq!(a.status, 403, "{}", a.body);
    // A plain JWT (the IdP's usual header has no `typ`) is not this provider's access token.
    assert_invalid_token(
        &post(&stack, "/partner/mcp", &partner_token(&stack, "pat")).await?,
        "no typ",
    );
    let jwt_typ = entra_shaped(&stack, "JWT", json!({"scp": "mcp:tools:call"}))?;
    assert_invalid_token(&post(&stack, "/partner/mcp", &jwt_typ).await?, "typ JWT");
    // `okta` keeps Okta's shapes and needs no `typ`.
    mcp::whoami(&stack.envoy.url("/mcp"), &stack.user_token()).await?;
    Ok(())
}
