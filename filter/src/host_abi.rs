//! The proxy-wasm host calls the filter makes, as raw imports whose every status is an answer.
//!
//! The SDK's `hostcalls` panic on any status their author did not expect, and its imports are
//! declared to return a Rust enum, so a status outside it is undefined behaviour. A panic traps
//! the VM, and Envoy then fails every request of that worker until the VM is replaced. Envoy
//! answers NotFound where no request is attached to the effective context (measured for
//! `set_property`), and its source answers BadArgument for a header map not available in the
//! current callback and, as read there, for a second local reply. Here each call returns the
//! status as a `Result` or an `Option`, and the flow treats a refusal as a refusal, never as a
//! pass.
//!
//! One call stays with the SDK: `dispatch_http_call`, which registers the callout with the
//! SDK's dispatcher; without that, the dispatcher panics on the callout's answer. It panics on
//! statuses besides Ok, BadArgument and InternalFailure, none of which is known from Envoy's
//! `httpCall`.
//!
//! Calls that return data take it the way the SDK does: the host allocates it with this
//! module's `proxy_on_memory_allocate` (the SDK's, a `Vec<u8>` of that capacity) and ownership
//! passes to the caller.
//!
//! Native builds (unit tests) link stand-ins that refuse every call: the flow runs against
//! `fake_host` there.

use std::time::Duration;

use crate::header_map::{serialize, SerializedHeaders};
use crate::host::HostError;

/// proxy-wasm ABI 0.2.1 imports, with their statuses as plain `u32` (0 is Ok).
#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_log_level(return_level: *mut u32) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            details_data: *const u8,
            details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    }
}

/// Native stand-ins with the imports' signatures: every call is refused (InternalFailure).
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod imports {
    const REFUSED: u32 = 10;
    macro_rules! refuse {
        ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
            $(pub unsafe fn $name($(_: $ty),*) -> u32 { REFUSED })*
        };
    }
    refuse! {
        proxy_log(level: u32, data: *const u8, size: usize);
        proxy_get_log_level(level: *mut u32);
        proxy_get_current_time_nanoseconds(time: *mut u64);
        proxy_set_tick_period_milliseconds(period: u32);
        proxy_get_buffer_bytes(t: u32, start: usize, max: usize, d: *mut *mut u8, s: *mut usize);
        proxy_get_header_map_pairs(t: u32, d: *mut *mut u8, s: *mut usize);
        proxy_get_header_map_value(t: u32, k: *const u8, ks: usize, d: *mut *mut u8, s: *mut usize);
        proxy_replace_header_map_value(t: u32, k: *const u8, ks: usize, v: *const u8, vs: usize);
        proxy_remove_header_map_value(t: u32, k: *const u8, ks: usize);
        proxy_set_property(p: *const u8, ps: usize, v: *const u8, vs: usize);
        proxy_continue_stream(stream: u32);
        proxy_send_local_response(
            code: u32, d: *const u8, ds: usize, b: *const u8, bs: usize, h: *const u8, hs: usize,
            grpc: i32
        );
        proxy_set_effective_context(id: u32);
        proxy_get_shared_data(k: *const u8, ks: usize, d: *mut *mut u8, s: *mut usize, c: *mut u32);
        proxy_set_shared_data(k: *const u8, ks: usize, v: *const u8, vs: usize, cas: u32);
        proxy_define_metric(t: u32, n: *const u8, ns: usize, id: *mut u32);
        proxy_increment_metric(id: u32, offset: i64);
        proxy_record_metric(id: u32, value: u64);
    }
}

use imports::*;

const OK: u32 = 0;
const CAS_MISMATCH: u32 = 8;

/// proxy-wasm's map types and buffer types used here.
const HTTP_REQUEST_HEADERS: u32 = 0;
const HTTP_RESPONSE_HEADERS: u32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const HTTP_REQUEST_BODY: u32 = 0;
pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const PLUGIN_CONFIGURATION: u32 = 7;

/// proxy-wasm's log levels used by name (trace 0, debug 1, info 2, warn 3, error 4,
/// critical 5).
const LOG_LEVEL_INFO: u32 = 2;
const LOG_LEVEL_CRITICAL: u32 = 5;

fn status_ok(status: u32) -> Result<(), HostError> {
    match status {
        OK => Ok(()),
        _ => Err(HostError),
    }
}

/// Takes ownership of `size` bytes the host allocated at `data` (null: nothing).
///
/// # Safety
/// `data` is null or was returned by the host for this call, allocated through this module's
/// `proxy_on_memory_allocate` with capacity `size`, and not taken before.
unsafe fn take_host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Writes `text` to Envoy's log at `info`. A log line that cannot be written is no reason to
/// fail a request.
pub fn log_info(text: &str) {
    log(LOG_LEVEL_INFO, text);
}

fn log(level: u32, text: &str) {
    // SAFETY: the pointer is valid for `text.len()` bytes for the call; the host copies them.
    let _ = unsafe { proxy_log(level, text.as_ptr(), text.len()) };
}

/// The `log` crate's sink: Envoy's log, through [`log`]. Replaces the SDK's logger, which
/// unwraps the status of every log call.
pub struct HostLogger;

static LOGGER: HostLogger = HostLogger;

impl HostLogger {
    /// Installs the logger at `info` and a panic hook that logs the panic at `critical` before
    /// the VM traps (so the log says why).
    pub fn install() {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        std::panic::set_hook(Box::new(|panic| {
            log(LOG_LEVEL_CRITICAL, &panic.to_string())
        }));
    }
}

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => LOG_LEVEL_INFO,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

/// Whether Envoy writes `info` lines. A host that does not say is taken at its word that it
/// logs.
pub fn info_is_logged() -> bool {
    let mut level = 0u32;
    // SAFETY: the host writes one u32 through the pointer, which is valid for the call.
    let status = unsafe { proxy_get_log_level(&mut level) };
    status != OK || level <= LOG_LEVEL_INFO
}

/// The host clock in nanoseconds since the Unix epoch; `None` if it refuses.
pub fn now_nanos() -> Option<u64> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 through the pointer, which is valid for the call.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    (status == OK).then_some(nanos)
}

pub fn set_tick_period(period: Duration) -> Result<(), HostError> {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no pointers.
    status_ok(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Up to `max_size` bytes of a buffer from its start; `None` if the host has none or refuses.
pub fn buffer(buffer_type: u32, max_size: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut::<u8>(), 0usize);
    // SAFETY: the host writes a pointer and a size through valid out-pointers; see
    // `take_host_bytes` for the returned memory.
    unsafe {
        if proxy_get_buffer_bytes(buffer_type, 0, max_size, &mut data, &mut size) != OK {
            return None;
        }
        Some(take_host_bytes(data, size))
    }
}

/// A whole header map in one call (see [`crate::header_map`]); `None` if the host refuses (the
/// map is not available in this callback).
fn header_map(map_type: u32) -> Option<SerializedHeaders> {
    let (mut data, mut size) = (std::ptr::null_mut::<u8>(), 0usize);
    // SAFETY: as in `buffer`.
    unsafe {
        if proxy_get_header_map_pairs(map_type, &mut data, &mut size) != OK {
            return None;
        }
        Some(SerializedHeaders::new(take_host_bytes(data, size)))
    }
}

pub fn request_headers() -> Option<SerializedHeaders> {
    header_map(HTTP_REQUEST_HEADERS)
}

pub fn callout_response_headers() -> Option<SerializedHeaders> {
    header_map(HTTP_CALL_RESPONSE_HEADERS)
}

/// One upstream response header; `None` if absent or not available.
pub fn response_header(name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut::<u8>(), 0usize);
    // SAFETY: `name` is valid for its length for the call; out-pointers as in `buffer`.
    unsafe {
        let status = proxy_get_header_map_value(
            HTTP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        );
        (status == OK).then(|| take_host_bytes(data, size))
    }
}

/// Replaces (or with `None` removes) a request header.
pub fn set_request_header(name: &str, value: Option<&str>) -> Result<(), HostError> {
    // SAFETY: every pointer is valid for its size for the call; the host copies the bytes.
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

/// Sets a filter-state property (one path part). The path is a constant at every caller, so
/// nothing is allocated to serialise it.
pub fn set_property(path: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: both pointers are valid for their sizes for the call; the host copies the bytes.
    let status =
        unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
    status_ok(status)
}

/// Lets the paused request continue. A request that ended meanwhile needs nothing more.
pub fn resume_request() {
    const HTTP_REQUEST: u32 = 0;
    // SAFETY: no pointers.
    let _ = unsafe { proxy_continue_stream(HTTP_REQUEST) };
}

/// Answers the request locally. Refused when the request already has a local reply or is gone;
/// either way there is nothing more to send.
pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    let headers = serialize(&pairs);
    let body = body.unwrap_or_default();
    const NO_GRPC_STATUS: i32 = -1;
    // SAFETY: every pointer is valid for its size for the call; the host copies the bytes.
    let _ = unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            NO_GRPC_STATUS,
        )
    };
}

pub fn set_effective_context(context_id: u32) -> Result<(), HostError> {
    // SAFETY: no pointers.
    status_ok(unsafe { proxy_set_effective_context(context_id) })
}

/// A shared-data value and its CAS; `(None, 0)` if the key was never written or the host
/// refuses.
pub fn shared_data(key: &str) -> (Option<Vec<u8>>, u32) {
    let (mut data, mut size, mut cas) = (std::ptr::null_mut::<u8>(), 0usize, 0u32);
    // SAFETY: `key` is valid for its length for the call; out-pointers as in `buffer`.
    unsafe {
        match proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) {
            OK => (Some(take_host_bytes(data, size)), cas),
            // NotFound (never written) or a refusal: nothing to read, nothing to CAS against.
            _ => (None, 0),
        }
    }
}

/// What became of a shared-data write that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWriteError {
    /// The key was written since the read whose CAS was given.
    CasMismatch,
    /// The host refused for another reason.
    Refused,
}

pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), SharedWriteError> {
    // SAFETY: both pointers are valid for their sizes for the call; the host copies the bytes.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    match status {
        OK => Ok(()),
        CAS_MISMATCH => Err(SharedWriteError::CasMismatch),
        _ => Err(SharedWriteError::Refused),
    }
}

pub fn define_metric(metric_type: u32, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: `name` is valid for its length for the call; the host writes the id through a
    // valid out-pointer.
    let status = unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, by: u64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX)) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_record_metric(id, value) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Natively every import refuses (InternalFailure): each call must turn that into its
    /// documented answer, where the SDK's calls would panic.
    #[test]
    fn every_refusal_is_an_answer_not_a_panic() {
        assert_eq!(now_nanos(), None);
        assert!(info_is_logged());
        assert_eq!(buffer(HTTP_REQUEST_BODY, 16), None);
        assert!(request_headers().is_none());
        assert!(callout_response_headers().is_none());
        assert_eq!(response_header(":status"), None);
        assert_eq!(
            set_request_header("authorization", Some("x")),
            Err(HostError)
        );
        assert_eq!(set_request_header("authorization", None), Err(HostError));
        assert_eq!(set_property("p", "v"), Err(HostError));
        assert_eq!(set_effective_context(3), Err(HostError));
        assert_eq!(set_tick_period(Duration::from_millis(500)), Err(HostError));
        assert_eq!(shared_data("k"), (None, 0));
        assert_eq!(
            set_shared_data("k", b"v", 0),
            Err(SharedWriteError::Refused)
        );
        assert_eq!(define_metric(0, "m"), None);
        send_local_response(500, &[("a", "b")], Some(b"x"));
        resume_request();
        increment_metric(1, u64::MAX);
        record_metric(1, 1);
        log_info("x");
    }
}
