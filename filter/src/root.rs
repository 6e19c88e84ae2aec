//! The root context: loads the configuration, owns the per-VM [`Gateway`], drives its tick
//! (JWKS refresh, wait bounds, cache sweeps) and creates one [`RequestContext`] per request.

use std::cell::RefCell;
use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::cache::{fingerprint, token_digest};
use crate::config::parse_policy;
use crate::gateway::{with_gateway, Gateway, SharedGateway, TICK};
use crate::host::{allocate_worker_id, HostStore, ProxyWasmHost};
use crate::host_abi;
use crate::http::RequestContext;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = match option_env!("GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

pub struct Root {
    context_id: u32,
    gateway: Option<SharedGateway>,
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            gateway: None,
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        with_gateway(&self.gateway, |gw| {
            gw.on_http_call_response(None, token_id, body_size)
        });
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        info!("mcp-token-exchange {VERSION} ({GIT_COMMIT}) starting");
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let raw = host_abi::buffer(host_abi::PLUGIN_CONFIGURATION, plugin_configuration_size)
            .unwrap_or_default();
        match parse_policy(&raw, &|name| std::env::var(name).ok()) {
            Ok(policy) => {
                let routes: Vec<String> = policy
                    .routes
                    .iter()
                    .map(|r| match (&r.target, r.public) {
                        (_, true) => format!("{} (public)", r.path_prefix),
                        (None, false) => format!("{} (validate only)", r.path_prefix),
                        (Some(t), false) => {
                            format!("{} → {:?}/{:?}", r.path_prefix, t.audience, t.scope)
                        }
                    })
                    .collect();
                let issuers: Vec<&str> =
                    policy.providers.iter().map(|p| p.issuer.as_str()).collect();
                info!(
                    "configured: issuer {}, routes: {}",
                    issuers.join(", "),
                    routes.join("; ")
                );
                // Shared data is keyed by a digest of the configuration, so VMs with another
                // configuration (or another plugin in an Istio-style empty vm_id) never mix entries.
                let namespace = fingerprint(&token_digest(&String::from_utf8_lossy(&raw)));
                let worker_id = allocate_worker_id(
                    &HostStore,
                    &format!("mcp_token_exchange/{namespace}/workers"),
                );
                let mut gateway = Gateway::new(
                    ProxyWasmHost {
                        root_context_id: self.context_id,
                    },
                    policy,
                    &namespace,
                    worker_id,
                );
                gateway.prepare_shared_slots();
                self.gateway = Some(Rc::new(RefCell::new(gateway)));
                if host_abi::set_tick_period(TICK).is_err() {
                    // Without ticks no key set is fetched and no batch of records written.
                    error!("Envoy refused the tick period: configuration refused");
                    return false;
                }
                true
            }
            Err(e) => {
                error!("{e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        with_gateway(&self.gateway, Gateway::on_tick);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RequestContext::new(
            context_id,
            self.gateway.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
