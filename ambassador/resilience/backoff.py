"""Full-jitter exponential backoff (the AWS Architecture Blog's "full jitter")."""

from __future__ import annotations

from typing import Callable


def backoffDelay(
    attempt: int, base: float, maximum: float, random: Callable[[], float]
) -> float:
    """The sleep before try number ``attempt`` (2 for the first retry).

    SPEC §2: ``random(0, min(max, base * 2**(n-2)))``.  Full jitter spreads the
    retries of many clients that failed together, so they do not come back as a herd.

    @param random: a source of floats in [0, 1), e.g. ``random.Random().random``.
    """
    if attempt < 2:
        return 0.0
    # Cap the exponent: 2**1000 is fine for floats, but 2**2000 is not.
    ceiling = min(maximum, base * 2.0 ** min(attempt - 2, 64))
    return random() * ceiling
