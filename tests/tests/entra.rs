//! Entra ID through a real Envoy: the test IdP's Entra mode issues v2 user tokens (`scp` a
//! string, client in `azp`) for the gateway's API, and the filter swaps them by the on-behalf-of
//! flow (`exchange.profile: entra_obo`) for a backend token the MCP upstream checks itself.
//! Conditional Access (MFA) comes back to the client as a 401 with the claims challenge.

use std::net::SocketAddr;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use gateway_tests::client::{bearer, jsonrpc_post, Answer};
use gateway_tests::harness::{free_port, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{
    ClientConfig, EntraConfig, IdpConfig, JWT_BEARER_GRANT, MFA_CLAIMS_CHALLENGE,
};
use gateway_tests::mcp::{self, UpstreamConfig, UpstreamHandle};
use serde_json::{json, Map};

type Result<T = ()> = anyhow::Result<T>;

const MFA_USER: &str = "mfa-user@contoso.example";

fn tenant() -> EntraConfig {
    EntraConfig {
        mfa_required_subs: vec![MFA_USER.into()],
        ..EntraConfig::default()
    }
}

/// The gateway as one Entra ID app registration (client id = the API's client id), with the
/// client secret Envoy's environment holds.
fn idp() -> IdpConfig {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.clients.push(ClientConfig {
        client_id: tenant().api_client_id,
        client_secret: CLIENT_SECRET.into(),
        token_exchange_enabled: true,
        jwks: None,
    });
    idp.entra = Some(tenant());
    idp
}

/// One provider (the tenant, read the Entra way) and the on-behalf-of exchange.
fn entra_stack(upstream_port: u16) -> StackOptions {
    let t = tenant();
    let tenant_path = |rest: &str| format!("/{}/{rest}", t.tenant);
    StackOptions {
        idp: idp(),
        upstream_port: Some(upstream_port),
        wait_for_keys: false,
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null,
            "providers": {"entra": {
                "issuer": format!("{{idp}}/{}/v2.0", t.tenant),
                "audiences": [t.api_client_id],
                "jwks": {"cluster": "okta", "path": tenant_path("discovery/v2.0/keys")},
                "claims": {"scopes": ["scp", "roles"], "client_id": ["azp", "appid"]}
            }},
            "identity_headers": {"x-mcp-client-id": "client_id"},
            "exchange": {
                "profile": "entra_obo", "path": tenant_path("oauth2/v2.0/token"),
                "client_id": t.api_client_id, "client_auth": "client_secret_post",
                "audience": null, "scope": format!("{}/.default", t.backend_app_id_uri)
            }
        }),
        ..StackOptions::default()
    }
}

/// The MCP server behind the gateway, accepting only the tenant's backend tokens.
async fn start(port: u16, stack_opts: StackOptions) -> Result<(Stack, UpstreamHandle)> {
    let stack = Stack::start_with(stack_opts).await?;
    let t = tenant();
    let upstream = mcp::start_upstream(
        SocketAddr::from(([127, 0, 0, 1], port)),
        UpstreamConfig {
            issuer: stack.idp.entra_issuer(),
            jwks_url: format!("{}/{}/discovery/v2.0/keys", stack.idp.base_url(), t.tenant),
            audience: t.backend_client_id,
            required_scopes: t.backend_scopes,
        },
    )
    .await?;
    Ok((stack, upstream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_user_token_is_swapped_on_behalf_of_the_user() -> Result {
    let port = free_port()?;
    let (stack, upstream) = start(port, entra_stack(port)).await?;
    let token = stack.idp.mint_entra(
        "ann@contoso.example",
        "User.Read mcp:tools:call",
        &Map::new(),
    )?;
    let who = mcp::whoami(&stack.mcp_url(), &token).await?;
    assert_eq!(who.sub, "ann@contoso.example");
    assert_eq!(who.aud, vec![tenant().backend_client_id]);
    assert_eq!(who.iss, stack.idp.entra_issuer());
    assert_eq!(who.scopes, vec!["backend.read"]);

    let obo = stack.idp.last_exchange().expect("an OBO request");
    assert_eq!(obo.field("grant_type"), Some(JWT_BEARER_GRANT));
    assert_eq!(obo.field("requested_token_use"), Some("on_behalf_of"));
    assert_eq!(obo.field("scope"), Some("api://backend/.default"));
    assert_eq!(obo.field("assertion"), Some(token.as_str()));
    assert!(obo.field("subject_token").is_none());
    let seen = upstream.seen_requests();
    let first = seen.first().expect("the upstream was called");
    assert_eq!(
        first.header("x-mcp-client-id"),
        Some(tenant().user_client_id.as_str()),
        "the client named by azp"
    );
    assert!(seen.iter().all(|r| r.bearer() != Some(token.as_str())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_access_sends_the_user_back_with_the_claims_challenge() -> Result {
    let port = free_port()?;
    let (stack, upstream) = start(port, entra_stack(port)).await?;
    let token = stack
        .idp
        .mint_entra(MFA_USER, "mcp:tools:call", &Map::new())?;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
    let resp = jsonrpc_post(&stack.mcp_url(), Some(&bearer(&token)), body)
        .send()
        .await?;
    let a = Answer::read(resp, Instant::now()).await?;
    assert_eq!(a.status, 401, "the user's to fix, not a 502: {}", a.body);
    let challenge = a.challenge().unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_claims\""),
        "{challenge}"
    );
    let claims = format!("claims=\"{}\"", STANDARD.encode(MFA_CLAIMS_CHALLENGE));
    assert!(challenge.contains(&claims), "{challenge}");
    assert!(upstream.seen_requests().is_empty());
    // An Okta-shaped token (scp an array) of another issuer is not this provider's.
    let okta = stack.user_token();
    let resp = jsonrpc_post(&stack.mcp_url(), Some(&bearer(&okta)), body)
        .send()
        .await?;
    assert_eq!(Answer::read(resp, Instant::now()).await?.status, 401);
    Ok(())
}
