"""Log output: one JSON object a line for container log collectors (``--log-format json``)."""

from __future__ import annotations

from typing import IO, Any

from twisted.logger import jsonFileLogObserver


def jsonObserver(stream: IO[str]) -> Any:
    # The default record separator \x1e breaks NDJSON shippers (TWISTED-NOTES).
    return jsonFileLogObserver(stream, recordSeparator="")
