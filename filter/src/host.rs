//! Everything the request flow asks of Envoy, as one trait: the flow ([`Gateway`]) is generic
//! over it, so it runs natively against a test host (`fake_host`) as well as in Envoy, where
//! [`ProxyWasmHost`] makes the proxy-wasm host calls. `ProxyWasmHost` has no state, so the
//! generic code compiles to the same calls it made before the trait.
//!
//! [`Gateway`]: crate::gateway::Gateway

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::cache::{CasMismatch, SharedStore};
use crate::header_map::SerializedHeaders;

/// A host call failed (the host's status is logged where it matters, never acted on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError;

impl From<Status> for HostError {
    fn from(_: Status) -> Self {
        HostError
    }
}

/// What the flow needs from Envoy. Request-scoped calls act on the *effective* context: the
/// request whose callback is running, or the one `set_effective_context` chose.
pub trait Host: SharedStore {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// All request headers, in one call. `None` if the host refuses.
    fn request_headers(&self) -> Option<SerializedHeaders>;
    /// Replaces (or with `None` removes) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// The first `size` bytes of the buffered request body.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Hands the request's audit record to Envoy: filter state `wasm.<AUDIT_PROPERTY>`, which
    /// Envoy's access log writes when the request ends (also for local replies).
    ///
    /// [`AUDIT_PROPERTY`]: crate::audit::AUDIT_PROPERTY
    fn set_audit_record(&self, record: &str) -> Result<(), HostError>;
    /// Writes `text` to Envoy's application log at `info` (audit records; Envoy drops it when
    /// its `wasm` logger is set above `info`).
    fn log_info(&self, text: &str);
    /// Whether Envoy writes what [`Host::log_info`] hands it (its log level is `info` or lower).
    fn info_is_logged(&self) -> bool;
    /// Answers the request locally.
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>);
    /// Makes `context_id` the request later calls act on; fails if it is gone.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError>;
    /// Makes the root context the one later calls act on, so a callout dispatched next belongs
    /// to it (and is not cancelled when some request ends).
    fn act_as_root(&self) -> Result<(), HostError>;
    /// Lets a paused request continue upstream.
    fn resume_request(&self);
    /// Starts an HTTP callout to an Envoy cluster; the token identifies its answer.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError>;
    /// The headers of the callout answer being delivered.
    fn callout_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// The first `size` bytes of the callout answer's body.
    fn callout_body(&self, size: usize) -> Option<Vec<u8>>;
    /// The upstream response's `:status` (in the response-headers callback).
    fn upstream_status(&self) -> Option<Vec<u8>>;
    /// How often the root context's tick runs.
    fn set_tick_period(&self, period: Duration);
    /// Defines (or finds) a stat; `None` if the host refuses.
    fn define_metric(&self, kind: MetricType, name: &str) -> Option<u32>;
    fn increment_metric(&self, id: u32, by: u64);
    fn record_metric(&self, id: u32, value: u64);
}

/// The real host: proxy-wasm host calls.
#[derive(Clone, Copy)]
pub struct ProxyWasmHost {
    /// The root context of this VM: callouts that serve many requests belong to it.
    pub root_context_id: u32,
}

impl SharedStore for ProxyWasmHost {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        HostStore.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        HostStore.set(key, value, cas)
    }
}

impl Host for ProxyWasmHost {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn request_headers(&self) -> Option<SerializedHeaders> {
        request_headers()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        set_request_header(name, value)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn set_audit_record(&self, record: &str) -> Result<(), HostError> {
        set_audit_property(record)
    }

    fn log_info(&self, text: &str) {
        log_info(text);
    }

    fn info_is_logged(&self) -> bool {
        info_is_logged()
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), body);
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        Ok(hostcalls::set_effective_context(context_id)?)
    }

    fn act_as_root(&self) -> Result<(), HostError> {
        Ok(hostcalls::set_effective_context(self.root_context_id)?)
    }

    fn resume_request(&self) {
        resume_request();
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout).map_err(
            |status| {
                log::warn!("callout to cluster {cluster} could not be dispatched: {status:?}");
                HostError
            },
        )
    }

    fn callout_headers(&self) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default()
    }

    fn callout_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn upstream_status(&self) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Option<u32> {
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment_metric(&self, id: u32, by: u64) {
        let _ = hostcalls::increment_metric(id, by as i64);
    }

    fn record_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    /// proxy-wasm ABI 0.2.1: serialises a header map into memory the host allocates through
    /// this module's `proxy_on_memory_allocate` (the SDK's allocator).
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// proxy-wasm's map type of the request headers.
#[cfg(target_arch = "wasm32")]
const HTTP_REQUEST_HEADERS: u32 = 0;

/// The request headers in one host call (see [`crate::header_map`]). `None` if the host
/// refuses (no request headers in this callback).
#[cfg(target_arch = "wasm32")]
pub fn request_headers() -> Option<SerializedHeaders> {
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

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    /// proxy-wasm ABI 0.2.1; the property path's parts are NUL-separated (one part here).
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// Sets the request's audit record as filter state. Not through the SDK's `set_property`,
/// which panics (trapping the VM, after which Envoy fails every request) on any status but Ok,
/// while Envoy answers NotFound where no request is attached to the effective context; and the
/// path is a constant, so nothing is allocated to serialise it (this runs on every request).
#[cfg(target_arch = "wasm32")]
fn set_audit_property(record: &str) -> Result<(), HostError> {
    let path = crate::audit::AUDIT_PROPERTY.as_bytes();
    // SAFETY: both pointers are valid for the given sizes for the duration of the call; the
    // host copies the bytes and keeps no pointer.
    let status =
        unsafe { proxy_set_property(path.as_ptr(), path.len(), record.as_ptr(), record.len()) };
    status_ok(status)
}

#[cfg(not(target_arch = "wasm32"))]
fn set_audit_property(_record: &str) -> Result<(), HostError> {
    Err(HostError)
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    /// proxy-wasm ABI 0.2.1 (map type 0: the request headers).
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    /// Stream type 0: the HTTP request.
    fn proxy_continue_stream(stream_type: u32) -> u32;
}

/// Not through the SDK's `set_map_value` and `resume_http_request`, which panic (trapping the
/// VM, after which Envoy fails every request) on any status but Ok: Envoy answers BadArgument
/// when the effective context has no request headers (any more), and the flow treats a failed
/// write as a refusal, never a pass.
#[cfg(target_arch = "wasm32")]
fn set_request_header(name: &str, value: Option<&str>) -> Result<(), HostError> {
    // SAFETY: every pointer is valid for its size for the duration of the call; the host copies
    // the bytes and keeps no pointer.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(
                HTTP_REQUEST_HEADERS,
                name.as_ptr(),
                name.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => proxy_remove_header_map_value(HTTP_REQUEST_HEADERS, name.as_ptr(), name.len()),
        }
    };
    status_ok(status)
}

#[cfg(not(target_arch = "wasm32"))]
fn set_request_header(_name: &str, _value: Option<&str>) -> Result<(), HostError> {
    Err(HostError)
}

/// A request that cannot be resumed (it ended meanwhile) needs nothing more from us.
#[cfg(target_arch = "wasm32")]
fn resume_request() {
    const HTTP_REQUEST: u32 = 0;
    // SAFETY: no pointers; the host only reads the stream type.
    let _ = unsafe { proxy_continue_stream(HTTP_REQUEST) };
}

#[cfg(not(target_arch = "wasm32"))]
fn resume_request() {}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    /// proxy-wasm ABI 0.2.1.
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
}

/// proxy-wasm's `info` log level (trace 0, debug 1, info 2, warn 3, error 4, critical 5).
#[cfg(target_arch = "wasm32")]
const LOG_LEVEL_INFO: u32 = 2;

/// Not through the SDK's `hostcalls::log`, which panics (trapping the VM) on any status but Ok:
/// a log line that cannot be written is no reason to fail every request.
#[cfg(target_arch = "wasm32")]
fn log_info(text: &str) {
    // SAFETY: the pointer is valid for `text.len()` bytes for the duration of the call; the host
    // copies the bytes and keeps no pointer.
    let _ = unsafe { proxy_log(LOG_LEVEL_INFO, text.as_ptr(), text.len()) };
}

#[cfg(not(target_arch = "wasm32"))]
fn log_info(_text: &str) {}

#[cfg(target_arch = "wasm32")]
fn info_is_logged() -> bool {
    let mut level = 0u32;
    // SAFETY: the host writes one u32 through the pointer, which is valid for the call.
    let status = unsafe { proxy_get_log_level(&mut level) };
    // A host that does not say is taken at its word that it logs.
    status != 0 || level <= LOG_LEVEL_INFO
}

#[cfg(not(target_arch = "wasm32"))]
fn info_is_logged() -> bool {
    true
}

/// A raw host call's status: 0 is Ok, anything else a refusal the caller handles.
#[cfg(target_arch = "wasm32")]
fn status_ok(status: u32) -> Result<(), HostError> {
    match status {
        0 => Ok(()),
        _ => Err(HostError),
    }
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
