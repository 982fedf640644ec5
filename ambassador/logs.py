"""Log output: text lines as twistd writes them, or one JSON object a line (``--log-format json``).

Access-log events (namespace ``ambassador.access``, written by ``RouteCore.finished``)
become objects with exactly the SPEC §6 access fields, so a collector can index them
without knowing Twisted's event keys; every other event becomes
``{"time", "level", "namespace", "message"}`` (plus ``"failure"``, the traceback,
when it carries one).  Twisted's own ``jsonFileLogObserver`` would dump its internal
keys (``log_logger``, ``log_source``...) and an unformatted template instead.

Both observers here write one line per event like Twisted's ``FileLogObserver``,
with two savings that matter at one access line per proxied request (measured:
Twisted's text path cost more than the rest of a small request's proxying): the
text of an access line is one C-level ``str.format`` and a timestamp cached per
second instead of ``string.Formatter`` and a time-zone computation per event; and,
given the reactor, access lines are kept and written together, at most
``ACCESS_FLUSH`` seconds after the first of them or once ``ACCESS_BUFFER``
characters wait (nginx's ``access_log ... buffer= flush=``), instead of one
``write`` system call each: containers run Python with ``PYTHONUNBUFFERED=1``
(our Dockerfile does), so ``sys.stdout`` writes through on every line.  Every
other event is written at once, as before, after the access lines before it: the
order of lines is kept, and a stop's last lines flush everything.  A process
killed outright (SIGKILL) loses at most the last ``ACCESS_FLUSH`` seconds of
access lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.compat import ioType
from zope.interface import implementer

#: The namespace of access-log events (one per request / tcp connection).
ACCESS_NAMESPACE = "ambassador.access"

#: The keys of an access line (SPEC §6), in the order they are written.
ACCESS_FIELDS = (
    "route", "upstream", "attempts", "result", "status", "bytes_in", "bytes_out", "duration_ms",
)

#: Longest time an access line waits to be written (seconds), and how many
#: characters of access lines may wait.
ACCESS_FLUSH = 0.1
ACCESS_BUFFER = 64 * 1024

#: The message of an access event (``RouteCore.finished``): the text line's fields.
ACCESS_FORMAT = (
    "{route} {upstream} attempts={attempts} result={result} status={status} "
    "bytes_in={bytes_in} bytes_out={bytes_out} duration_ms={duration_ms}"
)


class _SecondsClock:
    """``formatTime(when, timeFormatRFC3339)``, computed once per second: the format
    has whole seconds, and a time zone's offset changes only on a whole second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when, timeFormatRFC3339)
        second = int(when // 1)
        if when - second >= 0.9999995:
            # datetime rounds to microseconds: this one shows as the next second.
            return formatTime(when, timeFormatRFC3339)
        if second != self.second:
            self.text = formatTime(float(second), timeFormatRFC3339)
            self.second = second
        return self.text


def textFormatter() -> Callable[[LogEvent], str | None]:
    """A function giving each event the exact text of Twisted's
    ``textFileLogObserver`` (``formatEventAsClassicLogText`` with RFC 3339 times),
    access events without ``string.Formatter``."""
    clock = _SecondsClock()

    def formatText(event: LogEvent) -> str | None:
        if (
            event.get("log_format") is ACCESS_FORMAT
            and "log_system" not in event
            and "log_failure" not in event
            and "log_flattened" not in event
        ):
            try:
                # The same values as Twisted's formatter gives: format(value, "").
                text = ACCESS_FORMAT.format_map(event)
                system = f"{event['log_namespace']}#{event['log_level'].name}"
            except Exception:  # noqa: BLE001 - an odd event takes Twisted's own path
                return formatEventAsClassicLogText(event, formatTime=clock)
            line = f"{clock(event.get('log_time'))} [{system}] {text}"
            if "\n" in line:
                line = line.replace("\n", "\n\t")
            return line + "\n"
        return formatEventAsClassicLogText(event, formatTime=clock)

    return formatText


def formatJSON(event: LogEvent) -> str:
    """One event as one line of JSON (NDJSON)."""
    if event.get("log_namespace") == ACCESS_NAMESPACE:
        record: dict[str, Any] = {key: event.get(key) for key in ACCESS_FIELDS}
    else:
        level = event.get("log_level")
        record = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", None),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["failure"] = failure.getTraceback()
            except Exception:  # noqa: BLE001 - a broken failure must not take logging down with it
                record["failure"] = repr(failure)
    # default=str: a field holding some object still makes a valid line.
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as the line ``formatEvent`` makes of it, like Twisted's
    ``FileLogObserver``; given ``clock`` (the reactor), access lines are written
    together, within ``ACCESS_FLUSH`` seconds, instead of one by one.

    Access events come from the reactor thread only (``RouteCore.finished``), which
    ``callLater`` needs; anything else is written at once, after whatever access
    lines wait.
    """

    def __init__(
        self, outFile: IO[Any], formatEvent: Callable[[LogEvent], str | None],
        clock: IReactorTime | None = None,
    ) -> None:
        self.formatEvent = formatEvent
        self._outFile = outFile
        self._encoding = "utf-8" if ioType(outFile) is not str else None
        self._clock = clock
        self._flushCall: Any = None
        self._waiting: list[str] = []
        self._waitingSize = 0

    def __call__(self, event: LogEvent) -> None:
        text = self.formatEvent(event)
        if not text:
            return
        if self._clock is not None and event.get("log_namespace") == ACCESS_NAMESPACE:
            self._waiting.append(text)
            self._waitingSize += len(text)
            if self._waitingSize >= ACCESS_BUFFER:
                self.flush()
            elif self._flushCall is None:
                self._flushCall = self._clock.callLater(ACCESS_FLUSH, self.flush)
            return
        if self._waiting:
            text = "".join(self._waiting) + text
        self._write(text)

    def flush(self) -> None:
        """Write the access lines that wait."""
        self._write("".join(self._waiting))

    def _write(self, text: str) -> None:
        """Write ``text`` (access lines that waited come first in it) and flush."""
        self._waiting = []
        self._waitingSize = 0
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        if not text:
            return
        if self._encoding is None:
            self._outFile.write(text)
        else:
            self._outFile.write(text.encode(self._encoding))
        self._outFile.flush()


def jsonObserver(stream: IO[str], clock: IReactorTime | None = None) -> LineObserver:
    """An observer writing ``formatJSON`` lines to ``stream``.

    Not ``jsonFileLogObserver``: besides its internal keys, its default record
    separator ``\\x1e`` breaks NDJSON shippers (TWISTED-NOTES).
    """
    return LineObserver(stream, formatJSON, clock)


def textObserver(stream: IO[str], clock: IReactorTime | None = None) -> LineObserver:
    """An observer writing the lines twistd's own text observer would write."""
    return LineObserver(stream, textFormatter(), clock)
