"""Pooled, pipelined member connections of a line route.

Each member has up to ``size`` persistent connections; an app connection sticks to
one of them per member, so its requests to that member are written in order on one
connection (a pipelined SET then GET sees its own write, SPEC §4/line), while many
app connections share each member connection.  Replies come back in the order the
requests were written, which is how each is matched to its request.

An attempt's Deferred fires with the raw reply, or fails with ``AttemptFailed``:
``connect-failure`` (``written=False``) when the connection could not be made,
``reset`` (``written=True``) when it was lost with the request in flight.  The
resilience core decides from that and the request's safety whether to replay it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.protocols.line import LineRequest, ProtocolError
from ambassador.resilience import reasons
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed

log = Logger(namespace="ambassador")

#: Member connections per member and route.  Few connections shared by many app
#: connections means deeper pipelines and fewer system calls per request.
POOL_SIZE = 4

_QUEUED, _WRITTEN, _DONE = 0, 1, 2


class Batcher:
    """Coalesces writes made while handling one burst of input into one write per
    transport: a pipelined burst of N requests costs one ``write`` on each member
    connection instead of N (TWISTED-NOTES: every write may toggle epoll interest)."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[Any] = []

    def cork(self) -> None:
        self.depth += 1

    def uncork(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            while self.dirty:
                dirty, self.dirty = self.dirty, []
                for writer in dirty:
                    writer.flush()


class _Slot:
    """One request on one member connection, from queued to answered."""

    __slots__ = ("cancelled", "connection", "deferred", "request", "state")

    def __init__(self, request: LineRequest, connection: MemberConnection) -> None:
        self.request = request
        self.connection = connection
        self.state = _QUEUED
        self.cancelled = False
        self.deferred: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self.connection.cancel(self)


class MemberConnection(Protocol):
    """One pooled connection to a member."""

    transport: Any

    def __init__(self, pool: Pool, member: Member) -> None:
        self.pool = pool
        self.member = member
        self.parser = pool.dialect.responseParser()
        self.inFlight: deque[_Slot] = deque()
        self.queued: list[_Slot] = []
        self.out: list[bytes] = []
        self.dirty = False
        self.connected = False
        self.closed = False
        self.users = 0
        self.pending: Deferred[Any] | None = None

    # --- requests ----------------------------------------------------------------

    def send(self, request: LineRequest) -> Deferred[bytes]:
        """Write ``request`` (now, or once connected); fires with its raw reply."""
        slot = _Slot(request, self)
        if self.closed:
            slot.deferred.errback(AttemptFailed(reasons.CONNECT_FAILURE, written=False))
        elif self.connected:
            self._write(slot)
        else:
            self.queued.append(slot)
        return slot.deferred

    def _write(self, slot: _Slot) -> None:
        request = slot.request
        self.out.append(request.raw)
        batcher = self.pool.batcher
        if batcher.depth:
            if not self.dirty:
                self.dirty = True
                batcher.dirty.append(self)
        else:
            self.flush()
        if request.expectsReply:
            slot.state = _WRITTEN
            self.inFlight.append(slot)
        else:
            slot.state = _DONE
            slot.deferred.callback(b"")

    def flush(self) -> None:
        self.dirty = False
        out = self.out
        if not out or self.closed:
            return
        self.out = []
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def cancel(self, slot: _Slot) -> None:
        """The core gave up on this attempt (its timeout, or the request went away).

        A queued request is simply dropped.  A written one will still be answered;
        its reply must be discarded, and this connection's order can no longer be
        trusted: it is closed, failing its other requests in flight (``reset``).
        """
        if slot.state == _QUEUED:
            if slot in self.queued:
                self.queued.remove(slot)
        elif slot.state == _WRITTEN:
            slot.cancelled = True
            self.shutdown(reasons.RESET)

    # --- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        _noDelay(self.transport)
        queued, self.queued = self.queued, []
        batcher = self.pool.batcher
        batcher.cork()
        try:
            for slot in queued:
                self._write(slot)
        finally:
            batcher.uncork()

    def connectFailed(self, failure: Failure) -> None:
        self.pending = None
        self.shutdown(reasons.CONNECT_FAILURE, failure)

    def dataReceived(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        inFlight = self.inFlight
        batcher = self.pool.batcher
        batcher.cork()
        try:
            while inFlight:
                reply = parser.next(inFlight[0].request.kind)
                if reply is None:
                    break
                slot = inFlight.popleft()
                slot.state = _DONE
                if not slot.cancelled:
                    slot.deferred.callback(reply)
        except ProtocolError as e:
            log.warn("route {route}: {upstream} sent a malformed reply: {error}",
                     route=self.pool.routeName, upstream=self.member.upstream, error=str(e))
            self.shutdown(reasons.PROTOCOL_ERROR)
        finally:
            batcher.uncork()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.connected = False
        self.shutdown(reasons.RESET)

    def shutdown(self, reason: str, failure: Failure | None = None) -> None:
        """Take this connection out of the pool and fail every request on it:
        those written with ``reason`` (written=True: the core replays only the safe
        ones), those never written as unwritten (always safe to replay)."""
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        inFlight, self.inFlight = self.inFlight, deque()
        queued, self.queued = self.queued, []
        self.out = []
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        for slot in inFlight:
            slot.state = _DONE
            if not slot.cancelled:
                slot.deferred.errback(AttemptFailed(reason, written=True))
        for slot in queued:
            slot.state = _DONE
            if failure is not None and isinstance(failure.value, AttemptFailed):
                slot.deferred.errback(failure.value)
            else:
                slot.deferred.errback(AttemptFailed(reasons.CONNECT_FAILURE, written=False))

    def close(self) -> None:
        """Close an idle connection (the route is stopping)."""
        if not self.inFlight and not self.queued:
            self.shutdown(reasons.RESET)


def _noDelay(transport: Any) -> None:
    """Small pipelined writes must not wait for Nagle's algorithm (and the peer's
    delayed ACK): a request/response protocol would pay up to 40 ms a round trip."""
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:  # pragma: no cover - not a TCP socket after all
            pass


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, connection: MemberConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> MemberConnection:
        return self.connection


class Pool:
    """The member connections of one route."""

    def __init__(
        self, dialect: Any, clock: IReactorTime, connectTimeout: float, routeName: str = "",
        size: int = POOL_SIZE, batcher: Batcher | None = None,
    ) -> None:
        self.dialect = dialect
        self.clock = clock
        self.connectTimeout = connectTimeout
        self.routeName = routeName
        self.size = size
        self.batcher = batcher if batcher is not None else Batcher()
        self.connections: dict[Member, list[MemberConnection]] = {}

    def acquire(self, member: Member) -> MemberConnection:
        """A connection to ``member`` for one more app connection to stick to."""
        connections = self.connections.setdefault(member, [])
        if len(connections) < self.size:
            connection = MemberConnection(self, member)
            connections.append(connection)
            d = member.connect(_ConnectionFactory(connection), self.clock, self.connectTimeout)
            connection.pending = d
            d.addCallbacks(self._connected, connection.connectFailed, callbackArgs=(connection,))
        else:
            connection = min(connections, key=lambda c: c.users)
        connection.users += 1
        return connection

    def _connected(self, protocol: Any, connection: MemberConnection) -> None:
        connection.pending = None

    def release(self, connection: MemberConnection) -> None:
        connection.users -= 1

    def forget(self, connection: MemberConnection) -> None:
        connections = self.connections.get(connection.member)
        if connections is not None and connection in connections:
            connections.remove(connection)

    def close(self) -> None:
        """Close every idle connection (the route stopped and has no app connection)."""
        for connections in list(self.connections.values()):
            for connection in list(connections):
                connection.close()
