//! A host for native tests of the request flow: it records every effect the gateway has on
//! requests (headers written, local replies, resumes), holds the callouts it dispatched until a
//! test answers them, and keeps a clock the test moves. Several gateways (Envoy workers) can share
//! one fake host's shared data, as workers share proxy-wasm shared data.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::MetricType;

use crate::cache::{CasMismatch, MemoryStore, SharedStore};
use crate::header_map::{serialize, SerializedHeaders};
use crate::host::{Host, HostError};

/// What happened to one request, as Envoy would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Paused, nothing decided yet.
    Waiting,
    /// Answered locally with this status.
    Replied(u32),
    /// Released upstream (from its own callback or resumed from another).
    Forwarded,
    /// The client went away.
    Gone,
}

/// One request the test sent.
#[derive(Debug, Clone)]
pub struct FakeRequest {
    /// Request headers, in order, as the upstream would receive them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub fate: Fate,
    /// Envoy deleted its context.
    pub ended: bool,
    /// How many times it was answered or released. More than one is a bug, except a body
    /// refused after the headers were released (then `reply_status` tells).
    pub decisions: u32,
    /// The status of the local reply, if it got one.
    pub reply_status: Option<u32>,
    /// The upstream's `:status`, once it answered.
    pub upstream_status: Option<String>,
    pub reply_headers: Vec<(String, String)>,
    pub reply_body: Vec<u8>,
    /// The audit records handed to the host for this request, in order (Envoy keeps the last).
    pub audit: Vec<String>,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn reply_header(&self, name: &str) -> Option<&str> {
        self.reply_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The root context's id in the fake host (requests use other ids).
pub const ROOT: u32 = 0;

/// A callout the gateway dispatched.
#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    /// The context whose callback dispatched it (`ROOT` or a request): the SDK delivers the
    /// answer to that context, and drops it if the context is gone.
    pub sdk_owner: u32,
    /// The effective context when it was dispatched: Envoy ties the callout to it and cancels
    /// it when that context ends.
    pub envoy_owner: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Callout {
    pub fn path(&self) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == ":path")
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A callout's answer as the host hands it over: headers (`:status` first) and body.
#[derive(Default)]
struct CalloutAnswer {
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Shared by sibling hosts: every worker sees the same time.
    now_ms: Rc<Cell<u64>>,
    store: Rc<MemoryStore>,
    /// The effective context (`ROOT` or a request).
    current: Cell<Option<u32>>,
    /// The context whose callback is running (`ROOT` or a request).
    callback: Cell<u32>,
    requests: RefCell<BTreeMap<u32, FakeRequest>>,
    dispatched: RefCell<Vec<Callout>>,
    next_token: Cell<u32>,
    /// The callout answer being delivered.
    answer: RefCell<CalloutAnswer>,
    tick_period: Cell<Duration>,
    metric_names: RefCell<Vec<String>>,
    counters: RefCell<HashMap<String, u64>>,
    refuse_dispatch: Cell<bool>,
    /// What the gateway wrote to Envoy's log at `info`, in order.
    logged: RefCell<Vec<String>>,
    /// Envoy's log level is above `info` (what `log_info` writes is dropped).
    info_dropped: Cell<bool>,
}

/// Cheap to clone: clones share one state (the test keeps one, the gateway another).
#[derive(Clone, Default)]
pub struct FakeHost(Rc<State>);

impl FakeHost {
    pub fn at(now_ms: u64) -> Self {
        let host = Self::default();
        host.0.now_ms.set(now_ms);
        host.0.next_token.set(1000);
        host
    }

    /// Another worker's host: its own requests and callouts, the same clock and the same
    /// shared data.
    pub fn sibling(&self) -> Self {
        let host = FakeHost(Rc::new(State {
            now_ms: Rc::clone(&self.0.now_ms),
            store: Rc::clone(&self.0.store),
            ..State::default()
        }));
        host.0.next_token.set(self.0.next_token.get() + 100_000);
        host
    }

    pub fn now(&self) -> u64 {
        self.0.now_ms.get()
    }

    pub fn advance(&self, ms: u64) {
        self.0.now_ms.set(self.0.now_ms.get() + ms);
    }

    /// A new request with these headers; it becomes the effective context.
    pub fn arrive(&self, id: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.0.callback.set(id);
        self.0.requests.borrow_mut().insert(
            id,
            FakeRequest {
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                body: body.to_vec(),
                fate: Fate::Waiting,
                ended: false,
                decisions: 0,
                reply_status: None,
                upstream_status: None,
                reply_headers: Vec::new(),
                reply_body: Vec::new(),
                audit: Vec::new(),
            },
        );
        self.0.current.set(Some(id));
    }

    /// The request's own callback runs (headers, body, a callout answer it owns): it is the
    /// effective context.
    pub fn enter(&self, id: u32) {
        self.0.current.set(Some(id));
        self.0.callback.set(id);
    }

    /// A root context callback runs (tick, a callout answer it owns).
    pub fn enter_root(&self) {
        self.enter(ROOT);
    }

    /// Envoy deleted the request's context.
    pub fn end(&self, id: u32) {
        if let Some(r) = self.0.requests.borrow_mut().get_mut(&id) {
            r.ended = true;
        }
    }

    fn is_live(&self, id: u32) -> bool {
        id == ROOT
            || self
                .0
                .requests
                .borrow()
                .get(&id)
                .is_some_and(|r| r.fate != Fate::Gone && !r.ended)
    }

    /// Whether Envoy still delivers this callout's answer, and the SDK hands it to a context:
    /// both the context it was dispatched from and the one it was tied to must still exist.
    pub fn deliverable(&self, callout: &Callout) -> bool {
        self.is_live(callout.sdk_owner) && self.is_live(callout.envoy_owner)
    }

    /// The request body Envoy has buffered for `id`.
    pub fn set_body(&self, id: u32, body: &[u8]) {
        if let Some(r) = self.0.requests.borrow_mut().get_mut(&id) {
            r.body = body.to_vec();
        }
    }

    /// The upstream answers the request with this status (read in its response callback).
    pub fn upstream_answers(&self, id: u32, status: &str) {
        if let Some(r) = self.0.requests.borrow_mut().get_mut(&id) {
            r.upstream_status = Some(status.to_string());
        }
        self.enter(id);
    }

    /// The client went away: the host forgets the request.
    pub fn abandon(&self, id: u32) {
        if let Some(r) = self.0.requests.borrow_mut().get_mut(&id) {
            r.fate = Fate::Gone;
        }
    }

    /// The request released from its own callback (`Action::Continue`).
    pub fn continued(&self, id: u32) {
        self.decide(id, Fate::Forwarded);
    }

    pub fn request(&self, id: u32) -> FakeRequest {
        self.0
            .requests
            .borrow()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("no request {id}"))
    }

    pub fn fate(&self, id: u32) -> Fate {
        self.request(id).fate
    }

    /// Every callout dispatched so far, oldest first.
    pub fn callouts(&self) -> Vec<Callout> {
        self.0.dispatched.borrow().clone()
    }

    /// Sets the answer `on_http_call_response` will read.
    pub fn answer_with(&self, status: Option<u16>, headers: &[(&str, &str)], body: &[u8]) {
        let mut h: Vec<(String, Vec<u8>)> = status
            .map(|s| vec![(":status".to_string(), s.to_string().into_bytes())])
            .unwrap_or_default();
        h.extend(
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        *self.0.answer.borrow_mut() = CalloutAnswer {
            headers: h,
            body: body.to_vec(),
        };
    }

    /// Makes every later dispatch fail, as for an unknown cluster.
    /// Everything written to Envoy's log at `info`, one entry per log call.
    pub fn logged(&self) -> Vec<String> {
        self.0.logged.borrow().clone()
    }

    /// Envoy's log level is set above `info` (`true`) or back.
    pub fn drop_info_logs(&self, dropped: bool) {
        self.0.info_dropped.set(dropped);
    }

    pub fn refuse_dispatch(&self, refuse: bool) {
        self.0.refuse_dispatch.set(refuse);
    }

    pub fn tick_period(&self) -> Duration {
        self.0.tick_period.get()
    }

    /// The counter's total handed to the host so far (counters flush on the tick).
    pub fn counter(&self, name: &str) -> u64 {
        self.0
            .counters
            .borrow()
            .get(&format!("{}.{name}", crate::metrics::PREFIX))
            .copied()
            .unwrap_or(0)
    }

    fn decide(&self, id: u32, fate: Fate) {
        if let Some(r) = self.0.requests.borrow_mut().get_mut(&id) {
            r.decisions += 1;
            if r.fate == Fate::Waiting {
                r.fate = fate;
            }
        }
    }

    fn with_current<R>(&self, f: impl FnOnce(&mut FakeRequest) -> R) -> Option<R> {
        let id = self.0.current.get()?;
        let mut requests = self.0.requests.borrow_mut();
        let r = requests.get_mut(&id)?;
        (r.fate != Fate::Gone).then(|| f(r))
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        self.0.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        self.0.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.now()
    }

    fn request_headers(&self) -> Option<SerializedHeaders> {
        self.with_current(|r| {
            let pairs: Vec<(&str, &[u8])> = r
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            SerializedHeaders::new(serialize(&pairs))
        })
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        self.with_current(|r| {
            r.headers.retain(|(n, _)| n != name);
            if let Some(v) = value {
                r.headers.push((name.to_string(), v.to_string()));
            }
        })
        .ok_or(HostError)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.with_current(|r| r.body.iter().copied().take(size).collect())
    }

    fn log_info(&self, text: &str) {
        if !self.0.info_dropped.get() {
            self.0.logged.borrow_mut().push(text.to_string());
        }
    }

    fn info_is_logged(&self) -> bool {
        !self.0.info_dropped.get()
    }

    fn set_audit_record(&self, record: &str) -> Result<(), HostError> {
        self.with_current(|r| r.audit.push(record.to_string()))
            .ok_or(HostError)
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        let id = self.with_current(|r| {
            r.reply_headers = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            r.reply_body = body.unwrap_or_default().to_vec();
            r.reply_status = Some(status);
        });
        if id.is_some() {
            if let Some(current) = self.0.current.get() {
                self.decide(current, Fate::Replied(status));
            }
        }
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        if context_id == ROOT || !self.is_live(context_id) {
            return Err(HostError);
        }
        self.0.current.set(Some(context_id));
        Ok(())
    }

    fn act_as_root(&self) -> Result<(), HostError> {
        self.0.current.set(Some(ROOT));
        Ok(())
    }

    fn resume_request(&self) {
        if let Some(id) = self.0.current.get() {
            self.decide(id, Fate::Forwarded);
        }
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        _timeout: Duration,
    ) -> Result<u32, HostError> {
        if self.0.refuse_dispatch.get() {
            return Err(HostError);
        }
        let token = self.0.next_token.get();
        self.0.next_token.set(token + 1);
        self.0.dispatched.borrow_mut().push(Callout {
            token,
            sdk_owner: self.0.callback.get(),
            envoy_owner: self.0.current.get().unwrap_or(ROOT),
            cluster: cluster.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.unwrap_or_default().to_vec(),
        });
        Ok(token)
    }

    fn callout_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.0.answer.borrow().headers.clone()
    }

    fn callout_body(&self, size: usize) -> Option<Vec<u8>> {
        Some(
            self.0
                .answer
                .borrow()
                .body
                .iter()
                .copied()
                .take(size)
                .collect(),
        )
    }

    fn upstream_status(&self) -> Option<Vec<u8>> {
        self.with_current(|r| r.upstream_status.clone().map(String::into_bytes))
            .flatten()
    }

    fn set_tick_period(&self, period: Duration) {
        self.0.tick_period.set(period);
    }

    fn define_metric(&self, _kind: MetricType, name: &str) -> Option<u32> {
        let mut names = self.0.metric_names.borrow_mut();
        names.push(name.to_string());
        Some(names.len() as u32 - 1)
    }

    fn increment_metric(&self, id: u32, by: u64) {
        if let Some(name) = self.0.metric_names.borrow().get(id as usize) {
            *self
                .0
                .counters
                .borrow_mut()
                .entry(name.clone())
                .or_default() += by;
        }
    }

    fn record_metric(&self, _id: u32, _value: u64) {}
}
