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
//! (a key lives in `key mod capacity` or the next slot): its size is bounded by construction, an
//! insert finding both slots held evicts the entry that expires first, and a tick walks a few
//! slots at a time to blank expired ones.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::audit::RecordTail;
use crate::config::ExchangeTarget;
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(8);
    for b in digest.iter().take(4) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// Equality of two byte strings eight bytes at a time: Wasm's `memcmp` compares byte by byte,
/// and the hot path compares a whole token on every request. The differences are ORed over
/// fixed-size words in an indexed loop: iterator adapters (`chunks_exact().zip()`) are not
/// inlined at this crate's size-oriented opt-level and cost several times the comparison itself.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_tail) = a.as_chunks::<8>();
    let (b_words, b_tail) = b.as_chunks::<8>();
    let b_words = &b_words[..a_words.len()];
    let mut diff = 0u64;
    for i in 0..a_words.len() {
        diff |= u64::from_ne_bytes(a_words[i]) ^ u64::from_ne_bytes(b_words[i]);
    }
    diff == 0 && a_tail == b_tail
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
    /// what was read, so two workers storing different keys do not overwrite each other
    /// unseen; a write that loses twice leaves the token uncached (a later miss exchanges).
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

    /// Drops `key`'s entry (if a slot still holds it). True if something was dropped.
    pub fn remove(&self, store: &dyn SharedStore, key: &Digest32) -> bool {
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
                .is_some_and(|entry| entry.key == key);
            (holds_key && store.set(&slot_key, &[], Some(cas)).is_ok()) || removed
        });
        if removed {
            // Tell the other workers to drop the copies they keep in front of this store.
            let _ = store.set(&self.generation_key(), &[], None);
        }
        removed
    }

    /// Changes whenever an entry is removed: workers compare it on their tick to learn that a
    /// backend token they keep in their own [`VerifiedTokens`] may be stale. (The CAS of a
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
    /// `InProgress`: the key waits for that exchange to end (see [`SlotLease`]).
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

/// A backend token this worker already holds for one exchange target, so a repeated request
/// rewrites `Authorization` without touching shared data.
#[derive(Clone)]
pub struct CachedBackend {
    /// Compared by pointer: targets live as long as the policy and are never rebuilt.
    pub target: Rc<ExchangeTarget>,
    /// The whole header value, `Bearer <token>`, built once.
    pub authorization: Rc<str>,
    pub fingerprint: Rc<str>,
    /// Reusable until this time (Unix seconds), as stored in the shared exchange cache.
    pub until: i64,
    /// The shared exchange cache key, to drop the entry when the upstream rejects the token.
    pub key: Digest32,
    /// When (ms) the upstream's answer to a cached-path request with this token is next read
    /// (see [`STATUS_CHECK_INTERVAL_MS`]); 0 until the first.
    pub next_status_check_ms: Cell<u64>,
}

/// How often, at most, the cached path reads the upstream's `:status` for one backend token
/// (per worker), to drop a token the upstream rejects (401) before its `exp`. Reading a value
/// from Envoy makes Envoy call back into the VM to allocate it, which measured ~10.7k of the
/// ~170k instructions a cached request costs (bench/instructions.md): reading it on every
/// response cost 7 % of the throughput for an event that happens to a token at most once. At
/// this interval a token the upstream rejects is dropped within 100 ms of traffic, and every
/// response is still read while a token serves under ten requests a second per worker. The full
/// path (a fresh exchange, a fleet or shared-cache hit) reads every answer.
pub const STATUS_CHECK_INTERVAL_MS: u64 = 100;

impl CachedBackend {
    pub fn new(
        target: Rc<ExchangeTarget>,
        authorization: Rc<str>,
        fingerprint: Rc<str>,
        until: i64,
        key: Digest32,
    ) -> Self {
        Self {
            target,
            authorization,
            fingerprint,
            until,
            key,
            next_status_check_ms: Cell::new(0),
        }
    }

    /// Whether the upstream's answer to a request forwarded with this token at `now_ms` is to be
    /// read; if so, the next read is due an interval later.
    pub fn take_status_check(&self, now_ms: u64) -> bool {
        if now_ms < self.next_status_check_ms.get() {
            return false;
        }
        self.next_status_check_ms
            .set(now_ms.saturating_add(STATUS_CHECK_INTERVAL_MS));
        true
    }
}

/// One verified inbound token.
pub struct VerifiedToken {
    token: Box<str>,
    pub digest: Digest32,
    pub principal: Rc<Principal>,
    backends: Vec<CachedBackend>,
    /// The audit record of this token's last cached-path decision but for its time, reused
    /// while the route and backend token stay the same (see [`RecordTail`]).
    pub audit_tail: RefCell<Option<RecordTail>>,
}

impl VerifiedToken {
    /// The backend token held for `target`, if still reusable at `now`.
    pub fn backend(&self, target: &Rc<ExchangeTarget>, now: i64) -> Option<&CachedBackend> {
        self.backends
            .iter()
            .find(|b| Rc::ptr_eq(&b.target, target) && b.until > now)
    }
}

/// Verified tokens of this worker (one VM), until their `exp`: the front of the hot path.
///
/// A repeated request costs a lookup here instead of an RSA verification, a SHA-256 of the token
/// and a shared-data read. Like `jwt_authn`'s `jwt_cache`, entries are found by the token itself:
/// a map keyed by a random-keyed hash of the token's length and last 32 bytes (the signature,
/// which differs between any two tokens an issuer signs), confirmed by comparing the whole token.
/// Hashing all of a ~1 KB token, let alone SHA-256, would cost more than the rest of a hit, and
/// the hash is a multiply-xorshift mix rather than SipHash for the same reason: only verified
/// tokens are ever inserted, so a client cannot fill the map with colliding keys, and a hash
/// collision (chance or crafted) only costs a miss: the comparison decides. Tokens stay in
/// this VM's memory, as they do while their request is in flight; nothing here reaches shared
/// data, logs or metrics (the shared exchange cache is keyed by SHA-256 digests only).
///
/// Bounded: at `max_entries` the oldest entry is evicted; expired ones are swept on the tick.
pub struct VerifiedTokens {
    /// Keyed by `slot`, which is already a hash: the map does not hash it again.
    entries: HashMap<u64, VerifiedToken, std::hash::BuildHasherDefault<PreHashed>>,
    /// Insertion order for eviction; may name keys already replaced or swept.
    order: std::collections::VecDeque<u64>,
    /// Random per VM, so slots cannot be predicted from outside.
    seed: u64,
    max_entries: usize,
}

/// The hasher of a map whose `u64` keys are hashes already.
#[derive(Default)]
pub struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; anything else still hashes deterministically.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(MIX);
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

impl VerifiedTokens {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::default(),
            order: std::collections::VecDeque::new(),
            seed: {
                use std::hash::BuildHasher;
                // std seeds RandomState from the host's random source (WASI random_get).
                std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
            },
            max_entries,
        }
    }

    fn slot(&self, bytes: &[u8]) -> u64 {
        let tail = bytes.get(bytes.len().saturating_sub(32)..).unwrap_or(bytes);
        // One copy into a fixed block (zero-padded for short input), then four fixed-size words:
        // no per-word slicing on the per-request path.
        let mut block = [0u8; 32];
        block[..tail.len()].copy_from_slice(tail);
        let mut h = self.seed ^ (bytes.len() as u64).wrapping_mul(MIX);
        for word in block.as_chunks::<8>().0 {
            h = (h ^ u64::from_le_bytes(*word)).wrapping_mul(MIX);
            h ^= h >> 29;
        }
        // Spread into the high bits too: hashbrown takes its tag byte from them.
        (h ^ (h >> 32)).wrapping_mul(MIX)
    }

    /// The entry for `token`, if its token has not expired at `now` (with `skew`).
    pub fn get(&self, token: &str, now: i64, skew: i64) -> Option<&VerifiedToken> {
        self.get_bytes(token.as_bytes(), now, skew)
    }

    /// [`VerifiedTokens::get`] for a credential not yet checked to be text.
    pub fn get_bytes(&self, token: &[u8], now: i64, skew: i64) -> Option<&VerifiedToken> {
        self.entries.get(&self.slot(token)).filter(|e| {
            same_bytes(e.token.as_bytes(), token)
                && now.saturating_sub(skew) < e.principal.expires_at
        })
    }

    pub fn put(&mut self, token: &str, digest: Digest32, principal: Rc<Principal>) {
        if self.max_entries == 0 {
            return;
        }
        let slot = self.slot(token.as_bytes());
        if !self.entries.contains_key(&slot) {
            while self.entries.len() >= self.max_entries {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.entries.remove(&oldest);
            }
            self.order.push_back(slot);
        }
        self.entries.insert(
            slot,
            VerifiedToken {
                token: token.into(),
                digest,
                principal,
                backends: Vec::new(),
                audit_tail: RefCell::new(None),
            },
        );
        if self.order.len() > 2 * self.max_entries.max(16) {
            self.order.retain(|k| self.entries.contains_key(k));
        }
    }

    /// Remembers the backend token obtained for `token` and `backend.target`.
    pub fn remember_backend(&mut self, token: &str, backend: CachedBackend) {
        let slot = self.slot(token.as_bytes());
        if let Some(entry) = self
            .entries
            .get_mut(&slot)
            .filter(|e| same_bytes(e.token.as_bytes(), token.as_bytes()))
        {
            entry
                .backends
                .retain(|b| !Rc::ptr_eq(&b.target, &backend.target));
            entry.backends.push(backend);
        }
    }

    /// Forgets the backend token stored under the exchange cache `key`.
    pub fn forget_backend(&mut self, key: &Digest32) {
        for entry in self.entries.values_mut() {
            entry.backends.retain(|b| b.key != *key);
        }
    }

    /// Forgets every backend token (another worker invalidated one; we cannot tell which).
    pub fn forget_backends(&mut self) {
        for entry in self.entries.values_mut() {
            entry.backends.clear();
        }
    }

    /// Drops everything: the key set changed, so earlier verifications no longer count.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    pub fn sweep(&mut self, now: i64, skew: i64) {
        self.entries
            .retain(|_, e| now.saturating_sub(skew) < e.principal.expires_at);
        for entry in self.entries.values_mut() {
            entry.backends.retain(|b| b.until > now);
        }
        if self.order.len() > self.entries.len() {
            self.order.retain(|k| self.entries.contains_key(k));
        }
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
        assert!(cache.remove(&store, &b));
        assert_eq!(cache.get(&store, &b, 350), None);
    }

    #[test]
    fn remove_only_drops_its_own_entry() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 1);
        cache.put(&store, &key("a"), "A", 100, 0);
        assert!(!cache.remove(&store, &key("b")));
        assert!(cache.remove(&store, &key("a")));
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

    fn principal(exp: i64) -> Rc<Principal> {
        Rc::new(Principal {
            provider: 0,
            sub: "u".into(),
            audiences: vec![],
            scopes: vec![],
            expires_at: exp,
            jti: None,
            client_id: None,
            email: None,
        })
    }

    fn target(scope: &str) -> Rc<ExchangeTarget> {
        let raw = serde_json::json!({
            "issuer": "https://idp", "audiences": ["a"],
            "jwks": {"cluster": "idp", "path": "/keys"},
            "exchange": {"cluster": "idp", "path": "/token", "authority": "idp",
                         "client_id": "c", "client_secret_env": "S", "audience": "b", "scope": scope},
        });
        let policy =
            crate::config::parse_policy(raw.to_string().as_bytes(), &|_| Some("secret".into()))
                .unwrap();
        policy.routes[0].target.clone().unwrap()
    }

    fn backend(target: &Rc<ExchangeTarget>, token: &str, until: i64) -> CachedBackend {
        CachedBackend::new(
            Rc::clone(target),
            format!("Bearer {token}").into(),
            fingerprint_token(token).into(),
            until,
            exchange_key(&token_digest(token), &target.identity),
        )
    }

    #[test]
    fn verified_tokens_expire_and_are_bounded() {
        let mut v = VerifiedTokens::new(2);
        v.put("a", token_digest("a"), principal(100));
        assert!(v.get("a", 99, 0).is_some());
        assert!(v.get("a", 100, 0).is_none());
        assert!(
            v.get("a", 159, 60).is_some(),
            "skew applies as for a fresh verify"
        );
        assert_eq!(v.get("a", 0, 0).map(|e| e.digest), Some(token_digest("a")));
        v.put("b", token_digest("b"), principal(300));
        v.put("c", token_digest("c"), principal(200));
        assert_eq!(v.len(), 2);
        assert!(v.get("a", 0, 0).is_none(), "oldest evicted");
        assert!(v.get("b", 0, 0).is_some() && v.get("c", 0, 0).is_some());
        v.sweep(250, 0);
        assert_eq!(v.len(), 1);
        assert!(VerifiedTokens::new(0).get("a", 0, 0).is_none());
        let mut off = VerifiedTokens::new(0);
        off.put("a", token_digest("a"), principal(100));
        assert!(off.is_empty(), "0 entries disables the cache");
    }

    #[test]
    fn verified_tokens_match_the_whole_token_not_its_hash() {
        let mut v = VerifiedTokens::new(8);
        let sig = "S".repeat(40);
        let a = format!("header.payloadA.{sig}");
        let b = format!("header.payloadB.{sig}");
        v.put(&a, token_digest(&a), principal(100));
        // Same length and same last 32 bytes: same slot, different token.
        assert!(v.get(&b, 0, 0).is_none());
        assert!(v.get(&a[..a.len() - 1], 0, 0).is_none());
        assert!(v.get(&a, 0, 0).is_some());
        // Re-putting under a colliding slot replaces, never serves the other token's claims.
        v.put(&b, token_digest(&b), principal(50));
        assert!(v.get(&a, 0, 0).is_none());
        assert_eq!(v.get(&b, 0, 0).map(|e| e.principal.expires_at), Some(50));
        for i in 0..100 {
            let t = format!("t{i}.{sig}");
            v.put(&t, token_digest(&t), principal(100));
        }
        assert!(v.len() <= 8);
    }

    #[test]
    fn backends_are_per_target_until_their_time_and_dropped_on_invalidation() {
        let (t1, t2) = (target("x"), target("y"));
        let mut v = VerifiedTokens::new(8);
        v.put("tok", token_digest("tok"), principal(1000));
        v.remember_backend("tok", backend(&t1, "B1", 100));
        v.remember_backend("unknown", backend(&t1, "B9", 100));
        let e = v.get("tok", 0, 0).unwrap();
        assert_eq!(
            e.backend(&t1, 99).map(|b| &*b.authorization),
            Some("Bearer B1")
        );
        assert!(e.backend(&t1, 100).is_none(), "expired at `until`");
        assert!(
            e.backend(&t2, 0).is_none(),
            "another target's token is never used"
        );
        v.remember_backend("tok", backend(&t1, "B2", 200));
        let e = v.get("tok", 0, 0).unwrap();
        assert_eq!(
            e.backend(&t1, 150).map(|b| &*b.authorization),
            Some("Bearer B2")
        );
        v.remember_backend("tok", backend(&t2, "C", 200));
        let key = backend(&t1, "B2", 200).key;
        v.forget_backend(&key);
        let e = v.get("tok", 0, 0).unwrap();
        assert!(e.backend(&t1, 0).is_none() && e.backend(&t2, 0).is_some());
        v.forget_backends();
        assert!(v.get("tok", 0, 0).unwrap().backend(&t2, 0).is_none());
        v.clear();
        assert!(v.is_empty());
    }

    #[test]
    fn removing_an_entry_moves_the_generation() {
        let store = MemoryStore::default();
        let cache = ExchangeStore::new("ns", 8);
        let before = cache.generation(&store);
        cache.put(&store, &key("t"), "x", 100, 0);
        assert_eq!(cache.generation(&store), before, "a put is no invalidation");
        assert!(!cache.remove(&store, &key("other")));
        assert_eq!(cache.generation(&store), before);
        assert!(cache.remove(&store, &key("t")));
        assert_ne!(cache.generation(&store), before);
    }

    #[test]
    fn same_bytes_is_equality() {
        let s = "0123456789abcdefghij";
        for i in 0..=s.len() {
            for j in 0..=s.len() {
                assert_eq!(same_bytes(&s.as_bytes()[..i], &s.as_bytes()[..j]), i == j);
            }
            let mut changed = s.as_bytes()[..i].to_vec();
            if let Some(last) = changed.last_mut() {
                *last ^= 1;
                assert!(!same_bytes(&changed, &s.as_bytes()[..i]));
            }
            if let Some(first) = changed.first_mut() {
                *first ^= 2;
                assert!(!same_bytes(&changed, &s.as_bytes()[..i]));
            }
        }
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint_token("abc"), "ba7816bf");
    }
}
