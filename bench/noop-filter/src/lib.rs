//! The no-op Wasm filter `make bench` measures as the floor: every request crosses the Wasm ABI
//! once, reads one request header (`authorization`, like the real filter) and continues. No
//! logging, no allocation beyond the header copy the host call makes.
//!
//! With a plugin configuration it makes, instead, exactly the host calls the real filter makes on
//! its cached path, and nothing else (no parsing, no caches, no policy): comma-separated words
//! `headers` (all request headers in one `proxy_get_header_map_pairs` call instead of one
//! header), `path` (also read `:path`, one header per call), `clock` (read the time), `write`
//! (replace `authorization` with a value the size of an exchanged JWT), `status` (read the upstream's
//! `:status`). `make bench` runs it with the filter's set, so the report can tell the host's share
//! of the filter's cost from the filter's own logic. Two more words price the ways of handing over
//! an audit record of the filter's size (`bench/instructions.py`): `record` (set it as the
//! request's filter state, which an access log reads), `log` (Envoy's application log, `info`) and
//! `batch` (gathered in the VM, 64 to an application log message).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot::default()) });
}}

#[derive(Default, Clone, Copy)]
struct HostCalls {
    headers: bool,
    path: bool,
    clock: bool,
    write: bool,
    status: bool,
    record: bool,
    log: bool,
    batch: bool,
}

#[derive(Default)]
struct NoopRoot {
    calls: HostCalls,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        for word in String::from_utf8_lossy(&config).split(',') {
            match word.trim() {
                "" => {}
                "headers" => self.calls.headers = true,
                "path" => self.calls.path = true,
                "clock" => self.calls.clock = true,
                "write" => self.calls.write = true,
                "status" => self.calls.status = true,
                "record" => self.calls.record = true,
                "log" => self.calls.log = true,
                "batch" => self.calls.batch = true,
                other => {
                    log::error!(
                        "noop-filter: unknown word {other:?} (headers, path, clock, write, status, record, log, batch)"
                    );
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopRequest { calls: self.calls }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopRequest {
    calls: HostCalls,
}

/// What `write` puts in `authorization`: as long as the filter's `Bearer <backend JWT>` (an
/// RS256 token of the local IdP is ~770 bytes), since the host copies the value.
const WRITTEN_VALUE: &str = concat!(
    "Bearer eyJraWQiOiJub29wIiwiYWxnIjoiUlMyNTYifQ.",
    "eyJhdWQiOiJiYWNrZW5kIiwiY2lkIjoiZ2F0ZXdheS1jbGllbnQiLCJleHAiOjE3OTU2OTQ4NTYsImlhdCI6MTc5",
    "NTY5MTI1NiwiaXNzIjoiaHR0cDovLzEyNy4wLjAuMTo5NDAwL29hdXRoMi9iYWNrZW5kIiwianRpIjoiQVQuMmMw",
    "ZDFmNWUtOGJmYy00YjQzLWE1ZTYtMmE2YjNlMTQ3YjQ1Iiwic2NwIjpbImJhY2tlbmQtYXBpOnJlYWQiXSwic3Vi",
    "IjoiYWxpY2UiLCJ2ZXIiOjEsIm5vdGUiOiJub3QgYSByZWFsIHRva2VuOiB0aGUgbm8tb3AgZmlsdGVyIHdyaXRl",
    "cyB0aGlzIHZhbHVlIHNvIGl0cyBoZWFkZXIgd3JpdGUgY29zdHMgd2hhdCB0aGUgZmlsdGVyJ3MgZG9lcyJ9.",
    "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0",
    "dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNp",
    "Z25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJlLXNpZ25hdHVy",
    "c2lnbmF0dXJlLXNpZ25hdHVyZS1z",
);

/// What `record` and `log` hand over: an audit record of the filter's shape and size (a cached
/// request's, ~380 bytes).
const AUDIT_RECORD: &str = concat!(
    r#"{"audit":"mcp_token_exchange","time_ms":1796000000000,"decision":"allow","reason":"exchanged","#,
    r#""sub":"bench-user","client_id":"mcp-client","token":"AT.2c0d1f5e-8bfc-4b43-a5e6-2a6b3e147b45","#,
    r#""route":"mcp","target_audience":"backend","target_scope":"backend-api:read","#,
    r#""exchanged_token":"sha256:1f2e3d4c5b6a7980","cache":"hit","latency_ms":0}"#,
);

/// Records per application log message with `batch`.
const BATCH_RECORDS: usize = 64;

thread_local! {
    static BATCH: std::cell::RefCell<String> =
        std::cell::RefCell::new(String::with_capacity(BATCH_RECORDS * (AUDIT_RECORD.len() + 1)));
}

impl Context for NoopRequest {}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// The serialised request headers, as the real filter reads them (see its `header_map`).
fn all_request_headers() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in the filter's host.rs: the host hands over a buffer it allocated through this
    // module's `proxy_on_memory_allocate`, or null.
    unsafe {
        if proxy_get_header_map_pairs(0, &mut data, &mut size) != 0 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

impl HttpContext for NoopRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.calls.headers {
            std::hint::black_box(all_request_headers());
        } else {
            // Read (and drop) one header: the host call every real auth filter makes at least once.
            let _authorization = self.get_http_request_header("authorization");
        }
        if self.calls.path {
            let _path = self.get_http_request_header(":path");
        }
        if self.calls.clock {
            std::hint::black_box(hostcalls::get_current_time().ok());
        }
        if self.calls.write {
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "authorization",
                Some(WRITTEN_VALUE),
            );
        }
        if self.calls.record {
            let _ = hostcalls::set_property(
                vec!["mcp_token_exchange.audit"],
                Some(AUDIT_RECORD.as_bytes()),
            );
        }
        if self.calls.log {
            let _ = hostcalls::log(LogLevel::Info, AUDIT_RECORD);
        }
        if self.calls.batch {
            BATCH.with(|batch| {
                let mut batch = batch.borrow_mut();
                batch.push('\n');
                batch.push_str(AUDIT_RECORD);
                if batch.len() >= BATCH_RECORDS * (AUDIT_RECORD.len() + 1) {
                    let _ = hostcalls::log(LogLevel::Info, &batch);
                    batch.clear();
                }
            });
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.calls.status {
            std::hint::black_box(
                hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status").ok(),
            );
        }
        Action::Continue
    }
}
