//! The IdP against its own contract, through real HTTP. Tokens are verified with `jsonwebtoken`
//! (an implementation independent of the IdP's signer) using the keys the IdP publishes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use super::*;

const CLIENT_ID: &str = "gateway-client";
const CLIENT_SECRET: &str = "gateway-secret";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn idp() -> IdpHandle {
    start(any_port(), quiet(IdpConfig::default()))
        .await
        .expect("idp starts")
}

fn quiet(mut config: IdpConfig) -> IdpConfig {
    config.log_requests = false;
    config
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// The reference exchange request's fields (without client authentication).
fn exchange_fields(subject: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", TOKEN_EXCHANGE_GRANT.to_string()),
        ("subject_token_type", ACCESS_TOKEN_TYPE.to_string()),
        ("subject_token", subject.to_string()),
        ("audience", "backend".to_string()),
        ("scope", "backend-api:read".to_string()),
    ]
}

fn with(
    mut fields: Vec<(&'static str, String)>,
    name: &'static str,
    value: Option<&str>,
) -> Vec<(&'static str, String)> {
    fields.retain(|(k, _)| *k != name);
    if let Some(v) = value {
        fields.push((name, v.to_string()));
    }
    fields
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("<none>")
    }
}

/// POSTs to `{as_id}/v1/token` with HTTP Basic client authentication.
async fn exchange_basic(idp: &IdpHandle, as_id: &str, fields: &[(&str, String)]) -> Answer {
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = http()
        .post(idp.token_endpoint(as_id))
        .header("authorization", basic(CLIENT_ID, CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&pairs))
        .send()
        .await
        .expect("token request");
    answer(resp).await
}

async fn post_raw(
    idp: &IdpHandle,
    as_id: &str,
    authorization: Option<&str>,
    content_type: &str,
    body: String,
) -> Answer {
    let mut req = http()
        .post(idp.token_endpoint(as_id))
        .header("content-type", content_type)
        .body(body);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    answer(req.send().await.expect("token request")).await
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

/// `{base}/__admin/{path}`, the IdP's admin API.
fn admin_url(idp: &IdpHandle, path: &str) -> String {
    format!("{}/__admin/{path}", idp.base_url())
}

/// Sends `req` (an admin API request) and reads its answer as JSON.
async fn admin_json(req: reqwest::RequestBuilder) -> Value {
    let resp = req.send().await.expect("admin request");
    resp.json().await.expect("admin JSON")
}

/// POSTs `body` as JSON to the admin route `path`; the answer's status.
async fn admin_post(idp: &IdpHandle, path: &str, body: Value) -> u16 {
    let req = http().post(admin_url(idp, path)).json(&body);
    req.send().await.expect("admin request").status().as_u16()
}

/// POSTs `body` as JSON to `__admin/mint`; the minted token's JSON.
async fn admin_mint(idp: &IdpHandle, body: Value) -> Value {
    admin_json(http().post(admin_url(idp, "mint")).json(&body)).await
}

/// The JSON of the admin route `path` (GET).
async fn admin_get(idp: &IdpHandle, path: &str) -> Value {
    admin_json(http().get(admin_url(idp, path))).await
}

/// Exchanges `subject` at `backend` as the gateway client (HTTP Basic), expects 200 and
/// returns the verified claims of the issued token.
async fn exchanged_claims(idp: &IdpHandle, subject: &str) -> Value {
    let a = exchange_basic(idp, "backend", &exchange_fields(subject)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    issued_claims(idp, &a).await
}

/// The verified claims of the `backend` token in a token endpoint's answer.
async fn issued_claims(idp: &IdpHandle, a: &Answer) -> Value {
    let token = a.body["access_token"].as_str().expect("access_token");
    verify(idp, "backend", "backend", token).await
}

async fn jwks(idp: &IdpHandle, as_id: &str) -> JwkSet {
    http()
        .get(idp.jwks_uri(as_id))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks json")
}

/// Verifies `token` with the AS's published keys; returns its claims.
async fn verify(idp: &IdpHandle, as_id: &str, audience: &str, token: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).expect("header");
    let kid = header.kid.expect("kid");
    let set = jwks(idp, as_id).await;
    let jwk = set.find(&kid).expect("kid published");
    let key = DecodingKey::from_jwk(jwk).expect("decoding key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[idp.issuer(as_id)]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("token verifies")
        .claims
}

fn header_json(token: &str) -> Value {
    let h = token.split('.').next().expect("header part");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .expect("b64"),
    )
    .expect("json")
}

fn user_token(idp: &IdpHandle) -> String {
    idp.mint(&MintRequest::default()).expect("mint")
}

#[tokio::test]
async fn minted_token_verifies_against_published_jwks() {
    let idp = idp().await;
    let token = user_token(&idp);
    let header = header_json(&token);
    assert_eq!(header, json!({"kid": idp.kid("mcp"), "alg": "RS256"}));

    let claims = verify(&idp, "mcp", "mcpserver", &token).await;
    assert_eq!(claims["iss"], idp.issuer("mcp"));
    assert_eq!(claims["aud"], "mcpserver");
    assert_eq!(claims["sub"], "user@example.com");
    assert_eq!(claims["scp"], json!(["mcp:tools:call"]));
    assert_eq!(claims["ver"], 1);
    assert!(claims["jti"].as_str().is_some_and(|j| j.starts_with("AT.")));
    assert!(claims["uid"].as_str().is_some_and(|u| u.starts_with("00u")));
    assert_eq!(claims["cid"], "mcp-client");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);

    // JWKS shape and caching headers.
    let resp = http().get(idp.jwks_uri("mcp")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let cc = resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cc.contains("max-age=86400"), "{cc}");
    let body: Value = resp.json().await.unwrap();
    let key = &body["keys"][0];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["e"], "AQAB");
    assert_eq!(key["kid"], idp.kid("mcp"));
    assert_eq!(*key, idp.public_jwk("mcp"));
    // 2048-bit modulus: 256 bytes -> 342 base64url characters.
    assert_eq!(key["n"].as_str().unwrap().len(), 342);
    assert_eq!(idp.keys_fetch_count("mcp"), 2);
    assert_eq!(idp.keys_fetch_count("backend"), 0);

    // The two ASes sign with different keys.
    assert_ne!(idp.kid("mcp"), idp.kid("backend"));
}

#[tokio::test]
async fn mint_options_scope_style_audience_ttl_and_extra() {
    let idp = idp().await;
    let token = idp
        .mint(&MintRequest {
            scopes: vec!["mcp:tools:call".into(), "mcp:tools:admin".into()],
            scope_style: ScopeStyle::Scope,
            aud: Some("other".into()),
            sub: "alice@example.com".into(),
            extra: serde_json::from_value(json!({"cid": "x", "uid": null, "custom": [1]})).unwrap(),
            ..MintRequest::default()
        })
        .unwrap();
    let claims = verify(&idp, "mcp", "other", &token).await;
    assert_eq!(claims["scope"], "mcp:tools:call mcp:tools:admin");
    assert!(claims.get("scp").is_none());
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["cid"], "x");
    assert!(claims.get("uid").is_none());
    assert_eq!(claims["custom"], json!([1]));

    let expired = idp
        .mint(&MintRequest {
            ttl_secs: -120,
            ..MintRequest::default()
        })
        .unwrap();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&expired)
        .unwrap()
        .claims;
    assert!(claims["exp"].as_i64().unwrap() < now_secs() - 100);
    assert!(claims["iat"].as_i64().unwrap() < claims["exp"].as_i64().unwrap());

    assert!(idp
        .mint(&MintRequest {
            as_id: "nope".into(),
            ..MintRequest::default()
        })
        .is_err());
}

#[tokio::test]
async fn sign_raw_signs_exact_bytes() {
    let idp = idp().await;
    let header = br#"{"alg":"RS256", "kid":"whatever","typ":"JWT" }"#;
    let claims = br#"{"sub":"x","exp":1e3}"#;
    let token = idp.sign_raw("backend", header, claims).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let dec = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    };
    assert_eq!(dec(parts[0]), header);
    assert_eq!(dec(parts[1]), claims);
    // The signature is RS256 by backend's current key.
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(idp.public_jwk("backend")).unwrap();
    let key = DecodingKey::from_jwk(&jwk).unwrap();
    let message = format!("{}.{}", parts[0], parts[1]);
    assert!(
        jsonwebtoken::crypto::verify(parts[2], message.as_bytes(), &key, Algorithm::RS256).unwrap()
    );
    assert!(idp.sign_raw("nope", header, claims).is_err());
    assert_eq!(idp.public_jwk("nope"), Value::Null);
}

#[tokio::test]
async fn metadata_documents() {
    let idp = idp().await;
    for doc in ["oauth-authorization-server", "openid-configuration"] {
        let url = format!("{}/.well-known/{doc}", idp.issuer("backend"));
        let body: Value = http().get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(body["issuer"], idp.issuer("backend"));
        assert_eq!(body["jwks_uri"], idp.jwks_uri("backend"));
        assert_eq!(body["token_endpoint"], idp.token_endpoint("backend"));
        assert!(body["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(TOKEN_EXCHANGE_GRANT)));
        let methods = body["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap();
        assert!(methods.contains(&json!("client_secret_basic")));
        assert!(methods.contains(&json!("client_secret_post")));
    }
    let resp = http()
        .get(format!("{}/oauth2/nope/v1/keys", idp.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(idp.base_url(), format!("http://127.0.0.1:{}", idp.port()));
}

#[tokio::test]
async fn exchange_with_client_secret_basic() {
    let idp = idp().await;
    let subject = user_token(&idp);
    let subject_claims = verify(&idp, "mcp", "mcpserver", &subject).await;
    let a = exchange_basic(&idp, "backend", &exchange_fields(&subject)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers["pragma"], "no-cache");
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["expires_in"], 3600);
    assert_eq!(a.body["scope"], "backend-api:read");
    assert_eq!(a.body["issued_token_type"], ACCESS_TOKEN_TYPE);

    let token = a.body["access_token"].as_str().unwrap();
    assert_eq!(header_json(token)["kid"], idp.kid("backend"));
    let claims = verify(&idp, "backend", "backend", token).await;
    assert_eq!(claims["iss"], idp.issuer("backend"));
    assert_eq!(claims["aud"], "backend");
    assert_eq!(claims["sub"], subject_claims["sub"]);
    assert_eq!(claims["uid"], subject_claims["uid"]);
    assert_eq!(claims["scp"], json!(["backend-api:read"]));
    assert_eq!(claims["cid"], CLIENT_ID);
    assert_ne!(claims["jti"], subject_claims["jti"]);
    assert!(claims.get("act").is_none());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    let rec = idp.last_exchange().unwrap();
    assert_eq!(rec.client_auth, "client_secret_basic");
    assert_eq!(rec.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(
        rec.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(rec.field("audience"), Some("backend"));
    assert_eq!(rec.field("subject_token"), Some(subject.as_str()));
    assert_eq!(idp.exchange_count(), 1);
}

#[tokio::test]
async fn exchange_with_client_secret_post_and_two_scopes() {
    let idp = idp().await;
    let subject = user_token(&idp);
    let mut fields = with(
        exchange_fields(&subject),
        "scope",
        Some("backend-api:read backend-api:write"),
    );
    fields.push(("client_id", CLIENT_ID.into()));
    fields.push(("client_secret", CLIENT_SECRET.into()));
    fields.push(("requested_token_type", ACCESS_TOKEN_TYPE.into()));
    fields.push(("resource", "backend".into()));
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = post_raw(
        &idp,
        "backend",
        None,
        "application/x-www-form-urlencoded; charset=UTF-8",
        form(&pairs),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["scope"], "backend-api:read backend-api:write");
    let claims = verify(
        &idp,
        "backend",
        "backend",
        a.body["access_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        claims["scp"],
        json!(["backend-api:read", "backend-api:write"])
    );

    let rec = idp.last_exchange().unwrap();
    assert_eq!(rec.client_auth, "client_secret_post");
    assert_eq!(rec.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(rec.field("client_id"), Some(CLIENT_ID));
    assert!(
        rec.field("client_secret").is_none(),
        "secret must not be recorded"
    );
}

#[tokio::test]
async fn basic_credentials_are_form_urlencoded_before_base64() {
    let secret = "s3:cr+t/=%é";
    let idp = start(any_port(), quiet(IdpConfig::reference("gw:client", secret)))
        .await
        .unwrap();
    let subject = user_token(&idp);
    let fields = exchange_fields(&subject);
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic("gw:client", secret)),
        "application/x-www-form-urlencoded",
        form(&pairs),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        idp.last_exchange().unwrap().client_id.as_deref(),
        Some("gw:client")
    );
}

#[tokio::test]
async fn exchange_preserves_omit_issued_token_type_and_ttl() {
    let mut config = quiet(IdpConfig::default());
    config.omit_issued_token_type = true;
    config.exchange_ttl_secs = 300;
    let idp = start(any_port(), config).await.unwrap();
    let a = exchange_basic(&idp, "backend", &exchange_fields(&user_token(&idp))).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(a.body.get("issued_token_type").is_none());
    assert_eq!(a.body["expires_in"], 300);
    let claims = verify(
        &idp,
        "backend",
        "backend",
        a.body["access_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
}

/// Every row of Okta's documented error table that the IdP models.
#[tokio::test]
async fn exchange_errors() {
    let mut config = quiet(IdpConfig::default());
    // A third AS that the backend AS does not trust.
    config.authorization_servers.push(AuthServerConfig {
        id: "other".into(),
        audience: "other".into(),
        scopes: vec!["other:read".into()],
        trusted_servers: vec![],
        exchange_policies: vec![],
    });
    let idp = start(any_port(), config).await.unwrap();
    let good = user_token(&idp);
    let fields = exchange_fields(&good);

    // Sanity: the reference request succeeds.
    assert_eq!(exchange_basic(&idp, "backend", &fields).await.status, 200);

    let check = |a: &Answer, status: u16, error: &str, what: &str| {
        assert_eq!(
            (a.status, a.error()),
            (status, error),
            "{what}: {:?}",
            a.body
        );
        if a.status != 405 {
            assert_eq!(a.headers["content-type"], "application/json", "{what}");
            assert_eq!(a.headers["cache-control"], "no-store", "{what}");
            assert_eq!(a.headers["pragma"], "no-cache", "{what}");
            assert!(a.body["error_description"].is_string(), "{what}");
        }
    };
    let pairs = |f: &[(&'static str, String)]| -> String {
        let p: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        form(&p)
    };
    let ct = "application/x-www-form-urlencoded";

    // invalid_client: wrong secret over Basic -> 401 with a Basic challenge.
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic(CLIENT_ID, "wrong")),
        ct,
        pairs(&fields),
    )
    .await;
    check(&a, 401, "invalid_client", "wrong secret (basic)");
    assert!(a.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    // No credentials at all.
    let a = post_raw(&idp, "backend", None, ct, pairs(&fields)).await;
    check(&a, 401, "invalid_client", "no credentials");
    assert!(a.headers.get("www-authenticate").is_none());
    // Unknown client over POST.
    let mut f = fields.clone();
    f.push(("client_id", "someone".into()));
    f.push(("client_secret", CLIENT_SECRET.into()));
    let a = post_raw(&idp, "backend", None, ct, pairs(&f)).await;
    check(&a, 401, "invalid_client", "unknown client (post)");
    // client_id without secret.
    let mut f = fields.clone();
    f.push(("client_id", CLIENT_ID.into()));
    let a = post_raw(&idp, "backend", None, ct, pairs(&f)).await;
    check(&a, 401, "invalid_client", "public-client style");
    assert_eq!(idp.last_exchange().unwrap().client_auth, "none");
    // Garbage Basic credentials.
    let a = post_raw(&idp, "backend", Some("Basic !!!"), ct, pairs(&fields)).await;
    check(&a, 401, "invalid_client", "malformed basic");
    // Both methods at once.
    let mut f = fields.clone();
    f.push(("client_secret", CLIENT_SECRET.into()));
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic(CLIENT_ID, CLIENT_SECRET)),
        ct,
        pairs(&f),
    )
    .await;
    check(&a, 400, "invalid_request", "basic and post together");

    // Content type and method.
    let a = post_raw(
        &idp,
        "backend",
        Some(&basic(CLIENT_ID, CLIENT_SECRET)),
        "application/json",
        json!({"grant_type": TOKEN_EXCHANGE_GRANT}).to_string(),
    )
    .await;
    check(&a, 400, "invalid_request", "json body");
    let a = answer(
        http()
            .get(idp.token_endpoint("backend"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    check(&a, 405, "invalid_request", "GET");

    // Grant.
    let a = exchange_basic(
        &idp,
        "backend",
        &with(fields.clone(), "grant_type", Some("client_credentials")),
    )
    .await;
    check(&a, 400, "unsupported_grant_type", "client_credentials");
    let a = exchange_basic(&idp, "backend", &with(fields.clone(), "grant_type", None)).await;
    check(&a, 400, "invalid_request", "no grant_type");

    // Parameters.
    let jwt_type = "urn:ietf:params:oauth:token-type:jwt";
    for (name, value, status, error) in [
        ("subject_token_type", Some(jwt_type), 400, "invalid_request"),
        (
            "subject_token_type",
            Some("urn:ietf:params:oauth:token-type:id_token"),
            400,
            "invalid_request",
        ),
        ("subject_token_type", None, 400, "invalid_request"),
        ("subject_token", None, 400, "invalid_request"),
        ("subject_token", Some("garbage"), 400, "invalid_request"),
        ("subject_token", Some("a.b.c"), 400, "invalid_request"),
        (
            "requested_token_type",
            Some(jwt_type),
            400,
            "invalid_request",
        ),
        ("actor_token", Some(good.as_str()), 400, "invalid_request"),
        ("audience", Some("mcpserver"), 400, "invalid_target"),
        ("audience", Some("backend "), 400, "invalid_target"),
        ("audience", None, 400, "invalid_request"),
        (
            "resource",
            Some("https://backend.example"),
            400,
            "invalid_target",
        ),
        ("scope", Some("openid"), 400, "invalid_scope"),
        (
            "scope",
            Some("backend-api:read offline_access"),
            400,
            "invalid_scope",
        ),
        ("scope", Some("backend-api:delete"), 400, "invalid_scope"),
        ("scope", Some("mcp:tools:call"), 400, "invalid_scope"),
        ("scope", None, 400, "invalid_scope"),
        ("scope", Some("   "), 400, "invalid_scope"),
        // Defined by the AS but not granted to this client by the exchange policy.
        ("scope", Some("backend-api:admin"), 400, "access_denied"),
        (
            "scope",
            Some("backend-api:read backend-api:admin"),
            400,
            "access_denied",
        ),
    ] {
        let a = exchange_basic(&idp, "backend", &with(fields.clone(), name, value)).await;
        check(&a, status, error, &format!("{name}={value:?}"));
    }
    // A parameter given twice.
    let mut f = fields.clone();
    f.push(("audience", "backend".into()));
    check(
        &exchange_basic(&idp, "backend", &f).await,
        400,
        "invalid_request",
        "duplicate audience",
    );

    // Subject tokens.
    let subject_cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            idp.mint(&MintRequest {
                ttl_secs: -60,
                ..Default::default()
            })
            .unwrap(),
            400,
            "invalid_grant",
        ),
        (
            "issued by an untrusted AS",
            idp.mint(&MintRequest {
                as_id: "other".into(),
                scopes: vec!["other:read".into()],
                ..Default::default()
            })
            .unwrap(),
            403,
            "access_denied",
        ),
        (
            "unknown issuer",
            idp.mint(&MintRequest {
                extra: serde_json::from_value(json!({"iss": "https://evil.example/oauth2/mcp"}))
                    .unwrap(),
                ..Default::default()
            })
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "not for the MCP AS's audience",
            idp.mint(&MintRequest {
                aud: Some("something-else".into()),
                ..Default::default()
            })
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "mcp token signed by another AS's key",
            idp.sign_raw(
                "backend",
                format!(r#"{{"kid":"{}","alg":"RS256"}}"#, idp.kid("mcp")).as_bytes(),
                json!({"iss": idp.issuer("mcp"), "aud": "mcpserver", "sub": "u", "exp": now_secs() + 600})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "unknown kid",
            idp.sign_raw(
                "mcp",
                br#"{"kid":"nope","alg":"RS256"}"#,
                json!({"iss": idp.issuer("mcp"), "aud": "mcpserver", "sub": "u", "exp": now_secs() + 600})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                keys::b64(br#"{"alg":"none"}"#),
                keys::b64(
                    json!({"iss": idp.issuer("mcp"), "aud": "mcpserver", "sub": "u", "exp": now_secs() + 600})
                        .to_string()
                        .as_bytes()
                )
            ),
            400,
            "invalid_request",
        ),
        (
            "no exp",
            idp.mint(&MintRequest {
                extra: serde_json::from_value(json!({"exp": null})).unwrap(),
                ..Default::default()
            })
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "no sub",
            idp.mint(&MintRequest {
                extra: serde_json::from_value(json!({"sub": null})).unwrap(),
                ..Default::default()
            })
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "tampered signature",
            {
                let mut t = good.clone();
                let last = t.pop().unwrap();
                t.push(if last == 'A' { 'B' } else { 'A' });
                t
            },
            400,
            "invalid_request",
        ),
    ];
    for (what, token, status, error) in subject_cases {
        let a = exchange_basic(
            &idp,
            "backend",
            &with(fields.clone(), "subject_token", Some(&token)),
        )
        .await;
        check(&a, status, error, what);
    }

    // A backend token exchanged at the backend AS itself (an AS trusts its own tokens) with no
    // scope problem is fine; at the MCP AS, which does not trust backend, it is refused.
    let backend_token = idp
        .mint(&MintRequest {
            as_id: "backend".into(),
            scopes: vec!["backend-api:read".into()],
            ..Default::default()
        })
        .unwrap();
    let a = exchange_basic(
        &idp,
        "backend",
        &with(fields.clone(), "subject_token", Some(&backend_token)),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut f = with(fields.clone(), "subject_token", Some(&backend_token));
    f = with(f, "audience", Some("mcpserver"));
    f = with(f, "scope", Some("mcp:tools:call"));
    check(
        &exchange_basic(&idp, "mcp", &f).await,
        403,
        "access_denied",
        "untrusted at mcp",
    );
    // A trusted subject at an AS with no exchange policy for the client: denied by policy.
    let f = with(
        with(fields.clone(), "audience", Some("mcpserver")),
        "scope",
        Some("mcp:tools:call"),
    );
    check(
        &exchange_basic(&idp, "mcp", &f).await,
        400,
        "access_denied",
        "no policy",
    );
}

#[tokio::test]
async fn unauthorized_client_when_grant_disabled() {
    let mut config = quiet(IdpConfig::default());
    config.client_mut(CLIENT_ID).unwrap().token_exchange_enabled = false;
    let idp = start(any_port(), config).await.unwrap();
    let a = exchange_basic(&idp, "backend", &exchange_fields(&user_token(&idp))).await;
    assert_eq!((a.status, a.error()), (400, "unauthorized_client"));
}

#[tokio::test]
async fn key_rotation_publishes_both_keys() {
    let idp = idp().await;
    let old_kid = idp.kid("mcp");
    let old_token = user_token(&idp);
    let new_kid = idp.rotate_key("mcp");
    assert_ne!(old_kid, new_kid);
    assert_eq!(idp.kid("mcp"), new_kid);
    let set = jwks(&idp, "mcp").await;
    assert_eq!(set.keys.len(), 2);
    assert!(set.find(&old_kid).is_some() && set.find(&new_kid).is_some());

    let new_token = user_token(&idp);
    assert_eq!(header_json(&new_token)["kid"], new_kid);
    verify(&idp, "mcp", "mcpserver", &new_token).await;
    verify(&idp, "mcp", "mcpserver", &old_token).await;
    // Both still exchange.
    for t in [&old_token, &new_token] {
        let a = exchange_basic(&idp, "backend", &exchange_fields(t)).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    // Backend rotation: exchanged tokens use the new kid.
    let backend_kid = idp.rotate_key("backend");
    let a = exchange_basic(&idp, "backend", &exchange_fields(&new_token)).await;
    assert_eq!(
        header_json(a.body["access_token"].as_str().unwrap())["kid"],
        backend_kid
    );
}

#[tokio::test]
async fn faults_on_the_token_endpoint() {
    let idp = idp().await;
    let fields = exchange_fields(&user_token(&idp));

    idp.set_fault(Endpoint::Token, Fault::Status(503));
    let a = exchange_basic(&idp, "backend", &fields).await;
    assert_eq!(a.status, 503);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));

    idp.set_fault(Endpoint::Token, Fault::MalformedBody);
    let resp = http()
        .post(idp.token_endpoint("backend"))
        .header("authorization", basic(CLIENT_ID, CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("x=y")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

    idp.set_fault(
        Endpoint::Token,
        Fault::Respond {
            status: 429,
            content_type: "application/json".into(),
            body: r#"{"errorCode":"E0000047","errorSummary":"API call exceeded rate limit due to too many requests."}"#.into(),
        },
    );
    let a = exchange_basic(&idp, "backend", &fields).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["errorCode"], "E0000047");

    idp.set_fault(Endpoint::Token, Fault::Reset);
    let err = http()
        .post(idp.token_endpoint("backend"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("x=y")
        .send()
        .await
        .expect_err("connection reset, no response");
    assert!(
        err.is_request() || err.is_connect() || err.is_body(),
        "{err:?}"
    );

    idp.set_fault(Endpoint::Token, Fault::Delay(Duration::from_millis(400)));
    let started = Instant::now();
    let a = exchange_basic(&idp, "backend", &fields).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(started.elapsed() >= Duration::from_millis(400));

    // A keys fault leaves the token endpoint alone and vice versa.
    idp.clear_faults();
    idp.set_fault(Endpoint::Keys("backend".into()), Fault::Status(500));
    assert_eq!(exchange_basic(&idp, "backend", &fields).await.status, 200);
    idp.clear_faults();
    assert_eq!(exchange_basic(&idp, "backend", &fields).await.status, 200);

    // Every request counted, faulted ones included.
    assert_eq!(idp.exchange_count(), 7);
}

#[tokio::test]
async fn faults_on_the_keys_endpoint() {
    let idp = idp().await;
    let get = |as_id: &str| http().get(idp.jwks_uri(as_id)).send();

    idp.set_fault(Endpoint::Keys("mcp".into()), Fault::Status(500));
    assert_eq!(get("mcp").await.unwrap().status(), 500);
    assert_eq!(get("backend").await.unwrap().status(), 200);

    idp.set_fault(Endpoint::Keys("mcp".into()), Fault::Reset);
    assert!(get("mcp").await.is_err());

    idp.set_fault(Endpoint::Keys("mcp".into()), Fault::MalformedBody);
    let resp = get("mcp").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Value>().await.is_err());

    idp.set_fault(
        Endpoint::Keys("mcp".into()),
        Fault::Delay(Duration::from_millis(300)),
    );
    let started = Instant::now();
    let set: JwkSet = get("mcp").await.unwrap().json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(set.keys.len(), 1);

    idp.clear_faults();
    assert_eq!(get("mcp").await.unwrap().status(), 200);
    assert_eq!(idp.keys_fetch_count("mcp"), 5);
    assert_eq!(idp.keys_fetch_count("backend"), 1);
    assert_eq!(idp.exchange_count(), 0);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let idp = idp().await;
    let client = http();
    assert!(client.get(idp.jwks_uri("mcp")).send().await.is_ok());
    idp.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client.get(idp.jwks_uri("mcp")).send().await.is_err());
}

#[tokio::test]
async fn admin_api() {
    let idp = idp().await;
    let admin = |p: &str| admin_url(&idp, p);
    let c = http();

    // Mint with defaults and with options.
    let body: Value = c
        .post(admin("mint"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap();
    let claims = verify(&idp, "mcp", "mcpserver", token).await;
    assert_eq!(claims["scp"], json!(["mcp:tools:call"]));
    let body = admin_mint(&idp, json!({"as_id": "backend", "sub": "bob", "scopes": ["backend-api:read"], "scope_style": "scope", "ttl_secs": 60, "extra": {"foo": "bar"}})).await;
    let claims = verify(
        &idp,
        "backend",
        "backend",
        body["access_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        (
            claims["sub"].as_str(),
            claims["scope"].as_str(),
            claims["foo"].as_str()
        ),
        (Some("bob"), Some("backend-api:read"), Some("bar"))
    );
    assert_eq!(
        admin_post(&idp, "mint", json!({"as_id": "nope"})).await,
        400
    );
    let resp = c
        .post(admin("mint"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Faults.
    let fault = json!({"endpoint": "token", "fault": {"kind": "status", "status": 502}});
    assert_eq!(admin_post(&idp, "faults", fault).await, 200);
    let a = exchange_basic(&idp, "backend", &exchange_fields(token)).await;
    assert_eq!(a.status, 502);
    let fault = json!({"endpoint": "keys:mcp", "fault": {"kind": "delay", "ms": 10}});
    assert_eq!(admin_post(&idp, "faults", fault).await, 200);
    for bad in [
        json!({"endpoint": "keys:nope", "fault": {"kind": "reset"}}),
        json!({"endpoint": "token", "fault": {"kind": "explode"}}),
        json!({"endpoint": "token"}),
    ] {
        assert_eq!(admin_post(&idp, "faults", bad.clone()).await, 400, "{bad}");
    }
    let fault = json!({"endpoint": "keys:backend", "fault": {"kind": "malformed_body"}});
    admin_post(&idp, "faults", fault).await;
    assert!(c
        .get(idp.jwks_uri("backend"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .is_err());
    let resp = c.delete(admin("faults")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let a = exchange_basic(&idp, "backend", &exchange_fields(token)).await;
    assert_eq!(a.status, 200);

    // Rotation.
    let old = idp.kid("backend");
    let body: Value = c
        .post(admin("rotate/backend"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["kid"], idp.kid("backend"));
    assert_ne!(old, idp.kid("backend"));
    assert_eq!(
        c.post(admin("rotate/nope")).send().await.unwrap().status(),
        404
    );

    // Stats.
    let stats = admin_get(&idp, "stats").await;
    assert_eq!(stats["token_requests"], 2);
    assert_eq!(stats["token_requests"], idp.exchange_count());
    assert_eq!(stats["keys_requests"]["mcp"], idp.keys_fetch_count("mcp"));
    assert_eq!(
        stats["keys_requests"]["backend"],
        idp.keys_fetch_count("backend")
    );
}

#[tokio::test]
async fn config_validation() {
    let mut c = quiet(IdpConfig::default());
    c.server_mut("backend")
        .unwrap()
        .trusted_servers
        .push("ghost".into());
    assert!(start(any_port(), c).await.is_err());
    let mut c = quiet(IdpConfig::default());
    c.authorization_servers
        .push(c.authorization_servers[0].clone());
    assert!(start(any_port(), c).await.is_err());
    let mut c = quiet(IdpConfig::default());
    c.exchange_ttl_secs = 0;
    assert!(start(any_port(), c).await.is_err());
}

#[tokio::test]
async fn public_base_url_drives_issuers() {
    let mut c = quiet(IdpConfig::default());
    c.public_base_url = Some("http://idp.test:9400/".into());
    let idp = start(any_port(), c).await.unwrap();
    assert_eq!(idp.issuer("mcp"), "http://idp.test:9400/oauth2/mcp");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&user_token(&idp))
        .unwrap()
        .claims;
    assert_eq!(claims["iss"], "http://idp.test:9400/oauth2/mcp");
}

mod client_auth;
mod introspect;
