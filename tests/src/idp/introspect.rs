//! RFC 7662 token introspection as Okta documents it for a custom authorization server:
//! `POST /oauth2/{as_id}/v1/introspect`, a form with `token` and an optional `token_type_hint`,
//! the client authenticated like at `/v1/token` (`client_secret_basic`, `client_secret_post`,
//! `private_key_jwt`; a missing or wrong one is Okta's 401 `invalid_client`). The answer is
//! HTTP 200 either way (§2.2): `{"active": false}` for a token that is unknown, expired,
//! revoked or another server's, else `active, scope (space-separated), client_id, username, sub,
//! aud, iss, exp, iat, jti, uid, token_type`.
//!
//! Okta's access tokens are JWTs; the tokens this module knows are opaque ones (43 random
//! base64url characters, no dots) that tests issue through [`IdpHandle::mint_opaque`] (or
//! `POST /__admin/mint` with `"opaque": true`) and revoke through [`IdpHandle::revoke`] (or
//! `POST /__admin/revoke`): the shape of a provider that issues reference tokens. The token
//! endpoint accepts them as subject tokens (see `token::verify_subject_token`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use super::keys::random_b64;
use super::token::{authenticated_form, TokenHttpRequest, TokenOutcome};
use super::{
    lock, now_secs, user_id_for, AsState, IdpHandle, MintRequest, RecordedExchange, State,
};

/// An opaque access token the IdP issued.
#[derive(Clone, Debug)]
pub(crate) struct OpaqueToken {
    pub(crate) as_id: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    scopes: Vec<String>,
    client_id: String,
    pub(crate) iat: i64,
    pub(crate) exp: i64,
    jti: String,
    revoked: bool,
    /// Members merged last into the active answer (`null` removes one), for tests.
    extra: Map<String, Value>,
}

impl OpaqueToken {
    /// Neither expired nor revoked.
    pub(crate) fn is_active(&self, now: i64) -> bool {
        !self.revoked && self.exp > now
    }
}

/// The opaque tokens issued so far, and what the endpoint received.
#[derive(Default)]
pub(crate) struct Introspection {
    tokens: Mutex<HashMap<String, OpaqueToken>>,
    requests: AtomicU64,
    /// Every introspection request with a readable body, secrets removed, in arrival order.
    received: Mutex<Vec<RecordedExchange>>,
}

impl Introspection {
    /// The token, if this IdP issued it (active or not).
    pub(crate) fn get(&self, token: &str) -> Option<OpaqueToken> {
        lock(&self.tokens).get(token).cloned()
    }
}

impl State {
    /// An opaque access token of `req.as_id` for `req.sub` (scopes, audience, lifetime and
    /// extra answer members as in a JWT mint; `scope_style` does not apply: the answer's `scope`
    /// is always a space-separated string, RFC 7662 §2.2).
    pub(crate) fn mint_opaque(&self, req: &MintRequest) -> anyhow::Result<String> {
        let server = self.known_server(&req.as_id)?;
        let now = now_secs();
        let exp = now.saturating_add(req.ttl_secs);
        let token = random_b64(32);
        let entry = OpaqueToken {
            as_id: req.as_id.clone(),
            sub: req.sub.clone(),
            aud: req
                .aud
                .clone()
                .unwrap_or_else(|| server.config.audience.clone()),
            scopes: req.scopes.clone(),
            client_id: self.config.user_client_id.clone(),
            iat: if req.ttl_secs > 0 { now } else { exp - 3600 },
            exp,
            jti: format!("AT.{}", random_b64(32)),
            revoked: false,
            extra: req.extra.clone(),
        };
        lock(&self.introspection.tokens).insert(token.clone(), entry);
        Ok(token)
    }

    /// Revokes an opaque token (an authorization server's or the Keycloak realm's); `false` if
    /// this IdP never issued it.
    pub(crate) fn revoke(&self, token: &str) -> bool {
        match lock(&self.introspection.tokens).get_mut(token) {
            Some(t) => {
                t.revoked = true;
                true
            }
            None => self.keycloak.as_ref().is_some_and(|k| k.revoke(token)),
        }
    }

    pub(crate) fn count_introspection(&self) {
        self.introspection.requests.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn introspection_requests(&self) -> u64 {
        self.introspection.requests.load(Ordering::SeqCst)
    }

    pub(crate) fn record_introspection(&self, record: RecordedExchange) {
        lock(&self.introspection.received).push(record);
    }
}

/// `POST /oauth2/{as_id}/v1/introspect`: the form and client are checked by the token
/// endpoint's rules, then the token is looked up.
pub(crate) fn handle(state: &State, server: &AsState, req: &TokenHttpRequest<'_>) -> TokenOutcome {
    let (form, record) = match authenticated_form(state, server, req) {
        Ok(ok) => ok,
        Err(refusal) => return *refusal,
    };
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(token) = param("token").filter(|t| !t.is_empty()) else {
        return TokenOutcome::error(
            400,
            "invalid_request",
            "The token parameter is required.",
            record,
        );
    };
    // RFC 7662 §2.1: a hint that does not find the token widens the search; this server has
    // one kind of token to search, so any hint (or none) gives the same answer.
    let answer = match state.introspection.get(token) {
        Some(t) if t.as_id == server.config.id && t.is_active(now_secs()) => {
            active_answer(server, &t)
        }
        _ => json!({ "active": false }),
    };
    TokenOutcome::ok(answer.to_string(), record)
}

fn active_answer(server: &AsState, t: &OpaqueToken) -> Value {
    let mut answer = json!({
        "active": true,
        "scope": t.scopes.join(" "),
        "username": t.sub,
        "exp": t.exp,
        "iat": t.iat,
        "sub": t.sub,
        "aud": t.aud,
        "iss": server.issuer,
        "jti": t.jti,
        "token_type": "Bearer",
        "client_id": t.client_id,
        "uid": user_id_for(&t.sub),
    });
    if let Some(members) = answer.as_object_mut() {
        for (name, value) in &t.extra {
            if value.is_null() {
                members.remove(name);
            } else {
                members.insert(name.clone(), value.clone());
            }
        }
    }
    answer
}

impl IdpHandle {
    /// An opaque access token of `req.as_id`, answered by that AS's introspection endpoint.
    pub fn mint_opaque(&self, req: &MintRequest) -> anyhow::Result<String> {
        self.inner.state.mint_opaque(req)
    }

    /// Revokes an opaque token: introspection says `active: false` from now on. `false` if the
    /// IdP never issued it.
    pub fn revoke(&self, token: &str) -> bool {
        self.inner.state.revoke(token)
    }

    /// Requests received by any `/v1/introspect`, whatever their outcome (faulted ones
    /// included).
    pub fn introspection_count(&self) -> u64 {
        self.inner.state.introspection_requests()
    }

    /// What every introspection request with a readable body carried (client secret removed).
    pub fn introspections(&self) -> Vec<RecordedExchange> {
        lock(&self.inner.state.introspection.received).clone()
    }
}
