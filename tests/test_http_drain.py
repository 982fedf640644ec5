"""An http route's keep-alive app connections when their route drains (SPEC §7).

A reload that changes a route hands its listener to new settings; the old settings'
connections then answer the app's next request with ``connection: close`` instead of
closing under it (HAProxy's ``idle-close-on-response``, Envoy's drain), for at most
``drain_timeout``.  A stop (SIGTERM) closes idle ones at once.  Unit tests drive the
connections through StringTransports with a ``task.Clock``; the end-to-end ones run the
real twistd against a real HTTP member.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from harness import Ambassador, freePort
from test_http_unit import FakeMemberEndpoint, Records, _route
from test_reload import reload
from test_reload_http import HTTPMember, httpRoute
from twisted.internet import task
from twisted.internet.testing import StringTransportWithDisconnection

from ambassador.protocols.http import httpProtocol
from ambassador.protocols.http.server import DRAIN_LOOK
from ambassador.resilience.core import RouteCore

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"

# --- unit: the connection's side, on a task.Clock -----------------------------------------


class Listener:
    """One route's factory, started as a listening port starts it."""

    def __init__(self, route, clock, endpoint, observers=None):
        self.core = RouteCore(route, clock, lambda upstream: endpoint, observers)
        self.factory = httpProtocol.buildFactory(route, self.core, clock)
        self.factory.doStart()

    def connect(self):
        app = self.factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = app
        app.makeConnection(transport)
        return app, transport


@pytest.fixture
def rig():
    """An old route with one keep-alive connection that got one answer."""
    clock = task.Clock()
    endpoint = FakeMemberEndpoint()
    records = Records()
    route = _route(drainTimeout=3.0, idleTimeout=30.0)
    old = Listener(route, clock, endpoint, [records])
    app, transport = old.connect()
    app.dataReceived(b"GET /one HTTP/1.1\r\nHost: app\r\n\r\n")
    endpoint.connections[0].dataReceived(OK)
    assert transport.value().endswith(b"\r\n\r\nhi")
    assert b"connection: close" not in transport.value()
    transport.clear()

    class Rig:
        pass

    rig = Rig()
    rig.clock, rig.endpoint, rig.records, rig.route = clock, endpoint, records, route
    rig.old, rig.app, rig.transport = old, app, transport
    yield rig
    if transport.connected:
        transport.loseConnection()


def handOver(rig):
    """What a reload that changes the route does: the port switches to a new factory
    (started first), then hands the old one over."""
    new = Listener(_route(drainTimeout=rig.route.drainTimeout, idleTimeout=rig.route.idleTimeout,
                          timeout=3.0), rig.clock, rig.endpoint)
    rig.old.factory.handOver()
    return new


def timersOf(clock, app):
    return [call for call in clock.getDelayedCalls() if getattr(call.func, "__self__", None) is app]


def test_a_handed_over_idle_connection_answers_the_next_request_with_connection_close(rig):
    new = handOver(rig)
    rig.clock.advance(1.0)  # well past DRAIN_LOOK: a stop would have closed it by now
    assert rig.transport.connected
    rig.app.dataReceived(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
    assert len(rig.endpoint.connections) == 1  # the old pool's member connection, reused
    member = rig.endpoint.connections[0]
    assert b"GET /two " in member.transport.value()
    member.dataReceived(OK)
    answer = rig.transport.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhi")
    assert b"connection: close\r\n" in answer
    assert not rig.transport.connected
    # each request counted once; no timer left behind; the old pool is emptied
    assert [(r.result, r.status) for r in rig.records.records] == [("ok", 200), ("ok", 200)]
    assert timersOf(rig.clock, rig.app) == []
    assert rig.old.core.activeConnections == 0
    assert not any(rig.old.factory.pool.idle.values())
    assert not member.transport.connected
    new.factory.doStop()
    assert rig.clock.getDelayedCalls() == []  # the pools' sweepers included


def test_a_handed_over_idle_connection_closes_at_drain_timeout(rig):
    handOver(rig)
    rig.clock.advance(2.9)
    assert rig.transport.connected
    rig.clock.advance(0.2)
    assert not rig.transport.connected
    assert rig.transport.value() == b""  # no answer to no request
    assert not rig.transport.disconnected  # a close, not an abort
    assert timersOf(rig.clock, rig.app) == []
    assert len(rig.records.records) == 1


def test_idle_timeout_still_closes_a_draining_connection_first_when_it_is_shorter():
    clock = task.Clock()
    endpoint = FakeMemberEndpoint()
    route = _route(drainTimeout=10.0, idleTimeout=2.0)
    old = Listener(route, clock, endpoint)
    app, transport = old.connect()
    new = Listener(route, clock, endpoint)  # noqa: F841 (the listener's, while it lives)
    old.factory.handOver()
    clock.advance(1.9)
    assert transport.connected
    clock.advance(0.2)
    assert not transport.connected
    assert timersOf(clock, app) == []


def test_a_stop_closes_an_idle_connection_after_a_look(rig):
    rig.old.factory.doStop()  # a stop, not a hand-over
    assert rig.transport.connected
    rig.clock.advance(DRAIN_LOOK)
    assert not rig.transport.connected and rig.transport.value() == b""
    assert timersOf(rig.clock, rig.app) == []


def test_the_answer_under_way_at_a_hand_over_carries_connection_close(rig):
    rig.app.dataReceived(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
    handOver(rig)
    rig.endpoint.connections[0].dataReceived(OK)
    answer = rig.transport.value()
    assert b"connection: close\r\n" in answer and answer.endswith(b"hi")
    assert not rig.transport.connected


def test_an_answer_whose_head_went_out_before_the_hand_over_leaves_room_for_one_more(rig):
    rig.app.dataReceived(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
    member = rig.endpoint.connections[0]
    member.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    handOver(rig)
    member.dataReceived(b"cd")
    assert rig.transport.value().endswith(b"\r\n\r\nabcd")
    assert b"connection: close" not in rig.transport.value()
    assert rig.transport.connected  # the app may already be sending its next request
    rig.transport.clear()
    rig.clock.advance(0.5)
    rig.app.dataReceived(b"POST /three HTTP/1.1\r\nHost: app\r\nContent-Length: 1\r\n\r\nx")
    rig.endpoint.connections[-1].dataReceived(OK)
    assert b"connection: close\r\n" in rig.transport.value()
    assert not rig.transport.connected
    assert [r.status for r in rig.records.records] == [200, 200, 200]


def test_pipelined_requests_already_received_are_all_answered_the_last_with_close(rig):
    rig.app.dataReceived(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\nGET /b HTTP/1.1\r\nHost: app\r\n\r\n")
    handOver(rig)
    member = rig.endpoint.connections[0]
    member.dataReceived(OK)
    first = rig.transport.value()
    assert first.endswith(b"hi") and b"connection: close" not in first
    assert rig.transport.connected
    rig.transport.clear()
    member.dataReceived(OK)
    assert b"connection: close\r\n" in rig.transport.value()
    assert not rig.transport.connected
    assert len(rig.records.records) == 3


# --- end to end: the real twistd, a real HTTP member ---------------------------------------

DEFAULTS = '[defaults]\ndrain_timeout = "{drain}"\n\n'


class RawClient:
    """One keep-alive connection, read response by response (Content-Length bodies)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the ambassador closed the connection")
        self.buffer += data

    def closedWithin(self, seconds: float) -> bool:
        """Whether the ambassador closes (FIN, no more bytes) within ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(100) == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def accessLinesOf(amb: Ambassador, route: str, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
    """The route's access lines once ``count`` are written (they are batched)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in amb.accessLines() if line["route"] == route]
        if len(lines) >= count or time.monotonic() > deadline:
            time.sleep(0.3)  # and no more come
            return [line for line in amb.accessLines() if line["route"] == route]
        time.sleep(0.05)


def test_after_a_reload_the_next_request_on_a_keepalive_connection_gets_a_closing_answer(tmp_path):
    member = HTTPMember()
    listen = freePort()
    config = DEFAULTS.format(drain="10s") + httpRoute("r", listen, member.port, extra='timeout = "{t}"')
    try:
        with Ambassador(tmp_path, config=config.format(t="2s")) as amb:
            client = RawClient(listen)
            status, headers, body = client.get("/one")
            assert (status, body) == (200, f"{member.port} /one".encode())
            assert headers.get("connection") != "close"
            reload(amb, config.format(t="3s"), 1)  # waits for "reload: done"
            time.sleep(0.3)  # longer than a stop's look: the connection is not closed
            status, headers, body = client.get("/two")
            assert (status, body) == (200, f"{member.port} /two".encode())
            assert headers.get("connection") == "close"
            assert client.closedWithin(5), "the connection stayed open after connection: close"
            client.close()
            amb.waitForLog(r"route r \(changed\): old settings retired")
            lines = accessLinesOf(amb, "r", 2)
            assert [(line["result"], line["status"]) for line in lines] == [("ok", "200"), ("ok", "200")]
            fresh = RawClient(listen)  # new connections get the new settings
            assert fresh.get("/three")[0] == 200
            fresh.close()
        assert amb.process.returncode == 0
    finally:
        member.close()


def test_after_a_reload_an_idle_keepalive_connection_closes_at_drain_timeout(tmp_path):
    member = HTTPMember()
    listen = freePort()
    config = DEFAULTS.format(drain="1s") + httpRoute("r", listen, member.port, extra='timeout = "{t}"')
    try:
        with Ambassador(tmp_path, config=config.format(t="2s")) as amb:
            client = RawClient(listen)
            assert client.get("/one")[0] == 200
            reload(amb, config.format(t="3s"), 1)
            reloaded = time.monotonic()
            assert client.closedWithin(5)
            # the bound is the old route's drain_timeout (1 s), counted from the reload
            assert 0.3 < time.monotonic() - reloaded < 1.0 + 2.0
            client.close()
            amb.waitForLog(r"route r \(changed\): old settings retired")
    finally:
        member.close()


def test_sigterm_after_a_reload_ends_within_drain_timeout_with_a_connection_left_idle(tmp_path):
    member = HTTPMember()
    listen = freePort()
    config = DEFAULTS.format(drain="2s") + httpRoute("r", listen, member.port, extra='timeout = "{t}"')
    amb = Ambassador(tmp_path, config=config.format(t="2s"))
    try:
        client = RawClient(listen)
        assert client.get("/one")[0] == 200
        reload(amb, config.format(t="3s"), 1)
        signalled = time.monotonic()
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 0
        # drain_timeout, plus the drain's polling and twistd's own shutdown
        assert time.monotonic() - signalled < 2.0 + 3.0
        assert client.closedWithin(2)
        client.close()
    finally:
        amb.stop()
        member.close()
