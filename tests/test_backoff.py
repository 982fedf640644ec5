"""Full-jitter backoff (SPEC §2): the sleep before try n is
random(0, min(max, base * 2**(n-2)))."""

import random

from hypothesis import given
from hypothesis import strategies as st

from ambassador.resilience.backoff import backoffDelay

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(
    attempt=st.integers(min_value=2, max_value=5000),
    base=st.floats(min_value=1e-6, max_value=60.0),
    maximum=st.floats(min_value=1e-6, max_value=3600.0),
    draw=unit,
)
def test_delay_is_within_zero_and_the_capped_exponential(attempt, base, maximum, draw):
    delay = backoffDelay(attempt, base, maximum, lambda: draw)
    exponent = min(attempt - 2, 1000)  # 2.0**1000 still fits a float; beyond, max wins
    assert 0.0 <= delay <= min(maximum, base * 2.0**exponent)


@given(attempt=st.integers(min_value=-5, max_value=1), draw=unit)
def test_first_try_has_no_sleep(attempt, draw):
    assert backoffDelay(attempt, 0.05, 2.0, lambda: draw) == 0.0


def test_the_ceiling_doubles_per_retry_up_to_the_maximum():
    almostOne = 1.0 - 1e-12
    ceilings = [backoffDelay(n, 0.05, 2.0, lambda: almostOne) for n in range(2, 10)]
    assert [round(c, 6) for c in ceilings] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_the_jitter_is_full_down_to_zero():
    assert backoffDelay(5, 0.05, 2.0, lambda: 0.0) == 0.0
    rng = random.Random(7)
    delays = [backoffDelay(4, 1.0, 10.0, rng.random) for _ in range(2000)]
    assert min(delays) < 0.2 and max(delays) > 3.8  # spread over [0, 4), not clustered
