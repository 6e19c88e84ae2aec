//! The no-op Wasm filter `make bench` measures as the floor: every request crosses the Wasm ABI
//! once, reads one request header (`authorization`, like the real filter) and continues. No
//! logging, no allocation beyond the header copy the host call makes.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopRequest))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopRequest;

impl Context for NoopRequest {}

impl HttpContext for NoopRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Read (and drop) one header: the host call every real auth filter makes at least once.
        let _authorization = self.get_http_request_header("authorization");
        Action::Continue
    }
}
