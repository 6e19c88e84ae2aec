//! `private_key_jwt` client authentication (RFC 7523) and RFC 8693 actor tokens, through real
//! HTTP. The gateway's keys (RS256 and ES256) are generated here; the IdP only ever sees their
//! public JWKs. Signatures made by [`ClientSigningKey`] are cross-checked with `jsonwebtoken`.

use jsonwebtoken::jwk::Jwk;

use super::*;

const ASSERTION_CLIENT: &str = "gateway-client";

struct Keys {
    rs: ClientSigningKey,
    es: ClientSigningKey,
}

fn gateway_keys() -> Keys {
    Keys {
        rs: ClientSigningKey::generate(ClientKeyAlg::Rs256).expect("rsa key"),
        es: ClientSigningKey::generate(ClientKeyAlg::Es256).expect("p256 key"),
    }
}

/// The reference setup with both keys registered for the gateway client (which keeps its
/// secret), plus `secret-only` (no keys) and `keys-only` (no secret) clients that may exchange.
fn config(keys: &Keys, accept_actor_tokens: bool) -> IdpConfig {
    let mut c = quiet(IdpConfig::default());
    c.client_mut(ASSERTION_CLIENT).unwrap().jwks =
        Some(json!({ "keys": [keys.rs.public_jwk(), keys.es.public_jwk()] }));
    c.clients.push(ClientConfig {
        client_id: "secret-only".into(),
        client_secret: "s3cret".into(),
        token_exchange_enabled: true,
        jwks: None,
    });
    c.clients.push(ClientConfig {
        client_id: "keys-only".into(),
        client_secret: String::new(),
        token_exchange_enabled: true,
        jwks: Some(keys.es.public_jwks()),
    });
    let backend = c.server_mut("backend").unwrap();
    for id in ["secret-only", "keys-only"] {
        backend.exchange_policies.push(ExchangePolicy {
            client_id: id.into(),
            scopes: vec!["backend-api:read".into()],
        });
    }
    c.accept_actor_tokens = accept_actor_tokens;
    c
}

fn with_assertion(
    fields: Vec<(&'static str, String)>,
    assertion: &str,
) -> Vec<(&'static str, String)> {
    let mut fields = fields;
    fields.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_string()));
    fields.push(("client_assertion", assertion.to_string()));
    fields
}

/// POSTs a form to `backend`'s token endpoint with no `Authorization` header.
async fn post_form(idp: &IdpHandle, fields: &[(&str, String)]) -> Answer {
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post_raw(
        idp,
        "backend",
        None,
        "application/x-www-form-urlencoded",
        form(&pairs),
    )
    .await
}

fn claims_with(client_id: &str, aud: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut claims = client_jwt_claims(client_id, aud, 300);
    edit(&mut claims);
    claims
}

#[test]
fn client_signatures_verify_with_an_independent_implementation() {
    let keys = gateway_keys();
    for (key, alg) in [(&keys.rs, Algorithm::RS256), (&keys.es, Algorithm::ES256)] {
        let token = key
            .client_assertion(
                ASSERTION_CLIENT,
                "https://idp.example/oauth2/x/v1/token",
                60,
            )
            .unwrap();
        let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(alg);
        validation.set_audience(&["https://idp.example/oauth2/x/v1/token"]);
        validation.set_issuer(&[ASSERTION_CLIENT]);
        let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(data.claims["sub"], ASSERTION_CLIENT);
        assert_eq!(data.header.kid.as_deref(), Some(key.kid()));
        assert!(data.claims["jti"].as_str().is_some_and(|j| !j.is_empty()));

        // The PEM and private JWK carry the same key: jsonwebtoken signs with the PEM, and our
        // verifier (through the IdP, below) and jsonwebtoken both accept it.
        let pem = key.private_key_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let encoding = match alg {
            Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()),
            _ => jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()),
        }
        .expect("PKCS#8 PEM parses");
        let claims = client_jwt_claims(ASSERTION_CLIENT, "aud-x", 60);
        let other = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &encoding)
            .expect("sign with the PEM");
        let mut validation = Validation::new(alg);
        validation.set_audience(&["aud-x"]);
        jsonwebtoken::decode::<Value>(&other, &decoding, &validation)
            .expect("the PEM's signature verifies with the public JWK");
        let private = key.private_jwk();
        assert!(private["d"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(private["kid"], key.kid());
    }
}

#[tokio::test]
async fn private_key_jwt_rs256_and_es256_authenticate_the_client() {
    let keys = gateway_keys();
    let idp = start(any_port(), config(&keys, false)).await.unwrap();
    let endpoint = idp.token_endpoint("backend");
    for key in [&keys.rs, &keys.es] {
        let subject = user_token(&idp);
        let assertion = key
            .client_assertion(ASSERTION_CLIENT, &endpoint, 300)
            .unwrap();
        let a = post_form(&idp, &with_assertion(exchange_fields(&subject), &assertion)).await;
        assert_eq!(a.status, 200, "{:?}: {}", key.alg(), a.body);
        let token = a.body["access_token"].as_str().unwrap();
        let claims = verify(&idp, "backend", "backend", token).await;
        assert_eq!(claims["cid"], ASSERTION_CLIENT);
        assert_eq!(claims["sub"], "user@example.com");
        assert!(claims.get("act").is_none(), "no actor token, no act");
        let rec = idp.last_exchange().unwrap();
        assert_eq!(rec.client_auth, "private_key_jwt");
        assert_eq!(rec.client_id.as_deref(), Some(ASSERTION_CLIENT));
        assert_eq!(
            rec.field("client_assertion_type"),
            Some(CLIENT_ASSERTION_TYPE)
        );
    }

    // `aud` = the AS issuer is accepted too (Okta does); `client_id` in the body may name the
    // client; `aud` may be an array.
    let subject = user_token(&idp);
    let assertion = keys
        .es
        .sign(&claims_with(
            ASSERTION_CLIENT,
            &idp.issuer("backend"),
            |_| {},
        ))
        .unwrap();
    let mut fields = with_assertion(exchange_fields(&subject), &assertion);
    fields.push(("client_id", ASSERTION_CLIENT.to_string()));
    let a = post_form(&idp, &fields).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let assertion = keys
        .rs
        .sign(&claims_with(ASSERTION_CLIENT, "", |c| {
            c["aud"] = json!(["https://other.example", endpoint.clone()]);
        }))
        .unwrap();
    let a = post_form(&idp, &with_assertion(exchange_fields(&subject), &assertion)).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // A client registered with keys only (no secret).
    let assertion = keys
        .es
        .client_assertion("keys-only", &endpoint, 60)
        .unwrap();
    let a = post_form(&idp, &with_assertion(exchange_fields(&subject), &assertion)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        verify(
            &idp,
            "backend",
            "backend",
            a.body["access_token"].as_str().unwrap()
        )
        .await["cid"],
        "keys-only"
    );
}

#[tokio::test]
async fn secret_authentication_still_works_beside_registered_keys() {
    let keys = gateway_keys();
    let idp = start(any_port(), config(&keys, false)).await.unwrap();
    let subject = user_token(&idp);
    let a = exchange_basic(&idp, "backend", &exchange_fields(&subject)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        idp.last_exchange().unwrap().client_auth,
        "client_secret_basic"
    );

    // A client without a secret cannot authenticate with an (empty) one.
    let mut fields = exchange_fields(&subject);
    fields.push(("client_id", "keys-only".into()));
    fields.push(("client_secret", String::new()));
    let a = post_form(&idp, &fields).await;
    assert_eq!((a.status, a.error()), (401, "invalid_client"), "{}", a.body);
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic("keys-only", "")),
        "application/x-www-form-urlencoded",
        form(
            &exchange_fields(&subject)
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        ),
    )
    .await;
    assert_eq!((a.status, a.error()), (401, "invalid_client"), "{}", a.body);
}

#[tokio::test]
async fn client_assertions_are_single_use() {
    let keys = gateway_keys();
    let idp = start(any_port(), config(&keys, false)).await.unwrap();
    let subject = user_token(&idp);
    let assertion = keys
        .es
        .client_assertion(ASSERTION_CLIENT, &idp.token_endpoint("backend"), 300)
        .unwrap();
    let fields = with_assertion(exchange_fields(&subject), &assertion);
    let first = post_form(&idp, &fields).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let replay = post_form(&idp, &fields).await;
    assert_eq!((replay.status, replay.error()), (401, "invalid_client"));
    assert!(
        replay.body["error_description"]
            .as_str()
            .unwrap()
            .contains("jti"),
        "{}",
        replay.body
    );
    // Same jti, freshly signed: still a replay.
    let jti = jsonwebtoken::dangerous::insecure_decode::<Value>(&assertion)
        .unwrap()
        .claims["jti"]
        .clone();
    let again = keys
        .rs
        .sign(&claims_with(
            ASSERTION_CLIENT,
            &idp.token_endpoint("backend"),
            |c| c["jti"] = jti,
        ))
        .unwrap();
    let a = post_form(&idp, &with_assertion(exchange_fields(&subject), &again)).await;
    assert_eq!((a.status, a.error()), (401, "invalid_client"), "{}", a.body);
}

#[tokio::test]
async fn bad_client_assertions_are_refused() {
    let keys = gateway_keys();
    let stranger = ClientSigningKey::generate(ClientKeyAlg::Es256).unwrap();
    let idp = start(any_port(), config(&keys, false)).await.unwrap();
    let endpoint = idp.token_endpoint("backend");
    let now = now_secs();
    let subject = user_token(&idp);
    let good = |edit: &dyn Fn(&mut Value)| {
        let mut c = client_jwt_claims(ASSERTION_CLIENT, &endpoint, 300);
        edit(&mut c);
        keys.es.sign(&c).unwrap()
    };
    let tampered = {
        let t = good(&|_| {});
        let (rest, sig) = t.rsplit_once('.').unwrap();
        let mut sig = sig.to_string();
        let flip = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(0..1, flip);
        format!("{rest}.{sig}")
    };
    let unsigned = {
        let h = crate::idp::keys::b64(br#"{"alg":"none","typ":"JWT"}"#);
        let c = crate::idp::keys::b64(
            serde_json::to_string(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 60))
                .unwrap()
                .as_bytes(),
        );
        format!("{h}.{c}.")
    };
    let hs256 = keys
        .es
        .sign_raw(
            br#"{"alg":"HS256","typ":"JWT"}"#,
            serde_json::to_string(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 60))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
    let unknown_kid = keys
        .es
        .sign_raw(
            br#"{"alg":"ES256","kid":"not-registered"}"#,
            serde_json::to_string(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 60))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
    let no_kid = keys
        .es
        .sign_raw(
            br#"{"alg":"ES256"}"#,
            serde_json::to_string(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 60))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();

    // (what, assertion, extra form fields, status, error)
    type Case<'a> = (&'a str, String, Vec<(&'static str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no kid: every registered key of the alg is tried",
            no_kid,
            vec![],
            200,
            "",
        ),
        (
            "wrong aud",
            good(&|c| c["aud"] = json!("https://elsewhere/token")),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "aud of another AS",
            good(&|c| c["aud"] = json!(idp.token_endpoint("mcp"))),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "no aud",
            good(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "no exp",
            good(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "exp as string",
            good(&|c| c["exp"] = json!((now + 60).to_string())),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "expired",
            good(&|c| c["exp"] = json!(now - 5)),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "exp more than 1 h ahead",
            good(&|c| c["exp"] = json!(now + 3600 + 120)),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "iat in the future",
            good(&|c| c["iat"] = json!(now + 600)),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "nbf in the future",
            good(&|c| c["nbf"] = json!(now + 600)),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "no jti",
            good(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "empty jti",
            good(&|c| c["jti"] = json!("")),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "iss is not the client",
            good(&|c| c["iss"] = json!("someone-else")),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "sub is not the client",
            good(&|c| c["sub"] = json!("secret-only")),
            vec![("client_id", ASSERTION_CLIENT.into())],
            401,
            "invalid_client",
        ),
        (
            "body client_id names another client",
            good(&|_| {}),
            vec![("client_id", "keys-only".into())],
            401,
            "invalid_client",
        ),
        (
            "unknown client",
            good(&|c| {
                c["iss"] = json!("ghost");
                c["sub"] = json!("ghost");
            }),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "client without registered keys",
            good(&|c| {
                c["iss"] = json!("secret-only");
                c["sub"] = json!("secret-only");
            }),
            vec![],
            401,
            "invalid_client",
        ),
        (
            "signed by an unregistered key",
            stranger
                .client_assertion(ASSERTION_CLIENT, &endpoint, 60)
                .unwrap(),
            vec![],
            401,
            "invalid_client",
        ),
        ("unknown kid", unknown_kid, vec![], 401, "invalid_client"),
        (
            "tampered signature",
            tampered,
            vec![],
            401,
            "invalid_client",
        ),
        ("alg none", unsigned, vec![], 401, "invalid_client"),
        ("alg HS256", hs256, vec![], 401, "invalid_client"),
        ("not a JWT", "garbage".into(), vec![], 401, "invalid_client"),
        (
            "assertion plus a client_secret",
            good(&|_| {}),
            vec![("client_secret", "gateway-secret".into())],
            400,
            "invalid_request",
        ),
    ];
    for (what, assertion, extra, status, error) in cases {
        let mut fields = with_assertion(exchange_fields(&subject), &assertion);
        fields.extend(extra);
        let a = post_form(&idp, &fields).await;
        if status == 200 {
            assert_eq!(a.status, 200, "{what}: {}", a.body);
            continue;
        }
        assert_eq!((a.status, a.error()), (status, error), "{what}: {}", a.body);
        assert!(
            a.headers.get("www-authenticate").is_none(),
            "{what}: no Basic challenge for an assertion"
        );
    }

    // client_assertion_type missing or wrong.
    for assertion_type in [
        None,
        Some("urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
    ] {
        let mut fields = exchange_fields(&subject);
        fields.push(("client_assertion", good(&|_| {})));
        if let Some(t) = assertion_type {
            fields.push(("client_assertion_type", t.into()));
        }
        let a = post_form(&idp, &fields).await;
        assert_eq!(
            (a.status, a.error()),
            (400, "invalid_request"),
            "{assertion_type:?}: {}",
            a.body
        );
    }

    // HTTP Basic and an assertion together.
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic(CLIENT_ID, CLIENT_SECRET)),
        "application/x-www-form-urlencoded",
        form(
            &with_assertion(exchange_fields(&subject), &good(&|_| {}))
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.error()),
        (400, "invalid_request"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn actor_tokens_are_refused_unless_enabled() {
    let keys = gateway_keys();
    let idp = start(any_port(), config(&keys, false)).await.unwrap();
    let endpoint = idp.token_endpoint("backend");
    let subject = user_token(&idp);
    let actor = keys
        .es
        .sign(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 300))
        .unwrap();
    let mut fields = with_assertion(
        exchange_fields(&subject),
        &keys
            .es
            .client_assertion(ASSERTION_CLIENT, &endpoint, 300)
            .unwrap(),
    );
    fields.push(("actor_token", actor));
    fields.push(("actor_token_type", JWT_TOKEN_TYPE.into()));
    let a = post_form(&idp, &fields).await;
    assert_eq!(
        (a.status, a.error()),
        (400, "invalid_request"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn actor_token_puts_the_gateway_in_act() {
    let keys = gateway_keys();
    let idp = start(any_port(), config(&keys, true)).await.unwrap();
    let endpoint = idp.token_endpoint("backend");

    // With private_key_jwt (ES256 assertion, RS256 actor token) and with a secret (the client
    // still has registered keys to sign the actor token with).
    for use_secret in [false, true] {
        let subject = user_token(&idp);
        let actor = keys
            .rs
            .sign(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 300))
            .unwrap();
        let mut fields = exchange_fields(&subject);
        fields.push(("actor_token", actor));
        fields.push(("actor_token_type", JWT_TOKEN_TYPE.into()));
        let a = if use_secret {
            exchange_basic(&idp, "backend", &fields).await
        } else {
            let assertion = keys
                .es
                .client_assertion(ASSERTION_CLIENT, &endpoint, 300)
                .unwrap();
            post_form(&idp, &with_assertion(fields, &assertion)).await
        };
        assert_eq!(a.status, 200, "secret={use_secret}: {}", a.body);
        let claims = issued_claims(&idp, &a).await;
        assert_eq!(
            claims["act"],
            json!({ "sub": ASSERTION_CLIENT }),
            "{claims}"
        );
        assert_eq!(claims["sub"], "user@example.com");
        assert_eq!(claims["cid"], ASSERTION_CLIENT);
    }

    // Without an actor token: no `act`, even when accepted.
    let claims = exchanged_claims(&idp, &user_token(&idp)).await;
    assert!(claims.get("act").is_none(), "{claims}");
}

#[tokio::test]
async fn bad_actor_tokens_are_refused() {
    let keys = gateway_keys();
    let stranger = ClientSigningKey::generate(ClientKeyAlg::Es256).unwrap();
    let idp = start(any_port(), config(&keys, true)).await.unwrap();
    let endpoint = idp.token_endpoint("backend");
    let now = now_secs();
    let actor = |edit: &dyn Fn(&mut Value)| {
        let mut c = client_jwt_claims(ASSERTION_CLIENT, &endpoint, 300);
        edit(&mut c);
        keys.es.sign(&c).unwrap()
    };
    let subject = user_token(&idp);
    // (what, actor_token, actor_token_type)
    let cases: Vec<(&str, Option<String>, Option<&str>)> = vec![
        ("no actor_token_type", Some(actor(&|_| {})), None),
        (
            "actor_token_type without a token",
            None,
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "access_token type",
            Some(actor(&|_| {})),
            Some(ACCESS_TOKEN_TYPE),
        ),
        ("empty token", Some(String::new()), Some(JWT_TOKEN_TYPE)),
        (
            "sub is someone else",
            Some(actor(&|c| c["sub"] = json!("user@example.com"))),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "iss is someone else",
            Some(actor(&|c| c["iss"] = json!("other"))),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "wrong aud",
            Some(actor(&|c| c["aud"] = json!("backend"))),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "expired",
            Some(actor(&|c| c["exp"] = json!(now - 5))),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "no exp",
            Some(actor(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "signed by an unregistered key",
            Some(
                stranger
                    .sign(&client_jwt_claims(ASSERTION_CLIENT, &endpoint, 60))
                    .unwrap(),
            ),
            Some(JWT_TOKEN_TYPE),
        ),
        (
            "the user's access token",
            Some(subject.clone()),
            Some(JWT_TOKEN_TYPE),
        ),
    ];
    for (what, token, token_type) in cases {
        let mut fields = exchange_fields(&subject);
        if let Some(t) = token {
            fields.push(("actor_token", t));
        }
        if let Some(t) = token_type {
            fields.push(("actor_token_type", t.into()));
        }
        let a = exchange_basic(&idp, "backend", &fields).await;
        assert_eq!(
            (a.status, a.error()),
            (400, "invalid_request"),
            "{what}: {}",
            a.body
        );
    }

    // A client without registered keys cannot present an actor token at all.
    let mut fields = exchange_fields(&subject);
    fields.push((
        "actor_token",
        keys.es
            .sign(&client_jwt_claims("secret-only", &endpoint, 60))
            .unwrap(),
    ));
    fields.push(("actor_token_type", JWT_TOKEN_TYPE.into()));
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic("secret-only", "s3cret")),
        "application/x-www-form-urlencoded",
        form(&pairs),
    )
    .await;
    assert_eq!(
        (a.status, a.error()),
        (400, "invalid_request"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn registered_keys_are_checked_at_start() {
    let keys = gateway_keys();
    let mut private = keys.es.public_jwk();
    private["d"] = keys.es.private_jwk()["d"].clone();
    let small_rsa = json!({"kty": "RSA", "n": crate::idp::keys::b64(&[0xc1; 128]), "e": "AQAB"});
    let p384 = json!({"kty": "EC", "crv": "P-384", "x": crate::idp::keys::b64(&[1; 48]), "y": crate::idp::keys::b64(&[1; 48])});
    let off_curve = json!({"kty": "EC", "crv": "P-256", "x": crate::idp::keys::b64(&[1; 32]), "y": crate::idp::keys::b64(&[2; 32])});
    let wrong_alg = {
        let mut k = keys.es.public_jwk();
        k["alg"] = json!("RS256");
        k
    };
    for bad in [
        json!({"keys": []}),
        json!({"keys": [private]}),
        json!({"keys": [small_rsa]}),
        json!({"keys": [p384]}),
        json!({"keys": [off_curve]}),
        json!({"keys": [wrong_alg]}),
        json!({"keys": [{"kty": "oct", "k": "AAAA"}]}),
        json!({"nope": 1}),
    ] {
        let mut c = quiet(IdpConfig::default());
        c.client_mut(ASSERTION_CLIENT).unwrap().jwks = Some(bad.clone());
        assert!(start(any_port(), c).await.is_err(), "accepted {bad}");
    }
    // A bare JWK (not a set) is accepted.
    let mut c = quiet(IdpConfig::default());
    c.client_mut(ASSERTION_CLIENT).unwrap().jwks = Some(keys.rs.public_jwk());
    assert!(start(any_port(), c).await.is_ok());
}

#[tokio::test]
async fn metadata_advertises_private_key_jwt() {
    let idp = idp().await;
    let url = format!(
        "{}/.well-known/oauth-authorization-server",
        idp.issuer("backend")
    );
    let body: Value = http().get(url).send().await.unwrap().json().await.unwrap();
    let methods = body["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap();
    assert!(methods.contains(&json!("private_key_jwt")));
    assert_eq!(
        body["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS256", "ES256"])
    );
}
