//! Random interleavings of the request flow's events on two workers — requests with good and bad
//! tokens, IdP answers (success, refusal, outage, reset), ticks, clients leaving, upstream 401s —
//! checked against the flow's invariants:
//!
//! 1. no request is forwarded without a verified token, and then only with the backend token the
//!    IdP issued for *that* token (never the client's token, never another user's);
//! 2. every request is answered or forwarded at most once, and every request whose client stayed
//!    is answered or forwarded once the IdP has answered and time has passed;
//! 3. once every request has ended and every callout is answered, nothing is kept: no request
//!    state, exchange, waiter or lease owner remains in either worker.

use std::collections::HashMap;

use proptest::prelude::*;

use crate::fake_host::{Callout, Fate};
use crate::flow_tests::{config, exchanged, idp_error, token_at, Worker, T0_MS};

#[derive(Debug, Clone)]
enum Event {
    /// A request on worker `w` with token `t` of the pool.
    Send {
        w: usize,
        t: usize,
    },
    /// The oldest unanswered exchange of worker `w` is answered.
    Answer {
        w: usize,
        how: IdpAnswer,
    },
    Tick {
        w: usize,
        ms: u64,
    },
    /// The client of worker `w`'s `n`-th live request goes away.
    Abandon {
        w: usize,
        n: usize,
    },
    /// The upstream answers worker `w`'s `n`-th forwarded request with this status.
    Upstream {
        w: usize,
        n: usize,
        rejected: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum IdpAnswer {
    Issue,
    Refuse,
    Outage,
    Reset,
}

fn event() -> impl Strategy<Value = Event> {
    let w = 0..2usize;
    prop_oneof![
        4 => (w.clone(), 0..TOKENS).prop_map(|(w, t)| Event::Send { w, t }),
        3 => (w.clone(), prop_oneof![
                4 => Just(IdpAnswer::Issue),
                1 => Just(IdpAnswer::Refuse),
                1 => Just(IdpAnswer::Outage),
                1 => Just(IdpAnswer::Reset),
            ]).prop_map(|(w, how)| Event::Answer { w, how }),
        2 => (w.clone(), prop_oneof![Just(20u64), Just(500), Just(1500)])
                .prop_map(|(w, ms)| Event::Tick { w, ms }),
        1 => (w.clone(), 0..8usize).prop_map(|(w, n)| Event::Abandon { w, n }),
        1 => (w, 0..8usize, any::<bool>())
                .prop_map(|(w, n, rejected)| Event::Upstream { w, n, rejected }),
    ]
}

/// Tokens in the pool: three users' valid tokens, one badly signed, one expired.
const TOKENS: usize = 5;
const VALID: usize = 3;

fn pool() -> Vec<String> {
    let mut tokens: Vec<String> = ["ann", "ben", "cid"]
        .iter()
        .map(|u| token_at(T0_MS, u, "k1"))
        .collect();
    let mut forged = tokens[0].clone();
    forged.pop();
    forged.push(if tokens[0].ends_with('A') { 'B' } else { 'A' });
    tokens.push(forged);
    tokens.push(token_at(T0_MS - 7_200_000, "old", "k1"));
    tokens
}

/// The subject token of an exchange callout, from its form body.
pub(crate) fn subject_of(call: &Callout) -> String {
    let body = String::from_utf8_lossy(&call.body).into_owned();
    body.split('&')
        .find_map(|kv| kv.strip_prefix("subject_token="))
        .unwrap_or_default()
        .to_string()
}

struct Run {
    workers: Vec<Worker>,
    tokens: Vec<String>,
    /// Per worker: request id → the token index it was sent with.
    sent: Vec<HashMap<u32, usize>>,
    /// Per worker: exchange callouts answered so far.
    answered: Vec<usize>,
    /// Backend token → the subject token it was issued for.
    issued: HashMap<String, String>,
    next_id: u32,
}

impl Run {
    fn new() -> Self {
        let cfg = config();
        let a = Worker::first(&cfg);
        let b = a.sibling(&cfg, 2);
        Self {
            workers: vec![a, b],
            tokens: pool(),
            sent: vec![HashMap::new(), HashMap::new()],
            answered: vec![0, 0],
            issued: HashMap::new(),
            next_id: 1,
        }
    }

    fn ids_where(&self, w: usize, f: impl Fn(Fate) -> bool) -> Vec<u32> {
        let mut ids: Vec<u32> = self.sent[w]
            .keys()
            .copied()
            .filter(|id| f(self.workers[w].host.fate(*id)))
            .collect();
        ids.sort_unstable();
        ids
    }

    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Send { w, t } => {
                let id = self.next_id;
                self.next_id += 1;
                self.sent[w].insert(id, t);
                let token = self.tokens[t].clone();
                self.workers[w].send(id, &token);
            }
            Event::Answer { w, how } => {
                let calls = self.workers[w].exchanges();
                let Some(call) = calls.get(self.answered[w]).cloned() else {
                    return;
                };
                self.answered[w] += 1;
                self.answer(w, &call, how);
            }
            Event::Tick { w, ms } => self.workers[w].tick(ms),
            Event::Abandon { w, n } => {
                let live = self.ids_where(w, |f| f == Fate::Waiting);
                if let Some(id) = live.get(n % live.len().max(1)) {
                    self.workers[w].abandon(*id);
                }
            }
            Event::Upstream { w, n, rejected } => {
                let forwarded = self.ids_where(w, |f| f == Fate::Forwarded);
                if let Some(id) = forwarded.get(n % forwarded.len().max(1)) {
                    let status = if rejected { "401" } else { "200" };
                    self.workers[w].upstream_answers(*id, status);
                }
            }
        }
    }

    fn answer(&mut self, w: usize, call: &Callout, how: IdpAnswer) {
        let worker = &mut self.workers[w];
        // An answer Envoy would not deliver (its context ended) is simply lost.
        let _delivered = match how {
            IdpAnswer::Issue => {
                let backend = format!("backend-{}-{}", w, call.token);
                self.issued.insert(backend.clone(), subject_of(call));
                worker.answer(call, Some(200), &exchanged(&backend))
            }
            IdpAnswer::Refuse => worker.answer(call, Some(400), &idp_error("invalid_grant")),
            IdpAnswer::Outage => worker.answer(call, Some(503), &idp_error("unavailable")),
            IdpAnswer::Reset => worker.answer(call, None, ""),
        };
    }

    /// The IdP answers everything still open, time passes, then every request ends.
    fn drain(&mut self) {
        for _ in 0..40 {
            for w in 0..2 {
                while self.answered[w] < self.workers[w].exchanges().len() {
                    self.apply(&Event::Answer {
                        w,
                        how: IdpAnswer::Issue,
                    });
                }
                self.workers[w].tick(500);
            }
        }
    }

    fn end_all(&mut self) {
        for w in 0..2 {
            let ids: Vec<u32> = self.sent[w].keys().copied().collect();
            for id in ids {
                self.workers[w].end(id);
            }
            self.workers[w].tick(500);
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (w, sent) in self.sent.iter().enumerate() {
            for (id, t) in sent {
                let r = self.workers[w].host.request(*id);
                prop_assert!(
                    r.decisions <= 1,
                    "request {id} decided {} times",
                    r.decisions
                );
                prop_assert!(r.fate != Fate::Waiting, "request {id} never answered");
                if r.fate != Fate::Forwarded {
                    continue;
                }
                prop_assert!(*t < VALID, "request {id} with token {t} was forwarded");
                let backend = r
                    .header("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .unwrap_or_default();
                prop_assert_eq!(
                    self.issued.get(backend),
                    Some(&self.tokens[*t]),
                    "request {} forwarded with {:?}",
                    id,
                    backend
                );
            }
        }
        Ok(())
    }

    /// One audit record per decision, saying what was decided: once every batch is written (the
    /// default sink gathers them), each worker's log holds a record for every request it answered
    /// or forwarded, and as many `allow` records as it forwarded.
    fn check_audit(&self) -> Result<(), TestCaseError> {
        for (w, sent) in self.sent.iter().enumerate() {
            let host = &self.workers[w].host;
            let requests: Vec<_> = sent.keys().map(|id| host.request(*id)).collect();
            // A decision is a record even if the client went away after it.
            let decided: u32 = requests.iter().map(|r| r.decisions).sum();
            let forwarded = requests
                .iter()
                .filter(|r| r.decisions > 0 && r.reply_status.is_none())
                .count();
            let records: Vec<String> = host
                .logged()
                .iter()
                .filter_map(|m| m.strip_prefix(crate::audit::BATCH_HEADER))
                .flat_map(|m| m.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
                .collect();
            prop_assert_eq!(
                records.len(),
                decided as usize,
                "worker {} records {:?}",
                w,
                &records
            );
            let allowed = records
                .iter()
                .filter(|r| r.contains("\"decision\":\"allow\""))
                .count();
            prop_assert_eq!(allowed, forwarded, "worker {} records {:?}", w, &records);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_interleavings_keep_the_flow_invariants(
        events in prop::collection::vec(event(), 1..60)
    ) {
        let mut run = Run::new();
        for e in &events {
            run.apply(e);
        }
        run.drain();
        run.check()?;
        run.end_all();
        run.check_audit()?;
        for (w, worker) in run.workers.iter().enumerate() {
            prop_assert!(worker.gw.is_idle(), "worker {} keeps state after {:?}", w, events);
        }
    }
}
