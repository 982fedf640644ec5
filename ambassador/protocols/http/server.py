"""App side of the http route: HTTP/1.1 keep-alive connections parsed with httptools.

One :class:`AppConnection` per app connection feeds the bytes to an llhttp request
parser; a complete request head becomes an :class:`Exchange`, which runs its attempts
through the route's resilience core and streams the chosen response back.  There is
no ``twisted.web`` machinery on this path: it costs ~0.75 ms of CPU per proxied
request (TWISTED-NOTES), several times the whole budget of this one.

Bad requests (malformed, oversized head, smuggling-prone framing, too slow a head)
are answered here and never reach a member.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import httptools
from twisted.internet import error as ierror
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.resilience import reasons
from ambassador.resilience.core import Call, RequestRecord

from .client import MemberConnection, MemberPool, Response
from .headers import MAX_HEAD, connectionTokens, errorResponse, reasonPhrase
from .transport import writerFor

log = Logger(namespace="ambassador")

#: Request headers the app side handles itself instead of copying them.
_SPECIAL = frozenset({
    b"host", b"content-length", b"connection", b"keep-alive", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-connection", b"expect",
})

#: Connection options that name no header (the usual values: no filtering needed).
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close"})

#: How long a connection that drains because its route stops waits before it is
#: judged idle (see ``AppConnection.drain``).
DRAIN_LOOK = 0.05

#: Access-log results of requests that never reached the core (no SPEC reason).
BAD_REQUEST = "bad-request"
CLIENT_TIMEOUT = "client-timeout"
CLIENT_CLOSED = "client-closed"

_NO_BODY, _LENGTH, _CHUNKED = 0, 1, 2


class ReadGate:
    """Pauses the app's reads for either of two reasons: back-pressure from the member
    connection the request body streams to (this object is that transport's
    producer), or the app side holding reads (no member connection yet, a pipelined
    request waiting).  ``stopProducing`` is ignored: a member connection that dies must
    not take the app's connection with it (Twisted calls it on its producer)."""

    __slots__ = ("hold", "paused", "pressure", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.pressure = False
        self.hold = False
        self.paused = False

    def pauseProducing(self) -> None:
        self.pressure = True
        self._apply()

    def resumeProducing(self) -> None:
        self.pressure = False
        self._apply()

    def stopProducing(self) -> None:
        pass

    def reset(self) -> None:
        """A new member connection (or none) takes the body: forget old pressure."""
        self.pressure = False
        self._apply()

    def setHold(self, hold: bool) -> None:
        if hold != self.hold:
            self.hold = hold
            self._apply()

    def _apply(self) -> None:
        want = self.pressure or self.hold
        if want != self.paused:
            self.paused = want
            if want:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()


class _Safety:
    """``safe=`` for the core, judged when a retry is considered: a streamed request
    body may outgrow ``max_retry_body`` after the request started."""

    __slots__ = ("exchange",)

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def __bool__(self) -> bool:
        return self.exchange.replayable


class RouteSettings:
    """The route's http options, turned once into what the hot path compares."""

    def __init__(self, route: Any) -> None:
        options = route.options
        self.retryOn = frozenset(options["retry_on"])
        self.retryStatuses = frozenset(int(r) for r in self.retryOn if r.isdigit())
        self.retryMethods = frozenset(m.encode("ascii") for m in options["retry_methods"])
        self.maxRetryBody: int = options["max_retry_body"]
        hostHeader = options["host_header"]
        self.hostHeader: bytes | None = hostHeader.encode("idna") if hostHeader else None
        self.trace: bool = bool(options["trace"])
        self.tls = route.tls is not None
        self.hosts: dict[str, bytes | None] = {}

    def hostFor(self, member: Any) -> bytes | None:
        if self.hostHeader is not None:
            return self.hostHeader
        upstream = member.upstream
        try:
            return self.hosts[upstream]
        except KeyError:
            from .headers import memberHostHeader

            hostName = getattr(member, "hostName", None)
            if hostName is not None:
                # A dns:/srv: member (tcp:ADDRESS:PORT) gets the DNS name (SPEC §2).
                port = upstream.rsplit(":", 1)[1]
                host = memberHostHeader(f"tcp:{hostName}:{port}", self.tls)
            else:
                host = memberHostHeader(upstream, self.tls)
            self.hosts[upstream] = host
            return host


class Exchange(Call):
    """One request from the app and the response it gets."""

    __slots__ = (
        "app",
        "attempts",
        "bodyDone",
        "bodyKind",
        "bodySize",
        "bodyless",
        "bytesIn",
        "bytesOut",
        "chunkOut",
        "chunks",
        "closeAfter",
        "connecting",
        "contentLength",
        "expectContinue",
        "finished",
        "head",
        "headWritten",
        "held",
        "hostIn",
        "hostOut",
        "http10",
        "keepAlive",
        "maxRetryBody",
        "method",
        "pending",
        "replayable",
        "result",
        "retryStatuses",
        "safeMethod",
        "sink",
        "started",
        "status",
        "upstream",
        "via",
    )

    def __init__(self, app: AppConnection, method: bytes, head: bytes, hostIn: bytes | None,
                 keepAlive: bool, http10: bool, bodyKind: int, contentLength: bytes | None,
                 expectContinue: bool, headSize: int) -> None:
        settings = app.settings
        Call.__init__(self, app.core, None, True, settings.retryOn, None, settings.trace)
        self.app = app
        self.method = method
        self.head = head
        self.hostIn = hostIn
        self.keepAlive = keepAlive
        self.http10 = http10
        self.bodyKind = bodyKind
        self.contentLength = contentLength
        self.expectContinue = expectContinue
        self.chunks: list[bytes] = []
        self.bodySize = 0
        self.bodyDone = bodyKind == _NO_BODY
        self.replayable = True
        self.sink: MemberConnection | None = None
        self.pending: Any = None
        self.held: Response | None = None
        self.started = app.clock.seconds()
        self.attempts = 0
        self.upstream: str | None = None
        self.result = reasons.OK
        self.status: int | None = None
        self.bytesIn = headSize
        self.bytesOut = 0
        self.chunkOut = False
        self.closeAfter = not keepAlive
        self.headWritten = False
        self.finished = False
        self.retryStatuses = settings.retryStatuses
        self.maxRetryBody = settings.maxRetryBody
        #: The fresh connection being made for the attempt under way, or the member
        #: connection it was sent on, and the Host it was sent with.
        self.connecting: Any = None
        self.via: MemberConnection | None = None
        self.hostOut = b""
        self.bodyless = method == b"HEAD"
        self.safeMethod = method in settings.retryMethods

    # --- running attempts --------------------------------------------------------------

    def begin(self) -> None:
        """Hand the request to the route's core (this exchange is its ``Call``)."""
        app = self.app
        if self.expectContinue and not self.bodyDone:
            # Answered here (as nginx and HAProxy do): the member gets no Expect.
            app.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.safeMethod:
            self.safe = False
        elif self.bodyKind != _NO_BODY:
            self.safe = _Safety(self)
        self.pending = True
        app.core.submit(self)

    def attempt(self, member: Any) -> None:
        """One attempt on ``member``: a pooled connection when there is one."""
        held = self.held
        if held is not None:
            self.held = None
            held.discard()
        app = self.app
        host = app.settings.hostFor(member)
        if host is None:
            host = self.hostIn or b"localhost"
        self.hostOut = host
        connection = app.pool.take(member)
        if connection is None:
            self._fresh(member)
            return
        self.via = connection
        connection.send(self, host)

    def _fresh(self, member: Any) -> None:
        d = self.app.pool.connect(member)
        self.connecting = d
        d.addCallbacks(self._connected, self._connectFailed, callbackArgs=(d,), errbackArgs=(d,))

    def _connected(self, connection: MemberConnection, d: Any) -> None:
        if self.connecting is not d:  # pragma: no cover - abandoned attempts cancel d
            connection.abandon()
            return
        self.connecting = None
        self.via = connection
        connection.send(self, self.hostOut)

    def _connectFailed(self, failure: Failure, d: Any) -> None:
        if self.connecting is d:
            self.connecting = None
            self.attemptFailed(failure)

    def stale(self) -> None:
        """The reused connection of this attempt died before any byte of the response
        (see ``MemberConnection.connectionLost``): the attempt goes on, on a fresh
        connection."""
        if self.open:
            self.via = None
            self._fresh(self.member)

    def abandon(self) -> None:
        """The core gave up on the attempt (timeout, deadline, the app left)."""
        d = self.connecting
        if d is not None:
            self.connecting = None
            d.cancel()
            return
        via = self.via
        if via is not None:
            self.via = None
            if via.attemptCall is self:
                via.attemptCall = None
            via.abandon()

    def sendTo(self, connection: MemberConnection, host: bytes) -> None:
        """Write the request (head and the body so far) to a member connection."""
        self.sink = connection
        parts = [self.head, b"host: ", host, b"\r\n"]
        kind = self.bodyKind
        if kind == _LENGTH:
            parts += [b"content-length: ", self.contentLength or b"0", b"\r\n\r\n"]
            parts += self.chunks
        elif kind == _CHUNKED:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
            for chunk in self.chunks:
                parts += [b"%x\r\n" % len(chunk), chunk, b"\r\n"]
            if self.bodyDone:
                parts.append(b"0\r\n\r\n")
        elif self.contentLength is not None:
            parts.append(b"content-length: 0\r\n\r\n")  # some servers want it on a POST
        else:
            parts.append(b"\r\n")
        if not self.replayable:
            self.chunks = []
        connection.write(b"".join(parts))
        if self.bodyDone:
            connection.requestDone = True
        else:
            gate = self.app.gate
            gate.hold = False
            gate.reset()
            connection.transport.registerProducer(gate, True)

    def bodyData(self, chunk: bytes) -> None:
        self.bodySize += len(chunk)
        self.bytesIn += len(chunk)
        sink = self.sink
        if self.replayable and self.bodySize > self.maxRetryBody:
            self.replayable = False
            if sink is not None:
                self.chunks = []  # all of it went to the member already
        if self.replayable or sink is None:
            self.chunks.append(chunk)
        if sink is not None:
            if self.bodyKind == _CHUNKED:
                sink.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                sink.write(chunk)

    def bodyComplete(self) -> None:
        self.bodyDone = True
        sink = self.sink
        if sink is not None:
            if self.bodyKind == _CHUNKED:
                sink.write(b"0\r\n\r\n")
            sink.requestWritten()
            sink.transport.unregisterProducer()
            self.app.gate.reset()

    def detached(self, connection: MemberConnection) -> None:
        """The member connection is done with this exchange (pooled, closed, failed)."""
        if self.sink is connection:
            self.sink = None
            if not self.bodyDone:
                if connection.connected:
                    connection.transport.unregisterProducer()
                gate = self.app.gate
                gate.hold = True
                gate.reset()

    def touch(self) -> None:
        self.app.lastActivity = self.app.clock.seconds()

    # --- the outcome -------------------------------------------------------------------

    def settled(self, response: Response) -> None:
        """The core's verdict with a response (the member's, maybe a retryable
        status that retries could not better)."""
        self.pending = None
        self.held = None
        self.via = None
        self.attempts = self.tries
        self.upstream = self.member.upstream  # type: ignore[union-attr]
        self.result = self.reason
        extra = b""
        if self.budgetExhausted:
            self.result = reasons.BUDGET_EXHAUSTED
            extra = b"x-ambassador-error: budget-exhausted\r\n"
        if self.app.closed:
            response.discard()
            return
        self.app.respond(self, response, extra)

    def failed(self, reason: str) -> None:
        """The core's verdict without a response: answer with the SPEC status."""
        self.pending = None
        self.via = None
        held = self.held
        if held is not None:
            self.held = None
            held.discard()
        self.attempts = self.tries
        member = self.member
        self.upstream = member.upstream if member is not None else None
        if not self.app.closed:
            self.app.respondError(self, reason)

    # --- response body (called by the member connection) -------------------------------

    def responseBody(self, data: bytes) -> None:
        app = self.app
        app.lastActivity = app.clock.seconds()
        if self.bodyless:
            return
        if self.chunkOut:
            self.bytesOut += len(data) + 7
            app.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.bytesOut += len(data)
            app.write(data)

    def responseDone(self) -> None:
        app = self.app
        # Unregister first: the member connection is pooled already, and a full app
        # buffer must not pause it from here on.
        app.transport.unregisterProducer()
        if self.chunkOut:
            app.write(b"0\r\n\r\n")
            self.bytesOut += 5
        app.exchangeDone(self)

    def responseFailed(self, reason: str) -> None:
        """The member's response broke off mid-body: the app can only see it truncated."""
        app = self.app
        self.result = reason
        if not app.closed:
            app.transport.unregisterProducer()
        self.closeAfter = True
        app.exchangeDone(self, abort=True)


class AppConnection(Protocol):
    """One app connection: keep-alive requests, answered in order."""

    transport: Any  # a TCP/UNIX/TLS transport: also a producer and a consumer

    def __init__(self, factory: HTTPFactory) -> None:
        self.factory = factory
        self.core = factory.core
        self.clock = factory.clock
        self.settings = factory.settings
        self.pool = factory.pool
        self.parser = httptools.HttpRequestParser(self)
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.url = b""
        self.headerList: list[tuple[bytes, bytes]] = []
        self.inHead = False
        self.headSize = 0
        self.headRaw = 0
        self.headStarted = 0.0
        self.headerCall: Any = None
        self.reject: tuple[int, str] | None = None
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.admitted = False
        self.closed = False
        self.closing = False
        self.draining = False
        #: While draining: when an idle connection stops waiting for the next request.
        self.drainEnds = 0.0
        self.drainCall: Any = None
        self.lastActivity = 0.0
        self.idleCall: Any = None
        # Wire accounting for bytes_in (SPEC §6: what the app sent, heads included):
        # offsets in the connection's byte stream, known exactly while requests come
        # one per read or with Content-Length bodies; estimated otherwise.
        self.wire = 0
        self.data = b""
        self.dataStart = 0
        self.tail = b""
        self.nextStart: int | None = 0
        self.messageStart: int | None = None

    # --- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.write = writerFor(self.transport)
        self.gate = ReadGate(self.transport)
        self.lastActivity = self.clock.seconds()
        self.admitted = self.core.admit(self)
        self.factory.connections.add(self)
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass  # unix sockets
        if self.admitted:
            self.idleCall = self.clock.callLater(self.core.route.idleTimeout, self._idleCheck)
        else:
            # Over max_connections: the 503 answers the first request, which must
            # come within header_timeout; an excess connection that sends nothing
            # must not hold its descriptor for idle_timeout (minutes).
            self.idleCall = self.clock.callLater(self.core.route.headerTimeout, self._excessTimedOut)

    def _excessTimedOut(self) -> None:
        self.idleCall = None
        if not self.closed and self.active is None and not self.inHead and not self.queue:
            self.abort()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.closed = True
        factory = self.factory
        factory.connections.discard(self)
        if factory.stopped and not factory.connections:
            # The last connection of a stopped route: the member connections that its
            # drained requests put back in the pool are of no further use.
            factory.pool.closeAll()
        for call in (self.idleCall, self.headerCall, self.drainCall):
            if call is not None and call.active():
                call.cancel()
        self.idleCall = self.headerCall = self.drainCall = None
        active = self.active
        if active is not None and not active.finished:
            active.result = CLIENT_CLOSED if active.result == reasons.OK else active.result
            if active.pending is not None:
                active.pending = None
                active.cancel()
            sink = active.sink
            if sink is not None:
                sink.abandon()
            if active.held is not None:
                active.held.discard()
            self._record(active)
        self.queue.clear()
        if self.admitted:
            self.core.release(self)

    def abort(self) -> None:
        """Close now (drain timeout, idle): whatever is in flight is dropped."""
        self.transport.abortConnection()

    def drain(self, bound: float = DRAIN_LOOK) -> None:
        """Take no request beyond those the app sends within ``bound``: answer them,
        the last with ``connection: close``, then close.

        The answer under way goes out with ``connection: close`` unless its head went
        out already, or another request waits behind it.  An idle connection stays open
        for ``bound``, to answer (with ``connection: close``) a request the app may be
        sending on it right now, and closes at the bound if none came; ``idle_timeout``
        still closes it first if the app sends nothing for that long.

        A route that stops (SIGTERM, a route removed or moved by a reload) gives
        ``DRAIN_LOOK``: judged idle a moment later, once the reactor has read what
        already waits in the socket (a stop holds the reactor a while, and the app's
        next request may sit unread in the kernel's buffer meanwhile: read, it is
        answered).  A reload that hands the route's listener to new settings gives
        ``drain_timeout``, as HAProxy's ``idle-close-on-response`` and Envoy's drain
        do: a keep-alive client that sends its next request as the reload happens must
        get an answer, not a reset (an app cannot re-send a POST blindly).
        """
        ends = self.clock.seconds() + bound
        if self.draining and ends >= self.drainEnds:
            return  # drained already, with an earlier or the same bound
        self.draining = True
        self.drainEnds = ends
        if self.drainCall is not None and self.drainCall.active():
            self.drainCall.cancel()
        self.drainCall = self.clock.callLater(bound, self._closeIfIdle)

    def _closeIfIdle(self) -> None:
        self.drainCall = None
        if self.closed or self.closing:
            return
        if self.active is None and not self.inHead and not self.queue:
            self.closing = True
            self.transport.loseConnection()

    def _lastAnswer(self) -> bool:
        """Whether the answer about to go out is the connection's last: it drains and
        no other request has come (or begun to) behind it."""
        return self.draining and not self.queue and not self.inHead

    def _idleCheck(self) -> None:
        now = self.clock.seconds()
        idle = self.core.route.idleTimeout
        active = self.active
        if active is not None and active.bodyDone and active.pending is not None:
            # The whole request is in and awaits its answer: timeout and deadline bound
            # that wait and end it with an answer (as HAProxy's client timeout and
            # Envoy's idle timeout leave a request awaiting its response alone).
            self.idleCall = self.clock.callLater(idle, self._idleCheck)
        elif now - self.lastActivity >= idle:
            self.idleCall = None
            # No byte either way for idle_timeout: close, without an answer (SPEC).
            self.abort()
        else:
            self.idleCall = self.clock.callLater(self.lastActivity + idle - now, self._idleCheck)

    def _headerTimedOut(self) -> None:
        self.headerCall = None
        if self.inHead and not self.closed:
            self._rejectRequest(408, CLIENT_TIMEOUT)

    # --- parsing -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.lastActivity = self.clock.seconds()
        wasInHead = self.inHead
        if not wasInHead and self.parsing is None:
            self.nextStart = self.wire  # between messages: the next one starts here
        self.dataStart = self.wire
        self.data = data
        self.wire += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._rejectRequest(501, reasons.UNSUPPORTED)
            return
        except httptools.HttpParserError:
            status, result = self.reject or (400, BAD_REQUEST)
            self._rejectRequest(status, result)
            return
        self.tail = data[-3:]
        if self.reject is not None:
            self._rejectRequest(*self.reject)
            return
        if self.inHead:
            if wasInHead:
                # Bytes of a head still incomplete (llhttp keeps a partial header
                # line to itself): bounds memory even for one endless header line.
                self.headRaw += len(data)
            if self.headSize > MAX_HEAD or self.headRaw > MAX_HEAD:
                self._rejectRequest(431, BAD_REQUEST)
                return
            if self.headerCall is None:
                left = self.headStarted + self.core.route.headerTimeout - self.lastActivity
                self.headerCall = self.clock.callLater(max(left, 0.0), self._headerTimedOut)
        if self.active is None and self.queue:
            self._startNext()
        parsing = self.parsing
        if self.queue or (parsing is not None and parsing.sink is None and not parsing.bodyDone):
            # A pipelined request waits, or a body has nowhere to go yet.
            self.gate.setHold(True)

    def on_message_begin(self) -> None:
        self.inHead = True
        self.url = b""
        self.headerList = []
        self.headStarted = self.lastActivity
        self.headSize = 0
        self.headRaw = 0
        self.messageStart, self.nextStart = self.nextStart, None

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.headSize += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.inHead:
            self.headerList.append((name, value))
            self.headSize += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.inHead = False
        if self.headerCall is not None:
            if self.headerCall.active():
                self.headerCall.cancel()
            self.headerCall = None
        parser = self.parser
        headSize = self.headSize + 16
        if headSize > MAX_HEAD:
            self.reject = (431, BAD_REQUEST)
            raise httptools.HttpParserError("request head too large")
        if parser.should_upgrade():
            self.reject = (501, reasons.UNSUPPORTED)
            raise httptools.HttpParserError("upgrade requests are not proxied")
        method = parser.get_method()
        keepAlive = parser.should_keep_alive()
        version = parser.get_http_version()
        if version == "0.9":
            # llhttp takes "GET /x" (no version) as HTTP/0.9: a malformed request line
            # for HTTP/1.1 (RFC 9112 §3), refused rather than proxied as HTTP/1.1.
            self.reject = (400, BAD_REQUEST)
            raise httptools.HttpParserError("no HTTP version in the request line")
        http10 = version == "1.0"
        hostIn = None
        contentLength = None
        bodyKind = _NO_BODY
        expectContinue = False
        tokens: set[bytes] | None = None
        kept = []
        for name, value in self.headerList:
            lower = name.lower()
            if lower in _SPECIAL:
                if lower == b"host":
                    hostIn = value
                elif lower == b"content-length":
                    contentLength = value.strip()
                    if contentLength != b"0":
                        bodyKind = _LENGTH
                elif lower == b"transfer-encoding":
                    bodyKind = _CHUNKED
                elif lower == b"connection":
                    if value.lower() not in _PLAIN_TOKENS:
                        tokens = connectionTokens([value]) | (tokens or set())
                elif lower == b"expect":
                    if value.strip().lower() == b"100-continue":
                        expectContinue = True
                    else:
                        kept.append((lower, name, value))
                continue
            if lower.startswith(b"proxy-"):
                continue
            kept.append((lower, name, value))
        if bodyKind == _CHUNKED:
            contentLength = None
        wireHead = self._headOnWire()
        if wireHead is not None:
            headSize = wireHead
            if bodyKind == _NO_BODY:
                self.nextStart = self.messageStart + wireHead  # type: ignore[operator]
            elif bodyKind == _LENGTH and contentLength is not None and contentLength.isdigit():
                self.nextStart = self.messageStart + wireHead + int(contentLength)  # type: ignore[operator]
        parts = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for lower, name, value in kept:
            if tokens and lower in tokens:
                continue
            parts += [name, b": ", value, b"\r\n"]
        exchange = Exchange(
            self, method, b"".join(parts), hostIn, keepAlive, http10, bodyKind, contentLength,
            expectContinue, headSize,
        )
        self.parsing = exchange
        self.queue.append(exchange)

    def _headOnWire(self) -> int | None:
        """The exact size of the head just parsed, when its start is known."""
        start = self.messageStart
        if start is None:
            return None
        offset = start - self.dataStart
        if offset >= 0:
            end = self.data.find(b"\r\n\r\n", offset)
            return None if end < 0 else self.dataStart + end + 4 - start
        # The head began in an earlier read: it ends at the first blank line here
        # (the last bytes of the previous read joined on, for a CRLFCRLF split in two).
        joined = self.tail + self.data
        end = joined.find(b"\r\n\r\n")
        return None if end < 0 else self.dataStart - len(self.tail) + end + 4 - start

    def on_body(self, body: bytes) -> None:
        parsing = self.parsing
        if parsing is not None:
            parsing.bodyData(body)

    def on_message_complete(self) -> None:
        parsing = self.parsing
        self.parsing = None
        if parsing is not None:
            parsing.bodyComplete()

    # --- answering ---------------------------------------------------------------------

    def _startNext(self) -> None:
        exchange = self.queue.popleft()
        self.active = exchange
        if not self.admitted:
            exchange.closeAfter = True
            self.respondError(exchange, reasons.OVERLOADED)
            return
        exchange.begin()

    def respond(self, exchange: Exchange, response: Response, extra: bytes) -> None:
        """Send the member's response head and whatever body came with it."""
        exchange.status = status = response.status
        if not exchange.bodyDone or self._lastAnswer():
            # Unread request body left, or the connection drains: this response is the last.
            exchange.closeAfter = True
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason or reasonPhrase(status)),
                 response.block]
        if not response.bodyless and response.contentLength is None:
            if exchange.http10:
                exchange.closeAfter = True  # close-delimited: all an HTTP/1.0 app knows
            else:
                exchange.chunkOut = True
                parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"x-ambassador-attempts: %d\r\n" % exchange.attempts)
        if exchange.traceValue is not None:
            parts.append(b"x-ambassador-trace: %s\r\n" % exchange.traceValue.encode("ascii", "replace"))
        if extra:
            parts.append(extra)
        if exchange.closeAfter:
            parts.append(b"connection: close\r\n\r\n")
        elif exchange.http10:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        head = b"".join(parts)
        exchange.bytesOut += len(head)
        exchange.headWritten = True
        held = response.attach(exchange)
        if held and not exchange.bodyless:
            if exchange.chunkOut:
                for chunk in held:
                    parts.append(b"%x\r\n" % len(chunk))
                    parts.append(chunk)
                    parts.append(b"\r\n")
                    exchange.bytesOut += len(chunk) + 7
            else:
                for chunk in held:
                    parts.append(chunk)
                    exchange.bytesOut += len(chunk)
        self.lastActivity = self.clock.seconds()
        if response.complete:
            if exchange.chunkOut:
                parts.append(b"0\r\n\r\n")
                exchange.bytesOut += 5
            self.write(b"".join(parts))
            self.exchangeDone(exchange)
        elif response.failed:
            self.write(b"".join(parts))
            exchange.result = reasons.RESET
            self.exchangeDone(exchange, abort=True)
        else:
            self.write(b"".join(parts))
            connection = response.connection
            if connection is not None and connection.connected:
                self.transport.registerProducer(connection.transport, True)

    def respondError(self, exchange: Exchange, reason: str) -> None:
        """The ambassador's own answer for ``reason`` (SPEC §4/http table)."""
        if not exchange.bodyDone or self._lastAnswer():
            exchange.closeAfter = True
        exchange.result = reason
        extra = b""
        if exchange.traceValue is not None:
            extra = b"x-ambassador-trace: %s\r\n" % exchange.traceValue.encode("ascii", "replace")
        data = errorResponse(reason, exchange.attempts, exchange.closeAfter,
                             head=exchange.bodyless, extra=extra)
        from .headers import ERROR_STATUS

        exchange.status = ERROR_STATUS.get(reason, 502)
        exchange.bytesOut += len(data)
        self.write(data)
        self.exchangeDone(exchange)

    def _rejectRequest(self, status: int, result: str) -> None:
        """A bad request (or none in time): answer, never touch a member, and close."""
        if self.closing:
            return
        self.closing = True
        self.inHead = False
        if self.headerCall is not None and self.headerCall.active():
            self.headerCall.cancel()
        self.headerCall = None
        reason = reasons.UNSUPPORTED if status == 501 else result
        data = errorResponse(reason, 0, True, status=status)
        parsing = self.parsing
        if parsing is not None and parsing is not self.active and parsing in self.queue:
            self.queue.remove(parsing)  # its own body went bad: it is the bad request
        if self.active is not None or self.queue:
            # A pipelined request went bad: the requests before it are answered first,
            # in order, then the connection closes (writing now would interleave two
            # responses, or answer an earlier request with this one's 400).
            (self.queue[-1] if self.queue else self.active).closeAfter = True
            if self.active is None:
                self._startNext()
            return
        self.core.finished(RequestRecord(
            None, 0, result, self.clock.seconds() - self.headStarted,
            bytesIn=self.headSize, bytesOut=len(data), status=status,
        ))
        self.transport.write(data)
        self.transport.loseConnection()

    def exchangeDone(self, exchange: Exchange, abort: bool = False) -> None:
        if exchange.finished:
            return
        self._record(exchange)
        if self.active is exchange:
            self.active = None
        if self.closed:
            return
        if abort:
            self.closing = True
            self.transport.abortConnection()
            return
        if exchange.closeAfter or (self.closing and not self.queue):
            self.closing = True
            self.transport.loseConnection()
            return
        if self.queue:
            self._startNext()
        else:
            gate = self.gate
            if gate.hold and (self.parsing is None or self.parsing.sink is not None):
                gate.setHold(False)
            if self.draining and not self.inHead and self.clock.seconds() >= self.drainEnds:
                # An answer whose head went out before the drain, without
                # ``connection: close``, ended after the drain's bound.
                self.closing = True
                self.transport.loseConnection()

    def _record(self, exchange: Exchange) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        self.core.finished(RequestRecord(
            exchange.upstream, exchange.attempts, exchange.result,
            self.clock.seconds() - exchange.started, bytesIn=exchange.bytesIn,
            bytesOut=exchange.bytesOut, status=exchange.status,
        ))


class HTTPFactory(Factory):
    """Builds the app connections of one http route; owns the member pool."""

    noisy = False

    #: Idle connections kept per member.  Enough for bursts of a busy app; beyond
    #: it, connections are closed rather than hoarded (HAProxy's pool-max-conn idea).
    maxIdlePerMember = 64

    def __init__(self, route: Any, core: Any, clock: Any) -> None:
        self.route = route
        self.core = core
        self.clock = clock
        self.settings = RouteSettings(route)
        self.pool = MemberPool(clock, self.maxIdlePerMember, route.idleTimeout, route.connectTimeout)
        self.connections: set[AppConnection] = set()
        #: No longer the factory of a listening port: its connections drain.
        self.stopped = False
        #: Stopped by a reload that gave its listener to new settings (``handOver``).
        self.handedOver = False

    def buildProtocol(self, addr: Any) -> AppConnection:
        protocol = AppConnection(self)
        protocol.factory = self
        return protocol

    def memberRetired(self, member: Any) -> None:
        """Called by the route when DNS discovery drops a member (issue 8)."""
        self.pool.retire(member)

    def handOver(self) -> None:
        """A reload gave the route's listener to new settings (``ambassador.reload``):
        stop as ``doStop`` does, except that each keep-alive connection waits for the
        app's next request (up to ``drain_timeout``) and answers it with
        ``connection: close``."""
        self.handedOver = True
        self.doStop()

    def doStop(self) -> None:
        """The route's listener stops using this factory: its keep-alive connections
        drain (``AppConnection.drain``).  On a stop, idle ones close at once and busy
        ones after their answer, so the drain ends early; when a reload handed the
        listener over, each waits for the app's next request (up to ``drain_timeout``)
        and answers it with ``connection: close``."""
        super().doStop()
        self.stopped = True
        handedOver = self.handedOver
        bound = self.route.drainTimeout if handedOver else DRAIN_LOOK
        for connection in list(self.connections):
            connection.drain(bound)
        if not (handedOver and self.connections):
            # (Handed over, the pool serves the requests still to come on the old
            # settings; it is closed with their last connection, ``connectionLost``.)
            self.pool.closeAll()

