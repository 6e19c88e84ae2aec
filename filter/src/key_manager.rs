//! The issuer's signing keys: the key set in use, its refresh, the refetch an unknown `kid`
//! triggers (throttled), and the requests waiting for keys with their time limit.
//!
//! It makes no host call: it says when a fetch is due ([`JwksFetch`]) and which waiting requests
//! to resume or refuse, and the gateway does the rest. One `KeyManager` serves one issuer, so
//! several issuers are a map of these.

use std::rc::Rc;
use std::time::Duration;

use log::{info, warn};

use crate::config::{KeySource, RemoteJwks};
use crate::jwks::KeySet;

/// Requests parked for a key set, at most. Beyond this, new ones are answered 503 at once so a
/// flood during an IdP outage cannot grow memory without bound.
pub const MAX_PARKED: usize = 4096;
/// Retry a failed JWKS fetch after this long (the refresh interval applies once keys are held):
/// short, since requests may be parked waiting for the first key set.
pub const JWKS_RETRY: Duration = Duration::from_secs(2);
/// A fetch whose answer has not come this long after its own timeout is given up: Envoy answers
/// every callout by its timeout, so only a lost context (the fetch was tied to a request that
/// went away) gets here, and it must not block refetches forever.
pub const FETCH_LOST_AFTER_TIMEOUT: Duration = Duration::from_secs(1);

/// A JWKS request the gateway should dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksFetch {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub timeout: Duration,
}

/// What a JWKS answer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeysAnswered {
    /// Whether a new key set is in use.
    pub loaded: bool,
    /// A key of the previous set was withdrawn or replaced: tokens verified with it must be
    /// forgotten.
    pub withdrawn: bool,
    /// Parked requests to try again (with the new keys, or the old ones: then an unknown `kid`
    /// is final). Empty while there are still no keys at all.
    pub resume: Vec<u32>,
}

/// What a tick asks of the gateway.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeysTick {
    /// A fetch is due (already counted as an attempt).
    pub fetch: Option<JwksFetch>,
    /// Requests that waited `max_wait` for keys: to be refused.
    pub expired: Vec<u32>,
    /// The callout token of a fetch given up as lost: to be dropped from the registry.
    pub lost_fetch: Option<u32>,
}

/// Why a request could not be parked.
#[derive(Debug, PartialEq, Eq)]
pub struct CannotPark;

struct Waiter {
    context_id: u32,
    since_ms: u64,
}

pub struct KeyManager {
    remote: Option<RemoteJwks>,
    keys: Option<Rc<KeySet>>,
    fetched_ms: Option<u64>,
    /// Callout token and start of the fetch in flight.
    in_flight: Option<(u32, u64)>,
    /// A fetch was asked for outside the root context: the next tick dispatches it (see
    /// [`KeyManager::request_fetch`]).
    requested: bool,
    last_attempt_ms: Option<u64>,
    waiters: Vec<Waiter>,
}

impl KeyManager {
    pub fn new(source: &KeySource) -> Self {
        let (remote, keys) = match source {
            KeySource::Inline(set) => (None, Some(Rc::new(set.clone()))),
            KeySource::Remote(r) => (Some(r.clone()), None),
        };
        Self {
            remote,
            keys,
            fetched_ms: None,
            in_flight: None,
            requested: false,
            last_attempt_ms: None,
            waiters: Vec::new(),
        }
    }

    /// The key set in use, if any has been loaded.
    pub fn keys(&self) -> Option<&Rc<KeySet>> {
        self.keys.as_ref()
    }

    /// A fetch is in flight or asked for.
    pub fn is_fetching(&self) -> bool {
        self.in_flight.is_some() || self.requested
    }

    /// Asks for a fetch on the next tick. Callouts are dispatched from the root context only: a
    /// callout dispatched in a request's callback belongs to that request, and Envoy cancels it
    /// when that request ends, while the key set serves every request. Counts as an attempt for
    /// the refetch throttle. No effect for inline keys.
    pub fn request_fetch(&mut self, now_ms: u64) {
        if self.remote.is_some() && !self.is_fetching() {
            self.requested = true;
            self.last_attempt_ms = Some(now_ms);
        }
    }

    /// An unknown `kid` may mean the issuer rotated keys. Refetch, but at most once per
    /// `min_refetch_interval`, so a flood of made-up `kid`s cannot become a flood of fetches.
    pub fn may_refetch(&self, now_ms: u64) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        if self.is_fetching() {
            return false;
        }
        self.last_attempt_ms.is_none_or(|last| {
            now_ms.saturating_sub(last) >= remote.min_refetch_interval.as_millis() as u64
        })
    }

    /// Starts a fetch: what to dispatch (then [`KeyManager::dispatched`]), or `None` for inline
    /// keys. Counts as an attempt either way, so a dispatch the host refuses is retried later.
    fn begin_fetch(&mut self, now_ms: u64) -> Option<JwksFetch> {
        let remote = self.remote.as_ref()?;
        self.requested = false;
        self.last_attempt_ms = Some(now_ms);
        Some(JwksFetch {
            cluster: remote.cluster.clone(),
            path: remote.path.clone(),
            authority: remote.authority.clone(),
            timeout: remote.timeout,
        })
    }

    pub fn dispatched(&mut self, token: u32, now_ms: u64) {
        self.in_flight = Some((token, now_ms));
    }

    /// Parks a request until keys arrive (only with remote keys, and up to `MAX_PARKED`).
    pub fn park(&mut self, context_id: u32, now_ms: u64) -> Result<(), CannotPark> {
        if self.remote.is_none() || self.waiters.len() >= MAX_PARKED {
            return Err(CannotPark);
        }
        if !self.waiters.iter().any(|w| w.context_id == context_id) {
            self.waiters.push(Waiter {
                context_id,
                since_ms: now_ms,
            });
        }
        Ok(())
    }

    /// The request ended: it no longer waits.
    pub fn forget(&mut self, context_id: u32) {
        self.waiters.retain(|w| w.context_id != context_id);
    }

    #[cfg(test)]
    pub fn is_waiting(&self, context_id: u32) -> bool {
        self.waiters.iter().any(|w| w.context_id == context_id)
    }

    /// Periodic work (in the root context): gives up a lost fetch, starts a due or requested
    /// one, times out waiting requests.
    pub fn on_tick(&mut self, now_ms: u64) -> KeysTick {
        let Some(remote) = self.remote.clone() else {
            return KeysTick::default();
        };
        let mut lost = None;
        if let Some((token, started)) = self.in_flight {
            let limit = remote.timeout + FETCH_LOST_AFTER_TIMEOUT;
            if now_ms.saturating_sub(started) > limit.as_millis() as u64 {
                self.in_flight = None;
                lost = Some(token);
            }
        }
        let retry = JWKS_RETRY.as_millis() as u64;
        let due = match (self.fetched_ms, self.last_attempt_ms) {
            (_, None) => true,
            (None, Some(last)) => now_ms.saturating_sub(last) >= retry,
            (Some(fetched), Some(last)) => {
                now_ms.saturating_sub(fetched) >= remote.refresh_interval.as_millis() as u64
                    && now_ms.saturating_sub(last) >= retry
            }
        };
        let fetch = if (due || self.requested) && self.in_flight.is_none() {
            self.begin_fetch(now_ms)
        } else {
            None
        };
        let max_wait = remote.max_wait.as_millis() as u64;
        let mut expired = Vec::new();
        self.waiters.retain(|w| {
            let waited_out = now_ms.saturating_sub(w.since_ms) >= max_wait;
            if waited_out {
                expired.push(w.context_id);
            }
            !waited_out
        });
        if !expired.is_empty() {
            warn!(
                "{} request(s) waited {max_wait} ms for the JWKS; answering 503",
                expired.len()
            );
        }
        KeysTick {
            fetch,
            expired,
            lost_fetch: lost,
        }
    }

    /// The JWKS callout answered (`status` `None`: no response at all).
    pub fn on_answer(&mut self, status: Option<u16>, body: &[u8], now_ms: u64) -> KeysAnswered {
        self.in_flight = None;
        let mut answered = KeysAnswered::default();
        if let Some(set) = usable_key_set(status, body) {
            info!("JWKS loaded: {} key(s)", set.keys.len());
            answered.withdrawn = self
                .keys
                .as_ref()
                .is_some_and(|old| old.keys.iter().any(|k| !set.keys.contains(k)));
            if answered.withdrawn {
                info!("a signing key left the JWKS; forgetting verified tokens");
            }
            self.keys = Some(Rc::new(set));
            self.fetched_ms = Some(now_ms);
            answered.loaded = true;
        }
        if self.keys.is_some() {
            answered.resume = self.waiters.drain(..).map(|w| w.context_id).collect();
        }
        answered
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.waiters.is_empty()
    }
}

/// The key set in a JWKS answer, or `None` (logged) when the previous one stays in use.
fn usable_key_set(status: Option<u16>, body: &[u8]) -> Option<KeySet> {
    match status {
        Some(200) => match KeySet::parse(body) {
            Ok(set) if !set.keys.is_empty() => {
                if !set.skipped.is_empty() {
                    warn!(
                        "JWKS: skipped {} key(s): {}",
                        set.skipped.len(),
                        set.skipped.join("; ")
                    );
                }
                Some(set)
            }
            Ok(set) => {
                warn!(
                    "JWKS has no usable key ({}); keeping the previous key set",
                    set.skipped.join("; ")
                );
                None
            }
            Err(e) => {
                warn!("JWKS unusable: {e}; keeping the previous key set");
                None
            }
        },
        Some(s) => {
            warn!("JWKS fetch answered HTTP {s}; keeping the previous key set");
            None
        }
        None => {
            warn!("JWKS fetch failed (connection failed, reset or timed out); keeping the previous key set");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys;

    fn remote() -> KeyManager {
        KeyManager::new(&KeySource::Remote(RemoteJwks {
            cluster: "okta".into(),
            path: "/keys".into(),
            authority: "idp".into(),
            refresh_interval: Duration::from_secs(600),
            min_refetch_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            max_wait: Duration::from_secs(2),
        }))
    }

    #[test]
    fn the_first_tick_fetches_and_a_failure_is_retried_after_jwks_retry() {
        let mut k = remote();
        let fetch = k.on_tick(0).fetch;
        assert_eq!(fetch.map(|f| f.path), Some("/keys".to_string()));
        k.dispatched(7, 0);
        assert!(k.on_tick(100).fetch.is_none(), "one fetch at a time");
        assert!(!k.on_answer(Some(500), b"", 200).loaded);
        assert!(k.on_tick(1000).fetch.is_none());
        assert!(k.on_tick(2000).fetch.is_some(), "retried after JWKS_RETRY");
    }

    #[test]
    fn parked_requests_resume_when_keys_arrive_and_time_out_otherwise() {
        let mut k = remote();
        k.park(1, 0).unwrap();
        k.park(2, 1500).unwrap();
        assert_eq!(k.on_tick(2000).expired, vec![1]);
        let answered = k.on_answer(Some(200), test_keys::jwks_json().as_bytes(), 2100);
        assert!(answered.loaded && !answered.withdrawn);
        assert_eq!(answered.resume, vec![2]);
        assert!(k.is_idle());
    }

    #[test]
    fn no_keys_means_the_waiters_keep_waiting() {
        let mut k = remote();
        k.park(1, 0).unwrap();
        assert!(k.on_answer(Some(200), b"{}", 10).resume.is_empty());
        assert!(k.is_waiting(1));
        k.forget(1);
        assert!(k.is_idle());
    }

    #[test]
    fn parking_is_capped_and_needs_remote_keys() {
        let mut k = remote();
        for id in 0..MAX_PARKED as u32 {
            k.park(id, 0).unwrap();
        }
        assert_eq!(k.park(u32::MAX, 0), Err(CannotPark));
        let mut inline = KeyManager::new(&KeySource::Inline(test_keys::key_set()));
        assert_eq!(inline.park(1, 0), Err(CannotPark));
        assert!(inline.keys().is_some());
    }

    #[test]
    fn refetches_are_throttled_and_a_lost_fetch_is_given_up() {
        let mut k = remote();
        assert!(k.may_refetch(0));
        k.begin_fetch(0);
        k.dispatched(9, 0);
        assert!(!k.may_refetch(1), "not while one is in flight");
        let tick = k.on_tick(6001);
        assert_eq!(
            tick.lost_fetch,
            Some(9),
            "given up after timeout + FETCH_LOST_AFTER_TIMEOUT"
        );
        assert!(
            tick.fetch.is_some(),
            "and tried again at once (no keys yet)"
        );
        k.dispatched(10, 6001);
        k.on_answer(Some(200), test_keys::jwks_json().as_bytes(), 6100);
        assert!(
            !k.may_refetch(36_000),
            "one refetch per min_refetch_interval"
        );
        assert!(k.may_refetch(36_001));
    }

    #[test]
    fn a_withdrawn_key_is_reported() {
        let mut k = remote();
        k.on_answer(Some(200), test_keys::jwks_json().as_bytes(), 0);
        let mut doc: serde_json::Value = serde_json::from_str(&test_keys::jwks_json()).unwrap();
        doc["keys"].as_array_mut().unwrap().remove(0);
        let answered = k.on_answer(Some(200), doc.to_string().as_bytes(), 10);
        assert!(answered.loaded && answered.withdrawn);
    }
}
