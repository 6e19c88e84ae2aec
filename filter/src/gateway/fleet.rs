//! The phases of an exchange this worker leads (fleet store lookup, waiting on another Envoy,
//! the exchange itself), and the fleet store's own calls (authentication, leases, writes).
//!
//! Which context sends a phase follows `lead_exchange`'s rule: the request's own callback for
//! its own exchange, the root context for anything done on behalf of others. The store's
//! background calls always go out from the root context, so no request's end cancels them.

use std::rc::Rc;

use log::info;

use crate::audit::CacheUse;
use crate::exchange_coordinator::{Ended, Phase, LEASE_GRACE};
use crate::fleet::{EtcdRequest, FleetCall, FleetCounts, Found, POLL_INTERVAL, WAIT_GRACE};
use crate::host::{Host, HostError};
use crate::reply::Denial;

use super::decide::{Step, Upstream};
use super::{CalloutPurpose, Gateway};

impl<H: Host> Gateway<H> {
    /// A new exchange looks in the fleet store first, when there is one and it is usable.
    pub(super) fn first_phase(&mut self, now_ms: u64) -> Phase {
        let usable = self.fleet.as_mut().is_some_and(|f| f.usable(now_ms));
        if usable {
            Phase::FleetLookup
        } else {
            Phase::Exchange
        }
    }

    /// Sends `phase` of the exchange in flight for `key` from the current context.
    pub(super) fn send_phase(
        &mut self,
        token: &str,
        key: &crate::cache::Digest32,
        phase: Phase,
        now_ms: u64,
    ) -> Result<(), Denial> {
        let Some((subject, target, _)) = self.exchanges.in_flight(key) else {
            return Err(Denial::Internal);
        };
        let (subject, target) = (subject.clone(), Rc::clone(target));
        let request = match (&self.fleet, phase) {
            (Some(fleet), Phase::FleetLookup) => {
                fleet.lookup(key, target.timeout + LEASE_GRACE, now_ms)
            }
            (Some(fleet), Phase::FleetPoll) => fleet.poll(key),
            _ => {
                let callout = self.send_exchange(token, &subject, &target, now_ms)?;
                self.callouts
                    .insert(callout, CalloutPurpose::Exchange(*key));
                self.exchanges
                    .sent(key, Phase::Exchange, callout, target.timeout, now_ms);
                return Ok(());
            }
        };
        match self.dispatch_fleet(&request) {
            Ok((callout, timeout)) => {
                let call = match phase {
                    Phase::FleetPoll => FleetCall::Poll(*key),
                    _ => FleetCall::Lookup(*key),
                };
                self.callouts.insert(callout, CalloutPurpose::Fleet(call));
                self.exchanges.sent(key, phase, callout, timeout, now_ms);
                Ok(())
            }
            Err(_) => {
                if let Some(fleet) = &mut self.fleet {
                    fleet.unsendable(now_ms);
                }
                self.send_phase(token, key, Phase::Exchange, now_ms)
            }
        }
    }

    /// Sends `phase` from the root context's tick (or a callback that may), with the token of
    /// a request still waiting for it; a phase that cannot be sent ends the exchange.
    pub(super) fn send_or_end(&mut self, key: &crate::cache::Digest32, phase: Phase, now: u64) {
        let waiters: Vec<u32> = match self.exchanges.in_flight(key) {
            Some((_, _, waiters)) => waiters.to_vec(),
            None => return,
        };
        let token = waiters
            .iter()
            .find_map(|w| self.requests.get(w).map(|r| r.token.clone()));
        let Some(token) = token else {
            if self.exchanges.drop_unsent(&self.host, key, None, now) {
                self.fleet_unlock(key);
            }
            return;
        };
        match self.send_phase(&token, key, phase, now) {
            Ok(()) => {}
            Err(Denial::Exchange(e)) => {
                if let Some(ended) = self.exchanges.answered(&self.host, key, Err(e), now) {
                    self.on_exchange_ended(ended, b"", now);
                }
            }
            Err(denial) => {
                if self.exchanges.drop_unsent(&self.host, key, None, now) {
                    self.fleet_unlock(key);
                }
                for w in waiters {
                    self.finish_resumed(w, Step::Deny(denial.clone()));
                }
            }
        }
    }

    /// Phases due from the root context: exchanges started on behalf of other requests (see
    /// `lead_exchange`) and fleet polls.
    pub(super) fn dispatch_due(&mut self, now: u64) {
        for due in self.exchanges.due(now) {
            let _ = self.host.act_as_root();
            self.send_or_end(&due.key, due.phase, now);
        }
    }

    fn dispatch_fleet(
        &self,
        request: &EtcdRequest,
    ) -> Result<(u32, std::time::Duration), HostError> {
        let Some(fleet) = &self.fleet else {
            return Err(HostError);
        };
        let policy = fleet.policy();
        let mut headers = vec![
            (":method", "POST"),
            (":path", request.path),
            (":authority", policy.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(token) = fleet.auth_header() {
            headers.push(("authorization", token));
        }
        let timeout = request.timeout(policy.timeout);
        self.host
            .dispatch(
                &policy.cluster,
                &headers,
                Some(request.body.as_bytes()),
                timeout,
            )
            .map(|callout| (callout, timeout))
    }

    /// An answer from the fleet store; `receiver` is the request whose context got it (`None`:
    /// the root context).
    pub(super) fn on_fleet_answer(
        &mut self,
        call: FleetCall,
        callout: u32,
        status: Option<u16>,
        body: &[u8],
        receiver: Option<u32>,
        now: u64,
    ) {
        match call {
            FleetCall::Lookup(key) => {
                self.on_fleet_lookup(false, &key, callout, status, body, receiver, now)
            }
            FleetCall::Poll(key) => {
                self.on_fleet_lookup(true, &key, callout, status, body, receiver, now)
            }
            other => {
                let follow_up = match &mut self.fleet {
                    Some(fleet) => fleet.on_answer(other, status, body, now),
                    None => None,
                };
                if let Some((call, request)) = follow_up {
                    self.send_fleet_call(call, &request, now);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fleet_lookup(
        &mut self,
        poll: bool,
        key: &crate::cache::Digest32,
        callout: u32,
        status: Option<u16>,
        body: &[u8],
        receiver: Option<u32>,
        now: u64,
    ) {
        if !self.exchanges.awaits(key, callout) {
            return;
        }
        let Some((subject, target, waiters)) = self.exchanges.in_flight(key) else {
            return;
        };
        let (label, wait) = (subject.fingerprint.clone(), target.timeout + WAIT_GRACE);
        let lead = waiters.first().copied();
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        let phase = match fleet.on_lookup(poll, key, status, body, now, &label) {
            Found::Token { token, until } => {
                if let Some(ended) = self.exchanges.served(&self.host, key, token, until, now) {
                    self.on_fleet_hit(ended);
                }
                return;
            }
            Found::LockTaken => {
                self.exchanges.hold_fleet_lock(key);
                Phase::Exchange
            }
            Found::Locked => {
                if self.exchanges.wait_for_fleet(key, now, POLL_INTERVAL, wait) {
                    self.set_fast_tick(true);
                    return;
                }
                Phase::Exchange
            }
            Found::Exchange => Phase::Exchange,
        };
        // The root context may send for anyone; a request's context only its own exchange.
        if receiver.is_none() || receiver == lead {
            if receiver.is_none() {
                let _ = self.host.act_as_root();
            }
            self.send_or_end(key, phase, now);
        } else {
            self.exchanges.defer(key, phase);
            self.set_fast_tick(true);
        }
    }

    /// Another Envoy's backend token, from the fleet store: the waiters go upstream with it.
    fn on_fleet_hit(&mut self, ended: Ended) {
        let Ok(issued) = ended.outcome else {
            return;
        };
        info!(
            "token {} for sub {}: backend token from the fleet store in {} ms",
            ended.subject.fingerprint, ended.subject.sub, ended.elapsed_ms
        );
        let step = Step::Forward(Upstream::Exchanged {
            token: issued.token.into(),
            until: issued.until,
        });
        for w in ended.waiters {
            if let Some(r) = self.requests.get_mut(&w) {
                if r.cache == CacheUse::Miss {
                    r.cache = CacheUse::Fleet;
                }
            }
            self.finish_resumed(w, step.clone());
        }
    }

    /// An exchange this worker led ended: its token goes to the fleet store, or (failed) its
    /// lock is dropped so other Envoys stop waiting for it.
    pub(super) fn share_with_fleet(&mut self, ended: &Ended, now: u64) {
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        match &ended.outcome {
            Ok(issued) => {
                if let Some(until) = issued.until {
                    fleet.queue_write(&ended.subject.key, &issued.token, until, now);
                }
            }
            Err(_) if ended.holds_fleet_lock => fleet.queue_unlock(&ended.subject.key),
            Err(_) => {}
        }
        self.set_fast_tick(true);
    }

    /// Drops this Envoy's fleet lock on `key` (its exchange will not happen).
    pub(super) fn fleet_unlock(&mut self, key: &crate::cache::Digest32) {
        if let Some(fleet) = &mut self.fleet {
            fleet.queue_unlock(key);
        }
    }

    /// The upstream refused the backend token cached under `key`: other Envoys must not use it.
    pub(super) fn fleet_forget(&mut self, key: &crate::cache::Digest32) {
        if let Some(fleet) = &mut self.fleet {
            fleet.queue_delete(key);
            self.set_fast_tick(true);
        }
    }

    /// The store's own calls, from the root context's tick, and its counts into metrics.
    pub(super) fn tick_fleet(&mut self, now: u64) {
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        let calls = fleet.due(now);
        let counts = std::mem::take(&mut fleet.counts);
        let open = fleet.is_open();
        for (call, request) in calls {
            let _ = self.host.act_as_root();
            self.send_fleet_call(call, &request, now);
        }
        self.count_fleet(counts, open);
    }

    fn send_fleet_call(&mut self, call: FleetCall, request: &EtcdRequest, now: u64) {
        match self.dispatch_fleet(request) {
            Ok((callout, _)) => {
                self.callouts.insert(callout, CalloutPurpose::Fleet(call));
            }
            Err(_) => {
                if let Some(fleet) = &mut self.fleet {
                    fleet.not_sent(&call, now);
                }
            }
        }
    }

    fn count_fleet(&mut self, counts: FleetCounts, open: bool) {
        for (name, n) in [
            ("fleet.hits", counts.hits),
            ("fleet.misses", counts.misses),
            ("fleet.waits", counts.waits),
            ("fleet.errors", counts.errors),
            ("fleet.writes", counts.writes),
            ("fleet.unusable_values", counts.unusable_values),
        ] {
            self.metrics.add_n(name, n);
        }
        self.metrics
            .gauge(&self.host, "fleet.breaker_open", u64::from(open));
    }

    /// `true` while the fleet store has work for the root context's next tick.
    pub(super) fn fleet_busy(&self) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.has_work())
    }
}
