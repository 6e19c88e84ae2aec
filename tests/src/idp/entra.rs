//! Entra ID mode: one tenant of the Microsoft identity platform (v2 endpoints), as Microsoft
//! documents it — not as the filter happens to use it:
//!
//! - `GET /{tenant}/discovery/v2.0/keys`: the tenant's signing keys, `use: "sig"`, with `issuer`
//!   (no `x5c`/`x5t`: the test IdP has no certificates);
//! - v2 access tokens for the gateway's API ([`IdpHandle::mint_entra`](super::IdpHandle)):
//!   header `typ: JWT`, `iss` = `{base}/{tenant}/v2.0`, `aud` = the API's client id, `scp` a
//!   space-separated string, `azp` the calling app, `oid`, `tid`, `ver: "2.0"`;
//! - `POST /{tenant}/oauth2/v2.0/token` with the on-behalf-of grant
//!   (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, `assertion`,
//!   `requested_token_use=on_behalf_of`, `scope` such as `api://backend/.default`), the client
//!   authenticated by secret (in the form or HTTP Basic); RFC 8693's token-exchange grant is
//!   refused with `unsupported_grant_type` (AADSTS70003);
//! - errors in Entra's shape: `error`, `error_description` starting `AADSTSnnnn:`, `error_codes`,
//!   `timestamp`, `trace_id`, `correlation_id`, plus `suberror` and `claims` where documented:
//!   no admin consent → `invalid_grant` 65001 (`suberror: consent_required`); MFA by Conditional
//!   Access → `interaction_required` 50079 with a claims challenge; a bad or foreign assertion
//!   → `invalid_grant` 50013; an expired one → `invalid_grant` 500133; an unknown scope →
//!   `invalid_scope` 70011; a wrong secret → `invalid_client` 7000215.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::keys::{parse_jws, random_b64, SigningKey};
use super::{now_secs, ClientConfig, IdpHandle, TOKEN_EXCHANGE_GRANT};

/// The RFC 7523 JWT bearer grant, which Entra ID's on-behalf-of flow uses.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of the tokens this tenant issues (Entra's default is 60–90 minutes).
const TOKEN_TTL_SECS: i64 = 3600;
/// The claims challenge Conditional Access sends when MFA is required (capolids of one policy).
pub const MFA_CLAIMS_CHALLENGE: &str =
    r#"{"access_token":{"capolids":{"essential":true,"values":["mfa-policy-1"]}}}"#;

/// One Entra ID tenant.
#[derive(Clone, Debug)]
pub struct EntraConfig {
    /// Tenant id (a GUID in Entra; any path segment here).
    pub tenant: String,
    /// Client id of the gateway's app registration: `aud` of user tokens, and the client that
    /// must present them as OBO assertions.
    pub api_client_id: String,
    /// Application ID URI of the backend API (`api://backend`): OBO `scope`s are under it.
    pub backend_app_id_uri: String,
    /// Client id of the backend API: `aud` of the tokens OBO issues.
    pub backend_client_id: String,
    /// Delegated scopes the backend API exposes (`.default` asks for all of them).
    pub backend_scopes: Vec<String>,
    /// Whether an admin consented to the gateway calling the backend API.
    pub admin_consented: bool,
    /// Users whom Conditional Access sends back for MFA.
    pub mfa_required_subs: Vec<String>,
    /// `azp` of minted user tokens (the MCP client's app).
    pub user_client_id: String,
}

impl Default for EntraConfig {
    fn default() -> Self {
        Self {
            tenant: "11111111-2222-3333-4444-555555555555".into(),
            api_client_id: "aaaaaaaa-0000-0000-0000-00000000mcp1".into(),
            backend_app_id_uri: "api://backend".into(),
            backend_client_id: "bbbbbbbb-0000-0000-0000-0000backend".into(),
            backend_scopes: vec!["backend.read".into()],
            admin_consented: true,
            mfa_required_subs: Vec::new(),
            user_client_id: "cccccccc-0000-0000-0000-00mcpclient".into(),
        }
    }
}

/// A running tenant: its configuration, issuer and key.
pub(crate) struct EntraState {
    pub(crate) config: EntraConfig,
    pub(crate) issuer: String,
    pub(crate) key: SigningKey,
}

impl IdpHandle {
    /// The Entra ID tenant's issuer (`{base}/{tenant}/v2.0`). Panics without an Entra tenant.
    pub fn entra_issuer(&self) -> String {
        self.entra().issuer.clone()
    }

    fn entra(&self) -> &EntraState {
        match &self.inner.state.entra {
            Some(e) => e,
            None => panic!("the IdP has no Entra ID tenant (IdpConfig::entra)"),
        }
    }

    /// An Entra ID v2 user token for the gateway's API: `scp` as given (space-separated);
    /// `extra` claims override the defaults (`null` removes one).
    pub fn mint_entra(
        &self,
        sub: &str,
        scp: &str,
        extra: &Map<String, Value>,
    ) -> anyhow::Result<String> {
        let e = self.entra();
        e.sign_v2(e.user_claims(sub, scp, extra))
    }
}

/// An error in Entra's JSON shape.
struct EntraError {
    status: u16,
    error: &'static str,
    code: u64,
    message: &'static str,
    suberror: Option<&'static str>,
    claims: Option<&'static str>,
}

impl EntraError {
    fn new(status: u16, error: &'static str, code: u64, message: &'static str) -> Self {
        Self {
            status,
            error,
            code,
            message,
            suberror: None,
            claims: None,
        }
    }

    fn body(&self) -> Value {
        let trace = random_b64(8);
        let mut body = json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {}\r\nTrace ID: {trace}\r\nCorrelation ID: {trace}\r\nTimestamp: now",
                self.code, self.message
            ),
            "error_codes": [self.code],
            "timestamp": "2026-12-05 00:00:00Z",
            "trace_id": trace,
            "correlation_id": trace,
            "error_uri": "https://login.microsoftonline.com/error",
        });
        if let Some(s) = self.suberror {
            body["suberror"] = json!(s);
        }
        if let Some(c) = self.claims {
            body["claims"] = json!(c);
        }
        body
    }
}

impl EntraState {
    pub(crate) fn new(config: EntraConfig, base_url: &str) -> anyhow::Result<Self> {
        let issuer = format!("{base_url}/{}/v2.0", config.tenant);
        Ok(Self {
            config,
            issuer,
            key: SigningKey::generate()?,
        })
    }

    /// `/{tenant}/discovery/v2.0/keys`.
    pub(crate) fn jwks(&self) -> Value {
        let mut jwk = self.key.jwk().clone();
        if let Some(o) = jwk.as_object_mut() {
            o.remove("alg");
            o.insert("use".into(), json!("sig"));
            o.insert("issuer".into(), json!(self.issuer));
        }
        json!({ "keys": [jwk] })
    }

    /// A v2 access token with these claims over the documented defaults (`null` removes one).
    pub(crate) fn sign_v2(&self, claims: Map<String, Value>) -> anyhow::Result<String> {
        let header = json!({"typ": "JWT", "alg": "RS256", "kid": self.key.kid});
        self.key
            .sign_compact(header.to_string().as_bytes(), &serde_json::to_vec(&claims)?)
    }

    /// The claims of a user token for the gateway's API.
    pub(crate) fn user_claims(
        &self,
        sub: &str,
        scp: &str,
        extra: &Map<String, Value>,
    ) -> Map<String, Value> {
        let now = now_secs();
        let mut c = json!({
            "aud": self.config.api_client_id, "iss": self.issuer, "iat": now, "nbf": now,
            "exp": now + TOKEN_TTL_SECS, "azp": self.config.user_client_id, "azpacr": "0",
            "name": sub, "oid": object_id(sub), "preferred_username": sub,
            "scp": scp, "sub": sub, "tid": self.config.tenant, "uti": random_b64(12),
            "ver": "2.0"
        });
        let map = c.as_object_mut().map(std::mem::take).unwrap_or_default();
        let mut map = map;
        for (k, v) in extra {
            if v.is_null() {
                map.remove(k);
            } else {
                map.insert(k.clone(), v.clone());
            }
        }
        map
    }

    /// `POST /{tenant}/oauth2/v2.0/token`: (status, JSON body).
    pub(crate) fn token(
        &self,
        clients: &[ClientConfig],
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> (u16, Value) {
        match self.on_behalf_of(clients, authorization, form) {
            Ok(body) => (200, body),
            Err(e) => (e.status, e.body()),
        }
    }

    fn on_behalf_of(
        &self,
        clients: &[ClientConfig],
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> Result<Value, EntraError> {
        let param = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let client_id = authenticate(clients, authorization, &param)?;
        match param("grant_type") {
            Some(JWT_BEARER_GRANT) => {}
            Some(TOKEN_EXCHANGE_GRANT) | Some(_) => {
                return Err(EntraError::new(
                    400,
                    "unsupported_grant_type",
                    70003,
                    "The app requested an unsupported grant type.",
                ))
            }
            None => return Err(missing("grant_type")),
        }
        if param("requested_token_use") != Some("on_behalf_of") {
            return Err(EntraError::new(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'requested_token_use'.",
            ));
        }
        let assertion = param("assertion").ok_or_else(|| missing("assertion"))?;
        let sub = self.check_assertion(assertion, &client_id)?;
        let scopes = self.requested_scopes(param("scope").ok_or_else(|| missing("scope"))?)?;
        if !self.config.admin_consented {
            return Err(EntraError {
                suberror: Some("consent_required"),
                ..EntraError::new(
                    400,
                    "invalid_grant",
                    65001,
                    "The user or administrator has not consented to use the application.",
                )
            });
        }
        if self.config.mfa_required_subs.iter().any(|s| s == &sub) {
            return Err(EntraError {
                suberror: Some("basic_action"),
                claims: Some(MFA_CLAIMS_CHALLENGE),
                ..EntraError::new(
                    400,
                    "interaction_required",
                    50079,
                    "Due to a configuration change made by your administrator, you must enroll in multi-factor authentication.",
                )
            });
        }
        let now = now_secs();
        let mut claims = self.user_claims(&sub, &scopes.join(" "), &Map::new());
        claims.insert("aud".into(), json!(self.config.backend_client_id));
        claims.insert("azp".into(), json!(client_id));
        claims.insert("iat".into(), json!(now));
        let token = self.sign_v2(claims).map_err(|_| server_error())?;
        Ok(json!({"token_type": "Bearer", "scope": scopes.iter()
                      .map(|s| format!("{}/{s}", self.config.backend_app_id_uri))
                      .collect::<Vec<_>>().join(" "),
                  "expires_in": TOKEN_TTL_SECS, "ext_expires_in": TOKEN_TTL_SECS,
                  "access_token": token}))
    }

    /// The assertion must be this tenant's token, unexpired, issued for the calling client.
    /// Its subject, if so.
    fn check_assertion(&self, assertion: &str, client_id: &str) -> Result<String, EntraError> {
        let bad = || {
            EntraError::new(
                400,
                "invalid_grant",
                50013,
                "Assertion failed signature validation.",
            )
        };
        let jws = parse_jws(assertion).ok_or_else(bad)?;
        if !self
            .key
            .verify(jws.signing_input.as_bytes(), &jws.signature)
        {
            return Err(bad());
        }
        let claim = |name: &str| jws.claims.get(name).and_then(Value::as_str);
        if claim("iss") != Some(self.issuer.as_str()) || claim("aud") != Some(client_id) {
            return Err(bad());
        }
        let exp = jws.claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        if exp <= now_secs() {
            return Err(EntraError::new(
                400,
                "invalid_grant",
                500133,
                "Assertion is not within its valid time range.",
            ));
        }
        claim("sub").map(str::to_string).ok_or_else(bad)
    }

    /// `api://backend/.default` (every exposed scope) or `api://backend/{scope}`s.
    fn requested_scopes(&self, scope: &str) -> Result<Vec<String>, EntraError> {
        let prefix = format!("{}/", self.config.backend_app_id_uri);
        let invalid = || {
            EntraError::new(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid.",
            )
        };
        let mut out = Vec::new();
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            match s.strip_prefix(&prefix) {
                Some(".default") => out.extend(self.config.backend_scopes.iter().cloned()),
                Some(name) if self.config.backend_scopes.iter().any(|b| b == name) => {
                    out.push(name.to_string())
                }
                _ => return Err(invalid()),
            }
        }
        if out.is_empty() {
            return Err(invalid());
        }
        Ok(out)
    }
}

/// The client: secret in the form (`client_id` + `client_secret`) or HTTP Basic.
fn authenticate<'f>(
    clients: &[ClientConfig],
    authorization: Option<&str>,
    param: &impl Fn(&str) -> Option<&'f str>,
) -> Result<String, EntraError> {
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
            return Err(EntraError::new(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ))
        }
    };
    match clients.iter().find(|c| c.client_id == id) {
        Some(c) if !c.client_secret.is_empty() && c.client_secret == secret => Ok(id),
        _ => Err(EntraError::new(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        )),
    }
}

fn missing(name: &'static str) -> EntraError {
    let message = match name {
        "grant_type" => "The request body must contain the following parameter: 'grant_type'.",
        "assertion" => "The request body must contain the following parameter: 'assertion'.",
        _ => "The request body must contain the following parameter: 'scope'.",
    };
    EntraError::new(400, "invalid_request", 900144, message)
}

fn server_error() -> EntraError {
    EntraError::new(
        500,
        "server_error",
        90033,
        "A transient error has occurred.",
    )
}

/// A stable object id per user (a GUID in Entra).
fn object_id(sub: &str) -> String {
    let h = super::user_id_for(sub);
    format!(
        "00000000-0000-0000-0000-{:0>12}",
        &h[h.len().saturating_sub(12)..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(config: EntraConfig) -> EntraState {
        EntraState::new(config, "http://idp.test").expect("keygen")
    }

    fn gateway() -> Vec<ClientConfig> {
        vec![ClientConfig {
            client_id: EntraConfig::default().api_client_id,
            client_secret: "gw-secret".into(),
            token_exchange_enabled: true,
            jwks: None,
        }]
    }

    type Form = Vec<(String, String)>;

    fn obo_form(assertion: &str, scope: &str) -> Form {
        let id = EntraConfig::default().api_client_id;
        [
            ("grant_type", JWT_BEARER_GRANT),
            ("client_id", id.as_str()),
            ("client_secret", "gw-secret"),
            ("assertion", assertion),
            ("scope", scope),
            ("requested_token_use", "on_behalf_of"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn user_token(t: &EntraState, sub: &str) -> String {
        t.sign_v2(t.user_claims(sub, "mcp.call", &Map::new()))
            .expect("sign")
    }

    fn error_of(answer: &(u16, Value)) -> (u16, &str, u64) {
        let (status, body) = answer;
        let code = body["error_codes"][0].as_u64().unwrap_or(0);
        (*status, body["error"].as_str().unwrap_or(""), code)
    }

    #[test]
    fn user_tokens_have_the_v2_shape() {
        let t = tenant(EntraConfig::default());
        let token = user_token(&t, "ann@contoso.example");
        let jws = parse_jws(&token).expect("jws");
        assert_eq!(jws.header["typ"], "JWT");
        assert_eq!(
            jws.claims["iss"],
            "http://idp.test/11111111-2222-3333-4444-555555555555/v2.0"
        );
        assert_eq!(jws.claims["ver"], "2.0");
        assert!(
            jws.claims["scp"].is_string(),
            "scp is a space-separated string"
        );
        assert!(jws.claims.contains_key("azp") && jws.claims.contains_key("oid"));
        let keys = t.jwks();
        assert_eq!(keys["keys"][0]["use"], "sig");
        assert_eq!(keys["keys"][0]["kid"], jws.header["kid"]);
    }

    #[test]
    fn on_behalf_of_issues_a_backend_token_for_the_same_user() {
        let t = tenant(EntraConfig::default());
        let user = user_token(&t, "ann@contoso.example");
        let (status, body) = t.token(&gateway(), None, &obo_form(&user, "api://backend/.default"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "api://backend/backend.read");
        let issued = parse_jws(body["access_token"].as_str().unwrap_or("")).expect("jws");
        assert_eq!(
            issued.claims["aud"],
            EntraConfig::default().backend_client_id
        );
        assert_eq!(issued.claims["sub"], "ann@contoso.example");
        assert_eq!(issued.claims["scp"], "backend.read");
        // Basic authentication works too.
        let mut form = obo_form(&user, "api://backend/backend.read");
        form.retain(|(k, _)| k != "client_id" && k != "client_secret");
        let basic = format!(
            "Basic {}",
            STANDARD.encode(format!(
                "{}:gw-secret",
                EntraConfig::default().api_client_id
            ))
        );
        assert_eq!(t.token(&gateway(), Some(&basic), &form).0, 200);
    }

    #[test]
    fn documented_errors() {
        let t = tenant(EntraConfig::default());
        let user = user_token(&t, "ann@contoso.example");
        let with = |f: &dyn Fn(&mut Form)| {
            let mut form = obo_form(&user, "api://backend/.default");
            f(&mut form);
            t.token(&gateway(), None, &form)
        };
        let set = |name: &'static str, value: &'static str| {
            move |form: &mut Form| {
                form.retain(|(k, _)| k != name);
                form.push((name.into(), value.into()));
            }
        };
        assert_eq!(
            error_of(&with(&set("grant_type", TOKEN_EXCHANGE_GRANT))),
            (400, "unsupported_grant_type", 70003)
        );
        assert_eq!(
            error_of(&with(&set("scope", "api://other/.default"))),
            (400, "invalid_scope", 70011)
        );
        assert_eq!(
            error_of(&with(&set("client_secret", "wrong"))),
            (401, "invalid_client", 7000215)
        );
        assert_eq!(
            error_of(&with(&set("assertion", "not.a.token"))),
            (400, "invalid_grant", 50013)
        );
        assert_eq!(
            error_of(&with(&set("requested_token_use", "other"))).1,
            "invalid_request"
        );
        // A token for another audience is no assertion for this client.
        let mut other = t.user_claims("ann", "mcp.call", &Map::new());
        other.insert("aud".into(), json!("someone-else"));
        let foreign = t.sign_v2(other).expect("sign");
        let answer = t.token(
            &gateway(),
            None,
            &obo_form(&foreign, "api://backend/.default"),
        );
        assert_eq!(error_of(&answer), (400, "invalid_grant", 50013));
        let mut old = t.user_claims("ann", "mcp.call", &Map::new());
        old.insert("exp".into(), json!(now_secs() - 10));
        let expired = t.sign_v2(old).expect("sign");
        let answer = t.token(
            &gateway(),
            None,
            &obo_form(&expired, "api://backend/.default"),
        );
        assert_eq!(error_of(&answer), (400, "invalid_grant", 500133));
        assert!(answer.1["error_description"]
            .as_str()
            .is_some_and(|d| d.starts_with("AADSTS500133: ")));
    }

    #[test]
    fn consent_and_conditional_access_are_the_users_or_admins_to_fix() {
        let no_consent = tenant(EntraConfig {
            admin_consented: false,
            ..EntraConfig::default()
        });
        let user = user_token(&no_consent, "ann");
        let answer = no_consent.token(&gateway(), None, &obo_form(&user, "api://backend/.default"));
        assert_eq!(error_of(&answer), (400, "invalid_grant", 65001));
        assert_eq!(answer.1["suberror"], "consent_required");

        let mfa = tenant(EntraConfig {
            mfa_required_subs: vec!["bob".into()],
            ..EntraConfig::default()
        });
        let bob = user_token(&mfa, "bob");
        let answer = mfa.token(&gateway(), None, &obo_form(&bob, "api://backend/.default"));
        assert_eq!(error_of(&answer), (400, "interaction_required", 50079));
        assert_eq!(answer.1["claims"], MFA_CLAIMS_CHALLENGE);
        let ann = user_token(&mfa, "ann");
        assert_eq!(
            mfa.token(&gateway(), None, &obo_form(&ann, "api://backend/.default"))
                .0,
            200
        );
    }
}
