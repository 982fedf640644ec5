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
    """Requests and retries in a sliding window of one-second buckets.

    Running totals of the window are kept next to the buckets, and the current
    second's end is remembered: recording a request (every request does) costs a
    clock reading, one comparison and two additions, not a ``floor`` and a ``sum``
    over the window.
    """

    def __init__(
        self, clock: IReactorTime, ratio: float, minPerSecond: float, window: int = 10
    ) -> None:
        self._clock = clock
        self.ratio = ratio
        self.minPerSecond = minPerSecond
        self._window = window
        self._requests = [0] * window
        self._retries = [0] * window
        self._requestTotal = 0
        self._retryTotal = 0
        self._second = math.floor(clock.seconds())
        self._slot = self._second % window
        #: When the current second ends (the buckets need clearing from then on).
        self._secondEnds = self._second + 1

    def _advance(self) -> int:
        """Clear the buckets of seconds that left the window; return the current slot."""
        now = self._clock.seconds()
        if now < self._secondEnds:
            return self._slot
        second = math.floor(now)
        gap = second - self._second
        if gap > 0:
            window = self._window
            requests, retries = self._requests, self._retries
            for step in range(1, min(gap, window) + 1):
                slot = (self._second + step) % window
                self._requestTotal -= requests[slot]
                self._retryTotal -= retries[slot]
                requests[slot] = 0
                retries[slot] = 0
            self._second = second
            self._slot = second % window
        self._secondEnds = second + 1
        return self._slot

    def recordRequest(self, count: int = 1) -> None:
        self._requests[self._advance()] += count
        self._requestTotal += count

    @property
    def requests(self) -> int:
        self._advance()
        return self._requestTotal

    @property
    def retries(self) -> int:
        self._advance()
        return self._retryTotal

    @property
    def allowed(self) -> int:
        """How many retries the current window allows in all."""
        self._advance()
        return int(self.ratio * self._requestTotal + self.minPerSecond * self._window)

    def tryRetry(self) -> bool:
        """Take one retry from the budget if it has room; False when exhausted."""
        slot = self._advance()
        if self._retryTotal + 1 > self.ratio * self._requestTotal + self.minPerSecond * self._window:
            return False
        self._retries[slot] += 1
        self._retryTotal += 1
        return True
