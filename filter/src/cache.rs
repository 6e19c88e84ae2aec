//! Caches that keep the IdP and the CPU out of the hot path.
//!
//! - [`ExchangeStore`]: exchanged backend tokens, in proxy-wasm *shared data*, so a token
//!   exchanged on one Envoy worker is reused by all of them. Without it every request costs a
//!   token endpoint call, and Okta's per-minute rate limits cap the whole organisation at a few
//!   requests per second. It also holds short *leases* so concurrent misses for the same token on
//!   different workers wait for one exchange instead of each calling the IdP.
//! - In front of it, per worker, [`VerifiedTokens`](crate::verified_tokens::VerifiedTokens):
//!   the verified claims and the backend tokens a worker holds, until `exp`.
//!
//! Keys are SHA-256 digests: the caches never hold an inbound token, and a token exchanged for one
//! target is never served to a request for another.
//!
//! Shared data has no enumeration and no delete, so the exchange store is a fixed array of slots
//! (a key lives in `key mod capacity` or the next slot): its size is bounded by construction, an
//! insert finding both slots held evicts the entry that expires first, and a tick walks a few
//! slots at a time to blank expired ones.

#[cfg(test)]
use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::exchange::ExchangeError;

pub type Digest32 = [u8; 32];

pub fn token_digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// The exchange cache key: the subject token (by digest) and everything that defines the target.
pub fn exchange_key(token_digest: &Digest32, target_identity: &str) -> Digest32 {
    let mut h = Sha256::new();
    h.update(token_digest);
    h.update(target_identity.as_bytes());
    h.finalize().into()
}

/// A short, non-reversible label for a token in logs: the first 8 hex digits of its SHA-256.
pub fn fingerprint(digest: &Digest32) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(8);
    for b in digest.iter().take(4) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

pub fn fingerprint_token(token: &str) -> String {
    fingerprint(&token_digest(token))
}

/// The host's shared key-value store (proxy-wasm shared data), abstracted so the cache logic is
/// tested natively.
pub trait SharedStore {
    /// The value and its CAS token (0 when the key was never set).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32);
    /// Writes `value`; with `cas`, only if the key was not written since that read.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasMismatch;

/// What another worker's exchange for the same key is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Nobody is exchanging this key (or their lease ran out).
    Free,
    /// Another worker is exchanging it right now.
    InProgress,
    /// The last exchange for it failed moments ago; answer the same without asking the IdP again.
    Failed(ExchangeError),
}

/// Outcome of trying to become the one worker that exchanges a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Acquired,
    HeldElsewhere,
    Failed(ExchangeError),
}

/// What a lease slot holds, as seen by one key.
///
/// Slots are shared by keys (`key mod LEASE_SLOTS`). A key whose slot is busy with another key's
/// exchange waits for it to end rather than take the slot over: taking it would leave the other
/// key's workers unable to see its lease, and each would call the IdP for it (and then for this
/// key, in turn). Another key's shared failure is only a shortcut for that key's requests, so
/// it may be overwritten.
enum SlotLease {
    /// Nothing live, or another key's failure outcome.
    Empty,
    /// This key's lease: an exchange in progress (`state` 0) or its shared failure.
    Ours { owner: u32, state: u8 },
    /// Another key's exchange, in progress.
    OtherKeyExchanging,
}

const ENTRY_HEADER: usize = 32 + 8;
/// How many slots a key may occupy (see `ExchangeStore::entry_slots`).
const ENTRY_WAYS: u64 = 2;

/// A stored entry: `key (32) | until (8, seconds, little-endian) | token`.
struct Entry<'a> {
    key: &'a [u8],
    until: i64,
    token: &'a [u8],
}

impl<'a> Entry<'a> {
    /// `None` for a blanked slot or anything not written by `put`.
    fn parse(value: &'a [u8]) -> Option<Self> {
        if value.len() <= ENTRY_HEADER {
            return None;
        }
        Some(Self {
            key: &value[..32],
            until: i64::from_le_bytes(value[32..ENTRY_HEADER].try_into().ok()?),
            token: &value[ENTRY_HEADER..],
        })
    }
}
const LEASE_LEN: usize = 32 + 8 + 4 + 1;
/// Leases live for one exchange; a few thousand slots cover any burst of distinct fresh tokens
/// (a collision makes the second key wait for the first key's exchange, never a wrong token).
const LEASE_SLOTS: u64 = 4096;

pub struct ExchangeStore {
    prefix: String,
    slots: u64,
    sweep_cursor: u64,
}

impl ExchangeStore {
    /// `namespace` keeps different filter configurations (or plugins sharing an empty `vm_id`,
    /// as under Istio) apart.
    pub fn new(namespace: &str, slots: usize) -> Self {
        Self {
            prefix: format!("mcp_token_exchange/{namespace}/"),
            slots: slots as u64,
            sweep_cursor: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.slots > 0
    }

    /// Writes every lease slot that was never written (see `try_lease`).
    pub fn prepare_leases(&self, store: &dyn SharedStore) {
        for slot in 0..self.slots.min(LEASE_SLOTS) {
            let key = self.lease_key(slot);
            if store.get(&key).1 == 0 {
                let _ = store.set(&key, &[], None);
            }
        }
    }

    fn lease_slot(&self, key: &Digest32) -> u64 {
        self.slot(key) % LEASE_SLOTS.max(1)
    }

    fn slot(&self, key: &Digest32) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[..8]);
        u64::from_le_bytes(b) % self.slots.max(1)
    }

    fn entry_key(&self, slot: u64) -> String {
        format!("{}x{slot}", self.prefix)
    }

    fn lease_key(&self, slot: u64) -> String {
        format!("{}l{slot}", self.prefix)
    }

    /// The slots `key` may occupy: its own and the next. With one slot per key, two users whose
    /// keys share a slot evicted each other, and each worker without a copy of its own called
    /// the IdP again; with two, a third key is needed for an eviction.
    fn entry_slots(&self, key: &Digest32) -> impl Iterator<Item = u64> {
        let (first, slots) = (self.slot(key), self.slots.max(1));
        (0..ENTRY_WAYS.min(slots)).map(move |way| (first + way) % slots)
    }

    /// The cached backend token for `key` and the time (seconds) it is reusable until, if that
    /// is after `now`.
    pub fn get(&self, store: &dyn SharedStore, key: &Digest32, now: i64) -> Option<(String, i64)> {
        if !self.enabled() {
            return None;
        }
        self.entry_slots(key).find_map(|slot| {
            let (value, _) = store.get(&self.entry_key(slot));
            let entry = Entry::parse(value.as_deref()?)?;
            if entry.key != key || entry.until <= now {
                return None;
            }
            let token = String::from_utf8(entry.token.to_vec()).ok()?;
            Some((token, entry.until))
        })
    }

    /// Stores `token` for `key` until `until`: in the slot that holds `key` already, else an
    /// empty or expired one, else over the entry that expires first. Written with the CAS of
    /// what was read, so two workers storing different keys into a slot written before do not
    /// overwrite each other unseen (Envoy ignores the CAS of a slot never written, so a first
    /// write may still lose a racing one: a later miss exchanges again); a write that loses
    /// twice leaves the token uncached.
    pub fn put(&self, store: &dyn SharedStore, key: &Digest32, token: &str, until: i64, now: i64) {
        if !self.enabled() {
            return;
        }
        let mut value = Vec::with_capacity(ENTRY_HEADER + token.len());
        value.extend_from_slice(key);
        value.extend_from_slice(&until.to_le_bytes());
        value.extend_from_slice(token.as_bytes());
        for _ in 0..2 {
            let (slot, cas) = self.slot_for(store, key, now);
            if store.set(&self.entry_key(slot), &value, Some(cas)).is_ok() {
                return;
            }
        }
    }

    /// Where `put` writes `key`, and the CAS of that slot's current value.
    fn slot_for(&self, store: &dyn SharedStore, key: &Digest32, now: i64) -> (u64, u32) {
        // (slot, cas, holds key, reusable until: MIN when empty)
        let seen: Vec<(u64, u32, bool, i64)> = self
            .entry_slots(key)
            .map(|slot| {
                let (value, cas) = store.get(&self.entry_key(slot));
                match value.as_deref().and_then(Entry::parse) {
                    Some(entry) => (slot, cas, entry.key == key, entry.until),
                    None => (slot, cas, false, i64::MIN),
                }
            })
            .collect();
        let pick = seen
            .iter()
            .find(|(_, _, holds_key, _)| *holds_key)
            .or_else(|| seen.iter().find(|(_, _, _, until)| *until <= now))
            .or_else(|| seen.iter().min_by_key(|(_, _, _, until)| *until));
        pick.map_or((self.slot(key), 0), |&(slot, cas, _, _)| (slot, cas))
    }

    /// Drops `key`'s entry if a slot still holds it and, with `only_token`, if the entry holds
    /// that token: a 401 to an old token must not drop the fresh one another worker exchanged
    /// after an earlier 401 to it. True if something was dropped.
    pub fn remove(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        only_token: Option<&str>,
    ) -> bool {
        if !self.enabled() {
            return false;
        }
        // Every slot: a racing `put` may have left an older copy in the other.
        let removed = self.entry_slots(key).fold(false, |removed, slot| {
            let slot_key = self.entry_key(slot);
            let (value, cas) = store.get(&slot_key);
            let holds_key = value
                .as_deref()
                .and_then(Entry::parse)
                .is_some_and(|entry| {
                    entry.key == key && only_token.is_none_or(|t| entry.token == t.as_bytes())
                });
            (holds_key && store.set(&slot_key, &[], Some(cas)).is_ok()) || removed
        });
        if removed {
            // Tell the other workers to drop the copies they keep in front of this store.
            let _ = store.set(&self.generation_key(), &[], None);
        }
        removed
    }

    /// Changes whenever an entry is removed: workers compare it on their tick to learn that a
    /// backend token they keep in their own
    /// [`VerifiedTokens`](crate::verified_tokens::VerifiedTokens) may be stale. (The CAS of a
    /// shared-data key changes on every write, so the key's CAS is the generation.)
    pub fn generation(&self, store: &dyn SharedStore) -> u32 {
        if !self.enabled() {
            return 0;
        }
        store.get(&self.generation_key()).1
    }

    fn generation_key(&self) -> String {
        format!("{}generation", self.prefix)
    }

    /// Blanks expired entries among the next `count` slots.
    pub fn sweep(&mut self, store: &dyn SharedStore, now: i64, count: u64) {
        if !self.enabled() {
            return;
        }
        for _ in 0..count.min(self.slots) {
            let slot_key = self.entry_key(self.sweep_cursor);
            self.sweep_cursor = (self.sweep_cursor + 1) % self.slots;
            let (value, cas) = store.get(&slot_key);
            if let Some(v) = value {
                let expired = Entry::parse(&v).is_none_or(|entry| entry.until <= now);
                if !v.is_empty() && expired {
                    let _ = store.set(&slot_key, &[], Some(cas));
                }
            }
        }
    }

    fn read_lease(&self, store: &dyn SharedStore, key: &Digest32, now_ms: u64) -> (SlotLease, u32) {
        let (value, cas) = store.get(&self.lease_key(self.lease_slot(key)));
        let lease = value
            .filter(|v| v.len() == LEASE_LEN)
            .and_then(|v| {
                let deadline = u64::from_le_bytes(v[32..40].try_into().ok()?);
                let owner = u32::from_le_bytes(v[40..44].try_into().ok()?);
                let state = v[44];
                (deadline > now_ms).then(|| {
                    if v[..32] == key[..] {
                        SlotLease::Ours { owner, state }
                    } else if state == 0 {
                        SlotLease::OtherKeyExchanging
                    } else {
                        SlotLease::Empty
                    }
                })
            })
            .unwrap_or(SlotLease::Empty);
        (lease, cas)
    }

    fn write_lease(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        deadline_ms: u64,
        owner: u32,
        state: u8,
        cas: u32,
    ) -> Result<(), CasMismatch> {
        let mut v = Vec::with_capacity(LEASE_LEN);
        v.extend_from_slice(key);
        v.extend_from_slice(&deadline_ms.to_le_bytes());
        v.extend_from_slice(&owner.to_le_bytes());
        v.push(state);
        store.set(&self.lease_key(self.lease_slot(key)), &v, Some(cas))
    }

    /// Whether `key` may be exchanged now. A slot busy with another key's exchange reads as
    /// `InProgress`: the key waits for that exchange to end (see `SlotLease`).
    pub fn lease_status(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        now_ms: u64,
    ) -> LeaseStatus {
        if !self.enabled() {
            return LeaseStatus::Free;
        }
        match self.read_lease(store, key, now_ms).0 {
            SlotLease::Empty => LeaseStatus::Free,
            SlotLease::Ours { state: 0, .. } | SlotLease::OtherKeyExchanging => {
                LeaseStatus::InProgress
            }
            SlotLease::Ours { state, .. } => {
                decode_failure(state).map_or(LeaseStatus::Free, LeaseStatus::Failed)
            }
        }
    }

    /// Tries to become the worker that exchanges `key`, for at most `ttl_ms`.
    pub fn try_lease(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        owner: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> LeaseOutcome {
        if !self.enabled() {
            return LeaseOutcome::Acquired;
        }
        let (mut lease, mut cas) = self.read_lease(store, key, now_ms);
        if cas == 0 {
            // Envoy ignores a CAS of 0 (never written), so two workers could both "win" a fresh
            // slot. Materialise the slot first; the CAS write below then picks one winner.
            let _ = store.set(&self.lease_key(self.lease_slot(key)), &[], None);
            (lease, cas) = self.read_lease(store, key, now_ms);
        }
        match lease {
            SlotLease::Ours {
                owner: holder,
                state: 0,
            } if holder != owner => LeaseOutcome::HeldElsewhere,
            SlotLease::OtherKeyExchanging => LeaseOutcome::HeldElsewhere,
            SlotLease::Ours { state, .. } if state != 0 => match decode_failure(state) {
                Some(e) => LeaseOutcome::Failed(e),
                None => LeaseOutcome::HeldElsewhere,
            },
            _ => match self.write_lease(store, key, now_ms + ttl_ms, owner, 0, cas) {
                Ok(()) => LeaseOutcome::Acquired,
                Err(CasMismatch) => LeaseOutcome::HeldElsewhere,
            },
        }
    }

    /// Ends this worker's lease: on success the token is in the store already; on failure the
    /// outcome is kept for `failure_ttl_ms` so waiting workers answer the same.
    pub fn release(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        owner: u32,
        failure: Option<&ExchangeError>,
        now_ms: u64,
        failure_ttl_ms: u64,
    ) {
        if !self.enabled() {
            return;
        }
        let (lease, cas) = self.read_lease(store, key, now_ms);
        match lease {
            SlotLease::Ours { owner: holder, .. } if holder != owner => return,
            // Ours ran out and another key's exchange took the slot: not ours to end.
            SlotLease::OtherKeyExchanging => return,
            _ => {}
        }
        let _ = match failure.map(encode_failure) {
            Some(state) => self.write_lease(store, key, now_ms + failure_ttl_ms, owner, state, cas),
            None => store.set(&self.lease_key(self.lease_slot(key)), &[], Some(cas)),
        };
    }
}

fn encode_failure(e: &ExchangeError) -> u8 {
    match e {
        ExchangeError::SubjectRejected { .. } => 1,
        ExchangeError::TargetRefused { .. } => 2,
        ExchangeError::GatewayMisconfigured { .. } => 3,
        ExchangeError::Unavailable { .. } => 4,
        ExchangeError::Timeout => 5,
        ExchangeError::BadResponse { .. } => 6,
        ExchangeError::InteractionRequired { .. } => 7,
    }
}

fn decode_failure(state: u8) -> Option<ExchangeError> {
    let code = || "(from another worker)".to_string();
    Some(match state {
        1 => ExchangeError::SubjectRejected { code: code() },
        2 => ExchangeError::TargetRefused { code: code() },
        3 => ExchangeError::GatewayMisconfigured { code: code() },
        4 => ExchangeError::Unavailable {
            status: None,
            retry_after: None,
        },
        5 => ExchangeError::Timeout,
        6 => ExchangeError::BadResponse {
            reason: "(from another worker)",
        },
        // The claims challenge stays with the worker that got it.
        7 => ExchangeError::InteractionRequired {
            code: code(),
            claims: None,
        },
        _ => return None,
    })
}

/// An in-memory [`SharedStore`] with Envoy's CAS semantics, for tests.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: std::cell::Cell<u32>,
}

#[cfg(test)]
impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut map = self.map.borrow_mut();
        let current = map.get(key).map_or(0, |(_, c)| *c);
        if let Some(expected) = cas {
            if expected != 0 && expected != current {
                return Err(CasMismatch);
            }
        }
        self.next_cas.set(self.next_cas.get() + 1);
        map.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Digest32 {
        exchange_key(&token_digest(s), "target")
    }

    #[test]
    fn keys_separate_tokens_and_targets() {
        let d = token_digest("t");
        assert_ne!(exchange_key(&d, "a"), exchange_key(&d, "b"));
        assert_ne!(key("t1"), key("t2"));
    }

    #[test]
    fn store_hit_until_expiry_and_shared_between_handles() {
        let store = MemoryStore::default();
        let worker_a = ExchangeStore::new("ns", 64);
        let worker_b = ExchangeStore::new("ns", 64);
        worker_a.put(&store, &key("t"), "backend", 100, 0);
        assert_eq!(
            worker_b.get(&store, &key("t"), 99),
            Some(("backend".to_string(), 100))
        );
        assert_eq!(worker_b.get(&store, &key("t"), 100), None);
        assert_eq!(worker_b.get(&store, &key("other"), 0), None);
        assert_eq!(
            ExchangeStore::new("other-ns", 64).get(&store, &key("t"), 0),
            None
        );
    }

    #[test]
    fn store_is_bounded_by_its_slots() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 4);
        for i in 0..100 {
            cache.put(&store, &key(&format!("t{i}")), "x", 1000, 0);
        }
        assert!(store.map.borrow().len() <= 4);
        // Later entries replace colliding earlier ones, never the reverse.
        assert_eq!(
            cache.get(&store, &key("t99"), 0).map(|(t, _)| t).as_deref(),
            Some("x")
        );
    }

    /// A key whose first 8 bytes are `n` (little-endian): its entry slot is `n mod slots`.
    fn key_in_slot(n: u64, tail: u8) -> Digest32 {
        let mut k = [tail; 32];
        k[..8].copy_from_slice(&n.to_le_bytes());
        k
    }

    #[test]
    fn keys_sharing_a_slot_both_stay_and_a_third_evicts_the_one_expiring_first() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 64);
        let (a, b, c) = (key_in_slot(5, 1), key_in_slot(69, 2), key_in_slot(133, 3));
        cache.put(&store, &a, "A", 300, 0);
        cache.put(&store, &b, "B", 200, 0);
        assert_eq!(
            cache.get(&store, &a, 0).map(|(t, _)| t).as_deref(),
            Some("A")
        );
        assert_eq!(
            cache.get(&store, &b, 0).map(|(t, _)| t).as_deref(),
            Some("B")
        );
        // Storing a key again replaces its own entry, not its neighbour's.
        cache.put(&store, &b, "B2", 250, 0);
        assert_eq!(
            cache.get(&store, &a, 0).map(|(t, _)| t).as_deref(),
            Some("A")
        );
        assert_eq!(
            cache.get(&store, &b, 0).map(|(t, _)| t).as_deref(),
            Some("B2")
        );
        cache.put(&store, &c, "C", 400, 0);
        assert_eq!(cache.get(&store, &b, 0), None, "b expires first: evicted");
        assert_eq!(
            cache.get(&store, &a, 0).map(|(t, _)| t).as_deref(),
            Some("A")
        );
        assert_eq!(
            cache.get(&store, &c, 0).map(|(t, _)| t).as_deref(),
            Some("C")
        );
        // An expired entry makes room before a live one is evicted.
        cache.put(&store, &b, "B3", 500, 350);
        assert_eq!(
            cache.get(&store, &c, 350).map(|(t, _)| t).as_deref(),
            Some("C")
        );
        assert_eq!(
            cache.get(&store, &b, 350).map(|(t, _)| t).as_deref(),
            Some("B3")
        );
        assert!(cache.remove(&store, &b, None));
        assert_eq!(cache.get(&store, &b, 350), None);
    }

    #[test]
    fn remove_only_drops_its_own_entry() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 1);
        cache.put(&store, &key("a"), "A", 100, 0);
        assert!(!cache.remove(&store, &key("b"), None));
        // A 401 to an older token of the same key leaves the newer one.
        assert!(!cache.remove(&store, &key("a"), Some("older")));
        assert!(cache.get(&store, &key("a"), 0).is_some());
        assert!(cache.remove(&store, &key("a"), Some("A")));
        assert_eq!(cache.get(&store, &key("a"), 0), None);
    }

    #[test]
    fn sweep_blanks_expired_slots() {
        let store = MemoryStore::default();
        let mut cache = ExchangeStore::new("ns", 8);
        cache.put(&store, &key("old"), "A", 10, 0);
        cache.put(&store, &key("new"), "B", 1000, 0);
        cache.sweep(&store, 500, 8);
        assert_eq!(
            cache
                .get(&store, &key("new"), 500)
                .map(|(t, _)| t)
                .as_deref(),
            Some("B")
        );
        let blank = store
            .map
            .borrow()
            .values()
            .filter(|(v, _)| v.is_empty())
            .count();
        assert_eq!(blank, 1);
    }

    #[test]
    fn disabled_store_caches_nothing_and_never_blocks() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 0);
        cache.put(&store, &key("a"), "A", 100, 0);
        assert_eq!(cache.get(&store, &key("a"), 0), None);
        assert_eq!(
            cache.try_lease(&store, &key("a"), 1, 0, 1000),
            LeaseOutcome::Acquired
        );
        assert!(store.map.borrow().is_empty());
    }

    #[test]
    fn one_worker_leads_an_exchange_others_wait() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 16);
        let k = key("fresh");
        assert_eq!(
            cache.try_lease(&store, &k, 1, 0, 5000),
            LeaseOutcome::Acquired
        );
        assert_eq!(
            cache.try_lease(&store, &k, 2, 10, 5000),
            LeaseOutcome::HeldElsewhere
        );
        assert_eq!(cache.lease_status(&store, &k, 10), LeaseStatus::InProgress);
        // The lease runs out if its holder vanished.
        assert_eq!(cache.lease_status(&store, &k, 5001), LeaseStatus::Free);
        assert_eq!(
            cache.try_lease(&store, &k, 2, 5001, 5000),
            LeaseOutcome::Acquired
        );
        // Success: the holder releases, the key is free again.
        cache.release(&store, &k, 2, None, 5100, 1000);
        assert_eq!(cache.lease_status(&store, &k, 5100), LeaseStatus::Free);
    }

    #[test]
    fn a_failed_exchange_is_shared_briefly() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 16);
        let k = key("bad");
        assert_eq!(
            cache.try_lease(&store, &k, 1, 0, 5000),
            LeaseOutcome::Acquired
        );
        cache.release(&store, &k, 1, Some(&ExchangeError::Timeout), 100, 1000);
        assert_eq!(
            cache.lease_status(&store, &k, 200),
            LeaseStatus::Failed(ExchangeError::Timeout)
        );
        assert_eq!(
            cache.try_lease(&store, &k, 2, 200, 5000),
            LeaseOutcome::Failed(ExchangeError::Timeout)
        );
        assert_eq!(cache.lease_status(&store, &k, 1101), LeaseStatus::Free);
    }

    /// Two keys in one lease slot (same first 8 bytes): the second waits for the first's
    /// exchange instead of taking the slot, which used to let a worker that wanted the first
    /// key find no lease for it and call the IdP a second time (`reconfig` saw 8 exchanges for
    /// 6 users once in a dozen runs).
    #[test]
    fn keys_sharing_a_lease_slot_wait_for_each_other_instead_of_exchanging_twice() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 16);
        let first = [7u8; 32];
        let mut second = [7u8; 32];
        second[31] = 8;
        assert_eq!(cache.lease_slot(&first), cache.lease_slot(&second));
        assert_eq!(
            cache.try_lease(&store, &first, 1, 0, 5000),
            LeaseOutcome::Acquired
        );
        assert_eq!(
            cache.try_lease(&store, &second, 1, 10, 5000),
            LeaseOutcome::HeldElsewhere
        );
        assert_eq!(
            cache.lease_status(&store, &second, 10),
            LeaseStatus::InProgress
        );
        // The first key's lease is still visible to the other worker.
        assert_eq!(
            cache.try_lease(&store, &first, 2, 20, 5000),
            LeaseOutcome::HeldElsewhere
        );
        // The second key cannot end the first key's lease either.
        cache.release(&store, &second, 1, None, 30, 1000);
        assert_eq!(
            cache.lease_status(&store, &first, 30),
            LeaseStatus::InProgress
        );
        cache.release(&store, &first, 1, None, 100, 1000);
        assert_eq!(cache.lease_status(&store, &second, 100), LeaseStatus::Free);
        assert_eq!(
            cache.try_lease(&store, &second, 2, 100, 5000),
            LeaseOutcome::Acquired
        );
        // Another key's shared failure does not hold a key back.
        cache.release(&store, &second, 2, Some(&ExchangeError::Timeout), 200, 1000);
        assert_eq!(cache.lease_status(&store, &first, 210), LeaseStatus::Free);
        assert_eq!(
            cache.try_lease(&store, &first, 1, 210, 5000),
            LeaseOutcome::Acquired
        );
    }

    #[test]
    fn a_stale_holder_cannot_release_a_newer_lease() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 16);
        let k = key("x");
        cache.try_lease(&store, &k, 1, 0, 100);
        cache.try_lease(&store, &k, 2, 200, 5000);
        cache.release(&store, &k, 1, None, 300, 1000);
        assert_eq!(cache.lease_status(&store, &k, 300), LeaseStatus::InProgress);
    }

    #[test]
    fn removing_an_entry_moves_the_generation() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 8);
        let before = cache.generation(&store);
        cache.put(&store, &key("t"), "x", 100, 0);
        assert_eq!(cache.generation(&store), before, "a put is no invalidation");
        assert!(!cache.remove(&store, &key("other"), None));
        assert_eq!(cache.generation(&store), before);
        assert!(cache.remove(&store, &key("t"), None));
        assert_ne!(cache.generation(&store), before);
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint_token("abc"), "ba7816bf");
    }
}
