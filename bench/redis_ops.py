#!/usr/bin/env python3
"""Redis ops/s: direct vs ambassador's ``line:redis`` route vs twemproxy (nutcracker)
vs HAProxy ``mode tcp``.

Why: twemproxy is what an operator would otherwise put in front of redis to get
pooling and key hashing; HAProxy's TCP relay parses nothing and is the ceiling a
protocol-aware proxy approaches.  One run starts one redis-server, each proxy pinned
to one core with ``taskset`` (redis-server and redis-benchmark on the other cores
when there are any), and runs ``redis-benchmark -t get,set -c 50`` unpipelined
(``-P 1``) and pipelined (``-P 16``) against each, printing ops/s and the ratios
ambassador/twemproxy and ambassador/direct.  The ambassador route runs with
``access_log = false`` (an access line per redis command is a cost of its own).

Every child process is bounded in time and killed by its pid on the way out.
Timings are printed, never asserted: this is not a test.

    python bench/redis_ops.py            # ~1 min
    python bench/redis_ops.py --quick    # a smoke run
    python bench/redis_ops.py --line-rev 5b80710~1   # also the line route as of a revision

``--line-rev`` runs a second ambassador ("ambassador-REV") whose
``ambassador/protocols/line`` is taken from that git revision and everything else
from the working tree: a before/after of the line route in one run, under the
same load.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ports import freePort, waitForPort

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_children: list[subprocess.Popen[bytes]] = []


def spawn(
    command: list[str], cpus: str | None, log: Path, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    if cpus is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               env=env, cwd=cwd)
    _children.append(process)
    return process


@atexit.register
def _killChildren() -> None:
    for process in _children:
        if process.poll() is None:
            process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass


def lineOverlay(rev: str, tmp: Path) -> Path:
    """A copy of the working tree's ``ambassador`` package and plugins with the line
    route's files as of ``rev``: put first on PYTHONPATH, it runs the old line route
    on today's core."""
    repo = Path(__file__).resolve().parent.parent
    root = tmp / "overlay"
    shutil.copytree(repo / "ambassador", root / "ambassador",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "twisted", root / "twisted", ignore=shutil.ignore_patterns("__pycache__", "*.cache"))
    line = root / "ambassador" / "protocols" / "line"
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", f"{rev}:ambassador/protocols/line"],
                           capture_output=True, check=True, text=True).stdout.split()
    for path in line.glob("*.py"):
        path.unlink()
    for name in names:
        if name.endswith(".py"):
            (line / name).write_bytes(subprocess.run(
                ["git", "-C", str(repo), "show", f"{rev}:ambassador/protocols/line/{name}"],
                capture_output=True, check=True).stdout)
    return root


def cpuSeconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def benchmark(port: int, pipeline: int, requests: int, cpus: str | None) -> dict[str, float]:
    command = ["redis-benchmark", "-p", str(port), "-t", "get,set", "-c", "50",
               "-n", str(requests), "-P", str(pipeline), "--csv"]
    if cpus is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]
    try:
        out = subprocess.run(command, capture_output=True, timeout=120, check=False).stdout
    except subprocess.TimeoutExpired:
        return {}
    rows = list(csv.reader(io.StringIO(out.decode(errors="replace"))))
    return {row[0]: float(row[1]) for row in rows if len(row) > 1 and row[0] in ("SET", "GET")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat each measurement, interleaved across targets; medians shown")
    parser.add_argument("--hash", action="store_true",
                        help="two redis-servers behind balance = \"hash\" (twemproxy: ketama over "
                             "both); direct and HAProxy, which cannot hash keys, are left out")
    parser.add_argument("--line-rev", metavar="REV",
                        help="also run the line route as of this git revision (before/after)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        sys.exit("needs redis-server and redis-benchmark (apt-get install redis-server redis-tools)")
    cores = os.cpu_count() or 1
    proxyCpu = "0"
    otherCpus = f"1-{cores - 1}" if cores > 1 else None
    tmp = Path(tempfile.mkdtemp(prefix="redis-bench-"))
    redisPorts = [freePort() for _ in range(2 if args.hash else 1)]
    for i, port in enumerate(redisPorts):
        spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"], otherCpus, tmp / f"redis{i}.log")
        waitForPort(port)
    redisPort = redisPorts[0]

    targets: dict[str, int] = {} if args.hash else {"direct": redisPort}
    upstreams = ", ".join(f'"tcp:127.0.0.1:{port}"' for port in redisPorts)

    ambPort = freePort()
    (tmp / "ambassador.toml").write_text(
        f'[[route]]\nname = "bench"\nprotocol = "line"\ndialect = "redis"\n'
        f'listen = "tcp:{ambPort}"\nupstreams = [{upstreams}]\naccess_log = false\n'
        + ('balance = "hash"\n' if args.hash else '')
    )
    pids: dict[str, int] = {}
    pids["ambassador"] = spawn([*TWISTD, "-n", "--pidfile=", "ambassador", "--admin", "none", "--config",
                                str(tmp / "ambassador.toml")], proxyCpu, tmp / "ambassador.log").pid
    waitForPort(ambPort)
    targets["ambassador"] = ambPort

    if args.line_rev:
        overlay = lineOverlay(args.line_rev, tmp)
        oldPort = freePort()
        (tmp / "before.toml").write_text(
            (tmp / "ambassador.toml").read_text().replace(f"tcp:{ambPort}", f"tcp:{oldPort}"))
        env = dict(os.environ, PYTHONPATH=f"{overlay}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        name = f"amb-{args.line_rev}"[:14]
        pids[name] = spawn([*TWISTD, "-n", "--pidfile=", "ambassador", "--admin", "none", "--config",
                            str(tmp / "before.toml")], proxyCpu, tmp / "before.log", env=env, cwd=overlay).pid
        waitForPort(oldPort)
        targets[name] = oldPort

    if shutil.which("nutcracker"):
        twemPort, statsPort = freePort(), freePort()
        (tmp / "nutcracker.yml").write_text(
            f"bench:\n  listen: 127.0.0.1:{twemPort}\n  hash: fnv1a_64\n  distribution: ketama\n"
            f"  redis: true\n  server_connections: 1\n  servers:\n"
            + "".join(f"   - 127.0.0.1:{port}:1\n" for port in redisPorts)
        )
        pids["twemproxy"] = spawn(["nutcracker", "-c", str(tmp / "nutcracker.yml"), "-s", str(statsPort),
                                   "-o", str(tmp / "nutcracker.log")], proxyCpu, tmp / "nutcracker.out").pid
        waitForPort(twemPort)
        targets["twemproxy"] = twemPort
    else:
        print("nutcracker not installed (apt-get install nutcracker): skipping twemproxy")

    if shutil.which("haproxy") and not args.hash:
        haPort = freePort()
        (tmp / "haproxy.cfg").write_text(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n"
            "  timeout client 60s\n  timeout server 60s\n"
            f"frontend f\n  bind 127.0.0.1:{haPort}\n  default_backend b\n"
            f"backend b\n  server r 127.0.0.1:{redisPort}\n"
        )
        pids["haproxy-tcp"] = spawn(["haproxy", "-f", str(tmp / "haproxy.cfg")], proxyCpu, tmp / "haproxy.log").pid
        waitForPort(haPort)
        targets["haproxy-tcp"] = haPort

    requests = {1: 10000 if args.quick else 30000, 16: 30000 if args.quick else 100000}
    rounds: dict[tuple[str, int], list[dict[str, float]]] = {}
    for pipeline in (1, 16):
        for name, port in targets.items():
            benchmark(port, pipeline, requests[pipeline] // 10, otherCpus)  # warm up
        for _ in range(args.rounds):  # interleaved: load that comes and goes hits all alike
            for name, port in targets.items():
                pid = pids.get(name)
                before = cpuSeconds(pid)
                ops = benchmark(port, pipeline, requests[pipeline], otherCpus)
                if pid is not None and ops:
                    # redis-benchmark -t get,set runs requests of each
                    ops["cpu"] = (cpuSeconds(pid) - before) / (2 * requests[pipeline]) * 1e6
                rounds.setdefault((name, pipeline), []).append(ops)
    results = {key: {t: statistics.median(r.get(t, 0) for r in runs) for t in ("SET", "GET", "cpu")}
               for key, runs in rounds.items()}

    print(f"\nredis-benchmark -t get,set -c 50 ({cores} cores; proxies pinned to cpu {proxyCpu}; "
          + ("two redis-servers, balance = hash; " if args.hash else "")
          + f"median of {args.rounds}; load average {os.getloadavg()[0]:.1f})")
    print(f"{'target':<14}{'P':>4}{'SET ops/s':>14}{'GET ops/s':>14}{'proxy CPU us/op':>18}")
    for (name, pipeline), ops in results.items():
        cpu = f"{ops['cpu']:.1f}" if ops.get("cpu") else "-"
        print(f"{name:<14}{pipeline:>4}{ops.get('SET', 0):>14,.0f}{ops.get('GET', 0):>14,.0f}{cpu:>18}")
    print()
    for pipeline, goal in ((1, 0.3), (16, 0.5)):
        amb = results.get(("ambassador", pipeline), {})
        for other in ("twemproxy", "direct", "haproxy-tcp", *dict.fromkeys(t for t, _ in results if t.startswith("amb-"))):
            ref = results.get((other, pipeline))
            if not ref:
                continue
            ratios = [amb.get(t, 0) / ref[t] for t in ("SET", "GET") if ref.get(t)]
            text = " ".join(f"{r:.2f}" for r in ratios)
            extra = f" (goal >= {goal} x twemproxy)" if other == "twemproxy" else ""
            cpu = ""
            if amb.get("cpu") and ref.get("cpu"):
                cpu = f"; CPU per op {amb['cpu'] / ref['cpu']:.1f}x"
            print(f"P={pipeline:<3} ambassador / {other:<12} SET GET: {text}{extra}{cpu}")


if __name__ == "__main__":
    main()
