"""A bounded soak: one ambassador, three routes, faults flipping for a minute (``make soak``).

One real ``twistd ambassador`` carries an http route (a recording HTTP member), a tcp
route (an echo member) and a ``line:redis`` route (a real ``redis-server``), each
member reached through two fault proxies whose faults flip every few seconds on a
seeded schedule.  Real clients load all three routes at once; afterwards the books
are checked: every http request and redis command got exactly one answer (the
member's, or the ambassador's error with a SPEC reason), none was applied twice when
unsafe (POSTs, INCRs), every tcp connection ended with its echo intact or cut cleanly,
never hung; the metrics count what the clients saw; the process is back to its file
descriptors.  It prints a summary table and exits 1 if any of that failed.

    python tests/chaos/soak.py --seconds 60 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_here), _here]

from accounting import fdCount, metricSum, rssBytes, scrapeMetrics, waitUntil
from faultproxy import FaultProxy
from harness import Ambassador, freePort, waitForPort
from httpload import HttpLoad, auditHttp, summary
from httpmember import HttpMember
from peers import echoServer

#: The line route's own error replies carry one of these reasons (SPEC §3/§4).
LINE_REASONS = {
    "connect-failure", "tls-error", "reset", "timeout", "deadline", "breaker-open",
    "budget-exhausted", "overloaded", "no-upstream", "protocol-error",
}

DEADLINE = 2.5
IDLE = 3.0
SLACK = 2.0

#: Fault steps per protocol: (mode, params), drawn by the seeded schedule.
HTTP_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("reset_before_response", {"forward": True}),
    ("reset_before_response", {}),
    ("reset_mid_response", {"after": 3000}),
    ("blackhole", {"kill": True}),
    ("accept_close", {}),
    ("latency", {"ms": 200}),
    ("throttle", {"bytesPerSecond": 50_000}),
    ("random", {"p": 0.3, "modes": ["reset_before_response", "reset_mid_response", "accept_close"],
                "after": 200, "forward": True}),
]
TCP_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("reset_mid_response", {"after": 5000}),
    ("accept_close", {}),
    ("blackhole", {}),
    ("latency", {"ms": 100}),
    ("throttle", {"bytesPerSecond": 100_000}),
    ("random", {"p": 0.4, "modes": ["reset_mid_response", "accept_close"], "after": 1000}),
]
REDIS_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("reset_before_response", {"forward": True}),
    ("reset_mid_response", {"after": 40}),
    ("blackhole", {"kill": True}),
    ("accept_close", {"kill": True}),
    ("latency", {"ms": 150}),
    ("random", {"p": 0.3, "modes": ["reset_before_response", "reset_mid_response"],
                "after": 25, "forward": True}),
]


def faultSchedule(rng: random.Random, faults: list[tuple[str, dict[str, Any]]],
                  steps: int = 12) -> list[tuple[float, str, dict[str, Any]]]:
    """Alternate healthy stretches and faults, each 2-5 s long."""
    schedule: list[tuple[float, str, dict[str, Any]]] = []
    for _ in range(steps):
        schedule.append((round(rng.uniform(2.0, 5.0), 2), "pass", {}))
        mode, params = rng.choice(faults)
        # pooled member connections dodge a mode set later (modes bind at accept): half
        # of the faults reset them as they begin
        params = {**params, "kill": params.get("kill", False) or rng.random() < 0.5}
        schedule.append((round(rng.uniform(2.0, 4.0), 2), mode, params))
    return schedule


# --- tcp load -----------------------------------------------------------------------


class TcpLoad:
    """Connections that each send a payload, half-close, and read the echo back."""

    def __init__(self, port: int, seconds: float, seed: int, clients: int) -> None:
        self.port, self.seconds, self.seed, self.clients = port, seconds, seed, clients
        self.outcomes: list[tuple[str, str]] = []  # (kind, detail)
        self.lock = threading.Lock()

    def run(self, endsAt: float) -> None:
        threads = [threading.Thread(target=self._client, args=(i, endsAt), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + IDLE + DEADLINE + 30)

    def _client(self, index: int, endsAt: float) -> None:
        rng = random.Random(self.seed * 7919 + index)
        serial = 0
        while time.monotonic() < endsAt:
            serial += 1
            tag = f"tcp-{index}-{serial}:".encode()
            payload = tag + rng.randbytes(rng.randint(100, 32_000))
            kind, detail = self._one(payload)
            with self.lock:
                self.outcomes.append((kind, detail))
            time.sleep(rng.random() * 0.05)

    def _one(self, payload: bytes) -> tuple[str, str]:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=IDLE + DEADLINE + SLACK)
        except OSError as e:
            return "refused", str(e)
        received = b""
        try:
            with s:
                try:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the pair was cut while sending: what came back decides
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    received += chunk
        except TimeoutError:
            return "hung", f"{len(received)} of {len(payload)} bytes, then nothing"
        except OSError:
            pass  # a reset: the echo was cut
        if received == payload:
            return "ok", ""
        if payload.startswith(received):
            return "cut", ""
        return "wrong", f"echo differs from what was sent after {len(received)} bytes"


# --- redis load ---------------------------------------------------------------------


def command(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parseReply(buffer: bytes, start: int = 0) -> tuple[Any, int] | None:
    """One RESP2 reply from ``buffer[start:]``: (value, end), or None if incomplete.
    Errors come back as ``("error", text)``, simple strings as ``("simple", text)``."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line = buffer[start:start + 1], buffer[start + 1:end]
    after = end + 2
    if kind == b"+":
        return ("simple", line.decode()), after
    if kind == b"-":
        return ("error", line.decode()), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return buffer[after:after + size], after + size + 2
    if kind == b"*":
        count = int(line)
        items = []
        for _ in range(max(count, 0)):
            parsed = parseReply(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ValueError(f"not RESP: {buffer[start:start + 40]!r}")


class RedisLoad:
    """Pipelines of INCR (unsafe: must never be applied twice), SET and PING, then GETs
    of what was set, on connections that live for several pipelines."""

    def __init__(self, port: int, seconds: float, seed: int, clients: int) -> None:
        self.port, self.seconds, self.seed, self.clients = port, seconds, seed, clients
        self.kinds: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.problems: list[str] = []
        self.incrOk: set[str] = set()
        self.incrSent: set[str] = set()
        self.commands = 0
        self.answered = 0
        self.lock = threading.Lock()

    def run(self, endsAt: float) -> None:
        threads = [threading.Thread(target=self._client, args=(i, endsAt), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + DEADLINE + 30)

    def _client(self, index: int, endsAt: float) -> None:
        rng = random.Random(self.seed * 104729 + index)
        serial = 0
        while time.monotonic() < endsAt:
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE + SLACK)
            except OSError as e:
                self._problem(f"redis connect refused: {e}")
                return
            with s:
                buffer = [b""]
                for _ in range(rng.randint(1, 30)):
                    if time.monotonic() >= endsAt:
                        break
                    batch = []
                    for _ in range(rng.randint(1, 8)):
                        serial += 1
                        name = f"c{index}n{serial}"
                        what = rng.choice(("INCR", "INCR", "SET", "PING"))
                        batch.append((what, name))
                    if not self._exchange(s, buffer, batch):
                        break
                    time.sleep(rng.random() * 0.02)

    def _exchange(self, s: socket.socket, buffer: list[bytes], batch: list[tuple[str, str]]) -> bool:
        wire = []
        for what, name in batch:
            if what == "INCR":
                wire.append(command("INCR", f"soak:incr:{name}"))
            elif what == "SET":
                wire.append(command("SET", f"soak:key:{name}", f"value:{name}"))
            else:
                wire.append(command("PING"))
        with self.lock:
            self.commands += len(batch)
            self.incrSent.update(name for what, name in batch if what == "INCR")
        replies = self._send(s, buffer, b"".join(wire), len(batch))
        if replies is None:
            return False
        gets = []
        for (what, name), reply in zip(batch, replies, strict=True):
            if self._isError(reply, f"{what} {name}"):
                continue
            expected = {"INCR": 1, "SET": ("simple", "OK"), "PING": ("simple", "PONG")}[what]
            if reply != expected:
                self._problem(f"{what} {name}: got {reply!r}, expected {expected!r}"
                              + (" (applied twice?)" if what == "INCR" else " (out of order?)"))
            else:
                self._count("ok")
                if what == "INCR":
                    with self.lock:
                        self.incrOk.add(name)
                if what == "SET":
                    gets.append(name)
        if not gets:
            return True
        replies = self._send(s, buffer, b"".join(command("GET", f"soak:key:{n}") for n in gets), len(gets))
        with self.lock:
            self.commands += len(gets)
        if replies is None:
            return False
        for name, reply in zip(gets, replies, strict=True):
            if self._isError(reply, f"GET {name}"):
                continue
            if reply != f"value:{name}".encode():
                self._problem(f"GET {name}: got {reply!r} (another request's answer, or out of order)")
            else:
                self._count("ok")
        return True

    def _send(self, s: socket.socket, buffer: list[bytes], data: bytes, count: int) -> list[Any] | None:
        """Send a pipeline; read ``count`` replies; None (and a problem) if they never all came."""
        replies: list[Any] = []
        started = time.monotonic()
        try:
            s.sendall(data)
            while len(replies) < count:
                parsed = parseReply(buffer[0]) if buffer[0] else None
                if parsed is not None:
                    value, end = parsed
                    buffer[0] = buffer[0][end:]
                    replies.append(value)
                    continue
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the ambassador")
                buffer[0] += chunk
        except (OSError, ValueError) as e:
            self._problem(f"redis: {count - len(replies)} of {count} commands unanswered "
                          f"({type(e).__name__}: {e}) after {time.monotonic() - started:.2f}s")
            with self.lock:
                self.kinds["unanswered"] += count - len(replies)
                self.answered += len(replies)
            for reply in replies:
                self._isError(reply, "answered before the loss")
            return None
        with self.lock:
            self.answered += count
        if time.monotonic() - started > DEADLINE * 2 + SLACK:
            self._problem(f"a pipeline of {count} took {time.monotonic() - started:.2f}s")
        return replies

    def _isError(self, reply: Any, what: str) -> bool:
        if isinstance(reply, tuple) and reply[0] == "error":
            text = reply[1]
            parts = text.split()
            if len(parts) == 3 and parts[:2] == ["ERR", "ambassador"] and parts[2] in LINE_REASONS:
                with self.lock:
                    self.kinds["error"] += 1
                    self.reasons[parts[2]] += 1
            else:
                self._problem(f"{what}: error reply {text!r} is not a SPEC reason")
            return True
        return False

    def _count(self, kind: str) -> None:
        with self.lock:
            self.kinds[kind] += 1

    def _problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def auditIncrements(redisPort: int, load: RedisLoad) -> list[str]:
    """Ask redis itself (not through the ambassador) how often each INCR was applied."""
    problems = []
    with socket.create_connection(("127.0.0.1", redisPort), timeout=10) as s:
        names = sorted(load.incrSent)
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            s.sendall(command("MGET", *(f"soak:incr:{n}" for n in chunk)))
            buffer = b""
            while True:
                parsed = parseReply(buffer) if buffer else None
                if parsed is not None:
                    values = parsed[0]
                    break
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis closed")
                buffer += data
            for name, value in zip(chunk, values, strict=True):
                times = int(value) if value is not None else 0
                if times > 1:
                    problems.append(f"INCR {name} applied {times} times")
                if name in load.incrOk and times != 1:
                    problems.append(f"INCR {name} answered :1 but redis holds {value!r}")
    return problems


# --- the run ------------------------------------------------------------------------


class Monitor(threading.Thread):
    def __init__(self, pid: int, adminPort: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.adminPort = pid, adminPort
        self.maxRss = self.maxFds = 0
        self.budgetViolations: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                self.maxRss = max(self.maxRss, rssBytes(self.pid))
                self.maxFds = max(self.maxFds, fdCount(self.pid))
                with urllib.request.urlopen(f"http://127.0.0.1:{self.adminPort}/status", timeout=5) as r:
                    for route in json.load(r)["routes"]:
                        budget = route["budget"]
                        if budget["retries"] > budget["allowed"]:
                            self.budgetViolations.append(f"{route['name']}: {budget}")
            except Exception as e:  # noqa: BLE001 (reported, never fatal to the soak)
                self.errors.append(f"{type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(argv)
    seconds, seed = options.seconds, options.seed
    rng = random.Random(seed)
    redisBinary = shutil.which("redis-server")
    if redisBinary is None:
        print("soak: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ambassador-soak-")))
        member = stack.enter_context(HttpMember(tmp / "member.log"))
        echo = stack.enter_context(echoServer())
        redisPort = freePort()
        redis = subprocess.Popen(
            [redisBinary, "--port", str(redisPort), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(lambda: (redis.terminate(), redis.wait(10)))
        waitForPort(redisPort)

        proxies: dict[str, list[FaultProxy]] = {}
        for route, port in (("web", member.port), ("stream", echo.port), ("cache", redisPort)):
            proxies[route] = [
                stack.enter_context(FaultProxy(target=("127.0.0.1", port), seed=seed * 100 + i + len(proxies) * 10))
                for i in range(2)
            ]
        for fps in proxies.values():
            for fp in fps:
                fp.port  # noqa: B018 (listening before our ports are picked: no bind race)
        ports = {name: freePort() for name in ("web", "stream", "cache", "admin")}

        def upstreams(route: str) -> str:
            return ", ".join(f'"{fp.address}"' for fp in proxies[route])

        config = f"""
[defaults]
connect_timeout = "500ms"
timeout = "1s"
deadline = "{DEADLINE}s"
idle_timeout = "{IDLE}s"

[defaults.retry]
attempts = 3
backoff_base = "20ms"
backoff_max = "200ms"
budget_ratio = 0.2
budget_min_per_second = 2

[defaults.breaker]
failure_threshold = 5
reset_timeout = "2s"

[[route]]
name = "web"
protocol = "http"
listen = "tcp:{ports['web']}"
upstreams = [{upstreams('web')}]

[[route]]
name = "stream"
protocol = "tcp"
listen = "tcp:{ports['stream']}"
upstreams = [{upstreams('stream')}]

[[route]]
name = "cache"
protocol = "line"
dialect = "redis"
balance = "hash"
listen = "tcp:{ports['cache']}"
upstreams = [{upstreams('cache')}]
"""
        ambassador = stack.enter_context(Ambassador(
            tmp, config=config, args=["--admin", f"tcp:{ports['admin']}:interface=127.0.0.1"]))
        pid = ambassador.process.pid
        scrapeMetrics(ports["admin"])
        time.sleep(0.5)
        fdsBefore, rssBefore = fdCount(pid), rssBytes(pid)

        for route, faults in (("web", HTTP_FAULTS), ("stream", TCP_FAULTS), ("cache", REDIS_FAULTS)):
            for fp in proxies[route]:
                fp.schedule(faultSchedule(rng, faults, steps=int(seconds // 5) + 2))

        monitor = Monitor(pid, ports["admin"])
        monitor.start()
        started = time.monotonic()
        endsAt = started + seconds
        http = HttpLoad(ports["web"], seconds, seed, clients=4, pause=0.05, timeout=DEADLINE + 10,
                        pipelineShare=0.15)
        tcp = TcpLoad(ports["stream"], seconds, seed, clients=3)
        cache = RedisLoad(ports["cache"], seconds, seed, clients=3)
        http.start()
        threads = [threading.Thread(target=tcp.run, args=(endsAt,)),
                   threading.Thread(target=cache.run, args=(endsAt,))]
        for t in threads:
            t.start()
        httpOutcomes = http.join()
        for t in threads:
            t.join(seconds + 60)
        elapsed = time.monotonic() - started

        # The faults stop, and every member connection still open is reset: the line
        # route's pool keeps persistent connections for good (the http pool closes idle
        # ones after idle_timeout), so only once they are gone must the process be back
        # to exactly the descriptors it started with.
        for fps in proxies.values():
            for fp in fps:
                fp.set("pass", kill=True)
        faultsInflicted = {f"{route}-{i}": fp.stats()["faults"]
                           for route, fps in proxies.items() for i, fp in enumerate(fps)}
        problems: list[str] = []
        expected = {
            "web": sum(o.kind != "unanswered" for o in httpOutcomes),
            "stream": sum(kind != "refused" for kind, _ in tcp.outcomes),
            "cache": cache.answered,
        }

        def counted() -> bool:
            m = scrapeMetrics(ports["admin"])
            return all(metricSum(m, "ambassador_requests_total", route=r) >= n for r, n in expected.items())

        try:
            waitUntil(counted, 10)
        except TimeoutError:
            pass
        metrics = scrapeMetrics(ports["admin"])
        problems += auditHttp(httpOutcomes, member, metrics, "web", DEADLINE, SLACK, truncationAllowed=True)
        for route in ("stream", "cache"):
            seen = metricSum(metrics, "ambassador_requests_total", route=route)
            if seen != expected[route]:
                problems.append(f"{route}: ambassador_requests_total {seen:.0f} != {expected[route]} "
                                "the clients saw answered")
        tcpKinds = Counter(kind for kind, _ in tcp.outcomes)
        problems += [f"tcp connection {kind}: {detail}" for kind, detail in tcp.outcomes
                     if kind in ("hung", "wrong", "refused")]
        problems += cache.problems
        problems += auditIncrements(redisPort, cache)
        problems += monitor.budgetViolations[:5]
        try:
            waitUntil(lambda: fdCount(pid) == fdsBefore, 2 * IDLE + 5)
        except TimeoutError:
            problems.append(f"fd leak: {fdCount(pid)} open after the load and the idle timeout, "
                            f"{fdsBefore} before")
        fdsAfter = fdCount(pid)
        monitor.stopping.set()
        monitor.join(5)
        if ambassador.process.poll() is not None:
            problems.append(f"the ambassador exited ({ambassador.process.returncode})")

        # a tcp connection's result is "ok" once a member connection was made (SPEC §4)
        tcpResults = {
            dict(labels)["result"]: int(value) for (name, labels), value in metrics.items()
            if name == "ambassador_requests_total" and ("route", "stream") in labels
            and dict(labels).get("result") != "ok"
        }
        httpSummary = summary(httpOutcomes)
        rows = [
            ("web (http)", len(httpOutcomes), httpSummary["kinds"].get("ok", 0),
             {**httpSummary["reasons"],
              **({"cut mid-body": httpSummary["kinds"]["truncated"]}
                 if httpSummary["kinds"].get("truncated") else {}),
              **({"pipelined behind a cut": httpSummary["kinds"]["abandoned"]}
                 if httpSummary["kinds"].get("abandoned") else {})},
             httpSummary["kinds"].get("unanswered", 0)),
            ("stream (tcp)", len(tcp.outcomes), tcpKinds["ok"],
             {**({"echo cut": tcpKinds["cut"]} if tcpKinds["cut"] else {}),
              **{k: v for k, v in tcpKinds.items() if k not in ("ok", "cut")},
              **tcpResults}, tcpKinds["hung"]),
            ("cache (redis)", cache.commands, cache.kinds["ok"], dict(cache.reasons),
             cache.kinds["unanswered"]),
        ]
        duplicates = sum("applied" in p and "times" in p for p in problems)
        print(f"ambassador soak: {elapsed:.0f} s of load, seed {seed}, one twistd, 3 routes, "
              "2 fault proxies per route flipping every 2-5 s")
        print(f"{'route':<14} {'requests':>8} {'ok':>7} {'unanswered':>10}  failures by reason")
        for name, requests, ok, reasons, unanswered in rows:
            text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "-"
            print(f"{name:<14} {requests:>8} {ok:>7} {unanswered:>10}  {text}")
        print(f"POSTs sent {httpSummary['posts']}, INCRs sent {len(cache.incrSent)}; "
              f"applied twice: {duplicates}")
        print(f"max RSS {monitor.maxRss / 2**20:.1f} MiB (start {rssBefore / 2**20:.1f} MiB); "
              f"fds before {fdsBefore}, after {fdsAfter} (max {monitor.maxFds})")
        print("faults inflicted (connections): " + "; ".join(
            f"{name} " + ",".join(f"{k}={v}" for k, v in sorted(f.items())) for name, f in faultsInflicted.items()))
        if monitor.errors:
            print(f"monitor errors: {monitor.errors[:3]}")
        if problems:
            print(f"ACCOUNTING FAILED ({len(problems)} problems):")
            for problem in problems[:40]:
                print(f"  {problem}")
            return 1
        print("accounting: every request answered once, nothing applied twice, no fd leak")
        return 0


if __name__ == "__main__":
    sys.exit(main())
