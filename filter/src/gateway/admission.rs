//! A request's headers arrive: the path, the route, the metadata document, public routes, the
//! cached path, and the record of a request that takes the full path.

use std::rc::Rc;

use crate::audit::CacheUse;
use crate::cache::token_digest;
use crate::config::Unmatched;
use crate::host::Host;
use crate::mcp;
use crate::policy::{audience_allowed, missing_scopes};
use crate::reply::Denial;
use crate::request::{Body, Request, RequestState};
use crate::request_path;
use crate::token::{bearer_credential, extract_bearer, query_has_access_token};

use super::effects::{serve_metadata, AuditFacts, Refused};
use super::{secs, Admission, Gateway};

impl<H: Host> Gateway<H> {
    /// Entry point from `on_http_request_headers`.
    ///
    /// All request headers come in one host call and are read in place (see `header_map`).
    pub fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Admission {
        // This request's own callback: its own exchange may be dispatched from here.
        self.own_request = Some(context_id);
        let admission = self.admit(context_id, end_of_stream);
        self.own_request = None;
        admission
    }

    fn admit(&mut self, context_id: u32, end_of_stream: bool) -> Admission {
        let Some(headers) = self.host.request_headers() else {
            return Admission::Full(self.refuse(&Denial::Internal, Refused::Unrouted));
        };
        // No `:path` is no request Envoy would route: refused like any path not in normal form.
        let raw_path = headers.get(":path").unwrap_or_default();
        let path = match request_path::normalize(raw_path) {
            Ok(path) => path,
            Err(e) => return Admission::Full(self.refuse(&Denial::Path(e), Refused::Unrouted)),
        };

        if let Some(metadata) = self.policy.metadata_for(&path) {
            let method = headers.get(":method").unwrap_or(b"GET");
            return Admission::Full(serve_metadata(&self.host, method, &metadata.document));
        }
        let Some(route_index) = self.policy.route_index(&path) else {
            return Admission::Full(match self.policy.unmatched {
                Unmatched::Deny => self.refuse(&Denial::NoRoute, Refused::Unrouted),
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
                let refused = Refused::OnRoute {
                    route: route_index,
                    started_ms: now,
                };
                return Admission::Full(self.refuse(&Denial::Extract(e), refused));
            }
        };
        let header_call = if route.inspects_tools() {
            let methods: Vec<&[u8]> = headers.values("mcp-method").collect();
            let names: Vec<&[u8]> = headers.values("mcp-name").collect();
            mcp::call_from_headers(&methods, &names)
        } else {
            Ok(None)
        };
        let body = if end_of_stream {
            Body::Complete
        } else {
            Body::Arriving
        };
        let request = self.new_request(route_index, token, header_call, body, now);
        self.requests.insert(context_id, request);
        let step = self.advance(context_id, now);
        Admission::Full(self.finish_now(context_id, step))
    }

    /// The record of a request that takes the full path.
    fn new_request(
        &self,
        route_index: usize,
        token: &str,
        header_call: Result<Option<mcp::Call>, mcp::BodyError>,
        body: Body,
        now: u64,
    ) -> Request {
        let policy = &self.policy;
        let route = &policy.routes[route_index];
        let skew = policy.inbound.clock_skew_seconds;
        let digest = match self.verified.get(token, secs(now), skew) {
            Some(entry) => Some(entry.digest),
            None if route.target.is_some()
                || policy.audit_log.is_on()
                || policy.inbound.verified_cache_max_entries > 0 =>
            {
                Some(token_digest(token))
            }
            None => None,
        };
        Request {
            state: RequestState::Authenticating,
            started_ms: now,
            route: route_index,
            digest,
            token: token.to_string(),
            principal: None,
            body,
            header_call,
            required_scopes: route.required_scopes.clone(),
            tool_label: None,
            target: None,
            cache: CacheUse::None,
            exchange_key: None,
        }
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
        // A token of a provider this route does not accept takes the full path to its 401.
        let provider = entry.principal.provider;
        if !route.providers.contains(provider)
            || !audience_allowed(&entry.principal, policy.accepted_audiences(route, provider))
            || !missing_scopes(&entry.principal, &route.required_scopes).is_empty()
        {
            return None;
        }
        let backend = match &route.target {
            Some(target) => Some(entry.backend(target, now)?),
            None => None,
        };
        let rewritten = match backend {
            Some(b) => self
                .host
                .set_request_header("authorization", Some(&b.authorization)),
            None if policy.forward_token => Ok(()),
            None => self.host.set_request_header("authorization", None),
        };
        if rewritten.is_err() || self.set_identity_headers(&entry.principal).is_err() {
            return None;
        }
        let cache = match backend {
            Some(_) => CacheUse::Hit,
            None => CacheUse::None,
        };
        // One clock reading for the record and the status check (none when neither needs it).
        let now_ms = if backend.is_some() || policy.audit_log.is_on() {
            self.clock.observe(self.host.now_ms())
        } else {
            0
        };
        let watched_key = backend
            .filter(|b| b.take_status_check(now_ms))
            .map(|b| b.key);
        let exchanged = backend.map(|b| &b.fingerprint);
        self.audit_cached(
            entry,
            &AuditFacts {
                // Decided on arrival, without a callout.
                started_ms: None,
                route: Some(route_index),
                digest: Some(entry.digest),
                principal: Some(&entry.principal),
                tool: None,
                target: route.target.as_deref(),
                cache,
                denied: None,
                exchanged: exchanged.map(|f| &**f),
            },
            exchanged,
            now_ms,
        );
        self.metrics.add(self.allowed_counter);
        if cache == CacheUse::Hit {
            self.metrics.add(self.cache_hit_counter);
        }
        Some(Admission::Cached { watched_key })
    }
}
