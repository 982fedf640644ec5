"""The ``line`` route protocol plugin: app connections, framed by a dialect,
multiplexed onto pooled member connections through the route's resilience core.

Each app connection keeps its requests in a queue in arrival order and answers
from the head, so the app reads its answers in request order whichever member
answers first.  Every attempt goes through ``RouteCore.request`` (retry, timeout,
breaker, budget, balancing); this module only frames, routes and answers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.interfaces import ILineDialect, IRouteProtocol, RouteOption
from ambassador.protocols.http.transport import writerFor
from ambassador.protocols.line import MANY, LineRequest, LineRun
from ambassador.protocols.line.pool import Batcher, MemberConnection, Pool, _noDelay
from ambassador.resilience import reasons
from ambassador.resilience.core import Call, RequestRecord, RouteCore
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed

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


class _OnMember(Call):
    """What every line call does for an attempt: send its ``request`` on its app
    connection's pooled connection to the member (``app``, ``connection`` and
    ``request`` are the subclass's)."""

    __slots__ = ()

    def attempt(self, member: Member) -> None:
        """One attempt on ``member``: on this app connection's connection to it."""
        app: LineAppProtocol = self.app  # type: ignore[attr-defined]
        connection = app.connections.get(member)
        if connection is None or connection.closed:
            connection = app.connectionTo(member)
        self.connection = connection  # type: ignore[attr-defined]
        connection.send(self, self.request)  # type: ignore[attr-defined]

    def abandon(self) -> None:
        connection = self.connection  # type: ignore[attr-defined]
        if connection is not None:
            connection.abandon(self)


class _Entry(_OnMember):
    """One request of an app connection, until its answer is written.

    The entry is also the request's core ``Call``: the core asks it for attempts
    and hands it the verdict by plain method calls, so a pipelined request costs
    one object of ours besides its parsed ``LineRequest`` (no Deferred, closure,
    bound-method pair or argument tuple).
    """

    __slots__ = (
        "app",
        "attempts",
        "connection",
        "failure",
        "parts",
        "partsLeft",
        "reply",
        "request",
        "result",
        "started",
        "upstream",
    )

    def __init__(self, app: LineAppProtocol, request: LineRequest, started: float) -> None:
        Call.__init__(self, app.core, request.key, request.safe)
        self.app = app
        self.request = request
        self.started = started
        self.reply: bytes | None = None
        self.result = reasons.OK
        self.attempts = 0
        self.upstream: str | None = None
        self.parts: list[Any] | None = None
        self.partsLeft = 0
        self.failure: str | None = None
        self.connection: MemberConnection | None = None

    def settled(self, value: bytes) -> None:
        """The member's reply."""
        self.attempts = self.tries
        self.upstream = self.member.upstream  # type: ignore[union-attr]
        self.app._done(self, value)

    def failed(self, reason: str) -> None:
        """No reply: answer with the dialect's error reply for ``reason``."""
        self.result = reason
        self.attempts = self.tries
        member = self.member
        self.upstream = member.upstream if member is not None else None
        app = self.app
        # A request the member never answers (memcached noreply) gets no answer from
        # us either (SPEC §4/line): an error reply would put the app out of step.
        app._done(self, app.dialect.errorReply(reason) if self.request.expectsReply else b"")


class _Burst(_OnMember):
    """Several pipelined requests of one app connection, read together and sent to
    one member as one attempt: one pick, breaker check, timeout and budget entry,
    one write and one reply of all their replies, for what costs each request its
    own of each on the ``_Entry`` path (``redis-benchmark -P 16``: most of the
    route's CPU).  Only requests that a member answers (no local answer, a reply
    expected) are grouped, under hash routing only those whose keys have the same
    owner now (the burst's ``key`` is its first request's), and only with the access
    log off.

    Retries stay per request: if the attempt fails, the replies already framed
    stand, and every request still unanswered goes on as its own ``_Entry`` from
    that failure (``retryOrStop``): replayed if it was never written or is safe,
    else answered with the failure (``reset``).  Each retry takes its own share of
    the budget.
    """

    __slots__ = (
        "app",
        "attempts",
        "connection",
        "count",
        "got",
        "pieces",
        "reply",
        "request",
        "result",
        "started",
        "upstream",
    )

    def __init__(self, app: LineAppProtocol, run: LineRun, started: float, key: bytes | None = None) -> None:
        Call.__init__(self, app.core, key, False)
        self.app = app
        self.request = run
        self.count = run.count
        self.started = started
        self.reply: bytes | None = None
        self.result = reasons.OK
        self.attempts = 0
        self.upstream: str | None = None
        self.connection: MemberConnection | None = None
        self.got = 0
        self.pieces: list[bytes] = []

    def settled(self, value: bytes) -> None:
        self.attempts = self.tries
        self.upstream = self.member.upstream  # type: ignore[union-attr]
        self.app._done(self, value)  # type: ignore[arg-type]

    def failed(self, reason: str) -> None:
        """No attempt could be made (no usable member): each request gets the error."""
        self.result = reason
        self.attempts = self.tries
        self.app._done(self, self.app.dialect.errorReply(reason) * self.count)  # type: ignore[arg-type]

    def _failedWith(self, failed: AttemptFailed, member: Member) -> None:
        """``Call._failedWith``, counting the requests answered before the failure as
        successful attempts and the others as failed ones."""
        core = self.core
        self.lastFailure = failed
        member.failures += 1
        member.breaker.failure()
        now = core.clock.seconds()
        duration = now - self.attemptStarted
        got = self.got
        if got:
            core.events.attemptFinished(core.name, member, reasons.OK, duration, got)
        core.events.attemptFinished(core.name, member, failed.reason, duration, self.count - got)
        self.retryOrStop(failed, member, now)

    def retryOrStop(self, failed: AttemptFailed, member: Member, now: float) -> None:
        """The attempt failed: the answered requests stay this burst, each of the
        others goes on alone, in the app's queue where the burst stood."""
        app = self.app
        got = self.got
        requests = self.request.split()
        rest = [_Entry(app, request, self.started) for request in requests[got:]]
        for entry in rest:
            entry.deadlineAt = self.deadlineAt
            entry.tries = 1
            entry.member = member
            entry.lastFailure = failed
        queue = app.queue
        try:
            where = queue.index(self)  # type: ignore[arg-type]
        except ValueError:  # the app connection closed and its queue was cleared
            where = -1
        if got:
            self.request = LineRun.of(requests[:got])
            self.count = got
            self.attempts = 1
            self.upstream = member.upstream
            where += 1 if where >= 0 else 0
        elif where >= 0:
            del queue[where]
        if where >= 0:
            for i, entry in enumerate(rest):
                queue.insert(where + i, entry)  # type: ignore[arg-type]
        if got:
            pieces = self.pieces
            app._done(self, pieces[0] if len(pieces) == 1 else b"".join(pieces))  # type: ignore[arg-type]
        for entry in rest:
            entry.retryOrStop(failed, member, now)


class _Part(_OnMember):
    """One member's share of a multi-key request split under ``balance = "hash"``:
    its own core call, answering into the whole request's entry."""

    __slots__ = ("connection", "entry", "index", "merge", "request")

    def __init__(self, entry: _Entry, index: int, request: LineRequest, merge: Any) -> None:
        Call.__init__(self, entry.app.core, request.key, request.safe)
        self.entry = entry
        self.index = index
        self.request = request
        self.merge = merge
        self.connection: MemberConnection | None = None

    @property
    def app(self) -> LineAppProtocol:
        return self.entry.app

    def settled(self, value: bytes) -> None:
        entry = self.entry
        entry.parts[self.index] = value  # type: ignore[index]
        entry.attempts += self.tries
        upstream = self.member.upstream  # type: ignore[union-attr]
        entry.upstream = upstream if entry.upstream is None else f"{entry.upstream},{upstream}"
        self._partDone()

    def failed(self, reason: str) -> None:
        entry = self.entry
        entry.attempts += self.tries
        if entry.failure is None:
            entry.failure = reason
        self._partDone()

    def _partDone(self) -> None:
        entry = self.entry
        entry.partsLeft -= 1
        if entry.partsLeft:
            return
        app = entry.app
        if entry.failure is not None:
            entry.result = entry.failure
            app._done(entry, app.dialect.errorReply(entry.failure))
        else:
            app._done(entry, self.merge(entry.parts))


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
        #: Requests read and not yet answered (a burst in ``queue`` counts each).
        self.unanswered = 0

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
        self.write = writerFor(self.transport)
        self.factory.apps.add(self)
        self.parser = self.dialect.requestParser(self.core.route)
        if self.factory.parserRuns and hasattr(self.parser, "runs"):
            self.parser.runs = True  # it may frame a burst as one LineRun
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
        now = self.clock.seconds()
        self.lastActivity = now
        requests = self.parser.feed(data)
        if not requests:
            return
        batcher = self.factory.batcher
        batcher.depth += 1  # cork: one write per member connection for the burst
        try:
            factory = self.factory
            if factory.bursts and (len(requests) > 1 or requests[0].kind is MANY):
                if factory.hashing:
                    self._submitHashedBursts(requests, now)
                else:
                    self._submitBursts(requests, now)
            else:
                self._submit(requests, now)
        finally:
            batcher.uncork()
        if self.unanswered >= MAX_PENDING and not self.paused:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _submit(self, requests: list[LineRequest], now: float) -> None:
        """One core call per request."""
        queue = self.queue
        submit = self.core.submit
        hashing = self.factory.hashing
        self.unanswered += len(requests)
        for request in requests:
            entry = _Entry(self, request, now)
            queue.append(entry)
            if (
                request.error is None and request.localReply is None
                and (request.keys is None or not hashing)
            ):
                submit(entry)
            else:
                self._submitOther(entry)
            if request.close:
                self.closing = True
                break

    def _submitBursts(self, requests: list[LineRequest], now: float) -> None:
        """Runs of plain requests as one core call each (``_Burst``), the rest alone."""
        queue = self.queue
        submit = self.core.submit
        run: list[LineRequest] = []
        for request in requests:
            if request.kind is MANY:  # the parser's own run
                if run:
                    self._submitRun(run, now)
                    run = []
                self.unanswered += request.count
                burst = _Burst(self, request, now)  # type: ignore[arg-type]
                queue.append(burst)  # type: ignore[arg-type]
                submit(burst)
                continue
            self.unanswered += 1
            if (
                request.error is None and request.localReply is None
                and request.expectsReply and not request.close
            ):
                run.append(request)
                continue
            if run:
                self._submitRun(run, now)
                run = []
            entry = _Entry(self, request, now)
            queue.append(entry)
            if request.error is None and request.localReply is None:
                submit(entry)
            else:
                self._submitOther(entry)
            if request.close:
                self.closing = True
                return
        if run:
            self._submitRun(run, now)

    def _submitHashedBursts(self, requests: list[LineRequest], now: float) -> None:
        """Under hash routing: runs of single-key requests whose keys the ring gives to
        the same member now, as one core call each; the rest as ``_submit`` would."""
        core = self.core
        pick = core.balancer.pick
        candidates = core.candidates()
        run: list[LineRequest] = []
        owner = None
        for request in requests:
            key = request.key
            if (
                key is not None and request.keys is None and request.error is None
                and request.localReply is None and request.expectsReply and not request.close
            ):
                member = pick(candidates, (), key)
                if member is not None:
                    if run and member is not owner:
                        self._submitRun(run, now)
                        run = []
                    owner = member
                    run.append(request)
                    self.unanswered += 1
                    continue
            if run:
                self._submitRun(run, now)
                run = []
            self._submit([request], now)
            if request.close:
                return
        if run:
            self._submitRun(run, now)

    def _submitRun(self, run: list[LineRequest], now: float) -> None:
        call: Call = (_Burst(self, LineRun.of(run), now, run[0].key) if len(run) > 1
                      else _Entry(self, run[0], now))
        self.queue.append(call)  # type: ignore[arg-type]
        self.core.submit(call)

    def _submitOther(self, entry: _Entry) -> None:
        """A request answered here, or split per member (not the common case)."""
        request = entry.request
        if request.error is not None:
            entry.result = request.error
            self._done(entry, self.dialect.errorReply(request.error))
            return
        if request.localReply is not None:
            self._done(entry, request.localReply)
            return
        factory = self.factory
        split = self.dialect.split(request, factory.ownerOf)
        if split is not None:
            parts, merge = split
            entry.parts = [None] * len(parts)
            entry.partsLeft = len(parts)
            for i, partRequest in enumerate(parts):
                self.core.submit(_Part(entry, i, partRequest, merge))
            return
        self.core.submit(entry)

    def connectionTo(self, member: Member) -> MemberConnection:
        """This app connection's pooled connection to ``member``, (re)acquired."""
        pool = self.factory.pool
        connection = self.connections.get(member)
        if connection is not None:
            pool.release(connection)
        connection = pool.acquire(member)
        if self.closed:
            pool.release(connection)
        else:
            self.connections[member] = connection
        return connection

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
            count = entry.count
            self.unanswered -= count
            core.finished(RequestRecord(
                entry.upstream, entry.attempts, entry.result, now - entry.started,
                bytesIn=len(entry.request.raw), bytesOut=len(reply) if not self.closed else 0,
                count=count,
            ))
            if entry.request.close:
                close = True
                break
        if self.closed:
            return
        if out:
            self.lastActivity = now
            self.write(out[0] if len(out) == 1 else b"".join(out))
        if close or (self.closing and not queue):
            queue.clear()
            self.transport.loseConnection()
        elif self.paused and self.unanswered <= MAX_PENDING // 2:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]


class LineFactory(Factory):
    """Serves one line route's listen endpoint."""

    noisy = False

    def __init__(
        self, route: Any, core: RouteCore, clock: IReactorTime, dialect: Any,
        coalesce: bool = False,
    ) -> None:
        """@param coalesce: write at the end of each reactor iteration (see
            ``Batcher``); off, writes go out when each burst is handled, which is
            what tests driving a ``task.Clock`` by hand expect."""
        self.route = route
        self.core = core
        self.clock = clock
        self.dialect = dialect
        self.hashing = route.balance == "hash"
        #: Group pipelined requests into bursts (see ``_Burst``)?  Not with the access
        #: log on (a line per request, with its own bytes).
        self.bursts = not route.accessLog
        #: May the dialect's parser frame bursts itself (``LineRun``)?  Not under hash
        #: routing either: each request's key must be seen.
        self.parserRuns = self.bursts and not self.hashing
        self.batcher = Batcher(clock.callLater if coalesce else None)
        self.pool = Pool(dialect, clock, route.connectTimeout, route.name, batcher=self.batcher)
        self.apps: set[LineAppProtocol] = set()
        self.draining = False

    def ownerOf(self, key: bytes) -> Any:
        """The member a key belongs to now (hash balance): how multi-key requests split."""
        balancer: Any = self.core.balancer
        return balancer.pick(self.core.members, (), key)

    def buildProtocol(self, addr: Any) -> LineAppProtocol:
        return LineAppProtocol(self)

    def memberRetired(self, member: Any) -> None:
        """Called by the route when DNS discovery drops a member (issue 8)."""
        self.pool.retire(member)

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
        return LineFactory(route, core, reactor, dialect, coalesce=True)


lineProtocol = LineRouteProtocol()
