"""HTTP keep-alive requests/s: direct vs ambassador vs HAProxy vs nginx, side by side.

    python bench/http_rps.py [--duration 5] [--rounds 3] [--connections 50]
                             [--access-log] [--before DIR ...]

One run, same machine.  The upstream is nginx answering 100 bytes (a Python server
if nginx is missing) pinned to the last core; each proxy is pinned to core 0 with
one worker/thread; the load generator is ``wrk`` (installed from Debian when
missing and run as root) on the remaining cores.  Printed per proxy: wall
requests/s, **requests/s per proxy core** (requests divided by the CPU seconds the
proxy process used, which stays meaningful on a busy machine), p50/p99 at
``--connections``, p50 at one connection and what the hop adds to it, and each
ratio to HAProxy, and the proxy's CPU time per request.  Rounds are interleaved
across the targets, so load from elsewhere on the machine hits each alike.
``--access-log`` adds the ambassador with its access log on (the SPEC default;
lines to a file, as twistd -n writes them to stdout); ``--before DIR`` adds the
ambassador from another source tree (``git archive REV ambassador twisted | tar
-x -C DIR``) for a before/after in one run.  Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import freePort, waitForPort

BODY = b"x" * 100


def ensureTools() -> None:
    missing = [p for p, b in (("wrk", "wrk"), ("nginx-light", "nginx")) if shutil.which(b) is None
               and not os.path.exists(f"/usr/sbin/{b}")]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} from Debian ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def which(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def cpuSeconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def withChildren(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid, *(int(p) for p in out.split())]


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def load(port: int, connections: int, duration: float, loadCores: str) -> dict[str, float]:
    """One wrk run: requests, wall requests/s, p50 and p99 in ms."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               f"http://127.0.0.1:{port}/"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", loadCores, *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  (port {port}: {errors.group(1)} non-2xx answers)")
    return {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)$", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)$", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--access-log", action="store_true",
                        help="also run the ambassador with its access log on (the SPEC default)")
    parser.add_argument("--before", metavar="DIR", action="append", default=[],
                        help="also run the ambassador from another source tree (its ambassador/ "
                             "and twisted/plugins/ first on PYTHONPATH), e.g. "
                             "git archive REV ambassador twisted | tar -x -C DIR; repeatable")
    args = parser.parse_args()
    ensureTools()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    cores = os.cpu_count() or 1
    proxyCore = "0"
    upstreamCore = str(cores - 1)
    loadCores = ",".join(str(c) for c in range(1, cores)) or "0"
    pin = (lambda core: ["taskset", "-c", core]) if shutil.which("taskset") else (lambda core: [])
    tmp = Path(tempfile.mkdtemp(prefix="http-bench-"))
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        processes.append(p)
        return p

    nginx = which("nginx")
    upstreamPort = freePort()
    temps = " ".join(f"{k}_temp_path {tmp}/{k};" for k in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    if nginx:
        (tmp / "upstream.conf").write_text(f"""
daemon off; worker_processes 1; pid {tmp}/upstream.pid; error_log {tmp}/upstream-error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000; {temps}
  server {{ listen 127.0.0.1:{upstreamPort}; location / {{ return 200 "{BODY.decode()}"; }} }} }}
""")
        start([*pin(upstreamCore), nginx, "-c", str(tmp / "upstream.conf"), "-p", str(tmp)], "upstream")
    else:
        print("nginx is missing: the upstream is a Python server (slower; direct numbers suffer)")
        start([*pin(upstreamCore), sys.executable, "-c", _PY_UPSTREAM, str(upstreamPort)], "upstream")
    waitForPort(upstreamPort)

    targets: dict[str, tuple[int, list[int]]] = {"direct": (upstreamPort, [])}

    def ambassador(name: str, accessLog: bool, source: str | None = None) -> None:
        port = freePort()
        (tmp / f"{name}.toml").write_text(f"""
[[route]]
name = "bench"
protocol = "http"
listen = "tcp:{port}"
upstreams = ["tcp:127.0.0.1:{upstreamPort}"]
access_log = {'true' if accessLog else 'false'}
""")
        env = None
        if source is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(source).resolve()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        log = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen(
            [*pin(proxyCore), sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "ambassador", "--admin", "none", "--config", str(tmp / f"{name}.toml")],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        processes.append(p)
        waitForPort(port)
        targets[name] = (port, [p.pid])

    ambassador("ambassador", False)
    if args.access_log:
        ambassador("amb+log", True)
    for i, source in enumerate(args.before):
        ambassador("before" if len(args.before) == 1 else f"before{i + 1}", False, source)
        if args.access_log:
            ambassador("before+log" if len(args.before) == 1 else f"before{i + 1}+log", True, source)

    haproxy = which("haproxy")
    if haproxy:
        haproxyPort = freePort()
        (tmp / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:{haproxyPort}
  default_backend b
backend b
  server s1 127.0.0.1:{upstreamPort}
""")
        hp = start([*pin(proxyCore), haproxy, "-f", str(tmp / "haproxy.cfg"), "-db"], "haproxy")
        waitForPort(haproxyPort)
        targets["haproxy"] = (haproxyPort, [hp.pid])
    if nginx:
        nginxPort = freePort()
        (tmp / "proxy.conf").write_text(f"""
daemon off; worker_processes 1; pid {tmp}/proxy.pid; error_log {tmp}/proxy-error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000; {temps}
  upstream u {{ server 127.0.0.1:{upstreamPort}; keepalive 128; }}
  server {{ listen 127.0.0.1:{nginxPort};
    location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
        ng = start([*pin(proxyCore), nginx, "-c", str(tmp / "proxy.conf"), "-p", str(tmp)], "nginx")
        waitForPort(nginxPort)
        time.sleep(0.3)
        targets["nginx"] = (nginxPort, withChildren(ng.pid))

    results: dict[str, dict[str, float]] = {}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    single: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for port, _ in targets.values():
            load(port, args.connections, 1.0, loadCores)  # warm up: pools, caches
        # Rounds interleaved across the targets, so that load from elsewhere on the
        # machine, which comes and goes, hits every target alike.
        for i in range(args.rounds):
            for name, (port, pids) in targets.items():
                before = cpuSeconds(pids)
                run = load(port, args.connections, args.duration, loadCores)
                used = cpuSeconds(pids) - before
                run["perCore"] = run["requests"] / used if used > 0 else float("nan")
                rounds[name].append(run)
                single[name].append(load(port, 1, max(2.0, args.duration / 2), loadCores)["p50"])
            print(f"  round {i + 1}/{args.rounds} done", flush=True)
        for name in targets:
            results[name] = {
                key: statistics.median(r[key] for r in rounds[name])
                for key in ("rps", "perCore", "p50", "p99")
            }
            results[name]["p50c1"] = statistics.median(single[name])
            results[name]["cpuUs"] = 1e6 / results[name]["perCore"]
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    direct = results["direct"]["p50c1"]
    base = results.get("haproxy")
    print(f"\n{args.connections} keep-alive connections, {args.rounds} rounds of {args.duration:g}s "
          f"(medians); proxies pinned to core {proxyCore}; {cores} cores; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'target':<11}{'req/s':>9}{'req/s/core':>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'p50@1c ms':>11}{'added':>8}{'CPU us/req':>11}{'x HAProxy/core':>16}")
    for name, r in results.items():
        perCore = "-" if name == "direct" else f"{r['perCore']:.0f}"
        added = "-" if name == "direct" else f"{r['p50c1'] - direct:+.3f}"
        cpu = "-" if name == "direct" else f"{r['cpuUs']:.0f}"
        ratio = ("-" if base is None or name == "direct"
                 else f"{r['perCore'] / base['perCore']:.2f}")
        print(f"{name:<11}{r['rps']:>9.0f}{perCore:>12}{r['p50']:>9.2f}{r['p99']:>9.2f}"
              f"{r['p50c1']:>11.3f}{added:>8}{cpu:>11}{ratio:>16}")
    print("\nGoals (issue 4): ambassador >= 0.25 x HAProxy req/s per core; added p50 at one "
          "connection <= 0.3 ms.")


_PY_UPSTREAM = r"""
import asyncio, sys
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf.rsplit(b"\r\n\r\n", 1)[1]
            self.t.write(RESPONSE * n)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""

if __name__ == "__main__":
    main()
