//! One HTTP request's context: hands the request to the [`Gateway`](crate::gateway::Gateway) and
//! watches the upstream's answer, so an exchanged token the upstream rejects is not served from
//! the cache again.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::cache::Digest32;
use crate::gateway::{with_gateway, Admission, SharedGateway};

pub struct RequestContext {
    context_id: u32,
    gateway: Option<SharedGateway>,
    kept: Kept,
}

/// Where this request's state lives. A request forwarded on the cached path keeps what little
/// it needs here, so its later callbacks do not look it up in the gateway's maps.
enum Kept {
    /// The gateway may hold state for this request (by context id).
    InGateway,
    /// Forwarded on the cached path; with a backend token, the key it is cached under.
    Cached { backend_key: Option<Digest32> },
}

impl RequestContext {
    pub fn new(context_id: u32, gateway: Option<SharedGateway>) -> Self {
        Self {
            context_id,
            gateway,
            kept: Kept::InGateway,
        }
    }
}

fn upstream_status() -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
        .ok()
        .flatten()
}

/// The request is over when Envoy deletes its context (`proxy_on_delete`, which drops it): the
/// gateway forgets whatever it still keeps for it. Not `on_log`: the module does not export the
/// callbacks it has no use for (`proxy_on_log`, `proxy_on_done`, body and trailer callbacks of
/// responses, see the Makefile), which spares Envoy a call into the VM for each, per request.
impl Drop for RequestContext {
    fn drop(&mut self) {
        if let Kept::InGateway = self.kept {
            let id = self.context_id;
            with_gateway(&self.gateway, |gw| gw.forget(id));
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
        match with_gateway(&self.gateway, |gw| gw.on_request_headers(id, end_of_stream)) {
            Some(Admission::Cached { backend_key }) => {
                self.kept = Kept::Cached { backend_key };
                Action::Continue
            }
            Some(Admission::Full(action)) => action,
            None => refuse(),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Kept::Cached { .. } = self.kept {
            // Cached-path routes have no per-tool policy: nothing to check in the body.
            return Action::Continue;
        }
        let id = self.context_id;
        with_gateway(&self.gateway, |gw| {
            gw.on_request_body(id, body_size, end_of_stream)
        })
        .unwrap_or_else(refuse)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let id = self.context_id;
        match self.kept {
            Kept::Cached { backend_key: None } => {}
            Kept::Cached {
                backend_key: Some(key),
            } => {
                let status = upstream_status();
                with_gateway(&self.gateway, |gw| {
                    gw.on_backend_token_status(&key, status.as_deref())
                });
            }
            Kept::InGateway => {
                if with_gateway(&self.gateway, |gw| gw.watches_response(id)) == Some(true) {
                    let status = upstream_status();
                    with_gateway(&self.gateway, |gw| {
                        gw.on_upstream_status(id, status.as_deref())
                    });
                }
            }
        }
        Action::Continue
    }
}
