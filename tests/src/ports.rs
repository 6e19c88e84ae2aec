//! Loopback ports for the processes the suite starts (Envoy, etcd, Apollo) before they bind.
//!
//! Such a port is free when it is chosen and bound only later by another process, so something
//! else may take it in between. Taken from the kernel's ephemeral range (`bind(0)`), it raced with
//! every socket the suite opens: the in-process IdP and upstreams bind port 0, and every client
//! connection gets its local port from that range. An Envoy whose listener port was taken exits at
//! start, and a check that connects to the port then reached the other listener and called the
//! dead Envoy ready. So ports come from below the ephemeral range, which the kernel never hands out
//! on its own, and each is given out once per test process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

/// The lowest port handed out: above the registered services most machines run (< 10000).
const POOL_LOW: u16 = 10_000;

/// Linux's default ephemeral range starts here (`net.ipv4.ip_local_port_range`).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// The process's ports: handed out one after another from an offset of its own.
static PORTS: PortPool = PortPool::new();

/// A loopback port that no other socket holds now, that this process has not handed out before
/// and that the kernel will not give to a `bind(0)` or an outgoing connection.
pub fn free_port() -> anyhow::Result<u16> {
    PORTS.next(std::process::id())
}

struct PortPool {
    /// Ports tried so far; the next candidate is `low + (start + tried) % size`.
    tried: AtomicU32,
}

impl PortPool {
    const fn new() -> Self {
        Self {
            tried: AtomicU32::new(0),
        }
    }

    /// Test binaries run one after another; each starts at an offset of its own (`seed`), so
    /// a port a previous binary's process may still hold is not among its first picks.
    fn next(&self, seed: u32) -> anyhow::Result<u16> {
        let (low, high) = pool()?;
        let size = u32::from(high - low);
        let start = seed % size;
        for _ in 0..size {
            let n = self.tried.fetch_add(1, Ordering::Relaxed);
            let candidate = low + ((start + n) % size) as u16;
            if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
                return Ok(candidate);
            }
        }
        bail!("no free loopback port in {low}..{high}")
    }
}

/// `[low, high)`: from `POOL_LOW` to the start of the kernel's ephemeral range.
fn pool() -> anyhow::Result<(u16, u16)> {
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW);
    if high <= POOL_LOW + 1_000 {
        bail!(
            "the ephemeral port range starts at {high}: too low to keep the suite's ports \
             (from {POOL_LOW}) out of it; raise net.ipv4.ip_local_port_range"
        );
    }
    Ok((POOL_LOW, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat() {
        let (low, high) = pool().unwrap();
        let pool_of_test = PortPool::new();
        let ports: Vec<u16> = (0..200).map(|_| pool_of_test.next(7).unwrap()).collect();
        assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn a_held_port_is_skipped() {
        let first = PortPool::new().next(1_000).unwrap();
        let _holder = TcpListener::bind(("127.0.0.1", first)).unwrap();
        let next = PortPool::new().next(1_000).unwrap();
        assert!(next > first, "{next} after held {first}");
    }
}
