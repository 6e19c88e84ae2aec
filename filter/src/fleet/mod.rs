//! The fleet store: exchanged tokens shared by every Envoy of a fleet through etcd, behind each
//! Envoy's own caches (a local hit never reaches it), so a token is exchanged once per fleet
//! rather than once per replica that sees it.
//!
//! This unit owns the store's state on one worker (auth token, lock lease, circuit breaker,
//! writes waiting to go out) and speaks etcd's JSON API through [`etcd`]; it makes no host
//! call. The gateway sends what it asks for to the store's cluster and hands the answers back.
//! Per key, the exchange coordinator keeps where the exchange is (lookup, waiting on another
//! Envoy, exchanging).
//!
//! The store is an optimisation, never a dependency: every failure (no answer within its
//! timeout, an error status, garbage, a value that does not open) makes the request exchange
//! directly with the IdP, and the breaker then keeps requests away from the store for
//! [`BREAKER_COOLDOWN`], so an outage costs one timeout, not one per request.

pub mod etcd;
pub mod seal;

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use log::{info, warn};

use crate::cache::Digest32;
use crate::config::FleetStorePolicy;
use etcd::{EtcdError, Lookup};

/// After a failure the store is left alone this long, then one request probes it: an outage
/// costs one timeout per worker every 5 s, and a recovered store is used again within 5 s.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
/// While another Envoy exchanges a key, the store is read this often: a poll costs one etcd
/// read, and each period is latency the waiting request may pay on top of that exchange.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// A request waits on another Envoy's exchange at most that exchange's timeout plus this (its
/// write to the store), then exchanges itself.
pub const WAIT_GRACE: Duration = Duration::from_secs(1);
/// Lock keys hang on a lease of this length, renewed when less than half is left: a lock held
/// by an Envoy that died ends with its lease, and one grant per worker every 15 s is all the
/// lease traffic locks cost.
pub const LOCK_LEASE_TTL: Duration = Duration::from_secs(30);
/// etcd checks a password with bcrypt (~50 ms on an idle machine, measured; hundreds under
/// load), so authentication gets this long even when calls get `timeout_ms`.
pub const AUTHENTICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers larger than this are not what the store sends (a sealed backend token is a few KiB).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Writes waiting for the tick beyond this are dropped (counted): the store is behind, and the
/// tokens are cached here anyway.
const MAX_QUEUED: usize = 1024;

/// What a callout to the store is for.
#[derive(Clone)]
pub enum FleetCall {
    /// A request's lookup (and lock) for an exchange in flight.
    Lookup(Digest32),
    /// A poll while another Envoy exchanges the key.
    Poll(Digest32),
    /// The lease lock keys hang on.
    LockLease,
    /// The lease a value will be written under, then the write.
    ValueLease(Rc<SealedWrite>),
    Write,
    Delete,
    Authenticate,
}

impl FleetCall {
    /// The store's own work (not a phase of a request's exchange).
    #[cfg(test)]
    pub fn is_background(&self) -> bool {
        !matches!(self, FleetCall::Lookup(_) | FleetCall::Poll(_))
    }
}

/// A value ready for the store.
pub struct SealedWrite {
    value_key: Vec<u8>,
    lock_key: Vec<u8>,
    sealed: Vec<u8>,
    ttl_secs: u64,
}

/// One call to etcd: `POST {path}` with this body.
pub struct EtcdRequest {
    pub path: &'static str,
    pub body: String,
}

impl EtcdRequest {
    /// How long the call may take.
    pub fn timeout(&self, configured: Duration) -> Duration {
        if self.path == etcd::AUTHENTICATE_PATH {
            configured.max(AUTHENTICATE_TIMEOUT)
        } else {
            configured
        }
    }
}

/// What a lookup or poll decided for the exchange of its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Another Envoy's backend token.
    Token { token: String, until: i64 },
    /// This Envoy holds the key's lock now: exchange, then write.
    LockTaken,
    /// Another Envoy is exchanging: wait and poll.
    Locked,
    /// Nothing to use (no entry, an unusable one, or the store failed): exchange.
    Exchange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed,
    Open {
        until_ms: u64,
    },
    /// Cooldown over; one lookup is probing the store. A probe whose answer never comes (its
    /// request went away and Envoy cancelled it) is replaced after another cooldown.
    Probing {
        since_ms: u64,
    },
}

enum Auth {
    NotNeeded,
    Missing,
    Requesting,
    Token(String),
}

enum LockLease {
    None,
    Granting,
    Held { id: String, expires_ms: u64 },
}

/// Counts the gateway turns into metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FleetCounts {
    pub hits: u64,
    pub misses: u64,
    pub waits: u64,
    pub errors: u64,
    pub writes: u64,
    pub unusable_values: u64,
}

pub struct FleetStore {
    policy: Rc<FleetStorePolicy>,
    breaker: Breaker,
    auth: Auth,
    lock_lease: LockLease,
    queue: VecDeque<(FleetCall, EtcdRequest)>,
    pub counts: FleetCounts,
}

impl FleetStore {
    pub fn new(policy: Rc<FleetStorePolicy>) -> Self {
        let auth = if policy.credentials.is_some() {
            Auth::Missing
        } else {
            Auth::NotNeeded
        };
        Self {
            policy,
            breaker: Breaker::Closed,
            auth,
            lock_lease: LockLease::None,
            queue: VecDeque::new(),
            counts: FleetCounts::default(),
        }
    }

    pub fn policy(&self) -> &FleetStorePolicy {
        &self.policy
    }

    /// Whether the breaker is open (for the gauge).
    pub fn is_open(&self) -> bool {
        !matches!(self.breaker, Breaker::Closed)
    }

    /// The `Authorization` value etcd wants (its token, without `Bearer`).
    pub fn auth_header(&self) -> Option<&str> {
        match &self.auth {
            Auth::Token(t) => Some(t),
            _ => None,
        }
    }

    fn ready(&self) -> bool {
        matches!(self.auth, Auth::NotNeeded | Auth::Token(_))
    }

    /// Whether a new exchange should look in the store first. After the cooldown the first
    /// caller probes (and the others keep going to the IdP until it answers).
    pub fn usable(&mut self, now_ms: u64) -> bool {
        if !self.ready() {
            return false;
        }
        let probe = match self.breaker {
            Breaker::Closed => return true,
            Breaker::Open { until_ms } => now_ms >= until_ms,
            Breaker::Probing { since_ms } => now_ms >= since_ms + ms(BREAKER_COOLDOWN),
        };
        if probe {
            self.breaker = Breaker::Probing { since_ms: now_ms };
        }
        probe
    }

    fn names(&self, key: &Digest32) -> (Vec<u8>, Vec<u8>) {
        let name = self.policy.keys.entry_name(key);
        let prefix = &self.policy.key_prefix;
        (
            format!("{prefix}v/{name}").into_bytes(),
            format!("{prefix}l/{name}").into_bytes(),
        )
    }

    /// The lookup for `key`; it takes the key's lock when the lock lease has `hold` left (an
    /// exchange's duration), so that a lock never outlives its lease by surprise.
    pub fn lookup(&self, key: &Digest32, hold: Duration, now_ms: u64) -> EtcdRequest {
        let (value, lock) = self.names(key);
        let lease = match &self.lock_lease {
            LockLease::Held { id, expires_ms } if *expires_ms > now_ms + ms(hold) => {
                Some(id.as_str())
            }
            _ => None,
        };
        EtcdRequest {
            path: etcd::TXN_PATH,
            body: etcd::lookup(&value, lock.as_slice(), lease),
        }
    }

    /// A poll for `key` (never takes the lock: its holder is exchanging).
    pub fn poll(&self, key: &Digest32) -> EtcdRequest {
        let (value, lock) = self.names(key);
        EtcdRequest {
            path: etcd::TXN_PATH,
            body: etcd::lookup(&value, &lock, None),
        }
    }

    /// The answer to a lookup (or, `poll`, a poll) for `key`. `label` names the client token
    /// in logs.
    pub fn on_lookup(
        &mut self,
        poll: bool,
        key: &Digest32,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
        label: &str,
    ) -> Found {
        let found = match etcd::parse_lookup(status, body) {
            Ok(found) => found,
            Err(e) => {
                self.failed("lookup", &e, now_ms);
                return Found::Exchange;
            }
        };
        self.succeeded();
        match found {
            Lookup::Value(sealed) => {
                let (name, _) = self.names(key);
                match self.policy.keys.open(&name, &sealed) {
                    Ok(opened) if opened.until > (now_ms / 1000) as i64 => {
                        self.counts.hits += 1;
                        Found::Token {
                            token: opened.token,
                            until: opened.until,
                        }
                    }
                    Ok(_) => {
                        self.counts.misses += 1;
                        Found::Exchange
                    }
                    Err(e) => {
                        self.counts.unusable_values += 1;
                        warn!(
                            "fleet store entry for token {label} not used: {e} (key id {}); exchanging",
                            self.policy.keys.key_id()
                        );
                        Found::Exchange
                    }
                }
            }
            Lookup::LockTaken => {
                self.counts.misses += 1;
                Found::LockTaken
            }
            Lookup::Locked => {
                if !poll {
                    self.counts.waits += 1;
                }
                Found::Locked
            }
            Lookup::Free => {
                self.counts.misses += 1;
                Found::Exchange
            }
        }
    }

    /// A lookup could not be sent: the breaker opens like for a failure.
    pub fn unsendable(&mut self, now_ms: u64) {
        self.refused_by_envoy();
        self.failed("call", &EtcdError::NoAnswer, now_ms);
    }

    /// Envoy refuses a callout only to a cluster it does not have (a misspelt
    /// `fleet_store.cluster`, or one a control plane has not delivered yet). The filter cannot
    /// refuse such a configuration up front: `envoy --mode validate` refuses every callout, so a
    /// check at configuration would fail every valid configuration there. It says so loudly
    /// instead, once per breaker period, and exchanges directly meanwhile.
    fn refused_by_envoy(&self) {
        if !matches!(self.breaker, Breaker::Open { .. }) {
            log::error!(
                "fleet_store.cluster: Envoy refused a callout to cluster {:?} (is it defined?); the fleet store is not used until it is",
                self.policy.cluster
            );
        }
    }

    /// The backend token this Envoy got for `key`: written for the other Envoys (and the key's
    /// lock dropped) from the next tick. Until is Unix seconds.
    pub fn queue_write(&mut self, key: &Digest32, token: &str, until: i64, now_ms: u64) {
        let ttl_secs = until.saturating_sub((now_ms / 1000) as i64);
        if ttl_secs <= 0 {
            return;
        }
        let Some(nonce) = seal::random_nonce() else {
            warn!("no random source for the fleet store's nonces; not writing");
            return;
        };
        let (value_key, lock_key) = self.names(key);
        let sealed = self.policy.keys.seal(&value_key, until, token, nonce);
        let write = SealedWrite {
            value_key,
            lock_key,
            sealed,
            ttl_secs: ttl_secs as u64,
        };
        let request = EtcdRequest {
            path: etcd::LEASE_GRANT_PATH,
            body: etcd::lease_grant(write.ttl_secs),
        };
        self.enqueue(FleetCall::ValueLease(Rc::new(write)), request);
    }

    /// Drops the entry for `key` (the upstream refused its token).
    pub fn queue_delete(&mut self, key: &Digest32) {
        let (value, _) = self.names(key);
        self.enqueue(
            FleetCall::Delete,
            EtcdRequest {
                path: etcd::DELETE_PATH,
                body: etcd::delete(&value),
            },
        );
    }

    /// Drops this Envoy's lock on `key` (its exchange failed), so others stop waiting.
    pub fn queue_unlock(&mut self, key: &Digest32) {
        let (_, lock) = self.names(key);
        self.enqueue(
            FleetCall::Delete,
            EtcdRequest {
                path: etcd::DELETE_PATH,
                body: etcd::delete(&lock),
            },
        );
    }

    fn enqueue(&mut self, call: FleetCall, request: EtcdRequest) {
        if self.queue.len() >= MAX_QUEUED {
            self.counts.errors += 1;
            return;
        }
        self.queue.push_back((call, request));
    }

    /// Whether the root context has calls to send.
    pub fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The calls to send from the root context now: authentication, the lock lease, queued
    /// writes and deletes. While the breaker is open, queued work is dropped (the tokens stay
    /// cached here; the store only misses them).
    pub fn due(&mut self, now_ms: u64) -> Vec<(FleetCall, EtcdRequest)> {
        let mut calls = Vec::new();
        if matches!(self.breaker, Breaker::Open { until_ms } if now_ms < until_ms) {
            self.queue.clear();
            return calls;
        }
        if let (Auth::Missing, Some(c)) = (&self.auth, &self.policy.credentials) {
            calls.push((
                FleetCall::Authenticate,
                EtcdRequest {
                    path: etcd::AUTHENTICATE_PATH,
                    body: etcd::authenticate(&c.username, &c.password),
                },
            ));
            self.auth = Auth::Requesting;
        }
        if !self.ready() {
            return calls;
        }
        let renew = match &self.lock_lease {
            LockLease::None => true,
            LockLease::Granting => false,
            LockLease::Held { expires_ms, .. } => *expires_ms < now_ms + ms(LOCK_LEASE_TTL) / 2,
        };
        if renew {
            self.lock_lease = LockLease::Granting;
            calls.push((
                FleetCall::LockLease,
                EtcdRequest {
                    path: etcd::LEASE_GRANT_PATH,
                    body: etcd::lease_grant(LOCK_LEASE_TTL.as_secs()),
                },
            ));
        }
        calls.extend(self.queue.drain(..));
        calls
    }

    /// A background call could not be sent.
    pub fn not_sent(&mut self, call: &FleetCall, now_ms: u64) {
        self.undo(call);
        self.refused_by_envoy();
        self.failed("call", &EtcdError::NoAnswer, now_ms);
    }

    fn undo(&mut self, call: &FleetCall) {
        match call {
            FleetCall::Authenticate => self.auth = Auth::Missing,
            FleetCall::LockLease => self.lock_lease = LockLease::None,
            _ => {}
        }
    }

    /// The answer to a background call; a follow-up call to send at once (the write after its
    /// lease was granted).
    pub fn on_answer(
        &mut self,
        call: FleetCall,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
    ) -> Option<(FleetCall, EtcdRequest)> {
        let outcome = match &call {
            FleetCall::Authenticate => etcd::parse_auth_token(status, body).map(|token| {
                info!("authenticated to the fleet store");
                self.auth = Auth::Token(token);
            }),
            FleetCall::LockLease => etcd::parse_lease(status, body).map(|lease| {
                self.lock_lease = LockLease::Held {
                    id: lease.id,
                    expires_ms: now_ms + lease.ttl_secs * 1000,
                };
            }),
            FleetCall::ValueLease(write) => {
                let write = Rc::clone(write);
                match etcd::parse_lease(status, body) {
                    Ok(lease) => {
                        self.succeeded();
                        return Some((
                            FleetCall::Write,
                            EtcdRequest {
                                path: etcd::TXN_PATH,
                                body: etcd::write(
                                    &write.value_key,
                                    &write.sealed,
                                    &lease.id,
                                    &write.lock_key,
                                ),
                            },
                        ));
                    }
                    Err(e) => Err(e),
                }
            }
            FleetCall::Write => etcd::parse_ok(status, body).map(|_| self.counts.writes += 1),
            FleetCall::Delete => etcd::parse_ok(status, body),
            // Lookups and polls are answered through `on_lookup`.
            FleetCall::Lookup(_) | FleetCall::Poll(_) => Ok(()),
        };
        match outcome {
            Ok(()) => self.succeeded(),
            Err(e) => {
                self.undo(&call);
                self.failed(call_name(&call), &e, now_ms);
            }
        }
        None
    }

    fn succeeded(&mut self) {
        if self.breaker != Breaker::Closed {
            info!("fleet store answers again; using it");
            self.breaker = Breaker::Closed;
        }
    }

    fn failed(&mut self, what: &str, e: &EtcdError, now_ms: u64) {
        self.counts.errors += 1;
        // A 401 to a call made with an auth token: the token expired or was revoked. (A 401 to
        // the authentication itself is a wrong password: that waits for the breaker, so etcd
        // is not asked for a bcrypt check on every tick.)
        let expired = *e == EtcdError::Unauthenticated && what != AUTHENTICATION;
        if expired && self.policy.credentials.is_some() {
            // The auth token expired or was revoked: authenticate again on the next tick.
            self.auth = Auth::Missing;
            return;
        }
        if !matches!(self.breaker, Breaker::Open { .. }) {
            warn!(
                "fleet store {what} failed: {e}; exchanging directly for {} s",
                BREAKER_COOLDOWN.as_secs()
            );
        }
        self.breaker = Breaker::Open {
            until_ms: now_ms + ms(BREAKER_COOLDOWN),
        };
    }
}

const AUTHENTICATION: &str = "authentication";

fn call_name(call: &FleetCall) -> &'static str {
    match call {
        FleetCall::Lookup(_) => "lookup",
        FleetCall::Poll(_) => "poll",
        FleetCall::LockLease => "lock lease grant",
        FleetCall::ValueLease(_) => "value lease grant",
        FleetCall::Write => "write",
        FleetCall::Delete => "delete",
        FleetCall::Authenticate => AUTHENTICATION,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests;
