"""Overload: 5,000 app connections at once against routes with ``max_connections = 1000``.

SPEC §4 says what the excess get, per protocol: tcp: "closed at once" (the ambassador
aborts them: a reset); http: ``503`` with ``x-ambassador-error: overloaded`` (to the
first request, without touching a member) and close; line: the error reply
``overloaded`` and close.  Issue 9 adds: the admitted ones are served (each completes
a request/response with a real member), the process stays responsive (admin ``/live``
answers within a bound while the 5,000 are held), and once they are released the
twistd's descriptors are back to their baseline.

One twistd with three routes (tcp, http, line) serves the module; each test floods
one route.  The clients are non-blocking sockets on one ``selectors`` loop (no
threads); the members are ``asyncmembers`` in a child process.  Both this process
and the twistd need well over 1,024 descriptors: the test raises its own soft limit
to the hard one, and the twistd is started with a soft limit of 1,024 on purpose,
because the ambassador raises its own at start-up (``ambassador.filelimit``).
"""

from __future__ import annotations

import errno
import http.client
import resource
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from accounting import (
    assertTwistd,
    fdsBesides,
    metricSum,
    scrapeMetrics,
    socketsByRemotePort,
    steadyFdCount,
    waitUntil,
)
from asyncmembers import Members
from harness import Ambassador, freePort

#: App connections opened at once, and the routes' max_connections.
CROWD = 5000
LIMIT = 1000
#: The hard open-file limit this test needs: 5,000 clients here; in the twistd
#: 1,000 app + 1,000 member connections, plus 4,000 being turned away.
NEEDED_HARD_LIMIT = 12000
#: An excess connection must be turned away this soon after it connected: far below
#: the routes' idle_timeout (60 s), so a connection closed for being idle (or never)
#: fails the test.
TURN_AWAY_BOUND = 10.0
#: The admin endpoint must answer /live this soon, during the flood and while held.
LIVE_BOUND = 5.0
#: The whole flood of one route (connect, turn away, serve) must end within this.
FLOOD_BOUND = 25.0


def _live(adminPort: int) -> float:
    """GET /live; return how long it took; fail past LIVE_BOUND or on a non-200."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", adminPort, timeout=LIVE_BOUND)
    try:
        conn.request("GET", "/live")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()
    took = time.monotonic() - started
    assert took < LIVE_BOUND
    return took


@pytest.fixture(scope="module")
def fileLimit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_HARD_LIMIT:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {NEEDED_HARD_LIMIT} "
                    f"that {CROWD} clients and a route at max_connections={LIMIT} need")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Setup:
    amb: Ambassador
    members: Members
    adminPort: int
    listen: dict[str, int]
    baselineFds: int
    #: route name -> the port of its member
    memberOf: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.amb.process.pid

    def memberPorts(self) -> set[int]:
        return set(self.members.port.values())


@pytest.fixture(scope="module")
def setup(fileLimit: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("overload")
    with Members() as members:
        listen = {name: freePort() for name in ("tcp", "http", "line")}
        adminPort = freePort()
        upstream = {"tcp": "echo", "http": "http", "line": "line"}
        routes = "".join(
            f'[[route]]\nname = "{name}"\nprotocol = "{name}"\n'
            + ('dialect = "line"\n' if name == "line" else "")
            + f'listen = "tcp:{port}"\nupstreams = ["{members.address[upstream[name]]}"]\n\n'
            for name, port in listen.items()
        )
        config = (
            f'[admin]\nlisten = "tcp:{adminPort}:interface=127.0.0.1"\n\n'
            f'[defaults]\nmax_connections = {LIMIT}\nidle_timeout = "60s"\n'
            'connect_timeout = "5s"\ntimeout = "20s"\ndeadline = "20s"\n\n' + routes
        )
        # Started with the soft limit most machines give (1,024): far too few for a
        # route at 1,000 connections, unless the ambassador raises its own.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            amb = Ambassador(tmp, config=config, args=())
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with amb:
            waitUntil(lambda: _ready(adminPort), 10)
            memberOf = {name: members.port[upstream[name]] for name in listen}
            setup = Setup(amb, members, adminPort, listen, 0, memberOf)
            assertTwistd(setup.pid)
            steadyFdCount(setup.pid)  # the /ready polls' connections are closed
            setup.baselineFds = fdsBesides(setup.pid, setup.memberPorts())
            yield setup


def _ready(adminPort: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", adminPort, timeout=2)
        conn.request("GET", "/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def test_the_ambassador_runs_with_a_raised_open_file_limit(setup: Setup) -> None:
    with open(f"/proc/{setup.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft = int(line.split()[3])
    assert soft >= 2 * 3 * LIMIT, line


# --- the crowd ------------------------------------------------------------------------


@dataclass
class Client:
    """One app connection and how it ended."""

    index: int
    sock: socket.socket
    connectedAt: float | None = None
    received: bytearray = field(default_factory=bytearray)
    sent: bool = False
    #: "served", "turned-away" or a failure ("refused", "reset-admitted", ...).
    outcome: str | None = None
    endedAt: float | None = None
    eof: bool = False
    error: int | None = None


class Crowd:
    """CROWD non-blocking connections on one selector, driven until each is judged.

    ``judge(client)`` looks at what a client received so far (and whether it saw
    EOF or an error) and returns its outcome, or None while it is undecided.
    ``request(client)`` is what an admitted client sends.
    """

    def __init__(self, port: int, judge: Callable[[Client], str | None],
                 request: Callable[[Client], bytes], sendAtConnect: bool) -> None:
        self.port = port
        self.judge = judge
        self.request = request
        self.sendAtConnect = sendAtConnect
        self.selector = selectors.DefaultSelector()
        self.clients: list[Client] = []

    def open(self, pump: Callable[[], None]) -> None:
        for i in range(CROWD):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
            client = Client(i, s)
            self.clients.append(client)
            err = s.connect_ex(("127.0.0.1", self.port))
            assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
            self.selector.register(s, selectors.EVENT_WRITE, client)
            if i % 250 == 249:
                pump()

    def pump(self, timeout: float = 0.0) -> None:
        for key, events in self.selector.select(timeout):
            client: Client = key.data
            if client.outcome is not None:
                continue
            if client.connectedAt is None:
                err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    client.connectedAt = time.monotonic()
                    client.error = err
                    self._judge(client)
                    continue
                client.connectedAt = time.monotonic()
                self.selector.modify(client.sock, selectors.EVENT_READ, client)
                if self.sendAtConnect:
                    self.send(client)
                continue
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                client.error = e.errno
            else:
                if data:
                    client.received += data
                else:
                    client.eof = True
            self._judge(client)

    def send(self, client: Client) -> None:
        client.sent = True
        try:
            client.sock.send(self.request(client))  # small: the kernel takes it whole
        except OSError as e:
            client.error = e.errno
            self._judge(client)

    def _judge(self, client: Client) -> None:
        outcome = self.judge(client)
        if outcome is not None:
            self._end(client, outcome)
        elif client.eof or client.error is not None:
            self._end(client, f"ended-undecided(eof={client.eof},error={client.error},"
                              f"received={bytes(client.received[:80])!r})")

    def _end(self, client: Client, outcome: str) -> None:
        client.outcome = outcome
        client.endedAt = time.monotonic()
        if outcome != "served":  # served ones are held open until release()
            self.selector.unregister(client.sock)
            client.sock.close()

    def runUntil(self, done: Callable[[], bool], until: float) -> None:
        while not done() and time.monotonic() < until:
            self.pump(0.05)

    def outcomes(self) -> Counter[str]:
        return Counter(c.outcome or ("pending" if c.connectedAt else "connecting") for c in self.clients)

    def release(self) -> None:
        for client in self.clients:
            try:
                self.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()
        self.selector.close()


def _flood(setup: Setup, route: str, crowd: Crowd, admittedSilent: bool) -> dict[str, object]:
    """Connect CROWD clients, see LIMIT served and the rest turned away, check /live
    during the flood and while held, release, and check the accounting."""
    pid, admin = setup.pid, setup.adminPort
    before = scrapeMetrics(admin)
    started = time.monotonic()
    until = started + FLOOD_BOUND
    live = []
    try:
        crowd.open(crowd.pump)
        live.append(_live(admin))  # the flood is under way
        crowd.runUntil(lambda: crowd.outcomes()["turned-away"] >= CROWD - LIMIT, until)
        if admittedSilent:
            # tcp, line: the admitted hear nothing until they ask; ask now.
            crowd.sendAtConnect = True
            for client in crowd.clients:
                if client.outcome is None and client.connectedAt is not None:
                    crowd.send(client)
        crowd.runUntil(lambda: all(c.outcome for c in crowd.clients), until)
        outcomes = crowd.outcomes()
        assert outcomes == Counter({"served": LIMIT, "turned-away": CROWD - LIMIT}), outcomes
        lateness = max(c.endedAt - c.connectedAt for c in crowd.clients  # type: ignore[operator]
                       if c.outcome == "turned-away")
        assert lateness < TURN_AWAY_BOUND
        # The admitted are held open: the route is full, and the admin still answers.
        live.append(_live(admin))
        held = scrapeMetrics(admin)
        assert metricSum(held, "ambassador_active_connections", route=route) == LIMIT
    finally:
        crowd.release()
    waitUntil(lambda: metricSum(scrapeMetrics(admin), "ambassador_active_connections",
                                route=route) == 0, 10)
    after = scrapeMetrics(admin)

    def delta(result: str) -> float:
        return (metricSum(after, "ambassador_requests_total", route=route, result=result)
                - metricSum(before, "ambassador_requests_total", route=route, result=result))

    assert delta("overloaded") == CROWD - LIMIT
    assert delta("ok") == LIMIT
    # The excess never reached a member: one attempt per admitted connection, no more.
    assert (metricSum(after, "ambassador_attempts_total", route=route)
            - metricSum(before, "ambassador_attempts_total", route=route)) == LIMIT
    # Descriptors: back to the baseline, apart from the member connections a pooling
    # route keeps on purpose (bounded by its pool).
    ports = setup.memberPorts()
    waitUntil(lambda: fdsBesides(pid, ports) == setup.baselineFds, 10)
    pooled = socketsByRemotePort(pid).get(setup.memberOf[route], 0)
    result = {"live": live, "turnAwayMax": lateness, "pooled": pooled,
              "seconds": time.monotonic() - started}
    print(route, result)  # shown with -s: how long /live and the turning away took
    return result


def test_tcp_excess_connections_are_reset_at_once_and_the_admitted_are_relayed(setup: Setup) -> None:
    def request(client: Client) -> bytes:
        return b"tcp client %d\n" % client.index

    def judge(client: Client) -> str | None:
        if not client.sent:
            # Nothing asked yet: only the ambassador's abort can end it (a reset; a
            # FIN would do for SPEC's "closed", but nothing may come with it).
            if client.error == errno.ECONNRESET or (client.eof and not client.received):
                return "turned-away"
            if client.received:
                return "unexpected-bytes"
            return None
        expected = request(client)
        if bytes(client.received) == expected:
            return "served"
        if client.eof or client.error is not None or not expected.startswith(bytes(client.received)):
            return "reset-admitted"
        return None

    result = _flood(setup, "tcp", Crowd(setup.listen["tcp"], judge, request, False), True)
    assert result["pooled"] == 0  # one member connection per app connection, all closed


def test_http_excess_connections_get_503_overloaded_and_the_admitted_are_proxied(setup: Setup) -> None:
    def request(client: Client) -> bytes:
        return b"GET /c%d HTTP/1.1\r\nHost: app\r\n\r\n" % client.index

    def judge(client: Client) -> str | None:
        data = bytes(client.received)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = data[:end].decode("latin-1").lower()
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                       if line.startswith("content-length:")), None)
        if length is None or len(data) < end + 4 + length:
            return None
        body = data[end + 4:end + 4 + length]
        if head.startswith("http/1.1 200") and body == b"member /c%d" % client.index:
            return "served"
        if (head.startswith("http/1.1 503") and "x-ambassador-error: overloaded" in head
                and "x-ambassador-attempts: 0" in head):
            # and the connection closes after it
            return "turned-away" if client.eof or client.error is not None else None
        return f"unexpected-response {head.splitlines()[0]!r}"

    result = _flood(setup, "http", Crowd(setup.listen["http"], judge, request, True), False)
    assert result["pooled"] <= 64  # the http route keeps at most 64 idle per member


def test_line_excess_connections_get_the_overloaded_error_and_the_admitted_are_answered(setup: Setup) -> None:
    def request(client: Client) -> bytes:
        return b"ping %d\n" % client.index

    def judge(client: Client) -> str | None:
        data = bytes(client.received)
        if not client.sent:
            if data == b"ERROR ambassador overloaded\r\n":
                return "turned-away" if client.eof or client.error is not None else None
            if not b"ERROR ambassador overloaded\r\n".startswith(data):
                return "unexpected-bytes"
            return None
        if data == b"OK ping %d\r\n" % client.index:
            return "served"
        return "unexpected-reply" if b"\n" in data else None

    result = _flood(setup, "line", Crowd(setup.listen["line"], judge, request, False), True)
    assert result["pooled"] <= 4  # the line route's pool: POOL_SIZE per member
