//! One HTTP request's context: hands the request to the [`Gateway`] and watches the upstream's
//! answer, so an exchanged token the upstream rejects is not served from the cache again.

use std::cell::RefCell;
use std::rc::Rc;

use log::error;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::gateway::Gateway;

pub struct RequestContext {
    context_id: u32,
    gateway: Option<Rc<RefCell<Gateway>>>,
}

impl RequestContext {
    pub fn new(context_id: u32, gateway: Option<Rc<RefCell<Gateway>>>) -> Self {
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
        if let Some(gw) = &self.gateway {
            match gw.try_borrow_mut() {
                Ok(mut gw) => gw.on_http_call_response(token_id, body_size),
                Err(_) => error!("gateway state busy in callout response; dropped"),
            }
        }
    }
}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(gw) = &self.gateway else {
            return refuse();
        };
        let Ok(mut gw) = gw.try_borrow_mut() else {
            return refuse();
        };
        gw.on_request_headers(self.context_id, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(gw) = &self.gateway else {
            return refuse();
        };
        let Ok(mut gw) = gw.try_borrow_mut() else {
            return refuse();
        };
        gw.on_request_body(self.context_id, body_size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten();
        if let Some(gw) = &self.gateway {
            if let Ok(mut gw) = gw.try_borrow_mut() {
                gw.on_upstream_status(self.context_id, status.as_deref());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(gw) = &self.gateway {
            if let Ok(mut gw) = gw.try_borrow_mut() {
                gw.forget(self.context_id);
            }
        }
    }
}
