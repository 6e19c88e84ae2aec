//! Opaque tokens checked by RFC 7662 introspection at the one provider that has it. Requests
//! with the same token wait on one callout (coalesced); the callout goes out from the root
//! context on the tick, because its answer serves every one of them and Envoy cancels a callout
//! when the request that dispatched it ends. Answers are kept per worker until
//! `min(exp, now + cache_max_seconds)` (see `introspection::parse_answer`), at most
//! [`MAX_INTROSPECTED`] of them. They are not put in the verified-token cache, which accepts an
//! entry `clock_skew_seconds` past its expiry: that would stretch the configured maximum.

use std::rc::Rc;

use log::warn;

use crate::cache::{fingerprint, Digest32};
use crate::host::Host;
use crate::introspection::{parse_answer, IntrospectionError, IntrospectionRequest};
use crate::key_manager::FETCH_LOST_AFTER_TIMEOUT;
use crate::reply::Denial;
use crate::request::RequestState;
use crate::verify::Principal;

use super::decide::Step;
use super::{secs, CalloutPurpose, Gateway};

struct Pending {
    key: Digest32,
    provider: u8,
    waiters: Vec<u32>,
    /// Callout token and when it was dispatched.
    callout: Option<(u32, u64)>,
}

/// Introspection answers one worker keeps: beyond this the expired ones go, then the oldest.
/// Looked up by a scan (only for opaque tokens): a map here costs the module kilobytes of
/// generic code, and the budget is 600 KiB.
pub const MAX_INTROSPECTED: usize = 1024;

/// Introspections in flight (a handful at a time) and the answers kept.
#[derive(Default)]
pub(super) struct Introspections {
    pending: Vec<Pending>,
    answers: Vec<(Digest32, Rc<Principal>)>,
}

impl Introspections {
    /// A kept answer for the token with this digest, while it is valid (strictly before its
    /// `expires_at`).
    pub(super) fn answer(&self, key: &Digest32, now: i64) -> Option<Rc<Principal>> {
        self.answers
            .iter()
            .find(|(k, p)| k == key && p.expires_at > now)
            .map(|(_, p)| Rc::clone(p))
    }

    fn remember(&mut self, key: Digest32, principal: Rc<Principal>, now: i64) {
        self.answers
            .retain(|(k, p)| *k != key && p.expires_at > now);
        if self.answers.len() >= MAX_INTROSPECTED {
            self.answers.remove(0);
        }
        self.answers.push((key, principal));
    }

    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    fn find(&mut self, key: &Digest32) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.key == *key)
    }

    fn take(&mut self, key: &Digest32) -> Option<Pending> {
        let i = self.pending.iter().position(|p| p.key == *key)?;
        Some(self.pending.swap_remove(i))
    }

    /// The request ended: it waits no more; an introspection nobody waits for and not yet
    /// dispatched is dropped.
    pub(super) fn forget(&mut self, context_id: u32) {
        self.pending.retain_mut(|p| {
            p.waiters.retain(|w| *w != context_id);
            !p.waiters.is_empty() || p.callout.is_some()
        });
    }
}

impl<H: Host> Gateway<H> {
    /// Parks the request until its token's introspection at `provider` answers.
    pub(super) fn wait_for_introspection(
        &mut self,
        context_id: u32,
        provider: u8,
        key: Digest32,
    ) -> Step {
        match self.introspections.find(&key) {
            Some(p) if !p.waiters.contains(&context_id) => p.waiters.push(context_id),
            Some(_) => {}
            None => self.introspections.pending.push(Pending {
                key,
                provider,
                waiters: vec![context_id],
                callout: None,
            }),
        }
        self.set_state(context_id, RequestState::Introspecting);
        self.set_fast_tick(true);
        Step::Wait
    }

    /// From the root context's tick: dispatches the introspections not yet sent, gives up the
    /// lost ones.
    pub(super) fn tick_introspections(&mut self, now: u64) {
        let policy = Rc::clone(&self.policy);
        let mut failed: Vec<(Digest32, IntrospectionError)> = Vec::new();
        let keys: Vec<Digest32> = self.introspections.pending.iter().map(|p| p.key).collect();
        for key in keys {
            let Some(pending) = self.introspections.find(&key) else {
                continue;
            };
            let Some(endpoint) = policy
                .providers
                .get(usize::from(pending.provider))
                .and_then(|p| p.introspection.as_ref())
            else {
                failed.push((key, IntrospectionError::Unavailable));
                continue;
            };
            if let Some((callout, since)) = pending.callout {
                let limit = (endpoint.timeout + FETCH_LOST_AFTER_TIMEOUT).as_millis() as u64;
                if now.saturating_sub(since) > limit {
                    self.callouts.remove(&callout);
                    failed.push((key, IntrospectionError::Timeout));
                }
                continue;
            }
            let waiters = pending.waiters.clone();
            let Some(token) = self.waiting_token(&waiters) else {
                self.introspections.take(&key);
                continue;
            };
            let request = IntrospectionRequest::build(endpoint, &token);
            let headers: Vec<(&str, &str)> = request
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let _ = self.host.act_as_root();
            match self.host.dispatch(
                &endpoint.cluster,
                &headers,
                Some(&request.body),
                endpoint.timeout,
            ) {
                Ok(callout) => {
                    self.callouts
                        .insert(callout, CalloutPurpose::Introspect(key));
                    if let Some(p) = self.introspections.find(&key) {
                        p.callout = Some((callout, now));
                    }
                }
                Err(_) => {
                    warn!(
                        "introspection callout to cluster {} could not be dispatched",
                        endpoint.cluster
                    );
                    failed.push((key, IntrospectionError::Unavailable));
                }
            }
        }
        for (key, error) in failed {
            self.introspection_ended(&key, Err(error), now);
        }
    }

    /// The introspection of the token with digest `key` answered.
    pub(super) fn on_introspection_answer(
        &mut self,
        key: &Digest32,
        status: Option<u16>,
        body: &[u8],
        now: u64,
    ) {
        let policy = Rc::clone(&self.policy);
        let Some(provider_index) = self.introspections.find(key).map(|p| p.provider) else {
            return;
        };
        let Some(provider) = policy.providers.get(usize::from(provider_index)) else {
            return;
        };
        let outcome = parse_answer(status, body, provider, secs(now)).map(|mut p| {
            p.provider = provider_index;
            Rc::new(p)
        });
        if let Err(e) = &outcome {
            warn!(
                "introspection of token {} failed: {}",
                fingerprint(key),
                e.describe()
            );
        }
        self.introspection_ended(key, outcome, now);
    }

    /// The token of a request still waiting among `waiters`.
    fn waiting_token(&self, waiters: &[u32]) -> Option<String> {
        waiters
            .iter()
            .find_map(|w| self.requests.get(w).map(|r| r.token.clone()))
    }

    /// Every request waiting on `key` goes on with the principal, or gets the refusal.
    fn introspection_ended(
        &mut self,
        key: &Digest32,
        outcome: Result<Rc<Principal>, IntrospectionError>,
        now: u64,
    ) {
        let Some(pending) = self.introspections.take(key) else {
            return;
        };
        let principal = match outcome {
            Ok(principal) => principal,
            Err(e) => {
                for id in pending.waiters {
                    self.finish_resumed(id, Step::Deny(Denial::Introspection(e.clone())));
                }
                return;
            }
        };
        self.introspections.remember(*key, principal, secs(now));
        for id in pending.waiters {
            self.set_state(id, RequestState::Authenticating);
            let step = self.advance(id, now);
            self.finish_resumed(id, step);
        }
    }
}
