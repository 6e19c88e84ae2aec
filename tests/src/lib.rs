//! Local services and harness for the end-to-end suite.
//!
//! - [`idp`]: an Okta-compatible identity provider (two authorization servers, JWKS, RFC 8693
//!   token exchange with Okta's rules and error shapes, fault injection).
//! - [`mcp`]: a real MCP server (Streamable HTTP) that validates the exchanged token itself, and
//!   a real MCP client used by the tests and the demo.
//! - [`apollo`]: the walkthrough's upstream parts (Apollo MCP Server, a GraphQL API verifying
//!   tokens with `@okta/jwt-verifier`) as processes, and a TCP tap.
//! - [`harness`] starts them with a real Envoy; [`client`] is how the tests send requests through
//!   it and see the answers; [`fleet`] adds a real etcd and a front Envoy for several replicas.

pub mod apollo;
pub mod bootstrap;
pub mod cli;
pub mod client;
pub mod fleet;
pub mod harness;
pub mod idp;
pub mod load;
pub mod mcp;
pub mod oci;
pub mod permissive_path;
pub mod ports;
