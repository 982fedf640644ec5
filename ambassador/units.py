"""Durations and sizes as ops write them in TOML: ``"50ms"``, ``"2s"``, ``"1MiB"``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parseDuration(value: object) -> float:
    """Seconds from a number of seconds or a string with a unit; must be > 0."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 5, \"250ms\" or \"2s\", not a boolean")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) > 2**53:
            raise ValueError(f"must be a duration of at most {2**53} seconds, not {value}")
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration (a number of seconds, or a number with ms, s, m or h)"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"must be a duration such as 5 or \"2s\", not {type(value).__name__}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"must be a positive duration, not {value!r}")
    return seconds


def parseSize(value: object) -> int:
    """Bytes from a number of bytes or a string with KiB, MiB or GiB; must be >= 0."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 65536 or \"1MiB\", not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a size (a number of bytes, or a number with KiB, MiB or GiB)")
        size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
        if size == float("inf"):
            raise ValueError(f"{value!r} is too large a size")
        size = int(size)
    else:
        raise ValueError(f"must be a size such as 65536 or \"1MiB\", not {type(value).__name__}")
    if size < 0:
        raise ValueError(f"must not be negative, not {value!r}")
    return size


def formatDuration(seconds: float) -> str:
    """The shortest faithful way to print a duration back to ops."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
