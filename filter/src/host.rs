//! The few host services the flow needs, implemented over proxy-wasm host calls.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::cache::{CasMismatch, SharedStore};
use crate::header_map::SerializedHeaders;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    /// proxy-wasm ABI 0.2.1: serialises a header map into memory the host allocates through
    /// this module's `proxy_on_memory_allocate` (the SDK's allocator).
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// The request headers in one host call (see [`crate::header_map`]). `None` if the host
/// refuses (no request headers in this callback).
#[cfg(target_arch = "wasm32")]
pub fn request_headers() -> Option<SerializedHeaders> {
    const HTTP_REQUEST_HEADERS: u32 = 0;
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to `size` bytes it allocated with this module's
    // allocator (as a `Vec<u8>` of that capacity, which is how the SDK's
    // `proxy_on_memory_allocate` allocates), or leaves `data` null. Ownership passes to us; the
    // SDK's own `get_map_bytes` takes it the same way.
    unsafe {
        if proxy_get_header_map_pairs(HTTP_REQUEST_HEADERS, &mut data, &mut size) != 0 {
            return None;
        }
        if data.is_null() {
            return Some(SerializedHeaders::new(Vec::new()));
        }
        Some(SerializedHeaders::new(Vec::from_raw_parts(
            data, size, size,
        )))
    }
}

/// Native builds (unit tests) have no host.
#[cfg(not(target_arch = "wasm32"))]
pub fn request_headers() -> Option<SerializedHeaders> {
    None
}

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
