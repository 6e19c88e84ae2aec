//! Per-VM state shared by the root context and every HTTP context of one Envoy worker, and the
//! request flow that uses it: extract → verify → authorize → exchange (or cache) → rewrite.
//!
//! Work that completes asynchronously (a key set arriving, an exchange answering) may finish a
//! request other than the one whose callback is running: many requests wait on one JWKS fetch,
//! and concurrent requests with the same token wait on one exchange. Those requests are acted on
//! through `set_effective_context`, so the flow lives here rather than in any one context.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::cache::{cache_key, fingerprint, CacheKey, ExchangeCache};
use crate::config::{KeySource, Policy, RemoteJwks};
use crate::exchange::{
    self, describe_error_body, ExchangeError, ExchangeRequest, MAX_RESPONSE_BYTES,
};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::reply::Denial;
use crate::token::extract_bearer;
use crate::verify::{self, missing_scopes, Principal, VerifyError};

/// Requests parked for a key set, at most. Beyond this, new ones are answered 503 at once so a
/// flood during an IdP outage cannot grow memory without bound.
const MAX_PARKED: usize = 4096;
/// Retry a failed JWKS fetch after this long (the refresh interval applies once keys are held).
const JWKS_RETRY: Duration = Duration::from_secs(2);

/// Milliseconds since the Unix epoch, from the host clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn secs(ms: u64) -> i64 {
    (ms / 1000) as i64
}

/// What the flow decided for one request.
enum Step {
    /// Forward upstream with this backend token.
    Forward(String),
    /// Answer the client now.
    Deny(Denial),
    /// Stay paused: a callout will finish the request.
    Wait,
}

enum Callout {
    Jwks,
    Exchange {
        key: CacheKey,
        subject_expires_at: i64,
        started_ms: u64,
        /// Requests (context ids) waiting on this exchange, the dispatching one first.
        waiters: Vec<u32>,
        /// For logs: which token it was, without the token.
        subject_fp: String,
        sub: String,
    },
}

struct Parked {
    context_id: u32,
    token: String,
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
    keys: KeyState,
    cache: ExchangeCache,
    callouts: HashMap<u32, Callout>,
    in_flight_exchanges: HashMap<CacheKey, u32>,
    parked: Vec<Parked>,
    last_sweep_ms: u64,
}

impl Gateway {
    pub fn new(policy: Policy) -> Self {
        let keys = match &policy.keys {
            KeySource::Inline(set) => KeyState {
                keys: Some(Rc::new(set.clone())),
                ..KeyState::default()
            },
            KeySource::Remote(_) => KeyState::default(),
        };
        Self {
            target_identity: policy.exchange.cache_identity(),
            cache: ExchangeCache::new(policy.exchange.cache_max_entries),
            policy: Rc::new(policy),
            keys,
            callouts: HashMap::new(),
            in_flight_exchanges: HashMap::new(),
            parked: Vec::new(),
            last_sweep_ms: 0,
        }
    }

    /// The cache key a request with this token uses; the HTTP context keeps it so an upstream
    /// 401 can drop the entry.
    pub fn exchange_key(&self, token: &str) -> CacheKey {
        cache_key(token, &self.target_identity)
    }

    pub fn invalidate(&mut self, key: &CacheKey) -> bool {
        self.cache.remove(key)
    }

    /// Entry point from `on_http_request_headers`. Returns the action for the host and, when a
    /// token was found, its cache key.
    pub fn on_request_headers(&mut self, context_id: u32) -> (Action, Option<CacheKey>) {
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
        let key = self.exchange_key(&token);
        let step = self.advance(context_id, token, now_ms());
        (self.apply_now(step), Some(key))
    }

    /// Verify → authorize → cached token or exchange.
    fn advance(&mut self, context_id: u32, token: String, now_ms: u64) -> Step {
        let now = secs(now_ms);
        let keys = match &self.keys.keys {
            Some(k) => Rc::clone(k),
            None => return self.park(context_id, token, now_ms),
        };
        let principal = match verify::verify(&token, &keys, &self.policy.inbound, now) {
            Ok(p) => p,
            Err(VerifyError::Invalid(e)) => {
                debug!("token {} rejected: {e}", fingerprint(&token));
                return Step::Deny(Denial::Token(e));
            }
            Err(VerifyError::NoKeys) => return self.park(context_id, token, now_ms),
            Err(VerifyError::UnknownKid) => {
                if self.may_refetch(now_ms) {
                    info!(
                        "token {} names an unknown key; refetching the JWKS",
                        fingerprint(&token)
                    );
                    self.start_jwks_fetch(now_ms);
                }
                if self.keys.in_flight.is_some() {
                    return self.park(context_id, token, now_ms);
                }
                return Step::Deny(Denial::Token(verify::TokenError::UnknownKey));
            }
        };
        let missing = missing_scopes(&principal, &self.policy.inbound.required_scopes);
        if !missing.is_empty() {
            return Step::Deny(Denial::InsufficientScope {
                missing: missing.into_iter().map(str::to_string).collect(),
            });
        }
        self.exchange(context_id, &token, &principal, now_ms)
    }

    fn exchange(
        &mut self,
        context_id: u32,
        token: &str,
        principal: &Principal,
        now_ms: u64,
    ) -> Step {
        let key = self.exchange_key(token);
        if let Some(backend) = self.cache.get(&key, secs(now_ms)) {
            return Step::Forward(backend.to_string());
        }
        if let Some(Callout::Exchange { waiters, .. }) = self
            .in_flight_exchanges
            .get(&key)
            .and_then(|id| self.callouts.get_mut(id))
        {
            waiters.push(context_id);
            return Step::Wait;
        }
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
                self.in_flight_exchanges.insert(key, id);
                self.callouts.insert(
                    id,
                    Callout::Exchange {
                        key,
                        subject_expires_at: principal.expires_at,
                        started_ms: now_ms,
                        waiters: vec![context_id],
                        subject_fp: fingerprint(token),
                        sub: principal.sub.clone(),
                    },
                );
                Step::Wait
            }
            Err(status) => {
                warn!(
                    "token exchange callout to cluster {} could not be dispatched: {status:?}",
                    target.cluster
                );
                Step::Deny(Denial::Exchange(ExchangeError::Unavailable {
                    status: None,
                    retry_after: None,
                }))
            }
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
        if let Some(remote) = self.remote().cloned() {
            // A fetch whose response never came (its context went away) must not block forever.
            if let Some((id, started)) = self.keys.in_flight {
                if now.saturating_sub(started) > remote.timeout.as_millis() as u64 + 1000 {
                    self.callouts.remove(&id);
                    self.keys.in_flight = None;
                }
            }
            let due = match (self.keys.fetched_ms, self.keys.last_attempt_ms) {
                (_, None) => true,
                (None, Some(last)) => now.saturating_sub(last) >= JWKS_RETRY.as_millis() as u64,
                (Some(fetched), Some(last)) => {
                    now.saturating_sub(fetched) >= remote.refresh_interval.as_millis() as u64
                        && now.saturating_sub(last) >= JWKS_RETRY.as_millis() as u64
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
        self.sweep_stale_exchanges(now);
        if now.saturating_sub(self.last_sweep_ms) >= 10_000 {
            self.cache.sweep(secs(now));
            self.last_sweep_ms = now;
        }
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
            if let Some(Callout::Exchange { key, waiters, .. }) = self.callouts.remove(&id) {
                self.in_flight_exchanges.remove(&key);
                for w in waiters {
                    self.apply_to(w, Step::Deny(Denial::Exchange(ExchangeError::Timeout)));
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
        let body = if body_size == 0 || body_size > limit {
            // Too large: leave it unread; the parsers see an oversize marker.
            if body_size > limit {
                vec![b' '; limit + 1]
            } else {
                Vec::new()
            }
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
                key,
                subject_expires_at,
                started_ms,
                waiters,
                subject_fp,
                sub,
            } => {
                self.in_flight_exchanges.remove(&key);
                let outcome = match exchange::parse_response(status, &body, header("retry-after")) {
                    Err(ExchangeError::Unavailable { status: None, .. })
                        if now.saturating_sub(started_ms) + 50
                            >= self.policy.exchange.timeout.as_millis() as u64 =>
                    {
                        Err(ExchangeError::Timeout)
                    }
                    other => other,
                };
                let elapsed = now.saturating_sub(started_ms);
                let step = match outcome {
                    Ok(exchanged) => {
                        let until = exchange::reusable_until(
                            &exchanged,
                            subject_expires_at,
                            secs(now),
                            self.policy.exchange.cache_margin_seconds,
                        );
                        info!(
                            "exchanged token {subject_fp} for sub {} in {elapsed} ms (backend token {}, reusable {})",
                            crate::jwks::sanitize(&sub),
                            fingerprint(&exchanged.access_token),
                            until.map_or("no".to_string(), |u| format!("{}s", u - secs(now)))
                        );
                        if let Some(until) = until {
                            self.cache
                                .put(key, exchanged.access_token.clone(), until, secs(now));
                        }
                        Step::Forward(exchanged.access_token)
                    }
                    Err(e) => {
                        let idp_said = describe_error_body(&body)
                            .map(|d| format!("; IdP said: {d}"))
                            .unwrap_or_default();
                        warn!("token exchange for token {subject_fp} failed after {elapsed} ms: {e}{idp_said}");
                        Step::Deny(Denial::Exchange(e))
                    }
                };
                for w in waiters {
                    let step = match &step {
                        Step::Forward(t) => Step::Forward(t.clone()),
                        Step::Deny(d) => Step::Deny(d.clone()),
                        Step::Wait => Step::Wait,
                    };
                    self.apply_to(w, step);
                }
            }
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
        // Every parked request gets another go: with the new keys, or with the old ones (then an
        // unknown kid is a plain 401, since we just fetched).
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            if hostcalls::set_effective_context(p.context_id).is_err() {
                continue;
            }
            let step = if self.keys.keys.is_some() {
                self.advance_after_fetch(p.context_id, p.token, now)
            } else {
                // Still no keys: keep waiting for the retry, bounded by max_wait on the tick.
                self.parked.push(p);
                continue;
            };
            self.apply_resumed(step);
        }
    }

    /// Like `advance`, but a second unknown `kid` right after a fetch is final.
    fn advance_after_fetch(&mut self, context_id: u32, token: String, now: u64) -> Step {
        let Some(keys) = self.keys.keys.clone() else {
            return Step::Deny(Denial::KeysUnavailable);
        };
        match verify::verify(&token, &keys, &self.policy.inbound, secs(now)) {
            Err(VerifyError::UnknownKid) => {
                Step::Deny(Denial::Token(verify::TokenError::UnknownKey))
            }
            _ => self.advance(context_id, token, now),
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

/// Replaces every `Authorization` header with the backend token: the inbound token must not
/// reach the upstream.
fn set_authorization(backend_token: &str) -> Result<(), proxy_wasm::types::Status> {
    hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        "authorization",
        Some(&format!("Bearer {backend_token}")),
    )
}
