"""A member: one upstream instance of a route, with its breaker and counters."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from ambassador.resilience.breaker import Breaker
from ambassador.resilience.reasons import AttemptFailed, classify


class Member:
    """One upstream instance.

    @ivar upstream: the endpoint string as configured (the metrics label).
    @ivar healthy: the verdict of active health checks (True before the first check).
    @ivar inFlight: attempts under way now (for least_request and /status).
    @ivar source: the ``dns:``/``srv:`` upstream that found this member (None: configured).
    @ivar hostName: the DNS name behind a discovered member (TLS, Host headers).
    @ivar priority: lower gets the traffic first (``srv:``; 0 for every other member).
    @ivar weight: share of traffic within its priority (``srv:``; 1 for every other).
    @ivar retired: discovery no longer finds it: no new attempts, pools may close it.
    """

    __slots__ = ("upstream", "endpoint", "breaker", "healthy", "inFlight", "attempts", "failures",
                 "source", "hostName", "priority", "weight", "retired")

    def __init__(self, upstream: str, endpoint: IStreamClientEndpoint, breaker: Breaker) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.breaker = breaker
        self.healthy = True
        self.inFlight = 0
        self.attempts = 0
        self.failures = 0
        self.source: str | None = None
        self.hostName: str | None = None
        self.priority = 0
        self.weight = 1
        self.retired = False

    @property
    def usable(self) -> bool:
        breaker = self.breaker
        return self.healthy and (breaker.closed or breaker.admits())

    def connect(self, factory: Any, clock: IReactorTime, timeout: float) -> Deferred[Any]:
        """Connect within ``timeout`` (the route's connect_timeout).

        Fails with ``AttemptFailed(connect-failure | tls-error, written=False)``;
        cancelling the result stops the connection attempt.
        """
        d = self.endpoint.connect(factory)
        d.addTimeout(timeout, clock)
        d.addErrback(_connectFailed)
        return d

    def __repr__(self) -> str:
        return f"<Member {self.upstream} {self.breaker.state}>"


def _connectFailed(failure: Failure) -> Failure:
    reason = classify(failure)
    if reason.written:
        # Whatever broke while connecting, nothing of the request was sent.
        reason = AttemptFailed("connect-failure", written=False)
    return Failure(reason)
