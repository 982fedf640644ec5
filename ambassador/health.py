"""Active health checks of a route's members (SPEC §2 ``[route.health]``, §3 Health).

Every ``interval`` each member gets one check, bounded by ``timeout``:

- http routes: ``GET path`` over the member's own endpoint (its TLS included), the
  answer's status must be ``expect_status``;
- line routes: redis ``PING`` -> ``+PONG``; memcached ``version`` -> ``VERSION ...``;
  the plain line dialect (and any other): a connection;
- tcp routes and any other protocol: a connection (``path``/``expect_status`` are
  http only).

``unhealthy_threshold`` failed checks in a row set ``Member.healthy`` to False, the
flag the balancers already respect (``Member.usable``), so a failing member is left
out before a user request meets it; ``healthy_threshold`` passed checks in a row set
it back.  Members count as healthy before their first check.  The breaker is left
to live traffic: ``/status`` shows the two verdicts apart.

The checks open their own connections (never a pooled one): a check must see what a
new connection would see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.endpoints import memberHost

log = Logger(namespace="ambassador")


class CheckFailed(Exception):
    """The member answered, but not what a healthy one answers."""


class _Probe(Protocol):
    """Sends ``request`` once connected and judges the bytes that come back with
    ``verdict(buffer) -> True | False | None`` (None: need more bytes)."""

    def __init__(self, request: bytes, verdict: Callable[[bytes], bool | None]) -> None:
        self.request = request
        self.verdict = verdict
        self.buffer = b""
        self.done: Deferred[None] = Deferred(lambda _: self._abort())
        self.transport: Any = None

    def connectionMade(self) -> None:
        if self.request:
            self.transport.write(self.request)
        else:
            self._finish(True)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 65536:
            self._finish(False)
            return
        result = self.verdict(self.buffer)
        if result is not None:
            self._finish(result)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            result = self.verdict(self.buffer) if self.buffer else None
            if result:
                self.done.callback(None)
            else:
                self.done.errback(CheckFailed(
                    "closed before an answer" if result is None
                    else f"unexpected answer {self.buffer[:80]!r}"))

    def _finish(self, ok: bool) -> None:
        transport = self.transport
        if not self.done.called:
            if ok:
                self.done.callback(None)
            else:
                self.done.errback(CheckFailed(f"unexpected answer {self.buffer[:80]!r}"))
        if transport is not None:
            transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


def httpVerdict(expectStatus: int) -> Callable[[bytes], bool | None]:
    def verdict(buffer: bytes) -> bool | None:
        line, sep, _ = buffer.partition(b"\r\n")
        if not sep:
            return None
        parts = line.split(None, 2)
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == str(expectStatus).encode()

    return verdict


def _lineVerdict(prefix: bytes) -> Callable[[bytes], bool | None]:
    def verdict(buffer: bytes) -> bool | None:
        line, sep, _ = buffer.partition(b"\n")
        if not sep:
            return None
        return line.startswith(prefix)

    return verdict


def probeFor(route: Any, member: Any) -> _Probe:
    """The check of one member of ``route`` (see the module docstring)."""
    policy = route.health
    if route.protocol == "http":
        host = route.options.get("host_header") or _hostHeader(member, route.tls is not None)
        request = (
            f"GET {policy.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ambassador-health\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode("idna" if not host.isascii() else "ascii")
        return _Probe(request, httpVerdict(policy.expectStatus))
    if route.protocol == "line":
        dialect = route.options.get("dialect")
        if dialect == "redis":
            return _Probe(b"*1\r\n$4\r\nPING\r\n", _lineVerdict(b"+PONG"))
        if dialect == "memcached":
            return _Probe(b"version\r\n", _lineVerdict(b"VERSION"))
    return _Probe(b"", lambda buffer: True)


def _hostHeader(member: Any, tls: bool) -> str:
    """The member's Host as the http route sends it (SPEC §2 ``host_header``): its
    host name (a discovered member's DNS name), ``:port`` unless 80 (plain) or 443
    (TLS); ``localhost`` when there is none (``unix:``)."""
    host = member.hostName or memberHost(member.upstream)
    if not host:
        return "localhost"
    port = member.upstream.rpartition(":")[2]
    secure = tls or member.upstream.startswith("tls:")
    if not port.isdigit() or port == ("443" if secure else "80"):
        return host
    return f"{host}:{port}"


class HealthChecks(Service):
    """Checks every member of one route every ``interval`` (``[route.health]``).

    @param core: the route's ``RouteCore`` (its ``members`` change with discovery).
    @param route: the route (its ``health`` policy, protocol and options).
    @param clock: ``IReactorTime`` (and the reactor whose endpoints the members use).
    """

    def __init__(self, core: Any, route: Any, clock: Any) -> None:
        self.core = core
        self.route = route
        self.policy = route.health
        self.clock = clock
        #: Member -> consecutive results so far: (passed, failed).
        self.streaks: dict[Any, tuple[int, int]] = {}
        self.checking: dict[Any, Deferred[Any]] = {}
        self.loop: LoopingCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.loop = LoopingCall(self.checkAll)
        self.loop.clock = self.clock
        self.loop.start(self.policy.interval, now=True)

    def stopService(self) -> None:
        Service.stopService(self)
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None
        for d in list(self.checking.values()):
            d.cancel()
        self.checking.clear()

    def checkAll(self) -> Deferred[Any]:
        """One round: check every current member not still being checked."""
        members = list(self.core.members)
        for gone in [m for m in self.streaks if m not in members]:
            del self.streaks[gone]
        checks = [self.check(m) for m in members if m not in self.checking]
        return DeferredList(checks, consumeErrors=True)

    def check(self, member: Any) -> Deferred[bool]:
        """Check ``member`` once; fires with the verdict after updating its flag."""
        probe = probeFor(self.route, member)
        connecting = member.endpoint.connect(_OneProbe(probe))

        def connected(protocol: Any) -> Deferred[None]:
            return probe.done

        d: Deferred[Any] = connecting.addCallback(connected)
        d.addTimeout(self.policy.timeout, self.clock)
        self.checking[member] = d

        def judged(result: Any) -> bool:
            self.checking.pop(member, None)
            ok = not isinstance(result, Failure)
            if not ok:
                probe._abort()
            self.record(member, ok, None if ok else _why(result))
            return ok

        return d.addBoth(judged)

    def record(self, member: Any, ok: bool, why: str | None = None) -> None:
        """Count one result; flip ``member.healthy`` at the thresholds."""
        if member.retired or not self.running:
            return
        passed, failed = self.streaks.get(member, (0, 0))
        passed, failed = (passed + 1, 0) if ok else (0, failed + 1)
        self.streaks[member] = (passed, failed)
        if member.healthy and failed >= self.policy.unhealthyThreshold:
            member.healthy = False
            log.warn("route {route}: {upstream} is unhealthy after {n} failed checks ({why})",
                     route=self.route.name, upstream=member.upstream, n=failed, why=why)
        elif not member.healthy and passed >= self.policy.healthyThreshold:
            member.healthy = True
            log.info("route {route}: {upstream} is healthy again after {n} passed checks",
                     route=self.route.name, upstream=member.upstream, n=passed)


class _OneProbe(Factory):
    noisy = False

    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def buildProtocol(self, addr: Any) -> _Probe:
        return self.probe


def _why(failure: Failure) -> str:
    from twisted.internet.defer import CancelledError
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    if failure.check(DeferredTimeout, CancelledError):
        return "timeout"
    return failure.getErrorMessage() or type(failure.value).__name__
