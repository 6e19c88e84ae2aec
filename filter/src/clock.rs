//! Time for the per-request cached path without a host call per request.
//!
//! Reading the clock is a host call (~0.25 µs in Envoy's V8, about 1 % of a request on the
//! cached path). A worker reads it anyway on every tick and on every request that takes the full
//! path; the cached path instead checks expiry against a bound that cannot be earlier than the
//! real time: the latest reading plus [`GUARD_MS`]. Checking deadlines against a later "now" only
//! makes the cached path stricter: an entry that fails against the bound is not refused, the
//! request takes the full path, which reads the real clock and decides exactly.
//!
//! Why the bound holds: the tick (every 500 ms) runs on the worker thread that handles the
//! requests, so the latest reading lags the real time by the tick period plus however long that
//! thread's event loop went without running its timers, which is far below the guard unless the
//! worker is stalled for seconds.

/// How far ahead of the latest clock reading the cached path assumes the real time may be.
/// Ten tick periods: an entry within this of its expiry is decided by the full path.
pub const GUARD_MS: u64 = 5_000;

#[derive(Debug, Default)]
pub struct CoarseClock {
    /// The latest reading of the host clock (ms since the Unix epoch); 0 before the first.
    latest_ms: u64,
}

impl CoarseClock {
    /// Records a reading of the host clock and returns it. The latest reading wins even if it
    /// is earlier (the wall clock was stepped back): the bound must follow the real time.
    pub fn observe(&mut self, now_ms: u64) -> u64 {
        self.latest_ms = now_ms;
        now_ms
    }

    /// A time (ms) no earlier than now, for checks where a later "now" is only stricter; `None`
    /// before the first reading.
    pub fn not_before_now_ms(&self) -> Option<u64> {
        (self.latest_ms != 0).then(|| self.latest_ms.saturating_add(GUARD_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bound_before_the_first_reading() {
        assert_eq!(CoarseClock::default().not_before_now_ms(), None);
    }

    #[test]
    fn bound_is_the_latest_reading_plus_the_guard() {
        let mut clock = CoarseClock::default();
        assert_eq!(clock.observe(1_000_000), 1_000_000);
        assert_eq!(clock.not_before_now_ms(), Some(1_000_000 + GUARD_MS));
        clock.observe(1_000_500);
        assert_eq!(clock.not_before_now_ms(), Some(1_000_500 + GUARD_MS));
    }

    #[test]
    fn a_clock_stepped_back_moves_the_bound_back() {
        let mut clock = CoarseClock::default();
        clock.observe(2_000_000);
        clock.observe(1_000_000);
        assert_eq!(clock.not_before_now_ms(), Some(1_000_000 + GUARD_MS));
    }

    #[test]
    fn guard_covers_many_ticks() {
        let tick_ms = crate::gateway::TICK.as_millis() as u64;
        assert!(GUARD_MS >= 10 * tick_ms);
    }

    #[test]
    fn bound_saturates() {
        let mut clock = CoarseClock::default();
        clock.observe(u64::MAX - 1);
        assert_eq!(clock.not_before_now_ms(), Some(u64::MAX));
    }
}
