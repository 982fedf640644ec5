"""The per-member breaker (SPEC §3): every transition, driven by a ``task.Clock``."""

from twisted.internet.task import Clock

from ambassador.resilience.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def breaker(failureThreshold=3, resetTimeout=10.0, halfOpenMax=1):
    clock = Clock()
    clock.advance(1000)
    changes: list[tuple[str, float]] = []
    b = Breaker(clock, failureThreshold, resetTimeout, halfOpenMax,
                lambda state: changes.append((state, clock.seconds())))
    return clock, b, changes


def fail(b: Breaker, times: int) -> None:
    for _ in range(times):
        assert b.acquire()
        b.failure()


def test_a_new_breaker_is_closed_and_admits():
    _clock, b, changes = breaker()
    assert b.state == CLOSED
    assert b.admits() and b.acquire()
    assert b.changedAt is None and changes == []


def test_threshold_consecutive_failures_open_it():
    _clock, b, changes = breaker(failureThreshold=3)
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN
    assert changes == [(OPEN, 1000.0)]
    assert b.changedAt == 1000.0


def test_a_success_resets_the_count():
    _clock, b, _changes = breaker(failureThreshold=3)
    fail(b, 2)
    assert b.acquire()
    b.success()
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN


def test_open_admits_nothing_until_the_reset_timeout():
    clock, b, _changes = breaker(failureThreshold=1, resetTimeout=10.0)
    fail(b, 1)
    clock.advance(9.9)
    assert b.state == OPEN
    assert not b.admits()
    assert not b.acquire()


def test_half_open_after_the_reset_timeout_dated_when_it_became_due():
    clock, b, changes = breaker(failureThreshold=1, resetTimeout=10.0)
    fail(b, 1)
    clock.advance(25)  # nobody asked for 25 s: the change is still dated at +10 s
    assert b.state == HALF_OPEN
    assert b.changedAt == 1010.0
    assert [s for s, _ in changes] == [OPEN, HALF_OPEN]


def test_half_open_admits_exactly_half_open_max_concurrent_trials():
    clock, b, _changes = breaker(failureThreshold=1, resetTimeout=10.0, halfOpenMax=2)
    fail(b, 1)
    clock.advance(10)
    assert b.admits()
    assert b.acquire() and b.acquire()
    assert not b.admits()
    assert not b.acquire()
    assert b.trials == 2


def test_a_trial_success_closes_it():
    clock, b, changes = breaker(failureThreshold=1, resetTimeout=10.0)
    fail(b, 1)
    clock.advance(10)
    assert b.acquire()
    clock.advance(0.5)
    b.success()
    assert b.state == CLOSED
    assert b.changedAt == 1010.5
    assert b.trials == 0
    assert [s for s, _ in changes] == [OPEN, HALF_OPEN, CLOSED]
    assert b.acquire() and b.acquire()  # closed: no limit


def test_a_trial_failure_opens_it_again_for_another_reset_timeout():
    clock, b, changes = breaker(failureThreshold=3, resetTimeout=10.0)
    fail(b, 3)
    clock.advance(10)
    assert b.acquire()
    clock.advance(1)
    b.failure()  # one failure suffices while half-open
    assert b.state == OPEN
    assert b.changedAt == 1011.0
    assert b.trials == 0
    clock.advance(9.9)
    assert not b.acquire()
    clock.advance(0.1)
    assert b.state == HALF_OPEN
    assert [s for s, _ in changes] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_release_frees_a_trial_without_a_verdict():
    clock, b, _changes = breaker(failureThreshold=1, resetTimeout=10.0, halfOpenMax=1)
    fail(b, 1)
    clock.advance(10)
    assert b.acquire()
    assert not b.acquire()
    b.release()
    assert b.state == HALF_OPEN
    assert b.trials == 0
    assert b.acquire()


def test_release_while_closed_changes_nothing():
    _clock, b, changes = breaker()
    assert b.acquire()
    b.release()
    assert b.state == CLOSED and b.trials == 0 and changes == []


def test_a_late_success_of_an_attempt_admitted_before_opening_keeps_it_open():
    _clock, b, _changes = breaker(failureThreshold=1)
    assert b.acquire()  # admitted while closed, still under way
    fail(b, 1)
    b.success()
    assert b.state == OPEN


def test_release_of_an_attempt_admitted_while_closed_frees_no_trial():
    clock, b, _changes = breaker(failureThreshold=1, resetTimeout=10.0, halfOpenMax=1)
    assert b.acquire()  # closed: holds no trial slot
    fail(b, 1)
    clock.advance(10)
    assert b.acquire()  # the one trial of this half-open period
    b.release(None)
    assert b.trials == 1 and not b.acquire()


def test_release_of_a_trial_from_an_earlier_half_open_period_frees_nothing():
    clock, b, _changes = breaker(failureThreshold=1, resetTimeout=10.0, halfOpenMax=2)
    fail(b, 1)
    clock.advance(10)
    assert b.acquire() and b.acquire()  # trials A and B
    first = b.epoch
    b.failure()  # B fails: open again, A still under way
    clock.advance(10)
    assert b.acquire() and b.acquire()  # two trials of the next period
    assert b.epoch == first + 1
    b.release(first)  # A is abandoned: it held a slot of a period that is over
    assert b.trials == 2 and not b.acquire()
    b.release(b.epoch)
    assert b.trials == 1 and b.acquire()
