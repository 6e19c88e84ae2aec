//! Per-VM state shared by the root context and every HTTP context of one Envoy worker, and the
//! request flow that uses it:
//!
//! route → (metadata | public | authenticate) → verify → audience/scopes → tools (maybe from the
//! body) → exchange (or cache) → rewrite `Authorization` and identity headers → forward.
//!
//! Work that completes asynchronously (a key set arriving, an exchange answering, another worker
//! finishing an exchange) may finish a request other than the one whose callback is running: many
//! requests wait on one JWKS fetch, and concurrent requests with the same token wait on one
//! exchange. Those requests are acted on through `set_effective_context`, so the flow lives here
//! rather than in any one context.
//!
//! The gateway routes events to the units that own each piece of state, and applies what they
//! decide through its [`Host`]:
//! - `requests`: one [`Request`] record per request on the full path, with its state;
//! - `keys`: the issuer's [`KeyManager`] (key set, refresh, refetch throttle, requests waiting);
//! - `exchanges`: the [`ExchangeCoordinator`] (store, leases, exchanges in flight, waiters);
//! - `callouts`: what each callout in flight is for.
//!
//! Its methods are spread by concern: `admission.rs` (a request's headers arrive, the cached
//! path), `decide.rs` (verify → target → exchange), `events.rs` (callout answers, ticks, the
//! body, the upstream's status), `effects.rs` (forward, refuse, audit: every effect on a request).

mod admission;
mod decide;
mod effects;
mod events;
mod fleet;
mod introspect;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::Action;

use crate::audit::AuditBatch;
use crate::cache::{Digest32, ExchangeStore};
use crate::clock::CoarseClock;
use crate::config::Policy;
use crate::exchange_coordinator::ExchangeCoordinator;
use crate::fleet::{FleetCall, FleetStore};
use crate::host::{Host, ProxyWasmHost};
use crate::key_manager::KeyManager;
use crate::metrics::{CounterId, Metrics};
use crate::request::{ContextMap, Request};
use crate::verified_tokens::VerifiedTokens;

/// Normal tick period: bounds how late a JWKS retry, a wait limit or a cache sweep is noticed.
pub const TICK: Duration = Duration::from_millis(500);
/// Tick period while requests wait on another worker's exchange: they poll the shared store, and
/// each poll period is latency those requests pay.
const FAST_TICK: Duration = Duration::from_millis(20);
/// Expired exchange-store slots blanked per tick: bounded work per tick, the whole store
/// swept within minutes at the default size.
const SWEEP_SLOTS_PER_TICK: u64 = 64;
/// How often verified tokens past their `exp` are dropped from the per-worker cache: they are
/// refused on lookup anyway, this only returns their memory.
const VERIFIED_SWEEP_INTERVAL_MS: u64 = 10_000;

fn secs(ms: u64) -> i64 {
    (ms / 1000) as i64
}

/// What a callout in flight is for.
#[derive(Clone)]
enum CalloutPurpose {
    /// The key set of this provider (its index).
    Jwks(u8),
    /// The exchange for this key (its state lives in the coordinator).
    Exchange(Digest32),
    /// A call to the fleet store (a phase of an exchange, or the store's own).
    Fleet(FleetCall),
    /// The introspection of the opaque token with this digest.
    Introspect(Digest32),
}

/// The per-VM gateway, shared by the root context and the HTTP contexts.
pub type SharedGateway = Rc<RefCell<Gateway>>;

/// How the gateway took a request's headers.
pub enum Admission {
    /// Forwarded on the cached path: the gateway keeps nothing for this request. When the
    /// upstream's answer is to be read (a backend token due a status check, see
    /// [`STATUS_CHECK_INTERVAL_MS`](crate::verified_tokens::STATUS_CHECK_INTERVAL_MS)), the key that
    /// token is cached under.
    Cached { watched_key: Option<Digest32> },
    /// Any other outcome; the gateway may keep state for the request until `forget`.
    Full(Action),
}

/// What a request's own context keeps between its callbacks: whether the gateway may hold a
/// record for it, or (the cached path) the one thing its response needs. The cached path keeps
/// this in the context rather than a record in the gateway's map: no map operation per request.
#[derive(Clone, Copy)]
pub enum Admitted {
    /// The gateway may hold a record for the request (by context id).
    Full,
    /// Forwarded on the cached path; the key of a backend token whose upstream answer is read.
    Cached { watched_key: Option<Digest32> },
}

/// Runs `f` on the gateway. `None` when there is none (not configured) or it is borrowed: that
/// cannot happen with Envoy deferring re-entrant calls, but is logged and failed closed, never a
/// panic.
pub fn with_gateway<R>(
    gateway: &Option<SharedGateway>,
    f: impl FnOnce(&mut Gateway) -> R,
) -> Option<R> {
    let gw = gateway.as_ref()?;
    match gw.try_borrow_mut() {
        Ok(mut gw) => Some(f(&mut gw)),
        Err(_) => {
            log::error!("gateway state busy; failing closed");
            None
        }
    }
}

/// The flow, over any [`Host`]: [`ProxyWasmHost`] in Envoy, a fake host in unit tests.
pub struct Gateway<H: Host = ProxyWasmHost> {
    host: H,
    pub policy: Rc<Policy>,
    worker_id: u32,
    requests: ContextMap<Request>,
    /// One per provider, in `policy.providers`' order.
    keys: Vec<KeyManager>,
    exchanges: ExchangeCoordinator,
    /// The fleet store (etcd), when configured.
    fleet: Option<FleetStore>,
    introspections: introspect::Introspections,
    callouts: ContextMap<CalloutPurpose>,
    verified: VerifiedTokens,
    metrics: Metrics,
    /// Counters the hot path bumps on every request, looked up once.
    allowed_counter: CounterId,
    cache_hit_counter: CounterId,
    /// The request whose own callback is running (headers), if any: only its own exchange may
    /// be dispatched in it (see `lead_exchange`).
    own_request: Option<u32>,
    nonce_seed: u64,
    nonce_counter: u64,
    fast_tick: bool,
    last_sweep_ms: u64,
    /// The exchange store's generation when this worker last looked (see `on_tick`).
    store_generation: u32,
    /// Every host clock reading; the cached path checks expiry against its bound instead of
    /// reading the clock.
    clock: CoarseClock,
    /// Audit records not yet written (`audit_log` batched): written on the tick, when full, and
    /// when the gateway is dropped. A `RefCell` because records are handed over from `&self`.
    audit_batch: RefCell<AuditBatch>,
    /// Envoy's log level drops the audit records written to its log (said once, at `error`).
    audit_dropped: bool,
}

/// The VM stops (Envoy deletes the root context, at shutdown or when a new configuration
/// replaces this one) or the gateway is replaced: the records gathered so far are written, not
/// lost with it.
impl<H: Host> Drop for Gateway<H> {
    fn drop(&mut self) {
        self.flush_audit();
    }
}

impl<H: Host> Gateway<H> {
    /// `namespace` separates this configuration's shared data from any other's; `worker_id` is
    /// unique among the VMs sharing it.
    pub fn new(host: H, policy: Policy, namespace: &str, worker_id: u32) -> Self {
        let mut metrics = Metrics::default();
        let allowed_counter = metrics.counter("requests.allowed");
        let cache_hit_counter = metrics.counter("cache.hits");
        Self {
            host,
            worker_id,
            allowed_counter,
            cache_hit_counter,
            verified: VerifiedTokens::new(policy.inbound.verified_cache_max_entries),
            exchanges: ExchangeCoordinator::new(
                ExchangeStore::new(namespace, policy.exchange_cache_slots),
                worker_id,
                policy.fleet_store.as_ref().map(|f| f.timeout),
            ),
            fleet: policy.fleet_store.clone().map(FleetStore::new),
            keys: policy
                .providers
                .iter()
                .map(|p| KeyManager::new(&p.keys))
                .collect(),
            policy: Rc::new(policy),
            requests: ContextMap::default(),
            introspections: introspect::Introspections::default(),
            callouts: ContextMap::default(),
            metrics,
            // std seeds RandomState from the host's random source (WASI random_get).
            nonce_seed: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(worker_id)
            },
            own_request: None,
            nonce_counter: 0,
            fast_tick: false,
            last_sweep_ms: 0,
            store_generation: 0,
            clock: CoarseClock::default(),
            audit_batch: RefCell::default(),
            audit_dropped: false,
        }
    }

    /// Envoy ignores a CAS of 0 (a key never written), so two workers racing for a fresh lease
    /// slot could both win. Writing every lease slot once, before traffic, closes that race.
    pub fn prepare_shared_slots(&mut self) {
        let store = self.exchanges.store();
        store.prepare_leases(&self.host);
        self.store_generation = store.generation(&self.host);
    }

    /// The request is over (Envoy deleted its context): forget anything still kept for it.
    fn forget(&mut self, context_id: u32) {
        let Some(request) = self.requests.remove(&context_id) else {
            return;
        };
        if request.state.is_undecided() {
            self.metrics.inc("requests.abandoned");
            for keys in &mut self.keys {
                keys.forget(context_id);
            }
            self.exchanges.forget(context_id);
            self.introspections.forget(context_id);
        }
    }

    /// The request ended (its context is deleted).
    pub fn on_request_end(&mut self, context_id: u32, admitted: Admitted) {
        if let Admitted::Full = admitted {
            self.forget(context_id);
        }
    }

    /// Whether nothing is kept for any request, exchange or waiter (a JWKS fetch may run): what
    /// every map must come back to once all requests have ended and all callouts answered.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
            && self.keys.iter().all(KeyManager::is_idle)
            && self.exchanges.is_idle()
            && self.introspections.is_idle()
            && self.callouts.values().all(|c| {
                matches!(c, CalloutPurpose::Jwks(_))
                    || matches!(c, CalloutPurpose::Fleet(call) if call.is_background())
            })
    }

    fn set_fast_tick(&mut self, fast: bool) {
        if self.fast_tick != fast {
            self.fast_tick = fast;
            self.host
                .set_tick_period(if fast { FAST_TICK } else { TICK });
        }
    }
}
