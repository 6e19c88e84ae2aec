//! Every effect the gateway has on a request, in one place: forwarding it with the backend token
//! and identity headers, refusing it with the answer table's reply, letting a public request
//! through without credentials, resuming a paused one, and the audit record of each decision.

use std::borrow::Cow;
use std::rc::Rc;

use log::error;
use proxy_wasm::types::Action;

use crate::audit::{AuditRecord, CacheUse, RecordTail};
use crate::cache::{fingerprint, token_digest, Digest32};
use crate::config::{AuditLog, ExchangeTarget, IdentityClaim};
use crate::host::{Host, HostError};
use crate::jwks::sanitize;
use crate::mcp::{self, BodyError};
use crate::reply::{Denial, Reply};
use crate::request::{Body, Request, RequestState};
use crate::verified_tokens::{CachedBackend, VerifiedToken};
use crate::verify::Principal;

use super::decide::{Step, Upstream};
use super::Gateway;

/// Who is refused.
pub(super) enum Refused<'a> {
    /// A request with a record (taken out of the map).
    Request(&'a Request),
    /// A request refused on `route` before it had a record (its credentials were malformed).
    OnRoute { route: usize, started_ms: u64 },
    /// A request refused before any route was chosen (its path, or no route for it).
    Unrouted,
}

/// What an audit line says about one request.
pub(super) struct AuditFacts<'a> {
    /// When the request arrived; `None` when it was decided on arrival.
    pub started_ms: Option<u64>,
    pub route: Option<usize>,
    pub digest: Option<Digest32>,
    pub principal: Option<&'a Principal>,
    pub tool: Option<&'a str>,
    pub target: Option<&'a ExchangeTarget>,
    pub cache: CacheUse,
    pub denied: Option<(&'a Denial, u32)>,
    pub exchanged: Option<&'a str>,
}

impl<H: Host> Gateway<H> {
    /// Applies a step inside the request's own callback (headers or body).
    pub(super) fn finish_now(&mut self, context_id: u32, step: Step) -> Action {
        match step {
            Step::Wait => Action::Pause,
            Step::Forward(upstream) => {
                if self.forward(context_id, &upstream).is_ok() {
                    Action::Continue
                } else {
                    self.refuse_request(context_id, &Denial::Internal)
                }
            }
            Step::Deny(denial) => self.refuse_request(context_id, &denial),
        }
    }

    /// Applies a step to a paused request from another callback.
    pub(super) fn finish_resumed(&mut self, context_id: u32, step: Step) {
        // Only undecided requests are finished here: never answer or resume a request twice.
        let undecided = self
            .requests
            .get(&context_id)
            .is_some_and(|r| r.state.is_undecided());
        if matches!(step, Step::Wait) || !undecided {
            return;
        }
        if self.host.set_effective_context(context_id).is_err() {
            // The request is gone (client disconnected); nothing to answer.
            self.forget(context_id);
            return;
        }
        match step {
            Step::Forward(upstream) => {
                if self.forward(context_id, &upstream).is_ok() {
                    self.host.resume_request();
                } else {
                    self.refuse_request(context_id, &Denial::Internal);
                }
            }
            Step::Deny(denial) => {
                self.refuse_request(context_id, &denial);
            }
            Step::Wait => {}
        }
    }

    /// Rewrites the request for the upstream: the backend token replaces the client's, and the
    /// identity headers are set from the verified claims (client-sent values never survive).
    fn forward(&mut self, context_id: u32, upstream: &Upstream) -> Result<(), HostError> {
        let Some(mut request) = self.requests.remove(&context_id) else {
            return Err(HostError);
        };
        let backend_fingerprint = match upstream {
            Upstream::Exchanged { token, until } => {
                let authorization: Rc<str> = format!("Bearer {token}").into();
                let rewritten = self
                    .host
                    .set_request_header("authorization", Some(&authorization));
                if rewritten.is_err() {
                    self.requests.insert(context_id, request);
                    return Err(HostError);
                }
                let fingerprint: Rc<str> = fingerprint(&token_digest(token)).into();
                self.remember_backend(&request, &authorization, &fingerprint, *until);
                Some(fingerprint)
            }
            Upstream::Validated if self.policy.forward_token => None,
            Upstream::Validated => {
                if self.host.set_request_header("authorization", None).is_err() {
                    self.requests.insert(context_id, request);
                    return Err(HostError);
                }
                None
            }
        };
        if let Some(p) = request.principal.clone() {
            if self.set_identity_headers(&p).is_err() {
                self.requests.insert(context_id, request);
                return Err(HostError);
            }
        }
        if self.policy.routes[request.route].inspects_tools() && request.body == Body::Arriving {
            // Allowed so far; the body's tool calls decide (see `on_request_body`).
            request.state = RequestState::CheckingBody {
                backend_fingerprint,
            };
            self.requests.insert(context_id, request);
            return Ok(());
        }
        self.metrics.inc("requests.allowed");
        self.audit_request(&request, None, backend_fingerprint.as_deref());
        if request.exchange_key.is_some() {
            request.state = RequestState::Forwarded;
            self.requests.insert(context_id, request);
        }
        Ok(())
    }

    /// Keeps the backend token in front of the shared store: this worker's next request with
    /// the same token skips hashing, verifying and shared data.
    fn remember_backend(
        &mut self,
        request: &Request,
        authorization: &Rc<str>,
        fingerprint: &Rc<str>,
        until: Option<i64>,
    ) {
        if let (Some(until), Some(target), Some(key), true) = (
            until,
            &request.target,
            request.exchange_key,
            self.exchanges.store().enabled(),
        ) {
            self.verified.remember_backend(
                &request.token,
                CachedBackend::new(
                    Rc::clone(target),
                    Rc::clone(authorization),
                    Rc::clone(fingerprint),
                    until,
                    key,
                ),
            );
        }
    }

    /// Identity headers from the verified claims; a header whose claim is absent is removed,
    /// so a client-sent value never reaches the upstream.
    pub(super) fn set_identity_headers(&self, p: &Principal) -> Result<(), HostError> {
        for (header, claim) in &self.policy.identity_headers {
            let value = identity_value(p, *claim);
            self.host.set_request_header(header, value.as_deref())?;
        }
        Ok(())
    }

    /// Refuses the request with this record (if it still has one).
    fn refuse_request(&mut self, context_id: u32, denial: &Denial) -> Action {
        match self.requests.remove(&context_id) {
            Some(request) => self.refuse(denial, Refused::Request(&request)),
            None => self.refuse(denial, Refused::Unrouted),
        }
    }

    /// The one way a request is refused: the answer table's reply for its route (challenge,
    /// scopes), the denial counter, the audit record.
    pub(super) fn refuse(&mut self, denial: &Denial, refused: Refused<'_>) -> Action {
        let policy = Rc::clone(&self.policy);
        let (route, scopes) = match &refused {
            Refused::Request(r) => (policy.routes.get(r.route), r.required_scopes.as_slice()),
            Refused::OnRoute { route, .. } => {
                let route = policy.routes.get(*route);
                (
                    route,
                    route.map_or(&[][..], |r| r.required_scopes.as_slice()),
                )
            }
            Refused::Unrouted => (None, &[][..]),
        };
        let challenge = route.map(|r| r.challenge.clone()).unwrap_or_default();
        let reply = denial.reply(&challenge, scopes);
        self.metrics
            .inc(&format!("requests.denied.{}", denial.reason()));
        let denied = Some((denial, reply.status));
        let (started_ms, route) = match &refused {
            Refused::Request(r) => {
                self.audit_request(r, denied, None);
                send_reply(&self.host, &reply);
                return Action::Pause;
            }
            Refused::OnRoute { route, started_ms } => (Some(*started_ms), Some(*route)),
            Refused::Unrouted => (None, None),
        };
        self.audit(&AuditFacts {
            started_ms,
            route,
            digest: None,
            principal: None,
            tool: None,
            target: None,
            cache: CacheUse::None,
            denied,
            exchanged: None,
        });
        send_reply(&self.host, &reply);
        Action::Pause
    }

    /// Public routes and passed-through unmatched paths: no authentication, and nothing of the
    /// client's credentials or claimed identity reaches the upstream.
    pub(super) fn pass_unauthenticated(&mut self) -> Action {
        let _ = self.host.set_request_header("authorization", None);
        for (header, _) in &self.policy.identity_headers {
            let _ = self.host.set_request_header(header, None);
        }
        self.metrics.inc("requests.public");
        Action::Continue
    }

    pub(super) fn audit_request(
        &self,
        request: &Request,
        denied: Option<(&Denial, u32)>,
        backend_fingerprint: Option<&str>,
    ) {
        self.audit(&AuditFacts {
            started_ms: Some(request.started_ms),
            route: Some(request.route),
            digest: request.digest,
            principal: request.principal.as_deref(),
            tool: request.tool_label.as_deref(),
            target: request.target.as_deref(),
            cache: request.cache,
            denied,
            exchanged: backend_fingerprint,
        });
    }

    pub(super) fn audit(&self, facts: &AuditFacts<'_>) {
        if !self.policy.audit_log.is_on() {
            return;
        }
        let now = self.host.now_ms();
        self.hand_over(|out| self.with_record(facts, now, |record| record.write_json(out)));
    }

    /// The record of a request decided on the cached path at `now` (`facts.started_ms` is
    /// `None`): from the token's pre-rendered tail when it fits, else rendered and kept for the
    /// next.
    pub(super) fn audit_cached(
        &self,
        entry: &VerifiedToken,
        facts: &AuditFacts<'_>,
        exchanged: Option<&Rc<str>>,
        now: u64,
    ) {
        if !self.policy.audit_log.is_on() {
            return;
        }
        let route = facts.route.unwrap_or(usize::MAX);
        if let Ok(slot) = entry.audit_tail.try_borrow() {
            if let Some(tail) = slot.as_ref().filter(|t| t.fits(route, exchanged)) {
                self.hand_over(|out| tail.write_with_time(out, now));
                return;
            }
        }
        let tail = self.with_record(facts, now, |record| {
            RecordTail::new(route, exchanged.cloned(), record)
        });
        self.hand_over(|out| tail.write_with_time(out, now));
        if let Ok(mut slot) = entry.audit_tail.try_borrow_mut() {
            *slot = Some(tail);
        }
    }

    fn with_record<R>(
        &self,
        facts: &AuditFacts<'_>,
        now: u64,
        use_record: impl FnOnce(&AuditRecord<'_>) -> R,
    ) -> R {
        let principal = facts.principal;
        let token_label = principal
            .and_then(|p| p.jti.as_deref())
            .map(printable)
            .or_else(|| facts.digest.map(|d| Cow::Owned(fingerprint(&d))));
        let sub = principal.map(|p| printable(&p.sub));
        let client_id = principal
            .and_then(|p| p.client_id.as_deref())
            .map(printable);
        let record = AuditRecord {
            time_ms: now,
            allowed: facts.denied.is_none(),
            reason: facts.denied.map_or(
                if facts.target.is_some() {
                    "exchanged"
                } else {
                    "validated"
                },
                |(d, _)| d.reason(),
            ),
            detail: facts.denied.and_then(|(d, _)| d.detail()),
            status: facts.denied.map(|(_, s)| s),
            sub: sub.as_deref(),
            client_id: client_id.as_deref(),
            token: token_label,
            route: facts
                .route
                .and_then(|r| self.policy.routes.get(r))
                .map(|r| r.name.as_str()),
            tool: facts.tool,
            target_audience: facts.target.and_then(|t| t.audience.as_deref()),
            target_scope: facts.target.and_then(|t| t.scope.as_deref()),
            exchanged: facts.exchanged,
            cache: Some(facts.cache),
            latency_ms: facts
                .started_ms
                .map_or(0, |started| now.saturating_sub(started)),
        };
        use_record(&record)
    }

    /// Hands a record (what `write` appends) to the configured sink.
    fn hand_over(&self, write: impl FnOnce(&mut String)) {
        let sink = self.policy.audit_log;
        if sink == AuditLog::EnvoyLogBatched {
            // Never contended (the gateway runs one callback at a time); should it be, the
            // record is written on its own rather than lost.
            if let Ok(mut batch) = self.audit_batch.try_borrow_mut() {
                if batch.push(write) {
                    batch.drain(|text| self.host.log_info(text));
                }
                return;
            }
        }
        let mut json = String::with_capacity(384);
        write(&mut json);
        match sink {
            // Envoy keeps the record with the request and its access log writes it. Should the
            // host refuse (no request to attach it to), the record still gets written.
            AuditLog::AccessLog if self.host.set_audit_record(&json).is_ok() => {}
            AuditLog::Off => {}
            _ => self.host.log_info(&json),
        }
    }

    /// Writes the records the batch holds (on the tick, and when the gateway goes away).
    pub(super) fn flush_audit(&self) {
        if let Ok(mut batch) = self.audit_batch.try_borrow_mut() {
            batch.drain(|text| self.host.log_info(text));
        }
    }

    /// Records written to Envoy's log vanish when its log level is above `info`: say so, at
    /// `error`, whenever that starts (checked on the tick: the level can change at run time).
    /// Whether it said so now.
    pub(crate) fn check_audit_log_level(&mut self) -> bool {
        let to_log = matches!(
            self.policy.audit_log,
            AuditLog::EnvoyLogBatched | AuditLog::EnvoyLog
        );
        let dropped = to_log && !self.host.info_is_logged();
        let starts = dropped && !self.audit_dropped;
        if starts {
            error!(
                "audit records are written to Envoy's log at info, but its log level for the \
                 wasm component is above info: they are dropped. Set `--component-log-level \
                 wasm:info` or `\"audit_log\": \"access_log\"`"
            );
        }
        self.audit_dropped = dropped;
        starts
    }
}

/// A claim as the audit record shows it: `sanitize`d (printable ASCII, at most 64 characters),
/// without copying the usual claim that already is.
fn printable(s: &str) -> Cow<'_, str> {
    if s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(sanitize(s))
    }
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

pub(super) fn read_request_body(
    host: &impl Host,
    body_size: usize,
) -> Result<mcp::Body, BodyError> {
    if body_size == 0 {
        return Ok(mcp::Body::default());
    }
    let body = host.request_body(body_size).unwrap_or_default();
    mcp::calls_in_body(&body)
}

fn send_reply(host: &impl Host, reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    host.send_reply(reply.status, &headers, Some(reply.body.as_bytes()));
}

/// RFC 9728 metadata, readable by browser-based MCP clients (CORS).
pub(super) fn serve_metadata(host: &impl Host, method: &[u8], document: &str) -> Action {
    let cors = [
        ("access-control-allow-origin", "*"),
        ("access-control-allow-methods", "GET, HEAD, OPTIONS"),
        ("access-control-allow-headers", "*"),
        ("access-control-max-age", "86400"),
    ];
    match method {
        b"OPTIONS" => host.send_reply(204, &cors, None),
        b"GET" | b"HEAD" => {
            let mut headers = cors.to_vec();
            headers.push(("content-type", "application/json"));
            headers.push(("cache-control", "public, max-age=300"));
            let body = (method == b"GET").then_some(document.as_bytes());
            host.send_reply(200, &headers, body);
        }
        _ => host.send_reply(
            405,
            &[
                ("allow", "GET, HEAD, OPTIONS"),
                ("content-type", "application/json"),
            ],
            Some(br#"{"error":"invalid_request","error_description":"metadata is read with GET"}"#),
        ),
    }
    Action::Pause
}
