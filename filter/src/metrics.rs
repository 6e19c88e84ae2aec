//! Counters and a latency histogram in Envoy's stats (admin `/stats`, `/stats/prometheus`).
//! Metrics are defined lazily by name; Envoy shares a metric of the same name across the VMs of
//! all workers, so the numbers are per Envoy, not per worker.
//!
//! Counters are added up in the VM and handed to Envoy on the root context's tick (every
//! 500 ms): an `increment_metric` host call per counter per request costs more than the rest of
//! a cached request. Stats therefore lag by at most one tick.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub const PREFIX: &str = "mcp_token_exchange";

#[derive(Debug, Clone, Copy)]
pub struct CounterId(usize);

struct Counter {
    id: Option<u32>,
    pending: u64,
}

#[derive(Default)]
pub struct Metrics {
    counters: Vec<Counter>,
    counter_index: HashMap<String, usize>,
    histograms: HashMap<String, Option<u32>>,
}

impl Metrics {
    /// The counter named `name` (defined in Envoy on first use), for [`Metrics::add`].
    pub fn counter(&mut self, name: &str) -> CounterId {
        if let Some(i) = self.counter_index.get(name) {
            return CounterId(*i);
        }
        let id = hostcalls::define_metric(MetricType::Counter, &format!("{PREFIX}.{name}")).ok();
        self.counters.push(Counter { id, pending: 0 });
        let index = self.counters.len() - 1;
        self.counter_index.insert(name.to_string(), index);
        CounterId(index)
    }

    /// Counts one for a counter looked up before (the hot path skips the name lookup).
    pub fn add(&mut self, counter: CounterId) {
        if let Some(c) = self.counters.get_mut(counter.0) {
            c.pending += 1;
        }
    }

    pub fn inc(&mut self, name: &str) {
        let counter = self.counter(name);
        self.add(counter);
    }

    /// Hands the counts gathered since the last flush to Envoy.
    pub fn flush(&mut self) {
        for c in &mut self.counters {
            if c.pending > 0 {
                if let Some(id) = c.id {
                    let _ = hostcalls::increment_metric(id, c.pending as i64);
                }
                c.pending = 0;
            }
        }
    }

    pub fn record(&mut self, name: &str, value: u64) {
        let id = match self.histograms.get(name) {
            Some(id) => *id,
            None => {
                let id =
                    hostcalls::define_metric(MetricType::Histogram, &format!("{PREFIX}.{name}"))
                        .ok();
                self.histograms.insert(name.to_string(), id);
                id
            }
        };
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}
