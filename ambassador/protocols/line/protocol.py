"""The ``line`` route protocol plugin: app connections, framed by a dialect,
multiplexed onto pooled member connections through the route's resilience core.

Each app connection keeps its requests in a queue in arrival order and answers
from the head, so the app reads its answers in request order whichever member
answers first.  Every attempt goes through ``RouteCore.request`` (retry, timeout,
breaker, budget, balancing); this module only frames, routes and answers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.interfaces import ILineDialect, IRouteProtocol, RouteOption
from ambassador.protocols.line import LineRequest
from ambassador.protocols.line.pool import Batcher, MemberConnection, Pool, _noDelay
from ambassador.resilience import reasons
from ambassador.resilience.core import Outcome, RequestRecord, RouteCore
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import RequestFailed

#: An app connection with this many requests unanswered is not read from until it
#: is down to half: a client that pipelines without reading cannot grow our memory.
MAX_PENDING = 1024


def lineDialects() -> dict[str, Any]:
    """Every installed line dialect plugin, by name (SPEC §9)."""
    from twisted.plugin import getPlugins

    import twisted.plugins

    return {str(d.name): d for d in getPlugins(ILineDialect, twisted.plugins)}


def _parseDialect(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    dialects = lineDialects()
    if value not in dialects:
        raise ValueError(f"unknown dialect {value!r} (installed: {', '.join(sorted(dialects))})")
    return value


def _parseBool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


class _Entry:
    """One request of an app connection, until its answer is written."""

    __slots__ = (
        "attempts",
        "failure",
        "parts",
        "partsLeft",
        "reply",
        "request",
        "result",
        "started",
        "upstream",
    )

    def __init__(self, request: LineRequest, started: float) -> None:
        self.request = request
        self.started = started
        self.reply: bytes | None = None
        self.result = reasons.OK
        self.attempts = 0
        self.upstream: str | None = None
        self.parts: list[Any] | None = None
        self.partsLeft = 0
        self.failure: str | None = None


@implementer(IHalfCloseableProtocol)
class LineAppProtocol(Protocol):
    """One app connection of a line route.

    Half-closeable: an app that sends its requests and then shuts down its sending
    side (``nc -N``, a batch job) still gets every answer before the connection closes.
    """

    transport: Any  # a TCP/UNIX/TLS transport: also a producer (pause/resume)

    def __init__(self, factory: LineFactory) -> None:
        self.factory = factory
        self.core: RouteCore = factory.core
        self.clock: Any = factory.clock
        self.dialect = factory.dialect
        self.queue: deque[_Entry] = deque()
        self.connections: dict[Member, MemberConnection] = {}
        self.admitted = False
        self.closed = False
        self.closing = False
        self.paused = False
        self.dirty = False
        self.idleCall: Any = None
        self.lastActivity = 0.0

    # --- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.lastActivity = self.clock.seconds()
        if not self.core.admit(self):
            self.closing = True
            self.transport.write(self.dialect.errorReply(reasons.OVERLOADED))
            self.transport.loseConnection()
            self.core.finished(RequestRecord(None, 0, reasons.OVERLOADED, 0.0))
            return
        self.admitted = True
        _noDelay(self.transport)
        self.factory.apps.add(self)
        self.parser = self.dialect.requestParser(self.core.route)
        self.idleCall = self.clock.callLater(self.core.route.idleTimeout, self._idleCheck)
        if self.factory.draining:
            self.drain()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.closed = True
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        pool = self.factory.pool
        for connection in self.connections.values():
            pool.release(connection)
        self.connections.clear()
        # Requests still under way finish on their own (bounded by the deadline) and
        # are recorded then; cancelling them would close member connections that
        # other app connections share.
        if self.admitted:
            self.admitted = False
            self.factory.apps.discard(self)
            self.core.release(self)
            self.factory.appGone()

    def readConnectionLost(self) -> None:
        """The app sent its last request: answer what it asked, then close."""
        self.drain()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        """Close now, dropping whatever is unanswered (drain timeout, idle)."""
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def drain(self) -> None:
        """The route is stopping: close once every request read so far is answered."""
        self.closing = True
        if not self.queue:
            self.transport.loseConnection()

    def _idleCheck(self) -> None:
        now = self.clock.seconds()
        idle = self.core.route.idleTimeout
        if now - self.lastActivity >= idle and not self.queue:
            self.idleCall = None
            self.abort()
        else:
            wait = max(self.lastActivity + idle - now, min(idle, 1.0))
            self.idleCall = self.clock.callLater(wait, self._idleCheck)

    # --- requests ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.lastActivity = self.clock.seconds()
        requests = self.parser.feed(data)
        if not requests:
            return
        batcher = self.factory.batcher
        batcher.cork()
        try:
            for request in requests:
                self._submit(request)
                if request.close:
                    self.closing = True
                    break
        finally:
            batcher.uncork()
        if len(self.queue) >= MAX_PENDING and not self.paused:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _submit(self, request: LineRequest) -> None:
        entry = _Entry(request, self.clock.seconds())
        self.queue.append(entry)
        if request.error is not None:
            entry.result = request.error
            self._done(entry, self.dialect.errorReply(request.error))
            return
        if request.localReply is not None:
            self._done(entry, request.localReply)
            return
        factory = self.factory
        if request.keys is not None and factory.hashing:
            split = self.dialect.split(request, factory.ownerOf)
            if split is not None:
                parts, merge = split
                entry.parts = [None] * len(parts)
                entry.partsLeft = len(parts)
                for i, part in enumerate(parts):
                    d = self.core.request(self._attempter(part), key=part.key, safe=part.safe)
                    d.addCallbacks(self._partAnswered, self._partFailed,
                                   callbackArgs=(entry, i, merge), errbackArgs=(entry, i, merge))
                return
        d = self.core.request(self._attempter(request), key=request.key, safe=request.safe)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(entry,), errbackArgs=(entry,))

    def _attempter(self, request: LineRequest) -> Callable[[Member], Any]:
        def attempt(member: Member) -> Any:
            connection = self.connections.get(member)
            if connection is None or connection.closed:
                pool = self.factory.pool
                if connection is not None:
                    pool.release(connection)
                connection = pool.acquire(member)
                if self.closed:
                    pool.release(connection)
                else:
                    self.connections[member] = connection
            return connection.send(request)

        return attempt

    def _answered(self, outcome: Outcome, entry: _Entry) -> None:
        entry.attempts = outcome.attempts
        entry.upstream = outcome.member.upstream
        self._done(entry, outcome.value)

    def _failed(self, failure: Failure, entry: _Entry) -> None:
        if failure.check(RequestFailed):
            error = failure.value
            entry.result = error.reason
            entry.attempts = error.attempts
            entry.upstream = error.member.upstream if error.member is not None else None
        else:
            entry.result = reasons.PROTOCOL_ERROR
        self._done(entry, self.dialect.errorReply(entry.result))

    def _partAnswered(self, outcome: Outcome, entry: _Entry, i: int, merge: Any) -> None:
        entry.parts[i] = outcome.value  # type: ignore[index]
        entry.attempts += outcome.attempts
        upstream = outcome.member.upstream
        entry.upstream = upstream if entry.upstream is None else f"{entry.upstream},{upstream}"
        self._partDone(entry, merge)

    def _partFailed(self, failure: Failure, entry: _Entry, i: int, merge: Any) -> None:
        reason = failure.value.reason if failure.check(RequestFailed) else reasons.PROTOCOL_ERROR
        if failure.check(RequestFailed):
            entry.attempts += failure.value.attempts
        if entry.failure is None:
            entry.failure = reason
        self._partDone(entry, merge)

    def _partDone(self, entry: _Entry, merge: Any) -> None:
        entry.partsLeft -= 1
        if entry.partsLeft:
            return
        if entry.failure is not None:
            entry.result = entry.failure
            self._done(entry, self.dialect.errorReply(entry.failure))
        else:
            self._done(entry, merge(entry.parts))

    # --- answers -----------------------------------------------------------------

    def _done(self, entry: _Entry, reply: bytes) -> None:
        entry.reply = reply
        if not self.queue or self.queue[0] is not entry:
            return
        batcher = self.factory.batcher
        if batcher.depth:
            if not self.dirty:
                self.dirty = True
                batcher.dirty.append(self)
        else:
            self.flush()

    def flush(self) -> None:
        """Write every answer at the head of the queue that is ready, in order."""
        self.dirty = False
        queue = self.queue
        out = []
        core = self.core
        now = self.clock.seconds()
        close = False
        while queue and queue[0].reply is not None:
            entry = queue.popleft()
            reply: bytes = entry.reply  # type: ignore[assignment]  # the loop checked it
            out.append(reply)
            core.finished(RequestRecord(
                entry.upstream, entry.attempts, entry.result, now - entry.started,
                bytesIn=len(entry.request.raw), bytesOut=len(reply) if not self.closed else 0,
            ))
            if entry.request.close:
                close = True
                break
        if self.closed:
            return
        if out:
            self.lastActivity = now
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close or (self.closing and not queue):
            queue.clear()
            self.transport.loseConnection()
        elif self.paused and len(queue) <= MAX_PENDING // 2:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]


class LineFactory(Factory):
    """Serves one line route's listen endpoint."""

    noisy = False

    def __init__(self, route: Any, core: RouteCore, clock: IReactorTime, dialect: Any) -> None:
        self.route = route
        self.core = core
        self.clock = clock
        self.dialect = dialect
        self.hashing = route.balance == "hash"
        self.batcher = Batcher()
        self.pool = Pool(dialect, clock, route.connectTimeout, route.name, batcher=self.batcher)
        self.apps: set[LineAppProtocol] = set()
        self.draining = False

    def ownerOf(self, key: bytes) -> Any:
        """The member a key belongs to now (hash balance): how multi-key requests split."""
        balancer: Any = self.core.balancer
        return balancer.pick(self.core.members, (), key)

    def buildProtocol(self, addr: Any) -> LineAppProtocol:
        return LineAppProtocol(self)

    def stopFactory(self) -> None:
        """The route stopped listening: finish what each app connection asked, then close."""
        self.draining = True
        for app in list(self.apps):
            app.drain()
        self.appGone()

    def appGone(self) -> None:
        if self.draining and not self.apps:
            self.pool.close()


@implementer(IPlugin, IRouteProtocol)
class LineRouteProtocol:
    """The ``line`` protocol plugin."""

    name = "line"
    options = (
        RouteOption("dialect", _parseDialect, "line"),
        RouteOption("idempotent", _parseBool, None),
    )
    dialectOption = "dialect"
    keyHashing = True

    def validate(self, route: Any) -> list[tuple[str, str]]:
        dialect = route.options.get("dialect", "line")
        if route.options.get("idempotent") is not None and dialect in ("redis", "memcached"):
            return [("idempotent", f"applies to the generic line dialect only; the {dialect} "
                                   "dialect knows which commands are read-only")]
        return []

    def buildFactory(self, route: Any, core: RouteCore, reactor: Any) -> LineFactory:
        dialect = lineDialects()[route.options.get("dialect", "line")]
        return LineFactory(route, core, reactor, dialect)


lineProtocol = LineRouteProtocol()
