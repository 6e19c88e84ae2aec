//! An Okta-compatible identity provider for the end-to-end suite and the demo.
//!
//! It models what Okta documents for custom authorization servers and the OAuth 2.0
//! On-Behalf-Of Token Exchange (RFC 8693):
//!
//! - one or more authorization servers (AS), each at `{base}/oauth2/{as_id}` with its own
//!   RSA-2048 key (RS256, random `kid`), `GET /v1/keys`, `GET /.well-known/oauth-authorization-server`,
//!   `GET /.well-known/openid-configuration` and `POST /v1/token`;
//! - access tokens shaped like Okta's: header `{"kid","alg":"RS256"}` (no `typ`), claims `ver`,
//!   `jti`, `iss`, `aud` (string), `iat`, `exp`, `cid`, `uid`, `scp` (array), `sub`;
//! - the token-exchange grant with Okta's rules (trusted servers, exact `audience`, custom scopes
//!   only, per-client exchange policy) and its error codes, as RFC 6749 §5.2 JSON;
//! - client authentication with a secret (`client_secret_basic`, `client_secret_post`) or a
//!   signed client assertion (`private_key_jwt`, RFC 7523: RS256 or ES256, Okta's claim rules,
//!   `jti` replay refused), and optionally RFC 8693 actor tokens (off by default, as in Okta);
//! - RFC 7662 introspection (`POST /v1/introspect`) of opaque access tokens tests issue and
//!   revoke (see `introspect`);
//! - fault injection per endpoint (delay, status, connection reset, malformed body, verbatim
//!   answer), request counters, and the last token request as received, for tests;
//! - a test-only admin API under `/__admin/` (mint, stats, faults, key rotation).
//!
//! Tests use it in-process through [`start`] and [`IdpHandle`]; the `okta-idp` binary serves the
//! same thing for `make run` and humans.

mod client_jwt;
mod entra;
mod introspect;
mod keycloak;
mod keys;
mod server;
mod token;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rsa::sha2::{Digest as _, Sha256};
use serde_json::{Map, Value};

use client_jwt::ClientKeys;
use keys::SigningKey;

pub use client_jwt::{
    client_jwt_claims, ClientKeyAlg, ClientSigningKey, CLIENT_ASSERTION_TYPE, JWT_TOKEN_TYPE,
    MAX_ASSERTION_LIFETIME_SECS,
};
pub use entra::{EntraConfig, JWT_BEARER_GRANT, MFA_CLAIMS_CHALLENGE};
pub use keycloak::{KeycloakClient, KeycloakConfig};

/// `grant_type` of RFC 8693 token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The only `subject_token_type` (and `issued_token_type`) of Okta's on-behalf-of exchange.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// One Okta custom authorization server.
#[derive(Clone, Debug)]
pub struct AuthServerConfig {
    /// Path segment: the AS lives at `{base}/oauth2/{id}`.
    pub id: String,
    /// The AS's configured audience: `aud` of its tokens, and the only `audience` accepted in an
    /// exchange at this AS.
    pub audience: String,
    /// Custom scopes the AS defines.
    pub scopes: Vec<String>,
    /// Ids of other authorization servers whose access tokens this one accepts as subject tokens
    /// ("trusted servers" in Okta). An AS always accepts its own tokens.
    pub trusted_servers: Vec<String>,
    /// Token-exchange access policies: which client may get which scopes here.
    pub exchange_policies: Vec<ExchangePolicy>,
}

/// An access-policy rule for the token-exchange grant: `client_id` may obtain any subset of
/// `scopes` from the AS that holds it.
#[derive(Clone, Debug)]
pub struct ExchangePolicy {
    pub client_id: String,
    pub scopes: Vec<String>,
}

/// A confidential client (an Okta "API Services" app) authenticating with id + secret, or with
/// a client assertion signed by one of its registered keys (`private_key_jwt`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub client_id: String,
    /// Empty = the client has no secret: secret authentication is refused.
    pub client_secret: String,
    /// Whether the Token Exchange grant is enabled for the app (else `unauthorized_client`).
    pub token_exchange_enabled: bool,
    /// Public keys (a JWK Set, `{"keys": [...]}`: RSA ≥ 2048 bits for RS256, EC P-256 for ES256)
    /// that verify the client's `private_key_jwt` assertions and actor tokens. `None` = the client
    /// cannot use them. Checked when the IdP starts.
    pub jwks: Option<Value>,
}

/// Everything the IdP serves. [`Default`] is the reference setup: ASes `mcp` and `backend`,
/// client `gateway-client` / `gateway-secret`.
#[derive(Clone, Debug)]
pub struct IdpConfig {
    pub authorization_servers: Vec<AuthServerConfig>,
    pub clients: Vec<ClientConfig>,
    /// `expires_in` of exchanged tokens (and their `exp - iat`). Default 3600.
    pub exchange_ttl_secs: i64,
    /// Leave `issued_token_type` out of the exchange response, as some IdPs do.
    pub omit_issued_token_type: bool,
    /// `Cache-Control: max-age` of `/v1/keys` and the metadata documents. Default 86400.
    pub keys_max_age_secs: u64,
    /// Base URL that issuers and metadata use instead of `http://{listen address}` (for a
    /// gateway that reaches the IdP under another name). No trailing slash needed.
    pub public_base_url: Option<String>,
    /// `cid` of the user tokens [`IdpHandle::mint`] makes (the MCP client's app id).
    pub user_client_id: String,
    /// Accept RFC 8693 `actor_token` (type `urn:ietf:params:oauth:token-type:jwt`, signed by the
    /// authenticated client's registered key, `iss` = `sub` = client id, `aud` = the token
    /// endpoint) and put `"act": {"sub": client_id}` in the issued token. Default `false`:
    /// Okta's on-behalf-of exchange refuses actor tokens with `invalid_request`.
    pub accept_actor_tokens: bool,
    /// One line per request on stderr (never tokens or secrets).
    pub log_requests: bool,
    /// Also serve one Entra ID tenant (v2 endpoints under `/{tenant}/`, see `entra`).
    pub entra: Option<EntraConfig>,
    /// Also serve one Keycloak realm (under `/realms/{realm}/`, see `keycloak`).
    pub keycloak: Option<KeycloakConfig>,
}

impl Default for IdpConfig {
    fn default() -> Self {
        Self::reference("gateway-client", "gateway-secret")
    }
}

impl IdpConfig {
    /// The reference setup with the gateway client's id and secret chosen by the caller.
    pub fn reference(client_id: &str, client_secret: &str) -> Self {
        Self {
            authorization_servers: vec![
                AuthServerConfig {
                    id: "mcp".into(),
                    audience: "mcpserver".into(),
                    scopes: vec!["mcp:tools:call".into(), "mcp:tools:admin".into()],
                    trusted_servers: vec![],
                    exchange_policies: vec![],
                },
                AuthServerConfig {
                    id: "backend".into(),
                    audience: "backend".into(),
                    scopes: vec![
                        "backend-api:read".into(),
                        "backend-api:write".into(),
                        "backend-api:admin".into(),
                    ],
                    trusted_servers: vec!["mcp".into()],
                    exchange_policies: vec![ExchangePolicy {
                        client_id: client_id.into(),
                        scopes: vec!["backend-api:read".into(), "backend-api:write".into()],
                    }],
                },
            ],
            clients: vec![ClientConfig {
                client_id: client_id.into(),
                client_secret: client_secret.into(),
                token_exchange_enabled: true,
                jwks: None,
            }],
            exchange_ttl_secs: 3600,
            omit_issued_token_type: false,
            keys_max_age_secs: 86400,
            public_base_url: None,
            user_client_id: "mcp-client".into(),
            accept_actor_tokens: false,
            log_requests: true,
            entra: None,
            keycloak: None,
        }
    }

    /// The authorization server with this id, to adjust it.
    pub fn server_mut(&mut self, id: &str) -> Option<&mut AuthServerConfig> {
        self.authorization_servers.iter_mut().find(|s| s.id == id)
    }

    /// The client with this id, to adjust it.
    pub fn client_mut(&mut self, client_id: &str) -> Option<&mut ClientConfig> {
        self.clients.iter_mut().find(|c| c.client_id == client_id)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.authorization_servers.is_empty() {
            bail!("no authorization servers configured");
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.authorization_servers {
            if s.id.is_empty() || s.id.contains('/') {
                bail!("invalid authorization server id {:?}", s.id);
            }
            if !seen.insert(s.id.as_str()) {
                bail!("authorization server {:?} configured twice", s.id);
            }
        }
        for s in &self.authorization_servers {
            for t in &s.trusted_servers {
                if !seen.contains(t.as_str()) {
                    bail!(
                        "authorization server {:?} trusts unknown server {t:?}",
                        s.id
                    );
                }
            }
        }
        if self.exchange_ttl_secs <= 0 {
            bail!("exchange_ttl_secs must be positive");
        }
        self.client_keys()?;
        Ok(())
    }

    /// The parsed public keys of every client that registered some.
    fn client_keys(&self) -> anyhow::Result<HashMap<String, ClientKeys>> {
        let mut out = HashMap::new();
        for c in &self.clients {
            if let Some(jwks) = &c.jwks {
                let keys = ClientKeys::parse(jwks)
                    .with_context(|| format!("client {:?}: jwks", c.client_id))?;
                out.insert(c.client_id.clone(), keys);
            }
        }
        Ok(out)
    }
}

/// How a minted token carries its scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScopeStyle {
    /// `scp`: a JSON array (Okta).
    #[default]
    Scp,
    /// `scope`: one space-separated string (RFC 9068 and most other issuers).
    Scope,
}

/// A user access token to mint, as the MCP client would have obtained it from an AS.
#[derive(Clone, Debug)]
pub struct MintRequest {
    pub as_id: String,
    pub sub: String,
    /// `aud`; `None` = the AS's audience.
    pub aud: Option<String>,
    pub scopes: Vec<String>,
    pub scope_style: ScopeStyle,
    /// `exp - now`; negative = already expired.
    pub ttl_secs: i64,
    /// Claims merged last: they override the standard ones; a `null` value removes that claim.
    pub extra: Map<String, Value>,
}

impl Default for MintRequest {
    fn default() -> Self {
        Self {
            as_id: "mcp".into(),
            sub: "user@example.com".into(),
            aud: None,
            scopes: vec!["mcp:tools:call".into()],
            scope_style: ScopeStyle::Scp,
            ttl_secs: 3600,
            extra: Map::new(),
        }
    }
}

/// An endpoint that faults can be injected into.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /oauth2/*/v1/token` of every AS.
    Token,
    /// `GET /oauth2/{as_id}/v1/keys`.
    Keys(String),
    /// `POST /oauth2/*/v1/introspect` of every AS (and the Keycloak realm's introspection).
    Introspect,
}

/// What an endpoint does instead of (or before) answering normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Wait, then answer normally.
    Delay(Duration),
    /// Answer this status with a small `text/plain` body.
    Status(u16),
    /// Close the TCP connection (with RST) without any HTTP response.
    Reset,
    /// 200, `Content-Type: application/json`, a body that is not JSON.
    MalformedBody,
    /// Answer exactly this.
    Respond {
        status: u16,
        content_type: String,
        body: String,
    },
}

/// What a `/v1/token` request carried (secrets removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedExchange {
    /// `client_secret_basic`, `client_secret_post`, or `none` (no secret presented;
    /// `private_key_jwt` if a `client_assertion` was sent).
    pub client_auth: String,
    /// The client id presented, from the Authorization header or the body.
    pub client_id: Option<String>,
    /// Decoded form fields in order, `client_secret` removed (empty if the body was not a form).
    pub form: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// The request's `Host` (the `:authority` the gateway sent).
    pub host: Option<String>,
}

impl RecordedExchange {
    /// The first value of a form field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runtime state of one authorization server.
pub(crate) struct AsState {
    pub(crate) config: AuthServerConfig,
    pub(crate) issuer: String,
    /// Published keys, the signing (newest) key first.
    keys: RwLock<Vec<Arc<SigningKey>>>,
    keys_requests: AtomicU64,
}

impl AsState {
    pub(crate) fn signing_key(&self) -> Arc<SigningKey> {
        // Never empty: a key is generated for every AS at start and keys are only ever added.
        read(&self.keys)[0].clone()
    }

    pub(crate) fn key_by_kid(&self, kid: &str) -> Option<Arc<SigningKey>> {
        read(&self.keys).iter().find(|k| k.kid == kid).cloned()
    }

    pub(crate) fn jwks(&self) -> Value {
        let keys: Vec<Value> = read(&self.keys).iter().map(|k| k.jwk().clone()).collect();
        serde_json::json!({ "keys": keys })
    }

    pub(crate) fn trusts(&self, issuer_as: &str) -> bool {
        issuer_as == self.config.id || self.config.trusted_servers.iter().any(|t| t == issuer_as)
    }
}

/// Shared state of a running IdP.
pub(crate) struct State {
    pub(crate) config: IdpConfig,
    pub(crate) base_url: String,
    pub(crate) servers: HashMap<String, AsState>,
    /// Registered public keys per client id (`private_key_jwt`, actor tokens).
    pub(crate) client_keys: HashMap<String, ClientKeys>,
    /// `jti`s of accepted client assertions (key: client id, NUL, jti) until their `exp`.
    used_assertions: Mutex<HashMap<String, i64>>,
    faults: Mutex<HashMap<Endpoint, Fault>>,
    token_requests: AtomicU64,
    last_exchange: Mutex<Option<RecordedExchange>>,
    /// Every `/v1/token` request that carried a readable body, in arrival order.
    exchanges: Mutex<Vec<RecordedExchange>>,
    /// The Entra ID tenant, when configured.
    pub(crate) entra: Option<entra::EntraState>,
    /// The Keycloak realm, when configured.
    pub(crate) keycloak: Option<keycloak::KeycloakState>,
    /// Opaque tokens and the introspection endpoint's requests.
    pub(crate) introspection: introspect::Introspection,
}

impl State {
    /// The authorization server `as_id`, or an error naming the unknown id.
    pub(crate) fn known_server(&self, as_id: &str) -> anyhow::Result<&AsState> {
        self.servers
            .get(as_id)
            .ok_or_else(|| anyhow!("unknown authorization server {as_id:?}"))
    }

    pub(crate) fn server_by_issuer(&self, issuer: &str) -> Option<&AsState> {
        self.servers.values().find(|s| s.issuer == issuer)
    }

    pub(crate) fn fault(&self, endpoint: &Endpoint) -> Option<Fault> {
        lock(&self.faults).get(endpoint).cloned()
    }

    pub(crate) fn set_fault(&self, endpoint: Endpoint, fault: Fault) {
        lock(&self.faults).insert(endpoint, fault);
    }

    pub(crate) fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    pub(crate) fn count_token_request(&self) {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn count_keys_request(&self, server: &AsState) {
        server.keys_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Remembers an accepted client assertion's `jti` until `exp`; `false` if it was seen
    /// before (a replay).
    pub(crate) fn claim_assertion_id(&self, client_id: &str, jti: &str, exp: i64) -> bool {
        let now = now_secs();
        let mut used = lock(&self.used_assertions);
        used.retain(|_, until| *until >= now);
        let key = format!("{client_id}\u{0}{jti}");
        if used.contains_key(&key) {
            return false;
        }
        used.insert(key, exp);
        true
    }

    pub(crate) fn record_exchange(&self, record: RecordedExchange) {
        lock(&self.exchanges).push(record.clone());
        *lock(&self.last_exchange) = Some(record);
    }

    pub(crate) fn stats(&self) -> Value {
        let keys: Map<String, Value> = self
            .servers
            .iter()
            .map(|(id, s)| (id.clone(), s.keys_requests.load(Ordering::SeqCst).into()))
            .collect();
        serde_json::json!({
            "token_requests": self.token_requests.load(Ordering::SeqCst),
            "keys_requests": keys,
            "introspection_requests": self.introspection_requests(),
        })
    }

    /// Adds a freshly generated key to `as_id`, making it the signing key; returns its kid.
    pub(crate) fn rotate(&self, as_id: &str) -> anyhow::Result<String> {
        let server = self.known_server(as_id)?;
        let key = SigningKey::generate()?;
        let kid = key.kid.clone();
        write(&server.keys).insert(0, Arc::new(key));
        Ok(kid)
    }

    /// Stops publishing every key but the current signing key (the end of a rotation).
    pub(crate) fn retire_old_keys(&self, as_id: &str) -> anyhow::Result<()> {
        let server = self.known_server(as_id)?;
        write(&server.keys).truncate(1);
        Ok(())
    }

    /// A user access token as the AS would issue it to the MCP client.
    pub(crate) fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        let server = self.known_server(&req.as_id)?;
        let now = now_secs();
        let exp = now.saturating_add(req.ttl_secs);
        // An already-expired token was issued an hour before it expired.
        let iat = if req.ttl_secs > 0 {
            now
        } else {
            exp.saturating_sub(3600)
        };
        let scopes = match req.scope_style {
            ScopeStyle::Scp => ("scp", Value::from(req.scopes.clone())),
            ScopeStyle::Scope => ("scope", Value::from(req.scopes.join(" "))),
        };
        let mut claims = access_token_claims(AccessTokenClaims {
            issuer: &server.issuer,
            audience: req.aud.as_deref().unwrap_or(&server.config.audience),
            iat,
            exp,
            client_id: &self.config.user_client_id,
            uid: Some(&user_id_for(&req.sub)),
            scopes,
            sub: &req.sub,
        });
        for (name, value) in &req.extra {
            if value.is_null() {
                claims.remove(name);
            } else {
                claims.insert(name.clone(), value.clone());
            }
        }
        server.signing_key().sign_claims(&claims)
    }
}

/// The claims of an Okta access token.
pub(crate) struct AccessTokenClaims<'a> {
    pub(crate) issuer: &'a str,
    pub(crate) audience: &'a str,
    pub(crate) iat: i64,
    pub(crate) exp: i64,
    pub(crate) client_id: &'a str,
    pub(crate) uid: Option<&'a str>,
    pub(crate) scopes: (&'static str, Value),
    pub(crate) sub: &'a str,
}

pub(crate) fn access_token_claims(c: AccessTokenClaims<'_>) -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("ver".into(), 1.into());
    claims.insert("jti".into(), format!("AT.{}", keys::random_b64(32)).into());
    claims.insert("iss".into(), c.issuer.into());
    claims.insert("aud".into(), c.audience.into());
    claims.insert("iat".into(), c.iat.into());
    claims.insert("exp".into(), c.exp.into());
    claims.insert("cid".into(), c.client_id.into());
    if let Some(uid) = c.uid {
        claims.insert("uid".into(), uid.into());
    }
    claims.insert(c.scopes.0.into(), c.scopes.1);
    claims.insert("sub".into(), c.sub.into());
    claims
}

/// An Okta-looking user id (`00u…`), stable for a given `sub`.
pub(crate) fn user_id_for(sub: &str) -> String {
    let digest = Sha256::digest(sub.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("00u{}", &hex[..17])
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Starts the IdP on `listen` (port 0 picks a free port) on the current tokio runtime. It serves
/// until [`IdpHandle::shutdown`] or until the runtime stops.
pub async fn start(listen: SocketAddr, config: IdpConfig) -> anyhow::Result<IdpHandle> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let base_url = match &config.public_base_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("http://{}", reachable(addr)),
    };

    // RSA keygen is CPU-bound: one blocking task per AS, in parallel.
    let mut keygen = Vec::new();
    for s in &config.authorization_servers {
        keygen.push((s.clone(), tokio::task::spawn_blocking(SigningKey::generate)));
    }
    let mut servers = HashMap::new();
    for (cfg, task) in keygen {
        let key = task.await.context("key generation task")??;
        let issuer = format!("{base_url}/oauth2/{}", cfg.id);
        servers.insert(
            cfg.id.clone(),
            AsState {
                config: cfg,
                issuer,
                keys: RwLock::new(vec![Arc::new(key)]),
                keys_requests: AtomicU64::new(0),
            },
        );
    }

    let client_keys = config.client_keys()?;
    let entra = match config.entra.clone() {
        Some(tenant) => Some(
            tokio::task::spawn_blocking({
                let base_url = base_url.clone();
                move || entra::EntraState::new(tenant, &base_url)
            })
            .await
            .context("key generation task")??,
        ),
        None => None,
    };
    let keycloak = match config.keycloak.clone() {
        Some(realm) => Some(
            tokio::task::spawn_blocking({
                let base_url = base_url.clone();
                move || keycloak::KeycloakState::new(realm, &base_url)
            })
            .await
            .context("key generation task")??,
        ),
        None => None,
    };
    let state = Arc::new(State {
        entra,
        keycloak,
        config,
        base_url,
        servers,
        client_keys,
        used_assertions: Mutex::new(HashMap::new()),
        faults: Mutex::new(HashMap::new()),
        token_requests: AtomicU64::new(0),
        last_exchange: Mutex::new(None),
        exchanges: Mutex::new(Vec::new()),
        introspection: introspect::Introspection::default(),
    });
    let task = tokio::spawn(server::serve(listener, state.clone()));
    Ok(IdpHandle {
        inner: Arc::new(Inner {
            state,
            addr,
            task: task.abort_handle(),
        }),
    })
}

/// The address to put in URLs: a wildcard listen address is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

struct Inner {
    state: Arc<State>,
    addr: SocketAddr,
    task: tokio::task::AbortHandle,
}

/// A running IdP. Cheap to clone.
#[derive(Clone)]
pub struct IdpHandle {
    inner: Arc<Inner>,
}

impl IdpHandle {
    fn server(&self, as_id: &str) -> &AsState {
        match self.inner.state.servers.get(as_id) {
            Some(s) => s,
            None => panic!("unknown authorization server {as_id:?}"),
        }
    }

    /// `http://127.0.0.1:PORT` (or the configured public base URL).
    pub fn base_url(&self) -> String {
        self.inner.state.base_url.clone()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    /// The socket address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `{base}/oauth2/{as_id}`, the `iss` of that AS's tokens.
    pub fn issuer(&self, as_id: &str) -> String {
        format!("{}/oauth2/{as_id}", self.inner.state.base_url)
    }

    /// `{issuer}/v1/token`.
    pub fn token_endpoint(&self, as_id: &str) -> String {
        format!("{}/v1/token", self.issuer(as_id))
    }

    /// `{issuer}/v1/keys`.
    pub fn jwks_uri(&self, as_id: &str) -> String {
        format!("{}/v1/keys", self.issuer(as_id))
    }

    /// The kid of the AS's current signing key. Panics for an unknown AS.
    pub fn kid(&self, as_id: &str) -> String {
        self.server(as_id).signing_key().kid.clone()
    }

    /// A user access token signed by `req.as_id`.
    pub fn mint(&self, req: &MintRequest) -> anyhow::Result<String> {
        self.inner.state.mint(req)
    }

    /// RS256 with the AS's current key over exactly these header and claims bytes (each
    /// base64url-encoded without padding), for adversarial tests.
    pub fn sign_raw(
        &self,
        as_id: &str,
        header_json: &[u8],
        claims_json: &[u8],
    ) -> anyhow::Result<String> {
        let server = self.inner.state.known_server(as_id)?;
        server.signing_key().sign_compact(header_json, claims_json)
    }

    /// The current signing key's public JWK (`Value::Null` for an unknown AS).
    pub fn public_jwk(&self, as_id: &str) -> Value {
        self.inner
            .state
            .servers
            .get(as_id)
            .map(|s| s.signing_key().jwk().clone())
            .unwrap_or(Value::Null)
    }

    /// Adds a new key (new kid) that becomes the signing key; older keys stay published, as Okta
    /// publishes both during a rotation. Returns the new kid. Panics for an unknown AS.
    pub fn rotate_key(&self, as_id: &str) -> String {
        match self.inner.state.rotate(as_id) {
            Ok(kid) => kid,
            Err(e) => panic!("rotate_key({as_id:?}): {e:#}"),
        }
    }

    /// Ends a rotation: only the current signing key stays in the JWKS, so tokens signed with
    /// older keys no longer verify. Panics for an unknown AS.
    pub fn retire_old_keys(&self, as_id: &str) {
        if let Err(e) = self.inner.state.retire_old_keys(as_id) {
            panic!("retire_old_keys({as_id:?}): {e:#}");
        }
    }

    /// Injects a fault into an endpoint until [`Self::clear_faults`] (replacing any previous
    /// fault of that endpoint).
    pub fn set_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.inner.state.set_fault(endpoint, fault);
    }

    pub fn clear_faults(&self) {
        self.inner.state.clear_faults();
    }

    /// Requests received by any `/v1/token`, whatever their outcome (faulted ones included).
    pub fn exchange_count(&self) -> u64 {
        self.inner.state.token_requests.load(Ordering::SeqCst)
    }

    /// Requests received by that AS's `/v1/keys` (0 for an unknown AS).
    pub fn keys_fetch_count(&self, as_id: &str) -> u64 {
        self.inner
            .state
            .servers
            .get(as_id)
            .map(|s| s.keys_requests.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// What the last `/v1/token` request carried.
    pub fn last_exchange(&self) -> Option<RecordedExchange> {
        lock(&self.inner.state.last_exchange).clone()
    }

    /// What every `/v1/token` request with a readable body carried, in arrival order (faulted
    /// ones included: the fault replaces the answer, not the request).
    pub fn exchanges(&self) -> Vec<RecordedExchange> {
        lock(&self.inner.state.exchanges).clone()
    }

    /// Stops accepting and drops every open connection: the IdP is down from then on.
    pub fn shutdown(&self) {
        self.inner.task.abort();
    }
}
