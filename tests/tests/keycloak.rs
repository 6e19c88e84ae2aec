//! Keycloak through a real Envoy: the test IdP's Keycloak mode (a realm with standard token
//! exchange V2) issues the user's token; the filter exchanges it with the default `rfc8693`
//! profile, `audience` naming the backend's *client id*, for a token the MCP upstream checks
//! itself. Keycloak's refusals land in the answer table.

use std::net::SocketAddr;
use std::time::Instant;

use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{free_port, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{IdpConfig, KeycloakConfig, ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT};
use gateway_tests::mcp::{self, UpstreamConfig, UpstreamHandle};
use serde_json::{json, Map};

type Result<T = ()> = anyhow::Result<T>;

const REALM_PATH: &str = "/realms/mcp/protocol/openid-connect";

/// Realm `mcp` with the gateway client's secret as Envoy's environment holds it.
fn idp() -> IdpConfig {
    let mut realm = KeycloakConfig::default();
    realm.clients[0].secret = CLIENT_SECRET.into();
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.keycloak = Some(realm);
    idp
}

/// One provider (the realm) on `/mcp`, and two routes whose exchanges Keycloak refuses: an
/// audience that is no client, and a scope that is not the gateway's optional scope.
fn keycloak_stack(upstream_port: u16) -> StackOptions {
    StackOptions {
        idp: idp(),
        upstream_port: Some(upstream_port),
        wait_for_keys: false,
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null, "resource": null,
            "providers": {"keycloak": {
                "issuer": "{idp}/realms/mcp",
                "audiences": ["mcp-gateway"],
                "jwks": {"cluster": "okta", "path": format!("{REALM_PATH}/certs")},
                "claims": {"scopes": ["scope"], "client_id": ["azp"]}
            }},
            "exchange": {
                "path": format!("{REALM_PATH}/token"), "client_id": "mcp-gateway",
                "client_auth": "client_secret_basic",
                "audience": "backend-api", "scope": "backend:read"
            },
            "routes": [
                {"path_prefix": "/mcp"},
                {"path_prefix": "/no-such-client/mcp", "exchange": {"audience": "nobody"}},
                {"path_prefix": "/admin/mcp", "exchange": {"scope": "admin"}}
            ]
        }),
        ..StackOptions::default()
    }
}

async fn start(port: u16) -> Result<(Stack, UpstreamHandle)> {
    let stack = Stack::start_with(keycloak_stack(port)).await?;
    let upstream = mcp::start_upstream(
        SocketAddr::from(([127, 0, 0, 1], port)),
        UpstreamConfig {
            issuer: stack.idp.keycloak_issuer(),
            jwks_url: format!("{}{REALM_PATH}/certs", stack.idp.base_url()),
            audience: "backend-api".into(),
            required_scopes: vec!["backend:read".into()],
        },
    )
    .await?;
    Ok((stack, upstream))
}

fn user_token(stack: &Stack, aud: &[&str]) -> Result<String> {
    stack
        .idp
        .mint_keycloak("alice", aud, "openid mcp:tools:call", &Map::new())
}

async fn status_at(stack: &Stack, path: &str, token: &str) -> Result<Answer> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
    let resp = jsonrpc_post(&stack.envoy.url(path), Some(&bearer(token)), body)
        .send()
        .await?;
    Answer::read(resp, Instant::now()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keycloak_token_is_exchanged_for_the_backend_clients_audience() -> Result {
    let port = free_port()?;
    let (stack, upstream) = start(port).await?;
    let token = user_token(&stack, &["mcp-gateway"])?;
    let who = mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(who.sub, "alice");
    assert_eq!(who.iss, stack.idp.keycloak_issuer());
    assert_eq!(who.aud, vec!["backend-api"]);
    assert_eq!(who.scopes, vec!["backend:read"]);
    let sent = stack.idp.last_exchange().expect("a token-exchange request");
    assert_eq!(sent.field("grant_type"), Some(TOKEN_EXCHANGE_GRANT));
    assert_eq!(sent.field("subject_token_type"), Some(ACCESS_TOKEN_TYPE));
    assert_eq!(sent.field("audience"), Some("backend-api"));
    assert_eq!(sent.client_auth, "client_secret_basic");
    assert!(upstream
        .seen_requests()
        .iter()
        .all(|r| r.bearer() != Some(token.as_str())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloaks_refusals_land_in_the_answer_table() -> Result {
    let port = free_port()?;
    let (stack, upstream) = start(port).await?;
    let token = user_token(&stack, &["mcp-gateway"])?;
    // "Audience not found" (invalid_client): the gateway's configuration, not the user's.
    let a = status_at(&stack, "/no-such-client/mcp", &token).await?;
    assert_eq!(a.status, 502, "{}", a.body);
    // invalid_scope: the user cannot have that backend token.
    let a = status_at(&stack, "/admin/mcp", &token).await?;
    assert_eq!(a.status, 403, "{}", a.body);
    // A token not issued for the gateway client never reaches Keycloak: its audience is wrong.
    let exchanges = stack.idp.exchange_count();
    let other = user_token(&stack, &["some-other-client"])?;
    let a = status_at(&stack, "/mcp", &other).await?;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(stack.idp.exchange_count(), exchanges);
    assert!(upstream.seen_requests().is_empty());
    Ok(())
}
