//! Keycloak mode: one realm of Keycloak 26.2+ with **standard token exchange** (V2), as
//! Keycloak documents it (securing-apps/token-exchange, `StandardTokenExchangeProvider`):
//!
//! - `GET /realms/{realm}/protocol/openid-connect/certs`: the realm's keys (`use: sig`);
//! - access tokens ([`IdpHandle::mint_keycloak`](super::IdpHandle)): header `typ: JWT`, `iss`
//!   `{base}/realms/{realm}`, `aud` (the clients the token is for), `azp` (the client it was
//!   issued to), `scope` a space-separated string, `typ: "Bearer"` in the payload;
//! - `POST /realms/{realm}/protocol/openid-connect/token` with the RFC 8693 grant, the
//!   requesting client confidential (secret in the form or HTTP Basic) with "Standard token
//!   exchange" on; `subject_token_type` must be the access-token type; the subject token's `aud`
//!   must include the requester; `audience` is a *client id* (repeatable) that must be available
//!   to the requester and only narrows `aud`; `scope` names the requester's optional client
//!   scopes;
//! - `POST /realms/{realm}/protocol/openid-connect/token/introspect` (RFC 7662) for a
//!   confidential client of the realm: the token's claims plus `active`, `client_id` (= `azp`),
//!   `username`, `token_type` (the shape Keycloak answers with), `{"active": false}` otherwise.
//!   Keycloak's access tokens are JWTs, which a gateway verifies itself; for tests the realm also
//!   hands out opaque references to tokens ([`IdpHandle::mint_keycloak_opaque`]) that only
//!   introspection (and the exchange, as a subject token) can read;
//! - its errors: 400 `invalid_request` ("Invalid token", "Requested audience not available",
//!   standard token exchange off), 403 `access_denied` ("Client is not within the token
//!   audience"), 400 `invalid_client` ("Audience not found"), 400 `invalid_scope`, 401
//!   `invalid_client` (bad credentials).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::keys::{parse_jws, random_b64, SigningKey};
use super::{lock, now_secs, IdpHandle, ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT};

/// Lifetime of the realm's access tokens (Keycloak's default is 5 minutes; longer here so
/// tests do not race it).
const TOKEN_TTL_SECS: i64 = 900;

/// A confidential client of the realm.
#[derive(Clone, Debug)]
pub struct KeycloakClient {
    pub client_id: String,
    pub secret: String,
    /// "Standard token exchange" in the client's capability config.
    pub standard_token_exchange: bool,
    /// Client ids that may appear in `aud` of tokens exchanged by this client (what its
    /// audience mappers and client scopes make available).
    pub available_audiences: Vec<String>,
    /// The client's optional client scopes (what `scope` may name).
    pub optional_scopes: Vec<String>,
}

/// One realm.
#[derive(Clone, Debug)]
pub struct KeycloakConfig {
    pub realm: String,
    /// Every client of the realm by id (also the known audiences).
    pub clients: Vec<KeycloakClient>,
    /// `azp` of minted user tokens (the MCP client).
    pub user_client_id: String,
}

impl Default for KeycloakConfig {
    /// Realm `mcp`: the gateway `mcp-gateway` (standard token exchange on, may reach
    /// `backend-api` through its optional scope `backend:read`), and `backend-api`.
    fn default() -> Self {
        Self {
            realm: "mcp".into(),
            clients: vec![
                KeycloakClient {
                    client_id: "mcp-gateway".into(),
                    secret: "kc-gateway-secret".into(),
                    standard_token_exchange: true,
                    available_audiences: vec!["backend-api".into()],
                    optional_scopes: vec!["backend:read".into()],
                },
                KeycloakClient {
                    client_id: "backend-api".into(),
                    secret: "kc-backend-secret".into(),
                    standard_token_exchange: false,
                    available_audiences: Vec::new(),
                    optional_scopes: Vec::new(),
                },
            ],
            user_client_id: "vscode".into(),
        }
    }
}

/// A running realm.
pub(crate) struct KeycloakState {
    pub(crate) config: KeycloakConfig,
    pub(crate) issuer: String,
    key: SigningKey,
    /// Opaque references handed out for tests → the claims they stand for (`None`: revoked).
    opaque: Mutex<HashMap<String, Option<Map<String, Value>>>>,
}

impl IdpHandle {
    /// The Keycloak realm's issuer (`{base}/realms/{realm}`). Panics without a realm.
    pub fn keycloak_issuer(&self) -> String {
        self.keycloak().issuer.clone()
    }

    fn keycloak(&self) -> &KeycloakState {
        match &self.inner.state.keycloak {
            Some(k) => k,
            None => panic!("the IdP has no Keycloak realm (IdpConfig::keycloak)"),
        }
    }

    /// A Keycloak access token of the realm for the clients in `aud`, with `scope`.
    pub fn mint_keycloak(
        &self,
        sub: &str,
        aud: &[&str],
        scope: &str,
        extra: &Map<String, Value>,
    ) -> anyhow::Result<String> {
        self.keycloak().mint(sub, aud, scope, extra)
    }

    /// An opaque reference to a realm access token like [`Self::mint_keycloak`]'s, readable
    /// only by the realm's introspection (and its token exchange).
    pub fn mint_keycloak_opaque(
        &self,
        sub: &str,
        aud: &[&str],
        scope: &str,
        extra: &Map<String, Value>,
    ) -> String {
        self.keycloak().mint_opaque(sub, aud, scope, extra)
    }
}

/// `extra` over `claims`: a `null` removes a claim.
fn merge(claims: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        if v.is_null() {
            claims.remove(k);
        } else {
            claims.insert(k.clone(), v.clone());
        }
    }
}

/// A Keycloak error: `error` and `error_description`.
struct KcError {
    status: u16,
    error: &'static str,
    description: &'static str,
}

fn kc_error(status: u16, error: &'static str, description: &'static str) -> KcError {
    KcError {
        status,
        error,
        description,
    }
}

impl KeycloakState {
    pub(crate) fn new(config: KeycloakConfig, base_url: &str) -> anyhow::Result<Self> {
        let issuer = format!("{base_url}/realms/{}", config.realm);
        Ok(Self {
            config,
            issuer,
            key: SigningKey::generate()?,
            opaque: Mutex::new(HashMap::new()),
        })
    }

    fn mint_opaque(
        &self,
        sub: &str,
        aud: &[&str],
        scope: &str,
        extra: &Map<String, Value>,
    ) -> String {
        let mut claims = self.claims(sub, aud, scope, &self.config.user_client_id);
        merge(&mut claims, extra);
        let handle = random_b64(32);
        lock(&self.opaque).insert(handle.clone(), Some(claims));
        handle
    }

    /// Revokes an opaque reference; `false` if the realm never handed it out.
    pub(crate) fn revoke(&self, token: &str) -> bool {
        match lock(&self.opaque).get_mut(token) {
            Some(entry) => {
                *entry = None;
                true
            }
            None => false,
        }
    }

    /// The claims of an active token of the realm: an opaque reference, or a signed JWT.
    fn active_claims(&self, token: &str) -> Option<Map<String, Value>> {
        let claims = match lock(&self.opaque).get(token) {
            Some(entry) => entry.clone()?,
            None => {
                let jws = parse_jws(token)?;
                if !self
                    .key
                    .verify(jws.signing_input.as_bytes(), &jws.signature)
                {
                    return None;
                }
                jws.claims
            }
        };
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let ours = claims.get("iss").and_then(Value::as_str) == Some(self.issuer.as_str());
        (ours && exp > now_secs()).then_some(claims)
    }

    /// `POST /realms/{realm}/protocol/openid-connect/token/introspect`: (status, JSON body).
    pub(crate) fn introspect(
        &self,
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> (u16, Value) {
        let param = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Err(e) = self.authenticate(authorization, &param) {
            return (
                e.status,
                json!({"error": e.error, "error_description": e.description}),
            );
        }
        let Some(token) = param("token") else {
            return (
                400,
                json!({"error": "invalid_request", "error_description": "Token not provided."}),
            );
        };
        let Some(mut answer) = self.active_claims(token) else {
            return (200, json!({"active": false}));
        };
        let azp = answer.get("azp").cloned().unwrap_or(Value::Null);
        let username = answer
            .get("preferred_username")
            .cloned()
            .unwrap_or(Value::Null);
        answer.insert("client_id".into(), azp);
        answer.insert("username".into(), username);
        answer.insert("token_type".into(), json!("Bearer"));
        answer.insert("active".into(), json!(true));
        (200, Value::Object(answer))
    }

    /// `/realms/{realm}/protocol/openid-connect/certs`.
    pub(crate) fn certs(&self) -> Value {
        let mut jwk = self.key.jwk().clone();
        if let Some(o) = jwk.as_object_mut() {
            o.insert("use".into(), json!("sig"));
        }
        json!({ "keys": [jwk] })
    }

    /// A realm access token: `aud` these clients, `scope` this string; `extra` overrides
    /// (`null` removes a claim).
    pub(crate) fn mint(
        &self,
        sub: &str,
        aud: &[&str],
        scope: &str,
        extra: &Map<String, Value>,
    ) -> anyhow::Result<String> {
        let mut claims = self.claims(sub, aud, scope, &self.config.user_client_id);
        merge(&mut claims, extra);
        self.sign(&claims)
    }

    fn claims(&self, sub: &str, aud: &[&str], scope: &str, azp: &str) -> Map<String, Value> {
        let now = now_secs();
        let mut c = Map::new();
        for (k, v) in [
            ("exp", json!(now + TOKEN_TTL_SECS)),
            ("iat", json!(now)),
            ("jti", json!(random_b64(12))),
            ("iss", json!(self.issuer)),
            ("aud", json!(aud)),
            ("sub", json!(sub)),
            ("typ", json!("Bearer")),
            ("azp", json!(azp)),
            ("scope", json!(scope)),
            ("preferred_username", json!(sub)),
        ] {
            c.insert(k.into(), v);
        }
        c
    }

    fn sign(&self, claims: &Map<String, Value>) -> anyhow::Result<String> {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.key.kid});
        self.key
            .sign_compact(header.to_string().as_bytes(), &serde_json::to_vec(claims)?)
    }

    /// `POST /realms/{realm}/protocol/openid-connect/token`: (status, JSON body).
    pub(crate) fn token(
        &self,
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> (u16, Value) {
        match self.exchange(authorization, form) {
            Ok(body) => (200, body),
            Err(e) => (
                e.status,
                json!({"error": e.error, "error_description": e.description}),
            ),
        }
    }

    fn exchange(
        &self,
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> Result<Value, KcError> {
        let param = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let client = self.authenticate(authorization, &param)?;
        if param("grant_type") != Some(TOKEN_EXCHANGE_GRANT) {
            return Err(kc_error(
                400,
                "unsupported_grant_type",
                "Unsupported grant_type",
            ));
        }
        if !client.standard_token_exchange {
            return Err(kc_error(
                400,
                "invalid_request",
                "Standard token exchange is not enabled for the requested client",
            ));
        }
        if param("subject_token_type") != Some(ACCESS_TOKEN_TYPE) {
            return Err(kc_error(
                400,
                "invalid_request",
                "Parameter 'subject_token' supports access tokens only",
            ));
        }
        let subject = param("subject_token").unwrap_or_default();
        let (sub, subject_aud) = self.check_subject(subject)?;
        if !subject_aud.iter().any(|a| a == &client.client_id) {
            return Err(kc_error(
                403,
                "access_denied",
                "Client is not within the token audience",
            ));
        }
        let audiences: Vec<&str> = form
            .iter()
            .filter(|(k, _)| k == "audience")
            .map(|(_, v)| v.as_str())
            .collect();
        for a in &audiences {
            if !self.config.clients.iter().any(|c| c.client_id == *a) {
                return Err(kc_error(400, "invalid_client", "Audience not found"));
            }
            if !client.available_audiences.iter().any(|x| x == a) {
                return Err(kc_error(
                    400,
                    "invalid_request",
                    "Requested audience not available",
                ));
            }
        }
        let scopes: Vec<&str> = param("scope")
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .collect();
        if scopes
            .iter()
            .any(|s| !client.optional_scopes.iter().any(|o| o == s))
        {
            return Err(kc_error(400, "invalid_scope", "Invalid scopes"));
        }
        let aud: Vec<&str> = if audiences.is_empty() {
            client
                .available_audiences
                .iter()
                .map(String::as_str)
                .collect()
        } else {
            audiences
        };
        let scope = scopes.join(" ");
        let claims = self.claims(&sub, &aud, &scope, &client.client_id);
        let token = self
            .sign(&claims)
            .map_err(|_| kc_error(500, "server_error", "signing failed"))?;
        Ok(json!({"access_token": token, "expires_in": TOKEN_TTL_SECS,
                  "refresh_expires_in": 0, "token_type": "Bearer", "not-before-policy": 0,
                  "session_state": random_b64(8), "scope": scope,
                  "issued_token_type": ACCESS_TOKEN_TYPE}))
    }

    /// The subject token must be this realm's, signed, unexpired: its `sub` and `aud`.
    fn check_subject(&self, token: &str) -> Result<(String, Vec<String>), KcError> {
        let invalid = || kc_error(400, "invalid_request", "Invalid token");
        let c = &self.active_claims(token).ok_or_else(invalid)?;
        let aud = match c.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let sub = c.get("sub").and_then(Value::as_str).ok_or_else(invalid)?;
        Ok((sub.to_string(), aud))
    }

    fn authenticate<'f>(
        &self,
        authorization: Option<&str>,
        param: &impl Fn(&str) -> Option<&'f str>,
    ) -> Result<&KeycloakClient, KcError> {
        let basic = authorization
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|pair| {
                let (id, secret) = pair.split_once(':')?;
                let decode = |s: &str| -> String {
                    form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                Some((decode(id), decode(secret)))
            });
        let (id, secret) = match (basic, param("client_id"), param("client_secret")) {
            (Some(pair), _, None) => pair,
            (None, Some(id), Some(secret)) => (id.to_string(), secret.to_string()),
            _ => {
                return Err(kc_error(
                    401,
                    "invalid_client",
                    "Invalid client or Invalid client credentials",
                ))
            }
        };
        self.config
            .clients
            .iter()
            .find(|c| c.client_id == id && c.secret == secret)
            .ok_or_else(|| {
                kc_error(
                    401,
                    "invalid_client",
                    "Invalid client or Invalid client credentials",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realm() -> KeycloakState {
        KeycloakState::new(KeycloakConfig::default(), "http://kc.test").expect("keygen")
    }

    type Form = Vec<(String, String)>;

    fn exchange_form(subject: &str, extra: &[(&str, &str)]) -> Form {
        let mut form: Form = [
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("client_id", "mcp-gateway"),
            ("client_secret", "kc-gateway-secret"),
            ("subject_token", subject),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            form.retain(|(name, _)| name != k);
            form.push((k.to_string(), v.to_string()));
        }
        form
    }

    fn user(r: &KeycloakState, aud: &[&str]) -> String {
        r.mint("alice", aud, "openid mcp:tools:call", &Map::new())
            .expect("mint")
    }

    fn error_of(answer: &(u16, Value)) -> (u16, String, String) {
        let (status, body) = answer;
        let s = |k: &str| body[k].as_str().unwrap_or("").to_string();
        (*status, s("error"), s("error_description"))
    }

    #[test]
    fn realm_tokens_and_keys_have_keycloaks_shape() {
        let r = realm();
        let jws = parse_jws(&user(&r, &["mcp-gateway"])).expect("jws");
        assert_eq!(jws.header["typ"], "JWT");
        assert_eq!(jws.claims["iss"], "http://kc.test/realms/mcp");
        assert_eq!(jws.claims["typ"], "Bearer");
        assert!(jws.claims["scope"].is_string() && jws.claims.contains_key("azp"));
        assert_eq!(r.certs()["keys"][0]["use"], "sig");
    }

    #[test]
    fn standard_token_exchange_narrows_to_the_requested_client_audience() {
        let r = realm();
        let subject = user(&r, &["mcp-gateway"]);
        let form = exchange_form(
            &subject,
            &[("audience", "backend-api"), ("scope", "backend:read")],
        );
        let (status, body) = r.token(None, &form);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
        assert_eq!(body["token_type"], "Bearer");
        let issued = parse_jws(body["access_token"].as_str().unwrap_or("")).expect("jws");
        assert_eq!(issued.claims["aud"], json!(["backend-api"]));
        assert_eq!(issued.claims["azp"], "mcp-gateway");
        assert_eq!(issued.claims["sub"], "alice");
        assert_eq!(issued.claims["scope"], "backend:read");
        // HTTP Basic works too.
        let mut form = exchange_form(&subject, &[("audience", "backend-api")]);
        form.retain(|(k, _)| k != "client_id" && k != "client_secret");
        let basic = format!("Basic {}", STANDARD.encode("mcp-gateway:kc-gateway-secret"));
        assert_eq!(r.token(Some(&basic), &form).0, 200);
    }

    fn introspect(r: &KeycloakState, token: &str) -> (u16, Value) {
        let basic = format!("Basic {}", STANDARD.encode("mcp-gateway:kc-gateway-secret"));
        r.introspect(Some(&basic), &[("token".to_string(), token.to_string())])
    }

    #[test]
    fn introspection_answers_with_the_tokens_claims_for_opaque_and_jwt_tokens() {
        let r = realm();
        let handle = r.mint_opaque(
            "alice",
            &["mcp-gateway", "account"],
            "openid mcp:tools:call",
            &Map::new(),
        );
        assert!(!handle.contains('.'));
        for token in [handle.clone(), user(&r, &["mcp-gateway", "account"])] {
            let (status, a) = introspect(&r, &token);
            assert_eq!(status, 200, "{a}");
            assert_eq!(a["active"], true);
            assert_eq!(a["aud"], json!(["mcp-gateway", "account"]));
            assert_eq!(
                (a["client_id"].as_str(), a["azp"].as_str()),
                (Some("vscode"), Some("vscode"))
            );
            assert_eq!(
                (a["username"].as_str(), a["sub"].as_str()),
                (Some("alice"), Some("alice"))
            );
            assert_eq!(a["scope"], "openid mcp:tools:call");
            assert_eq!(
                (a["typ"].as_str(), a["token_type"].as_str()),
                (Some("Bearer"), Some("Bearer"))
            );
            assert_eq!(a["iss"], "http://kc.test/realms/mcp");
        }
        // Client secret in the form works too.
        let form = [
            ("token", handle.as_str()),
            ("client_id", "mcp-gateway"),
            ("client_secret", "kc-gateway-secret"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(r.introspect(None, &form).1["active"], true);
        // An opaque reference is a subject token of the exchange.
        let (status, body) = r.token(
            None,
            &exchange_form(&handle, &[("audience", "backend-api")]),
        );
        assert_eq!(status, 200, "{body}");
    }

    #[test]
    fn introspection_says_inactive_and_nothing_else_or_refuses_the_caller() {
        let r = realm();
        let revoked = r.mint_opaque("alice", &["mcp-gateway"], "openid", &Map::new());
        assert!(r.revoke(&revoked));
        assert!(!r.revoke("never"));
        let expired = r
            .mint(
                "alice",
                &["mcp-gateway"],
                "openid",
                &json!({"exp": now_secs() - 1})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )
            .expect("mint");
        let other_realm = realm()
            .mint("alice", &["mcp-gateway"], "openid", &Map::new())
            .expect("mint");
        for (what, token) in [
            ("revoked", revoked.as_str()),
            ("expired", &expired),
            ("other key", &other_realm),
            ("unknown", "nope"),
        ] {
            assert_eq!(
                introspect(&r, token),
                (200, json!({"active": false})),
                "{what}"
            );
        }
        let good = r.mint_opaque("alice", &["mcp-gateway"], "openid", &Map::new());
        assert_eq!(
            r.token(None, &exchange_form(&revoked, &[])).0,
            400,
            "revoked subject token"
        );
        let wrong = format!("Basic {}", STANDARD.encode("mcp-gateway:wrong"));
        for auth in [Some(wrong.as_str()), None] {
            let (status, body) = r.introspect(auth, &[("token".to_string(), good.clone())]);
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("invalid_client")),
                "{auth:?}"
            );
            assert!(body.get("active").is_none());
        }
    }

    #[test]
    fn documented_refusals() {
        let r = realm();
        let good = user(&r, &["mcp-gateway"]);
        let not_for_gateway = user(&r, &["other-client"]);
        let cases: Vec<(Form, (u16, &str, &str))> = vec![
            (
                exchange_form(&not_for_gateway, &[]),
                (
                    403,
                    "access_denied",
                    "Client is not within the token audience",
                ),
            ),
            (
                exchange_form(&good, &[("audience", "nobody")]),
                (400, "invalid_client", "Audience not found"),
            ),
            (
                exchange_form(&good, &[("audience", "mcp-gateway")]),
                (400, "invalid_request", "Requested audience not available"),
            ),
            (
                exchange_form(&good, &[("scope", "admin")]),
                (400, "invalid_scope", "Invalid scopes"),
            ),
            (
                exchange_form("not-a-token", &[]),
                (400, "invalid_request", "Invalid token"),
            ),
            (
                exchange_form(
                    &good,
                    &[(
                        "subject_token_type",
                        "urn:ietf:params:oauth:token-type:id_token",
                    )],
                ),
                (
                    400,
                    "invalid_request",
                    "Parameter 'subject_token' supports access tokens only",
                ),
            ),
            (
                exchange_form(&good, &[("client_secret", "wrong")]),
                (
                    401,
                    "invalid_client",
                    "Invalid client or Invalid client credentials",
                ),
            ),
        ];
        for (form, (status, error, description)) in cases {
            let got = error_of(&r.token(None, &form));
            assert_eq!(
                got,
                (status, error.to_string(), description.to_string()),
                "{form:?}"
            );
        }
        // Standard token exchange switched off for the requester.
        let mut config = KeycloakConfig::default();
        config.clients[0].standard_token_exchange = false;
        let off = KeycloakState::new(config, "http://kc.test").expect("keygen");
        let subject = off
            .mint("alice", &["mcp-gateway"], "openid", &Map::new())
            .expect("mint");
        let (status, body) = off.token(None, &exchange_form(&subject, &[]));
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request"))
        );
    }
}
