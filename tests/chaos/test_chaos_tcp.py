"""Chaos on tcp routes: real clients, the real twistd, real members behind a fault proxy.

Each scenario runs a seeded, bounded load of app connections (a few dozen at a time
for a few seconds) through one tcp route whose member sits behind a
``chaos.faultproxy.FaultProxy`` that resets, stalls, closes, trickles or delays, and
then checks the accounting (issue 9):

- every app connection ended exactly one way: its whole payload echoed back
  byte for byte (sha256 of what came back == sha256 of what was sent), or closed /
  reset by the ambassador with nothing but a prefix of the echo before it; never
  bytes that are not the echo, never left hanging past the route's deadline (or
  ``idle_timeout`` for a member that answers nothing) plus slack;
- those counts match what the fault proxy did (its per-mode fault counts);
- one access-log line per connection, with a SPEC result, and the same attempts and
  bytes as the metrics; breaker and retry metrics consistent with what happened;
- the twistd's descriptors back to their baseline (a tcp route pools nothing) and
  its memory near it.

SPEC §4/tcp, as these tests read it: an *attempt* is the member connection's set-up
only.  A member that accepts and then resets, closes or never answers has still been
connected: the connection's result is ``ok`` (no retry: bytes may have gone), and the
app's connection is reset (member reset), closed (member FIN) or closed after
``idle_timeout`` (silence).  Only members that cannot be connected count against
breakers (``connect-failure``, ``timeout``).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import random
import selectors
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from accounting import (
    assertTwistd,
    fdCount,
    metricSum,
    rssBytes,
    scrapeMetrics,
    steadyFdCount,
    waitUntil,
)
from asyncmembers import Members
from chaos.faultproxy import FaultProxy
from harness import Ambassador, freePort
from peers import Blackhole, refusingAddress

#: Slack on every "ended within" bound: scheduling on a loaded 2-core machine.
SLACK = 2.0
#: How much the twistd's RSS may grow over a scenario (after its warm-up one): a
#: per-connection leak of a relay buffer (64 KiB+) over hundreds of connections, or a
#: stalled pair's unbounded buffering, would pass it; allocator noise would not.
RSS_GROWTH = 24 * 1024 * 1024
#: The SPEC's result words a tcp connection's access line may carry.
RESULTS = {"ok", "connect-failure", "tls-error", "reset", "timeout", "deadline",
           "breaker-open", "budget-exhausted", "no-upstream", "overloaded", "client-closed"}

IDLE_TIMEOUT = 1.5
DEADLINE = 3.0
CONNECT_TIMEOUT = 0.5
ROUTES = ("resets", "blackhole", "closes", "slow", "breaker", "unreachable")


# --- the load -------------------------------------------------------------------------


@dataclass
class Conn:
    """One app connection: it sends ``payload``, half-closes, and reads the echo."""

    index: int
    sock: socket.socket
    payload: bytes
    started: float
    lastActivity: float
    sent: int = 0
    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    halfClosed: bool = False
    #: the error a send() got: Linux reports a reset once, to whichever call comes first
    writeError: int | None = None
    #: "complete", "reset", "closed-early"; failures: "corrupt", "hung", "connect-...".
    outcome: str | None = None
    ended: float | None = None


class Load:
    """A seeded, bounded load of echo clients on one selector (no threads).

    Keeps ``concurrency`` connections open for ``duration`` seconds, each with a
    payload of ``random.randint(*sizes)`` bytes, then lets the last ones finish.  A
    connection with no byte either way for ``hangAfter`` seconds is judged "hung".
    """

    def __init__(self, port: int, seed: int, concurrency: int, duration: float,
                 sizes: tuple[int, int], hangAfter: float) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.duration = duration
        self.sizes = sizes
        self.hangAfter = hangAfter
        self.selector = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.open: set[int] = set()

    def run(self) -> list[Conn]:
        started = time.monotonic()
        stopStarting = started + self.duration
        giveUp = stopStarting + self.hangAfter + SLACK + 5.0
        try:
            while True:
                now = time.monotonic()
                while now < stopStarting and len(self.open) < self.concurrency:
                    self._start(now)
                if now >= stopStarting and not self.open:
                    break
                assert now < giveUp, "the load did not end in time"  # the hang check should have
                for key, events in self.selector.select(0.05):
                    self._service(key.data, events)
                now = time.monotonic()
                for index in list(self.open):
                    conn = self.conns[index]
                    if now - conn.lastActivity > self.hangAfter:
                        self._end(conn, "hung")
        finally:
            for index in list(self.open):
                self._end(self.conns[index], "hung")
            self.selector.close()
        return self.conns

    def _start(self, now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        conn = Conn(len(self.conns), s, self.rng.randbytes(self.rng.randint(*self.sizes)), now, now)
        self.conns.append(conn)
        self.open.add(conn.index)
        err = s.connect_ex(("127.0.0.1", self.port))
        assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
        self.selector.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _service(self, conn: Conn, events: int) -> None:
        if conn.outcome is not None:
            return
        if events & selectors.EVENT_WRITE:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._ended(conn, err)
                return
            self._write(conn)
        if events & selectors.EVENT_READ and conn.outcome is None:
            self._read(conn)

    def _write(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.payload[conn.sent:conn.sent + 262144])
        except BlockingIOError:
            return
        except OSError as e:
            # the ambassador reset or closed us while we were still sending: what it
            # sent before (the echo so far) is still to be read
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            conn.halfClosed = True
            conn.writeError = e.errno
            return
        if n:
            conn.sent += n
            conn.lastActivity = time.monotonic()
        if conn.sent == len(conn.payload):
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:  # ENOTCONN: reset already (a FIN would leave it connected)
                conn.writeError = conn.writeError or errno.ECONNRESET
            conn.halfClosed = True
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self._ended(conn, e.errno)
            return
        if not data:
            self._ended(conn, None)
            return
        conn.lastActivity = time.monotonic()
        if conn.payload[conn.received:conn.received + len(data)] != data:
            self._end(conn, "corrupt")
            return
        conn.digest.update(data)
        conn.received += len(data)

    def _ended(self, conn: Conn, err: int | None) -> None:
        if err is None and conn.writeError is not None:
            err = conn.writeError  # the reset was reported to send(); recv() then sees EOF
        if err is None and conn.received == len(conn.payload) and conn.halfClosed:
            assert conn.digest.digest() == hashlib.sha256(conn.payload).digest()
            self._end(conn, "complete")
        elif err is None:
            self._end(conn, "closed-early")
        elif err in (errno.ECONNRESET, errno.EPIPE):
            self._end(conn, "reset")
        else:
            self._end(conn, f"error-{errno.errorcode.get(err, err)}")

    def _end(self, conn: Conn, outcome: str) -> None:
        conn.outcome = outcome
        conn.ended = time.monotonic()
        self.open.discard(conn.index)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


# --- the twistd and its routes ---------------------------------------------------------


@dataclass
class Route:
    name: str
    listen: int
    upstreams: list[str]
    proxy: FaultProxy | None = None


@dataclass
class Setup:
    amb: Ambassador
    adminPort: int
    routes: dict[str, Route]
    baselineFds: int = 0
    rssAfterWarmUp: int = 0

    @property
    def pid(self) -> int:
        return self.amb.process.pid


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One twistd, one tcp route per scenario, each member behind its own proxy."""
    tmp = tmp_path_factory.mktemp("chaos-tcp")
    with Members() as members, Blackhole() as blackhole:
        echo = ("127.0.0.1", members.port["echo"])
        proxies = {name: FaultProxy(target=echo, seed=seed)
                   for seed, name in enumerate(("resets", "blackhole", "closes", "slow", "breaker"), 1)}
        try:
            routes = {name: Route(name, freePort(), [proxy.address], proxy)
                      for name, proxy in proxies.items()}
            dead = refusingAddress()
            routes["breaker"].upstreams = [dead, proxies["breaker"].address]
            routes["unreachable"] = Route("unreachable", freePort(), [blackhole.address])
            adminPort = freePort()
            config = (
                f'[admin]\nlisten = "tcp:{adminPort}"\n\n'
                f'[defaults]\nidle_timeout = {IDLE_TIMEOUT}\ndeadline = {DEADLINE}\n'
                f'connect_timeout = {CONNECT_TIMEOUT}\n\n'
                '[defaults.breaker]\nfailure_threshold = 3\nreset_timeout = "60s"\n\n'
            )
            for route in routes.values():
                upstreams = ", ".join(f'"{u}"' for u in route.upstreams)
                config += (f'[[route]]\nname = "{route.name}"\nprotocol = "tcp"\n'
                           f'listen = "tcp:{route.listen}"\nupstreams = [{upstreams}]\n\n')
            with Ambassador(tmp, config=config, args=()) as amb:
                waitUntil(lambda: _answers(adminPort), 10)
                setup = Setup(amb, adminPort, routes)
                setup.baselineFds = steadyFdCount(assertTwistd(setup.pid))
                # Warm-up: the first connections allocate what the process keeps
                # (buffers, code paths); leaks are judged against what follows.
                warm = Load(routes["resets"].listen, 0, 8, 1.0, (1000, 300_000), 5.0).run()
                assert Counter(c.outcome for c in warm) == Counter(complete=len(warm))
                waitUntil(lambda: fdCount(setup.pid) == setup.baselineFds, 5)
                waitUntil(lambda: len(_access(setup, routes["resets"])) == len(warm), 5)
                setup.rssAfterWarmUp = rssBytes(setup.pid)
                yield setup
        finally:
            for proxy in proxies.values():
                proxy.stop()


@dataclass
class Snapshot:
    metrics: dict
    access: int
    proxy: dict | None


def _snapshot(setup: Setup, route: Route) -> Snapshot:
    return Snapshot(scrapeMetrics(setup.adminPort), len(_access(setup, route)),
                    route.proxy.stats() if route.proxy is not None else None)


def _access(setup: Setup, route: Route) -> list[dict[str, str]]:
    return [line for line in setup.amb.accessLines() if line["route"] == route.name]


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return metricSum(after, name, **labels) - metricSum(before, name, **labels)


def _settle(setup: Setup, route: Route, before: Snapshot, conns: list[Conn]) -> tuple[list[dict], dict]:
    """After a load: the route's new access lines (one per connection), the metrics
    after it, and the checks every scenario shares."""
    n = len(conns)
    waitUntil(lambda: len(_access(setup, route)) - before.access >= n, 5)
    waitUntil(lambda: metricSum(scrapeMetrics(setup.adminPort), "ambassador_active_connections",
                                route=route.name) == 0, 5)
    after = scrapeMetrics(setup.adminPort)
    lines = _access(setup, route)[before.access:]
    assert len(lines) == n  # one access line per app connection, no more
    assert {line["result"] for line in lines} <= RESULTS
    # The metrics tell the same story as the access log.
    results = Counter(line["result"] for line in lines)
    for result, count in results.items():
        assert _delta(before.metrics, after, "ambassador_requests_total",
                      route=route.name, result=result) == count
    assert _delta(before.metrics, after, "ambassador_requests_total", route=route.name) == n
    assert (_delta(before.metrics, after, "ambassador_attempts_total", route=route.name)
            == sum(int(line["attempts"]) for line in lines))
    # Every complete echo is in the log with its exact byte counts.
    logged = Counter((int(line["bytes_in"]), int(line["bytes_out"])) for line in lines)
    complete = Counter((len(c.payload), len(c.payload)) for c in conns if c.outcome == "complete")
    assert not complete - logged
    # Leaks: a tcp route keeps no member connection once its pairs are closed.
    waitUntil(lambda: fdCount(setup.pid) == setup.baselineFds, 5)
    growth = rssBytes(setup.pid) - setup.rssAfterWarmUp
    print(f"{route.name}: {n} connections, RSS {growth / 2**20:+.1f} MiB since the warm-up")
    assert growth < RSS_GROWTH
    return lines, after


def _ended(conns: list[Conn]) -> Counter[str]:
    return Counter(c.outcome for c in conns)


def test_member_resets_before_and_mid_response(setup: Setup) -> None:
    """A member that resets before or in the middle of its answer: the app's
    connection is reset, after nothing or a prefix of the echo; the rest complete."""
    route = setup.routes["resets"]
    assert route.proxy is not None
    before = _snapshot(setup, route)
    # Payloads are all longer than `after`, so every reset_mid_response is a reset.
    route.proxy.set("random", p=0.3, modes=["reset_before_response", "reset_mid_response"],
                    after=1000)
    try:
        conns = Load(route.listen, 11, 24, 3.0, (2000, 200_000), DEADLINE + SLACK).run()
    finally:
        route.proxy.set("pass")
    ended = _ended(conns)
    stats = route.proxy.stats()
    faults = {mode: stats["faults"].get(mode, 0) - before.proxy["faults"].get(mode, 0)  # type: ignore[index]
              for mode in ("reset_before_response", "reset_mid_response")}
    assert stats["connections"] - before.proxy["connections"] == len(conns)  # type: ignore[index]
    assert set(ended) <= {"complete", "reset"}, ended
    assert ended["reset"] == sum(faults.values()) > 0
    assert ended["complete"] > 0
    # a reset before the response: nothing came back; mid-response: at most `after` bytes
    assert all(c.received <= 1000 for c in conns if c.outcome == "reset")
    lines, after = _settle(setup, route, before, conns)
    # The member was connected every time: ok, one attempt, no retry, breaker closed.
    assert Counter(line["result"] for line in lines) == Counter(ok=len(conns))
    assert _delta(before.metrics, after, "ambassador_retries_total", route=route.name) == 0
    assert metricSum(after, "ambassador_breaker_state", route=route.name) == 0


def test_member_that_flaps_into_a_blackhole_is_closed_after_idle_timeout(setup: Setup) -> None:
    """Connected, then silent: the pair is closed after idle_timeout (never before,
    never much after); connections opened while the member passes complete."""
    route = setup.routes["blackhole"]
    assert route.proxy is not None
    before = _snapshot(setup, route)
    route.proxy.schedule([(1.0, "pass", {}), (1.0, "blackhole", {})], repeat=True)
    # the idle check runs every idle_timeout / 8: closed between 1x and 1.125x
    hangAfter = IDLE_TIMEOUT * 1.125 + SLACK
    try:
        conns = Load(route.listen, 12, 16, 3.0, (100, 20_000), hangAfter).run()
    finally:
        route.proxy.set("pass")
    ended = _ended(conns)
    faults = route.proxy.stats()["faults"].get("blackhole", 0) - before.proxy["faults"].get("blackhole", 0)  # type: ignore[index]
    assert set(ended) <= {"complete", "reset"}, ended
    assert ended["reset"] == faults > 0
    assert ended["complete"] > 0
    for c in conns:
        if c.outcome == "reset":
            assert c.received == 0
            silence = c.ended - c.lastActivity  # type: ignore[operator]
            assert IDLE_TIMEOUT * 0.9 <= silence <= hangAfter, silence
    lines, _ = _settle(setup, route, before, conns)
    assert Counter(line["result"] for line in lines) == Counter(ok=len(conns))


def test_member_that_accepts_and_closes_closes_the_app_connection(setup: Setup) -> None:
    """A member that accepts and closes at once: the app's connection is closed (FIN
    passed on, or a reset if the app's bytes hit the closed socket), nothing echoed."""
    route = setup.routes["closes"]
    assert route.proxy is not None
    before = _snapshot(setup, route)
    route.proxy.set("random", p=0.3, modes=["accept_close"])
    try:
        conns = Load(route.listen, 13, 24, 3.0, (10, 100_000), DEADLINE + SLACK).run()
    finally:
        route.proxy.set("pass")
    ended = _ended(conns)
    faults = route.proxy.stats()["faults"].get("accept_close", 0) - before.proxy["faults"].get("accept_close", 0)  # type: ignore[index]
    assert set(ended) <= {"complete", "reset", "closed-early"}, ended
    assert ended["reset"] + ended["closed-early"] == faults > 0
    assert all(c.received == 0 for c in conns if c.outcome != "complete")
    lines, _ = _settle(setup, route, before, conns)
    assert Counter(line["result"] for line in lines) == Counter(ok=len(conns))


def test_slow_member_latency_and_throttled_bandwidth_lose_no_byte(setup: Setup) -> None:
    """Latency on every chunk and a member->app bandwidth cap: every echo completes
    byte for byte, with back-pressure (the twistd's memory stays near its baseline)."""
    route = setup.routes["slow"]
    assert route.proxy is not None
    before = _snapshot(setup, route)
    route.proxy.set("latency", ms=30)
    route.proxy.set("throttle", bytesPerSecond=400_000)
    try:
        conns = Load(route.listen, 14, 8, 3.0, (1000, 150_000), DEADLINE + SLACK).run()
    finally:
        route.proxy.set("pass")
    assert _ended(conns) == Counter(complete=len(conns))
    lines, _ = _settle(setup, route, before, conns)
    assert Counter(line["result"] for line in lines) == Counter(ok=len(conns))


def test_a_dead_member_opens_its_breaker_and_the_live_one_takes_every_connection(setup: Setup) -> None:
    """Two members, one refusing connections: its connect failures are retried on
    the other and open its breaker after failure_threshold (3); no app notices."""
    route = setup.routes["breaker"]
    assert route.proxy is not None
    dead, live = route.upstreams
    before = _snapshot(setup, route)
    route.proxy.set("latency", ms=5)
    try:
        conns = Load(route.listen, 15, 16, 3.0, (10, 50_000), DEADLINE + SLACK).run()
    finally:
        route.proxy.set("pass")
    assert _ended(conns) == Counter(complete=len(conns))
    lines, after = _settle(setup, route, before, conns)
    assert Counter(line["result"] for line in lines) == Counter(ok=len(conns))
    failed = _delta(before.metrics, after, "ambassador_attempts_total", route=route.name,
                    upstream=dead, result="connect-failure")
    assert failed >= 3  # the threshold; attempts already under way when it opened fail too
    assert _delta(before.metrics, after, "ambassador_attempts_total", route=route.name,
                  upstream=dead) == failed
    assert _delta(before.metrics, after, "ambassador_attempts_total", route=route.name,
                  upstream=live, result="ok") == len(conns)
    assert _delta(before.metrics, after, "ambassador_retries_total", route=route.name) == failed
    assert metricSum(after, "ambassador_breaker_state", route=route.name, upstream=dead) == 2
    assert metricSum(after, "ambassador_breaker_state", route=route.name, upstream=live) == 0
    assert sum(int(line["attempts"]) for line in lines) == len(conns) + failed
    # /status tells the same: the dead member open with its failures, the live one closed.
    members = {m["upstream"]: m for m in _status(setup, route)["members"]}
    assert members[dead]["breaker"] == "open"
    assert members[dead]["failures"] >= failed
    assert members[live]["breaker"] == "closed"


def test_an_unreachable_member_closes_every_app_connection_within_the_deadline(setup: Setup) -> None:
    """A member whose connects hang: each app connection is closed once connect
    attempts time out within the deadline, or at once with breaker-open after the
    breaker opened; never an echo, never a hang."""
    route = setup.routes["unreachable"]
    before = _snapshot(setup, route)
    hangAfter = DEADLINE + SLACK
    conns = Load(route.listen, 16, 8, 2.0, (10, 1000), hangAfter).run()
    ended = _ended(conns)
    assert set(ended) <= {"reset", "closed-early"}, ended
    assert all(c.received == 0 and c.ended - c.started <= hangAfter for c in conns)  # type: ignore[operator]
    lines, after = _settle(setup, route, before, conns)
    results = Counter(line["result"] for line in lines)
    # A connect that hangs until connect_timeout is a failed connection set-up.
    assert set(results) <= {"connect-failure", "timeout", "deadline", "breaker-open"}, results
    assert results["breaker-open"] > 0
    failed = _delta(before.metrics, after, "ambassador_attempts_total", route=route.name)
    assert failed >= 3  # failure_threshold, then no attempt while open
    assert _delta(before.metrics, after, "ambassador_attempts_total", route=route.name,
                  result="ok") == 0
    for line in lines:
        if line["result"] == "breaker-open":
            assert int(line["attempts"]) == 0
        else:  # each of its attempts waited for connect_timeout
            assert float(line["duration_ms"]) >= 0.9 * 1000 * CONNECT_TIMEOUT * int(line["attempts"])
    assert metricSum(after, "ambassador_breaker_state", route=route.name) == 2


def _status(setup: Setup, route: Route) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", setup.adminPort, timeout=5)
    try:
        conn.request("GET", f"/status?route={route.name}")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["routes"][0]
    finally:
        conn.close()


def _answers(adminPort: int) -> bool:
    try:
        scrapeMetrics(adminPort, timeout=1.0)
    except OSError:
        return False
    return True
