//! `POST /oauth2/{as_id}/v1/introspect` (RFC 7662, Okta's shape), through real HTTP: client
//! authentication, the answers for active, unknown, expired, revoked and other servers' tokens,
//! opaque tokens as subject tokens of an exchange, faults, and the admin routes.

use super::*;

fn introspect_url(idp: &IdpHandle, as_id: &str) -> String {
    format!("{}/v1/introspect", idp.issuer(as_id))
}

/// POSTs `fields` to `{as_id}/v1/introspect` with this `Authorization` (or none).
async fn introspect_with(
    idp: &IdpHandle,
    as_id: &str,
    authorization: Option<&str>,
    fields: &[(&str, &str)],
) -> Answer {
    let mut req = http()
        .post(introspect_url(idp, as_id))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(fields));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    answer(req.send().await.expect("introspection request")).await
}

/// Introspects `token` at AS `mcp` as the gateway client (HTTP Basic).
async fn introspect(idp: &IdpHandle, token: &str) -> Answer {
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    introspect_with(idp, "mcp", Some(&auth), &[("token", token)]).await
}

fn opaque(idp: &IdpHandle, req: MintRequest) -> String {
    idp.mint_opaque(&req).expect("opaque token")
}

/// An opaque token minted from the default request as changed by `edit`.
fn opaque_with(idp: &IdpHandle, edit: impl FnOnce(&mut MintRequest)) -> String {
    let mut req = MintRequest::default();
    edit(&mut req);
    opaque(idp, req)
}

#[tokio::test]
async fn an_active_opaque_token_is_described_as_okta_does() {
    let idp = idp().await;
    let token = opaque_with(&idp, |r| {
        r.sub = "ann@example.com".into();
        r.scopes = vec!["mcp:tools:call".into(), "openid".into()];
        r.ttl_secs = 600;
    });
    assert_eq!(token.len(), 43, "32 random bytes, base64url");
    assert!(!token.contains('.'), "not a JWS: {token}");

    let a = introspect(&idp, &token).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["cache-control"], "no-store");
    let b = &a.body;
    assert_eq!(b["active"], true);
    assert_eq!(b["scope"], "mcp:tools:call openid", "space-separated");
    assert_eq!(
        (b["sub"].as_str(), b["username"].as_str()),
        (Some("ann@example.com"), Some("ann@example.com"))
    );
    assert_eq!(b["aud"], "mcpserver");
    assert_eq!(b["iss"], idp.issuer("mcp"));
    assert_eq!(b["client_id"], "mcp-client");
    assert_eq!(b["token_type"], "Bearer");
    let (iat, exp) = (b["iat"].as_i64().unwrap(), b["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 600);
    assert!(b["jti"].as_str().unwrap().starts_with("AT."));

    let recorded = idp.introspections();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].client_auth, "client_secret_basic");
    assert_eq!(recorded[0].client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(recorded[0].field("token"), Some(token.as_str()));
    assert_eq!(idp.introspection_count(), 1);
}

#[tokio::test]
async fn client_secret_post_and_any_token_type_hint_are_accepted() {
    let idp = idp().await;
    let token = opaque(&idp, MintRequest::default());
    for hint in ["access_token", "refresh_token", "made_up"] {
        let a = introspect_with(
            &idp,
            "mcp",
            None,
            &[
                ("token", &token),
                ("token_type_hint", hint),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
            ],
        )
        .await;
        assert_eq!((a.status, &a.body["active"]), (200, &json!(true)), "{hint}");
    }
    let recorded = idp.introspections();
    assert_eq!(recorded[0].client_auth, "client_secret_post");
    assert!(
        recorded[0].field("client_secret").is_none(),
        "secret not recorded"
    );
}

#[tokio::test]
async fn unknown_expired_revoked_and_other_servers_tokens_are_inactive_and_nothing_more() {
    let idp = idp().await;
    let expired = opaque_with(&idp, |r| r.ttl_secs = -1);
    let revoked = opaque(&idp, MintRequest::default());
    assert!(idp.revoke(&revoked));
    assert!(!idp.revoke("never-issued"));
    let backend = opaque_with(&idp, |r| r.as_id = "backend".into());
    let jwt = user_token(&idp);
    for (what, token) in [
        ("unknown", "no-such-token"),
        ("expired", &expired),
        ("revoked", &revoked),
        ("another AS's", &backend),
        ("a JWT (not an opaque token of this IdP)", &jwt),
    ] {
        let a = introspect(&idp, token).await;
        assert_eq!(a.status, 200, "{what}: RFC 7662 §2.2 answers 200");
        assert_eq!(a.body, json!({"active": false}), "{what}: no reason given");
    }
    // The backend AS itself knows its token.
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let a = introspect_with(&idp, "backend", Some(&auth), &[("token", &backend)]).await;
    assert_eq!(a.body["active"], true);
    assert_eq!(a.body["aud"], "backend");
}

#[tokio::test]
async fn a_caller_without_valid_client_credentials_gets_invalid_client() {
    let idp = idp().await;
    let token = opaque(&idp, MintRequest::default());
    let wrong = basic(CLIENT_ID, "not-the-secret");
    let unknown = basic("nobody", CLIENT_SECRET);
    type Case<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case; 4] = [
        ("no credentials", None, vec![("token", &token)]),
        ("wrong secret", Some(&wrong), vec![("token", &token)]),
        ("unknown client", Some(&unknown), vec![("token", &token)]),
        (
            "wrong secret in the form",
            None,
            vec![
                ("token", &token),
                ("client_id", CLIENT_ID),
                ("client_secret", "x"),
            ],
        ),
    ];
    for (what, authorization, fields) in cases {
        let a = introspect_with(&idp, "mcp", authorization, &fields).await;
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert_eq!(a.error(), "invalid_client", "{what}");
        assert!(a.body["error_description"].is_string(), "{what}");
        assert!(
            a.body.get("active").is_none(),
            "{what}: nothing about the token"
        );
    }
    let a = introspect_with(&idp, "mcp", Some(&wrong), &[("token", &token)]).await;
    assert!(
        a.headers.contains_key("www-authenticate"),
        "Basic was tried"
    );
}

#[tokio::test]
async fn malformed_requests_are_invalid_request() {
    let idp = idp().await;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let a = introspect_with(
        &idp,
        "mcp",
        Some(&auth),
        &[("token_type_hint", "access_token")],
    )
    .await;
    assert_eq!((a.status, a.error()), (400, "invalid_request"), "no token");
    let a = introspect_with(&idp, "mcp", Some(&auth), &[("token", "a"), ("token", "b")]).await;
    assert_eq!(
        (a.status, a.error()),
        (400, "invalid_request"),
        "token twice"
    );
    let resp = http()
        .post(introspect_url(&idp, "mcp"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(r#"{"token":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(resp).await.status, 400, "not a form");
    let resp = http()
        .get(introspect_url(&idp, "mcp"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn an_active_opaque_token_is_a_subject_token_and_a_revoked_one_is_not() {
    let idp = idp().await;
    let token = opaque_with(&idp, |r| r.sub = "ann@example.com".into());
    let claims = exchanged_claims(&idp, &token).await;
    assert_eq!(claims["sub"], "ann@example.com");
    assert!(idp.revoke(&token));
    let a = exchange_basic(&idp, "backend", &exchange_fields(&token)).await;
    assert_eq!((a.status, a.error()), (400, "invalid_grant"));
}

#[tokio::test]
async fn faults_on_the_introspection_endpoint() {
    let idp = idp().await;
    let token = opaque(&idp, MintRequest::default());

    idp.set_fault(Endpoint::Introspect, Fault::Status(503));
    assert_eq!(introspect(&idp, &token).await.status, 503);

    idp.set_fault(Endpoint::Introspect, Fault::MalformedBody);
    let a = introspect(&idp, &token).await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_string(), "not JSON: {}", a.body);

    // An answer without `active` is a verbatim one.
    idp.set_fault(
        Endpoint::Introspect,
        Fault::Respond {
            status: 200,
            content_type: "application/json".into(),
            body: r#"{"sub":"ann","scope":"mcp:tools:call"}"#.into(),
        },
    );
    let a = introspect(&idp, &token).await;
    assert_eq!((a.status, a.body.get("active")), (200, None));

    idp.set_fault(
        Endpoint::Introspect,
        Fault::Delay(Duration::from_millis(300)),
    );
    let started = Instant::now();
    assert_eq!(introspect(&idp, &token).await.body["active"], true);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // An introspection fault leaves the token endpoint alone.
    idp.set_fault(Endpoint::Introspect, Fault::Status(500));
    let a = exchange_basic(&idp, "backend", &exchange_fields(&token)).await;
    assert_eq!(a.status, 200);
    idp.clear_faults();
    assert_eq!(introspect(&idp, &token).await.body["active"], true);
    assert_eq!(idp.introspection_count(), 5, "faulted requests counted too");
}

#[tokio::test]
async fn admin_routes_mint_revoke_and_fault_opaque_tokens() {
    let idp = idp().await;
    let minted = admin_mint(
        &idp,
        json!({"opaque": true, "sub": "bo@example.com", "scopes": ["mcp:tools:call"]}),
    )
    .await;
    let token = minted["access_token"].as_str().unwrap().to_string();
    assert!(!token.contains('.'));
    assert_eq!(introspect(&idp, &token).await.body["sub"], "bo@example.com");

    let revoke = json!({"token": token});
    assert_eq!(admin_post(&idp, "revoke", revoke).await, 200);
    assert_eq!(
        introspect(&idp, &token).await.body,
        json!({"active": false})
    );
    assert_eq!(
        admin_post(&idp, "revoke", json!({"token": "nope"})).await,
        404
    );

    let fault = json!({"endpoint": "introspect", "fault": {"kind": "status", "status": 502}});
    assert_eq!(admin_post(&idp, "faults", fault).await, 200);
    assert_eq!(introspect(&idp, &token).await.status, 502);
    let stats = admin_get(&idp, "stats").await;
    assert_eq!(stats["introspection_requests"], 3);
}

#[tokio::test]
async fn the_keycloak_realm_introspects_at_its_own_path_with_the_same_faults() {
    let mut config = quiet(IdpConfig::default());
    config.keycloak = Some(KeycloakConfig::default());
    let idp = start(any_port(), config).await.expect("idp starts");
    let token = idp.mint_keycloak_opaque("alice", &["mcp-gateway"], "openid", &Map::new());
    let url = format!(
        "{}/realms/mcp/protocol/openid-connect/token/introspect",
        idp.base_url()
    );
    let (url_, token_) = (url.as_str(), token.as_str());
    let post = move |auth: String| async move {
        let resp = http()
            .post(url_)
            .header("authorization", auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", token_)]))
            .send()
            .await
            .expect("introspection request");
        answer(resp).await
    };
    let gateway = || basic("mcp-gateway", "kc-gateway-secret");
    let a = post(gateway()).await;
    assert_eq!(
        (a.status, &a.body["active"]),
        (200, &json!(true)),
        "{}",
        a.body
    );
    let a = post(basic("mcp-gateway", "wrong")).await;
    assert_eq!((a.status, a.error()), (401, "invalid_client"));
    idp.set_fault(Endpoint::Introspect, Fault::Status(503));
    assert_eq!(post(gateway()).await.status, 503);
    assert!(
        idp.revoke(&token),
        "the realm's tokens are revoked the same way"
    );
    idp.clear_faults();
    assert_eq!(post(gateway()).await.body, json!({"active": false}));
    assert_eq!(idp.introspection_count(), 4);
    let resp = http().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 405);
}
