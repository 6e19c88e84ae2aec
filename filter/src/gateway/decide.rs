//! Deciding a request on the full path: verify → audience → scopes → tools → target → backend
//! token (stored, joined, exchanged here, or waited for from another worker).

use std::rc::Rc;

use log::{debug, info, warn};
use sha2::Digest as _;

use crate::audit::CacheUse;
use crate::cache::{exchange_key, fingerprint, token_digest, Digest32};
use crate::config::{ExchangeTarget, ProviderSet};
use crate::exchange::{ExchangeError, ExchangeRequest};
use crate::exchange_coordinator::{Join, Subject};
use crate::host::Host;
use crate::jwks::sanitize;
use crate::key_manager::JwksFetch;
use crate::mcp;
use crate::policy::{audience_allowed, missing_scopes, tool_requirements};
use crate::reply::Denial;
use crate::request::RequestState;
use crate::verify::{self, Principal, TokenError, VerifyError};

use super::{secs, CalloutPurpose, Gateway};

/// What goes upstream in place of the client's credentials.
#[derive(Clone)]
pub(super) enum Upstream {
    /// This backend token; `until`: how long it may be reused (`None`: not at all).
    Exchanged { token: Rc<str>, until: Option<i64> },
    /// `validate_only` mode: no backend token.
    Validated,
}

/// What the flow decided for one request.
#[derive(Clone)]
pub(super) enum Step {
    /// Forward upstream.
    Forward(Upstream),
    /// Answer the client now.
    Deny(Denial),
    /// Stay paused: a callout, the request body or another worker will finish the request.
    Wait,
}

pub(super) enum PrincipalWait {
    Deny(Denial),
    /// This provider's keys are missing or being refetched: park the request.
    Park(u8),
    /// An opaque token: park the request until this provider's introspection answers.
    Introspect(u8),
}

/// Not a JWS or JWE in compact form: a token only its issuer can read (introspection).
fn is_opaque(token: &str) -> bool {
    !matches!(token.split('.').count(), 3 | 5)
}

impl<H: Host> Gateway<H> {
    /// Verify → audience → scopes → tools → cached token or exchange.
    pub(super) fn advance(&mut self, context_id: u32, now: u64) -> Step {
        let policy = Rc::clone(&self.policy);
        let (token, digest, route_index) = match self.requests.get(&context_id) {
            Some(r) => (r.token.clone(), r.digest, r.route),
            None => return Step::Deny(Denial::Internal),
        };
        let digest = digest.unwrap_or_else(|| token_digest(&token));
        let route = &policy.routes[route_index];
        let principal = match self.principal(&token, Some(&digest), route_index, now, false) {
            Ok(p) => p,
            Err(PrincipalWait::Deny(d)) => return Step::Deny(d),
            Err(PrincipalWait::Park(provider)) => return self.park(context_id, provider, now),
            Err(PrincipalWait::Introspect(provider)) => {
                return self.wait_for_introspection(context_id, provider, digest)
            }
        };
        let Some(request) = self.requests.get_mut(&context_id) else {
            return Step::Deny(Denial::Internal);
        };
        request.principal = Some(Rc::clone(&principal));
        let audiences = policy.accepted_audiences(route, principal.provider);
        if !audience_allowed(&principal, audiences) {
            return Step::Deny(Denial::WrongAudience);
        }
        let missing = missing_scopes(&principal, &route.required_scopes);
        if !missing.is_empty() {
            return Step::Deny(Denial::InsufficientScope { missing });
        }
        let header_call = match &request.header_call {
            Ok(call) => call.as_ref(),
            Err(e) => return Step::Deny(Denial::McpBody(e.clone())),
        };
        if let Some(call) = header_call {
            let req = tool_requirements(route, std::slice::from_ref(call));
            request.tool_label = req.label;
            if req.unlisted.is_some() {
                return Step::Deny(Denial::ToolNotAllowed);
            }
            for s in req.scopes {
                if !request.required_scopes.contains(&s) {
                    request.required_scopes.push(s);
                }
            }
            request.target = req.target;
        }
        let missing = missing_scopes(&principal, &request.required_scopes);
        if !missing.is_empty() {
            return Step::Deny(Denial::InsufficientScope { missing });
        }
        let Some(target) = request.target.clone().or_else(|| route.target.clone()) else {
            return Step::Forward(Upstream::Validated);
        };
        request.target = Some(Rc::clone(&target));
        self.exchange(context_id, &token, &digest, &principal, target, now)
    }

    /// The verified principal for `token` on route `route_index`: from the verified-token cache,
    /// or by verifying it with the provider its `iss` selects, if the route accepts that
    /// provider. `after_fetch`: the key set was just refetched, so an unknown `kid` is final.
    pub(super) fn principal(
        &mut self,
        token: &str,
        digest: Option<&Digest32>,
        route_index: usize,
        now_ms: u64,
        after_fetch: bool,
    ) -> Result<Rc<Principal>, PrincipalWait> {
        let now = secs(now_ms);
        let digest = || digest.copied().unwrap_or_else(|| token_digest(token));
        let policy = Rc::clone(&self.policy);
        let accepted = policy
            .routes
            .get(route_index)
            .map_or(ProviderSet::NONE, |r| r.providers);
        let not_accepted = || PrincipalWait::Deny(Denial::Token(TokenError::WrongIssuer));
        let skew = policy.inbound.clock_skew_seconds;
        if let Some(entry) = self.verified.get(token, now, skew) {
            if !accepted.contains(entry.principal.provider) {
                return Err(not_accepted());
            }
            return Ok(Rc::clone(&entry.principal));
        }
        if is_opaque(token) {
            if let Some(p) = self.introspections.answer(&digest(), now) {
                return match accepted.contains(p.provider) {
                    true => Ok(p),
                    false => Err(not_accepted()),
                };
            }
            if let Some(index) = policy
                .providers
                .iter()
                .position(|p| p.introspection.is_some())
            {
                let index = u8::try_from(index).unwrap_or(u8::MAX);
                if accepted.contains(index) {
                    return Err(PrincipalWait::Introspect(index));
                }
            }
        }
        // The issuer picks the provider before any key is looked at: an unknown issuer, or one
        // this route does not accept, costs no key work and never triggers a JWKS fetch.
        let claims =
            verify::decode_claims(token).map_err(|e| PrincipalWait::Deny(Denial::Token(e)))?;
        let Some(issuer) = claims.issuer() else {
            return Err(PrincipalWait::Deny(Denial::Token(
                TokenError::MissingClaim("iss"),
            )));
        };
        let Some(index) = policy.provider_for_issuer(issuer) else {
            return Err(not_accepted());
        };
        if !accepted.contains(index) {
            return Err(not_accepted());
        }
        let (Some(provider), Some(keys)) = (
            policy.providers.get(usize::from(index)),
            self.keys.get(usize::from(index)),
        ) else {
            return Err(PrincipalWait::Deny(Denial::Internal));
        };
        let Some(key_set) = keys.keys().cloned() else {
            return Err(PrincipalWait::Park(index));
        };
        match verify::verify_decoded(token, claims, &key_set, provider, skew, now) {
            Ok(mut p) => {
                p.provider = index;
                let p = Rc::new(p);
                if policy.inbound.verified_cache_max_entries > 0 {
                    self.verified.put(token, digest(), Rc::clone(&p));
                }
                Ok(p)
            }
            Err(VerifyError::Invalid(e)) => {
                debug!("token {} rejected: {e}", fingerprint(&digest()));
                Err(PrincipalWait::Deny(Denial::Token(e)))
            }
            Err(VerifyError::NoKeys) => Err(PrincipalWait::Park(index)),
            Err(VerifyError::UnknownKid) if after_fetch => {
                Err(PrincipalWait::Deny(Denial::Token(TokenError::UnknownKey)))
            }
            Err(VerifyError::UnknownKid) => self.refetch_for_unknown_kid(index, &digest(), now_ms),
        }
    }

    /// A token names a key its provider's set lacks: refetch (throttled per provider) and
    /// park, or refuse when no fetch may run.
    fn refetch_for_unknown_kid(
        &mut self,
        provider: u8,
        digest: &Digest32,
        now_ms: u64,
    ) -> Result<Rc<Principal>, PrincipalWait> {
        let Some(keys) = self.keys.get_mut(usize::from(provider)) else {
            return Err(PrincipalWait::Deny(Denial::Internal));
        };
        if keys.may_refetch(now_ms) {
            info!(
                "token {} names an unknown key; refetching the JWKS",
                fingerprint(digest)
            );
            keys.request_fetch(now_ms);
            self.set_fast_tick(true);
        }
        if self.keys[usize::from(provider)].is_fetching() {
            Err(PrincipalWait::Park(provider))
        } else {
            Err(PrincipalWait::Deny(Denial::Token(TokenError::UnknownKey)))
        }
    }

    /// Parks the request until `provider`'s keys arrive (fetching them if no fetch runs), or
    /// refuses it.
    fn park(&mut self, context_id: u32, provider: u8, now_ms: u64) -> Step {
        let Some(keys) = self.keys.get_mut(usize::from(provider)) else {
            return Step::Deny(Denial::Internal);
        };
        if keys.park(context_id, now_ms).is_err() {
            return Step::Deny(Denial::KeysUnavailable);
        }
        if !keys.is_fetching() {
            keys.request_fetch(now_ms);
        }
        self.set_fast_tick(true);
        self.set_state(context_id, RequestState::WaitingForKeys);
        Step::Wait
    }

    pub(super) fn dispatch_jwks(&mut self, provider: u8, fetch: &JwksFetch, now_ms: u64) {
        let headers = [
            (":method", "GET"),
            (":path", fetch.path.as_str()),
            (":authority", fetch.authority.as_str()),
            ("accept", "application/json"),
        ];
        // The key set serves every request: the fetch belongs to the root context.
        let _ = self.host.act_as_root();
        match self
            .host
            .dispatch(&fetch.cluster, &headers, None, fetch.timeout)
        {
            Ok(token) => {
                if let Some(keys) = self.keys.get_mut(usize::from(provider)) {
                    keys.dispatched(token, now_ms);
                }
                self.callouts.insert(token, CalloutPurpose::Jwks(provider));
            }
            Err(_) => {
                self.metrics.inc("jwks.fetch_failed");
                warn!(
                    "JWKS callout to cluster {} could not be dispatched",
                    fetch.cluster
                );
            }
        }
    }

    fn exchange(
        &mut self,
        context_id: u32,
        token: &str,
        digest: &Digest32,
        principal: &Principal,
        target: Rc<ExchangeTarget>,
        now_ms: u64,
    ) -> Step {
        let subject = Subject {
            key: exchange_key(digest, &target.identity),
            expires_at: principal.expires_at,
            fingerprint: fingerprint(digest),
            sub: sanitize(&principal.sub),
        };
        if let Some(r) = self.requests.get_mut(&context_id) {
            r.exchange_key = Some(subject.key);
        }
        match self
            .exchanges
            .join(&self.host, context_id, &subject, &target, now_ms)
        {
            Join::Stored { token, until } => {
                self.set_cache_use(context_id, CacheUse::Hit);
                Step::Forward(Upstream::Exchanged {
                    token: token.into(),
                    until: Some(until),
                })
            }
            Join::Joined => {
                self.set_cache_use(context_id, CacheUse::Coalesced);
                self.set_state(context_id, RequestState::Exchanging);
                Step::Wait
            }
            Join::Lead => {
                self.set_cache_use(context_id, CacheUse::Miss);
                self.lead_exchange(token, subject, target, vec![context_id], now_ms)
            }
            Join::Failed(e) => Step::Deny(Denial::Exchange(e)),
            Join::Remote => {
                self.set_cache_use(context_id, CacheUse::Coalesced);
                self.set_state(context_id, RequestState::Exchanging);
                self.set_fast_tick(true);
                Step::Wait
            }
        }
    }

    fn set_cache_use(&mut self, context_id: u32, cache: CacheUse) {
        if let Some(r) = self.requests.get_mut(&context_id) {
            r.cache = cache;
        }
        self.metrics.inc(match cache {
            CacheUse::Hit => "cache.hits",
            CacheUse::Miss => "cache.misses",
            CacheUse::Coalesced => "cache.coalesced",
            CacheUse::Fleet | CacheUse::None => return,
        });
    }

    pub(super) fn set_state(&mut self, context_id: u32, state: RequestState) {
        if let Some(r) = self.requests.get_mut(&context_id) {
            r.state = state;
        }
    }

    /// Starts the exchange this worker leads (it holds the lease for `subject.key`): its first
    /// phase is a fleet store lookup when there is a usable store, else the exchange itself.
    /// Only a request's own exchange is dispatched in its own callback: Envoy ties a callout to
    /// the context it was dispatched from and cancels it when that request ends, so an exchange
    /// started on behalf of other requests (resumed after keys arrived, taken over from another
    /// worker) waits for the root context's next tick (`dispatch_due`, a fast tick away).
    pub(super) fn lead_exchange(
        &mut self,
        token: &str,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        now_ms: u64,
    ) -> Step {
        for w in &waiters {
            self.set_state(*w, RequestState::Exchanging);
        }
        let own = matches!((self.own_request, waiters.as_slice()), (Some(own), [w]) if own == *w);
        let phase = self.first_phase(now_ms);
        let key = subject.key;
        self.exchanges
            .begin(subject, target, waiters, phase, now_ms);
        if !own {
            self.set_fast_tick(true);
            return Step::Wait;
        }
        match self.send_phase(token, &key, phase, now_ms) {
            Ok(()) => Step::Wait,
            Err(denial) => {
                let failure = match &denial {
                    Denial::Exchange(e) => {
                        // A deferred exchange counts this in `on_exchange_ended`.
                        self.metrics.inc("exchanges.unavailable");
                        Some(e)
                    }
                    _ => None,
                };
                if self
                    .exchanges
                    .drop_unsent(&self.host, &key, failure, now_ms)
                {
                    self.fleet_unlock(&key);
                }
                Step::Deny(denial)
            }
        }
    }

    /// Builds and dispatches the token request; the callout's token, or the refusal its
    /// requests get.
    pub(super) fn send_exchange(
        &mut self,
        token: &str,
        subject: &Subject,
        target: &ExchangeTarget,
        now_ms: u64,
    ) -> Result<u32, Denial> {
        let nonce = self.nonce(now_ms);
        let request = match ExchangeRequest::build(target, token, secs(now_ms), &nonce) {
            Ok(r) => r,
            Err(e) => {
                warn!(
                    "token exchange request for token {} could not be built: {e}",
                    subject.fingerprint
                );
                return Err(Denial::Internal);
            }
        };
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        self.host
            .dispatch(
                &target.cluster,
                &headers,
                Some(&request.body),
                target.timeout,
            )
            .map_err(|_| {
                warn!(
                    "token exchange callout to cluster {} could not be dispatched",
                    target.cluster
                );
                Denial::Exchange(ExchangeError::Unavailable {
                    status: None,
                    retry_after: None,
                })
            })
    }

    /// A value unique to this call (for the `jti` of client assertions and actor tokens): a hash
    /// of a per-VM random seed, the worker, a counter and the time.
    fn nonce(&mut self, now_ms: u64) -> String {
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        let mut h = sha2::Sha256::new();
        h.update(self.nonce_seed.to_le_bytes());
        h.update(self.worker_id.to_le_bytes());
        h.update(self.nonce_counter.to_le_bytes());
        h.update(now_ms.to_le_bytes());
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The body's calls against the route's tool policy (and against the `Mcp-Method`/`Mcp-Name`
    /// headers the forwarded token was chosen by). Ok carries the tool label for audit.
    pub(super) fn check_body_calls(
        &mut self,
        context_id: u32,
        body: &mcp::Body,
    ) -> Result<Option<String>, Denial> {
        let policy = Rc::clone(&self.policy);
        let Some(request) = self.requests.get_mut(&context_id) else {
            return Err(Denial::Internal);
        };
        let route = &policy.routes[request.route];
        if let Ok(Some(named)) = &request.header_call {
            // The token was chosen for the call the headers named; the body must be that call.
            mcp::check_announced(named, body).map_err(Denial::McpBody)?;
        }
        let req = tool_requirements(route, &body.calls);
        request.tool_label = req.label.clone();
        if req.unlisted.is_some() {
            return Err(Denial::ToolNotAllowed);
        }
        for s in &req.scopes {
            if !request.required_scopes.contains(s) {
                request.required_scopes.push(s.clone());
            }
        }
        let Some(principal) = request.principal.clone() else {
            return Err(Denial::Internal);
        };
        let missing = missing_scopes(&principal, &request.required_scopes);
        if !missing.is_empty() {
            return Err(Denial::InsufficientScope { missing });
        }
        Ok(req.label)
    }
}
