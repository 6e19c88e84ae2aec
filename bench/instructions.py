#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: a cost that a busy machine does not disturb.

`make bench` measures throughput, which other work on the machine moves by tens of percent.
This runs Envoy under `valgrind --tool=callgrind` for each setup twice, serving N0 and N1
requests with one cached token over one keep-alive connection, and reports
(Ir(N1) - Ir(N0)) / (N1 - N0): the instructions Envoy (all threads, the Wasm VM's compiled code
included) executes per request, startup cancelled out. Instructions are not time (V8's code,
caches and system calls differ), and timer-driven work (stats flushes, the filter's tick) grows
with the wall time a run takes under valgrind, so two runs differ by a few percent; this ranks
setups and shows what a change costs, while throughput ratios still come from `make bench` on an
idle machine.

Setups: the no-op Wasm floor, the floor with the audit access log of envoy/demo.yaml configured,
the filter with `audit_log: false`, and the filter's default (audit record in the access log).
Writes bench/instructions.md. ~15 min on 2 cores (each Envoy start under valgrind ~2 min).
Usage: python3 bench/instructions.py [setup ...]
"""

import http.client
import importlib.util
import json
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

N0, N1 = 200, int(os.environ.get("INSTR_REQUESTS", "1200"))
RUN = b.RUN / "instructions"


def envoy_binary() -> Path:
    """The real binary behind the venv's `envoy` entry point (valgrind needs the ELF file)."""
    found = sorted((b.ROOT / ".venv").glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise SystemExit("Envoy's binary not found under .venv (make envoy)")
    return found[0]


def setups(idp, which):
    filt = lambda patch: [b.wasm_filter("mcp_token_exchange", b.FILTER_WASM, b.filter_plugin(idp, patch),
                                        [b.SECRET_ENV, b.STORE_ENV])]
    table = [
        ("noop", "no-op Wasm (floor)", b.noop_chain(b.NOOP_WASM)(idp), False),
        ("noop_access_log", "no-op Wasm + the audit access log", b.noop_chain(b.NOOP_WASM)(idp), True),
        ("filter_audit_off", "filter: full path, cached, audit off", filt(b.AUDIT_OFF_PATCH), False),
        ("filter_default", "filter (default): full path, cached", filt(None), True),
    ]
    return [s for s in table if not which or s[0] in which]


def count(binary: Path, name: str, filters, access_log: bool, idp, token: str, n: int) -> int:
    port, admin = b.free_port(), b.free_port()
    cfg = RUN / f"{name}.json"
    audit = RUN / f"audit-{name}.log" if access_log else None
    cfg.write_text(json.dumps(b.bootstrap(port, admin, filters, idp, audit)))
    out = RUN / f"callgrind-{name}-{n}.out"
    env = dict(os.environ, **{b.SECRET_ENV: b.SECRET, b.STORE_ENV: b.STORE_KEY})
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--smc-check=all-non-file",
         binary, "-c", cfg, "--concurrency", "1", "--disable-hot-restart", "-l", "warning"],
        stdout=subprocess.DEVNULL, stderr=open(RUN / f"{name}-{n}.log", "w"), env=env)
    headers = {"authorization": f"Bearer {token}"}
    deadline = time.time() + 900
    while True:  # the first request also fills the filter's caches (JWKS, exchange)
        try:
            if b.http_call(port, "GET", "/x", headers=headers, timeout=60)[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{name}: Envoy under valgrind did not serve; see {RUN}/{name}-{n}.log")
        time.sleep(1)
    time.sleep(2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        conn.request("GET", "/x", headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"{name}: a request got {resp.status}")
    time.sleep(1)
    b.http_call(admin, "POST", "/quitquitquit")
    proc.wait(timeout=900)
    totals = subprocess.run(["callgrind_annotate", out], capture_output=True, text=True).stdout
    m = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", totals)
    if not m:
        raise SystemExit(f"{name}: no totals in {out}")
    return int(m.group(1).replace(",", ""))


def main() -> int:
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found (apt-get install -y valgrind)")
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    binary = envoy_binary()
    idp = b.Idp()
    token = b.Run(idp).one_token
    rows = []
    try:
        for sid, label, filters, access_log in setups(idp, sys.argv[1:]):
            small = count(binary, sid, filters, access_log, idp, token, N0)
            large = count(binary, sid, filters, access_log, idp, token, N1)
            per = (large - small) / (N1 - N0)
            rows.append((sid, label, per))
            b.log(f"{sid:18} {per:10,.0f} instructions/request")
    finally:
        b.PROCS.stop(idp.proc)
    floor = next((p for s, _, p in rows if s == "noop"), None)
    lines = ["# Instructions per request (callgrind)", "",
             f"`python3 bench/instructions.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"tree {b.sh(['git', 'rev-parse', '--short=12', 'HEAD']).strip()}: Envoy 1.40 under "
             f"`valgrind --tool=callgrind`, 1 worker, one cached token, (Ir({N1}) − Ir({N0})) ÷ {N1 - N0}. "
             "Far steadier than throughput on a shared machine, not exact: timer-driven work (stats "
             "flushes, the filter's tick) grows with wall time under valgrind, and two runs of the "
             "same tree differed by up to ~6 % per setup (the floor: 131.7k and 140.1k). They are "
             "not times.", "",
             "| setup | instructions / request | ÷ floor's |", "|---|---:|---:|"]
    for _, label, per in rows:
        ratio = f"{per / floor:.3f}" if floor else ""
        lines.append(f"| {label} | {per:,.0f} | {ratio} |")
    (HERE / "instructions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
