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
import math
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ports import freePort, waitForPort

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

def sendStream(port: int, nbytes: int, until: float, result: list[tuple[int, float]],
               halfClose: bool = True) -> None:
    """Push up to ``nbytes`` (or until ``until``), half-close, wait for the count.

    ``halfClose=False`` is for a relay that closes both ways on the sender's FIN
    (C{twisted.protocols.portforward}): the count cannot come back, so the time
    runs to the relay's close (it flushes first) and delivery is not verified.
    """
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
    if not halfClose and answer == b"":
        pass
    elif len(answer) != 8 or struct.unpack("!Q", answer)[0] != sent:
        raise RuntimeError(f"sink saw {answer!r}, sent {sent}: the path lost bytes")
    result.append((sent, elapsed))


def throughput(port: int, nbytes: int, seconds: float, streams: int, halfClose: bool = True) -> float:
    """Gbit/s of ``streams`` concurrent senders through ``port``."""
    results: list[tuple[int, float]] = []
    until = time.monotonic() + seconds
    start = time.perf_counter()
    threads = [
        threading.Thread(target=sendStream, args=(port, nbytes // streams, until, results, halfClose), daemon=True)
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

def _dieWithParent() -> None:
    """In the child: get SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stopAll() on the way out is all there is


def start(command: list[str], cpu: int | None, log: Path) -> subprocess.Popen[bytes]:
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_dieWithParent)  # noqa: PLW1509 - no threads run yet
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
    for process in list(_children):  # noqa: PERF101 - stop() removes from _children
        try:
            stop(process)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            print(f"could not stop pid {process.pid}: {e}", file=sys.stderr)


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
{tune}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend sink
    bind 127.0.0.1:{sinkListen}
    default_backend sink
frontend echo
    bind 127.0.0.1:{echoListen}
    default_backend echo
backend sink
    server s1 127.0.0.1:{sinkPort}
backend echo
    server s1 127.0.0.1:{echoPort}
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


def loadAverage() -> str:
    """The 1-minute load average: other work on the machine makes every number noisy."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


LOAD_AT_START = loadAverage()


# -- the run ---------------------------------------------------------------------------

@dataclass
class Path_:
    """One way from the load generators to the peer: direct, or through a proxy."""

    name: str
    sinkPort: int
    echoPort: int
    process: subprocess.Popen[bytes] | None = None
    #: the process relaying ping-pong, when it is not ``process``
    echoProcess: subprocess.Popen[bytes] | None = None
    #: False: the path does not pass a half-close on (see sendStream)
    halfClose: bool = True


def twistdWithTcpModule(path: Path) -> list[str]:
    """twistd whose ``ambassador.protocols.tcp`` is the file at ``path`` (e.g. an older
    revision, ``git show REV:ambassador/protocols/tcp.py``): a before/after comparison
    in one run, with everything else the same."""
    code = (
        "import sys, importlib.util, ambassador.protocols\n"
        f"spec = importlib.util.spec_from_file_location('ambassador.protocols.tcp', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['ambassador.protocols.tcp'] = module\n"
        "spec.loader.exec_module(module)\n"
        "from twisted.scripts.twistd import run; run()\n"
    )
    return [sys.executable, "-c", code]


def startAmbassador(tmp: Path, name: str, sinkPort: int, echoPort: int, cpu: int | None,
                    reactor: str | None, tcpModule: Path | None = None) -> Path_:
    """The real twistd with two tcp routes (to the sink, to the echo server)."""
    sinkListen, echoListen = freePort(), freePort()
    twistd = twistdWithTcpModule(tcpModule) if tcpModule else TWISTD
    command = [*twistd, "-n", "--pidfile=", "-l", str(tmp / f"{name}.log")]
    if reactor:
        command.append(f"--reactor={reactor}")
    command += ["ambassador", "--admin", "none",
                "--route", f"tcp tcp:{sinkListen} tcp:127.0.0.1:{sinkPort}",
                "--route", f"tcp tcp:{echoListen} tcp:127.0.0.1:{echoPort}"]
    process = start(command, cpu, tmp / f"{name}.out")
    waitForPort(sinkListen, process=process)
    waitForPort(echoListen, process=process)
    return Path_(name, sinkListen, echoListen, process)


def startPortforward(tmp: Path, sinkPort: int, echoPort: int, cpu: int | None) -> Path_:
    """Stock C{twisted.protocols.portforward} (``twistd portforward``): one process
    per destination, so the sink and the echo server get one each."""
    ports, processes = [], []
    for name, target in (("portforward", sinkPort), ("portforward-echo", echoPort)):
        listen = freePort()
        command = [*TWISTD, "-n", "--pidfile=", "-l", str(tmp / f"{name}.log"), "portforward",
                   "--port", f"tcp:{listen}:interface=127.0.0.1", "--host", "127.0.0.1",
                   "--dest_port", str(target)]
        process = start(command, cpu, tmp / f"{name}.out")
        waitForPort(listen, process=process)
        ports.append(listen)
        processes.append(process)
    return Path_("portforward", ports[0], ports[1], processes[0], processes[1], halfClose=False)


def startHaproxy(tmp: Path, binary: str, name: str, tune: str, sinkPort: int, echoPort: int,
                 cpu: int | None) -> Path_:
    sinkListen, echoListen = freePort(), freePort()
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(HAPROXY_CONFIG.format(tune=tune, sinkListen=sinkListen, echoListen=echoListen,
                                         sinkPort=sinkPort, echoPort=echoPort))
    process = start([binary, "-db", "-f", str(cfg)], cpu, tmp / f"{name}.out")
    waitForPort(sinkListen, process=process)
    waitForPort(echoListen, process=process)
    return Path_(name, sinkListen, echoListen, process)


def measure(path: Path_, workload: str, args: argparse.Namespace) -> tuple[float, float]:
    """One run of ``workload`` through ``path``: (result, proxy CPU share or nan)."""
    process = path.echoProcess if workload == "ping-pong" and path.echoProcess else path.process
    pid = process.pid if process else None
    cpu0 = cpuSeconds(pid) if pid else float("nan")
    wall0 = time.perf_counter()
    if workload == "ping-pong":
        value = pingPong(path.echoPort, args.pingpong_seconds)
    else:
        streams = 1 if workload == "1 stream" else args.streams
        value = throughput(path.sinkPort, int(args.bytes * 2**30), args.seconds, streams, path.halfClose)
    share = (cpuSeconds(pid) - cpu0) / (time.perf_counter() - wall0) if pid else float("nan")
    return value, share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=4.0, help="GiB per throughput run (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time bound per throughput run (default 5)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams in the multi-stream run")
    parser.add_argument("--pingpong-seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement, interleaved across paths; the median is shown")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--reactor", default=None, help="twistd --reactor for ambassador (e.g. epoll, poll)")
    parser.add_argument("--haproxy-bufsize", type=int, default=262144,
                        help="also run HAProxy with this tune.bufsize (0: only the stock 16 KiB)")
    parser.add_argument("--only", choices=["direct", "ambassador", "haproxy"], action="append",
                        help="measure only these paths (repeatable)")
    parser.add_argument("--portforward", action="store_true",
                        help="also measure stock twisted.protocols.portforward (twistd portforward)")
    parser.add_argument("--tcp-py", type=Path, metavar="FILE",
                        help="also measure ambassador with this tcp.py (e.g. an older revision)")
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
    wanted = set(args.only or ["direct", "ambassador", "haproxy"])
    workloads = ["1 stream", f"{args.streams} streams", "ping-pong"]
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        sinkPort, echoPort = freePort(), freePort()
        peer = start([sys.executable, __file__, "--_peer", str(sinkPort), str(echoPort), "3600"],
                     clientCpu, tmp / "peer.log")
        waitForPort(sinkPort, process=peer)
        waitForPort(echoPort, process=peer)
        paths: list[Path_] = []
        if "direct" in wanted:
            paths.append(Path_("direct", sinkPort, echoPort))
        if "ambassador" in wanted:
            paths.append(startAmbassador(tmp, "ambassador", sinkPort, echoPort, proxyCpu, args.reactor))
        if args.tcp_py:
            paths.append(startAmbassador(tmp, f"tcp.py:{args.tcp_py.name}", sinkPort, echoPort, proxyCpu,
                                         args.reactor, args.tcp_py.resolve()))
        if args.portforward:
            paths.append(startPortforward(tmp, sinkPort, echoPort, proxyCpu))
        if "haproxy" in wanted:
            binary = ensureHaproxy()
            if binary is None:
                print("haproxy unavailable: skipped", flush=True)
            else:
                paths.append(startHaproxy(tmp, binary, "haproxy", "", sinkPort, echoPort, proxyCpu))
                if args.haproxy_bufsize:
                    paths.append(startHaproxy(
                        tmp, binary, f"haproxy-{args.haproxy_bufsize // 1024}k",
                        f"    tune.bufsize {args.haproxy_bufsize}", sinkPort, echoPort, proxyCpu,
                    ))
        for n in range(args.repeat):
            for workload in workloads:
                for path in paths:
                    value, share = measure(path, workload, args)
                    results.setdefault(path.name, {}).setdefault(workload, []).append((value, share))
                    unit = "round trips/s" if workload == "ping-pong" else "Gbit/s"
                    print(f"run {n + 1}/{args.repeat} {path.name:14} {workload:10} {value:10.2f} {unit}"
                          + (f"  proxy CPU {100 * share:3.0f}%" if not math.isnan(share) else ""), flush=True)
    finally:
        stopAll()

    summary = report(args, results, workloads, pin, proxyCpu, clientCpu)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results, "args": sys.argv[1:]}, indent=2))
    if args.keep:
        print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, results: dict[str, dict[str, list[tuple[float, float]]]],
           workloads: list[str], pin: bool, proxyCpu: int | None, clientCpu: int | None,
           ) -> dict[str, dict[str, float]]:
    """Print the medians as Markdown tables plus the ratios; return the medians.

    Two views: what the path delivered (Gbit/s, round trips/s), which other load on
    the machine moves a lot, and what it cost the proxy's core (CPU ms per GiB,
    CPU us per round trip), which moves much less and says how close to its core's
    limit each proxy would get.
    """
    from twisted import version as twistedVersion

    summary: dict[str, dict[str, float]] = {}
    for name, rows in results.items():
        summary[name] = {}
        for workload, runs in rows.items():
            summary[name][workload] = statistics.median(v for v, _ in runs)
            costs = [share / (value if workload == "ping-pong" else value * 1e9 / 8 / 2**30)
                     for value, share in runs if not math.isnan(share) and value > 0]
            if costs:
                summary[name][workload + " proxy CPU"] = statistics.median(s for _, s in runs)
                # CPU seconds per GiB or per round trip, median over the runs
                summary[name][workload + " cost"] = statistics.median(costs)
    print()
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, Twisted {twistedVersion.short()}, "
          + (f"proxies on cpu {proxyCpu}, load generators and peer on cpu {clientCpu}" if pin else "not pinned"))
    print(f"# {args.bytes:g} GiB or {args.seconds:g} s per throughput run, ping-pong {args.pingpong_seconds:g} s, "
          f"median of {args.repeat} interleaved runs; load average {LOAD_AT_START} at start, {loadAverage()} at end")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()
    header = [f"{w} Gbit/s" if w != "ping-pong" else "ping-pong rt/s" for w in workloads]
    print("| path | " + " | ".join(header) + " | proxy CPU % (" + ", ".join(workloads) + ") |")
    print("|---|" + "---:|" * (len(header) + 1))
    for name, row in summary.items():
        cells = [f"{row[w]:.0f}" if w == "ping-pong" else f"{row[w]:.2f}" for w in workloads]
        cpus = [row.get(w + " proxy CPU") for w in workloads]
        cpu = " / ".join(f"{100 * c:.0f}" for c in cpus if c is not None) or "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {cpu} |")
    print()
    costHeader = [f"{w} CPU ms/GiB" if w != "ping-pong" else "ping-pong CPU us/rt" for w in workloads]
    print("| proxy | " + " | ".join(costHeader) + " |")
    print("|---|" + "---:|" * len(costHeader))
    for name, row in summary.items():
        if workloads[0] + " cost" not in row:
            continue
        cells = [f"{row[w + ' cost'] * (1e6 if w == 'ping-pong' else 1e3):.0f}" for w in workloads]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    amb = summary.get("ambassador")
    if amb:
        for other, row in summary.items():
            if other == "ambassador":
                continue
            ratios = ", ".join(f"{w} {amb[w] / row[w]:.2f}" for w in workloads)
            line = f"ambassador/{other} throughput: {ratios}"
            if other != "direct" and amb.get(workloads[0] + " cost") and row.get(workloads[0] + " cost"):
                efficiency = ", ".join(
                    f"{w} {row[w + ' cost'] / amb[w + ' cost']:.2f}" for w in workloads
                )
                line += f"; per proxy CPU-second: {efficiency}"
            print(line)
    return summary


if __name__ == "__main__":
    sys.exit(main())
