//! Verified inbound tokens of this worker (one VM), and the backend tokens it holds for them:
//! the front of the hot path. A repeated request is a lookup here, with no RSA verification, no
//! SHA-256 of the token and no shared-data read; what misses goes to the shared
//! [`ExchangeStore`](crate::cache::ExchangeStore).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::audit::RecordTail;
use crate::cache::Digest32;
use crate::config::ExchangeTarget;
use crate::verify::Principal;

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

    /// Forgets the backend token stored under the exchange cache `key`, and returns its
    /// `Authorization` value: what this worker sent upstream with it.
    pub fn forget_backend(&mut self, key: &Digest32) -> Option<Rc<str>> {
        let mut forgotten = None;
        for entry in self.entries.values_mut() {
            entry.backends.retain(|b| {
                let matches = b.key == *key;
                if matches && forgotten.is_none() {
                    forgotten = Some(Rc::clone(&b.authorization));
                }
                !matches
            });
        }
        forgotten
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{exchange_key, fingerprint_token, token_digest};

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
}
