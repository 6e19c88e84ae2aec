//! Events after a request's headers: its body, callout answers, ticks, the upstream's status.

use log::{info, warn};
use proxy_wasm::types::Action;

use crate::cache::{fingerprint, token_digest, Digest32};
use crate::exchange::{self, describe_error_body, ExchangeError, MAX_RESPONSE_BYTES};
use crate::exchange_coordinator::{Ended, RemoteOutcome};
use crate::host::Host;
use crate::introspection::MAX_INTROSPECTION_BYTES;
use crate::jwks::MAX_JWKS_BYTES;
use crate::key_manager::KeyManager;
use crate::mcp::BodyError;
use crate::reply::Denial;
use crate::request::RequestState;

use super::decide::{PrincipalWait, Step, Upstream};
use super::effects::{read_request_body, Refused};
use super::{
    secs, Admitted, CalloutPurpose, Gateway, SWEEP_SLOTS_PER_TICK, TICK, VERIFIED_SWEEP_INTERVAL_MS,
};

impl<H: Host> Gateway<H> {
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
        admitted: Admitted,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if let Admitted::Cached { .. } = admitted {
            // Cached-path routes have no per-tool policy: nothing to check in the body.
            return Action::Continue;
        }
        let backend_fingerprint = match self.requests.get(&context_id).map(|r| &r.state) {
            // Undecided: keep buffering (Envoy normally holds it for us anyway).
            Some(state) if state.is_undecided() => return Action::Pause,
            Some(RequestState::CheckingBody {
                backend_fingerprint,
            }) => backend_fingerprint.clone(),
            _ => return Action::Continue,
        };
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
        let Some(mut request) = self.requests.remove(&context_id) else {
            return Action::Continue;
        };
        match outcome {
            Ok(label) => {
                if request.tool_label.is_none() {
                    request.tool_label = label;
                }
                self.metrics.inc("requests.allowed");
                self.audit_request(&request, None, backend_fingerprint.as_deref());
                if request.exchange_key.is_some() {
                    request.state = RequestState::Forwarded;
                    self.requests.insert(context_id, request);
                }
                Action::Continue
            }
            Err(denial) => self.refuse(&denial, Refused::Request(&request)),
        }
    }

    /// The upstream's response headers arrived. A 401 to a request forwarded with a backend
    /// token means the upstream rejected that token: it is dropped from the caches, so the next
    /// request exchanges afresh. The status is read only when there is such a token.
    pub fn on_response_headers(&mut self, context_id: u32, admitted: Admitted) {
        let key = match admitted {
            Admitted::Cached { watched_key } => watched_key,
            Admitted::Full => {
                let Some(request) = self.requests.get(&context_id) else {
                    return;
                };
                let key = request.exchange_key.filter(|_| request.watches_response());
                if request.state == RequestState::Forwarded {
                    self.requests.remove(&context_id);
                }
                key
            }
        };
        if let Some(key) = key {
            let status = self.host.upstream_status();
            self.on_backend_token_status(&key, status.as_deref());
        }
    }

    /// The upstream's `:status` for a request forwarded with the backend token cached under
    /// `key`: a 401 drops that token from this worker and from the shared store.
    fn on_backend_token_status(&mut self, key: &Digest32, status: Option<&[u8]>) {
        if status == Some(b"401") {
            // The token this worker sent, if it still holds it: only that one is dropped from
            // the store (without it, whatever the store holds under `key`).
            let sent = self.verified.forget_backend(key);
            let sent_token = sent.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            self.fleet_forget(key);
            if self.exchanges.store().remove(&self.host, key, sent_token) {
                self.metrics.inc("cache.invalidated");
                info!("upstream answered 401; dropped the cached exchanged token");
            }
        }
    }

    /// A callout answered; whichever context received it hands it here (`receiver`: the
    /// request whose context that is, `None` for the root context).
    pub fn on_http_call_response(
        &mut self,
        receiver: Option<u32>,
        token_id: u32,
        body_size: usize,
    ) {
        let Some(purpose) = self.callouts.remove(&token_id) else {
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
        let limit = match purpose {
            CalloutPurpose::Jwks(_) => MAX_JWKS_BYTES,
            CalloutPurpose::Introspect(_) => MAX_INTROSPECTION_BYTES,
            CalloutPurpose::Exchange(_) => MAX_RESPONSE_BYTES,
            CalloutPurpose::Fleet(_) => crate::fleet::MAX_ANSWER_BYTES,
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
        match purpose {
            CalloutPurpose::Jwks(provider) => self.on_jwks_answer(provider, status, &body, now),
            CalloutPurpose::Introspect(key) => {
                self.on_introspection_answer(&key, status, &body, now)
            }
            CalloutPurpose::Exchange(key) => {
                let outcome = exchange::parse_response(status, &body, header("retry-after"));
                let Some(ended) = self.exchanges.answered(&self.host, &key, outcome, now) else {
                    return;
                };
                self.on_exchange_ended(ended, &body, now);
            }
            CalloutPurpose::Fleet(call) => {
                self.on_fleet_answer(call, token_id, status, &body, receiver, now)
            }
        }
    }

    pub(super) fn on_exchange_ended(&mut self, ended: Ended, body: &[u8], now: u64) {
        self.share_with_fleet(&ended, now);
        let elapsed = ended.elapsed_ms;
        self.metrics
            .record(&self.host, "exchange.latency_ms", elapsed);
        let subject = &ended.subject;
        let step = match ended.outcome {
            Ok(issued) => {
                self.metrics.inc("exchanges.ok");
                info!(
                    "exchanged token {} for sub {} in {elapsed} ms (backend token {}, reusable {})",
                    subject.fingerprint,
                    subject.sub,
                    fingerprint(&token_digest(&issued.token)),
                    issued
                        .until
                        .map_or("no".to_string(), |u| format!("{}s", u - secs(now)))
                );
                Step::Forward(Upstream::Exchanged {
                    token: issued.token.into(),
                    until: issued.until,
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
                Step::Deny(denial)
            }
        };
        for w in ended.waiters {
            self.finish_resumed(w, step.clone());
        }
    }

    fn on_jwks_answer(&mut self, provider: u8, status: Option<u16>, body: &[u8], now: u64) {
        let Some(keys) = self.keys.get_mut(usize::from(provider)) else {
            return;
        };
        let answered = keys.on_answer(status, body, now);
        self.metrics.inc(if answered.loaded {
            "jwks.fetch_ok"
        } else {
            "jwks.fetch_failed"
        });
        if answered.withdrawn {
            // Tokens verified with a withdrawn (or replaced) key must not stay accepted from the
            // cache until their `exp`.
            self.verified.clear();
        }
        // Every parked request gets another go, with the new keys or the old ones (then an
        // unknown kid is a plain 401, since we just fetched).
        for id in answered.resume {
            let Some((token, digest, route)) = self
                .requests
                .get(&id)
                .map(|r| (r.token.clone(), r.digest, r.route))
            else {
                continue;
            };
            self.set_state(id, RequestState::Authenticating);
            let step = match self.principal(&token, digest.as_ref(), route, now, true) {
                Ok(_) => self.advance(id, now),
                Err(PrincipalWait::Deny(d)) => Step::Deny(d),
                Err(PrincipalWait::Park(_)) => Step::Deny(Denial::KeysUnavailable),
                // A JWT resumed after keys arrived is never introspected.
                Err(PrincipalWait::Introspect(_)) => Step::Deny(Denial::Internal),
            };
            self.finish_resumed(id, step);
        }
    }

    /// Periodic work from the root context's tick.
    pub fn on_tick(&mut self) {
        let now = self.clock.observe(self.host.now_ms());
        self.poll_remote_waiters(now);
        self.tick_keys(now);
        self.tick_introspections(now);
        self.dispatch_due(now);
        self.tick_fleet(now);
        for stale in self.exchanges.give_up_stale(&self.host, now) {
            self.callouts.remove(&stale.callout);
            for w in stale.given_up.unwrap_or_default() {
                self.finish_resumed(w, Step::Deny(Denial::Exchange(ExchangeError::Timeout)));
            }
        }
        if now.saturating_sub(self.last_sweep_ms) >= TICK.as_millis() as u64 {
            self.sweep_caches(now);
        }
        // Last, so the counts and records of this tick's work are in.
        self.metrics.flush(&self.host);
        let _ = self.check_audit_log_level();
        self.flush_audit();
        let fast = self.exchanges.has_remote_waiters()
            || self.exchanges.has_due()
            || self.fleet_busy()
            || self.keys.iter().any(KeyManager::is_fetching)
            || !self.introspections.is_idle();
        self.set_fast_tick(fast);
    }

    /// Each provider's key work: fetches due, lost fetches, requests that waited too long.
    fn tick_keys(&mut self, now: u64) {
        for index in 0..self.keys.len() {
            let tick = self.keys[index].on_tick(now);
            if let Some(token) = tick.lost_fetch {
                self.callouts.remove(&token);
            }
            if let (Some(fetch), Ok(provider)) = (&tick.fetch, u8::try_from(index)) {
                self.dispatch_jwks(provider, fetch, now);
            }
            for id in tick.expired {
                self.finish_resumed(id, Step::Deny(Denial::KeysUnavailable));
            }
        }
    }

    fn sweep_caches(&mut self, now: u64) {
        self.exchanges
            .store_mut()
            .sweep(&self.host, secs(now), SWEEP_SLOTS_PER_TICK);
        self.last_sweep_ms = now;
        // Another worker dropped a backend token the upstream rejected: the copies this worker
        // keeps in front of the store may include it.
        let generation = self.exchanges.store().generation(&self.host);
        if generation != self.store_generation {
            self.store_generation = generation;
            self.verified.forget_backends();
        }
        if now % VERIFIED_SWEEP_INTERVAL_MS < TICK.as_millis() as u64 {
            self.verified
                .sweep(secs(now), self.policy.inbound.clock_skew_seconds);
        }
    }

    /// Requests waiting on another worker's exchange: served from the shared store when it lands,
    /// answered with its failure, or exchanged here if that worker's lease ran out.
    fn poll_remote_waiters(&mut self, now: u64) {
        if !self.exchanges.has_remote_waiters() {
            return;
        }
        for (context_id, outcome) in self.exchanges.poll_remote(&self.host, now) {
            let step = match outcome {
                RemoteOutcome::Stored { token, until } => Step::Forward(Upstream::Exchanged {
                    token: token.into(),
                    until: Some(until),
                }),
                RemoteOutcome::Failed(e) => Step::Deny(Denial::Exchange(e)),
                RemoteOutcome::Lead { subject, target } => {
                    let token = self
                        .requests
                        .get(&context_id)
                        .map(|r| r.token.clone())
                        .unwrap_or_default();
                    self.lead_exchange(&token, subject, target, vec![context_id], now)
                }
            };
            self.finish_resumed(context_id, step);
        }
    }
}
