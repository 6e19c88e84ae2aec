//! One record per request the gateway keeps, with the one state it is in. A request forwarded on
//! the cached path gets no record here: its context keeps the little it needs (see `http.rs`).

use std::collections::HashMap;
use std::rc::Rc;

use crate::audit::CacheUse;
use crate::cache::Digest32;
use crate::config::ExchangeTarget;
use crate::mcp::{BodyError, Call};
use crate::verify::Principal;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// The request has no (more) body.
    Complete,
    /// Body data is still arriving (and being buffered while the request is undecided).
    Arriving,
}

/// Where a request is in the flow.
#[derive(Clone, PartialEq, Eq)]
pub enum RequestState {
    /// Being decided: verifying, choosing the target, looking up or starting an exchange.
    Authenticating,
    /// Parked until the issuer's keys arrive (the key manager holds the wait and its limit).
    WaitingForKeys,
    /// Parked until the introspection of its opaque token answers.
    Introspecting,
    /// Waiting for a backend token: this worker's exchange, or another worker's lease.
    Exchanging,
    /// The headers went upstream with the backend token; the body must still pass the route's
    /// tool policy before it follows them.
    CheckingBody {
        backend_fingerprint: Option<Rc<str>>,
    },
    /// Forwarded with the backend token cached under `exchange_key`; kept until the upstream's
    /// status says whether it accepted that token.
    Forwarded,
}

impl RequestState {
    /// Not yet answered nor forwarded: the only states a callout or tick may finish.
    pub fn is_undecided(&self) -> bool {
        matches!(
            self,
            Self::Authenticating | Self::WaitingForKeys | Self::Introspecting | Self::Exchanging
        )
    }
}

/// A request on the full path.
pub struct Request {
    pub state: RequestState,
    pub started_ms: u64,
    pub route: usize,
    pub token: String,
    /// SHA-256 of `token`: keys the exchange cache and labels the token in logs. `None` until
    /// needed: validate-only requests without caching or audit never hash the token.
    pub digest: Option<Digest32>,
    pub principal: Option<Rc<Principal>>,
    pub body: Body,
    /// The call named by the MCP 2026-07-28 `Mcp-Method`/`Mcp-Name` headers (decoded), on routes
    /// with per-tool policy. It decides the exchange target up front; the body must agree with
    /// it. An error: the headers are unreadable, refused once the token is verified.
    pub header_call: Result<Option<Call>, BodyError>,
    /// Every scope this request needs (route and tools): the challenge's `scope`.
    pub required_scopes: Vec<String>,
    pub tool_label: Option<String>,
    pub target: Option<Rc<ExchangeTarget>>,
    pub cache: CacheUse,
    /// Exchange key of the backend token sent upstream, for invalidation on an upstream 401.
    pub exchange_key: Option<Digest32>,
}

impl Request {
    /// Whether the upstream's status must be looked at: it may reject the backend token.
    pub fn watches_response(&self) -> bool {
        self.exchange_key.is_some()
            && matches!(
                self.state,
                RequestState::Forwarded | RequestState::CheckingBody { .. }
            )
    }
}

/// Maps keyed by the ids Envoy gives contexts and callouts. Those are host-assigned counters,
/// not client input, so a multiplicative hash is safe and spares the hot path SipHash's cost
/// (several lookups per request).
pub type ContextMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<ContextIdHasher>>;

#[derive(Default)]
pub struct ContextIdHasher(u64);

impl std::hash::Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing: spreads consecutive ids over the high bits hashbrown uses.
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
