//! Per-VM state shared by the root context and every HTTP context of one Envoy worker, and the
//! request flow that uses it:
//!
//! route → (metadata | public | authenticate) → verify → audience/scopes → tools (maybe from the
//! body) → exchange (or cache) → rewrite `Authorization` and identity headers → forward.
//!
//! Work that completes asynchronously (a key set arriving, an exchange answering, another worker
//! finishing an exchange) may finish a request other than the one whose callback is running: many
//! requests wait on one JWKS fetch, and concurrent requests with the same token wait on one
//! exchange. Those requests are acted on through `set_effective_context`, so the flow lives here
//! rather than in any one context, and each request's state is kept here by context id.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use sha2::Digest as _;

use log::{debug, info, warn};
use proxy_wasm::types::Action;

use crate::audit::{AuditRecord, CacheUse};
use crate::cache::{
    exchange_key, fingerprint, token_digest, CachedBackend, Digest32, ExchangeStore, LeaseOutcome,
    LeaseStatus, VerifiedTokens,
};
use crate::clock::CoarseClock;
use crate::config::{ExchangeTarget, IdentityClaim, KeySource, Policy, RemoteJwks, Unmatched};
use crate::exchange::{
    self, describe_error_body, ExchangeError, ExchangeRequest, MAX_RESPONSE_BYTES,
};
use crate::host::{Host, HostError, ProxyWasmHost};
use crate::jwks::{sanitize, KeySet, MAX_JWKS_BYTES};
use crate::mcp::{self, BodyError, Call};
use crate::metrics::{CounterId, Metrics};
use crate::policy::{audience_allowed, missing_scopes, tool_requirements};
use crate::reply::Denial;
use crate::request_path::{self, PathError};
use crate::token::{bearer_credential, extract_bearer, query_has_access_token};
use crate::verify::{self, Principal, TokenError, VerifyError};

/// Requests parked for a key set, at most. Beyond this, new ones are answered 503 at once so a
/// flood during an IdP outage cannot grow memory without bound.
const MAX_PARKED: usize = 4096;
/// Retry a failed JWKS fetch after this long (the refresh interval applies once keys are held).
const JWKS_RETRY: Duration = Duration::from_secs(2);
/// Normal tick period: bounds how late a JWKS retry or a wait timeout is noticed.
pub const TICK: Duration = Duration::from_millis(500);
/// Tick period while requests wait on another worker's exchange (they poll the shared store).
const FAST_TICK: Duration = Duration::from_millis(20);
/// How long a failed exchange's outcome is shared with other requests for the same token.
const FAILURE_TTL_MS: u64 = 1000;
/// Expired exchange-store slots blanked per tick.
const SWEEP_SLOTS_PER_TICK: u64 = 64;

fn secs(ms: u64) -> i64 {
    (ms / 1000) as i64
}

/// What goes upstream in place of the client's credentials.
#[derive(Clone)]
enum Upstream {
    /// This backend token; `until`: how long it may be reused (`None`: not at all).
    Exchanged { token: Rc<str>, until: Option<i64> },
    /// `validate_only` mode: no backend token.
    Validated,
}

/// What the flow decided for one request.
#[derive(Clone)]
enum Step {
    /// Forward upstream.
    Forward(Upstream),
    /// Answer the client now.
    Deny(Denial),
    /// Stay paused: a callout, the request body or another worker will finish the request.
    Wait,
}

/// The subject of an exchange, without the token.
#[derive(Clone)]
struct Subject {
    key: Digest32,
    expires_at: i64,
    fingerprint: String,
    sub: String,
}

enum Callout {
    Jwks,
    Exchange {
        subject: Subject,
        target: Rc<ExchangeTarget>,
        started_ms: u64,
        /// Requests (context ids) waiting on this exchange, the dispatching one first.
        waiters: Vec<u32>,
    },
}

/// A request waiting for another worker's exchange of the same token.
struct RemoteWaiter {
    context_id: u32,
    subject: Subject,
    target: Rc<ExchangeTarget>,
    since_ms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    /// The request has no (more) body.
    Complete,
    /// Body data is still arriving (and being buffered while the request is undecided).
    Arriving,
}

/// One undecided request.
struct Stream {
    started_ms: u64,
    route: usize,
    token: String,
    /// SHA-256 of `token`: keys the exchange cache and labels the token in logs. `None` until
    /// needed: validate-only requests without caching or audit never hash the token.
    digest: Option<Digest32>,
    principal: Option<Rc<Principal>>,
    body: Body,
    /// The call named by the MCP 2026-07-28 `Mcp-Method`/`Mcp-Name` headers (decoded), on routes
    /// with per-tool policy. It decides the exchange target up front; the body must agree with
    /// it. An error: the headers are unreadable, refused once the token is verified.
    header_call: Result<Option<Call>, BodyError>,
    /// Every scope this request needs (route and tools): the challenge's `scope`.
    required_scopes: Vec<String>,
    tool_label: Option<String>,
    target: Option<Rc<ExchangeTarget>>,
    cache: CacheUse,
    parked_since: Option<u64>,
    /// Exchange key of the backend token sent upstream, for invalidation on an upstream 401.
    exchange_key: Option<Digest32>,
}

/// A forwarded request whose body still has to pass the route's tool policy.
struct BodyCheck {
    stream: Stream,
    backend_fingerprint: Option<Rc<str>>,
}

#[derive(Default)]
struct KeyState {
    keys: Option<Rc<KeySet>>,
    fetched_ms: Option<u64>,
    /// Callout token and start time of the fetch in flight.
    in_flight: Option<(u32, u64)>,
    last_attempt_ms: Option<u64>,
}

/// Maps keyed by the ids Envoy gives contexts and callouts. Those are host-assigned counters,
/// not client input, so a multiplicative hash is safe and spares the hot path SipHash's cost
/// (several lookups per request).
type ContextMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<ContextIdHasher>>;

#[derive(Default)]
struct ContextIdHasher(u64);

impl std::hash::Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing: spreads consecutive ids over the high bits hashbrown uses.
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The per-VM gateway, shared by the root context and the HTTP contexts.
pub type SharedGateway = Rc<std::cell::RefCell<Gateway>>;

/// How the gateway took a request's headers.
pub enum Admission {
    /// Forwarded on the cached path: the gateway keeps nothing for this request. With a backend
    /// token, the key it is cached under, for the upstream's answer (see
    /// [`Gateway::on_backend_token_status`]).
    Cached { backend_key: Option<Digest32> },
    /// Any other outcome; the gateway may keep state for the request until `forget`.
    Full(Action),
}

/// Runs `f` on the gateway. `None` when there is none (not configured) or it is borrowed: that
/// cannot happen with Envoy deferring re-entrant calls, but is logged and failed closed, never a
/// panic.
pub fn with_gateway<R>(
    gateway: &Option<SharedGateway>,
    f: impl FnOnce(&mut Gateway) -> R,
) -> Option<R> {
    let gw = gateway.as_ref()?;
    match gw.try_borrow_mut() {
        Ok(mut gw) => Some(f(&mut gw)),
        Err(_) => {
            log::error!("gateway state busy; failing closed");
            None
        }
    }
}

/// The flow, over any [`Host`]: [`ProxyWasmHost`] in Envoy, a fake host in unit tests.
pub struct Gateway<H: Host = ProxyWasmHost> {
    host: H,
    pub policy: Rc<Policy>,
    worker_id: u32,
    keys: KeyState,
    verified: VerifiedTokens,
    store: ExchangeStore,
    callouts: ContextMap<Callout>,
    /// This worker's exchanges in flight, by exchange key → callout token.
    in_flight: HashMap<Digest32, u32>,
    streams: ContextMap<Stream>,
    /// Exchange keys of forwarded requests, until their response headers arrive.
    forwarded: ContextMap<Digest32>,
    body_checks: ContextMap<BodyCheck>,
    remote_waiters: Vec<RemoteWaiter>,
    metrics: Metrics,
    /// Counters the hot path bumps on every request, looked up once.
    allowed_counter: CounterId,
    cache_hit_counter: CounterId,
    nonce_seed: u64,
    nonce_counter: u64,
    fast_tick: bool,
    last_sweep_ms: u64,
    /// The exchange store's generation when this worker last looked (see `on_tick`).
    store_generation: u32,
    /// Every host clock reading; the cached path checks expiry against its bound instead of
    /// reading the clock.
    clock: CoarseClock,
}

impl<H: Host> Gateway<H> {
    /// `namespace` separates this configuration's shared data from any other's; `worker_id` is
    /// unique among the VMs sharing it.
    pub fn new(host: H, policy: Policy, namespace: &str, worker_id: u32) -> Self {
        let keys = match &policy.keys {
            KeySource::Inline(set) => KeyState {
                keys: Some(Rc::new(set.clone())),
                ..KeyState::default()
            },
            KeySource::Remote(_) => KeyState::default(),
        };
        let mut metrics = Metrics::default();
        let allowed_counter = metrics.counter("requests.allowed");
        let cache_hit_counter = metrics.counter("cache.hits");
        Self {
            host,
            worker_id,
            allowed_counter,
            cache_hit_counter,
            verified: VerifiedTokens::new(policy.inbound.verified_cache_max_entries),
            store: ExchangeStore::new(namespace, policy.exchange_cache_slots),
            policy: Rc::new(policy),
            keys,
            callouts: ContextMap::default(),
            in_flight: HashMap::new(),
            streams: ContextMap::default(),
            forwarded: ContextMap::default(),
            body_checks: ContextMap::default(),
            remote_waiters: Vec::new(),
            metrics,
            // std seeds RandomState from the host's random source (WASI random_get).
            nonce_seed: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(worker_id)
            },
            nonce_counter: 0,
            fast_tick: false,
            last_sweep_ms: 0,
            store_generation: 0,
            clock: CoarseClock::default(),
        }
    }

    /// Envoy ignores a CAS of 0 (a key never written), so two workers racing for a fresh lease
    /// slot could both win. Writing every lease slot once, before traffic, closes that race.
    pub fn prepare_shared_slots(&mut self) {
        self.store.prepare_leases(&self.host);
        self.store_generation = self.store.generation(&self.host);
    }

    /// The upstream answered a forwarded request. A 401 means it rejected the backend token:
    /// drop it from the cache so the next request exchanges afresh.
    pub fn on_upstream_status(&mut self, context_id: u32, status: Option<&[u8]>) {
        if let Some(key) = self.forwarded.remove(&context_id) {
            self.on_backend_token_status(&key, status);
        }
    }

    /// The upstream's `:status` for a request forwarded with the backend token cached under
    /// `key`: a 401 drops that token from this worker and from the shared store.
    pub fn on_backend_token_status(&mut self, key: &Digest32, status: Option<&[u8]>) {
        if status == Some(b"401") {
            self.verified.forget_backend(key);
            if self.store.remove(&self.host, key) {
                self.metrics.inc("cache.invalidated");
                info!("upstream answered 401; dropped the cached exchanged token");
            }
        }
    }

    /// The request is over: forget anything still kept for it.
    pub fn forget(&mut self, context_id: u32) {
        self.forwarded.remove(&context_id);
        self.body_checks.remove(&context_id);
        if self.streams.remove(&context_id).is_some() {
            self.metrics.inc("requests.abandoned");
        }
    }

    /// Whether nothing is kept for any request, exchange or waiter (a JWKS fetch may run): what
    /// every map must come back to once all requests have ended and all callouts answered.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty()
            && self.body_checks.is_empty()
            && self.forwarded.is_empty()
            && self.in_flight.is_empty()
            && self.remote_waiters.is_empty()
            && self.callouts.values().all(|c| matches!(c, Callout::Jwks))
    }

    /// Whether the response to this request must be looked at (an upstream 401 drops the
    /// backend token it was sent with from the caches).
    pub fn watches_response(&self, context_id: u32) -> bool {
        self.forwarded.contains_key(&context_id)
    }

    /// Entry point from `on_http_request_headers`.
    ///
    /// All request headers come in one host call and are read in place (see `header_map`).
    pub fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Admission {
        let Some(headers) = self.host.request_headers() else {
            return Admission::Full(self.deny_unrouted(Denial::Internal));
        };
        // No `:path` is no request Envoy would route: refused like any path not in normal form.
        let raw_path = headers.get(":path").unwrap_or_default();
        let path = match request_path::normalize(raw_path) {
            Ok(path) => path,
            Err(e) => return Admission::Full(self.deny_path(e)),
        };

        if let Some(metadata) = self.policy.metadata_for(&path) {
            let method = headers.get(":method").unwrap_or(b"GET");
            return Admission::Full(serve_metadata(&self.host, method, &metadata.document));
        }
        let Some(route_index) = self.policy.route_index(&path) else {
            return Admission::Full(match self.policy.unmatched {
                Unmatched::Deny => self.deny_unrouted(Denial::NoRoute),
                Unmatched::Pass => self.pass_unauthenticated(),
            });
        };
        let policy = Rc::clone(&self.policy);
        let route = &policy.routes[route_index];
        if route.public {
            return Admission::Full(self.pass_unauthenticated());
        }

        // Envoy joins a repeated `Authorization` into one comma-separated value, which
        // `extract_bearer` refuses as a duplicate; separate entries are refused the same way.
        let mut authorization = headers.values("authorization");
        let (first, second) = (authorization.next(), authorization.next());
        let (one, two);
        let auth: &[&[u8]] = match (first, second) {
            (Some(a), Some(b)) => {
                two = [a, b];
                &two
            }
            (Some(a), None) => {
                if let Some(cached) = self.forward_cached(route_index, a, raw_path) {
                    return cached;
                }
                one = [a];
                &one
            }
            _ => &[],
        };
        let now = self.clock.observe(self.host.now_ms());
        let token = match extract_bearer(auth, raw_path, policy.inbound.max_token_bytes) {
            Ok(t) => t,
            Err(e) => {
                let scopes = route.required_scopes.clone();
                return Admission::Full(self.deny_early(
                    route_index,
                    now,
                    Denial::Extract(e),
                    &scopes,
                ));
            }
        };
        let header_call = if route.inspects_tools() {
            let methods: Vec<&[u8]> = headers.values("mcp-method").collect();
            let names: Vec<&[u8]> = headers.values("mcp-name").collect();
            mcp::call_from_headers(&methods, &names)
        } else {
            Ok(None)
        };
        let skew = policy.inbound.clock_skew_seconds;
        let digest = match self.verified.get(token, secs(now), skew) {
            Some(entry) => Some(entry.digest),
            None if route.target.is_some()
                || policy.audit_log
                || policy.inbound.verified_cache_max_entries > 0 =>
            {
                Some(token_digest(token))
            }
            None => None,
        };
        self.streams.insert(
            context_id,
            Stream {
                started_ms: now,
                route: route_index,
                digest,
                token: token.to_string(),
                principal: None,
                body: if end_of_stream {
                    Body::Complete
                } else {
                    Body::Arriving
                },
                header_call,
                required_scopes: route.required_scopes.clone(),
                tool_label: None,
                target: None,
                cache: CacheUse::None,
                parked_since: None,
                exchange_key: None,
            },
        );
        let step = self.advance(context_id, now);
        Admission::Full(self.finish_now(context_id, step))
    }

    /// The hot path: `Authorization: Bearer <token>` with a token this worker verified before,
    /// on a route without per-tool policy, with a backend token it still holds. Forwards without
    /// parsing, hashing or verifying the token and without touching shared data: a token that
    /// is byte for byte one that passed `extract_bearer` and verification needs neither again.
    /// `None`: take the full path (which also produces every denial, so answers stay in one
    /// place).
    fn forward_cached(
        &mut self,
        route_index: usize,
        authorization: &[u8],
        raw_path: &[u8],
    ) -> Option<Admission> {
        let policy = Rc::clone(&self.policy);
        let route = policy.routes.get(route_index)?;
        if route.inspects_tools() {
            return None;
        }
        let token = bearer_credential(authorization)?;
        if query_has_access_token(raw_path) {
            return None;
        }
        // Expiry is checked against a time no earlier than now (see `clock`): an entry near its
        // end takes the full path, which reads the clock.
        let now = secs(self.clock.not_before_now_ms()?);
        let entry = self
            .verified
            .get_bytes(token, now, policy.inbound.clock_skew_seconds)?;
        if !audience_allowed(&entry.principal, &route.audiences)
            || !missing_scopes(&entry.principal, &route.required_scopes).is_empty()
        {
            return None;
        }
        // (authorization value, fingerprint, exchange key)
        let backend = match &route.target {
            Some(target) => {
                let b = entry.backend(target, now)?;
                Some((
                    Rc::clone(&b.authorization),
                    Rc::clone(&b.fingerprint),
                    b.key,
                ))
            }
            None => None,
        };
        let principal = Rc::clone(&entry.principal);
        let digest = entry.digest;
        let rewritten = match &backend {
            Some((authorization, ..)) => self
                .host
                .set_request_header("authorization", Some(authorization)),
            None if policy.forward_token => Ok(()),
            None => self.host.set_request_header("authorization", None),
        };
        if rewritten.is_err() || self.set_identity_headers(&principal).is_err() {
            return None;
        }
        self.metrics.add(self.allowed_counter);
        let cache = match &backend {
            Some(_) => {
                self.metrics.add(self.cache_hit_counter);
                CacheUse::Hit
            }
            None => CacheUse::None,
        };
        self.audit(&AuditFacts {
            // Decided on arrival, without a callout.
            started_ms: None,
            route: route_index,
            digest: Some(digest),
            principal: Some(&principal),
            tool: None,
            target: route.target.as_deref(),
            cache,
            denied: None,
            exchanged: backend.as_ref().map(|(_, fingerprint, ..)| &**fingerprint),
        });
        Some(Admission::Cached {
            backend_key: backend.map(|(.., key)| key),
        })
    }

    /// Entry point from `on_http_request_body`.
    ///
    /// Envoy delivers no body to a Wasm filter while it holds the headers (proxy-wasm turns a
    /// paused `on_http_request_headers` into "stop all iteration"), so the body of a request on
    /// a route with per-tool policy is checked after its headers were forwarded, before the
    /// body is: the body is held until complete, its tool calls are checked, and a refused call
    /// is answered here, so the upstream gets headers and a reset but never the call.
    pub fn on_request_body(
        &mut self,
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if self.streams.contains_key(&context_id) {
            // Undecided: keep buffering (Envoy normally holds it for us anyway).
            return Action::Pause;
        }
        if !self.body_checks.contains_key(&context_id) {
            return Action::Continue;
        }
        let outcome = if body_size > self.policy.mcp.max_body_bytes {
            Err(Denial::McpBody(BodyError::TooLarge))
        } else if !end_of_stream {
            return Action::Pause;
        } else {
            match read_request_body(&self.host, body_size) {
                Ok(body) => self.check_body_calls(context_id, &body),
                Err(e) => Err(Denial::McpBody(e)),
            }
        };
        let Some(mut check) = self.body_checks.remove(&context_id) else {
            return Action::Continue;
        };
        match outcome {
            Ok(label) => {
                if check.stream.tool_label.is_none() {
                    check.stream.tool_label = label;
                }
                self.metrics.inc("requests.allowed");
                self.audit_stream(&check.stream, None, check.backend_fingerprint.as_deref());
                Action::Continue
            }
            Err(denial) => {
                self.streams.insert(context_id, check.stream);
                self.answer(context_id, &denial);
                Action::Pause
            }
        }
    }

    /// The body's calls against the route's tool policy (and against the `Mcp-Method`/`Mcp-Name`
    /// headers the forwarded token was chosen by). Ok carries the tool label for audit.
    fn check_body_calls(
        &mut self,
        context_id: u32,
        body: &mcp::Body,
    ) -> Result<Option<String>, Denial> {
        let policy = Rc::clone(&self.policy);
        let Some(check) = self.body_checks.get_mut(&context_id) else {
            return Err(Denial::Internal);
        };
        let route = &policy.routes[check.stream.route];
        if let Ok(Some(named)) = &check.stream.header_call {
            // The token was chosen for the call the headers named; the body must be that call.
            mcp::check_announced(named, body).map_err(Denial::McpBody)?;
        }
        let req = tool_requirements(route, &body.calls);
        check.stream.tool_label = req.label.clone();
        if req.unlisted.is_some() {
            return Err(Denial::ToolNotAllowed);
        }
        for s in &req.scopes {
            if !check.stream.required_scopes.contains(s) {
                check.stream.required_scopes.push(s.clone());
            }
        }
        let Some(principal) = check.stream.principal.clone() else {
            return Err(Denial::Internal);
        };
        let missing = missing_scopes(&principal, &check.stream.required_scopes);
        if !missing.is_empty() {
            return Err(Denial::InsufficientScope { missing });
        }
        Ok(req.label)
    }

    /// Verify → audience → scopes → tools → cached token or exchange.
    fn advance(&mut self, context_id: u32, now: u64) -> Step {
        let policy = Rc::clone(&self.policy);
        let (token, digest, route_index) = match self.streams.get(&context_id) {
            Some(s) => (s.token.clone(), s.digest, s.route),
            None => return Step::Deny(Denial::Internal),
        };
        let digest = digest.unwrap_or_else(|| token_digest(&token));
        let route = &policy.routes[route_index];
        let principal = match self.principal(&token, Some(&digest), now, false) {
            Ok(p) => p,
            Err(PrincipalWait::Deny(d)) => return Step::Deny(d),
            Err(PrincipalWait::Park) => return self.park(context_id, now),
        };
        if let Some(s) = self.streams.get_mut(&context_id) {
            s.principal = Some(Rc::clone(&principal));
        }
        if !audience_allowed(&principal, &route.audiences) {
            return Step::Deny(Denial::WrongAudience);
        }
        let missing = missing_scopes(&principal, &route.required_scopes);
        if !missing.is_empty() {
            return Step::Deny(Denial::InsufficientScope { missing });
        }
        let Some(stream) = self.streams.get_mut(&context_id) else {
            return Step::Deny(Denial::Internal);
        };
        let header_call = match &stream.header_call {
            Ok(call) => call.as_ref(),
            Err(e) => return Step::Deny(Denial::McpBody(e.clone())),
        };
        if let Some(call) = header_call {
            let req = tool_requirements(route, std::slice::from_ref(call));
            stream.tool_label = req.label;
            if req.unlisted.is_some() {
                return Step::Deny(Denial::ToolNotAllowed);
            }
            for s in req.scopes {
                if !stream.required_scopes.contains(&s) {
                    stream.required_scopes.push(s);
                }
            }
            stream.target = req.target;
        }
        let missing = missing_scopes(&principal, &stream.required_scopes);
        if !missing.is_empty() {
            return Step::Deny(Denial::InsufficientScope { missing });
        }
        let Some(target) = stream.target.clone().or_else(|| route.target.clone()) else {
            return Step::Forward(Upstream::Validated);
        };
        stream.target = Some(Rc::clone(&target));
        self.exchange(context_id, &token, &digest, &principal, target, now)
    }

    /// The verified principal for `token`: from the verified-token cache, or by verifying.
    /// `after_fetch`: the key set was just refetched, so an unknown `kid` is final.
    fn principal(
        &mut self,
        token: &str,
        digest: Option<&Digest32>,
        now_ms: u64,
        after_fetch: bool,
    ) -> Result<Rc<Principal>, PrincipalWait> {
        let now = secs(now_ms);
        let digest = || digest.copied().unwrap_or_else(|| token_digest(token));
        let skew = self.policy.inbound.clock_skew_seconds;
        if let Some(entry) = self.verified.get(token, now, skew) {
            return Ok(Rc::clone(&entry.principal));
        }
        let Some(keys) = self.keys.keys.clone() else {
            return Err(PrincipalWait::Park);
        };
        match verify::verify(token, &keys, &self.policy.inbound, now) {
            Ok(p) => {
                let p = Rc::new(p);
                if self.policy.inbound.verified_cache_max_entries > 0 {
                    self.verified.put(token, digest(), Rc::clone(&p));
                }
                Ok(p)
            }
            Err(VerifyError::Invalid(e)) => {
                debug!("token {} rejected: {e}", fingerprint(&digest()));
                Err(PrincipalWait::Deny(Denial::Token(e)))
            }
            Err(VerifyError::NoKeys) => Err(PrincipalWait::Park),
            Err(VerifyError::UnknownKid) if after_fetch => {
                Err(PrincipalWait::Deny(Denial::Token(TokenError::UnknownKey)))
            }
            Err(VerifyError::UnknownKid) => {
                if self.may_refetch(now_ms) {
                    info!(
                        "token {} names an unknown key; refetching the JWKS",
                        fingerprint(&digest())
                    );
                    self.start_jwks_fetch(now_ms);
                }
                if self.keys.in_flight.is_some() {
                    Err(PrincipalWait::Park)
                } else {
                    Err(PrincipalWait::Deny(Denial::Token(TokenError::UnknownKey)))
                }
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
        if let Some(s) = self.streams.get_mut(&context_id) {
            s.exchange_key = Some(subject.key);
        }
        if let Some((backend, until)) = self.store.get(&self.host, &subject.key, secs(now_ms)) {
            self.set_cache_use(context_id, CacheUse::Hit);
            return Step::Forward(Upstream::Exchanged {
                token: backend.into(),
                until: Some(until),
            });
        }
        // Same token already being exchanged by this worker: wait on that callout.
        if let Some(Callout::Exchange { waiters, .. }) = self
            .in_flight
            .get(&subject.key)
            .and_then(|id| self.callouts.get_mut(id))
        {
            waiters.push(context_id);
            self.set_cache_use(context_id, CacheUse::Coalesced);
            return Step::Wait;
        }
        let lease_ttl = target.timeout.as_millis() as u64 + 1000;
        match self
            .store
            .try_lease(&self.host, &subject.key, self.worker_id, now_ms, lease_ttl)
        {
            LeaseOutcome::Acquired => {
                self.set_cache_use(context_id, CacheUse::Miss);
                self.dispatch_exchange(token, subject, target, vec![context_id], now_ms)
            }
            LeaseOutcome::Failed(e) => Step::Deny(Denial::Exchange(e)),
            LeaseOutcome::HeldElsewhere => {
                self.set_cache_use(context_id, CacheUse::Coalesced);
                self.remote_waiters.push(RemoteWaiter {
                    context_id,
                    subject,
                    target,
                    since_ms: now_ms,
                });
                self.set_fast_tick(true);
                Step::Wait
            }
        }
    }

    fn set_cache_use(&mut self, context_id: u32, cache: CacheUse) {
        if let Some(s) = self.streams.get_mut(&context_id) {
            s.cache = cache;
        }
        self.metrics.inc(match cache {
            CacheUse::Hit => "cache.hits",
            CacheUse::Miss => "cache.misses",
            CacheUse::Coalesced => "cache.coalesced",
            CacheUse::None => return,
        });
    }

    fn dispatch_exchange(
        &mut self,
        token: &str,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        now_ms: u64,
    ) -> Step {
        let nonce = self.nonce(now_ms);
        let request = match ExchangeRequest::build(&target, token, secs(now_ms), &nonce) {
            Ok(r) => r,
            Err(e) => {
                warn!("token exchange request could not be built: {e}");
                self.release_lease(&subject.key, None, now_ms);
                return Step::Deny(Denial::Internal);
            }
        };
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        match self.host.dispatch(
            &target.cluster,
            &headers,
            Some(&request.body),
            target.timeout,
        ) {
            Ok(id) => {
                self.in_flight.insert(subject.key, id);
                self.callouts.insert(
                    id,
                    Callout::Exchange {
                        subject,
                        target,
                        started_ms: now_ms,
                        waiters,
                    },
                );
                Step::Wait
            }
            Err(HostError) => {
                warn!(
                    "token exchange callout to cluster {} could not be dispatched",
                    target.cluster
                );
                let e = ExchangeError::Unavailable {
                    status: None,
                    retry_after: None,
                };
                self.metrics.inc("exchanges.unavailable");
                self.release_lease(&subject.key, Some(&e), now_ms);
                Step::Deny(Denial::Exchange(e))
            }
        }
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

    /// Ends this worker's lease on `key` (see `ExchangeStore::release`): a failure is shared
    /// with the other workers' waiting requests for `FAILURE_TTL_MS`.
    fn release_lease(&self, key: &Digest32, failure: Option<&ExchangeError>, now_ms: u64) {
        self.store.release(
            &self.host,
            key,
            self.worker_id,
            failure,
            now_ms,
            FAILURE_TTL_MS,
        );
    }

    fn set_fast_tick(&mut self, fast: bool) {
        if self.fast_tick != fast {
            self.fast_tick = fast;
            self.host
                .set_tick_period(if fast { FAST_TICK } else { TICK });
        }
    }

    fn park(&mut self, context_id: u32, now_ms: u64) -> Step {
        let parked = self
            .streams
            .values()
            .filter(|s| s.parked_since.is_some())
            .count();
        if !matches!(self.policy.keys, KeySource::Remote(_)) || parked >= MAX_PARKED {
            return Step::Deny(Denial::KeysUnavailable);
        }
        if self.keys.in_flight.is_none() {
            self.start_jwks_fetch(now_ms);
        }
        if let Some(s) = self.streams.get_mut(&context_id) {
            s.parked_since.get_or_insert(now_ms);
        }
        Step::Wait
    }

    fn remote(&self) -> Option<&RemoteJwks> {
        match &self.policy.keys {
            KeySource::Remote(r) => Some(r),
            KeySource::Inline(_) => None,
        }
    }

    /// An unknown `kid` may mean the issuer rotated keys. Refetch, but at most once per
    /// `min_refetch_interval`, so a flood of made-up `kid`s cannot become a flood of fetches.
    fn may_refetch(&self, now_ms: u64) -> bool {
        let Some(remote) = self.remote() else {
            return false;
        };
        if self.keys.in_flight.is_some() {
            return false;
        }
        match self.keys.last_attempt_ms {
            Some(last) => {
                now_ms.saturating_sub(last) >= remote.min_refetch_interval.as_millis() as u64
            }
            None => true,
        }
    }

    fn start_jwks_fetch(&mut self, now_ms: u64) {
        let Some(remote) = self.remote().cloned() else {
            return;
        };
        self.keys.last_attempt_ms = Some(now_ms);
        let headers = vec![
            (":method", "GET"),
            (":path", remote.path.as_str()),
            (":authority", remote.authority.as_str()),
            ("accept", "application/json"),
        ];
        match self
            .host
            .dispatch(&remote.cluster, &headers, None, remote.timeout)
        {
            Ok(id) => {
                self.keys.in_flight = Some((id, now_ms));
                self.callouts.insert(id, Callout::Jwks);
            }
            Err(HostError) => {
                self.metrics.inc("jwks.fetch_failed");
                warn!(
                    "JWKS callout to cluster {} could not be dispatched",
                    remote.cluster
                )
            }
        }
    }

    /// Periodic work from the root context's tick.
    pub fn on_tick(&mut self) {
        let now = self.clock.observe(self.host.now_ms());
        self.metrics.flush(&self.host);
        self.poll_remote_waiters(now);
        if let Some(remote) = self.remote().cloned() {
            self.tick_keys(&remote, now);
        }
        self.sweep_stale_exchanges(now);
        if now.saturating_sub(self.last_sweep_ms) >= TICK.as_millis() as u64 {
            self.store
                .sweep(&self.host, secs(now), SWEEP_SLOTS_PER_TICK);
            self.last_sweep_ms = now;
            // Another worker dropped a backend token the upstream rejected: the copies this
            // worker keeps in front of the store may include it.
            let generation = self.store.generation(&self.host);
            if generation != self.store_generation {
                self.store_generation = generation;
                self.verified.forget_backends();
            }
            if now % 10_000 < TICK.as_millis() as u64 {
                self.verified
                    .sweep(secs(now), self.policy.inbound.clock_skew_seconds);
            }
        }
    }

    fn tick_keys(&mut self, remote: &RemoteJwks, now: u64) {
        // A fetch whose response never came (its context went away) must not block forever.
        if let Some((id, started)) = self.keys.in_flight {
            if now.saturating_sub(started) > remote.timeout.as_millis() as u64 + 1000 {
                self.callouts.remove(&id);
                self.keys.in_flight = None;
            }
        }
        let retry = JWKS_RETRY.as_millis() as u64;
        let due = match (self.keys.fetched_ms, self.keys.last_attempt_ms) {
            (_, None) => true,
            (None, Some(last)) => now.saturating_sub(last) >= retry,
            (Some(fetched), Some(last)) => {
                now.saturating_sub(fetched) >= remote.refresh_interval.as_millis() as u64
                    && now.saturating_sub(last) >= retry
            }
        };
        if due && self.keys.in_flight.is_none() {
            self.start_jwks_fetch(now);
        }
        let max_wait = remote.max_wait.as_millis() as u64;
        let expired: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.parked_since
                    .is_some_and(|since| now.saturating_sub(since) >= max_wait)
            })
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            warn!(
                "{} request(s) waited {max_wait} ms for the JWKS; answering 503",
                expired.len()
            );
        }
        for id in expired {
            self.finish_resumed(id, Step::Deny(Denial::KeysUnavailable));
        }
    }

    /// Requests waiting on another worker's exchange: served from the shared store when it lands,
    /// answered with its failure, or exchanged here if that worker's lease ran out.
    fn poll_remote_waiters(&mut self, now: u64) {
        if self.remote_waiters.is_empty() {
            self.set_fast_tick(false);
            return;
        }
        for w in std::mem::take(&mut self.remote_waiters) {
            if !self.streams.contains_key(&w.context_id) {
                continue;
            }
            if let Some((backend, until)) = self.store.get(&self.host, &w.subject.key, secs(now)) {
                let upstream = Upstream::Exchanged {
                    token: backend.into(),
                    until: Some(until),
                };
                self.finish_resumed(w.context_id, Step::Forward(upstream));
                continue;
            }
            let lease_ttl = w.target.timeout.as_millis() as u64 + 1000;
            match self.store.lease_status(&self.host, &w.subject.key, now) {
                LeaseStatus::InProgress if now.saturating_sub(w.since_ms) <= lease_ttl + 1000 => {
                    self.remote_waiters.push(w)
                }
                LeaseStatus::InProgress => self.finish_resumed(
                    w.context_id,
                    Step::Deny(Denial::Exchange(ExchangeError::Timeout)),
                ),
                LeaseStatus::Failed(e) => {
                    self.finish_resumed(w.context_id, Step::Deny(Denial::Exchange(e)))
                }
                LeaseStatus::Free => {
                    // The other worker's exchange ended without a cached token (or vanished):
                    // join ours if one is in flight, else take over.
                    if let Some(Callout::Exchange { waiters, .. }) = self
                        .in_flight
                        .get(&w.subject.key)
                        .and_then(|id| self.callouts.get_mut(id))
                    {
                        waiters.push(w.context_id);
                        continue;
                    }
                    match self.store.try_lease(
                        &self.host,
                        &w.subject.key,
                        self.worker_id,
                        now,
                        lease_ttl,
                    ) {
                        LeaseOutcome::Acquired => {
                            let token = self
                                .streams
                                .get(&w.context_id)
                                .map(|s| s.token.clone())
                                .unwrap_or_default();
                            let step = self.dispatch_exchange(
                                &token,
                                w.subject,
                                w.target,
                                vec![w.context_id],
                                now,
                            );
                            self.finish_resumed(w.context_id, step);
                        }
                        LeaseOutcome::Failed(e) => {
                            self.finish_resumed(w.context_id, Step::Deny(Denial::Exchange(e)))
                        }
                        LeaseOutcome::HeldElsewhere => self.remote_waiters.push(w),
                    }
                }
            }
        }
        self.set_fast_tick(!self.remote_waiters.is_empty());
    }

    /// An exchange whose callout was cancelled (the dispatching request went away) never
    /// answers; fail its other waiters instead of leaving them paused.
    fn sweep_stale_exchanges(&mut self, now: u64) {
        let stale: Vec<u32> = self
            .callouts
            .iter()
            .filter_map(|(id, c)| match c {
                Callout::Exchange {
                    started_ms, target, ..
                } if now.saturating_sub(*started_ms) > target.timeout.as_millis() as u64 + 2000 => {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for id in stale {
            if let Some(Callout::Exchange {
                subject, waiters, ..
            }) = self.callouts.remove(&id)
            {
                self.in_flight.remove(&subject.key);
                let e = ExchangeError::Timeout;
                self.release_lease(&subject.key, Some(&e), now);
                for w in waiters {
                    self.finish_resumed(w, Step::Deny(Denial::Exchange(e.clone())));
                }
            }
        }
    }

    /// A callout answered; whichever context received it hands it here.
    pub fn on_http_call_response(&mut self, token_id: u32, body_size: usize) {
        let Some(callout) = self.callouts.remove(&token_id) else {
            return;
        };
        let headers = self.host.callout_headers();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        };
        let status = header(":status")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok());
        let limit = match callout {
            Callout::Jwks => MAX_JWKS_BYTES,
            Callout::Exchange { .. } => MAX_RESPONSE_BYTES,
        };
        let body = if body_size > limit {
            // Too large to be what we asked for: leave it unread; the parsers see the size.
            vec![b' '; limit + 1]
        } else if body_size == 0 {
            Vec::new()
        } else {
            self.host.callout_body(body_size).unwrap_or_default()
        };
        let now = self.clock.observe(self.host.now_ms());
        match callout {
            Callout::Jwks => self.on_jwks_response(status, &body, now),
            Callout::Exchange {
                subject,
                target,
                started_ms,
                waiters,
            } => {
                let retry_after = header("retry-after");
                let outcome = exchange::parse_response(status, &body, retry_after);
                self.on_exchange_response(
                    subject, &target, started_ms, waiters, outcome, &body, now,
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_exchange_response(
        &mut self,
        subject: Subject,
        target: &ExchangeTarget,
        started_ms: u64,
        waiters: Vec<u32>,
        outcome: Result<exchange::Exchanged, ExchangeError>,
        body: &[u8],
        now: u64,
    ) {
        self.in_flight.remove(&subject.key);
        let elapsed = now.saturating_sub(started_ms);
        self.metrics
            .record(&self.host, "exchange.latency_ms", elapsed);
        let outcome = match outcome {
            // No response at all, at the timeout: Envoy gave up waiting.
            Err(ExchangeError::Unavailable { status: None, .. })
                if elapsed + 50 >= target.timeout.as_millis() as u64 =>
            {
                Err(ExchangeError::Timeout)
            }
            other => other,
        };
        let step = match outcome {
            Ok(exchanged) => {
                self.metrics.inc("exchanges.ok");
                let until = exchange::reusable_until(
                    &exchanged,
                    subject.expires_at,
                    secs(now),
                    target.cache_margin_seconds,
                );
                info!(
                    "exchanged token {} for sub {} in {elapsed} ms (backend token {}, reusable {})",
                    subject.fingerprint,
                    subject.sub,
                    fingerprint(&token_digest(&exchanged.access_token)),
                    until.map_or("no".to_string(), |u| format!("{}s", u - secs(now)))
                );
                if let Some(until) = until {
                    self.store
                        .put(&self.host, &subject.key, &exchanged.access_token, until);
                }
                self.release_lease(&subject.key, None, now);
                Step::Forward(Upstream::Exchanged {
                    token: exchanged.access_token.into(),
                    until,
                })
            }
            Err(e) => {
                let denial = Denial::Exchange(e.clone());
                self.metrics.inc(&format!(
                    "exchanges.{}",
                    denial.reason().trim_start_matches("exchange_")
                ));
                let idp_said = describe_error_body(body)
                    .map(|d| format!("; IdP said: {d}"))
                    .unwrap_or_default();
                warn!(
                    "token exchange for token {} failed after {elapsed} ms: {e}{idp_said}",
                    subject.fingerprint
                );
                self.release_lease(&subject.key, Some(&e), now);
                Step::Deny(denial)
            }
        };
        for w in waiters {
            self.finish_resumed(w, step.clone());
        }
    }

    fn on_jwks_response(&mut self, status: Option<u16>, body: &[u8], now: u64) {
        self.keys.in_flight = None;
        let loaded = match status {
            Some(200) => match KeySet::parse(body) {
                Ok(set) if !set.keys.is_empty() => {
                    if !set.skipped.is_empty() {
                        warn!(
                            "JWKS: skipped {} key(s): {}",
                            set.skipped.len(),
                            set.skipped.join("; ")
                        );
                    }
                    info!("JWKS loaded: {} key(s)", set.keys.len());
                    let withdrawn = self
                        .keys
                        .keys
                        .as_ref()
                        .is_some_and(|old| old.keys.iter().any(|k| !set.keys.contains(k)));
                    if withdrawn {
                        // A key was withdrawn (or replaced under its `kid`): tokens verified
                        // with it must not stay accepted from the cache until their `exp`.
                        info!("a signing key left the JWKS; forgetting verified tokens");
                        self.verified.clear();
                    }
                    self.keys.keys = Some(Rc::new(set));
                    self.keys.fetched_ms = Some(now);
                    true
                }
                Ok(set) => {
                    warn!(
                        "JWKS has no usable key ({}); keeping the previous key set",
                        set.skipped.join("; ")
                    );
                    false
                }
                Err(e) => {
                    warn!("JWKS unusable: {e}; keeping the previous key set");
                    false
                }
            },
            Some(s) => {
                warn!("JWKS fetch answered HTTP {s}; keeping the previous key set");
                false
            }
            None => {
                warn!("JWKS fetch failed (connection failed, reset or timed out); keeping the previous key set");
                false
            }
        };
        self.metrics.inc(if loaded {
            "jwks.fetch_ok"
        } else {
            "jwks.fetch_failed"
        });
        if self.keys.keys.is_none() {
            // Still no keys: parked requests keep waiting for the retry, bounded by max_wait.
            return;
        }
        // Every parked request gets another go, with the new keys or the old ones (then an
        // unknown kid is a plain 401, since we just fetched).
        let parked: Vec<u32> = self
            .streams
            .iter_mut()
            .filter_map(|(id, s)| s.parked_since.take().map(|_| *id))
            .collect();
        for id in parked {
            let Some((token, digest)) = self.streams.get(&id).map(|s| (s.token.clone(), s.digest))
            else {
                continue;
            };
            let step = match self.principal(&token, digest.as_ref(), now, true) {
                Ok(_) => self.advance(id, now),
                Err(PrincipalWait::Deny(d)) => Step::Deny(d),
                Err(PrincipalWait::Park) => Step::Deny(Denial::KeysUnavailable),
            };
            self.finish_resumed(id, step);
        }
    }

    /// Applies a step inside the request's own callback (headers or body).
    fn finish_now(&mut self, context_id: u32, step: Step) -> Action {
        match step {
            Step::Wait => Action::Pause,
            Step::Forward(upstream) => {
                if self.forward(context_id, &upstream).is_ok() {
                    Action::Continue
                } else {
                    self.answer(context_id, &Denial::Internal);
                    Action::Pause
                }
            }
            Step::Deny(denial) => {
                self.answer(context_id, &denial);
                Action::Pause
            }
        }
    }

    /// Applies a step to a paused request from another callback.
    fn finish_resumed(&mut self, context_id: u32, step: Step) {
        // Only undecided requests are in `streams`: never answer or resume a request twice.
        if matches!(step, Step::Wait) || !self.streams.contains_key(&context_id) {
            return;
        }
        if self.host.set_effective_context(context_id).is_err() {
            // The request is gone (client disconnected); nothing to answer.
            self.streams.remove(&context_id);
            return;
        }
        match step {
            Step::Forward(upstream) => {
                if self.forward(context_id, &upstream).is_ok() {
                    self.host.resume_request();
                } else {
                    self.answer(context_id, &Denial::Internal);
                }
            }
            Step::Deny(denial) => self.answer(context_id, &denial),
            Step::Wait => {}
        }
    }

    /// Rewrites the request for the upstream: the backend token replaces the client's, and the
    /// identity headers are set from the verified claims (client-sent values never survive).
    fn forward(&mut self, context_id: u32, upstream: &Upstream) -> Result<(), HostError> {
        let Some(stream) = self.streams.remove(&context_id) else {
            return Err(HostError);
        };
        let backend_fingerprint = match upstream {
            Upstream::Exchanged { token, until } => {
                let authorization: Rc<str> = format!("Bearer {token}").into();
                self.host
                    .set_request_header("authorization", Some(&authorization))?;
                let fingerprint: Rc<str> = fingerprint(&token_digest(token)).into();
                if let (Some(until), Some(target), Some(key), true) = (
                    until,
                    &stream.target,
                    stream.exchange_key,
                    self.store.enabled(),
                ) {
                    // Keep it in front of the shared store: this worker's next request with
                    // the same token skips hashing, verifying and shared data.
                    self.verified.remember_backend(
                        &stream.token,
                        CachedBackend {
                            target: Rc::clone(target),
                            authorization,
                            fingerprint: Rc::clone(&fingerprint),
                            until: *until,
                            key,
                        },
                    );
                }
                Some(fingerprint)
            }
            Upstream::Validated if self.policy.forward_token => None,
            Upstream::Validated => {
                self.host.set_request_header("authorization", None)?;
                None
            }
        };
        if let Some(p) = stream.principal.clone() {
            self.set_identity_headers(&p)?;
        }
        if let Some(key) = stream.exchange_key {
            self.forwarded.insert(context_id, key);
        }
        if self.policy.routes[stream.route].inspects_tools() && stream.body == Body::Arriving {
            // Allowed so far; the body's tool calls decide (see `on_request_body`).
            self.body_checks.insert(
                context_id,
                BodyCheck {
                    stream,
                    backend_fingerprint,
                },
            );
            return Ok(());
        }
        self.metrics.inc("requests.allowed");
        self.audit_stream(&stream, None, backend_fingerprint.as_deref());
        Ok(())
    }

    /// Identity headers from the verified claims; a header whose claim is absent is removed,
    /// so a client-sent value never reaches the upstream.
    fn set_identity_headers(&self, p: &Principal) -> Result<(), HostError> {
        for (header, claim) in &self.policy.identity_headers {
            let value = identity_value(p, *claim);
            self.host.set_request_header(header, value.as_deref())?;
        }
        Ok(())
    }

    fn answer(&mut self, context_id: u32, denial: &Denial) {
        let stream = self.streams.remove(&context_id);
        let route = stream
            .as_ref()
            .and_then(|s| self.policy.routes.get(s.route));
        let scopes = stream
            .as_ref()
            .map(|s| s.required_scopes.clone())
            .unwrap_or_default();
        let challenge = route.map(|r| r.challenge.clone()).unwrap_or_default();
        self.metrics
            .inc(&format!("requests.denied.{}", denial.reason()));
        let reply = denial.reply(&challenge, &scopes);
        if let Some(s) = &stream {
            self.audit_stream(s, Some((denial, reply.status)), None);
        }
        send_reply(&self.host, &reply);
    }

    /// Denials before a request has state (no route, no token).
    fn deny_unrouted(&mut self, denial: Denial) -> Action {
        self.metrics
            .inc(&format!("requests.denied.{}", denial.reason()));
        send_reply(&self.host, &denial.reply(&Default::default(), &[]));
        Action::Pause
    }

    /// A path the filter will not decide on (see `request_path`): refused before any route is
    /// chosen, with the reason in the audit record.
    fn deny_path(&mut self, error: PathError) -> Action {
        let denial = Denial::Path(error);
        let reply = denial.reply(&Default::default(), &[]);
        self.metrics
            .inc(&format!("requests.denied.{}", denial.reason()));
        if self.policy.audit_log {
            info!(
                "{}",
                AuditRecord {
                    time_ms: self.host.now_ms(),
                    allowed: false,
                    reason: denial.reason(),
                    detail: Some(error.as_str()),
                    status: Some(reply.status),
                    ..AuditRecord::default()
                }
                .to_json()
            );
        }
        send_reply(&self.host, &reply);
        Action::Pause
    }

    fn deny_early(&mut self, route: usize, now: u64, denial: Denial, scopes: &[String]) -> Action {
        let r = &self.policy.routes[route];
        let reply = denial.reply(&r.challenge, scopes);
        self.metrics
            .inc(&format!("requests.denied.{}", denial.reason()));
        if self.policy.audit_log {
            info!(
                "{}",
                AuditRecord {
                    time_ms: now,
                    allowed: false,
                    reason: denial.reason(),
                    status: Some(reply.status),
                    route: Some(&r.name),
                    ..AuditRecord::default()
                }
                .to_json()
            );
        }
        send_reply(&self.host, &reply);
        Action::Pause
    }

    /// Public routes and passed-through unmatched paths: no authentication, and nothing of the
    /// client's credentials or claimed identity reaches the upstream.
    fn pass_unauthenticated(&mut self) -> Action {
        let _ = self.host.set_request_header("authorization", None);
        for (header, _) in &self.policy.identity_headers {
            let _ = self.host.set_request_header(header, None);
        }
        self.metrics.inc("requests.public");
        Action::Continue
    }

    fn audit_stream(
        &self,
        stream: &Stream,
        denied: Option<(&Denial, u32)>,
        backend_fingerprint: Option<&str>,
    ) {
        self.audit(&AuditFacts {
            started_ms: Some(stream.started_ms),
            route: stream.route,
            digest: stream.digest,
            principal: stream.principal.as_deref(),
            tool: stream.tool_label.as_deref(),
            target: stream.target.as_deref(),
            cache: stream.cache,
            denied,
            exchanged: backend_fingerprint,
        });
    }

    fn audit(&self, facts: &AuditFacts<'_>) {
        if !self.policy.audit_log {
            return;
        }
        let now = self.host.now_ms();
        let principal = facts.principal;
        let token_label = principal
            .and_then(|p| p.jti.as_deref())
            .map(sanitize)
            .or_else(|| facts.digest.map(|d| fingerprint(&d)))
            .unwrap_or_else(|| "-".to_string());
        let sub = principal.map(|p| sanitize(&p.sub));
        let client_id = principal.and_then(|p| p.client_id.as_deref()).map(sanitize);
        let record = AuditRecord {
            time_ms: now,
            detail: None,
            allowed: facts.denied.is_none(),
            reason: facts.denied.map_or(
                if facts.target.is_some() {
                    "exchanged"
                } else {
                    "validated"
                },
                |(d, _)| d.reason(),
            ),
            status: facts.denied.map(|(_, s)| s),
            sub: sub.as_deref(),
            client_id: client_id.as_deref(),
            token: Some(token_label),
            route: self.policy.routes.get(facts.route).map(|r| r.name.as_str()),
            tool: facts.tool,
            target_audience: facts.target.and_then(|t| t.audience.as_deref()),
            target_scope: facts.target.and_then(|t| t.scope.as_deref()),
            exchanged: facts.exchanged,
            cache: Some(facts.cache),
            latency_ms: facts
                .started_ms
                .map_or(0, |started| now.saturating_sub(started)),
        };
        info!("{}", record.to_json());
    }
}

/// What an audit line says about one request.
struct AuditFacts<'a> {
    /// When the request arrived; `None` when it was decided on arrival.
    started_ms: Option<u64>,
    route: usize,
    digest: Option<Digest32>,
    principal: Option<&'a Principal>,
    tool: Option<&'a str>,
    target: Option<&'a ExchangeTarget>,
    cache: CacheUse,
    denied: Option<(&'a Denial, u32)>,
    exchanged: Option<&'a str>,
}

enum PrincipalWait {
    Deny(Denial),
    /// Keys are missing or being refetched: park the request.
    Park,
}

fn identity_value(p: &Principal, claim: IdentityClaim) -> Option<String> {
    let v = match claim {
        IdentityClaim::Sub => Some(p.sub.clone()),
        IdentityClaim::ClientId => p.client_id.clone(),
        IdentityClaim::Email => p.email.clone(),
        IdentityClaim::Jti => p.jti.clone(),
        IdentityClaim::Scope => Some(p.scopes.join(" ")),
        IdentityClaim::Iss => None,
    }?;
    // Header values must not carry control characters; a claim that has them is not forwarded.
    (!v.chars().any(|c| c.is_control())).then_some(v)
}

fn read_request_body(host: &impl Host, body_size: usize) -> Result<mcp::Body, BodyError> {
    if body_size == 0 {
        return Ok(mcp::Body::default());
    }
    let body = host.request_body(body_size).unwrap_or_default();
    mcp::calls_in_body(&body)
}

fn send_reply(host: &impl Host, reply: &crate::reply::Reply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    host.send_reply(reply.status, &headers, Some(reply.body.as_bytes()));
}

/// RFC 9728 metadata, readable by browser-based MCP clients (CORS).
fn serve_metadata(host: &impl Host, method: &[u8], document: &str) -> Action {
    let cors = [
        ("access-control-allow-origin", "*"),
        ("access-control-allow-methods", "GET, HEAD, OPTIONS"),
        ("access-control-allow-headers", "*"),
        ("access-control-max-age", "86400"),
    ];
    match method {
        b"OPTIONS" => {
            host.send_reply(204, &cors, None);
        }
        b"GET" | b"HEAD" => {
            let mut headers = cors.to_vec();
            headers.push(("content-type", "application/json"));
            headers.push(("cache-control", "public, max-age=300"));
            let body = (method == b"GET").then_some(document.as_bytes());
            host.send_reply(200, &headers, body);
        }
        _ => {
            host.send_reply(
                405,
                &[("allow", "GET, HEAD, OPTIONS"), ("content-type", "application/json")],
                Some(br#"{"error":"invalid_request","error_description":"metadata is read with GET"}"#),
            );
        }
    }
    Action::Pause
}
