"""A leaner per-event dispatch for the epoll reactor.

For every ready socket, Twisted's ``EPollReactor.doPoll`` calls
``log.callWithLogger(selectable, handler, ...)``, which asks the selectable for its
``logPrefix()``, builds a context dict and pushes it on a thread-local context
stack, only so that a *legacy* ``twisted.python.log.msg`` made inside the handler is
tagged with that prefix.  The ambassador logs through ``twisted.logger`` (which does
not read that context) and its access lines carry the route name, so the
tag buys nothing here, while the wrapping cost about 8-10 % of the CPU of a small
proxied request (py-spy under ``redis-benchmark -P 1`` and ``wrk``, bench/README.md).

:func:`streamlineDispatch` swaps the ``log`` module that ``epollreactor`` looks up
for a stand-in whose ``callWithLogger`` only keeps what matters: an exception that
escapes the handler is still logged (with the selectable's prefix, computed then)
and never stops the reactor.  Everything else is the real module.  It applies only
to Twisted's own ``EPollReactor`` with the module it was written against; any other
reactor, or a Twisted whose ``epollreactor`` no longer has that shape, is left alone.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.python import log as _log


def _prefix(logger: Any) -> str:
    try:
        return str(logger.logPrefix())
    except BaseException:  # noqa: BLE001 - as callWithLogger does
        return "(buggy logPrefix method)"


def callWithLogger(logger: Any, func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``twisted.python.log.callWithLogger`` without the log context."""
    try:
        return func(*args, **kw)
    except KeyboardInterrupt:
        raise
    except BaseException:
        _log.err(system=_prefix(logger))
        return None


class _LogModule:
    """``twisted.python.log`` with a context-free ``callWithLogger``."""

    callWithLogger = staticmethod(callWithLogger)

    def __getattr__(self, name: str) -> Any:
        return getattr(_log, name)


def streamlineDispatch(reactor: Any) -> bool:
    """Make ``reactor``'s per-event dispatch context-free (see the module docstring).

    @return: whether it was applied.
    """
    try:
        from twisted.internet import epollreactor
    except ImportError:  # not Linux
        return False
    if not isinstance(reactor, epollreactor.EPollReactor):
        return False
    if getattr(epollreactor, "log", None) is not _log:
        return isinstance(getattr(epollreactor, "log", None), _LogModule)
    epollreactor.log = _LogModule()  # type: ignore[attr-defined]
    return True
