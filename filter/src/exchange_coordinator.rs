//! One exchange per (token, target) across an Envoy's workers: the shared store of exchanged
//! tokens, this worker's exchanges in flight and the requests waiting on them, the requests
//! waiting on another worker's exchange (its lease), failures shared for a short window, and the
//! sweep of exchanges whose answer will never come.
//!
//! It makes no host call besides the store it is handed: the gateway dispatches the callouts it
//! asks for and applies the outcomes it returns. The store is a trait (`SharedStore`), so a store
//! shared by many Envoys can stand where proxy-wasm's shared data stands today.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use crate::cache::{Digest32, ExchangeStore, LeaseOutcome, LeaseStatus, SharedStore};
use crate::config::ExchangeTarget;
use crate::exchange::{reusable_until, ExchangeError, Exchanged};

/// How long a failed exchange's outcome is shared with other requests for the same token,
/// instead of each retrying the IdP: long enough to absorb a burst, short enough that a
/// recovered IdP is asked again within a second.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);
/// A lease outlives its exchange's timeout by this much, so a holder that gets its answer at
/// the timeout still writes the result before another worker takes over.
pub const LEASE_GRACE: Duration = Duration::from_secs(1);
/// A request waiting on another worker's lease gives up (504) this long after the lease itself
/// should have ended: the holder is stuck, and the client should not wait forever.
pub const REMOTE_WAIT_GRACE: Duration = Duration::from_secs(1);
/// An exchange with no answer this long after its timeout is given up: Envoy answers every
/// callout by its timeout, so only a cancelled callout (its request went away) gets here.
pub const STALE_AFTER_TIMEOUT: Duration = Duration::from_secs(2);
/// An answer without a response that comes within this of the callout's timeout is Envoy's
/// timeout (504), not a failed connection (503).
pub const TIMEOUT_SLACK: Duration = Duration::from_millis(50);

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The subject of an exchange, without the token.
#[derive(Clone)]
pub struct Subject {
    pub key: Digest32,
    pub expires_at: i64,
    pub fingerprint: String,
    pub sub: String,
}

/// How a request gets its backend token.
pub enum Join {
    /// From the shared store, reusable until `until`.
    Stored { token: String, until: i64 },
    /// Waiting on this worker's exchange for the same key.
    Joined,
    /// This worker holds the lease: dispatch the exchange, then [`ExchangeCoordinator::dispatched`].
    Lead,
    /// Waiting on another worker's exchange (polled on fast ticks).
    Remote,
    /// The last exchange for this key failed within [`FAILURE_TTL`].
    Failed(ExchangeError),
}

/// What became of a request waiting on another worker.
pub enum RemoteOutcome {
    Stored {
        token: String,
        until: i64,
    },
    Failed(ExchangeError),
    /// The other worker's exchange ended without a token: this worker leads now.
    Lead {
        subject: Subject,
        target: Rc<ExchangeTarget>,
    },
}

/// A backend token the IdP issued, and until when it may be reused (`None`: not at all).
pub struct Issued {
    pub token: String,
    pub until: Option<i64>,
}

/// An exchange of this worker that ended, with the requests that waited on it.
pub struct Ended {
    pub subject: Subject,
    pub elapsed_ms: u64,
    pub waiters: Vec<u32>,
    pub outcome: Result<Issued, ExchangeError>,
    /// This Envoy held the fleet store's lock for the key.
    pub holds_fleet_lock: bool,
}

/// One step of an exchange this worker leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Read the fleet store (and take its lock for this key when nobody holds it).
    FleetLookup,
    /// Read the fleet store again while another Envoy exchanges this key.
    FleetPoll,
    /// Ask the IdP.
    Exchange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waits for the root context's tick to send `phase` (see the gateway's `lead_exchange`).
    Deferred(Phase),
    /// `phase` went out as this callout.
    Sent {
        phase: Phase,
        callout: u32,
        sent_ms: u64,
        timeout: Duration,
    },
    /// Another Envoy holds the fleet lock: poll the store from `next_poll_ms`, exchange here
    /// from `give_up_ms`.
    FleetWait { next_poll_ms: u64, give_up_ms: u64 },
}

struct InFlight {
    stage: Stage,
    subject: Subject,
    target: Rc<ExchangeTarget>,
    started_ms: u64,
    /// Requests waiting on this exchange, the dispatching one first.
    waiters: Vec<u32>,
    /// This Envoy took the fleet store's lock for the key (its write or failure releases it).
    holds_fleet_lock: bool,
    /// Until when the lock's holder elsewhere is waited for (set by the first lookup).
    fleet_wait_until: Option<u64>,
}

/// A callout whose answer will never come.
#[derive(Debug, PartialEq, Eq)]
pub struct Stale {
    pub callout: u32,
    /// The waiters of an exchange given up (`None`: the exchange goes on without this call).
    pub given_up: Option<Vec<u32>>,
}

/// An exchange due to be sent from the root context.
pub struct Due {
    pub key: Digest32,
    pub phase: Phase,
}

struct RemoteWaiter {
    context_id: u32,
    subject: Subject,
    target: Rc<ExchangeTarget>,
    since_ms: u64,
}

pub struct ExchangeCoordinator {
    store: ExchangeStore,
    worker_id: u32,
    /// The fleet store's call timeout, when there is one: its phases (a lookup, waiting on
    /// another Envoy's exchange, polls) lengthen an exchange, and this Envoy's lease must
    /// outlive it.
    fleet_timeout: Option<Duration>,
    in_flight: HashMap<Digest32, InFlight>,
    remote_waiters: Vec<RemoteWaiter>,
}

impl ExchangeCoordinator {
    pub fn new(store: ExchangeStore, worker_id: u32, fleet_timeout: Option<Duration>) -> Self {
        Self {
            store,
            worker_id,
            fleet_timeout,
            in_flight: HashMap::new(),
            remote_waiters: Vec::new(),
        }
    }

    pub fn store(&self) -> &ExchangeStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut ExchangeStore {
        &mut self.store
    }

    fn lease_ttl(&self, target: &ExchangeTarget) -> u64 {
        let fleet = self.fleet_timeout.map_or(Duration::ZERO, |t| {
            // A lookup, then waiting on another Envoy's exchange, then a poll.
            t * 2 + target.timeout + crate::fleet::WAIT_GRACE
        });
        ms(target.timeout + LEASE_GRACE + fleet)
    }

    /// A request needs the backend token for `subject` at `target`.
    pub fn join(
        &mut self,
        shared: &dyn SharedStore,
        context_id: u32,
        subject: &Subject,
        target: &Rc<ExchangeTarget>,
        now_ms: u64,
    ) -> Join {
        if let Some((token, until)) = self.store.get(shared, &subject.key, secs(now_ms)) {
            return Join::Stored { token, until };
        }
        if let Some(exchange) = self.in_flight.get_mut(&subject.key) {
            exchange.waiters.push(context_id);
            return Join::Joined;
        }
        let ttl = self.lease_ttl(target);
        match self
            .store
            .try_lease(shared, &subject.key, self.worker_id, now_ms, ttl)
        {
            LeaseOutcome::Acquired => Join::Lead,
            LeaseOutcome::Failed(e) => Join::Failed(e),
            LeaseOutcome::HeldElsewhere => {
                self.remote_waiters.push(RemoteWaiter {
                    context_id,
                    subject: subject.clone(),
                    target: Rc::clone(target),
                    since_ms: now_ms,
                });
                Join::Remote
            }
        }
    }

    /// This worker leads the exchange for `subject` (it holds the lease): its first `phase` is
    /// sent now ([`Self::sent`]) or on the root context's next tick ([`Self::due`]). Others join
    /// it meanwhile as usual.
    pub fn begin(
        &mut self,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        phase: Phase,
        now_ms: u64,
    ) {
        self.in_flight.insert(
            subject.key,
            InFlight {
                stage: Stage::Deferred(phase),
                subject,
                target,
                started_ms: now_ms,
                waiters,
                holds_fleet_lock: false,
                fleet_wait_until: None,
            },
        );
    }

    /// The subject, target and waiters of the exchange in flight for `key`.
    pub fn in_flight(&self, key: &Digest32) -> Option<(&Subject, &Rc<ExchangeTarget>, &[u32])> {
        self.in_flight
            .get(key)
            .map(|x| (&x.subject, &x.target, x.waiters.as_slice()))
    }

    /// `phase` of the exchange for `key` went out as `callout`.
    pub fn sent(
        &mut self,
        key: &Digest32,
        phase: Phase,
        callout: u32,
        timeout: Duration,
        now_ms: u64,
    ) {
        if let Some(x) = self.in_flight.get_mut(key) {
            x.stage = Stage::Sent {
                phase,
                callout,
                sent_ms: now_ms,
                timeout,
            };
        }
    }

    /// The answer to `callout` for `key` is the one the exchange waits for (not a late answer
    /// to a callout given up on).
    pub fn awaits(&self, key: &Digest32, callout: u32) -> bool {
        self.in_flight
            .get(key)
            .is_some_and(|x| matches!(x.stage, Stage::Sent { callout: c, .. } if c == callout))
    }

    /// `phase` is next for `key`, sent from the root context's next tick.
    pub fn defer(&mut self, key: &Digest32, phase: Phase) {
        if let Some(x) = self.in_flight.get_mut(key) {
            x.stage = Stage::Deferred(phase);
        }
    }

    /// This Envoy took the fleet lock for `key`.
    pub fn hold_fleet_lock(&mut self, key: &Digest32) {
        if let Some(x) = self.in_flight.get_mut(key) {
            x.holds_fleet_lock = true;
        }
    }

    /// Another Envoy exchanges `key`: poll the fleet store every `poll` until its exchange's
    /// bound (`wait`, counted from the first lookup), then exchange here. `false` once the
    /// bound has passed (exchange now).
    pub fn wait_for_fleet(
        &mut self,
        key: &Digest32,
        now_ms: u64,
        poll: Duration,
        wait: Duration,
    ) -> bool {
        let Some(x) = self.in_flight.get_mut(key) else {
            return false;
        };
        let give_up_ms = *x.fleet_wait_until.get_or_insert(now_ms + ms(wait));
        if now_ms >= give_up_ms {
            return false;
        }
        x.stage = Stage::FleetWait {
            next_poll_ms: now_ms + ms(poll),
            give_up_ms,
        };
        true
    }

    /// Exchanges with a phase to send from the root context now: deferred ones, and fleet polls
    /// that are due (a poll past its bound becomes the exchange).
    pub fn due(&mut self, now_ms: u64) -> Vec<Due> {
        let mut due = Vec::new();
        for (key, x) in &mut self.in_flight {
            let phase = match x.stage {
                Stage::Deferred(phase) => phase,
                Stage::FleetWait { give_up_ms, .. } if now_ms >= give_up_ms => Phase::Exchange,
                Stage::FleetWait { next_poll_ms, .. } if now_ms >= next_poll_ms => Phase::FleetPoll,
                _ => continue,
            };
            due.push(Due { key: *key, phase });
        }
        due
    }

    /// Whether the root context has work for an exchange on its next tick.
    pub fn has_due(&self) -> bool {
        self.in_flight
            .values()
            .any(|x| matches!(x.stage, Stage::Deferred(_) | Stage::FleetWait { .. }))
    }

    /// An exchange dropped before its callout (nobody waits for it any more, or it could not
    /// be sent: then `failure` is shared like an answer's): its lease released. Whether it held
    /// the fleet lock (then the caller releases that too).
    pub fn drop_unsent(
        &mut self,
        shared: &dyn SharedStore,
        key: &Digest32,
        failure: Option<&ExchangeError>,
        now_ms: u64,
    ) -> bool {
        match self.in_flight.remove(key) {
            Some(x) => {
                self.release(shared, key, failure, now_ms);
                x.holds_fleet_lock
            }
            None => false,
        }
    }

    /// Ends this worker's lease on `key`: a failure is shared with the other workers' waiting
    /// requests for [`FAILURE_TTL`].
    pub fn release(
        &self,
        shared: &dyn SharedStore,
        key: &Digest32,
        failure: Option<&ExchangeError>,
        now_ms: u64,
    ) {
        self.store.release(
            shared,
            key,
            self.worker_id,
            failure,
            now_ms,
            ms(FAILURE_TTL),
        );
    }

    /// The callout of this worker's exchange for `key` answered: the exchange ends. The outcome
    /// is stored (the token until it may be reused, or the failure for its window) before the
    /// waiters are handed back. `None` if the exchange was already given up.
    pub fn answered(
        &mut self,
        shared: &dyn SharedStore,
        key: &Digest32,
        outcome: Result<Exchanged, ExchangeError>,
        now_ms: u64,
    ) -> Option<Ended> {
        let exchange = self.in_flight.remove(key)?;
        let elapsed_ms = now_ms.saturating_sub(exchange.started_ms);
        let callout_ms = match exchange.stage {
            Stage::Sent { sent_ms, .. } => now_ms.saturating_sub(sent_ms),
            _ => elapsed_ms,
        };
        let outcome = match outcome {
            Ok(exchanged) => {
                let until = reusable_until(
                    &exchanged,
                    exchange.subject.expires_at,
                    secs(now_ms),
                    exchange.target.cache_margin_seconds,
                );
                if let Some(until) = until {
                    self.store
                        .put(shared, key, &exchanged.access_token, until, secs(now_ms));
                }
                Ok(Issued {
                    token: exchanged.access_token,
                    until,
                })
            }
            // No response at all, at the timeout: Envoy gave up waiting.
            Err(ExchangeError::Unavailable { status: None, .. })
                if callout_ms + ms(TIMEOUT_SLACK) >= ms(exchange.target.timeout) =>
            {
                Err(ExchangeError::Timeout)
            }
            Err(e) => Err(e),
        };
        self.release(shared, key, outcome.as_ref().err(), now_ms);
        Some(Ended {
            elapsed_ms,
            subject: exchange.subject,
            waiters: exchange.waiters,
            outcome,
            holds_fleet_lock: exchange.holds_fleet_lock,
        })
    }

    /// Another Envoy's exchange for `key`, found in the fleet store: the exchange ends as if
    /// answered, stored here too (never beyond the client token's own expiry).
    pub fn served(
        &mut self,
        shared: &dyn SharedStore,
        key: &Digest32,
        token: String,
        until: i64,
        now_ms: u64,
    ) -> Option<Ended> {
        let exchange = self.in_flight.remove(key)?;
        let until = until.min(exchange.subject.expires_at);
        self.store.put(shared, key, &token, until, secs(now_ms));
        self.release(shared, key, None, now_ms);
        Some(Ended {
            elapsed_ms: now_ms.saturating_sub(exchange.started_ms),
            subject: exchange.subject,
            waiters: exchange.waiters,
            outcome: Ok(Issued {
                token,
                until: Some(until),
            }),
            holds_fleet_lock: exchange.holds_fleet_lock,
        })
    }

    /// Requests waiting on other workers: each is served from the store when the token lands,
    /// answered with the other worker's failure, joins this worker's exchange, leads a new one
    /// when the other worker's lease ended without a token, or keeps waiting.
    pub fn poll_remote(
        &mut self,
        shared: &dyn SharedStore,
        now_ms: u64,
    ) -> Vec<(u32, RemoteOutcome)> {
        let mut outcomes = Vec::new();
        for w in std::mem::take(&mut self.remote_waiters) {
            let key = w.subject.key;
            if let Some((token, until)) = self.store.get(shared, &key, secs(now_ms)) {
                outcomes.push((w.context_id, RemoteOutcome::Stored { token, until }));
                continue;
            }
            let ttl = self.lease_ttl(&w.target);
            match self.store.lease_status(shared, &key, now_ms) {
                LeaseStatus::InProgress
                    if now_ms.saturating_sub(w.since_ms) <= ttl + ms(REMOTE_WAIT_GRACE) =>
                {
                    self.remote_waiters.push(w)
                }
                LeaseStatus::InProgress => {
                    outcomes.push((w.context_id, RemoteOutcome::Failed(ExchangeError::Timeout)))
                }
                LeaseStatus::Failed(e) => outcomes.push((w.context_id, RemoteOutcome::Failed(e))),
                LeaseStatus::Free => {
                    if let Some(exchange) = self.in_flight.get_mut(&key) {
                        exchange.waiters.push(w.context_id);
                        continue;
                    }
                    match self
                        .store
                        .try_lease(shared, &key, self.worker_id, now_ms, ttl)
                    {
                        LeaseOutcome::Acquired => outcomes.push((
                            w.context_id,
                            RemoteOutcome::Lead {
                                subject: w.subject,
                                target: w.target,
                            },
                        )),
                        LeaseOutcome::Failed(e) => {
                            outcomes.push((w.context_id, RemoteOutcome::Failed(e)))
                        }
                        LeaseOutcome::HeldElsewhere => self.remote_waiters.push(w),
                    }
                }
            }
        }
        outcomes
    }

    pub fn has_remote_waiters(&self) -> bool {
        !self.remote_waiters.is_empty()
    }

    /// Exchanges whose answer will never come (their callout was cancelled with the request that
    /// dispatched it). A lost fleet store call only costs the store: the exchange goes on with
    /// the IdP from the next tick. A lost exchange is given up, the failure shared, its waiters
    /// returned. Either way the lost callout's token is returned, to forget it.
    pub fn give_up_stale(&mut self, shared: &dyn SharedStore, now_ms: u64) -> Vec<Stale> {
        let stale: Vec<(Digest32, Phase, u32)> = self
            .in_flight
            .iter()
            .filter_map(|(key, x)| match x.stage {
                Stage::Sent {
                    phase,
                    callout,
                    sent_ms,
                    timeout,
                } if now_ms.saturating_sub(sent_ms) > ms(timeout + STALE_AFTER_TIMEOUT) => {
                    Some((*key, phase, callout))
                }
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for (key, phase, callout) in stale {
            if phase != Phase::Exchange {
                self.defer(&key, Phase::Exchange);
                out.push(Stale {
                    callout,
                    given_up: None,
                });
                continue;
            }
            if let Some(x) = self.in_flight.remove(&key) {
                self.release(shared, &key, Some(&ExchangeError::Timeout), now_ms);
                out.push(Stale {
                    callout,
                    given_up: Some(x.waiters),
                });
            }
        }
        out
    }

    /// The request ended: it waits on nothing any more. An exchange it dispatched stays in
    /// flight for the other waiters (and the cache).
    pub fn forget(&mut self, context_id: u32) {
        for x in self.in_flight.values_mut() {
            x.waiters.retain(|w| *w != context_id);
        }
        self.remote_waiters.retain(|w| w.context_id != context_id);
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.remote_waiters.is_empty()
    }
}

fn secs(ms: u64) -> i64 {
    (ms / 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{exchange_key, token_digest, MemoryStore};
    use crate::config::ClientAuth;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn target() -> Rc<ExchangeTarget> {
        Rc::new(crate::exchange::tests::target(
            ClientAuth::ClientSecretBasic,
        ))
    }

    fn subject(token: &str) -> Subject {
        Subject {
            key: exchange_key(&token_digest(token), &target().identity),
            expires_at: secs(NOW_MS) + 3600,
            fingerprint: "f".into(),
            sub: "alice".into(),
        }
    }

    fn worker(id: u32) -> ExchangeCoordinator {
        ExchangeCoordinator::new(ExchangeStore::new("t", 64), id, None)
    }

    fn issued(token: &str) -> Result<Exchanged, ExchangeError> {
        Ok(Exchanged {
            access_token: token.into(),
            expires_in: Some(3600),
        })
    }

    #[test]
    fn the_first_request_leads_the_next_join_and_the_answer_serves_all() {
        let shared = MemoryStore::default();
        let mut a = worker(1);
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        assert!(matches!(a.join(&shared, 1, &s, &t, NOW_MS), Join::Lead));
        a.begin(s.clone(), Rc::clone(&t), vec![1], Phase::Exchange, NOW_MS);
        a.sent(&s.key, Phase::Exchange, 77, t.timeout, NOW_MS);
        assert!(matches!(a.join(&shared, 2, &s, &t, NOW_MS), Join::Joined));
        let ended = a.answered(&shared, &s.key, issued("b1"), NOW_MS + 40);
        let ended = ended.unwrap();
        assert_eq!(ended.waiters, vec![1, 2]);
        assert_eq!(ended.elapsed_ms, 40);
        assert!(matches!(a.join(&shared, 3, &s, &t, NOW_MS + 50),
            Join::Stored { token, .. } if token == "b1"));
        assert!(a.is_idle());
    }

    #[test]
    fn a_lost_fleet_lookup_turns_into_the_exchange_not_a_failure() {
        let shared = MemoryStore::default();
        let mut a = worker(1);
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        a.join(&shared, 1, &s, &t, NOW_MS);
        a.begin(
            s.clone(),
            Rc::clone(&t),
            vec![1],
            Phase::FleetLookup,
            NOW_MS,
        );
        a.sent(
            &s.key,
            Phase::FleetLookup,
            5,
            Duration::from_millis(250),
            NOW_MS,
        );
        a.join(&shared, 2, &s, &t, NOW_MS);
        a.forget(1);
        let lost = a.give_up_stale(&shared, NOW_MS + 2251);
        assert_eq!(
            lost,
            vec![Stale {
                callout: 5,
                given_up: None
            }]
        );
        let due = a.due(NOW_MS + 2260);
        assert!(matches!(
            due.as_slice(),
            [Due {
                phase: Phase::Exchange,
                ..
            }]
        ));
        assert_eq!(
            a.in_flight(&s.key).map(|(_, _, w)| w.to_vec()),
            Some(vec![2])
        );
    }

    #[test]
    fn another_worker_waits_and_is_served_from_the_store() {
        let shared = MemoryStore::default();
        let (mut a, mut b) = (worker(1), worker(2));
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        assert!(matches!(a.join(&shared, 1, &s, &t, NOW_MS), Join::Lead));
        a.begin(s.clone(), Rc::clone(&t), vec![1], Phase::Exchange, NOW_MS);
        a.sent(&s.key, Phase::Exchange, 77, t.timeout, NOW_MS);
        assert!(matches!(b.join(&shared, 9, &s, &t, NOW_MS), Join::Remote));
        assert!(
            b.poll_remote(&shared, NOW_MS + 20).is_empty(),
            "still in progress"
        );
        a.answered(&shared, &s.key, issued("b1"), NOW_MS + 30);
        let polled = b.poll_remote(&shared, NOW_MS + 40);
        assert!(matches!(&polled[..], [(9, RemoteOutcome::Stored { token, .. })] if token == "b1"));
        assert!(b.is_idle());
    }

    /// A subject whose key starts with `n` (little-endian): its slots are `n mod` the store's.
    fn subject_with_key(n: u64) -> Subject {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&n.to_le_bytes());
        Subject {
            key,
            ..subject("tok")
        }
    }

    #[test]
    fn two_users_sharing_a_lease_slot_cost_one_exchange_each_over_two_workers() {
        let shared = MemoryStore::default();
        // Entries in different slots (of 10,000), leases in the same (of 4,096).
        let store = || ExchangeStore::new("t", 10_000);
        let (mut a, mut b) = (
            ExchangeCoordinator::new(store(), 1, None),
            ExchangeCoordinator::new(store(), 2, None),
        );
        a.store().prepare_leases(&shared);
        let (first, second, t) = (subject_with_key(1), subject_with_key(4097), target());
        let mut exchanges = 0;
        let mut lead = |c: &mut ExchangeCoordinator, s: &Subject, ctx: u32, now: u64| {
            exchanges += 1;
            c.begin(s.clone(), Rc::clone(&t), vec![ctx], Phase::Exchange, now);
            c.sent(&s.key, Phase::Exchange, ctx, t.timeout, now);
        };
        assert!(matches!(a.join(&shared, 1, &first, &t, NOW_MS), Join::Lead));
        lead(&mut a, &first, 1, NOW_MS);
        assert!(matches!(
            a.join(&shared, 2, &second, &t, NOW_MS),
            Join::Remote
        ));
        assert!(matches!(
            b.join(&shared, 3, &first, &t, NOW_MS),
            Join::Remote
        ));
        assert!(matches!(
            b.join(&shared, 4, &second, &t, NOW_MS),
            Join::Remote
        ));

        a.answered(&shared, &first.key, issued("b-first"), NOW_MS + 30);
        // Worker a polls first: its waiter for `second` leads the next exchange.
        let polled = a.poll_remote(&shared, NOW_MS + 40);
        assert!(matches!(&polled[..], [(2, RemoteOutcome::Lead { .. })]));
        lead(&mut a, &second, 2, NOW_MS + 40);
        let polled = b.poll_remote(&shared, NOW_MS + 41);
        assert!(
            matches!(&polled[..], [(3, RemoteOutcome::Stored { token, .. })] if token == "b-first")
        );
        a.answered(&shared, &second.key, issued("b-second"), NOW_MS + 70);
        let polled = b.poll_remote(&shared, NOW_MS + 80);
        assert!(
            matches!(&polled[..], [(4, RemoteOutcome::Stored { token, .. })] if token == "b-second")
        );
        assert_eq!(exchanges, 2);
    }

    #[test]
    fn a_failure_is_shared_for_its_window_and_a_timeout_is_told_from_a_reset() {
        let shared = MemoryStore::default();
        let (mut a, mut b) = (worker(1), worker(2));
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        a.join(&shared, 1, &s, &t, NOW_MS);
        a.begin(s.clone(), Rc::clone(&t), vec![1], Phase::Exchange, NOW_MS);
        a.sent(&s.key, Phase::Exchange, 77, t.timeout, NOW_MS);
        let reset = Err(ExchangeError::Unavailable {
            status: None,
            retry_after: None,
        });
        let ended = a.answered(&shared, &s.key, reset, NOW_MS + 4960).unwrap();
        assert!(
            matches!(ended.outcome, Err(ExchangeError::Timeout)),
            "within TIMEOUT_SLACK"
        );
        assert!(matches!(
            b.join(&shared, 5, &s, &t, NOW_MS + 5000),
            Join::Failed(_)
        ));
        let later = NOW_MS + 4960 + ms(FAILURE_TTL) + 1;
        assert!(matches!(b.join(&shared, 6, &s, &t, later), Join::Lead));
    }

    #[test]
    fn an_exchange_without_an_answer_is_given_up_and_its_waiters_returned() {
        let shared = MemoryStore::default();
        let mut a = worker(1);
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        a.join(&shared, 1, &s, &t, NOW_MS);
        a.begin(s.clone(), Rc::clone(&t), vec![1], Phase::Exchange, NOW_MS);
        a.sent(&s.key, Phase::Exchange, 77, t.timeout, NOW_MS);
        a.join(&shared, 2, &s, &t, NOW_MS);
        a.forget(1);
        assert!(a.give_up_stale(&shared, NOW_MS + 7000).is_empty());
        let given_up = a.give_up_stale(&shared, NOW_MS + 7001);
        assert_eq!(
            given_up,
            vec![Stale {
                callout: 77,
                given_up: Some(vec![2])
            }]
        );
        assert!(a.is_idle());
        assert!(a
            .answered(&shared, &s.key, issued("late"), NOW_MS + 8000)
            .is_none());
    }
}
