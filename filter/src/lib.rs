//! An Envoy proxy-wasm filter that puts an OAuth resource server in front of MCP servers: it
//! validates the client's JWT, exchanges it (RFC 8693) for a backend token of the same user, and
//! forwards the request with only the backend token.
//!
//! Protocol logic lives in host-independent modules that unit-test natively; `gateway`, `root`
//! and `http` wire it to proxy-wasm.

pub mod audit;
pub mod cache;
mod claims;
pub mod client_key;
mod clock;
pub mod config;
pub mod exchange;
pub mod header_map;
pub mod introspection;
pub mod jwks;
pub mod mcp;
pub mod policy;
pub mod reply;
pub mod request_path;
pub mod rsa_public;
pub mod token;
pub mod verified_tokens;
pub mod verify;

mod exchange_coordinator;
mod fleet;
mod gateway;
mod host;
mod host_abi;
mod http;
mod key_manager;
mod metrics;
mod request;
mod root;

#[cfg(test)]
mod audit_flow_tests;
#[cfg(test)]
mod exchange_profile_tests;
#[cfg(test)]
mod fake_host;
#[cfg(test)]
mod fleet_flow_tests;
#[cfg(test)]
mod fleet_properties;
#[cfg(test)]
mod flow_properties;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod provider_flow_tests;
#[cfg(test)]
mod test_keys;

proxy_wasm::main! {{
    host_abi::HostLogger::install();
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new(context_id))
    });
}}
