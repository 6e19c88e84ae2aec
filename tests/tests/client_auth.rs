//! Stronger client authentication through a real Envoy: the gateway authenticates to the token
//! endpoint with a private_key_jwt client assertion instead of a shared secret, and can send an
//! RFC 8693 actor token so the backend token names the gateway in `act`.
//!
//! EC P-256 keys (ES256) work in every build; RSA keys (RS256) only in the module built with the
//! `rsa-client-key` feature (`make wasm-full`), which the RS256 test loads. The default module
//! refuses an RSA key at config load.

use std::path::PathBuf;

use base64::Engine;
use gateway_tests::harness::{full_filter_wasm, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{ClientKeyAlg, ClientSigningKey, IdpConfig};
use gateway_tests::mcp;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

const KEY_ENV: &str = "GATEWAY_CLIENT_KEY";

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// A stack whose IdP knows `registered`'s public key for the gateway client, and whose gateway
/// signs with `gateway_key`; `module` replaces the default filter module.
async fn stack(
    registered: &ClientSigningKey,
    gateway_key: &ClientSigningKey,
    actor: bool,
    module: Option<PathBuf>,
) -> Result<Stack> {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.accept_actor_tokens = actor;
    if let Some(c) = idp.client_mut(CLIENT_ID) {
        c.jwks = Some(registered.public_jwks());
    }
    Stack::start_with(StackOptions {
        idp,
        extra_env: vec![(KEY_ENV.into(), gateway_key.private_jwk().to_string())],
        plugin_patch: json!({"exchange": {
            "client_auth": "private_key_jwt",
            "client_secret_env": null,
            "client_private_key_env": KEY_ENV,
            "client_assertion_audience": "{idp}/oauth2/backend/v1/token",
            "actor_token": actor
        }}),
        filter_wasm: module,
        ..StackOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_client_assertion_replaces_the_secret() -> Result {
    let key = ClientSigningKey::generate(ClientKeyAlg::Es256)?;
    let stack = stack(&key, &key, false, None).await?;
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.aud, vec!["backend"]);
    let ex = stack.idp.last_exchange().expect("an exchange");
    assert_eq!(ex.client_auth, "private_key_jwt");
    assert!(ex.field("client_secret").is_none());
    let assertion = claims(ex.field("client_assertion").unwrap_or_default());
    assert_eq!(assertion["iss"], CLIENT_ID);
    assert_eq!(assertion["aud"], stack.idp.token_endpoint("backend"));
    let lifetime = assertion["exp"].as_i64().unwrap_or(0) - assertion["iat"].as_i64().unwrap_or(0);
    assert!((1..=300).contains(&lifetime), "short-lived: {lifetime}s");
    // No key material in the log.
    let log = stack.envoy.log();
    let d = key.private_jwk()["d"].as_str().unwrap_or("x").to_string();
    assert!(!log.contains(&d));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_client_assertion_and_actor_token() -> Result {
    let key = ClientSigningKey::generate(ClientKeyAlg::Rs256)?;
    let stack = stack(&key, &key, true, Some(full_filter_wasm()?)).await?;
    mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    let ex = stack.idp.last_exchange().expect("an exchange");
    assert_eq!(ex.client_auth, "private_key_jwt");
    assert_eq!(
        ex.field("actor_token_type"),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
    // The backend token the upstream received names the gateway as the actor.
    let seen = stack.upstream.seen_requests();
    let backend = seen
        .last()
        .and_then(|r| r.bearer())
        .expect("a backend token upstream");
    assert_eq!(claims(backend)["act"], json!({"sub": CLIENT_ID}));
    assert_eq!(claims(backend)["sub"], "user@example.com");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_idp_does_not_know_is_a_gateway_misconfiguration() -> Result {
    let registered = ClientSigningKey::generate(ClientKeyAlg::Es256)?;
    let other = ClientSigningKey::generate(ClientKeyAlg::Es256)?;
    let stack = stack(&registered, &other, false, None).await?;
    let resp = reqwest::Client::new()
        .get(stack.envoy.url("/healthz"))
        .header("authorization", format!("Bearer {}", stack.user_token()))
        .send()
        .await?;
    assert_eq!(
        resp.status(),
        502,
        "invalid_client is the gateway's problem, not the user's"
    );
    assert!(stack.upstream.seen_requests().is_empty());
    Ok(())
}

/// The default module cannot sign with an RSA key: Envoy refuses the configuration at start, and
/// the error names the field and the build that can (never the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_module_refuses_an_rsa_key_naming_the_full_build() -> Result {
    let key = ClientSigningKey::generate(ClientKeyAlg::Rs256)?;
    let Err(e) = stack(&key, &key, false, None).await else {
        anyhow::bail!("Envoy started with an RSA client key in the default module");
    };
    let shown = format!("{e:#}");
    assert!(
        shown.contains("exchange.client_private_key_env") && shown.contains("rsa-client-key"),
        "{shown}"
    );
    let d = key.private_jwk()["d"].as_str().unwrap_or("x").to_string();
    assert!(!shown.contains(&d), "key material in the error");
    Ok(())
}
