"""Pooled, pipelined member connections of a line route.

Each member has up to ``size`` persistent connections; an app connection sticks to
one of them per member, so its requests to that member are written in order on one
connection (a pipelined SET then GET sees its own write, SPEC §4/line), while many
app connections share each member connection.  Replies come back in the order the
requests were written, which is how each is matched to its request.

An attempt (a core ``Call``) is told of its raw reply, or fails with
``AttemptFailed``: ``connect-failure`` (``written=False``) when the connection
could not be made, ``reset`` (``written=True``) when it was lost with the request
in flight.  The
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

from ambassador.protocols.http.transport import writerFor
from ambassador.protocols.line import MANY, LineRequest, ProtocolError
from ambassador.resilience import reasons
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed

log = Logger(namespace="ambassador")

#: Member connections per member and route.  Few connections shared by many app
#: connections means deeper pipelines and fewer system calls per request.
POOL_SIZE = 4


class Batcher:
    """Coalesces writes made while handling input into one write per transport.

    Corked by each ``dataReceived`` (``depth``): a pipelined burst of N requests
    costs one ``write`` on each member connection instead of N (TWISTED-NOTES: a
    write is a system call).  With a ``callLater`` (the route's reactor), what is
    left dirty when the last cork comes off is written at the end of the reactor
    iteration rather than at once: the reactor hands over every readable socket
    of one ``epoll_wait`` before it runs the calls due now, so the requests of 50
    unpipelined app connections read in one iteration share one write to their
    member connection, not one each (``redis-benchmark -P 1``: the member-side
    ``send`` was a quarter of the route's CPU).  The delay is one loop turn,
    a few microseconds, never a timer period.
    """

    __slots__ = ("depth", "dirty", "callLater", "pending")

    def __init__(self, callLater: Any = None) -> None:
        self.depth = 0
        self.dirty: list[Any] = []
        self.callLater = callLater
        self.pending: Any = None

    def cork(self) -> None:
        self.depth += 1

    def uncork(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            if self.callLater is None:
                self.flush()
            elif self.pending is None:
                self.pending = self.callLater(0, self.flush)

    def flush(self) -> None:
        """Write what every dirty writer holds (each writer's ``flush``)."""
        self.pending = None
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for writer in dirty:
                writer.flush()


class MemberConnection(Protocol):
    """One pooled connection to a member.

    Per request it keeps no object of its own: the request's core ``Call`` (which
    knows its ``request``) goes on ``inFlight`` in write order and is told of its
    reply with ``attemptSucceeded``; with tens of thousands of requests in flight
    per second, each object less is less work for the allocator and the cyclic
    garbage collector.
    """

    transport: Any

    def __init__(self, pool: Pool, member: Member) -> None:
        self.pool = pool
        self.member = member
        self.parser = pool.dialect.responseParser()
        #: The calls whose requests were written and await their reply, oldest first.
        self.inFlight: deque[Any] = deque()
        #: Calls whose requests were sent before the connection was made.
        self.queued: list[Any] = []
        self.out: list[bytes] = []
        self.dirty = False
        self.connected = False
        self.closed = False
        self.users = 0
        self.pending: Deferred[Any] | None = None
        self.write: Any = None
        #: The dialect's framing of several replies at once, if it has one.
        self.many = getattr(self.parser, "many", None)

    # --- requests ----------------------------------------------------------------

    def send(self, call: Any, request: LineRequest) -> None:
        """Write ``request`` (now, or once connected) for the core ``call`` (an
        ``ambassador.resilience.core.Call`` whose ``request`` it is), which is told
        of the reply or of the failure."""
        if self.connected and not self.closed:
            self.out.append(request.raw)
            if not self.dirty:
                batcher = self.pool.batcher
                if batcher.depth:
                    self.dirty = True
                    batcher.dirty.append(self)
                else:
                    self.flush()
            if request.expectsReply:
                self.inFlight.append(call)
            else:
                call.attemptSucceeded(b"")
        elif self.closed:
            call.attemptFailed(AttemptFailed(reasons.CONNECT_FAILURE, written=False))
        else:
            self.queued.append(call)

    def flush(self) -> None:
        self.dirty = False
        out = self.out
        if not out or self.closed:
            return
        self.out = []
        self.write(out[0] if len(out) == 1 else b"".join(out))

    def abandon(self, call: Any) -> None:
        """The core gave up on ``call``'s attempt (its timeout).

        A queued request is simply dropped.  A written one will still be answered;
        its reply must be discarded, and this connection's order can no longer be
        trusted: it is closed, failing its other requests in flight (``reset``).
        """
        for i, queued in enumerate(self.queued):
            if queued is call:
                del self.queued[i]
                return
        for inFlight in self.inFlight:
            if inFlight is call:
                self.shutdown(reasons.RESET, cancelled=call)
                return

    # --- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        _noDelay(self.transport)
        self.write = writerFor(self.transport)
        queued, self.queued = self.queued, []
        if not queued:
            return
        batcher = self.pool.batcher
        batcher.cork()
        try:
            for call in queued:
                request = call.request
                self.out.append(request.raw)
                if not self.dirty:
                    self.dirty = True
                    batcher.dirty.append(self)
                if request.expectsReply:
                    self.inFlight.append(call)
                else:
                    call.attemptSucceeded(b"")
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
        batcher.depth += 1
        try:
            nextReply = parser.next
            while inFlight:
                call = inFlight[0]
                kind = call.request.kind
                reply = nextReply(kind) if kind is not MANY else self._frameMany(call)
                if reply is None:
                    break
                inFlight.popleft()
                try:
                    call.attemptSucceeded(reply)
                except Exception:  # noqa: BLE001 - one request's bug must not stall the others
                    log.failure("route {route}: answering a request", route=self.pool.routeName)
        except ProtocolError as e:
            log.warn("route {route}: {upstream} sent a malformed reply: {error}",
                     route=self.pool.routeName, upstream=self.member.upstream, error=str(e))
            self.shutdown(reasons.PROTOCOL_ERROR)
        finally:
            batcher.uncork()

    def _frameMany(self, call: Any) -> bytes | None:
        """The replies of a burst (its request a ``LineRun``), once all are in; until
        then the call keeps those framed: ``got`` of them, their bytes in ``pieces``."""
        run = call.request
        want = run.count
        many = self.many
        if many is not None:
            n, data = many(want - call.got)
            if n:
                call.pieces.append(data)
                call.got += n
        else:
            nextReply = self.parser.next
            requests = run.split()
            while call.got < want:
                reply = nextReply(requests[call.got].kind)
                if reply is None:
                    break
                call.pieces.append(reply)
                call.got += 1
        if call.got < want:
            return None
        pieces = call.pieces
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.connected = False
        self.shutdown(reasons.RESET)

    def shutdown(
        self, reason: str, failure: Failure | None = None, cancelled: Any = None,
    ) -> None:
        """Take this connection out of the pool and fail every request on it:
        those written with ``reason`` (written=True: the core replays only the safe
        ones), those never written as unwritten (always safe to replay).  The call
        ``cancelled`` (if that is why) was abandoned by the core already."""
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        # Emptied in place: a dataReceived loop under way holds this very deque.
        inFlight = list(self.inFlight)
        self.inFlight.clear()
        queued, self.queued = self.queued, []
        self.out = []
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        written = AttemptFailed(reason, written=True)
        for call in inFlight:
            if call is not cancelled:
                call.attemptFailed(written)
        if failure is not None and isinstance(failure.value, AttemptFailed):
            unwritten = failure.value
        else:
            unwritten = AttemptFailed(reasons.CONNECT_FAILURE, written=False)
        for call in queued:
            call.attemptFailed(unwritten)

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
        #: Connections of members that DNS discovery dropped, closed once idle.
        self.retiring: list[MemberConnection] = []
        self.retiringCheck: Any = None

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

    def retire(self, member: Member) -> None:
        """Discovery dropped ``member``: no app connection is given its connections any
        more; each closes as soon as it has nothing in flight (checked every second,
        off the hot path)."""
        self.retiring.extend(self.connections.pop(member, ()))
        self._closeRetired()

    def _closeRetired(self) -> None:
        self.retiringCheck = None
        busy = []
        for connection in self.retiring:
            if connection.closed:
                continue
            connection.close()
            if not connection.closed:
                busy.append(connection)
        self.retiring = busy
        if busy:
            self.retiringCheck = self.clock.callLater(1.0, self._closeRetired)

    def close(self) -> None:
        """Close every idle connection (the route stopped and has no app connection)."""
        if self.retiringCheck is not None and self.retiringCheck.active():
            self.retiringCheck.cancel()
        self.retiringCheck = None
        for connection in self.retiring:
            connection.close()
        for connections in list(self.connections.values()):
            for connection in list(connections):
                connection.close()
