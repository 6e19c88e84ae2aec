//! A real MCP server (the upstream behind Envoy) and a real MCP client, both on rmcp's
//! Streamable HTTP transport.
//!
//! The server checks the bearer token itself, as a resource server would: exactly one
//! `Authorization: Bearer` header, an RS256 signature against the backend authorization server's
//! JWKS, `iss`, `aud`, `exp`, and every required scope in `scp` or `scope`. A tool call that gets
//! through therefore proves that the gateway swapped the client's token for a backend token.
//! Every request is recorded before the check, with all its headers and its body.
//!
//! Tools: `whoami` (the claims of the token this request carried), `echo` (`text`), `read_data`
//! and `write_data` (no-ops reporting the token's scopes).

mod auth;
mod client;
mod server;

#[cfg(test)]
mod tests;

pub use auth::VerifiedToken;
pub use client::{call_tool, error_status, whoami, McpClientError, McpSession, WhoAmI};
pub use server::{start_upstream, DataResult, SeenRequest, TokenInfo, UpstreamHandle};

/// How the upstream validates tokens.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Issuer of the backend authorization server, e.g. `http://127.0.0.1:9400/oauth2/backend`.
    pub issuer: String,
    /// Where its keys are, e.g. `http://127.0.0.1:9400/oauth2/backend/v1/keys`.
    pub jwks_url: String,
    /// Audience the token must carry (`backend`).
    pub audience: String,
    /// Scopes the token must all carry (`backend-api:read`).
    pub required_scopes: Vec<String>,
}
