//! Everything the request flow asks of Envoy, as one trait: the flow ([`Gateway`]) is generic
//! over it, so it runs natively against a test host (`fake_host`) as well as in Envoy, where
//! [`ProxyWasmHost`] makes the proxy-wasm host calls. `ProxyWasmHost` has no state, so the
//! generic code compiles to the same calls it made before the trait.
//!
//! [`Gateway`]: crate::gateway::Gateway

use std::time::Duration;

use proxy_wasm::types::MetricType;

use crate::cache::{CasMismatch, SharedStore};
use crate::header_map::SerializedHeaders;
use crate::host_abi;

/// A host call failed (the host's status is logged where it matters, never acted on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError;

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
        host_abi::request_headers()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        host_abi::set_request_header(name, value)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        host_abi::buffer(host_abi::HTTP_REQUEST_BODY, size)
    }

    fn set_audit_record(&self, record: &str) -> Result<(), HostError> {
        host_abi::set_property(crate::audit::AUDIT_PROPERTY, record)
    }

    fn log_info(&self, text: &str) {
        host_abi::log_info(text);
    }

    fn info_is_logged(&self) -> bool {
        host_abi::info_is_logged()
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        host_abi::send_local_response(status, headers, body);
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        host_abi::set_effective_context(context_id)
    }

    fn act_as_root(&self) -> Result<(), HostError> {
        host_abi::set_effective_context(self.root_context_id)
    }

    fn resume_request(&self) {
        host_abi::resume_request();
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError> {
        // The SDK's call, not a raw import: it registers the callout with the SDK's dispatcher,
        // which routes the answer to a context and panics on an answer it does not know.
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout)
            .map_err(|status| {
                log::warn!("callout to cluster {cluster} could not be dispatched: {status:?}");
                HostError
            })
    }

    fn callout_headers(&self) -> Vec<(String, Vec<u8>)> {
        host_abi::callout_response_headers().map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|(name, value)| (String::from_utf8_lossy(name).into_owned(), value.to_vec()))
                .collect()
        })
    }

    fn callout_body(&self, size: usize) -> Option<Vec<u8>> {
        host_abi::buffer(host_abi::HTTP_CALL_RESPONSE_BODY, size)
    }

    fn upstream_status(&self) -> Option<Vec<u8>> {
        host_abi::response_header(":status")
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = host_abi::set_tick_period(period);
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Option<u32> {
        host_abi::define_metric(kind as u32, name)
    }

    fn increment_metric(&self, id: u32, by: u64) {
        host_abi::increment_metric(id, by);
    }

    fn record_metric(&self, id: u32, value: u64) {
        host_abi::record_metric(id, value);
    }
}

/// Milliseconds since the Unix epoch, from the host clock (0 if it refuses: every deadline
/// then reads as passed, which fails closed).
pub fn now_ms() -> u64 {
    host_abi::now_nanos().map_or(0, |nanos| nanos / 1_000_000)
}

/// Proxy-wasm shared data: one store for every VM with the same `vm_id` (all Envoy workers).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        host_abi::shared_data(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        // Any other failure reads as a lost race: callers fall back to exchanging locally.
        host_abi::set_shared_data(key, value, cas.unwrap_or(0)).map_err(|_| CasMismatch)
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
