"""The ``tcp`` route: one member connection per app connection, bytes both ways.

The member connection is set up through the route's resilience core (balancing,
breakers, connect retries within the deadline); after that the relay is two
transports that are each other's producers, so a slow side pauses the other and
memory stays bounded (SPEC §4/tcp).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.interfaces import IRouteProtocol
from ambassador.resilience import reasons
from ambassador.resilience.core import RequestRecord, RouteCore
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import RequestFailed

#: The largest recv() of a bulk flow.  Bigger reads mean fewer reactor iterations
#: per megabyte relayed: bench/tcp_throughput.py measured about 20 % less CPU per
#: GiB at 1 MiB than at 256 KiB (bench/README.md).  Twisted also uses a transport's
#: read size (``bufferSize``) as the write-buffer size that pauses its producer, so a
#: stalled pair holds at most about 2 x READ_SIZE per direction in user space (on
#: top of the kernel's socket buffers, which are of the same order).
READ_SIZE = 1024 * 1024

#: Where reads start, and go back to after a short read.  CPython allocates every
#: recv() buffer at full size and shrinks it: above glibc's mmap threshold (128 KiB
#: until a large block is freed) that is mmap + mremap + munmap per read, which
#: strace showed doubling the syscalls of a small request/response relay.  A read
#: that fills the buffer switches to READ_SIZE (adaptive, like Netty's allocator).
SMALL_READ = 64 * 1024

#: The idle check runs this many times per idle_timeout.  Activity is counted, not
#: timed, on the hot path (bytesIn + bytesOut moved since the last check), so a pair
#: is closed after between idle_timeout and idle_timeout * (1 + 1/IDLE_CHECKS) of
#: silence: never early, at most 12.5 % late.
IDLE_CHECKS = 8


def _socketFor(transport: Any) -> Any:
    """The socket to relay into directly, or None to always use C{transport.write}.

    Only for Twisted's own plain stream sockets (TCP, UNIX), whose write buffer
    state (C{dataBuffer}, C{_tempDataLen}: non-public, checked here) we can read:
    a TLS transport, a startTLS'd one or anything else goes through its own
    C{write}.
    """
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    for name in ("dataBuffer", "_tempDataLen", "_aborting", "disconnecting", "_writeDisconnecting"):
        if not hasattr(transport, name):
            return None
    return transport.socket


def _relay(transport: Any, sock: Any, data: bytes) -> None:
    """Write C{data} to C{transport}, straight into its socket when nothing is queued.

    Twisted's C{write} always queues and waits for the next reactor iteration
    (``epoll_ctl`` to watch for writability, ``epoll_wait``, ``send``,
    ``epoll_ctl`` again); when the transport's buffer is empty, sending now is the
    same bytes in the same order with one syscall instead of four.  Whatever the
    kernel does not take goes to C{write}, whose buffer then pauses our side
    (back-pressure) exactly as before; errors are left for C{write} to find.
    """
    if (
        sock is not None
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._aborting
    ):
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the transport's own write path will report
        if sent == len(data):
            return
        # One copy of the tail; queueing ``data`` with an offset would not save it,
        # doWrite copies a remainder under SEND_LIMIT anyway.
        data = data[sent:]
    transport.write(data)


def _noDelay(transport: Any) -> None:
    """A relay must not add Nagle delays to what the app already chose to send."""
    if ITCPTransport.providedBy(transport):
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


@implementer(IHalfCloseableProtocol)
class _MemberSide(Protocol):
    """The connection to the member; everything it reads goes to the app."""

    app: "_AppSide"

    def __init__(self, app: "_AppSide") -> None:
        self.app = app

    def connectionMade(self) -> None:
        self.transport.bufferSize = SMALL_READ  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        app = self.app
        size = len(data)
        app.bytesOut += size
        transport = self.transport
        if size >= transport.bufferSize:  # type: ignore[attr-defined]
            transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        elif size < SMALL_READ:
            transport.bufferSize = SMALL_READ  # type: ignore[attr-defined]
        _relay(app.transport, app.appSocket, data)

    def readConnectionLost(self) -> None:
        self.app.memberFinished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.app.memberLost(reason)


class _MemberFactory(Factory):
    protocol = _MemberSide
    noisy = False

    def __init__(self, app: "_AppSide") -> None:
        self.app = app

    def buildProtocol(self, addr: Any) -> _MemberSide:
        return _MemberSide(self.app)


@implementer(IHalfCloseableProtocol)
class _AppSide(Protocol):
    """The app's connection; owns the pair and its accounting."""

    def __init__(self, core: RouteCore, clock: IReactorTime) -> None:
        self.core = core
        self.clock = clock
        self.member: _MemberSide | None = None
        self.upstream: str | None = None
        self.pending: Any = None
        self.idleCall: Any = None
        self.bytesIn = 0
        self.bytesOut = 0
        self.attempts = 0
        self.result = reasons.OK
        self.admitted = False
        self.appReadClosed = False
        self.memberReadClosed = False
        self.closed = False
        self.started = 0.0
        self.lastActivity = 0.0
        self.movedAtCheck = 0
        self.appSocket: Any = None
        self.memberTransport: Any = None
        self.memberSocket: Any = None

    def connectionMade(self) -> None:
        self.started = self.lastActivity = self.clock.seconds()
        if not self.core.admit(self):
            self.result = reasons.OVERLOADED
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.admitted = True
        self.transport.bufferSize = SMALL_READ  # type: ignore[attr-defined]
        # Read nothing from the app until a member is connected: back-pressure from
        # the very first byte, and no buffer to replay.
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.pending = self.core.request(self._attempt, attemptTimeout=float("inf"))
        self.pending.addCallbacks(self._connected, self._failed)

    def _attempt(self, member: Member) -> Any:
        return member.connect(_MemberFactory(self), self.clock, self.core.route.connectTimeout)

    def _connected(self, outcome: Any) -> None:
        self.pending = None
        member: _MemberSide = outcome.value
        self.attempts = outcome.attempts
        self.upstream = outcome.member.upstream
        if self.closed:
            member.transport.loseConnection()
            return
        self.member = member
        self.memberTransport = member.transport
        self.appSocket = _socketFor(self.transport)
        self.memberSocket = _socketFor(member.transport)
        for transport, sock in ((self.transport, self.appSocket), (member.transport, self.memberSocket)):
            if sock is not None:
                # Twisted sends at most 128 KiB per writable event (for Windows, says
                # abstract.py); a queued READ_SIZE tail would take 8 reactor iterations
                # (strace of a 1 GiB relay: 2193 -> 1519 sends, 2225 -> 1524 epoll_waits).
                transport.SEND_LIMIT = READ_SIZE  # type: ignore[attr-defined]
        _noDelay(self.transport)
        _noDelay(member.transport)
        self.transport.registerProducer(member.transport, True)  # type: ignore[attr-defined]
        member.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.lastActivity = self.clock.seconds()
        self.idleCall = self.clock.callLater(self.core.route.idleTimeout / IDLE_CHECKS, self._idleCheck)

    def _failed(self, failure: Failure) -> None:
        self.pending = None
        if failure.check(RequestFailed):
            self.result = failure.value.reason
            self.attempts = failure.value.attempts
            member = failure.value.member
            self.upstream = member.upstream if member is not None else None
        elif self.closed:
            return  # the app left while we were connecting
        else:
            self.result = reasons.PROTOCOL_ERROR
        if not self.closed:
            self.transport.loseConnection()

    def _idleCheck(self) -> None:
        """Close the pair once no byte moved either way for idle_timeout.

        Runs every idle_timeout / IDLE_CHECKS; a change in the byte counters since
        the last run means activity happened at or before now, so the silence
        measured from here is never longer than the real one (see IDLE_CHECKS).
        """
        now = self.clock.seconds()
        idle = self.core.route.idleTimeout
        moved = self.bytesIn + self.bytesOut
        if moved != self.movedAtCheck:
            self.movedAtCheck = moved
            self.lastActivity = now
        left = self.lastActivity + idle - now
        if left <= idle * 1e-9:  # float slack of lastActivity + idle - now
            self.idleCall = None
            self.abort()
        else:
            self.idleCall = self.clock.callLater(min(idle / IDLE_CHECKS, left), self._idleCheck)

    def abort(self) -> None:
        """Close both sides now (idle, drain), dropping whatever is buffered."""
        if self.member is not None:
            self.member.transport.abortConnection()  # type: ignore[attr-defined]
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        size = len(data)
        self.bytesIn += size
        transport = self.transport
        if size >= transport.bufferSize:  # type: ignore[attr-defined]
            transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        elif size < SMALL_READ:
            transport.bufferSize = SMALL_READ  # type: ignore[attr-defined]
        _relay(self.memberTransport, self.memberSocket, data)

    def readConnectionLost(self) -> None:
        self.appReadClosed = True
        if self.member is not None:
            self.member.transport.loseWriteConnection()  # type: ignore[attr-defined]
            if self.memberReadClosed:
                self._closeBoth()

    def writeConnectionLost(self) -> None:
        pass

    def memberFinished(self) -> None:
        """The member half-closed: pass it on to the app."""
        self.memberReadClosed = True
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]
        if self.appReadClosed:
            self._closeBoth()

    def _closeBoth(self) -> None:
        if self.member is not None:
            self.member.transport.loseConnection()
        self.transport.loseConnection()

    def memberLost(self, reason: Failure) -> None:
        if self.member is None:
            return  # an attempt's connection that was never paired
        if self.closed:
            return
        if reason.check(ierror.ConnectionDone):
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.closed = True
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        if self.pending is not None:
            # No member connection was made: not "ok" (SPEC §4/tcp), but the app's doing.
            self.result = reasons.CLIENT_CLOSED
            self.pending.cancel()
        if self.member is not None:
            if reason.check(ierror.ConnectionDone):
                self.member.transport.loseConnection()
            else:
                self.member.transport.abortConnection()  # type: ignore[attr-defined]
        core = self.core
        if self.admitted:
            core.release(self)
        core.finished(
            RequestRecord(
                self.upstream, self.attempts, self.result, self.clock.seconds() - self.started,
                bytesIn=self.bytesIn, bytesOut=self.bytesOut,
            )
        )


class _AppFactory(Factory):
    noisy = False

    def __init__(self, core: RouteCore, clock: IReactorTime) -> None:
        self.core = core
        self.clock = clock

    def buildProtocol(self, addr: Any) -> _AppSide:
        protocol = _AppSide(self.core, self.clock)
        protocol.factory = self
        return protocol


@implementer(IPlugin, IRouteProtocol)
class TCPRouteProtocol:
    """The ``tcp`` protocol plugin."""

    name = "tcp"
    options = ()
    dialectOption = None
    keyHashing = False

    def validate(self, route: Any) -> list[tuple[str, str]]:
        return []

    def buildFactory(self, route: Any, core: RouteCore, reactor: Any) -> Factory:
        return _AppFactory(core, reactor)


tcpProtocol = TCPRouteProtocol()
