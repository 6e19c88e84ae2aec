//! Caches that keep the IdP and the CPU out of the hot path.
//!
//! - [`ExchangeStore`]: exchanged backend tokens, in proxy-wasm *shared data*, so a token
//!   exchanged on one Envoy worker is reused by all of them. Without it every request costs a
//!   token endpoint call, and Okta's per-minute rate limits cap the whole organisation at a few
//!   requests per second. It also holds short *leases* so concurrent misses for the same token on
//!   different workers wait for one exchange instead of each calling the IdP.
//! - [`VerifiedTokens`]: per-VM map from token digest to the verified claims, until `exp`, so a
//!   client's repeated requests cost a hash instead of an RSA verification.
//!
//! Keys are SHA-256 digests: the caches never hold an inbound token, and a token exchanged for one
//! target is never served to a request for another.
//!
//! Shared data has no enumeration and no delete, so the exchange store is a fixed array of slots
//! (`slot = key mod capacity`): its size is bounded by construction, a colliding insert evicts the
//! previous entry, and a tick walks a few slots at a time to blank expired ones.

use std::collections::HashMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::exchange::ExchangeError;
use crate::verify::Principal;

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
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
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

const ENTRY_HEADER: usize = 32 + 8;
const LEASE_LEN: usize = 32 + 8 + 4 + 1;
/// Leases live for one exchange; a few thousand slots cover any burst of distinct fresh tokens
/// (a collision only costs a missed coalescing, never a wrong token).
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

    /// The cached backend token for `key`, if still reusable at `now` (seconds).
    pub fn get(&self, store: &dyn SharedStore, key: &Digest32, now: i64) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let (value, _) = store.get(&self.entry_key(self.slot(key)));
        let value = value?;
        if value.len() <= ENTRY_HEADER || value[..32] != key[..] {
            return None;
        }
        let until = i64::from_le_bytes(value[32..40].try_into().ok()?);
        if until <= now {
            return None;
        }
        String::from_utf8(value[ENTRY_HEADER..].to_vec()).ok()
    }

    pub fn put(&self, store: &dyn SharedStore, key: &Digest32, token: &str, until: i64) {
        if !self.enabled() {
            return;
        }
        let mut value = Vec::with_capacity(ENTRY_HEADER + token.len());
        value.extend_from_slice(key);
        value.extend_from_slice(&until.to_le_bytes());
        value.extend_from_slice(token.as_bytes());
        let _ = store.set(&self.entry_key(self.slot(key)), &value, None);
    }

    /// Drops `key`'s entry (if the slot still holds it). True if something was dropped.
    pub fn remove(&self, store: &dyn SharedStore, key: &Digest32) -> bool {
        if !self.enabled() {
            return false;
        }
        let slot_key = self.entry_key(self.slot(key));
        let (value, cas) = store.get(&slot_key);
        match value {
            Some(v) if v.len() >= 32 && v[..32] == key[..] => {
                store.set(&slot_key, &[], Some(cas)).is_ok()
            }
            _ => false,
        }
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
                let expired = v.len() < ENTRY_HEADER
                    || v[32..40]
                        .try_into()
                        .map(i64::from_le_bytes)
                        .map_or(true, |until| until <= now);
                if !v.is_empty() && expired {
                    let _ = store.set(&slot_key, &[], Some(cas));
                }
            }
        }
    }

    fn read_lease(
        &self,
        store: &dyn SharedStore,
        key: &Digest32,
        now_ms: u64,
    ) -> (Option<(u32, u8)>, u32) {
        let (value, cas) = store.get(&self.lease_key(self.lease_slot(key)));
        let live = value
            .filter(|v| v.len() == LEASE_LEN && v[..32] == key[..])
            .and_then(|v| {
                let deadline = u64::from_le_bytes(v[32..40].try_into().ok()?);
                let owner = u32::from_le_bytes(v[40..44].try_into().ok()?);
                (deadline > now_ms).then_some((owner, v[44]))
            });
        (live, cas)
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
            None => LeaseStatus::Free,
            Some((_, 0)) => LeaseStatus::InProgress,
            Some((_, state)) => {
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
        let (mut live, mut cas) = self.read_lease(store, key, now_ms);
        if cas == 0 {
            // Envoy ignores a CAS of 0 (never written), so two workers could both "win" a fresh
            // slot. Materialise the slot first; the CAS write below then picks one winner.
            let _ = store.set(&self.lease_key(self.lease_slot(key)), &[], None);
            (live, cas) = self.read_lease(store, key, now_ms);
        }
        match live {
            Some((holder, 0)) if holder != owner => LeaseOutcome::HeldElsewhere,
            Some((_, state)) if state != 0 => match decode_failure(state) {
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
        let (live, cas) = self.read_lease(store, key, now_ms);
        if matches!(live, Some((holder, _)) if holder != owner) {
            return;
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
        _ => return None,
    })
}

/// Verified claims by token digest, per VM, until the token's `exp`.
pub struct VerifiedTokens {
    entries: HashMap<Digest32, Rc<Principal>>,
    max_entries: usize,
}

impl VerifiedTokens {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
        }
    }

    /// The cached principal, if its token has not expired at `now` (with `skew`).
    pub fn get(&self, digest: &Digest32, now: i64, skew: i64) -> Option<&Rc<Principal>> {
        self.entries
            .get(digest)
            .filter(|p| now.saturating_sub(skew) < p.expires_at)
    }

    pub fn put(&mut self, digest: Digest32, principal: Rc<Principal>, now: i64) {
        if self.max_entries == 0 {
            return;
        }
        if self.entries.len() >= self.max_entries {
            self.entries.retain(|_, p| p.expires_at > now);
            if self.entries.len() >= self.max_entries {
                if let Some(victim) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, p)| p.expires_at)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(digest, principal);
    }

    pub fn sweep(&mut self, now: i64, skew: i64) {
        self.entries
            .retain(|_, p| now.saturating_sub(skew) < p.expires_at);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
        worker_a.put(&store, &key("t"), "backend", 100);
        assert_eq!(
            worker_b.get(&store, &key("t"), 99).as_deref(),
            Some("backend")
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
            cache.put(&store, &key(&format!("t{i}")), "x", 1000);
        }
        assert!(store.map.borrow().len() <= 4);
        // Later entries replace colliding earlier ones, never the reverse.
        assert_eq!(cache.get(&store, &key("t99"), 0).as_deref(), Some("x"));
    }

    #[test]
    fn remove_only_drops_its_own_entry() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 1);
        cache.put(&store, &key("a"), "A", 100);
        assert!(!cache.remove(&store, &key("b")));
        assert!(cache.remove(&store, &key("a")));
        assert_eq!(cache.get(&store, &key("a"), 0), None);
    }

    #[test]
    fn sweep_blanks_expired_slots() {
        let store = MemoryStore::default();
        let mut cache = ExchangeStore::new("ns", 8);
        cache.put(&store, &key("old"), "A", 10);
        cache.put(&store, &key("new"), "B", 1000);
        cache.sweep(&store, 500, 8);
        assert_eq!(cache.get(&store, &key("new"), 500).as_deref(), Some("B"));
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
        cache.put(&store, &key("a"), "A", 100);
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

    fn principal(exp: i64) -> Rc<Principal> {
        Rc::new(Principal {
            sub: "u".into(),
            audiences: vec![],
            scopes: vec![],
            expires_at: exp,
            jti: None,
            client_id: None,
            email: None,
        })
    }

    #[test]
    fn verified_tokens_expire_and_are_bounded() {
        let mut v = VerifiedTokens::new(2);
        v.put(token_digest("a"), principal(100), 0);
        assert!(v.get(&token_digest("a"), 99, 0).is_some());
        assert!(v.get(&token_digest("a"), 100, 0).is_none());
        assert!(
            v.get(&token_digest("a"), 159, 60).is_some(),
            "skew applies as for a fresh verify"
        );
        v.put(token_digest("b"), principal(300), 0);
        v.put(token_digest("c"), principal(200), 0);
        assert_eq!(v.len(), 2);
        assert!(
            v.get(&token_digest("a"), 0, 0).is_none(),
            "soonest expiry evicted"
        );
        v.sweep(250, 0);
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint_token("abc"), "ba7816bf");
    }
}
