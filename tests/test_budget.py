"""The retry budget (SPEC §2): retries in the last 10 s may be at most
budget_ratio * requests in the last 10 s + budget_min_per_second * 10."""

import pytest
from twisted.internet.task import Clock

from ambassador.resilience.budget import RetryBudget


def budget(ratio: float, minPerSecond: float, start: float = 0.0) -> tuple[Clock, RetryBudget]:
    clock = Clock()
    clock.advance(start)
    return clock, RetryBudget(clock, ratio, minPerSecond)


def takeAll(b: RetryBudget, limit: int = 10_000) -> int:
    taken = 0
    while taken < limit and b.tryRetry():
        taken += 1
    return taken


def test_ratio_of_requests_in_the_window():
    _clock, b = budget(0.5, 0)
    for _ in range(10):
        b.recordRequest()
    assert b.allowed == 5
    assert takeAll(b) == 5
    assert (b.requests, b.retries) == (10, 5)
    assert not b.tryRetry()


def test_min_per_second_allows_retries_without_requests():
    _clock, b = budget(0.0, 1)
    assert b.allowed == 10  # 1 per second over the 10 s window
    assert takeAll(b) == 10


def test_ratio_and_min_per_second_add_up():
    _clock, b = budget(0.2, 10)
    for _ in range(50):
        b.recordRequest()
    assert b.allowed == 0.2 * 50 + 10 * 10
    assert takeAll(b) == 110


def test_zero_budget_refuses_every_retry():
    _clock, b = budget(0.0, 0)
    for _ in range(100):
        b.recordRequest()
    assert b.allowed == 0
    assert not b.tryRetry()
    assert b.retries == 0  # a refused retry is not counted


def test_a_retry_counts_from_the_moment_it_is_decided():
    # Whatever the retry then does (sleep in backoff, or never run), it used the budget.
    _clock, b = budget(1.0, 0)
    b.recordRequest()
    assert b.tryRetry()
    assert b.retries == 1
    assert not b.tryRetry()


@pytest.mark.parametrize("start", [0.0, 12345.6])
def test_requests_and_retries_expire_after_the_window(start):
    clock, b = budget(0.5, 0, start)
    for _ in range(4):
        b.recordRequest()
    assert takeAll(b) == 2
    clock.advance(9)
    assert (b.requests, b.retries) == (4, 2)  # still inside the last 10 s
    assert not b.tryRetry()
    clock.advance(1.0)
    assert (b.requests, b.retries) == (0, 0)
    assert b.allowed == 0


def test_the_window_slides_second_by_second():
    clock, b = budget(1.0, 0)
    for second in range(12):
        b.recordRequest()
        if second < 11:
            clock.advance(1)
    # requests of seconds 2..11 are in the window, 0 and 1 have left it
    assert b.requests == 10
    assert b.allowed == 10


def test_a_long_idle_gap_clears_everything():
    clock, b = budget(1.0, 0)
    for _ in range(5):
        b.recordRequest()
        b.tryRetry()
    clock.advance(3600)
    assert (b.requests, b.retries, b.allowed) == (0, 0, 0)
    b.recordRequest()
    assert b.tryRetry()


def test_running_totals_match_a_window_recounted_from_scratch():
    """The kept totals (cheap per request) agree with counting the window anew."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    steps = st.lists(st.tuples(st.sampled_from(["request", "retry", "wait"]),
                               st.floats(0, 13, allow_nan=False)), max_size=80)

    @settings(max_examples=150, deadline=None)
    @given(steps)
    def check(plan: list[tuple[str, float]]) -> None:
        clock, b = budget(0.5, 0.3, start=0.7)
        log: list[tuple[float, str]] = []
        for action, amount in plan:
            if action == "wait":
                clock.advance(amount)
            elif action == "request":
                b.recordRequest()
                log.append((clock.seconds(), "request"))
            elif b.tryRetry():
                log.append((clock.seconds(), "retry"))
            now = int(clock.seconds())
            recent = [kind for at, kind in log if int(at) > now - 10]
            assert b.requests == recent.count("request")
            assert b.retries == recent.count("retry")

    check()
