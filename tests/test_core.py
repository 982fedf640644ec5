"""RouteCore.request (SPEC §3): attempts, retries, timeouts, the deadline, the budget,
breakers, cancellation and what observers see, all on a ``task.Clock`` with fake
attempts whose Deferreds the tests fire (or cancel) themselves.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ambassador.config import BreakerPolicy, RetryPolicy, Route
from ambassador.interfaces import IRouteObserver
from ambassador.resilience import reasons
from ambassador.resilience.breaker import HALF_OPEN, OPEN
from ambassador.resilience.core import Outcome, RequestRecord, RouteCore
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed, RequestFailed

UPSTREAMS = ["tcp:127.0.0.1:9001", "tcp:127.0.0.1:9002", "tcp:127.0.0.1:9003"]


@implementer(IRouteObserver)
class Recorder:
    """An observer that writes down every call, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def attemptFinished(self, route: str, member: Any, result: str, duration: float, count: int = 1) -> None:
        for _ in range(count):
            self.events.append(("attempt", route, member.upstream, result, duration))

    def retried(self, route: str) -> None:
        self.events.append(("retried", route))

    def breakerChanged(self, route: str, member: Any, state: str) -> None:
        self.events.append(("breaker", route, member.upstream, state))

    def requestFinished(self, route: str, record: Any) -> None:
        self.events.append(("request", route, record))

    def connectionsChanged(self, route: str, active: int) -> None:
        self.events.append(("connections", route, active))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


class Attempts:
    """The protocol's side: each call is one attempt whose Deferred the test controls;
    cancelling one is recorded, so a test can tell that nothing was left running."""

    def __init__(self) -> None:
        self.calls: list[tuple[Member, Deferred[Any]]] = []
        self.cancelled: list[Member] = []

    def __call__(self, member: Member) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(member))
        self.calls.append((member, d))
        return d

    @property
    def members(self) -> list[str]:
        return [m.upstream for m, _ in self.calls]

    def last(self) -> Deferred[Any]:
        return self.calls[-1][1]


def makeCore(
    upstreams=UPSTREAMS, *, attempts=3, timeout=5.0, deadline=15.0, backoffBase=0.05,
    backoffMax=2.0, budgetRatio=0.2, budgetMinPerSecond=10.0, failureThreshold=5,
    resetTimeout=10.0, halfOpenMax=1, balance="round_robin", draw=0.0,
) -> tuple[RouteCore, Clock, Recorder]:
    route = Route(
        name="r", protocol="tcp", listen="tcp:1:interface=127.0.0.1", upstreams=tuple(upstreams),
        timeout=timeout, deadline=deadline, balance=balance,
        retry=RetryPolicy(attempts, backoffBase, backoffMax, budgetRatio, budgetMinPerSecond),
        breaker=BreakerPolicy(failureThreshold, resetTimeout, halfOpenMax),
    )
    clock = Clock()
    recorder = Recorder()
    core = RouteCore(route, clock, lambda upstream: None, [recorder], random=lambda: draw)
    return core, clock, recorder


def result(d: Deferred[Any]) -> Any:
    """The value or Failure a Deferred has already fired with (it must have fired)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the request has not finished"
    return box[0]


def requestFailed(d: Deferred[Any]) -> RequestFailed:
    value = result(d)
    assert isinstance(value, Failure), value
    assert value.check(RequestFailed), value
    return value.value


def pending(d: Deferred[Any]) -> bool:
    return not d.called


def connectFailure() -> AttemptFailed:
    return AttemptFailed(reasons.CONNECT_FAILURE, written=False)


def assertQuiet(core: RouteCore, clock: Clock) -> None:
    """Nothing is left over: no timer, no attempt counted in flight, no trial held."""
    assert clock.getDelayedCalls() == []
    for member in core.members:
        assert member.inFlight == 0
        assert member.breaker.trials == 0


def test_the_recorder_provides_the_observer_interface():
    assert verifyObject(IRouteObserver, Recorder())


# --- success and retries -------------------------------------------------------------


def test_success_on_the_first_try():
    core, clock, recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts)
    assert attempts.members == [UPSTREAMS[0]]
    assert core.members[0].inFlight == 1
    clock.advance(0.25)
    attempts.last().callback("response")
    outcome = result(d)
    assert isinstance(outcome, Outcome)
    assert (outcome.value, outcome.attempts, outcome.reason) == ("response", 1, "ok")
    assert outcome.member is core.members[0]
    assert outcome.budgetExhausted is False
    assert recorder.events == [("attempt", "r", UPSTREAMS[0], "ok", 0.25)]
    assert core.members[0].attempts == 1 and core.members[0].failures == 0
    assertQuiet(core, clock)


def test_a_connect_failure_is_retried_on_another_member():
    core, clock, recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    assert attempts.members == UPSTREAMS[:2]
    attempts.last().callback("response")
    outcome = result(d)
    assert (outcome.value, outcome.attempts, outcome.member.upstream) == ("response", 2, UPSTREAMS[1])
    assert [e[0] for e in recorder.events] == ["attempt", "retried", "attempt"]
    assert recorder.of("attempt")[0][3] == "connect-failure"
    assert core.members[0].failures == 1
    assertQuiet(core, clock)


def test_connection_errors_are_classified_and_retried():
    core, _clock, recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(ierror.ConnectionRefusedError())
    attempts.last().errback(ierror.ConnectionLost())
    attempts.last().callback("ok")
    assert result(d).attempts == 3
    assert [e[3] for e in recorder.of("attempt")] == ["connect-failure", "reset", "ok"]


def test_the_retry_sleeps_its_backoff_first():
    # draw 0.5: the sleep before try 2 is 0.5 * min(2s, 50ms * 2**0) = 25 ms
    core, clock, recorder = makeCore(draw=0.5)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    assert len(attempts.calls) == 1
    assert recorder.of("retried") == [("retried", "r")]  # decided before the sleep
    clock.advance(0.024)
    assert len(attempts.calls) == 1
    clock.advance(0.001)
    assert len(attempts.calls) == 2
    attempts.last().callback("ok")
    assert result(d).attempts == 2


def test_tries_stop_at_attempts_with_the_last_reason():
    core, clock, recorder = makeCore(attempts=3)
    attempts = Attempts()
    d = core.request(attempts)
    for _ in range(3):
        attempts.last().errback(connectFailure())
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("connect-failure", 3)
    assert failed.member is core.members[2]
    assert attempts.members == UPSTREAMS
    assert len(recorder.of("retried")) == 2
    assertQuiet(core, clock)


def test_attempts_one_never_retries():
    core, _clock, recorder = makeCore(attempts=1)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    assert requestFailed(d).attempts == 1
    assert recorder.of("retried") == []


def test_a_single_member_is_retried_when_it_is_all_there_is():
    core, _clock, _recorder = makeCore(upstreams=UPSTREAMS[:1])
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    attempts.last().callback("ok")
    assert attempts.members == [UPSTREAMS[0]] * 2
    assert result(d).attempts == 2


def test_a_reason_outside_retry_on_is_not_retried():
    core, _clock, _recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts, retryOn={"connect-failure"})
    attempts.last().errback(AttemptFailed(reasons.RESET))
    assert requestFailed(d).reason == "reset"
    assert len(attempts.calls) == 1


def test_an_unexpected_error_is_a_protocol_error_and_not_retried():
    core, _clock, _recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(ZeroDivisionError())
    assert requestFailed(d).reason == "protocol-error"
    assert len(attempts.calls) == 1


def test_an_attempt_that_raises_counts_as_a_failed_attempt():
    core, clock, _recorder = makeCore()
    calls: list[Member] = []

    def attempt(member: Member) -> Deferred[Any]:
        calls.append(member)
        raise ierror.ConnectionRefusedError()

    d = core.request(attempt)
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("connect-failure", 3)
    assert len(calls) == 3
    assertQuiet(core, clock)


# --- safety --------------------------------------------------------------------------


def test_an_unsafe_request_is_not_retried_after_a_written_failure():
    core, _clock, recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts, safe=False)
    attempts.last().errback(AttemptFailed(reasons.RESET, written=True))
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("reset", 1)
    assert recorder.of("retried") == []


def test_an_unsafe_request_is_retried_when_nothing_was_written():
    core, _clock, _recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts, safe=False)
    attempts.last().errback(connectFailure())
    assert len(attempts.calls) == 2
    attempts.last().callback("ok")
    assert result(d).attempts == 2


def test_a_safe_request_is_retried_after_a_written_failure():
    core, _clock, _recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts, safe=True)
    attempts.last().errback(AttemptFailed(reasons.RESET, written=True))
    attempts.last().callback("ok")
    assert result(d).attempts == 2


# --- timeouts and the deadline -------------------------------------------------------


def test_an_attempt_over_its_timeout_is_cancelled_with_reason_timeout():
    core, clock, recorder = makeCore(attempts=1, timeout=1.0)
    attempts = Attempts()
    d = core.request(attempts)
    clock.advance(0.999)
    assert pending(d) and attempts.cancelled == []
    clock.advance(0.001)
    assert attempts.cancelled == [core.members[0]]  # the attempt was told to stop
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("timeout", 1)
    assert recorder.of("attempt") == [("attempt", "r", UPSTREAMS[0], "timeout", 1.0)]
    assertQuiet(core, clock)


def test_a_timed_out_attempt_is_retried_elsewhere():
    core, clock, _recorder = makeCore(timeout=1.0)
    attempts = Attempts()
    d = core.request(attempts)
    clock.advance(1.0)
    assert attempts.members == UPSTREAMS[:2]
    attempts.last().callback("ok")
    assert result(d).attempts == 2


def test_concurrent_attempts_each_time_out_on_their_own_start_plus_timeout():
    """The attempts bounded by the route timeout share one timer (RouteCore.watch):
    each still ends exactly at its own start + timeout, finished ones never fire,
    and no timer is left once none is under way."""
    core, clock, recorder = makeCore(attempts=1, timeout=1.0)
    attempts = Attempts()
    first = core.request(attempts)
    clock.advance(0.25)
    second = core.request(attempts)
    clock.advance(0.25)
    third = core.request(attempts)
    assert len(clock.getDelayedCalls()) == 1
    second.addErrback(lambda f: None)
    attempts.calls[1][1].callback("ok")  # finished: its expiry must not matter
    clock.advance(0.4999)
    assert pending(first) and pending(third)
    clock.advance(0.0001)
    assert requestFailed(first).reason == "timeout" and pending(third)
    clock.advance(0.4999)
    assert pending(third)
    clock.advance(0.0001)
    assert requestFailed(third).reason == "timeout"
    assert [e[3] for e in recorder.of("attempt")] == ["ok", "timeout", "timeout"]
    assertQuiet(core, clock)


def test_an_attempt_whose_cancel_raises_does_not_stop_the_other_timeouts():
    core, clock, _recorder = makeCore(attempts=1, timeout=1.0)

    def broken(member: Member) -> Deferred[Any]:
        def canceller(d: Deferred[Any]) -> None:
            raise RuntimeError("a protocol bug")
        return Deferred(canceller)

    attempts = Attempts()
    core.request(broken)
    clock.advance(0.5)
    later = core.request(attempts)
    clock.advance(0.5)
    clock.advance(0.5)
    assert requestFailed(later).reason == "timeout"


def test_a_timed_out_attempts_retry_is_watched_behind_older_attempts():
    core, clock, _recorder = makeCore(attempts=2, timeout=1.0, backoffBase=0.0)
    attempts = Attempts()
    first = core.request(attempts)
    clock.advance(0.5)
    second = core.request(attempts)
    clock.advance(0.5)  # the first attempt times out and is retried at once
    assert len(attempts.calls) == 3 and pending(first)
    clock.advance(0.5)  # the second request's attempt: its own timeout, not the retry's
    assert len(attempts.calls) == 4 and pending(second)
    attempts.calls[2][1].callback("ok")
    attempts.calls[3][1].callback("ok")
    assert result(first).attempts == 2 and result(second).attempts == 2
    assertQuiet(core, clock)


def test_the_attempt_timeout_argument_overrides_the_route_timeout():
    core, clock, _recorder = makeCore(attempts=1, timeout=1.0)
    attempts = Attempts()
    d = core.request(attempts, attemptTimeout=3.0)
    clock.advance(2.0)
    assert pending(d)
    clock.advance(1.0)
    assert requestFailed(d).reason == "timeout"


def test_an_attempt_cut_by_the_deadline_fails_with_deadline():
    core, clock, _recorder = makeCore(timeout=5.0, deadline=3.0)
    attempts = Attempts()
    d = core.request(attempts)
    clock.advance(3.0)
    assert attempts.cancelled == [core.members[0]]
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("deadline", 1)
    assert len(attempts.calls) == 1  # a deadline is never retried
    assertQuiet(core, clock)


def test_a_later_attempt_gets_only_the_time_left():
    # try 1 fails at t=2.5 and try 2 starts at once; 0.5 s of the deadline are left
    core, clock, _recorder = makeCore(timeout=2.0, deadline=3.0)
    attempts = Attempts()
    d = core.request(attempts)
    clock.advance(1.5)
    attempts.last().errback(connectFailure())
    clock.advance(1.0)
    assert pending(d)
    clock.advance(0.5)
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("deadline", 2)
    assert attempts.cancelled == [core.members[1]]
    assertQuiet(core, clock)


def test_a_backoff_that_would_end_after_the_deadline_is_never_started():
    # draw 0.5 with base 10 s: a 5 s sleep, but only 1 s of deadline is left
    core, clock, recorder = makeCore(deadline=1.0, backoffBase=10.0, backoffMax=10.0, draw=0.5)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    failed = requestFailed(d)  # at once, without advancing the clock
    assert (failed.reason, failed.attempts) == ("deadline", 1)
    assert recorder.of("retried") == []
    assert core.budget.retries == 0
    assertQuiet(core, clock)


def test_a_response_is_returned_at_once_when_retry_after_exceeds_the_deadline():
    core, clock, recorder = makeCore(deadline=10.0)
    attempts = Attempts()
    d = core.request(attempts, retryOn={"503"})
    attempts.last().errback(AttemptFailed("503", response="503 response", retryAfter=60.0))
    outcome = result(d)
    assert isinstance(outcome, Outcome)
    assert (outcome.value, outcome.reason, outcome.attempts) == ("503 response", "503", 1)
    assert outcome.budgetExhausted is False
    assert recorder.of("retried") == []
    assertQuiet(core, clock)


def test_retry_after_within_the_deadline_lengthens_the_sleep():
    core, clock, _recorder = makeCore(deadline=10.0, draw=0.0)
    attempts = Attempts()
    d = core.request(attempts, retryOn={"503"})
    attempts.last().errback(AttemptFailed("503", response="busy", retryAfter=2.0))
    clock.advance(1.99)
    assert len(attempts.calls) == 1
    clock.advance(0.01)
    assert len(attempts.calls) == 2
    attempts.last().callback("ok")
    assert result(d).value == "ok"


def test_a_retryable_response_on_the_last_try_is_handed_back():
    core, _clock, _recorder = makeCore(attempts=2)
    attempts = Attempts()
    d = core.request(attempts, retryOn={"503"})
    attempts.last().errback(AttemptFailed("503", response="first"))
    attempts.last().errback(AttemptFailed("503", response="second"))
    outcome = result(d)
    assert (outcome.value, outcome.reason, outcome.attempts) == ("second", "503", 2)


# --- the budget ----------------------------------------------------------------------


def test_an_exhausted_budget_stops_retries_with_budget_exhausted():
    core, clock, recorder = makeCore(budgetRatio=0.0, budgetMinPerSecond=0.0)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("budget-exhausted", 1)
    assert recorder.of("retried") == []
    assertQuiet(core, clock)


def test_an_exhausted_budget_with_a_response_hands_it_back_marked():
    core, _clock, _recorder = makeCore(budgetRatio=0.0, budgetMinPerSecond=0.0)
    attempts = Attempts()
    d = core.request(attempts, retryOn={"503"})
    attempts.last().errback(AttemptFailed("503", response="busy"))
    outcome = result(d)
    assert isinstance(outcome, Outcome)
    assert (outcome.value, outcome.reason, outcome.budgetExhausted) == ("busy", "503", True)


def test_retries_sleeping_in_backoff_count_against_the_budget():
    # 0.1 per second over 10 s: one retry in the window, whatever its state
    core, clock, _recorder = makeCore(budgetRatio=0.0, budgetMinPerSecond=0.1, draw=0.5)
    first, second = Attempts(), Attempts()
    d1 = core.request(first)
    d2 = core.request(second)
    first.last().errback(connectFailure())
    assert core.budget.retries == 1 and pending(d1)  # sleeping its backoff
    second.last().errback(connectFailure())
    assert requestFailed(d2).reason == "budget-exhausted"
    clock.advance(1)
    first.last().callback("ok")
    assert result(d1).attempts == 2


def test_every_request_counts_in_the_budget():
    core, _clock, _recorder = makeCore()
    for _ in range(4):
        core.request(Attempts())
    assert core.budget.requests == 4


# --- breakers ------------------------------------------------------------------------


def openAll(core: RouteCore) -> None:
    for member in core.members:
        for _ in range(member.breaker.failureThreshold):
            assert member.breaker.acquire()
            member.breaker.failure()
        assert member.breaker.state == OPEN


def test_all_breakers_open_fails_at_once_without_an_attempt():
    core, clock, _recorder = makeCore()
    openAll(core)
    attempts = Attempts()
    d = core.request(attempts)
    failed = requestFailed(d)
    assert (failed.reason, failed.attempts) == ("breaker-open", 0)
    assert attempts.calls == []
    assertQuiet(core, clock)


def test_open_members_get_no_attempts():
    core, _clock, _recorder = makeCore(failureThreshold=1)
    attempts = Attempts()
    core.request(attempts).addErrback(lambda f: None)
    attempts.last().errback(connectFailure())  # opens member 1, retries on member 2
    attempts.last().callback("ok")
    for _ in range(4):
        core.request(attempts)
        attempts.last().callback("ok")
    assert UPSTREAMS[0] not in attempts.members[1:]


def test_failures_open_the_breaker_and_observers_see_it():
    core, _clock, recorder = makeCore(failureThreshold=2, attempts=1)
    for _ in range(2):
        attempts = Attempts()
        d = core.request(attempts)
        attempts.last().errback(connectFailure())
        requestFailed(d)
    # round robin: the two failures went to two members, neither opened yet
    assert recorder.of("breaker") == []
    for _ in range(4):
        attempts = Attempts()
        d = core.request(attempts)
        attempts.last().errback(connectFailure())
        requestFailed(d)
    assert ("breaker", "r", UPSTREAMS[0], "open") in recorder.events
    assert ("breaker", "r", UPSTREAMS[1], "open") in recorder.events


def test_the_half_open_trial_goes_through_the_core_and_closes_the_breaker():
    core, clock, recorder = makeCore(upstreams=UPSTREAMS[:1], failureThreshold=1, resetTimeout=10.0)
    openAll(core)
    clock.advance(10)
    attempts = Attempts()
    d = core.request(attempts)
    assert core.members[0].breaker.trials == 1
    assert requestFailed(core.request(Attempts())).reason == "breaker-open"  # no second trial
    attempts.last().callback("ok")
    assert result(d).value == "ok"
    assert [e[3] for e in recorder.of("breaker")] == ["open", "half-open", "closed"]
    assertQuiet(core, clock)


def test_a_failed_half_open_trial_reopens_and_ends_the_request():
    core, clock, _recorder = makeCore(upstreams=UPSTREAMS[:1], failureThreshold=1, resetTimeout=10.0)
    openAll(core)
    clock.advance(10)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    failed = requestFailed(d)
    # the only member is open again: no retry to make, the last failure is the answer
    assert (failed.reason, failed.attempts) == ("connect-failure", 1)
    assert core.members[0].breaker.state == OPEN
    assertQuiet(core, clock)


def test_hash_retries_on_the_keys_member_while_its_breaker_admits_it():
    core, _clock, _recorder = makeCore(balance="hash", failureThreshold=5)
    attempts = Attempts()
    d = core.request(attempts, key=b"user:42")
    attempts.last().errback(connectFailure())
    attempts.last().callback("ok")
    assert attempts.members[0] == attempts.members[1]
    assert result(d).attempts == 2


def test_hash_retries_on_the_next_member_of_the_ring_once_the_keys_member_is_open():
    core, _clock, _recorder = makeCore(balance="hash", failureThreshold=1)
    attempts = Attempts()
    d = core.request(attempts, key=b"user:42")
    attempts.last().errback(connectFailure())
    attempts.last().callback("ok")
    assert attempts.members[0] != attempts.members[1]
    assert result(d).attempts == 2


# --- cancellation --------------------------------------------------------------------


def test_cancelling_the_request_cancels_the_attempt_and_holds_no_trial():
    core, clock, recorder = makeCore(upstreams=UPSTREAMS[:1], failureThreshold=1)
    openAll(core)
    clock.advance(10)
    attempts = Attempts()
    d = core.request(attempts)
    assert core.members[0].breaker.state == HALF_OPEN and core.members[0].breaker.trials == 1
    d.cancel()
    assert attempts.cancelled == [core.members[0]]
    assert result(d).check(CancelledError)
    assert core.members[0].breaker.state == HALF_OPEN
    assert core.members[0].breaker.admits()
    assert recorder.of("attempt") == []  # an abandoned attempt says nothing about the member
    assertQuiet(core, clock)


def test_cancelling_the_request_during_backoff_stops_the_timer():
    core, clock, _recorder = makeCore(draw=0.5)
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().errback(connectFailure())
    assert len(clock.getDelayedCalls()) == 1  # the backoff sleep
    d.cancel()
    assert result(d).check(CancelledError)
    assertQuiet(core, clock)
    clock.advance(60)
    assert len(attempts.calls) == 1


def test_cancelling_a_finished_request_changes_nothing():
    core, _clock, _recorder = makeCore()
    attempts = Attempts()
    d = core.request(attempts)
    attempts.last().callback("ok")
    d.cancel()
    assert result(d).value == "ok"
    assert attempts.cancelled == []


# --- connections and records ---------------------------------------------------------


def test_admit_counts_connections_up_to_max_connections():
    core, _clock, recorder = makeCore()
    core.route = core.route.__class__(**{**_fields(core.route), "maxConnections": 2})
    a, b, c = object(), object(), object()
    assert core.admit(a) and core.admit(b)
    assert not core.admit(c)
    core.release(a)
    core.release(a)  # twice is harmless
    assert core.activeConnections == 1
    assert core.admit(c)
    assert [e[2] for e in recorder.of("connections")] == [1, 2, 1, 2]


def test_finished_requests_reach_the_observers():
    core, _clock, recorder = makeCore()
    record = RequestRecord("tcp:127.0.0.1:9001", 1, "ok", 0.5, bytesIn=3, bytesOut=4)
    core.finished(record)
    assert recorder.of("request") == [("request", "r", record)]


def _fields(route: Route) -> dict[str, Any]:
    import attrs

    return attrs.asdict(route, recurse=False)


@pytest.mark.parametrize("failure, reason", [
    (ierror.ConnectionRefusedError(), "connect-failure"),
    (ierror.TimeoutError(), "connect-failure"),
    (ierror.ConnectionLost(), "reset"),
    (ierror.ConnectionDone(), "reset"),
    (AttemptFailed("502", response="x"), "502"),
    (ValueError("junk"), "protocol-error"),
])
def test_attempt_failures_are_reported_with_their_reason(failure, reason):
    core, _clock, recorder = makeCore(attempts=1)
    attempts = Attempts()
    d = core.request(attempts, retryOn=())
    attempts.last().errback(failure)
    d.addErrback(lambda f: None)
    assert recorder.of("attempt")[0][3] == reason


# --- any sequence of attempt results -------------------------------------------------


RESULTS = ["ok", "connect-failure", "reset", "503", "hang", "raise"]


@settings(max_examples=100, deadline=None)
@given(
    results=st.lists(st.tuples(st.sampled_from(RESULTS), st.floats(0.0, 3.0)), min_size=1, max_size=12),
    tries=st.integers(1, 5),
    failureThreshold=st.integers(1, 3),
    safe=st.booleans(),
    budgetMinPerSecond=st.sampled_from([0.0, 0.1, 10.0]),
    draw=st.floats(0.0, 0.999),
    cancelAt=st.one_of(st.none(), st.floats(0.0, 12.0)),
)
def test_any_request_ends_once_and_leaves_nothing_behind(
    results, tries, failureThreshold, safe, budgetMinPerSecond, draw, cancelAt,
):
    core, clock, recorder = makeCore(
        attempts=tries, timeout=2.0, deadline=10.0, backoffBase=0.5, backoffMax=4.0,
        failureThreshold=failureThreshold, resetTimeout=1.0, budgetRatio=0.0,
        budgetMinPerSecond=budgetMinPerSecond, draw=draw,
    )
    fired: list[Any] = []
    calls: list[Member] = []
    script = iter(results)
    plans: list[tuple[Deferred[Any], str, float]] = []

    def attempt(member: Member) -> Deferred[Any]:
        calls.append(member)
        kind, after = next(script, ("hang", 0.0))
        if kind == "raise":
            raise ierror.ConnectionRefusedError()
        d: Deferred[Any] = Deferred()
        plans.append((d, kind, clock.seconds() + after))
        return d

    d = core.request(attempt, safe=safe, retryOn={"connect-failure", "reset", "timeout", "503"})
    d.addBoth(lambda v: fired.append((v, clock.seconds())))
    for _ in range(2000):  # 20 s of fake time in 10 ms steps: past the deadline
        if cancelAt is not None and clock.seconds() >= cancelAt and not fired:
            d.cancel()
        for planned in list(plans):
            attemptD, kind, at = planned
            if attemptD.called:
                plans.remove(planned)
            elif clock.seconds() >= at and kind != "hang":
                plans.remove(planned)
                if kind == "ok":
                    attemptD.callback("response")
                elif kind == "503":
                    attemptD.errback(AttemptFailed("503", response="busy"))
                elif kind == "connect-failure":
                    attemptD.errback(connectFailure())
                else:
                    attemptD.errback(AttemptFailed(kind))
        if fired and not clock.getDelayedCalls():
            break
        clock.advance(0.01)

    assert len(fired) == 1  # fired exactly once (a second firing raises AlreadyCalledError)
    value, firedAt = fired[0]
    assert firedAt <= 10.0 + 0.011  # never after the deadline (10 ms clock steps)
    if isinstance(value, Outcome):
        assert 1 <= value.attempts <= tries
    else:
        assert isinstance(value, Failure)
        assert value.check(RequestFailed, CancelledError)
        if value.check(RequestFailed):
            assert 0 <= value.value.attempts <= tries
            assert value.value.attempts == len(calls)
    assert len(calls) <= tries
    assertQuiet(core, clock)
    # every attempt that was not abandoned by a cancel was reported once
    assert len(recorder.of("attempt")) <= len(calls)
    assert len(recorder.of("retried")) <= len(calls)
    if isinstance(value, Outcome) or value.check(RequestFailed):
        assert len(recorder.of("attempt")) == len(calls)


def test_an_attempt_admitted_while_closed_does_not_free_a_half_open_trial():
    # half_open_max = 1: the slot belongs to the trial, not to an older attempt that
    # was let through while the breaker was still closed and is abandoned later.
    core, clock, _recorder = makeCore(
        upstreams=UPSTREAMS[:1], failureThreshold=1, resetTimeout=10.0, halfOpenMax=1,
        timeout=100.0, deadline=100.0, attempts=1,
    )
    old, failing, trial, extra = Attempts(), Attempts(), Attempts(), Attempts()
    oldRequest = core.request(old)  # admitted while closed, still under way
    core.request(failing).addErrback(lambda f: None)
    failing.last().errback(connectFailure())  # opens the breaker
    clock.advance(10)
    core.request(trial)
    assert core.members[0].breaker.trials == 1
    oldRequest.cancel()
    assert old.cancelled == [core.members[0]]
    assert core.members[0].breaker.trials == 1  # the trial is still under way
    assert requestFailed(core.request(extra)).reason == "breaker-open"
    assert extra.calls == []


def test_event_fan_out_sees_observers_added_and_removed_after_traffic() -> None:
    """Events are dispatched through cached callables; an ObserverList (the
    service's) invalidates them when an observer comes or goes."""
    from ambassador.resilience.core import ObserverList, _Observers

    class Seen:
        def __init__(self) -> None:
            self.events: list[tuple[Any, ...]] = []

        def retried(self, *args: Any) -> None:
            self.events.append(args)

    first, second = Seen(), Seen()
    observers = ObserverList([first])
    events = _Observers(observers)
    events.retried("r1")
    observers.append(second)
    events.retried("r2")
    observers.remove(first)
    events.retried("r3")
    assert first.events == [("r1",), ("r2",)]
    assert second.events == [("r2",), ("r3",)]
    observers.remove(second)
    events.retried("r4")  # nobody listens: nothing happens
    assert second.events == [("r2",), ("r3",)]
