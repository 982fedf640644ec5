"""The route's resilience core: every upstream attempt of every protocol goes through it.

A protocol hands :meth:`RouteCore.request` a function that makes one attempt against
one member; the core chooses the member, bounds the attempt in time, feeds the
breaker, decides on retries (tries left, safety, budget, deadline), sleeps the
backoff and reports everything to the observers (metrics, logs).  Protocol code
never re-implements any of that.
"""

from __future__ import annotations

import math
import random as _random
import weakref
from collections import deque
from time import time as _now
from typing import Any, Callable, Collection

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ambassador.logs import ACCESS_FORMAT
from ambassador.resilience import reasons
from ambassador.resilience.backoff import backoffDelay
from ambassador.resilience.balance import BALANCERS
from ambassador.resilience.breaker import HALF_OPEN, Breaker
from ambassador.resilience.budget import RetryBudget
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed, RequestFailed, classify

log = Logger(namespace="ambassador")
accessLog = Logger(namespace="ambassador.access")

#: How many trace values a route keeps for ``/status?route=NAME`` (SPEC §6).
TRACES = 20

#: Member prefixes found by DNS (ambassador.discovery) rather than connected to.
DISCOVERED = ("dns", "srv")


def isDiscovered(upstream: str) -> bool:
    """Is this configured upstream a ``dns:``/``srv:`` name whose members are found later?"""
    return upstream.split(":", 1)[0] in DISCOVERED


def weightedOrder(members: list[Member]) -> list[Member]:
    """Members repeated in proportion to their weights, interleaved (nginx's smooth
    weighted round robin), so that round_robin, random and least_request, picking
    from this list, give each member its weight's share (SPEC §2 ``srv:``).

    Weights are scaled to about 100 slots; a weight of 0 (RFC 2782: "a very small
    chance") keeps one slot.
    """
    weights = [m.weight for m in members]
    if len(set(weights)) <= 1:
        return list(members)
    total = sum(weights)
    scale = min(1.0, 100.0 / total)
    counts = [max(1, round(w * scale)) for w in weights]
    divisor = math.gcd(*counts)
    counts = [c // divisor for c in counts]
    slots = sum(counts)
    current = [0] * len(members)
    order: list[Member] = []
    for _ in range(slots):
        for i, count in enumerate(counts):
            current[i] += count
        best = max(range(len(members)), key=current.__getitem__)
        current[best] -= slots
        order.append(members[best])
    return order


class Outcome:
    """What a request came to when it has a response to hand back.

    ``reason`` is ``"ok"`` for a successful attempt; otherwise the last attempt's
    failure reason (e.g. a retryable status) whose ``response`` is handed back as it
    is, and ``budgetExhausted`` says whether the budget stopped the retries.
    """

    __slots__ = ("value", "attempts", "member", "reason", "budgetExhausted", "trace")

    def __init__(
        self, value: Any, attempts: int, member: Member, reason: str = reasons.OK,
        budgetExhausted: bool = False, trace: str | None = None,
    ) -> None:
        self.value = value
        self.attempts = attempts
        self.member = member
        self.reason = reason
        self.budgetExhausted = budgetExhausted
        #: With ``request(..., trace=True)``: the x-ambassador-trace value (SPEC §6).
        self.trace = trace


class RequestRecord:
    """One finished request (tcp: connection), for metrics and the access log."""

    __slots__ = ("upstream", "attempts", "result", "status", "bytesIn", "bytesOut", "duration",
                 "count")

    def __init__(
        self, upstream: str | None, attempts: int, result: str, duration: float,
        bytesIn: int = 0, bytesOut: int = 0, status: int | None = None, count: int = 1,
    ) -> None:
        self.upstream = upstream
        self.attempts = attempts
        self.result = result
        self.status = status
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut
        self.duration = duration
        #: How many requests this record stands for: a line route's pipelined burst
        #: that went out and came back as one is recorded once, for all of them
        #: (same upstream, attempts, result and duration; bytes are the burst's).
        #: Only made with the route's access log off (a line is per request).
        self.count = count


class ObserverList(list):  # type: ignore[type-arg]
    """The observers shared by the routes of one process: a list that tells the
    routes' event fan-outs when an observer is added or removed, so that they may
    cache what to call per event (see ``_Observers``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.users: weakref.WeakSet[_Observers] = weakref.WeakSet()

    def append(self, observer: Any) -> None:
        super().append(observer)
        self._changed()

    def remove(self, observer: Any) -> None:
        super().remove(observer)
        self._changed()

    def _changed(self) -> None:
        for user in list(self.users):
            user.reset()


class _Observers:
    """Fans core events out to the observers (metrics, access log, tests).

    What to call for an event is worked out on its first use and cached as an
    attribute: with one observer (the metrics, normally) it is that observer's bound
    method itself, with no loop and no ``*args`` repacking, two of which a small
    request pays per event.  Observers added or removed later are seen when the list
    is an ``ObserverList`` (the service's is); with a plain list, only those present
    at an event's first use.
    """

    def __init__(self, observers: list[Any]) -> None:
        self.observers = observers
        if isinstance(observers, ObserverList):
            observers.users.add(self)

    def reset(self) -> None:
        """The observers changed: forget the cached callables."""
        for name in [n for n in vars(self) if n != "observers"]:
            delattr(self, name)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)
        observers = self.observers
        if len(observers) == 1:
            fanOut = getattr(observers[0], name)
        else:
            methods = [getattr(observer, name) for observer in observers]

            def fanOut(*args: Any) -> None:
                for method in methods:
                    method(*args)

        setattr(self, name, fanOut)
        return fanOut


class RouteCore:
    """Members, balancer, breakers, budget and policies of one route.

    @param route: the route's ``ambassador.config.Route``.
    @param endpointFor: builds a member's client endpoint from its endpoint string
        (and, for a discovered member, its DNS name: ``endpointFor(upstream, hostName)``).
    """

    def __init__(
        self,
        route: Any,
        clock: IReactorTime,
        endpointFor: Callable[..., Any],
        observers: list[Any] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.route = route
        self.name = route.name
        self.clock = clock
        self.random = random
        self.events = _Observers(observers if observers is not None else [])
        self.balancer = BALANCERS[route.balance]()
        self.budget = RetryBudget(clock, route.retry.budgetRatio, route.retry.budgetMinPerSecond)
        self.members: list[Member] = []
        self.endpointFor = endpointFor
        #: Priority -> the weighted pick list of that priority's members; None while
        #: every member has priority 0 and weight 1 (the plain, fast case).
        self.tiers: dict[int, list[Member]] | None = None
        #: ``dns:``/``srv:`` upstream -> its discovery state (ambassador.discovery).
        self.discovery: dict[str, Any] = {}
        #: Called with each member discovery drops (after it left ``members``): the
        #: protocol closes that member's pooled connections once they are idle.
        self.retiredHooks: list[Callable[[Member], None]] = []
        for upstream in route.upstreams:
            if isDiscovered(upstream):
                continue  # its members come from ambassador.discovery
            self.addMember(upstream, endpointFor(upstream))
        self.activeConnections = 0
        self.connections: set[Any] = set()
        #: The last TRACES trace values of requests made with trace=True (/status).
        self.traces: deque[str] = deque(maxlen=TRACES)
        #: The calls whose first attempt is bounded by ``route.timeout``, oldest
        #: first, and the one timer that watches the oldest (see :meth:`watch`).
        self.timeouts: deque[Call] = deque()
        self.timeoutCall: IDelayedCall | None = None
        self.firing = False

    def addMember(self, upstream: str, endpoint: Any) -> Member:
        policy = self.route.breaker
        member: Member

        def changed(state: str) -> None:
            log.info(
                "route {route}: breaker of {upstream} is {state}",
                route=self.name, upstream=upstream, state=state,
            )
            self.events.breakerChanged(self.name, member, state)

        breaker = Breaker(
            self.clock, policy.failureThreshold, policy.resetTimeout, policy.halfOpenMax, changed
        )
        member = Member(upstream, endpoint, breaker)
        self.members.append(member)
        return member

    @property
    def hasUsableMember(self) -> bool:
        return any(m.usable for m in self.members)

    # --- discovered members -----------------------------------------------------------

    def setDiscovered(
        self, source: str, found: list[tuple[str, str | None, int, int]],
    ) -> tuple[list[Member], list[Member]]:
        """Make ``found`` the members of ``source`` (a ``dns:``/``srv:`` upstream).

        Requests under way are untouched: members that stayed keep their breaker,
        counters and pooled connections; new ones join the balancer; vanished ones
        leave it (no new attempt) and are marked ``retired`` for the pools.

        @param found: ``(upstream, hostName, priority, weight)`` per member, the
            upstream being ``tcp:ADDRESS:PORT`` (the metrics label, SPEC §6).
        @return: the members added and the members removed.
        """
        current = {m.upstream: m for m in self.members if m.source == source}
        added: list[Member] = []
        for upstream, hostName, priority, weight in found:
            member = current.pop(upstream, None)
            if member is None:
                member = self.addMember(upstream, self.endpointFor(upstream, hostName))
                member.source = source
                member.hostName = hostName
                added.append(member)
            member.priority = priority
            member.weight = weight
        removed = list(current.values())
        for member in removed:
            self.members.remove(member)
            member.retired = True
        self.rebalance()
        for member in removed:
            for hook in self.retiredHooks:
                try:
                    hook(member)
                except Exception:  # noqa: BLE001 - one protocol's bug must not stop discovery
                    log.failure("route {route}: closing the connections of retired {upstream}",
                                route=self.name, upstream=member.upstream)
        return added, removed

    def adoptDiscovered(self, old: RouteCore) -> list[str]:
        """On reload: take over ``old``'s discovered members (and discovery state) of
        the ``dns:``/``srv:`` upstreams this route still has, so the new settings do
        not start with no member while DNS is asked again."""
        sources = {u for u in self.route.upstreams if isDiscovered(u)}
        kept = [m for m in old.members if m.source in sources]
        if (old.route.tls != self.route.tls
                or getattr(old.route, "tlsFingerprint", None)
                != getattr(self.route, "tlsFingerprint", None)):
            # new TLS settings or rotated files: same member, endpoint from the new ones
            for member in kept:
                member.endpoint = self.endpointFor(member.upstream, member.hostName)
        self.members.extend(kept)
        for source in sources:
            if source in old.discovery:
                self.discovery[source] = old.discovery[source]
        self.rebalance()
        return [m.upstream for m in kept]

    def rebalance(self) -> None:
        """Recompute the priority tiers after the member set or weights changed."""
        if all(m.priority == 0 and m.weight == 1 for m in self.members):
            self.tiers = None
            return
        byPriority: dict[int, list[Member]] = {}
        for member in self.members:
            byPriority.setdefault(member.priority, []).append(member)
        weighted = self.route.balance != "hash"  # a ring spreads keys, not weights
        self.tiers = {
            priority: weightedOrder(members) if weighted else members
            for priority, members in sorted(byPriority.items())
        }

    def candidates(self) -> list[Member]:
        """What the balancer picks from: every member, or (``srv:`` priorities and
        weights) the weighted members of the lowest priority with a usable member."""
        tiers = self.tiers
        if tiers is None:
            return self.members
        for members in tiers.values():
            if any(m.usable for m in members):
                return members
        return self.members

    # --- requests ---------------------------------------------------------------------

    def request(
        self,
        attempt: Callable[[Member], Deferred[Any]],
        *,
        key: bytes | None = None,
        safe: bool = True,
        retryOn: Collection[str] = reasons.RETRYABLE,
        attemptTimeout: float | None = None,
        trace: bool = False,
    ) -> Deferred[Outcome]:
        """Run attempts until one succeeds or retries must stop.

        @param attempt: makes one attempt on a member; its Deferred fires with the
            response, or fails (``AttemptFailed`` or any connection error).  Cancelling
            it must abandon the attempt and close what it opened.
        @param key: the request's key for ``balance = "hash"``.
        @param safe: may the request be repeated once it may have reached a member?
        @param retryOn: the failure reasons that may be retried.
        @param attemptTimeout: the bound of one attempt (default: the route's timeout).
        @param trace: record every attempt; the ``Outcome`` or ``RequestFailed`` then
            carries ``.trace``, the x-ambassador-trace value (SPEC §6), also kept in
            ``self.traces``.  Off, it costs nothing.
        @return: fires with an ``Outcome``, or fails with ``RequestFailed``.
        """
        call = _DeferredCall(self, attempt, key, safe, retryOn, attemptTimeout, trace)
        call.start()
        return call.result

    def submit(self, call: Call) -> None:
        """Run ``call``'s attempts until one succeeds or retries must stop: the
        Deferred-free :meth:`request` (see :class:`Call`)."""
        call.start()

    def finished(self, record: RequestRecord) -> None:
        """A request (tcp: connection) ended: count it and write its access-log line."""
        self.events.requestFinished(self.name, record)
        if self.route.accessLog:
            # A record of several requests (``count``) is never made with the access
            # log on: each line needs its request's own bytes.
            # The event accessLog.info() would emit, without Logger.emit's own work
            # (a level check that iterates LogLevel's constants), once per request.
            accessLog.observer({
                "log_logger": accessLog, "log_level": LogLevel.info,
                "log_namespace": accessLog.namespace, "log_source": accessLog.source,
                "log_format": ACCESS_FORMAT, "log_time": _now(),
                "route": self.name, "upstream": record.upstream, "attempts": record.attempts,
                "result": record.result, "status": record.status, "bytes_in": record.bytesIn,
                "bytes_out": record.bytesOut, "duration_ms": round(record.duration * 1000, 3),
            })

    # --- attempt timeouts ---------------------------------------------------------------

    def watch(self, call: Call, now: float) -> bool:
        """Bound ``call``'s first attempt, starting ``now``, by ``route.timeout``
        without a timer of its own: such attempts expire in the order they started,
        so one timer for the oldest one watches them all (a ``callLater`` and its
        ``cancel`` per attempt were a measurable share of a small request's cost).
        A watched call has ``timer is WATCHED``; it leaves the queue when it reaches
        the head and is no longer watched.

        @return: False when the clock went back (the order would break): the caller
            then uses a timer of its own.
        """
        timeouts = self.timeouts
        expiry = now + self.route.timeout
        if timeouts and timeouts[-1].expiry > expiry:
            return False
        call.expiry = expiry
        timeouts.append(call)
        if self.timeoutCall is None and not self.firing:
            self.timeoutCall = self.clock.callLater(self.route.timeout, self._timeUp)
        return True

    def unwatch(self) -> None:
        """A watched attempt ended before its timeout (its ``timer`` is cleared)."""
        timeouts = self.timeouts
        while timeouts and timeouts[0].timer is not WATCHED:
            timeouts.popleft()
        if not timeouts and self.timeoutCall is not None:
            self.timeoutCall.cancel()
            self.timeoutCall = None

    def _timeUp(self) -> None:
        self.timeoutCall = None
        timeouts = self.timeouts
        # A microsecond of slack: the timer of a later head is set from a difference
        # of clock readings, which may round a hair late.
        limit = self.clock.seconds() + 1e-6
        self.firing = True
        try:
            while timeouts and timeouts[0].expiry <= limit:
                call = timeouts.popleft()
                if call.timer is WATCHED:
                    try:
                        call.timeUp(reasons.TIMEOUT)
                    except Exception:  # noqa: BLE001 - one attempt's bug must not stop the others' timeouts
                        log.failure("route {route}: timing out an attempt", route=self.name)
        finally:
            self.firing = False
        while timeouts and timeouts[0].timer is not WATCHED:
            timeouts.popleft()
        if timeouts and self.timeoutCall is None:
            delay = max(0.0, timeouts[0].expiry - self.clock.seconds() - 1e-6)
            self.timeoutCall = self.clock.callLater(delay, self._timeUp)

    # --- downstream connections --------------------------------------------------------

    def admit(self, connection: Any) -> bool:
        """Count a new app connection in, unless the route is at max_connections."""
        if self.activeConnections >= self.route.maxConnections:
            return False
        self.activeConnections += 1
        self.connections.add(connection)
        self.events.connectionsChanged(self.name, self.activeConnections)
        return True

    def release(self, connection: Any) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self.activeConnections -= 1
            self.events.connectionsChanged(self.name, self.activeConnections)


#: ``Call.timer`` of an attempt watched by the route's shared timeout timer.
WATCHED = object()


class Call:
    """One request's passage through the core: its attempts, retries and verdict.

    The Deferred-free way in (:meth:`RouteCore.submit`), for protocols whose
    per-request cost matters: the protocol's own per-request object subclasses
    ``Call`` and the core calls its methods directly, so a request costs no
    Deferred, no callback tuples and no ``Outcome``.  A subclass implements:

    - ``attempt(member)``: start one attempt on ``member`` and report its end,
      exactly once, with :meth:`attemptSucceeded` or :meth:`attemptFailed`
      (from inside ``attempt`` is fine);
    - ``abandon()``: the core gave up on the attempt under way (its timeout, the
      deadline, or :meth:`cancel`): stop it and close what it opened.  No report
      is expected; one that comes anyway is ignored;
    - ``settled(value)``: the verdict with a response: ``tries``, ``member``,
      ``reason`` (``"ok"``, or the failure whose response is handed back as it is)
      and ``budgetExhausted`` say how it came;
    - ``failed(reason)``: the verdict without one (``tries``; ``member``, the last
      member tried, or None).

    With ``trace=True``, ``traceValue`` holds the x-ambassador-trace value (SPEC §6)
    when the verdict comes.
    """

    __slots__ = (
        "core", "key", "safe", "retryOn", "attemptTimeout", "deadlineAt", "tries", "tried",
        "member", "timer", "sleeper", "cancelled", "lastFailure", "trace",
        "waitFrom", "attemptLeft", "trial", "attemptStarted", "open", "expiry", "reason",
        "budgetExhausted", "traceValue",
    )

    #: How many requests this call carries (a line route's pipelined burst: several,
    #: written and answered as one; see ``ambassador.protocols.line.protocol``).  The
    #: budget counts them all, metrics count that many attempts.
    count = 1

    def __init__(
        self, core: RouteCore, key: bytes | None = None, safe: Any = True,
        retryOn: Collection[str] = reasons.RETRYABLE, attemptTimeout: float | None = None,
        trace: bool = False,
    ) -> None:
        self.core = core
        self.key = key
        self.safe = safe
        self.retryOn = retryOn
        #: None: the route's timeout, watched by the route's shared timer.
        self.attemptTimeout = attemptTimeout
        self.tries = 0
        self.tried: list[Member] | None = None
        self.member: Member | None = None
        self.timer: Any = None  # a DelayedCall, or WATCHED
        self.sleeper: IDelayedCall | None = None
        self.cancelled = False
        self.lastFailure: AttemptFailed | None = None
        #: Is an attempt under way (a report of it is expected)?
        self.open = False
        self.reason = reasons.OK
        self.budgetExhausted = False
        # Trace entries so far (None: not traced), when the backoff sleep began, and the
        # deadline left when the current attempt started.
        self.trace: list[str] | None = [] if trace else None
        self.traceValue: str | None = None
        self.waitFrom: float | None = None
        self.attemptLeft = 0.0

    # --- what a protocol implements -----------------------------------------------------

    def attempt(self, member: Member) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        raise NotImplementedError

    def settled(self, value: Any) -> None:
        raise NotImplementedError

    def failed(self, reason: str) -> None:
        raise NotImplementedError

    # --- what the core does ---------------------------------------------------------------

    def start(self) -> None:
        core = self.core
        self.deadlineAt = core.clock.seconds() + core.route.deadline
        core.budget.recordRequest(self.count)
        self._next()

    def cancel(self) -> None:
        """The app went away: abandon the attempt under way or the backoff sleep.
        No verdict follows."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.sleeper is not None:
            self.sleeper.cancel()
            self.sleeper = None
        if self.open:
            self.open = False
            member = self._endAttempt()
            member.breaker.release(self.trial)
            self.abandon()

    def _next(self) -> None:
        self.sleeper = None
        core = self.core
        tried = self.tried
        member = core.balancer.pick(core.candidates(), () if tried is None else tried, self.key)
        if member is None or not member.breaker.acquire():
            if self.lastFailure is not None:
                self._stop(self.lastFailure)
            else:
                if self.trace is not None:
                    self.traceValue = self._traceValue()
                self.failed(reasons.NO_UPSTREAM if not core.members else reasons.BREAKER_OPEN)
            return
        # The breaker's half-open period whose trial slot this attempt holds, if any.
        breaker = member.breaker
        self.trial = None if breaker.closed or breaker.state != HALF_OPEN else breaker.epoch
        self.tries += 1
        self.member = member
        member.inFlight += 1
        member.attempts += self.count
        now = core.clock.seconds()
        left = self.deadlineAt - now
        if self.trace is not None:
            self.attemptLeft = left
        routeTimeout = core.route.timeout
        timeout = self.attemptTimeout
        if timeout is None:
            timeout = routeTimeout
        if left <= timeout:
            self.timer = core.clock.callLater(max(left, 0.0), self.timeUp, reasons.DEADLINE)
        elif timeout == routeTimeout and self.tries == 1 and core.watch(self, now):
            self.timer = WATCHED
        else:
            self.timer = core.clock.callLater(timeout, self.timeUp, reasons.TIMEOUT)
        self.open = True
        self.attemptStarted = now
        try:
            self.attempt(member)
        except Exception:
            self.attemptFailed(Failure())

    def timeUp(self, reason: str) -> None:
        """The attempt under way ran out of time (``timeout`` or ``deadline``)."""
        self.timer = None
        if not self.open:
            return
        self.open = False
        member = self._endAttempt()
        try:
            self.abandon()
        except Exception:  # noqa: BLE001 - the verdict must still come
            log.failure("route {route}: abandoning an attempt on {upstream}",
                        route=self.core.name, upstream=member.upstream)
        self._failedWith(AttemptFailed(reason), member)

    def _endAttempt(self) -> Member:
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer is WATCHED:
                self.core.unwatch()
            else:
                timer.cancel()
        member = self.member
        assert member is not None
        member.inFlight -= 1
        return member

    def attemptSucceeded(self, value: Any) -> None:
        """The attempt under way got its response (a protocol calls this)."""
        if not self.open:
            return  # abandoned: a late answer
        self.open = False
        member = self._endAttempt()
        core = self.core
        member.breaker.success()
        duration = core.clock.seconds() - self.attemptStarted
        count = self.count
        if count == 1:
            core.events.attemptFinished(core.name, member, reasons.OK, duration)
        else:
            core.events.attemptFinished(core.name, member, reasons.OK, duration, count)
        if self.trace is not None:
            self._traceAttempt(member, reasons.OK, self.attemptStarted, duration)
            self.traceValue = self._traceValue()
        self.settled(value)

    def attemptFailed(self, failure: Any) -> None:
        """The attempt under way failed: ``AttemptFailed``, another exception, or a
        ``Failure`` of either (a protocol calls this)."""
        if not self.open:
            return
        self.open = False
        member = self._endAttempt()
        if isinstance(failure, AttemptFailed):
            failed = failure
        else:
            if not isinstance(failure, Failure):
                failure = Failure(failure)
            failed = classify(failure)
            if failed.reason == reasons.PROTOCOL_ERROR and not isinstance(failure.value, AttemptFailed):
                log.failure("route {route}: attempt on {upstream} failed unexpectedly",
                            failure, route=self.core.name, upstream=member.upstream)
        self._failedWith(failed, member)

    def _failedWith(self, failed: AttemptFailed, member: Member) -> None:
        core = self.core
        startedAt = self.attemptStarted
        self.lastFailure = failed
        member.failures += 1
        member.breaker.failure()
        now = core.clock.seconds()
        # (a call of several requests counts its failed ones itself: ``_Burst``)
        core.events.attemptFinished(core.name, member, failed.reason, now - startedAt)
        if self.trace is not None:
            self._traceAttempt(member, failed.reason, startedAt, now - startedAt)
        self.retryOrStop(failed, member, now)

    def retryOrStop(self, failed: AttemptFailed, member: Member, now: float) -> None:
        """After the failed attempt on ``member``: retry (after the backoff) if tries,
        the failure, the request's safety, the deadline and the budget allow, else
        give the verdict.  Also how a request that failed as part of a burst goes on
        on its own (``tries``, ``deadlineAt`` and ``lastFailure`` set by its burst)."""
        core = self.core
        if (
            self.tries >= core.route.retry.attempts
            or failed.reason == reasons.DEADLINE
            or failed.reason not in self.retryOn
            or (failed.written and not self.safe)
        ):
            self._stop(failed)
            return
        policy = core.route.retry
        delay = backoffDelay(self.tries + 1, policy.backoffBase, policy.backoffMax, core.random)
        if failed.retryAfter is not None:
            delay = max(delay, failed.retryAfter)
        if now + delay >= self.deadlineAt:
            self._stop(failed if failed.response is not None else AttemptFailed(reasons.DEADLINE))
            return
        if not core.budget.tryRetry():
            self._stop(failed, budgetExhausted=True)
            return
        core.events.retried(core.name)
        if self.tried is None:
            self.tried = [member]
        else:
            self.tried.append(member)
        if self.trace is not None:
            self.waitFrom = now
        if delay > 0:
            self.sleeper = core.clock.callLater(delay, self._next)
        else:
            self._next()

    def _stop(self, failed: AttemptFailed, budgetExhausted: bool = False) -> None:
        if self.trace is not None:
            self.traceValue = self._traceValue()
        if failed.response is not None:
            self.reason = failed.reason
            self.budgetExhausted = budgetExhausted
            self.settled(failed.response)
            return
        self.failed(reasons.BUDGET_EXHAUSTED if budgetExhausted else failed.reason)

    def _traceAttempt(self, member: Member, result: str, startedAt: float, duration: float) -> None:
        """One trace entry: ``N UPSTREAM RESULT DURATIONms wait=Wms left=Lms`` (SPEC §6);
        wait is the backoff actually slept before this attempt, left the deadline left
        when it started; milliseconds rounded to whole numbers."""
        assert self.trace is not None
        waited = 0.0 if self.waitFrom is None else startedAt - self.waitFrom
        self.waitFrom = None
        self.trace.append(
            f"{self.tries} {member.upstream} {result} {round(duration * 1000)}ms "
            f"wait={round(waited * 1000)}ms left={max(0, round(self.attemptLeft * 1000))}ms"
        )

    def _traceValue(self) -> str:
        """The header value of the finished request, remembered for /status."""
        assert self.trace is not None
        value = ", ".join(self.trace)
        self.core.traces.append(value)
        return value


class _DeferredCall(Call):
    """:meth:`RouteCore.request`: a ``Call`` whose attempts are Deferreds and whose
    verdict fires a Deferred (``Outcome`` or ``RequestFailed``)."""

    __slots__ = ("attemptFunction", "current", "result")

    def __init__(
        self, core: RouteCore, attempt: Callable[[Member], Deferred[Any]], key: bytes | None,
        safe: Any, retryOn: Collection[str], attemptTimeout: float | None, trace: bool,
    ) -> None:
        Call.__init__(self, core, key, safe, retryOn, attemptTimeout, trace)
        self.attemptFunction = attempt
        self.current: Deferred[Any] | None = None
        self.result: Deferred[Outcome] = Deferred(self._cancelResult)

    def attempt(self, member: Member) -> None:
        d = self.attemptFunction(member)
        self.current = d
        d.addCallbacks(self._reported, self._reportedFailure, callbackArgs=(d,), errbackArgs=(d,))

    def _reported(self, value: Any, d: Deferred[Any]) -> None:
        if d is self.current:
            self.current = None
            self.attemptSucceeded(value)

    def _reportedFailure(self, failure: Failure, d: Deferred[Any]) -> None:
        if d is self.current:
            self.current = None
            self.attemptFailed(failure)

    def abandon(self) -> None:
        d, self.current = self.current, None
        if d is not None:
            d.cancel()

    def settled(self, value: Any) -> None:
        member = self.member
        assert member is not None
        self.result.callback(Outcome(
            value, self.tries, member, self.reason, self.budgetExhausted, self.traceValue,
        ))

    def failed(self, reason: str) -> None:
        error = RequestFailed(reason, self.tries, self.member)
        error.trace = self.traceValue
        self.result.errback(error)

    def _cancelResult(self, result: Deferred[Outcome]) -> None:
        self.cancel()
