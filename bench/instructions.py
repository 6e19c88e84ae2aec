#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: a cost that a busy machine does not disturb.

`make bench` measures throughput, which other work on the machine moves by tens of percent.
This runs each setup's Envoy under `valgrind --tool=callgrind` with counting off while it starts
(so a start takes seconds, not minutes), fills its caches and warms it up (V8 compiles the
module's hot functions), then counts two windows of N0 and N1 requests with one cached token over
one keep-alive connection (`callgrind_control` zeroes and dumps the counters around each) and
reports (Ir(N1) - Ir(N0)) / (N1 - N0): the instructions Envoy (all threads, the Wasm VM's compiled
code included) executes per request, the windows' fixed costs cancelled out.

Work that runs on timers (Envoy's own, the filter's 500 ms tick) does not cancel out: it grows
with a window's wall time, and under callgrind Envoy serves ~200 requests a second instead of
thousands, so a tick's cost lands on ~100 requests instead of ~4,000. An idle window (no requests
for IDLE_WINDOW_S) measures that work per second, and each setup's figure has it taken out:
(Ir(N1) - Ir(N0) - idle rate x (t(N1) - t(N0))) / (N1 - N0). The table also shows the figure
without that correction and the idle rate itself. Repeated windows of
one Envoy agree within ~0.5 %. Instructions are not time (V8's code, caches and system calls
differ); this ranks setups and shows what a change costs, while throughput ratios still come from
`make bench` on an idle machine.

Setups: every one-token setup of bench.py's table, the same configurations `make bench` runs
(among them the three ways of handing over an audit record, priced on the no-op).
Writes bench/instructions.md. ~10 min on 2 cores.
Usage: python3 bench/instructions.py [setup ...]
"""

import http.client
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
b = importlib.util.module_from_spec(spec)
sys.modules["bench"] = b
spec.loader.exec_module(b)

WARM_UP = 500
N0, N1 = 500, int(os.environ.get("INSTR_REQUESTS", "2500"))
IDLE_WINDOW_S = 5.0
RUN = b.RUN / "instructions"
# Under valgrind with counting off an Envoy starts in ~10 s on an idle machine.
START_TIMEOUT_S = 300


def envoy_binary() -> Path:
    """The real binary behind the venv's `envoy` entry point (valgrind needs the ELF file)."""
    found = sorted((b.ROOT / ".venv").glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise SystemExit("Envoy's binary not found under .venv (make envoy)")
    return found[0]


def setups(which):
    """(id, label, description, envoy factory) in report order."""
    table = []
    for s in b.SCENARIOS:
        if s.new_token_per_request or s.needs_etcd or s.unavailable:
            continue
        table.append((s.sid, s.label, s.desc, s))
    return [t for t in table if not which or t[0] in which]


def start(run, sid, how) -> "b.Envoy":
    out = RUN / f"callgrind-{sid}.%p.out"
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file",
               f"--callgrind-out-file={out}")
    if how.chain is None:
        plugin = b.filter_plugin(run.idp, how.patch)
        f = b.wasm_filter("mcp_token_exchange", b.FILTER_WASM, plugin, [b.SECRET_ENV, b.STORE_ENV])
        return b.Envoy(sid, [f], run.idp, wait_jwks=True,
                       audit_log=b.audit_to_access_log(plugin), wrapper=wrapper,
                       start_timeout=START_TIMEOUT_S)
    return b.Envoy(sid, how.chain(run.idp), run.idp, audit_log=how.access_log, wrapper=wrapper,
                   start_timeout=START_TIMEOUT_S)


def requests(conn: http.client.HTTPConnection, token: str, n: int, sid: str) -> None:
    headers = {"authorization": f"Bearer {token}"}
    for _ in range(n):
        conn.request("GET", "/mcp", headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"{sid}: a request got {resp.status}")


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def window(envoy, conn, token: str, n: int, sid: str) -> tuple[int, float]:
    """Instructions Envoy executed while serving `n` requests (none: sitting idle for
    IDLE_WINDOW_S), and the window's wall time in seconds."""
    before = set(RUN.glob(f"callgrind-{sid}.{envoy.pid}.out.*"))
    callgrind_control(envoy.pid, "--zero")
    started = time.monotonic()
    if n:
        requests(conn, token, n, sid)
    else:
        time.sleep(IDLE_WINDOW_S)
    seconds = time.monotonic() - started
    callgrind_control(envoy.pid, "--dump")
    deadline = time.time() + 60
    while True:
        new = set(RUN.glob(f"callgrind-{sid}.{envoy.pid}.out.*")) - before
        for path in new:
            m = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
            if m:
                return int(m.group(1)), seconds
        if time.time() > deadline:
            raise SystemExit(f"{sid}: callgrind wrote no dump")
        time.sleep(0.2)


def count(run, sid: str, how, token: str) -> float:
    envoy = start(run, sid, how)
    try:
        envoy.probe(token)  # also fills the filter's caches (JWKS, exchange)
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=60)
        requests(conn, token, WARM_UP, sid)
        callgrind_control(envoy.pid, "--instr=on")
        idle, idle_s = window(envoy, conn, token, 0, sid)
        (small, small_s), (large, large_s) = (window(envoy, conn, token, n, sid) for n in (N0, N1))
        per_second = idle / idle_s
        per_request = (large - small - per_second * (large_s - small_s)) / (N1 - N0)
        b.log(f"{sid}: idle {per_second:,.0f} instructions/s; windows {small_s:.1f} s, {large_s:.1f} s; "
              f"uncorrected {(large - small) / (N1 - N0):,.0f} instructions/request")
        return per_request, per_second, (large - small) / (N1 - N0)
    finally:
        b.PROCS.stop(envoy.proc)


def report(rows) -> str:
    floor = next((r[3] for r in rows if r[0] == "noop"), None)
    lines = ["# Instructions per request (callgrind)", "",
             f"`python3 bench/instructions.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"tree {b.sh(['git', 'rev-parse', '--short=12', 'HEAD']).strip()}: Envoy 1.40 under "
             "`valgrind --tool=callgrind`, 1 worker, one cached token, counted in two windows after "
             f"a warm-up: (Ir({N1} requests) − Ir({N0} requests) − idle rate × the windows' "
             f"difference in wall time) ÷ {N1 - N0}, the idle rate being what Envoy executes per second "
             f"with no traffic (timers: Envoy's own, the filter's tick), measured over "
             f"{IDLE_WINDOW_S:.0f} s. Under callgrind Envoy serves ~200 requests/s, so without that "
             "correction a timer's work would land on ~20× fewer requests than at real throughput. "
             "On an idle machine "
             "repeated windows of one Envoy agree within ~0.5 %; under load, timer-driven work "
             "grows with the windows' wall time (a run beside `make test` counted ~2 % more). "
             "Not times: a ratio here is not a throughput ratio (`make bench`), but a change "
             "that removes instructions removes work.", "",
             "| setup | instructions / request | ÷ floor's | − floor's | uncorrected | idle instructions / s |",
             "|---|---:|---:|---:|---:|---:|"]
    for _, label, _, per, idle_rate, uncorrected in rows:
        ratio = f"{per / floor:.3f}" if floor else ""
        extra = f"{per - floor:+,.0f}" if floor else ""
        lines.append(f"| {label} | {per:,.0f} | {ratio} | {extra} | {uncorrected:,.0f} | {idle_rate:,.0f} |")
    lines += ["", "Setups:", ""]
    lines += [f"- **{label}**: {desc}." for _, label, desc, *_ in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found (apt-get install -y valgrind)")
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    b.ENVOY = envoy_binary()
    idp = b.Idp()
    rows = []
    try:
        run = b.Run(idp)
        for sid, label, desc, how in setups(sys.argv[1:]):
            per, idle_rate, uncorrected = count(run, sid, how, run.one_token)
            rows.append((sid, label, desc, per, idle_rate, uncorrected))
            b.log(f"{sid:22} {per:10,.0f} instructions/request")
    finally:
        b.PROCS.stop(idp.proc)
    text = report(rows)
    if not sys.argv[1:]:
        (HERE / "instructions.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
