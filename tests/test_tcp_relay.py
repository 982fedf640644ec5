"""The tcp route's hot path, in isolation: direct relay writes and idle accounting.

``_relay`` writes straight into a plain socket when nothing is queued, and must keep
Twisted's ordering and back-pressure when the kernel does not take everything; the
idle check counts bytes instead of timing each chunk, and must never close a pair
early nor more than 1/IDLE_CHECKS late.  Every timer here is a ``task.Clock``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from ambassador.protocols.tcp import (
    IDLE_CHECKS,
    READ_SIZE,
    SMALL_READ,
    _AppSide,
    _MemberSide,
    _relay,
    _socketFor,
)

# --- _relay: straight into the socket, or through transport.write ---------------------


def plainConnection(sock: socket.socket) -> tcp.Connection:
    """A Twisted TCP transport over one end of a socketpair, on a fake reactor."""
    sock.setblocking(False)
    connection = tcp.Connection(sock, None, reactor=MemoryReactor())  # type: ignore[arg-type]
    connection.connected = 1
    connection.bufferSize = READ_SIZE
    return connection


def recvAll(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    chunks, got = [], 0
    while got < size:
        data = sock.recv(size - got)
        assert data, "EOF before all bytes arrived"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def test_relay_sends_at_once_when_nothing_is_queued() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = plainConnection(ours)
        _relay(connection, _socketFor(connection), b"hello")
        assert recvAll(theirs, 5) == b"hello"
        assert connection._tempDataLen == 0 and not connection.dataBuffer
        assert connection.reactor.writers == set()  # no write interest was registered


class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_relay_queues_what_the_kernel_refuses_in_order_and_pauses_the_producer() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        connection = plainConnection(ours)
        producer = Producer()
        connection.registerProducer(producer, True)
        sock = _socketFor(connection)
        chunks = [bytes([n]) * READ_SIZE for n in range(3)]
        for chunk in chunks:
            _relay(connection, sock, chunk)
        # the first chunk's unsent tail, then the other two, queue in Twisted's buffer
        assert 2 * READ_SIZE < connection._tempDataLen < 3 * READ_SIZE
        assert connection.reactor.writers == {connection}
        assert producer.paused, "more than bufferSize queued: the reading side must pause"
        # drain: whatever the kernel took first, then the queue, in order
        received = bytearray()
        while len(received) < len(chunks) * READ_SIZE:
            connection.doWrite()
            theirs.settimeout(5)
            received += theirs.recv(1 << 20)
        assert bytes(received) == b"".join(chunks)
        assert not producer.paused


def test_relay_uses_write_for_anything_but_a_plain_socket() -> None:
    transport = StringTransport()
    assert _socketFor(transport) is None
    _relay(transport, None, b"via write")
    assert transport.value() == b"via write"


def test_relay_does_not_bypass_a_closing_transport() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = plainConnection(ours)
        connection.disconnecting = 1
        _relay(connection, _socketFor(connection), b"late")
        assert connection._tempDataLen == 4  # left to Twisted's own write/close logic


# --- idle accounting --------------------------------------------------------------------


class Route:
    def __init__(self, idleTimeout: float) -> None:
        self.idleTimeout = idleTimeout
        self.connectTimeout = 1.0


class Core:
    """The part of RouteCore a tcp pair talks to, with the connect under test control."""

    def __init__(self, idleTimeout: float) -> None:
        self.route = Route(idleTimeout)
        self.records: list[Any] = []
        self.attempt: Deferred[Any] = Deferred()

    def admit(self, connection: Any) -> bool:
        return True

    def release(self, connection: Any) -> None:
        pass

    def request(self, attempt: Any, **kwargs: Any) -> Deferred[Any]:
        return self.attempt

    def finished(self, record: Any) -> None:
        self.records.append(record)


class Outcome:
    def __init__(self, value: Any) -> None:
        self.value = value
        self.attempts = 1
        self.member = type("Member", (), {"upstream": "tcp:127.0.0.1:1"})()


def connectedPair(idle: float) -> tuple[_AppSide, _MemberSide, Clock]:
    clock = Clock()
    core = Core(idle)
    app = _AppSide(core, clock)  # type: ignore[arg-type]
    app.makeConnection(StringTransport())
    member = _MemberSide(app)
    member.makeConnection(StringTransport())
    core.attempt.callback(Outcome(member))
    return app, member, clock


def closedAt(app: _AppSide, clock: Clock, step: float, limit: float) -> float:
    started = clock.seconds()
    while not app.transport.disconnecting:  # type: ignore[attr-defined]
        assert clock.seconds() - started < limit, "the idle pair was never closed"
        clock.advance(step)
    return clock.seconds()


def test_idle_pair_closes_after_idle_timeout_and_at_most_one_check_late() -> None:
    app, member, clock = connectedPair(idle=8.0)
    at = closedAt(app, clock, step=0.01, limit=20)
    assert 8.0 <= at <= 8.0 * (1 + 1 / IDLE_CHECKS) + 0.05  # + the test clock's step
    assert member.transport.disconnecting  # type: ignore[attr-defined]


def test_bytes_either_way_keep_the_pair_open_and_silence_is_timed_from_the_last_byte() -> None:
    app, member, clock = connectedPair(idle=8.0)
    for n in range(40):  # 40 s of traffic, a byte every second, alternating sides
        clock.advance(1.0)
        (app if n % 2 else member).dataReceived(b"x")
        assert not app.transport.disconnecting  # type: ignore[attr-defined]
    lastByte = clock.seconds()
    at = closedAt(app, clock, step=0.01, limit=20)
    assert 8.0 <= at - lastByte <= 8.0 * (1 + 1 / IDLE_CHECKS) + 0.05  # + the test clock's step
    assert member.transport.value() == b"x" * 20  # type: ignore[attr-defined]
    assert app.transport.value() == b"x" * 20  # type: ignore[attr-defined]


def test_a_byte_just_before_the_deadline_is_never_missed() -> None:
    app, _member, clock = connectedPair(idle=8.0)
    clock.advance(7.999)
    app.dataReceived(b"y")
    clock.advance(7.99)
    assert not app.transport.disconnecting  # type: ignore[attr-defined]


# --- adaptive read size ------------------------------------------------------------------


def test_a_full_read_grows_the_read_size_and_a_short_one_shrinks_it_back() -> None:
    app, member, _clock = connectedPair(idle=60.0)
    for side in (app, member):
        assert side.transport.bufferSize == SMALL_READ  # type: ignore[attr-defined]
        side.dataReceived(b"b" * SMALL_READ)  # the buffer was full: a bulk flow
        assert side.transport.bufferSize == READ_SIZE  # type: ignore[attr-defined]
        side.dataReceived(b"b" * (SMALL_READ + 1))  # a big-enough read keeps it
        assert side.transport.bufferSize == READ_SIZE  # type: ignore[attr-defined]
        side.dataReceived(b"s" * 100)  # request/response sized: small reads again
        assert side.transport.bufferSize == SMALL_READ  # type: ignore[attr-defined]
