#!/usr/bin/env python3
"""`make bench`: the filter against bare Envoy, native jwt_authn and a no-op Wasm filter.

Starts the local IdP (target/debug/okta-idp) once, then one Envoy at a time on loopback, every
setup routing to a `direct_response` 200 so only the HTTP filter chain is measured, and drives
each with the same wrk parameters after a warm-up. Then counts IdP calls (one user, and a burst of
one fresh token, over 2 workers), Envoy's RSS after 1k and after N distinct tokens, and the
release .wasm sizes. Writes bench/results.md and bench/results.svg and prints the former.

Python 3 standard library only. Every process started here is killed on exit (normal, error,
Ctrl-C, SIGTERM, or the overall time limit); every wait is bounded. Raw wrk output, generated
Envoy configs and logs land in bench/.run/ (rewritten on each run).

Knobs (environment):
  BENCH_DURATION=10  BENCH_WARMUP=2  BENCH_CONNECTIONS=16  BENCH_THREADS=1
  BENCH_TOKENS=100000        distinct tokens for the RSS measure (also feeds the exchange-miss run)
  BENCH_BURST_DELAY_MS=100   simulated IdP latency for the 64-request burst (0 = loopback speed)
  BENCH_BURST_TRIALS=5       bursts per variant, each with its own fresh token (the worst counts)
  BENCH_MINT_THREADS=8       concurrent admin mint calls
  BENCH_MAX_SECONDS=2400     hard limit for the whole run
  BENCH_QUIET_WAIT=10        before each measured setup, wait up to this long for the machine to be
                             idle (< 0.3 cores busy); the run goes on regardless and reports the load
  BENCH_REPEATS=3            measured runs per throughput setup (after one warm-up); the run with
                             the median req/s is reported, all of them are listed
  BENCH_RETRIES=2            re-measure a setup (keeping the least disturbed run) at most this often
                             when other work used > 0.2 cores during it
  BENCH_ONLY=noop,full_cached  measure only these throughput setups, print them and stop (no
                             IdP-call, memory or report sections; results.md is not rewritten):
                             a quick loop while optimising. Setup ids: bare jwt jwt_cache noop
                             noop_lean noop_host full_cached full_audit_off full_envoy_log
                             full_cached_fleet validate_cached validate_uncached full_noverify,
                             and (after minting BENCH_TOKENS) full_miss fleet_hit
  BENCH_NOOP_HOST_CALLS=headers,write,clock  the host calls the noop_host row makes (words of
                             bench/noop-filter: headers path clock write status)
  BENCH_VALIDATE_ONLY_PATCH  JSON merge patch on the plugin config that turns the exchange off
                             (default {"mode": "validate_only", "exchange": null} when the filter
                             has that mode)
  BENCH_NO_VERIFY_CACHE_PATCH  JSON merge patch that turns the verified-token cache off
                             (default {"verified_cache_max_entries": 0} when the filter has that field)
  BENCH_FILTER_PATCH         JSON merge patch applied to every filter row (default {}: the
                             filter's default configuration, which writes one audit record per
                             decision to Envoy's log, up to 64 per log call; extra rows run with
                             the audit record off, through an access log, and one log call per
                             record)
"""

from __future__ import annotations

import datetime
import hashlib
import html
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RUN = BENCH / ".run"
REPORT_LUA = BENCH / "wrk" / "report.lua"
ROTATE_LUA = BENCH / "wrk" / "rotate.lua"

ENVOY = Path(os.environ.get("ENVOY_BIN") or ROOT / ".venv/bin/envoy")
FILTER_WASM = Path(
    os.environ.get("FILTER_WASM")
    or ROOT / "target/wasm32-wasip1/release/mcp_token_exchange.wasm"
)
NOOP_WASM = ROOT / "target/wasm32-wasip1/release/noop_filter.wasm"
# The same module through the filter's wasm-opt step (`make bench`): the callbacks the filter does
# not export are not exported here either, so Envoy makes the same VM calls per request.
NOOP_LEAN_WASM = ROOT / "target/wasm32-wasip1/release/noop_filter_lean.wasm"
# The host calls the filter's cached full path makes (see bench/noop-filter).
NOOP_HOST_CALLS = os.environ.get("BENCH_NOOP_HOST_CALLS", "headers,write,clock")
IDP_BIN = ROOT / "target/debug/okta-idp"

SECRET_ENV = "TOKEN_EXCHANGE_CLIENT_SECRET"
SECRET = "bench-secret-not-for-production"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_patch(name: str):
    raw = os.environ.get(name, "").strip()
    return json.loads(raw) if raw else None


DURATION = env_int("BENCH_DURATION", 10)
WARMUP = env_int("BENCH_WARMUP", 2)
CONNECTIONS = env_int("BENCH_CONNECTIONS", 16)
THREADS = env_int("BENCH_THREADS", 1)
N_TOKENS = env_int("BENCH_TOKENS", 100_000)
BURST_DELAY_MS = env_int("BENCH_BURST_DELAY_MS", 100)
BURST_TRIALS = env_int("BENCH_BURST_TRIALS", 5)
MINT_THREADS = env_int("BENCH_MINT_THREADS", 8)
MAX_SECONDS = env_int("BENCH_MAX_SECONDS", 2400)
QUIET_WAIT = env_int("BENCH_QUIET_WAIT", 10)
RETRIES = env_int("BENCH_RETRIES", 2)
REPEATS = max(1, env_int("BENCH_REPEATS", 3))
VALIDATE_ONLY_PATCH = env_patch("BENCH_VALIDATE_ONLY_PATCH")
if VALIDATE_ONLY_PATCH is None and "validate_only" in (ROOT / "filter/src/config.rs").read_text(
    errors="replace"
):
    # Validate and forward without exchanging; a merge-patch null removes the exchange block.
    VALIDATE_ONLY_PATCH = {"mode": "validate_only", "exchange": None}
ONLY = [s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()]
NO_VERIFY_CACHE_PATCH = env_patch("BENCH_NO_VERIFY_CACHE_PATCH")
if NO_VERIFY_CACHE_PATCH is None and "verified_cache_max_entries" in (
    ROOT / "filter/src/config.rs"
).read_text(errors="replace"):
    # The filter's verified-token cache is sized by this field; 0 turns it off.
    NO_VERIFY_CACHE_PATCH = {"verified_cache_max_entries": 0}
# The filter rows run the default configuration (what users run): one audit record per decision,
# handed to Envoy's access log. `full_audit_off` and `full_envoy_log` are the extra rows.
FILTER_PATCH = env_patch("BENCH_FILTER_PATCH") or {}
AUDIT_OFF_PATCH = {"audit_log": False}
AUDIT_ENVOY_LOG_PATCH = {"audit_log": "envoy_log"}
AUDIT_ACCESS_LOG_PATCH = {"audit_log": "access_log"}
# The fleet store (issue 15): etcd on loopback, started only for the rows that use it.
ETCD_BIN = Path(os.environ.get("ETCD_BIN", "/usr/bin/etcd"))
STORE_ENV = "MCP_GW_STORE_KEY"
STORE_KEY = "bench-fleet-store-key-0123456789abcdef"
FLEET_PATCH = {"fleet_store": {"cluster": "etcd", "secret_env": STORE_ENV}}
# Set when etcd runs: every bootstrap then has its `etcd` cluster (unused by the other rows).
ETCD_PORT: list[int] = []
# Issue 12: the demo's issuer as one of two providers (`providers`), the other the bench IdP's
# `backend` server with keys of its own. The token names the second provider in name order, so
# what the row measures is the cached path with provider selection configured: the cached path
# does no selection (one bit test for the route's providers), which this row is there to show.
TWO_PROVIDERS_PATCH = {
    "issuer": None, "audiences": None, "jwks": None,
    "providers": {
        "a_partner": {"issuer": "http://127.0.0.1:9400/oauth2/backend", "audiences": ["backend"],
                      "jwks": {"cluster": "okta", "path": "/oauth2/backend/v1/keys",
                               "authority": "127.0.0.1:9400"}},
        "okta": {"issuer": "http://127.0.0.1:9400/oauth2/mcp", "audiences": ["mcpserver"],
                 "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys",
                          "authority": "127.0.0.1:9400"}},
    },
}
# The access log of envoy/demo.yaml that writes the filter's audit record (same format; the path
# is the run's own file).
AUDIT_FILTER_STATE = "wasm.mcp_token_exchange.audit"


def audit_access_log(path: Path) -> dict:
    return {
        "name": "mcp_token_exchange_audit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {
                "text_format_source": {
                    "inline_string": f"%FILTER_STATE({AUDIT_FILTER_STATE}:PLAIN)%" + chr(10)},
                "omit_empty_values": True,
            },
        },
    }


def audit_to_access_log(plugin: dict) -> bool:
    """Whether this plugin config hands audit records to the access log (not the default, which
    batches them to Envoy's log)."""
    return plugin.get("audit_log", True) == "access_log"


def audit_to_envoy_log(plugin: dict) -> bool:
    """Whether this plugin config writes audit records to Envoy's application log (the default,
    batched, or one log call per record)."""
    return plugin.get("audit_log", True) in (True, "envoy_log_batched", "envoy_log")


# How every audit record starts (in Envoy's log, each record of a batch is a line of its own).
AUDIT_RECORD_START = b'{"audit":"mcp_token_exchange"'



CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Processes: everything started goes through here and is stopped in `stop_all`.


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(log_path, "wb")
        try:
            p = subprocess.Popen(
                [str(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            out.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                print(f"bench: could not stop pid {p.pid}: {e}", file=sys.stderr)


PROCS = Procs()


def on_signal(signum, _frame):
    raise SystemExit(f"bench: stopped by signal {signal.Signals(signum).name}")


# --------------------------------------------------------------------------------------------
# Small helpers.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(port: int, method: str, path: str, body=None, headers=None, timeout=10.0):
    """One request on a fresh connection: (status, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["content-type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (steal counts as
    busy: another tenant had the core)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / CLK_TCK, sum(vals) / CLK_TCK


def wait_quiet(label: str) -> float:
    """Waits (at most QUIET_WAIT s) until the machine is nearly idle for a second; returns the
    busy cores of the last sample."""
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        b0, t0 = system_cpu()
        time.sleep(1.0)
        b1, t1 = system_cpu()
        busy = (b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1)
        if busy < 0.3 or time.monotonic() > deadline:
            if busy >= 0.3:
                log(f"{label}: machine still busy ({busy:.2f} cores used by others); measuring anyway")
            return busy
        time.sleep(1.0)


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def wait_until(what: str, predicate, timeout: float, interval: float = 0.05, check=None):
    deadline = time.monotonic() + timeout
    while True:
        if check:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def merge_patch(target, patch):
    """RFC 7396 JSON merge patch (returns the result)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def retarget(value, port: int):
    """Rewrites the demo IdP address 127.0.0.1:9400 to the bench IdP's in every string."""
    if isinstance(value, str):
        return value.replace("127.0.0.1:9400", f"127.0.0.1:{port}")
    if isinstance(value, list):
        return [retarget(v, port) for v in value]
    if isinstance(value, dict):
        return {k: retarget(v, port) for k, v in value.items()}
    return value


def demo_plugin_config() -> dict:
    """The filter's JSON configuration from envoy/demo.yaml (the `value: |` block), so the bench
    runs the configuration `make run` and the e2e suite use."""
    lines = (ROOT / "envoy/demo.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "value: |":
            body = lines[i + 1 :]
            indent = len(body[0]) - len(body[0].lstrip())
            block = []
            for l in body:
                if l.strip() and len(l) - len(l.lstrip()) < indent:
                    break
                block.append(l[indent:])
            return json.loads("\n".join(block))
    raise BenchError("envoy/demo.yaml has no plugin configuration block (`value: |`)")


# --------------------------------------------------------------------------------------------
# The IdP.


class Idp:
    def __init__(self) -> None:
        self.port = free_port()
        env = dict(os.environ, **{SECRET_ENV: SECRET})
        self.proc = PROCS.start(
            [IDP_BIN, "--listen", f"127.0.0.1:{self.port}", "--quiet"], RUN / "idp.log", env
        )
        wait_until(
            "the IdP to serve its JWKS",
            lambda: self._ok("/oauth2/mcp/v1/keys"),
            20,
            check=self._alive,
        )
        self.issuer = f"http://127.0.0.1:{self.port}/oauth2/mcp"
        status, body = http_call(self.port, "GET", "/oauth2/mcp/v1/keys")
        self.jwks = body.decode()

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"okta-idp exited ({self.proc.returncode}); see {RUN / 'idp.log'}")

    def _ok(self, path: str) -> bool:
        try:
            return http_call(self.port, "GET", path, timeout=2)[0] == 200
        except OSError:
            return False

    def mint(self, sub: str) -> str:
        status, body = http_call(
            self.port, "POST", "/__admin/mint", {"as_id": "mcp", "sub": sub}
        )
        if status != 200:
            raise BenchError(f"mint failed: HTTP {status} {body[:200]!r}")
        return json.loads(body)["access_token"]

    def token_requests(self) -> int:
        status, body = http_call(self.port, "GET", "/__admin/stats")
        if status != 200:
            raise BenchError(f"IdP stats: HTTP {status}")
        return int(json.loads(body)["token_requests"])

    def set_token_delay(self, ms: int) -> None:
        if ms > 0:
            fault = {"endpoint": "token", "fault": {"kind": "delay", "ms": ms}}
            status, body = http_call(self.port, "POST", "/__admin/faults", fault)
        else:
            status, body = http_call(self.port, "DELETE", "/__admin/faults")
        if status != 200:
            raise BenchError(f"IdP faults: HTTP {status} {body[:200]!r}")

    def mint_many(self, n: int, prefix: str) -> list[str]:
        """n tokens, each for its own user, minted over MINT_THREADS keep-alive connections."""
        out: list[str | None] = [None] * n
        errors: list[str] = []
        deadline = time.monotonic() + max(120.0, n / 50.0)  # bounded even if the IdP crawls

        def worker(start: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                for i in range(start, n, MINT_THREADS):
                    if errors or time.monotonic() > deadline:
                        return
                    body = json.dumps({"as_id": "mcp", "sub": f"{prefix}-{i}"})
                    conn.request(
                        "POST", "/__admin/mint", body=body,
                        headers={"content-type": "application/json"},
                    )
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status} {data[:200]!r}")
                        return
                    out[i] = json.loads(data)["access_token"]
            except Exception as e:  # reported below
                errors.append(repr(e))
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(MINT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic() + 5))
        if errors:
            raise BenchError(f"minting failed: {errors[0]}")
        tokens = [t for t in out if t]
        if len(tokens) != n:
            raise BenchError(f"minted only {len(tokens)} of {n} tokens before the deadline")
        if len(set(tokens)) != n:
            raise BenchError("minted tokens are not all distinct")
        return tokens


# --------------------------------------------------------------------------------------------
# Envoy configurations.


def wasm_filter(name: str, wasm: Path, plugin: dict | None, env_keys: list[str]) -> dict:
    config: dict = {
        "name": name,
        "root_id": name,
        # As in envoy/demo.yaml: a trapped VM must never let requests through.
        "failure_policy": "FAIL_CLOSED",
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm)}},
        },
    }
    if env_keys:
        config["vm_config"]["environment_variables"] = {"host_env_keys": env_keys}
    if plugin is not None:
        config["configuration"] = {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plugin if isinstance(plugin, str) else json.dumps(plugin),
        }
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config,
        },
    }


def jwt_authn_filter(idp: Idp, cache: bool) -> dict:
    provider: dict = {
        "issuer": idp.issuer,
        "audiences": ["mcpserver"],
        # The IdP's JWKS, fetched at bench start: same keys the filter fetches itself.
        "local_jwks": {"inline_string": idp.jwks},
        "forward": True,
    }
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"okta_mcp": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "okta_mcp"}}],
        },
    }


def filter_plugin(idp: Idp, patch=None) -> dict:
    plugin = merge_patch(retarget(demo_plugin_config(), idp.port), FILTER_PATCH)
    # Patches name the demo IdP's address like demo.yaml does (TWO_PROVIDERS_PATCH).
    return merge_patch(plugin, retarget(patch, idp.port)) if patch else plugin


def bootstrap(port: int, admin_port: int, http_filters: list[dict], idp: Idp,
              access_log: Path | None = None) -> dict:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "bench",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            # No upstream: only the filter chain is measured.
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                        }
                    ],
                }
            ],
        },
        "http_filters": http_filters + [router],
    }
    if access_log is not None:
        hcm["access_log"] = [audit_access_log(access_log)]
    extra_clusters = [static_cluster("etcd", port) for port in ETCD_PORT]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    # The filter's JWKS and token-exchange cluster (name as in envoy/demo.yaml).
                    "name": "okta",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "okta",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": idp.port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ] + extra_clusters,
        },
    }


def static_cluster(name: str, port: int) -> dict:
    """A loopback cluster speaking HTTP/1.1 (etcd's JSON API refuses plain h2c)."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


class Etcd:
    """One etcd member on loopback for the fleet-store rows (Debian's etcd-server)."""

    def __init__(self) -> None:
        if not ETCD_BIN.exists():
            raise BenchError(f"{ETCD_BIN} is missing (make etcd)")
        self.port, peer = free_port(), free_port()
        client = f"http://127.0.0.1:{self.port}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.proc = PROCS.start(
            [ETCD_BIN, "--name", "bench", "--data-dir", RUN / "etcd-data",
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"bench={peer_url}"],
            RUN / "etcd.log",
        )
        def healthy() -> bool:
            try:
                return http_call(self.port, "GET", "/health", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until("etcd to be healthy", healthy, 20)
        ETCD_PORT.append(self.port)


class Envoy:
    def __init__(self, name: str, http_filters: list[dict], idp: Idp, concurrency: int = 1,
                 wait_jwks: bool = False, audit_log: bool = False, audit_in_log: bool = False,
                 wrapper: tuple[str, ...] = (), start_timeout: float = 30) -> None:
        """`wrapper`: a command Envoy runs under (bench/instructions.py: valgrind), which also
        slows its start (`start_timeout`, seconds). `audit_log`: an access log writes the
        filter's records to a file of its own; `audit_in_log`: the filter writes them to Envoy's
        log (counted there)."""
        self.audit_in_log = audit_in_log
        self.name = name
        self.port = free_port()
        self.admin_port = free_port()
        self.concurrency = concurrency
        self.audit_path = RUN / f"audit-{name}.log" if audit_log else None
        cfg = RUN / f"envoy-{name}.json"
        cfg.write_text(json.dumps(bootstrap(self.port, self.admin_port, http_filters, idp,
                                            self.audit_path), indent=1))
        self.log_path = RUN / f"envoy-{name}.log"
        env = dict(os.environ, **{SECRET_ENV: SECRET, STORE_ENV: STORE_KEY})
        self.proc = PROCS.start(
            [*wrapper, ENVOY, "-c", cfg, "--concurrency", str(concurrency),
             "--disable-hot-restart", "-l", "info"],
            self.log_path,
            env,
        )
        self.pid = self.proc.pid
        try:
            wait_until(f"Envoy ({name}) to be ready", self._ready, start_timeout,
                       check=self.check_alive)
            if wait_jwks:
                wait_until(
                    f"Envoy ({name}) to load the JWKS",
                    lambda: "JWKS loaded" in self.log(),
                    start_timeout,
                    check=self.check_alive,
                )
        except BaseException:
            PROCS.stop(self.proc)
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log().splitlines()[-30:])
            raise BenchError(f"Envoy ({self.name}) exited with {self.proc.returncode}:\n{tail}")

    def _ready(self) -> bool:
        try:
            if http_call(self.admin_port, "GET", "/ready", timeout=2)[0] != 200:
                return False
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def get(self, token: str | None, timeout: float = 10.0) -> int:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return http_call(self.port, "GET", "/mcp", headers=headers, timeout=timeout)[0]

    def probe(self, token: str) -> None:
        """Waits until a request with `token` gets 200: the setup works before it is measured."""
        last = [None]

        def ok() -> bool:
            try:
                last[0] = self.get(token, timeout=5)
            except OSError as e:
                last[0] = repr(e)
            return last[0] == 200

        try:
            wait_until(f"a 200 from Envoy ({self.name})", ok, 20, interval=0.2, check=self.check_alive)
        except BenchError as e:
            raise BenchError(f"{e} (last answer: {last[0]}); see {self.log_path}") from None

    def stat(self, name: str) -> int:
        status, body = http_call(self.admin_port, "GET", f"/stats?filter=^{re.escape(name)}$")
        for line in body.decode().splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return 0

    def filter_counters(self, prefix: str) -> dict[str, int]:
        """The filter's counters whose name starts with `prefix` (without `mcp_token_exchange.`)."""
        _, body = http_call(self.admin_port, "GET", f"/stats?filter=mcp_token_exchange.{re.escape(prefix)}")
        out = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                # Envoy shows Wasm metrics under `wasmcustom.`.
                out[name.split("mcp_token_exchange.", 1)[-1]] = int(value)
        return out

    def worker_connections(self) -> list[int]:
        """Downstream connections each worker accepted (how the load spread)."""
        status, body = http_call(self.admin_port, "GET", "/stats?filter=worker_.*downstream_cx_total")
        counts: dict[int, int] = {}
        for line in body.decode().splitlines():
            m = re.match(r"listener\.127\.0\.0\.1_\d+\.worker_(\d+)\.downstream_cx_total: (\d+)", line)
            if m:
                counts[int(m.group(1))] = int(m.group(2))
        return [counts[k] for k in sorted(counts)]

    def _trim_log(self, limit: int = 8 << 20) -> None:
        """A filter that logs per request writes ~100 MB here per run: keep the head and tail."""
        try:
            if self.log_path.stat().st_size <= limit:
                return
            lines = self.log_path.read_bytes().splitlines(keepends=True)
        except OSError:
            return
        head, tail = lines[:300], lines[-3000:]
        note = f"... [bench: {len(lines) - len(head) - len(tail)} lines cut] ...\n".encode()
        self.log_path.write_bytes(b"".join(head) + note + b"".join(tail))

    def audit_lines(self) -> int | None:
        """Audit records in this Envoy's access log, or its own log, so far (after `stop`, all of
        them: Envoy flushes its access logs when it shuts down, and the filter its batch)."""
        if self.audit_path is not None:
            try:
                with open(self.audit_path, "rb") as f:
                    return sum(1 for line in f if line.strip())
            except OSError:
                return 0
        if self.audit_in_log:
            try:
                with open(self.log_path, "rb") as f:
                    # A batch puts each record on a line of its own; a log call per record
                    # puts it after Envoy's prefix.
                    return sum(1 for line in f if AUDIT_RECORD_START in line)
            except OSError:
                return 0
        return None

    def _trim_audit_log(self, keep: int = 200) -> None:
        """A run writes ~100 MB of records: keep the last lines as a sample."""
        if self.audit_path is None or not self.audit_path.exists():
            return
        lines = self.audit_path.read_bytes().splitlines(keepends=True)
        self.audit_path.write_bytes(b"".join(lines[-keep:]))

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def stop(self) -> None:
        trapped = [n for n in ("panicked at", "wasm trap", "Wasm VM failed") if n in self.log()]
        try:
            self.completed = self.stat("http.bench.downstream_rq_completed")
        except OSError:
            self.completed = None
        PROCS.stop(self.proc)
        self.audit_records = self.audit_lines()
        self._trim_log()
        self._trim_audit_log()
        if trapped:
            raise BenchError(f"Envoy ({self.name}) log shows {trapped}; see {self.log_path}")


# --------------------------------------------------------------------------------------------
# Load generation.


def run_wrk(envoy: Envoy, tag: str, duration: int, *, token: str | None = None,
            script: Path = REPORT_LUA, args: list[str] | None = None, idp: Idp | None = None,
            stop_when_completed: int | None = None) -> dict:
    """One wrk run; returns its numbers plus CPU seconds per request of Envoy, the IdP and wrk.

    With `stop_when_completed`, wrk is interrupted (SIGINT: it still reports) as soon as Envoy has
    completed that many more requests; `duration` is then only the upper bound."""
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency",
           "--timeout", "10s", "-s", str(script)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd.append(envoy.url())
    if args:
        cmd += ["--", *args]
    completed0 = envoy.stat("http.bench.downstream_rq_completed")
    envoy_cpu0 = cpu_seconds(envoy.pid)
    idp_cpu0 = cpu_seconds(idp.proc.pid) if idp else 0.0
    idp_calls0 = idp.token_requests() if idp else 0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys0, self0 = system_cpu()[0], self_cpu()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if stop_when_completed is not None:
            target = completed0 + stop_when_completed
            deadline = started + duration
            while proc.poll() is None and time.monotonic() < deadline:
                envoy.check_alive()
                if envoy.stat("http.bench.downstream_rq_completed") >= target:
                    proc.send_signal(signal.SIGINT)
                    break
                time.sleep(0.25)
        out, _ = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    wall = time.monotonic() - started
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys1, self1 = system_cpu()[0], self_cpu()
    shown = " ".join(cmd).replace(token, "<token>") if token else " ".join(cmd)
    (RUN / f"wrk-{tag}.txt").write_text(shown + "\n\n" + out)
    line = next((l for l in out.splitlines() if l.startswith("BENCH_JSON ")), None)
    if proc.returncode not in (0, -signal.SIGINT) or line is None:
        raise BenchError(f"wrk ({tag}) failed (exit {proc.returncode}):\n{out[-2000:]}")
    r = json.loads(line[len("BENCH_JSON "):])
    secs = r["duration_us"] / 1e6
    n = max(r["requests"], 1)
    r["rps"] = r["requests"] / secs if secs > 0 else 0.0
    r["wall_s"] = wall
    r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    envoy_cpu = cpu_seconds(envoy.pid) - envoy_cpu0
    wrk_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    idp_cpu = (cpu_seconds(idp.proc.pid) - idp_cpu0) if idp else 0.0
    r["envoy_cpu_us"] = envoy_cpu * 1e6 / n
    r["wrk_cpu_us"] = wrk_cpu * 1e6 / n
    r["envoy_cores"] = envoy_cpu / wall
    r["wrk_cores"] = wrk_cpu / wall
    r["idp_cores"] = idp_cpu / wall
    # Everything else the machine did meanwhile (other tenants, builds): a noisy-run flag.
    r["other_cores"] = max(0.0, ((sys1 - sys0) - envoy_cpu - wrk_cpu - idp_cpu - (self1 - self0)) / wall)
    if idp:
        r["idp_cpu_us"] = idp_cpu * 1e6 / n
        r["idp_calls"] = idp.token_requests() - idp_calls0
    return r


def write_tokens(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n")
    return path


def concurrent_burst(port: int, token: str, n: int) -> list[int]:
    """n requests with one token, each on its own already-open connection, released together."""
    request = (
        f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(n)]
    barrier = threading.Barrier(n, timeout=15)
    statuses: list[int] = [0] * n

    def worker(i: int) -> None:
        s = socks[i]
        try:
            barrier.wait()
            s.sendall(request)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            m = re.match(rb"HTTP/1\.1 (\d{3})", data)
            statuses[i] = int(m.group(1)) if m else -1
        except Exception:
            statuses[i] = -1
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return statuses


def sequential_requests(port: int, token: str, n: int, parallel: int = 8) -> list[int]:
    """n requests with one token from `parallel` clients, each request on a new connection (so
    the kernel spreads them over Envoy's workers)."""
    statuses: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def worker(k: int) -> None:
        for _ in range(k, n, parallel):
            if time.monotonic() > deadline:
                return
            try:
                st = http_call(port, "GET", "/mcp", headers={"authorization": f"Bearer {token}"})[0]
            except OSError:
                st = -1
            with lock:
                statuses.append(st)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=130)
    return statuses


# --------------------------------------------------------------------------------------------
# The run.


@dataclass(frozen=True)
class Target:
    """One of the issue's throughput targets for a setup: its req/s ÷ `baseline`'s req/s must
    reach `minimum`. The report lists the targets in `report_order` (the issue's order), not in
    table order."""

    report_order: int
    measure: str
    baseline: str
    minimum: float  # the ratio must reach this; with `key="p99_us"` it must not exceed it
    shown: str  # the target as the report prints it; in parentheses for the stricter rows
    # Measured on this other setup (with `stand_in_note` after the measure) while this one has
    # no result, e.g. before the filter had a validate-only mode.
    stand_in: str | None = None
    stand_in_note: str = ""
    # What is compared: throughput (higher is better) or p99 latency (lower is better).
    key: str = "rps"


@dataclass(frozen=True)
class Scenario:
    """One throughput setup: how it is built and measured, and how the report and chart show it.

    `chain` builds the HTTP filters in front of the router; None means the filter itself with
    `demo.yaml`'s plugin config, BENCH_FILTER_PATCH and then `patch`."""

    sid: str
    label: str
    desc: str  # concise description of the filter chain, for the report
    color: str  # its bars in results.svg
    chain: Callable[[Idp], list[dict]] | None = None
    patch: dict | None = None
    # Why this filter build cannot run the setup (a missing config knob): reported as n/a.
    unavailable: str | None = None
    # Depends on a config knob: a failure is reported on the row, not fatal.
    optional: bool = False
    # A new token per request (the exchange-miss run): measured after the distinct tokens are
    # minted, with wrk/rotate.lua, not by the common one-token loop.
    new_token_per_request: bool = False
    # Needs etcd (the fleet store rows).
    needs_etcd: bool = False
    # A `chain` setup with an audit access log configured (the format of envoy/README.md).
    access_log: bool = False
    # With new_token_per_request: the tokens were exchanged beforehand by another Envoy of the
    # fleet, so each request is a local miss answered from etcd.
    fleet_reader: bool = False
    targets: tuple[Target, ...] = ()


def noop_chain(wasm: Path, plugin: str | None = None) -> Callable[[Idp], list[dict]]:
    return lambda _idp: [wasm_filter("noop", wasm, plugin, [])]


def knob_missing(*needs: tuple[dict | None, str]) -> str | None:
    """The n/a text of the first (patch, text) whose patch this filter build has not got."""
    return next((text for patch, text in needs if patch is None), None)


NO_VALIDATE_ONLY = (VALIDATE_ONLY_PATCH,
                    "n/a until the filter exposes a validate-only mode (BENCH_VALIDATE_ONLY_PATCH)")
FILTER_COLOR = "#2ca02c"

# The one table of setups: run in this order, reported and charted in this order.
SCENARIOS = [
    Scenario("bare", "bare Envoy", "no HTTP filter but the router", "#7f7f7f",
             chain=lambda _idp: []),
    Scenario("jwt", "native jwt_authn, no cache",
             "envoy.filters.http.jwt_authn, RS256, local_jwks, no jwt_cache_config", "#1f77b4",
             chain=lambda idp: [jwt_authn_filter(idp, cache=False)]),
    Scenario("jwt_cache", "native jwt_authn + jwt_cache",
             "same, jwt_cache_config { jwt_cache_size: 1000 }", "#1f77b4",
             chain=lambda idp: [jwt_authn_filter(idp, cache=True)]),
    Scenario("noop", "no-op Wasm (floor)",
             "bench/noop-filter: reads `authorization`, sets nothing; built with the proxy-wasm Rust SDK, which exports every callback",
             "#9467bd", chain=noop_chain(NOOP_WASM)),
    Scenario("noop_lean", "no-op Wasm, trimmed exports",
             "the same no-op through the filter's wasm-opt step: only the callbacks the filter exports, so Envoy makes the filter's VM calls per request",
             "#b39bd1", chain=noop_chain(NOOP_LEAN_WASM)),
    Scenario("noop_host", "trimmed no-op + the filter's host calls",
             f"the trimmed no-op configured `{NOOP_HOST_CALLS}`: the VM calls and host calls of the filter's cached full path but for its audit record (all request headers in one call, one header write of an exchanged token's size, one clock reading; the upstream's `:status`, which the filter reads at most every 100 ms per token, is left out) and no logic",
             "#c5b0d5", chain=noop_chain(NOOP_LEAN_WASM, NOOP_HOST_CALLS)),
    # Issue 13's candidates for handing over an audit record, priced without the filter's logic:
    # the row above plus a record of the filter's size, each way.
    Scenario("noop_host_record", "trimmed no-op + host calls + record as filter state",
             "as the row above, plus a ~380-byte record set as the request's filter state and written "
             "by an access log (the `access_log` sink's hand-over)", "#dbc8e0",
             chain=noop_chain(NOOP_LEAN_WASM, f"{NOOP_HOST_CALLS},record"), access_log=True,
             optional=True),
    Scenario("noop_host_log", "trimmed no-op + host calls + record to Envoy's log",
             "as the row above, plus the same record written to Envoy's application log at `info`, "
             "one log call per record", "#dbc8e0",
             chain=noop_chain(NOOP_LEAN_WASM, f"{NOOP_HOST_CALLS},log"), optional=True),
    Scenario("noop_host_batch", "trimmed no-op + host calls + records batched in the VM",
             "as the row above, plus the same record gathered in the VM and written 64 to one "
             "application log message (the filter's default hand-over)", "#dbc8e0",
             chain=noop_chain(NOOP_LEAN_WASM, f"{NOOP_HOST_CALLS},batch"), optional=True),
    # The filter as users run it: the default configuration, audit record per decision batched to
    # Envoy's log. Reported first among the filter rows; the rows after it change one knob.
    Scenario("full_cached", "filter (default): full path, cached",
             "mcp_token_exchange with envoy/demo.yaml's plugin config, one token: every request reuses "
             "the cached exchange and gets its audit record, gathered in the VM and written to "
             "Envoy's log up to 64 records per log call", FILTER_COLOR,
             targets=(Target(1, "default config, full path, exchange cached ÷ no-op Wasm floor (throughput)",
                             "noop", 0.95, "≥ 0.95×"),
                      Target(2, "default config, full path, exchange cached ÷ native `jwt_authn` with cache",
                             "jwt_cache", 0.78, "≥ 0.78×"),
                      Target(3, "default config, full path, exchange cached: p99 latency ÷ no-op floor's p99",
                             "noop", 1.10, "≤ 1.10×", key="p99_us"),
                      Target(5, "*stricter:* default config, full path, exchange cached ÷ trimmed no-op (same VM calls as the filter)",
                             "noop_lean", 0.95, "(≥ 0.95×)"))),
    # The same with a second provider configured (issue 12): compared with the row above in the
    # same run.
    Scenario("full_two_providers", "filter: full path, cached, two providers",
             "same, `providers` with two issuers (the token's is the second in name order), each "
             "with its own keys: provider selection configured", "#17becf",
             patch=TWO_PROVIDERS_PATCH, optional=True,
             targets=(Target(8, "two providers configured ÷ one provider, full path, exchange cached",
                             "full_cached", 0.97, "≥ 0.97×"),)),
    # Extra rows: the same with the audit record off, and through the other sinks, i.e. what each
    # way of writing the record costs.
    Scenario("full_audit_off", "filter: full path, cached, audit off",
             "same, `audit_log: false`: no record at all (like the references, which write none)",
             "#98df8a", patch=AUDIT_OFF_PATCH, optional=True),
    Scenario("full_access_log", "filter: full, cached, audit → access log",
             "same, `audit_log: \"access_log\"`: the record set as the request's filter state and "
             "written by an access log (the format of envoy/README.md; the default before the batch)",
             "#bcbd22", patch=AUDIT_ACCESS_LOG_PATCH, optional=True),
    Scenario("full_envoy_log", "filter: full, cached, audit → Envoy log per record",
             "same, `audit_log: \"envoy_log\"`: one log call per record, at `info` on the worker thread "
             "(the default before the access-log path)",
             "#bcbd22", patch=AUDIT_ENVOY_LOG_PATCH, optional=True),
    # The fleet store (etcd) configured: a local hit never reaches it, so this must equal the
    # default row.
    Scenario("full_cached_fleet", "filter: full, cached, fleet store on",
             "same, with `fleet_store` (etcd on loopback) configured: every request is a local hit "
             "and never reaches etcd", "#17becf", patch=FLEET_PATCH, optional=True, needs_etcd=True),
    Scenario("validate_uncached", "filter: validate-only, uncached",
             "mcp_token_exchange, exchange off, verified-token cache off", FILTER_COLOR,
             patch=merge_patch(VALIDATE_ONLY_PATCH, NO_VERIFY_CACHE_PATCH)
             if VALIDATE_ONLY_PATCH is not None and NO_VERIFY_CACHE_PATCH is not None else None,
             unavailable=knob_missing(NO_VALIDATE_ONLY, (
                 NO_VERIFY_CACHE_PATCH,
                 "n/a until the filter can turn its verified-token cache off (BENCH_NO_VERIFY_CACHE_PATCH)")),
             optional=True,
             targets=(Target(7, "uncached RS256 validation ÷ native `jwt_authn` without cache", "jwt",
                             0.5, "≥ 0.5×", stand_in="full_noverify",
                             stand_in_note=" (proxy until validate-only exists: full path with the verified-token cache off, which adds an exchange-cache hit)"),)),
    Scenario("validate_cached", "filter: validate-only, cached",
             "mcp_token_exchange, exchange off, one token (verified-token cache)", FILTER_COLOR,
             patch=VALIDATE_ONLY_PATCH, unavailable=knob_missing(NO_VALIDATE_ONLY), optional=True,
             targets=(Target(4, "validate cached ÷ no-op Wasm floor", "noop", 0.95, "≥ 0.95×"),
                      Target(6, "*stricter:* validate cached ÷ trimmed no-op", "noop_lean", 0.95,
                             "(≥ 0.95×)"))),
    # The verified-token cache off: what an uncached RS256 verify costs in Wasm.
    Scenario("full_noverify", "filter: full path, verify uncached",
             "same, verified-token cache off: an RS256 verify per request, then the exchange-cache hit",
             "#ff7f0e", patch=NO_VERIFY_CACHE_PATCH,
             unavailable=knob_missing((
                 NO_VERIFY_CACHE_PATCH,
                 "n/a: the filter has no way to turn its verified-token cache off (BENCH_NO_VERIFY_CACHE_PATCH)")),
             optional=True),
    Scenario("full_miss", "filter: full path, exchange miss",
             "mcp_token_exchange, a new token per request: every request exchanges", "#d62728",
             new_token_per_request=True),
    Scenario("fleet_hit", "filter: local miss, fleet store hit",
             "mcp_token_exchange with `fleet_store`, a new token per request, each exchanged "
             "beforehand by another Envoy: every request reads etcd (loopback) instead of asking the IdP",
             "#e377c2", patch=FLEET_PATCH, new_token_per_request=True, needs_etcd=True,
             fleet_reader=True),
]


class Run:
    """One bench run against one IdP: the setups measured so far and what the report needs."""

    def __init__(self, idp: Idp) -> None:
        self.idp = idp
        self.one_token = idp.mint("bench-user")
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []
        self.extra: dict = {}

    def measure(self, sid: str, envoy: Envoy, token: str | None) -> None:
        idp, results = self.idp, self.results
        if ONLY and sid not in ONLY:
            envoy.stop()
            return
        try:
            envoy.probe(token or self.one_token)
            wait_quiet(sid)
            run_wrk(envoy, f"{sid}-warmup", WARMUP, token=token, idp=idp)
            runs = []
            for i in range(REPEATS):
                name = sid if REPEATS == 1 else f"{sid}-{i + 1}"
                r = run_wrk(envoy, name, DURATION, token=token, idp=idp)
                for _ in range(RETRIES):
                    if r["other_cores"] <= 0.2:
                        break
                    log(f"{sid}: disturbed ({r['other_cores']:.2f} cores used by other work); measuring again")
                    wait_quiet(sid)
                    again = run_wrk(envoy, name, DURATION, token=token, idp=idp)
                    if again["other_cores"] < r["other_cores"]:
                        r = again
                runs.append(r)
            # The median run by throughput: one noisy run (the VM's neighbours) moves no ratio.
            r = dict(sorted(runs, key=lambda x: x["rps"])[len(runs) // 2])
            r["rps_runs"] = [round(x["rps"]) for x in runs]
        finally:
            envoy.stop()
        if envoy.audit_records is not None:
            # Every request of the whole run (probe, warm-up, all repeats) against the records
            # written (Envoy's log, or the access log's file) after shutdown.
            r["audit_records"] = envoy.audit_records
            r["requests_served"] = envoy.completed
        results[sid] = r
        log(f"{sid:18} {r['rps']:9.0f} req/s  p50 {r['p50_us']:6.0f} µs  p99 {r['p99_us']:6.0f} µs"
            f"  envoy {r['envoy_cpu_us']:5.1f} µs-cpu/req  cores envoy/wrk/other "
            f"{r['envoy_cores']:.2f}/{r['wrk_cores']:.2f}/{r['other_cores']:.2f}  errors {r['errors']}"
            f"  runs {r['rps_runs']}")

    def filter_envoy(self, name: str, patch=None, concurrency: int = 1) -> Envoy:
        plugin = filter_plugin(self.idp, patch)
        f = wasm_filter("mcp_token_exchange", FILTER_WASM, plugin, [SECRET_ENV, STORE_ENV])
        # The filter's default batches its audit records to Envoy's log; with `audit_log:
        # "access_log"` an access log is configured that writes them.
        return Envoy(name, [f], self.idp, concurrency=concurrency, wait_jwks=True,
                     audit_log=audit_to_access_log(plugin), audit_in_log=audit_to_envoy_log(plugin))

    def setup_envoy(self, s: Scenario) -> Envoy:
        if s.chain is None:
            return self.filter_envoy(s.sid, s.patch)
        return Envoy(s.sid, s.chain(self.idp), self.idp, audit_log=s.access_log)

    def measure_optional(self, s: Scenario) -> None:
        """A filter mode that depends on a config knob: a failure is reported, not fatal."""
        results = self.results
        try:
            self.measure(s.sid, self.setup_envoy(s), self.one_token)
        except BenchError as e:
            results[s.sid] = {"na": f"failed: {str(e).splitlines()[0]}"}
            log(f"{s.sid}: {results[s.sid]['na']}")
        if "rps" in results.get(s.sid, {}):
            results[s.sid]["patch"] = s.patch

    def ensure_etcd(self) -> None:
        if not ETCD_PORT:
            etcd = Etcd()
            log(f"etcd on 127.0.0.1:{etcd.port}")

    def one_token_setups(self) -> None:
        """Every setup of the table that runs with one token, in table order."""
        for s in SCENARIOS:
            if s.new_token_per_request:
                continue
            if s.needs_etcd and (not ONLY or s.sid in ONLY):
                self.ensure_etcd()
            if s.unavailable:
                self.results[s.sid] = {"na": s.unavailable}
            elif s.optional:
                self.measure_optional(s)
            else:
                self.measure(s.sid, self.setup_envoy(s), self.one_token)

    def log_only_summary(self) -> None:
        """BENCH_ONLY's quick loop: the selected setups, nothing else."""
        results = self.results
        base = results.get("bare", {}).get("rps")
        for sid in ONLY:
            r = results.get(sid, {})
            if "rps" in r:
                ratio_txt = f"  ÷ bare {r['rps'] / base:.2f}" if base else ""
                log(f"{sid:18} {r['rps']:9.0f} req/s  envoy {r['envoy_cpu_us']:5.1f} µs-cpu/req{ratio_txt}")
            else:
                log(f"{sid:18} {r.get('na', 'not measured')}")

    def mint_distinct_tokens(self) -> list[str]:
        """Distinct tokens for the exchange-miss run and the RSS measure."""
        log(f"minting {N_TOKENS} distinct tokens ({MINT_THREADS} concurrent admin calls)")
        t0 = time.monotonic()
        tokens = self.idp.mint_many(N_TOKENS, "bench-user")
        mint_s = time.monotonic() - t0
        mint_rate = N_TOKENS / mint_s
        log(f"minted {N_TOKENS} in {mint_s:.0f} s ({mint_rate:.0f}/s)")
        self.extra["mint"] = {"n": N_TOKENS, "seconds": mint_s, "rate": mint_rate}
        return tokens

    def exchange_miss(self, s: Scenario, tokens: list[str]) -> None:
        """The full path with a new token per request. Warm-up and run use disjoint slices of the
        pool."""
        idp = self.idp
        warm_n = min(len(tokens) // 10, 10_000)
        warm_file = write_tokens(RUN / "tokens-miss-warmup.txt", tokens[:warm_n])
        run_file = write_tokens(RUN / "tokens-miss-run.txt", tokens[warm_n:])
        envoy = self.filter_envoy(s.sid, s.patch)
        try:
            envoy.probe(self.one_token)
            wait_quiet(s.sid)
            run_wrk(envoy, f"{s.sid}-warmup", WARMUP, script=ROTATE_LUA, args=[str(warm_file)], idp=idp)
            r = run_wrk(envoy, s.sid, DURATION, script=ROTATE_LUA, args=[str(run_file)], idp=idp)
        finally:
            envoy.stop()
        if envoy.audit_records is not None:
            r["audit_records"] = envoy.audit_records
            r["requests_served"] = envoy.completed
        if r.get("wraps"):
            self.notes.append(f"exchange-miss run: the {r['tokens_loaded']} tokens wrapped {r['wraps']}x, so some "
                              "requests reused a token (raise BENCH_TOKENS)")
        self.results[s.sid] = r
        log(f"{s.sid:18} {r['rps']:9.0f} req/s  p50 {r['p50_us']:6.0f} µs  p99 {r['p99_us']:6.0f} µs"
            f"  IdP calls/request {r['idp_calls'] / max(r['requests'], 1):.3f}  errors {r['errors']}")

    def fleet_hit(self, s: Scenario, tokens: list[str]) -> None:
        """Local misses answered by the fleet store: a writer Envoy exchanges every token of the
        slice once (and writes it to etcd), then a fresh reader Envoy is measured on the same
        tokens."""
        self.ensure_etcd()
        idp = self.idp
        pool = tokens[: min(len(tokens), 60_000)]
        pool_file = write_tokens(RUN / "tokens-fleet.txt", pool)
        writer = self.filter_envoy(f"{s.sid}-writer", s.patch)
        try:
            writer.probe(self.one_token)
            budget = int(len(pool) / 100) + 120
            w = run_wrk(writer, f"{s.sid}-write", budget, script=ROTATE_LUA,
                        args=[str(pool_file), str(len(pool))], idp=idp, stop_when_completed=len(pool))
            time.sleep(2)  # the last writes go out on the writer's next ticks
        finally:
            writer.stop()
        # rotate.lua hands tokens out in order: the reader gets only those the writer exchanged.
        pool = pool[: max(1, min(len(pool), w["requests"] - CONNECTIONS))]
        pool_file = write_tokens(RUN / "tokens-fleet-written.txt", pool)
        reader = self.filter_envoy(s.sid, s.patch)
        try:
            reader.probe(self.one_token)
            wait_quiet(s.sid)
            r = run_wrk(reader, s.sid, DURATION, script=ROTATE_LUA, args=[str(pool_file), str(len(pool))],
                        idp=idp, stop_when_completed=len(pool))
            time.sleep(1)  # counters reach Envoy on the filter's tick
            r["fleet"] = reader.filter_counters("fleet.")
        finally:
            reader.stop()
        self.results[s.sid] = r
        hits = r["fleet"].get("fleet.hits", 0)
        log(f"{s.sid:18} {r['rps']:9.0f} req/s  p50 {r['p50_us']:6.0f} µs  p99 {r['p99_us']:6.0f} µs"
            f"  fleet hits {hits} of {r['requests']} requests, IdP calls {r['idp_calls']}  errors {r['errors']}")

    def idp_calls(self) -> None:
        """IdP calls over 2 workers: one user's 1,000 requests, then 64-request bursts of one fresh
        token (with the IdP's injected latency, and without)."""
        idp, extra = self.idp, self.extra
        envoy = self.filter_envoy("idp_calls", concurrency=2)
        try:
            user_token = idp.mint("bench-one-user")
            before = idp.token_requests()
            cx0 = envoy.worker_connections()
            statuses = sequential_requests(envoy.port, user_token, 1000)
            cx1 = envoy.worker_connections()
            extra["one_user"] = {
                "calls": idp.token_requests() - before,
                "requests": len(statuses),
                "ok": sum(1 for s in statuses if s == 200),
                "spread": [b - a for a, b in zip(cx0, cx1)],
            }
            log(f"1000 requests, one user, 2 workers: {extra['one_user']}")
            for label, delay in (("burst", BURST_DELAY_MS), ("burst_nodelay", 0)):
                if label == "burst_nodelay" and BURST_DELAY_MS == 0:
                    continue
                extra[label] = self.bursts(envoy, label, delay)
                log(f"64 concurrent, one fresh token, 2 workers, IdP +{delay} ms: {extra[label]}")
        finally:
            envoy.stop()

    def bursts(self, envoy: Envoy, label: str, delay: int) -> dict:
        """BURST_TRIALS bursts, each with its own fresh token: a race shows up as an occasional 2."""
        idp = self.idp
        calls, oks, spreads = [], 0, []
        for trial in range(BURST_TRIALS):
            fresh = idp.mint(f"bench-{label}-{trial}")
            idp.set_token_delay(delay)
            try:
                before = idp.token_requests()
                cx0 = envoy.worker_connections()
                statuses = concurrent_burst(envoy.port, fresh, 64)
                time.sleep(0.2)  # a straggling exchange would still be counted
                cx1 = envoy.worker_connections()
                calls.append(idp.token_requests() - before)
            finally:
                idp.set_token_delay(0)
            oks += sum(1 for s in statuses if s == 200)
            spreads.append([b - a for a, b in zip(cx0, cx1)])
        return {
            "calls": max(calls),
            "calls_list": calls,
            "requests": 64 * BURST_TRIALS,
            "ok": oks,
            "spread": spreads,
            "delay_ms": delay,
        }

    def rss(self, tokens: list[str]) -> None:
        """Envoy's RSS after 1k and after N distinct tokens."""
        idp = self.idp
        envoy = self.filter_envoy("rss")
        try:
            envoy.probe(self.one_token)
            rss0 = envoy.rss_kib()
            first = min(1000, len(tokens))
            f1 = write_tokens(RUN / "tokens-rss-1k.txt", tokens[:first])
            r1 = run_wrk(envoy, "rss-1k", 120, script=ROTATE_LUA, args=[str(f1), str(first)], idp=idp,
                         stop_when_completed=first)
            time.sleep(1)
            rss1 = envoy.rss_kib()
            rest = tokens[first:]
            r2 = None
            if rest:
                f2 = write_tokens(RUN / "tokens-rss-rest.txt", rest)
                budget = int(len(rest) / 100) + 120  # >= 100 exchanges/s, or give up
                r2 = run_wrk(envoy, "rss-rest", budget, script=ROTATE_LUA, args=[str(f2), str(len(rest))],
                             idp=idp, stop_when_completed=len(rest))
            time.sleep(1)
            rss2 = envoy.rss_kib()
            hwm = proc_status_kib(envoy.pid, "VmHWM")
            sent = r1["requests"] + (r2["requests"] if r2 else 0)
            calls = r1["idp_calls"] + (r2["idp_calls"] if r2 else 0)
            self.extra["rss"] = {
                "start_kib": rss0, "after_1k_kib": rss1, "after_n_kib": rss2, "hwm_kib": hwm,
                "n": first + len(rest), "requests": sent, "idp_calls": calls,
                "errors": r1["errors"] + (r2["errors"] if r2 else 0),
                "rate": r2["rps"] if r2 else r1["rps"],
            }
            log(f"RSS: start {rss0} KiB, after {first} tokens {rss1} KiB, after {first + len(rest)} "
                f"tokens {rss2} KiB (HWM {hwm} KiB); {sent} requests, {calls} IdP calls")
        finally:
            envoy.stop()


def check_prerequisites() -> None:
    for tool, hint in (("wrk", "apt-get install -y wrk"), ):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found ({hint}; `make bench` installs it)")
    for path, hint in ((ENVOY, "make envoy"), (FILTER_WASM, "make wasm"), (NOOP_WASM, "make bench"), (NOOP_LEAN_WASM, "make bench"),
                       (IDP_BIN, "make services")):
        if not path.exists():
            raise BenchError(f"{path} is missing ({hint})")


def main() -> int:
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(MAX_SECONDS)
    started = time.monotonic()
    check_prerequisites()
    if RUN.exists():
        shutil.rmtree(RUN)
    RUN.mkdir(parents=True)

    facts = machine_facts()
    log(f"{facts['cpu']} x{facts['nproc']}, Envoy {facts['envoy_version']}, "
        f"wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}s (+{WARMUP}s warm-up)")

    idp = Idp()
    log(f"IdP on 127.0.0.1:{idp.port}")
    run = Run(idp)
    run.one_token_setups()
    if ONLY:
        rotating = [s for s in SCENARIOS if s.new_token_per_request and s.sid in ONLY]
        if rotating:
            tokens = run.mint_distinct_tokens()
            for s in rotating:
                (run.fleet_hit if s.fleet_reader else run.exchange_miss)(s, tokens)
        run.log_only_summary()
        return 0

    tokens = run.mint_distinct_tokens()
    for s in SCENARIOS:
        if s.fleet_reader:
            run.fleet_hit(s, tokens)
        elif s.new_token_per_request:
            run.exchange_miss(s, tokens)
    run.idp_calls()
    run.rss(tokens)
    PROCS.stop(idp.proc)

    run.extra["total_s"] = time.monotonic() - started
    md = render_markdown(facts, run.results, run.extra, run.notes)
    (BENCH / "results.md").write_text(md)
    (BENCH / "results.svg").write_text(render_svg(facts, run.results))
    print()
    print(md)
    log(f"done in {run.extra['total_s']:.0f} s; wrote bench/results.md and bench/results.svg "
        f"(raw output in bench/.run/)")
    return 0


# --------------------------------------------------------------------------------------------
# Facts and reports.


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def machine_facts() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = sh([str(ENVOY), "--version"])
    m = re.search(r"version: (\w+)/([\d.]+)/(\w+)/(\w+)/(\w+)", version)
    dirty = sh(["git", "status", "--porcelain", "--", "filter", "Cargo.toml", "Cargo.lock"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "envoy_version": f"{m.group(2)} ({m.group(1)[:12]}, {m.group(4)}, {m.group(5)})" if m else version,
        "wrk": sh(["wrk", "-v"]).splitlines()[0].split(" [")[0] if sh(["wrk", "-v"]) else "?",
        "git": sh(["git", "rev-parse", "--short=12", "HEAD"]) + (" + uncommitted changes in filter/" if dirty else ""),
        "filter_wasm": FILTER_WASM.stat().st_size,
        "filter_sha": sha12(FILTER_WASM),
        "noop_wasm": NOOP_WASM.stat().st_size,
        "noop_sha": sha12(NOOP_WASM),
    }


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def ratio(results: dict, a: str, b: str, key: str = "rps") -> float | None:
    ra, rb = results.get(a, {}), results.get(b, {})
    if key not in ra or key not in rb or not rb[key]:
        return None
    return ra[key] / rb[key]


def cpu_ratio(results: dict, a: str, b: str) -> float | None:
    """`a` compared with `b` by Envoy CPU per request (inverse ratio: higher is better for `a`)."""
    ra, rb = results.get(a, {}), results.get(b, {})
    if "envoy_cpu_us" not in ra or "envoy_cpu_us" not in rb:
        return None
    return rb["envoy_cpu_us"] / ra["envoy_cpu_us"]


def scenario_target_rows(results: dict) -> list[tuple]:
    """The targets of the scenario table as rows of the report's target table (measure, target,
    value, ok, fmt, by_cpu), in the issue's order."""
    rows = []
    for s in SCENARIOS:
        for t in s.targets:
            sid, measure = s.sid, t.measure
            if t.stand_in and "rps" not in results.get(sid, {}) and "rps" in results.get(t.stand_in, {}):
                sid, measure = t.stand_in, measure + t.stand_in_note
            if t.key == "rps":
                ok = lambda v, limit=t.minimum: v >= limit
                by_cpu = cpu_ratio(results, sid, t.baseline)
            else:
                ok = lambda v, limit=t.minimum: v <= limit
                by_cpu = None
            rows.append((t.report_order, (
                measure, t.shown, ratio(results, sid, t.baseline, t.key), ok, fmt_ratio, by_cpu)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def render_markdown(facts: dict, results: dict, extra: dict, notes: list[str]) -> str:
    out = facts_section(facts, extra)
    out += throughput_section(facts, results)
    out += targets_section(facts, results, extra)
    out += idp_and_memory_section(extra, notes)
    return "\n".join(out)


def facts_section(facts: dict, extra: dict) -> list[str]:
    out = []
    out.append("# `make bench` results\n")
    out.append("Ratios, not absolute times, are the result: every number below comes from one run on one "
               "machine, all setups driven the same way. Regenerate with `make bench`.\n")
    out.append("![throughput and p99 latency as ratios to bare Envoy](results.svg)\n")
    out.append("| fact | value |\n|---|---|")
    out += [
        f"| date | {facts['date']} |",
        f"| `nproc` | {facts['nproc']} |",
        f"| CPU | {facts['cpu']} |",
        f"| kernel | {facts['kernel']} |",
        f"| load average at start | {' '.join(facts['loadavg'])} |",
        f"| Envoy | {facts['envoy_version']}, V8 Wasm runtime |",
        f"| load generator | {facts['wrk']}: `-t{THREADS} -c{CONNECTIONS} -d{DURATION}s --latency` after a {WARMUP} s warm-up, {REPEATS} runs per setup (the median by req/s is reported), same for every setup |",
        f"| Envoy | `--concurrency 1 --disable-hot-restart -l info` (2 workers where stated), route = `direct_response` 200, loopback |",
        f"| tree | {facts['git']} |",
        f"| filter `.wasm` (release) | {facts['filter_wasm']:,} bytes ({facts['filter_wasm'] / KIB:.0f} KiB), sha256 {facts['filter_sha']}… |",
        f"| no-op `.wasm` (release) | {facts['noop_wasm']:,} bytes ({facts['noop_wasm'] / KIB:.0f} KiB), sha256 {facts['noop_sha']}… |",
        f"| `make bench` | {extra['total_s'] / 60:.1f} min of measuring (builds not included) |",
    ]
    out.append("")
    return out


def fleet_lines(results: dict) -> list[str]:
    """What the fleet store rows show, next to the rows they are compared with."""
    out = []
    cached, fleet_cached = results.get("full_cached", {}), results.get("full_cached_fleet", {})
    if "rps" in cached and "rps" in fleet_cached:
        out.append(f"Fleet store, cached path: {fleet_cached['rps']:,.0f} req/s with `fleet_store` configured "
                   f"against {cached['rps']:,.0f} without ({fleet_cached['rps'] / cached['rps']:.2f}×; "
                   "a local hit never reaches etcd, so any difference is noise).")
    hit, miss = results.get("fleet_hit", {}), results.get("full_miss", {})
    if "rps" in hit:
        fleet = hit.get("fleet", {})
        line = (f"Fleet store hit (a local miss answered by etcd): {hit['rps']:,.0f} req/s, p50 "
                f"{hit['p50_us']:,.0f} µs, p99 {hit['p99_us']:,.0f} µs; {fleet.get('fleet.hits', 0):,} fleet hits, "
                f"{hit['idp_calls']:,} IdP calls for {hit['requests']:,} requests")
        if "rps" in miss:
            line += (f"; an IdP exchange (the exchange-miss row, loopback IdP): {miss['rps']:,.0f} req/s, "
                     f"p50 {miss['p50_us']:,.0f} µs")
        out.append(line + ".")
    if out:
        out.append("")
    return out


def throughput_section(facts: dict, results: dict) -> list[str]:
    bare = results["bare"]
    out = []
    out.append("## Throughput and latency (1 worker)\n")
    out.append("`Envoy µs/req` = CPU time of the whole Envoy process (all threads) per request served; "
               "`+µs` = that minus bare Envoy's, i.e. what the filter chain costs per request whatever "
               "limits throughput. `cores` = CPU busy during the run (Envoy / wrk): wrk near 1.0 means the "
               "load generator, not Envoy, capped that row, which compresses its throughput ratio toward 1. "
               "`other` = CPU used meanwhile by anything but Envoy, wrk, the IdP and this script "
               "(other tenants, builds): above ~0.2 the row is disturbed.\n")
    out.append("| # | setup | req/s | ÷ bare | p50 µs | ÷ bare | p99 µs | ÷ bare | Envoy µs/req | +µs | cores Envoy / wrk / other | errors | req/s of each run |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, sc in enumerate(SCENARIOS, start=1):
        sid, label = sc.sid, sc.label
        r = results.get(sid, {})
        if "na" in r:
            out.append(f"| {i} | {label} | {r['na']} | | | | | | | | | | |")
            continue
        if "rps" not in r:
            continue
        out.append(
            f"| {i} | {label} | {r['rps']:,.0f} | {r['rps'] / bare['rps']:.2f} | {r['p50_us']:,.0f} | "
            f"{r['p50_us'] / bare['p50_us']:.2f} | {r['p99_us']:,.0f} | {r['p99_us'] / bare['p99_us']:.2f} | "
            f"{r['envoy_cpu_us']:,.1f} | {r['envoy_cpu_us'] - bare['envoy_cpu_us']:+,.1f} | "
            f"{r['envoy_cores']:.2f} / {r['wrk_cores']:.2f} / {r['other_cores']:.2f} | {r['errors']} | "
            f"{', '.join(f'{x:,}' for x in r.get('rps_runs', []))} |"
        )
    out.append("")
    for i, sc in enumerate(SCENARIOS, start=1):
        patch = results.get(sc.sid, {}).get("patch")
        extra_txt = f" Plugin config patch: `{json.dumps(patch)}`." if patch else ""
        out.append(f"{i}. **{sc.label}**: {sc.desc}.{extra_txt}")
    out.append("")
    out.extend(fleet_lines(results))
    out.append("The filter rows run `envoy/demo.yaml`'s plugin configuration"
               + (f" with `{json.dumps(FILTER_PATCH)}`" if FILTER_PATCH else "")
               + " — the filter's default configuration, which writes one audit record per decision "
               "to Envoy's log, gathered in the VM and written up to 64 records per log call — and the "
               "patch named on the row, if any. The references (bare, `jwt_authn`, no-op) write no "
               "per-request record. Envoy logs at `info` (its default), so the filter's other info lines "
               "(one per exchange) are written.")
    audited = [(sc.label, results[sc.sid]) for sc in SCENARIOS
               if "audit_records" in results.get(sc.sid, {})]
    if audited:
        out.append("")
        out.append("Audit records written (Envoy's log, or the access log's file) after Envoy's "
                   "shutdown ÷ requests Envoy served (the "
                   "whole run of the setup: probe, warm-up and every repeat): "
                   + "; ".join(f"{label}: {r['audit_records']:,} / {r['requests_served']:,}"
                               + ("" if r["audit_records"] == r["requests_served"] else " (**differs**)")
                               for label, r in audited if r.get("requests_served") is not None)
                   + ".")
    disturbed = [sc.label for sc in SCENARIOS if results.get(sc.sid, {}).get("other_cores", 0) > 0.2]
    if disturbed:
        out.append("")
        out.append(f"**Warning**: other work used more than 0.2 cores during: {', '.join(disturbed)}. "
                   "Those rows (and ratios built on them) are disturbed; rerun on an idle machine.")
    miss = results.get("full_miss", {})
    if "rps" in miss:
        calls = miss.get("idp_calls", 0) / max(miss["requests"], 1)
        out.append("")
        out.append(
            f"Exchange-miss run: {miss['idp_calls']:,} IdP token calls for {miss['requests']:,} requests "
            f"({calls:.3f} per request); IdP CPU {miss.get('idp_cpu_us', 0):,.0f} µs per request, Envoy "
            f"{miss['envoy_cpu_us']:,.0f} µs, wrk {miss['wrk_cpu_us']:,.0f} µs — on {facts['nproc']} cores "
            "the IdP (RSA sign per exchange) shares the CPU with Envoy and wrk, so this row measures the "
            "exchange round trip more than the filter."
        )
    out.append("")
    return out


def targets_section(facts: dict, results: dict, extra: dict) -> list[str]:
    """The issue's targets: the scenario table's, then the IdP-call, memory and size targets."""
    out = []
    o, b1, rss = extra.get("one_user", {}), extra.get("burst", {}), extra.get("rss", {})
    rss_ratio = rss["after_n_kib"] / rss["after_1k_kib"] if rss.get("after_1k_kib") else None
    wasm_kib = facts["filter_wasm"] / KIB

    def verdict(value, ok) -> str:
        if value is None:
            return "n/a"
        return "**pass**" if ok(value) else "**miss**"

    rows = scenario_target_rows(results) + [
        ("IdP calls: 1,000 requests, one user, 2 workers", "1",
         o.get("calls"), lambda v: v == 1, lambda v: "—" if v is None else f"{v}", None),
        (f"IdP calls: 64 concurrent requests, one fresh token, 2 workers (IdP +{b1.get('delay_ms', 0)} ms; worst of {BURST_TRIALS})", "1",
         b1.get("calls"), lambda v: v == 1, lambda v: "—" if v is None else f"{v}", None),
        (f"Envoy RSS after {rss.get('n', 0):,} distinct tokens ÷ after 1k", "< 2×",
         rss_ratio, lambda v: v < 2, fmt_ratio, None),
        ("release `.wasm` size", "< 700 KiB", wasm_kib, lambda v: v < 700, lambda v: f"{v:.0f} KiB", None),
    ]
    out.append("## Targets\n")
    out.append("Rows 1–3 are the audit issue's (the default configuration, audit record on, against the "
               "floor and `jwt_authn` with cache); the others are issue 4's, now also measured in the default "
               "configuration.\n")
    out.append("The *stricter* rows are not the issue's: they hold the filter against the no-op built the way "
               "the filter is (only the callbacks the filter handles exported, so Envoy makes the same calls "
               "into the VM per request). The filter's own rows gain from that trimming; those rows show what "
               "is left without it.\n")
    out.append("`measured` is the issue's measure (throughput ratio from the same run). `by Envoy CPU` is the "
               "same comparison made from Envoy CPU µs per request (inverse ratio), which does not depend on "
               "whether Envoy or wrk was the bottleneck; when they disagree, trust the CPU view for the "
               "filter's own cost.\n")
    out.append("| measure | target | measured | result | by Envoy CPU |\n|---|---|---:|---|---:|")
    for measure, target, value, ok, fmt, by_cpu in rows:
        out.append(f"| {measure} | {target} | {fmt(value) if value is not None else 'n/a'} | "
                   f"{verdict(value, ok)} | {fmt_ratio(by_cpu) if by_cpu is not None else ''} |")
    out.append("")
    out.append("Context ratios from the same run: "
               f"no-op Wasm ÷ bare {fmt_ratio(ratio(results, 'noop', 'bare'))}, "
               f"no-op Wasm ÷ `jwt_authn` with cache {fmt_ratio(ratio(results, 'noop', 'jwt_cache'))}, "
               f"trimmed no-op ÷ no-op floor {fmt_ratio(ratio(results, 'noop_lean', 'noop'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'noop_lean', 'noop'))}), "
               f"trimmed no-op making the filter's host calls ÷ no-op floor {fmt_ratio(ratio(results, 'noop_host', 'noop'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'noop_host', 'noop'))}): the ceiling for the cached full path, "
               f"which reaches {fmt_ratio(ratio(results, 'full_cached', 'noop_host'))} of it "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_cached', 'noop_host'))}), "
               f"`jwt_authn` without cache ÷ bare {fmt_ratio(ratio(results, 'jwt', 'bare'))}, "
               f"with cache ÷ bare {fmt_ratio(ratio(results, 'jwt_cache', 'bare'))}, "
               f"full path cached ÷ `jwt_authn` without cache {fmt_ratio(ratio(results, 'full_cached', 'jwt'))}, "
               f"full path cached with audit off ÷ no-op floor {fmt_ratio(ratio(results, 'full_audit_off', 'noop'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_audit_off', 'noop'))}), "
               f"÷ `jwt_authn` with cache {fmt_ratio(ratio(results, 'full_audit_off', 'jwt_cache'))}; "
               f"with a log call per record instead ÷ no-op floor {fmt_ratio(ratio(results, 'full_envoy_log', 'noop'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_envoy_log', 'noop'))}), "
               f"÷ `jwt_authn` with cache {fmt_ratio(ratio(results, 'full_envoy_log', 'jwt_cache'))}; "
               f"default (batched to Envoy's log) ÷ audit off {fmt_ratio(ratio(results, 'full_cached', 'full_audit_off'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_cached', 'full_audit_off'))}), "
               f"access log ÷ audit off {fmt_ratio(ratio(results, 'full_access_log', 'full_audit_off'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_access_log', 'full_audit_off'))}), "
               f"a log call per record ÷ audit off {fmt_ratio(ratio(results, 'full_envoy_log', 'full_audit_off'))} "
               f"(by Envoy CPU {fmt_ratio(cpu_ratio(results, 'full_envoy_log', 'full_audit_off'))}).")
    out.append("")
    return out


def idp_and_memory_section(extra: dict, notes: list[str]) -> list[str]:
    out = []
    o, b1, b2, rss = extra.get("one_user", {}), extra.get("burst", {}), extra.get("burst_nodelay"), extra.get("rss", {})
    out.append("## IdP calls and memory\n")
    if o:
        out.append(f"- **1,000 requests, one user, 2 workers**: {o['calls']} IdP token call(s); "
                   f"{o['ok']}/{o['requests']} answered 200; connections per worker {o['spread']} "
                   "(8 clients, a new connection per request).")
    for b in (b1, b2):
        if b:
            out.append(f"- **64 concurrent requests, one fresh token, 2 workers, IdP token endpoint +{b['delay_ms']} ms**: "
                       f"IdP token calls per burst {b['calls_list']} over {len(b['calls_list'])} bursts (each a new "
                       f"token; the worst, {b['calls']}, is the measured value); {b['ok']}/{b['requests']} answered "
                       f"200; connections per worker {b['spread']} (64 connections opened first, requests "
                       "released together).")
    if b1.get("delay_ms"):
        out.append(f"  The +{b1['delay_ms']} ms (the IdP's fault API) stands in for a real IdP's latency; on "
                   "loopback an exchange takes ~1–3 ms, so without it part of a burst lands after the first "
                   "exchange finished and coalescing is barely exercised.")
    if rss:
        out.append(f"- **Envoy RSS (1 worker)**: {rss['start_kib'] / KIB:.1f} MiB after start, "
                   f"{rss['after_1k_kib'] / KIB:.1f} MiB after 1,000 distinct tokens, "
                   f"{rss['after_n_kib'] / KIB:.1f} MiB after {rss['n']:,} (peak {rss['hwm_kib'] / KIB:.1f} MiB); "
                   f"{rss['requests']:,} requests, {rss['idp_calls']:,} IdP calls, {rss['errors']} errors, "
                   f"~{rss['rate']:,.0f} req/s while filling.")
    m = extra.get("mint", {})
    if m:
        out.append(f"- Minting the {m['n']:,} tokens through the IdP admin API took {m['seconds']:.0f} s "
                   f"({m['rate']:,.0f}/s, {MINT_THREADS} concurrent calls; one RSA-2048 signature each).")
    for n in notes:
        out.append(f"- Note: {n}")
    out.append("")
    out.append("Native `jwt_authn` checks issuer, audience, time and signature only; the filter also checks "
               "the required scope and rewrites `Authorization`. Raw wrk output, Envoy configs and logs of "
               "the last run: `bench/.run/`. Chart: `bench/results.svg`.")
    out.append("")
    return out


def render_svg(facts: dict, results: dict) -> str:
    rows = []
    for sc in SCENARIOS:
        r = results.get(sc.sid, {})
        if "rps" in r:
            rows.append((sc.label, r["rps"] / results["bare"]["rps"], r["p99_us"] / results["bare"]["p99_us"]))
        else:
            rows.append((sc.label, None, None))
    W, label_w, panel_w, gap = 980, 270, 300, 60
    row_h, top = 30, 78
    H = top + row_h * len(rows) + 56
    x1 = label_w
    x2 = label_w + panel_w + gap
    max_tp = max([1.0] + [t for _, t, _ in rows if t is not None]) * 1.1
    p99s = [p for _, _, p in rows if p is not None]
    import math
    lo, hi = 0.5, max([2.0] + p99s) * 1.3
    llo, lhi = math.log10(lo), math.log10(hi)

    def xp(v: float) -> float:
        return x2 + (math.log10(max(v, lo)) - llo) / (lhi - llo) * panel_w

    e = html.escape
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="12" y="22" font-size="15" font-weight="bold">make bench — ratios to bare Envoy '
         f'(1 worker, wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}s)</text>',
         f'<text x="12" y="40" fill="#555">{e(facts["date"])} · {e(facts["cpu"])} ×{facts["nproc"]} · '
         f'Envoy {e(facts["envoy_version"])} · filter .wasm {facts["filter_wasm"] / KIB:.0f} KiB</text>',
         f'<text x="{x1}" y="{top - 12}" font-weight="bold">throughput ÷ bare (higher is better)</text>',
         f'<text x="{x2}" y="{top - 12}" font-weight="bold">p99 latency ÷ bare (log scale, lower is better)</text>']
    for i, ((label, tp, p99), scenario) in enumerate(zip(rows, SCENARIOS)):
        y = top + i * row_h
        color = scenario.color
        s.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{e(label)}</text>')
        if tp is None:
            s.append(f'<text x="{x1 + 4}" y="{y + 17}" fill="#999">n/a (no such mode in the filter yet)</text>')
            continue
        w = tp / max_tp * panel_w
        s.append(f'<rect x="{x1}" y="{y + 5}" width="{w:.1f}" height="{row_h - 10}" fill="{color}"/>')
        s.append(f'<text x="{x1 + w + 4:.1f}" y="{y + 17}">{tp:.2f}</text>')
        xv = xp(p99)
        x0 = xp(1.0)
        left, width = (x0, xv - x0) if xv >= x0 else (xv, x0 - xv)
        s.append(f'<rect x="{left:.1f}" y="{y + 5}" width="{max(width, 1):.1f}" height="{row_h - 10}" '
                 f'fill="{color}" opacity="0.6"/>')
        s.append(f'<text x="{max(xv, x0) + 4:.1f}" y="{y + 17}">{p99:.2f}</text>')
    bottom = top + row_h * len(rows)
    # Axes and reference lines at 1.0.
    x_one = x1 + 1.0 / max_tp * panel_w
    s.append(f'<line x1="{x1}" y1="{top}" x2="{x1}" y2="{bottom}" stroke="#333"/>')
    s.append(f'<line x1="{x_one:.1f}" y1="{top}" x2="{x_one:.1f}" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/>')
    s.append(f'<text x="{x_one:.1f}" y="{bottom + 16}" text-anchor="middle">1.0 = bare</text>')
    s.append(f'<line x1="{xp(1.0):.1f}" y1="{top}" x2="{xp(1.0):.1f}" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/>')
    for tick in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if lo <= tick <= hi:
            s.append(f'<text x="{xp(tick):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#555">{tick:g}×</text>')
    s.append(f'<text x="12" y="{H - 12}" fill="#555">grey: bare · blue: native jwt_authn · purple: no-op Wasm floor · '
             'green: this filter (cached; light: audit off; olive: audit in Envoy log) · orange: verify uncached · red: every request a new token (exchange miss)</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
    except SystemExit as e:
        print(e, file=sys.stderr)
    finally:
        PROCS.stop_all()
        signal.alarm(0)
        # The token lists are large (100k × ~760 bytes, several files) and useless once the IdP,
        # whose keys signed them, is gone.
        for f in RUN.glob("tokens-*.txt"):
            f.unlink(missing_ok=True)
    sys.exit(code)
