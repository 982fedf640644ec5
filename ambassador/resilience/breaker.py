"""A circuit breaker for one member: closed, open, half-open.

``failureThreshold`` consecutive failed attempts open it; an open breaker admits
nothing until ``resetTimeout`` has passed; then it is half-open and admits at most
``halfOpenMax`` concurrent trial attempts; a success closes it, a failure opens it
again (SPEC §3).  Open -> half-open is computed from the clock when asked, so an
idle breaker costs no timer; the change is dated at the moment it became due.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

CLOSED = "closed"
HALF_OPEN = "half-open"
OPEN = "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Breaker:
    def __init__(
        self,
        clock: IReactorTime,
        failureThreshold: int,
        resetTimeout: float,
        halfOpenMax: int,
        onChange: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self.failureThreshold = failureThreshold
        self.resetTimeout = resetTimeout
        self.halfOpenMax = halfOpenMax
        self._onChange = onChange
        self._state = CLOSED
        #: ``state == CLOSED``, as a plain attribute: what every attempt asks first,
        #: answered without a property call (open -> half-open needs no check here).
        self.closed = True
        self._openedAt = 0.0
        self.consecutiveFailures = 0
        self.trials = 0
        #: Half-open periods so far: a trial belongs to the period that admitted it.
        self.epoch = 0
        self.changedAt: float | None = None

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock.seconds() >= self._openedAt + self.resetTimeout:
            self.epoch += 1
            self._set(HALF_OPEN, self._openedAt + self.resetTimeout)
            self.trials = 0
        return self._state

    def admits(self) -> bool:
        """Would an attempt be let through now (without taking a trial slot)?"""
        if self.closed:
            return True
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            return self.trials < self.halfOpenMax
        return False

    def acquire(self) -> bool:
        """Take permission for one attempt; every True must be followed by exactly one
        of success(), failure() or release()."""
        if self.closed:
            return True
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and self.trials < self.halfOpenMax:
            self.trials += 1
            return True
        return False

    def success(self) -> None:
        self.consecutiveFailures = 0
        if self._state == HALF_OPEN:
            self.trials = max(0, self.trials - 1)
            self._set(CLOSED, self._clock.seconds())
        elif self._state == OPEN:
            # An attempt admitted before the breaker opened came back fine: the
            # member works, but let the reset timeout decide; count it as a sign of life.
            pass

    def failure(self) -> None:
        self.consecutiveFailures += 1
        if self._state == HALF_OPEN:
            self.trials = max(0, self.trials - 1)
            self._open()
        elif self._state == CLOSED and self.consecutiveFailures >= self.failureThreshold:
            self._open()

    def release(self, trial: int | None = -1) -> None:
        """The attempt ended with no verdict on the member (e.g. the app went away).

        @param trial: the ``epoch`` in which the attempt took a trial slot, None if it
            was admitted while closed (it holds no slot), -1 for the current period.
            Without it, an abandoned old attempt would free a slot that a trial of the
            current period holds, letting more than ``halfOpenMax`` trials through.
        """
        if self._state == HALF_OPEN and trial is not None and trial in (-1, self.epoch):
            self.trials = max(0, self.trials - 1)

    def _open(self) -> None:
        self._openedAt = self._clock.seconds()
        self._set(OPEN, self._openedAt)

    def _set(self, state: str, at: float) -> None:
        if state != self._state:
            self._state = state
            self.closed = state == CLOSED
            self.changedAt = at
            if self._onChange is not None:
                self._onChange(state)
