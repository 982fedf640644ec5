"""Member side of the http route: persistent HTTP/1.1 connections, pooled per member.

A :class:`MemberConnection` carries one exchange at a time: it writes the request
head (and the request body, streamed or replayed), parses the response with
``httptools`` (llhttp, the C parser of Node.js) and hands the response head to the
attempt's core call (the ``Exchange``) once the head is complete *and* the bytes of the current read are
parsed, so a small response arrives with its whole body and goes to the app in one
write.  Reusing connections is the normal case: an idle connection goes back to its
member's LIFO pool (the most recently used one is the warmest), capped in size and
in idle time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ambassador.resilience import reasons
from ambassador.resilience.reasons import AttemptFailed

from .headers import HOP_BY_HOP as _HOP_BY_HOP
from .headers import connectionTokens, parseRetryAfter
from .transport import writerFor

if TYPE_CHECKING:
    from .server import Exchange

#: Bytes of response body kept while nobody consumes them (a response waiting for
#: the retry decision) before the member connection stops reading.
HOLD_LIMIT = 64 * 1024

#: Connection options that name no header.
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close"})

#: Bytes read per recv(): Twisted's default.  Not more: CPython allocates the whole
#: size for every recv() and, above glibc's mmap threshold (128 KiB), a 256 KiB read
#: of a 300-byte answer costs ~23 us more than a 64 KiB one (measured here).
READ_SIZE = 64 * 1024


class Response:
    """A member's response: its head, and its body as it arrives.

    Until a consumer (the app side) attaches, body bytes are held here, and the member
    connection stops reading when more than HOLD_LIMIT is held.
    """

    __slots__ = (
        "block",
        "bodyless",
        "chunked",
        "closeDelimited",
        "complete",
        "connection",
        "consumer",
        "contentLength",
        "failed",
        "headers",
        "held",
        "heldSize",
        "keepAlive",
        "reason",
        "status",
    )

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 connection: MemberConnection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.connection: MemberConnection | None = connection
        self.chunked = False
        self.contentLength: bytes | None = None
        self.closeDelimited = False
        self.bodyless = False
        self.keepAlive = True
        self.held: list[bytes] = []
        self.heldSize = 0
        self.complete = False
        self.failed = False
        self.consumer: Any = None
        #: The header lines the app gets, hop-by-hop ones removed.
        self.block = b""

    def attach(self, consumer: Any) -> list[bytes]:
        """The app side takes the body from now on; returns what was held."""
        self.consumer = consumer
        held = self.held
        self.held = []
        self.heldSize = 0
        connection = self.connection
        if not self.complete and connection is not None and connection.readPaused:
            connection.readPaused = False
            connection.transport.resumeProducing()
        return held

    def discard(self) -> None:
        """Nobody will read this response (the request was retried elsewhere)."""
        self.held = []
        self.consumer = None
        connection = self.connection
        if not self.complete and connection is not None:
            connection.abandon()


class MemberConnection(Protocol):
    """One persistent connection to a member."""

    transport: Any  # a TCP/UNIX/TLS transport: also a producer and a consumer

    def __init__(self, pool: MemberPool, member: Any) -> None:
        self.pool = pool
        self.member = member
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        #: The exchange whose attempt awaits its response head here (reported to
        #: with ``attemptSucceeded``/``attemptFailed``); None once reported.
        self.attemptCall: Exchange | None = None
        self.response: Response | None = None
        self.headerList: list[tuple[bytes, bytes]] = []
        self.statusReason = b""
        self.reused = False
        self.received = 0
        self.headReady = False
        self.skipBody = False
        self.informational = False
        self.requestDone = True
        self.connected = False
        self.broken = False
        self.readPaused = False
        self.idleSince = 0.0
        self.clock = pool.clock

    # --- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.write = writerFor(self.transport)
        self.transport.bufferSize = READ_SIZE
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass  # unix sockets

    def abandon(self) -> None:
        """Close now; this connection will never be reused."""
        self.broken = True
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.connected = False
        self.broken = True
        self.pool.lost(self)
        response = self.response
        exchange = self.exchange
        call, self.attemptCall = self.attemptCall, None
        if (response is not None and self.headReady and not response.complete
                and response.closeDelimited and exchange is not None):
            # The body ended with the connection: that is its framing.
            response.complete = True
            consumer = response.consumer
            self._finish()
            if call is not None:
                self._fire(call, response)
            elif consumer is not None:
                consumer.responseDone()
            return
        if call is not None:
            if (self.reused and self.received == 0 and exchange is not None
                    and exchange.replayable and exchange.safeMethod):
                # A reused connection died before any byte of the response: most
                # likely the member closed it while idle, as our request crossed its
                # FIN.  A request that may be repeated (retry_methods, body kept) is
                # redone once on a fresh connection, not counted as an attempt (Go's
                # net/http does the same); any other reports ``reset`` (Envoy's
                # behaviour), since the member may have acted on it.
                call.stale()
            else:
                call.attemptFailed(AttemptFailed(reasons.RESET))
        elif response is not None and not response.complete:
            response.failed = True
            if response.consumer is not None:
                response.consumer.responseFailed(reasons.RESET)
        if response is not None:
            response.connection = None
        self.response = None
        self._detachExchange()

    # --- sending ---------------------------------------------------------------------

    def send(self, exchange: Exchange, host: bytes) -> None:
        """Start one exchange on this connection; the exchange is told of the
        response head (or of the failure) as its core call."""
        self.exchange = exchange
        self.response = None
        self.headReady = False
        self.headerList = []
        self.received = 0
        self.requestDone = False
        self.attemptCall = exchange
        if self.readPaused:
            self.readPaused = False
            self.transport.resumeProducing()
        exchange.sendTo(self, host)

    def requestWritten(self) -> None:
        """The exchange wrote the last byte of its request body."""
        self.requestDone = True

    # --- parsing ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        exchange = self.exchange
        if exchange is None:
            # Bytes from an idle member: nothing may come before a request.
            self.abandon()
            return
        exchange.touch()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._garbage()
            return
        if self.skipBody:
            # HEAD: llhttp cannot be told that this response has no body; start afresh.
            self.skipBody = False
            self.parser = httptools.HttpResponseParser(self)
            self._messageComplete()
        call = self.attemptCall
        response = self.response
        if call is not None and self.headReady and response is not None:
            self.attemptCall = None
            if response.complete:
                self._finish()
            self._fire(call, response)

    def _fire(self, exchange: Exchange, response: Response) -> None:
        status = response.status
        if status in exchange.retryStatuses:
            retryAfter = None
            if status == 503 or status == 429:
                for name, value in response.headers:
                    if name.lower() == b"retry-after":
                        retryAfter = parseRetryAfter(value, self.clock.seconds())
                        break
            if not response.complete and response.heldSize > HOLD_LIMIT and not self.readPaused:
                self._pauseReading()
            # The core may retry (the next attempt drops this response) or hand it back.
            exchange.held = response
            exchange.attemptFailed(AttemptFailed(str(status), response=response, retryAfter=retryAfter))
        else:
            exchange.attemptSucceeded(response)

    def _garbage(self) -> None:
        call = self.attemptCall
        response = self.response
        self.attemptCall = None
        self.abandon()
        if call is not None:
            call.attemptFailed(AttemptFailed(reasons.PROTOCOL_ERROR))
        elif response is not None and not response.complete:
            response.failed = True
            if response.consumer is not None:
                response.consumer.responseFailed(reasons.PROTOCOL_ERROR)

    def on_message_begin(self) -> None:
        self.headerList = []
        self.statusReason = b""
        self.informational = False

    def on_status(self, status: bytes) -> None:
        self.statusReason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headReady:
            self.headerList.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is None or self.headReady:
            raise httptools.HttpParserError("a response nobody asked for")
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httptools.HttpParserError("101 without an upgrade request")
            # 1xx: interim (the app side answers Expect itself); wait for the final one.
            self.informational = True
            return
        response = Response(status, self.statusReason, self.headerList, self)
        # One pass over the headers: framing, and the block the app will get (minus
        # hop-by-hop headers and those that Connection names).
        lines = []
        tokens = None
        for name, value in self.headerList:
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower.startswith(b"proxy-"):
                if lower == b"transfer-encoding":
                    response.chunked = True
                elif lower == b"connection" and value.lower() not in _PLAIN_TOKENS:
                    tokens = connectionTokens([value]) | (tokens or set())
                continue
            if lower == b"content-length":
                response.contentLength = value
            lines.append((lower, b"%s: %s\r\n" % (name, value)))
        if tokens:
            lines = [line for line in lines if line[0] not in tokens]
        response.block = b"".join([line[1] for line in lines])
        response.keepAlive = self.parser.should_keep_alive()
        if self.exchange.method == b"HEAD":
            response.bodyless = True
            self.skipBody = True
        elif status == 204 or status == 304:
            response.bodyless = True
        elif response.contentLength is None and not response.chunked:
            response.closeDelimited = True
        self.response = response
        self.headReady = True

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None or self.skipBody:
            return
        consumer = response.consumer
        if consumer is not None:
            consumer.responseBody(body)
        else:
            response.held.append(body)
            response.heldSize += len(body)
            if (response.heldSize > HOLD_LIMIT and not self.readPaused
                    and self.attemptCall is None):
                self._pauseReading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.skipBody:
            self._messageComplete()

    def _messageComplete(self) -> None:
        response = self.response
        if response is None or response.complete:
            return
        response.complete = True
        if self.attemptCall is not None:
            return  # dataReceived reports the attempt once this read is parsed
        consumer = response.consumer
        self._finish()
        if consumer is not None:
            consumer.responseDone()

    def _finish(self) -> None:
        """The exchange is over on this connection: pool it or close it."""
        response = self.response
        reusable = (
            not self.broken and self.requestDone and response is not None
            and response.keepAlive and not response.closeDelimited
        )
        if response is not None:
            response.connection = None
        self.response = None
        self.headReady = False
        self._detachExchange()
        if reusable:
            self.pool.put(self)
        else:
            self.abandon()

    def _detachExchange(self) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.detached(self)

    def _pauseReading(self) -> None:
        self.readPaused = True
        self.transport.pauseProducing()


class _MemberFactory(Factory):
    noisy = False

    def __init__(self, pool: MemberPool, member: Any) -> None:
        self.pool = pool
        self.member = member

    def buildProtocol(self, addr: Any) -> MemberConnection:
        return MemberConnection(self.pool, self.member)


class MemberPool:
    """Idle persistent connections of every member of a route.

    @param maxIdle: idle connections kept per member (more are closed).
    @param idleTimeout: an idle connection older than this is closed, not reused.
    """

    def __init__(self, clock: Any, maxIdle: int, idleTimeout: float, connectTimeout: float) -> None:
        self.clock = clock
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self.connectTimeout = connectTimeout
        self.idle: dict[Any, list[MemberConnection]] = {}
        self.factories: dict[Any, _MemberFactory] = {}
        self.sweeper: Any = None
        self.opened = 0

    def take(self, member: Any) -> MemberConnection | None:
        connections = self.idle.get(member)
        if not connections:
            return None
        now = self.clock.seconds()
        while connections:
            connection = connections.pop()
            if now - connection.idleSince < self.idleTimeout and connection.connected:
                connection.reused = True
                return connection
            connection.abandon()
        return None

    def connect(self, member: Any) -> Deferred[MemberConnection]:
        factory = self.factories.get(member)
        if factory is None:
            factory = self.factories[member] = _MemberFactory(self, member)
        self.opened += 1
        return member.connect(factory, self.clock, self.connectTimeout)

    def put(self, connection: MemberConnection) -> None:
        connections = self.idle.setdefault(connection.member, [])
        if len(connections) >= self.maxIdle or connection.member.retired:
            connection.abandon()
            return
        connection.reused = False
        connection.idleSince = self.clock.seconds()
        # Idle connections read, so that a close (or stray bytes) is seen at once; the
        # app side may have paused this one for back-pressure.
        connection.readPaused = False
        connection.transport.resumeProducing()
        connections.append(connection)
        if self.sweeper is None:
            self.sweeper = self.clock.callLater(self.idleTimeout, self._sweep)

    def retire(self, member: Any) -> None:
        """Discovery dropped ``member``: close its idle connections now; busy ones are
        closed when their exchange ends instead of coming back to the pool (``put``)."""
        for connection in self.idle.pop(member, []):
            connection.abandon()
        self.factories.pop(member, None)

    def lost(self, connection: MemberConnection) -> None:
        connections = self.idle.get(connection.member)
        if connections and connection in connections:
            connections.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle for longer than idle_timeout (SPEC §2)."""
        self.sweeper = None
        now = self.clock.seconds()
        remaining = False
        for connections in self.idle.values():
            for connection in list(connections):
                if now - connection.idleSince >= self.idleTimeout:
                    connections.remove(connection)
                    connection.abandon()
            remaining = remaining or bool(connections)
        if remaining:
            self.sweeper = self.clock.callLater(self.idleTimeout, self._sweep)

    def closeAll(self) -> None:
        if self.sweeper is not None and self.sweeper.active():
            self.sweeper.cancel()
        self.sweeper = None
        for connections in self.idle.values():
            for connection in list(connections):
                connection.abandon()
            connections.clear()
