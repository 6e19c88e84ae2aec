//! One HTTP request's context: hands the request to the [`Gateway`](crate::gateway::Gateway) and
//! watches the upstream's answer, so an exchanged token the upstream rejects is not served from
//! the cache again.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::gateway::{with_gateway, SharedGateway};

pub struct RequestContext {
    context_id: u32,
    gateway: Option<SharedGateway>,
}

impl RequestContext {
    pub fn new(context_id: u32, gateway: Option<SharedGateway>) -> Self {
        Self {
            context_id,
            gateway,
        }
    }
}

/// Fail closed: without configuration or with state we cannot borrow, answer 500.
fn refuse() -> Action {
    let _ = hostcalls::send_http_response(
        500,
        vec![
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        Some(br#"{"error":"server_error","error_description":"the gateway is not ready"}"#),
    );
    Action::Pause
}

impl Context for RequestContext {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        with_gateway(&self.gateway, |gw| {
            gw.on_http_call_response(token_id, body_size)
        });
    }
}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let id = self.context_id;
        with_gateway(&self.gateway, |gw| gw.on_request_headers(id, end_of_stream))
            .unwrap_or_else(refuse)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let id = self.context_id;
        with_gateway(&self.gateway, |gw| {
            gw.on_request_body(id, body_size, end_of_stream)
        })
        .unwrap_or_else(refuse)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let id = self.context_id;
        if with_gateway(&self.gateway, |gw| gw.watches_response(id)) != Some(true) {
            return Action::Continue;
        }
        let status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten();
        with_gateway(&self.gateway, |gw| {
            gw.on_upstream_status(id, status.as_deref())
        });
        Action::Continue
    }

    fn on_log(&mut self) {
        let id = self.context_id;
        with_gateway(&self.gateway, |gw| gw.forget(id));
    }
}
