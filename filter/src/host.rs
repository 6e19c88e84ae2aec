//! The few host services the flow needs, implemented over proxy-wasm host calls.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::cache::{CasMismatch, SharedStore};

/// Milliseconds since the Unix epoch, from the host clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Proxy-wasm shared data: one store for every VM with the same `vm_id` (all Envoy workers).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => (value, cas.unwrap_or(0)),
            Err(_) => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(CasMismatch),
            // Any other failure: treat as a lost race; callers fall back to exchanging locally.
            Err(_) => Err(CasMismatch),
        }
    }
}

/// A number unique to this VM among the VMs sharing its `vm_id`: the owner id of exchange
/// leases.
pub fn allocate_worker_id(store: &dyn SharedStore, key: &str) -> u32 {
    for _ in 0..64 {
        let (value, cas) = store.get(key);
        let current = value
            .and_then(|v| {
                v.get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes)
            })
            .unwrap_or(0);
        let next = current.wrapping_add(1).max(1);
        if cas == 0 {
            // Never written: create it, then take a number with a real CAS.
            let _ = store.set(key, &0u32.to_le_bytes(), None);
            continue;
        }
        if store.set(key, &next.to_le_bytes(), Some(cas)).is_ok() {
            return next;
        }
    }
    // Extremely contended: fall back to something unlikely to collide.
    (now_ms() as u32) | 0x8000_0000
}
