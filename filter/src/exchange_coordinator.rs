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
}

struct InFlight {
    /// The callout, once dispatched; `None` while it waits for the root context's tick.
    token: Option<u32>,
    subject: Subject,
    target: Rc<ExchangeTarget>,
    started_ms: u64,
    /// Requests waiting on this exchange, the dispatching one first.
    waiters: Vec<u32>,
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
    in_flight: HashMap<Digest32, InFlight>,
    remote_waiters: Vec<RemoteWaiter>,
}

impl ExchangeCoordinator {
    pub fn new(store: ExchangeStore, worker_id: u32) -> Self {
        Self {
            store,
            worker_id,
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

    fn lease_ttl(target: &ExchangeTarget) -> u64 {
        ms(target.timeout + LEASE_GRACE)
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
        let ttl = Self::lease_ttl(target);
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

    /// The exchange this worker leads was dispatched as callout `token`.
    pub fn dispatched(
        &mut self,
        token: u32,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        now_ms: u64,
    ) {
        self.insert(Some(token), subject, target, waiters, now_ms);
    }

    /// The exchange this worker leads is to be dispatched on the next tick, from the root
    /// context (see the gateway's `lead_exchange`). Others join it meanwhile as usual.
    pub fn defer(
        &mut self,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        now_ms: u64,
    ) {
        self.insert(None, subject, target, waiters, now_ms);
    }

    fn insert(
        &mut self,
        token: Option<u32>,
        subject: Subject,
        target: Rc<ExchangeTarget>,
        waiters: Vec<u32>,
        now_ms: u64,
    ) {
        self.in_flight.insert(
            subject.key,
            InFlight {
                token,
                subject,
                target,
                started_ms: now_ms,
                waiters,
            },
        );
    }

    pub fn has_deferred(&self) -> bool {
        self.in_flight.values().any(|x| x.token.is_none())
    }

    /// The exchanges waiting to be dispatched, with their waiters.
    pub fn deferred(&self) -> Vec<(Subject, Rc<ExchangeTarget>, Vec<u32>)> {
        self.in_flight
            .values()
            .filter(|x| x.token.is_none())
            .map(|x| (x.subject.clone(), Rc::clone(&x.target), x.waiters.clone()))
            .collect()
    }

    /// A deferred exchange went out as callout `token`.
    pub fn dispatched_deferred(&mut self, key: &Digest32, token: u32) {
        if let Some(x) = self.in_flight.get_mut(key) {
            x.token = Some(token);
        }
    }

    /// A deferred exchange nobody waits for any more: dropped, its lease released.
    pub fn drop_deferred(&mut self, shared: &dyn SharedStore, key: &Digest32, now_ms: u64) {
        if self.in_flight.remove(key).is_some() {
            self.release(shared, key, None, now_ms);
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
        let outcome = match outcome {
            Ok(exchanged) => {
                let until = reusable_until(
                    &exchanged,
                    exchange.subject.expires_at,
                    secs(now_ms),
                    exchange.target.cache_margin_seconds,
                );
                if let Some(until) = until {
                    self.store.put(shared, key, &exchanged.access_token, until);
                }
                Ok(Issued {
                    token: exchanged.access_token,
                    until,
                })
            }
            // No response at all, at the timeout: Envoy gave up waiting.
            Err(ExchangeError::Unavailable { status: None, .. })
                if elapsed_ms + ms(TIMEOUT_SLACK) >= ms(exchange.target.timeout) =>
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
            let ttl = Self::lease_ttl(&w.target);
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
    /// dispatched it): given up, the failure shared, their waiters and callout tokens returned.
    pub fn give_up_stale(&mut self, shared: &dyn SharedStore, now_ms: u64) -> Vec<(u32, Vec<u32>)> {
        let stale: Vec<Digest32> = self
            .in_flight
            .iter()
            .filter(|(_, x)| {
                x.token.is_some()
                    && now_ms.saturating_sub(x.started_ms)
                        > ms(x.target.timeout + STALE_AFTER_TIMEOUT)
            })
            .map(|(key, _)| *key)
            .collect();
        let mut given_up = Vec::new();
        for key in stale {
            if let Some(x) = self.in_flight.remove(&key) {
                self.release(shared, &key, Some(&ExchangeError::Timeout), now_ms);
                given_up.push((x.token.unwrap_or_default(), x.waiters));
            }
        }
        given_up
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
        ExchangeCoordinator::new(ExchangeStore::new("t", 64), id)
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
        a.dispatched(77, s.clone(), Rc::clone(&t), vec![1], NOW_MS);
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
    fn another_worker_waits_and_is_served_from_the_store() {
        let shared = MemoryStore::default();
        let (mut a, mut b) = (worker(1), worker(2));
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        assert!(matches!(a.join(&shared, 1, &s, &t, NOW_MS), Join::Lead));
        a.dispatched(77, s.clone(), Rc::clone(&t), vec![1], NOW_MS);
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

    #[test]
    fn a_failure_is_shared_for_its_window_and_a_timeout_is_told_from_a_reset() {
        let shared = MemoryStore::default();
        let (mut a, mut b) = (worker(1), worker(2));
        a.store().prepare_leases(&shared);
        let (s, t) = (subject("tok"), target());
        a.join(&shared, 1, &s, &t, NOW_MS);
        a.dispatched(77, s.clone(), Rc::clone(&t), vec![1], NOW_MS);
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
        a.dispatched(77, s.clone(), Rc::clone(&t), vec![1], NOW_MS);
        a.join(&shared, 2, &s, &t, NOW_MS);
        a.forget(1);
        assert!(a.give_up_stale(&shared, NOW_MS + 7000).is_empty());
        let given_up = a.give_up_stale(&shared, NOW_MS + 7001);
        assert_eq!(given_up, vec![(77, vec![2])]);
        assert!(a.is_idle());
        assert!(a
            .answered(&shared, &s.key, issued("late"), NOW_MS + 8000)
            .is_none());
    }
}
