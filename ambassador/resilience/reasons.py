"""Failure reasons (SPEC §3) and how exceptions map to them."""

from __future__ import annotations

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeoutError
from twisted.python.failure import Failure

CONNECT_FAILURE = "connect-failure"
TLS_ERROR = "tls-error"
RESET = "reset"
TIMEOUT = "timeout"
DEADLINE = "deadline"
PROTOCOL_ERROR = "protocol-error"
BREAKER_OPEN = "breaker-open"
BUDGET_EXHAUSTED = "budget-exhausted"
OVERLOADED = "overloaded"
NO_UPSTREAM = "no-upstream"
UNSUPPORTED = "unsupported"
#: The app closed its connection before it had an answer (nginx's 499).
CLIENT_CLOSED = "client-closed"
OK = "ok"

#: Reasons a retry may follow, when the protocol does not narrow them.
RETRYABLE = frozenset({CONNECT_FAILURE, TLS_ERROR, RESET, TIMEOUT})


class AttemptFailed(Exception):
    """An attempt failed for ``reason``.

    @ivar response: what the member answered, if it answered (e.g. an HTTP 503); it is
        handed to the app when retries stop.
    @ivar written: whether any of the request may have reached the member; an
        unwritten request is safe to retry whatever it is.
    @ivar retryAfter: the member asked to wait this long before trying again.
    """

    def __init__(
        self, reason: str, response: object = None, written: bool = True,
        retryAfter: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response
        self.written = written
        self.retryAfter = retryAfter


class RequestFailed(Exception):
    """Retries stopped with no response to hand back; ``reason`` says why."""

    def __init__(self, reason: str, attempts: int, member: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.member = member
        #: With ``RouteCore.request(..., trace=True)``: the x-ambassador-trace value.
        self.trace: str | None = None


def _isTLSError(value: BaseException) -> bool:
    try:
        from OpenSSL.SSL import Error as SSLError
    except ImportError:  # pragma: no cover - pyOpenSSL is a dependency
        return False
    return isinstance(value, SSLError)


def classify(failure: Failure) -> AttemptFailed:
    """Turn whatever an attempt failed with into an AttemptFailed."""
    value = failure.value
    if isinstance(value, AttemptFailed):
        return value
    if _isTLSError(value):
        return AttemptFailed(TLS_ERROR, written=False)
    if isinstance(value, (ierror.ConnectError, DeferredTimeoutError)):
        return AttemptFailed(CONNECT_FAILURE, written=False)
    if isinstance(value, (ierror.ConnectionLost, ierror.ConnectionDone, CancelledError)):
        return AttemptFailed(RESET)
    return AttemptFailed(PROTOCOL_ERROR)
