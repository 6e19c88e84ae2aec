//! Per-VM state shared by the root context and every HTTP context of one Envoy worker, and the
//! request flow that uses it: extract → verify → authorize → exchange (or cache) → rewrite.
//!
//! Work that completes asynchronously (a key set arriving, an exchange answering, another worker
//! finishing an exchange) may finish a request other than the one whose callback is running: many
//! requests wait on one JWKS fetch, and concurrent requests with the same token wait on one
//! exchange. Those requests are acted on through `set_effective_context`, so the flow lives here
//! rather than in any one context.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::cache::{
    exchange_key, fingerprint, token_digest, Digest32, ExchangeStore, LeaseOutcome, LeaseStatus,
    VerifiedTokens,
};
use crate::config::{KeySource, Policy, RemoteJwks};
use crate::exchange::{
    self, describe_error_body, ExchangeError, ExchangeRequest, MAX_RESPONSE_BYTES,
};
use crate::host::{now_ms, HostStore};
use crate::jwks::{sanitize, KeySet, MAX_JWKS_BYTES};
use crate::reply::Denial;
use crate::token::extract_bearer;
use crate::verify::{self, missing_scopes, Principal, TokenError, VerifyError};

/// Requests parked for a key set, at most. Beyond this, new ones are answered 503 at once so a
/// flood during an IdP outage cannot grow memory without bound.
const MAX_PARKED: usize = 4096;
/// Retry a failed JWKS fetch after this long (the refresh interval applies once keys are held).
const JWKS_RETRY: Duration = Duration::from_secs(2);
/// Normal tick period: bounds how late a JWKS retry or a wait timeout is noticed.
pub const TICK: Duration = Duration::from_millis(500);
/// Tick period while requests wait on another worker's exchange (they poll the shared store).
const FAST_TICK: Duration = Duration::from_millis(20);
/// How long a failed exchange's outcome is shared with other workers' waiting requests.
const FAILURE_TTL_MS: u64 = 1000;
/// Expired exchange-store slots blanked per tick.
const SWEEP_SLOTS_PER_TICK: u64 = 64;

fn secs(ms: u64) -> i64 {
    (ms / 1000) as i64
}

/// What the flow decided for one request.
#[derive(Clone)]
enum Step {
    /// Forward upstream with this backend token.
    Forward(String),
    /// Answer the client now.
    Deny(Denial),
    /// Stay paused: a callout or another worker will finish the request.
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
        started_ms: u64,
        /// Requests (context ids) waiting on this exchange, the dispatching one first.
        waiters: Vec<u32>,
    },
}

/// A request waiting for the issuer's keys.
struct Parked {
    context_id: u32,
    token: String,
    since_ms: u64,
}

/// A request waiting for another worker's exchange of the same token.
struct RemoteWaiter {
    context_id: u32,
    token: String,
    subject: Subject,
    since_ms: u64,
}

#[derive(Default)]
struct KeyState {
    keys: Option<Rc<KeySet>>,
    fetched_ms: Option<u64>,
    /// Callout token and start time of the fetch in flight.
    in_flight: Option<(u32, u64)>,
    last_attempt_ms: Option<u64>,
}

pub struct Gateway {
    pub policy: Rc<Policy>,
    target_identity: String,
    worker_id: u32,
    keys: KeyState,
    verified: VerifiedTokens,
    store: ExchangeStore,
    callouts: HashMap<u32, Callout>,
    /// This worker's exchanges in flight, by exchange key → callout token.
    in_flight: HashMap<Digest32, u32>,
    parked: Vec<Parked>,
    remote_waiters: Vec<RemoteWaiter>,
    fast_tick: bool,
    last_sweep_ms: u64,
}

impl Gateway {
    /// `namespace` separates this configuration's shared data from any other's; `worker_id` is
    /// unique among the VMs sharing it.
    pub fn new(policy: Policy, namespace: &str, worker_id: u32) -> Self {
        let keys = match &policy.keys {
            KeySource::Inline(set) => KeyState {
                keys: Some(Rc::new(set.clone())),
                ..KeyState::default()
            },
            KeySource::Remote(_) => KeyState::default(),
        };
        Self {
            target_identity: policy.exchange.cache_identity(),
            worker_id,
            verified: VerifiedTokens::new(policy.inbound.verified_cache_max_entries),
            store: ExchangeStore::new(namespace, policy.exchange.cache_max_entries),
            policy: Rc::new(policy),
            keys,
            callouts: HashMap::new(),
            in_flight: HashMap::new(),
            parked: Vec::new(),
            remote_waiters: Vec::new(),
            fast_tick: false,
            last_sweep_ms: 0,
        }
    }

    fn exchange_key_for(&self, digest: &Digest32) -> Digest32 {
        exchange_key(digest, &self.target_identity)
    }

    /// Drops a cached exchanged token (the upstream rejected it).
    pub fn invalidate(&mut self, key: &Digest32) -> bool {
        self.store.remove(&HostStore, key)
    }

    /// Entry point from `on_http_request_headers`. Returns the action for the host and, when a
    /// token was found, its exchange key (the HTTP context keeps it so an upstream 401 can drop
    /// the cached exchange).
    pub fn on_request_headers(&mut self, context_id: u32) -> (Action, Option<Digest32>) {
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(_) => return (self.apply_now(Step::Deny(Denial::Internal)), None),
        };
        let mut auth: Vec<&[u8]> = Vec::new();
        let mut path: &[u8] = b"";
        for (name, value) in &headers {
            if name.eq_ignore_ascii_case("authorization") {
                auth.push(value);
            } else if name == ":path" {
                path = value;
            }
        }
        let token = match extract_bearer(&auth, path, self.policy.inbound.max_token_bytes) {
            Ok(t) => t.to_string(),
            Err(e) => return (self.apply_now(Step::Deny(Denial::Extract(e))), None),
        };
        let key = self.exchange_key_for(&token_digest(&token));
        let step = self.advance(context_id, token, now_ms());
        (self.apply_now(step), Some(key))
    }

    /// Verify → authorize → cached token or exchange.
    fn advance(&mut self, context_id: u32, token: String, now_ms: u64) -> Step {
        match self.principal(context_id, &token, now_ms, false) {
            Ok(principal) => {
                let missing = missing_scopes(&principal, &self.policy.inbound.required_scopes);
                if !missing.is_empty() {
                    return Step::Deny(Denial::InsufficientScope {
                        missing: missing.into_iter().map(str::to_string).collect(),
                    });
                }
                self.exchange(context_id, token, &principal, now_ms)
            }
            Err(PrincipalWait::Deny(d)) => Step::Deny(d),
            Err(PrincipalWait::Park) => self.park(context_id, token, now_ms),
        }
    }

    /// The verified principal for `token`: from the verified-token cache, or by verifying.
    /// `after_fetch`: the key set was just refetched, so an unknown `kid` is final.
    fn principal(
        &mut self,
        _context_id: u32,
        token: &str,
        now_ms: u64,
        after_fetch: bool,
    ) -> Result<Principal, PrincipalWait> {
        let now = secs(now_ms);
        let digest = token_digest(token);
        let skew = self.policy.inbound.clock_skew_seconds;
        if let Some(p) = self.verified.get(&digest, now, skew) {
            return Ok(p.clone());
        }
        let Some(keys) = self.keys.keys.clone() else {
            return Err(PrincipalWait::Park);
        };
        match verify::verify(token, &keys, &self.policy.inbound, now) {
            Ok(p) => {
                self.verified.put(digest, p.clone(), now);
                Ok(p)
            }
            Err(VerifyError::Invalid(e)) => {
                debug!("token {} rejected: {e}", fingerprint(&digest));
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
                        fingerprint(&digest)
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
        token: String,
        principal: &Principal,
        now_ms: u64,
    ) -> Step {
        let subject = Subject {
            key: self.exchange_key_for(&token_digest(&token)),
            expires_at: principal.expires_at,
            fingerprint: fingerprint(&token_digest(&token)),
            sub: sanitize(&principal.sub),
        };
        if let Some(backend) = self.store.get(&HostStore, &subject.key, secs(now_ms)) {
            return Step::Forward(backend);
        }
        // Same token already being exchanged by this worker: wait on that callout.
        if let Some(Callout::Exchange { waiters, .. }) = self
            .in_flight
            .get(&subject.key)
            .and_then(|id| self.callouts.get_mut(id))
        {
            waiters.push(context_id);
            return Step::Wait;
        }
        let lease_ttl = self.policy.exchange.timeout.as_millis() as u64 + 1000;
        match self
            .store
            .try_lease(&HostStore, &subject.key, self.worker_id, now_ms, lease_ttl)
        {
            LeaseOutcome::Acquired => {
                self.dispatch_exchange(&token, subject, vec![context_id], now_ms)
            }
            LeaseOutcome::Failed(e) => Step::Deny(Denial::Exchange(e)),
            LeaseOutcome::HeldElsewhere => {
                self.remote_waiters.push(RemoteWaiter {
                    context_id,
                    token,
                    subject,
                    since_ms: now_ms,
                });
                self.set_fast_tick(true);
                Step::Wait
            }
        }
    }

    fn dispatch_exchange(
        &mut self,
        token: &str,
        subject: Subject,
        waiters: Vec<u32>,
        now_ms: u64,
    ) -> Step {
        let target = &self.policy.exchange;
        let request = ExchangeRequest::build(target, token);
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        match hostcalls::dispatch_http_call(
            &target.cluster,
            headers,
            Some(&request.body),
            vec![],
            target.timeout,
        ) {
            Ok(id) => {
                self.in_flight.insert(subject.key, id);
                self.callouts.insert(
                    id,
                    Callout::Exchange {
                        subject,
                        started_ms: now_ms,
                        waiters,
                    },
                );
                Step::Wait
            }
            Err(status) => {
                warn!(
                    "token exchange callout to cluster {} could not be dispatched: {status:?}",
                    target.cluster
                );
                let e = ExchangeError::Unavailable {
                    status: None,
                    retry_after: None,
                };
                self.store.release(
                    &HostStore,
                    &subject.key,
                    self.worker_id,
                    Some(&e),
                    now_ms,
                    FAILURE_TTL_MS,
                );
                Step::Deny(Denial::Exchange(e))
            }
        }
    }

    fn set_fast_tick(&mut self, fast: bool) {
        if self.fast_tick != fast {
            self.fast_tick = fast;
            let _ = hostcalls::set_tick_period(if fast { FAST_TICK } else { TICK });
        }
    }

    fn park(&mut self, context_id: u32, token: String, now_ms: u64) -> Step {
        if !matches!(self.policy.keys, KeySource::Remote(_)) || self.parked.len() >= MAX_PARKED {
            return Step::Deny(Denial::KeysUnavailable);
        }
        if self.keys.in_flight.is_none() {
            self.start_jwks_fetch(now_ms);
        }
        self.parked.push(Parked {
            context_id,
            token,
            since_ms: now_ms,
        });
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
        match hostcalls::dispatch_http_call(&remote.cluster, headers, None, vec![], remote.timeout)
        {
            Ok(id) => {
                self.keys.in_flight = Some((id, now_ms));
                self.callouts.insert(id, Callout::Jwks);
            }
            Err(status) => warn!(
                "JWKS callout to cluster {} could not be dispatched: {status:?}",
                remote.cluster
            ),
        }
    }

    /// Periodic work from the root context's tick.
    pub fn on_tick(&mut self) {
        let now = now_ms();
        self.poll_remote_waiters(now);
        if let Some(remote) = self.remote().cloned() {
            self.tick_keys(&remote, now);
        }
        self.sweep_stale_exchanges(now);
        if now.saturating_sub(self.last_sweep_ms) >= TICK.as_millis() as u64 {
            self.store
                .sweep(&HostStore, secs(now), SWEEP_SLOTS_PER_TICK);
            self.last_sweep_ms = now;
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
        let (expired, kept): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| now.saturating_sub(p.since_ms) >= max_wait);
        self.parked = kept;
        if !expired.is_empty() {
            warn!(
                "{} request(s) waited {max_wait} ms for the JWKS; answering 503",
                expired.len()
            );
        }
        for p in expired {
            self.apply_to(p.context_id, Step::Deny(Denial::KeysUnavailable));
        }
    }

    /// Requests waiting on another worker's exchange: served from the shared store when it lands,
    /// answered with its failure, or exchanged here if that worker's lease ran out.
    fn poll_remote_waiters(&mut self, now: u64) {
        if self.remote_waiters.is_empty() {
            self.set_fast_tick(false);
            return;
        }
        let waiters = std::mem::take(&mut self.remote_waiters);
        let lease_ttl = self.policy.exchange.timeout.as_millis() as u64 + 1000;
        for w in waiters {
            if let Some(backend) = self.store.get(&HostStore, &w.subject.key, secs(now)) {
                self.apply_to(w.context_id, Step::Forward(backend));
                continue;
            }
            match self.store.lease_status(&HostStore, &w.subject.key, now) {
                LeaseStatus::InProgress if now.saturating_sub(w.since_ms) <= lease_ttl + 1000 => {
                    self.remote_waiters.push(w)
                }
                LeaseStatus::InProgress => self.apply_to(
                    w.context_id,
                    Step::Deny(Denial::Exchange(ExchangeError::Timeout)),
                ),
                LeaseStatus::Failed(e) => {
                    self.apply_to(w.context_id, Step::Deny(Denial::Exchange(e)))
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
                        &HostStore,
                        &w.subject.key,
                        self.worker_id,
                        now,
                        lease_ttl,
                    ) {
                        LeaseOutcome::Acquired => {
                            let step = self.dispatch_exchange(
                                &w.token,
                                w.subject.clone(),
                                vec![w.context_id],
                                now,
                            );
                            self.apply_to(w.context_id, step);
                        }
                        LeaseOutcome::Failed(e) => {
                            self.apply_to(w.context_id, Step::Deny(Denial::Exchange(e)))
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
        let limit = self.policy.exchange.timeout.as_millis() as u64 + 2000;
        let stale: Vec<u32> = self
            .callouts
            .iter()
            .filter_map(|(id, c)| match c {
                Callout::Exchange { started_ms, .. } if now.saturating_sub(*started_ms) > limit => {
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
                self.store.release(
                    &HostStore,
                    &subject.key,
                    self.worker_id,
                    Some(&e),
                    now,
                    FAILURE_TTL_MS,
                );
                for w in waiters {
                    self.apply_to(w, Step::Deny(Denial::Exchange(e.clone())));
                }
            }
        }
    }

    /// A callout answered; whichever context received it hands it here.
    pub fn on_http_call_response(&mut self, token_id: u32, body_size: usize) {
        let Some(callout) = self.callouts.remove(&token_id) else {
            return;
        };
        let headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
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
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let now = now_ms();
        match callout {
            Callout::Jwks => self.on_jwks_response(status, &body, now),
            Callout::Exchange {
                subject,
                started_ms,
                waiters,
            } => {
                let retry_after = header("retry-after");
                self.on_exchange_response(
                    subject,
                    started_ms,
                    waiters,
                    status,
                    &body,
                    retry_after,
                    now,
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_exchange_response(
        &mut self,
        subject: Subject,
        started_ms: u64,
        waiters: Vec<u32>,
        status: Option<u16>,
        body: &[u8],
        retry_after: Option<&[u8]>,
        now: u64,
    ) {
        self.in_flight.remove(&subject.key);
        let elapsed = now.saturating_sub(started_ms);
        let outcome = match exchange::parse_response(status, body, retry_after) {
            // No response at all, at the timeout: Envoy gave up waiting.
            Err(ExchangeError::Unavailable { status: None, .. })
                if elapsed + 50 >= self.policy.exchange.timeout.as_millis() as u64 =>
            {
                Err(ExchangeError::Timeout)
            }
            other => other,
        };
        let step = match outcome {
            Ok(exchanged) => {
                let until = exchange::reusable_until(
                    &exchanged,
                    subject.expires_at,
                    secs(now),
                    self.policy.exchange.cache_margin_seconds,
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
                        .put(&HostStore, &subject.key, &exchanged.access_token, until);
                }
                self.store.release(
                    &HostStore,
                    &subject.key,
                    self.worker_id,
                    None,
                    now,
                    FAILURE_TTL_MS,
                );
                Step::Forward(exchanged.access_token)
            }
            Err(e) => {
                let idp_said = describe_error_body(body)
                    .map(|d| format!("; IdP said: {d}"))
                    .unwrap_or_default();
                warn!(
                    "token exchange for token {} failed after {elapsed} ms: {e}{idp_said}",
                    subject.fingerprint
                );
                self.store.release(
                    &HostStore,
                    &subject.key,
                    self.worker_id,
                    Some(&e),
                    now,
                    FAILURE_TTL_MS,
                );
                Step::Deny(Denial::Exchange(e))
            }
        };
        for w in waiters {
            self.apply_to(w, step.clone());
        }
    }

    fn on_jwks_response(&mut self, status: Option<u16>, body: &[u8], now: u64) {
        self.keys.in_flight = None;
        match status {
            Some(200) => match KeySet::parse(body) {
                Ok(set) if !set.keys.is_empty() => {
                    if !set.skipped.is_empty() {
                        warn!("JWKS: skipped {} key(s): {}", set.skipped.len(), set.skipped.join("; "));
                    }
                    info!("JWKS loaded: {} key(s)", set.keys.len());
                    self.keys.keys = Some(Rc::new(set));
                    self.keys.fetched_ms = Some(now);
                }
                Ok(set) => warn!("JWKS has no usable key ({}); keeping the previous key set", set.skipped.join("; ")),
                Err(e) => warn!("JWKS unusable: {e}; keeping the previous key set"),
            },
            Some(s) => warn!("JWKS fetch answered HTTP {s}; keeping the previous key set"),
            None => warn!("JWKS fetch failed (connection failed, reset or timed out); keeping the previous key set"),
        }
        if self.keys.keys.is_none() {
            // Still no keys: parked requests keep waiting for the retry, bounded by max_wait.
            return;
        }
        // Every parked request gets another go, with the new keys or the old ones (then an
        // unknown kid is a plain 401, since we just fetched).
        for p in std::mem::take(&mut self.parked) {
            if hostcalls::set_effective_context(p.context_id).is_err() {
                continue;
            }
            let step = match self.principal(p.context_id, &p.token, now, true) {
                Ok(_) => self.advance(p.context_id, p.token, now),
                Err(PrincipalWait::Deny(d)) => Step::Deny(d),
                Err(PrincipalWait::Park) => Step::Deny(Denial::KeysUnavailable),
            };
            self.apply_resumed(step);
        }
    }

    /// Applies a step inside the request's own `on_http_request_headers`.
    fn apply_now(&self, step: Step) -> Action {
        match step {
            Step::Forward(token) => {
                if set_authorization(&token).is_ok() {
                    Action::Continue
                } else {
                    self.send(&Denial::Internal);
                    Action::Pause
                }
            }
            Step::Deny(denial) => {
                self.send(&denial);
                Action::Pause
            }
            Step::Wait => Action::Pause,
        }
    }

    /// Applies a step to a paused request from another callback.
    fn apply_to(&self, context_id: u32, step: Step) {
        if hostcalls::set_effective_context(context_id).is_err() {
            // The request is gone (client disconnected); nothing to answer.
            return;
        }
        self.apply_resumed(step);
    }

    fn apply_resumed(&self, step: Step) {
        match step {
            Step::Forward(token) => {
                if set_authorization(&token).is_ok() {
                    let _ = hostcalls::resume_http_request();
                } else {
                    self.send(&Denial::Internal);
                }
            }
            Step::Deny(denial) => self.send(&denial),
            Step::Wait => {}
        }
    }

    fn send(&self, denial: &Denial) {
        let reply = denial.reply(&self.policy.challenge, &self.policy.inbound.required_scopes);
        debug!("denied: {} -> {}", denial.reason(), reply.status);
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let _ = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
    }
}

enum PrincipalWait {
    Deny(Denial),
    /// Keys are missing or being refetched: park the request.
    Park,
}

/// Replaces every `Authorization` header with the backend token: the inbound token must not
/// reach the upstream.
fn set_authorization(backend_token: &str) -> Result<(), proxy_wasm::types::Status> {
    hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        "authorization",
        Some(&format!("Bearer {backend_token}")),
    )
}
