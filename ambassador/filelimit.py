"""The process's open-file limit (RLIMIT_NOFILE), raised at start-up.

A route at ``max_connections`` holds about two descriptors per app connection (the
app's and its member's: HAProxy sizes its limit as ``maxconn * 2`` for the same
reason), so the default ``max_connections = 1024`` alone needs over 2,048, and the
usual soft limit is 1,024 (systemd's default, kept low only for programs that still
use ``select()``).  Past it, ``accept()`` fails with EMFILE and connections wait in
the kernel's queue instead of being served or turned away with ``overloaded``.

So, as Go does for every program since 1.19, the ambassador raises its soft limit to
the hard one when it starts (no privilege needed), logs both, and warns when even the
hard limit is below what the configured routes may need.  A program started in
wrapper mode gets the original soft limit back (``childLimit``), as Go's ``os/exec``
does: a legacy app that uses ``select()`` keeps the limit it was written for.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="ambassador")

#: Descriptors for everything that max_connections does not count: listening
#: sockets, the admin endpoint, logs, DNS, health checks, pooled idle connections.
RESERVE = 256

#: The soft limit found at start-up, before raising it (None: not raised).
original: int | None = None


def needed(routes: Iterable[Any]) -> int:
    """Descriptors the routes may hold at full load: two per app connection."""
    return 2 * sum(route.maxConnections for route in routes) + RESERVE


def raiseLimit(routes: Iterable[Any], limits: Any = resource) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; return (soft before, soft now).

    @param limits: has C{getrlimit}/C{setrlimit}/C{RLIMIT_NOFILE}/C{RLIM_INFINITY}
        (the C{resource} module; a fake in tests).
    """
    global original
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    want = needed(routes)
    now = soft
    infinite = limits.RLIM_INFINITY
    if soft == infinite:
        target = soft  # nothing to raise
    elif hard == infinite:
        # Linux never has an infinite hard limit for files; elsewhere the kernel's
        # own per-process cap applies, so ask only for what the routes need.
        target = max(soft, want)
    else:
        target = hard
    if target != soft:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=e)
        else:
            original = soft
            now = target
            log.info("open-file limit raised from {soft} to {now} (routes need up to {want})",
                     soft=soft, now=now, want=want)
    if now != infinite and now < want:
        log.warn(
            "open-file limit {now} is below the {want} that the routes' max_connections "
            "may need: past it new connections wait in the kernel's queue (raise the hard "
            "limit, e.g. LimitNOFILE= in systemd, or lower max_connections)",
            now=now, want=want,
        )
    return soft, now


@contextlib.contextmanager
def childLimit(limits: Any = resource) -> Iterator[None]:
    """Within the block (a fork and exec), the soft limit is the one found at start."""
    if original is None:
        yield
        return
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    limits.setrlimit(limits.RLIMIT_NOFILE, (original, hard))
    try:
        yield
    finally:
        limits.setrlimit(limits.RLIMIT_NOFILE, (soft, hard))
