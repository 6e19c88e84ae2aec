//! The exchanged-token cache: without it every request costs a token endpoint call, and Okta's
//! per-minute rate limits cap the whole organisation at a few requests per second.
//!
//! Keys are SHA-256 over the subject token and the exchange target, so the cache never holds an
//! inbound token and never serves a token obtained for one target to another.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

pub type CacheKey = [u8; 32];

pub fn cache_key(subject_token: &str, target_identity: &str) -> CacheKey {
    let mut h = Sha256::new();
    h.update(subject_token.as_bytes());
    h.update([0u8]);
    h.update(target_identity.as_bytes());
    h.finalize().into()
}

/// A short, non-reversible label for a token, for logs: the first 8 hex digits of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct Entry {
    token: String,
    until: i64,
}

/// A bounded map from cache key to exchanged token, valid until a Unix time.
pub struct ExchangeCache {
    entries: HashMap<CacheKey, Entry>,
    max_entries: usize,
}

impl ExchangeCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached token for `key` if it is still reusable at `now`.
    pub fn get(&self, key: &CacheKey, now: i64) -> Option<&str> {
        self.entries
            .get(key)
            .filter(|e| e.until > now)
            .map(|e| e.token.as_str())
    }

    pub fn put(&mut self, key: CacheKey, token: String, until: i64, now: i64) {
        if self.max_entries == 0 || until <= now {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&key) {
            self.sweep(now);
            if self.entries.len() >= self.max_entries {
                // Evict the entry closest to expiry: it has the least reuse left.
                if let Some(victim) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(key, Entry { token, until });
    }

    pub fn remove(&mut self, key: &CacheKey) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now: i64) {
        self.entries.retain(|_, e| e.until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_tokens_and_targets() {
        assert_ne!(cache_key("t", "a"), cache_key("t", "b"));
        assert_ne!(cache_key("t1", "a"), cache_key("t2", "a"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(cache_key("ab", "c"), cache_key("a", "bc"));
    }

    #[test]
    fn hit_until_expiry() {
        let mut c = ExchangeCache::new(10);
        let k = cache_key("t", "x");
        c.put(k, "backend".into(), 100, 50);
        assert_eq!(c.get(&k, 99), Some("backend"));
        assert_eq!(c.get(&k, 100), None);
        c.sweep(100);
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_with_soonest_expiry_evicted() {
        let mut c = ExchangeCache::new(2);
        c.put(cache_key("a", ""), "A".into(), 300, 0);
        c.put(cache_key("b", ""), "B".into(), 200, 0);
        c.put(cache_key("c", ""), "C".into(), 400, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&cache_key("b", ""), 0), None);
        assert_eq!(c.get(&cache_key("a", ""), 0), Some("A"));
        assert_eq!(c.get(&cache_key("c", ""), 0), Some("C"));
    }

    #[test]
    fn expired_entries_go_first_and_disabled_cache_stores_nothing() {
        let mut c = ExchangeCache::new(2);
        c.put(cache_key("a", ""), "A".into(), 10, 0);
        c.put(cache_key("b", ""), "B".into(), 500, 0);
        c.put(cache_key("c", ""), "C".into(), 400, 20);
        assert_eq!(c.get(&cache_key("b", ""), 20), Some("B"));
        assert_eq!(c.get(&cache_key("c", ""), 20), Some("C"));
        let mut off = ExchangeCache::new(0);
        off.put(cache_key("a", ""), "A".into(), 10, 0);
        assert!(off.is_empty());
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_eq!(fingerprint("abc").len(), 8);
    }
}
