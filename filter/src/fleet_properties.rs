//! Random interleavings across a fleet: three Envoys (own shared data each) and one etcd, with
//! requests for a few tokens, etcd and IdP answers in any order, etcd going down and coming back,
//! ticks, clients leaving and upstream 401s. The invariants are the flow's (see
//! `flow_properties`), with the store in the loop:
//!
//! 1. nothing is forwarded except with a backend token the IdP issued for *that* client token,
//!    whichever Envoy exchanged it (a value from etcd is never another token's);
//! 2. every request is decided at most once, and every request whose client stayed is decided
//!    once the IdP and etcd have answered and time has passed, whatever state etcd was in;
//! 3. once every request has ended and every call is answered, no Envoy keeps a request, an
//!    exchange or a waiter.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use crate::fake_host::{Callout, FakeHost, Fate};
use crate::fleet_flow_tests::{fleet_config, FakeEtcd};
use crate::flow_properties::subject_of;
use crate::flow_tests::{exchanged, idp_error, token_at, Worker, T0_MS};

const ENVOYS: usize = 3;
const TOKENS: usize = 3;

#[derive(Debug, Clone)]
enum Event {
    Send {
        e: usize,
        t: usize,
    },
    /// Envoy `e`'s oldest unanswered etcd call is answered (or lost, with etcd down).
    Etcd {
        e: usize,
    },
    /// Envoy `e`'s oldest unanswered exchange is answered: issued, or refused.
    Idp {
        e: usize,
        issue: bool,
    },
    Tick {
        e: usize,
        ms: u64,
    },
    Abandon {
        e: usize,
        n: usize,
    },
    Upstream401 {
        e: usize,
        n: usize,
    },
    EtcdDown(bool),
}

fn event() -> impl Strategy<Value = Event> {
    let e = 0..ENVOYS;
    prop_oneof![
        4 => (e.clone(), 0..TOKENS).prop_map(|(e, t)| Event::Send { e, t }),
        5 => e.clone().prop_map(|e| Event::Etcd { e }),
        3 => (e.clone(), prop::bool::weighted(0.85)).prop_map(|(e, issue)| Event::Idp { e, issue }),
        3 => (e.clone(), prop_oneof![Just(20u64), Just(500), Just(3_000)])
            .prop_map(|(e, ms)| Event::Tick { e, ms }),
        1 => (e.clone(), 0..4usize).prop_map(|(e, n)| Event::Abandon { e, n }),
        1 => (e, 0..4usize).prop_map(|(e, n)| Event::Upstream401 { e, n }),
        1 => prop::bool::ANY.prop_map(Event::EtcdDown),
    ]
}

struct Run {
    envoys: Vec<Worker>,
    etcd: FakeEtcd,
    tokens: Vec<String>,
    sent: Vec<HashMap<u32, usize>>,
    done: Vec<HashSet<u32>>,
    /// Backend token → the client token it was issued for.
    issued: HashMap<String, String>,
    next_id: u32,
}

impl Run {
    fn new() -> Self {
        let cfg = fleet_config("STORE_KEY", "1");
        let envoys: Vec<Worker> = (0..ENVOYS)
            .map(|_| Worker::new(FakeHost::at(T0_MS), &cfg, 1))
            .collect();
        Self {
            envoys,
            etcd: FakeEtcd::default(),
            tokens: ["ann", "ben", "cid"]
                .iter()
                .map(|u| token_at(T0_MS, u, "k1"))
                .collect(),
            sent: vec![HashMap::new(); ENVOYS],
            done: vec![HashSet::new(); ENVOYS],
            issued: HashMap::new(),
            next_id: 1,
        }
    }

    fn oldest(&self, e: usize, cluster: &str) -> Option<Callout> {
        self.envoys[e]
            .host
            .callouts()
            .into_iter()
            .find(|c| c.cluster == cluster && !self.done[e].contains(&c.token))
    }

    fn ids_where(&self, e: usize, f: impl Fn(Fate) -> bool) -> Vec<u32> {
        let mut ids: Vec<u32> = self.sent[e]
            .keys()
            .copied()
            .filter(|id| f(self.envoys[e].host.fate(*id)))
            .collect();
        ids.sort_unstable();
        ids
    }

    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Send { e, t } => {
                let id = self.next_id;
                self.next_id += 1;
                self.sent[e].insert(id, t);
                let token = self.tokens[t].clone();
                self.envoys[e].send(id, &token);
            }
            Event::Etcd { e } => {
                let Some(call) = self.oldest(e, "etcd") else {
                    return;
                };
                self.done[e].insert(call.token);
                let now = self.envoys[e].host.now();
                let (status, body) = self.etcd.answer(call.path(), &call.body, now);
                self.envoys[e].answer(&call, status, &body);
            }
            Event::Idp { e, issue } => {
                let Some(call) = self.oldest(e, "okta") else {
                    return;
                };
                self.done[e].insert(call.token);
                if issue {
                    let backend = format!("backend-{e}-{}", call.token);
                    self.issued.insert(backend.clone(), subject_of(&call));
                    self.envoys[e].answer(&call, Some(200), &exchanged(&backend));
                } else {
                    self.envoys[e].answer(&call, Some(400), &idp_error("invalid_grant"));
                }
            }
            Event::Tick { e, ms } => {
                // One clock for the fleet: every Envoy's moves, only `e` ticks.
                for (i, w) in self.envoys.iter_mut().enumerate() {
                    if i == e {
                        w.tick(ms);
                    } else {
                        w.host.advance(ms);
                    }
                }
            }
            Event::Abandon { e, n } => {
                let live = self.ids_where(e, |f| f == Fate::Waiting);
                if let Some(id) = live.get(n % live.len().max(1)) {
                    self.envoys[e].abandon(*id);
                }
            }
            Event::Upstream401 { e, n } => {
                let forwarded = self.ids_where(e, |f| f == Fate::Forwarded);
                if let Some(id) = forwarded.get(n % forwarded.len().max(1)) {
                    self.envoys[e].upstream_answers(*id, "401");
                }
            }
            Event::EtcdDown(down) => self.etcd.down = down,
        }
    }

    /// etcd comes back; every call is answered, time passes, again until nothing is left.
    fn drain(&mut self) {
        self.etcd.down = false;
        for _ in 0..60 {
            for e in 0..ENVOYS {
                while self.oldest(e, "etcd").is_some() {
                    self.apply(&Event::Etcd { e });
                }
                while self.oldest(e, "okta").is_some() {
                    self.apply(&Event::Idp { e, issue: true });
                }
            }
            self.apply(&Event::Tick { e: 0, ms: 250 });
            self.apply(&Event::Tick { e: 1, ms: 0 });
            self.apply(&Event::Tick { e: 2, ms: 0 });
        }
    }

    fn end_all(&mut self) {
        for e in 0..ENVOYS {
            let ids: Vec<u32> = self.sent[e].keys().copied().collect();
            for id in ids {
                self.envoys[e].end(id);
            }
        }
        self.drain();
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (e, sent) in self.sent.iter().enumerate() {
            for (id, t) in sent {
                let r = self.envoys[e].host.request(*id);
                prop_assert!(r.decisions <= 1, "envoy {e} request {id} decided twice");
                prop_assert!(
                    r.fate != Fate::Waiting,
                    "envoy {e} request {id} never answered"
                );
                if r.fate != Fate::Forwarded {
                    continue;
                }
                let backend = r
                    .header("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .unwrap_or_default();
                prop_assert_eq!(
                    self.issued.get(backend),
                    Some(&self.tokens[*t]),
                    "envoy {} request {} forwarded with {:?}",
                    e,
                    id,
                    backend
                );
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_interleavings_across_a_fleet_keep_the_invariants(
        events in prop::collection::vec(event(), 1..60)
    ) {
        let mut run = Run::new();
        for ev in &events {
            run.apply(ev);
        }
        run.drain();
        run.check()?;
        run.end_all();
        for (e, w) in run.envoys.iter().enumerate() {
            prop_assert!(w.gw.is_idle(), "envoy {} keeps state after everything ended", e);
        }
    }
}
