//! One HTTP request's context: translates the request's proxy-wasm events into calls on the
//! [`Gateway`](crate::gateway::Gateway), and keeps what the gateway said about the request at
//! admission ([`Admitted`]) for its later callbacks.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::gateway::{with_gateway, Admission, Admitted, SharedGateway};
use crate::host_abi;

pub struct RequestContext {
    context_id: u32,
    gateway: Option<SharedGateway>,
    admitted: Admitted,
}

impl RequestContext {
    pub fn new(context_id: u32, gateway: Option<SharedGateway>) -> Self {
        Self {
            context_id,
            gateway,
            admitted: Admitted::Full,
        }
    }
}

/// The request is over when Envoy deletes its context (`proxy_on_delete`, which drops it): the
/// gateway forgets whatever it still keeps for it. Not `on_log`: the module does not export the
/// callbacks it has no use for (`proxy_on_log`, `proxy_on_done`, body and trailer callbacks of
/// responses, see the Makefile), which spares Envoy a call into the VM for each, per request.
impl Drop for RequestContext {
    fn drop(&mut self) {
        let (id, admitted) = (self.context_id, self.admitted);
        with_gateway(&self.gateway, |gw| gw.on_request_end(id, admitted));
    }
}

/// Fail closed: without configuration or with state we cannot borrow, answer 500.
fn refuse() -> Action {
    host_abi::send_local_response(
        500,
        &[
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
        let id = self.context_id;
        with_gateway(&self.gateway, |gw| {
            gw.on_http_call_response(Some(id), token_id, body_size)
        });
    }
}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let id = self.context_id;
        match with_gateway(&self.gateway, |gw| gw.on_request_headers(id, end_of_stream)) {
            Some(Admission::Cached { watched_key }) => {
                self.admitted = Admitted::Cached { watched_key };
                Action::Continue
            }
            Some(Admission::Full(action)) => action,
            None => refuse(),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (id, admitted) = (self.context_id, self.admitted);
        with_gateway(&self.gateway, |gw| {
            gw.on_request_body(id, admitted, body_size, end_of_stream)
        })
        .unwrap_or_else(refuse)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (id, admitted) = (self.context_id, self.admitted);
        with_gateway(&self.gateway, |gw| gw.on_response_headers(id, admitted));
        Action::Continue
    }
}
