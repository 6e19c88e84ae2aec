//! Counters and a latency histogram in Envoy's stats (admin `/stats`, `/stats/prometheus`).
//! Metrics are defined lazily by name; Envoy shares a metric of the same name across the VMs of
//! all workers, so the numbers are per Envoy, not per worker.
//!
//! Counters are added up in the VM and handed to Envoy on the root context's tick (every
//! 500 ms): an `increment_metric` host call per counter per request costs more than the rest of
//! a cached request. Stats therefore lag by at most one tick.

use std::collections::HashMap;

use proxy_wasm::types::MetricType;

use crate::host::Host;

pub const PREFIX: &str = "mcp_token_exchange";

#[derive(Debug, Clone, Copy)]
pub struct CounterId(usize);

struct Counter {
    name: String,
    /// Envoy's id, once defined (on the first flush after the counter was named).
    id: Option<u32>,
    pending: u64,
}

#[derive(Default)]
pub struct Metrics {
    counters: Vec<Counter>,
    counter_index: HashMap<String, usize>,
    histograms: HashMap<String, Option<u32>>,
    gauges: HashMap<String, Option<u32>>,
}

impl Metrics {
    /// The counter named `name` (defined in Envoy when first flushed), for [`Metrics::add`].
    pub fn counter(&mut self, name: &str) -> CounterId {
        if let Some(i) = self.counter_index.get(name) {
            return CounterId(*i);
        }
        self.counters.push(Counter {
            name: format!("{PREFIX}.{name}"),
            id: None,
            pending: 0,
        });
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

    /// Counts `n` (nothing when 0).
    pub fn add_n(&mut self, name: &str, n: u64) {
        let counter = self.counter(name);
        if let Some(c) = self.counters.get_mut(counter.0) {
            c.pending += n;
        }
    }

    /// Sets a gauge (defined on first use).
    pub fn gauge(&mut self, host: &impl Host, name: &str, value: u64) {
        record_in(&mut self.gauges, MetricType::Gauge, host, name, value);
    }

    pub fn inc(&mut self, name: &str) {
        let counter = self.counter(name);
        self.add(counter);
    }

    /// Hands the counts gathered since the last flush to Envoy.
    pub fn flush(&mut self, host: &impl Host) {
        for c in &mut self.counters {
            // Defined even at zero, so a counter shows in Envoy's stats before it first counts.
            if c.id.is_none() {
                c.id = host.define_metric(MetricType::Counter, &c.name);
            }
            if c.pending > 0 {
                if let Some(id) = c.id {
                    host.increment_metric(id, c.pending);
                }
                c.pending = 0;
            }
        }
    }

    pub fn record(&mut self, host: &impl Host, name: &str, value: u64) {
        record_in(
            &mut self.histograms,
            MetricType::Histogram,
            host,
            name,
            value,
        );
    }
}

/// Records `value` on the metric `name` of `kind`, defining it on first use.
fn record_in(
    ids: &mut HashMap<String, Option<u32>>,
    kind: MetricType,
    host: &impl Host,
    name: &str,
    value: u64,
) {
    let id = match ids.get(name) {
        Some(id) => *id,
        None => {
            let id = host.define_metric(kind, &format!("{PREFIX}.{name}"));
            ids.insert(name.to_string(), id);
            id
        }
    };
    if let Some(id) = id {
        host.record_metric(id, value);
    }
}
