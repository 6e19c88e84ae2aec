//! Counters and a latency histogram in Envoy's stats (admin `/stats`, `/stats/prometheus`).
//! Metrics are defined lazily by name; Envoy shares a metric of the same name across the VMs of
//! all workers, so the numbers are per Envoy, not per worker.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub const PREFIX: &str = "mcp_token_exchange";

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
}

impl Metrics {
    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = hostcalls::define_metric(kind, &format!("{PREFIX}.{name}")).ok();
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn inc(&mut self, name: &str) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn record(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}
