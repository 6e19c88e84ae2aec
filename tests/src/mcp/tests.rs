//! The upstream and the client against each other, with an in-test JWKS.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::sha2::Sha256;
use rsa::traits::PublicKeyParts as _;
use serde_json::{json, Value};

use super::*;

const AUDIENCE: &str = "backend";
const SCOPE: &str = "backend-api:read";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An RS256 key, signing with the `rsa` crate directly (independent of the verifier's library).
struct Key {
    kid: String,
    private: rsa::PrivateKey,
}

impl Key {
    fn generate(kid: &str) -> Self {
        let private = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key generation");
        Self {
            kid: kid.to_string(),
            private,
        }
    }

    fn jwk(&self) -> Value {
        let public = self.private.to_public_key();
        json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64(&public.n_bytes()), "e": b64(&public.e_bytes()),
        })
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"kid": self.kid, "alg": "RS256"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .private
            .pkcs1v15_sign::<Sha256>(input.as_bytes())
            .expect("RS256 signing");
        format!("{input}.{}", b64(&signature))
    }
}

/// A JWKS endpoint whose key list the test can change, counting its fetches.
struct Jwks {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

async fn start_jwks(keys: Vec<Value>) -> Jwks {
    let keys = Arc::new(Mutex::new(keys));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, f) = (keys.clone(), fetches.clone());
    let app = Router::new().route(
        "/oauth2/backend/v1/keys",
        get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let keys = k.lock().unwrap().clone();
                axum::Json(json!({ "keys": keys }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Jwks {
        url: format!("http://{addr}/oauth2/backend/v1/keys"),
        keys,
        fetches,
    }
}

struct Fixture {
    key: Key,
    jwks: Jwks,
    issuer: String,
    upstream: UpstreamHandle,
}

impl Fixture {
    async fn start() -> Self {
        let key = Key::generate("key-1");
        let jwks = start_jwks(vec![key.jwk()]).await;
        let issuer = "http://127.0.0.1:9400/oauth2/backend".to_string();
        let upstream = start_upstream(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            UpstreamConfig {
                issuer: issuer.clone(),
                jwks_url: jwks.url.clone(),
                audience: AUDIENCE.into(),
                required_scopes: vec![SCOPE.into()],
            },
        )
        .await
        .expect("upstream starts");
        Self {
            key,
            jwks,
            issuer,
            upstream,
        }
    }

    /// Claims of a good backend token, as Okta issues them after the exchange.
    fn claims(&self, sub: &str) -> Value {
        json!({
            "ver": 1, "jti": "AT.test", "iss": self.issuer, "aud": AUDIENCE,
            "iat": now(), "exp": now() + 300, "cid": "gateway-client", "uid": "00u1",
            "scp": [SCOPE], "sub": sub,
        })
    }

    fn token(&self, sub: &str) -> String {
        self.key.sign(&self.claims(sub))
    }

    fn token_with(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.claims("user@example.com");
        change(&mut claims);
        self.key.sign(&claims)
    }
}

fn status_and_text(error: &anyhow::Error) -> (Option<u16>, String) {
    (error_status(error), format!("{error:#}"))
}

#[tokio::test]
async fn valid_token_reaches_whoami_and_lists_tools() {
    let fx = Fixture::start().await;
    let token = fx.token("user@example.com");
    let who = whoami(&fx.upstream.mcp_url(), &token).await.unwrap();
    assert_eq!(who.sub, "user@example.com");
    assert_eq!(who.aud, vec![AUDIENCE.to_string()]);
    assert_eq!(who.scopes, vec![SCOPE.to_string()]);
    assert_eq!(who.iss, fx.issuer);
    assert_eq!(who.client_id.as_deref(), Some("gateway-client"));
    for tool in ["whoami", "echo", "read_data", "write_data"] {
        assert!(
            who.tools.iter().any(|t| t == tool),
            "{tool} in {:?}",
            who.tools
        );
    }

    // Every request to /mcp carried exactly the token, and the handshake was recorded.
    let seen = fx.upstream.seen_requests();
    let mcp: Vec<_> = seen.iter().filter(|r| r.path == "/mcp").collect();
    assert!(mcp.len() >= 3, "{seen:?}");
    for request in &mcp {
        assert_eq!(
            request.header_values("authorization"),
            vec![format!("Bearer {token}")]
        );
        assert_eq!(request.bearer(), Some(token.as_str()));
    }
    let methods: Vec<_> = mcp.iter().filter_map(|r| r.jsonrpc_method()).collect();
    for method in ["initialize", "tools/list", "tools/call"] {
        assert!(
            methods.iter().any(|m| m == method),
            "{method} in {methods:?}"
        );
    }
    assert!(mcp.iter().any(|r| r.header("mcp-session-id").is_some()));
}

#[tokio::test]
async fn other_tools_work_and_accept_scope_and_aud_variants() {
    let fx = Fixture::start().await;
    // `scope` as a space-separated string and `aud` as an array are accepted too.
    let token = fx.token_with(|c| {
        c.as_object_mut().unwrap().remove("scp");
        c["scope"] = json!(format!("{SCOPE} backend-api:write"));
        c["aud"] = json!(["other", AUDIENCE]);
    });
    let url = fx.upstream.mcp_url();
    let echo = call_tool(&url, &token, "echo", json!({"text": "hello"}))
        .await
        .unwrap();
    assert_eq!(echo, json!("hello"));
    let read = call_tool(&url, &token, "read_data", json!({}))
        .await
        .unwrap();
    assert_eq!(read["ok"], json!(true));
    assert_eq!(read["tool"], json!("read_data"));
    assert_eq!(read["scopes"], json!([SCOPE, "backend-api:write"]));
    let write = call_tool(&url, &token, "write_data", Value::Null)
        .await
        .unwrap();
    assert_eq!(write["tool"], json!("write_data"));
    let who = whoami(&url, &token).await.unwrap();
    assert_eq!(who.aud, vec!["other".to_string(), AUDIENCE.to_string()]);
    assert_eq!(
        who.scopes,
        vec![SCOPE.to_string(), "backend-api:write".into()]
    );
}

#[tokio::test]
async fn missing_token_is_401_without_error_code() {
    let fx = Fixture::start().await;
    let error = whoami(&fx.upstream.mcp_url(), "").await.unwrap_err();
    let (status, text) = status_and_text(&error);
    assert_eq!(status, Some(401), "{text}");
    assert!(text.contains("HTTP 401"), "{text}");
    let challenge = error
        .downcast_ref::<McpClientError>()
        .and_then(|e| e.www_authenticate.clone())
        .unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(!challenge.contains("error="), "{challenge}");
    // Recorded even though refused.
    let seen = fx.upstream.seen_requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].header("authorization").is_none());
}

#[tokio::test]
async fn bad_tokens_are_401_invalid_token() {
    let fx = Fixture::start().await;
    let other_key = Key::generate("key-1"); // same kid, different key: bad signature
    let cases = [
        (
            "wrong aud",
            fx.token_with(|c| c["aud"] = json!("mcpserver")),
        ),
        (
            "wrong iss",
            fx.token_with(|c| c["iss"] = json!("http://elsewhere/oauth2/default")),
        ),
        ("expired", fx.token_with(|c| c["exp"] = json!(now() - 120))),
        (
            "no exp",
            fx.token_with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "bad signature",
            other_key.sign(&fx.claims("user@example.com")),
        ),
        ("garbage", "not-a-jwt".to_string()),
        (
            "unknown kid",
            Key::generate("key-9").sign(&fx.claims("user@example.com")),
        ),
    ];
    for (what, token) in cases {
        let error = whoami(&fx.upstream.mcp_url(), &token).await.unwrap_err();
        let (status, text) = status_and_text(&error);
        assert_eq!(status, Some(401), "{what}: {text}");
        assert!(text.contains("HTTP 401"), "{what}: {text}");
        assert!(text.contains("error=\"invalid_token\""), "{what}: {text}");
    }
}

#[tokio::test]
async fn missing_scope_is_403_insufficient_scope() {
    let fx = Fixture::start().await;
    let token = fx.token_with(|c| c["scp"] = json!(["mcp:tools:call"]));
    let error = whoami(&fx.upstream.mcp_url(), &token).await.unwrap_err();
    let (status, text) = status_and_text(&error);
    assert_eq!(status, Some(403), "{text}");
    assert!(text.contains("HTTP 403"), "{text}");
    assert!(text.contains("error=\"insufficient_scope\""), "{text}");
    assert!(text.contains(&format!("scope=\"{SCOPE}\"")), "{text}");
}

#[tokio::test]
async fn rejected_subject_is_401_until_cleared() {
    let fx = Fixture::start().await;
    let url = fx.upstream.mcp_url();
    let token = fx.token("user@example.com");
    let other = fx.token("other@example.com");

    // Revoked mid-session: the next call in the same session fails with 401.
    let session = McpSession::connect(&url, &token).await.unwrap();
    assert!(session
        .tools()
        .await
        .unwrap()
        .contains(&"whoami".to_string()));
    fx.upstream.reject_subject("user@example.com");
    let error = session.call("whoami", Value::Null).await.unwrap_err();
    assert_eq!(error_status(&error), Some(401), "{error:#}");
    assert!(format!("{error}").contains("tools/call whoami"), "{error}");
    session.close().await;

    let error = whoami(&url, &token).await.unwrap_err();
    let (status, text) = status_and_text(&error);
    assert_eq!(status, Some(401), "{text}");
    assert!(text.contains("invalid_token"), "{text}");
    assert_eq!(whoami(&url, &other).await.unwrap().sub, "other@example.com");

    fx.upstream.clear();
    assert!(fx.upstream.seen_requests().is_empty());
    assert_eq!(whoami(&url, &token).await.unwrap().sub, "user@example.com");
}

#[tokio::test]
async fn keys_are_fetched_lazily_and_refetched_on_unknown_kid() {
    let fx = Fixture::start().await;
    let url = fx.upstream.mcp_url();
    assert_eq!(fx.jwks.fetches.load(Ordering::SeqCst), 0);
    whoami(&url, &fx.token("user@example.com")).await.unwrap();
    assert_eq!(fx.jwks.fetches.load(Ordering::SeqCst), 1);

    // The AS rotates to a new key: the first token signed with it triggers one refetch.
    let rotated = Key::generate("key-2");
    fx.jwks.keys.lock().unwrap().push(rotated.jwk());
    let who = whoami(&url, &rotated.sign(&fx.claims("rotated@example.com")))
        .await
        .unwrap();
    assert_eq!(who.sub, "rotated@example.com");
    assert_eq!(fx.jwks.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn raw_http_edge_cases() {
    let fx = Fixture::start().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let health = http
        .get(format!("{}/healthz", fx.upstream.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let token = fx.token("user@example.com");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let twice = http
        .post(fx.upstream.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    let challenge = twice.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("error=\"invalid_request\""),
        "{challenge}"
    );

    let basic = http
        .post(fx.upstream.mcp_url())
        .header("authorization", "Basic Zm9vOmJhcg==")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    // The scheme is case-insensitive; a raw initialize works and opens a session.
    let ok = http
        .post(fx.upstream.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("bearer {token}"))
        .header("host", "mcp-upstream.internal")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers().contains_key("mcp-session-id"));

    let seen = fx.upstream.seen_requests();
    assert_eq!(seen[0].path, "/healthz");
    assert_eq!(seen[1].header_values("authorization").len(), 2);
    assert_eq!(seen[1].jsonrpc_method().as_deref(), Some("initialize"));
    assert_eq!(seen[3].header("host"), Some("mcp-upstream.internal"));
}
