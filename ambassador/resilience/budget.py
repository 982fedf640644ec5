"""The retry budget: retries may be only a share of recent requests.

Without a budget, a sick dependency gets ``attempts`` times its normal load exactly
when it can least take it.  As in Envoy and Finagle, the budget allows
``ratio * requests + minPerSecond * window`` retries in the last ``window`` seconds
(SPEC §2: a 10 s window); a retry counts from the moment it is decided, so retries
sleeping in backoff count too.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime


class RetryBudget:
    """Requests and retries in a sliding window of one-second buckets."""

    def __init__(
        self, clock: IReactorTime, ratio: float, minPerSecond: float, window: int = 10
    ) -> None:
        self._clock = clock
        self.ratio = ratio
        self.minPerSecond = minPerSecond
        self._window = window
        self._requests = [0] * window
        self._retries = [0] * window
        self._second = math.floor(clock.seconds())

    def _advance(self) -> int:
        """Clear the buckets of seconds that left the window; return the current slot."""
        now = math.floor(self._clock.seconds())
        gap = now - self._second
        if gap > 0:
            for step in range(1, min(gap, self._window) + 1):
                slot = (self._second + step) % self._window
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._second = now
        return now % self._window

    def recordRequest(self) -> None:
        self._requests[self._advance()] += 1

    @property
    def requests(self) -> int:
        self._advance()
        return sum(self._requests)

    @property
    def retries(self) -> int:
        self._advance()
        return sum(self._retries)

    @property
    def allowed(self) -> int:
        """How many retries the current window allows in all."""
        self._advance()
        return int(self.ratio * sum(self._requests) + self.minPerSecond * self._window)

    def tryRetry(self) -> bool:
        """Take one retry from the budget if it has room; False when exhausted."""
        slot = self._advance()
        if sum(self._retries) + 1 > self.ratio * sum(self._requests) + self.minPerSecond * self._window:
            return False
        self._retries[slot] += 1
        return True
