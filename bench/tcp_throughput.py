#!/usr/bin/env python3
"""TCP relay benchmark: direct vs ambassador's tcp route vs HAProxy ``mode tcp``.

Why: the tcp route is the ceiling every protocol-aware route has to approach, and
HAProxy is what an operator would otherwise put there.  One run measures the three
side by side on the same machine, with each proxy pinned to one core (``taskset``)
and the load generators on another, and prints Gbit/s, round trips/s and the
ratios ambassador/direct and ambassador/HAProxy.

Workloads (each bounded in bytes *and* seconds, repeated, median reported):

- ``1 stream``: one sender pushes up to ``--bytes`` through the path to a sink,
  half-closes, and the sink answers with the byte count it saw (so the time
  covers delivery, not just the local send buffer).
- ``N streams``: ``--streams`` such senders at once, splitting ``--bytes``.
- ``ping-pong``: one connection, 64-byte request, 64-byte echo, as many round
  trips as fit in ``--pingpong-seconds`` (latency-bound: per-event cost).

Every child process (sink/echo peer, twistd, haproxy) is started here, bounded in
time, and killed by its pid on the way out, error or not.  Timings are printed,
never asserted: this is not a test.

    python bench/tcp_throughput.py                 # make bench
    python bench/tcp_throughput.py --quick         # a smoke run (~20 s)
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
CHUNK = 1024 * 1024
PING_SIZE = 64
_children: list[subprocess.Popen[bytes]] = []


# -- the peer process: a sink (throughput) and an echo server (ping-pong) -----------

def _sinkConnection(conn: socket.socket) -> None:
    """Read to EOF, then answer with the byte count (8 bytes, big endian)."""
    buf = bytearray(CHUNK)
    total = 0
    try:
        with conn:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(struct.pack("!Q", total))
    except OSError:
        pass


def _echoConnection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
    except OSError:
        pass


def _serve(server: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def runPeer(sinkPort: int, echoPort: int, lifetime: float) -> None:
    """The ``_peer`` role: serve sink and echo until killed or ``lifetime`` ends."""
    sink = socket.create_server(("127.0.0.1", sinkPort), backlog=128)
    echo = socket.create_server(("127.0.0.1", echoPort), backlog=128)
    threading.Thread(target=_serve, args=(sink, _sinkConnection), daemon=True).start()
    threading.Thread(target=_serve, args=(echo, _echoConnection), daemon=True).start()
    time.sleep(lifetime)  # a safety net: the parent kills us long before


# -- the load generators (run in this process, pinned to the client core) ----------

def sendStream(port: int, nbytes: int, until: float, result: list[tuple[int, float]]) -> None:
    """Push up to ``nbytes`` (or until ``until``), half-close, wait for the count."""
    payload = memoryview(b"x" * CHUNK)
    start = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        while sent < nbytes and time.monotonic() < until:
            c.sendall(payload[: min(CHUNK, nbytes - sent)])
            sent += min(CHUNK, nbytes - sent)
        c.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            data = c.recv(8 - len(answer))
            if not data:
                break
            answer += data
    elapsed = time.perf_counter() - start
    if len(answer) != 8 or struct.unpack("!Q", answer)[0] != sent:
        raise RuntimeError(f"sink saw {answer!r}, sent {sent}: the path lost bytes")
    result.append((sent, elapsed))


def throughput(port: int, nbytes: int, seconds: float, streams: int) -> float:
    """Gbit/s of ``streams`` concurrent senders through ``port``."""
    results: list[tuple[int, float]] = []
    until = time.monotonic() + seconds
    start = time.perf_counter()
    threads = [
        threading.Thread(target=sendStream, args=(port, nbytes // streams, until, results), daemon=True)
        for _ in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - start
    if len(results) != streams:
        raise RuntimeError(f"only {len(results)} of {streams} streams finished")
    return sum(sent for sent, _ in results) * 8 / elapsed / 1e9


def pingPong(port: int, seconds: float) -> float:
    """Round trips per second of one connection, one 64-byte message at a time."""
    message = b"p" * PING_SIZE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        count = 0
        start = time.perf_counter()
        until = start + seconds
        while True:
            c.sendall(message)
            got = 0
            while got < PING_SIZE:
                data = c.recv(PING_SIZE - got)
                if not data:
                    raise RuntimeError("echo connection closed")
                got += len(data)
            count += 1
            if count % 64 == 0 and time.perf_counter() >= until:
                break
        return count / (time.perf_counter() - start)


# -- process management --------------------------------------------------------------

def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start(command: list[str], cpu: int | None, log: Path) -> subprocess.Popen[bytes]:
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s; only ever our own child, by its pid."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if process in _children:
        _children.remove(process)


def stopAll() -> None:
    for process in list(_children):
        try:
            stop(process)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind 127.0.0.1:{listen}
    default_backend sink
backend sink
    server s1 127.0.0.1:{upstream}
"""


def ensureHaproxy() -> str | None:
    """The haproxy binary, installing Debian's package if it is missing (as root)."""
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("haproxy not found: apt-get install -y haproxy", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "haproxy"], env=env, timeout=600,
                       stdout=subprocess.DEVNULL, check=False)
        return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None
    return None


# -- the run ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=4.0, help="GiB per throughput run (default 4)")
    parser.add_argument("--seconds", type=float, default=6.0, help="time bound per throughput run (default 6)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams in the multi-stream run")
    parser.add_argument("--pingpong-seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--reactor", default=None, help="twistd --reactor for ambassador (e.g. epoll, poll)")
    parser.add_argument("--no-haproxy", action="store_true")
    parser.add_argument("--only", choices=["direct", "ambassador", "haproxy"], action="append",
                        help="measure only these paths (repeatable)")
    parser.add_argument("--quick", action="store_true", help="1 GiB / 3 s / 1 repeat: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    parser.add_argument("--_peer", nargs=3, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._peer:
        runPeer(int(args._peer[0]), int(args._peer[1]), args._peer[2])
        return 0
    if args.quick:
        args.bytes, args.seconds, args.repeat, args.pingpong_seconds = 1.0, 3.0, 1, 2.0

    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    proxyCpu = args.proxy_cpu if pin else None
    clientCpu = args.client_cpu if pin else None
    if clientCpu is not None:
        os.sched_setaffinity(0, {clientCpu})  # this process's load generators + the peer

    tmp = Path(tempfile.mkdtemp(prefix="ambassador-bench-"))
    atexit.register(stopAll)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nbytes = int(args.bytes * 2**30)
    wanted = set(args.only or ["direct", "ambassador", "haproxy"])
    if args.no_haproxy:
        wanted.discard("haproxy")

    sinkPort, echoPort = freePort(), freePort()
    lifetime = 3600.0
    peer = start([sys.executable, __file__, "--_peer", str(sinkPort), str(echoPort), str(lifetime)],
                 clientCpu, tmp / "peer.log")
    waitForPort(sinkPort, process=peer)
    waitForPort(echoPort, process=peer)

    paths: dict[str, tuple[int, int, subprocess.Popen[bytes] | None]] = {}
    try:
        if "direct" in wanted:
            paths["direct"] = (sinkPort, echoPort, None)
        if "ambassador" in wanted:
            for name, target in (("ambassador", sinkPort), ("ambassador-echo", echoPort)):
                listen = freePort()
                command = [*TWISTD, "-n", "--pidfile=", "-l", str(tmp / f"{name}.log")]
                if args.reactor:
                    command.append(f"--reactor={args.reactor}")
                command += ["ambassador", "--admin", "none",
                            "--route", f"tcp tcp:{listen} tcp:127.0.0.1:{target}"]
                process = start(command, proxyCpu, tmp / f"{name}.out")
                waitForPort(listen, process=process)
                paths[name] = (listen, 0, process)
            paths["ambassador"] = (paths["ambassador"][0], paths.pop("ambassador-echo")[0], paths["ambassador"][2])
        if "haproxy" in wanted:
            binary = ensureHaproxy()
            if binary is None:
                print("haproxy unavailable: skipped", flush=True)
            else:
                ports = []
                for name, target in (("haproxy", sinkPort), ("haproxy-echo", echoPort)):
                    listen = freePort()
                    cfg = tmp / f"{name}.cfg"
                    cfg.write_text(HAPROXY_CONFIG.format(listen=listen, upstream=target))
                    process = start([binary, "-db", "-f", str(cfg)], proxyCpu, tmp / f"{name}.out")
                    waitForPort(listen, process=process)
                    ports.append((listen, process))
                paths["haproxy"] = (ports[0][0], ports[1][0], ports[0][1])

        results: dict[str, dict[str, float]] = {}
        for name, (port, pingPort, process) in paths.items():
            row: dict[str, float] = {}
            cpu0 = cpuSeconds(process.pid) if process else float("nan")
            wall0 = time.perf_counter()
            for label, streams in (("1 stream", 1), (f"{args.streams} streams", args.streams)):
                runs = [throughput(port, nbytes, args.seconds, streams) for _ in range(args.repeat)]
                row[label] = statistics.median(runs)
                print(f"{name:10} {label:10} " + " ".join(f"{r:6.2f}" for r in runs) + " Gbit/s", flush=True)
            if process:
                row["proxy cpu %"] = 100 * (cpuSeconds(process.pid) - cpu0) / (time.perf_counter() - wall0)
            runs = [pingPong(pingPort, args.pingpong_seconds) for _ in range(args.repeat)]
            row["ping-pong"] = statistics.median(runs)
            print(f"{name:10} ping-pong  " + " ".join(f"{r:8.0f}" for r in runs) + " round trips/s", flush=True)
            results[name] = row
    finally:
        stopAll()

    report(args, results, pin, proxyCpu, clientCpu)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "args": sys.argv[1:]}, indent=2))
    if args.keep:
        print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, results: dict[str, dict[str, float]], pin: bool,
           proxyCpu: int | None, clientCpu: int | None) -> None:
    from twisted import version as twistedVersion

    labels = ["1 stream", f"{args.streams} streams", "ping-pong"]
    print()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, Twisted {twistedVersion.short()}, "
          + (f"proxies on cpu {proxyCpu}, client+peer on cpu {clientCpu}" if pin else "not pinned"))
    print(f"# {args.bytes:g} GiB or {args.seconds:g} s per run, median of {args.repeat}")
    print(f"| {'path':10} | {'1 stream Gbit/s':>15} | {str(args.streams) + ' streams Gbit/s':>16} | "
          f"{'ping-pong rt/s':>14} | {'proxy CPU %':>11} |")
    print(f"|{'-' * 12}|{'-' * 17}|{'-' * 18}|{'-' * 16}|{'-' * 13}|")
    for name, row in results.items():
        cpu = row.get("proxy cpu %")
        print(f"| {name:10} | {row[labels[0]]:15.2f} | {row[labels[1]]:16.2f} | {row[labels[2]]:14.0f} | "
              f"{(f'{cpu:.0f}' if cpu is not None else '-'):>11} |")
    amb = results.get("ambassador")
    for other in ("direct", "haproxy"):
        if amb and other in results:
            ratios = ", ".join(f"{label} {amb[label] / results[other][label]:.2f}" for label in labels)
            print(f"ambassador/{other}: {ratios}")


if __name__ == "__main__":
    sys.exit(main())
