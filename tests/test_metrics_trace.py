"""The resilience trace (SPEC §6): every attempt of a traced request, from the core."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ambassador.config import RetryPolicy, Route
from ambassador.resilience import AttemptFailed, RequestFailed, RouteCore


def makeCore(clock: Clock, upstreams=("tcp:127.0.0.1:1", "tcp:127.0.0.1:2", "tcp:127.0.0.1:3"),
             attempts: int = 3) -> RouteCore:
    route = Route(
        name="r", protocol="tcp", listen="tcp:1:interface=127.0.0.1", upstreams=tuple(upstreams),
        timeout=1.0, deadline=10.0,
        retry=RetryPolicy(attempts=attempts, backoffBase=0.1, backoffMax=1.0),
    )
    # random() = 0.5: every backoff is half its ceiling, so the waits are known.
    return RouteCore(route, clock, lambda upstream: None, random=lambda: 0.5)


class Attempts:
    """Attempt functions whose Deferreds the test fires by hand."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, member: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((member, d))
        return d


def test_trace_lists_every_attempt_with_wait_and_deadline_left() -> None:
    clock = Clock()
    core = makeCore(clock)
    attempts = Attempts()
    results: list[Any] = []
    core.request(attempts, trace=True, retryOn={"reset", "503"}).addBoth(results.append)

    clock.advance(0.2)
    attempts.pending[0][1].errback(AttemptFailed("reset"))  # backoff 0.05 s
    clock.advance(0.05)
    clock.advance(0.03)
    attempts.pending[1][1].errback(AttemptFailed("503", response="busy"))  # backoff 0.1 s
    clock.advance(0.1)
    clock.advance(0.004)
    attempts.pending[2][1].callback("fine")

    outcome = results[0]
    assert outcome.value == "fine" and outcome.attempts == 3
    upstreams = [m.upstream for m, _ in attempts.pending]
    assert outcome.trace == (
        f"1 {upstreams[0]} reset 200ms wait=0ms left=10000ms, "
        f"2 {upstreams[1]} 503 30ms wait=50ms left=9750ms, "
        f"3 {upstreams[2]} ok 4ms wait=100ms left=9620ms"
    )
    assert list(core.traces) == [outcome.trace]


def test_a_failed_request_carries_its_trace_too() -> None:
    clock = Clock()
    core = makeCore(clock, attempts=2)
    attempts = Attempts()
    results: list[Any] = []
    core.request(attempts, trace=True).addErrback(lambda f: results.append(f.value))
    attempts.pending[0][1].errback(AttemptFailed("connect-failure", written=False))
    clock.advance(0.05)
    attempts.pending[1][1].errback(AttemptFailed("connect-failure", written=False))
    failed = results[0]
    assert isinstance(failed, RequestFailed)
    assert failed.reason == "connect-failure"
    assert failed.trace is not None
    entries = failed.trace.split(", ")
    assert [e.split()[0] for e in entries] == ["1", "2"]
    assert all(e.split()[2] == "connect-failure" for e in entries)
    assert list(core.traces) == [failed.trace]


def test_no_trace_unless_asked() -> None:
    clock = Clock()
    core = makeCore(clock)
    attempts = Attempts()
    results: list[Any] = []
    core.request(attempts).addBoth(results.append)
    attempts.pending[0][1].callback("fine")
    assert results[0].trace is None
    assert len(core.traces) == 0


def test_a_route_keeps_the_last_20_traces() -> None:
    clock = Clock()
    core = makeCore(clock)
    attempts = Attempts()
    for _ in range(25):
        core.request(attempts, trace=True)
        attempts.pending[-1][1].callback("fine")
    assert len(core.traces) == 20
