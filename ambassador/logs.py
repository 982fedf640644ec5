"""Log output: one JSON object a line for container log collectors (``--log-format json``).

Access-log events (namespace ``ambassador.access``, written by ``RouteCore.finished``)
become objects with exactly the SPEC §6 access fields, so a collector can index them
without knowing Twisted's event keys; every other event becomes
``{"time", "level", "namespace", "message"}`` (plus ``"failure"``, the traceback,
when it carries one).  Twisted's own ``jsonFileLogObserver`` would dump its internal
keys (``log_logger``, ``log_source``...) and an unformatted template instead.
"""

from __future__ import annotations

import json
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEvent

#: The namespace of access-log events (one per request / tcp connection).
ACCESS_NAMESPACE = "ambassador.access"

#: The keys of an access line (SPEC §6), in the order they are written.
ACCESS_FIELDS = (
    "route", "upstream", "attempts", "result", "status", "bytes_in", "bytes_out", "duration_ms",
)


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


def jsonObserver(stream: IO[str]) -> FileLogObserver:
    """An observer writing ``formatJSON`` lines to ``stream`` (flushed per event).

    Not ``jsonFileLogObserver``: besides its internal keys, its default record
    separator ``\\x1e`` breaks NDJSON shippers (TWISTED-NOTES).
    """
    return FileLogObserver(stream, formatJSON)
